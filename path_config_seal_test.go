package hsmtransit

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
	sealpkg "github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

func withSeal(overrides map[string]interface{}) map[string]interface{} {
	cfg := testSealConfig()
	for k, v := range overrides {
		if v == nil {
			delete(cfg, k)
		} else {
			cfg[k] = v
		}
	}
	return cfg
}

func TestUnconfiguredMountNamesConfigSeal(t *testing.T) {
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	for _, tc := range []struct {
		op   logical.Operation
		path string
		data map[string]interface{}
	}{
		{logical.UpdateOperation, "keys/k", nil},
		{logical.ReadOperation, "keys/k", nil},
		{logical.ListOperation, "keys/", nil},
		{logical.UpdateOperation, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}},
		{logical.UpdateOperation, "decrypt/k", map[string]interface{}{"ciphertext": "vault:v1:AAAA"}},
		{logical.UpdateOperation, "datakey/plaintext/k", nil},
		{logical.UpdateOperation, "sign/k", map[string]interface{}{"input": b64("x")}},
		{logical.UpdateOperation, "config/keys", nil},
		{logical.ReadOperation, "cache-config", nil},
		{logical.ReadOperation, "backup/k", nil},
		{logical.UpdateOperation, "seal/rotate", nil},
	} {
		r := e.do(t, tc.op, tc.path, tc.data)
		requireStatus(t, r, 400, "config/seal")
	}
	// Paths that use no key work unsealed.
	requireStatus(t, e.write(t, "hash", map[string]interface{}{"input": b64("x")}), 200, "")
	requireStatus(t, e.write(t, "random", nil), 200, "")

	st := e.read(t, "seal/status")
	requireStatus(t, st, 200, "")
	require.Equal(t, false, st.data["configured"])
	require.Equal(t, true, st.data["sealed"])
	requireStatus(t, e.read(t, "config/seal"), 404, "")
}

func TestConfigSealErrors(t *testing.T) {
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	cases := []struct {
		name string
		data map[string]interface{}
		msg  string
	}{
		{"nothing", map[string]interface{}{}, "missing [library token_label (or slot) pin key_label]"},
		{"no pin", withSeal(map[string]interface{}{"pin": nil}), "missing [pin]"},
		{"library not allowed", withSeal(map[string]interface{}{"library": "/tmp/evil.so"}), "is not allowed"},
		{"relative library", withSeal(map[string]interface{}{"library": "libsofthsm2.so"}), "absolute path"},
		{"label and slot", withSeal(map[string]interface{}{"slot": 0}), "not both"},
		{"negative slot", withSeal(map[string]interface{}{"token_label": nil, "slot": -1}), "slot -1 is out of range"},
		{"slot too large", withSeal(map[string]interface{}{"token_label": nil, "slot": 1 << 32}), "slot 4294967296 is out of range"},
		{"env PIN not allowed", withSeal(map[string]interface{}{"pin": "env://HSM_TRANSIT_NO_SUCH_VAR"}), "env://HSM_TRANSIT_NO_SUCH_VAR is not allowed or not set"},
		{"PIN file not allowed", withSeal(map[string]interface{}{"pin": "file:///nonexistent/pin"}), "file:///nonexistent/pin is not allowed or cannot be read"},
		{"wrong PIN", withSeal(map[string]interface{}{"pin": "0000"}), "PIN refused"},
		{"missing KEK", withSeal(map[string]interface{}{"key_label": "no-such-kek"}), "generate_key=true"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			requireStatus(t, e.write(t, "config/seal", tc.data), 400, tc.msg)
			requireStatus(t, e.read(t, "config/seal"), 404, "")
		})
	}
	t.Run("token not present", func(t *testing.T) {
		// Nothing gets configured: the caller's to fix, not an outage.
		r := e.write(t, "config/seal", withSeal(map[string]interface{}{"token_label": "not-plugged-in"}))
		requireStatus(t, r, 400, "no token labelled")
	})
}

