package seal

// The manifest binds every sealed entry to a generation that an older copy
// of the entry cannot match, so that a storage writer cannot replay an older
// value of one entry (a key's policy from before min_decryption_version went
// up, a deleted key, a disabled flag) while the root key that sealed it is
// still held.
//
// Attacker: reads and writes any storage entry (sys/raw, an edited backup)
// and can restart the plugin; has no HSM PIN, so cannot seal anything under
// the root key, only copy values the plugin sealed earlier.
//
// Layout, every piece an hst\x02 value sealed under the root key with the
// manifest purpose (so that no entry opens as a piece of the manifest, nor
// the other way round):
//
//	manifest/bucket/<hex byte>: for the paths whose SHA-256 starts with that
//	    byte, path -> (generation, deleted); sorted, prefix-compressed
//	    (bucket.encode); its own generation in its header
//	manifest/root: the generation of each bucket, the generation counter's
//	    ceiling, and which root key version is active since which
//	    generation (for CompactManifest)
//
// Rules:
//   - an entry opens only if its generation >= its bucket's record for the
//     path, and not if the bucket marks the path deleted at a generation >=
//     the entry's;
//   - a bucket opens only if its generation >= the root's record for it;
//   - the root is read from storage only by LoadManifest; while unsealed the
//     copy in memory is authoritative, so a root replayed in storage changes
//     nothing until the next load.
//
// Write order: entry, then bucket, then root (a Delete: bucket, then the
// entry's deletion, then root). A crash between two writes leaves an entry
// newer than its record, which opens, or a bucket newer than its record in
// the root, which opens: never an entry refused that was acknowledged.
//
// Generations come from one counter. The root stores a ceiling above every
// generation issued; a generation above the stored ceiling is issued only
// once a root with a higher ceiling is stored, so a restart never issues a
// generation again. Loading a bucket also raises the counter above every
// record in it, so a write never gets a generation at or below the record
// of its path, even after a root was rolled back.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/vault/sdk/logical"
)

const (
	// manifestPrefix is reserved: the view refuses it, the walks skip it.
	manifestPrefix       = "manifest/"
	manifestRootPath     = "manifest/root"    // under manifestPrefix
	manifestBucketPrefix = "manifest/bucket/" // under manifestPrefix
	bucketCount          = 256

	// ceilingStep is how many generations one root write reserves.
	ceilingStep = 1 << 16
	// resealBatch is how many entries of one bucket a rotation re-encrypts
	// before writing the bucket once for all of them.
	resealBatch = 64

	// DefaultManifestCacheBytes bounds the memory that decoded buckets
	// take, about 50 bytes per path plus the path.
	DefaultManifestCacheBytes = 64 << 20
)

// ErrNoManifest means the storage manifest's root entry is absent.
var ErrNoManifest = errors.New("this mount's storage manifest is missing")

// ErrManifestDoesNotOpen means the manifest root exists but the keyring
// does not open it: the keyring is not this mount's, or the root was
// modified.
var ErrManifestDoesNotOpen = errors.New("the storage manifest does not open under this keyring (the keyring is not this mount's, or the manifest was modified)")

// ErrManifestNotLoaded answers the view of a mount whose keyring says it
// has a manifest, before LoadManifest or InitManifest.
var ErrManifestNotLoaded = errors.New("this mount's storage manifest is not loaded yet (the keyring says the mount has one): no sealed entry is read or written without it")

var bucketPaths = func() (p [bucketCount]string) {
	for i := range p {
		p[i] = fmt.Sprintf("%s%02x", manifestBucketPrefix, i)
	}
	return p
}()

// bucketOfPath is the index of each bucket's storage path.
var bucketOfPath = func() map[string]int {
	m := make(map[string]int, bucketCount)
	for i, p := range bucketPaths {
		m[p] = i
	}
	return m
}()

func bucketIndex(path string) int {
	h := sha256.Sum256([]byte(path))
	return int(h[0])
}

func reserved(path string) bool { return strings.HasPrefix(path, manifestPrefix) }

// A record is gen<<1 | deleted.
func recGen(r uint64) uint64      { return r >> 1 }
func recDeleted(r uint64) bool    { return r&1 == 1 }
func liveRec(gen uint64) uint64   { return gen << 1 }
func tombstone(gen uint64) uint64 { return gen<<1 | 1 }

