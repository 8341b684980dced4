// Package mountseal is one mount's HSM seal: its configuration, unsealing
// the root keyring and retrying it, invalidations from other nodes, root key
// rotation, recovery from shares, the emergency seal and the anti-rollback
// anchor, as one Manager.
//
// The Manager reaches the rest of the mount only through a Host: a logger,
// whether the node may write, an on-unseal hook and a way to drop what the
// mount caches. It knows nothing of paths or responses: its methods return
// results and errors of a Kind (errors.go), which the backend answers.
//
// Concurrency: every transition (configure, unseal, rotate, recovery,
// emergency seal, close) runs under one lock, a channel so that a request
// that finds an unseal under way can wait for it in a select. Requests read
// the state without locks: it is an immutable Snapshot, replaced at each
// transition, and a channel closed at each replacement wakes whoever waits.
package mountseal

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/hsmkey"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

const (
	// Unseal retries back off from the first delay to the longest.
	unsealRetryFirst = time.Second
	unsealRetryMax   = 15 * time.Second
	// unsealWait bounds how long a request waits for an unseal under way.
	unsealWait = 5 * time.Second
)

// Host is what the Manager needs of the mount it seals.
type Host interface {
	// Logger is where the seal says what it did and why it is sealed.
	Logger() hclog.Logger
	// ReadOnlyNode reports a node that must not write storage (a
	// performance standby, a DR secondary, a performance secondary for a
	// replicated mount): it leaves interrupted work to the node that may.
	ReadOnlyNode() bool
	// Unsealed is called under the seal's lock each time the root keyring
	// comes into memory, with the mount's storage seen through the seal
	// (to read what lives there, as the cache configuration). It returns
	// the bound of the manifest cache (seal.DefaultManifestCacheBytes, or
	// less).
	Unsealed(ctx context.Context, view logical.Storage) (manifestCacheBytes int64)
	// DropCachedKeys forgets every key the mount holds in memory: the
	// root keyring that opened them is gone, or is another one.
	DropCachedKeys()
}

// Phase is where a mount's seal stands.
type Phase int

const (
	PhaseUnknown      Phase = iota // config not read yet
	PhaseUnconfigured              // no config/seal: nothing works yet
	PhaseSealed                    // configured, root key not in memory
	PhaseUnsealed                  // root key in memory: keys work
)

// Snapshot is an immutable view of the seal's state, read without locks
// on every request.
type Snapshot struct {
	phase Phase
	cfg   *Config
	// meta and sealer are set when unsealed.
	meta   *Meta
	sealer *seal.Sealer
	// problem is a fault found in storage while unsealed that does not
	// seal the mount (entries planted in plaintext), for seal/status.
	problem error
	// migrated counts the entries the first seal encrypted.
	migrated int
	// lastErr is why the mount is sealed; permanent errors (a refused PIN,
	// a KEK that does not open the keyring) stop the retries.
	lastErr   error
	permanent bool
	// nextTry is when the next unseal attempt may touch the HSM.
	nextTry time.Time
	backoff time.Duration
}

// Phase is where the seal stood.
func (s *Snapshot) Phase() Phase { return s.phase }

// Config is the stored configuration the state was read from; nil before
// config/seal. It must not be changed.
func (s *Snapshot) Config() *Config { return s.cfg }

// Meta is the sealed seal state; nil unless unsealed. It must not be
// changed.
func (s *Snapshot) Meta() *Meta { return s.meta }

// Sealer is the root keyring's sealer over storage; nil unless unsealed.
func (s *Snapshot) Sealer() *seal.Sealer { return s.sealer }

// Problem is a fault found in storage while unsealed that does not seal
// the mount (entries planted in plaintext).
func (s *Snapshot) Problem() error { return s.problem }

// LastErr is why the mount is sealed.
func (s *Snapshot) LastErr() error { return s.lastErr }

// Permanent reports a LastErr that no retry cures (a refused PIN, a KEK
// that does not open the keyring): config/seal must change.
func (s *Snapshot) Permanent() bool { return s.permanent }

