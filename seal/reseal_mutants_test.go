package seal

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"
)

// rootWatch counts the manifest roots written through it and keeps the
// ceiling of the last one, opened as LoadManifest would open it.
type rootWatch struct {
	logical.Storage
	t       testing.TB
	ring    *Keyring
	writes  int
	ceiling uint64
}

func (w *rootWatch) Put(ctx context.Context, e *logical.StorageEntry) error {
	if err := w.Storage.Put(ctx, e); err != nil {
		return err
	}
	if e.Key == manifestRootPath {
		w.writes++
		w.ceiling = storedCeiling(w.t, w.ring, e.Value)
	}
	return nil
}

// storedCeiling opens a stored manifest root and returns its ceiling.
func storedCeiling(t testing.TB, ring *Keyring, value []byte) uint64 {
	t.Helper()
	h, ok := parseHeader(value)
	require.True(t, ok)
	pt, err := ring.open(purposeManifest, manifestRootPath, h, value)
	require.NoError(t, err)
	root, err := decodeRoot(pt)
	require.NoError(t, err)
	return root.counter
}

// allocUnder issues one generation as a write would (s.rot read-held).
func allocUnder(t testing.TB, m *mount, under logical.Storage) uint64 {
	t.Helper()
	m.s.rot.RLock()
	defer m.s.rot.RUnlock()
	g, err := m.s.man.Load().alloc(m.ctx, m.s, under)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// One root write reserves ceilingStep generations: the generations up to
// the stored ceiling are issued without writing the root (even while the
// root in memory has other changes not yet stored), the first above it
// only once a root with a higher ceiling is stored, and that root covers
// the next ceilingStep generations exactly. After every allocation the
// root in storage has a ceiling at or above every generation issued, so
// that a restart never issues one again.
func TestOneRootWriteReservesCeilingStepGenerations(t *testing.T) {
	m := newMount(t)
	ring, err := m.s.Keyring().Rotated(randomKey(t))
	require.NoError(t, err)
	m.s.SetKeyring(ring) // changes the root in memory, stores nothing
	w := &rootWatch{Storage: m.under, t: t, ring: ring, ceiling: storedCeiling(t, ring, m.raw(manifestRootPath))}
	man := m.s.man.Load()
	man.mu.Lock()
	first := man.next + 1
	man.mu.Unlock()
	require.Greater(t, w.ceiling, first)

	issue := func() uint64 {
		g := allocUnder(t, m, w)
		if g > w.ceiling {
			t.Fatalf("generation %d issued above the stored ceiling %d", g, w.ceiling)
		}
		return g
	}
	for g := first; g <= w.ceiling; g++ {
		if got := issue(); got != g || w.writes != 0 {
			t.Fatalf("issued %d, want %d; %d root writes at or below the stored ceiling, want none", got, g, w.writes)
		}
	}
	for round := 1; round <= 2; round++ {
		g := issue()
		require.Equal(t, round, w.writes, "generation %d, above the stored ceiling, writes the root once", g)
		require.Equal(t, g+ceilingStep, w.ceiling, "that root reserves ceilingStep generations after it")
		for range ceilingStep {
			issue()
		}
		require.Equal(t, round, w.writes, "the ceilingStep generations reserved write no root")
	}
}

// A write that takes the first generation above the stored ceiling and
// crashes after its entry, before its bucket: after a restart the path's
// next write gets a generation above the crashed one's, so the crashed
// entry, put back, is refused.
func TestAnEntryWrittenAboveTheStoredCeilingIsNeverMatchedAfterACrash(t *testing.T) {
	m := newMount(t)
	fs := &failingStorage{Storage: m.under}
	m.under = fs
	m.restart()
	m.put("policy/k", "v1")
	man := m.s.man.Load()
	for {
		man.mu.Lock()
		below := man.next < man.root.counter
		man.mu.Unlock()
		if !below {
			break
		}
		allocUnder(t, m, fs) // other writes, up to the ceiling
	}
	fs.failOn(func(k string) bool { return strings.HasPrefix(k, manifestBucketPrefix) })
	err := m.v.Put(m.ctx, &logical.StorageEntry{Key: "policy/k", Value: []byte("crashed")})
	require.ErrorContains(t, err, "simulated crash")
	crashed := m.raw("policy/k")
	fs.failOn(nil)

	m.restart()
	m.put("policy/k", "v2")
	m.plant("policy/k", crashed)
	got, err := m.get("policy/k")
	require.ErrorContains(t, err, "older than the manifest records", "got %q", got)
}

// A write after the active root key version changes (a rotation, or a
// keyring going back to an older version) stores the root before it
// returns, as any write does: after a restart, the bucket and the entry
// from before the write, put back together, are refused.
func TestAWriteAfterTheActiveVersionChangesStoresTheRoot(t *testing.T) {
	for _, back := range []bool{false, true} {
		t.Run(fmt.Sprintf("back=%v", back), func(t *testing.T) {
			m := newMount(t)
			next, err := m.s.Keyring().Rotated(randomKey(t))
			require.NoError(t, err)
			if back {
				m.s.SetKeyring(next)
				// The older version active again, the newer one still held.
				next = next.WithManifest()
				next.active = 1
			}
			m.put("policy/k", "v1")
			bp := bucketPathOf("policy/k")
			oldBucket, oldEntry := m.raw(bp), m.raw("policy/k")

			m.s.SetKeyring(next)
			m.put("policy/k", "v2")
			m.restart()
			m.plant(bp, oldBucket)
			m.plant("policy/k", oldEntry)
			got, err := m.get("policy/k")
			require.ErrorIs(t, err, ErrEntryRefused, "got %q", got)
		})
	}
}

// A ResealAll or a compaction that has nothing to do writes nothing, also
// right after a restart (when nothing is yet known to be stored by this
// process).
func TestResealAllAndCompactionWithNothingToDoWriteNothing(t *testing.T) {
	m := newMount(t)
	m.put("policy/a", "v")
	m.rotate()
	m.restart()
	cs := &countingStorage{Storage: m.under}
	n, err := m.s.ResealAll(m.ctx, cs)
	require.NoError(t, err)
	require.Zero(t, n)
	require.Zero(t, cs.puts.Load(), "ResealAll wrote to storage")
	require.NoError(t, m.s.CompactManifest(m.ctx, cs))
	require.Zero(t, cs.puts.Load(), "CompactManifest wrote to storage")
}

// A rotation whose final root write failed, run again: every bucket is
// already under the new version, but the root is not, so the second run
// stores it under the new version; the old version can then be pruned and
// the manifest still loads.
func TestARetriedRotationStoresTheRootUnderTheNewVersion(t *testing.T) {
	m := newMount(t)
	ring, err := m.s.Keyring().Rotated(randomKey(t))
	require.NoError(t, err)
	m.s.SetKeyring(ring)
	fs := &failingStorage{Storage: m.under}
	fs.failOn(func(k string) bool { return k == manifestRootPath })
	_, err = m.s.ResealAll(m.ctx, fs)
	require.ErrorContains(t, err, "simulated crash before writing "+manifestRootPath)
	fs.failOn(nil)
	_, err = m.s.ResealAll(m.ctx, fs)
	require.NoError(t, err)
	v, ok := SealedVersion(m.raw(manifestRootPath))
	require.True(t, ok)
	require.Equal(t, ring.Active(), v, "the root is stored under the new version")

	m.s.SetKeyring(ring.ActiveOnly())
	m.restart()
	m.put("policy/k", "v")
}

// Resealing counts the copies it deletes because a tombstone covers them,
// and Reseal reports such a deletion as a change.
func TestResealCountsTheDeletedCopiesItRemoves(t *testing.T) {
	m := newMount(t)
	m.put("policy/a", "v")
	m.put("policy/gone", "old")
	copyOfGone := m.raw("policy/gone")
	require.NoError(t, m.v.Delete(m.ctx, "policy/gone"))
	m.plant("policy/gone", copyOfGone)
	ring, err := m.s.Keyring().Rotated(randomKey(t))
	require.NoError(t, err)
	m.s.SetKeyring(ring)
	n, err := m.s.ResealAll(m.ctx, m.under)
	require.NoError(t, err)
	require.Equal(t, 2, n, "policy/a resealed, the copy of policy/gone deleted")
	require.Nil(t, m.raw("policy/gone"))

	m.plant("policy/gone", copyOfGone)
	changed, err := m.s.Reseal(m.ctx, m.under, "policy/gone")
	require.NoError(t, err)
	require.True(t, changed, "deleting the copy is a change")
	require.Nil(t, m.raw("policy/gone"))
}

// Reseal of one entry stores the root before it returns: the root records
// the rewritten bucket, so after a restart the bucket from before the
// reseal, put back, is refused as older than the root records.
func TestResealStoresTheRootBeforeReturning(t *testing.T) {
	m := newMount(t)
	m.put("policy/k", "v")
	ring, err := m.s.Keyring().Rotated(randomKey(t))
	require.NoError(t, err)
	m.s.SetKeyring(ring)
	bp := bucketPathOf("policy/k")
	oldBucket := m.raw(bp)
	changed, err := m.s.Reseal(m.ctx, m.under, "policy/k")
	require.NoError(t, err)
	require.True(t, changed)
	m.restart()
	m.plant(bp, oldBucket)
	got, err := m.get("policy/k")
	require.ErrorContains(t, err, "older than the manifest root records", "got %q", got)
}

// Reseal of one entry reports a failed root write (the root then does not
// record the rewritten bucket, which a caller must know).
func TestResealReportsAFailedRootWrite(t *testing.T) {
	m := newMount(t)
	m.put("policy/k", "v")
	ring, err := m.s.Keyring().Rotated(randomKey(t))
	require.NoError(t, err)
	m.s.SetKeyring(ring)
	fs := &failingStorage{Storage: m.under}
	fs.failOn(func(k string) bool { return k == manifestRootPath })
	_, err = m.s.Reseal(m.ctx, fs, "policy/k")
	require.ErrorContains(t, err, "simulated crash before writing "+manifestRootPath)
}

// Compaction drops exactly the tombstones at or below the generation
// since which the active version is active (CompactManifest's rule): one
// at that very generation goes, one above it stays. No sequence of
// operations leaves a tombstone at exactly that generation (the last one
// issued before a rotation is a bucket's), so it is set here.
func TestCompactionDropsATombstoneAtExactlySince(t *testing.T) {
	m := newMount(t)
	m.put("policy/at", "v")
	m.put("policy/above", "v")
	require.NoError(t, m.v.Delete(m.ctx, "policy/at"))
	require.NoError(t, m.v.Delete(m.ctx, "policy/above"))
	ring, err := m.s.Keyring().Rotated(randomKey(t))
	require.NoError(t, err)
	m.s.SetKeyring(ring)
	_, err = m.s.ResealAll(m.ctx, m.under)
	require.NoError(t, err)
	m.s.SetKeyring(ring.ActiveOnly())

	man := m.s.man.Load()
	record := func(key string) (uint64, bool) {
		b, err := man.bucketFor(m.ctx, m.s, m.under, key)
		require.NoError(t, err)
		return b.lookup(key)
	}
	at, ok := record("policy/at")
	require.True(t, ok)
	above, ok := record("policy/above")
	require.True(t, ok)
	require.True(t, recDeleted(at) && recDeleted(above))
	require.Greater(t, recGen(above), recGen(at))
	man.mu.Lock()
	man.root.activeSince = recGen(at)
	man.mu.Unlock()

	require.NoError(t, m.s.CompactManifest(m.ctx, m.under))
	_, ok = record("policy/at")
	require.False(t, ok, "the tombstone at exactly since is dropped")
	_, ok = record("policy/above")
	require.True(t, ok, "the tombstone above since is kept")
}

// putCounter counts the Puts to each path.
type putCounter struct {
	logical.Storage
	mu   sync.Mutex
	puts map[string]int
}

func (p *putCounter) Put(ctx context.Context, e *logical.StorageEntry) error {
	p.mu.Lock()
	p.puts[e.Key]++
	p.mu.Unlock()
	return p.Storage.Put(ctx, e)
}

// A rotation re-encrypts the entries of one bucket in batches of
// resealBatch, one bucket write per batch: resealBatch+1 entries of one
// bucket take exactly two writes of it, neither one per entry nor one for
// all of them.
func TestRotationRewritesABucketOncePerResealBatch(t *testing.T) {
	m := newMount(t)
	const idx = 7
	var keys []string
	for i := 0; len(keys) < resealBatch+1; i++ {
		if k := fmt.Sprintf("policy/k%d", i); bucketIndex(k) == idx {
			keys = append(keys, k)
			m.put(k, "v")
		}
	}
	ring, err := m.s.Keyring().Rotated(randomKey(t))
	require.NoError(t, err)
	m.s.SetKeyring(ring)
	pc := &putCounter{Storage: m.under, puts: map[string]int{}}
	n, err := m.s.ResealAll(m.ctx, pc)
	require.NoError(t, err)
	require.Equal(t, len(keys), n)
	require.Equal(t, 2, pc.puts[bucketPaths[idx]])
	for _, k := range keys {
		got, err := m.get(k)
		require.NoError(t, err)
		require.Equal(t, "v", got)
	}
}

// The anchor is called only when a stored root's anchor grew: a root
// stored for another reason (a higher ceiling of generations, the buckets
// as they were) costs no call, which is an HSM write.
func TestAnchorOnlyWhenTheBucketsMoved(t *testing.T) {
	m := newMount(t)
	var anchored []uint64
	m.s.SetAnchor(func(_ context.Context, a uint64) error {
		anchored = append(anchored, a)
		return nil
	})
	m.put("policy/k", "v1")
	require.Len(t, anchored, 1, "a write moves a bucket: anchored")
	w := &rootWatch{Storage: m.under, t: t, ring: m.s.Keyring(), ceiling: storedCeiling(t, m.s.Keyring(), m.raw(manifestRootPath))}
	for w.writes == 0 {
		allocUnder(t, m, w)
	}
	require.Equal(t, 1, w.writes, "a root with a higher ceiling was stored")
	require.Len(t, anchored, 1, "with the same buckets, and no anchor call")
	m.put("policy/k", "v2")
	require.Len(t, anchored, 2)
	require.Greater(t, anchored[1], anchored[0])
}
