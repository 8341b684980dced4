package hsmtransit

// Attack regression tests. Each one performs an attack on a mount sealed by
// the test token and fails if the attack succeeds. The attackers:
//
//   - storage reader/writer: reads and writes any entry of the mount's raw
//     storage (e.storage, below the seal), and can restart the plugin; no
//     PIN, no ACL on crypto paths.
//   - crypto user: may call encrypt/:name and decrypt/:name of one key.
//   - neighbouring mount: configures another mount of the same process
//     without this mount's PIN.
//   - security officer: writes config/seal and seal/*.

import (
	"bytes"
	"context"
	"crypto/hpke"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/miekg/pkcs11"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
	sealpkg "github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// rawGet returns the bytes stored at path below the seal, nil when absent.
func rawGet(t *testing.T, e *testEnv, path string) []byte {
	t.Helper()
	entry, err := e.storage.Get(context.Background(), path)
	require.NoError(t, err)
	if entry == nil {
		return nil
	}
	return bytes.Clone(entry.Value)
}

// rawPut writes value at path below the seal, as a storage writer does.
func rawPut(t *testing.T, e *testEnv, path string, value []byte) {
	t.Helper()
	require.NoError(t, e.storage.Put(context.Background(), &logical.StorageEntry{Key: path, Value: bytes.Clone(value)}))
}

// rawDelete deletes path below the seal, as a storage writer does.
func rawDelete(t *testing.T, e *testEnv, path string) {
	t.Helper()
	require.NoError(t, e.storage.Delete(context.Background(), path))
}

// editSealConfig edits the plaintext JSON of seal/config in place, keeping
// every field the edit does not touch.
func editSealConfig(t *testing.T, e *testEnv, edit func(m map[string]interface{})) {
	t.Helper()
	raw := rawGet(t, e, mountseal.ConfigPath)
	require.NotNil(t, raw, "seal/config exists")
	var m map[string]interface{}
	require.NoError(t, json.Unmarshal(raw, &m))
	edit(m)
	out, err := json.Marshal(m)
	require.NoError(t, err)
	rawPut(t, e, mountseal.ConfigPath, out)
}

// storedSealConfig decodes seal/config as stored.
func storedSealConfig(t *testing.T, e *testEnv) *mountseal.Config {
	t.Helper()
	cfg, err := mountseal.ReadConfig(context.Background(), e.storage)
	require.NoError(t, err)
	require.NotNil(t, cfg)
	return cfg
}

// storedSealMeta decodes the sealed seal state through the unsealed mount.
func storedSealMeta(t *testing.T, e *testEnv) *mountseal.Meta {
	t.Helper()
	meta, err := mountseal.ReadMeta(context.Background(), e.sealed(t))
	require.NoError(t, err)
	require.NotNil(t, meta)
	return meta
}

func recoveryInfoOf(e *testEnv) []byte { return []byte("hsm-transit/recovery\x00" + e.mountUUID) }
func rootAADOf(e *testEnv) []byte      { return []byte("hsm-transit/root-keyring\x00" + e.mountUUID) }

// uniq makes a label no other test uses.
func uniq(t *testing.T, prefix string) string {
	t.Helper()
	return prefix + "-" + newMountUUID(t)[:13]
}

// openTestToken opens the unit tests' token with the right PIN.
func openTestToken(t *testing.T) *hsm.Token {
	t.Helper()
	tok, err := hsm.Open(hsm.Config{Library: softhsmLib, TokenLabel: testToken, PIN: testPIN})
	require.NoError(t, err)
	t.Cleanup(tok.Close)
	return tok
}

// outcome is one acceptable refusal: a status and a message substring.
type outcome struct {
	status int
	msg    string
}

// requireRefused asserts that r is one of the refusals listed (status and
// message substring both), and so in particular not a success.
func requireRefused(t *testing.T, r result, allowed ...outcome) {
	t.Helper()
	require.NotEqualf(t, 200, r.status, "the attack succeeded: %v", r.data)
	require.NotEqualf(t, 204, r.status, "the attack succeeded")
	for _, o := range allowed {
		if r.status == o.status && strings.Contains(r.errorMessage(), o.msg) {
			t.Logf("refused: %d %s", r.status, r.errorMessage())
			return
		}
	}
	t.Fatalf("refused, but not as expected: status %d, error %q; want one of %+v", r.status, r.errorMessage(), allowed)
}

// attackerKeyring is a root keyring of the attacker's own making.
func attackerKeyring(t *testing.T, manifest bool) *sealpkg.Keyring {
	t.Helper()
	key := make([]byte, sealpkg.RootKeySize)
	_, err := rand.Read(key)
	require.NoError(t, err)
	ring, err := sealpkg.NewKeyring(key)
	require.NoError(t, err)
	if manifest {
		ring = ring.WithManifest()
	}
	return ring
}

// byteFields returns the values of a stored entry that may hold sealed
// bytes: the value itself and, when it is JSON, every string that decodes
// from base64, at any depth.
func byteFields(value []byte) map[string][]byte {
	out := map[string][]byte{"(raw value)": value}
	var doc interface{}
	if json.Unmarshal(value, &doc) != nil {
		return out
	}
	var visit func(path string, v interface{})
	visit = func(path string, v interface{}) {
		switch x := v.(type) {
		case map[string]interface{}:
			for k, c := range x {
				visit(path+"."+k, c)
			}
		case []interface{}:
			for i, c := range x {
				visit(fmt.Sprintf("%s[%d]", path, i), c)
			}
		case string:
			if b, err := base64.StdEncoding.DecodeString(x); err == nil && len(b) > 0 {
				out[path] = b
			}
		}
	}
	visit("", doc)
	return out
}

// TestAttack1aPlantedRecoveryKeyWithoutRecovery: a storage writer adds its
// own recovery public key to the plaintext seal/config of a mount that has
// no recovery set up, restarts the plugin and waits for the officer to
// rotate the root key and change the KEK, hoping that the plugin encrypts
// the new root keyring to that key. Nothing in storage may open with the
// attacker's private key.
func TestAttack1aPlantedRecoveryKeyWithoutRecovery(t *testing.T) {
	ctx := context.Background()
	e := getTestBackend(t)
	ct := e.encrypt(t, "k", "victim data", nil)

	priv, err := hpke.MLKEM768X25519().GenerateKey()
	require.NoError(t, err)
	editSealConfig(t, e, func(m map[string]interface{}) {
		m["recovery_public_key"] = base64.StdEncoding.EncodeToString(priv.PublicKey().Bytes())
		m["recovery_shares"] = 3
	})
	e = e.restart(t)
	require.Equal(t, "victim data", e.decrypt(t, "k", ct, nil))

	// The officer's routine: a root key rotation, then a new KEK.
	require.Equal(t, float64(2), e.mustWrite(t, "seal/rotate", nil)["root_key_version"])
	e.mustWrite(t, "config/seal", map[string]interface{}{"key_label": uniq(t, "kek-1a"), "generate_key": true})
	e = e.restart(t)
	require.Equal(t, "victim data", e.decrypt(t, "k", ct, nil))

	info := recoveryInfoOf(e)
	tried := 0
	require.NoError(t, walkStorage(ctx, e.storage, "", func(key string, value []byte) {
		for field, b := range byteFields(value) {
			tried++
			_, err := hpke.Open(priv, hpke.HKDFSHA256(), hpke.AES256GCM(), info, b)
			require.Errorf(t, err, "the attacker's private key opens %s%s", key, field)
		}
	}))
	require.Greater(t, tried, 10)

	var stored map[string]interface{}
	require.NoError(t, json.Unmarshal(rawGet(t, e, mountseal.ConfigPath), &stored))
	require.NotContains(t, stored, "recovery_keyring", "a mount without recovery has no recovery copy")
	require.Nil(t, storedSealConfig(t, e).RecoveryKeyring)
	require.Nil(t, storedSealMeta(t, e).RecoveryPublicKey, "the planted key did not reach the sealed state")
	st := e.read(t, "seal/status").data
	require.Equal(t, false, st["recovery_initialized"])
	require.Equal(t, false, st["sealed"])
	requireMountSealed(t, e, secretSet{"the victim's plaintext": []byte("victim data")})
}

// TestAttack1bPlantedRecoveryKeyWithRecovery: on a mount with recovery, a
// storage writer replaces the recovery public key in seal/config with its
// own and restarts; the next rotation's recovery copy must still be for the
// custodians' shares, and not for the attacker.
func TestAttack1bPlantedRecoveryKeyWithRecovery(t *testing.T) {
	e := getTestBackend(t)
	ct := e.encrypt(t, "k", "victim data", nil)
	out := e.mustWrite(t, "seal/recovery/init", map[string]interface{}{"shares": 3, "threshold": 2})
	var shares []string
	for _, s := range out["shares"].([]interface{}) {
		shares = append(shares, s.(string))
	}
	require.Len(t, shares, 3)
	legitPub := storedSealMeta(t, e).RecoveryPublicKey
	require.NotNil(t, legitPub)

	priv, err := hpke.MLKEM768X25519().GenerateKey()
	require.NoError(t, err)
	editSealConfig(t, e, func(m map[string]interface{}) {
		m["recovery_public_key"] = base64.StdEncoding.EncodeToString(priv.PublicKey().Bytes())
	})
	e = e.restart(t)
	require.Equal(t, float64(2), e.mustWrite(t, "seal/rotate", nil)["root_key_version"])

	cfg := storedSealConfig(t, e)
	require.NotNil(t, cfg.RecoveryKeyring)
	_, err = hpke.Open(priv, hpke.HKDFSHA256(), hpke.AES256GCM(), recoveryInfoOf(e), cfg.RecoveryKeyring)
	require.Error(t, err, "the new recovery copy opens with the attacker's key")
	ring, err := sealpkg.OpenWithShares(shares[1:], recoveryInfoOf(e), cfg.RecoveryKeyring)
	require.NoError(t, err, "the custodians' shares open the new recovery copy")
	require.Equal(t, uint32(2), ring.Active(), "the copy holds the rotated keyring")
	require.NoError(t, sealpkg.NewSealer(ring, mountseal.IsPlainPath).LoadManifest(context.Background(), e.storage), "and it opens this mount's storage")
	require.Equal(t, legitPub, storedSealMeta(t, e).RecoveryPublicKey)
	require.Equal(t, "victim data", e.decrypt(t, "k", ct, nil))
	secrets := secretSet{"the victim's plaintext": []byte("victim data")}
	for i, share := range shares {
		secrets.AddString(t, fmt.Sprint("recovery share ", i), share)
	}
	requireMountSealed(t, e, secrets)
}

// TestAttack1cEmergencySealClearedInStorage: after the officer's emergency
// seal, a storage writer clears emergency_sealed in the plaintext
// seal/config and restarts the plugin, to have it unseal by itself.
func TestAttack1cEmergencySealClearedInStorage(t *testing.T) {
	e := getTestBackend(t)
	ct := e.encrypt(t, "k", "victim data", nil)
	require.Equal(t, true, e.mustWrite(t, "seal/seal", nil)["sealed"])

	editSealConfig(t, e, func(m map[string]interface{}) { m["emergency_sealed"] = false })
	require.False(t, storedSealConfig(t, e).EmergencySealed)
	e = e.restart(t)
	requireStatus(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}), 503, "emergency seal")
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 503, "emergency seal")
	// Give the background unseal its chance too.
	time.Sleep(200 * time.Millisecond)
	require.NotEqual(t, mountseal.PhaseUnsealed, e.b.seal.Snapshot().Phase())
	st := e.read(t, "seal/status").data
	require.Equal(t, true, st["sealed"])
	require.Contains(t, st["last_error"], "emergency seal")
	requireStatus(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}), 503, "emergency seal")

	// The officer's seal/unseal still works.
	e.mustWrite(t, "seal/unseal", nil)
	require.Equal(t, "victim data", e.decrypt(t, "k", ct, nil))
	requireMountSealed(t, e, secretSet{"the victim's plaintext": []byte("victim data")})
}