// Configured reports a mount that has a seal configuration.
func (s *Snapshot) Configured() bool { return s.phase == PhaseSealed || s.phase == PhaseUnsealed }

// EmergencySealed reports an emergency seal, as the sealed state records
// it when unsealed, as the plaintext configuration or the last unseal
// attempt says when sealed.
func (s *Snapshot) EmergencySealed() bool {
	if s.meta != nil {
		return s.meta.EmergencySealed
	}
	return (s.cfg != nil && s.cfg.EmergencySealed) || errors.Is(s.lastErr, ErrEmergencySealed)
}

// Manager owns one mount's seal: its configuration, its token and its
// root keyring in memory.
type Manager struct {
	host Host
	// mountID is the mount's UUID; aad binds the sealed keyring to it.
	mountID string
	aad     []byte

	state atomic.Pointer[Snapshot]

	// mu serialises transitions: configure, unseal, rotate, close. A
	// request that finds an unseal under way waits on it in a select
	// (tryUnseal): for the attempt to end, the state to change, its
	// context or a deadline.
	mu chanMutex
	// changed is closed, and replaced, at each change of state.
	changedMu sync.Mutex
	changed   chan struct{}
	token     *hsm.Token
	// current mirrors token for readers that must not wait on mu.
	current atomic.Pointer[hsm.Token]
	// support is what the current token offers, asked once per token.
	support atomic.Pointer[tokenSupport]
	// anchor keeps the anti-rollback anchor in the token; nil when off.
	anchor *anchorWriter
	// storage is the mount's storage from Initialize, for background
	// unsealing; under holds it too, for invalidations, which must not
	// wait on mu.
	storage logical.Storage
	under   atomic.Value // logical.Storage
	// stop ends the background work at Clean.
	stop    chan struct{}
	stopped bool
	kick    chan struct{}
	done    sync.WaitGroup
	reloads sync.WaitGroup // reloads after invalidations in flight (also in done)
	// rotationStored, when set (by tests), runs between storing a rotated
	// keyring and resealing the entries.
	rotationStored func()
}

// New returns the seal of the mount mountUUID (which the sealed keyring is
// bound to), in PhaseUnknown: storage is read at the first request, or in
// the background from Start.
func New(host Host, mountUUID string) *Manager {
	m := &Manager{
		host:    host,
		mountID: mountUUID,
		aad:     []byte("hsm-transit/root-keyring\x00" + mountUUID),
		mu:      newChanMutex(),
		changed: make(chan struct{}),
		stop:    make(chan struct{}),
		kick:    make(chan struct{}, 1),
	}
	m.setState(&Snapshot{phase: PhaseUnknown})
	return m
}

// MountID is the mount's UUID.
func (m *Manager) MountID() string { return m.mountID }

// Snapshot returns the seal's state now, without waiting on transitions.
func (m *Manager) Snapshot() *Snapshot { return m.state.Load() }

// setState moves to snap and wakes whoever waits for a change.
func (m *Manager) setState(snap *Snapshot) {
	m.state.Store(snap)
	m.changedMu.Lock()
	close(m.changed)
	m.changed = make(chan struct{})
	m.changedMu.Unlock()
}

// stateChanged is closed at the next change of state.
func (m *Manager) stateChanged() <-chan struct{} {
	m.changedMu.Lock()
	defer m.changedMu.Unlock()
	return m.changed
}

// chanMutex is a mutex that can be waited for in a select.
type chanMutex chan struct{}

func newChanMutex() chanMutex { return make(chanMutex, 1) }

func (l chanMutex) Lock() { l <- struct{}{} }

func (l chanMutex) Unlock() {
	select {
	case <-l:
	default:
		panic("unlock of an unlocked chanMutex")
	}
}

func (l chanMutex) TryLock() bool {
	select {
	case l <- struct{}{}:
		return true
	default:
		return false
	}
}

