package boundary

import (
	"bytes"
	"context"
	"strings"
	"unsafe"

	segjson "github.com/segmentio/encoding/json"
)

const emptyBody = "{}"

// fastDecodeMin is the body size from which the fast decoder is used; below
// it the SDK's decoding costs too little to matter.
const fastDecodeMin = 1024

// fastDecodeMaxDepth is the deepest nesting the fast decoder is given: a
// batch, {"batch_input":[{"plaintext":...}]}, is 3 deep. The fast decoder
// rescans a value's subtree at every level, so its cost grows with depth
// times size; deeper bodies are left to encoding/json, which scans once.
const fastDecodeMaxDepth = 4

// decodedBodyKey carries a request body decoded by UnaryInterceptor to the
// backend.
type decodedBodyKey struct{}

// DecodedBody returns the request body UnaryInterceptor decoded for this
// call, if it did (the SDK then decoded "{}" into the request's Data).
func DecodedBody(ctx context.Context) (map[string]interface{}, bool) {
	data, ok := ctx.Value(decodedBodyKey{}).(map[string]interface{})
	return data, ok
}

// fastDecode decodes a JSON object as encoding/json.Unmarshal into a
// map[string]interface{} does, or reports false, and then the SDK decodes
// it: for a body nested deeper than fastDecodeMaxDepth, one the decoder
// refuses, and (defensively: every mount shares this process) a panic in the
// decoder.
func fastDecode(body string) (data map[string]interface{}, ok bool) {
	if nestingDepth(body) > fastDecodeMaxDepth {
		return nil, false
	}
	defer func() {
		if recover() != nil {
			data, ok = nil, false
		}
	}()
	data = map[string]interface{}{}
	// The decoder reads the body in place, and its strings point into it
	// (DontCopyString): the body is an immutable string that nothing else
	// holds, so neither copy is needed. It never writes to its input.
	rest, err := segjson.Parse(unsafe.Slice(unsafe.StringData(body), len(body)), &data, segjson.DontCopyString)
	if err != nil || len(rest) != 0 {
		// (Unmarshal's rule: anything after the value is an error.)
		return nil, false
	}
	return data, true
}

// nestingDepth is the deepest nesting of objects and arrays in a JSON text,
// by one linear scan that skips strings. It does not validate the text.
func nestingDepth(body string) int {
	depth, deepest, inString := 0, 0, false
	for i := 0; i < len(body); i++ {
		c := body[i]
		if inString {
			// Jump to the next quote (long strings, base64, are most of
			// a batch), unless a backslash comes first.
			j := strings.IndexByte(body[i:], '"')
			if j < 0 {
				return deepest
			}
			if k := strings.IndexByte(body[i:i+j], '\\'); k >= 0 {
				i += k + 1 // the escaped byte cannot end the string
				continue
			}
			i += j
			inString = false
			continue
		}
		if c == '"' {
			inString = true
		} else if c == '{' || c == '[' {
			depth++
			deepest = max(deepest, depth)
		} else if c == '}' || c == ']' {
			depth--
		}
	}
	return deepest
}

// existenceDecode decodes a body for an existence check as fastDecode does,
// except that an array under "batch_input" is handed over empty. An
// existence check sees the body only through the framework's validation of
// the path's fields (FieldData.Validate, which accepts any array for a
// TypeSlice field, as batch_input is wherever it exists) and then reads the
// key's name from the path: a batch's items, most of the body, are not
// looked at until the request itself, which decodes them. The items are
// still scanned (a body Vault sends is always valid JSON: it encoded it).
func existenceDecode(body string) (data map[string]interface{}, ok bool) {
	if nestingDepth(body) > fastDecodeMaxDepth {
		return nil, false
	}
	defer func() {
		if recover() != nil {
			data, ok = nil, false
		}
	}()
	in := unsafe.Slice(unsafe.StringData(body), len(body))
	var raw map[string]segjson.RawMessage
	rest, err := segjson.Parse(in, &raw, segjson.DontCopyRawMessage)
	if err != nil || len(rest) != 0 {
		return nil, false
	}
	data = make(map[string]interface{}, len(raw))
	for k, v := range raw {
		if k == "batch_input" && bytes.HasPrefix(v, []byte("[")) {
			data[k] = []interface{}{}
			continue
		}
		var x interface{}
		if rest, err := segjson.Parse(v, &x, segjson.DontCopyString); err != nil || len(rest) != 0 {
			return nil, false
		}
		data[k] = x
	}
	return data, true
}
