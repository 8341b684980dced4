package hsmtransit

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/boundary"
)

// batchItem is one element of batch_input for encrypt, decrypt, rewrap and
// datakey, or the single request's top-level fields.
type batchItem struct {
	Plaintext            string
	Ciphertext           string
	Context              string
	Nonce                string
	AssociatedData       string
	Reference            string
	PaddingScheme        string
	EncryptPaddingScheme string
	DecryptPaddingScheme string
	IV                   string
	KeyVersion           int

	// Decoded forms, filled by decode.
	context []byte
	nonce   []byte
	iv      []byte
	aad     []byte

	// sealBuf, when set (decodePlaintexts), holds the decoded plaintext
	// with room for an AES-GCM nonce before it and a tag after it: the
	// software fast path seals it there, and then clears sealBuf.
	sealBuf []byte
}

// decodedPlaintext is the item's plaintext, decoded: in sealBuf when
// decodePlaintexts put it there, else decoded now.
func (it *batchItem) decodedPlaintext() ([]byte, error) {
	if it.sealBuf != nil {
		return it.sealBuf[gcmNonceSize : len(it.sealBuf)-gcmTagSize], nil
	}
	return decodePlaintext(it.Plaintext)
}

// decodePlaintexts base64-decodes the plaintext of every item into one
// buffer for the whole batch (each item's sealBuf), and reports the items
// whose plaintext is not base64 to fail, with keysutil's message.
func decodePlaintexts(items []batchItem, fail func(i int, msg string)) {
	size := func(it *batchItem) int {
		return gcmNonceSize + base64.StdEncoding.DecodedLen(len(it.Plaintext)) + gcmTagSize
	}
	total := 0
	for i := range items {
		total += size(&items[i])
	}
	arena := make([]byte, total)
	for i := range items {
		n := size(&items[i])
		buf, err := decodeIntoSealBuffer(arena[:n:n], items[i].Plaintext)
		arena = arena[n:]
		if err != nil {
			fail(i, err.Error())
			continue
		}
		items[i].sealBuf = buf
	}
}

// decodeBatchInput turns batch_input into items. required names a field every
// item must carry ("plaintext" for encrypt, "ciphertext" for decrypt), or "".
// The error is the caller's: a 400 that names the item and field.
func decodeBatchInput(raw interface{}, required, requiredMsg string) ([]batchItem, error) {
	list, ok := batchList(raw)
	if !ok {
		if _, isString := raw.(string); isString {
			return nil, errors.New("batch_input must be a JSON list of objects, not a string; send the request body as JSON (for the CLI: vault write <path> @request.json)")
		}
		return nil, fmt.Errorf("batch_input must be a list of objects, got %T", raw)
	}
	items := make([]batchItem, len(list))
	var problems []string
	for i, el := range list {
		if obj, ok := el.(*boundary.RawObject); ok {
			if has, ok := items[i].fromWire(*obj, required); ok {
				if required != "" && !has {
					problems = append(problems, fmt.Sprintf("'[%d].%s' %s", i, required, requiredMsg))
				}
				continue
			}
		}
		m, ok := batchObject(el)
		if !ok {
			return nil, fmt.Errorf("[%d] expected a map, got '%T'", i, el)
		}
		if required != "" {
			if _, has := m[required]; !has {
				problems = append(problems, fmt.Sprintf("'[%d].%s' %s", i, required, requiredMsg))
			}
		}
		for key, v := range m {
			if v == nil {
				continue
			}
			if key == "key_version" {
				n, err := toInt(v)
				if err != nil {
					problems = append(problems, fmt.Sprintf("'[%d].key_version' %s", i, err))
				} else {
					items[i].KeyVersion = n
				}
				continue
			}
			dst := items[i].stringField(key)
			if dst == nil {
				continue
			}
			s, ok := v.(string)
			if !ok {
				problems = append(problems, fmt.Sprintf("'[%d].%s' expected type 'string', got unconvertible type '%T'", i, key, v))
				continue
			}
			*dst = s
		}
	}
	if len(problems) > 0 {
		sort.Strings(problems)
		return nil, fmt.Errorf("%d error(s) decoding batch_input: %s", len(problems), strings.Join(problems, "; "))
	}
	return items, nil
}