// View returns the mount's storage under seen through the seal, unsealing
// first if need be. The error is a 400 (logical.HTTPCodedError) naming
// config/seal when there is no seal yet, and a 503 when the HSM cannot
// unseal the root key now.
func (m *Manager) View(ctx context.Context, under logical.Storage) (logical.Storage, error) {
	if snap := m.state.Load(); snap.phase == PhaseUnsealed {
		return snap.sealer.Wrap(under), nil
	}
	snap, err := m.tryUnseal(ctx, under, false)
	if err != nil {
		return nil, err
	}
	switch snap.phase {
	case PhaseUnsealed:
		return snap.sealer.Wrap(under), nil
	case PhaseUnconfigured:
		return nil, logical.CodedError(http.StatusBadRequest, ErrNotConfigured.Error())
	}
	return nil, sealUnavailable(snap)
}

// Status returns the seal's state after trying to unseal, as a request
// would, so that it is current.
func (m *Manager) Status(ctx context.Context, under logical.Storage) (*Snapshot, error) {
	return m.tryUnseal(ctx, under, false)
}

// tryUnseal reads the configuration if needed and tries to unseal, unless
// an attempt is under way, backing off, or pointless until the
// configuration changes (force skips the back-off).
func (m *Manager) tryUnseal(ctx context.Context, under logical.Storage, force bool) (*Snapshot, error) {
	// Another request or the background loop may be at it: wait a while
	// for its outcome rather than answer 503 meanwhile, but not forever,
	// in case the HSM hangs.
	deadline := time.NewTimer(unsealWait)
	defer deadline.Stop()
	for locked := m.mu.TryLock(); !locked; {
		changed := m.stateChanged()
		if snap := m.state.Load(); snap.phase == PhaseUnsealed {
			return snap, nil
		}
		select {
		case m.mu <- struct{}{}:
			locked = true
		case <-changed:
		case <-ctx.Done():
			return m.state.Load(), nil
		case <-deadline.C:
			return m.state.Load(), nil
		}
	}
	defer m.mu.Unlock()
	snap := m.state.Load()
	if snap.phase == PhaseUnknown {
		cfg, err := ReadConfig(ctx, under)
		if err != nil {
			return nil, err
		}
		switch {
		case cfg == nil:
			snap = &Snapshot{phase: PhaseUnconfigured}
		case cfg.EmergencySealed:
			snap = &Snapshot{phase: PhaseSealed, cfg: cfg, lastErr: ErrEmergencySealed, permanent: true}
		default:
			snap = &Snapshot{phase: PhaseSealed, cfg: cfg}
		}
		m.setState(snap)
	}
	if snap.phase != PhaseSealed || snap.permanent || (!force && time.Now().Before(snap.nextTry)) {
		return snap, nil
	}
	return m.unsealLocked(ctx, under, snap.cfg), nil
}

// unsealLocked opens the root keyring with the HSM and moves to unsealed,
// or records why it cannot. m.mu is held.
func (m *Manager) unsealLocked(ctx context.Context, under logical.Storage, cfg *Config) *Snapshot {
	prev := m.state.Load()
	snap, err := m.openMount(ctx, under, cfg)
	if err != nil {
		snap = &Snapshot{phase: PhaseSealed, cfg: cfg, lastErr: err}
		switch kind := hsm.KindOf(err); {
		case (kind == hsm.Credentials && !hsm.IsLoginLimited(err)) || kind == hsm.Failed || kind == hsm.Configuration:
			snap.permanent = true
		default:
			// Also the bound on failed logins, which a neighbouring
			// mount may have reached: it passes by itself.
			// Storage that does not check out (edited, or not readable
			// now) is retried like an unreachable HSM: nothing of it is
			// adopted meanwhile.
			snap.backoff = min(max(2*prev.backoff, unsealRetryFirst), unsealRetryMax)
			snap.nextTry = time.Now().Add(snap.backoff)
			m.wake()
		}
		m.host.Logger().Warn("cannot unseal the mount's root key", "error", err, "retry_in", snap.backoff.String())
		m.setState(snap)
		return snap
	}
	m.setState(snap)
	if snap.phase != PhaseUnsealed {
		m.host.Logger().Warn("the mount stays sealed", "reason", snap.lastErr)
		return snap
	}
	m.host.Logger().Info("unsealed the mount's root key", "token", m.token.Describe(), "key_label", cfg.SealedWith, "root_key_version", snap.sealer.Keyring().Active())
	return m.afterUnseal(ctx, under, snap)
}