func TestConfigSealReadHidesPIN(t *testing.T) {
	e := getTestBackend(t)
	r := e.read(t, "config/seal")
	requireStatus(t, r, 200, "")
	realLib, err := filepath.EvalSymlinks(softhsmLib)
	require.NoError(t, err)
	require.Equal(t, map[string]interface{}{
		"library": realLib, "token_label": testToken, "key_label": testKEK, "mechanism": "aes-gcm",
		"hsm_timeout": float64(5), "pin_set": true, "pin_source": "value", "root_key_version": float64(1),
	}, r.data)

	st := e.read(t, "seal/status").data
	require.Equal(t, true, st["configured"])
	require.Equal(t, false, st["sealed"])
	require.Equal(t, "", st["last_error"])
	require.Equal(t, testKEK, st["key_label"])
	require.Equal(t, float64(1), st["root_key_version"])
	all, err := json.Marshal([]interface{}{st, r.data})
	require.NoError(t, err)
	require.NotContains(t, string(all), testPIN)
}

// TestStorageHoldsNoKeyMaterial exports a key's bytes, then checks the
// sealed-storage property with them: they are in no stored entry, raw or
// encoded, and every entry but seal/config opens only under the root key.
func TestStorageHoldsNoKeyMaterial(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/exp", map[string]interface{}{"exportable": true, "allow_plaintext_backup": true})
	e.mustWrite(t, "keys/exp/rotate", nil)
	e.mustWrite(t, "keys/exp/config", map[string]interface{}{"min_decryption_version": 2, "min_encryption_version": 2})
	e.mustWrite(t, "keys/exp/trim", map[string]interface{}{"min_available_version": 1})
	e.mustWrite(t, "keys/mac", map[string]interface{}{"type": "hmac", "exportable": true})
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})
	e.encrypt(t, "hk", "plaintext for the HSM key", nil)
	secrets := secretSet{}
	for v, k := range exportKeys(t, e, "encryption-key/exp") {
		secrets.AddExported(t, "exp v"+v, k)
	}
	secrets.AddExported(t, "mac v1", exportKeys(t, e, "hmac-key/mac")["1"])
	secrets.Add(t, "the HSM key's plaintext", []byte("plaintext for the HSM key"))

	check := requireMountSealed(t, e, secrets)
	require.Contains(t, check.opened, "policy/exp")
	require.Contains(t, check.opened, "archive/exp")
	require.Contains(t, check.opened, "hsm/keys/hk")
	require.Equal(t, []string{"seal/config"}, check.plain)
}

func walkStorage(ctx context.Context, s logical.Storage, prefix string, f func(key string, value []byte)) error {
	keys, err := s.List(ctx, prefix)
	if err != nil {
		return err
	}
	for _, k := range keys {
		if strings.HasSuffix(k, "/") {
			if err := walkStorage(ctx, s, prefix+k, f); err != nil {
				return err
			}
			continue
		}
		e, err := s.Get(ctx, prefix+k)
		if err != nil {
			return err
		}
		f(prefix+k, e.Value)
	}
	return nil
}

func TestRestartUnsealsByItself(t *testing.T) {
	e := getTestBackend(t)
	ct := e.encrypt(t, "k", "kept", nil)
	e = e.restart(t)
	require.Equal(t, "kept", e.decrypt(t, "k", ct, nil))
	require.Equal(t, false, e.read(t, "seal/status").data["sealed"])
}

func TestStorageFromAnotherMountDoesNotUnseal(t *testing.T) {
	e := getTestBackend(t)
	e.encrypt(t, "k", "x", nil)
	other := startBackend(t, e.storage, newMountUUID(t))
	r := other.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x")})
	requireStatus(t, r, 503, "does not open this mount's root keyring")
	require.Contains(t, other.read(t, "seal/status").data["last_error"], "does not open")
}

