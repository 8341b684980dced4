package hsmtransit

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// snapshotAll copies every raw entry (seal/ included).
func snapshotAll(t *testing.T, s logical.Storage) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	require.NoError(t, walkStorage(context.Background(), s, "", func(k string, v []byte) {
		out[k] = bytes.Clone(v)
	}))
	return out
}

// restoreAll makes raw storage exactly snap (deleting whatever else is there).
func restoreAll(t *testing.T, e *testEnv, snap map[string][]byte) {
	t.Helper()
	for k := range snapshotAll(t, e.storage) {
		if _, ok := snap[k]; !ok {
			rawDelete(t, e, k)
		}
	}
	for k, v := range snap {
		rawPut(t, e, k, v)
	}
}

// RV2-A: a storage writer who kept a backup from before the mount was
// upgraded to the manifest puts the whole backup back. The keyring in that
// seal/config has no manifest flag, so unsealing goes through
// upgradeLocked, which never calls checkAnchor: anti_rollback, on and
// anchored in the token, does not see the rollback.
func TestAttackReview2A_PreUpgradeBackupBypassesAntiRollback(t *testing.T) {
	s, mountUUID, ct := legacyMount(t)
	preUpgrade := snapshotAll(t, s)

	e := startBackend(t, s, mountUUID)
	require.Equal(t, "victim data", e.decrypt(t, "k", ct, nil))
	out := e.mustWrite(t, "config/seal", map[string]interface{}{"anti_rollback": true})
	require.Equal(t, true, out["anti_rollback"])
	// The officer retires version 1 of k: the v1 ciphertext must no longer decrypt.
	e.mustWrite(t, "keys/k/rotate", nil)
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 2})
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 400, "too old")
	e = e.restart(t)
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 400, "too old")

	// A plain rollback to a post-upgrade state is refused (control).
	value, found, err := openTestToken(t).ReadData(e.b.seal.AntiRollbackLabel())
	require.NoError(t, err)
	require.True(t, found)
	t.Logf("anchor in the token: %d", binary.BigEndian.Uint64(value))

	// Attack: put the pre-upgrade backup back, restart.
	restoreAll(t, e, preUpgrade)
	e = e.restart(t)
	r := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
	t.Logf("decrypt/k of the retired v1 ciphertext after the rollback: %d %v %s", r.status, r.data, r.errorMessage())
	st := e.read(t, "seal/status").data
	t.Logf("seal/status: sealed=%v anti_rollback=%v last_error=%v", st["sealed"], st["anti_rollback"], st["last_error"])
	if r.status == 200 {
		t.Errorf("BROKEN: anti_rollback was on and anchored, yet storage rolled back to the pre-upgrade backup was accepted; min_decryption_version is undone and %q decrypts", unb64(t, r.data["plaintext"].(string)))
	}
}

// RV2-B: the officer moves the mount to another token (config/seal
// token_label, key_label). anti_rollback keeps the anchor in the new token
// from then on; the old token keeps a stale anchor and the old KEK. The
// storage writer takes any later snapshot of the entries, and puts it back
// with the seal/config from before the move: unsealing opens the same root
// keyring with the old KEK and checks the anchor in the old token.
func TestAttackReview2B_TokenMoveLeavesStaleAnchorBehind(t *testing.T) {
	oldTok, newTok := uniq(t, "arold"), uniq(t, "arnew")
	require.NoError(t, softhsm.InitToken(softhsmConf, oldTok, testPIN))
	require.NoError(t, softhsm.InitToken(softhsmConf, newTok, testPIN))
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	e.mustWrite(t, "config/seal", withSeal(map[string]interface{}{"token_label": oldTok, "key_label": "kek-old", "generate_key": true, "anti_rollback": true}))
	ct := e.encrypt(t, "k", "version 1 data", nil)
	oldCfg := rawGet(t, e, mountseal.ConfigPath)

	// The officer moves to the new token.
	e.mustWrite(t, "config/seal", map[string]interface{}{"token_label": newTok, "key_label": "kek-new", "generate_key": true})
	require.Equal(t, true, e.read(t, "seal/status").data["anti_rollback"])

	// Some later state S1 the attacker snapshots: k rotated, v1 still allowed.
	e.mustWrite(t, "keys/k/rotate", nil)
	s1 := map[string][]byte{}
	for k, v := range snapshotAll(t, e.storage) {
		if !strings.HasPrefix(k, mountseal.Prefix) {
			s1[k] = v
		}
	}
	// Then v1 is retired, and many more changes happen.
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 2})
	for i := 0; i < 5; i++ {
		e.encrypt(t, "other", "x", nil)
	}
	e = e.restart(t)
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 400, "too old")

	// Control: S1 put back under the current seal/config is refused.
	for k, v := range s1 {
		rawPut(t, e, k, v)
	}
	e = e.restart(t)
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 503, "rolled back")

	// Attack: same S1, plus the seal/config from before the move.
	rawPut(t, e, mountseal.ConfigPath, oldCfg)
	e = e.restart(t)
	r := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
	t.Logf("decrypt/k of the retired v1 ciphertext: %d %s", r.status, r.errorMessage())
	if r.status == 200 {
		t.Errorf("BROKEN: with anti_rollback on, S1 was accepted by pointing seal/config back at the old token (stale anchor); decrypts %q", unb64(t, r.data["plaintext"].(string)))
	}
}

