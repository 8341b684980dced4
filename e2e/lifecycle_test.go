package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// statusOf is the HTTP status of a failed API call, 0 for success or
// another error.
func statusOf(err error) int {
	var re *api.ResponseError
	if errors.As(err, &re) {
		return re.StatusCode
	}
	return 0
}

func encryptionsOf(t *testing.T, c *api.Logical, key, version string) int64 {
	t.Helper()
	sec, err := c.Read("transit/keys/" + key)
	require.NoError(t, err)
	n, err := sec.Data["encryptions"].(map[string]interface{})[version].(json.Number).Int64()
	require.NoError(t, err)
	return n
}

// TestLifecycleThroughVault: suspension, the usage cap with automatic
// rotation, counts that survive kill -9, scheduled deletion and cancel.
func TestLifecycleThroughVault(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{persistent: true})
	v.mountPlugin("transit")
	c := v.client.Logical()

	// Suspension.
	_, err := c.Write("transit/keys/app", nil)
	require.NoError(t, err)
	sec, err := c.Write("transit/encrypt/app", map[string]interface{}{"plaintext": b64("x")})
	require.NoError(t, err)
	ct := sec.Data["ciphertext"].(string)
	_, err = c.Write("transit/keys/app/config", map[string]interface{}{"disabled": true})
	require.NoError(t, err)
	for _, p := range []string{"transit/encrypt/app", "transit/decrypt/app", "transit/rewrap/app", "transit/datakey/plaintext/app", "transit/hmac/app"} {
		_, err := c.Write(p, map[string]interface{}{"plaintext": b64("x"), "ciphertext": ct, "input": b64("x")})
		require.Equal(t, 400, statusOf(err), "%s: %v", p, err)
	}
	_, err = c.Read("transit/keys/app")
	require.NoError(t, err, "reading a disabled key works")
	_, err = c.Write("transit/keys/app/config", map[string]interface{}{"disabled": false})
	require.NoError(t, err)

	// The cap: every ciphertext still decrypts after the automatic rotations.
	_, err = c.Write("transit/keys/capped", nil)
	require.NoError(t, err)
	_, err = c.Write("transit/keys/capped/config", map[string]interface{}{"max_encryptions": 4})
	require.NoError(t, err)
	var cts []string
	for i := 0; i < 10; i++ {
		sec, err := c.Write("transit/encrypt/capped", map[string]interface{}{"plaintext": b64(fmt.Sprint(i))})
		require.NoError(t, err, "no request fails because of the cap")
		cts = append(cts, sec.Data["ciphertext"].(string))
	}
	key, err := c.Read("transit/keys/capped")
	require.NoError(t, err)
	require.Equal(t, json.Number("3"), key.Data["latest_version"])
	for i, ct := range cts {
		sec, err := c.Write("transit/decrypt/capped", map[string]interface{}{"ciphertext": ct})
		require.NoError(t, err)
		require.Equal(t, fmt.Sprint(i), unb64(t, sec.Data["plaintext"].(string)))
	}

	// Counts survive kill -9 without a write per request, never lower.
	const n = 137
	for i := 0; i < n; i++ {
		_, err := c.Write("transit/encrypt/app", map[string]interface{}{"plaintext": b64("y")})
		require.NoError(t, err)
	}
	require.Equal(t, int64(n+1), encryptionsOf(t, c, "app", "1"))
	v.kill()
	v.start()
	c = v.client.Logical()
	require.Eventually(t, func() bool {
		_, err := c.Read("transit/keys/app")
		return err == nil
	}, 30*time.Second, 200*time.Millisecond)
	after := encryptionsOf(t, c, "app", "1")
	require.GreaterOrEqual(t, after, int64(n+1), "never lower than the true count after kill -9")
	t.Logf("true count %d, count after kill -9 and restart %d", n+1, after)

	// Scheduled deletion and its cancellation.
	sec, err = c.Write("transit/keys/app/schedule-deletion", map[string]interface{}{"pending_days": 7})
	require.NoError(t, err)
	require.NotEmpty(t, sec.Data["deletion_time"])
	_, err = c.Write("transit/decrypt/app", map[string]interface{}{"ciphertext": ct})
	require.Equal(t, 400, statusOf(err))
	_, err = c.Write("transit/keys/app/cancel-deletion", nil)
	require.NoError(t, err)
	sec, err = c.Write("transit/decrypt/app", map[string]interface{}{"ciphertext": ct})
	require.NoError(t, err)
	require.Equal(t, "x", unb64(t, sec.Data["plaintext"].(string)))
}

