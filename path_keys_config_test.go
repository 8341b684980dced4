package hsmtransit

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestKeysConfigVersions(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	cts := []string{e.encrypt(t, "k", "v1", nil)}
	for i := 0; i < 3; i++ {
		e.mustWrite(t, "keys/k/rotate", nil)
		cts = append(cts, e.encrypt(t, "k", "v", nil))
	}
	data := e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 3, "min_encryption_version": 3})
	require.Equal(t, float64(3), data["min_decryption_version"])
	require.Equal(t, float64(3), data["min_encryption_version"])
	for v, ct := range cts {
		r := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
		if v+1 < 3 {
			requireStatus(t, r, 400, "too old")
		} else {
			requireStatus(t, r, 200, "")
		}
	}
	requireStatus(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": "", "key_version": 2}), 400, "less than the minimum encryption key version")
	requireStatus(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": "", "key_version": 3}), 200, "")

	// Lowering min_decryption_version again restores access (nothing was trimmed).
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 1, "min_encryption_version": 0})
	require.Equal(t, "v1", e.decrypt(t, "k", cts[0], nil))
}

func TestKeysConfigErrorsChangeNothing(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	e.mustWrite(t, "keys/k/rotate", nil)
	before := e.read(t, "keys/k").data
	cases := []struct {
		name string
		data map[string]interface{}
		msg  string
	}{
		{"negative min_decryption_version", map[string]interface{}{"min_decryption_version": -1}, "cannot be negative"},
		{"min_decryption_version past latest", map[string]interface{}{"min_decryption_version": 3}, "latest key version is 2"},
		{"negative min_encryption_version", map[string]interface{}{"min_encryption_version": -1}, "cannot be negative"},
		{"min_encryption_version past latest", map[string]interface{}{"min_encryption_version": 3}, "latest key version is 2"},
		{"encryption below decryption", map[string]interface{}{"min_decryption_version": 2, "min_encryption_version": 1}, "must be greater than or equal to min decryption version"},
		{"auto rotate too short", map[string]interface{}{"auto_rotate_period": "10m", "deletion_allowed": true}, "at least an hour"},
		{"bad duration", map[string]interface{}{"auto_rotate_period": "often"}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			requireStatus(t, e.write(t, "keys/k/config", tc.data), 400, tc.msg)
			require.Equal(t, before, e.read(t, "keys/k").data, "a refused change leaves the key as it was")
		})
	}
	requireStatus(t, e.write(t, "keys/none/config", map[string]interface{}{"deletion_allowed": true}), 400, "no existing key named none could be found")
}

func TestKeysConfigFlags(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	r := e.write(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 0})
	requireStatus(t, r, 200, "")
	require.Contains(t, r.resp.Warnings, "since Vault 0.3, transit key numbering starts at 1; forcing minimum to 1")

	data := e.mustWrite(t, "keys/k/config", map[string]interface{}{
		"exportable": true, "allow_plaintext_backup": true, "deletion_allowed": true, "auto_rotate_period": "36h",
	})
	require.Equal(t, true, data["exportable"])
	require.Equal(t, true, data["allow_plaintext_backup"])
	require.Equal(t, true, data["deletion_allowed"])
	require.Equal(t, float64(36*3600), data["auto_rotate_period"])

	// Export and plaintext backup cannot be taken back; deletion can.
	data = e.mustWrite(t, "keys/k/config", map[string]interface{}{
		"exportable": false, "allow_plaintext_backup": false, "deletion_allowed": false, "auto_rotate_period": 0,
	})
	require.Equal(t, true, data["exportable"])
	require.Equal(t, true, data["allow_plaintext_backup"])
	require.Equal(t, false, data["deletion_allowed"])
	require.Equal(t, float64(0), data["auto_rotate_period"])

	// Settings survive a reload from storage.
	e.b.invalidate(t.Context(), "policy/k")
	require.Equal(t, true, e.read(t, "keys/k").data["exportable"])
}
