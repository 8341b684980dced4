package seal

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"
)

// The attacker of these tests reads and writes any storage entry (sys/raw,
// an edited backup) and restarts the plugin, but cannot seal anything: all
// it can do with sealed values is copy them back.

// mount is one mount's storage and the Sealer of a running plugin.
type mount struct {
	t     testing.TB
	ctx   context.Context
	under logical.Storage
	ring  *Keyring
	s     *Sealer
	v     logical.Storage
}

// newMount seals an empty mount with a manifest.
func newMount(t testing.TB) *mount {
	t.Helper()
	k, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	m := &mount{t: t, ctx: context.Background(), under: &logical.InmemStorage{}, ring: k.WithManifest()}
	m.s = NewSealer(m.ring, plainSeal)
	require.NoError(t, m.s.InitManifest(m.ctx, m.under))
	m.v = m.s.Wrap(m.under)
	return m
}

// restart is a new plugin process over the same storage.
func (m *mount) restart() {
	m.t.Helper()
	m.s = NewSealer(m.s.Keyring(), plainSeal)
	require.NoError(m.t, m.s.LoadManifest(m.ctx, m.under))
	m.v = m.s.Wrap(m.under)
}

func (m *mount) put(key, value string) {
	m.t.Helper()
	require.NoError(m.t, m.v.Put(m.ctx, &logical.StorageEntry{Key: key, Value: []byte(value)}))
}

func (m *mount) get(key string) (string, error) {
	e, err := m.v.Get(m.ctx, key)
	if err != nil || e == nil {
		return "", err
	}
	return string(e.Value), nil
}

// raw is what the attacker copies.
func (m *mount) raw(key string) []byte {
	m.t.Helper()
	e, err := m.under.Get(m.ctx, key)
	require.NoError(m.t, err)
	if e == nil {
		return nil
	}
	return append([]byte(nil), e.Value...)
}

// plant is what the attacker writes back.
func (m *mount) plant(key string, value []byte) {
	m.t.Helper()
	require.NoError(m.t, m.under.Put(m.ctx, &logical.StorageEntry{Key: key, Value: value}))
}

func (m *mount) rotate() {
	m.t.Helper()
	ring, err := m.s.Keyring().Rotated(randomKey(m.t))
	require.NoError(m.t, err)
	m.s.SetKeyring(ring)
	_, err = m.s.ResealAll(m.ctx, m.under)
	require.NoError(m.t, err)
	m.s.SetKeyring(ring.ActiveOnly())
	require.NoError(m.t, m.s.CompactManifest(m.ctx, m.under))
}

func bucketPathOf(key string) string { return bucketPaths[bucketIndex(key)] }

// A key's policy from before min_decryption_version went up, copied back.
func TestReplayOfAnOlderValueIsRefused(t *testing.T) {
	m := newMount(t)
	m.put("policy/k", `{"min_decryption_version":1}`)
	before := m.raw("policy/k")
	m.put("policy/k", `{"min_decryption_version":2}`)

	m.plant("policy/k", before)
	_, err := m.get("policy/k")
	require.ErrorContains(t, err, "older than the manifest records")
	require.ErrorContains(t, err, "replayed or rolled back")

	m.restart()
	_, err = m.get("policy/k")
	require.ErrorContains(t, err, "older than the manifest records", "still refused after a restart")

	// A rotation does not launder the replayed copy into a new generation.
	ring, err := m.s.Keyring().Rotated(randomKey(t))
	require.NoError(t, err)
	m.s.SetKeyring(ring)
	_, err = m.s.ResealAll(m.ctx, m.under)
	var ue *UnreadableEntriesError
	require.True(t, errors.As(err, &ue), "%v", err)
	require.Equal(t, []string{"policy/k"}, ue.Paths)
	require.ErrorContains(t, err, "older than the manifest records")
	_, err = m.get("policy/k")
	require.ErrorContains(t, err, "older than the manifest records")
}

