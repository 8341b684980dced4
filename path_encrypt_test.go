package hsmtransit

import (
	"encoding/base64"
	"fmt"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"
)

func TestEncryptDecryptEveryEncryptionType(t *testing.T) {
	e := getTestBackend(t)
	for _, kt := range allKeyTypes {
		if !kt.encrypt || kt.name == "rsa-3072" || kt.name == "rsa-4096" {
			continue
		}
		t.Run(kt.name, func(t *testing.T) {
			e.mustWrite(t, "keys/"+kt.name, map[string]interface{}{"type": kt.name})
			for _, pt := range []string{"", "x", "the quick brown fox", strings.Repeat("z", 100)} {
				ct := e.encrypt(t, kt.name, pt, nil)
				require.True(t, strings.HasPrefix(ct, "vault:v1:"), ct)
				require.Equal(t, pt, e.decrypt(t, kt.name, ct, nil))
			}
		})
	}
}

func TestEncryptResponseFields(t *testing.T) {
	e := getTestBackend(t)
	data := e.mustWrite(t, "encrypt/k", map[string]interface{}{"plaintext": b64("hi")})
	require.Equal(t, float64(1), data["key_version"])
	require.Len(t, data, 2, "ciphertext and key_version only")
	raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(data["ciphertext"].(string), "vault:v1:"))
	require.NoError(t, err)
	require.Len(t, raw, 12+2+16, "nonce, ciphertext, tag")
}

func TestEncryptUpsert(t *testing.T) {
	e := getTestBackend(t)
	r := e.write(t, "encrypt/new", map[string]interface{}{"plaintext": b64("a")})
	requireStatus(t, r, 200, "")
	require.Equal(t, "aes256-gcm96", e.read(t, "keys/new").data["type"])

	r = e.write(t, "encrypt/chacha", map[string]interface{}{"plaintext": b64("a"), "type": "chacha20-poly1305"})
	requireStatus(t, r, 200, "")
	require.Equal(t, "chacha20-poly1305", e.read(t, "keys/chacha").data["type"])

	r = e.write(t, "encrypt/derived", map[string]interface{}{"plaintext": b64("a"), "context": b64("c")})
	requireStatus(t, r, 200, "")
	require.Equal(t, true, e.read(t, "keys/derived").data["derived"], "a context on upsert makes a derived key")

	r = e.write(t, "encrypt/conv", map[string]interface{}{"plaintext": b64("a"), "context": b64("c"), "convergent_encryption": true})
	requireStatus(t, r, 200, "")
	require.Equal(t, true, e.read(t, "keys/conv").data["convergent_encryption"])

	cases := []struct {
		name string
		data map[string]interface{}
		msg  string
	}{
		{"ecdsa type", map[string]interface{}{"type": "ecdsa-p256"}, "not supported for this operation"},
		{"hmac type", map[string]interface{}{"type": "hmac"}, "not supported for this operation"},
		{"unknown type", map[string]interface{}{"type": "nope"}, "unknown key type nope"},
		{"enterprise type", map[string]interface{}{"type": "aes256-cbc"}, "only available in enterprise"},
		{"convergent without context", map[string]interface{}{"convergent_encryption": true}, "context is required"},
		{"rsa with context", map[string]interface{}{"type": "rsa-2048", "context": b64("c")}, "not supported for keys of type rsa-2048"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.data["plaintext"] = b64("a")
			requireStatus(t, e.write(t, "encrypt/refused", tc.data), 400, tc.msg)
			requireStatus(t, e.read(t, "keys/refused"), 404, "")
		})
	}
}

func TestEncryptIsCreateOnlyForMissingKeys(t *testing.T) {
	e := getTestBackend(t)
	req := &logical.Request{Operation: logical.UpdateOperation, Path: "encrypt/k", Storage: e.storage}
	found, exists, err := e.b.HandleExistenceCheck(t.Context(), req)
	require.NoError(t, err)
	require.True(t, found)
	require.False(t, exists, "a missing key makes encrypt a create, for ACLs")
	e.mustWrite(t, "keys/k", nil)
	_, exists, err = e.b.HandleExistenceCheck(t.Context(), req)
	require.NoError(t, err)
	require.True(t, exists)
}

