package e2e

import (
	"encoding/base64"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func unb64(t testing.TB, s string) string {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(s)
	require.NoError(t, err)
	return string(b)
}

// TestCLISession is an operator's first session with the vault CLI: register,
// enable, create a key, encrypt, decrypt, rotate, rewrap, datakey, help.
func TestCLISession(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{})
	v.mountPlugin("transit")

	out := v.mustCLI("secrets", "list", "-detailed")
	require.Contains(t, out, pluginName)
	require.Contains(t, out, pluginVersion)

	v.mustCLI("write", "-f", "transit/keys/orders")
	key := v.cliJSON("read", "transit/keys/orders")["data"].(map[string]interface{})
	require.Equal(t, "aes256-gcm96", key["type"])

	enc := v.cliJSON("write", "transit/encrypt/orders", "plaintext="+b64("card 4111"))["data"].(map[string]interface{})
	ct := enc["ciphertext"].(string)
	require.True(t, strings.HasPrefix(ct, "vault:v1:"))

	dec := v.cliJSON("write", "transit/decrypt/orders", "ciphertext="+ct)["data"].(map[string]interface{})
	require.Equal(t, "card 4111", unb64(t, dec["plaintext"].(string)))

	// The CLI's -field output, as scripts use it.
	field := v.mustCLI("write", "-field=plaintext", "transit/decrypt/orders", "ciphertext="+ct)
	require.Equal(t, "card 4111", unb64(t, strings.TrimSpace(field)))

	v.mustCLI("write", "-f", "transit/keys/orders/rotate")
	rewrapped := v.cliJSON("write", "transit/rewrap/orders", "ciphertext="+ct)["data"].(map[string]interface{})
	require.True(t, strings.HasPrefix(rewrapped["ciphertext"].(string), "vault:v2:"))
	dec = v.cliJSON("write", "transit/decrypt/orders", "ciphertext="+rewrapped["ciphertext"].(string))["data"].(map[string]interface{})
	require.Equal(t, "card 4111", unb64(t, dec["plaintext"].(string)))

	v.mustCLI("write", "transit/keys/orders/config", "min_decryption_version=2")
	out, err := v.cli("write", "transit/decrypt/orders", "ciphertext="+ct)
	require.Error(t, err, "v1 is below min_decryption_version")
	require.Contains(t, out, "Code: 400")
	require.Contains(t, out, "disallowed by policy")

	dk := v.cliJSON("write", "-f", "transit/datakey/plaintext/orders")["data"].(map[string]interface{})
	plainKey, err := base64.StdEncoding.DecodeString(dk["plaintext"].(string))
	require.NoError(t, err)
	require.Len(t, plainKey, 32)
	dec = v.cliJSON("write", "transit/decrypt/orders", "ciphertext="+dk["ciphertext"].(string))["data"].(map[string]interface{})
	require.Equal(t, dk["plaintext"], dec["plaintext"])

	wrapped := v.cliJSON("write", "transit/datakey/wrapped/orders", "bits=512")["data"].(map[string]interface{})
	require.NotContains(t, wrapped, "plaintext")

	help := v.mustCLI("path-help", "transit/encrypt/orders")
	require.Contains(t, help, "Encrypt a plaintext value")
	require.Contains(t, help, "batch_input")
	help = v.mustCLI("path-help", "transit/keys/orders")
	require.Contains(t, help, "auto_rotate_period")

	list := v.mustCLI("list", "transit/keys")
	require.Contains(t, list, "orders")

	out, err = v.cli("write", "transit/encrypt/orders", "plaintext=not-base64!")
	require.Error(t, err)
	require.Contains(t, out, "Code: 400")
	out, err = v.cli("read", "transit/keys/missing")
	require.Error(t, err)
	require.Contains(t, out, "No value found")
	out, err = v.cli("delete", "transit/keys/orders")
	require.Error(t, err)
	require.Contains(t, out, "deletion is not allowed")
	v.mustCLI("write", "transit/keys/orders/config", "deletion_allowed=true")
	v.mustCLI("delete", "transit/keys/orders")
}