// checkAbsent decides about an entry that is absent though the record read
// before it, seen, is live. A delete that raced the read shows in the record
// read again under the bucket's lock; so does a delete followed by a new
// write of the path, whose record differs from seen (errReadAgain: the
// caller reads the entry again). Only the very record seen, still live,
// with no entry, means the entry was removed outside the plugin, and
// reading it as absent would bring back what it held before it existed (a
// key without its disabled flag, a usage count from zero).
func (m *manifest) checkAbsent(ctx context.Context, s *Sealer, under logical.Storage, key string, seen uint64) error {
	// A Delete holds the bucket's lock from its tombstone to publishing
	// it: once the lock is ours, any delete of this entry is visible.
	idx := bucketIndex(key)
	slot := &m.slots[idx]
	slot.mu.Lock()
	defer slot.mu.Unlock()
	b, err := m.loadLocked(ctx, under, s.ring.Load(), idx)
	if err != nil {
		return err
	}
	rec, has := b.lookup(key)
	if !has || recDeleted(rec) {
		return nil
	}
	if rec != seen {
		return errReadAgain
	}
	return refusedf("storage entry %q is missing, though the manifest records it at generation %d: removed outside the plugin, refused", key, recGen(rec))
}

// errReadAgain asks get to read an entry again: it changed during the read.
var errReadAgain = errors.New("the entry changed during the read")

// checkEntry applies the manifest's rule to an entry whose header is h:
// against its record, and, without one, an entry of the older format is
// refused. The manifest records every such entry present when it is built
// (InitManifest) and the plugin writes none after, so one without a record
// is a copy of an entry deleted before, put back.
func checkEntry(path string, h header, rec uint64, has bool) error {
	if has {
		return checkRecord(path, h.gen, rec)
	}
	if h.format == 1 {
		return refusedf("storage entry %q is in the format from before the manifest, which does not record it: a copy of an entry deleted before, put back; refused", path)
	}
	return nil
}

// checkRecord applies the manifest's rule to an entry of generation gen
// whose path the bucket records as rec.
func checkRecord(path string, gen, rec uint64) error {
	if recDeleted(rec) {
		if coveredBy(gen, rec) {
			return refusedf("storage entry %q was deleted (the manifest records its deletion at generation %d, this copy is generation %d): a copy replayed or left behind is refused", path, recGen(rec), gen)
		}
		return nil
	}
	if gen < recGen(rec) {
		return refusedf("storage entry %q is older than the manifest records (generation %d, the manifest records %d): replayed or rolled back, refused", path, gen, recGen(rec))
	}
	return nil
}

// coveredBy reports whether rec is a tombstone that covers a copy of its
// path of generation gen: one of the deletion's generation or before it.
func coveredBy(gen, rec uint64) bool { return recDeleted(rec) && recGen(rec) >= gen }

// bucket is one decoded bucket. It is never modified once published:
// writers build a new one (with, without).
type bucket struct {
	gen     uint64 // generation of the stored copy, 0 if none
	version uint32 // root key version of the stored copy
	paths   []string
	recs    []uint64
	size    int64 // approximate memory, for the cache's bound
}

type update struct {
	path string
	rec  uint64
}

func (b *bucket) lookup(path string) (uint64, bool) {
	i := sort.SearchStrings(b.paths, path)
	if i < len(b.paths) && b.paths[i] == path {
		return b.recs[i], true
	}
	return 0, false
}

const recordOverhead = 32 // string header 16, record 8, slack 8

func (b *bucket) clone() *bucket {
	return &bucket{gen: b.gen, version: b.version, paths: slices.Clone(b.paths), recs: slices.Clone(b.recs), size: b.size}
}

func (b *bucket) with(ups ...update) *bucket {
	nb := b.clone()
	for _, u := range ups {
		i := sort.SearchStrings(nb.paths, u.path)
		if i < len(nb.paths) && nb.paths[i] == u.path {
			nb.recs[i] = u.rec
			continue
		}
		nb.paths = slices.Insert(nb.paths, i, u.path)
		nb.recs = slices.Insert(nb.recs, i, u.rec)
		nb.size += int64(len(u.path)) + recordOverhead
	}
	return nb
}

// without returns a copy without the records drop selects, and how many
// it dropped.
func (b *bucket) without(drop func(rec uint64) bool) (*bucket, int) {
	nb := &bucket{gen: b.gen, version: b.version, size: 64}
	for i, p := range b.paths {
		if drop(b.recs[i]) {
			continue
		}
		nb.paths = append(nb.paths, p)
		nb.recs = append(nb.recs, b.recs[i])
		nb.size += int64(len(p)) + recordOverhead
	}
	return nb, len(b.paths) - len(nb.paths)
}

// encode: format byte 1, uvarint count, then for each path in order:
// uvarint bytes shared with the previous path, uvarint length of the rest,
// the rest, uvarint record.
func (b *bucket) encode() []byte {
	out := []byte{1}
	out = binary.AppendUvarint(out, uint64(len(b.paths)))
	prev := ""
	for i, p := range b.paths {
		shared, n := 0, min(len(prev), len(p))
		for shared < n && prev[shared] == p[shared] {
			shared++
		}
		out = binary.AppendUvarint(out, uint64(shared))
		out = binary.AppendUvarint(out, uint64(len(p)-shared))
		out = append(out, p[shared:]...)
		out = binary.AppendUvarint(out, b.recs[i])
		prev = p
	}
	return out
}

