package hsmtransit

import (
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/sdk/helper/consts"
	"github.com/hashicorp/vault/sdk/logical"
)

// replicationStateTTL is how long a replication state read from Vault is
// used before it is read again.
const replicationStateTTL = time.Second

// replicationCache is a mount's system view with ReplicationState read from
// Vault at most once per ttl, and every other call passed through.
//
// The framework asks for the state at the start of every request
// (framework.Backend.HandleRequest), to forward the operations marked
// ForwardPerformanceStandby or ForwardPerformanceSecondary; across the
// plugin boundary each ask is a gRPC call to Vault and back. For a single
// item that call was about a tenth of the plugin's CPU (pprof under make
// bench's single-item encrypt), and Vault's side of it and its round trip
// come on top. No operation of this plugin is marked so
// (TestNoOperationForwardsByReplicationState), so the framework's check
// never acts on the state; the plugin's own reader (mustNotWrite, which
// guards the periodic callback and the seal's work after an unseal) sees a
// state at most ttl old. The state changes when the node's role does (Vault sets the
// mounts up again then), and a write that a stale state lets through on a
// node that has just become read-only is refused by its storage and
// forwarded (backend.HandleRequest).
type replicationCache struct {
	logical.SystemView
	ttl  time.Duration
	last atomic.Pointer[replicationSample]
}

type replicationSample struct {
	state consts.ReplicationState
	at    time.Time
}

func (c *replicationCache) ReplicationState() consts.ReplicationState {
	now := time.Now()
	if s := c.last.Load(); s != nil && now.Sub(s.at) < c.ttl {
		return s.state
	}
	state := c.SystemView.ReplicationState()
	c.last.Store(&replicationSample{state: state, at: now})
	return state
}

// withReplicationCache returns conf with its system view behind a
// replicationCache; conf itself is not changed.
func withReplicationCache(conf *logical.BackendConfig) *logical.BackendConfig {
	if conf == nil || conf.System == nil {
		return conf
	}
	c := *conf
	c.System = &replicationCache{SystemView: conf.System, ttl: replicationStateTTL}
	return &c
}