// A deleted key's entries, copied back.
func TestReplayOfADeletedEntryIsRefused(t *testing.T) {
	m := newMount(t)
	m.put("policy/gone", "key material")
	m.put("archive/gone", "archive")
	copies := map[string][]byte{"policy/gone": m.raw("policy/gone"), "archive/gone": m.raw("archive/gone")}
	for k := range copies {
		require.NoError(t, m.v.Delete(m.ctx, k))
	}
	for k, c := range copies {
		m.plant(k, c)
		_, err := m.get(k)
		require.ErrorContains(t, err, "was deleted", k)
	}
	m.restart()
	for k := range copies {
		_, err := m.get(k)
		require.ErrorContains(t, err, "was deleted", "%s after a restart", k)
	}
	// A rotation deletes the copies that a tombstone covers.
	m.rotate()
	for k := range copies {
		require.Nil(t, m.raw(k), k)
		v, err := m.get(k)
		require.NoError(t, err)
		require.Empty(t, v)
	}
	// Writing the path again is a new life.
	m.put("policy/gone", "new key")
	v, err := m.get("policy/gone")
	require.NoError(t, err)
	require.Equal(t, "new key", v)
}

// The bucket and the entry replayed together, while the plugin runs: the
// root in memory refuses the bucket, whether the bucket is cached or read
// again from storage.
func TestReplayOfBucketAndEntryWhileUnsealedIsRefused(t *testing.T) {
	for _, cached := range []bool{true, false} {
		t.Run(fmt.Sprintf("cached=%v", cached), func(t *testing.T) {
			m := newMount(t)
			if !cached {
				m.s = NewSealer(m.s.Keyring(), plainSeal)
				m.s.cacheLimit.Store(0)
				require.NoError(t, m.s.LoadManifest(m.ctx, m.under))
				m.v = m.s.Wrap(m.under)
			}
			m.put("policy/k", "v1")
			bp := bucketPathOf("policy/k")
			oldEntry, oldBucket, oldRoot := m.raw("policy/k"), m.raw(bp), m.raw(manifestRootPath)
			m.put("policy/k", "v2")

			m.plant("policy/k", oldEntry)
			m.plant(bp, oldBucket)
			m.plant(manifestRootPath, oldRoot)
			_, err := m.get("policy/k")
			require.Error(t, err)
			if cached {
				require.ErrorContains(t, err, "older than the manifest records")
			} else {
				require.ErrorContains(t, err, "older than the manifest root records")
			}
		})
	}
}

// failingStorage fails the Puts fail selects, as a crash between two writes
// would leave storage.
type failingStorage struct {
	logical.Storage
	mu   sync.Mutex
	fail func(key string) bool
}

func (f *failingStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	f.mu.Lock()
	fail := f.fail != nil && f.fail(e.Key)
	f.mu.Unlock()
	if fail {
		return fmt.Errorf("simulated crash before writing %s", e.Key)
	}
	return f.Storage.Put(ctx, e)
}

func (f *failingStorage) failOn(fail func(key string) bool) {
	f.mu.Lock()
	f.fail = fail
	f.mu.Unlock()
}

// A crash between the entry and its bucket: the entry stays readable, after
// a restart too. In that window the previous value's copy opens too (its
// generation is the one recorded): a replay can bring back the last value
// whose write completed, never an older one, and the next completed write
// closes the window.
func TestCrashBetweenEntryAndBucket(t *testing.T) {
	m := newMount(t)
	fs := &failingStorage{Storage: m.under}
	m.under = fs
	m.restart()
	m.put("policy/k", "v1")
	v1 := m.raw("policy/k")
	m.put("policy/k", "v2")
	v2 := m.raw("policy/k")

	fs.failOn(func(k string) bool { return strings.HasPrefix(k, manifestBucketPrefix) })
	err := m.v.Put(m.ctx, &logical.StorageEntry{Key: "policy/k", Value: []byte("v3")})
	require.ErrorContains(t, err, "simulated crash")
	v3 := m.raw("policy/k")
	got, err := m.get("policy/k")
	require.NoError(t, err, "the entry written before the crash opens")
	require.Equal(t, "v3", got)

	fs.failOn(nil)
	m.restart()
	got, err = m.get("policy/k")
	require.NoError(t, err, "and after a restart")
	require.Equal(t, "v3", got)

	// The window: v2, the last completed write, can be put back; v1 cannot.
	m.plant("policy/k", v2)
	got, err = m.get("policy/k")
	require.NoError(t, err)
	require.Equal(t, "v2", got)
	m.plant("policy/k", v1)
	_, err = m.get("policy/k")
	require.ErrorContains(t, err, "older than the manifest records")

	// The next write, after the restart, gets a generation above v3's,
	// which was issued but never recorded: every older copy is refused.
	m.plant("policy/k", v3)
	m.put("policy/k", "v4")
	for name, c := range map[string][]byte{"v1": v1, "v2": v2, "v3": v3} {
		m.plant("policy/k", c)
		_, err := m.get("policy/k")
		require.ErrorContains(t, err, "older than the manifest records", name)
	}
}