// batchList is batch_input's elements: a list as the SDK decodes it, or the
// interceptor's undecoded objects (boundary.RawBatch).
func batchList(raw interface{}) ([]interface{}, bool) {
	switch v := raw.(type) {
	case []interface{}:
		return v, true
	case *boundary.RawBatch:
		return v.Objects(), true
	}
	return nil, false
}

// batchObject is an element of batch_input as a map: as it came, or decoded
// from the request body's bytes (boundary.RawObject).
func batchObject(el interface{}) (map[string]interface{}, bool) {
	switch e := el.(type) {
	case map[string]interface{}:
		return e, true
	case *boundary.RawObject:
		return e.Map()
	}
	return nil, false
}

// fromWire fills the item from obj, a batch_input object from the request
// body (already checked to be valid JSON: boundary.RawObject), without a
// map: the common case of a batch (base64 strings, a small key_version) is
// read here, and false sends every other object to the map path, whose
// decoding and messages are encoding/json's. Read here only when the answer
// is certainly the map path's:
//   - obj is printable ASCII and JSON whitespace without a backslash, so a
//     JSON string's value is its bytes between the quotes (no escape, no
//     invalid UTF-8 to replace) and a key is its bytes;
//   - every string field is a string or null, key_version a plain integer
//     of at most 15 digits (exact as a float64, as the map has it) or null;
//     fields the item does not know are skipped if their value is a string,
//     a number, true, false or null (anything nested: the map path).
//
// A key given twice counts as the last one given, null included, as in a
// map. has reports whether the object has the key required (even null).
//
// The item must be zero on entry (decodeBatchInput's are new), and is left
// zero when false is returned.
func (it *batchItem) fromWire(obj []byte, required string) (has, ok bool) {
	for _, c := range obj {
		if !wireByte[c] {
			return false, false
		}
	}
	refuse := func() (bool, bool) {
		*it = batchItem{}
		return false, false
	}
	i := skipSpace(obj, 0)
	if i >= len(obj) || obj[i] != '{' {
		return refuse()
	}
	if i = skipSpace(obj, i+1); i < len(obj) && obj[i] == '}' {
		if skipSpace(obj, i+1) != len(obj) {
			return refuse()
		}
		return false, true
	}
	for {
		key, next, isString := wireToken(obj, i)
		if !isString {
			return refuse()
		}
		if i = skipSpace(obj, next); i >= len(obj) || obj[i] != ':' {
			return refuse()
		}
		val, next, isString := wireToken(obj, skipSpace(obj, i+1))
		if val == nil || !it.setWire(key, val, isString) {
			return refuse()
		}
		if required != "" && unsafe.String(unsafe.SliceData(key), len(key)) == required {
			has = true
		}
		switch i = skipSpace(obj, next); {
		case i < len(obj) && obj[i] == ',':
			i = skipSpace(obj, i+1)
		case i < len(obj) && obj[i] == '}':
			if skipSpace(obj, i+1) != len(obj) {
				return refuse()
			}
			return has, true
		default:
			return refuse()
		}
	}
}

// setWire sets the field key to a JSON value: a string's contents
// (isString), or a scalar's literal. False: a value the map path must read.
func (it *batchItem) setWire(key, val []byte, isString bool) bool {
	name := unsafe.String(unsafe.SliceData(key), len(key))
	null := !isString && string(val) == "null"
	if name == "key_version" {
		if null {
			it.KeyVersion = 0
			return true
		}
		if isString {
			return false
		}
		digits := val
		if digits[0] == '-' {
			digits = digits[1:]
		}
		if len(digits) == 0 || len(digits) > 15 || (len(digits) > 1 && digits[0] == '0') {
			return false
		}
		for _, c := range digits {
			if c < '0' || c > '9' {
				return false
			}
		}
		n, err := strconv.Atoi(string(val))
		if err != nil {
			return false
		}
		it.KeyVersion = n
		return true
	}
	dst := it.stringField(name)
	switch {
	case dst == nil:
		return true // a field the item does not know, as the map path
	case null:
		*dst = ""
	case isString:
		// The body is an immutable string: the value may point into it,
		// as the map path's strings do.
		*dst = unsafe.String(unsafe.SliceData(val), len(val))
	default:
		return false
	}
	return true
}