// openMount unseals the stored keyring with the configured token and checks
// storage against it. On success the token becomes the mount's. m.mu is
// held.
func (m *Manager) openMount(ctx context.Context, under logical.Storage, cfg *Config) (*Snapshot, error) {
	tok, err := m.openToken(cfg)
	if err != nil {
		return nil, err
	}
	ring, err := m.unsealWith(tok, cfg)
	if err != nil {
		tok.Close()
		return nil, err
	}
	o, err := m.checkStorage(ctx, under, tok, cfg, ring)
	if err != nil || o.meta.EmergencySealed {
		ring.Wipe()
		tok.Close()
		if err != nil {
			return nil, err
		}
		return &Snapshot{phase: PhaseSealed, cfg: o.cfg, lastErr: ErrEmergencySealed, permanent: true}, nil
	}
	m.adoptToken(tok)
	return o.snapshot(), nil
}

// unsealWith opens cfg's sealed keyring with tok.
func (m *Manager) unsealWith(tok *hsm.Token, cfg *Config) (*seal.Keyring, error) {
	keys := cfg.SealedKeys()
	for _, l := range keys.Labels() {
		if strings.HasPrefix(l, hsmkey.Namespace) {
			// Only a storage writer or an older version's officer puts an
			// HSM-resident key's label here.
			return nil, &hsm.Error{Kind: hsm.Configuration, Op: "unseal root key", Err: fmt.Errorf(
				"the keyring is recorded as sealed by %q, a label of the plugin's HSM-resident keys; refusing to use it", l)}
		}
	}
	// Open checks the keys first: the plaintext configuration names them,
	// and a storage writer may name keys whose value is known outside the
	// token.
	raw, err := tok.Open(keys, cfg.SealedKeyring, m.aad)
	if err != nil {
		if hsm.KindOf(err) == hsm.Failed {
			return nil, &hsm.Error{Kind: hsm.Failed, Op: "unseal root key", Err: fmt.Errorf(
				"the KEK %q does not open this mount's root keyring (another KEK with that label, or storage from another mount)", cfg.SealedWith)}
		}
		return nil, err
	}
	defer clear(raw)
	return seal.UnmarshalKeyring(raw)
}

// openedMount is a keyring checked against storage, with what storage holds
// sealed for the seal.
type openedMount struct {
	cfg    *Config
	meta   *Meta
	sealer *seal.Sealer
}

func (o *openedMount) snapshot() *Snapshot {
	return &Snapshot{phase: PhaseUnsealed, cfg: o.cfg, meta: o.meta, sealer: o.sealer}
}

// checkStorage builds the sealer over ring and checks the mount's storage
// against it: the manifest of entries must open under the keyring, and the
// sealed seal state with it. A mount sealed by an older version, which had
// no manifest, is upgraded here (cfg.SealedWith names the KEK in tok that
// seals the upgraded keyring). m.mu is held.
func (m *Manager) checkStorage(ctx context.Context, under logical.Storage, tok *hsm.Token, cfg *Config, ring *seal.Keyring) (*openedMount, error) {
	sealer := seal.NewSealer(ring, IsPlainPath)
	if !ring.Manifested() {
		// An anchor in the token means this mount had a manifest: the
		// configuration is one from before the upgrade, put back to go
		// round the anchor's check.
		if _, found, err := tok.ReadData(m.AntiRollbackLabel()); err != nil {
			return nil, err
		} else if found {
			return nil, fmt.Errorf("%w: the stored configuration predates the manifest, but the token holds this mount's anti-rollback anchor: an older configuration was put back; refused", ErrStorageNotSealed)
		}
		return m.upgradeLocked(ctx, under, tok, cfg, sealer)
	}
	if err := sealer.LoadManifest(ctx, under); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrStorageNotSealed, err)
	}
	if err := m.checkAnchor(tok, sealer); err != nil {
		return nil, err
	}
	meta, err := ReadMeta(ctx, sealer.Wrap(under))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrStorageNotSealed, err)
	}
	if meta == nil {
		return nil, fmt.Errorf("%w: the sealed seal state (%s) is missing", ErrStorageNotSealed, MetaPath)
	}
	return &openedMount{cfg: cfg, meta: meta, sealer: sealer}, nil
}

