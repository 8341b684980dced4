package hsmtransit

// Attacks on the batch hot path (boundary.requestDecode's RawBatch,
// batchItem.fromWire, decodePlaintexts / sealInPlace, openScratch, the
// per-request aeadMemo, parseCiphertextInto), from a review as an attacker.
// Each test names its attacker and attack; each fails if the attack works.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin/pb"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/boundary"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/boundary/boundarytest"
)

// reviewPad makes a body large enough for the interceptor to decode it.
var reviewPad = `,"pad":"` + strings.Repeat("p", 1100) + `"}`

// reviewBatchBody is {"batch_input":[items...],"pad":...}.
func reviewBatchBody(items ...string) string {
	return `{"batch_input":[` + strings.Join(items, ",") + `]` + reviewPad
}

// reviewOutcome sends body to path through the plugin boundary, decoded by
// the SDK (intercepted false) or by the interceptor, and returns what Vault
// would get, normalised: JSON with sorted keys, a ciphertext reduced to its
// version (its nonce is random), and whether the backend saw a RawBatch.
func reviewOutcome(t *testing.T, e *testEnv, path, body string, intercepted bool) (string, bool) {
	t.Helper()
	return reviewOutcomeAs(t, e, path, body, intercepted, true)
}

// reviewOutcomeAs is reviewOutcome, with ciphertexts kept whole unless
// normalise (for deterministic answers: HMACs).
func reviewOutcomeAs(t *testing.T, e *testEnv, path, body string, intercepted, normalise bool) (string, bool) {
	t.Helper()
	var sawRaw bool
	reply, err := boundarytest.HandleRequest(func(ctx context.Context, req *logical.Request) (*logical.Response, error) {
		req.Storage = e.storage
		if data, ok := boundary.DecodedBody(ctx); ok {
			_, sawRaw = data["batch_input"].(*boundary.RawBatch)
		}
		return e.b.HandleRequest(ctx, req)
	}, path, body, intercepted)
	if err != nil {
		return "grpc error: " + err.Error(), sawRaw
	}
	var out strings.Builder
	if reply.Err != nil {
		fmt.Fprintf(&out, "err %d %s\n", reply.Err.ErrCode, reply.Err.ErrMsg)
	}
	if reply.Response != nil && reply.Response.Data != "" {
		var v interface{}
		require.NoError(t, json.Unmarshal([]byte(reply.Response.Data), &v))
		if m, ok := v.(map[string]interface{}); ok {
			if raw, ok := m["http_raw_body"].(string); ok {
				var inner interface{}
				require.NoError(t, json.Unmarshal([]byte(raw), &inner))
				m["http_raw_body"] = inner
			}
		}
		if normalise {
			v = reviewNormalise(v)
		}
		b, err := json.Marshal(v)
		require.NoError(t, err)
		out.Write(b)
	}
	return out.String(), sawRaw
}

func reviewNormalise(v interface{}) interface{} {
	switch x := v.(type) {
	case map[string]interface{}:
		for k, el := range x {
			x[k] = reviewNormalise(el)
		}
	case []interface{}:
		for i, el := range x {
			x[i] = reviewNormalise(el)
		}
	case string:
		if strings.HasPrefix(x, "vault:v") {
			parts := strings.SplitN(x, ":", 3)
			return parts[0] + ":" + parts[1] + ":<ct>"
		}
	}
	return v
}

// reviewKey creates key k with versions 1 to 3, and returns a ciphertext of
// each version (plaintexts "p1", "p2", "p3"), and one of "aad" under
// version 3 with associated data "a".
func reviewKey(t *testing.T, e *testEnv) (cts [4]string, withAAD string) {
	t.Helper()
	e.mustWrite(t, "keys/k", nil)
	cts[1] = e.encrypt(t, "k", "p1", nil)
	e.mustWrite(t, "keys/k/rotate", nil)
	cts[2] = e.encrypt(t, "k", "p2", nil)
	e.mustWrite(t, "keys/k/rotate", nil)
	cts[3] = e.encrypt(t, "k", "p3", nil)
	withAAD = e.encrypt(t, "k", "aad", map[string]interface{}{"associated_data": b64("a")})
	return cts, withAAD
}

