package hsmtransit

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/helper/consts"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"
)

// countingSystemView counts the replication states asked of it, as Vault
// would see them arrive over the plugin boundary.
type countingSystemView struct {
	logical.StaticSystemView
	asked atomic.Int64
	state atomic.Uint32
}

func (v *countingSystemView) ReplicationState() consts.ReplicationState {
	v.asked.Add(1)
	return consts.ReplicationState(v.state.Load())
}

// TestReplicationStateAskedOncePerTTL sends a mount many requests: Vault is
// asked for the replication state once for all of them, not once each as
// the framework asks.
func TestReplicationStateAskedOncePerTTL(t *testing.T) {
	e, sys, conf := newCountingBackend(t, false)
	b, storage := e.b, e.storage
	require.Same(t, sys, conf.System, "Factory changed the caller's config")

	before := sys.asked.Load()
	start := time.Now()
	const requests = 50
	for i := 0; i < requests; i++ {
		resp, err := b.HandleRequest(context.Background(), &logical.Request{
			Operation: logical.UpdateOperation, Path: "hash", Storage: storage,
			Data: map[string]interface{}{"input": "aGVsbG8="},
		})
		require.NoError(t, err)
		require.NotEmpty(t, resp.Data["sum"])
	}
	asked := sys.asked.Load() - before
	// Once per TTL begun: on a loaded machine (-race, a benchmark beside
	// it) the requests may straddle a TTL, which is not a failure; without
	// the cache Vault is asked once per request, 50 times.
	ttl := replicationStateTTL
	require.Greater(t, ttl, time.Duration(0))
	allowed := 1 + int64(time.Since(start)/ttl)
	require.Less(t, allowed, int64(requests), "%d requests took %v, %d TTLs: a count of asks cannot tell a cache from none", requests, time.Since(start), allowed)
	require.LessOrEqual(t, asked, allowed, "Vault asked %d times for %d requests", asked, requests)
}

// ageSample makes the cached replication state d older, as if d had
// passed since Vault was asked: the tests below move the cache's clock
// rather than sleep, so that a slow or loaded machine cannot make them
// pass or fail.
func ageSample(t *testing.T, c *replicationCache, d time.Duration) {
	t.Helper()
	s := c.last.Load()
	require.NotNil(t, s, "no state cached yet")
	c.last.Store(&replicationSample{state: s.state, at: s.at.Add(-d)})
}

// TestReplicationCacheReadsAgainAfterTTL: a state is kept for the TTL and
// no longer, counted from when Vault was asked (not from the last read),
// so a node that becomes a performance standby is seen as one within it.
func TestReplicationCacheReadsAgainAfterTTL(t *testing.T) {
	sys := &countingSystemView{}
	const ttl = time.Hour // real time never reaches it during the test
	c := &replicationCache{SystemView: sys, ttl: ttl}
	require.Equal(t, consts.ReplicationState(0), c.ReplicationState())
	require.Equal(t, int64(1), sys.asked.Load())

	sys.state.Store(uint32(consts.ReplicationPerformanceStandby))
	require.Equal(t, consts.ReplicationState(0), c.ReplicationState(), "read again within the TTL")
	ageSample(t, c, ttl/2)
	require.Equal(t, consts.ReplicationState(0), c.ReplicationState(), "read again half a TTL after the ask")
	require.Equal(t, int64(1), sys.asked.Load())

	// A TTL after the ask (the reads in between do not extend it).
	ageSample(t, c, ttl/2)
	require.True(t, c.ReplicationState().HasState(consts.ReplicationPerformanceStandby), "a state a TTL old was still used")
	require.Equal(t, int64(2), sys.asked.Load())
	require.True(t, c.ReplicationState().HasState(consts.ReplicationPerformanceStandby))
	require.Equal(t, int64(2), sys.asked.Load(), "the new state was not kept")
}

// mountCache is the replication cache Factory put in front of b's system
// view.
func mountCache(t *testing.T, b *backend) *replicationCache {
	t.Helper()
	c, ok := b.System().(*replicationCache)
	require.True(t, ok, "Factory did not put the system view behind a replicationCache")
	return c
}

// newCountingBackend is startBackend with a system view whose replication
// state the test sets and whose asks it counts; it returns the config
// Factory was given.
func newCountingBackend(t *testing.T, localMount bool) (*testEnv, *countingSystemView, *logical.BackendConfig) {
	t.Helper()
	sys := &countingSystemView{StaticSystemView: *logical.TestSystemView()}
	sys.LocalMountVal = localMount
	conf := logical.TestBackendConfig()
	conf.Logger = hclog.NewNullLogger()
	conf.StorageView = nil
	conf.System = sys
	conf.BackendUUID = newMountUUID(t)
	lb, err := Factory(context.Background(), conf)
	require.NoError(t, err)
	b := lb.(*backend)
	e := &testEnv{b: b, storage: &logical.InmemStorage{}, mountUUID: conf.BackendUUID}
	require.NoError(t, b.Initialize(context.Background(), &logical.InitializationRequest{Storage: e.storage}))
	t.Cleanup(func() { b.Cleanup(context.Background()) })
	return e, sys, conf
}

// startCountingBackend is newCountingBackend, configured and sealed by the
// test token.
func startCountingBackend(t *testing.T, localMount bool) (*testEnv, *countingSystemView) {
	t.Helper()
	e, sys, _ := newCountingBackend(t, localMount)
	e.mustWrite(t, "config/seal", testSealConfig())
	return e, sys
}