// decodeBucket parses encode's output; it also returns the highest
// generation recorded.
func decodeBucket(in []byte) (*bucket, uint64, error) {
	bad := errors.New("malformed manifest bucket")
	if !bytes.HasPrefix(in, []byte{1}) { // format 1
		return nil, 0, bad
	}
	r := in[1:]
	next := func() (uint64, bool) {
		v, n := binary.Uvarint(r)
		if n <= 0 {
			return 0, false
		}
		r = r[n:]
		return v, true
	}
	count, ok := next()
	if !ok {
		return nil, 0, bad
	}
	// A record takes 4 bytes at least (shared, length, a byte of path,
	// record): a count beyond that is malformed, not an allocation.
	if count > uint64(len(r))/4 {
		return nil, 0, fmt.Errorf("%w: %d records cannot fit in %d bytes", bad, count, len(r))
	}
	b := &bucket{paths: make([]string, 0, count), recs: make([]uint64, 0, count), size: 64}
	var prev []byte
	var maxGen uint64
	for range count {
		shared, ok1 := next()
		rest, ok2 := next()
		if !ok1 || !ok2 || shared > uint64(len(prev)) {
			return nil, 0, bad
		}
		if rest > uint64(len(r)) {
			return nil, 0, fmt.Errorf("%w: the path of record %d runs past the end", bad, len(b.paths))
		}
		p := append(prev[:shared:shared], r[:rest]...)
		r = r[rest:]
		rec, ok := next()
		if !ok {
			return nil, 0, fmt.Errorf("%w: record %d ends after its path", bad, len(b.paths))
		}
		if bytes.Compare(p, prev) <= 0 { // in order; the first not empty
			return nil, 0, bad
		}
		b.paths = append(b.paths, string(p))
		b.recs = append(b.recs, rec)
		b.size += int64(len(p)) + recordOverhead
		maxGen = max(maxGen, recGen(rec))
		prev = p
	}
	if len(r) != 0 {
		return nil, 0, bad
	}
	return b, maxGen, nil
}

// manifestRoot is the manifest's root.
type manifestRoot struct {
	// counter is the ceiling: no generation above it was ever issued.
	counter uint64
	// activeSince is the counter when activeVersion became the active root
	// key version: every value sealed under activeVersion has a higher
	// generation. 0 when unknown.
	activeVersion uint32
	activeSince   uint64
	buckets       [bucketCount]uint64
}

// anchor is the highest bucket generation the root records. Every change
// of an entry writes its bucket under a newly issued generation, so the
// anchor grows with every change, and an older root has a smaller one.
func (r *manifestRoot) anchor() uint64 {
	var a uint64
	for _, g := range r.buckets {
		a = max(a, g)
	}
	return a
}

func (r *manifestRoot) encode() []byte {
	out := []byte{1}
	out = binary.AppendUvarint(out, r.counter)
	out = binary.AppendUvarint(out, uint64(r.activeVersion))
	out = binary.AppendUvarint(out, r.activeSince)
	for _, g := range r.buckets {
		out = binary.AppendUvarint(out, g)
	}
	return out
}

func decodeRoot(in []byte) (manifestRoot, error) {
	var root manifestRoot
	bad := errors.New("malformed manifest root")
	if !bytes.HasPrefix(in, []byte{1}) { // format 1
		return root, bad
	}
	r := in[1:]
	var vals [3 + bucketCount]uint64
	for i := range vals {
		v, n := binary.Uvarint(r)
		if n <= 0 {
			return root, bad
		}
		vals[i], r = v, r[n:]
	}
	if len(r) != 0 || vals[1] > math.MaxUint32 {
		return root, bad
	}
	root.counter, root.activeVersion, root.activeSince = vals[0], uint32(vals[1]), vals[2]
	copy(root.buckets[:], vals[3:])
	return root, nil
}

// manifest is a loaded manifest.
type manifest struct {
	slots      [bucketCount]bucketSlot
	cacheLimit atomic.Int64
	cacheBytes atomic.Int64

	// mu guards the root in memory and the counter.
	mu   sync.Mutex
	root manifestRoot
	next uint64 // the last generation issued
	seq  uint64 // bumped at every change of root

	// writeMu serialises root writes, so that the stored root only moves
	// forward; a write stores every change made so far (group commit).
	writeMu          sync.Mutex
	persistedSeq     uint64
	persistedVersion uint32
	persistedCeiling atomic.Uint64
	// anchored is the last anchor given to the Sealer's AnchorFunc.
	anchored uint64
	// storedAnchor is the anchor of the root last stored or loaded.
	storedAnchor atomic.Uint64
}