// TestReviewCraftedJSONDecryptSameBothWays — attacker: a crypto user sending
// crafted JSON to decrypt (model 2). Attack: make fromWire / the
// interceptor and encoding/json (the SDK) disagree on an item: repeated
// keys (last wins, null included), key case, escapes (\/ in base64,
// \u escapes in keys and values), non-ASCII, nested objects hiding a
// ciphertext, a ciphertext hidden in a string of an unknown field,
// non-object elements, empty objects, repeated associated_data and
// batch_input, numbers in unknown fields. Decrypt is deterministic, so the
// answers must be byte-identical whichever way the body is decoded.
func TestReviewCraftedJSONDecryptSameBothWays(t *testing.T) {
	e := getTestBackend(t)
	cts, withAAD := reviewKey(t, e)
	q := func(s string) string { b, _ := json.Marshal(s); return string(b) }
	escSlash := strings.ReplaceAll(cts[2], "/", `\/`)
	if escSlash == cts[2] {
		escSlash = strings.Replace(cts[2], "v", `\u0076`, 1)
	}
	items := [][]string{
		{`{"ciphertext":` + q(cts[1]) + `,"ciphertext":` + q(cts[2]) + `}`},
		{`{"ciphertext":` + q(cts[1]) + `,"ciphertext":null}`},
		{`{"ciphertext":null,"ciphertext":` + q(cts[3]) + `}`},
		{`{"ciphertext":` + q(cts[1]) + `,"Ciphertext":` + q(cts[2]) + `}`},
		{`{"CIPHERTEXT":` + q(cts[2]) + `}`},
		{`{"ciphertext":"` + escSlash + `"}`},
		{`{"ciphertext":` + q(cts[1]) + `,"ciph\u0065rtext":` + q(cts[2]) + `}`},
		{`{"ciph\u0065rtext":` + q(cts[2]) + `,"ciphertext":` + q(cts[1]) + `}`},
		{`{"ciphertext":` + q(cts[1]) + `,"x":{"ciphertext":` + q(cts[2]) + `}}`},
		{`{"x":[{"ciphertext":` + q(cts[2]) + `}],"ciphertext":` + q(cts[1]) + `}`},
		{`{"x":"\",\"ciphertext\":` + strings.ReplaceAll(q(cts[2]), `"`, `\"`) + `","ciphertext":` + q(cts[1]) + `}`},
		{`{"x":"},{","ciphertext":` + q(cts[1]) + `}`},
		{`{"ciphertext":` + q(cts[1]) + `,"reference":"café"}`},
		{`{"ciphertext":` + q(cts[1]) + `,"reference":"\ud800"}`},
		{`{"ciphertext":` + q(cts[1]) + `,"reference":"a\u0000b"}`},
		{`{"ciphertext":` + q(cts[1]) + `,"n":1e400}`},
		{`{"ciphertext":` + q(cts[1]) + `,"n":-1E+400}`},
		{`{"ciphertext":` + q(cts[1]) + `,"n":1e-400,"m":1` + strings.Repeat("0", 308) + `}`},
		{`{"ciphertext":` + q(cts[1]) + `,"n":1` + strings.Repeat("0", 309) + `}`},
		{`{"ciphertext":` + q(cts[1]) + `,"n":"1e400","m":"\"1e400"}`},
		{"{\"ciphertext\":" + q(cts[1]) + ",\"x\":\"\x7f\xff\"}"},
		{`{"ciphertext":` + q(cts[1]) + `,"n":-0.0e-0,"t":true,"f":false,"z":null}`},
		{`{"ciphertext":` + q(cts[1]) + `,"key_version":1e999}`},
		{`{"ciphertext":` + q(withAAD) + `,"associated_data":"Yg==","associated_data":"YQ=="}`},
		{`{"ciphertext":` + q(withAAD) + `,"associated_data":"YQ==","associated_data":"Yg=="}`},
		{`{"ciphertext":` + q(withAAD) + `,"associated_data":"YQ==","associated_data":null}`},
		{`{"ciphertext":` + q(withAAD) + `,"associated_data":"Y\u0051=="}`},
		{`{"ciphertext":` + q(withAAD) + `,"Associated_Data":"YQ=="}`},
		{`{}`, `{"ciphertext":` + q(cts[1]) + `}`},
		{` { } `, `{"ciphertext":` + q(cts[1]) + `}`},
		{`{"ciphertext":` + q(cts[1]) + `}`, `"x"`},
		{`{"ciphertext":` + q(cts[1]) + `}`, `null`},
		{`{"ciphertext":` + q(cts[1]) + `}`, `[]`},
		{`{"ciphertext":` + q(cts[1]) + `}`, `{"ciphertext":5}`},
		{`{"ciphertext":` + q(cts[1]) + `}`, `{"ciphertext":true}`},
		{`{"ciphertext":` + q(cts[1]) + `}`, `{"ciphertext":[` + q(cts[2]) + `]}`},
		{"{\"ciphertext\":\t" + q(cts[1]) + "\r\n}"},
		{`{"ciphertext":` + q(cts[1]) + `,"context":""}`, `{"ciphertext":` + q(cts[2]) + `,"context":null}`},
		{`{"ciphertext":` + q(cts[1]) + `,"context":"eA=="}`, `{"ciphertext":` + q(cts[2]) + `}`},
		{`{"ciphertext":` + q(cts[1]) + `,"":"` + strings.Repeat("A", 70000) + `"}`},
	}
	bodies := make([]string, 0, len(items)+4)
	for _, it := range items {
		bodies = append(bodies, reviewBatchBody(it...))
	}
	// batch_input itself repeated: the last one counts.
	bodies = append(bodies,
		`{"batch_input":[{"ciphertext":`+q(cts[1])+`}],"batch_input":[{"ciphertext":`+q(cts[2])+`}]`+reviewPad,
		`{"batch_input":[{"ciphertext":`+q(cts[1])+`}],"batch_input":null`+reviewPad,
		`{"batch_input":null,"batch_input":[{"ciphertext":`+q(cts[3])+`}],"ciphertext":`+q(cts[1])+reviewPad,
		`{"batch_input":[{"ciphertext":`+q(cts[1])+`}],"ciphertext":`+q(cts[2])+reviewPad,
	)
	rawSeen := 0
	for _, body := range bodies {
		want, _ := reviewOutcome(t, e, "decrypt/k", body, false)
		got, raw := reviewOutcome(t, e, "decrypt/k", body, true)
		if raw {
			rawSeen++
		}
		require.Equal(t, want, got, "body %.200s", body)
		require.NotContains(t, got, "err 0 \n", body)
	}
	require.Greater(t, rawSeen, len(items)/2, "the interceptor's RawBatch was exercised")

	// The semantic checks behind the sameness: last value wins, nested and
	// escaped look-alikes are not taken.
	pt := func(body string) string {
		out, _ := reviewOutcome(t, e, "decrypt/k", body, true)
		return out
	}
	require.Contains(t, pt(reviewBatchBody(items[0]...)), `"plaintext":"`+b64("p2")+`"`)
	nested := reviewBatchBody(`{"ciphertext":` + q(cts[1]) + `,"x":{"ciphertext":` + q(cts[2]) + `}}`)
	require.Contains(t, pt(nested), `"plaintext":"`+b64("p1")+`"`)
	require.NotContains(t, pt(nested), b64("p2"))
	inString := reviewBatchBody(`{"x":"\",\"ciphertext\":` + strings.ReplaceAll(q(cts[2]), `"`, `\"`) + `","ciphertext":` + q(cts[1]) + `}`)
	require.Contains(t, pt(inString), `"plaintext":"`+b64("p1")+`"`)
	require.NotContains(t, pt(inString), b64("p2"))
	require.Contains(t, pt(reviewBatchBody(`{"ciphertext":`+q(withAAD)+`,"associated_data":"Yg==","associated_data":"YQ=="}`)), `"plaintext":"`+b64("aad")+`"`)
	require.NotContains(t, pt(reviewBatchBody(`{"ciphertext":`+q(withAAD)+`,"associated_data":"YQ==","associated_data":"Yg=="}`)), b64("aad"))
	// An out-of-range number anywhere in an item: refused as encoding/json
	// refuses it (the SDK's error), not decrypted.
	require.NotContains(t, pt(reviewBatchBody(`{"ciphertext":`+q(cts[1])+`,"n":1e400}`)), b64("p1"))
}