// A crash between the bucket and the root: the bucket is newer than the
// root's record, which is allowed; nothing is lost.
func TestCrashBetweenBucketAndRoot(t *testing.T) {
	m := newMount(t)
	fs := &failingStorage{Storage: m.under}
	m.under = fs
	m.restart()
	m.put("policy/k", "v1") // reserves generations: the next Put needs no root write first
	fs.failOn(func(k string) bool { return k == manifestRootPath })
	err := m.v.Put(m.ctx, &logical.StorageEntry{Key: "policy/k", Value: []byte("v2")})
	require.ErrorContains(t, err, "simulated crash")
	fs.failOn(nil)
	m.restart()
	got, err := m.get("policy/k")
	require.NoError(t, err)
	require.Equal(t, "v2", got)
	m.put("policy/other", "x")
}

// A crash between a Delete's tombstone and the deletion leaves the entry
// refused (the delete was asked for); the next rotation finishes it.
func TestCrashInDelete(t *testing.T) {
	m := newMount(t)
	m.put("policy/k", "v1")
	fs := &failingStorage{Storage: m.under}
	m.under = fs
	m.restart()
	del := &failingDelete{Storage: fs}
	m.v = m.s.Wrap(del)
	require.ErrorContains(t, m.v.Delete(m.ctx, "policy/k"), "simulated crash")
	m.restart()
	_, err := m.get("policy/k")
	require.ErrorContains(t, err, "was deleted")
	m.rotate()
	require.Nil(t, m.raw("policy/k"))
}

type failingDelete struct{ logical.Storage }

func (f *failingDelete) Delete(context.Context, string) error {
	return errors.New("simulated crash before deleting")
}

// Entries of the hst\x01 format, written before manifests existed, open
// once the manifest is built, and a rotation converts them; the old copies
// are refused after that.
func TestV1EntriesOpenAndAreConverted(t *testing.T) {
	ctx := context.Background()
	under := &logical.InmemStorage{}
	k, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	legacy := NewSealer(k, plainSeal)
	lv := legacy.Wrap(under)
	for i := 0; i < 50; i++ {
		require.NoError(t, lv.Put(ctx, &logical.StorageEntry{Key: fmt.Sprintf("policy/k%02d", i), Value: []byte(fmt.Sprint(i))}))
	}
	raw, err := under.Get(ctx, "policy/k07")
	require.NoError(t, err)
	require.Equal(t, "hst\x01", string(raw.Value[:4]))
	oldCopy := raw.Value

	m := &mount{t: t, ctx: ctx, under: under, ring: k}
	m.s = NewSealer(k, plainSeal)
	require.ErrorIs(t, m.s.LoadManifest(ctx, under), ErrNoManifest)
	require.NoError(t, m.s.InitManifest(ctx, under))
	m.v = m.s.Wrap(under)
	for i := 0; i < 50; i++ {
		got, err := m.get(fmt.Sprintf("policy/k%02d", i))
		require.NoError(t, err)
		require.Equal(t, fmt.Sprint(i), got)
	}

	// Without a new root key version, ResealAll converts the format.
	n, err := m.s.ResealAll(ctx, under)
	require.NoError(t, err)
	require.Equal(t, 50, n)
	n, err = m.s.ResealAll(ctx, under)
	require.NoError(t, err)
	require.Zero(t, n)
	for i := 0; i < 50; i++ {
		key := fmt.Sprintf("policy/k%02d", i)
		require.Equal(t, "hst\x02", string(m.raw(key)[:4]))
		got, err := m.get(key)
		require.NoError(t, err)
		require.Equal(t, fmt.Sprint(i), got)
	}
	m.plant("policy/k07", oldCopy)
	_, err = m.get("policy/k07")
	require.ErrorContains(t, err, "older than the manifest records")
}

