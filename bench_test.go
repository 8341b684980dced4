package hsmtransit

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"testing"

	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
	"google.golang.org/protobuf/proto"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/boundary/boundarytest"
)

// The in-process benchmarks call the backend as Vault does, without the
// plugin boundary: encrypt, decrypt, rewrap and datakey, batches of 1, 100
// and 1000 items of 128 bytes, software and HSM-resident keys.
//
//	go test -run '^$' -bench . -benchtime 2s
//
// items/s is reported per benchmark; ns/op is per request.

var benchSizes = []int{1, 100, 1000}

func benchPlaintext(b *testing.B) string {
	b.Helper()
	buf := make([]byte, 128)
	if _, err := rand.Read(buf); err != nil {
		b.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(buf)
}

// benchBody is a request body for n items: the single fields for 1, else a
// batch_input.
func benchBody(n int, field string, values func(i int) string) map[string]interface{} {
	if n == 1 {
		return map[string]interface{}{field: values(0)}
	}
	items := make([]interface{}, n)
	for i := range items {
		items[i] = map[string]interface{}{field: values(i)}
	}
	return map[string]interface{}{"batch_input": items}
}

func benchEnv(b *testing.B, hsmKey bool) *testEnv {
	b.Helper()
	e := getTestBackend(b)
	e.mustWrite(b, "keys/bench", map[string]interface{}{"hsm": hsmKey})
	return e
}

// benchCall runs one request per iteration and fails on any error.
func benchCall(b *testing.B, e *testEnv, path string, body func() map[string]interface{}, items int) {
	b.Helper()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		resp, err := e.b.HandleRequest(b.Context(), &logical.Request{
			Operation: logical.UpdateOperation, Path: path, Data: body(), Storage: e.storage,
		})
		if err != nil || (resp != nil && resp.IsError()) {
			b.Fatalf("%s: %v %v", path, err, resp)
		}
	}
	b.ReportMetric(float64(b.N*items)/b.Elapsed().Seconds(), "items/s")
}

func forResidencies(b *testing.B, f func(b *testing.B, hsmKey bool)) {
	for _, r := range []struct {
		name string
		hsm  bool
	}{{"software", false}, {"hsm", true}} {
		b.Run(r.name, func(b *testing.B) { f(b, r.hsm) })
	}
}

func BenchmarkEncrypt(b *testing.B) {
	forResidencies(b, func(b *testing.B, hsmKey bool) {
		for _, n := range benchSizes {
			b.Run(fmt.Sprintf("batch=%d", n), func(b *testing.B) {
				e := benchEnv(b, hsmKey)
				pt := benchPlaintext(b)
				benchCall(b, e, "encrypt/bench", func() map[string]interface{} {
					return benchBody(n, "plaintext", func(int) string { return pt })
				}, n)
			})
		}
	})
}

// ciphertexts makes n ciphertexts of the bench key.
func ciphertexts(b *testing.B, e *testEnv, n int) []string {
	b.Helper()
	pt := benchPlaintext(b)
	out := make([]string, n)
	for i := range out {
		out[i] = e.encrypt(b, "bench", pt, nil)
	}
	return out
}

func BenchmarkDecrypt(b *testing.B) {
	forResidencies(b, func(b *testing.B, hsmKey bool) {
		for _, n := range benchSizes {
			b.Run(fmt.Sprintf("batch=%d", n), func(b *testing.B) {
				e := benchEnv(b, hsmKey)
				cts := ciphertexts(b, e, n)
				benchCall(b, e, "decrypt/bench", func() map[string]interface{} {
					return benchBody(n, "ciphertext", func(i int) string { return cts[i] })
				}, n)
			})
		}
	})
}

