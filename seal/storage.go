package seal

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// Sealer encrypts a mount's storage entries under its root keyring. It is
// shared by every request of the mount; Wrap gives each request's storage a
// sealed view.
//
// Until LoadManifest or InitManifest, a Sealer whose keyring is not
// Manifested behaves as before manifests existed: it writes hst\x01 entries
// and checks no generation (so that a plugin binary that is not wired for
// manifests stays readable by the previous one). One whose keyring is
// Manifested refuses every sealed path until the manifest is loaded.
type Sealer struct {
	ring atomic.Pointer[Keyring]
	// rot orders writes with keyring changes. Put, Delete and Reseal hold
	// its read side from loading the keyring to their last write;
	// SetKeyring, LoadManifest and InitManifest hold its write side. So
	// SetKeyring waits for the writes in flight, and every later write
	// uses the new keyring: none lands under a version that a rotation's
	// pass has already left behind.
	rot sync.RWMutex
	// locks serialise writes to a path with the re-encryption of that path
	// during rotation, and with its deletion, so that none overwrites
	// another.
	locks []*locksutil.LockEntry
	// plain reports paths stored as they are (the sealed root keyring and
	// the non-secret seal configuration).
	plain func(path string) bool
	// man is the loaded manifest, nil before LoadManifest or InitManifest.
	man        atomic.Pointer[manifest]
	cacheLimit atomic.Int64
	// anchor, when set, is told the manifest's anchor after every root
	// write that raised it (SetAnchor).
	anchor atomic.Pointer[AnchorFunc]
}

// AnchorFunc keeps a manifest's anchor outside storage (in the HSM), where
// a storage writer cannot roll it back.
type AnchorFunc func(ctx context.Context, anchor uint64) error

// SetAnchor registers f (nil: none). After it, every write of the manifest
// root that raises the anchor calls f once the root is stored; a root write
// whose f fails returns f's error and is written again by the next one.
func (s *Sealer) SetAnchor(f AnchorFunc) {
	if f == nil {
		s.anchor.Store(nil)
		return
	}
	s.anchor.Store(&f)
}

// Anchor returns the anchor of the manifest root last stored (or loaded):
// a number that grows with every change the manifest records, so that a
// stored root older than the last one anchored has a smaller one. It is
// never ahead of storage (a root in memory may be, while its write is
// under way or failed). false without a manifest.
func (s *Sealer) Anchor() (uint64, bool) {
	m := s.man.Load()
	if m == nil {
		return 0, false
	}
	return m.storedAnchor.Load(), true
}

// NewSealer returns a Sealer over ring; plain names the paths it leaves
// unencrypted.
func NewSealer(ring *Keyring, plain func(path string) bool) *Sealer {
	s := &Sealer{locks: locksutil.CreateLocks(), plain: plain}
	s.cacheLimit.Store(DefaultManifestCacheBytes)
	s.ring.Store(ring)
	return s
}

// SetManifestCacheBytes bounds the memory that decoded manifest buckets
// may take (DefaultManifestCacheBytes until set); a bucket not cached is
// read from storage when an entry of it is.
func (s *Sealer) SetManifestCacheBytes(n int64) {
	s.cacheLimit.Store(n)
	if m := s.man.Load(); m != nil {
		m.cacheLimit.Store(n)
		m.evict(-1)
	}
}

// Keyring returns the current keyring.
func (s *Sealer) Keyring() *Keyring { return s.ring.Load() }

// SetKeyring replaces the keyring, for rotation. It waits for the writes in
// flight.
func (s *Sealer) SetKeyring(k *Keyring) {
	s.rot.Lock()
	defer s.rot.Unlock()
	if m := s.man.Load(); m != nil {
		if cur := s.ring.Load().Active(); k.Active() > cur {
			m.activate(k.Active())
		} else if k.Active() != cur {
			m.activateUnknown(k.Active())
		}
	}
	s.ring.Store(k)
}

// Wrap returns under as seen through the seal.
func (s *Sealer) Wrap(under logical.Storage) logical.Storage {
	return &view{s: s, under: under}
}

