package hsmtransit

import (
	"context"
	"encoding/json"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// exitRecorder stands for os.Exit: it records the code and when.
type exitRecorder struct {
	called chan int
	at     atomic.Pointer[time.Time]
}

func newExitRecorder() *exitRecorder { return &exitRecorder{called: make(chan int, 4)} }

func (r *exitRecorder) exit(code int) {
	now := time.Now()
	r.at.CompareAndSwap(nil, &now)
	r.called <- code
}

// unsealedForShutdown is a registered, unsealed backend with a key in use.
func unsealedForShutdown(t *testing.T) *testEnv {
	t.Helper()
	e := getTestBackend(t)
	ct := e.encrypt(t, "k", "in use", nil)
	require.Equal(t, "in use", e.decrypt(t, "k", ct, nil))
	require.Equal(t, phaseUnsealed, e.b.seal.state.Load().phase)
	require.NotNil(t, e.b.seal.currentToken())
	registerBackend(e.b)
	t.Cleanup(func() { unregisterBackend(e.b) })
	return e
}

// keyringBytes returns the key bytes a keyring holds, by its serialised form.
func keyringBytes(t *testing.T, ring *seal.Keyring) [][]byte {
	t.Helper()
	raw, err := ring.Marshal()
	require.NoError(t, err)
	var stored struct {
		Keys map[string][]byte `json:"keys"`
	}
	require.NoError(t, json.Unmarshal(raw, &stored))
	require.NotEmpty(t, stored.Keys)
	var out [][]byte
	for _, k := range stored.Keys {
		out = append(out, k)
	}
	return out
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// TestHostWatchParentChangedShutsDown: once the parent PID changes, the
// watch cleans up every registered mount (its root keyring wiped, the mount
// no longer unsealed, its HSM session closed) and exits with 1, within the
// poll interval and a margin.
func TestHostWatchParentChangedShutsDown(t *testing.T) {
	e := unsealedForShutdown(t)
	tok := e.b.seal.currentToken()
	ring := e.b.seal.state.Load().sealer.Keyring()
	for _, k := range keyringBytes(t, ring) {
		require.False(t, allZero(k), "the unsealed keyring holds a key")
	}

	const interval = 50 * time.Millisecond
	var ppid atomic.Int64
	ppid.Store(4242)
	rec := newExitRecorder()
	w := &hostWatch{
		interval: interval,
		getppid:  func() int { return int(ppid.Load()) },
		lost: func(reason string) {
			assert.Contains(t, reason, "from PID 4242 to 1")
			ShutdownAndExit(hclog.NewNullLogger(), reason, 1, rec.exit)
		},
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := w.start(ctx)

	// The parent stays: nothing happens.
	time.Sleep(4 * interval)
	require.Empty(t, rec.called)
	require.Equal(t, phaseUnsealed, e.b.seal.state.Load().phase)

	// Re-parented to init.
	changed := time.Now()
	ppid.Store(1)
	select {
	case code := <-rec.called:
		require.Equal(t, 1, code)
	case <-time.After(interval + 3*time.Second):
		t.Fatal("the watch did not exit after the parent changed")
	}
	took := rec.at.Load().Sub(changed)
	t.Logf("exit called %v after the parent changed (poll interval %v)", took, interval)
	require.Less(t, took, interval+time.Second)
	<-done

	snap := e.b.seal.state.Load()
	require.NotEqual(t, phaseUnsealed, snap.phase)
	require.Nil(t, snap.sealer, "the root keyring is forgotten")
	require.Nil(t, e.b.seal.currentToken(), "the mount's token is dropped")
	_, err := tok.Random(8)
	require.Error(t, err, "the HSM session is closed")
	t.Logf("the old token handle now answers: %v", err)
	for _, k := range keyringBytes(t, ring) {
		require.True(t, allZero(k), "the root keyring is wiped")
	}
	require.Empty(t, rec.called, "exit is called once")
}

// TestHostWatchParentUnchanged: with the same parent, the watch does
// nothing, and stops with its context.
func TestHostWatchParentUnchanged(t *testing.T) {
	e := unsealedForShutdown(t)
	var polls atomic.Int64
	var lost atomic.Bool
	w := &hostWatch{
		interval: 10 * time.Millisecond,
		getppid:  func() int { polls.Add(1); return 4242 },
		lost:     func(string) { lost.Store(true) },
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := w.start(ctx)
	require.Eventually(t, func() bool { return polls.Load() > 10 }, 5*time.Second, 5*time.Millisecond)
	cancel()
	select {
	case <-done:
	case <-time.After(time.Second):
		t.Fatal("the watch did not stop with its context")
	}
	require.False(t, lost.Load())
	require.Equal(t, phaseUnsealed, e.b.seal.state.Load().phase)
	require.NotNil(t, e.b.seal.currentToken())
	ct := e.encrypt(t, "k", "still serving", nil)
	require.Equal(t, "still serving", e.decrypt(t, "k", ct, nil))
}

// TestShutdownAllIsBounded: a mount whose cleanup cannot finish (here its
// seal's lock is held, as by a transition stuck in a hung HSM) does not hold
// the shutdown past its bound; the other mounts are cleaned up.
func TestShutdownAllIsBounded(t *testing.T) {
	stuck := getTestBackend(t)
	fine := getTestBackend(t)
	fine.encrypt(t, "k", "x", nil)
	require.Equal(t, phaseUnsealed, fine.b.seal.state.Load().phase)

	r := &backendRegistry{m: make(map[*backend]struct{})}
	r.add(stuck.b)
	r.add(fine.b)
	stuck.b.seal.mu.Lock()
	unlocked := false
	unlock := func() {
		if !unlocked {
			unlocked = true
			stuck.b.seal.mu.Unlock()
		}
	}
	defer unlock()

	const timeout = 300 * time.Millisecond
	start := time.Now()
	late := r.shutdownAll("test", timeout)
	took := time.Since(start)
	t.Logf("shutdownAll returned after %v with %d mount(s) late", took, late)
	require.Equal(t, 1, late)
	require.GreaterOrEqual(t, took, timeout)
	require.Less(t, took, timeout+time.Second)
	require.NotEqual(t, phaseUnsealed, fine.b.seal.state.Load().phase)
	require.Nil(t, fine.b.seal.currentToken())
	unlock()
}

// TestShutdownAllWithNothingRegistered returns at once.
func TestShutdownAllWithNothingRegistered(t *testing.T) {
	r := &backendRegistry{m: make(map[*backend]struct{})}
	start := time.Now()
	require.Zero(t, r.shutdownAll("test", time.Minute))
	require.Less(t, time.Since(start), 100*time.Millisecond)
}

// A request that finds an unseal attempt under way (the seal's lock held)
// waits for it without polling: it goes on as soon as the lock is released,
// returns as soon as the state becomes unsealed even while the lock is
// still held, and gives up with its context. Each bound below is well
// under unsealWait, so that only a wait that missed its wake-up fails.
func TestWaitingForAnUnsealUnderWay(t *testing.T) {
	e := getTestBackend(t)
	e.encrypt(t, "k", "x", nil)
	m := e.b.seal
	unsealed := m.state.Load()
	require.Equal(t, phaseUnsealed, unsealed.phase)
	sealed := &sealSnapshot{phase: phaseSealed, cfg: unsealed.cfg, nextTry: time.Now().Add(time.Hour)}

	wait := func(ctx context.Context) <-chan *sealSnapshot {
		out := make(chan *sealSnapshot, 1)
		go func() {
			snap, err := m.tryUnseal(ctx, e.storage, false)
			if err != nil {
				snap = nil // soon's caller then fails on the nil state
			}
			out <- snap
		}()
		return out
	}
	soon := func(c <-chan *sealSnapshot) *sealSnapshot {
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
	lock()
	got = wait(context.Background())
	require.Never(t, func() bool { return len(got) > 0 }, 100*time.Millisecond, 10*time.Millisecond)
	m.setState(unsealed)
	require.Same(t, unsealed, soon(got))

	// The request's context ends first.
	m.setState(sealed)
	ctx, cancel := context.WithCancel(context.Background())
	got = wait(ctx)
	cancel()
	require.Same(t, sealed, soon(got))
	m.setState(unsealed)
	unlock()
}
