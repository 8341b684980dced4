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

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
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
	require.Equal(t, mountseal.PhaseUnsealed, e.b.seal.Snapshot().Phase())
	require.NotNil(t, e.b.seal.CurrentToken())
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
	tok := e.b.seal.CurrentToken()
	ring := e.b.seal.Snapshot().Sealer().Keyring()
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
	require.Equal(t, mountseal.PhaseUnsealed, e.b.seal.Snapshot().Phase())

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

	snap := e.b.seal.Snapshot()
	require.NotEqual(t, mountseal.PhaseUnsealed, snap.Phase())
	require.Nil(t, snap.Sealer(), "the root keyring is forgotten")
	require.Nil(t, e.b.seal.CurrentToken(), "the mount's token is dropped")
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
	require.Equal(t, mountseal.PhaseUnsealed, e.b.seal.Snapshot().Phase())
	require.NotNil(t, e.b.seal.CurrentToken())
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
	require.Equal(t, mountseal.PhaseUnsealed, fine.b.seal.Snapshot().Phase())

	r := &backendRegistry{m: make(map[*backend]struct{})}
	r.add(stuck.b)
	r.add(fine.b)
	release := stuck.b.seal.HoldLockForTest()
	unlocked := false
	unlock := func() {
		if !unlocked {
			unlocked = true
			release()
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
	require.NotEqual(t, mountseal.PhaseUnsealed, fine.b.seal.Snapshot().Phase())
	require.Nil(t, fine.b.seal.CurrentToken())
	unlock()
}

// TestShutdownAllWithNothingRegistered returns at once.
func TestShutdownAllWithNothingRegistered(t *testing.T) {
	r := &backendRegistry{m: make(map[*backend]struct{})}
	start := time.Now()
	require.Zero(t, r.shutdownAll("test", time.Minute))
	require.Less(t, time.Since(start), 100*time.Millisecond)
}