// bucketSlot holds one bucket's lock and cached copy. The lock covers the
// bucket's storage entry and every write to the entries it records.
type bucketSlot struct {
	mu     sync.Mutex
	cached atomic.Pointer[bucket]
	used   atomic.Bool
}

func newManifest(root manifestRoot, cacheLimit int64, storedVersion uint32) *manifest {
	m := &manifest{root: root, next: root.counter, persistedVersion: storedVersion}
	m.cacheLimit.Store(cacheLimit)
	m.storedAnchor.Store(root.anchor())
	m.persistedCeiling.Store(root.counter)
	return m
}

// observe raises the counter to at least g.
func (m *manifest) observe(g uint64) {
	m.mu.Lock()
	m.next = max(m.next, g)
	m.mu.Unlock()
}

// alloc issues a new generation, storing a higher ceiling first if need be.
// The caller holds s.rot (read or write).
func (m *manifest) alloc(ctx context.Context, s *Sealer, under logical.Storage) (uint64, error) {
	m.mu.Lock()
	m.next++
	g := m.next
	if g > m.root.counter {
		m.root.counter = g + ceilingStep
		m.seq++
	}
	want := m.seq
	m.mu.Unlock()
	if g > m.persistedCeiling.Load() {
		if err := m.flush(ctx, s, under, want, false); err != nil {
			return 0, fmt.Errorf("reserving manifest generations: %w", err)
		}
	}
	return g, nil
}

// activate records that version becomes the active root key version.
func (m *manifest) activate(version uint32) {
	m.mu.Lock()
	m.root.activeVersion, m.root.activeSince = version, m.next
	m.seq++
	m.mu.Unlock()
}

// activateUnknown records that version is active without knowing since
// when (a keyring going back to an older version): compaction then waits
// for the next rotation.
func (m *manifest) activateUnknown(version uint32) {
	m.mu.Lock()
	m.root.activeVersion, m.root.activeSince = version, 0
	m.seq++
	m.mu.Unlock()
}

// flush stores the root in memory unless a root as recent as change want
// is stored already; force also rewrites a root stored under an older root
// key version. The caller holds s.rot.
func (m *manifest) flush(ctx context.Context, s *Sealer, under logical.Storage, want uint64, force bool) error {
	m.writeMu.Lock()
	defer m.writeMu.Unlock()
	ring := s.ring.Load()
	if m.persistedSeq >= want && (!force || m.persistedVersion == ring.Active()) {
		return nil
	}
	m.mu.Lock()
	root, seq := m.root, m.seq
	m.mu.Unlock()
	sealed, err := ring.sealV2(purposeManifest, manifestRootPath, root.counter, root.encode())
	if err != nil {
		return err
	}
	if err := under.Put(ctx, &logical.StorageEntry{Key: manifestRootPath, Value: sealed}); err != nil {
		return fmt.Errorf("writing the storage manifest root: %w", err)
	}
	m.persistedCeiling.Store(root.counter)
	m.storedAnchor.Store(root.anchor())
	if f := s.anchor.Load(); f != nil && root.anchor() > m.anchored {
		// After the root is stored: a crash in between leaves storage
		// ahead of the anchor, which unsealing accepts, never behind.
		if err := (*f)(ctx, root.anchor()); err != nil {
			return fmt.Errorf("anchoring the storage manifest: %w", err)
		}
		m.anchored = root.anchor()
	}
	m.persistedSeq, m.persistedVersion = seq, ring.Active()
	return nil
}

// bucketFor returns the bucket of path, from the cache without a lock.
func (m *manifest) bucketFor(ctx context.Context, s *Sealer, under logical.Storage, path string) (*bucket, error) {
	idx := bucketIndex(path)
	slot := &m.slots[idx]
	if b := slot.cached.Load(); b != nil {
		slot.used.Store(true)
		return b, nil
	}
	slot.mu.Lock()
	defer slot.mu.Unlock()
	return m.loadLocked(ctx, under, s.ring.Load(), idx)
}

// loadLocked returns bucket idx, cached or read from storage and checked
// against the root. slots[idx].mu is held; ring is loaded under it.
func (m *manifest) loadLocked(ctx context.Context, under logical.Storage, ring *Keyring, idx int) (*bucket, error) {
	slot := &m.slots[idx]
	if b := slot.cached.Load(); b != nil {
		slot.used.Store(true)
		return b, nil
	}
	m.mu.Lock()
	want := m.root.buckets[idx]
	m.mu.Unlock()
	path := bucketPaths[idx]
	e, err := under.Get(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("reading manifest bucket %02x: %w", idx, err)
	}
	if e == nil {
		// InitManifest stores every bucket, and the root records each at a
		// generation of 1 or more: an absent bucket was removed.
		return nil, refusedf("manifest bucket %02x is missing from storage though the manifest root records it at generation %d (deleted outside the plugin?): the entries it covers are refused", idx, want)
	}
	h, ok := parseHeader(e.Value)
	if !ok || h.format != 2 {
		return nil, refusedf("manifest bucket %02x is not sealed by this mount's root key", idx)
	}
	if h.gen < want {
		return nil, refusedf("manifest bucket %02x is older than the manifest root records (generation %d, the root records %d): replayed or rolled back, refused", idx, h.gen, want)
	}
	pt, err := ring.open(purposeManifest, path, h, e.Value)
	if err != nil {
		return nil, err
	}
	b, maxGen, err := decodeBucket(pt)
	if err != nil {
		return nil, fmt.Errorf("manifest bucket %02x: %w", idx, err)
	}
	b.gen, b.version = h.gen, h.version
	m.observe(max(h.gen, maxGen))
	m.cache(idx, b)
	return b, nil
}