func TestEncryptErrors(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	e.mustWrite(t, "keys/derived", map[string]interface{}{"derived": true})
	e.mustWrite(t, "keys/conv", map[string]interface{}{"derived": true, "convergent_encryption": true})
	e.mustWrite(t, "keys/rsa", map[string]interface{}{"type": "rsa-2048"})
	e.mustWrite(t, "keys/sign", map[string]interface{}{"type": "ecdsa-p256"})
	e.mustWrite(t, "keys/mac", map[string]interface{}{"type": "hmac"})
	e.mustWrite(t, "keys/rotated", nil)
	e.mustWrite(t, "keys/rotated/rotate", nil)
	e.mustWrite(t, "keys/rotated/rotate", nil)
	e.mustWrite(t, "keys/rotated/config", map[string]interface{}{"min_encryption_version": 2})

	cases := []struct {
		name string
		key  string
		data map[string]interface{}
		msg  string
	}{
		{"missing plaintext", "k", map[string]interface{}{}, "missing plaintext to encrypt"},
		{"plaintext not base64", "k", map[string]interface{}{"plaintext": "not base64!"}, "illegal base64"},
		{"derived without context", "derived", map[string]interface{}{"plaintext": b64("a")}, "missing 'context' for key derivation"},
		{"context not base64", "derived", map[string]interface{}{"plaintext": b64("a"), "context": "%%"}, "illegal base64"},
		{"nonce on a random-nonce key (CVE-2023-4680)", "k", map[string]interface{}{"plaintext": b64("a"), "nonce": b64("123456789012")}, "provided nonce not allowed for this key"},
		{"nonce on a convergent v3 key", "conv", map[string]interface{}{"plaintext": b64("a"), "context": b64("c"), "nonce": b64("123456789012")}, "provided nonce not allowed for this key"},
		{"version below min_encryption_version", "rotated", map[string]interface{}{"plaintext": b64("a"), "key_version": 1}, "less than the minimum encryption key version"},
		{"version above latest", "rotated", map[string]interface{}{"plaintext": b64("a"), "key_version": 9}, "higher than the latest key version"},
		{"negative version", "k", map[string]interface{}{"plaintext": b64("a"), "key_version": -1}, "negative"},
		{"signing key", "sign", map[string]interface{}{"plaintext": b64("a")}, "message encryption not supported for key type ecdsa-p256"},
		{"hmac key", "mac", map[string]interface{}{"plaintext": b64("a")}, "message encryption not supported for key type hmac"},
		{"associated data on RSA", "rsa", map[string]interface{}{"plaintext": b64("a"), "associated_data": b64("ad")}, "non-AEAD cipher suite"},
		{"associated data not base64", "k", map[string]interface{}{"plaintext": b64("a"), "associated_data": "%%"}, "associated_data"},
		{"padding scheme on AES", "k", map[string]interface{}{"plaintext": b64("a"), "padding_scheme": "oaep"}, "unsupported key type aes256-gcm96 for padding scheme"},
		{"unknown padding scheme", "rsa", map[string]interface{}{"plaintext": b64("a"), "padding_scheme": "none"}, "padding_scheme' invalid"},
		{"empty batch", "k", map[string]interface{}{"batch_input": []interface{}{}}, "missing batch input to process"},
		{"batch as string", "k", map[string]interface{}{"batch_input": "[]"}, "batch_input must be a JSON list"},
		{"batch item not an object", "k", map[string]interface{}{"batch_input": []interface{}{"x"}}, "expected a map"},
		{"batch item without plaintext", "k", map[string]interface{}{"batch_input": []interface{}{map[string]interface{}{}}}, "missing plaintext to encrypt"},
		{"batch plaintext not a string", "k", map[string]interface{}{"batch_input": []interface{}{map[string]interface{}{"plaintext": 5}}}, "expected type 'string'"},
		{"batch key_version not a number", "k", map[string]interface{}{"batch_input": []interface{}{map[string]interface{}{"plaintext": "", "key_version": "x"}}}, "key_version"},
		{"context on some items only", "derived", map[string]interface{}{"batch_input": []interface{}{
			map[string]interface{}{"plaintext": b64("a"), "context": b64("c")},
			map[string]interface{}{"plaintext": b64("b")},
		}}, "context should be set either in all the request blocks or in none"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			requireStatus(t, e.write(t, "encrypt/"+tc.key, tc.data), 400, tc.msg)
		})
	}
}