// TestReadOnlyNodeWithinASecond: the seal manager's ReadOnlyNode (through
// backend.mustNotWrite, as the periodic callback) sees a node's new role at
// most a second after Vault reports it, the bound replication.go documents:
// a node that must not write (nodeRoles) leaves an interrupted migration or
// root key rotation to the node that may.
func TestReadOnlyNodeWithinASecond(t *testing.T) {
	for _, tc := range nodeRoles {
		t.Run(tc.name, func(t *testing.T) {
			e, sys := startCountingBackend(t, tc.local)
			host := sealHost{e.b}
			require.False(t, host.ReadOnlyNode())
			sys.state.Store(uint32(tc.state))
			ageSample(t, mountCache(t, e.b), time.Second)
			require.Equal(t, !tc.writes, host.ReadOnlyNode(), "a second after Vault reported the node's role")
		})
	}
}

// nodeRoles are the replication roles a node's periodic work is tried
// on, and whether the node may write there: not on a performance standby,
// a DR secondary or (for a replicated mount) a performance secondary; yes
// on a primary and on a secondary's local mount, the controls that show the
// work was due.
var nodeRoles = []struct {
	name   string
	state  consts.ReplicationState
	local  bool
	writes bool
}{
	{"performance standby", consts.ReplicationPerformanceStandby, false, false},
	{"DR secondary", consts.ReplicationDRSecondary, false, false},
	{"performance secondary", consts.ReplicationPerformanceSecondary, false, false},
	{"performance secondary, local mount", consts.ReplicationPerformanceSecondary, true, true},
	{"performance primary", consts.ReplicationPerformancePrimary, false, true},
}

// TestAutoRotateSkipsNodesThatMustNotWrite: the periodic auto-rotation
// writes nothing on a performance standby, a DR secondary or (for a
// replicated mount) a performance secondary, once the cached state is a
// second old; it still rotates on a primary and on a secondary's local
// mount.
func TestAutoRotateSkipsNodesThatMustNotWrite(t *testing.T) {
	for _, tc := range nodeRoles {
		t.Run(tc.name, func(t *testing.T) {
			e, sys := startCountingBackend(t, tc.local)
			e.mustWrite(t, "keys/due", map[string]interface{}{"auto_rotate_period": "1h"})
			ageVersion1(t, e, "due", 2*time.Hour)

			// The requests above cached a writable node's state; the
			// node's role changes, and a second passes.
			sys.state.Store(uint32(tc.state))
			ageSample(t, mountCache(t, e.b), time.Second)
			require.NoError(t, e.b.periodic(context.Background(), &logical.Request{Storage: e.storage}))
			want := float64(1)
			if tc.writes {
				want = 2
			}
			require.Equal(t, want, e.read(t, "keys/due").data["latest_version"])
		})
	}
}

// TestNoOperationForwardsByReplicationState: the framework forwards an
// operation marked ForwardPerformanceStandby or ForwardPerformanceSecondary
// by the replication state it reads at each request. The plugin gives it a
// state up to replicationStateTTL old (replicationCache), which is only
// harmless while no operation is marked so; one that is would need the
// cache revisited.
func TestNoOperationForwardsByReplicationState(t *testing.T) {
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	checked := 0
	for _, p := range e.b.Paths {
		for op, h := range p.Operations {
			props := h.Properties()
			require.False(t, props.ForwardPerformanceStandby, "%s %s forwards on performance standbys", op, p.Pattern)
			require.False(t, props.ForwardPerformanceSecondary, "%s %s forwards on performance secondaries", op, p.Pattern)
			checked++
		}
	}
	require.NotZero(t, checked)
}

// TestPeriodicChangesNothingOnNodesThatMustNotWrite: the attacker is no
// one, the failure is the node's role. Vault runs the periodic callback on
// performance standbys and secondaries too, where storage refuses writes
// only after the HSM was changed: a due destruction of an HSM-resident key
// destroyed its objects on the token every node shares, then had its
// storage delete refused. On a node that must not write, the callback
// writes nothing and the key and its objects stay; on one that may, the
// same callback destroys them (the control that shows the key was due).
func TestPeriodicChangesNothingOnNodesThatMustNotWrite(t *testing.T) {
	for _, tc := range nodeRoles {
		t.Run(tc.name, func(t *testing.T) {
			e, sys := startCountingBackend(t, tc.local)
			e.mustWrite(t, "keys/k", map[string]interface{}{"hsm": true})
			e.mustWrite(t, "keys/k/schedule-deletion", nil)
			require.NotEmpty(t, tokenLabels(t, e, testToken, "k"))
			// Due now: the schedule's time moved into the past.
			lc, err := e.b.lifecycle.get(context.Background(), e.sealed(t), "k")
			require.NoError(t, err)
			lc.mu.Lock()
			lc.DeletionTime = time.Now().Add(-time.Minute)
			lc.mu.Unlock()

			sys.state.Store(uint32(tc.state))
			ageSample(t, mountCache(t, e.b), time.Second)
			rec := &writeRecorder{Storage: e.storage}
			require.NoError(t, e.b.periodic(context.Background(), &logical.Request{Storage: rec}))
			if tc.writes {
				requireStatus(t, e.read(t, "keys/k"), 404, "")
				require.Empty(t, tokenLabels(t, e, testToken, "k"))
				return
			}
			require.Empty(t, rec.take(), "storage written")
			require.NotEmpty(t, tokenLabels(t, e, testToken, "k"), "the HSM objects were destroyed")
			requireStatus(t, e.read(t, "keys/k"), 200, "")
		})
	}
}
