package hsmtransit

import (
	"encoding/base64"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestDatakey(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	e.mustWrite(t, "keys/rsa", map[string]interface{}{"type": "rsa-2048"})
	cases := []struct {
		name    string
		key     string
		data    map[string]interface{}
		bits    int
		decrypt map[string]interface{}
	}{
		{"default 256", "k", nil, 256, nil},
		{"128", "k", map[string]interface{}{"bits": 128}, 128, nil},
		{"512", "k", map[string]interface{}{"bits": 512}, 512, nil},
		{"rsa wrapped", "rsa", map[string]interface{}{"padding_scheme": "pkcs1v15"}, 256, map[string]interface{}{"padding_scheme": "pkcs1v15"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			data := e.mustWrite(t, "datakey/plaintext/"+tc.key, tc.data)
			require.Equal(t, float64(1), data["key_version"])
			pt, err := base64.StdEncoding.DecodeString(data["plaintext"].(string))
			require.NoError(t, err)
			require.Len(t, pt, tc.bits/8)
			require.Equal(t, string(pt), e.decrypt(t, tc.key, data["ciphertext"].(string), tc.decrypt), "the wrapped key decrypts to the plaintext key")

			wrapped := e.mustWrite(t, "datakey/wrapped/"+tc.key, tc.data)
			require.NotContains(t, wrapped, "plaintext", "wrapped never returns the plaintext key")
			require.Len(t, e.decrypt(t, tc.key, wrapped["ciphertext"].(string), tc.decrypt), tc.bits/8)
			require.NotEqual(t, data["ciphertext"], wrapped["ciphertext"])
		})
	}
}

func TestDatakeyVersionsAndContext(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/d", map[string]interface{}{"derived": true})
	e.mustWrite(t, "keys/d/rotate", nil)
	data := e.mustWrite(t, "datakey/wrapped/d", map[string]interface{}{"context": b64("c"), "key_version": 1})
	require.Equal(t, float64(1), data["key_version"])
	require.Len(t, e.decrypt(t, "d", data["ciphertext"].(string), map[string]interface{}{"context": b64("c")}), 32)
}

func TestDatakeyErrors(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	e.mustWrite(t, "keys/d", map[string]interface{}{"derived": true})
	e.mustWrite(t, "keys/sig", map[string]interface{}{"type": "ed25519"})
	cases := []struct {
		name string
		path string
		data map[string]interface{}
		msg  string
	}{
		{"bits 64", "datakey/plaintext/k", map[string]interface{}{"bits": 64}, "invalid bit length"},
		{"bits 257", "datakey/plaintext/k", map[string]interface{}{"bits": 257}, "invalid bit length"},
		{"bad kind", "datakey/both/k", nil, "Invalid path, must be 'plaintext' or 'wrapped'"},
		{"missing key", "datakey/plaintext/none", nil, "encryption key not found"},
		{"derived without context", "datakey/plaintext/d", nil, "missing 'context'"},
		{"context not base64", "datakey/plaintext/d", map[string]interface{}{"context": "%%"}, "failed to base64-decode context"},
		{"nonce not base64", "datakey/plaintext/k", map[string]interface{}{"nonce": "%%"}, "failed to base64-decode nonce"},
		{"nonce on random-nonce key", "datakey/plaintext/k", map[string]interface{}{"nonce": b64("123456789012")}, "provided nonce not allowed"},
		{"signing key", "datakey/plaintext/sig", nil, "message encryption not supported"},
		{"padding on aes", "datakey/plaintext/k", map[string]interface{}{"padding_scheme": "oaep"}, "padding_scheme argument invalid"},
		{"version too new", "datakey/plaintext/k", map[string]interface{}{"key_version": 3}, "higher than the latest"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			requireStatus(t, e.write(t, tc.path, tc.data), 400, tc.msg)
		})
	}
}
