package hsmtransit

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestRewrap(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	ct1 := e.encrypt(t, "k", "payload", nil)
	e.mustWrite(t, "keys/k/rotate", nil)

	data := e.mustWrite(t, "rewrap/k", map[string]interface{}{"ciphertext": ct1})
	ct2 := data["ciphertext"].(string)
	require.True(t, strings.HasPrefix(ct2, "vault:v2:"), ct2)
	require.Equal(t, float64(2), data["key_version"])
	require.Equal(t, "payload", e.decrypt(t, "k", ct2, nil))

	// After raising min_decryption_version, only the rewrapped one decrypts.
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 2})
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct1}), 400, "too old")
	require.Equal(t, "payload", e.decrypt(t, "k", ct2, nil))

	// key_version picks an older allowed version.
	e.mustWrite(t, "keys/k/rotate", nil)
	data = e.mustWrite(t, "rewrap/k", map[string]interface{}{"ciphertext": ct2, "key_version": 2})
	require.True(t, strings.HasPrefix(data["ciphertext"].(string), "vault:v2:"))
}

func TestRewrapDerivedAndAssociatedData(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/d", map[string]interface{}{"derived": true})
	ctx := map[string]interface{}{"context": b64("c")}
	ct := e.encrypt(t, "d", "x", ctx)
	e.mustWrite(t, "keys/d/rotate", nil)
	data := e.mustWrite(t, "rewrap/d", map[string]interface{}{"ciphertext": ct, "context": b64("c")})
	require.Equal(t, "x", e.decrypt(t, "d", data["ciphertext"].(string), ctx))
	requireStatus(t, e.write(t, "rewrap/d", map[string]interface{}{"ciphertext": ct}), 400, "missing 'context'")

	e.mustWrite(t, "keys/ad", nil)
	ad := map[string]interface{}{"associated_data": b64("row-1")}
	ct = e.encrypt(t, "ad", "y", ad)
	e.mustWrite(t, "keys/ad/rotate", nil)
	data = e.mustWrite(t, "rewrap/ad", map[string]interface{}{"ciphertext": ct, "associated_data": b64("row-1")})
	require.Equal(t, "y", e.decrypt(t, "ad", data["ciphertext"].(string), ad), "the new ciphertext keeps the associated data")
}

func TestRewrapErrors(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	ct := e.encrypt(t, "k", "x", nil)
	cases := []struct {
		name string
		key  string
		data map[string]interface{}
		msg  string
	}{
		{"missing ciphertext", "k", map[string]interface{}{}, "missing ciphertext to decrypt"},
		{"missing key", "nope", map[string]interface{}{"ciphertext": ct}, "encryption key not found"},
		{"bad ciphertext", "k", map[string]interface{}{"ciphertext": "vault:v1:%%"}, "could not decode base64"},
		{"nonce on random-nonce key", "k", map[string]interface{}{"ciphertext": ct, "nonce": b64("123456789012")}, "provided nonce not allowed"},
		{"version too new", "k", map[string]interface{}{"ciphertext": ct, "key_version": 5}, "higher than the latest"},
		{"mixed context", "k", map[string]interface{}{"batch_input": []interface{}{
			map[string]interface{}{"ciphertext": ct, "context": b64("c")},
			map[string]interface{}{"ciphertext": ct},
		}}, "context should be set either in all"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			requireStatus(t, e.write(t, "rewrap/"+tc.key, tc.data), 400, tc.msg)
		})
	}
}

func TestRewrapBatch(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	a := e.encrypt(t, "k", "a", nil)
	b := e.encrypt(t, "k", "b", nil)
	e.mustWrite(t, "keys/k/rotate", nil)

	// As in built-in transit, a rewrap batch answers 200 and reports bad
	// items in place.
	r := e.write(t, "rewrap/k", map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"ciphertext": a, "reference": "ra"},
		map[string]interface{}{"ciphertext": "junk", "reference": "rj"},
		map[string]interface{}{"ciphertext": b, "reference": "rb"},
	}})
	requireStatus(t, r, 200, "")
	results := r.data["batch_results"].([]interface{})
	require.Len(t, results, 3)
	for i, want := range []string{"a", "", "b"} {
		res := results[i].(map[string]interface{})
		if want == "" {
			require.Equal(t, "invalid ciphertext: no prefix", res["error"])
			require.Equal(t, "rj", res["reference"])
			continue
		}
		require.Equal(t, float64(2), res["key_version"])
		require.Equal(t, want, e.decrypt(t, "k", res["ciphertext"].(string), nil))
	}
}