// writeBucketLocked stores nb as bucket idx under a new generation, which
// it sets in nb. Until publishLocked, readers still see the previous copy.
func (m *manifest) writeBucketLocked(ctx context.Context, s *Sealer, under logical.Storage, ring *Keyring, idx int, nb *bucket) error {
	gen, err := m.alloc(ctx, s, under)
	if err != nil {
		return err
	}
	sealed, err := ring.sealV2(purposeManifest, bucketPaths[idx], gen, nb.encode())
	if err != nil {
		return err
	}
	if err := under.Put(ctx, &logical.StorageEntry{Key: bucketPaths[idx], Value: sealed}); err != nil {
		// The write may or may not have landed: read it again next time.
		m.uncache(idx)
		return fmt.Errorf("writing manifest bucket %02x: %w", idx, err)
	}
	nb.gen, nb.version = gen, ring.Active()
	return nil
}

// publishLocked makes nb, stored by writeBucketLocked, the bucket readers
// see and the root's record; it returns the root change to flush.
func (m *manifest) publishLocked(idx int, nb *bucket) uint64 {
	m.cache(idx, nb)
	m.mu.Lock()
	defer m.mu.Unlock()
	m.root.buckets[idx] = max(m.root.buckets[idx], nb.gen)
	m.seq++
	return m.seq
}

// cache keeps b as bucket idx's copy if the bound allows, and otherwise
// drops any older copy. slots[idx].mu is held.
func (m *manifest) cache(idx int, b *bucket) {
	slot := &m.slots[idx]
	if b.size > m.cacheLimit.Load() {
		m.uncache(idx)
		return
	}
	var old int64
	if prev := slot.cached.Swap(b); prev != nil {
		old = prev.size
	}
	slot.used.Store(true)
	m.cacheBytes.Add(b.size - old)
	m.evict(idx)
}

func (m *manifest) uncache(idx int) {
	if prev := m.slots[idx].cached.Swap(nil); prev != nil {
		m.cacheBytes.Add(-prev.size)
	}
}

// fits reports whether the cached buckets are within the bound.
func (m *manifest) fits() bool { return m.cacheBytes.Load() <= m.cacheLimit.Load() }

// evict drops other buckets, least recently used first (a clock), until
// the cache fits its bound; it does nothing if the cache fits already.
// It takes no lock it would wait for: after two passes it gives up on
// the buckets in use.
func (m *manifest) evict(keep int) {
	if m.fits() {
		return
	}
	start := rand.IntN(bucketCount)
	for pass := range 2 {
		for i := range bucketCount {
			if m.fits() {
				return
			}
			idx := (start + i) % bucketCount
			if idx == keep {
				continue
			}
			slot := &m.slots[idx]
			if slot.used.Swap(false) && pass == 0 {
				continue
			}
			if slot.mu.TryLock() {
				m.uncache(idx)
				slot.mu.Unlock()
			}
		}
	}
}

// put seals e at a new generation and records it. s.rot is read-held and
// e.Key's path lock held.
func (m *manifest) put(ctx context.Context, s *Sealer, under logical.Storage, e *logical.StorageEntry) error {
	idx := bucketIndex(e.Key)
	slot := &m.slots[idx]
	slot.mu.Lock()
	seq, err := func() (uint64, error) {
		ring := s.ring.Load()
		b, err := m.loadLocked(ctx, under, ring, idx)
		if err != nil {
			return 0, err
		}
		gen, err := m.alloc(ctx, s, under)
		if err != nil {
			return 0, err
		}
		sealed, err := ring.sealV2(purposeEntry, e.Key, gen, e.Value)
		if err != nil {
			return 0, err
		}
		if err := under.Put(ctx, &logical.StorageEntry{Key: e.Key, Value: sealed, SealWrap: e.SealWrap}); err != nil {
			return 0, err
		}
		nb := b.with(update{e.Key, liveRec(gen)})
		if err := m.writeBucketLocked(ctx, s, under, ring, idx, nb); err != nil {
			return 0, err
		}
		return m.publishLocked(idx, nb), nil
	}()
	slot.mu.Unlock()
	if err != nil {
		return err
	}
	return m.flush(ctx, s, under, seq, false)
}

