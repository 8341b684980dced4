package hsmtransit

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin/pb"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/boundary"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/boundary/boundarytest"
)

func decodeJSON(tb testing.TB, body string) map[string]interface{} {
	tb.Helper()
	m := map[string]interface{}{}
	require.NoError(tb, json.Unmarshal([]byte(body), &m))
	return m
}

// viaBoundary sends an update to e's backend as Vault's plugin boundary
// does, with or without the interceptor, and returns the reply's data (the
// JSON Vault receives).
func (e *testEnv) viaBoundary(tb testing.TB, path, body string, intercepted bool) string {
	tb.Helper()
	reply, err := boundarytest.HandleRequest(func(ctx context.Context, req *logical.Request) (*logical.Response, error) {
		req.Storage = e.storage
		return e.b.HandleRequest(ctx, req)
	}, path, body, intercepted)
	require.NoError(tb, err)
	require.Nil(tb, reply.Err, "%s", path)
	require.NotNil(tb, reply.Response, "%s", path)
	return reply.Response.Data
}

// TestExistenceCheckWithDecodedBody: the existence check answers the same,
// with the same error, whether the body came in the request or in the
// context, for a key that exists and one that does not, for a valid body
// and one the framework refuses.
func TestExistenceCheckWithDecodedBody(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/present", nil)
	refused := 0
	for _, name := range []string{"present", "absent"} {
		for _, body := range []string{
			`{"plaintext":"eA==","reference":"` + strings.Repeat("r", 1100) + `"}`,
			`{"batch_input":[{"plaintext":"eA=="}],"pad":"` + strings.Repeat("p", 1100) + `"}`,
			`{"plaintext":"eA==","key_version":"not a number","pad":"` + strings.Repeat("p", 1100) + `"}`,
			// The existence check gets batch_input's array empty: every
			// shape of it must be answered as the SDK answers it.
			`{"batch_input":"not a list","pad":"` + strings.Repeat("p", 1100) + `"}`,
			`{"batch_input":{"plaintext":"eA=="},"pad":"` + strings.Repeat("p", 1100) + `"}`,
			`{"batch_input":["a","b",1,null,[2]],"pad":"` + strings.Repeat("p", 1100) + `"}`,
			`{"batch_input":null,"key_version":2,"pad":"` + strings.Repeat("p", 1100) + `"}`,
			`{"batch_input":[{"plaintext":"eA==","key_version":"x"}],"key_version":"y","pad":"` + strings.Repeat("p", 1100) + `"}`,
			`{"batch_input":[],"convergent_encryption":"maybe","pad":"` + strings.Repeat("p", 1100) + `"}`,
		} {
			stock := &logical.Request{Operation: logical.UpdateOperation, Path: "encrypt/" + name, Data: decodeJSON(t, body), Storage: e.storage}
			f1, x1, err1 := e.b.HandleExistenceCheck(context.Background(), stock)

			args := &pb.HandleExistenceCheckArgs{Request: &pb.Request{Path: "encrypt/" + name, Data: body}}
			var f2, x2 bool
			var err2 error
			_, err := boundary.UnaryInterceptor(context.Background(), args, &grpc.UnaryServerInfo{FullMethod: pb.Backend_HandleExistenceCheck_FullMethodName},
				func(ctx context.Context, _ interface{}) (interface{}, error) {
					require.Equal(t, "{}", args.Request.Data, "the SDK decodes only an empty body")
					fast := &logical.Request{Operation: logical.UpdateOperation, Path: "encrypt/" + name, Data: map[string]interface{}{}, Storage: e.storage}
					f2, x2, err2 = e.b.HandleExistenceCheck(ctx, fast)
					return nil, nil
				})
			require.NoError(t, err)

			require.Equal(t, []bool{f1, x1}, []bool{f2, x2}, "%s %.60s", name, body)
			require.Equal(t, fmt.Sprint(err1), fmt.Sprint(err2), "%s %.60s", name, body)
			if err1 != nil {
				refused++
				require.Error(t, err2, "the framework validates the body in the existence check")
			} else {
				require.NoError(t, err2)
				require.True(t, f2)
				require.Equal(t, name == "present", x2)
			}
		}
	}
	require.GreaterOrEqual(t, refused, 2*2, "bodies the framework refuses are among them (key_version, convergent_encryption)")
}

