package mountseal

import (
	"context"
	"errors"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// requireCode fails unless err is a logical.HTTPCodedError of code whose
// message contains msg.
func requireCode(t *testing.T, err error, code int, msg string) {
	t.Helper()
	var coded logical.HTTPCodedError
	require.ErrorAs(t, err, &coded)
	require.Equal(t, code, coded.Code(), err.Error())
	require.Contains(t, err.Error(), msg)
}

// put writes value at key through the seal, get reads it back.
func put(t *testing.T, m *Manager, s logical.Storage, key, value string) {
	t.Helper()
	v, err := m.View(context.Background(), s)
	require.NoError(t, err)
	require.NoError(t, v.Put(context.Background(), &logical.StorageEntry{Key: key, Value: []byte(value)}))
}

func get(t *testing.T, m *Manager, s logical.Storage, key string) string {
	t.Helper()
	v, err := m.View(context.Background(), s)
	require.NoError(t, err)
	e, err := v.Get(context.Background(), key)
	require.NoError(t, err)
	require.NotNil(t, e, key)
	return string(e.Value)
}

// TestManagerAlone drives one mount's seal through its whole life with no
// backend: first seal, unseal at a restart, a refused PIN (which stays
// refused without retries), root key rotation, emergency seal and unseal,
// recovery set up and then used to move the mount to a new token once its
// token is lost. The fake host checks that the seal calls its hooks.
func TestManagerAlone(t *testing.T) {
	ctx := context.Background()
	const doomed, replacement = "mountseal-doomed", "mountseal-replacement"
	require.NoError(t, softhsm.InitToken(softhsmConf, doomed, testPIN))
	s := &logical.InmemStorage{}
	mount := newMountUUID(t)

	// Before config/seal: the 400 that names it.
	h := newFakeHost(t)
	m := newManager(t, h, mount)
	_, err := m.View(ctx, s)
	requireCode(t, err, http.StatusBadRequest, "write config/seal")
	require.Equal(t, PhaseUnconfigured, m.Snapshot().Phase())

	// The first seal.
	done, err := m.Configure(ctx, s, ConfigureRequest{Merge: sealSettings(doomed, "kek"), GenerateKey: true})
	require.NoError(t, err)
	require.Equal(t, uint32(1), done.Config.RootKeyVersion)
	require.Equal(t, string(hsm.AESGCM), done.Config.Mechanism, "chosen from what the token offers")
	require.False(t, done.AntiRollback)
	h.requireUnsealedHook(t, 1)
	require.NotNil(t, m.CurrentToken())
	require.NotNil(t, m.TokenMechanisms())
	put(t, m, s, "policy/k", "key material")
	raw, err := s.Get(ctx, "policy/k")
	require.NoError(t, err)
	require.True(t, seal.IsSealed(raw.Value), "storage holds it sealed")
	require.NotContains(t, string(raw.Value), "key material")

	// A restart unseals in the background, from the HSM.
	m.Close()
	require.Equal(t, PhaseUnknown, m.Snapshot().Phase())
	require.Nil(t, m.CurrentToken())
	h = newFakeHost(t)
	m = newManager(t, h, mount)
	m.Start(s)
	require.Eventually(t, func() bool { return m.Snapshot().Phase() == PhaseUnsealed }, 10*time.Second, 10*time.Millisecond)
	h.waitUnsealedHook(t, 1)
	require.Equal(t, "key material", get(t, m, s, "policy/k"))

	// A wrong PIN is refused and the mount keeps its token.
	_, err = m.Configure(ctx, s, ConfigureRequest{Merge: withPIN("0000")})
	require.Error(t, err)
	require.Equal(t, KindCaller, KindOf(err), err.Error())
	require.Equal(t, hsm.Credentials, hsm.KindOf(err))
	require.NotNil(t, m.CurrentToken(), "the old PIN logged in again")
	require.Equal(t, "key material", get(t, m, s, "policy/k"))

	// A wrong PIN in storage at a restart: refused once, and not retried
	// (each try would count against the token's failed logins) until the
	// configuration changes.
	m.Close()
	cfg, err := ReadConfig(ctx, s)
	require.NoError(t, err)
	cfg.PIN = "0000"
	require.NoError(t, WriteConfig(ctx, s, cfg))
	h = newFakeHost(t)
	m = newManager(t, h, mount)
	m.Start(s)
	_, err = m.View(ctx, s)
	requireCode(t, err, http.StatusServiceUnavailable, "fix config/seal to unseal")
	refused := m.Snapshot()
	require.True(t, refused.Permanent())
	require.Equal(t, hsm.Credentials, hsm.KindOf(refused.LastErr()))
	for range 3 {
		_, err = m.View(ctx, s)
		requireCode(t, err, http.StatusServiceUnavailable, "fix config/seal to unseal")
	}
	m.wake()
	time.Sleep(50 * time.Millisecond)
	require.Same(t, refused, m.Snapshot(), "no further attempt: the state is untouched")
	h.requireUnsealedHook(t, 0)
	require.Nil(t, m.CurrentToken())
	// The right PIN unseals it.
	_, err = m.Configure(ctx, s, ConfigureRequest{Merge: withPIN(testPIN)})
	require.NoError(t, err)
	h.requireUnsealedHook(t, 1)
	require.Equal(t, "key material", get(t, m, s, "policy/k"))

	// Root key rotation: every entry moves to the new version.
	rotated, err := m.Rotate(ctx, s)
	require.NoError(t, err)
	require.Equal(t, uint32(2), rotated.RootKeyVersion)
	require.Positive(t, rotated.EntriesResealed)
	require.Equal(t, []uint32{2}, m.Snapshot().Sealer().Keyring().Versions())
	require.Equal(t, "key material", get(t, m, s, "policy/k"))
	cfg, err = ReadConfig(ctx, s)
	require.NoError(t, err)
	require.Equal(t, uint32(2), cfg.RootKeyVersion)

	// The emergency seal: keys out of memory, across restarts.
	_, dropped := h.counts()
	recorded, err := m.EmergencySeal(ctx, s)
	require.NoError(t, err)
	require.True(t, recorded, "recorded in the sealed state")
	_, droppedAfter := h.counts()
	require.Greater(t, droppedAfter, dropped, "the host dropped its cached keys")
	require.Nil(t, m.CurrentToken())
	require.Nil(t, m.Snapshot().Sealer())
	_, err = m.View(ctx, s)
	requireCode(t, err, http.StatusServiceUnavailable, ErrEmergencySealed.Error())
	_, err = m.Configure(ctx, s, ConfigureRequest{Merge: withPIN(testPIN)})
	require.Equal(t, KindCaller, KindOf(err))
	require.ErrorContains(t, err, "write seal/unseal first")
	m.Close()
	h = newFakeHost(t)
	m = newManager(t, h, mount)
	_, err = m.View(ctx, s)
	requireCode(t, err, http.StatusServiceUnavailable, ErrEmergencySealed.Error())
	require.True(t, m.Snapshot().EmergencySealed())
	h.requireUnsealedHook(t, 0)

	// Unseal ends it.
	require.NoError(t, m.Unseal(ctx, s))
	h.requireUnsealedHook(t, 1)
	require.False(t, m.Snapshot().EmergencySealed())
	require.Equal(t, "key material", get(t, m, s, "policy/k"))
	require.NoError(t, m.Unseal(ctx, s), "unsealing an unsealed mount does nothing")
	h.requireUnsealedHook(t, 1)

	// Recovery: shares, refused while the HSM works.
	_, err = m.RecoveryInit(ctx, s, 3, 4)
	require.Equal(t, KindCaller, KindOf(err))
	set, err := m.RecoveryInit(ctx, s, 5, 3)
	require.NoError(t, err)
	require.Len(t, set.Shares, 5)
	require.Equal(t, 3, set.Threshold)
	require.NotNil(t, m.Snapshot().Meta().RecoveryPublicKey)
	restore := RestoreRequest{Shares: set.Shares[:3], Merge: sealSettings(replacement, "new-kek"), GenerateKey: true}
	_, err = m.Restore(ctx, s, restore)
	require.Equal(t, KindCaller, KindOf(err))
	require.ErrorContains(t, err, "recovery is only for a mount whose HSM is lost")

	// The token is lost for good; a new one takes its place.
	m.Close()
	dir, err := softhsm.TokenDir(softhsmConf, doomed)
	require.NoError(t, err)
	require.NoError(t, os.RemoveAll(dir))
	require.NoError(t, softhsm.InitToken(softhsmConf, replacement, testPIN))
	h = newFakeHost(t)
	m = newManager(t, h, mount)
	_, err = m.View(ctx, s)
	requireCode(t, err, http.StatusServiceUnavailable, doomed)
	h.requireUnsealedHook(t, 0)

	_, err = m.Restore(ctx, s, RestoreRequest{Shares: set.Shares[:2], Merge: restore.Merge, GenerateKey: true})
	require.Equal(t, KindCaller, KindOf(err))
	require.ErrorContains(t, err, "3 are needed")
	_, dropped = h.counts()
	restored, err := m.Restore(ctx, s, restore)
	require.NoError(t, err)
	require.Equal(t, replacement, restored.Config.TokenLabel)
	require.Equal(t, "new-kek", restored.Config.SealedWith)
	h.requireUnsealedHook(t, 1)
	_, droppedAfter = h.counts()
	require.Greater(t, droppedAfter, dropped, "keys cached under the old seal are dropped")
	e, err := restored.View.Get(ctx, "policy/k")
	require.NoError(t, err)
	require.Equal(t, "key material", string(e.Value))
	require.Equal(t, "key material", get(t, m, s, "policy/k"))

	// And the new token unseals it at the next restart.
	m.Close()
	h = newFakeHost(t)
	m = newManager(t, h, mount)
	require.Equal(t, "key material", get(t, m, s, "policy/k"))
	h.requireUnsealedHook(t, 1)
}

// TestManagerInvalidateEmergencySeal: another node's emergency seal, seen
// as an invalidation of the configuration, seals this node at once and
// drops its keys.
func TestManagerInvalidateEmergencySeal(t *testing.T) {
	ctx := context.Background()
	active, _, s := unsealedManager(t)
	h := newFakeHost(t)
	h.readOnly = true
	standby := newManager(t, h, active.MountID())
	standby.Start(s)
	require.Eventually(t, func() bool { return standby.Snapshot().Phase() == PhaseUnsealed }, 10*time.Second, 10*time.Millisecond)

	_, err := active.EmergencySeal(ctx, s)
	require.NoError(t, err)
	standby.Invalidate(ctx, ConfigPath)
	require.Equal(t, PhaseSealed, standby.Snapshot().Phase(), "sealed before the reload")
	standby.WaitReloadsForTest()
	require.Nil(t, standby.CurrentToken())
	_, dropped := h.counts()
	require.Positive(t, dropped)
	_, err = standby.View(ctx, s)
	requireCode(t, err, http.StatusServiceUnavailable, ErrEmergencySealed.Error())
}

// TestManagerErrorsHaveKinds: what the backend answers 400 and 503 comes
// with a Kind, and nothing else does.
func TestManagerErrorsHaveKinds(t *testing.T) {
	ctx := context.Background()
	h := newFakeHost(t)
	m := newManager(t, h, newMountUUID(t))
	s := &logical.InmemStorage{}

	_, err := m.Configure(ctx, s, ConfigureRequest{Merge: func(*Config) (*Config, error) { return nil, errors.New("missing [pin]") }})
	require.Equal(t, KindCaller, KindOf(err))
	require.EqualError(t, err, "missing [pin]")

	_, err = m.Configure(ctx, s, ConfigureRequest{Merge: sealSettings("no-such-token", "kek")})
	require.Equal(t, KindCaller, KindOf(err))
	require.True(t, strings.HasPrefix(err.Error(), "nothing was configured: "), err.Error())

	_, err = m.EmergencySeal(ctx, s)
	require.Equal(t, KindCaller, KindOf(err))
	require.ErrorIs(t, err, ErrNotConfigured)
	require.ErrorIs(t, m.Unseal(ctx, s), ErrNotConfigured)

	_, err = m.Rotate(ctx, s)
	requireCode(t, err, http.StatusBadRequest, "write config/seal")
	require.Zero(t, KindOf(err), "the seal's own coded answer is passed on")
	h.requireUnsealedHook(t, 0)
}

func TestChanMutex(t *testing.T) {
	l := newChanMutex()
	require.True(t, l.TryLock())
	require.False(t, l.TryLock(), "held")
	l.Unlock()
	l.Lock()
	require.False(t, l.TryLock())
	l.Unlock()
	require.PanicsWithValue(t, "unlock of an unlocked chanMutex", l.Unlock)
}

// A request that finds an unseal attempt under way (the seal's lock held)
// waits for it without polling: it goes on as soon as the lock is released,
// returns as soon as the state becomes unsealed even while the lock is
// still held, and gives up with its context. Each bound below is well
// under unsealWait, so that only a wait that missed its wake-up fails.
func TestWaitingForAnUnsealUnderWay(t *testing.T) {
	m, _, storage := unsealedManager(t)
	unsealed := m.state.Load()
	require.Equal(t, PhaseUnsealed, unsealed.phase)
	sealed := &Snapshot{phase: PhaseSealed, cfg: unsealed.cfg, nextTry: time.Now().Add(time.Hour)}

	wait := func(ctx context.Context) <-chan *Snapshot {
		out := make(chan *Snapshot, 1)
		go func() {
			snap, err := m.tryUnseal(ctx, storage, false)
			if err != nil {
				snap = nil // soon's caller then fails on the nil state
			}
			out <- snap
		}()
		return out
	}
	soon := func(c <-chan *Snapshot) *Snapshot {
		select {
		case snap := <-c:
			return snap
		case <-time.After(unsealWait / 2):
			t.Fatal("the waiting request did not wake up")
			return nil
		}
	}

	// lock and unlock hold the seal's lock as an attempt under way does;
	// a failed check releases it, so that the mount can be cleaned up.
	held := false
	lock := func() { m.mu.Lock(); held = true }
	unlock := func() { m.mu.Unlock(); held = false }
	defer func() {
		if held {
			unlock()
		}
	}()

	// The attempt ends: the waiter takes the lock and sees it was tried.
	lock()
	m.setState(sealed)
	got := wait(context.Background())
	require.Never(t, func() bool { return len(got) > 0 }, 100*time.Millisecond, 10*time.Millisecond, "waits while the attempt is under way")
	unlock()
	require.Same(t, sealed, soon(got), "not due to retry: the state as the attempt left it")
	// (the waiter took the lock and gave it back)

	// The mount becomes unsealed while the lock is still held.
	// (Each wait has a variable of its own: a condition of Never may still
	// be running when Never returns, and must not race with a new one.)
	lock()
	gotUnsealed := wait(context.Background())
	require.Never(t, func() bool { return len(gotUnsealed) > 0 }, 100*time.Millisecond, 10*time.Millisecond)
	m.setState(unsealed)
	require.Same(t, unsealed, soon(gotUnsealed))

	// The request's context ends first.
	m.setState(sealed)
	ctx, cancel := context.WithCancel(context.Background())
	gotCancelled := wait(ctx)
	cancel()
	require.Same(t, sealed, soon(gotCancelled))
	m.setState(unsealed)
	unlock()
}