func TestKEKRotationBySealConfig(t *testing.T) {
	e := getTestBackend(t)
	ct := e.encrypt(t, "k", "survives KEK changes", nil)
	before := policyBytes(t, e)

	r := e.write(t, "config/seal", map[string]interface{}{"key_label": "kek-next"})
	requireStatus(t, r, 400, "generate_key=true")
	data := e.mustWrite(t, "config/seal", map[string]interface{}{"key_label": "kek-next", "generate_key": true})
	require.Equal(t, "kek-next", data["key_label"])
	require.Equal(t, before, policyBytes(t, e), "no entry is re-encrypted")
	require.Equal(t, "survives KEK changes", e.decrypt(t, "k", ct, nil), "no downtime")

	// After a restart the new KEK unseals; the old one is no longer needed.
	e = e.restart(t)
	require.Equal(t, "survives KEK changes", e.decrypt(t, "k", ct, nil))
	require.Equal(t, "kek-next", e.read(t, "seal/status").data["key_label"])
	tok, err := hsm.Open(hsm.Config{Library: softhsmLib, TokenLabel: testToken, PIN: testPIN})
	require.NoError(t, err)
	defer tok.Close()
	require.NoError(t, tok.DestroyKey("kek-next"))
	e = e.restart(t)
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 503, `no AES key labelled "kek-next"`)
}

// policyBytes returns the raw, sealed policy entry of key k.
func policyBytes(t *testing.T, e *testEnv) []byte {
	t.Helper()
	entry, err := e.storage.Get(context.Background(), "policy/k")
	require.NoError(t, err)
	return entry.Value
}

func TestSealRotate(t *testing.T) {
	e := getTestBackend(t)
	cts := map[string]string{}
	for _, k := range []string{"a", "b", "c"} {
		cts[k] = e.encrypt(t, k, "data of "+k, nil)
	}
	e.mustWrite(t, "config/keys", map[string]interface{}{"disable_upsert": true})

	data := e.mustWrite(t, "seal/rotate", nil)
	require.Equal(t, float64(2), data["root_key_version"])
	require.Equal(t, float64(11), data["entries_resealed"], "3 policies, 3 archives, 3 lifecycle records, config/keys, the sealed seal state")
	require.NoError(t, walkStorage(context.Background(), e.storage, "", func(key string, value []byte) {
		if v, ok := sealpkg.SealedVersion(value); ok {
			require.Equal(t, uint32(2), v, key)
		}
	}))
	for k, ct := range cts {
		require.Equal(t, "data of "+k, e.decrypt(t, k, ct, nil))
	}
	st := e.read(t, "seal/status").data
	require.Equal(t, float64(2), st["root_key_version"])
	require.Equal(t, false, st["rotation_pending"])
	secrets := secretSet{}
	for k := range cts {
		secrets.Add(t, "plaintext of "+k, []byte("data of "+k))
	}
	check := requireMountSealed(t, e, secrets)
	require.Len(t, check.opened, 11, "every resealed entry opens under the new root key")
	e = e.restart(t)
	for k, ct := range cts {
		require.Equal(t, "data of "+k, e.decrypt(t, k, ct, nil))
	}
	require.Equal(t, true, e.read(t, "config/keys").data["disable_upsert"])
}

// crashingStorage fails every write after the first n, as a process killed
// in the middle of a rotation would leave storage. It counts the writes it
// let through.
type crashingStorage struct {
	logical.Storage
	mu      sync.Mutex
	allowed int
	puts    int
	refused int
}

var errCrashed = errors.New("simulated crash")

func (c *crashingStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.allowed <= 0 {
		c.refused++
		return errCrashed
	}
	c.allowed--
	c.puts++
	return c.Storage.Put(ctx, e)
}

// rotateThrough writes seal/rotate with storage that allows that many
// writes, and returns the storage (its counts) and whether the rotation
// failed.
func rotateThrough(t *testing.T, e *testEnv, allowed int) (*crashingStorage, bool) {
	t.Helper()
	crashing := &crashingStorage{Storage: e.storage, allowed: allowed}
	resp, err := e.b.HandleRequest(context.Background(), &logical.Request{
		Operation: logical.UpdateOperation, Path: "seal/rotate", Storage: crashing,
	})
	return crashing, err != nil || (resp != nil && resp.IsError())
}

