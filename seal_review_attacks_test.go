package hsmtransit

import (
	"bytes"
	"context"
	"crypto/hpke"
	"encoding/base64"
	"encoding/json"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
	sealpkg "github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// R1: re-running the legacy upgrade by also moving aside every entry with a
// generation (not only the manifest). The root keyring ends up encrypted to
// the attacker's recovery public key.
func TestAttackReviewR1LegacyReplayMovingEntriesAside(t *testing.T) {
	ctx := context.Background()
	s, mountUUID, ct := legacyMount(t)
	legacy := bytes.Clone(func() []byte { e, _ := s.Get(ctx, mountseal.ConfigPath); return e.Value }())
	e := startBackend(t, s, mountUUID)
	require.Equal(t, "victim data", e.decrypt(t, "k", ct, nil))
	require.NotNil(t, rawGet(t, e, "manifest/root"), "the mount was upgraded")
	e.mustWrite(t, "seal/recovery/init", map[string]interface{}{"shares": 3, "threshold": 2})
	ct2 := e.encrypt(t, "k2", "later victim data", nil)
	e = e.restart(t)
	require.Equal(t, "later victim data", e.decrypt(t, "k2", ct2, nil))

	// Attacker: old seal/config with its own recovery key, every non-seal/
	// entry moved aside (kept), manifest deleted.
	priv, err := hpke.MLKEM768X25519().GenerateKey()
	require.NoError(t, err)
	var m map[string]interface{}
	require.NoError(t, json.Unmarshal(legacy, &m))
	m["recovery_public_key"] = base64.StdEncoding.EncodeToString(priv.PublicKey().Bytes())
	m["recovery_shares"] = 1
	replay, _ := json.Marshal(m)
	aside := map[string][]byte{}
	require.NoError(t, walkStorage(ctx, e.storage, "", func(k string, v []byte) {
		if !strings.HasPrefix(k, "seal/") {
			aside[k] = bytes.Clone(v)
		}
	}))
	for k := range aside {
		rawDelete(t, e, k)
	}
	rawPut(t, e, mountseal.ConfigPath, replay)
	e = e.restart(t)
	r := e.read(t, "seal/status")
	t.Logf("status after replay: %v", r.data)

	// Put the victim's entries back (all but the manifest).
	for k, v := range aside {
		if !strings.HasPrefix(k, "manifest/") && k != mountseal.MetaPath {
			rawPut(t, e, k, v)
		}
	}
	got := e.write(t, "decrypt/k2", map[string]interface{}{"ciphertext": ct2})
	t.Logf("decrypt/k2 through the mount after putting entries back: %d %v %s", got.status, got.data, got.errorMessage())

	// The upgrade no longer trusts a recovery public key found in
	// plaintext: no copy is made for anyone, and recovery is to be set up
	// again.
	cfg := storedSealConfig(t, e)
	require.Equal(t, false, e.read(t, "seal/status").data["recovery_initialized"])
	if cfg.RecoveryKeyring == nil {
		return
	}
	raw, err := hpke.Open(priv, hpke.HKDFSHA256(), hpke.AES256GCM(), recoveryInfoOf(e), cfg.RecoveryKeyring)
	if err != nil {
		t.Logf("attacker cannot open the recovery copy: %v", err)
		return
	}
	ring, err := sealpkg.UnmarshalKeyring(raw)
	require.NoError(t, err)
	pb, err := ring.Open("policy/k2", aside["policy/k2"])
	require.NoError(t, err)
	var p keysutil.Policy
	require.NoError(t, json.Unmarshal(pb, &p))
	pt, err := p.Decrypt(nil, nil, ct2)
	require.NoError(t, err)
	t.Fatalf("BROKEN: attacker got the root keyring (versions %v) and decrypted %q", ring.Versions(), unb64(t, pt))
}

// R2: restore downgrade. Any mount, authenticated recovery set. The storage
// writer strips the mount's sealed entries (keeps them), plants an
// unauthenticated copy of its own keyring (no manifest flag) plus one hst\x01
// policy "k" of its own, and breaks seal/config so the mount cannot unseal.
// The custodians' restore adopts the attacker's keyring.
func TestAttackReviewR2RestoreDowngradeWipe(t *testing.T) {
	ctx := context.Background()
	e := getTestBackend(t)
	ct := e.encrypt(t, "k", "victim data", nil)
	out := e.mustWrite(t, "seal/recovery/init", map[string]interface{}{"shares": 3, "threshold": 2})
	var shares []string
	for _, s := range out["shares"].([]interface{}) {
		shares = append(shares, s.(string))
	}
	legitPub := storedSealMeta(t, e).RecoveryPublicKey
	require.True(t, e.read(t, "seal/status").data["recovery_authenticated"].(bool))

	aside := map[string][]byte{}
	require.NoError(t, walkStorage(ctx, e.storage, "", func(k string, v []byte) {
		if !strings.HasPrefix(k, "seal/") {
			aside[k] = bytes.Clone(v)
		}
	}))
	for k := range aside {
		rawDelete(t, e, k)
	}
	ring := attackerKeyring(t, false)
	planted, known := plaintextPolicy(t, "k")
	for k, v := range planted {
		sealed, err := ring.Seal(k, v)
		require.NoError(t, err)
		rawPut(t, e, k, sealed)
	}
	copy, err := sealpkg.SealForRecovery(legitPub, recoveryInfoOf(e), ring)
	require.NoError(t, err)
	lost := uniq(t, "lost-kek")
	editSealConfig(t, e, func(m map[string]interface{}) {
		m["recovery_keyring"] = base64.StdEncoding.EncodeToString(copy)
		m["sealed_with"] = lost
		m["key_label"] = lost
	})
	e = e.restart(t)

	r := e.write(t, "seal/recovery/restore", map[string]interface{}{
		"shares": shares[:2], "key_label": uniq(t, "kek-r2"), "generate_key": true,
	})
	t.Logf("restore: %d %v %s", r.status, r.data, r.errorMessage())
	if r.status != 200 {
		return
	}
	made := e.encrypt(t, "k", "encrypted after the restore", nil)
	p := &keysutil.Policy{Name: "k", Type: keysutil.KeyType_AES256_GCM96, LatestVersion: 1, MinDecryptionVersion: 1,
		Keys: map[string]keysutil.KeyEntry{"1": {Key: known}}}
	pt, err := p.Decrypt(nil, nil, made)
	require.NoError(t, err)
	old := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
	t.Logf("old ciphertext after restore: %d %s", old.status, old.errorMessage())
	t.Fatalf("BROKEN: restore adopted the attacker's keyring; attacker decrypts %q", unb64(t, pt))
}

// R3: deleting seal/config makes the mount look never sealed; the officer's
// config/seal would then adopt plaintext entries planted beside the mount's
// sealed ones. Refused while sealed entries are there. (Deleting every
// entry too makes a new, empty mount: that the first seal adopts what is
// planted in plaintext then is the takeover of built-in transit storage,
// and a documented limit.)
func TestAttackReviewR3DeletedSealConfigReadoptsPlaintext(t *testing.T) {
	e := getTestBackend(t)
	_ = e.encrypt(t, "k", "victim data", nil)
	planted, _ := plaintextPolicy(t, "evil")
	rawDelete(t, e, mountseal.ConfigPath)
	for k, v := range planted {
		rawPut(t, e, k, v)
	}
	e = e.restart(t)
	requireStatus(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}), 400, "config/seal")
	r := e.write(t, "config/seal", testSealConfig())
	requireStatus(t, r, 400, "holds sealed entries")
	requireStatus(t, r, 400, "but no seal configuration")
	for k, v := range planted {
		require.Equal(t, v, rawGet(t, e, k), "the planted %s was not adopted", k)
	}
	requireStatus(t, e.read(t, "config/seal"), 404, "")
}