// failingRootStorage fails Puts of manifest/root while fail is set.
type failingRootStorage struct {
	logical.InmemStorage
	fail atomic.Bool
}

func (s *failingRootStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	if e.Key == "manifest/root" && s.fail.Load() {
		return errors.New("storage unavailable (simulated)")
	}
	return s.InmemStorage.Put(ctx, e)
}

// RV2-C: setAntiRollbackLocked writes the anchor of the manifest in memory,
// which is ahead of the stored root whenever a bucket was published and its
// root write failed (or is still in flight). The token then leads storage,
// and the next unseal of the legitimate storage is refused as "rolled
// back": the mount is down until someone with the PIN deletes the object
// (anti_rollback cannot be turned off while sealed).
func TestAttackReview2C_AntiRollbackWriteLeadsStorage(t *testing.T) {
	s := &failingRootStorage{}
	e := startBackend(t, s, newMountUUID(t))
	e.mustWrite(t, "config/seal", testSealConfig())
	e.mustWrite(t, "config/seal", map[string]interface{}{"anti_rollback": true})
	e.encrypt(t, "k", "x", nil)

	// One write's root write fails (a transient storage error): the
	// request fails, the bucket is published in memory.
	s.fail.Store(true)
	r := e.write(t, "keys/k2", nil)
	t.Logf("keys/k2 during the storage error: %d %s", r.status, r.errorMessage())
	s.fail.Store(false)
	// The anchor writer catches up with the stored root (at most once a
	// second), as it does in any mount that is not written to every second.
	time.Sleep(1500 * time.Millisecond)
	mem, _ := e.b.seal.Snapshot().Sealer().Anchor()

	// The officer re-applies the seal config (any config/seal write does
	// it while anti_rollback is on, e.g. a PIN source change).
	e.mustWrite(t, "config/seal", map[string]interface{}{"anti_rollback": true})
	value, _, err := openTestToken(t).ReadData(e.b.seal.AntiRollbackLabel())
	require.NoError(t, err)
	t.Logf("anchor in memory %d, in the token %d", mem, binary.BigEndian.Uint64(value))

	// Clean reload: nothing was rolled back by anyone.
	e = e.restart(t)
	r = e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("y")})
	t.Logf("encrypt/k after a clean reload: %d %s", r.status, r.errorMessage())
	if r.status != 200 {
		t.Errorf("BROKEN (availability): untouched storage is refused after a clean reload: %s", r.errorMessage())
	}
}

// RV2-A2: as A, but the storage writer needs only the seal/config from
// before the upgrade: put back with ANY later snapshot of the entries and
// manifest (no root key rotation since), upgradeManifestLocked finds a
// manifest that opens and keeps it, and checkAnchor never runs.
func TestAttackReview2A2_PreUpgradeConfigWithLaterSnapshot(t *testing.T) {
	s, mountUUID, ct := legacyMount(t)
	legacyCfg := bytes.Clone(func() []byte { e, _ := s.Get(context.Background(), mountseal.ConfigPath); return e.Value }())

	e := startBackend(t, s, mountUUID)
	require.Equal(t, "victim data", e.decrypt(t, "k", ct, nil))
	e.mustWrite(t, "config/seal", map[string]interface{}{"anti_rollback": true})
	e.mustWrite(t, "keys/k/rotate", nil)
	s1 := map[string][]byte{}
	for k, v := range snapshotAll(t, e.storage) {
		if !strings.HasPrefix(k, mountseal.Prefix) {
			s1[k] = v
		}
	}
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 2})
	for i := 0; i < 5; i++ {
		e.encrypt(t, "other", "x", nil)
	}
	e = e.restart(t)
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 400, "too old")

	// Control: S1 alone is refused by the anchor.
	for k, v := range s1 {
		rawPut(t, e, k, v)
	}
	e = e.restart(t)
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 503, "rolled back")

	// Attack: S1 plus the pre-upgrade seal/config.
	rawPut(t, e, mountseal.ConfigPath, legacyCfg)
	e = e.restart(t)
	r := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
	t.Logf("decrypt/k of the retired v1 ciphertext: %d %s", r.status, r.errorMessage())
	if r.status == 200 {
		t.Errorf("BROKEN: S1 accepted with anti_rollback on, through the upgrade path; decrypts %q", unb64(t, r.data["plaintext"].(string)))
	}
	e = e.restart(t)
	r = e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
	t.Logf("after one more restart: %d %s", r.status, r.errorMessage())
}