// upgradeLocked brings a mount sealed by a version without a manifest up to
// date: the manifest is built from the entries present (sealed ones only),
// the seal state moves from the plaintext configuration into its sealed
// entry (trusted this once: nothing authenticated it before), and the
// keyring is sealed again with the flag that makes the manifest required
// from now on. A crash before the last write leaves the mount as it was,
// and the upgrade runs again. m.mu is held.
func (m *Manager) upgradeLocked(ctx context.Context, under logical.Storage, tok *hsm.Token, cfg *Config, sealer *seal.Sealer) (*openedMount, error) {
	meta, err := m.upgradeManifestLocked(ctx, under, cfg, sealer)
	if err != nil {
		return nil, err
	}
	ring := sealer.Keyring().WithManifest()
	sealer.SetKeyring(ring)
	next := *cfg
	next.LegacyRecoveryPublicKey, next.LegacyRecoveryShares = nil, 0
	if err := m.setKeyring(&next, tok, cfg.SealedKeys(), ring, meta); err != nil {
		return nil, err
	}
	if err := WriteConfig(ctx, under, &next); err != nil {
		return nil, err
	}
	// Entries of the older format all have generation 0, so that a replay
	// among their copies would pass: give each a generation now. One that
	// fails stays readable, and the next root key rotation does it.
	n, err := sealer.ResealAll(ctx, under)
	m.host.Logger().Info("upgraded the mount's seal: its entries are now bound to a sealed manifest", "entries_resealed", n, "error", err)
	return &openedMount{cfg: &next, meta: meta, sealer: sealer}, nil
}

// upgradeManifestLocked gives an upgrading mount its manifest and sealed
// state. When both already open under the keyring, an earlier upgrade got
// that far (and crashed before storing the configuration), or the stored
// configuration is an older one replayed: either way they are kept as they
// are, and nothing of the plaintext configuration is taken over. m.mu is
// held.
func (m *Manager) upgradeManifestLocked(ctx context.Context, under logical.Storage, cfg *Config, sealer *seal.Sealer) (*Meta, error) {
	if err := sealer.LoadManifest(ctx, under); err == nil {
		meta, err := ReadMeta(ctx, sealer.Wrap(under))
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrStorageNotSealed, err)
		}
		if meta != nil {
			return meta, nil
		}
	} else if !errors.Is(err, seal.ErrNoManifest) {
		return nil, fmt.Errorf("%w: %w", ErrStorageNotSealed, err)
	}
	if err := checkNeverManifested(ctx, under, sealer.Keyring()); err != nil {
		return nil, err
	}
	if err := sealer.InitManifest(ctx, under); err != nil {
		return nil, fmt.Errorf("building the manifest of the mount's entries: %w", err)
	}
	// The recovery public key of an older version lay in plaintext: a
	// storage writer could have put their own there, or put back a
	// configuration from before the upgrade with theirs, to receive every
	// later copy of the keyring. It is not carried over; recovery is set up
	// again with seal/recovery/init, whose copies are authenticated.
	if cfg.LegacyRecoveryPublicKey != nil {
		m.host.Logger().Warn("recovery was set up by an older version that kept its public key in plaintext; it is not carried over: run seal/recovery/init again")
	}
	meta := &Meta{EmergencySealed: cfg.EmergencySealed}
	if err := WriteMeta(ctx, sealer.Wrap(under), meta); err != nil {
		return nil, err
	}
	return meta, nil
}

