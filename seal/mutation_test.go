package seal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// Tests written against the mutants that gremlins (make mutation) found
// living or not covered in this package: each names the property whose
// loss it catches.

// The recovery split's bounds are exact: 2 of 2 and 255 shares are fine,
// one share less or more is refused with a message saying what to change.
func TestNewRecoveryBoundsAreExact(t *testing.T) {
	_, _, err := NewRecovery(2, 1)
	require.ErrorContains(t, err, "threshold must be at least 2")
	_, parts, err := NewRecovery(2, 2)
	require.NoError(t, err)
	require.Len(t, parts, 2)
	_, _, err = NewRecovery(2, 3)
	require.ErrorContains(t, err, "shares (2) cannot be fewer than threshold (3)")
	_, parts, err = NewRecovery(3, 3)
	require.NoError(t, err)
	require.Len(t, parts, 3)
	_, parts, err = NewRecovery(255, 2)
	require.NoError(t, err)
	require.Len(t, parts, 255)
	_, _, err = NewRecovery(256, 2)
	require.ErrorContains(t, err, "shares cannot exceed 255")
}

// A value is in a sealed format only with its magic and room for the
// header and the nonce: one byte shorter is not.
func TestIsSealedLengthBounds(t *testing.T) {
	v1 := append([]byte("hst\x01"), make([]byte, 4+12)...)
	v2 := append([]byte("hst\x02"), make([]byte, 4+8+12)...)
	require.True(t, IsSealed(v1))
	require.False(t, IsSealed(v1[:len(v1)-1]))
	require.True(t, IsSealed(v2))
	require.False(t, IsSealed(v2[:len(v2)-1]))
	// A v2 header is longer: v2's magic on a v1-sized value is not sealed.
	short := append([]byte("hst\x02"), make([]byte, 4+12)...)
	require.False(t, IsSealed(short))
	require.False(t, IsSealed(append([]byte("hst\x03"), make([]byte, 4+8+12)...)))

	h, ok := parseHeader(append(append([]byte("hst\x02"), 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 1, 2), make([]byte, 12)...))
	require.True(t, ok)
	require.Equal(t, header{format: 2, version: 7, gen: 0x102, body: 16}, h)
	h, ok = parseHeader(append(append([]byte("hst\x01"), 0, 0, 1, 0), make([]byte, 12)...))
	require.True(t, ok)
	require.Equal(t, header{format: 1, version: 256, body: 8}, h)
}

// The unreadable-entries error names the first ten and counts the rest.
func TestUnreadableEntriesErrorShowsTenAndCountsTheRest(t *testing.T) {
	mk := func(n int) *UnreadableEntriesError {
		e := &UnreadableEntriesError{}
		for i := range n {
			e.Paths = append(e.Paths, fmt.Sprintf("policy/k%d", i))
			e.Errs = append(e.Errs, fmt.Errorf("entry k%d: bad", i))
		}
		return e
	}
	msg := mk(12).Error()
	require.True(t, strings.HasPrefix(msg, "12 storage entries cannot be opened and were left as they are: entry k0: bad; "), msg)
	require.Contains(t, msg, "entry k9: bad; ... (2 more)")
	require.NotContains(t, msg, "entry k10")
	msg = mk(10).Error()
	require.True(t, strings.HasSuffix(msg, "entry k9: bad"), msg)
	require.NotContains(t, msg, "more")
	require.Equal(t, "1 storage entry cannot be opened and was left as it is: entry k0: bad", mk(1).Error())
	var target *UnreadableEntriesError
	require.True(t, errors.As(fmt.Errorf("wrapped: %w", mk(3)), &target))
	require.Len(t, target.Unwrap(), 3)
}

// cachedBuckets counts the manifest buckets held decoded in memory.
func cachedBuckets(m *manifest) int {
	n := 0
	for i := range m.slots {
		if m.slots[i].cached.Load() != nil {
			n++
		}
	}
	return n
}