// TestSealRotateCrashSafe crashes the rotation after every possible number
// of writes: the next start reads every entry and finishes the rotation.
// The number of writes a rotation makes is counted on one that does not
// crash, so that the loop reaches every crash point however many entries
// a rotation writes.
func TestSealRotateCrashSafe(t *testing.T) {
	setup := func() (*testEnv, map[string]string) {
		e := getTestBackend(t)
		cts := map[string]string{}
		for _, k := range []string{"a", "b", "c"} {
			cts[k] = e.encrypt(t, k, "data of "+k, nil)
		}
		return e, cts
	}

	e, _ := setup()
	counted, crashed := rotateThrough(t, e, 1<<30)
	require.False(t, crashed, "a rotation with storage that takes every write")
	writes := counted.puts
	// seal/config twice (the keyring with both versions, then pruned),
	// the 10 entries resealed (3 policies, 3 archives, 3 lifecycle
	// records, the sealed seal state) and the manifest that records them.
	require.GreaterOrEqual(t, writes, 12, "a rotation writes at least its entries and the keyring twice")
	require.Equal(t, 2, int(e.read(t, "seal/status").data["root_key_version"].(float64)))
	t.Logf("a rotation makes %d writes", writes)

	for crashAfter := 0; crashAfter < writes; crashAfter++ {
		e, cts := setup()
		crashing, crashed := rotateThrough(t, e, crashAfter)
		require.True(t, crashed, "crash after %d of %d writes: the rotation reports the failure", crashAfter, writes)
		require.Equal(t, crashAfter, crashing.puts, "crash after %d of %d writes", crashAfter, writes)
		require.Positive(t, crashing.refused, "crash after %d of %d writes: a write was refused", crashAfter, writes)

		e = e.restart(t)
		for k, ct := range cts {
			require.Equal(t, "data of "+k, e.decrypt(t, k, ct, nil), "crash after %d writes", crashAfter)
		}
		require.Eventually(t, func() bool {
			return e.read(t, "seal/status").data["rotation_pending"] == false
		}, 10*time.Second, 50*time.Millisecond, "crash after %d writes: the rotation completes after the restart", crashAfter)
		// No write: the keyring with the new version never got stored,
		// and the old root key stays. Any write: the first is that
		// keyring, and the restart finishes the rotation to version 2.
		want := 2.0
		if crashAfter == 0 {
			want = 1.0
		}
		require.Equal(t, want, e.read(t, "seal/status").data["root_key_version"], "crash after %d writes", crashAfter)
		if crashAfter > 0 {
			require.NoError(t, walkStorage(context.Background(), e.storage, "", func(key string, value []byte) {
				if v, ok := sealpkg.SealedVersion(value); ok {
					require.Equal(t, uint32(2), v, "crash after %d writes: %s resealed after the restart", crashAfter, key)
				}
			}))
		}
	}
}