// A mount sealed before manifests: InitManifest over what is stored, and a
// later replay of a value from before it is refused.
func TestInitManifestOverExistingStorageThenReplay(t *testing.T) {
	ctx := context.Background()
	under := &logical.InmemStorage{}
	k, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	lv := NewSealer(k, plainSeal).Wrap(under)
	require.NoError(t, lv.Put(ctx, &logical.StorageEntry{Key: "policy/k", Value: []byte("old")}))
	require.NoError(t, lv.Put(ctx, &logical.StorageEntry{Key: "policy/j", Value: []byte("j")}))
	require.NoError(t, under.Put(ctx, &logical.StorageEntry{Key: "policy/plain", Value: []byte("planted")}))
	oldCopy, err := under.Get(ctx, "policy/k")
	require.NoError(t, err)

	m := &mount{t: t, ctx: ctx, under: under, ring: k.WithManifest()}
	m.s = NewSealer(m.ring, plainSeal)
	require.NoError(t, m.s.InitManifest(ctx, under))
	m.v = m.s.Wrap(under)
	m.put("policy/k", "new")
	m.restart()
	m.plant("policy/k", oldCopy.Value)
	_, err = m.get("policy/k")
	require.ErrorContains(t, err, "older than the manifest records")
	got, err := m.get("policy/j")
	require.NoError(t, err)
	require.Equal(t, "j", got)
	_, err = m.get("policy/plain")
	require.ErrorContains(t, err, "not sealed", "plaintext is not recorded, and still refused")

	// Built again (a crash before the flag was stored): generations go on
	// above every one issued, so the value written last still wins.
	require.NoError(t, m.s.InitManifest(ctx, under))
	newCopy := m.raw("policy/k")
	m.put("policy/k", "newer")
	m.plant("policy/k", newCopy)
	_, err = m.get("policy/k")
	require.ErrorContains(t, err, "older than the manifest records")
}

// The manifest root deleted: a mount whose keyring says it has a manifest
// refuses to work without it.
func TestMissingManifestRoot(t *testing.T) {
	m := newMount(t)
	m.put("policy/k", "v")
	require.NoError(t, m.under.Delete(m.ctx, manifestRootPath))
	s := NewSealer(m.s.Keyring(), plainSeal)
	err := s.LoadManifest(m.ctx, m.under)
	require.ErrorIs(t, err, ErrNoManifest)
	v := s.Wrap(m.under)
	_, err = v.Get(m.ctx, "policy/k")
	require.ErrorIs(t, err, ErrManifestNotLoaded)
	require.ErrorIs(t, v.Put(m.ctx, &logical.StorageEntry{Key: "policy/k", Value: []byte("x")}), ErrManifestNotLoaded)
	require.ErrorIs(t, v.Delete(m.ctx, "policy/k"), ErrManifestNotLoaded)
	_, err = s.ResealAll(m.ctx, m.under)
	require.ErrorIs(t, err, ErrManifestNotLoaded)
}

// A bucket deleted from storage: the paths it covered are refused rather
// than read unchecked.
func TestMissingBucket(t *testing.T) {
	m := newMount(t)
	m.put("policy/k", "v")
	require.NoError(t, m.under.Delete(m.ctx, bucketPathOf("policy/k")))
	m.restart()
	_, err := m.get("policy/k")
	require.ErrorContains(t, err, "missing from storage")
}

