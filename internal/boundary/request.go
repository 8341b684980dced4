package boundary

import (
	"bytes"
	"context"
	"strconv"
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

// jsonSpace is JSON's whitespace.
const jsonSpace = " \t\r\n"

// existenceDecode decodes a body for an existence check as encoding/json
// does (see decodeWithBatch), except that an array under "batch_input" is
// handed over empty. An existence check sees the body only through the framework's validation of
// the path's fields (FieldData.Validate, which accepts any array for a
// TypeSlice field, as batch_input is wherever it exists) and then reads the
// key's name from the path: a batch's items, most of the body, are not
// looked at until the request itself, which decodes them. The items are
// still scanned (a body Vault sends is always valid JSON: it encoded it).
func existenceDecode(body string) (map[string]interface{}, bool) {
	return decodeWithBatch(body, func(segjson.RawMessage) (interface{}, bool) {
		return []interface{}{}, true
	})
}

// RawObject is one object of a request's batch_input, undecoded: its bytes
// point into the request body, which nothing writes. The backend decodes it
// into its own type, or into the map encoding/json would have given
// (Map).
type RawObject []byte

// Map decodes o as encoding/json.Unmarshal into a map[string]interface{}
// does (the map the item would have been without requestDecode).
func (o *RawObject) Map() (m map[string]interface{}, ok bool) {
	defer func() {
		if recover() != nil {
			m, ok = nil, false
		}
	}()
	rest, err := segjson.Parse(*o, &m, segjson.DontCopyString)
	if err != nil || len(bytes.TrimLeft(rest, jsonSpace)) != 0 || m == nil {
		return nil, false
	}
	return m, true
}

// RawBatch is a request's batch_input as requestDecode hands it over: an
// array whose every element is an object, kept undecoded (Objects).
//
// It is not a slice on purpose. The framework validates every field of a
// request (FieldData.Validate) before the handler runs, and for a TypeSlice
// field that means mapstructure copying the list element by element, with
// a field name built for each ("batch_input[i]"): two allocations and a
// reflective decode per item, for a list nobody reads. Given a value that is
// not a list, mapstructure's weak decoding lifts it into a list of one
// element, which costs nothing per item; the handlers then read the value
// in Raw themselves.
type RawBatch struct {
	list []interface{}
}

// Objects returns the batch's items, each a *RawObject.
func (b *RawBatch) Objects() []interface{} { return b.list }

// numbersFit reports whether every number of a JSON text (valid JSON)
// fits a float64, as encoding/json requires of a number it decodes into an
// interface{}: 1e400 is an error there. A RawMessage is only checked for
// syntax, so the objects handed over undecoded (RawObject) are checked here.
// Without this, a body encoding/json refuses was accepted: fromWire skips
// an out-of-range number in a field it does not know, and the map path
// refused the item as "expected a map, got '*boundary.RawObject'". Only a
// number with an exponent, or longer than 308 bytes, can be out of range:
// those are parsed.
func numbersFit(b []byte) bool {
	for i := 0; i < len(b); i++ {
		c := b[i]
		switch {
		case c == '"':
			// Jump to the string's closing quote, past escaped bytes.
			for {
				j := bytes.IndexByte(b[i+1:], '"')
				if j < 0 {
					return true
				}
				if k := bytes.IndexByte(b[i+1:i+1+j], '\\'); k >= 0 {
					i += k + 2 // the backslash and the byte it escapes
					continue
				}
				i += j + 1
				break
			}
		case c == '-' || ('0' <= c && c <= '9'):
			j, exp := i, false
			for ; j < len(b); j++ {
				d := b[j]
				if d == 'e' || d == 'E' {
					exp = true
				} else if d != '-' && d != '+' && d != '.' && (d < '0' || d > '9') {
					break
				}
			}
			if exp || j-i > 308 {
				if _, err := strconv.ParseFloat(string(b[i:j]), 64); err != nil {
					return false
				}
			}
			i = j - 1
		}
	}
	return true
}

// requestDecode decodes a request's body as encoding/json does (see
// decodeWithBatch), except that a batch_input array whose every element is
// an object is handed over as a *RawBatch, for the backend to decode its
// items into its own types without a map per item. Any other batch_input
// (not an array, or an element that is not an object) is decoded as any
// other field.
func requestDecode(body string) (map[string]interface{}, bool) {
	return decodeWithBatch(body, rawObjects)
}

// rawObjects splits a batch_input array into its objects, or reports false.
func rawObjects(v segjson.RawMessage) (interface{}, bool) {
	var elems []segjson.RawMessage
	rest, err := segjson.Parse(v, &elems, segjson.DontCopyRawMessage)
	if err != nil || len(bytes.TrimLeft(rest, jsonSpace)) != 0 || !numbersFit(v) {
		return nil, false
	}
	objs := make([]RawObject, len(elems))
	list := make([]interface{}, len(elems))
	for i, e := range elems {
		e = bytes.TrimLeft(e, jsonSpace)
		if len(e) == 0 || e[0] != '{' {
			return nil, false
		}
		objs[i] = RawObject(e)
		list[i] = &objs[i]
	}
	return &RawBatch{list: list}, true
}

// decodeWithBatch decodes a JSON object as encoding/json.Unmarshal into a
// map[string]interface{} does, or reports false, and then the SDK decodes
// it: for a body nested deeper than fastDecodeMaxDepth, one the decoder
// refuses, and (defensively: every mount shares this process) a panic in the
// decoder. An array under "batch_input" goes to batch, which returns the
// value to put there, or false to have it decoded as any other field.
//
// The decoder reads the body in place, and its strings point into it
// (DontCopyString, DontCopyRawMessage): the body is an immutable string that
// nothing else holds, so neither copy is needed. It never writes to its
// input.
func decodeWithBatch(body string, batch func(segjson.RawMessage) (interface{}, bool)) (data map[string]interface{}, ok bool) {
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
	if err != nil || len(rest) != 0 || raw == nil {
		return nil, false
	}
	data = make(map[string]interface{}, len(raw))
	for k, v := range raw {
		if k == "batch_input" && bytes.HasPrefix(bytes.TrimLeft(v, jsonSpace), []byte("[")) {
			if x, ok := batch(v); ok {
				data[k] = x
				continue
			}
		}
		var x interface{}
		if rest, err := segjson.Parse(v, &x, segjson.DontCopyString); err != nil || len(rest) != 0 {
			return nil, false
		}
		data[k] = x
	}
	return data, true
}