func BenchmarkRewrap(b *testing.B) {
	forResidencies(b, func(b *testing.B, hsmKey bool) {
		for _, n := range benchSizes {
			b.Run(fmt.Sprintf("batch=%d", n), func(b *testing.B) {
				e := benchEnv(b, hsmKey)
				cts := ciphertexts(b, e, n)
				e.mustWrite(b, "keys/bench/rotate", nil)
				benchCall(b, e, "rewrap/bench", func() map[string]interface{} {
					return benchBody(n, "ciphertext", func(i int) string { return cts[i] })
				}, n)
			})
		}
	})
}

// BenchmarkDatakey has no batches: datakey makes one key per request.
func BenchmarkDatakey(b *testing.B) {
	forResidencies(b, func(b *testing.B, hsmKey bool) {
		e := benchEnv(b, hsmKey)
		benchCall(b, e, "datakey/wrapped/bench", func() map[string]interface{} { return nil }, 1)
	})
}

// BenchmarkItemEncrypt compares the per-item work of an AES-256-GCM
// encryption: keysutil's EncryptWithOptions, which built-in transit calls
// for every item (an AES cipher and a GCM built each time), and this
// plugin's path with the AEAD cached per key version.
func BenchmarkItemEncrypt(b *testing.B) {
	e := benchEnv(b, false)
	p, unlock, err := e.b.readPolicy(b.Context(), e.sealed(b), "bench", false)
	if err != nil || p == nil {
		b.Fatal(err)
	}
	defer unlock()
	pt := benchPlaintext(b)
	b.Run("keysutil", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if _, err := p.EncryptWithOptions(keysutil.EncryptionOptions{}, pt); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("cached-aead", func(b *testing.B) {
		b.ReportAllocs()
		c := newSoftwareCipher(p, e.b.aeads)
		for i := 0; i < b.N; i++ {
			it := batchItem{Plaintext: pt}
			if _, _, err := c.encrypt(&it); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkEncryptAntiRollback compares encrypt with and without the
// manifest's anchor kept in the token, in the same run: the anchor is
// written once per storage write, which encrypt makes only to reserve usage
// counts (once per 4096 encryptions of a version).
func BenchmarkEncryptAntiRollback(b *testing.B) {
	for _, anti := range []bool{false, true} {
		for _, n := range []int{1, 1000} {
			b.Run(fmt.Sprintf("anti_rollback=%t/batch=%d", anti, n), func(b *testing.B) {
				e := benchEnv(b, false)
				e.mustWrite(b, "config/seal", map[string]interface{}{"anti_rollback": anti})
				pt := benchPlaintext(b)
				benchCall(b, e, "encrypt/bench", func() map[string]interface{} {
					return benchBody(n, "plaintext", func(int) string { return pt })
				}, n)
			})
		}
	}
}

// BenchmarkBoundaryBatch is a batch of 1000 128-byte items for a software
// key as the plugin gets it from Vault: a JSON body through the
// interceptor's decoding, the handler, and the reply's protobuf encoding,
// without gRPC's transport. It is where the plugin's own CPU per batch item
// is looked at between load runs (make bench measures the process).
func BenchmarkBoundaryBatch(b *testing.B) {
	e := benchEnv(b, false)
	pt := benchPlaintext(b)
	cts := ciphertexts(b, e, 1000)
	backend := func(ctx context.Context, req *logical.Request) (*logical.Response, error) {
		req.Storage = e.storage
		return e.b.HandleRequest(ctx, req)
	}
	for _, op := range []struct{ path, field string }{{"encrypt/bench", "plaintext"}, {"decrypt/bench", "ciphertext"}} {
		b.Run(op.path[:7], func(b *testing.B) {
			items := make([]map[string]string, len(cts))
			for i := range items {
				v := pt
				if op.field == "ciphertext" {
					v = cts[i]
				}
				items[i] = map[string]string{op.field: v}
			}
			body, err := json.Marshal(map[string]interface{}{"batch_input": items})
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				reply, err := boundarytest.HandleRequest(backend, op.path, string(body), true)
				if err != nil || reply.Err != nil || reply.Response == nil {
					b.Fatalf("%v %v", err, reply)
				}
				if _, err := proto.Marshal(reply); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(items)), "ns/item")
		})
	}
}