// A keyring that is not this mount's (shares of another mount's recovery
// set, say) does not load the manifest: the canary for recovery.
func TestLoadManifestWithAnotherKeyringFails(t *testing.T) {
	m := newMount(t)
	m.put("policy/k", "v")
	other, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	err = NewSealer(other, plainSeal).LoadManifest(m.ctx, m.under)
	require.ErrorIs(t, err, ErrManifestDoesNotOpen)

	// Nor does another mount's manifest, copied in, load with ours.
	o := newMount(t)
	m.plant(manifestRootPath, o.raw(manifestRootPath))
	err = NewSealer(m.s.Keyring(), plainSeal).LoadManifest(m.ctx, m.under)
	require.ErrorIs(t, err, ErrManifestDoesNotOpen)

	// A bucket is not a root, nor an entry a bucket.
	m.plant(manifestRootPath, m.raw(bucketPathOf("policy/k")))
	require.ErrorIs(t, NewSealer(m.s.Keyring(), plainSeal).LoadManifest(m.ctx, m.under), ErrManifestDoesNotOpen)
}

func TestManifestPiecesCannotBeSwappedOrForged(t *testing.T) {
	m := newMount(t)
	m.put("policy/k", "v")
	bp := bucketPathOf("policy/k")
	// A path of another bucket, written later: its bucket is newer.
	otherKey := "policy/o"
	for i := 0; bucketIndex(otherKey) == bucketIndex("policy/k"); i++ {
		otherKey = fmt.Sprintf("policy/o%d", i)
	}
	m.put(otherKey, "o")
	m.plant(bp, m.raw(bucketPathOf(otherKey)))
	m.restart()
	_, err := m.get("policy/k")
	require.ErrorContains(t, err, "does not authenticate", "a bucket moved to another bucket's path")

	m = newMount(t)
	m.put("policy/k", "v")
	m.plant(bp, m.raw("policy/k"))
	m.restart()
	_, err = m.get("policy/k")
	require.Error(t, err, "an entry as a bucket")

	// The view does not let requests near the manifest.
	m = newMount(t)
	require.ErrorContains(t, m.v.Put(m.ctx, &logical.StorageEntry{Key: manifestRootPath, Value: []byte("x")}), "reserved")
	_, err = m.v.Get(m.ctx, bp)
	require.ErrorContains(t, err, "reserved")
	require.ErrorContains(t, m.v.Delete(m.ctx, bp), "reserved")
	keys, err := m.v.List(m.ctx, "")
	require.NoError(t, err)
	require.NotContains(t, keys, manifestPrefix)
}