// TestReviewInvalidJSONInBatchRefusedLikeSDK — attacker: a crypto user
// sending a body that is not valid JSON inside batch_input's objects (model
// 2). Attack: the interceptor hands objects over undecoded and fromWire
// trusts them to be valid JSON; a scanner that skips a value by brackets
// would let fromWire read what encoding/json refuses (a raw newline in a
// base64 string, which base64 ignores; a missing comma; a trailing comma;
// bare words). The interceptor must refuse what the SDK refuses.
func TestReviewInvalidJSONInBatchRefusedLikeSDK(t *testing.T) {
	e := getTestBackend(t)
	cts, _ := reviewKey(t, e)
	ct := cts[1]
	// ct with a raw newline in its base64: base64 would ignore it.
	nl := ct[:len(ct)-8] + "\n" + ct[len(ct)-8:]
	for _, obj := range []string{
		`{"ciphertext":"` + nl + `"}`,
		"{\"ciphertext\":\"" + ct[:len(ct)-8] + "\t" + ct[len(ct)-8:] + "\"}",
		`{"ciphertext":"` + ct + `",}`,
		`{"ciphertext":"` + ct + `" "reference":"x"}`,
		`{"ciphertext" "` + ct + `"}`,
		`{"ciphertext":"` + ct + `","x":tru}`,
		`{"ciphertext":"` + ct + `","x":nul}`,
		`{"ciphertext":"` + ct + `","x":01}`,
		`{"ciphertext":"` + ct + `","x":1.}`,
		`{"ciphertext":"` + ct + `","x":.5}`,
		`{"ciphertext":"` + ct + `","x":+1}`,
		`{"ciphertext":"` + ct + `","x":-}`,
		`{"ciphertext":"` + ct + `","x":NaN}`,
		`{"ciphertext":"` + ct + `","x":Infinity}`,
		`{"ciphertext":"` + ct + `","key_version":1 2}`,
		`{"ciphertext":"` + ct + `",,"x":1}`,
		`{,"ciphertext":"` + ct + `"}`,
		`{"ciphertext":"` + ct + `":"x"}`,
		`{"ciphertext"}`,
		`{'ciphertext':'` + ct + `'}`,
		`{"ciphertext":"` + ct + `"}}`,
		`{"ciphertext":"` + ct + `"`,
		`{"ciphertext":"` + ct + `","x":[1,]}`,
		`{"ciphertext":"` + ct + `","x":{"a"}}`,
		`{"ciphertext":"` + ct + `","x":"\q"}`,
		`{"ciphertext":"` + ct + `","x":"\u12"}`,
		"{\"ciphertext\":\"" + ct + "\",\"x\":\"\x00\"}",
		`{ciphertext:"` + ct + `"}`,
	} {
		body := reviewBatchBody(obj)
		want, _ := reviewOutcome(t, e, "decrypt/k", body, false)
		got, _ := reviewOutcome(t, e, "decrypt/k", body, true)
		require.NotContains(t, got, b64("p1"), "an invalid object was decrypted: %q", obj)
		require.Equal(t, want, got, "%q", obj)
	}
}

// TestReviewCraftedKeyVersionSameBothWays — attacker: a crypto user (model
// 2) choosing the number form of key_version to get an item encrypted under
// another version than encoding/json reads (1e0, 1.0, -0, 2E0, 0.3e1, huge,
// beyond 2^53, a string, a bool, repeated with null), alone and among
// ordinary items. The answers (status, errors, version of each
// ciphertext) must be those of the SDK's decoding.
func TestReviewCraftedKeyVersionSameBothWays(t *testing.T) {
	e := getTestBackend(t)
	reviewKey(t, e)
	rawSeen := 0
	for _, kv := range []string{
		`1e0`, `1.0`, `1E0`, `-0`, `-0.0`, `0.0`, `2e0`, `0.3e1`, `30e-1`, `1.5`, `-1`, `4`, `3`, `0`,
		`1e400`, `1e19`, `-1e19`, `9223372036854775807`, `9223372036854775808`, `-9223372036854775809`,
		`18446744073709551617`, `9007199254740993`, `999999999999999`, `1000000000000001`,
		`"2"`, `" 2"`, `"2.0"`, `"0x2"`, `true`, `null`, `[2]`, `{"v":2}`,
		`2,"key_version":null`, `null,"key_version":2`, `"x","key_version":2`, `2,"key_version":"1"`,
	} {
		for _, shape := range [][]string{
			{`{"plaintext":"eA==","key_version":` + kv + `}`},
			{`{"plaintext":"eA==","key_version":2}`, `{"plaintext":"eA==","key_version":` + kv + `}`, `{"plaintext":"eA=="}`},
		} {
			body := reviewBatchBody(shape...)
			want, _ := reviewOutcome(t, e, "encrypt/k", body, false)
			got, raw := reviewOutcome(t, e, "encrypt/k", body, true)
			if raw {
				rawSeen++
			}
			require.Equal(t, want, got, "key_version %s", kv)
			require.NotContains(t, got, "err 0 \n")
			require.NotContains(t, got, `"http_status_code":500`, "key_version %s", kv)
		}
	}
	require.Greater(t, rawSeen, 40, "the interceptor's RawBatch was exercised")
}

