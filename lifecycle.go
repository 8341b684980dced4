package hsmtransit

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/hsmkey"
)

// The key lifecycle beyond transit (NIST SP 800-57): suspension, usage
// limits and scheduled destruction. Each key's lifecycle state lives in its
// own sealed entry, beside the key, for software and HSM-resident keys alike.

const (
	lifecyclePrefix = "lifecycle/keys/"
	// deletionPrefix indexes the keys scheduled for destruction, so that
	// the periodic function lists only those.
	deletionPrefix = "lifecycle/deletions/"

	// gcmRandomNonceLimit is NIST SP 800-38D's bound on encryptions under
	// one AES-GCM key with random 96-bit nonces, 2^32, with a 10% margin.
	gcmRandomNonceLimit = uint64(1<<32) * 9 / 10

	// countBlock is how far ahead of the true count the stored count is
	// reserved: at most one storage write per countBlock encryptions, and
	// after a crash the count is over-estimated by less than countBlock.
	countBlock = 4096
)

// keyLifecycle is a key's lifecycle state. mu guards it.
type keyLifecycle struct {
	mu sync.Mutex

	Name     string `json:"name"`
	Disabled bool   `json:"disabled,omitempty"`
	// MaxEncryptions caps each version's encryptions; nil means the key
	// type's default, 0 no cap.
	MaxEncryptions *uint64 `json:"max_encryptions,omitempty"`
	// Reserved is, per version, the count stored: never below the true
	// count.
	Reserved map[int]uint64 `json:"reserved,omitempty"`
	// DeletionTime, when set, is when the key is destroyed.
	DeletionTime time.Time `json:"deletion_time,omitempty"`

	// counts is the true count per version in this process, starting from
	// the stored reservation.
	counts map[int]uint64
}

// lifecycleStore caches the lifecycle state of keys. An evicted entry loses
// only the exact in-memory counts: reloaded, a count is its reservation,
// never below the truth.
type lifecycleStore struct {
	cache *keyCache[*keyLifecycle]
}

func newLifecycleStore() *lifecycleStore {
	return &lifecycleStore{cache: newKeyCache[*keyLifecycle]()}
}

func (s *lifecycleStore) reset() { s.cache.purge() }

func (s *lifecycleStore) invalidate(name string) { s.cache.remove(name) }

// get returns a key's lifecycle state, a fresh one when none is stored.
func (s *lifecycleStore) get(ctx context.Context, storage logical.Storage, name string) (*keyLifecycle, error) {
	if lc, ok := s.cache.get(name); ok {
		return lc, nil
	}
	lc := &keyLifecycle{Name: name}
	e, err := storage.Get(ctx, lifecyclePrefix+name)
	if err != nil {
		return nil, fmt.Errorf("reading the lifecycle of key %q: %w", name, err)
	}
	if e != nil {
		if err := json.Unmarshal(e.Value, lc); err != nil {
			return nil, fmt.Errorf("decoding the lifecycle of key %q: %w", name, err)
		}
	}
	lc.counts = make(map[int]uint64, len(lc.Reserved))
	for v, n := range lc.Reserved {
		// After a restart the reservation stands for the count: at
		// worst an over-estimate.
		lc.counts[v] = n
	}
	return s.cache.addIfAbsent(name, lc), nil
}

// forget drops a deleted key's state.
func (s *lifecycleStore) forget(ctx context.Context, storage logical.Storage, name string) error {
	s.invalidate(name)
	if err := storage.Delete(ctx, deletionPrefix+name); err != nil {
		return err
	}
	return storage.Delete(ctx, lifecyclePrefix+name)
}

// persist stores lc; mu is held.
func (lc *keyLifecycle) persist(ctx context.Context, storage logical.Storage) error {
	b, err := json.Marshal(lc)
	if err != nil {
		return err
	}
	return storage.Put(ctx, &logical.StorageEntry{Key: lifecyclePrefix + lc.Name, Value: b})
}

// defaultCap is the encryption cap a key type has unless configured:
// NIST's bound for AES-GCM with random nonces, none otherwise (convergent
// keys derive their nonces; RSA has no nonce).
func defaultCap(kt keysutil.KeyType, convergent bool) uint64 {
	switch kt {
	case keysutil.KeyType_AES128_GCM96, keysutil.KeyType_AES256_GCM96:
		if !convergent {
			return gcmRandomNonceLimit
		}
	}
	return 0
}

// limit returns the cap in force; mu is held.
func (lc *keyLifecycle) limit(typeDefault uint64) uint64 {
	if lc.MaxEncryptions != nil {
		return *lc.MaxEncryptions
	}
	return typeDefault
}

