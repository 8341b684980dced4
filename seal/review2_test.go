package seal

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"
)

// hookStorage runs hook once, inside the first Get of key after arming,
// before the real read.
type hookStorage struct {
	logical.InmemStorage
	key   string
	armed atomic.Bool
	hook  func()
}

func (h *hookStorage) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	if key == h.key && h.armed.CompareAndSwap(true, false) {
		h.hook()
	}
	return h.InmemStorage.Get(ctx, key)
}

// RV2-E: a reader racing a Delete followed at once by a Put of the same
// path (keys/k deleted and created again, a lifecycle record forgotten and
// written again). The reader took the live record before the delete, reads
// the entry in the gap (absent), and checkAbsent, run after the Put,
// finds a live record again: "removed outside the plugin, refused".
func TestAttackReview2E_DeleteThenPutRacingAReadIsNotRefused(t *testing.T) {
	ctx := context.Background()
	k, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	under := &hookStorage{key: "policy/k"}
	s := NewSealer(k.WithManifest(), plainSeal)
	require.NoError(t, s.InitManifest(ctx, under))
	v := s.Wrap(under)
	require.NoError(t, v.Put(ctx, &logical.StorageEntry{Key: "policy/k", Value: []byte("v1")}))

	// The hook stands for the other goroutine: between the reader's record
	// lookup and its read of the entry, the key is deleted; between that
	// read and checkAbsent, it is written again.
	var gap bool
	under.hook = func() {
		require.NoError(t, v.Delete(ctx, "policy/k"))
		gap = true
	}
	under.armed.Store(true)
	// After the reader's (absent) read of the entry, the Put lands.
	rd := &putAfterRead{hookStorage: under, after: func() {
		require.NoError(t, v.Put(ctx, &logical.StorageEntry{Key: "policy/k", Value: []byte("v2")}))
	}}
	e, err := s.get(ctx, rd, "policy/k", true)
	require.True(t, gap)
	t.Logf("reader: entry %v, error %v", e, err)
	if err != nil {
		t.Errorf("BROKEN (false refusal): a read racing delete+create of a key is refused: %v", err)
	}
}

// putAfterRead runs after once, right after the first Get of the hooked key
// returns absent.
type putAfterRead struct {
	*hookStorage
	after func()
	done  atomic.Bool
}

func (p *putAfterRead) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	e, err := p.hookStorage.Get(ctx, key)
	if key == p.key && e == nil && p.done.CompareAndSwap(false, true) {
		p.after()
	}
	return e, err
}