// checkNeverManifested refuses to upgrade storage that was under a manifest
// already: a piece of a manifest, or an entry that opens under ring with a
// generation (only a manifest hands them out). Then the configuration is an
// older one put back, with the manifest removed, to make the upgrade trust
// its plaintext fields again.
func checkNeverManifested(ctx context.Context, under logical.Storage, ring *seal.Keyring) error {
	var found string
	err := walkEntries(ctx, under, "", func(key string, value []byte) {
		switch {
		case found != "" || IsPlainPath(key):
		case strings.HasPrefix(key, "manifest/"):
			found = key
		default:
			if gen, ok := seal.SealedGeneration(value); ok && gen > 0 {
				if _, err := ring.Open(key, value); err == nil {
					found = key
				}
			}
		}
	})
	if err != nil {
		return err
	}
	if found != "" {
		return fmt.Errorf("%w: the stored configuration predates the manifest, but %s was written under one: an older configuration was put back and the manifest removed; refusing to upgrade again", ErrStorageNotSealed, found)
	}
	return nil
}

// setKeyring puts ring in cfg: sealed with keys in tok, and in the
// recovery copy when meta has a recovery public key (otherwise any copy in
// cfg is dropped).
func (m *Manager) setKeyring(cfg *Config, tok *hsm.Token, keys hsm.SealKeys, ring *seal.Keyring, meta *Meta) error {
	raw, err := ring.Marshal()
	if err != nil {
		return err
	}
	defer clear(raw)
	sealed, err := tok.Seal(keys, raw, m.aad)
	if err != nil {
		return err
	}
	// (Seal opened it again: nothing is stored that the token cannot
	// open, should its IV handling have changed since the canary.)
	// meta is the authority now: whatever an older version (or a storage
	// writer) left in the plaintext fields goes.
	cfg.LegacyRecoveryPublicKey, cfg.LegacyRecoveryShares = nil, 0
	cfg.RecoveryKeyring, cfg.RecoveryThreshold = nil, 0
	if meta != nil && meta.RecoveryPublicKey != nil {
		if cfg.RecoveryKeyring, err = seal.SealForRecoveryWithMAC(meta.RecoveryPublicKey, meta.RecoveryMACKey, m.recoveryInfo(), ring); err != nil {
			return fmt.Errorf("updating the recovery copy: %w", err)
		}
		cfg.RecoveryThreshold = meta.RecoveryThreshold
	}
	cfg.SealedKeyring, cfg.SealedWith, cfg.RootKeyVersion = sealed, keys.Label, ring.Active()
	cfg.SealedMechanism, cfg.SealedHMAC = string(keys.Mechanism), keys.HMACLabel
	return nil
}

// recoveryInfo binds the recovery copy to the mount.
func (m *Manager) recoveryInfo() []byte {
	return []byte("hsm-transit/recovery\x00" + m.mountID)
}

// openToken opens the token cfg names. The caller adopts it or closes it.
func (m *Manager) openToken(cfg *Config) (*hsm.Token, error) {
	hc, err := cfg.HSMConfig()
	if err != nil {
		return nil, &hsm.Error{Kind: hsm.Configuration, Op: "resolve PIN", Err: err}
	}
	return hsm.Open(hc)
}

// adoptToken makes tok (possibly nil) the mount's token, releasing the
// previous one. m.mu is held.
func (m *Manager) adoptToken(tok *hsm.Token) {
	if m.token != nil {
		m.token.Close()
	}
	m.token = tok
	m.current.Store(tok)
}

// tokenSupport is the mechanisms a token offers.
type tokenSupport struct {
	tok *hsm.Token
	sup hsm.MechanismSupport
}