// wireToken reads the JSON value at obj[i]: a string's contents (isString),
// or a scalar's literal; nil for an object or array, or the end of obj.
// next is the index after it.
func wireToken(obj []byte, i int) (val []byte, next int, isString bool) {
	if i >= len(obj) {
		return nil, i, false
	}
	switch obj[i] {
	case '"':
		j := bytes.IndexByte(obj[i+1:], '"')
		if j < 0 {
			return nil, i, false
		}
		return obj[i+1 : i+1+j], i + 2 + j, true
	case '{', '[':
		return nil, i, false
	}
	j := i
	for j < len(obj) && obj[j] != ',' && obj[j] != '}' && !jsonSpace(obj[j]) {
		j++
	}
	if j == i {
		return nil, i, false
	}
	return obj[i:j], j, false
}

// wireByte marks the bytes fromWire reads itself: printable ASCII but the
// backslash, and JSON whitespace.
var wireByte = func() (t [256]bool) {
	for c := 0x20; c <= 0x7e; c++ {
		t[c] = c != '\\'
	}
	t['\t'], t['\n'], t['\r'] = true, true, true
	return t
}()

func jsonSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// skipSpace returns the index of the first byte at or after i that is not
// JSON whitespace.
func skipSpace(b []byte, i int) int {
	for i < len(b) && jsonSpace(b[i]) {
		i++
	}
	return i
}

// stringField returns the destination of a string batch field, or nil for a
// key that is not one.
func (it *batchItem) stringField(key string) *string {
	switch key {
	case "plaintext":
		return &it.Plaintext
	case "ciphertext":
		return &it.Ciphertext
	case "context":
		return &it.Context
	case "nonce":
		return &it.Nonce
	case "associated_data":
		return &it.AssociatedData
	case "reference":
		return &it.Reference
	case "padding_scheme":
		return &it.PaddingScheme
	case "encrypt_padding_scheme":
		return &it.EncryptPaddingScheme
	case "decrypt_padding_scheme":
		return &it.DecryptPaddingScheme
	case "iv":
		return &it.IV
	}
	return nil
}

// toInt accepts the shapes a JSON number takes on its way to a plugin.
func toInt(v interface{}) (int, error) {
	switch n := v.(type) {
	case int:
		return n, nil
	case int64:
		return int(n), nil
	case json.Number:
		i, err := n.Int64()
		if err != nil {
			return 0, fmt.Errorf("expected an integer, got %q", n.String())
		}
		return int(i), nil
	case float64:
		if n != math.Trunc(n) {
			return 0, fmt.Errorf("expected an integer, got %v", n)
		}
		return int(n), nil
	case string:
		i, err := strconv.Atoi(n)
		if err != nil {
			return 0, fmt.Errorf("expected an integer, got %q", n)
		}
		return i, nil
	}
	return 0, fmt.Errorf("expected type 'int', got unconvertible type '%T'", v)
}

// checkContextConsistency enforces transit's rule that context is given on
// every item or on none.
func checkContextConsistency(items []batchItem) error {
	set := items[0].Context != ""
	for _, it := range items {
		if (it.Context != "") != set {
			return errors.New("context should be set either in all the request blocks or in none")
		}
	}
	return nil
}

// decodeCommon base64-decodes an item's context, nonce, IV and associated
// data; the error message is the item's.
func (it *batchItem) decodeCommon() error {
	var err error
	if it.Context != "" {
		if it.context, err = base64.StdEncoding.DecodeString(it.Context); err != nil {
			return err
		}
	}
	if it.Nonce != "" {
		if it.nonce, err = base64.StdEncoding.DecodeString(it.Nonce); err != nil {
			return err
		}
	}
	if it.IV != "" {
		if it.iv, err = base64.StdEncoding.DecodeString(it.IV); err != nil {
			return err
		}
	}
	if it.AssociatedData != "" {
		if it.aad, err = base64.StdEncoding.DecodeString(it.AssociatedData); err != nil {
			return fmt.Errorf("failed to base64-decode associated_data: %w", err)
		}
	}
	return nil
}

