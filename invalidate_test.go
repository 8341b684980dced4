package hsmtransit

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/helper/consts"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
)

// These tests run two backends over one storage: an active node, whose
// writes are recorded, and a performance standby (read-only storage, the
// replication state says so), which hears of each write only through
// Invalidate, as Vault delivers it. What the active node changes must be in
// force on the standby once the invalidations arrive, without a reload.

// writeRecorder records the keys written or deleted through it.
type writeRecorder struct {
	logical.Storage
	mu   sync.Mutex
	keys []string
}

func (r *writeRecorder) Put(ctx context.Context, e *logical.StorageEntry) error {
	r.mu.Lock()
	r.keys = append(r.keys, e.Key)
	r.mu.Unlock()
	return r.Storage.Put(ctx, e)
}

func (r *writeRecorder) Delete(ctx context.Context, key string) error {
	r.mu.Lock()
	r.keys = append(r.keys, key)
	r.mu.Unlock()
	return r.Storage.Delete(ctx, key)
}

// take returns the keys recorded since the last call.
func (r *writeRecorder) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := r.keys
	r.keys = nil
	return k
}

// readOnlyStorage is a performance standby's view: writes are refused, and
// Vault forwards the request to the active node.
type readOnlyStorage struct{ logical.Storage }

func (readOnlyStorage) Put(context.Context, *logical.StorageEntry) error { return logical.ErrReadOnly }
func (readOnlyStorage) Delete(context.Context, string) error             { return logical.ErrReadOnly }

type standbyPair struct {
	active, standby *testEnv
	rec             *writeRecorder
}

func startStandbyPair(t *testing.T) *standbyPair {
	t.Helper()
	mem := &logical.InmemStorage{}
	mount := newMountUUID(t)
	rec := &writeRecorder{Storage: mem}
	active := startBackend(t, rec, mount)
	active.mustWrite(t, "config/seal", testSealConfig())

	conf := logical.TestBackendConfig()
	conf.Logger = hclog.NewNullLogger()
	conf.StorageView = nil
	conf.BackendUUID = mount
	conf.System.(*logical.StaticSystemView).ReplicationStateVal = consts.ReplicationPerformanceStandby
	lb, err := Factory(context.Background(), conf)
	require.NoError(t, err)
	b := lb.(*backend)
	ro := readOnlyStorage{mem}
	require.NoError(t, b.Initialize(context.Background(), &logical.InitializationRequest{Storage: ro}))
	t.Cleanup(func() { b.Cleanup(context.Background()) })
	return &standbyPair{active: active, standby: &testEnv{b: b, storage: ro, mountUUID: mount}, rec: rec}
}

// deliver hands the standby the invalidations of the active node's writes
// since the last delivery, and returns how many.
func (p *standbyPair) deliver() int {
	keys := p.rec.take()
	for _, k := range keys {
		p.standby.b.invalidate(context.Background(), k)
	}
	// Reloads run in the background: once they end, the standby has seen
	// storage as it was at delivery, not some later state.
	p.standby.b.seal.WaitReloadsForTest()
	return len(keys)
}

// eventually waits for the standby to reach a state.
func eventually(t *testing.T, what string, f func() bool) {
	t.Helper()
	require.Eventually(t, f, 10*time.Second, 20*time.Millisecond, what)
}