// Lowering the manifest cache's bound evicts at once, down to the bound;
// entries of evicted buckets are read (and checked) from storage again.
func TestShrinkingTheManifestCacheEvictsAtOnce(t *testing.T) {
	m := newMount(t)
	var keys []string
	for i := range 200 {
		k := fmt.Sprintf("policy/k%03d", i)
		keys = append(keys, k)
		m.put(k, "v-"+k)
	}
	man := m.s.man.Load()
	full := man.cacheBytes.Load()
	cached := cachedBuckets(man)
	require.Greater(t, cached, 100, "200 keys spread over most of the 256 buckets, all cached under the default bound")

	limit := full / 4
	m.s.SetManifestCacheBytes(limit)
	require.LessOrEqual(t, man.cacheBytes.Load(), limit, "evicted at once down to the new bound")
	require.Less(t, cachedBuckets(man), cached/2)
	require.Greater(t, cachedBuckets(man), 0, "what fits stays cached")

	// Every key still reads, and the cache never grows past the bound.
	for _, k := range keys {
		v, err := m.get(k)
		require.NoError(t, err)
		require.Equal(t, "v-"+k, v)
		require.LessOrEqual(t, man.cacheBytes.Load(), limit)
	}
	// Evicted buckets are read again from storage: a replayed entry of
	// one is still refused.
	old := m.raw(keys[0])
	m.put(keys[0], "newer")
	m.s.SetManifestCacheBytes(0)
	require.Equal(t, 0, cachedBuckets(man))
	require.Equal(t, int64(0), man.cacheBytes.Load())
	m.plant(keys[0], old)
	_, err := m.get(keys[0])
	require.ErrorContains(t, err, "older than the manifest records")

	// Raising the bound again caches what is read.
	m.s.SetManifestCacheBytes(DefaultManifestCacheBytes)
	_, _ = m.get(keys[1])
	require.Equal(t, 1, cachedBuckets(man))
}

// A bound set before the manifest is loaded applies once it is.
func TestManifestCacheBoundSetBeforeLoad(t *testing.T) {
	m := newMount(t)
	for i := range 50 {
		m.put(fmt.Sprintf("policy/k%03d", i), "v")
	}
	s := NewSealer(m.s.Keyring(), plainSeal)
	s.SetManifestCacheBytes(0)
	require.NoError(t, s.LoadManifest(m.ctx, m.under))
	v := s.Wrap(m.under)
	for i := range 50 {
		e, err := v.Get(m.ctx, fmt.Sprintf("policy/k%03d", i))
		require.NoError(t, err)
		require.Equal(t, "v", string(e.Value))
	}
	require.Equal(t, 0, cachedBuckets(s.man.Load()))
}

// Invalidate drops the cached copy of exactly the bucket named, so that a
// node that did not make a change (a standby) reads it again; any other
// key, or a look-alike of a bucket's path, changes nothing.
func TestInvalidateDropsExactlyTheBucketNamed(t *testing.T) {
	a := newMount(t)
	const key = "policy/shared"
	a.put(key, "v1")
	_, err := a.get(key)
	require.NoError(t, err)

	// Another node over the same storage deletes the key.
	b := NewSealer(a.s.Keyring(), plainSeal)
	require.NoError(t, b.LoadManifest(a.ctx, a.under))
	require.NoError(t, b.Wrap(a.under).Delete(a.ctx, key))

	// a's copy of the bucket still records the key as live: the entry
	// looks removed outside the plugin.
	_, err = a.get(key)
	require.ErrorContains(t, err, "removed outside the plugin")

	path := bucketPathOf(key)
	for _, other := range []string{
		key, manifestRootPath, path + "x", "x" + path, strings.ToUpper(path),
		manifestBucketPrefix + "zz", bucketPaths[(bucketIndex(key)+1)%bucketCount],
	} {
		a.s.Invalidate(other)
		_, err = a.get(key)
		require.ErrorContains(t, err, "removed outside the plugin", "after Invalidate(%q)", other)
	}
	a.s.Invalidate(path)
	got, err := a.get(key)
	require.NoError(t, err)
	require.Empty(t, got)

	// Bucket 00 is a bucket like any other.
	zero := ""
	for i := 0; zero == ""; i++ {
		if k := fmt.Sprintf("policy/z%d", i); bucketIndex(k) == 0 {
			zero = k
		}
	}
	a.put(zero, "z1")
	require.NoError(t, b.Wrap(a.under).Delete(a.ctx, zero))
	_, err = a.get(zero)
	require.ErrorContains(t, err, "removed outside the plugin")
	a.s.Invalidate(manifestBucketPrefix + "00")
	got, err = a.get(zero)
	require.NoError(t, err)
	require.Empty(t, got)

	// A Sealer without a manifest has nothing to drop.
	k, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	NewSealer(k, plainSeal).Invalidate(path)
}

