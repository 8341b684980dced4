package seal

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// equalBuckets puts one key into each of n distinct manifest buckets,
// among them the buckets named in with. The keys have one length, so
// every bucket has the same size, which it returns with the keys by
// bucket index: cache sizes are then exact multiples of it.
func equalBuckets(t *testing.T, m *mount, n int, with ...int) (map[int]string, int64) {
	t.Helper()
	keys := map[int]string{}
	others := 0 // keys in buckets not named in with
	for i := 0; len(keys) < n; i++ {
		require.Less(t, i, 100000, "no key found for every bucket wanted")
		k := fmt.Sprintf("policy/e%05d", i)
		idx := bucketIndex(k)
		if _, ok := keys[idx]; ok {
			continue
		}
		if slices.Contains(with, idx) {
			keys[idx] = k
		} else if others < n-len(with) {
			keys[idx] = k
			others++
		}
	}
	for _, k := range keys {
		m.put(k, "v")
	}
	man := m.s.man.Load()
	var size int64
	for idx := range keys {
		b := man.slots[idx].cached.Load()
		require.NotNil(t, b)
		if size == 0 {
			size = b.size
		}
		require.Equal(t, size, b.size, "buckets of one key of one length have one size")
	}
	require.Equal(t, n, cachedBuckets(man))
	require.Equal(t, int64(n)*size, man.cacheBytes.Load())
	return keys, size
}

func (m *mount) mustGet(key string) {
	m.t.Helper()
	v, err := m.get(key)
	require.NoError(m.t, err)
	require.Equal(m.t, "v", v)
}

// A cache exactly at its bound evicts nothing, and a bound of k buckets
// keeps exactly k of them: eviction stops as soon as the cache fits, not
// one bucket later; reading a bucket into a full cache drops exactly one
// other.
func TestAManifestCacheAtItsBoundKeepsExactlyWhatFits(t *testing.T) {
	m := newMount(t)
	keys, s := equalBuckets(t, m, 16)
	man := m.s.man.Load()

	m.s.SetManifestCacheBytes(16 * s)
	require.Equal(t, 16, cachedBuckets(man), "a cache exactly at its new bound evicts nothing")

	m.s.SetManifestCacheBytes(8 * s)
	require.Equal(t, 8, cachedBuckets(man), "room for 8 buckets keeps 8")
	require.Equal(t, 8*s, man.cacheBytes.Load())

	// Read every key twice over: a hit changes nothing, a miss caches its
	// bucket and drops exactly one other, so the cache stays exactly full.
	for range 2 {
		for idx, k := range keys {
			m.mustGet(k)
			require.NotNil(t, man.slots[idx].cached.Load(), "the bucket just read is cached")
			require.Equal(t, 8, cachedBuckets(man))
			require.Equal(t, 8*s, man.cacheBytes.Load())
		}
	}
}

// Shrinking the cache to one bucket keeps the bucket read since the last
// eviction and drops those not read (the clock's second chance), wherever
// the clock starts. The start is random: with 31 buckets cached, dropping
// them in clock order regardless of use would keep the one read only once
// in 31 times, so 8 rounds cannot all pass by chance.
func TestARecentlyReadBucketSurvivesAShrink(t *testing.T) {
	m := newMount(t)
	keys, s := equalBuckets(t, m, 32)
	man := m.s.man.Load()
	idxs := make([]int, 0, len(keys))
	for idx := range keys {
		idxs = append(idxs, idx)
	}
	slices.Sort(idxs)

	for round := range 8 {
		read := idxs[round*3%len(idxs)]
		m.s.SetManifestCacheBytes(DefaultManifestCacheBytes)
		for _, k := range keys {
			m.mustGet(k)
		}
		require.Equal(t, 32, cachedBuckets(man))
		// Every bucket has been read: one eviction passes over them all,
		// clearing their marks, then drops one.
		m.s.SetManifestCacheBytes(31 * s)
		require.Equal(t, 31, cachedBuckets(man))
		// One bucket read since (and cached again if it was the one dropped).
		m.mustGet(keys[read])
		require.NotNil(t, man.slots[read].cached.Load())
		require.Equal(t, 31, cachedBuckets(man))

		m.s.SetManifestCacheBytes(s)
		require.Equal(t, 1, cachedBuckets(man))
		require.NotNil(t, man.slots[read].cached.Load(), "round %d: the bucket read last is the one kept", round)
	}
}

// Eviction takes no lock it would wait for, and gives up after its passes
// when what is left over the bound is a bucket in use: shrinking the
// cache returns, dropping every other bucket and leaving the busy one
// cached, instead of spinning until the bucket is free.
func TestEvictionGivesUpOnABucketInUse(t *testing.T) {
	m := newMount(t)
	keys, s := equalBuckets(t, m, 8)
	man := m.s.man.Load()
	var busy int
	for idx := range keys {
		busy = idx
		break
	}
	man.slots[busy].mu.Lock()
	release := sync.OnceFunc(man.slots[busy].mu.Unlock)
	defer release()

	done := make(chan struct{})
	go func() {
		defer close(done)
		m.s.SetManifestCacheBytes(0)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		// Only a hang gets here; the deferred release lets it end.
		t.Fatal("shrinking the cache waits for a bucket in use")
	}
	require.Equal(t, 1, cachedBuckets(man), "every free bucket is dropped")
	require.NotNil(t, man.slots[busy].cached.Load(), "the busy bucket is left cached")
	require.Equal(t, s, man.cacheBytes.Load())

	// Once free, the next eviction drops it.
	release()
	m.s.SetManifestCacheBytes(0)
	require.Equal(t, 0, cachedBuckets(man))
	require.Equal(t, int64(0), man.cacheBytes.Load())
}

// A bound of zero leaves no bucket cached, whichever its index: shrinking
// spares none (the first buckets, 0 and 1, included).
func TestAZeroManifestCacheBoundLeavesNoBucketCached(t *testing.T) {
	m := newMount(t)
	keys, _ := equalBuckets(t, m, 6, 0, 1)
	require.Contains(t, keys, 0)
	require.Contains(t, keys, 1)
	man := m.s.man.Load()

	m.s.SetManifestCacheBytes(0)
	require.Equal(t, 0, cachedBuckets(man))
	require.Equal(t, int64(0), man.cacheBytes.Load())
	// Every key still reads, from storage, and stays uncached.
	for _, k := range keys {
		m.mustGet(k)
	}
	require.Equal(t, 0, cachedBuckets(man))
}