// delete records a tombstone for key, then deletes it. s.rot is read-held
// and key's path lock held.
func (m *manifest) delete(ctx context.Context, s *Sealer, under logical.Storage, key string) error {
	idx := bucketIndex(key)
	slot := &m.slots[idx]
	slot.mu.Lock()
	seq, err := func() (uint64, error) {
		ring := s.ring.Load()
		b, err := m.loadLocked(ctx, under, ring, idx)
		if err != nil {
			return 0, err
		}
		rec, has := b.lookup(key)
		mark := has && !recDeleted(rec)
		if !has {
			// No record: an entry written before the manifest, or one whose
			// Put crashed before its bucket; either way a copy can be
			// replayed once it is gone, unless marked.
			e, err := under.Get(ctx, key)
			if err != nil {
				return 0, err
			}
			mark = e != nil && IsSealed(e.Value)
		}
		if !mark {
			return 0, under.Delete(ctx, key)
		}
		gen, err := m.alloc(ctx, s, under)
		if err != nil {
			return 0, err
		}
		nb := b.with(update{key, tombstone(gen)})
		// The tombstone goes first: a crash before the deletion leaves the
		// entry refused, not a copy that a replay could bring back.
		if err := m.writeBucketLocked(ctx, s, under, ring, idx, nb); err != nil {
			return 0, err
		}
		err = under.Delete(ctx, key)
		// Published after the deletion, so that a reader racing it sees
		// the entry with its live record, or no entry.
		return m.publishLocked(idx, nb), err
	}()
	slot.mu.Unlock()
	if seq == 0 {
		return err
	}
	if ferr := m.flush(ctx, s, under, seq, false); err == nil {
		err = ferr
	}
	return err
}

// resealBatch brings keys, all of bucket idx, under the active version in
// the hst\x02 format, recording them in one bucket write. An entry that a
// tombstone covers is deleted (a delete interrupted after its tombstone, or
// a replayed copy). Plaintext entries are adopted only when adopt is set;
// otherwise they are left and listed in res, as are entries that do not
// open or that the manifest refuses. Only a storage failure stops the
// batch. s.rot is read-held.
func (m *manifest) resealBatch(ctx context.Context, s *Sealer, under logical.Storage, idx int, keys []string, adopt bool, res *resealResult) (err error) {
	slot := &m.slots[idx]
	slot.mu.Lock()
	var seq uint64
	func() {
		ring := s.ring.Load()
		var b *bucket
		if b, err = m.loadLocked(ctx, under, ring, idx); err != nil {
			return
		}
		var ups []update
		defer func() {
			if len(ups) == 0 {
				return
			}
			nb := b.with(ups...)
			if werr := m.writeBucketLocked(ctx, s, under, ring, idx, nb); werr != nil {
				err = errors.Join(err, werr)
				return
			}
			seq = m.publishLocked(idx, nb)
		}()
		for _, key := range keys {
			var e *logical.StorageEntry
			if e, err = under.Get(ctx, key); err != nil {
				err = fmt.Errorf("reading %q: %w", key, err)
				return
			}
			if e == nil {
				continue
			}
			h, sealed := parseHeader(e.Value)
			value := e.Value
			if !sealed {
				if !adopt {
					res.plain = append(res.plain, key)
					continue
				}
			} else {
				rec, has := b.lookup(key)
				if has && coveredBy(h.gen, rec) {
					if err = under.Delete(ctx, key); err != nil {
						err = fmt.Errorf("deleting %q, which the manifest records as deleted: %w", key, err)
						return
					}
					res.changed++
					continue
				}
				if h.version == ring.Active() && h.format == 2 {
					continue
				}
				oerr := checkEntry(key, h, rec, has)
				if oerr == nil {
					value, oerr = ring.open(purposeEntry, key, h, e.Value)
				}
				if oerr != nil {
					res.unreadable = append(res.unreadable, oerr)
					res.paths = append(res.paths, key)
					continue
				}
			}
			var gen uint64
			if gen, err = m.alloc(ctx, s, under); err != nil {
				return
			}
			var out []byte
			if out, err = ring.sealV2(purposeEntry, key, gen, value); err != nil {
				return
			}
			if err = under.Put(ctx, &logical.StorageEntry{Key: key, Value: out, SealWrap: e.SealWrap}); err != nil {
				err = fmt.Errorf("resealing %q: %w", key, err)
				return
			}
			ups = append(ups, update{key, liveRec(gen)})
			res.changed++
		}
	}()
	slot.mu.Unlock()
	if seq != 0 {
		if ferr := m.flush(ctx, s, under, seq, false); err == nil {
			err = ferr
		}
	}
	return err
}

