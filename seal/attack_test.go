package seal

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"
)

// slowStorage widens the windows between a caller's read and its write,
// as a loaded storage backend does: every Put waits a little before it
// lands, every Get a little after it read.
type slowStorage struct {
	logical.Storage
	delay time.Duration
}

func (s *slowStorage) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	e, err := s.Storage.Get(ctx, key)
	pause(s.delay)
	return e, err
}

func (s *slowStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	pause(s.delay)
	return s.Storage.Put(ctx, e)
}

// pause waits d, yielding; time.Sleep is far coarser than microseconds.
func pause(d time.Duration) {
	for end := time.Now().Add(d); time.Now().Before(end); {
		runtime.Gosched()
	}
}

// TestRotationRaces races writes of new paths and deletions against full
// root key rotations (Rotated, SetKeyring, ResealAll, SetKeyring of the
// pruned keyring), as seal/rotate does while requests run.
//
// Lost write: a Put that loaded the keyring before SetKeyring and lands
// after ResealAll listed storage stays under the old version, which the
// pruning then drops. Resurrection: Reseal reads an entry, a Delete
// removes it, Reseal writes it back.
//
// Afterwards every acknowledged Put must open with the final keyring and
// hold its value, and no deleted path may be back.
func TestRotationRaces(t *testing.T) {
	for _, tc := range []struct {
		name            string
		writers, delete bool
	}{{"new writes", true, false}, {"deletes", false, true}} {
		for _, manifested := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/manifest=%v", tc.name, manifested), func(t *testing.T) {
				t.Parallel()
				rotationRace(t, manifested, tc.writers, tc.delete)
			})
		}
	}
}

func rotationRace(t *testing.T, manifested, writers, deletes bool) {
	ctx := context.Background()
	under := &slowStorage{Storage: &logical.InmemStorage{}, delay: 20 * time.Microsecond}
	k, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	s := NewSealer(k, plainSeal)
	if manifested {
		require.NoError(t, s.InitManifest(ctx, under))
	}
	v := s.Wrap(under)
	const deletable = 400
	for i := 0; i < deletable; i++ {
		require.NoError(t, v.Put(ctx, &logical.StorageEntry{Key: fmt.Sprintf("del/%03d", i), Value: []byte("doomed")}))
	}

	var (
		wg      sync.WaitGroup
		stop    atomic.Bool
		acked   sync.Map // path -> value
		deleted sync.Map // path -> struct{}
	)
	for w := 0; w < 6 && writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for n := 0; n < 600 && !stop.Load(); n++ {
				key := fmt.Sprintf("a/%d-%d", w, n) // listed first by the walk
				val := fmt.Sprintf("value %d/%d", w, n)
				if err := v.Put(ctx, &logical.StorageEntry{Key: key, Value: []byte(val)}); err != nil {
					t.Error(err)
					return
				}
				acked.Store(key, val)
				pause(100 * time.Microsecond)
			}
		}(w)
	}
	for d := 0; d < 3 && deletes; d++ {
		wg.Add(1)
		go func(d int) {
			defer wg.Done()
			for i := d; i < deletable && !stop.Load(); i += 3 {
				key := fmt.Sprintf("del/%03d", i)
				if err := v.Delete(ctx, key); err != nil {
					t.Error(err)
					return
				}
				deleted.Store(key, struct{}{})
				pause(400 * time.Microsecond)
			}
		}(d)
	}

	for round := 0; round < 20; round++ {
		ring, err := s.Keyring().Rotated(randomKey(t))
		require.NoError(t, err)
		s.SetKeyring(ring)
		_, err = s.ResealAll(ctx, under)
		require.NoError(t, err, "round %d: an entry left under a version an earlier round pruned is a lost write", round)
		s.SetKeyring(ring.ActiveOnly())
	}
	stop.Store(true)
	wg.Wait()

	final := s.Keyring()
	require.Len(t, final.Versions(), 1)
	lost := 0
	acked.Range(func(k, val any) bool {
		e, err := v.Get(ctx, k.(string))
		if err != nil || e == nil || string(e.Value) != val.(string) {
			lost++
			if lost <= 3 {
				t.Errorf("acknowledged write %s lost: %v", k, err)
			}
		}
		return true
	})
	require.Zero(t, lost, "acknowledged writes lost to the rotation")
	back := 0
	deleted.Range(func(k, _ any) bool {
		raw, err := under.Get(ctx, k.(string))
		require.NoError(t, err)
		if raw != nil {
			back++
			if back <= 3 {
				t.Errorf("deleted entry %s is back", k)
			}
		}
		return true
	})
	require.Zero(t, back, "deleted entries resurrected by the rotation")
}