// TestReviewCraftedJSONEncryptSameBothWays — attacker: a crypto user (model
// 2) encrypting with crafted items: repeated plaintext / associated_data /
// context / nonce, case variants, escapes, empty and null plaintexts,
// non-ASCII references. Both decodings must answer alike, and the
// ciphertexts the interceptor's path makes must hold the plaintext and
// associated data encoding/json reads (the last ones given).
func TestReviewCraftedJSONEncryptSameBothWays(t *testing.T) {
	e := getTestBackend(t)
	reviewKey(t, e)
	objs := []string{
		`{"plaintext":"QQ==","plaintext":"Qg=="}`,
		`{"plaintext":"QQ==","Plaintext":"Qg=="}`,
		`{"PLAINTEXT":"Qg==","plaintext":"QQ=="}`,
		`{"plaintext":"Q\u0051=="}`,
		`{"plaintext":"QQ=\u003d"}`,
		`{"plaintext":""}`,
		`{"plaintext":null}`,
		`{"plaintext":"QQ==","plaintext":null}`,
		`{"plaintext":"QQ==","nonce":"AAAAAAAAAAAAAAAA"}`,
		`{"plaintext":"QQ==","nonce":""}`,
		`{"plaintext":"QQ==","nonce":null}`,
		`{"plaintext":"QQ==","padding_scheme":"oaep"}`,
		`{"plaintext":"QQ==","associated_data":"YQ==","associated_data":"Yg=="}`,
		`{"plaintext":"QQ==","associated_data":"%%"}`,
		`{"plaintext":"QQ==","iv":"AAAA"}`,
		`{"plaintext":"QQ==","reference":"\u00e9\ud83d\ude00"}`,
		`{"plaintext":"Q Q=="}`,
		`{"plaintext":"QQ"}`,
		`{"plaintext":"QQ==\r\n"}`,
		`{"plaintext":"QQ==","context":"YQ=="}`,
		`{"plaintext":"Q\u0051==","associated_data":"Y\u0051==","reference":"r\u0065f","context":"\u0059Q=="}`,
	}
	for _, o := range objs {
		for _, shape := range [][]string{{o}, {`{"plaintext":"eA=="}`, o}} {
			body := reviewBatchBody(shape...)
			want, _ := reviewOutcome(t, e, "encrypt/k", body, false)
			got, raw := reviewOutcome(t, e, "encrypt/k", body, true)
			require.True(t, raw, "the interceptor's RawBatch was exercised: %s", o)
			require.Equal(t, want, got, "%s", o)
			require.NotContains(t, got, `"http_status_code":500`, o)
		}
	}

	// The ciphertexts: repeated plaintext and associated data, the last
	// given wins.
	var out struct {
		BatchResults []encryptResult `json:"batch_results"`
	}
	reply := e.viaBoundary(t, "encrypt/k", reviewBatchBody(
		`{"plaintext":"QQ==","plaintext":"Qg==","associated_data":"YQ==","associated_data":"Yg=="}`,
		`{"associated_data":"Yw==","plaintext":"Qw=="}`), true)
	require.NoError(t, json.Unmarshal([]byte(reply), &out))
	r := out.BatchResults
	require.Len(t, r, 2, reply)
	require.Equal(t, "B", e.decrypt(t, "k", r[0].Ciphertext, map[string]interface{}{"associated_data": "Yg=="}))
	require.Equal(t, "C", e.decrypt(t, "k", r[1].Ciphertext, map[string]interface{}{"associated_data": "Yw=="}))
	require.NotEqual(t, 200, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": r[0].Ciphertext, "associated_data": "YQ=="}).status)
	require.NotEqual(t, 200, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": r[1].Ciphertext, "associated_data": "Yg=="}).status, "item 1 sealed with item 0's associated data")
}

// TestReviewBatchItemsStayApart — attacker: a crypto user sending large
// parallel batches (model 1). Attack: get one item's plaintext into
// another item's ciphertext, or an item sealed with another item's
// associated data or key version, through the shared arena (a seal running
// past its room), the goroutines of forEachRun, or the aeadMemo shared by
// the request's items. 300 items (parallel) of random lengths, each with
// its own associated data and a key version cycling over 1..3, some with
// bad base64: each ciphertext opens with its own item's associated data
// and version only, and every nonce is fresh (none repeats within or
// across requests).
func TestReviewBatchItemsStayApart(t *testing.T) {
	e := getTestBackend(t)
	reviewKey(t, e)
	p, unlock, err := e.b.readPolicy(t.Context(), e.sealed(t), "k", false)
	require.NoError(t, err)
	unlock()

	nonces := map[string]bool{}
	for round := 0; round < 2; round++ {
		const n = 300
		type want struct{ pt, aad []byte }
		wants := make([]want, n)
		items := make([]interface{}, n)
		for i := range items {
			pt := make([]byte, (i*37)%257)
			_, err := rand.Read(pt)
			require.NoError(t, err)
			aad := []byte(fmt.Sprintf("aad-%d", i))
			wants[i] = want{pt, aad}
			it := map[string]interface{}{
				"plaintext":       base64.StdEncoding.EncodeToString(pt),
				"associated_data": base64.StdEncoding.EncodeToString(aad),
				"key_version":     i%3 + 1,
				"reference":       fmt.Sprint(i),
			}
			if i%41 == 7 {
				it["plaintext"] = "bad!"
			}
			items[i] = it
		}
		body, err := json.Marshal(map[string]interface{}{"batch_input": items})
		require.NoError(t, err)
		var coded struct {
			Body string `json:"http_raw_body"`
		}
		require.NoError(t, json.Unmarshal([]byte(e.viaBoundary(t, "encrypt/k", string(body), true)), &coded))
		var out struct {
			Data struct {
				BatchResults []encryptResult `json:"batch_results"`
			} `json:"data"`
		}
		require.NoError(t, json.Unmarshal([]byte(coded.Body), &out))
		res := out.Data.BatchResults
		require.Len(t, res, n)
		for i, r := range res {
			require.Equal(t, fmt.Sprint(i), r.Reference)
			if i%41 == 7 {
				require.NotEmpty(t, r.Error)
				require.Empty(t, r.Ciphertext)
				continue
			}
			require.Empty(t, r.Error, i)
			require.Equal(t, i%3+1, r.KeyVersion, i)
			require.True(t, strings.HasPrefix(r.Ciphertext, fmt.Sprintf("vault:v%d:", i%3+1)), r.Ciphertext)
			_, raw, err := parseCiphertext(r.Ciphertext, 3, 1)
			require.NoError(t, err)
			require.Len(t, raw, gcmNonceSize+len(wants[i].pt)+gcmTagSize)
			nonce := string(raw[:gcmNonceSize])
			require.False(t, nonces[nonce], "item %d: nonce repeated", i)
			nonces[nonce] = true
			got, err := p.DecryptWithOptions(keysutil.EncryptionOptions{}, r.Ciphertext, staticAAD(wants[i].aad))
			require.NoError(t, err, "item %d", i)
			require.Equal(t, base64.StdEncoding.EncodeToString(wants[i].pt), got, "item %d", i)
			other := wants[(i+1)%n].aad
			_, err = p.DecryptWithOptions(keysutil.EncryptionOptions{}, r.Ciphertext, staticAAD(other))
			require.Error(t, err, "item %d opens with its neighbour's associated data", i)
		}
	}
}

// TestReviewDecryptBatchNoCrossItemLeak — attacker: a crypto user (model 1
// and 3) decrypting a parallel batch that mixes long and short
// ciphertexts, tampered tags, truncated payloads, and ciphertexts of
// other versions relabelled, so that pooled scratch buffers are reused
// across items and requests. Each item must answer its own plaintext or an
// error with an empty plaintext; no answer may carry bytes of another
// item; afterwards the pool's buffers hold no plaintext.
func TestReviewDecryptBatchNoCrossItemLeak(t *testing.T) {
	e := getTestBackend(t)
	reviewKey(t, e)
	const n = 200
	items := make([]interface{}, n)
	wantPT := make([]string, n)
	for i := 0; i < n; i++ {
		size := 1 + (i*53)%97
		if i%10 == 0 {
			size = 20000 + i
		}
		pt := bytes.Repeat([]byte{byte('a' + i%26)}, size)
		ct := e.encrypt(t, "k", string(pt), nil)
		switch i % 7 {
		case 3: // tampered tag
			_, raw, err := parseCiphertext(ct, 3, 1)
			require.NoError(t, err)
			raw[len(raw)-1] ^= 0x80
			ct = formatCiphertext(3, raw)
		case 5: // truncated tag
			_, raw, err := parseCiphertext(ct, 3, 1)
			require.NoError(t, err)
			ct = formatCiphertext(3, raw[:len(raw)-5])
		case 6: // another version's label
			ct = strings.Replace(ct, "vault:v3:", "vault:v1:", 1)
		default:
			wantPT[i] = base64.StdEncoding.EncodeToString(pt)
		}
		items[i] = map[string]interface{}{"ciphertext": ct, "reference": fmt.Sprint(i)}
	}
	body, err := json.Marshal(map[string]interface{}{"batch_input": items})
	require.NoError(t, err)
	for round := 0; round < 3; round++ {
		var coded struct {
			Status int    `json:"http_status_code"`
			Body   string `json:"http_raw_body"`
		}
		require.NoError(t, json.Unmarshal([]byte(e.viaBoundary(t, "decrypt/k", string(body), round%2 == 0)), &coded))
		require.Equal(t, 400, coded.Status)
		var out struct {
			Data struct {
				BatchResults []decryptResult `json:"batch_results"`
			} `json:"data"`
		}
		require.NoError(t, json.Unmarshal([]byte(coded.Body), &out))
		require.Len(t, out.Data.BatchResults, n)
		for i, r := range out.Data.BatchResults {
			require.Equal(t, fmt.Sprint(i), r.Reference)
			require.Equal(t, wantPT[i], r.Plaintext, "item %d", i)
			if wantPT[i] == "" {
				require.Contains(t, r.Error, "message authentication failed", "item %d", i)
			} else {
				require.Empty(t, r.Error)
			}
		}
	}
	// The scratch a decryption used goes back to the pool cleared over its
	// whole capacity: decrypt on this goroutine, then take the buffer back
	// (the pool hands this P's last one first).
	secret := strings.Repeat("S", 5000)
	ct := e.encrypt(t, "k", secret, nil)
	p, unlock, err := e.b.readPolicy(t.Context(), e.sealed(t), "k", false)
	require.NoError(t, err)
	defer unlock()
	c := newSoftwareCipher(p, e.b.aeads)
	checked := false
	for attempt := 0; attempt < 20 && !checked; attempt++ {
		got, err := c.decrypt(&batchItem{Ciphertext: ct}, "")
		require.NoError(t, err)
		require.Equal(t, b64(secret), got)
		b := openScratch.Get().(*[]byte)
		if cap(*b) >= len(secret) {
			full := (*b)[:cap(*b)]
			require.False(t, bytes.Contains(full, []byte("SSSS")), "plaintext left in a pooled scratch")
			require.Equal(t, -1, bytes.IndexFunc(full, func(r rune) bool { return r != 0 }), "a pooled scratch is not cleared")
			checked = true
		}
		openScratch.Put(b)
	}
	require.True(t, checked, "never got the scratch back from the pool")
}

// TestReviewCraftedCiphertexts — attacker: a crypto user sending crafted
// ciphertexts to decrypt (model 3): short, no prefix, version 0 /
// negative / signed / overflowing / padded with zeros, bad base64,
// payloads shorter than the nonce, than nonce and tag, a truncated tag,
// a huge payload (beyond maxScratch), newlines in the base64. Every one
// answers as keysutil does (same plaintext or same message), with a 400
// for an error, never a panic or a 500, single and in a batch, on a
// software key. On an HSM-resident key the same inputs are a 400 too.
func TestReviewCraftedCiphertexts(t *testing.T) {
	e := getTestBackend(t)
	cts, _ := reviewKey(t, e)
	e.mustWrite(t, "keys/h", map[string]interface{}{"hsm": true})
	hct := e.encrypt(t, "h", "hsm", nil)
	_, payload, ok := strings.Cut(strings.TrimPrefix(cts[1], "vault:v"), ":")
	require.True(t, ok)
	raw, err := base64.StdEncoding.DecodeString(payload)
	require.NoError(t, err)
	enc := base64.StdEncoding.EncodeToString
	big := make([]byte, 100<<10)
	crafted := []string{
		"", "v", "vault", "vault:", "vault:v", "vault:v1", "vault:v1:", "vault:vv1:" + payload,
		"vault:v0:" + payload, "vault:v00:" + payload, "vault:v01:" + payload, "vault:v+1:" + payload,
		"vault:v-1:" + payload, "vault:v-0:" + payload, "vault:v-9223372036854775808:" + payload,
		"vault:v9223372036854775807:" + payload, "vault:v9223372036854775808:" + payload,
		"vault:v99999999999999999999999:" + payload, "vault:v 1:" + payload, "vault:v1 :" + payload,
		"vault:v1::" + payload, "vault:v1:" + payload + ":", "vault:v1:" + payload + "=",
		"vault:v1:" + payload[:len(payload)-1], "vault:v1:!!!!", "vault:v1:====", "vault:v1:A",
		"vault:v1:" + enc(raw[:11]), "vault:v1:" + enc(raw[:12]), "vault:v1:" + enc(raw[:27]),
		"vault:v1:" + enc(raw[:28]), "vault:v1:" + enc(raw[:len(raw)-1]),
		"vault:v1:" + payload[:8] + "\n" + payload[8:], "vault:v1:" + payload[:8] + "\r\n" + payload[8:],
		"vault:v1:" + enc(big), "vault:v1:" + strings.Repeat("A", 200000) + "!",
		"vault:v2:" + payload, "vault:v3:" + payload, "vault:v4:" + payload,
		"VAULT:v1:" + payload, "vault:V1:" + payload, " vault:v1:" + payload,
	}
	p, unlock, err := e.b.readPolicy(t.Context(), e.sealed(t), "k", false)
	require.NoError(t, err)
	want := make([]string, len(crafted))
	for i, ct := range crafted {
		pt, err := p.DecryptWithOptions(keysutil.EncryptionOptions{}, ct)
		if err != nil {
			want[i] = "error: " + err.Error()
		} else {
			want[i] = pt
		}
	}
	unlock()
	batch := make([]interface{}, 0, len(crafted))
	for i, ct := range crafted {
		if ct == "" {
			continue
		}
		r := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
		if strings.HasPrefix(want[i], "error: ") {
			requireStatus(t, r, 400, strings.TrimPrefix(want[i], "error: "))
		} else {
			require.Equal(t, 200, r.status, "%.60q: %s", ct, r.errorMessage())
			require.Equal(t, want[i], r.data["plaintext"], "%.60q", ct)
		}
		batch = append(batch, map[string]interface{}{"ciphertext": ct, "reference": fmt.Sprint(i)})

		hr := e.write(t, "decrypt/h", map[string]interface{}{"ciphertext": ct})
		require.Equal(t, 400, hr.status, "HSM key, %.60q: %s", ct, hr.errorMessage())
	}
	// Relabelled and cut HSM ciphertexts.
	_, hpayload, _ := strings.Cut(strings.TrimPrefix(hct, "vault:v"), ":")
	hraw, err := base64.StdEncoding.DecodeString(hpayload)
	require.NoError(t, err)
	for _, v := range []string{"0", "-1", "2", "01", "+1", "-0"} {
		hr := e.write(t, "decrypt/h", map[string]interface{}{"ciphertext": "vault:v" + v + ":" + hpayload})
		require.Contains(t, []int{200, 400}, hr.status, "HSM key, version %s: %s", v, hr.errorMessage())
		if hr.status == 200 {
			require.Equal(t, "hsm", unb64(t, hr.data["plaintext"].(string)))
		}
	}
	for cut := 0; cut < len(hraw); cut++ {
		hr := e.write(t, "decrypt/h", map[string]interface{}{"ciphertext": "vault:v1:" + enc(hraw[:cut])})
		require.Equal(t, 400, hr.status, "HSM key, payload cut to %d: %s", cut, hr.errorMessage())
	}
	// The same items in one batch, through the interceptor: each item's
	// answer is keysutil's.
	bodyBytes, err := json.Marshal(map[string]interface{}{"batch_input": batch})
	require.NoError(t, err)
	var coded struct {
		Status int    `json:"http_status_code"`
		Body   string `json:"http_raw_body"`
	}
	require.NoError(t, json.Unmarshal([]byte(e.viaBoundary(t, "decrypt/k", string(bodyBytes), true)), &coded))
	require.Equal(t, 400, coded.Status)
	var out struct {
		Data struct {
			BatchResults []decryptResult `json:"batch_results"`
		} `json:"data"`
	}
	require.NoError(t, json.Unmarshal([]byte(coded.Body), &out))
	for _, r := range out.Data.BatchResults {
		var i int
		_, err := fmt.Sscan(r.Reference, &i)
		require.NoError(t, err)
		if strings.HasPrefix(want[i], "error: ") {
			require.Contains(t, r.Error, strings.TrimPrefix(want[i], "error: "), "%.60q", crafted[i])
			require.Empty(t, r.Plaintext)
		} else {
			require.Equal(t, want[i], r.Plaintext, "%.60q", crafted[i])
		}
	}
}

// TestReviewConcurrentRequestsDoNotShare — attacker: a crypto user whose
// requests run beside another user's (model 1). Attack: read another
// request's plaintext through state shared between requests (the pooled
// decrypt scratch, the AEAD cache, a memo). Two keys, many concurrent
// batch encrypts and decrypts of distinct plaintexts: every answer is its
// own request's.
func TestReviewConcurrentRequestsDoNotShare(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/a", nil)
	e.mustWrite(t, "keys/b", nil)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for w := 0; w < 8; w++ {
		key := []string{"a", "b"}[w%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for round := 0; round < 4; round++ {
				tag := fmt.Sprintf("w%d-r%d-", w, round)
				items := make([]interface{}, 80)
				for i := range items {
					items[i] = map[string]interface{}{"plaintext": b64(tag + strings.Repeat("x", i*13)), "reference": fmt.Sprint(i)}
				}
				r := e.write(t, "encrypt/"+key, map[string]interface{}{"batch_input": items})
				if r.status != 200 {
					errs <- fmt.Errorf("encrypt: %d %s", r.status, r.errorMessage())
					return
				}
				res := r.data["batch_results"].([]interface{})
				dec := make([]interface{}, len(res))
				for i, x := range res {
					dec[i] = map[string]interface{}{"ciphertext": x.(map[string]interface{})["ciphertext"], "reference": fmt.Sprint(i)}
				}
				r = e.write(t, "decrypt/"+key, map[string]interface{}{"batch_input": dec})
				if r.status != 200 {
					errs <- fmt.Errorf("decrypt: %d %s", r.status, r.errorMessage())
					return
				}
				for i, x := range r.data["batch_results"].([]interface{}) {
					got, _ := base64.StdEncoding.DecodeString(x.(map[string]interface{})["plaintext"].(string))
					if want := tag + strings.Repeat("x", i*13); string(got) != want {
						errs <- fmt.Errorf("worker %d item %d: got %.40q want %.40q", w, i, got, want)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// TestReviewOutOfRangeNumbersLeaveTheBodyToTheSDK — attacker: a crypto user
// (model 2) putting a number encoding/json cannot hold (1e400, 10^309)
// in a batch item, where the interceptor hands objects over undecoded and
// fromWire skips unknown scalars: the body must be left to the SDK (as
// encoding/json refuses it), while the same text inside strings, after
// escaped quotes and backslashes, does not count.
func TestReviewOutOfRangeNumbersLeaveTheBodyToTheSDK(t *testing.T) {
	decoded := func(body string) (bool, bool) {
		var ok, raw bool
		_, err := boundary.UnaryInterceptor(context.Background(),
			&pb.HandleRequestArgs{Request: &pb.Request{Path: "encrypt/k", Data: body}},
			&grpc.UnaryServerInfo{FullMethod: pb.Backend_HandleRequest_FullMethodName},
			func(ctx context.Context, _ interface{}) (interface{}, error) {
				var data map[string]interface{}
				data, ok = boundary.DecodedBody(ctx)
				_, raw = data["batch_input"].(*boundary.RawBatch)
				return nil, nil
			})
		require.NoError(t, err)
		return ok, raw
	}
	for _, tc := range []struct {
		items string
		take  bool
	}{
		{`{"a":1e400}`, false},
		{`{"a":-1E+400}`, false},
		{`{"a":[1,{"b":1e309}]}`, false},
		{`{"a":1` + strings.Repeat("0", 309) + `}`, false},
		{`{"a":"x\\","n":1e400}`, false},
		{`{"a":"x\"","n":1e400}`, false},
		{`{"a":"\\\"1e400"},{"n":2e400}`, false},
		{`{"a":1` + strings.Repeat("0", 308) + `}`, true},
		{`{"a":1e308,"b":-1e-400,"c":1.7976931348623157e308}`, true},
		{`{"a":"1e400","b":"\"1e400\\","c":"\\"}`, true},
		{`{"a":true,"b":false,"c":null,"d":-0.5E-3}`, true},
	} {
		body := reviewBatchBody(tc.items)
		var std map[string]interface{}
		stdErr := json.Unmarshal([]byte(body), &std)
		require.Equal(t, tc.take, stdErr == nil, "%s: encoding/json says %v", tc.items, stdErr)
		ok, raw := decoded(body)
		require.Equal(t, tc.take, ok, tc.items)
		require.Equal(t, tc.take, raw, tc.items)
	}
}

// TestReviewFastPathIsKeysutils — attacker: a crypto user (model 1)
// steering an item to another key version than keysutil would use (key
// version -1, 0, below min_encryption_version, above the latest), or
// making the fast path accept what keysutil refuses (bad base64, a
// context or IV on a key that is not derived), or seal without the item's
// associated data. Each item, decoded as the encrypt path decodes a batch
// (one arena), is encrypted by the fast path and by keysutil: the same
// error, or the same version and a ciphertext keysutil opens to the same
// plaintext with the item's associated data only.
func TestReviewFastPathIsKeysutils(t *testing.T) {
	e := getTestBackend(t)
	reviewKey(t, e)
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_encryption_version": 2})
	p, unlock, err := e.b.readPolicy(t.Context(), e.sealed(t), "k", false)
	require.NoError(t, err)
	defer unlock()
	require.True(t, fastPath(p))
	c := newSoftwareCipher(p, e.b.aeads)
	var items []batchItem
	for _, kv := range []int{-1, 0, 1, 2, 3, 4} {
		for _, it := range []batchItem{
			{Plaintext: b64("x")},
			{Plaintext: ""},
			{Plaintext: "bad!"},
			{Plaintext: "eA"},
			{Plaintext: b64("with aad"), AssociatedData: b64("aad")},
			{Plaintext: b64("with context"), Context: b64("ctx")},
			{Plaintext: b64("with iv"), IV: b64("0123456789abcdef")},
			{Plaintext: b64(strings.Repeat("long", 1000))},
		} {
			it.KeyVersion = kv
			items = append(items, it)
		}
	}
	fails := make([]string, len(items))
	decodePlaintexts(items, func(i int, msg string) { fails[i] = msg })
	for i := range items {
		it := &items[i]
		require.NoError(t, it.decodeCommon())
		plain := *it
		plain.sealBuf = nil
		kct, kver, kerr := encryptItem(p, &plain)
		if fails[i] != "" {
			// The path answers the item with base64's error before any
			// encryption: keysutil's is the same message.
			require.Error(t, kerr, "item %d", i)
			require.Contains(t, kerr.Error(), fails[i], "item %d", i)
			continue
		}
		ct, ver, err := c.encrypt(it)
		if kerr != nil {
			require.Error(t, err, "item %d (%+v): keysutil refuses it: %v", i, plain, kerr)
			require.Equal(t, kerr.Error(), err.Error(), "item %d", i)
			continue
		}
		require.NoError(t, err, "item %d", i)
		require.Equal(t, kver, ver, "item %d", i)
		require.Equal(t, kct[:len("vault:vN:")], ct[:len("vault:vN:")], "item %d", i)
		var factories []any
		if it.aad != nil {
			factories = append(factories, staticAAD(it.aad))
		}
		got, err := p.DecryptWithOptions(keysutil.EncryptionOptions{Context: it.context}, ct, factories...)
		require.NoError(t, err, "item %d", i)
		require.Equal(t, plain.Plaintext, got, "item %d", i)
		if it.aad != nil {
			_, err := p.DecryptWithOptions(keysutil.EncryptionOptions{}, ct)
			require.Error(t, err, "item %d sealed without its associated data", i)
		}
		require.Nil(t, it.sealBuf, "the sealed item's buffer is dropped")
	}
}

// TestReviewCraftedJSONHMACSameBothWays — attacker: a crypto user (model 2)
// sending crafted batch items to hmac, whose items are read through
// stringItems (RawObject.Map, segmentio's decoder) rather than fromWire:
// repeated keys, case, escapes, nulls, nested values, non-string values,
// out-of-range numbers. HMACs are deterministic: the answers must be
// byte-identical whichever way the body is decoded, and a repeated input
// is its last value.
func TestReviewCraftedJSONHMACSameBothWays(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	objs := []string{
		`{"input":"QQ==","input":"Qg=="}`,
		`{"input":"QQ==","input":null}`,
		`{"input":"QQ==","Input":"Qg=="}`,
		`{"INPUT":"Qg=="}`,
		`{"input":"Q\u0051=="}`,
		`{"in\u0070ut":"Qg=="}`,
		`{"input":"QQ==","x":{"input":"Qg=="}}`,
		`{"input":"QQ==","reference":"caf\u00e9","reference":"r"}`,
		`{"input":"QQ==","reference":5}`,
		`{"input":"QQ==","n":1e400}`,
		`{"input":"QQ==","n":1.5}`,
		`{}`,
		`{"input":""}`,
	}
	for _, o := range objs {
		for _, shape := range [][]string{{o}, {`{"input":"eA=="}`, o}} {
			body := reviewBatchBody(shape...)
			want, _ := reviewOutcomeAs(t, e, "hmac/k", body, false, false)
			got, _ := reviewOutcomeAs(t, e, "hmac/k", body, true, false)
			require.Equal(t, want, got, "%s", o)
		}
	}
	single := e.mustWrite(t, "hmac/k", map[string]interface{}{"input": "Qg=="})["hmac"].(string)
	got, _ := reviewOutcomeAs(t, e, "hmac/k", reviewBatchBody(objs[0]), true, false)
	require.Contains(t, got, single, "a repeated input is its last value")
}

// TestReviewRewrapKeepsItemsAndVersions — attacker: a crypto user (model 1)
// rewrapping a parallel batch of ciphertexts of every version, asking for
// various key versions, so that the request's aeadMemo (decrypt with an
// old version, encrypt with another, on one cipher) could hand an item the
// wrong version's AEAD. Every result is under the version asked for (or
// the latest) and opens to its own item's plaintext.
func TestReviewRewrapKeepsItemsAndVersions(t *testing.T) {
	e := getTestBackend(t)
	cts, _ := reviewKey(t, e)
	const n = 120
	items := make([]interface{}, n)
	for i := range items {
		items[i] = map[string]interface{}{"ciphertext": cts[i%3+1], "key_version": (i / 3) % 4, "reference": fmt.Sprint(i)}
	}
	body, err := json.Marshal(map[string]interface{}{"batch_input": items})
	require.NoError(t, err)
	var out struct {
		BatchResults []encryptResult `json:"batch_results"`
	}
	reply := e.viaBoundary(t, "rewrap/k", string(body), true)
	require.NoError(t, json.Unmarshal([]byte(reply), &out), reply)
	require.Len(t, out.BatchResults, n, reply)
	for i, r := range out.BatchResults {
		require.Empty(t, r.Error, "item %d", i)
		want := (i / 3) % 4
		if want == 0 {
			want = 3
		}
		require.Equal(t, want, r.KeyVersion, "item %d", i)
		require.True(t, strings.HasPrefix(r.Ciphertext, fmt.Sprintf("vault:v%d:", want)), "item %d", i)
		require.Equal(t, fmt.Sprintf("p%d", i%3+1), e.decrypt(t, "k", r.Ciphertext, nil), "item %d", i)
	}
}

// TestReviewHSMBatchItemsStayApart — attacker: a crypto user (model 1)
// encrypting a parallel batch under an HSM-resident key, whose items take
// their plaintext from the batch's shared arena (decodedPlaintext): a
// plaintext read past its room, or written over by the HSM code, would
// put one item's bytes in another's ciphertext. Each ciphertext opens to
// its own plaintext with its own associated data only.
func TestReviewHSMBatchItemsStayApart(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/h", map[string]interface{}{"hsm": true})
	const n = 96
	items := make([]interface{}, n)
	pts := make([]string, n)
	for i := range items {
		pts[i] = fmt.Sprintf("%03d:", i) + strings.Repeat(string(rune('a'+i%26)), (i*29)%131)
		items[i] = map[string]interface{}{"plaintext": b64(pts[i]), "associated_data": b64(fmt.Sprint("aad", i)), "reference": fmt.Sprint(i)}
	}
	body, err := json.Marshal(map[string]interface{}{"batch_input": items})
	require.NoError(t, err)
	var out struct {
		BatchResults []encryptResult `json:"batch_results"`
	}
	reply := e.viaBoundary(t, "encrypt/h", string(body), true)
	require.NoError(t, json.Unmarshal([]byte(reply), &out), reply)
	require.Len(t, out.BatchResults, n, reply)
	for i, r := range out.BatchResults {
		require.Empty(t, r.Error, "item %d", i)
		require.Equal(t, pts[i], e.decrypt(t, "h", r.Ciphertext, map[string]interface{}{"associated_data": b64(fmt.Sprint("aad", i))}), "item %d", i)
		bad := e.write(t, "decrypt/h", map[string]interface{}{"ciphertext": r.Ciphertext, "associated_data": b64(fmt.Sprint("aad", (i+1)%n))})
		require.Equal(t, 400, bad.status, "item %d opens with its neighbour's associated data", i)
	}
}

// TestReviewGeneratedItemsAreTheMapsItems — attacker: a crypto user (model
// 2) combining the shapes that split fromWire from encoding/json:
// repeated keys with values of mixed kinds (strings, nulls, numbers in
// every form, bools, nested values), key case and escaped keys, odd
// whitespace. 20000 generated objects (a fixed seed), singly and in
// batches: decodeBatchInput gives the same items and error from the body's
// bytes (fromWire, or its map fallback) as from encoding/json's map.
func TestReviewGeneratedItemsAreTheMapsItems(t *testing.T) {
	keys := []string{`"plaintext"`, `"ciphertext"`, `"key_version"`, `"reference"`, `"context"`, `"nonce"`,
		`"associated_data"`, `"padding_scheme"`, `"iv"`, `"Plaintext"`, `"KEY_VERSION"`, `""`, `"x"`,
		`"plain\u0074ext"`, `"key_versio\u006e"`}
	values := []string{`"eA=="`, `""`, `null`, `1`, `-1`, `0`, `-0`, `1e0`, `1.0`, `2E+0`, `123456789012345`,
		`1234567890123456`, `-999999999999999`, `9007199254740993`, `1e308`, `1e-400`, `true`, `false`,
		`{}`, `[]`, `{"plaintext":"Qg=="}`, `["eA=="]`, `"é"`, `"a\"b"`, `"\u0000"`, `"a b"`, `"2"`, `" 2"`,
		`"vault:v1:AAAA"`, `"}"`, `","`, `":"`, `"{\"plaintext\":1}"`}
	spaces := []string{"", " ", "\n", "\t", "\r\n "}
	r := newReviewRand(20261130)
	gen := func() string {
		var b strings.Builder
		b.WriteString(spaces[r.n(len(spaces))] + "{")
		for k, nk := 0, r.n(5); k < nk; k++ {
			if k > 0 {
				b.WriteString(spaces[r.n(len(spaces))] + ",")
			}
			b.WriteString(spaces[r.n(len(spaces))] + keys[r.n(len(keys))] + spaces[r.n(len(spaces))] + ":" +
				spaces[r.n(len(spaces))] + values[r.n(len(values))] + spaces[r.n(len(spaces))])
		}
		b.WriteString("}" + spaces[r.n(len(spaces))])
		return b.String()
	}
	var batch []string
	for i := 0; i < 20000; i++ {
		obj := gen()
		batch = append(batch, obj)
		for _, required := range []string{"plaintext", "ciphertext", ""} {
			ok, want, wantErr, got, gotErr := decodeBothWays(t, []string{obj}, required)
			require.True(t, ok, obj)
			require.Equal(t, wantErr, gotErr, "%s (required %q)", obj, required)
			require.Equal(t, want, got, "%s (required %q)", obj, required)
		}
		if len(batch) == 7 {
			ok, want, wantErr, got, gotErr := decodeBothWays(t, batch, "plaintext")
			require.True(t, ok)
			require.Equal(t, wantErr, gotErr, "%q", batch)
			require.Equal(t, want, got, "%q", batch)
			batch = batch[:0]
		}
	}
}

// reviewRand is a small deterministic generator (xorshift), so that a
// failure is reproducible.
type reviewRand struct{ s uint64 }

func newReviewRand(seed uint64) *reviewRand { return &reviewRand{s: seed | 1} }

func (r *reviewRand) n(k int) int {
	r.s ^= r.s << 13
	r.s ^= r.s >> 7
	r.s ^= r.s << 17
	return int(r.s % uint64(k))
}