// TestAttack1dRecoveryCanary: a storage writer encrypts a keyring of its own
// to the mount's recovery public key (no secret) and plants it as the
// recovery copy; when the HSM is lost, the custodians' shares would restore
// the attacker's keyring, whose root key the attacker knows. The restore
// must refuse it and change nothing; the legitimate copy restores.
func TestAttack1dRecoveryCanary(t *testing.T) {
	e := getTestBackend(t)
	ct := e.encrypt(t, "k", "victim data", nil)
	out := e.mustWrite(t, "seal/recovery/init", map[string]interface{}{"shares": 3, "threshold": 2})
	var shares []string
	for _, s := range out["shares"].([]interface{}) {
		shares = append(shares, s.(string))
	}
	var state struct {
		RecoveryPublicKey []byte `json:"recovery_public_key"`
	}
	entry, err := e.sealed(t).Get(context.Background(), mountseal.MetaPath)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(entry.Value, &state))
	require.NotEmpty(t, state.RecoveryPublicKey)
	legitCopy := storedSealConfig(t, e).RecoveryKeyring
	require.NotNil(t, legitCopy)

	// The HSM is lost: seal/config names a KEK the token does not hold.
	lost := uniq(t, "lost-kek")
	editSealConfig(t, e, func(m map[string]interface{}) {
		m["key_label"] = lost
		m["sealed_with"] = lost
	})
	e = e.restart(t)
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 503, lost)

	tok := openTestToken(t)
	for _, manifest := range []bool{false, true} {
		t.Run(fmt.Sprintf("attacker keyring manifest=%t", manifest), func(t *testing.T) {
			planted, err := sealpkg.SealForRecovery(state.RecoveryPublicKey, recoveryInfoOf(e), attackerKeyring(t, manifest))
			require.NoError(t, err)
			editSealConfig(t, e, func(m map[string]interface{}) {
				m["recovery_keyring"] = base64.StdEncoding.EncodeToString(planted)
			})
			before := rawGet(t, e, mountseal.ConfigPath)
			// The planted copy carries no tag: refused as such, and,
			// when the custodians vouch for storage (legacy_copy), by
			// the canary.
			for legacy, msg := range map[bool]string{
				false: "the recovery copy is not authenticated",
				true:  "the recovered keyring does not open this mount's sealed storage",
			} {
				newKEK := uniq(t, "kek-1d")
				r := e.write(t, "seal/recovery/restore", map[string]interface{}{
					"shares": shares[:2], "key_label": newKEK, "generate_key": true, "legacy_copy": legacy,
				})
				requireStatus(t, r, 400, msg)
				require.Equal(t, before, rawGet(t, e, mountseal.ConfigPath), "nothing changed")
				has, err := tok.HasKey(newKEK)
				require.NoError(t, err)
				require.False(t, has, "no KEK was generated for the refused restore")
				require.NotEqual(t, mountseal.PhaseUnsealed, e.b.seal.Snapshot().Phase())
			}
		})
	}

	// Positive control: the legitimate copy, back in place, restores.
	editSealConfig(t, e, func(m map[string]interface{}) {
		m["recovery_keyring"] = base64.StdEncoding.EncodeToString(legitCopy)
	})
	newKEK := uniq(t, "kek-1d")
	data := e.mustWrite(t, "seal/recovery/restore", map[string]interface{}{
		"shares": shares[1:], "key_label": newKEK, "generate_key": true,
	})
	require.Equal(t, newKEK, data["key_label"])
	require.Equal(t, "victim data", e.decrypt(t, "k", ct, nil))
	e = e.restart(t)
	require.Equal(t, "victim data", e.decrypt(t, "k", ct, nil))
}

// legacyMount writes, in new storage, a mount as the version before the
// storage manifest left it: entries in the hst\x01 format, the keyring
// (without the manifest flag) sealed by the test KEK in seal/config, and no
// sealed seal state. It returns the storage, the mount's UUID and a
// ciphertext of key k.
func legacyMount(t *testing.T) (*logical.InmemStorage, string, string) {
	t.Helper()
	ctx := context.Background()
	s := &logical.InmemStorage{}
	mountUUID := newMountUUID(t)
	key := make([]byte, sealpkg.RootKeySize)
	_, err := rand.Read(key)
	require.NoError(t, err)
	ring, err := sealpkg.NewKeyring(key)
	require.NoError(t, err)
	lm, err := keysutil.NewLockManager(true, 0)
	require.NoError(t, err)
	p, _, err := lm.GetPolicy(ctx, keysutil.PolicyRequest{Upsert: true, Storage: sealpkg.NewSealer(ring, mountseal.IsPlainPath).Wrap(s), Name: "k", KeyType: keysutil.KeyType_AES256_GCM96}, rand.Reader)
	require.NoError(t, err)
	ct, err := p.Encrypt(0, nil, nil, b64("victim data"))
	require.NoError(t, err)
	raw, err := s.Get(ctx, "policy/k")
	require.NoError(t, err)
	require.Equal(t, "hst\x01", string(raw.Value[:4]))

	marshalled, err := ring.Marshal()
	require.NoError(t, err)
	sealed, err := openTestToken(t).EncryptGCM(testKEK, marshalled, []byte("hsm-transit/root-keyring\x00"+mountUUID))
	require.NoError(t, err)
	real, err := filepath.EvalSymlinks(softhsmLib)
	require.NoError(t, err)
	require.NoError(t, mountseal.WriteConfig(ctx, s, &mountseal.Config{
		Library: real, TokenLabel: testToken, PIN: testPIN, KeyLabel: testKEK,
		SealedKeyring: sealed, SealedWith: testKEK, RootKeyVersion: 1,
	}))
	return s, mountUUID, ct
}

