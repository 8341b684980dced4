package boundary

import (
	"context"
	"encoding/json"

	"github.com/hashicorp/vault/sdk/logical"
)

// slotKey carries the slot for a response's pre-encoded data from
// UnaryInterceptor to the backend.
type slotKey struct{}

type slot struct{ data []byte }

// standIn is the data a response carries while its real data waits in the
// slot; standInJSON is how the SDK encodes it, which the interceptor
// replaces. No handler answers with this key otherwise.
const (
	standInKey  = "hsm_transit_pre_encoded"
	standInJSON = `{"hsm_transit_pre_encoded":true}`
)

// plain marks the bytes encoding/json writes as they are: printable ASCII
// but for the quote, the backslash and the HTML-escaped <, > and &.
var plain = func() (t [256]bool) {
	for c := 0x20; c <= 0x7e; c++ {
		t[c] = c != '"' && c != '\\' && c != '<' && c != '>' && c != '&'
	}
	return t
}()

// PreEncode hands the interceptor resp's data already encoded as JSON, when
// this call came through UnaryInterceptor: encode appends to its argument
// exactly what encoding/json.Marshal(resp.Data) would give, resp.Data is
// replaced by a small stand-in for the SDK to encode, and PreEncode reports
// true. Otherwise (a call made in-process, as tests do) resp is left as it
// is and encode is not called.
func PreEncode(ctx context.Context, resp *logical.Response, encode func(dst []byte) []byte) bool {
	s, ok := ctx.Value(slotKey{}).(*slot)
	if !ok || resp == nil {
		return false
	}
	s.data = encode(s.data[:0])
	resp.Data = map[string]interface{}{standInKey: true}
	return true
}

// AppendString appends s as a JSON string exactly as encoding/json.Marshal
// writes it (with its HTML escaping, \ufffd for invalid UTF-8, and so on).
// Printable ASCII that needs no escape, which base64 ciphertexts and
// plaintexts are, is copied as it is; anything else goes through
// encoding/json itself.
func AppendString(dst []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if !plain[s[i]] {
			q, _ := json.Marshal(s) // a string always encodes
			return append(dst, q...)
		}
	}
	dst = append(dst, '"')
	dst = append(dst, s...)
	return append(dst, '"')
}