// TestRecoveryAfterLosingTheHSM deletes the whole SoftHSM token directory:
// exactly M shares and a new token bring every key back; M-1 or a wrong
// share change nothing. Then the emergency seal.
func TestRecoveryAfterLosingTheHSM(t *testing.T) {
	t.Parallel()
	conf, err := softhsm.Configure(t.TempDir())
	require.NoError(t, err)
	require.NoError(t, softhsm.InitToken(conf, "first", hsmPIN))
	v := startVault(t, serverOptions{persistent: true, env: []string{"SOFTHSM2_CONF=" + conf}})
	v.registerPlugin(pluginName)
	v.mustCLI("secrets", "enable", "-path=transit", "-plugin-version="+pluginVersion, pluginName)
	v.mustCLI("write", "transit/config/seal", "library="+softhsmLib, "token_label=first",
		"pin="+hsmPIN, "key_label=kek", "generate_key=true")
	c := v.client.Logical()

	sec, err := c.Write("transit/encrypt/orders", map[string]interface{}{"plaintext": b64("order 1")})
	require.NoError(t, err)
	ct := sec.Data["ciphertext"].(string)
	sec, err = c.Write("transit/seal/recovery/init", map[string]interface{}{"shares": 5, "threshold": 3})
	require.NoError(t, err)
	var shares []string
	for _, s := range sec.Data["shares"].([]interface{}) {
		shares = append(shares, s.(string))
	}
	require.Len(t, shares, 5)
	_, err = c.Write("transit/seal/rotate", nil)
	require.NoError(t, err)

	// The HSM is gone: the whole token directory, and a new token.
	v.stop()
	tokens := filepath.Join(filepath.Dir(conf), "tokens")
	require.NoError(t, os.RemoveAll(tokens))
	require.NoError(t, os.MkdirAll(tokens, 0o700))
	require.NoError(t, softhsm.InitToken(conf, "second", hsmPIN))
	v.start()
	c = v.client.Logical()
	_, err = c.Write("transit/decrypt/orders", map[string]interface{}{"ciphertext": ct})
	require.Equal(t, 503, statusOf(err), "%v", err)
	before, err := c.Read("transit/config/seal")
	require.NoError(t, err)

	restore := func(given []string) error {
		_, err := c.Write("transit/seal/recovery/restore", map[string]interface{}{
			"shares": given, "library": softhsmLib, "token_label": "second", "pin": hsmPIN,
			"key_label": "kek-2", "generate_key": true,
		})
		return err
	}
	require.Equal(t, 400, statusOf(restore(shares[:2])), "M-1 shares")
	bad := []byte(shares[1])
	bad[len(bad)/2] ^= 1
	require.Equal(t, 400, statusOf(restore([]string{shares[0], string(bad), shares[2]})), "a wrong share")
	after, err := c.Read("transit/config/seal")
	require.NoError(t, err)
	require.Equal(t, before.Data, after.Data, "failed attempts change nothing")

	require.NoError(t, restore([]string{shares[2], shares[4], shares[0]}))
	sec, err = c.Write("transit/decrypt/orders", map[string]interface{}{"ciphertext": ct})
	require.NoError(t, err)
	require.Equal(t, "order 1", unb64(t, sec.Data["plaintext"].(string)))

	// Emergency seal: nothing decrypts until unseal, across a restart.
	_, err = c.Write("transit/seal/seal", nil)
	require.NoError(t, err)
	_, err = c.Write("transit/decrypt/orders", map[string]interface{}{"ciphertext": ct})
	require.Equal(t, 503, statusOf(err))
	v.restart()
	c = v.client.Logical()
	_, err = c.Write("transit/decrypt/orders", map[string]interface{}{"ciphertext": ct})
	require.Equal(t, 503, statusOf(err))
	_, err = c.Write("transit/seal/unseal", nil)
	require.NoError(t, err)
	sec, err = c.Write("transit/decrypt/orders", map[string]interface{}{"ciphertext": ct})
	require.NoError(t, err)
	require.Equal(t, "order 1", unb64(t, sec.Data["plaintext"].(string)))
}