// view is a logical.Storage that seals on Put and opens on Get.
type view struct {
	s     *Sealer
	under logical.Storage
}

func errReserved(key string) error {
	return fmt.Errorf("storage path %q is reserved for the seal's manifest", key)
}

func (v *view) List(ctx context.Context, prefix string) ([]string, error) {
	keys, err := v.under.List(ctx, prefix)
	if err != nil || prefix != "" {
		return keys, err
	}
	out := keys[:0:0]
	for _, k := range keys {
		if k != manifestPrefix {
			out = append(out, k)
		}
	}
	return out, nil
}

func (v *view) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	switch {
	case v.s.plain(key):
		return v.under.Get(ctx, key)
	case reserved(key):
		return nil, errReserved(key)
	}
	return v.s.get(ctx, v.under, key, true)
}

// get reads and opens key. Readers take no lock: the bucket's record is
// read before the entry, a path's generations only grow, and a writer
// publishes its record only once its entry is written (a Delete, once the
// entry is gone), so a write racing the read cannot make the entry read
// look older than the record read, nor deleted.
func (s *Sealer) get(ctx context.Context, under logical.Storage, key string, retry bool) (*logical.StorageEntry, error) {
	var rec uint64
	var has bool
	m := s.man.Load()
	if m != nil {
		b, err := m.bucketFor(ctx, s, under, key)
		if err != nil {
			return nil, err
		}
		rec, has = b.lookup(key)
	} else if s.ring.Load().Manifested() {
		return nil, ErrManifestNotLoaded
	}
	e, err := under.Get(ctx, key)
	if err != nil {
		return nil, err
	}
	if e == nil {
		if has && !recDeleted(rec) {
			err := m.checkAbsent(ctx, s, under, key, rec)
			if errors.Is(err, errReadAgain) && retry {
				return s.get(ctx, under, key, false)
			}
			return nil, err
		}
		return nil, nil
	}
	h, ok := parseHeader(e.Value)
	if !ok {
		return nil, refusedf("storage entry %q is not sealed: it was not written by this mount (planted in storage?) and is refused", key)
	}
	if m != nil {
		if err := checkEntry(key, h, rec, has); err != nil {
			return nil, err
		}
	}
	// Loaded after the entry: a rotation re-encrypts every entry before it
	// drops the old version, so this keyring holds the entry's version,
	// unless the entry was read just before its re-encryption and the
	// rotation ended since; read it again then.
	ring := s.ring.Load()
	if _, held := ring.versions[h.version]; !held && retry {
		return s.get(ctx, under, key, false)
	}
	pt, err := ring.open(purposeEntry, key, h, e.Value)
	if err != nil {
		return nil, err
	}
	return &logical.StorageEntry{Key: e.Key, Value: pt, SealWrap: e.SealWrap}, nil
}

func (v *view) Put(ctx context.Context, e *logical.StorageEntry) error {
	switch {
	case v.s.plain(e.Key):
		return v.under.Put(ctx, e)
	case reserved(e.Key):
		return errReserved(e.Key)
	}
	s := v.s
	s.rot.RLock()
	defer s.rot.RUnlock()
	lock := locksutil.LockForKey(s.locks, e.Key)
	lock.Lock()
	defer lock.Unlock()
	if m := s.man.Load(); m != nil {
		return m.put(ctx, s, v.under, e)
	}
	ring := s.ring.Load()
	if ring.Manifested() {
		return ErrManifestNotLoaded
	}
	sealed, err := ring.Seal(e.Key, e.Value)
	if err != nil {
		return err
	}
	return v.under.Put(ctx, &logical.StorageEntry{Key: e.Key, Value: sealed, SealWrap: e.SealWrap})
}

func (v *view) Delete(ctx context.Context, key string) error {
	switch {
	case v.s.plain(key):
		return v.under.Delete(ctx, key)
	case reserved(key):
		return errReserved(key)
	}
	s := v.s
	s.rot.RLock()
	defer s.rot.RUnlock()
	lock := locksutil.LockForKey(s.locks, key)
	lock.Lock()
	defer lock.Unlock()
	if m := s.man.Load(); m != nil {
		return m.delete(ctx, s, v.under, key)
	}
	if s.ring.Load().Manifested() {
		return ErrManifestNotLoaded
	}
	return v.under.Delete(ctx, key)
}