// TestAttack1eLegacySealConfigReplay: a storage writer kept seal/config
// from before the mount was upgraded to the storage manifest (any backup
// of a mount sealed by the previous version). Once the mount is upgraded,
// it writes that copy back, with its own recovery public key in the
// previous version's plaintext field, and restarts: the keyring in it still
// opens with the KEK and has no manifest flag, so the upgrade may run again
// and trust the plaintext fields. It may also delete the manifest's root
// and the sealed seal state, so that storage looks as before the upgrade.
// The attacker must not get the root keyring, nor lift an emergency seal.
func TestAttack1eLegacySealConfigReplay(t *testing.T) {
	erasures := map[string][]string{
		"config only":                     nil,
		"manifest root deleted":           {"manifest/root"},
		"manifest root and state deleted": {"manifest/root", mountseal.MetaPath},
	}
	for name, erase := range erasures {
		t.Run("recovery key, "+name, func(t *testing.T) {
			s, mountUUID, ct := legacyMount(t)
			legacy := bytes.Clone(func() []byte { e, _ := s.Get(context.Background(), mountseal.ConfigPath); return e.Value }())
			e := startBackend(t, s, mountUUID)
			require.Equal(t, "victim data", e.decrypt(t, "k", ct, nil))
			require.NotNil(t, rawGet(t, e, "manifest/root"), "the mount was upgraded")
			e.mustWrite(t, "seal/recovery/init", map[string]interface{}{"shares": 3, "threshold": 2})
			legitPub := storedSealMeta(t, e).RecoveryPublicKey

			priv, err := hpke.MLKEM768X25519().GenerateKey()
			require.NoError(t, err)
			var m map[string]interface{}
			require.NoError(t, json.Unmarshal(legacy, &m))
			m["recovery_public_key"] = base64.StdEncoding.EncodeToString(priv.PublicKey().Bytes())
			m["recovery_shares"] = 1
			replay, err := json.Marshal(m)
			require.NoError(t, err)
			rawPut(t, e, mountseal.ConfigPath, replay)
			for _, p := range erase {
				rawDelete(t, e, p)
			}
			e = e.restart(t)
			// Whatever the mount does now (unseal or refuse), nothing in
			// storage may open with the attacker's key.
			r := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
			t.Logf("after the replay: decrypt/k answered %d %s", r.status, r.errorMessage())
			var stolen []byte
			require.NoError(t, walkStorage(context.Background(), e.storage, "", func(key string, value []byte) {
				for field, b := range byteFields(value) {
					if pt, err := hpke.Open(priv, hpke.HKDFSHA256(), hpke.AES256GCM(), recoveryInfoOf(e), b); err == nil {
						t.Errorf("the attacker's private key opens %s%s", key, field)
						stolen = pt
					}
				}
			}))
			if stolen != nil {
				// Show what it gives: the root keyring, the key's
				// policy, the user's plaintext.
				ring, err := sealpkg.UnmarshalKeyring(stolen)
				require.NoError(t, err)
				policy, err := ring.Open("policy/k", rawGet(t, e, "policy/k"))
				require.NoError(t, err)
				var p keysutil.Policy
				require.NoError(t, json.Unmarshal(policy, &p))
				pt, err := p.Decrypt(nil, nil, ct)
				require.NoError(t, err)
				t.Fatalf("the attacker decrypted the user's ciphertext with the stolen root keyring: %q", unb64(t, pt))
			}
			if r.status == 200 {
				require.Equal(t, legitPub, storedSealMeta(t, e).RecoveryPublicKey, "the sealed recovery key was replaced")
			}
		})
		t.Run("emergency seal, "+name, func(t *testing.T) {
			s, mountUUID, ct := legacyMount(t)
			legacy := bytes.Clone(func() []byte { e, _ := s.Get(context.Background(), mountseal.ConfigPath); return e.Value }())
			e := startBackend(t, s, mountUUID)
			require.Equal(t, "victim data", e.decrypt(t, "k", ct, nil))
			e.mustWrite(t, "seal/seal", nil)

			rawPut(t, e, mountseal.ConfigPath, legacy)
			for _, p := range erase {
				rawDelete(t, e, p)
			}
			e = e.restart(t)
			r := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
			require.NotContains(t, r.data, "plaintext", "the emergency seal was lifted")
			require.Equal(t, 503, r.status, "error: %q", r.errorMessage())
			t.Logf("refused: %d %s", r.status, r.errorMessage())
		})
	}
}

// TestAttack1fRecoveryCanaryWithPlantedManifest: as in 1d, a storage writer
// plants a recovery copy of its own keyring, and also the pieces the canary
// and the unseal check, sealed under that keyring: a manifest (buckets and
// root) and the sealed seal state. The mount's policies stay as they are,
// sealed under the real root key. A restore that accepted this keyring
// would run the mount on a root key the attacker knows.
func TestAttack1fRecoveryCanaryWithPlantedManifest(t *testing.T) {
	ctx := context.Background()
	e := getTestBackend(t)
	ct := e.encrypt(t, "k", "victim data", nil)
	out := e.mustWrite(t, "seal/recovery/init", map[string]interface{}{"shares": 3, "threshold": 2})
	var shares []string
	for _, s := range out["shares"].([]interface{}) {
		shares = append(shares, s.(string))
	}
	legitPub := storedSealMeta(t, e).RecoveryPublicKey

	ring := attackerKeyring(t, true)
	sealer := sealpkg.NewSealer(ring, mountseal.IsPlainPath)
	require.NoError(t, sealer.InitManifest(ctx, e.storage))
	require.NoError(t, mountseal.WriteMeta(ctx, sealer.Wrap(e.storage), &mountseal.Meta{}))
	planted, err := sealpkg.SealForRecovery(legitPub, recoveryInfoOf(e), ring)
	require.NoError(t, err)
	lost := uniq(t, "lost-kek")
	editSealConfig(t, e, func(m map[string]interface{}) {
		m["recovery_keyring"] = base64.StdEncoding.EncodeToString(planted)
		m["key_label"] = lost
		m["sealed_with"] = lost
	})
	e = e.restart(t)
	before := rawGet(t, e, mountseal.ConfigPath)
	policyBefore := rawGet(t, e, "policy/k")

	requireStatus(t, e.write(t, "seal/recovery/restore", map[string]interface{}{
		"shares": shares[:2], "key_label": uniq(t, "kek-1f"), "generate_key": true,
	}), 400, "the recovery copy is not authenticated")
	// With legacy_copy the canary still tells: the attacker's manifest
	// opens, but the mount's own entries do not.
	r := e.write(t, "seal/recovery/restore", map[string]interface{}{
		"shares": shares[:2], "key_label": uniq(t, "kek-1f"), "generate_key": true, "legacy_copy": true,
	})
	if r.status == 200 {
		// Show what it gives: a key created now is under the attacker's
		// root key, while the mount's own keys no longer open.
		made := e.encrypt(t, "new", "created after the restore", nil)
		p, err := ring.Open("policy/new", rawGet(t, e, "policy/new"))
		if err == nil {
			var pol keysutil.Policy
			require.NoError(t, json.Unmarshal(p, &pol))
			if pt, err := pol.Decrypt(nil, nil, made); err == nil {
				t.Errorf("the attacker decrypts a key created after the restore: %q", unb64(t, pt))
			}
		}
		own := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
		t.Logf("decrypt/k of the mount's own key after the restore: %d %s", own.status, own.errorMessage())
		t.Fatalf("the restore adopted the attacker's keyring: %v", r.data)
	}
	requireStatus(t, r, 400, "the recovered keyring does not open this mount's sealed storage")
	require.Equal(t, before, rawGet(t, e, mountseal.ConfigPath), "nothing changed")
	require.Equal(t, policyBefore, rawGet(t, e, "policy/k"))
}

// hsmLabel returns the token label of version 1 of the HSM-resident key.
func hsmLabel(t *testing.T, e *testEnv, name string) string {
	t.Helper()
	labels := e.read(t, "keys/"+name).data["hsm_labels"].(map[string]interface{})
	label := labels["1"].(string)
	require.Equal(t, fmt.Sprintf("hsm-transit/%s/%s/v1", e.mountUUID, name), label)
	return label
}

// TestAttack2aKEKLabelInHSMKeyNamespace: the officer (or anyone who can
// write config/seal) names an HSM-resident key, or any label of the
// plugin's namespace, as the KEK: crypto users of that key could then open
// or forge the sealed root keyring.
func TestAttack2aKEKLabelInHSMKeyNamespace(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/h", map[string]interface{}{"hsm": true})
	label := hsmLabel(t, e, "h")
	before := rawGet(t, e, mountseal.ConfigPath)
	for _, tc := range []map[string]interface{}{
		{"key_label": label},
		{"key_label": label, "generate_key": true},
		{"key_label": "hsm-transit/other", "generate_key": true},
		{"key_label": "hsm-transit/" + e.mountUUID + "/h/v2", "generate_key": true},
		{"key_label": "hsm-transit/", "generate_key": true},
	} {
		requireStatus(t, e.write(t, "config/seal", tc), 400, "labels the plugin keeps for HSM-resident keys (hsm-transit/...)")
	}
	require.Equal(t, before, rawGet(t, e, mountseal.ConfigPath), "nothing changed")
	require.Equal(t, testKEK, e.read(t, "seal/status").data["key_label"])

	// Nor as the first configuration of a mount.
	fresh := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	r := fresh.write(t, "config/seal", withSeal(map[string]interface{}{"key_label": "hsm-transit/" + fresh.mountUUID + "/x/v1", "generate_key": true}))
	requireStatus(t, r, 400, "labels the plugin keeps for HSM-resident keys")
	requireStatus(t, fresh.read(t, "config/seal"), 404, "")
	tok := openTestToken(t)
	has, err := tok.HasKey("hsm-transit/" + fresh.mountUUID + "/x/v1")
	require.NoError(t, err)
	require.False(t, has, "no key was generated")
}

