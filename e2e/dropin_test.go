package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestDropInReplacementForTransit registers the plugin under the built-in
// name "transit" with a version and pins it: a plain `vault secrets enable
// transit` then mounts the plugin, and the mount's type stays "transit" for
// tools that look at it. Removing the pin and tuning the mount back returns
// it to the built-in engine.
func TestDropInReplacementForTransit(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{})
	v.registerPlugin("transit")
	v.mustCLI("write", "sys/plugins/pins/secret/transit", "version="+pluginVersion)

	v.mustCLI("secrets", "enable", "transit")
	v.configureSeal("transit")
	mounts, err := v.client.Sys().ListMounts()
	require.NoError(t, err)
	m := mounts["transit/"]
	require.Equal(t, "transit", m.Type, "tools that look at the mount type see transit")
	require.Equal(t, pluginVersion, m.RunningVersion, "the plugin serves the mount, not the built-in engine")
	require.NotEmpty(t, m.RunningSha256)

	c := v.client.Logical()
	_, err = c.Write("transit/keys/k", nil)
	require.NoError(t, err)
	sec, err := c.Write("transit/encrypt/k", map[string]interface{}{"plaintext": b64("drop-in")})
	require.NoError(t, err)
	ct := sec.Data["ciphertext"].(string)
	out := v.mustCLI("write", "-field=plaintext", "transit/decrypt/k", "ciphertext="+ct)
	require.Equal(t, "drop-in", unb64(t, strings.TrimSpace(out)))

	// A second mount enabled the same way is the plugin too.
	v.mustCLI("secrets", "enable", "-path=transit2", "transit")
	v.configureSeal("transit2")
	mounts, err = v.client.Sys().ListMounts()
	require.NoError(t, err)
	require.Equal(t, pluginVersion, mounts["transit2/"].RunningVersion)

	// Going back: remove the pin, move each mount to the built-in version
	// and reload it, then deregister the plugin's version so that new
	// mounts get the built-in engine too.
	v.mustCLI("delete", "sys/plugins/pins/secret/transit")
	// The built-in version is the server's own (v1.21.0+builtin.vault on
	// the pinned Vault; make test-matrix runs others).
	st, err := v.client.Sys().SealStatus()
	require.NoError(t, err)
	builtin := "v" + strings.SplitN(st.Version, "+", 2)[0] + "+builtin.vault"
	for _, mount := range []string{"transit/", "transit2/"} {
		v.mustCLI("secrets", "tune", "-plugin-version="+builtin, mount)
		v.mustCLI("write", "sys/plugins/reload/backend", "mounts="+mount)
	}
	require.Eventually(t, func() bool {
		mounts, err := v.client.Sys().ListMounts()
		return err == nil && strings.Contains(mounts["transit/"].RunningVersion, "builtin") &&
			strings.Contains(mounts["transit2/"].RunningVersion, "builtin")
	}, 30*time.Second, 500*time.Millisecond)
	v.mustCLI("plugin", "deregister", "-version="+pluginVersion, "secret", "transit")
	v.mustCLI("secrets", "enable", "-path=builtin-again", "transit")
	mounts, err = v.client.Sys().ListMounts()
	require.NoError(t, err)
	require.Contains(t, mounts["builtin-again/"].RunningVersion, "builtin")
}
