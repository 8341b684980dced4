package hsmtransit

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestTrim(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	var cts []string
	for i := 0; i < 4; i++ {
		cts = append(cts, e.encrypt(t, "k", "x", nil))
		e.mustWrite(t, "keys/k/rotate", nil)
	}
	requireStatus(t, e.write(t, "keys/k/trim", map[string]interface{}{"min_available_version": 2}), 400, "minimum available version cannot be set when minimum encryption version is not set")
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 3, "min_encryption_version": 4})

	cases := []struct {
		name string
		data map[string]interface{}
		msg  string
	}{
		{"missing", map[string]interface{}{}, "missing min_available_version"},
		{"above min decryption", map[string]interface{}{"min_available_version": 4}, "cannot be greater than minimum decryption version"},
		{"above min encryption", map[string]interface{}{"min_available_version": 5}, "cannot be greater than minmum encryption version"},
		{"zero", map[string]interface{}{"min_available_version": 0}, "should be positive"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			requireStatus(t, e.write(t, "keys/k/trim", tc.data), 400, tc.msg)
		})
	}

	data := e.mustWrite(t, "keys/k/trim", map[string]interface{}{"min_available_version": 3})
	require.Equal(t, float64(3), data["min_available_version"])
	keys := data["keys"].(map[string]interface{})
	require.NotContains(t, keys, "1")
	require.NotContains(t, keys, "2")
	require.Contains(t, keys, "3")

	requireStatus(t, e.write(t, "keys/k/trim", map[string]interface{}{"min_available_version": 2}), 400, "cannot be decremented")
	// Trimmed versions are gone for good: lowering min_decryption_version
	// below the available versions is refused.
	requireStatus(t, e.write(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 1}), 400, "min decryption version should not be less then min available version")
	e.b.invalidate(t.Context(), "policy/k")
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": cts[0]}), 400, "")
	require.Equal(t, "x", e.decrypt(t, "k", cts[2], nil))
	requireStatus(t, e.write(t, "keys/none/trim", map[string]interface{}{"min_available_version": 1}), 400, "invalid key name")
}
