package e2e

import (
	"strings"
	"testing"

	"github.com/hashicorp/vault/api"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
)

// TestHSMResidentKeyLifecycle drives an HSM-resident key through Vault:
// create, encrypt, rotate, rewrap, datakey, delete; after the delete, its
// ciphertexts fail for good and its objects are gone from the token.
func TestHSMResidentKeyLifecycle(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{})
	v.mountPlugin("transit")
	c := v.client.Logical()

	key := v.cliJSON("write", "transit/keys/payments", "hsm=true")["data"].(map[string]interface{})
	require.Equal(t, true, key["hsm"])
	labels := key["hsm_labels"].(map[string]interface{})
	require.Len(t, labels, 1)

	sec, err := c.Write("transit/encrypt/payments", map[string]interface{}{"plaintext": b64("PAN 4111 1111 1111 1111")})
	require.NoError(t, err)
	ct1 := sec.Data["ciphertext"].(string)
	require.True(t, strings.HasPrefix(ct1, "vault:v1:"))

	_, err = c.Write("transit/keys/payments/rotate", nil)
	require.NoError(t, err)
	sec, err = c.Write("transit/rewrap/payments", map[string]interface{}{"ciphertext": ct1})
	require.NoError(t, err)
	ct2 := sec.Data["ciphertext"].(string)
	require.True(t, strings.HasPrefix(ct2, "vault:v2:"))
	sec, err = c.Write("transit/decrypt/payments", map[string]interface{}{"ciphertext": ct2})
	require.NoError(t, err)
	require.Equal(t, "PAN 4111 1111 1111 1111", unb64(t, sec.Data["plaintext"].(string)))

	dk, err := c.Write("transit/datakey/plaintext/payments", nil)
	require.NoError(t, err)
	sec, err = c.Write("transit/decrypt/payments", map[string]interface{}{"ciphertext": dk.Data["ciphertext"]})
	require.NoError(t, err)
	require.Equal(t, dk.Data["plaintext"], sec.Data["plaintext"])

	_, err = c.Read("transit/export/encryption-key/payments")
	var re *api.ResponseError
	require.ErrorAs(t, err, &re)
	require.Equal(t, 400, re.StatusCode)

	tok, err := hsm.Open(hsm.Config{Library: softhsmLib, TokenLabel: hsmToken, PIN: hsmPIN})
	require.NoError(t, err)
	defer tok.Close()
	label := labels["1"].(string)
	prefix := label[:strings.LastIndex(label, "/")+1]
	require.True(t, strings.HasSuffix(prefix, "/payments/"), label)
	objects, err := tok.KeyLabels(prefix)
	require.NoError(t, err)
	require.Len(t, objects, 2, "one object per version in the token")

	_, err = c.Write("transit/keys/payments/config", map[string]interface{}{"deletion_allowed": true})
	require.NoError(t, err)
	_, err = c.Delete("transit/keys/payments")
	require.NoError(t, err)
	objects, err = tok.KeyLabels(prefix)
	require.NoError(t, err)
	require.Empty(t, objects, "delete destroys the key in the HSM")

	// The name can be used again, but nothing brings the old key back.
	_, err = c.Write("transit/keys/payments", map[string]interface{}{"hsm": true})
	require.NoError(t, err)
	for _, ct := range []string{ct1, ct2} {
		_, err = c.Write("transit/decrypt/payments", map[string]interface{}{"ciphertext": ct})
		require.ErrorAs(t, err, &re)
		require.Equal(t, 400, re.StatusCode)
	}
}