func TestTwoMountsOneProcess(t *testing.T) {
	a, b := getTestBackend(t), getTestBackend(t)
	a.mustWrite(t, "keys/shared", nil)
	b.mustWrite(t, "keys/shared", nil)
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := 0; i < 50; i++ {
		for _, e := range []*testEnv{a, b} {
			wg.Add(1)
			go func(e *testEnv) {
				defer wg.Done()
				resp, err := e.call(logical.UpdateOperation, "encrypt/shared", map[string]interface{}{"plaintext": b64("x")})
				if err != nil {
					errs <- err
					return
				}
				if _, err := e.call(logical.UpdateOperation, "decrypt/shared", map[string]interface{}{"ciphertext": resp.Data["ciphertext"]}); err != nil {
					errs <- err
				}
			}(e)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// Each mount has its own root key: one's ciphertexts are not the other's.
	ct := a.encrypt(t, "shared", "mine", nil)
	requireStatus(t, b.write(t, "decrypt/shared", map[string]interface{}{"ciphertext": ct}), 400, "message authentication failed")
}

// TestTokenOutageAndRecovery restarts the plugin with the token gone: key
// operations answer 503; once the token is back the mount unseals by itself.
func TestTokenOutageAndRecovery(t *testing.T) {
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	e.mustWrite(t, "config/seal", withSeal(map[string]interface{}{"token_label": outageToken, "key_label": "outage-kek", "generate_key": true}))
	ct := e.encrypt(t, "k", "after the outage", nil)

	dir, err := softhsm.TokenDir(softhsmConf, outageToken)
	require.NoError(t, err)
	aside := filepath.Join(t.TempDir(), "aside")
	require.NoError(t, os.Rename(dir, aside))
	e = e.restart(t)
	for _, p := range []string{"decrypt/k", "encrypt/k"} {
		r := e.write(t, p, map[string]interface{}{"ciphertext": ct, "plaintext": b64("x")})
		requireStatus(t, r, 503, "unseals by itself when the HSM is back")
	}
	st := e.read(t, "seal/status").data
	require.Equal(t, true, st["sealed"])
	require.Contains(t, st["last_error"], "no token labelled")

	require.NoError(t, os.Rename(aside, dir))
	require.Eventually(t, func() bool {
		return e.b.seal.Snapshot().Phase() == mountseal.PhaseUnsealed
	}, 60*time.Second, 100*time.Millisecond, "the mount unseals by itself")
	require.Equal(t, "after the outage", e.decrypt(t, "k", ct, nil))
}

func TestWrongPINAfterRestartIsNotRetried(t *testing.T) {
	t.Setenv("HSM_TRANSIT_TEST_PIN", testPIN)
	t.Setenv(mountseal.PINEnvAllowEnv, "HSM_TRANSIT_TEST_PIN")
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	e.mustWrite(t, "config/seal", withSeal(map[string]interface{}{"pin": "env://HSM_TRANSIT_TEST_PIN"}))
	require.Equal(t, "env", e.read(t, "config/seal").data["pin_source"])
	ct := e.encrypt(t, "k", "x", nil)

	t.Setenv("HSM_TRANSIT_TEST_PIN", "0000")
	e = e.restart(t)
	r := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
	requireStatus(t, r, 503, "PIN refused")
	requireStatus(t, r, 503, "fix config/seal")
	first := e.b.seal.Snapshot()
	require.True(t, first.Permanent())
	for i := 0; i < 5; i++ {
		requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 503, "PIN refused")
	}
	require.Same(t, first, e.b.seal.Snapshot(), "no further attempt: the state is untouched")

	// Fixing the PIN in config/seal unseals.
	e.mustWrite(t, "config/seal", map[string]interface{}{"pin": testPIN})
	require.Equal(t, "x", e.decrypt(t, "k", ct, nil))
}

// TestSealingTakesOverBuiltinStorage seals a mount whose storage already
// holds keys written the way built-in transit writes them (a drop-in
// replacement): they are encrypted in place and keep working.
func TestSealingTakesOverBuiltinStorage(t *testing.T) {
	ctx := context.Background()
	s := &logical.InmemStorage{}
	lm, err := keysutil.NewLockManager(true, 0)
	require.NoError(t, err)
	p, _, err := lm.GetPolicy(ctx, keysutil.PolicyRequest{Upsert: true, Storage: s, Name: "legacy", KeyType: keysutil.KeyType_AES256_GCM96}, rand.Reader)
	require.NoError(t, err)
	ct, err := p.Encrypt(0, nil, nil, b64("from built-in"))
	require.NoError(t, err)

	e := startBackend(t, s, newMountUUID(t))
	data := e.mustWrite(t, "config/seal", testSealConfig())
	require.Equal(t, float64(2), data["entries_encrypted"], "policy and archive")
	require.Equal(t, "from built-in", e.decrypt(t, "legacy", ct, nil))
	raw, err := s.Get(ctx, "policy/legacy")
	require.NoError(t, err)
	require.True(t, sealpkg.IsSealed(raw.Value))
}