// A full rotation moves every entry and every piece of the manifest to the
// new version, and compaction drops exactly the tombstones that the pruned
// version made useless.
func TestRotationWithManifestAndCompaction(t *testing.T) {
	m := newMount(t)
	for i := 0; i < 300; i++ {
		m.put(fmt.Sprintf("policy/k%03d", i), fmt.Sprint(i))
	}
	m.put("policy/early", "x")
	early := m.raw("policy/early")
	require.NoError(t, m.v.Delete(m.ctx, "policy/early"))

	ring, err := m.s.Keyring().Rotated(randomKey(t))
	require.NoError(t, err)
	require.True(t, ring.Manifested())
	m.s.SetKeyring(ring)
	// Written and deleted under the new version, during the rotation.
	m.put("policy/late", "y")
	late := m.raw("policy/late")
	require.NoError(t, m.v.Delete(m.ctx, "policy/late"))
	_, err = m.s.ResealAll(m.ctx, m.under)
	require.NoError(t, err)
	require.Error(t, m.s.CompactManifest(m.ctx, m.under), "not while the old version is held")
	m.s.SetKeyring(ring.ActiveOnly())
	require.NoError(t, m.s.CompactManifest(m.ctx, m.under))

	for _, p := range append([]string{manifestRootPath}, bucketPaths[:]...) {
		v, ok := SealedVersion(m.raw(p))
		require.True(t, ok, p)
		require.Equal(t, uint32(2), v, p)
	}
	b, err := m.s.man.Load().bucketFor(m.ctx, m.s, m.under, "policy/early")
	require.NoError(t, err)
	_, has := b.lookup("policy/early")
	require.False(t, has, "the tombstone from before the rotation is dropped")
	b, err = m.s.man.Load().bucketFor(m.ctx, m.s, m.under, "policy/late")
	require.NoError(t, err)
	rec, has := b.lookup("policy/late")
	require.True(t, has && recDeleted(rec), "the tombstone from during the rotation stays")

	m.restart()
	for i := 0; i < 300; i++ {
		got, err := m.get(fmt.Sprintf("policy/k%03d", i))
		require.NoError(t, err)
		require.Equal(t, fmt.Sprint(i), got)
	}
	m.plant("policy/early", early)
	_, err = m.get("policy/early")
	require.ErrorContains(t, err, "version 1, which this keyring does not hold", "dead with the old version")
	m.plant("policy/late", late)
	_, err = m.get("policy/late")
	require.ErrorContains(t, err, "was deleted")

	// The next rotation deletes the copy of late (its tombstone covers it)
	// and reports the copy of early, which nothing opens, without stopping.
	ring, err = m.s.Keyring().Rotated(randomKey(t))
	require.NoError(t, err)
	m.s.SetKeyring(ring)
	_, err = m.s.ResealAll(m.ctx, m.under)
	var ue *UnreadableEntriesError
	require.True(t, errors.As(err, &ue), "%v", err)
	require.Equal(t, []string{"policy/early"}, ue.Paths)
	require.ErrorContains(t, err, "1 storage entry cannot be opened and was left as it is")
	require.Nil(t, m.raw("policy/late"))
	m.s.SetKeyring(ring.ActiveOnly())
	require.NoError(t, m.s.CompactManifest(m.ctx, m.under))
	got, err := m.get("policy/k007")
	require.NoError(t, err)
	require.Equal(t, "7", got)
	b, err = m.s.man.Load().bucketFor(m.ctx, m.s, m.under, "policy/late")
	require.NoError(t, err)
	_, has = b.lookup("policy/late")
	require.False(t, has)
	m.plant("policy/late", late)
	_, err = m.get("policy/late")
	require.ErrorContains(t, err, "which this keyring does not hold")
}

// The documented limit: the whole set (root, bucket, entry) replayed across
// a restart is indistinguishable from the storage of that time, until the
// root key version that sealed it is pruned.
func TestLimitReplayOfRootBucketAndEntryAcrossRestart(t *testing.T) {
	m := newMount(t)
	m.put("policy/k", "v1")
	snap := map[string][]byte{}
	for _, p := range []string{"policy/k", bucketPathOf("policy/k"), manifestRootPath} {
		snap[p] = m.raw(p)
	}
	m.put("policy/k", "v2")
	for p, v := range snap {
		m.plant(p, v)
	}
	// While the plugin runs, refused.
	_, err := m.get("policy/k")
	require.Error(t, err)
	// After a restart, the old state is back: the limit.
	m.restart()
	got, err := m.get("policy/k")
	require.NoError(t, err)
	require.Equal(t, "v1", got)

	// A rotation ends it for every copy sealed before it.
	m.put("policy/k", "v3")
	for p := range snap {
		snap[p] = m.raw(p)
	}
	m.rotate()
	for p, v := range snap {
		m.plant(p, v)
	}
	require.ErrorIs(t, NewSealer(m.s.Keyring(), plainSeal).LoadManifest(m.ctx, m.under), ErrManifestDoesNotOpen)
}

// Puts, Gets and Deletes of many paths in parallel, then a restart: every
// acknowledged write reads back and generations never collide.
func TestManifestConcurrency(t *testing.T) {
	m := newMount(t)
	m.s.cacheLimit.Store(64 << 10) // small: eviction runs too
	var wg sync.WaitGroup
	const workers, each = 8, 150
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < each; i++ {
				key := fmt.Sprintf("policy/w%d-%d", w, i)
				if err := m.v.Put(m.ctx, &logical.StorageEntry{Key: key, Value: []byte(key)}); err != nil {
					t.Error(err)
					return
				}
				if e, err := m.v.Get(m.ctx, key); err != nil || string(e.Value) != key {
					t.Errorf("%s: %v", key, err)
					return
				}
				if i%5 == 0 {
					if err := m.v.Delete(m.ctx, key); err != nil {
						t.Error(err)
						return
					}
				}
			}
		}(w)
	}
	wg.Wait()
	m.restart()
	for w := 0; w < workers; w++ {
		for i := 0; i < each; i++ {
			key := fmt.Sprintf("policy/w%d-%d", w, i)
			got, err := m.get(key)
			require.NoError(t, err, key)
			if i%5 == 0 {
				require.Empty(t, got, key)
			} else {
				require.Equal(t, key, got)
			}
		}
	}
}

