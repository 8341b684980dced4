// Package hsmtransit is a Vault secrets engine with the API of Vault's
// built-in transit engine. Its software keyring is the SDK's keysutil.
package hsmtransit

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/consts"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/hsmkey"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

const (
	// operationPrefix names the OpenAPI operations as built-in transit does,
	// so that generated clients and the UI see the same operation IDs.
	operationPrefix = "transit"

	// minCacheSize is the smallest non-zero policy cache size; 0 means unbounded.
	minCacheSize = 10

	// autoRotateCheckInterval bounds how often the periodic function walks
	// every key looking for one due for automatic rotation.
	autoRotateCheckInterval = time.Hour

	// Storage prefixes written by keysutil.
	policyPrefix  = "policy/"
	archivePrefix = "archive/"
)

// errEnterpriseOnly is the message built-in transit gives for key types whose
// implementation exists only in Vault Enterprise's keysutil.
const errEnterpriseOnly = "key type %s is only available in enterprise versions of Vault"

// backend is one mount of the engine. Every mount of a multiplexed plugin
// process has its own backend; they share nothing but the process.
type backend struct {
	*framework.Backend

	// lm owns the policy cache and the per-key locks. It is replaced only by
	// InitCache under cacheMu; every access goes through the helpers below.
	lm *keysutil.LockManager

	// cacheMu guards lm's cache against being swapped while in use. The
	// read side is taken on every key access, the write side only when the
	// cache size changes.
	cacheMu sync.RWMutex
	// cacheStale is set when another node changed the cache size; the next
	// key access re-reads it from storage.
	cacheStale atomic.Bool

	// autoRotateMu makes auto-rotation single-flight; nextAutoRotate is the
	// earliest time of the next walk over the keys.
	autoRotateMu   sync.Mutex
	nextAutoRotate time.Time
	// autoRotateEvery is autoRotateCheckInterval, shorter in tests.
	autoRotateEvery time.Duration

	// seal is the HSM seal of the mount's root key.
	seal *mountseal.Manager
	// hsmKeys are the keys kept in the HSM.
	hsmKeys *hsmkey.Store
	// lifecycle holds suspension, usage counts and scheduled deletion.
	lifecycle *lifecycleStore
	// aeads are the ciphers of software keys' versions in use.
	aeads *aeadCache
}

// Factory returns a configured backend. It must not touch storage: an external
// plugin has none until Initialize.
func Factory(ctx context.Context, conf *logical.BackendConfig) (logical.Backend, error) {
	b, err := newBackend(conf)
	if err != nil {
		return nil, err
	}
	if err := b.Setup(ctx, withReplicationCache(conf)); err != nil {
		return nil, err
	}
	registerBackend(b)
	return b, nil
}

func newBackend(conf *logical.BackendConfig) (*backend, error) {
	useCache := conf == nil || conf.System == nil || !conf.System.CachingDisabled()
	lm, err := keysutil.NewLockManager(useCache, 0)
	if err != nil {
		return nil, fmt.Errorf("creating lock manager: %w", err)
	}
	b := &backend{lm: lm, autoRotateEvery: autoRotateCheckInterval}
	mountUUID := ""
	if conf != nil {
		mountUUID = conf.BackendUUID
	}
	b.seal = mountseal.New(sealHost{b}, mountUUID)
	b.hsmKeys = hsmkey.NewStore(b.seal, mountUUID)
	b.lifecycle = newLifecycleStore()
	b.aeads = newAEADCache()
	b.Backend = &framework.Backend{
		Help:           backendHelp,
		BackendType:    logical.TypeLogical,
		RunningVersion: Version,
		PathsSpecial: &logical.Paths{
			// Key material is marked for seal wrapping, as built-in transit does.
			SealWrapStorage: []string{archivePrefix, policyPrefix},
		},
		Paths: strictPaths(framework.PathAppend(
			// Served while the root key is sealed: the seal's own paths,
			// and those that use no key.
			[]*framework.Path{
				b.pathConfigSeal(),
				b.pathSealStatus(),
				b.pathSealRotate(),
				b.pathRecoveryInit(),
				b.pathRecoveryRestore(),
				b.pathEmergencySeal(),
				b.pathUnseal(),
				b.pathHash(),
				b.pathRandom(),
			},
			// Refused with a 503 until the root key is unsealed. Paths with
			// a fixed suffix come before keys/:name, whose handler would
			// otherwise be tried first.
			b.gatePaths([]*framework.Path{
				b.pathRotate(),
				b.pathKeysConfig(),
				b.pathScheduleDeletion(),
				b.pathCancelDeletion(),
				b.pathTrim(),
				b.pathImport(),
				b.pathImportVersion(),
				b.pathCreateCSR(),
				b.pathSetCertificate(),
				b.pathKeys(),
				b.pathListKeys(),
				b.pathWrappingKey(),
				b.pathEncrypt(),
				b.pathDecrypt(),
				b.pathRewrap(),
				b.pathDatakey(),
				b.pathSign(),
				b.pathVerify(),
				b.pathHMAC(),
				b.pathExport(),
				b.pathBYOKExport(),
				b.pathBackup(),
				b.pathRestore(),
				b.pathCacheConfig(),
				b.pathConfigKeys(),
			}),
		)),
		InitializeFunc: b.initialize,
		Invalidate:     b.invalidate,
		PeriodicFunc:   b.periodic,
		Clean:          b.clean,
	}
	return b, nil
}