// PlaintextEntriesError lists entries that a pass found stored in
// plaintext and left as they are: only MigrateAll, at a mount's first seal,
// adopts such entries; later, one can only have been planted.
type PlaintextEntriesError struct {
	Paths []string
}

func (e *PlaintextEntriesError) Error() string {
	const shown = 10
	list := e.Paths
	more := ""
	if len(list) > shown {
		list = list[:shown]
		more = fmt.Sprintf(", ... (%d more)", len(e.Paths)-shown)
	}
	subject, were := fmt.Sprintf("%d storage entries are", len(e.Paths)), "were"
	if len(e.Paths) == 1 {
		subject, were = "1 storage entry is", "was"
	}
	return fmt.Sprintf("%s not sealed by this mount's root key and %s not adopted (written outside the plugin?): %s%s",
		subject, were, strings.Join(list, ", "), more)
}

// UnreadableEntriesError lists entries that a pass could not open and left
// as they are: modified, replayed copies the manifest refuses, or sealed by
// a root key version the keyring does not hold. No key opens them, so
// dropping the old root key versions loses nothing readable.
type UnreadableEntriesError struct {
	Paths []string
	Errs  []error
}

func (e *UnreadableEntriesError) Error() string {
	const shown = 10
	list := e.Errs
	more := ""
	if len(list) > shown {
		list = list[:shown]
		more = fmt.Sprintf("; ... (%d more)", len(e.Errs)-shown)
	}
	msgs := make([]string, len(list))
	for i, err := range list {
		msgs[i] = err.Error()
	}
	subject := fmt.Sprintf("%d storage entries cannot be opened and were left as they are", len(e.Paths))
	if len(e.Paths) == 1 {
		subject = "1 storage entry cannot be opened and was left as it is"
	}
	return fmt.Sprintf("%s: %s%s", subject, strings.Join(msgs, "; "), more)
}

func (e *UnreadableEntriesError) Unwrap() []error { return e.Errs }

// resealResult gathers what a pass did and what it left.
type resealResult struct {
	changed    int
	plain      []string
	unreadable []error
	paths      []string // of unreadable
}

func (r *resealResult) leftErr() error {
	var errs []error
	if len(r.unreadable) > 0 {
		errs = append(errs, &UnreadableEntriesError{Paths: r.paths, Errs: r.unreadable})
	}
	if len(r.plain) > 0 {
		errs = append(errs, &PlaintextEntriesError{Paths: r.plain})
	}
	if len(errs) == 1 {
		return errs[0]
	}
	return errors.Join(errs...)
}

// Reseal brings one entry under the active version (and, with a manifest,
// the hst\x02 format at a new generation). It reports whether the entry
// changed. An entry stored in plaintext is left alone and reported as a
// *PlaintextEntriesError; one that does not open or that the manifest
// refuses, as an *UnreadableEntriesError; one that a tombstone covers is
// deleted.
func (s *Sealer) Reseal(ctx context.Context, under logical.Storage, key string) (bool, error) {
	if s.plain(key) || reserved(key) {
		return false, nil
	}
	s.rot.RLock()
	defer s.rot.RUnlock()
	var res resealResult
	var err error
	if m := s.man.Load(); m != nil {
		lock := locksutil.LockForKey(s.locks, key)
		lock.Lock()
		defer lock.Unlock()
		err = m.resealBatch(ctx, s, under, bucketIndex(key), []string{key}, false, &res)
	} else {
		err = s.resealLegacy(ctx, under, key, false, &res)
	}
	if err == nil {
		err = res.leftErr()
	}
	return res.changed > 0, err
}