// resealPieces rewrites every bucket, and the root, stored under another
// root key version than the active one, so that pruning the old versions
// loses no piece of the manifest. s.rot is read-held.
//
// The buckets are independent (each under its own lock, as concurrent
// requests write them), so resealPiecesWorkers of them are written at once:
// on Raft each write is a consensus round, and 256 of them one after the
// other made a rotation take seconds however few entries the mount held.
func (m *manifest) resealPieces(ctx context.Context, s *Sealer, under logical.Storage) error {
	var (
		mu    sync.Mutex
		last  uint64
		first error
		wg    sync.WaitGroup
	)
	next := make(chan int)
	for range resealPiecesWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for idx := range next {
				seq, err := m.resealBucket(ctx, s, under, idx)
				mu.Lock()
				last = max(last, seq)
				if err != nil && first == nil {
					first = err
				}
				mu.Unlock()
			}
		}()
	}
	for idx := range bucketCount {
		mu.Lock()
		failed := first != nil
		mu.Unlock()
		if failed {
			break
		}
		next <- idx
	}
	close(next)
	wg.Wait()
	if first != nil {
		return first
	}
	return m.flush(ctx, s, under, last, true)
}

// resealPiecesWorkers is how many manifest buckets a rotation writes at
// once.
const resealPiecesWorkers = 16

// resealBucket rewrites bucket idx under the active root key version if it
// is stored under another, and returns the root change to flush.
func (m *manifest) resealBucket(ctx context.Context, s *Sealer, under logical.Storage, idx int) (uint64, error) {
	slot := &m.slots[idx]
	slot.mu.Lock()
	defer slot.mu.Unlock()
	ring := s.ring.Load()
	b, err := m.loadLocked(ctx, under, ring, idx)
	if err != nil || b.version == ring.Active() {
		return 0, err
	}
	nb := b.clone()
	if err := m.writeBucketLocked(ctx, s, under, ring, idx, nb); err != nil {
		return 0, err
	}
	return m.publishLocked(idx, nb), nil
}

// LoadManifest reads the manifest root from storage and opens it with the
// current keyring; from then on the view checks every entry's generation
// and the root in memory is authoritative. It returns an error wrapping
// ErrNoManifest when the root is absent, and one wrapping
// ErrManifestDoesNotOpen when the keyring does not open it: a keyring
// recovered from shares can be checked that way before it is adopted.
// Call it once per unseal: it replaces what is in memory with what is
// stored.
func (s *Sealer) LoadManifest(ctx context.Context, under logical.Storage) error {
	s.rot.Lock()
	defer s.rot.Unlock()
	ring := s.ring.Load()
	e, err := under.Get(ctx, manifestRootPath)
	if err != nil {
		return fmt.Errorf("reading the storage manifest: %w", err)
	}
	if e == nil {
		return fmt.Errorf("%w (%s is absent)", ErrNoManifest, manifestRootPath)
	}
	h, ok := parseHeader(e.Value)
	if !ok || h.format != 2 {
		return fmt.Errorf("%w: %s is not sealed", ErrManifestDoesNotOpen, manifestRootPath)
	}
	pt, err := ring.open(purposeManifest, manifestRootPath, h, e.Value)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrManifestDoesNotOpen, err)
	}
	root, err := decodeRoot(pt)
	if err != nil {
		return err
	}
	if root.activeVersion != ring.Active() {
		// The root predates the switch to this version: nothing tells
		// from which generation on it seals, so compaction waits.
		root.activeVersion, root.activeSince = ring.Active(), 0
	}
	s.man.Store(newManifest(root, s.cacheLimit.Load(), h.version))
	return nil
}