// TestAttack2bcForgedKeyringFromHSMKey: a crypto user of an HSM-resident key
// encrypts a keyring of its own with the root keyring's associated data,
// and a storage writer plants that ciphertext as the sealed keyring with
// the HSM key's label as sealed_with, then restarts: the mount would run on
// a root key the attacker chose. The label is refused, and in the token the
// ciphertext does not open with the root keyring's associated data.
func TestAttack2bcForgedKeyringFromHSMKey(t *testing.T) {
	e := getTestBackend(t)
	ct := e.encrypt(t, "k", "victim data", nil)
	e.mustWrite(t, "keys/h", map[string]interface{}{"hsm": true})
	label := hsmLabel(t, e, "h")
	aad := rootAADOf(e)

	forgedRing, err := attackerKeyring(t, true).Marshal()
	require.NoError(t, err)
	forged := e.encrypt(t, "h", string(forgedRing), map[string]interface{}{"associated_data": base64.StdEncoding.EncodeToString(aad)})
	raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(forged, "vault:v1:"))
	require.NoError(t, err)
	body, marked := bytes.CutPrefix(raw, hsmCiphertextMarker)
	require.True(t, marked, "new ciphertexts carry the domain-separated format")

	// At the crypto layer: neither form opens as a root keyring.
	tok := openTestToken(t)
	for name, sealed := range map[string][]byte{"without marker": body, "with marker": raw} {
		pt, err := tok.DecryptGCM(label, sealed, aad)
		require.Errorf(t, err, "the forged keyring (%s) opens with the root keyring's AAD", name)
		require.Equal(t, hsm.Failed, hsm.KindOf(err), "%v", err)
		require.Nil(t, pt)
	}

	// In storage: the HSM key's label is refused as sealed_with.
	editSealConfig(t, e, func(m map[string]interface{}) {
		m["sealed_keyring"] = base64.StdEncoding.EncodeToString(body)
		m["sealed_with"] = label
		m["key_label"] = label
	})
	e = e.restart(t)
	r := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
	requireStatus(t, r, 503, "a label of the plugin's HSM-resident keys; refusing to use it")
	requireStatus(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}), 503, label)
	st := e.read(t, "seal/status").data
	require.Equal(t, true, st["sealed"])
	require.Contains(t, st["last_error"], label)
	require.Contains(t, st["last_error"], "HSM-resident")
	require.Nil(t, e.b.seal.Snapshot().Sealer())

	// Only sealed_with pointing at the HSM key, the keyring untouched:
	// refused the same way.
	e2 := getTestBackend(t)
	e2.mustWrite(t, "keys/h", map[string]interface{}{"hsm": true})
	label2 := hsmLabel(t, e2, "h")
	editSealConfig(t, e2, func(m map[string]interface{}) { m["sealed_with"] = label2 })
	e2 = e2.restart(t)
	requireStatus(t, e2.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}), 503, "refusing to use it")
	require.Contains(t, e2.read(t, "seal/status").data["last_error"], label2)
}

// TestAttack2dDecryptSealedKeyringWithHSMKey: a crypto user of an
// HSM-resident key submits the sealed root keyring (readable in the
// plaintext seal/config) as a ciphertext of its key, with the root
// keyring's associated data.
func TestAttack2dDecryptSealedKeyringWithHSMKey(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/h", map[string]interface{}{"hsm": true})
	sealed := storedSealConfig(t, e).SealedKeyring
	require.NotEmpty(t, sealed)
	for _, payload := range [][]byte{sealed, append(bytes.Clone(hsmCiphertextMarker), sealed...)} {
		r := e.write(t, "decrypt/h", map[string]interface{}{
			"ciphertext":      "vault:v1:" + base64.StdEncoding.EncodeToString(payload),
			"associated_data": base64.StdEncoding.EncodeToString(rootAADOf(e)),
		})
		requireStatus(t, r, 400, "message authentication failed")
		require.NotContains(t, r.data, "plaintext")
	}
}

// TestAttack2eFirstFormatCiphertexts: ciphertexts of the first HSM-key
// format (the caller's associated data alone) still decrypt; but one made
// with associated data in the plugin's namespace (as the root keyring's) is
// refused, so that a KEK that is also an HSM-resident key (an older
// version's configuration) could not be used as a decryption oracle.
func TestAttack2eFirstFormatCiphertexts(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/h", map[string]interface{}{"hsm": true})
	label := hsmLabel(t, e, "h")
	tok := openTestToken(t)

	aad := []byte("row 42")
	old, err := tok.EncryptGCM(label, []byte("first format"), aad)
	require.NoError(t, err)
	ct := "vault:v1:" + base64.StdEncoding.EncodeToString(old)
	require.Equal(t, "first format", e.decrypt(t, "h", ct, map[string]interface{}{"associated_data": base64.StdEncoding.EncodeToString(aad)}))
	noAAD, err := tok.EncryptGCM(label, []byte("first format, no AAD"), nil)
	require.NoError(t, err)
	require.Equal(t, "first format, no AAD", e.decrypt(t, "h", "vault:v1:"+base64.StdEncoding.EncodeToString(noAAD), nil))

	ns, err := tok.EncryptGCM(label, []byte("as if a root keyring"), rootAADOf(e))
	require.NoError(t, err)
	r := e.write(t, "decrypt/h", map[string]interface{}{
		"ciphertext":      "vault:v1:" + base64.StdEncoding.EncodeToString(ns),
		"associated_data": base64.StdEncoding.EncodeToString(rootAADOf(e)),
	})
	requireStatus(t, r, 400, "message authentication failed")
	require.NotContains(t, r.data, "plaintext")
}

// plaintextPolicy makes a keysutil AES-256-GCM key in scratch storage, as
// built-in transit stores it, and returns its entries and key bytes.
func plaintextPolicy(t *testing.T, name string) (entries map[string][]byte, key []byte) {
	t.Helper()
	ctx := context.Background()
	scratch := &logical.InmemStorage{}
	lm, err := keysutil.NewLockManager(true, 0)
	require.NoError(t, err)
	p, _, err := lm.GetPolicy(ctx, keysutil.PolicyRequest{Upsert: true, Storage: scratch, Name: name, KeyType: keysutil.KeyType_AES256_GCM96}, rand.Reader)
	require.NoError(t, err)
	key = bytes.Clone(p.Keys["1"].Key)
	require.Len(t, key, 32)
	entries = map[string][]byte{}
	require.NoError(t, walkStorage(ctx, scratch, "", func(k string, v []byte) { entries[k] = bytes.Clone(v) }))
	require.Contains(t, entries, "policy/"+name)
	return entries, key
}

// TestAttack3PlantedPlaintextEntries: a storage writer plants a plaintext
// keysutil policy whose key bytes it knows, and a plaintext HSM-resident
// key record, then restarts; if the mount used them, or a rotation adopted
// them (encrypting them under the root key), the attacker would read
// whatever users encrypt with "evil".
func TestAttack3PlantedPlaintextEntries(t *testing.T) {
	e := getTestBackend(t)
	ct := e.encrypt(t, "k", "victim data", nil)
	e.mustWrite(t, "keys/h", map[string]interface{}{"hsm": true})
	hct := e.encrypt(t, "h", "in the HSM", nil)

	planted, known := plaintextPolicy(t, "evil")
	planted["hsm/keys/evil"] = []byte(`{"name":"evil","type":"aes256-gcm96","versions":{"1":{"label":"attacker","created":"2024-01-01T00:00:00Z"}},"latest_version":1,"min_decryption_version":1}`)
	planted["hsm/keys/evilhsm"] = []byte(`{"name":"evilhsm","type":"aes256-gcm96","versions":{"1":{"label":"attacker","created":"2024-01-01T00:00:00Z"}},"latest_version":1,"min_decryption_version":1}`)
	for k, v := range planted {
		rawPut(t, e, k, v)
	}
	e = e.restart(t)

	// attackerOpens reports whether the known key decrypts a ciphertext.
	attackerOpens := func(ct string) bool {
		p := &keysutil.Policy{Name: "evil", Type: keysutil.KeyType_AES256_GCM96, LatestVersion: 1, MinDecryptionVersion: 1,
			Keys: map[string]keysutil.KeyEntry{"1": {Key: known}}}
		pt, err := p.Decrypt(nil, nil, ct)
		return err == nil && pt != ""
	}
	check := func(t *testing.T) {
		t.Helper()
		for _, name := range []string{"evil", "evilhsm"} {
			r := e.write(t, "encrypt/"+name, map[string]interface{}{"plaintext": b64("for the attacker?")})
			if c, ok := r.data["ciphertext"].(string); ok {
				require.Falsef(t, attackerOpens(c), "the attacker decrypts what encrypt/%s made", name)
			}
			requireRefused(t, r, outcome{500, "is not sealed: it was not written by this mount"})
			requireRefused(t, e.read(t, "keys/"+name), outcome{500, "is not sealed: it was not written by this mount"})
		}
		// The known key's ciphertexts do not decrypt through the mount.
		p := &keysutil.Policy{Name: "evil", Type: keysutil.KeyType_AES256_GCM96, LatestVersion: 1, MinEncryptionVersion: 0,
			Keys: map[string]keysutil.KeyEntry{"1": {Key: known}}}
		attackerCT, err := p.Encrypt(1, nil, nil, b64("from the attacker"))
		require.NoError(t, err)
		requireRefused(t, e.write(t, "decrypt/evil", map[string]interface{}{"ciphertext": attackerCT}), outcome{500, "is not sealed"})
	}
	check(t)

	data := e.mustWrite(t, "seal/rotate", nil)
	require.Equal(t, float64(2), data["root_key_version"], "the rotation completed")
	for k, v := range planted {
		require.Equal(t, v, rawGet(t, e, k), "%s is left as planted, not adopted", k)
		require.False(t, sealpkg.IsSealed(rawGet(t, e, k)))
	}
	st := e.read(t, "seal/status").data
	require.Equal(t, float64(2), st["root_key_version"])
	require.Equal(t, false, st["rotation_pending"])
	require.Equal(t, false, st["sealed"])
	for k := range planted {
		require.Contains(t, st["last_error"], k)
	}
	require.Contains(t, st["last_error"], "not adopted")
	require.NoError(t, walkStorage(context.Background(), e.storage, "", func(key string, value []byte) {
		if v, ok := sealpkg.SealedVersion(value); ok {
			require.Equal(t, uint32(2), v, "%s is under the new root key", key)
		}
	}))
	check(t)
	require.Equal(t, "victim data", e.decrypt(t, "k", ct, nil))
	require.Equal(t, "in the HSM", e.decrypt(t, "h", hct, nil))

	e = e.restart(t)
	check(t)
	require.Equal(t, "victim data", e.decrypt(t, "k", ct, nil))
	require.Equal(t, "in the HSM", e.decrypt(t, "h", hct, nil))
}