func TestEncryptMissingKeyWithUpsertOffIs400(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "config/keys", map[string]interface{}{"disable_upsert": true})
	requireStatus(t, e.write(t, "encrypt/none", map[string]interface{}{"plaintext": b64("a")}), 400, "encryption key not found")
}

func TestEncryptAssociatedData(t *testing.T) {
	e := getTestBackend(t)
	for _, kt := range []string{"aes128-gcm96", "aes256-gcm96", "chacha20-poly1305"} {
		t.Run(kt, func(t *testing.T) {
			e.mustWrite(t, "keys/"+kt, map[string]interface{}{"type": kt})
			ad := map[string]interface{}{"associated_data": b64("order-42")}
			ct := e.encrypt(t, kt, "paid", ad)
			require.Equal(t, "paid", e.decrypt(t, kt, ct, ad))
			r := e.write(t, "decrypt/"+kt, map[string]interface{}{"ciphertext": ct, "associated_data": b64("order-43")})
			requireStatus(t, r, 400, "message authentication failed")
			r = e.write(t, "decrypt/"+kt, map[string]interface{}{"ciphertext": ct})
			requireStatus(t, r, 400, "message authentication failed")
		})
	}
}

func TestEncryptDerivedAndConvergent(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/derived", map[string]interface{}{"derived": true})
	ctxA := map[string]interface{}{"context": b64("tenant-a")}
	ctxB := map[string]interface{}{"context": b64("tenant-b")}
	ct := e.encrypt(t, "derived", "s", ctxA)
	require.Equal(t, "s", e.decrypt(t, "derived", ct, ctxA))
	requireStatus(t, e.write(t, "decrypt/derived", map[string]interface{}{"ciphertext": ct, "context": ctxB["context"]}), 400, "message authentication failed")
	requireStatus(t, e.write(t, "decrypt/derived", map[string]interface{}{"ciphertext": ct}), 400, "missing 'context'")
	require.NotEqual(t, ct, e.encrypt(t, "derived", "s", ctxA), "random nonces")

	e.mustWrite(t, "keys/conv", map[string]interface{}{"derived": true, "convergent_encryption": true})
	c1 := e.encrypt(t, "conv", "same", ctxA)
	require.Equal(t, c1, e.encrypt(t, "conv", "same", ctxA), "convergent: same input, same ciphertext")
	require.NotEqual(t, c1, e.encrypt(t, "conv", "same", ctxB))
	require.NotEqual(t, c1, e.encrypt(t, "conv", "other", ctxA))
	require.Equal(t, "same", e.decrypt(t, "conv", c1, ctxA))
}

func TestEncryptBatch(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	items := []interface{}{
		map[string]interface{}{"plaintext": b64("one"), "reference": "r1"},
		map[string]interface{}{"plaintext": b64("two"), "reference": "r2"},
		map[string]interface{}{"plaintext": b64("three")},
	}
	data := e.mustWrite(t, "encrypt/k", map[string]interface{}{"batch_input": items})
	results := data["batch_results"].([]interface{})
	require.Len(t, results, 3)
	var dec []interface{}
	for i, want := range []string{"r1", "r2", ""} {
		res := results[i].(map[string]interface{})
		require.Equal(t, want, res["reference"], "reference comes back on each item")
		require.Equal(t, float64(1), res["key_version"])
		require.NotContains(t, res, "error")
		dec = append(dec, map[string]interface{}{"ciphertext": res["ciphertext"], "reference": want})
	}
	data = e.mustWrite(t, "decrypt/k", map[string]interface{}{"batch_input": dec})
	decrypted := data["batch_results"].([]interface{})
	require.Len(t, decrypted, 3)
	for i, want := range []string{"one", "two", "three"} {
		res := decrypted[i].(map[string]interface{})
		require.Equal(t, want, unb64(t, res["plaintext"].(string)), "order is kept")
		require.Equal(t, dec[i].(map[string]interface{})["reference"], res["reference"])
	}
}