// reserve counts n encryptions with version v. It reports false, counting
// nothing, when they would pass the cap: the version is spent. mu is held.
func (lc *keyLifecycle) reserve(ctx context.Context, storage logical.Storage, v int, n uint64, limit uint64) (bool, error) {
	next := lc.counts[v] + n
	if limit > 0 && next > limit {
		return false, nil
	}
	if next > lc.Reserved[v] {
		// Store the reservation before the encryptions happen, so that
		// a crash can only leave the stored count above the truth.
		reserved := next + countBlock
		if limit > 0 && reserved > limit {
			reserved = limit
		}
		prev, had := lc.Reserved[v]
		if lc.Reserved == nil {
			lc.Reserved = map[int]uint64{}
		}
		lc.Reserved[v] = reserved
		if err := lc.persist(ctx, storage); err != nil {
			if had {
				lc.Reserved[v] = prev
			} else {
				delete(lc.Reserved, v)
			}
			return false, err
		}
	}
	lc.counts[v] = next
	return true, nil
}

// describeInto adds the lifecycle fields to a key's description; mu is
// held.
func (lc *keyLifecycle) describeInto(data map[string]interface{}, typeDefault uint64) {
	data["disabled"] = lc.Disabled
	data["max_encryptions"] = lc.limit(typeDefault)
	counts := map[string]uint64{}
	for v, n := range lc.counts {
		counts[strconv.Itoa(v)] = n
	}
	data["encryptions"] = counts
	if !lc.DeletionTime.IsZero() {
		data["deletion_time"] = lc.DeletionTime.Format(time.RFC3339)
	}
}

// errKeyDisabled refuses cryptographic use of a disabled key.
func errKeyDisabled(name string, lc *keyLifecycle) error {
	msg := fmt.Sprintf("key %q is disabled: it cannot be used until keys/%s/config sets disabled=false", name, name)
	if !lc.DeletionTime.IsZero() {
		msg = fmt.Sprintf("key %q is disabled and scheduled for destruction at %s: keys/%s/cancel-deletion restores it", name, lc.DeletionTime.Format(time.RFC3339), name)
	}
	return callerErr("%s", msg)
}

// checkEnabled refuses cryptographic use of a disabled key.
func (b *backend) checkEnabled(ctx context.Context, s logical.Storage, name string) error {
	lc, err := b.lifecycle.get(ctx, s, name)
	if err != nil {
		return err
	}
	lc.mu.Lock()
	defer lc.mu.Unlock()
	if lc.Disabled {
		return errKeyDisabled(name, lc)
	}
	return nil
}

// encryptionsByVersion tallies the versions items will encrypt with.
// Versions that do not exist are left out: those items fail anyway.
func encryptionsByVersion(items []batchItem, skip func(i int) bool, latest int) map[int]uint64 {
	out := map[int]uint64{}
	for i := range items {
		if skip != nil && skip(i) {
			continue
		}
		v := items[i].KeyVersion
		if v == 0 {
			v = latest
		}
		if v >= 1 && v <= latest {
			out[v]++
		}
	}
	return out
}

// errVersionSpent refuses an explicitly requested version that reached its
// cap.
func errVersionSpent(name string, v int, limit uint64) error {
	return callerErr("version %d of key %q has reached max_encryptions (%d): encrypt with the latest version", v, name, limit)
}

// cipherForEncryption returns the key for encryptions, with them counted
// against the versions' caps. When the latest version is spent, the key is
// rotated first, so that no request fails because of the cap. spent lists
// explicitly requested older versions that are spent.
func (b *backend) cipherForEncryption(ctx context.Context, polReq keysutil.PolicyRequest, tally func(latest int) map[int]uint64) (c keyCipher, upserted bool, unlock func(), spent map[int]error, err error) {
	for attempt := 0; ; attempt++ {
		c, upserted, unlock, err = b.usableCipher(ctx, polReq)
		if err != nil || c == nil {
			return c, upserted, unlock, nil, err
		}
		wanted := tally(c.latest())
		rotate, spent, limit, err := b.reserveEncryptions(ctx, polReq.Storage, polReq.Name, c, wanted)
		if err != nil {
			unlock()
			return nil, false, func() {}, nil, err
		}
		if !rotate {
			return c, upserted, unlock, spent, nil
		}
		latest := c.latest()
		unlock()
		// Concurrent requests may spend each fresh version before this
		// one gets to it; what never fits is a request larger than a
		// whole version.
		if n := wanted[latest]; n > limit || attempt >= maxCapRotations {
			return nil, false, func() {}, nil, callerErr("%d encryptions in one request exceed max_encryptions (%d) of key %q: split the batch", n, limit, polReq.Name)
		}
		if err := b.rotateSpent(ctx, polReq.Storage, polReq.Name, latest, limit); err != nil {
			return nil, false, func() {}, nil, err
		}
		polReq.Upsert = false
	}
}

// maxCapRotations bounds how many times one request rotates a key whose
// fresh versions other requests keep spending.
const maxCapRotations = 64