// TestHandleRequestUsesTheDecodedBody: a batch whose body came in the
// context encrypts every item, in order, and decrypts back; a request that
// carries its own body keeps it.
func TestHandleRequestUsesTheDecodedBody(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	var items []string
	for i := 0; i < 200; i++ {
		items = append(items, fmt.Sprintf(`{"plaintext":%q,"reference":"r%d"}`, b64(fmt.Sprint("item ", i)), i))
	}
	out := e.viaBoundary(t, "encrypt/k", `{"batch_input":[`+strings.Join(items, ",")+`]}`, true)
	var got struct {
		BatchResults []encryptResult `json:"batch_results"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &got))
	require.Len(t, got.BatchResults, 200)
	for i, r := range got.BatchResults {
		require.Empty(t, r.Error)
		require.Equal(t, fmt.Sprint("r", i), r.Reference)
		require.Equal(t, 1, r.KeyVersion)
		require.Equal(t, fmt.Sprint("item ", i), e.decrypt(t, "k", r.Ciphertext, nil))
	}

	out = e.viaBoundary(t, "encrypt/k", fmt.Sprintf(`{"plaintext":%q}`, b64("own")), true)
	require.Equal(t, "own", e.decrypt(t, "k", decodeJSON(t, out)["ciphertext"].(string), nil))
}

// awkward are references and plaintexts whose JSON differs between
// encoders (HTML, control characters, invalid UTF-8, U+2028).
var awkward = []string{"", "r1", "<a href='x'>&</a>", "quote\" back\\slash", "\x00\x1f\x7f", "\b\f\n\r\t",
	"caf\u00e9 \u4e2d \U0001F600", "\u2028\u2029", "\xff\xfe", "cut \xe2\x82"}

// The answers to decrypt, rewrap and encrypt batches that the plugin writes
// itself are, byte for byte, what the SDK's encoding/json writes for the
// same results: decrypt (deterministic) compared with the same request
// without the interceptor; encrypt and rewrap (random) with encoding/json
// over the results they decode to. Items fail inside a rewrap batch (a 200).
func TestPreEncodedAnswersAreTheSDKs(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	var enc, dec, rew []string
	for i, ref := range awkward {
		refJSON, _ := json.Marshal(ref)
		pt := b64(ref + fmt.Sprint(i))
		enc = append(enc, fmt.Sprintf(`{"plaintext":%q,"reference":%s}`, pt, refJSON))
		ct := e.encrypt(t, "k", ref+fmt.Sprint(i), nil)
		dec = append(dec, fmt.Sprintf(`{"ciphertext":%q,"reference":%s}`, ct, refJSON))
		rew = append(rew, fmt.Sprintf(`{"ciphertext":%q,"reference":%s}`, ct, refJSON))
	}
	rew = append(rew, `{"ciphertext":"vault:v1:bm90IGEgY2lwaGVydGV4dA==","reference":"<bad>"}`, `{"ciphertext":"plain","reference":"x"}`)
	e.mustWrite(t, "keys/k/rotate", nil)

	decBody := `{"batch_input":[` + strings.Join(dec, ",") + `]}`
	fast := e.viaBoundary(t, "decrypt/k", decBody, true)
	require.Equal(t, e.viaBoundary(t, "decrypt/k", decBody, false), fast)
	require.Contains(t, fast, `\u003ca href='x'\u003e\u0026\u003c/a\u003e`, "HTML escaped as encoding/json does")

	for path, body := range map[string]string{
		"encrypt/k": `{"batch_input":[` + strings.Join(enc, ",") + `]}`,
		"rewrap/k":  `{"batch_input":[` + strings.Join(rew, ",") + `]}`,
	} {
		out := e.viaBoundary(t, path, body, true)
		var got struct {
			BatchResults []encryptResult `json:"batch_results"`
		}
		require.NoError(t, json.Unmarshal([]byte(out), &got))
		want, err := json.Marshal(map[string]interface{}{"batch_results": got.BatchResults})
		require.NoError(t, err)
		require.Equal(t, string(want), out, path)
		if path == "rewrap/k" {
			require.Len(t, got.BatchResults, len(awkward)+2)
			require.Equal(t, 2, got.BatchResults[0].KeyVersion)
			require.NotEmpty(t, got.BatchResults[len(awkward)].Error)
			require.NotEmpty(t, got.BatchResults[len(awkward)+1].Error)
		}
	}

	// A batch answered with a status code is the SDK's (it is not a plain
	// batch_results answer): the same either way.
	bad := `{"batch_input":[{"plaintext":"not base64!","reference":"<r>"},{"plaintext":"aGk="}],"pad":"` + strings.Repeat("p", 1100) + `"}`
	reply, err := boundarytest.HandleRequest(func(ctx context.Context, req *logical.Request) (*logical.Response, error) {
		req.Storage = e.storage
		return e.b.HandleRequest(ctx, req)
	}, "encrypt/k", bad, true)
	require.NoError(t, err)
	require.Contains(t, reply.Response.Data, "http_status_code")
	require.NotContains(t, reply.Response.Data, "hsm_transit_pre_encoded")
}

// TestPreEncodedMACsAndSignatures: batches of hmac, sign and verify are
// written by the plugin (the reply's Data is the stand-in's replacement)
// and read as the SDK writes them, with good and bad items.
func TestPreEncodedMACsAndSignatures(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/m", map[string]interface{}{"type": "hmac", "key_size": 32})
	e.mustWrite(t, "keys/s", map[string]interface{}{"type": "ed25519"})
	via := func(path, body string) string {
		t.Helper()
		var preEncoded bool
		reply, err := boundarytest.HandleRequest(func(ctx context.Context, req *logical.Request) (*logical.Response, error) {
			req.Storage = e.storage
			resp, err := e.b.HandleRequest(ctx, req)
			if resp != nil {
				_, preEncoded = resp.Data["hsm_transit_pre_encoded"]
			}
			return resp, err
		}, path, body, true)
		require.NoError(t, err)
		require.Nil(t, reply.Err, "%s: %v", path, reply.Response)
		require.True(t, preEncoded, "%s: the plugin wrote the batch", path)
		require.Equal(t, e.viaBoundary(t, path, body, false), reply.Response.Data, path)
		return reply.Response.Data
	}
	var items, refs []string
	for i, ref := range awkward {
		refJSON, _ := json.Marshal(ref)
		refs = append(refs, string(refJSON))
		items = append(items, fmt.Sprintf(`{"input":%q,"reference":%s}`, b64(ref+fmt.Sprint(i)), refJSON))
	}
	badItem := `{"input":"not base64!","reference":"<bad>"}`
	body := `{"batch_input":[` + strings.Join(append(items, badItem), ",") + `]}`

	var macs struct {
		BatchResults []hmacResult `json:"batch_results"`
	}
	require.NoError(t, json.Unmarshal([]byte(via("hmac/m", body)), &macs))
	require.Len(t, macs.BatchResults, len(awkward)+1)
	require.NotEmpty(t, macs.BatchResults[len(awkward)].Error)
	var sigs struct {
		BatchResults []signResult `json:"batch_results"`
	}
	require.NoError(t, json.Unmarshal([]byte(via("sign/s", body)), &sigs))
	require.Len(t, sigs.BatchResults, len(awkward)+1)
	require.NotEmpty(t, sigs.BatchResults[0].Signature)
	require.NotEmpty(t, sigs.BatchResults[len(awkward)].Error)

	var macChecks, sigChecks []string
	for i, ref := range awkward {
		in := b64(ref + fmt.Sprint(i))
		mac, sig := macs.BatchResults[i].HMAC, sigs.BatchResults[i].Signature
		if i == 1 { // one that does not verify
			mac, sig = macs.BatchResults[0].HMAC, sigs.BatchResults[0].Signature
		}
		macChecks = append(macChecks, fmt.Sprintf(`{"input":%q,"hmac":%q,"reference":%s}`, in, mac, refs[i]))
		sigChecks = append(sigChecks, fmt.Sprintf(`{"input":%q,"signature":%q,"reference":%s}`, in, sig, refs[i]))
	}
	macChecks = append(macChecks, fmt.Sprintf(`{"input":"not base64!","hmac":%q,"reference":"<bad>"}`, macs.BatchResults[0].HMAC))
	sigChecks = append(sigChecks, fmt.Sprintf(`{"input":"not base64!","signature":%q,"reference":"<bad>"}`, sigs.BatchResults[0].Signature))
	for path, checks := range map[string][]string{"verify/m": macChecks, "verify/s": sigChecks} {
		var got struct {
			BatchResults []verifyResult `json:"batch_results"`
		}
		require.NoError(t, json.Unmarshal([]byte(via(path, `{"batch_input":[`+strings.Join(checks, ",")+`]}`)), &got))
		require.Len(t, got.BatchResults, len(awkward)+1)
		require.True(t, got.BatchResults[0].Valid, path)
		require.False(t, got.BatchResults[1].Valid, path)
		require.NotEmpty(t, got.BatchResults[len(awkward)].Error, path)
	}
}

// appendBatch writes what encoding/json writes, for any results.
func TestBatchJSONIsEncodingJSONs(t *testing.T) {
	pick := func(r *rand.Rand) string {
		if r.IntN(3) == 0 {
			return ""
		}
		return awkward[r.IntN(len(awkward))] + b64(fmt.Sprint(r.Uint64()))
	}
	r := rand.New(rand.NewPCG(1, 2))
	for n := range 50 {
		encs := make([]encryptResult, n)
		decs := make([]decryptResult, n)
		for i := range n {
			encs[i] = encryptResult{Ciphertext: pick(r), KeyVersion: r.IntN(3) * r.IntN(1<<20), Error: pick(r), Reference: pick(r)}
			decs[i] = decryptResult{Plaintext: pick(r), Error: pick(r), Reference: pick(r)}
		}
		want, err := json.Marshal(map[string]interface{}{"batch_results": encs})
		require.NoError(t, err)
		require.Equal(t, string(want), string(appendBatch(nil, encs)))
		want, err = json.Marshal(map[string]interface{}{"batch_results": decs})
		require.NoError(t, err)
		require.Equal(t, string(want), string(appendBatch(nil, decs)))
	}
	for n := range 50 {
		macs := make([]hmacResult, n)
		sigs := make([]signResult, n)
		vers := make([]verifyResult, n)
		for i := range n {
			macs[i] = hmacResult{HMAC: pick(r), Valid: r.IntN(2) == 0, Error: pick(r), Reference: pick(r)}
			var pub []byte
			if r.IntN(2) == 0 {
				pub = make([]byte, r.IntN(70))
				for j := range pub {
					pub[j] = byte(r.Uint32())
				}
			}
			sigs[i] = signResult{Signature: pick(r), KeyVersion: r.IntN(3) * r.IntN(1<<20), PublicKey: pub, Error: pick(r), Reference: pick(r), internal: r.IntN(2) == 0}
			vers[i] = verifyResult{Valid: r.IntN(2) == 0, Error: pick(r), Reference: pick(r), internal: r.IntN(2) == 0}
		}
		for _, c := range []struct {
			results any
			got     []byte
		}{{macs, appendBatch(nil, macs)}, {sigs, appendBatch(nil, sigs)}, {vers, appendBatch(nil, vers)}} {
			want, err := json.Marshal(map[string]interface{}{"batch_results": c.results})
			require.NoError(t, err)
			require.Equal(t, string(want), string(c.got))
		}
	}
	require.Equal(t, `{"batch_results":null}`, string(appendBatch[encryptResult](nil, nil)))
	require.Equal(t, `{"batch_results":[]}`, string(appendBatch(nil, []decryptResult{})))
}