// R4: an hst\x01 copy of a key deleted before the upgrade has no record in
// the manifest and is accepted while unsealed.
func TestAttackReviewR4PreUpgradeDeletedKeyReplay(t *testing.T) {
	ctx := context.Background()
	s, mountUUID, ct := legacyMount(t)
	old, err := s.Get(ctx, "policy/k")
	require.NoError(t, err)
	oldV := bytes.Clone(old.Value)
	// The old version deleted key k (legacy plugin: plain delete).
	require.NoError(t, s.Delete(ctx, "policy/k"))
	e := startBackend(t, s, mountUUID)
	r := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
	t.Logf("after upgrade, k deleted: %d %s", r.status, r.errorMessage())
	rawPut(t, e, "policy/k", oldV)
	r = e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
	if r.status == 200 {
		t.Fatalf("BROKEN: deleted key replayed while unsealed, decrypt answered %v", r.data)
	}
	t.Logf("%d %s", r.status, r.errorMessage())
}

type recordingStorage struct {
	logical.InmemStorage
	mu      sync.Mutex
	configs [][]byte
}

func (s *recordingStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	if e.Key == mountseal.ConfigPath {
		s.mu.Lock()
		s.configs = append(s.configs, bytes.Clone(e.Value))
		s.mu.Unlock()
	}
	return s.InmemStorage.Put(ctx, e)
}