// TestAttack4NeighbourWithWrongPIN: while this mount is unsealed and logged
// in to the token, a neighbouring mount configures the same token with a
// wrong PIN, naming the library by other spellings of the same file (a
// second module would know nothing of the first login, and the token would
// answer "already logged in" to any PIN).
func TestAttack4NeighbourWithWrongPIN(t *testing.T) {
	victim := getTestBackend(t)
	ct := victim.encrypt(t, "k", "victim data", nil)
	victim.mustWrite(t, "keys/h", map[string]interface{}{"hsm": true})
	hct := victim.encrypt(t, "h", "in the HSM", nil)

	target, err := filepath.EvalSymlinks(softhsmLib)
	require.NoError(t, err)
	libs := []string{target, "/usr/lib/softhsm/../softhsm/libsofthsm2.so", softhsmLib}
	for i, lib := range libs {
		t.Run(lib, func(t *testing.T) {
			if _, err := os.Stat(lib); err != nil {
				t.Skipf("%s is not on this system", lib)
			}
			n := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
			for j, kek := range []string{testKEK, uniq(t, "neighbour-kek")} {
				r := n.write(t, "config/seal", withSeal(map[string]interface{}{
					"library": lib, "pin": fmt.Sprintf("%04d", 9000+10*i+j), "key_label": kek, "generate_key": true,
				}))
				requireStatus(t, r, 400, "PIN")
				require.Contains(t, r.errorMessage(), "login")
				requireStatus(t, n.read(t, "config/seal"), 404, "")
			}
			for _, p := range []string{"encrypt/k", "encrypt/h"} {
				requireStatus(t, n.write(t, p, map[string]interface{}{"plaintext": b64("x")}), 400, "config/seal")
			}
			requireStatus(t, n.write(t, "keys/n", map[string]interface{}{"hsm": true}), 400, "config/seal")
			require.Nil(t, n.b.seal.CurrentToken())
			// The victim is unaffected.
			require.Equal(t, "victim data", victim.decrypt(t, "k", ct, nil))
			require.Equal(t, "in the HSM", victim.decrypt(t, "h", hct, nil))
		})
	}
	// Control: the right PIN through the symlink's target works (it is the
	// same library and token, logged in with that PIN).
	n := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	n.mustWrite(t, "config/seal", withSeal(map[string]interface{}{"library": target}))
	require.Equal(t, "x", n.decrypt(t, "k", n.encrypt(t, "k", "x", nil), nil))
	require.Equal(t, "in the HSM", victim.decrypt(t, "h", hct, nil))
}

// delayedStorage delays every read after it and every write before it.
type delayedStorage struct {
	logical.Storage
	delay time.Duration
}

func (s *delayedStorage) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	e, err := s.Storage.Get(ctx, key)
	time.Sleep(s.delay)
	return e, err
}

func (s *delayedStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	time.Sleep(s.delay)
	return s.Storage.Put(ctx, e)
}

// TestAttack6RotationRace: users create keys (encrypt with upsert) and
// delete keys while the officer rotates the root key again and again. A
// creation that lands under a version the rotation already left behind
// would be lost when the old version is dropped; a deletion raced by the
// re-encryption could bring the key back.
func TestAttack6RotationRace(t *testing.T) {
	const (
		rotationsWanted = 8
		creators        = 8
		perWorker       = 30
		deletable       = 60
		deleters        = 4
	)
	// Storage as a loaded backend is: every read and write takes a little
	// while, which widens the windows between a request's read and write.
	e := startBackend(t, &delayedStorage{Storage: &logical.InmemStorage{}, delay: 20 * time.Microsecond}, newMountUUID(t))
	e.mustWrite(t, "config/seal", testSealConfig())
	oldCT := e.encrypt(t, "old", "from before", nil)
	for i := 0; i < deletable; i++ {
		name := fmt.Sprintf("del-%d", i)
		e.encrypt(t, name, "doomed", nil)
		e.mustWrite(t, "keys/"+name+"/config", map[string]interface{}{"deletion_allowed": true})
	}

	var (
		wg, rot  sync.WaitGroup
		mu       sync.Mutex
		created  = map[string]string{} // key -> ciphertext of its name
		during   = map[int64]int{}     // rotations done -> creations then
		deleted  = map[string]bool{}
		failures []string
		rotated  atomic.Int64
		stop     = make(chan struct{})
	)
	fail := func(format string, args ...interface{}) {
		mu.Lock()
		defer mu.Unlock()
		failures = append(failures, fmt.Sprintf(format, args...))
	}
	rot.Add(1)
	go func() {
		defer rot.Done()
		for {
			resp, err := e.call(logical.UpdateOperation, "seal/rotate", nil)
			if err != nil {
				fail("seal/rotate: %v", err)
			} else if resp == nil || resp.Data["root_key_version"] == nil {
				fail("seal/rotate answered %v", resp)
			}
			rotated.Add(1)
			select {
			case <-stop:
				return
			default:
			}
		}
	}()
	// Creators spread their creations over the rotations.
	for g := 0; g < creators; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < perWorker; i++ {
				for rotated.Load() < int64(i*rotationsWanted/perWorker) {
					time.Sleep(time.Millisecond)
				}
				name := fmt.Sprintf("new-%d-%d", g, i)
				resp, err := e.call(logical.CreateOperation, "encrypt/"+name, map[string]interface{}{"plaintext": b64(name)})
				if err != nil {
					fail("encrypt/%s: %v", name, err)
					continue
				}
				mu.Lock()
				created[name] = resp.Data["ciphertext"].(string)
				during[rotated.Load()]++
				mu.Unlock()
			}
		}(g)
	}
	// Deleters spread their deletions over the rotations.
	for g := 0; g < deleters; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := g; i < deletable; i += deleters {
				for rotated.Load() < int64(i*rotationsWanted/deletable) {
					time.Sleep(time.Millisecond)
				}
				name := fmt.Sprintf("del-%d", i)
				if _, err := e.call(logical.DeleteOperation, "keys/"+name, nil); err != nil {
					fail("delete %s: %v", name, err)
					continue
				}
				mu.Lock()
				deleted[name] = true
				mu.Unlock()
			}
		}(g)
	}
	wg.Wait()
	close(stop)
	rot.Wait()
	require.Empty(t, failures)
	t.Logf("%d root key rotations, %d keys created, %d deleted", rotated.Load(), len(created), len(deleted))
	require.GreaterOrEqual(t, rotated.Load(), int64(rotationsWanted))
	t.Logf("creations by the number of rotations done: %v", during)
	require.GreaterOrEqual(t, len(during), rotationsWanted-1, "creations went on through the rotations")
	require.Len(t, created, creators*perWorker)
	require.Len(t, deleted, deletable)

	check := func(e *testEnv) {
		t.Helper()
		for name, ct := range created {
			require.Equal(t, name, e.decrypt(t, name, ct, nil), "key %s survives", name)
		}
		require.Equal(t, "from before", e.decrypt(t, "old", oldCT, nil))
		listed := e.do(t, logical.ListOperation, "keys/", nil)
		requireStatus(t, listed, 200, "")
		names := map[string]bool{}
		for _, n := range listed.data["keys"].([]interface{}) {
			names[n.(string)] = true
		}
		for name := range created {
			require.True(t, names[name], "%s is listed", name)
		}
		for name := range deleted {
			require.False(t, names[name], "deleted key %s is listed", name)
			requireStatus(t, e.read(t, "keys/"+name), 404, "")
			for _, p := range []string{policyPrefix, archivePrefix, lifecyclePrefix} {
				entry, err := e.sealed(t).Get(context.Background(), p+name)
				require.NoError(t, err)
				require.Nil(t, entry, "%s%s is back", p, name)
			}
		}
	}
	check(e)
	e = e.restart(t)
	check(e)
	st := e.read(t, "seal/status").data
	require.Equal(t, false, st["rotation_pending"])
	require.Equal(t, "", st["last_error"])
}

// TestAttack7aReplayedPolicyBeforeMinDecryptionVersion: a storage writer
// keeps a copy of a key's policy from before the officer raised
// min_decryption_version, writes it back and restarts the plugin, so that
// ciphertexts of the retired version decrypt again.
func TestAttack7aReplayedPolicyBeforeMinDecryptionVersion(t *testing.T) {
	e := getTestBackend(t)
	v1 := e.encrypt(t, "k", "retired version", nil)
	e.mustWrite(t, "keys/k/rotate", nil)
	v2 := e.encrypt(t, "k", "current version", nil)
	snapshot := rawGet(t, e, "policy/k")
	require.NotNil(t, snapshot)
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 2})
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": v1}), 400, "disallowed by policy (too old)")
	// Before the attack, storage has the property; the snapshot is a
	// sealed value the attacker can copy, not read.
	requireMountSealed(t, e, secretSet{"v1 plaintext": []byte("retired version"), "v2 plaintext": []byte("current version")})

	rawPut(t, e, "policy/k", snapshot)
	e = e.restart(t)
	r := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": v1})
	require.NotContains(t, r.data, "plaintext")
	requireRefused(t, r,
		outcome{400, "disallowed by policy (too old)"},
		outcome{500, "is older than the manifest records"})
	// Whatever the mount does with the current version's ciphertexts,
	// it does not give a wrong plaintext.
	r = e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": v2})
	if r.status == 200 {
		require.Equal(t, "current version", unb64(t, r.data["plaintext"].(string)))
	}
}

