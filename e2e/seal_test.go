package e2e

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// TestSealedStorageAndHSMOutage is the product's promise end to end: Vault's
// raw storage holds no transit key, and the keys are usable only where the
// HSM is. Its Vault has a SoftHSM2 token of its own, so that taking the
// token away touches no other test.
func TestSealedStorageAndHSMOutage(t *testing.T) {
	t.Parallel()
	conf, err := softhsm.Configure(t.TempDir())
	require.NoError(t, err)
	require.NoError(t, softhsm.InitToken(conf, "outage", hsmPIN))
	v := startVault(t, serverOptions{persistent: true, rawStorage: true, env: []string{"SOFTHSM2_CONF=" + conf}})
	v.registerPlugin(pluginName)
	v.mustCLI("secrets", "enable", "-path=transit", "-plugin-version="+pluginVersion, pluginName)
	v.mustCLI("write", "transit/config/seal", "library="+softhsmLib, "token_label=outage",
		"pin="+hsmPIN, "key_label=outage-kek", "generate_key=true")
	c := v.client.Logical()

	// An exportable key with three versions, and its bytes.
	_, err = c.Write("transit/keys/exp", map[string]interface{}{"exportable": true, "allow_plaintext_backup": true})
	require.NoError(t, err)
	for i := 0; i < 2; i++ {
		_, err = c.Write("transit/keys/exp/rotate", nil)
		require.NoError(t, err)
	}
	sec, err := c.Write("transit/encrypt/exp", map[string]interface{}{"plaintext": b64("the data")})
	require.NoError(t, err)
	ct := sec.Data["ciphertext"].(string)
	sec, err = c.Read("transit/export/encryption-key/exp")
	require.NoError(t, err)
	exported := sec.Data["keys"].(map[string]interface{})
	require.Len(t, exported, 3)

	mounts, err := v.client.Sys().ListMounts()
	require.NoError(t, err)
	root := "sys/raw/logical/" + mounts["transit/"].UUID + "/"
	entries := 0
	rawWalk(t, c, root, func(path string, value []byte) {
		entries++
		for ver, k := range exported {
			keyBytes, err := base64.StdEncoding.DecodeString(k.(string))
			require.NoError(t, err)
			require.Falsef(t, bytes.Contains(value, keyBytes), "version %s's bytes at %s", ver, path)
			require.Falsef(t, bytes.Contains(value, []byte(k.(string))), "version %s's base64 at %s", ver, path)
		}
	})
	require.GreaterOrEqual(t, entries, 3, "the policy, its archive and the seal configuration were read")

	// Restart Vault with the token gone: the mount cannot unseal.
	dir, err := softhsm.TokenDir(conf, "outage")
	require.NoError(t, err)
	aside := filepath.Join(t.TempDir(), "aside")
	v.stop()
	require.NoError(t, os.Rename(dir, aside))
	v.start()
	c = v.client.Logical()
	for _, call := range []func() error{
		func() error {
			_, err := c.Write("transit/decrypt/exp", map[string]interface{}{"ciphertext": ct})
			return err
		},
		func() error {
			_, err := c.Write("transit/encrypt/exp", map[string]interface{}{"plaintext": b64("x")})
			return err
		},
		func() error { _, err := c.Read("transit/keys/exp"); return err },
		func() error { _, err := c.Read("transit/export/encryption-key/exp"); return err },
	} {
		err := call()
		var re *api.ResponseError
		require.ErrorAs(t, err, &re)
		require.Equal(t, 503, re.StatusCode, "%v", err)
	}
	st, err := c.Read("transit/seal/status")
	require.NoError(t, err)
	require.Equal(t, true, st.Data["sealed"])
	require.Contains(t, fmt.Sprint(st.Data["last_error"]), "no token labelled")

	// Bring it back: everything decrypts again, with no operator action.
	require.NoError(t, os.Rename(aside, dir))
	require.Eventually(t, func() bool {
		sec, err := c.Write("transit/decrypt/exp", map[string]interface{}{"ciphertext": ct})
		return err == nil && unb64(t, sec.Data["plaintext"].(string)) == "the data"
	}, 90*time.Second, 500*time.Millisecond, "the mount unseals by itself; vault log:\n%s", v.log())
}

// rawWalk reads every raw storage entry below prefix.
func rawWalk(t *testing.T, c *api.Logical, prefix string, f func(path string, value []byte)) {
	t.Helper()
	list, err := c.List(prefix)
	require.NoError(t, err)
	require.NotNil(t, list, "nothing stored under %s", prefix)
	for _, k := range list.Data["keys"].([]interface{}) {
		key := k.(string)
		if strings.HasSuffix(key, "/") {
			rawWalk(t, c, prefix+key, f)
			continue
		}
		sec, err := c.ReadWithData(prefix+key, map[string][]string{"encoding": {"base64"}})
		require.NoError(t, err)
		value, err := base64.StdEncoding.DecodeString(sec.Data["value"].(string))
		require.NoError(t, err)
		f(prefix+key, value)
	}
}

// TestLibraryAllowlistFromRegistration: the operator's -env at registration
// decides which PKCS#11 libraries the API may name.
func TestLibraryAllowlistFromRegistration(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{})
	v.registerPlugin(pluginName, "HSM_TRANSIT_PKCS11_LIBRARIES=/opt/vendor/libcs_pkcs11.so")
	v.mustCLI("secrets", "enable", "-path=transit", "-plugin-version="+pluginVersion, pluginName)
	out, err := v.cli("write", "transit/config/seal", "library="+softhsmLib, "token_label="+hsmToken,
		"pin="+hsmPIN, "key_label="+hsmKEK)
	require.Error(t, err)
	require.Contains(t, out, "Code: 400")
	require.Contains(t, out, "is not allowed")
	require.Contains(t, out, "/opt/vendor/libcs_pkcs11.so")

	out, err = v.cli("write", "transit/encrypt/k", "plaintext="+b64("x"))
	require.Error(t, err)
	require.Contains(t, out, "config/seal")
}
