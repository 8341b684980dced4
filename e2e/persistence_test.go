package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestPersistenceAcrossRestartsAndUpgrade uses file storage: after Vault
// restarts, and after the plugin is upgraded to a new version, every earlier
// ciphertext still decrypts and every key is still there.
func TestPersistenceAcrossRestartsAndUpgrade(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{persistent: true})
	v.mountPlugin("transit")
	c := v.client.Logical()

	made := map[string]map[string]string{} // key -> ciphertext -> plaintext
	for _, kt := range []string{"aes256-gcm96", "aes128-gcm96", "chacha20-poly1305", "rsa-2048"} {
		name := "p-" + kt
		_, err := c.Write("transit/keys/"+name, map[string]interface{}{"type": kt})
		require.NoError(t, err)
		made[name] = map[string]string{}
		for i := 0; i < 3; i++ {
			if i > 0 {
				_, err := c.Write("transit/keys/"+name+"/rotate", nil)
				require.NoError(t, err)
			}
			pt := fmt.Sprintf("%s secret %d", kt, i)
			sec, err := c.Write("transit/encrypt/"+name, map[string]interface{}{"plaintext": b64(pt)})
			require.NoError(t, err)
			made[name][sec.Data["ciphertext"].(string)] = pt
		}
	}
	_, err := c.Write("transit/keys/signer", map[string]interface{}{"type": "ed25519"})
	require.NoError(t, err)
	sig, err := c.Write("transit/sign/signer", map[string]interface{}{"input": b64("doc")})
	require.NoError(t, err)

	check := func(stage string) {
		t.Helper()
		for name, cts := range made {
			key, err := c.Read("transit/keys/" + name)
			require.NoError(t, err, stage)
			require.NotNil(t, key, "%s: key %s is gone", stage, name)
			require.Equal(t, "3", fmt.Sprint(key.Data["latest_version"]), stage)
			for ct, pt := range cts {
				sec, err := c.Write("transit/decrypt/"+name, map[string]interface{}{"ciphertext": ct})
				require.NoError(t, err, "%s: %s", stage, name)
				require.Equal(t, pt, unb64(t, sec.Data["plaintext"].(string)), stage)
			}
		}
		sec, err := c.Write("transit/verify/signer", map[string]interface{}{"input": b64("doc"), "signature": sig.Data["signature"]})
		require.NoError(t, err, stage)
		require.Equal(t, true, sec.Data["valid"], stage)
	}
	check("before restart")

	v.restart()
	c = v.client.Logical()
	check("after restart")

	// Upgrade: register v0.1.1 beside v0.1.0, move the mount to it, reload.
	next, err := buildPlugin("v0.1.1")
	require.NoError(t, err)
	sum := v.installPlugin(next, pluginName+"-v0.1.1")
	v.mustCLI("plugin", "register", "-sha256="+sum, "-version=v0.1.1", "-command="+pluginName+"-v0.1.1", "secret", pluginName)
	v.mustCLI("secrets", "tune", "-plugin-version=v0.1.1", "transit")
	v.mustCLI("plugin", "reload", "-type=secret", "-plugin="+pluginName)
	require.Eventually(t, func() bool {
		out, err := v.cli("secrets", "list", "-detailed")
		return err == nil && strings.Contains(out, "v0.1.1")
	}, 30*time.Second, 500*time.Millisecond)
	mounts, err := v.client.Sys().ListMounts()
	require.NoError(t, err)
	require.Equal(t, "v0.1.1", mounts["transit/"].RunningVersion)
	check("after upgrade")

	v.restart()
	c = v.client.Logical()
	check("after upgrade and restart")
}