// parallelThreshold is the batch size from which items are spread over
// goroutines; below it, the goroutines cost more than they save.
const parallelThreshold = 64

// itemRun is how many contiguous items a worker takes at once.
const itemRun = 16

// forEachRun runs f over every index in [0, n), in runs [start, end) of at
// most itemRun contiguous indexes: in order on one goroutine for small
// batches, else over workers goroutines, each taking the next run. f must
// touch only its own indexes' data; results keep their place, so the
// batch's order is kept. (An HSM-resident key encrypts a run in one call
// to the token.)
func forEachRun(n, workers int, f func(start, end int)) {
	if n < parallelThreshold || workers <= 1 {
		for start := 0; start < n; start += itemRun {
			f(start, min(start+itemRun, n))
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				start := int(next.Add(itemRun)) - itemRun
				if start >= n {
					return
				}
				f(start, min(start+itemRun, n))
			}
		}()
	}
	wg.Wait()
}

// toEncrypt appends to todo the indexes of [start, end) to encrypt: those
// not failed already whose version may still encrypt. An item whose
// version reached its cap gets spent's error in errs.
func toEncrypt(todo []int, start, end int, items []batchItem, spent map[int]error, errs []error, failed func(i int) bool) []int {
	for i := start; i < end; i++ {
		if failed(i) {
			continue
		}
		if errs[i] = spent[items[i].KeyVersion]; errs[i] != nil {
			continue
		}
		todo = append(todo, i)
	}
	return todo
}

// fieldError is a field of an item that a key refuses. The key does not
// know where the item sits in the batch, or what the caller's path calls
// the field (padding_scheme, or decrypt_padding_scheme on rewrap): atItem
// names both, as built-in transit's messages do.
type fieldError struct {
	// field is the field's name, or "" for the path's padding field.
	field string
	msg   string
}

func (e *fieldError) Error() string { return e.msg }

// errEmptyCiphertext is keysutil answering an encryption with nothing.
var errEmptyCiphertext = errors.New("empty ciphertext returned")

// atItem names item index in an error of a key about it: a *fieldError
// becomes the caller's error about '[index].field', paddingField naming the
// path's padding field.
func atItem(err error, index int, paddingField string) error {
	if err == nil {
		return nil // (before fe, which escapes and would be allocated)
	}
	var fe *fieldError
	switch {
	case errors.As(err, &fe):
		field := fe.field
		if field == "" {
			field = paddingField
		}
		return errutil.UserError{Err: fmt.Sprintf("'[%d].%s' %s", index, field, fe.msg)}
	case errors.Is(err, errEmptyCiphertext):
		return fmt.Errorf("empty ciphertext returned for input item %d", index)
	}
	return err
}

// itemErrors collects the per-item errors of a batch processed by
// forEachRun, and answers for the batch.
type itemErrors []error

// outcome tallies the errors into the batch's outcome, writes their
// messages into the results (via setError) and returns the first error that
// fails the whole request (the HSM unavailable), if any. pre marks items
// that failed before processing.
func (errs itemErrors) outcome(pre func(i int) bool, setError func(i int, msg string)) (batchOutcome, error) {
	var o batchOutcome
	for i, err := range errs {
		switch {
		case pre(i):
			o.userErr = true
		case unavailable(err):
			return o, err
		default:
			o.record(err)
			if err != nil {
				setError(i, err.Error())
			}
		}
	}
	return o, nil
}

// batchOutcome tallies a batch's results for its status code.
type batchOutcome struct {
	success, userErr, internalErr bool
}

// record classifies one item's error: keysutil's InternalError is ours, any
// other error the caller's.
func (o *batchOutcome) record(err error) {
	switch {
	case err == nil:
		o.success = true
	case isInternal(err):
		o.internalErr = true
	default:
		o.userErr = true
	}
}