// A keyring that goes back to an older active version (a configuration
// restored) leaves the manifest not knowing since when that version is
// active: compaction keeps every tombstone rather than drop one that an
// entry sealed under another version might still need.
func TestKeyringGoingBackKeepsTombstones(t *testing.T) {
	m := newMount(t)
	m.put("policy/gone", "x")
	older := m.s.Keyring()
	m.rotate()
	require.NoError(t, m.v.Delete(m.ctx, "policy/gone"))
	raw := m.raw(bucketPathOf("policy/gone"))

	// Back to the older keyring (nothing is read here, only compacted).
	m.s.SetKeyring(older)
	man := m.s.man.Load()
	man.mu.Lock()
	since, version := man.root.activeSince, man.root.activeVersion
	man.mu.Unlock()
	require.Equal(t, older.Active(), version)
	require.Equal(t, uint64(0), since, "going back: since when is unknown")
	require.NoError(t, m.s.CompactManifest(m.ctx, m.under))
	require.Equal(t, raw, m.raw(bucketPathOf("policy/gone")), "the bucket and its tombstone are kept")
}

// checkAbsent: an entry absent while its record is live is refused only
// when the record is the one seen; a record that changed since is a read
// to do again, and a record that became a tombstone is an absent entry.
func TestCheckAbsentDistinguishesTheRecordSeen(t *testing.T) {
	m := newMount(t)
	const key = "policy/c"
	m.put(key, "v1")
	man := m.s.man.Load()
	b, err := man.bucketFor(m.ctx, m.s, m.under, key)
	require.NoError(t, err)
	seen, has := b.lookup(key)
	require.True(t, has)

	require.ErrorContains(t, man.checkAbsent(m.ctx, m.s, m.under, key, seen), "removed outside the plugin")
	m.put(key, "v2")
	require.ErrorIs(t, man.checkAbsent(m.ctx, m.s, m.under, key, seen), errReadAgain)
	require.NoError(t, m.v.Delete(m.ctx, key))
	require.NoError(t, man.checkAbsent(m.ctx, m.s, m.under, key, seen))
	require.NoError(t, man.checkAbsent(m.ctx, m.s, m.under, "policy/never", seen))
}

// The manifest's rule at its boundaries: a tombstone at the entry's own
// generation or later refuses it, one before it does not; a live record
// refuses only an older entry.
func TestCheckRecordBoundaries(t *testing.T) {
	require.ErrorIs(t, checkRecord("p", 5, tombstone(5)), ErrEntryRefused)
	require.ErrorIs(t, checkRecord("p", 5, tombstone(6)), ErrEntryRefused)
	require.NoError(t, checkRecord("p", 5, tombstone(4)))
	require.NoError(t, checkRecord("p", 5, liveRec(5)))
	require.NoError(t, checkRecord("p", 6, liveRec(5)))
	require.ErrorIs(t, checkRecord("p", 4, liveRec(5)), ErrEntryRefused)
}

// A rotation's new version comes after the latest held, even when the
// active one is older (a keyring gone back).
func TestRotatedAfterTheLatestVersion(t *testing.T) {
	k, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	k2, err := k.Rotated(randomKey(t))
	require.NoError(t, err)
	k3, err := k2.Rotated(randomKey(t))
	require.NoError(t, err)
	require.Equal(t, []uint32{1, 2, 3}, k3.Versions())
	require.Equal(t, uint32(3), k3.Active())
	back := &Keyring{active: 1, versions: k3.versions}
	k4, err := back.Rotated(randomKey(t))
	require.NoError(t, err)
	require.Equal(t, uint32(4), k4.Active())
	require.Equal(t, []uint32{1, 2, 3, 4}, k4.Versions())
	require.Equal(t, []uint32{1, 2, 3}, k3.Versions(), "the keyring rotated is not changed")
}

// A bucket's size, what the cache bound counts, is the same whichever way
// the bucket was built (added to, compacted, decoded) and covers its
// encoding.
func TestBucketSizeIsConsistent(t *testing.T) {
	paths := []string{"policy/a", "policy/ab", "policy/abc", "lifecycle/k", "x"}
	var ups []update
	for i, p := range paths {
		ups = append(ups, update{p, liveRec(uint64(i + 1))})
	}
	b := (&bucket{size: 64}).with(ups...)
	want := int64(64)
	for _, p := range paths {
		want += int64(len(p)) + recordOverhead
	}
	require.Equal(t, want, b.size)
	require.GreaterOrEqual(t, b.size, int64(len(b.encode())))

	// Writing a path again does not count it twice.
	require.Equal(t, want, b.with(update{"policy/a", liveRec(9)}).size)

	dec, _, err := decodeBucket(b.encode())
	require.NoError(t, err)
	require.Equal(t, b.paths, dec.paths)
	require.Equal(t, b.recs, dec.recs)
	require.Equal(t, b.size, dec.size)

	kept, dropped := b.without(func(rec uint64) bool { return recGen(rec) == 2 || recGen(rec) == 4 })
	require.Equal(t, 2, dropped)
	require.Equal(t, want-int64(len("policy/ab")+len("lifecycle/k"))-2*recordOverhead, kept.size)
	none, dropped := b.without(func(uint64) bool { return false })
	require.Equal(t, 0, dropped)
	require.Equal(t, b.size, none.size)
}