func TestEncryptBatchPartialFailure(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	items := []interface{}{
		map[string]interface{}{"plaintext": b64("ok"), "reference": "good"},
		map[string]interface{}{"plaintext": "%%not-base64", "reference": "bad"},
	}
	r := e.write(t, "encrypt/k", map[string]interface{}{"batch_input": items})
	requireStatus(t, r, 400, "")
	results := r.data["batch_results"].([]interface{})
	require.Len(t, results, 2)
	require.Equal(t, "good", results[0].(map[string]interface{})["reference"])
	require.NotEmpty(t, results[0].(map[string]interface{})["ciphertext"], "the good item is still encrypted")
	require.NotContains(t, results[1].(map[string]interface{}), "ciphertext", "the bad item has no ciphertext")
	require.Equal(t, "bad", results[1].(map[string]interface{})["reference"])
	require.Contains(t, results[1].(map[string]interface{})["error"], "illegal base64")

	r = e.write(t, "encrypt/k", map[string]interface{}{"batch_input": items, "partial_failure_response_code": 207})
	requireStatus(t, r, 207, "")
	require.Len(t, r.data["batch_results"], 2)

	// Not a final HTTP status: a 400 that says so (built-in transit passes
	// 1 to 99 on, and Vault then answers nothing at all).
	for _, bad := range []interface{}{999, 1, 99, 199, "7", 600} {
		r = e.write(t, "encrypt/k", map[string]interface{}{"batch_input": items, "partial_failure_response_code": bad})
		requireStatus(t, r, 400, "is not a final HTTP status")
		r = e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("ok"), "partial_failure_response_code": bad})
		requireStatus(t, r, 400, "is not a final HTTP status")
	}
	r = e.write(t, "encrypt/k", map[string]interface{}{"batch_input": items, "partial_failure_response_code": true})
	requireStatus(t, r, 400, "partial_failure_response_code: must be a whole number")

	// When every item fails, the override does not apply.
	allBad := []interface{}{map[string]interface{}{"plaintext": "%%"}}
	r = e.write(t, "encrypt/k", map[string]interface{}{"batch_input": allBad, "partial_failure_response_code": 207})
	requireStatus(t, r, 400, "")
	require.Len(t, r.data["batch_results"], 1)
	require.Contains(t, batchItemErrors(t, r), "illegal base64")
	require.NotContains(t, r.data["batch_results"].([]interface{})[0], "ciphertext")
}

// batchItemErrors joins the errors of a batch response's items: a batch
// answers its errors there, not at the top.
func batchItemErrors(t *testing.T, r result) string {
	t.Helper()
	items, ok := r.data["batch_results"].([]interface{})
	require.True(t, ok, "a batch response: %#v", r.data)
	var errs []string
	for _, it := range items {
		if msg, ok := it.(map[string]interface{})["error"].(string); ok && msg != "" {
			errs = append(errs, msg)
		}
	}
	return strings.Join(errs, "; ")
}