// TokenMechanisms returns what the mount's current token offers, asking it
// the first time only; nil when there is no token or it does not answer.
func (m *Manager) TokenMechanisms() *hsm.MechanismSupport {
	tok := m.CurrentToken()
	if tok == nil {
		return nil
	}
	if s := m.support.Load(); s != nil && s.tok == tok {
		return &s.sup
	}
	sup, err := tok.Mechanisms()
	if err != nil {
		return nil
	}
	m.support.Store(&tokenSupport{tok: tok, sup: sup})
	return &sup
}

// CurrentToken returns the mount's token without waiting on transitions;
// nil before the mount was unsealed.
func (m *Manager) CurrentToken() *hsm.Token { return m.current.Load() }

// afterUnseal finishes what a crash may have interrupted (the first seal's
// migration, a root key rotation) and loads what lives in sealed storage.
// It returns the snapshot now current. m.mu is held.
func (m *Manager) afterUnseal(ctx context.Context, under logical.Storage, snap *Snapshot) *Snapshot {
	// A node that must not write (a performance standby, a secondary) leaves
	// what was interrupted to the node that may, and hears of it through
	// invalidations or replication.
	writable := !m.host.ReadOnlyNode()
	if writable && snap.meta.MigrationPending {
		snap = m.migrateLocked(ctx, under, snap)
	}
	if writable && len(snap.sealer.Keyring().Versions()) > 1 {
		if _, err := m.finishRotationLocked(ctx, under, snap); err != nil {
			m.host.Logger().Error("finishing an interrupted root key rotation", "error", err)
		}
		snap = m.state.Load()
	}
	snap.sealer.SetManifestCacheBytes(m.host.Unsealed(ctx, snap.sealer.Wrap(under)))
	return snap
}

// migrateLocked encrypts the entries written before the first seal, the
// one time plaintext entries are adopted, then records that it is done.
// m.mu is held.
func (m *Manager) migrateLocked(ctx context.Context, under logical.Storage, snap *Snapshot) *Snapshot {
	n, err := snap.sealer.MigrateAll(ctx, under)
	if err != nil {
		m.host.Logger().Error("encrypting the entries stored before the seal (retried at the next unseal)", "error", err)
		return snap
	}
	meta := *snap.meta
	meta.MigrationPending = false
	if err := WriteMeta(ctx, snap.sealer.Wrap(under), &meta); err != nil {
		m.host.Logger().Error("recording the end of the first seal's migration", "error", err)
		return snap
	}
	next := *snap
	next.meta, next.migrated = &meta, n
	m.setState(&next)
	if n > 0 {
		m.host.Logger().Info("encrypted the entries stored before the seal", "entries", n)
	}
	return &next
}

// wake asks the background loop to look again.
func (m *Manager) wake() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// Start begins background unsealing over the storage from Initialize.
func (m *Manager) Start(storage logical.Storage) {
	m.mu.Lock()
	m.storage = storage
	m.mu.Unlock()
	m.under.Store(storage)
	m.done.Add(1)
	go m.loop()
	m.wake()
}

// loop unseals in the background: at start, and after each failed
// attempt's back-off, until unsealed or stopped.
func (m *Manager) loop() {
	defer m.done.Done()
	for {
		wait := time.Hour
		if snap := m.state.Load(); snap.phase == PhaseSealed && !snap.permanent {
			wait = time.Until(snap.nextTry)
		}
		timer := time.NewTimer(max(wait, 0))
		select {
		case <-m.stop:
			timer.Stop()
			return
		case <-m.kick:
			timer.Stop()
		case <-timer.C:
		}
		m.mu.Lock()
		storage := m.storage
		m.mu.Unlock()
		if storage == nil {
			continue
		}
		if _, err := m.tryUnseal(context.Background(), storage, false); err != nil {
			m.host.Logger().Warn("reading the seal configuration", "error", err)
		}
	}
}