// unavailable reports an error that makes the whole request a 503 (the
// HSM cannot be reached): no item of a batch can succeed then.
func unavailable(err error) bool { return kindOf(err) == kindUnavailable }

// isInternal reports an item's error that is ours; any other is the
// caller's, as keysutil has it.
func isInternal(err error) bool { return kindOf(err) == kindInternal }

// respond sets the batch's status code as built-in transit does: a user error
// anywhere is 400, else an internal error 500; partial_failure_response_code
// replaces either when at least one item succeeded.
func (o batchOutcome) respond(d *framework.FieldData, req *logical.Request, resp *logical.Response) (*logical.Response, error) {
	override, given := d.GetOk("partial_failure_response_code")
	if given {
		// Built-in transit passes 1 to 99 on, and Vault then closes the
		// connection without an answer; a final status is what a caller
		// means (200 and 207 for a partial success).
		if n := override.(int); n < 200 || n > 599 {
			return logical.ErrorResponse("partial_failure_response_code %d is not a final HTTP status: give one from 200 to 599 (200 or 207 for a partial success)", n), logical.ErrInvalidRequest
		}
	}
	if !o.userErr && !o.internalErr {
		return resp, nil
	}
	code := http.StatusBadRequest
	if !o.userErr {
		code = http.StatusInternalServerError
	}
	if given && o.success {
		code = override.(int)
	}
	return logical.RespondWithStatusCode(resp, req, code)
}

// batchResult is a pointer to a result of encrypt, decrypt or rewrap: one
// per item.
type batchResult[R any] interface {
	*R
	setReference(ref string)
	failure() string
	// appendJSON appends the result as encoding/json writes it.
	appendJSON(dst []byte) []byte
}

// jsonResult is a pointer to any batch result the plugin writes as JSON
// itself: those of batchResult, and of hmac, sign and verify.
type jsonResult[R any] interface {
	*R
	appendJSON(dst []byte) []byte
}

func (r *encryptResult) setReference(ref string) { r.Reference = ref }
func (r *encryptResult) failure() string         { return r.Error }
func (r *decryptResult) setReference(ref string) { r.Reference = ref }
func (r *decryptResult) failure() string         { return r.Error }

func (r *encryptResult) appendJSON(dst []byte) []byte {
	dst = append(dst, '{')
	if r.Ciphertext != "" {
		dst = boundary.AppendString(append(dst, `"ciphertext":`...), r.Ciphertext)
		dst = append(dst, ',')
	}
	if r.KeyVersion != 0 {
		dst = strconv.AppendInt(append(dst, `"key_version":`...), int64(r.KeyVersion), 10)
		dst = append(dst, ',')
	}
	if r.Error != "" {
		dst = boundary.AppendString(append(dst, `"error":`...), r.Error)
		dst = append(dst, ',')
	}
	dst = boundary.AppendString(append(dst, `"reference":`...), r.Reference)
	return append(dst, '}')
}

func (r *decryptResult) appendJSON(dst []byte) []byte {
	dst = boundary.AppendString(append(dst, `{"plaintext":`...), r.Plaintext)
	if r.Error != "" {
		dst = boundary.AppendString(append(dst, `,"error":`...), r.Error)
	}
	dst = boundary.AppendString(append(dst, `,"reference":`...), r.Reference)
	return append(dst, '}')
}

func (r *hmacResult) appendJSON(dst []byte) []byte {
	dst = append(dst, '{')
	if r.HMAC != "" {
		dst = boundary.AppendString(append(dst, `"hmac":`...), r.HMAC)
		dst = append(dst, ',')
	}
	dst = strconv.AppendBool(append(dst, `"valid":`...), r.Valid)
	return appendErrorAndReference(dst, r.Error, r.Reference)
}

func (r *verifyResult) appendJSON(dst []byte) []byte {
	dst = strconv.AppendBool(append(dst, `{"valid":`...), r.Valid)
	return appendErrorAndReference(dst, r.Error, r.Reference)
}