// The bucket encoding stores each path as the bytes it shares with the
// one before and the rest: paths with long common prefixes (as every
// mount's are) take little room, paths that are prefixes of the next
// decode back.
func TestBucketEncodingSharesPrefixes(t *testing.T) {
	long := "policy/" + strings.Repeat("k", 100)
	paths := []string{long, long + "1", long + "12", long + "2"}
	var ups []update
	total := 0
	for i, p := range paths {
		ups = append(ups, update{p, liveRec(uint64(i + 1))})
		total += len(p)
	}
	b := (&bucket{size: 64}).with(ups...)
	enc := b.encode()
	require.Less(t, len(enc), len(long)+40, "%d bytes for %d bytes of paths", len(enc), total)
	dec, _, err := decodeBucket(enc)
	require.NoError(t, err)
	require.Equal(t, b.paths, dec.paths)
	require.Equal(t, b.recs, dec.recs)
}

// Compaction writes a bucket only if it drops a tombstone from it.
func TestCompactionWritesOnlyBucketsWithTombstones(t *testing.T) {
	m := newMount(t)
	for i := range 30 {
		m.put(fmt.Sprintf("policy/k%02d", i), "v")
	}
	require.NoError(t, m.v.Delete(m.ctx, "policy/k07"))
	m.rotate() // reseals everything, then compacts: the tombstone goes

	cs := &countingStorage{Storage: m.under}
	require.NoError(t, m.s.CompactManifest(m.ctx, cs))
	require.Equal(t, int64(0), cs.puts.Load(), "nothing left to compact, nothing written")

	require.NoError(t, m.v.Delete(m.ctx, "policy/k08"))
	m.rotate()
	require.NoError(t, m.s.CompactManifest(m.ctx, cs))
	require.Equal(t, int64(0), cs.puts.Load())
	v, err := m.get("policy/k09")
	require.NoError(t, err)
	require.Equal(t, "v", v)
}

// A bucket whose paths are out of order, repeated or empty is malformed.
func TestDecodeBucketRefusesDisorder(t *testing.T) {
	enc := func(paths ...string) []byte {
		out := []byte{1, byte(len(paths))}
		for _, p := range paths {
			out = append(out, 0, byte(len(p)))
			out = append(out, p...)
			out = append(out, 2)
		}
		return out
	}
	_, _, err := decodeBucket(enc("a", "b"))
	require.NoError(t, err)
	for _, bad := range [][]string{{"b", "a"}, {"a", "a"}, {""}, {"", "a"}} {
		_, _, err := decodeBucket(enc(bad...))
		require.Error(t, err, "%q", bad)
	}
}

// The decoders' bounds: a bucket of the smallest records possible decodes,
// a count beyond what the bytes can hold is malformed (and allocates
// nothing), and a root's version must fit 32 bits.
func TestDecoderBounds(t *testing.T) {
	// Records of 4 bytes each: shared 0, length 1, one byte, record 2.
	small := []byte{1, 3, 0, 1, 'a', 2, 0, 1, 'b', 2, 0, 1, 'c', 2}
	b, _, err := decodeBucket(small)
	require.NoError(t, err)
	require.Equal(t, []string{"a", "b", "c"}, b.paths)
	_, _, err = decodeBucket([]byte{1, 4, 0, 1, 'a', 2, 0, 1, 'b', 2, 0, 1, 'c', 2})
	require.EqualError(t, err, "malformed manifest bucket: 4 records cannot fit in 12 bytes", "one record more than the bytes hold is refused before any is read")
	huge := binary.AppendUvarint([]byte{1}, 1<<40)
	_, _, err = decodeBucket(append(huge, 0, 1, 'a', 2))
	require.EqualError(t, err, "malformed manifest bucket: 1099511627776 records cannot fit in 4 bytes")
	// A path exactly as long as what is left leaves no room for its
	// record; one byte longer runs past the end.
	_, _, err = decodeBucket([]byte{1, 1, 0, 3, 'a', 'b', 'c'})
	require.EqualError(t, err, "malformed manifest bucket: record 0 ends after its path")
	_, _, err = decodeBucket([]byte{1, 1, 0, 4, 'a', 'b', 'c'})
	require.EqualError(t, err, "malformed manifest bucket: the path of record 0 runs past the end")
	_, _, err = decodeBucket([]byte{1, 2, 0, 1, 'a', 2, 0, 5, 'b', 'c', 'd'})
	require.EqualError(t, err, "malformed manifest bucket: the path of record 1 runs past the end")

	root := manifestRoot{counter: 7, activeVersion: math.MaxUint32, activeSince: 3}
	got, err := decodeRoot(root.encode())
	require.NoError(t, err)
	require.Equal(t, root, got)
	enc := []byte{1, 7}
	enc = binary.AppendUvarint(enc, 1<<32)
	enc = append(enc, make([]byte, 1+bucketCount)...)
	_, err = decodeRoot(enc)
	require.Error(t, err, "a version beyond 32 bits")
}