func TestInvalidateOnStandby(t *testing.T) {
	p := startStandbyPair(t)
	a, s := p.active, p.standby
	p.rec.take()
	a.mustWrite(t, "keys/k1", nil)
	ct1 := a.encrypt(t, "k1", "version one", nil)
	p.deliver()
	require.Equal(t, "version one", s.decrypt(t, "k1", ct1, nil), "the standby unseals from the HSM and reads the active node's key")

	t.Run("a write on the standby is forwarded", func(t *testing.T) {
		// Encrypting counts usage, a write: the standby answers with
		// logical.ErrReadOnly itself, which Vault forwards to the active
		// node (an error that only contains its text is not forwarded).
		_, err := s.b.HandleRequest(context.Background(), &logical.Request{
			Operation: logical.UpdateOperation, Path: "encrypt/k1", Storage: s.storage,
			Data: map[string]interface{}{"plaintext": b64("x")},
		})
		require.Equal(t, logical.ErrReadOnly, err)
	})

	t.Run("key policy: min_decryption_version", func(t *testing.T) {
		a.mustWrite(t, "keys/k1/rotate", nil)
		a.mustWrite(t, "keys/k1/config", map[string]interface{}{"min_decryption_version": 2})
		require.Greater(t, p.deliver(), 0)
		requireStatus(t, s.write(t, "decrypt/k1", map[string]interface{}{"ciphertext": ct1}), 400, "ciphertext or signature version is disallowed by policy (too old)")
	})

	t.Run("root key rotation", func(t *testing.T) {
		before := s.read(t, "seal/status").data["root_key_version"]
		a.mustWrite(t, "seal/rotate", nil)
		p.deliver()
		eventually(t, "the standby unseals the rotated keyring", func() bool {
			st := s.read(t, "seal/status").data
			return st["root_key_version"] != before && st["sealed"] == false
		})
		// An entry written under the new root key only.
		a.mustWrite(t, "keys/k2", nil)
		ct2 := a.encrypt(t, "k2", "after the rotation", nil)
		p.deliver()
		require.Equal(t, "after the rotation", s.decrypt(t, "k2", ct2, nil))
	})

	t.Run("deleted key", func(t *testing.T) {
		a.mustWrite(t, "keys/k3", nil)
		p.deliver()
		require.Equal(t, 200, s.read(t, "keys/k3").status)
		a.mustWrite(t, "keys/k3/config", map[string]interface{}{"deletion_allowed": true})
		require.Contains(t, []int{200, 204}, a.del(t, "keys/k3").status)
		p.deliver()
		// The standby's manifest bucket was read again: the key is
		// gone, not "removed outside the plugin".
		r := s.read(t, "keys/k3")
		requireStatus(t, r, 404, "")
		require.Nil(t, r.data, "nothing of k3 is answered")
	})

	t.Run("emergency seal and unseal", func(t *testing.T) {
		a.mustWrite(t, "seal/seal", nil)
		keys := p.rec.take()
		require.Contains(t, keys, mountseal.ConfigPath)
		// The seal configuration's invalidation alone seals the standby
		// at once, before any background work.
		s.b.invalidate(context.Background(), mountseal.ConfigPath)
		r := s.write(t, "encrypt/k1", map[string]interface{}{"plaintext": b64("x")})
		requireStatus(t, r, 503, "emergency")
		for _, k := range keys {
			s.b.invalidate(context.Background(), k)
		}
		eventually(t, "the standby drops its token", func() bool { return s.b.seal.CurrentToken() == nil })

		a.mustWrite(t, "seal/unseal", nil)
		p.deliver()
		ct := a.encrypt(t, "k1", "after the emergency", nil)
		p.deliver()
		eventually(t, "the standby unseals again", func() bool {
			return s.write(t, "decrypt/k1", map[string]interface{}{"ciphertext": ct}).status == 200
		})
	})

	t.Run("KEK change", func(t *testing.T) {
		cfg := testSealConfig()
		cfg["key_label"] = "kek-moved-" + newMountUUID(t)[:8]
		cfg["generate_key"] = true
		a.mustWrite(t, "config/seal", cfg)
		p.deliver()
		eventually(t, "the standby unseals with the new KEK", func() bool {
			st := s.read(t, "seal/status").data
			return st["key_label"] == cfg["key_label"] && st["sealed"] == false
		})
		require.Equal(t, "version one", s.decrypt(t, "k1", a.encrypt(t, "k1", "version one", nil), nil))
	})

	t.Run("recovery set up", func(t *testing.T) {
		a.mustWrite(t, "seal/recovery/init", map[string]interface{}{"shares": 3, "threshold": 2})
		p.deliver()
		eventually(t, "the standby reads the new seal state", func() bool {
			return s.read(t, "seal/status").data["recovery_initialized"] == true
		})
	})
}

// TestInvalidateWithoutDeliveryIsStale shows what the invalidations are
// for: without them, the standby keeps its old root keyring and cannot read
// what the active node wrote after a root key rotation.
func TestInvalidateWithoutDeliveryIsStale(t *testing.T) {
	p := startStandbyPair(t)
	a, s := p.active, p.standby
	// The standby unsealed from storage at its start. The invalidations of
	// the active node's configuration are not delivered: each would reload
	// the seal in the background, and a reload that ran after the rotation
	// below would read the new keyring, as a delivered invalidation does.
	p.rec.take()
	a.mustWrite(t, "keys/k1", nil)
	ct := a.encrypt(t, "k1", "x", nil)
	p.deliver()
	require.Equal(t, "x", s.decrypt(t, "k1", ct, nil))
	a.mustWrite(t, "seal/rotate", nil)
	a.mustWrite(t, "keys/k2", nil)
	ct2 := a.encrypt(t, "k2", "y", nil)
	p.rec.take() // lost
	r := s.write(t, "decrypt/k2", map[string]interface{}{"ciphertext": ct2})
	// A standby that missed the rotation cannot read entries sealed under
	// the new root key.
	requireStatus(t, r, 500, "is sealed by root key version 2, which this keyring does not hold")
	require.Nil(t, r.data["plaintext"])
}
