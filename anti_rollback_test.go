package hsmtransit

import (
	"context"
	"encoding/binary"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
)

// rollBackAcrossRestart is the attack that the manifest alone cannot see: a
// storage writer takes the manifest with every entry as they are, lets the
// key's minimum decryption version go up, puts all of it back and restarts
// the plugin. It returns what decrypt/k of a v1 ciphertext answers then.
func rollBackAcrossRestart(t *testing.T, e *testEnv) (*testEnv, result) {
	t.Helper()
	ct := e.encrypt(t, "k", "version 1 data", nil)
	e.mustWrite(t, "keys/k/rotate", nil)
	snapshot := map[string][]byte{}
	require.NoError(t, walkStorage(context.Background(), e.storage, "", func(key string, value []byte) {
		if !strings.HasPrefix(key, mountseal.Prefix) {
			snapshot[key] = append([]byte(nil), value...)
		}
	}))
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 2})
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 400, "too old")
	for k, v := range snapshot {
		rawPut(t, e, k, v)
	}
	e = e.restart(t)
	return e, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
}

// Without anti_rollback the rollback works: the documented limit, shown so
// that the test below could fail.
func TestRollbackAcrossRestartWithoutAntiRollback(t *testing.T) {
	e := getTestBackend(t)
	_, r := rollBackAcrossRestart(t, e)
	requireStatus(t, r, 200, "")
}

// With anti_rollback the manifest's anchor in the token refuses it.
func TestAttack7eRollbackAcrossRestartRefusedByAntiRollback(t *testing.T) {
	e := getTestBackend(t)
	out := e.mustWrite(t, "config/seal", map[string]interface{}{"anti_rollback": true})
	require.Equal(t, true, out["anti_rollback"])
	require.Equal(t, true, e.read(t, "seal/status").data["anti_rollback"])
	tok := openTestToken(t)
	_, found, err := tok.ReadData(e.b.seal.AntiRollbackLabel())
	require.NoError(t, err)
	require.True(t, found, "the anchor is in the token")

	// Normal restarts are not refused.
	e.encrypt(t, "other", "x", nil)
	e = e.restart(t)
	e.encrypt(t, "other", "y", nil)

	e, r := rollBackAcrossRestart(t, e)
	requireStatus(t, r, 503, "rolled back")
	require.Contains(t, e.read(t, "seal/status").data["last_error"], "older than the one anchored in the HSM")
}

// Turning it off removes the anchor; the seal then behaves as without it.
func TestAntiRollbackOff(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "config/seal", map[string]interface{}{"anti_rollback": true})
	out := e.mustWrite(t, "config/seal", map[string]interface{}{"anti_rollback": false})
	require.Equal(t, false, out["anti_rollback"])
	_, found, err := openTestToken(t).ReadData(e.b.seal.AntiRollbackLabel())
	require.NoError(t, err)
	require.False(t, found)
	e = e.restart(t)
	e.encrypt(t, "k", "x", nil)
}

// The anchor is written off the request path, at most once a second, and
// a clean stop writes the last one: after it, the token holds exactly the
// anchor of the manifest in storage.
func TestAntiRollbackAnchorCaughtUpAtCleanStop(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "config/seal", map[string]interface{}{"anti_rollback": true})
	for i := 0; i < 20; i++ {
		e.encrypt(t, "k", "x", nil)
		e.mustWrite(t, "keys/k/rotate", nil)
	}
	want, ok := e.b.seal.Snapshot().Sealer().Anchor()
	require.True(t, ok)
	e.b.Cleanup(context.Background())
	value, found, err := openTestToken(t).ReadData(e.b.seal.AntiRollbackLabel())
	require.NoError(t, err)
	require.True(t, found)
	require.Equal(t, want, binary.BigEndian.Uint64(value))
}