// Resealing counts what it re-encrypted.
func TestResealAllCountsWhatItChanged(t *testing.T) {
	m := newMount(t)
	for i := range 7 {
		m.put(fmt.Sprintf("policy/k%d", i), "v")
	}
	ring, err := m.s.Keyring().Rotated(randomKey(t))
	require.NoError(t, err)
	m.s.SetKeyring(ring)
	n, err := m.s.ResealAll(m.ctx, m.under)
	require.NoError(t, err)
	require.Equal(t, 7, n)
	n, err = m.s.ResealAll(m.ctx, m.under)
	require.NoError(t, err)
	require.Equal(t, 0, n, "nothing left under the old version")
}

// A bucket exactly the size of the bound is cached, and two buckets
// exactly filling it both stay.
func TestCacheBoundIsInclusive(t *testing.T) {
	m := newMount(t)
	keys := map[int]string{}
	for i := 0; len(keys) < 2; i++ {
		k := fmt.Sprintf("policy/b%d", i)
		if _, ok := keys[bucketIndex(k)]; !ok {
			keys[bucketIndex(k)] = k
			m.put(k, "v")
		}
	}
	man := m.s.man.Load()
	var total int64
	sizes := map[int]int64{}
	for idx := range keys {
		sizes[idx] = man.slots[idx].cached.Load().size
		total += sizes[idx]
	}
	m.s.SetManifestCacheBytes(total)
	for _, k := range keys {
		_, err := m.get(k)
		require.NoError(t, err)
	}
	require.Equal(t, 2, cachedBuckets(man))
	require.Equal(t, total, man.cacheBytes.Load())

	for idx, k := range keys {
		m.s.SetManifestCacheBytes(0)
		m.s.SetManifestCacheBytes(sizes[idx])
		_, err := m.get(k)
		require.NoError(t, err)
		require.Equal(t, 1, cachedBuckets(man), "a bucket of exactly the bound is cached")
		m.s.SetManifestCacheBytes(sizes[idx] - 1)
		require.Equal(t, 0, cachedBuckets(man), "one byte less and it is not")
	}
}

// Deleting an entry the manifest does not record (written before the
// manifest existed) removes it and leaves a tombstone: its copy is refused.
func TestDeleteOfAnUnrecordedEntry(t *testing.T) {
	m := newMount(t)
	old, err := m.ring.Seal("policy/legacy", []byte("from before the manifest"))
	require.NoError(t, err)
	m.plant("policy/legacy", old)
	require.NoError(t, m.v.Delete(m.ctx, "policy/legacy"))
	require.Nil(t, m.raw("policy/legacy"), "the entry is deleted")
	m.plant("policy/legacy", old)
	_, err = m.get("policy/legacy")
	require.ErrorIs(t, err, ErrEntryRefused)
}

// A delete stores the manifest root before it returns: after a restart
// that followed it at once, the bucket from before the delete and the
// entry's copy, put back together, are refused.
func TestDeleteStoresTheRootBeforeReturning(t *testing.T) {
	m := newMount(t)
	m.put("policy/d", "v")
	bucketPath := bucketPathOf("policy/d")
	oldBucket, oldEntry := m.raw(bucketPath), m.raw("policy/d")
	require.NoError(t, m.v.Delete(m.ctx, "policy/d"))
	m.restart()
	m.plant(bucketPath, oldBucket)
	m.plant("policy/d", oldEntry)
	m.restart()
	_, err := m.get("policy/d")
	require.ErrorIs(t, err, ErrEntryRefused)
}