// TestAttack7bReplayedDeletedKey: a storage writer keeps a copy of a key's
// entries, and writes them back after the officer deleted the key; old
// ciphertexts would decrypt again.
func TestAttack7bReplayedDeletedKey(t *testing.T) {
	e := getTestBackend(t)
	ct := e.encrypt(t, "d", "should be gone", nil)
	snap := map[string][]byte{}
	require.NoError(t, walkStorage(context.Background(), e.storage, "", func(key string, value []byte) {
		if strings.HasSuffix(key, "/d") {
			snap[key] = bytes.Clone(value)
		}
	}))
	require.Contains(t, snap, "policy/d")
	require.Contains(t, snap, "archive/d")
	e.mustWrite(t, "keys/d/config", map[string]interface{}{"deletion_allowed": true})
	requireStatus(t, e.del(t, "keys/d"), 204, "")

	for k, v := range snap {
		rawPut(t, e, k, v)
	}
	e = e.restart(t)
	refused := []outcome{{500, "was deleted"}, {400, "not found"}}
	r := e.write(t, "decrypt/d", map[string]interface{}{"ciphertext": ct})
	require.NotContains(t, r.data, "plaintext")
	requireRefused(t, r, refused...)
	r = e.read(t, "keys/d")
	require.NotEqual(t, 200, r.status, "the deleted key is back: %v", r.data)
	requireRefused(t, r, refused...)
	r = e.write(t, "encrypt/d", map[string]interface{}{"plaintext": b64("x")})
	requireRefused(t, r, refused...)

	// A rotation clears the replayed copies; a key created afterwards
	// under the name is a new one.
	e.mustWrite(t, "seal/rotate", nil)
	for k := range snap {
		entry, err := e.sealed(t).Get(context.Background(), k)
		require.NoError(t, err)
		require.Nil(t, entry, "%s", k)
	}
	requireStatus(t, e.read(t, "keys/d"), 404, "")
	e.encrypt(t, "d", "new key", nil)
	r = e.write(t, "decrypt/d", map[string]interface{}{"ciphertext": ct})
	requireStatus(t, r, 400, "message authentication failed")
	// After the rotation nothing replayed is left: every entry opens and
	// the manifest accepts it.
	requireMountSealed(t, e, secretSet{"the deleted key's plaintext": []byte("should be gone")})
}

// TestAttack7cReplayedDisabledFlag: the officer suspends a key
// (keys/k/config disabled=true); a storage writer brings back the key's
// lifecycle record from before (an older copy, or its absence when there
// was none) and restarts, to use the key again.
func TestAttack7cReplayedDisabledFlag(t *testing.T) {
	refused := []outcome{{400, "is disabled"}, {500, "the manifest records"}}
	t.Run("older copy", func(t *testing.T) {
		e := getTestBackend(t)
		e.encrypt(t, "k", "x", nil)
		snapshot := rawGet(t, e, lifecyclePrefix+"k")
		require.NotNil(t, snapshot, "an encryption stored the lifecycle record")
		e.mustWrite(t, "keys/k/config", map[string]interface{}{"disabled": true})
		requireStatus(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}), 400, "is disabled")

		rawPut(t, e, lifecyclePrefix+"k", snapshot)
		e = e.restart(t)
		requireRefused(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}), refused...)
	})
	t.Run("no record before", func(t *testing.T) {
		// A key never used has no lifecycle record: the copy from
		// before the suspension is no entry at all.
		e := getTestBackend(t)
		e.mustWrite(t, "keys/k", nil)
		require.Nil(t, rawGet(t, e, lifecyclePrefix+"k"), "no lifecycle record yet")
		e.mustWrite(t, "keys/k/config", map[string]interface{}{"disabled": true})
		require.NotNil(t, rawGet(t, e, lifecyclePrefix+"k"))
		requireStatus(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}), 400, "is disabled")

		rawDelete(t, e, lifecyclePrefix+"k")
		e = e.restart(t)
		requireRefused(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}), refused...)
	})
	t.Run("record deleted", func(t *testing.T) {
		e := getTestBackend(t)
		e.encrypt(t, "k", "x", nil)
		e.mustWrite(t, "keys/k/config", map[string]interface{}{"disabled": true})
		rawDelete(t, e, lifecyclePrefix+"k")
		e = e.restart(t)
		requireRefused(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}), refused...)
	})
}

// encryptionCount reads a key's count of encryptions with version 1, and
// the read's result (not 200 when refused).
func encryptionCount(t *testing.T, e *testEnv, name string) (n float64, r result) {
	t.Helper()
	r = e.read(t, "keys/"+name)
	if r.status != 200 {
		return 0, r
	}
	// A version with no count has none: 0.
	n, _ = r.data["encryptions"].(map[string]interface{})["1"].(float64)
	return n, r
}

// TestAttack7dReplayedUsageCount: a storage writer brings back an older
// lifecycle record (or none) after many encryptions, so that the key's
// count of encryptions goes down and the version outlives its cap.
func TestAttack7dReplayedUsageCount(t *testing.T) {
	batch := make([]interface{}, countBlock+1000)
	for i := range batch {
		batch[i] = map[string]interface{}{"plaintext": b64("x")}
	}
	for _, mode := range []string{"older copy", "record deleted"} {
		t.Run(mode, func(t *testing.T) {
			e := getTestBackend(t)
			e.encrypt(t, "k", "x", nil)
			snapshot := rawGet(t, e, lifecyclePrefix+"k")
			require.NotNil(t, snapshot)
			e.mustWrite(t, "encrypt/k", map[string]interface{}{"batch_input": batch})
			before, r := encryptionCount(t, e, "k")
			requireStatus(t, r, 200, "")
			require.Equal(t, float64(len(batch)+1), before)
			var stored keyLifecycle
			require.NoError(t, json.Unmarshal(func() []byte {
				entry, err := e.sealed(t).Get(context.Background(), lifecyclePrefix+"k")
				require.NoError(t, err)
				return entry.Value
			}(), &stored))
			require.GreaterOrEqual(t, stored.Reserved[1], uint64(before), "the reservation moved past the snapshot's")

			if mode == "older copy" {
				rawPut(t, e, lifecyclePrefix+"k", snapshot)
			} else {
				rawDelete(t, e, lifecyclePrefix+"k")
			}
			e = e.restart(t)
			after, r := encryptionCount(t, e, "k")
			if r.status == 200 {
				require.GreaterOrEqualf(t, after, before, "the count went down from %v to %v", before, after)
				return
			}
			requireRefused(t, r, outcome{400, "the manifest records"}, outcome{500, "the manifest records"})
		})
	}
}

// TestAttack8RefusedPINChange: the officer mistypes the new PIN. The login
// with it fails, and the mount must go on with the old one: HSM-resident
// keys keep working, and a rotation does not find the mount without a
// token.
func TestAttack8RefusedPINChange(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/h", map[string]interface{}{"hsm": true})
	hct := e.encrypt(t, "h", "in the HSM", nil)
	ct := e.encrypt(t, "k", "software", nil)
	before := rawGet(t, e, mountseal.ConfigPath)

	for _, pin := range []string{"0000", "9999"} {
		requireStatus(t, e.write(t, "config/seal", map[string]interface{}{"pin": pin}), 400, "PIN")
		require.Equal(t, before, rawGet(t, e, mountseal.ConfigPath), "the stored PIN is unchanged")
		require.NotNil(t, e.b.seal.CurrentToken(), "the mount has its token")

		r := e.write(t, "encrypt/h", map[string]interface{}{"plaintext": b64("after the mistake")})
		requireStatus(t, r, 200, "")
		require.Equal(t, "after the mistake", e.decrypt(t, "h", r.data["ciphertext"].(string), nil))
		require.Equal(t, "in the HSM", e.decrypt(t, "h", hct, nil))
		require.Equal(t, "software", e.decrypt(t, "k", ct, nil))
		st := e.read(t, "seal/status").data
		require.Equal(t, false, st["sealed"])
		require.Equal(t, "", st["last_error"])
	}
	data := e.mustWrite(t, "seal/rotate", nil)
	require.Equal(t, float64(2), data["root_key_version"])
	require.Equal(t, "in the HSM", e.decrypt(t, "h", hct, nil))
	e.mustWrite(t, "keys/h/rotate", nil)
	require.Equal(t, "in the HSM", e.decrypt(t, "h", hct, nil))
	e = e.restart(t)
	require.Equal(t, "in the HSM", e.decrypt(t, "h", hct, nil))
	require.Equal(t, "software", e.decrypt(t, "k", ct, nil))
}