// Invalidate takes in a change another node made to the seal's own entries
// (seal/config, the sealed seal state), as a performance standby or
// secondary sees it: an emergency seal seals this node's copy at once; any
// other change (a new root key version, KEK, token or mechanism, the end of
// an emergency seal, recovery) is read and unsealed again in the
// background, without a reload.
func (m *Manager) Invalidate(ctx context.Context, key string) {
	under, _ := m.under.Load().(logical.Storage)
	if under == nil {
		return
	}
	if key == ConfigPath {
		cfg, err := ReadConfig(ctx, under)
		if err == nil && cfg != nil && cfg.EmergencySealed {
			// Requests from now on find the mount sealed; the keyring
			// and token go below, under mu.
			m.setState(&Snapshot{phase: PhaseSealed, cfg: cfg, lastErr: ErrEmergencySealed, permanent: true})
		}
	}
	m.mu.Lock()
	if m.stopped {
		m.mu.Unlock()
		return
	}
	m.done.Add(1)
	m.reloads.Add(1)
	m.mu.Unlock()
	go func() {
		defer m.done.Done()
		defer m.reloads.Done()
		m.reload(under)
	}()
}

// reload brings the seal in memory in line with storage after an
// invalidation.
func (m *Manager) reload(under logical.Storage) {
	ctx := context.Background()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.stopped {
		return
	}
	cfg, err := ReadConfig(ctx, under)
	if err != nil {
		m.host.Logger().Warn("reading the seal configuration another node changed", "error", err)
		return
	}
	snap := m.state.Load()
	switch {
	case cfg == nil:
		// Gone on the active node (only a storage writer does that):
		// forget everything; the next request reads storage again.
		m.dropLocked(&Snapshot{phase: PhaseUnknown})
		return
	case cfg.EmergencySealed:
		m.sealLocked(cfg)
		m.host.Logger().Warn("emergency seal made on another node: root key, cached keys and the HSM session dropped from memory")
		return
	case snap.phase == PhaseUnsealed && sameSealedKeyring(snap.cfg, cfg):
		// Only the sealed state may have changed (recovery set up, the
		// anti-rollback flag, an emergency seal recorded there).
		meta, err := ReadMeta(ctx, snap.sealer.Wrap(under))
		if err != nil || meta == nil {
			m.host.Logger().Warn("reading the seal state another node changed", "error", err)
			return
		}
		if meta.EmergencySealed {
			m.sealLocked(cfg)
			return
		}
		next := *snap
		next.cfg, next.meta = cfg, meta
		m.setState(&next)
		return
	}
	// Another keyring, KEK, token or mechanism, or the end of an
	// emergency seal: unseal again from the HSM.
	m.host.Logger().Info("the seal configuration changed on another node: unsealing again", "root_key_version", cfg.RootKeyVersion)
	m.unsealLocked(ctx, under, cfg)
}

// dropLocked forgets the root keyring, the cached keys and the token, and
// stores next. m.mu is held.
func (m *Manager) dropLocked(next *Snapshot) {
	if snap := m.state.Load(); snap.sealer != nil {
		snap.sealer.Keyring().Wipe()
	}
	m.setState(next)
	m.stopAnchorLocked()
	m.adoptToken(nil)
	m.host.DropCachedKeys()
}

// sameSealedKeyring reports whether two configurations seal the same
// keyring the same way with the same token settings.
func sameSealedKeyring(a, b *Config) bool {
	if a == nil || b == nil {
		return false
	}
	ja, errA := json.Marshal(a)
	jb, errB := json.Marshal(b)
	return errA == nil && errB == nil && bytes.Equal(ja, jb)
}

// Close stops background work and forgets the root key and the token.
func (m *Manager) Close() {
	m.mu.Lock()
	if !m.stopped {
		m.stopped = true
		close(m.stop)
	}
	m.mu.Unlock()
	m.done.Wait()
	m.mu.Lock()
	defer m.mu.Unlock()
	m.stopAnchorLocked()
	m.adoptToken(nil)
	m.setState(&Snapshot{phase: PhaseUnknown})
}
