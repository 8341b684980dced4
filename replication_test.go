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
	sys := &countingSystemView{StaticSystemView: *logical.TestSystemView()}
	conf := logical.TestBackendConfig()
	conf.Logger = hclog.NewNullLogger()
	conf.StorageView = nil
	conf.System = sys
	conf.BackendUUID = newMountUUID(t)
	lb, err := Factory(context.Background(), conf)
	require.NoError(t, err)
	b := lb.(*backend)
	storage := &logical.InmemStorage{}
	require.NoError(t, b.Initialize(context.Background(), &logical.InitializationRequest{Storage: storage}))
	t.Cleanup(func() { b.Cleanup(context.Background()) })
	require.Same(t, sys, conf.System, "Factory changed the caller's config")

	before := sys.asked.Load()
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
	require.LessOrEqual(t, asked, int64(1), "Vault asked %d times for %d requests", asked, requests)
}

// TestReplicationCacheReadsAgainAfterTTL: a state is kept for the TTL and
// no longer, so a node that becomes a performance standby is seen as one
// within it.
func TestReplicationCacheReadsAgainAfterTTL(t *testing.T) {
	sys := &countingSystemView{}
	c := &replicationCache{SystemView: sys, ttl: 50 * time.Millisecond}
	require.Equal(t, consts.ReplicationState(0), c.ReplicationState())
	sys.state.Store(uint32(consts.ReplicationPerformanceStandby))
	require.Equal(t, consts.ReplicationState(0), c.ReplicationState(), "read again within the TTL")
	require.Equal(t, int64(1), sys.asked.Load())
	require.Eventually(t, func() bool {
		return c.ReplicationState().HasState(consts.ReplicationPerformanceStandby)
	}, 5*time.Second, 10*time.Millisecond)
	require.Equal(t, int64(2), sys.asked.Load(), "asked more than once after the TTL")
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
