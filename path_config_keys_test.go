package hsmtransit

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestEncryptUpsertDisabled(t *testing.T) {
	e := getTestBackend(t)
	require.Equal(t, false, e.read(t, "config/keys").data["disable_upsert"])
	e.mustWrite(t, "config/keys", map[string]interface{}{"disable_upsert": true})
	require.Equal(t, true, e.read(t, "config/keys").data["disable_upsert"])

	requireStatus(t, e.write(t, "encrypt/new", map[string]interface{}{"plaintext": b64("a")}), 400, "encryption key not found")
	requireStatus(t, e.read(t, "keys/new"), 404, "")

	// Existing keys still encrypt, and keys/:name still creates.
	e.mustWrite(t, "keys/made", nil)
	e.encrypt(t, "made", "a", nil)

	e.mustWrite(t, "config/keys", map[string]interface{}{"disable_upsert": false})
	requireStatus(t, e.write(t, "encrypt/new", map[string]interface{}{"plaintext": b64("a")}), 200, "")
}