func TestKeyringManifestFlag(t *testing.T) {
	k, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	require.False(t, k.Manifested())
	f := k.WithManifest()
	require.True(t, f.Manifested())
	require.False(t, k.Manifested(), "WithManifest copies")
	r, err := f.Rotated(randomKey(t))
	require.NoError(t, err)
	require.True(t, r.Manifested())
	require.True(t, r.ActiveOnly().Manifested())

	raw, err := r.Marshal()
	require.NoError(t, err)
	back, err := UnmarshalKeyring(raw)
	require.NoError(t, err)
	require.True(t, back.Manifested())
	raw, err = k.Marshal()
	require.NoError(t, err)
	require.NotContains(t, string(raw), "manifest")
	// A serialisation from before the flag existed.
	old := `{"active":1,"keys":{"1":"` + strings.Repeat("A", 43) + `="}}`
	back, err = UnmarshalKeyring([]byte(old))
	require.NoError(t, err)
	require.False(t, back.Manifested())
}

func TestBucketAndRootEncoding(t *testing.T) {
	b := (&bucket{size: 64}).with(
		update{"policy/b", liveRec(7)}, update{"policy/a", tombstone(9)},
		update{"archive/a", liveRec(1 << 40)}, update{"policy/ab", liveRec(0)})
	enc := b.encode()
	back, maxGen, err := decodeBucket(enc)
	require.NoError(t, err)
	require.Equal(t, b.paths, back.paths)
	require.Equal(t, b.recs, back.recs)
	require.Equal(t, uint64(1<<40), maxGen)
	for _, bad := range [][]byte{nil, {2}, enc[:len(enc)-1], append(append([]byte{}, enc...), 0)} {
		_, _, err := decodeBucket(bad)
		require.Error(t, err)
	}
	unsorted := (&bucket{paths: []string{"b", "a"}, recs: []uint64{0, 0}}).encode()
	_, _, err = decodeBucket(unsorted)
	require.Error(t, err)

	root := manifestRoot{counter: 1 << 50, activeVersion: 3, activeSince: 99}
	root.buckets[0], root.buckets[255] = 5, 1<<33
	rb, err := decodeRoot(root.encode())
	require.NoError(t, err)
	require.Equal(t, root, rb)
	_, err = decodeRoot(root.encode()[:10])
	require.Error(t, err)
}

// With no manifest and a keyring without the flag, the Sealer writes what
// it wrote before manifests (hst\x01), so the previous plugin binary still
// reads a mount that the new one served before it was wired for manifests.
func TestWithoutManifestWritesTheOldFormat(t *testing.T) {
	ctx := context.Background()
	under := &logical.InmemStorage{}
	k, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	v := NewSealer(k, plainSeal).Wrap(under)
	require.NoError(t, v.Put(ctx, &logical.StorageEntry{Key: "policy/k", Value: []byte("v")}))
	raw, err := under.Get(ctx, "policy/k")
	require.NoError(t, err)
	require.Equal(t, "hst\x01", string(raw.Value[:4]))
	pt, err := k.Open("policy/k", raw.Value)
	require.NoError(t, err)
	require.Equal(t, "v", string(pt))
}