// TestResealAllDoesNotAdoptPlantedPlaintext: a storage writer plants a
// plaintext policy holding key material it knows. Before the fix, the next
// rotation's ResealAll encrypted it, and from then on the view served it
// as the mount's own key.
func TestResealAllDoesNotAdoptPlantedPlaintext(t *testing.T) {
	for _, manifested := range []bool{false, true} {
		t.Run(fmt.Sprintf("manifest=%v", manifested), func(t *testing.T) {
			ctx := context.Background()
			under := &logical.InmemStorage{}
			k1, err := NewKeyring(randomKey(t))
			require.NoError(t, err)
			s := NewSealer(k1, plainSeal)
			if manifested {
				require.NoError(t, s.InitManifest(ctx, under))
			}
			v := s.Wrap(under)
			for i := 0; i < 20; i++ {
				require.NoError(t, v.Put(ctx, &logical.StorageEntry{Key: fmt.Sprintf("policy/real%02d", i), Value: []byte("ours")}))
			}
			planted := []byte(`{"keys":{"1":{"key":"YXR0YWNrZXIta25vd24ta2V5LW1hdGVyaWFsLTEyMzQ="}},"latest_version":1}`)
			require.NoError(t, under.Put(ctx, &logical.StorageEntry{Key: "policy/evil", Value: planted}))
			require.NoError(t, under.Put(ctx, &logical.StorageEntry{Key: "archive/evil", Value: []byte("{}")}))

			k2, err := k1.Rotated(randomKey(t))
			require.NoError(t, err)
			s.SetKeyring(k2)
			n, err := s.ResealAll(ctx, under)
			var pe *PlaintextEntriesError
			require.True(t, errors.As(err, &pe), "ResealAll must report the planted entries, got %v", err)
			require.ElementsMatch(t, []string{"archive/evil", "policy/evil"}, pe.Paths)
			require.Contains(t, err.Error(), "2 storage entries are not sealed by this mount's root key and were not adopted (written outside the plugin?): ")
			require.Equal(t, 20, n, "the walk finishes every other entry")

			raw, err := under.Get(ctx, "policy/evil")
			require.NoError(t, err)
			require.Equal(t, planted, raw.Value, "left as planted")
			_, err = v.Get(ctx, "policy/evil")
			require.ErrorContains(t, err, "not sealed")
			require.ErrorContains(t, err, "not written by this mount")

			changed, err := s.Reseal(ctx, under, "policy/evil")
			require.False(t, changed)
			require.True(t, errors.As(err, &pe))
			require.Equal(t, []string{"policy/evil"}, pe.Paths)

			s.SetKeyring(k2.ActiveOnly())
			for i := 0; i < 20; i++ {
				e, err := v.Get(ctx, fmt.Sprintf("policy/real%02d", i))
				require.NoError(t, err)
				require.Equal(t, "ours", string(e.Value))
			}
			_, err = v.Get(ctx, "policy/evil")
			require.ErrorContains(t, err, "not sealed", "still refused after the rotation")
		})
	}
}

func TestPlaintextEntriesErrorMessage(t *testing.T) {
	var paths []string
	for i := 0; i < 13; i++ {
		paths = append(paths, fmt.Sprintf("p%d", i))
	}
	msg := (&PlaintextEntriesError{Paths: paths}).Error()
	require.True(t, strings.HasPrefix(msg, "13 storage entries are not sealed by this mount's root key and were not adopted (written outside the plugin?): p0, p1,"), msg)
	require.Contains(t, msg, "p9, ... (3 more)")
	require.NotContains(t, msg, "p10")
	// Exactly ten are all shown, with no count of more.
	msg = (&PlaintextEntriesError{Paths: paths[:10]}).Error()
	require.True(t, strings.HasSuffix(msg, ": p0, p1, p2, p3, p4, p5, p6, p7, p8, p9"), msg)
	require.Equal(t, "1 storage entry is not sealed by this mount's root key and was not adopted (written outside the plugin?): x",
		(&PlaintextEntriesError{Paths: []string{"x"}}).Error())
	var wrapped error = fmt.Errorf("rotating: %w", &PlaintextEntriesError{Paths: paths})
	var pe *PlaintextEntriesError
	require.True(t, errors.As(wrapped, &pe))
}
