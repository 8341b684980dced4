package boundary

import (
	"context"
	"encoding/json"
	"sync/atomic"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin/pb"
)

// slotKey carries the slot for a response's pre-encoded data from
// UnaryInterceptor to the backend.
type slotKey struct{}

type slot struct {
	data []byte
	// buf is the pooled buffer data was written in, when it still is.
	buf *[]byte
}

// answers is the pool of buffers batch answers are written in: an answer is
// written once, copied into the gRPC message by codec.Marshal, and its
// buffer cleared and put back there (pooledReply).
var answers bufferPool

// answerHint is about the size of the last answer written, to get a buffer
// of its size class for the next one rather than grow it from nothing.
var answerHint atomic.Int64

// maxAnswerHint bounds the buffer a hint gets: the hint is the last answer
// of anyone's, and one huge batch answer must not make every answer that
// starts before the next one allocate (and zero) as much. Larger answers
// grow from there (appendBatch reserves their room at the first item).
const maxAnswerHint = 1 << 20

// pooledReply is the HandleRequest reply whose response data is written in
// buf: UnaryInterceptor returns it in place of the bare reply, gRPC hands it
// unchanged to codec.Marshal (the reply of a unary call goes to the codec
// as the handler returned it), and Marshal puts buf back in answers once the
// message holds a copy of the data.
type pooledReply struct {
	*pb.HandleRequestReply
	buf *[]byte
}

// Reply is the HandleRequest reply in what UnaryInterceptor returned, for
// callers in the same process (tests), which get a pooledReply when the
// answer was pre-encoded. Its buffer is then left to the garbage collector.
func Reply(out interface{}) *pb.HandleRequestReply {
	switch r := out.(type) {
	case *pb.HandleRequestReply:
		return r
	case *pooledReply:
		return r.HandleRequestReply
	}
	return nil
}

// release clears the answer's bytes (a decrypt answer holds plaintexts) and
// puts its buffer back, after the reply no longer points at them.
func (r *pooledReply) release() {
	n := len(r.Response.Data)
	r.Response.Data = ""
	*r.buf = (*r.buf)[:n] // what Put clears
	answers.Put(r.buf)
	r.buf = nil
}

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
	hint := min(int(answerHint.Load()), maxAnswerHint)
	buf := answers.Get(hint)
	s.data = encode((*buf)[:0])
	s.buf = buf
	if cap(s.data) != cap(*buf) {
		// It grew out of the pooled buffer, which holds a partial copy.
		*buf = (*buf)[:cap(*buf)] // all of it, for Put to clear
		answers.Put(buf)
		s.buf = nil
	}
	// A margin over this answer's size, so that the next one of about
	// the same size does not outgrow its buffer (appendBatch reserves
	// an eighth more than it needs).
	answerHint.Store(int64(len(s.data) + len(s.data)/4))
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
