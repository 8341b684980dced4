package seal

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"

	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// Sealer encrypts a mount's storage entries under its root keyring. It is
// shared by every request of the mount; Wrap gives each request's storage a
// sealed view.
type Sealer struct {
	ring atomic.Pointer[Keyring]
	// locks serialise writes to a path with the re-encryption of that path
	// during rotation, so that neither overwrites the other.
	locks []*locksutil.LockEntry
	// plain reports paths stored as they are (the sealed root keyring and
	// the non-secret seal configuration).
	plain func(path string) bool
}

// NewSealer returns a Sealer over ring; plain names the paths it leaves
// unencrypted.
func NewSealer(ring *Keyring, plain func(path string) bool) *Sealer {
	s := &Sealer{locks: locksutil.CreateLocks(), plain: plain}
	s.ring.Store(ring)
	return s
}

// Keyring returns the current keyring.
func (s *Sealer) Keyring() *Keyring { return s.ring.Load() }

// SetKeyring replaces the keyring, for rotation.
func (s *Sealer) SetKeyring(k *Keyring) { s.ring.Store(k) }

// Wrap returns under as seen through the seal.
func (s *Sealer) Wrap(under logical.Storage) logical.Storage {
	return &view{s: s, under: under}
}

// view is a logical.Storage that seals on Put and opens on Get.
type view struct {
	s     *Sealer
	under logical.Storage
}

func (v *view) List(ctx context.Context, prefix string) ([]string, error) {
	return v.under.List(ctx, prefix)
}

func (v *view) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	e, err := v.under.Get(ctx, key)
	if err != nil || e == nil || v.s.plain(key) {
		return e, err
	}
	pt, err := v.s.ring.Load().Open(key, e.Value)
	if err != nil {
		return nil, err
	}
	return &logical.StorageEntry{Key: e.Key, Value: pt, SealWrap: e.SealWrap}, nil
}

func (v *view) Put(ctx context.Context, e *logical.StorageEntry) error {
	if v.s.plain(e.Key) {
		return v.under.Put(ctx, e)
	}
	lock := locksutil.LockForKey(v.s.locks, e.Key)
	lock.Lock()
	defer lock.Unlock()
	sealed, err := v.s.ring.Load().Seal(e.Key, e.Value)
	if err != nil {
		return err
	}
	return v.under.Put(ctx, &logical.StorageEntry{Key: e.Key, Value: sealed, SealWrap: e.SealWrap})
}

func (v *view) Delete(ctx context.Context, key string) error {
	return v.under.Delete(ctx, key)
}

// Reseal brings one entry under the active version: entries of older
// versions are re-encrypted, and entries written before the mount was
// sealed are encrypted. It reports whether the entry changed.
func (s *Sealer) Reseal(ctx context.Context, under logical.Storage, key string) (bool, error) {
	if s.plain(key) {
		return false, nil
	}
	lock := locksutil.LockForKey(s.locks, key)
	lock.Lock()
	defer lock.Unlock()
	e, err := under.Get(ctx, key)
	if err != nil || e == nil {
		return false, err
	}
	ring := s.ring.Load()
	value := e.Value
	if v, ok := SealedVersion(value); ok {
		if v == ring.Active() {
			return false, nil
		}
		if value, err = ring.Open(key, value); err != nil {
			return false, err
		}
	}
	sealed, err := ring.Seal(key, value)
	if err != nil {
		return false, err
	}
	return true, under.Put(ctx, &logical.StorageEntry{Key: key, Value: sealed, SealWrap: e.SealWrap})
}

// ResealAll walks every entry below the storage root and reseals it. It
// returns how many entries changed.
func (s *Sealer) ResealAll(ctx context.Context, under logical.Storage) (int, error) {
	changed := 0
	err := walk(ctx, under, "", func(key string) error {
		c, err := s.Reseal(ctx, under, key)
		if c {
			changed++
		}
		if err != nil {
			return fmt.Errorf("resealing %q: %w", key, err)
		}
		return nil
	})
	return changed, err
}

// walk calls f for every entry key below prefix, depth first.
func walk(ctx context.Context, s logical.Storage, prefix string, f func(key string) error) error {
	keys, err := s.List(ctx, prefix)
	if err != nil {
		return fmt.Errorf("listing %q: %w", prefix, err)
	}
	for _, k := range keys {
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