func (r *signResult) appendJSON(dst []byte) []byte {
	dst = append(dst, '{')
	if r.Signature != "" {
		dst = boundary.AppendString(append(dst, `"signature":`...), r.Signature)
		dst = append(dst, ',')
	}
	dst = strconv.AppendInt(append(dst, `"key_version":`...), int64(r.KeyVersion), 10)
	if len(r.PublicKey) > 0 {
		// A []byte is a base64 string in encoding/json, which needs no
		// escaping.
		dst = append(dst, `,"publickey":"`...)
		dst = base64.StdEncoding.AppendEncode(dst, r.PublicKey)
		dst = append(dst, '"')
	}
	return appendErrorAndReference(dst, r.Error, r.Reference)
}

// appendErrorAndReference ends a result after a field: the error if any,
// the reference, the closing brace.
func appendErrorAndReference(dst []byte, msg, ref string) []byte {
	if msg != "" {
		dst = boundary.AppendString(append(dst, `,"error":`...), msg)
	}
	dst = boundary.AppendString(append(dst, `,"reference":`...), ref)
	return append(dst, '}')
}

// appendBatch appends {"batch_results": results} as encoding/json writes it.
func appendBatch[R any, P jsonResult[R]](dst []byte, results []R) []byte {
	dst = append(dst, `{"batch_results":`...)
	if results == nil {
		dst = append(dst, "null"...)
	} else {
		dst = append(dst, '[')
		for i := range results {
			if i > 0 {
				dst = append(dst, ',')
			}
			start := len(dst)
			dst = P(&results[i]).appendJSON(dst)
			if i == 0 {
				// Room for the rest at the first one's size, and a
				// margin, instead of growing the answer step by step.
				dst = slices.Grow(dst, (len(dst)-start+1)*(len(results)-1)*9/8+16)
			}
		}
		dst = append(dst, ']')
	}
	return append(dst, '}')
}

// preEncode writes a batch's answer to Vault as JSON here (see
// boundary.PreEncode) rather than by the SDK's reflection, which was most
// of the plugin's own CPU per item left (encrypt, decrypt and rewrap;
// hmac, sign and verify too). The bytes are encoding/json's
// (TestBatchJSONIsEncodingJSONs, TestPreEncodedAnswersAreTheSDKs). Only a
// plain batch answer is: one with a status code set is encoded by the SDK.
func preEncode(ctx context.Context, resp *logical.Response) {
	if resp == nil || len(resp.Data) != 1 {
		return
	}
	switch results := resp.Data["batch_results"].(type) {
	case []encryptResult:
		boundary.PreEncode(ctx, resp, func(dst []byte) []byte { return appendBatch(dst, results) })
	case []decryptResult:
		boundary.PreEncode(ctx, resp, func(dst []byte) []byte { return appendBatch(dst, results) })
	case []hmacResult:
		boundary.PreEncode(ctx, resp, func(dst []byte) []byte { return appendBatch(dst, results) })
	case []signResult:
		boundary.PreEncode(ctx, resp, func(dst []byte) []byte { return appendBatch(dst, results) })
	case []verifyResult:
		boundary.PreEncode(ctx, resp, func(dst []byte) []byte { return appendBatch(dst, results) })
	}
}

// itemsResponse answers a request of items: a batch gets batch_results, each
// result with its item's reference; a single request gets fields of its one
// result, or its error (a 500 when internal says it is ours, else a 400).
func itemsResponse[R any, P batchResult[R]](d *framework.FieldData, items []batchItem, results []R, internal bool, fields func(r *R) map[string]interface{}) (*logical.Response, error) {
	if d.Raw["batch_input"] != nil {
		for i := range items {
			P(&results[i]).setReference(items[i].Reference)
		}
		return &logical.Response{Data: map[string]interface{}{"batch_results": results}}, nil
	}
	if msg := P(&results[0]).failure(); msg != "" {
		return errorResponse(itemError(msg, internal))
	}
	return &logical.Response{Data: fields(&results[0])}, nil
}

// staticAAD hands keysutil associated data that is already decoded.
type staticAAD []byte

// GetAssociatedData implements keysutil.AssociatedDataFactory.
func (a staticAAD) GetAssociatedData() ([]byte, error) { return a, nil }