// A manifest bucket that cannot be resealed fails the rotation's reseal,
// whichever worker met it.
func TestResealAllReportsAFailedBucket(t *testing.T) {
	m := newMount(t)
	m.put("policy/a", "v")
	other := bucketPaths[(bucketIndex("policy/a")+1)%bucketCount]
	ring, err := m.s.Keyring().Rotated(randomKey(t))
	require.NoError(t, err)
	m.s.SetKeyring(ring)
	fs := &failingStorage{Storage: m.under}
	fs.failOn(func(key string) bool { return key == other })
	_, err = m.s.ResealAll(m.ctx, fs)
	require.ErrorContains(t, err, "resealing the storage manifest")
	require.ErrorContains(t, err, "simulated crash before writing "+other)
	fs.failOn(nil)
	_, err = m.s.ResealAll(m.ctx, fs)
	require.NoError(t, err)
}

// A restart under the keyring the root names keeps knowing since when its
// version is active: compaction after the restart drops the tombstones
// from before it.
func TestCompactionAfterARestart(t *testing.T) {
	m := newMount(t)
	m.put("policy/t", "v")
	require.NoError(t, m.v.Delete(m.ctx, "policy/t"))
	ring, err := m.s.Keyring().Rotated(randomKey(t))
	require.NoError(t, err)
	m.s.SetKeyring(ring)
	_, err = m.s.ResealAll(m.ctx, m.under)
	require.NoError(t, err)
	m.s.SetKeyring(ring.ActiveOnly())
	m.restart()

	b, err := m.s.man.Load().bucketFor(m.ctx, m.s, m.under, "policy/t")
	require.NoError(t, err)
	_, has := b.lookup("policy/t")
	require.True(t, has, "the tombstone is there before compaction")
	cs := &countingStorage{Storage: m.under}
	require.NoError(t, m.s.CompactManifest(m.ctx, cs))
	require.Positive(t, cs.puts.Load(), "the bucket holding the tombstone is rewritten")
	b, err = m.s.man.Load().bucketFor(m.ctx, m.s, m.under, "policy/t")
	require.NoError(t, err)
	_, has = b.lookup("policy/t")
	require.False(t, has, "the tombstone is gone")
}

// initAfterLoss builds a mount whose key policy/k was written many times
// (its bucket reaching a generation above the 256 that a fresh manifest's
// buckets take) and then deleted, and returns it with the attacker's copies
// of k's last entry and of its bucket from while k was live. lose then
// removes part of the manifest from storage before InitManifest rebuilds it.
func initAfterLoss(t *testing.T, lose func(m *mount)) (m *mount, entry, bucket []byte) {
	m = newMount(t)
	for i := range 200 {
		m.put("policy/k", fmt.Sprintf("v%d", i))
	}
	entry, bucket = m.raw("policy/k"), m.raw(bucketPathOf("policy/k"))
	require.NoError(t, m.v.Delete(m.ctx, "policy/k"))
	lose(m)
	require.NoError(t, m.s.InitManifest(m.ctx, m.under))
	m.v = m.s.Wrap(m.under)
	return m, entry, bucket
}

// InitManifest starts above the generations the stored root had reserved,
// even when the buckets are gone: otherwise the rebuilt buckets take low
// generations, and a bucket copied from before (which records a deleted
// key as live) passes as current, bringing the deleted value back.
func TestInitManifestStartsAboveTheStoredRoot(t *testing.T) {
	m, entry, bucket := initAfterLoss(t, func(m *mount) {
		for _, p := range bucketPaths {
			require.NoError(t, m.under.Delete(m.ctx, p))
		}
	})
	m.plant(bucketPathOf("policy/k"), bucket)
	m.plant("policy/k", entry)
	v, err := m.get("policy/k")
	require.ErrorContains(t, err, "older than the manifest root records", "got %q", v)
}

// The same with the root gone and the buckets there: their generations
// (and those of the tombstones they hold) are the floor.
func TestInitManifestStartsAboveTheStoredBuckets(t *testing.T) {
	m, entry, bucket := initAfterLoss(t, func(m *mount) {
		require.NoError(t, m.under.Delete(m.ctx, manifestRootPath))
	})
	m.plant(bucketPathOf("policy/k"), bucket)
	m.plant("policy/k", entry)
	v, err := m.get("policy/k")
	require.ErrorContains(t, err, "older than the manifest root records", "got %q", v)
}