// initialize runs once storage is available: it starts unsealing the root
// key in the background (the cache size is read once unsealed).
func (b *backend) initialize(_ context.Context, req *logical.InitializationRequest) error {
	b.seal.Start(req.Storage)
	return nil
}

// loadCacheSize resizes the policy cache to the size kept in storage.
func (b *backend) loadCacheSize(ctx context.Context, s logical.Storage) error {
	if !b.lm.GetUseCache() {
		return nil
	}
	size, err := readCacheSize(ctx, s)
	if err != nil {
		return err
	}
	b.cacheMu.Lock()
	defer b.cacheMu.Unlock()
	b.cacheStale.Store(false)
	if size == b.lm.GetCacheSize() {
		return nil
	}
	if err := b.lm.InitCache(size); err != nil {
		return fmt.Errorf("resizing policy cache: %w", err)
	}
	// Everything else kept per key follows the policy cache's bound.
	b.hsmKeys.Resize(size)
	b.lifecycle.cache.resize(size)
	b.aeads.c.resize(size)
	if sealer := b.seal.Snapshot().Sealer(); sealer != nil {
		sealer.SetManifestCacheBytes(manifestCacheBytes(size))
	}
	return nil
}

// manifestCacheBytes bounds the decoded manifest buckets kept in memory:
// with a bounded key cache, a few MiB, so that memory stays flat however
// many keys the mount holds (a key read from storage then also reads its
// bucket); unbounded, the seal package's default.
func manifestCacheBytes(cacheSize int) int64 {
	if cacheSize == 0 {
		return seal.DefaultManifestCacheBytes
	}
	return 4 << 20
}

// cacheSize returns the policy cache's size (0: unbounded).
func (b *backend) cacheSize() int {
	b.cacheMu.RLock()
	defer b.cacheMu.RUnlock()
	return b.lm.GetCacheSize()
}

// invalidate drops cached state that another node changed in storage.
func (b *backend) invalidate(ctx context.Context, key string) {
	switch {
	case strings.HasPrefix(key, policyPrefix):
		b.cacheMu.RLock()
		defer b.cacheMu.RUnlock()
		b.lm.InvalidatePolicy(strings.TrimPrefix(key, policyPrefix))
	case strings.HasPrefix(key, hsmKeyPrefix):
		b.hsmKeys.Invalidate(strings.TrimPrefix(key, hsmKeyPrefix))
	case strings.HasPrefix(key, lifecyclePrefix):
		b.lifecycle.invalidate(strings.TrimPrefix(key, lifecyclePrefix))
	case key == cacheConfigStoragePath:
		b.cacheStale.Store(true)
	case key == mountseal.ConfigPath || key == mountseal.MetaPath:
		b.seal.Invalidate(ctx, key)
	case strings.HasPrefix(key, "manifest/"):
		if sealer := b.seal.Snapshot().Sealer(); sealer != nil {
			sealer.Invalidate(key)
		}
	}
}

// mustNotWrite reports whether this node must leave storage and the HSM to
// another: a DR secondary, a performance standby, or a performance
// secondary for a mount that is replicated (not local). Built-in transit's
// periodic function checks the same before auto-rotating; the periodic
// callback and the seal's work after an unseal (sealHost.ReadOnlyNode) ask
// it.
func (b *backend) mustNotWrite() bool {
	sys := b.System()
	if sys == nil {
		return false
	}
	rs := sys.ReplicationState()
	return rs.HasState(consts.ReplicationDRSecondary|consts.ReplicationPerformanceStandby) ||
		(!sys.LocalMount() && rs.HasState(consts.ReplicationPerformanceSecondary))
}

// clean releases the mount's root key, token and cached keys when it is
// unmounted or reloaded.
func (b *backend) clean(_ context.Context) {
	defer unregisterBackend(b)
	b.seal.Close()
	b.hsmKeys.Reset()
	b.lifecycle.reset()
	b.aeads.c.purge()
	b.cacheMu.Lock()
	defer b.cacheMu.Unlock()
	if b.lm.GetUseCache() {
		// A fresh cache drops every reference to key material.
		_ = b.lm.InitCache(b.lm.GetCacheSize())
	}
}

// periodic is Vault's periodic callback (about once a minute). Keys rotate
// only while the root key is unsealed. A node that must not write does none
// of it: Vault runs the callback on performance standbys and secondaries
// too, and their storage refuses writes only after the HSM has been
// changed (a scheduled destruction destroys a key's HSM objects first, an
// auto-rotation of an HSM-resident key creates its new object first).
func (b *backend) periodic(ctx context.Context, req *logical.Request) error {
	if b.mustNotWrite() {
		return nil
	}
	s, err := b.seal.View(ctx, req.Storage)
	if err != nil {
		return nil
	}
	b.seal.ResumeRotation(ctx, req.Storage)
	return errors.Join(b.destroyDueKeys(ctx, s, time.Now()), b.autoRotateKeys(ctx, s))
}