// R5: a seal/config stored mid-rotation (keyring {v1,v2}) put back after the
// rotation completed and compacted the manifest brings v1 back; v1 copies of
// a key deleted before the rotation open (their tombstones were compacted)
// and the resumed rotation re-adopts them.
func TestAttackReviewR5MidRotationConfigResurrectsDeletedKey(t *testing.T) {
	ctx := context.Background()
	rs := &recordingStorage{}
	e := startBackend(t, rs, newMountUUID(t))
	e.mustWrite(t, "config/seal", testSealConfig())
	_ = e.encrypt(t, "keep", "x", nil)
	ct := e.encrypt(t, "gone", "deleted key's data", nil)
	e.mustWrite(t, "keys/gone/config", map[string]interface{}{"deletion_allowed": true})
	saved := map[string][]byte{}
	require.NoError(t, walkStorage(ctx, e.storage, "", func(k string, v []byte) {
		if strings.Contains(k, "gone") {
			saved[k] = bytes.Clone(v)
		}
	}))
	t.Logf("saved copies: %v", func() (ks []string) {
		for k := range saved {
			ks = append(ks, k)
		}
		return
	}())
	r := e.del(t, "keys/gone")
	require.Containsf(t, []int{200, 204}, r.status, "%s", r.errorMessage())
	// Replay refused while tombstoned (sanity).
	for k, v := range saved {
		rawPut(t, e, k, v)
	}
	r = e.write(t, "decrypt/gone", map[string]interface{}{"ciphertext": ct})
	t.Logf("replay before rotation: %d %s", r.status, r.errorMessage())
	require.NotEqual(t, 200, r.status)
	for k := range saved {
		rawDelete(t, e, k)
	}

	n := len(rs.configs)
	e.mustWrite(t, "seal/rotate", nil)
	var mid []byte
	for _, c := range rs.configs[n:] {
		var cfg mountseal.Config
		require.NoError(t, json.Unmarshal(c, &cfg))
		if cfg.RootKeyVersion == 2 && mid == nil {
			mid = c // first write of the rotation: keyring {v1,v2}
		}
	}
	require.NotNil(t, mid)

	// Attacker: put back the mid-rotation config and the v1 copies, restart.
	rawPut(t, e, mountseal.ConfigPath, mid)
	for k, v := range saved {
		rawPut(t, e, k, v)
	}
	e = e.restart(t)
	r = e.write(t, "decrypt/gone", map[string]interface{}{"ciphertext": ct})
	if r.status == 200 {
		t.Fatalf("BROKEN: a key deleted before the rotation is back: decrypt answered %v; status %v", r.data, e.read(t, "seal/status").data)
	}
	t.Logf("%d %s", r.status, r.errorMessage())
}

// R6: seal/seal issued while the mount is sealed by an HSM outage can be
// recorded only in the plaintext seal/config; clearing it there would lift
// it (a documented limit). The answer says so, and writing seal/seal again
// once the HSM is back records it where a storage writer cannot clear it.
func TestAttackReviewR6EmergencySealWhileSealedIsPlaintextOnly(t *testing.T) {
	e := getTestBackend(t)
	ct := e.encrypt(t, "k", "victim data", nil)
	orig := storedSealConfig(t, e)
	lost := uniq(t, "outage")
	editSealConfig(t, e, func(m map[string]interface{}) { m["sealed_with"] = lost })
	e = e.restart(t)
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 503, "")
	r := e.write(t, "seal/seal", nil) // tamper response during the outage
	requireStatus(t, r, 200, "")
	require.Len(t, r.resp.Warnings, 1)
	require.Contains(t, r.resp.Warnings[0], "recorded in the plaintext configuration only")

	// The outage is over (the label is back); the mount stays sealed, and
	// the officer, as told, writes seal/seal again.
	editSealConfig(t, e, func(m map[string]interface{}) { m["sealed_with"] = orig.SealedWith })
	e = e.restart(t)
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 503, "emergency seal")
	r = e.write(t, "seal/seal", nil)
	requireStatus(t, r, 200, "")
	require.Empty(t, r.resp.Warnings, "recorded in the sealed state this time")

	// The attacker clears the plaintext flag and restarts: still sealed.
	editSealConfig(t, e, func(m map[string]interface{}) { delete(m, "emergency_sealed") })
	e = e.restart(t)
	r = e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
	requireStatus(t, r, 503, "emergency seal")
	// seal/unseal still ends it.
	e.mustWrite(t, "seal/unseal", nil)
	require.Equal(t, "victim data", e.decrypt(t, "k", ct, nil))
}