// makeRawKeys creates AES keys in a token directly through PKCS#11, as an
// HSM administrator would outside the plugin: each label gets the
// attributes of a good KEK with the overrides given.
func makeRawKeys(t *testing.T, token string, keys map[string][]*pkcs11.Attribute) {
	t.Helper()
	lib, err := filepath.EvalSymlinks(softhsmLib)
	require.NoError(t, err)
	p := pkcs11.New(lib)
	require.NotNil(t, p)
	fresh := true
	if err := p.Initialize(); err != nil {
		require.ErrorIs(t, err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED))
		fresh = false
	}
	defer func() {
		// Finalise only an initialisation of ours: the plugin's module
		// may share the library's state.
		if fresh {
			_ = p.Finalize()
		}
	}()
	slots, err := p.GetSlotList(true)
	require.NoError(t, err)
	var slot uint
	found := false
	for _, s := range slots {
		info, err := p.GetTokenInfo(s)
		if err == nil && strings.TrimRight(info.Label, " \x00") == token {
			slot, found = s, true
		}
	}
	require.True(t, found, "token %s", token)
	s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	require.NoError(t, err)
	defer p.CloseSession(s) // the slot's last session: logs out
	if err := p.Login(s, pkcs11.CKU_USER, testPIN); err != nil {
		require.ErrorIs(t, err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN))
	}
	for label, override := range keys {
		tmpl := map[uint]*pkcs11.Attribute{}
		for _, a := range []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		} {
			tmpl[a.Type] = a
		}
		for _, a := range override {
			tmpl[a.Type] = a
		}
		tmpl[pkcs11.CKA_LABEL] = pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)
		var list []*pkcs11.Attribute
		for _, a := range tmpl {
			list = append(list, a)
		}
		_, err := p.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, list)
		require.NoError(t, err, label)
	}
}

// TestAttack9AdoptedKEKChecked: the officer names, as the KEK, a key made
// outside the plugin whose value can leave the token (extractable, not
// sensitive, a derivation base) or that is too weak (AES-128): the sealed
// root keyring would be no safer than that key's value.
func TestAttack9AdoptedKEKChecked(t *testing.T) {
	prefix := uniq(t, "adopted")
	cases := map[string]struct {
		override []*pkcs11.Attribute
		attr     string
	}{
		"extractable":   {[]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true)}, "CKA_EXTRACTABLE=true"},
		"not-sensitive": {[]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false)}, "CKA_SENSITIVE=false"},
		"derive":        {[]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_DERIVE, true)}, "CKA_DERIVE=true"},
		"aes-128":       {[]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 16)}, "CKA_VALUE_LEN=16"},
		"good":          {nil, ""},
	}
	keys := map[string][]*pkcs11.Attribute{}
	for name, c := range cases {
		keys[prefix+"/"+name] = c.override
	}
	makeRawKeys(t, spareToken, keys)

	names := make([]string, 0, len(cases))
	for name := range cases {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		c := cases[name]
		t.Run(name, func(t *testing.T) {
			e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
			cfg := withSeal(map[string]interface{}{"token_label": spareToken, "key_label": prefix + "/" + name})
			if c.attr == "" {
				e.mustWrite(t, "config/seal", cfg)
				require.Equal(t, "x", e.decrypt(t, "k", e.encrypt(t, "k", "x", nil), nil))
				return
			}
			r := e.write(t, "config/seal", cfg)
			requireStatus(t, r, 400, c.attr)
			require.Contains(t, r.errorMessage(), prefix+"/"+name)
			requireStatus(t, e.read(t, "config/seal"), 404, "")
			requireStatus(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}), 400, "config/seal")
			require.Nil(t, rawGet(t, e, mountseal.ConfigPath))

			// Nor as a new KEK for a sealed mount.
			g := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
			g.mustWrite(t, "config/seal", withSeal(map[string]interface{}{"token_label": spareToken, "key_label": prefix + "/good"}))
			before := rawGet(t, g, mountseal.ConfigPath)
			requireStatus(t, g.write(t, "config/seal", map[string]interface{}{"key_label": prefix + "/" + name}), 400, c.attr)
			require.Equal(t, before, rawGet(t, g, mountseal.ConfigPath))
		})
	}
}

// lruLen is the number of entries of a per-key cache.
func lruLen[V any](c *keyCache[V]) int { return c.c.Len() }

// TestAttack10EmergencySealClears: the officer's emergency seal must leave
// nothing in memory that still serves the mount's keys: no keyring, no
// token, no cached key; a neighbouring mount on the same token and PIN is
// not taken down with it.
func TestAttack10EmergencySealClears(t *testing.T) {
	ctx := context.Background()
	e := getTestBackend(t)
	e.mustWrite(t, "keys/h", map[string]interface{}{"hsm": true})
	ct := e.encrypt(t, "k", "software", nil)
	hct := e.encrypt(t, "h", "in the HSM", nil)
	other := getTestBackend(t)
	other.mustWrite(t, "keys/h", map[string]interface{}{"hsm": true})
	otherWorks := func() {
		t.Helper()
		for _, k := range []string{"k", "h"} {
			require.Equal(t, "neighbour "+k, other.decrypt(t, k, other.encrypt(t, k, "neighbour "+k, nil), nil))
		}
	}
	otherWorks()

	// Before: the caches hold the keys (the positive control of the
	// checks below).
	lookup := func() *keysutil.Policy {
		p, _, err := e.b.lm.GetPolicy(ctx, keysutil.PolicyRequest{Storage: &logical.InmemStorage{}, Name: "k"}, rand.Reader)
		require.NoError(t, err)
		return p
	}
	require.NotNil(t, lookup(), "the policy cache holds k")
	require.Positive(t, lruLen(e.b.aeads.c))
	require.Positive(t, e.b.hsmKeys.CacheLen())
	require.Positive(t, lruLen(e.b.lifecycle.cache))
	ring := e.b.seal.Snapshot().Sealer().Keyring()

	require.Equal(t, true, e.mustWrite(t, "seal/seal", nil)["sealed"])
	snap := e.b.seal.Snapshot()
	require.Nil(t, snap.Sealer(), "no keyring in the state")
	require.Nil(t, snap.Meta())
	require.Nil(t, e.b.seal.CurrentToken(), "no token")
	require.Nil(t, e.b.seal.TokenUnderLockForTest())
	require.Nil(t, lookup(), "the policy cache is empty")
	require.Zero(t, lruLen(e.b.aeads.c), "the AEAD cache is empty")
	require.Zero(t, e.b.hsmKeys.CacheLen())
	require.Zero(t, lruLen(e.b.lifecycle.cache))
	wiped, err := ring.Marshal()
	require.NoError(t, err)
	var stored struct {
		Keys map[string][]byte `json:"keys"`
	}
	require.NoError(t, json.Unmarshal(wiped, &stored))
	for v, k := range stored.Keys {
		require.Equal(t, make([]byte, len(k)), k, "root key version %s is wiped", v)
	}

	otherWorks()
	for _, p := range []string{"decrypt/k", "decrypt/h"} {
		r := e.write(t, p, map[string]interface{}{"ciphertext": map[string]string{"decrypt/k": ct, "decrypt/h": hct}[p]})
		requireStatus(t, r, 503, "emergency seal")
		require.NotContains(t, r.data, "plaintext")
	}
	requireStatus(t, e.write(t, "encrypt/h", map[string]interface{}{"plaintext": b64("x")}), 503, "emergency seal")
	require.Nil(t, lookup(), "a refused request loads nothing")
	otherWorks()

	e.mustWrite(t, "seal/unseal", nil)
	require.Equal(t, "software", e.decrypt(t, "k", ct, nil))
	require.Equal(t, "in the HSM", e.decrypt(t, "h", hct, nil))
	otherWorks()
}

// timedWrite is e.write that also returns how long the request took.
func timedWrite(t *testing.T, e *testEnv, path string, data map[string]interface{}) (result, time.Duration) {
	t.Helper()
	start := time.Now()
	r := e.write(t, path, data)
	return r, time.Since(start)
}