func TestDecryptErrors(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	ct := e.encrypt(t, "k", "secret", nil)
	body := strings.TrimPrefix(ct, "vault:v1:")
	raw, err := base64.StdEncoding.DecodeString(body)
	require.NoError(t, err)
	raw[len(raw)-1] ^= 1
	tampered := "vault:v1:" + base64.StdEncoding.EncodeToString(raw)

	e.mustWrite(t, "keys/rot", nil)
	old := e.encrypt(t, "rot", "old", nil)
	e.mustWrite(t, "keys/rot/rotate", nil)
	e.mustWrite(t, "keys/rot/config", map[string]interface{}{"min_decryption_version": 2})

	cases := []struct {
		name string
		key  string
		data map[string]interface{}
		msg  string
	}{
		{"missing ciphertext", "k", map[string]interface{}{}, "missing ciphertext to decrypt"},
		{"no prefix", "k", map[string]interface{}{"ciphertext": body}, "invalid ciphertext: no prefix"},
		{"wrong number of fields", "k", map[string]interface{}{"ciphertext": "vault:v1"}, "invalid ciphertext: wrong number of fields"},
		{"bad version number", "k", map[string]interface{}{"ciphertext": "vault:vx:" + body}, "version number could not be decoded"},
		{"bad base64", "k", map[string]interface{}{"ciphertext": "vault:v1:%%%%"}, "could not decode base64"},
		{"too short", "k", map[string]interface{}{"ciphertext": "vault:v1:" + base64.StdEncoding.EncodeToString([]byte("short"))}, "invalid ciphertext length"},
		{"version too new", "k", map[string]interface{}{"ciphertext": "vault:v7:" + body}, "invalid ciphertext: version is too new"},
		{"failed authentication", "k", map[string]interface{}{"ciphertext": tampered}, "message authentication failed"},
		{"below min_decryption_version", "rot", map[string]interface{}{"ciphertext": old}, "disallowed by policy (too old)"},
		{"missing key", "none", map[string]interface{}{"ciphertext": ct}, "encryption key not found"},
		{"context not base64", "k", map[string]interface{}{"ciphertext": ct, "context": "%%"}, "illegal base64"},
		{"batch item without ciphertext", "k", map[string]interface{}{"batch_input": []interface{}{map[string]interface{}{"context": ""}}}, "missing ciphertext to decrypt"},
		{"batch item empty ciphertext", "k", map[string]interface{}{"batch_input": []interface{}{map[string]interface{}{"ciphertext": ""}}}, "missing ciphertext to decrypt"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := e.write(t, "decrypt/"+tc.key, tc.data)
			if _, batch := tc.data["batch_input"]; batch && r.errorMessage() == "" {
				requireStatus(t, r, 400, "")
				require.Contains(t, batchItemErrors(t, r), tc.msg)
				return
			}
			requireStatus(t, r, 400, tc.msg)
		})
	}
}

func TestDecryptBatchPartialFailure(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	ct := e.encrypt(t, "k", "fine", nil)
	items := []interface{}{
		map[string]interface{}{"ciphertext": ct, "reference": "a"},
		map[string]interface{}{"ciphertext": "garbage", "reference": "b"},
	}
	r := e.write(t, "decrypt/k", map[string]interface{}{"batch_input": items})
	requireStatus(t, r, 400, "")
	results := r.data["batch_results"].([]interface{})
	require.Len(t, results, 2)
	require.Equal(t, "fine", unb64(t, results[0].(map[string]interface{})["plaintext"].(string)))
	require.Equal(t, "invalid ciphertext: no prefix", results[1].(map[string]interface{})["error"])
	require.Equal(t, "", results[1].(map[string]interface{})["plaintext"], "plaintext is always present")

	r = e.write(t, "decrypt/k", map[string]interface{}{"batch_input": items, "partial_failure_response_code": 299})
	requireStatus(t, r, 299, "")
}

func TestDecryptIgnoresNonceOnRandomNonceKeys(t *testing.T) {
	// Built-in transit reads a decrypt nonce only for version 1 convergent
	// keys; clients that send one anyway must keep working.
	e := getTestBackend(t)
	ct := e.encrypt(t, "k", "x", nil)
	require.Equal(t, "x", e.decrypt(t, "k", ct, map[string]interface{}{"nonce": b64("123456789012")}))
}

func TestRSAEncryptionPaddingSchemes(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/rsa", map[string]interface{}{"type": "rsa-2048"})
	for _, ps := range []string{"oaep", "pkcs1v15"} {
		t.Run(ps, func(t *testing.T) {
			opt := map[string]interface{}{"padding_scheme": ps}
			ct := e.encrypt(t, "rsa", "rsa secret", opt)
			require.Equal(t, "rsa secret", e.decrypt(t, "rsa", ct, opt))
		})
	}
	// Decrypting with the other scheme is a bad request, not a server error.
	ct := e.encrypt(t, "rsa", "x", map[string]interface{}{"padding_scheme": "oaep"})
	r := e.write(t, "decrypt/rsa", map[string]interface{}{"ciphertext": ct, "padding_scheme": "pkcs1v15"})
	requireStatus(t, r, 400, "failed to RSA decrypt")
}