// reserveEncryptions counts encryptions per version. rotate reports that the
// latest version is spent (nothing was counted for it).
func (b *backend) reserveEncryptions(ctx context.Context, s logical.Storage, name string, c keyCipher, wanted map[int]uint64) (rotate bool, spent map[int]error, limit uint64, err error) {
	lc, err := b.lifecycle.get(ctx, s, name)
	if err != nil {
		return false, nil, 0, err
	}
	lc.mu.Lock()
	defer lc.mu.Unlock()
	limit = lc.limit(c.defaultCap())
	for v, n := range wanted {
		ok, err := lc.reserve(ctx, s, v, n, limit)
		if err != nil {
			return false, nil, limit, fmt.Errorf("recording encryption counts: %w", err)
		}
		if ok {
			continue
		}
		if v == c.latest() {
			rotate = true
			continue
		}
		if spent == nil {
			spent = map[int]error{}
		}
		spent[v] = errVersionSpent(name, v, limit)
	}
	return rotate, spent, limit, nil
}

// rotateSpent rotates a key whose latest version reached its cap, unless
// another request already did.
func (b *backend) rotateSpent(ctx context.Context, s logical.Storage, name string, spentVersion int, limit uint64) error {
	k, unlock, err := b.lockKey(ctx, s, name, true)
	defer unlock()
	if err != nil || k == nil || k.latest() != spentVersion {
		return err
	}
	if k.refuseRotation() != "" {
		return callerErr("version %d of key %q reached max_encryptions (%d), and the imported key does not allow rotation: import a new version or raise max_encryptions", spentVersion, name, limit)
	}
	b.Logger().Info("rotating key: its latest version reached max_encryptions", "name", name, "residency", k.residency(), "version", spentVersion, "max_encryptions", limit)
	return k.rotate(ctx, s)
}

// describeKey describes a software key with its lifecycle; the caller holds
// the policy's lock.
func (b *backend) describeKey(ctx context.Context, s logical.Storage, p *keysutil.Policy, keyContext []byte) (*logical.Response, error) {
	resp, err := formatKeyPolicy(p, keyContext)
	if err != nil {
		return nil, err
	}
	return resp, b.addLifecycle(ctx, s, p.Name, defaultCap(p.Type, p.ConvergentEncryption), resp)
}

// describeHSMKey describes an HSM-resident key with its lifecycle; the
// caller holds its lock.
func (b *backend) describeHSMKey(ctx context.Context, s logical.Storage, k *hsmkey.Key) (*logical.Response, error) {
	resp := describeHSMKeyFields(k, b.hsmKeys.Label)
	return resp, b.addLifecycle(ctx, s, k.Name, gcmRandomNonceLimit, resp)
}

func (b *backend) addLifecycle(ctx context.Context, s logical.Storage, name string, typeDefault uint64, resp *logical.Response) error {
	lc, err := b.lifecycle.get(ctx, s, name)
	if err != nil {
		return err
	}
	lc.mu.Lock()
	defer lc.mu.Unlock()
	lc.describeInto(resp.Data, typeDefault)
	return nil
}

// lifecycleChange is the lifecycle part of a keys/:name/config write; nil
// fields were not given.
type lifecycleChange struct {
	disabled       *bool
	maxEncryptions *uint64
}

func parseLifecycleChange(d *framework.FieldData) (lifecycleChange, error) {
	var c lifecycleChange
	if v, ok := d.GetOk("disabled"); ok {
		x := v.(bool)
		c.disabled = &x
	}
	if v, ok := d.GetOk("max_encryptions"); ok {
		n := v.(int)
		if n < 0 {
			return c, errors.New("max_encryptions cannot be negative (0 switches the cap off)")
		}
		u := uint64(n)
		c.maxEncryptions = &u
	}
	return c, nil
}

// checkLifecycleChange refuses enabling a key that awaits destruction.
func (b *backend) checkLifecycleChange(ctx context.Context, s logical.Storage, name string, c lifecycleChange) error {
	if c.disabled == nil || *c.disabled {
		return nil
	}
	lc, err := b.lifecycle.get(ctx, s, name)
	if err != nil {
		return err
	}
	lc.mu.Lock()
	defer lc.mu.Unlock()
	if !lc.DeletionTime.IsZero() {
		return callerErr("key %q is scheduled for destruction: keys/%s/cancel-deletion restores it", name, name)
	}
	return nil
}

// applyLifecycleChange stores a lifecycle change.
func (b *backend) applyLifecycleChange(ctx context.Context, s logical.Storage, name string, c lifecycleChange) error {
	if c.disabled == nil && c.maxEncryptions == nil {
		return nil
	}
	lc, err := b.lifecycle.get(ctx, s, name)
	if err != nil {
		return err
	}
	lc.mu.Lock()
	defer lc.mu.Unlock()
	prevDisabled, prevMax := lc.Disabled, lc.MaxEncryptions
	if c.disabled != nil {
		lc.Disabled = *c.disabled
	}
	if c.maxEncryptions != nil {
		lc.MaxEncryptions = c.maxEncryptions
	}
	if err := lc.persist(ctx, s); err != nil {
		lc.Disabled, lc.MaxEncryptions = prevDisabled, prevMax
		return fmt.Errorf("storing the key's lifecycle: %w", err)
	}
	if c.disabled != nil && prevDisabled != lc.Disabled {
		b.Logger().Info("key suspension changed", "name", name, "disabled", lc.Disabled)
	}
	return nil
}