// TestAttack11aPINFiles: whoever writes config/seal names, as the PIN file,
// an endless device, a huge file or a FIFO in an allowed place: the plugin
// must not read without bound nor hang (config/seal holds the seal's lock).
func TestAttack11aPINFiles(t *testing.T) {
	dir := t.TempDir()
	t.Setenv(mountseal.PINFilesAllowEnv, "/dev/zero:/dev/urandom:"+dir)
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	big := filepath.Join(dir, "big")
	require.NoError(t, os.WriteFile(big, bytes.Repeat([]byte("1"), 1<<20), 0o600))
	for _, p := range []string{"/dev/zero", "/dev/urandom", big} {
		r, took := timedWrite(t, e, "config/seal", withSeal(map[string]interface{}{"pin": "file://" + p}))
		requireStatus(t, r, 400, "the PIN source file://"+p+" is not allowed or cannot be read")
		require.Less(t, took, 2*time.Second, "%s", p)
		requireStatus(t, e.read(t, "config/seal"), 404, "")
	}

	t.Run("fifo", func(t *testing.T) {
		fifo := filepath.Join(dir, "fifo")
		require.NoError(t, syscall.Mkfifo(fifo, 0o600))
		done := make(chan result, 1)
		req := &logical.Request{Operation: logical.UpdateOperation, Path: "config/seal", Storage: e.storage,
			Data: withSeal(map[string]interface{}{"pin": "file://" + fifo})}
		go func() {
			resp, err := e.b.HandleRequest(context.Background(), req)
			done <- result{resp: resp, err: err}
		}()
		var r result
		select {
		case r = <-done:
		case <-time.After(3 * time.Second):
			// Unblock the plugin's open of the FIFO, so that the test
			// ends, then fail.
			for i := 0; i < 100; i++ {
				w, err := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0)
				if err == nil {
					w.Close()
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			<-done
			t.Fatalf("config/seal with pin=file://%s hung for 3 s (holding the seal's lock)", fifo)
		}
		r = toResult(t, req, r.resp, r.err)
		requireStatus(t, r, 400, "is not allowed or cannot be read")
	})

	pinFile := filepath.Join(dir, "pin")
	require.NoError(t, os.WriteFile(pinFile, []byte(testPIN+"\n"), 0o600))
	e.mustWrite(t, "config/seal", withSeal(map[string]interface{}{"pin": "file://" + pinFile}))
	require.Equal(t, "file", e.read(t, "config/seal").data["pin_source"])
	require.Equal(t, "x", e.decrypt(t, "k", e.encrypt(t, "k", "x", nil), nil))
	require.NotContains(t, string(rawGet(t, e, mountseal.ConfigPath)), testPIN)
}

// TestAttack11bPINSourcesTellNothing: without an allowlist, whoever writes
// config/seal tries the plugin's files and environment variables as PIN
// sources, to learn which exist, or to have the token try their contents.
func TestAttack11bPINSourcesTellNothing(t *testing.T) {
	t.Setenv(mountseal.PINFilesAllowEnv, "")
	t.Setenv(mountseal.PINEnvAllowEnv, "")
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	shape := func(ref string) string {
		r := e.write(t, "config/seal", withSeal(map[string]interface{}{"pin": ref}))
		requireStatus(t, r, 400, ref)
		requireStatus(t, e.read(t, "config/seal"), 404, "")
		return strings.ReplaceAll(r.errorMessage(), ref, "<ref>")
	}
	want := shape("file:///nonexistent/pin")
	for _, ref := range []string{"file:///etc/shadow", "file:///etc/passwd", "file:///proc/self/environ", "file:///dev/null", "file:///etc/../etc/passwd"} {
		require.Equal(t, want, shape(ref), ref)
	}
	t.Setenv("HSM_TRANSIT_SURELY_UNSET", "")
	want = shape("env://HSM_TRANSIT_SURELY_UNSET")
	for _, ref := range []string{"env://PATH", "env://HOME", "env://SOFTHSM2_CONF", "env://" + mountseal.PINFilesAllowEnv} {
		require.Equal(t, want, shape(ref), ref)
	}
	t.Setenv("HSM_PIN", "")
	require.Equal(t, want, shape("env://HSM_PIN"), "allowed but unset")

	t.Setenv("HSM_PIN", testPIN)
	e.mustWrite(t, "config/seal", withSeal(map[string]interface{}{"pin": "env://HSM_PIN"}))
	require.Equal(t, "env", e.read(t, "config/seal").data["pin_source"])
	require.Equal(t, "x", e.decrypt(t, "k", e.encrypt(t, "k", "x", nil), nil))
}

// TestAttack11cLabels: labels no token can carry, one of a megabyte, or
// with control characters.
func TestAttack11cLabels(t *testing.T) {
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	for _, tc := range []struct {
		field, value, msg string
	}{
		{"key_label", strings.Repeat("a", 1<<20), "key label: is 1048576 bytes long"},
		{"key_label", "\x00", "key label: has the character U+0000"},
		{"key_label", "a\nb", "key label: has the character U+000A"},
		{"key_label", "", "missing [key_label]"},
		{"token_label", strings.Repeat("t", 33), "token label: is 33 bytes long"},
		{"token_label", "a\x00", "token label: has the character U+0000"},
	} {
		r := e.write(t, "config/seal", withSeal(map[string]interface{}{tc.field: tc.value, "generate_key": true}))
		requireStatus(t, r, 400, tc.msg)
		require.Less(t, len(r.errorMessage()), 1000, "the message does not echo the label")
		requireStatus(t, e.read(t, "config/seal"), 404, "")
	}
	// Nor on a sealed mount.
	g := getTestBackend(t)
	before := rawGet(t, g, mountseal.ConfigPath)
	requireStatus(t, g.write(t, "config/seal", map[string]interface{}{"key_label": strings.Repeat("a", 1<<20), "generate_key": true}), 400, "key label")
	require.Equal(t, before, rawGet(t, g, mountseal.ConfigPath))
}

// TestAttack11dLibrarySpellings: every spelling of the allowed library is
// one library, stored resolved; a directory is not a library.
func TestAttack11dLibrarySpellings(t *testing.T) {
	real, err := filepath.EvalSymlinks(softhsmLib)
	require.NoError(t, err)
	for _, lib := range []string{
		"/usr/lib/softhsm/../softhsm/libsofthsm2.so",
		"//usr/lib/softhsm/libsofthsm2.so",
		"/usr/lib/softhsm/./libsofthsm2.so",
		real,
	} {
		t.Run(lib, func(t *testing.T) {
			if _, err := os.Stat(lib); err != nil {
				t.Skipf("%s is not on this system", lib)
			}
			e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
			data := e.mustWrite(t, "config/seal", withSeal(map[string]interface{}{"library": lib}))
			require.Equal(t, real, data["library"])
			require.Equal(t, real, e.read(t, "config/seal").data["library"])
			require.Equal(t, real, storedSealConfig(t, e).Library)
			require.Equal(t, "x", e.decrypt(t, "k", e.encrypt(t, "k", "x", nil), nil))
		})
	}
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	for _, lib := range []string{"/usr/lib/softhsm/", "/usr/lib/softhsm", "/usr/lib/softhsm/libsofthsm2.so/"} {
		r := e.write(t, "config/seal", withSeal(map[string]interface{}{"library": lib}))
		require.Equal(t, 400, r.status, "%s: %s", lib, r.errorMessage())
		require.Contains(t, r.errorMessage(), lib)
		requireStatus(t, e.read(t, "config/seal"), 404, "")
	}
}

// TestAttack11eNoSuchToken: a token label or slot that names nothing is the
// caller's mistake (400), not an outage (503), and configures nothing.
func TestAttack11eNoSuchToken(t *testing.T) {
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	cases := []struct {
		data map[string]interface{}
		msg  string
	}{
		{withSeal(map[string]interface{}{"token_label": "no-such-token"}), `no token labelled "no-such-token"`},
		{withSeal(map[string]interface{}{"token_label": nil, "slot": 99999}), "no token in slot 99999"},
		{withSeal(map[string]interface{}{"token_label": nil, "slot": 1 << 32}), "slot 4294967296 is out of range"},
	}
	for _, tc := range cases {
		requireStatus(t, e.write(t, "config/seal", tc.data), 400, tc.msg)
		requireStatus(t, e.read(t, "config/seal"), 404, "")
		require.Nil(t, rawGet(t, e, mountseal.ConfigPath))
		st := e.read(t, "seal/status").data
		require.Equal(t, false, st["configured"])
	}
	// On a sealed mount the new settings are refused the same way, and
	// the mount keeps working.
	g := getTestBackend(t)
	ct := g.encrypt(t, "k", "kept", nil)
	before := rawGet(t, g, mountseal.ConfigPath)
	for _, tc := range cases {
		data := map[string]interface{}{}
		for k, v := range tc.data {
			if k == "token_label" || k == "slot" {
				data[k] = v
			}
		}
		requireStatus(t, g.write(t, "config/seal", data), 400, tc.msg)
		require.Equal(t, before, rawGet(t, g, mountseal.ConfigPath))
		require.Equal(t, "kept", g.decrypt(t, "k", ct, nil))
	}
}

// TestAttack11fRestoreOnHealthyMount: the officer runs a recovery restore,
// with valid shares, on a mount whose HSM works: it would move the mount to
// another KEK and list working HSM-resident keys as lost.
func TestAttack11fRestoreOnHealthyMount(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/h", map[string]interface{}{"hsm": true})
	hct := e.encrypt(t, "h", "in the HSM", nil)
	out := e.mustWrite(t, "seal/recovery/init", map[string]interface{}{"shares": 3, "threshold": 2})
	var shares []string
	for _, s := range out["shares"].([]interface{}) {
		shares = append(shares, s.(string))
	}
	before := rawGet(t, e, mountseal.ConfigPath)
	newKEK := uniq(t, "kek-11f")
	r := e.write(t, "seal/recovery/restore", map[string]interface{}{"shares": shares[:2], "key_label": newKEK, "generate_key": true})
	requireStatus(t, r, 400, "the mount is unsealed: its HSM works")
	require.NotContains(t, r.data, "hsm_keys_lost")
	require.Equal(t, before, rawGet(t, e, mountseal.ConfigPath))
	has, err := openTestToken(t).HasKey(newKEK)
	require.NoError(t, err)
	require.False(t, has)
	require.Equal(t, "in the HSM", e.decrypt(t, "h", hct, nil))
	require.Equal(t, "again", e.decrypt(t, "h", e.encrypt(t, "h", "again", nil), nil))

	// After a restart, while the mount unseals by itself: the same.
	e = e.restart(t)
	r = e.write(t, "seal/recovery/restore", map[string]interface{}{"shares": shares[1:], "key_label": newKEK, "generate_key": true})
	requireRefused(t, r, outcome{400, "the mount is unsealed"}, outcome{400, "the mount's HSM still opens its root keyring"})
	require.Equal(t, before, rawGet(t, e, mountseal.ConfigPath))
	require.Equal(t, "in the HSM", e.decrypt(t, "h", hct, nil))
}