// InitManifest builds the manifest from every sealed entry present and
// stores it (buckets, then root), replacing any manifest stored before; the
// view then checks generations as after LoadManifest. It is for a mount's
// first seal and for a mount sealed before manifests existed. Entries that
// are not sealed, or do not open under the keyring, are not recorded (the
// view refuses them anyway); tombstones of an earlier manifest are not
// carried over.
func (s *Sealer) InitManifest(ctx context.Context, under logical.Storage) error {
	s.rot.Lock()
	defer s.rot.Unlock()
	ring := s.ring.Load()

	// Start above every generation seen: entries, and any earlier
	// manifest that opens, so that no generation is issued twice.
	var floor uint64
	if e, err := under.Get(ctx, manifestRootPath); err != nil {
		return fmt.Errorf("reading the storage manifest: %w", err)
	} else if e != nil {
		if h, ok := parseHeader(e.Value); ok {
			if pt, err := ring.open(purposeManifest, manifestRootPath, h, e.Value); err == nil {
				if root, err := decodeRoot(pt); err == nil {
					floor = max(floor, root.counter, h.gen)
				}
			}
		}
	}
	for idx := range bucketCount {
		e, err := under.Get(ctx, bucketPaths[idx])
		if err != nil {
			return fmt.Errorf("reading manifest bucket %02x: %w", idx, err)
		}
		if e == nil {
			continue
		}
		if h, ok := parseHeader(e.Value); ok {
			if pt, err := ring.open(purposeManifest, bucketPaths[idx], h, e.Value); err == nil {
				if _, maxGen, err := decodeBucket(pt); err == nil {
					floor = max(floor, h.gen, maxGen)
				}
			}
		}
	}

	var ups [bucketCount][]update
	err := walk(ctx, under, "", func(key string) error {
		if s.plain(key) {
			return nil
		}
		e, err := under.Get(ctx, key)
		if err != nil {
			return fmt.Errorf("reading %q: %w", key, err)
		}
		if e == nil {
			return nil
		}
		h, ok := parseHeader(e.Value)
		if !ok {
			return nil
		}
		if _, err := ring.open(purposeEntry, key, h, e.Value); err != nil {
			return nil
		}
		idx := bucketIndex(key)
		ups[idx] = append(ups[idx], update{key, liveRec(h.gen)})
		floor = max(floor, h.gen)
		return nil
	})
	if err != nil {
		return err
	}

	root := manifestRoot{activeVersion: ring.Active()}
	next := floor
	for idx := range bucketCount {
		b := (&bucket{size: 64}).with(ups[idx]...)
		next++
		sealed, err := ring.sealV2(purposeManifest, bucketPaths[idx], next, b.encode())
		if err != nil {
			return err
		}
		if err := under.Put(ctx, &logical.StorageEntry{Key: bucketPaths[idx], Value: sealed}); err != nil {
			return fmt.Errorf("writing manifest bucket %02x: %w", idx, err)
		}
		root.buckets[idx] = next
	}
	root.counter = next + ceilingStep
	sealed, err := ring.sealV2(purposeManifest, manifestRootPath, root.counter, root.encode())
	if err != nil {
		return err
	}
	if err := under.Put(ctx, &logical.StorageEntry{Key: manifestRootPath, Value: sealed}); err != nil {
		return fmt.Errorf("writing the storage manifest root: %w", err)
	}
	m := newManifest(root, s.cacheLimit.Load(), ring.Active())
	m.next = next
	s.man.Store(m)
	return nil
}

// CompactManifest drops the tombstones that no longer protect anything:
// call it once a root key rotation has completed and the old versions are
// pruned (the keyring holds the active version alone, and is stored so).
//
// Why it is safe: a tombstone of generation t at or below activeSince (the
// counter when the active version became active) covers copies of its path
// of generation below t. Every value sealed under the active version has a
// generation above activeSince, so those copies are all sealed under older
// versions, which the keyring no longer holds: none of them opens, tombstone
// or not. It cannot be done inside ResealAll: the old versions are still
// held then, and pruning may yet fail.
func (s *Sealer) CompactManifest(ctx context.Context, under logical.Storage) error {
	s.rot.RLock()
	defer s.rot.RUnlock()
	m := s.man.Load()
	if m == nil {
		return ErrManifestNotLoaded
	}
	ring := s.ring.Load()
	if len(ring.versions) != 1 {
		return fmt.Errorf("compacting the storage manifest: the keyring still holds root key versions %v; prune them first", ring.Versions())
	}
	m.mu.Lock()
	since, known := m.root.activeSince, m.root.activeVersion == ring.Active()
	m.mu.Unlock()
	if !known || since == 0 {
		return nil
	}
	var last uint64
	for idx := range bucketCount {
		slot := &m.slots[idx]
		slot.mu.Lock()
		err := func() error {
			b, err := m.loadLocked(ctx, under, ring, idx)
			if err != nil {
				return err
			}
			nb, dropped := b.without(func(rec uint64) bool { return recDeleted(rec) && recGen(rec) <= since })
			if dropped == 0 {
				return nil
			}
			if err := m.writeBucketLocked(ctx, s, under, ring, idx, nb); err != nil {
				return err
			}
			last = m.publishLocked(idx, nb)
			return nil
		}()
		slot.mu.Unlock()
		if err != nil {
			return fmt.Errorf("compacting the storage manifest: %w", err)
		}
	}
	return m.flush(ctx, s, under, last, false)
}

// Invalidate forgets what the sealer keeps in memory of the storage entry
// key after another node changed it (a performance standby sees the active
// node's writes only through invalidations): a manifest bucket is read
// again, and checked against the root, when an entry of it is next read.
// The root in memory stays: a bucket newer than its record there opens, and
// one older is still refused as replayed. Other keys are not cached.
func (s *Sealer) Invalidate(key string) {
	m := s.man.Load()
	idx, isBucket := bucketOfPath[key]
	if m == nil || !isBucket {
		return
	}
	slot := &m.slots[idx]
	slot.mu.Lock()
	defer slot.mu.Unlock()
	m.uncache(idx)
}