// An entry removed from storage outside the plugin: read as absent, a key's
// lifecycle record would come back as it was before the key had one (not
// disabled, no usage counted).
func TestEntryRemovedOutsideThePluginIsRefused(t *testing.T) {
	m := newMount(t)
	m.put("lifecycle/keys/k", `{"disabled":true}`)
	require.NoError(t, m.under.Delete(m.ctx, "lifecycle/keys/k"))
	_, err := m.get("lifecycle/keys/k")
	require.ErrorIs(t, err, ErrEntryRefused)
	require.ErrorContains(t, err, "removed outside the plugin")
	m.restart()
	_, err = m.get("lifecycle/keys/k")
	require.ErrorIs(t, err, ErrEntryRefused, "still refused after a restart")

	// A deletion through the plugin is an absence, as before.
	m.put("lifecycle/keys/j", `{}`)
	require.NoError(t, m.v.Delete(m.ctx, "lifecycle/keys/j"))
	e, err := m.v.Get(m.ctx, "lifecycle/keys/j")
	require.NoError(t, err)
	require.Nil(t, e)
	// And a path never written is absent.
	e, err = m.v.Get(m.ctx, "lifecycle/keys/never")
	require.NoError(t, err)
	require.Nil(t, e)
}

// Deletes racing reads: a reader may see the entry gone before the
// tombstone is published; it must answer "absent", never "refused".
func TestDeleteRacingReadsIsNotARefusal(t *testing.T) {
	m := newMount(t)
	for round := 0; round < 200; round++ {
		key := fmt.Sprintf("policy/r%03d", round)
		m.put(key, "v")
		done := make(chan struct{})
		errs := make(chan error, 1)
		go func() {
			defer close(done)
			for {
				select {
				case <-errs:
					return
				default:
				}
				if _, err := m.v.Get(m.ctx, key); err != nil {
					errs <- err
					return
				}
				if e, _ := m.under.Get(m.ctx, key); e == nil {
					return
				}
			}
		}()
		require.NoError(t, m.v.Delete(m.ctx, key))
		<-done
		select {
		case err := <-errs:
			t.Fatalf("round %d: a read racing a delete was refused: %v", round, err)
		default:
		}
	}
}

// The anchor that anti-rollback keeps in the HSM: it grows with every
// change, the AnchorFunc sees each stored root's, and a root put back from
// before a change loads with a smaller one.
func TestAnchorGrowsAndExposesAnOlderRoot(t *testing.T) {
	m := newMount(t)
	var anchored []uint64
	m.s.SetAnchor(func(_ context.Context, a uint64) error {
		anchored = append(anchored, a)
		return nil
	})
	m.put("policy/k", "v1")
	oldRoot := m.raw("manifest/root")
	oldBucket := m.raw(bucketPathOf("policy/k"))
	oldEntry := m.raw("policy/k")
	a1, ok := m.s.Anchor()
	require.True(t, ok)
	m.put("policy/k", "v2")
	require.NoError(t, m.v.Delete(m.ctx, "policy/other"))
	m.put("lifecycle/keys/k", "x")
	a2, _ := m.s.Anchor()
	require.Greater(t, a2, a1)
	require.NotEmpty(t, anchored)
	require.Equal(t, a2, anchored[len(anchored)-1], "the last root stored was anchored")
	require.IsIncreasing(t, anchored)

	// Failing to anchor fails the write, and the next write anchors.
	m.s.SetAnchor(func(context.Context, uint64) error { return errors.New("HSM down") })
	err := m.v.Put(m.ctx, &logical.StorageEntry{Key: "policy/k", Value: []byte("v3")})
	require.ErrorContains(t, err, "HSM down")
	m.s.SetAnchor(func(_ context.Context, a uint64) error { anchored = append(anchored, a); return nil })
	m.put("policy/j", "y")
	a3, _ := m.s.Anchor()
	require.Equal(t, a3, anchored[len(anchored)-1])

	// The attacker puts root, bucket and entry back and restarts: the
	// manifest loads (the documented limit without an anchor), and its
	// anchor is below the one kept outside storage.
	m.plant("manifest/root", oldRoot)
	m.plant(bucketPathOf("policy/k"), oldBucket)
	m.plant("policy/k", oldEntry)
	m.restart()
	back, _ := m.s.Anchor()
	require.Less(t, back, a3, "an older root shows as older against the anchor")
}