// TestLargeBatchesKeepOrder sends batches large enough to be spread over
// goroutines, with bad items in known places, for both residencies.
func TestLargeBatchesKeepOrder(t *testing.T) {
	for _, residency := range []string{"software", "hsm"} {
		t.Run(residency, func(t *testing.T) {
			e := getTestBackend(t)
			e.mustWrite(t, "keys/k", map[string]interface{}{"hsm": residency == "hsm"})
			const n = 300
			var items []interface{}
			for i := 0; i < n; i++ {
				pt := b64(fmt.Sprint("item ", i))
				if i%97 == 13 {
					pt = "%bad%"
				}
				items = append(items, map[string]interface{}{"plaintext": pt, "reference": fmt.Sprint(i)})
			}
			r := e.write(t, "encrypt/k", map[string]interface{}{"batch_input": items, "partial_failure_response_code": 207})
			requireStatus(t, r, 207, "")
			res := r.data["batch_results"].([]interface{})
			require.Len(t, res, n)
			var dec []interface{}
			for i, x := range res {
				m := x.(map[string]interface{})
				require.Equal(t, fmt.Sprint(i), m["reference"])
				if i%97 == 13 {
					require.Contains(t, m["error"], "illegal base64", "item %d", i)
					require.NotContains(t, m, "ciphertext")
					dec = append(dec, map[string]interface{}{"ciphertext": "vault:v1:broken", "reference": fmt.Sprint(i)})
					continue
				}
				require.NotContains(t, m, "error")
				dec = append(dec, map[string]interface{}{"ciphertext": m["ciphertext"], "reference": fmt.Sprint(i)})
			}
			r = e.write(t, "decrypt/k", map[string]interface{}{"batch_input": dec, "partial_failure_response_code": 207})
			requireStatus(t, r, 207, "")
			require.Len(t, r.data["batch_results"], n)
			for i, x := range r.data["batch_results"].([]interface{}) {
				m := x.(map[string]interface{})
				require.Equal(t, fmt.Sprint(i), m["reference"])
				if i%97 == 13 {
					require.NotEmpty(t, m["error"], "item %d", i)
					continue
				}
				require.Equal(t, fmt.Sprint("item ", i), unb64(t, m["plaintext"].(string)))
			}
			e.mustWrite(t, "keys/k/rotate", nil)
			r = e.write(t, "rewrap/k", map[string]interface{}{"batch_input": dec})
			requireStatus(t, r, 200, "")
			require.Len(t, r.data["batch_results"], n)
			for i, x := range r.data["batch_results"].([]interface{}) {
				m := x.(map[string]interface{})
				if i%97 == 13 {
					require.NotEmpty(t, m["error"])
					continue
				}
				require.Equal(t, float64(2), m["key_version"], "item %d", i)
				require.Equal(t, fmt.Sprint("item ", i), e.decrypt(t, "k", m["ciphertext"].(string), nil))
			}
		})
	}
}

// RSA-OAEP encrypts at most the key size less 2 hash lengths and 2 bytes:
// a longer plaintext is the caller's mistake (built-in transit: 500).
func TestRSAPlaintextTooLongIs400(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/rsa", map[string]interface{}{"type": "rsa-2048"})
	long := strings.Repeat("x", 256-2*32-2+1)
	r := e.write(t, "encrypt/rsa", map[string]interface{}{"plaintext": b64(long)})
	requireStatus(t, r, 400, "the plaintext is too long for the rsa-2048 key")
	// The longest that fits still encrypts.
	fits := long[1:]
	require.Equal(t, fits, e.decrypt(t, "rsa", e.encrypt(t, "rsa", fits, nil), nil))
	// In a batch, the item fails as a user error (400), the others succeed.
	r = e.write(t, "encrypt/rsa", map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"plaintext": b64(long)}, map[string]interface{}{"plaintext": b64("short")},
	}})
	requireStatus(t, r, 400, "")
	results := r.data["batch_results"].([]interface{})
	require.Len(t, results, 2)
	require.Contains(t, results[0].(map[string]interface{})["error"], "too long")
	require.NotEmpty(t, results[1].(map[string]interface{})["ciphertext"])
}