// resealLegacy is Reseal without a manifest. s.rot is read-held.
func (s *Sealer) resealLegacy(ctx context.Context, under logical.Storage, key string, adopt bool, res *resealResult) error {
	ring := s.ring.Load()
	if ring.Manifested() {
		return ErrManifestNotLoaded
	}
	lock := locksutil.LockForKey(s.locks, key)
	lock.Lock()
	defer lock.Unlock()
	e, err := under.Get(ctx, key)
	if err != nil || e == nil {
		return err
	}
	value := e.Value
	if h, ok := parseHeader(value); ok {
		if h.version == ring.Active() {
			return nil
		}
		if value, err = ring.open(purposeEntry, key, h, value); err != nil {
			res.unreadable = append(res.unreadable, err)
			res.paths = append(res.paths, key)
			return nil
		}
	} else if !adopt {
		res.plain = append(res.plain, key)
		return nil
	}
	sealed, err := ring.Seal(key, value)
	if err != nil {
		return err
	}
	if err := under.Put(ctx, &logical.StorageEntry{Key: key, Value: sealed, SealWrap: e.SealWrap}); err != nil {
		return err
	}
	res.changed++
	return nil
}

// ResealAll walks every entry below the storage root and reseals it (see
// Reseal), then, with a manifest, every piece of the manifest stored under
// an older version. It returns how many entries changed. Only a storage
// failure stops the walk: the entries it cannot or must not reseal are
// reported once every other entry is done, as a *PlaintextEntriesError
// (stored in plaintext) and an *UnreadableEntriesError (see there), joined
// when both occur; errors.As finds either.
func (s *Sealer) ResealAll(ctx context.Context, under logical.Storage) (changed int, err error) {
	return s.resealAll(ctx, under, false)
}

// MigrateAll is ResealAll that also encrypts the entries stored in
// plaintext: for a mount's first seal only, when the entries a mount taken
// over from built-in transit left are known to be its own.
func (s *Sealer) MigrateAll(ctx context.Context, under logical.Storage) (int, error) {
	return s.resealAll(ctx, under, true)
}

func (s *Sealer) resealAll(ctx context.Context, under logical.Storage, adopt bool) (int, error) {
	var res resealResult
	m := s.man.Load()
	var pending [bucketCount][]string
	batch := func(idx int) error {
		keys := pending[idx]
		pending[idx] = nil
		if len(keys) == 0 {
			return nil
		}
		s.rot.RLock()
		defer s.rot.RUnlock()
		if s.man.Load() != m {
			return errors.New("the storage manifest was loaded again during the pass")
		}
		return m.resealBatch(ctx, s, under, idx, keys, adopt, &res)
	}
	err := walk(ctx, under, "", func(key string) error {
		if s.plain(key) {
			return nil
		}
		if m == nil {
			s.rot.RLock()
			defer s.rot.RUnlock()
			if err := s.resealLegacy(ctx, under, key, adopt, &res); err != nil {
				return fmt.Errorf("resealing %q: %w", key, err)
			}
			return nil
		}
		idx := bucketIndex(key)
		pending[idx] = append(pending[idx], key)
		if len(pending[idx]) >= resealBatch {
			return batch(idx)
		}
		return nil
	})
	if err != nil {
		return res.changed, err
	}
	if m != nil {
		for idx := range pending {
			if err := batch(idx); err != nil {
				return res.changed, err
			}
		}
		s.rot.RLock()
		err := m.resealPieces(ctx, s, under)
		s.rot.RUnlock()
		if err != nil {
			return res.changed, fmt.Errorf("resealing the storage manifest: %w", err)
		}
	}
	return res.changed, res.leftErr()
}

// walk calls f for every entry key below prefix, depth first, but for the
// manifest's own entries.
func walk(ctx context.Context, s logical.Storage, prefix string, f func(key string) error) error {
	keys, err := s.List(ctx, prefix)
	if err != nil {
		return fmt.Errorf("listing %q: %w", prefix, err)
	}
	for _, k := range keys {
		if reserved(prefix + k) {
			continue
		}
		if strings.HasSuffix(k, "/") {
			if err := walk(ctx, s, prefix+k, f); err != nil {
				return err
			}
			continue
		}
		if err := f(prefix + k); err != nil {
			return err
		}
	}
	return nil
}