// withLM runs f with the lock manager, holding the cache guard. It re-reads a
// cache size changed by another node first.
func (b *backend) withLM(ctx context.Context, s logical.Storage, f func(lm *keysutil.LockManager) error) error {
	if b.cacheStale.Load() {
		if err := b.loadCacheSize(ctx, s); err != nil {
			return err
		}
	}
	b.cacheMu.RLock()
	defer b.cacheMu.RUnlock()
	return f(b.lm)
}

// lockedPolicy loads (or with polReq.Upsert, creates) a policy and locks it,
// shared or exclusive. The returned unlock must be called exactly once, and is
// a no-op when the policy is nil. upserted reports that this call created it.
//
// keysutil hands out policies unlocked when caching is on and already
// write-locked when it is off; this hides the difference.
func (b *backend) lockedPolicy(ctx context.Context, polReq keysutil.PolicyRequest, exclusive bool) (p *keysutil.Policy, upserted bool, unlock func(), err error) {
	if strings.Contains(polReq.Name, "..") {
		// Storage refuses the path; answer as built-in transit does,
		// rather than with the storage error (a 500 across the plugin
		// boundary).
		return nil, false, func() {}, errRelativeKeyName
	}
	err = b.withLM(ctx, polReq.Storage, func(lm *keysutil.LockManager) error {
		var gerr error
		p, upserted, gerr = lm.GetPolicy(ctx, polReq, b.GetRandomReader())
		return gerr
	})
	if err != nil {
		return nil, false, func() {}, err
	}
	if p == nil {
		return nil, false, func() {}, nil
	}
	if b.lm.GetUseCache() {
		p.Lock(exclusive)
	}
	if p.Type.IsEnterpriseOnly() {
		p.Unlock()
		return nil, false, func() {}, logical.CodedError(400, fmt.Sprintf(errEnterpriseOnly, p.Type))
	}
	var once sync.Once
	return p, upserted, func() { once.Do(p.Unlock) }, nil
}

// errRelativeKeyName refuses a key name with "..", which storage cannot
// hold.
var errRelativeKeyName = logical.CodedError(http.StatusBadRequest, `key names cannot contain "..": relative paths not supported`)

// readPolicy returns an existing key, locked shared or exclusive; p is nil
// when the key does not exist.
//
// A name that belongs to an HSM-resident key is a 400: the paths that read
// software keys this way are those HSM-resident keys do not support.
func (b *backend) readPolicy(ctx context.Context, s logical.Storage, name string, exclusive bool) (*keysutil.Policy, func(), error) {
	p, _, unlock, err := b.lockedPolicy(ctx, keysutil.PolicyRequest{Storage: s, Name: name}, exclusive)
	if err != nil || p != nil {
		return p, unlock, err
	}
	if k, err := b.hsmKeys.Get(ctx, s, name); err != nil {
		return nil, unlock, err
	} else if k != nil {
		return nil, unlock, errHSMKeyUnsupported(name, "this path")
	}
	return nil, unlock, nil
}

// autoRotateKeys rotates every key whose auto_rotate_period has passed since
// its latest version was created. It walks the keys at most once per
// autoRotateEvery and never runs twice at once.
func (b *backend) autoRotateKeys(ctx context.Context, s logical.Storage) error {
	if !b.autoRotateMu.TryLock() {
		return nil
	}
	defer b.autoRotateMu.Unlock()
	if time.Now().Before(b.nextAutoRotate) {
		return nil
	}
	b.nextAutoRotate = time.Now().Add(b.autoRotateEvery)

	names, err := s.List(ctx, policyPrefix)
	if err != nil {
		return fmt.Errorf("listing keys for auto-rotation: %w", err)
	}
	var errs []error
	for _, name := range names {
		if strings.HasSuffix(name, "/") {
			continue
		}
		if err := b.rotateIfDue(ctx, s, name); err != nil {
			errs = append(errs, fmt.Errorf("key %q: %w", name, err))
		}
	}
	hsmNames, err := s.List(ctx, hsmKeyPrefix)
	if err != nil {
		return fmt.Errorf("listing HSM-resident keys for auto-rotation: %w", err)
	}
	for _, name := range hsmNames {
		if err := b.rotateIfDue(ctx, s, name); err != nil {
			errs = append(errs, fmt.Errorf("HSM-resident key %q: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// rotateIfDue rotates one key, of either residency, if its automatic
// rotation period has passed.
func (b *backend) rotateIfDue(ctx context.Context, s logical.Storage, name string) error {
	k, unlock, err := b.lockKey(ctx, s, name, true)
	defer unlock()
	if err != nil || k == nil || !k.rotationDue(time.Now()) {
		return err
	}
	b.Logger().Info("rotating key automatically", "name", name, "residency", k.residency())
	return k.rotate(ctx, s)
}

const backendHelp = `
The hsm-transit secrets engine encrypts, decrypts, signs, verifies and MACs
data with named keys, with the API of Vault's built-in transit engine. Keys
are versioned and can be rotated; data is never stored.
`
