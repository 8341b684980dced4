package hsmtransit

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

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

const (
	// sealPrefix holds what is stored as it is: the seal configuration with
	// the HSM-sealed root keyring.
	sealPrefix     = "seal/"
	sealConfigPath = sealPrefix + "config"

	// Unseal retries back off from the first delay to the longest.
	unsealRetryFirst = time.Second
	unsealRetryMax   = 15 * time.Second
	// unsealWait bounds how long a request waits for an unseal under way.
	unsealWait = 5 * time.Second
)

// isPlainPath reports the storage paths the root key does not encrypt.
func isPlainPath(path string) bool { return strings.HasPrefix(path, sealPrefix) }

// sealConfig is the stored seal configuration, kept in plaintext: it is
// what unsealing needs before the root key is known. A storage writer can
// edit it, so nothing in it is trusted beyond that: the sealed keyring is
// authenticated by the KEK (the mount bound in its AAD), a changed library,
// token, PIN or label at worst fails to unseal, and everything that the
// unsealed mount acts on (the recovery public key, the emergency seal) lives
// in sealMeta, sealed under the root key.
type sealConfig struct {
	Library    string `json:"library"`
	TokenLabel string `json:"token_label,omitempty"`
	Slot       *uint  `json:"slot,omitempty"`
	PIN        string `json:"pin"`
	KeyLabel   string `json:"key_label"`
	// Mechanism is how the keyring is to be sealed (hsm.SealMechanism;
	// empty, as written by versions before mechanisms, is aes-gcm), and
	// HMACKeyLabel the HMAC key of aes-cbc-hmac (empty: the KEK's label
	// with -hmac appended).
	Mechanism    string `json:"mechanism,omitempty"`
	HMACKeyLabel string `json:"hmac_key_label,omitempty"`
	// CallTimeout bounds each HSM operation, in seconds (0: the default).
	CallTimeout int `json:"hsm_timeout,omitempty"`

	// SealedKeyring is the root keyring sealed inside the HSM with
	// SealedMechanism under the KEK labelled SealedWith (and for
	// aes-cbc-hmac the HMAC key SealedHMAC), the mount bound in the AAD.
	SealedKeyring   []byte `json:"sealed_keyring"`
	SealedWith      string `json:"sealed_with"`
	SealedMechanism string `json:"sealed_mechanism,omitempty"`
	SealedHMAC      string `json:"sealed_hmac,omitempty"`
	// RootKeyVersion is the active root key version, for status while
	// sealed.
	RootKeyVersion uint32 `json:"root_key_version"`

	// RecoveryKeyring is the recovery copy: the keyring encrypted to the
	// recovery public key, opened only by M of N shares. It stays here,
	// not in sealMeta, because it is what recovers a mount whose HSM is
	// lost, when nothing sealed can be read; it changes with the keyring in
	// one write. RecoveryThreshold is a hint for restore's message; the
	// shares themselves decide.
	RecoveryKeyring   []byte `json:"recovery_keyring,omitempty"`
	RecoveryThreshold int    `json:"recovery_threshold,omitempty"`

	// EmergencySealed keeps the mount sealed across restarts without
	// touching the HSM. Clearing it here changes nothing: sealMeta holds
	// the flag too, checked at every unseal.
	EmergencySealed bool `json:"emergency_sealed,omitempty"`

	// Written by versions that kept the recovery public key in plaintext;
	// moved into sealMeta once, when such a mount is first unsealed.
	LegacyRecoveryPublicKey []byte `json:"recovery_public_key,omitempty"`
	LegacyRecoveryShares    int    `json:"recovery_shares,omitempty"`
}

// sealMetaPath holds sealMeta, sealed under the root key (and so in the
// manifest, which refuses an older copy).
const sealMetaPath = "config/seal-state"

// sealMeta is the seal's state that only the unsealed mount reads.
type sealMeta struct {
	// RecoveryPublicKey receives every new recovery copy; a storage writer
	// who could change it would get the next root keyring.
	RecoveryPublicKey []byte `json:"recovery_public_key,omitempty"`
	RecoveryShares    int    `json:"recovery_shares,omitempty"`
	RecoveryThreshold int    `json:"recovery_threshold,omitempty"`
	// RecoveryMACKey authenticates every recovery copy, so that restore
	// can tell the mount's copy from one a storage writer made for the
	// public key. Copies of a recovery set made before it existed are not
	// authenticated (restore then checks them against every sealed entry).
	RecoveryMACKey  []byte `json:"recovery_mac_key,omitempty"`
	EmergencySealed bool   `json:"emergency_sealed,omitempty"`
	// AntiRollback records that the manifest's anchor is kept in the
	// token (for status and for a new HSM after recovery; the object in
	// the token is what turns the check on).
	AntiRollback bool `json:"anti_rollback,omitempty"`
	// MigrationPending is set at the first seal until every entry written
	// before it (a mount taken over from built-in transit) is encrypted:
	// the one time plaintext entries are adopted.
	MigrationPending bool `json:"migration_pending,omitempty"`
}

func readSealMeta(ctx context.Context, s logical.Storage) (*sealMeta, error) {
	e, err := s.Get(ctx, sealMetaPath)
	if err != nil {
		return nil, fmt.Errorf("reading the seal state: %w", err)
	}
	if e == nil {
		return nil, nil
	}
	var meta sealMeta
	if err := json.Unmarshal(e.Value, &meta); err != nil {
		return nil, fmt.Errorf("decoding the seal state: %w", err)
	}
	return &meta, nil
}

func writeSealMeta(ctx context.Context, s logical.Storage, meta *sealMeta) error {
	b, err := json.Marshal(meta)
	if err != nil {
		return err
	}
	return s.Put(ctx, &logical.StorageEntry{Key: sealMetaPath, Value: b, SealWrap: true})
}

// pinSource tells how the PIN is given, for status without the PIN.
func (c *sealConfig) pinSource() string {
	switch {
	case strings.HasPrefix(c.PIN, "env://"):
		return "env"
	case strings.HasPrefix(c.PIN, "file://"):
		return "file"
	}
	return "value"
}

// hsmConfig is the token configuration of a seal configuration.
func (c *sealConfig) hsmConfig() (hsm.Config, error) {
	pin, err := resolvePIN(c.PIN)
	if err != nil {
		return hsm.Config{}, err
	}
	return hsm.Config{Library: c.Library, TokenLabel: c.TokenLabel, Slot: c.Slot, PIN: pin,
		CallTimeout: time.Duration(c.CallTimeout) * time.Second}, nil
}

// callTimeout is the deadline of the configuration's HSM operations.
func callTimeout(c *sealConfig) time.Duration {
	if c.CallTimeout > 0 {
		return time.Duration(c.CallTimeout) * time.Second
	}
	return hsm.DefaultCallTimeout
}

// configuredKeys are the keys the configuration names, to seal with.
func (c *sealConfig) configuredKeys() hsm.SealKeys {
	k := hsm.SealKeys{Mechanism: hsm.SealMechanism(c.Mechanism), Label: c.KeyLabel}
	if k.Mechanism == "" {
		k.Mechanism = hsm.AESGCM
	}
	if k.Mechanism == hsm.AESCBCHMAC {
		k.HMACLabel = c.HMACKeyLabel
		if k.HMACLabel == "" {
			k.HMACLabel = hsm.DefaultHMACLabel(c.KeyLabel)
		}
	}
	return k
}

// sealedKeys are the keys the stored keyring is sealed with.
func (c *sealConfig) sealedKeys() hsm.SealKeys {
	k := hsm.SealKeys{Mechanism: hsm.SealMechanism(c.SealedMechanism), Label: c.SealedWith, HMACLabel: c.SealedHMAC}
	if k.Mechanism == "" {
		k.Mechanism = hsm.AESGCM
	}
	return k
}

// sealPhase is where a mount's seal stands.
type sealPhase int

const (
	phaseUnknown      sealPhase = iota // config not read yet
	phaseUnconfigured                  // no config/seal: nothing works yet
	phaseSealed                        // configured, root key not in memory
	phaseUnsealed                      // root key in memory: keys work
)

// sealSnapshot is an immutable view of the seal's state, read without locks
// on every request.
type sealSnapshot struct {
	phase sealPhase
	cfg   *sealConfig
	// meta and sealer are set when unsealed.
	meta   *sealMeta
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

// sealManager owns one mount's seal: its configuration, its token and its
// root keyring in memory.
type sealManager struct {
	b *backend
	// mountID is the mount's UUID; aad binds the sealed keyring to it.
	mountID string
	aad     []byte

	state atomic.Pointer[sealSnapshot]

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
}

func newSealManager(b *backend, mountUUID string) *sealManager {
	m := &sealManager{
		b:       b,
		mountID: mountUUID,
		aad:     []byte("hsm-transit/root-keyring\x00" + mountUUID),
		mu:      newChanMutex(),
		changed: make(chan struct{}),
		stop:    make(chan struct{}),
		kick:    make(chan struct{}, 1),
	}
	m.setState(&sealSnapshot{phase: phaseUnknown})
	return m
}

// setState moves to snap and wakes whoever waits for a change.
func (m *sealManager) setState(snap *sealSnapshot) {
	m.state.Store(snap)
	m.changedMu.Lock()
	close(m.changed)
	m.changed = make(chan struct{})
	m.changedMu.Unlock()
}

// stateChanged is closed at the next change of state.
func (m *sealManager) stateChanged() <-chan struct{} {
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

// errNotConfigured answers key and crypto paths before config/seal.
var errNotConfigured = errors.New("this mount is not sealed by an HSM yet: write config/seal (library, token_label or slot, pin, key_label) first")

// sealUnavailable is the 503 of a mount that cannot unseal now.
func sealUnavailable(snap *sealSnapshot) error {
	if errors.Is(snap.lastErr, errEmergencySealed) {
		return logical.CodedError(http.StatusServiceUnavailable, snap.lastErr.Error())
	}
	msg := "the mount's root key is sealed and the HSM cannot unseal it now"
	if snap.lastErr != nil {
		msg += ": " + snap.lastErr.Error()
	}
	switch {
	case errors.Is(snap.lastErr, errStorageNotSealed):
		msg += "; the mount's storage was changed outside the plugin (see seal/status), and the mount stays sealed while it does not check out"
	case snap.permanent:
		msg += "; fix config/seal to unseal"
	default:
		msg += "; the mount unseals by itself when the HSM is back"
	}
	return logical.CodedError(http.StatusServiceUnavailable, msg)
}

// view returns req's storage seen through the seal, unsealing first if
// need be. The error is a 400 naming config/seal when there is no seal
// yet, and a 503 when the HSM cannot unseal the root key now.
func (m *sealManager) view(ctx context.Context, under logical.Storage) (logical.Storage, error) {
	if snap := m.state.Load(); snap.phase == phaseUnsealed {
		return snap.sealer.Wrap(under), nil
	}
	snap, err := m.tryUnseal(ctx, under, false)
	if err != nil {
		return nil, err
	}
	switch snap.phase {
	case phaseUnsealed:
		return snap.sealer.Wrap(under), nil
	case phaseUnconfigured:
		return nil, logical.CodedError(http.StatusBadRequest, errNotConfigured.Error())
	}
	return nil, sealUnavailable(snap)
}

// tryUnseal reads the configuration if needed and tries to unseal, unless
// an attempt is under way, backing off, or pointless until the
// configuration changes (force skips the back-off).
func (m *sealManager) tryUnseal(ctx context.Context, under logical.Storage, force bool) (*sealSnapshot, error) {
	// Another request or the background loop may be at it: wait a while
	// for its outcome rather than answer 503 meanwhile, but not forever,
	// in case the HSM hangs.
	deadline := time.NewTimer(unsealWait)
	defer deadline.Stop()
	for locked := m.mu.TryLock(); !locked; {
		changed := m.stateChanged()
		if snap := m.state.Load(); snap.phase == phaseUnsealed {
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
	if snap.phase == phaseUnknown {
		cfg, err := readSealConfig(ctx, under)
		if err != nil {
			return nil, err
		}
		switch {
		case cfg == nil:
			snap = &sealSnapshot{phase: phaseUnconfigured}
		case cfg.EmergencySealed:
			snap = &sealSnapshot{phase: phaseSealed, cfg: cfg, lastErr: errEmergencySealed, permanent: true}
		default:
			snap = &sealSnapshot{phase: phaseSealed, cfg: cfg}
		}
		m.setState(snap)
	}
	if snap.phase != phaseSealed || snap.permanent || (!force && time.Now().Before(snap.nextTry)) {
		return snap, nil
	}
	return m.unsealLocked(ctx, under, snap.cfg), nil
}

// unsealLocked opens the root keyring with the HSM and moves to unsealed,
// or records why it cannot. m.mu is held.
func (m *sealManager) unsealLocked(ctx context.Context, under logical.Storage, cfg *sealConfig) *sealSnapshot {
	prev := m.state.Load()
	snap, err := m.openMount(ctx, under, cfg)
	if err != nil {
		snap = &sealSnapshot{phase: phaseSealed, cfg: cfg, lastErr: err}
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
		m.b.Logger().Warn("cannot unseal the mount's root key", "error", err, "retry_in", snap.backoff.String())
		m.setState(snap)
		return snap
	}
	m.setState(snap)
	if snap.phase != phaseUnsealed {
		m.b.Logger().Warn("the mount stays sealed", "reason", snap.lastErr)
		return snap
	}
	m.b.Logger().Info("unsealed the mount's root key", "token", m.token.Describe(), "key_label", cfg.SealedWith, "root_key_version", snap.sealer.Keyring().Active())
	return m.afterUnseal(ctx, under, snap)
}

// openMount unseals the stored keyring with the configured token and checks
// storage against it. On success the token becomes the mount's. m.mu is
// held.
func (m *sealManager) openMount(ctx context.Context, under logical.Storage, cfg *sealConfig) (*sealSnapshot, error) {
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
		return &sealSnapshot{phase: phaseSealed, cfg: o.cfg, lastErr: errEmergencySealed, permanent: true}, nil
	}
	m.adoptToken(tok)
	return o.snapshot(), nil
}

// unsealWith opens cfg's sealed keyring with tok.
func (m *sealManager) unsealWith(tok *hsm.Token, cfg *sealConfig) (*seal.Keyring, error) {
	keys := cfg.sealedKeys()
	for _, l := range keys.Labels() {
		if strings.HasPrefix(l, hsmNamespace) {
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

// errStorageNotSealed is what storage that the keyring does not vouch for
// is: edited, replayed or planted outside the plugin.
var errStorageNotSealed = errors.New("the mount's storage does not check out against its root keyring")

// openedMount is a keyring checked against storage, with what storage holds
// sealed for the seal.
type openedMount struct {
	cfg    *sealConfig
	meta   *sealMeta
	sealer *seal.Sealer
}

func (o *openedMount) snapshot() *sealSnapshot {
	return &sealSnapshot{phase: phaseUnsealed, cfg: o.cfg, meta: o.meta, sealer: o.sealer}
}

// checkStorage builds the sealer over ring and checks the mount's storage
// against it: the manifest of entries must open under the keyring, and the
// sealed seal state with it. A mount sealed by an older version, which had
// no manifest, is upgraded here (cfg.SealedWith names the KEK in tok that
// seals the upgraded keyring). m.mu is held.
func (m *sealManager) checkStorage(ctx context.Context, under logical.Storage, tok *hsm.Token, cfg *sealConfig, ring *seal.Keyring) (*openedMount, error) {
	sealer := seal.NewSealer(ring, isPlainPath)
	if !ring.Manifested() {
		// An anchor in the token means this mount had a manifest: the
		// configuration is one from before the upgrade, put back to go
		// round the anchor's check.
		if _, found, err := tok.ReadData(m.antiRollbackLabel()); err != nil {
			return nil, err
		} else if found {
			return nil, fmt.Errorf("%w: the stored configuration predates the manifest, but the token holds this mount's anti-rollback anchor: an older configuration was put back; refused", errStorageNotSealed)
		}
		return m.upgradeLocked(ctx, under, tok, cfg, sealer)
	}
	if err := sealer.LoadManifest(ctx, under); err != nil {
		return nil, fmt.Errorf("%w: %w", errStorageNotSealed, err)
	}
	if err := m.checkAnchor(tok, sealer); err != nil {
		return nil, err
	}
	meta, err := readSealMeta(ctx, sealer.Wrap(under))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errStorageNotSealed, err)
	}
	if meta == nil {
		return nil, fmt.Errorf("%w: the sealed seal state (%s) is missing", errStorageNotSealed, sealMetaPath)
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
func (m *sealManager) upgradeLocked(ctx context.Context, under logical.Storage, tok *hsm.Token, cfg *sealConfig, sealer *seal.Sealer) (*openedMount, error) {
	meta, err := m.upgradeManifestLocked(ctx, under, cfg, sealer)
	if err != nil {
		return nil, err
	}
	ring := sealer.Keyring().WithManifest()
	sealer.SetKeyring(ring)
	next := *cfg
	next.LegacyRecoveryPublicKey, next.LegacyRecoveryShares = nil, 0
	if err := m.setKeyring(&next, tok, cfg.sealedKeys(), ring, meta); err != nil {
		return nil, err
	}
	if err := writeSealConfig(ctx, under, &next); err != nil {
		return nil, err
	}
	// Entries of the older format all have generation 0, so that a replay
	// among their copies would pass: give each a generation now. One that
	// fails stays readable, and the next root key rotation does it.
	n, err := sealer.ResealAll(ctx, under)
	m.b.Logger().Info("upgraded the mount's seal: its entries are now bound to a sealed manifest", "entries_resealed", n, "error", err)
	return &openedMount{cfg: &next, meta: meta, sealer: sealer}, nil
}

// upgradeManifestLocked gives an upgrading mount its manifest and sealed
// state. When both already open under the keyring, an earlier upgrade got
// that far (and crashed before storing the configuration), or the stored
// configuration is an older one replayed: either way they are kept as they
// are, and nothing of the plaintext configuration is taken over. m.mu is
// held.
func (m *sealManager) upgradeManifestLocked(ctx context.Context, under logical.Storage, cfg *sealConfig, sealer *seal.Sealer) (*sealMeta, error) {
	if err := sealer.LoadManifest(ctx, under); err == nil {
		meta, err := readSealMeta(ctx, sealer.Wrap(under))
		if err != nil {
			return nil, fmt.Errorf("%w: %w", errStorageNotSealed, err)
		}
		if meta != nil {
			return meta, nil
		}
	} else if !errors.Is(err, seal.ErrNoManifest) {
		return nil, fmt.Errorf("%w: %w", errStorageNotSealed, err)
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
		m.b.Logger().Warn("recovery was set up by an older version that kept its public key in plaintext; it is not carried over: run seal/recovery/init again")
	}
	meta := &sealMeta{EmergencySealed: cfg.EmergencySealed}
	if err := writeSealMeta(ctx, sealer.Wrap(under), meta); err != nil {
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
		case found != "" || isPlainPath(key):
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
		return fmt.Errorf("%w: the stored configuration predates the manifest, but %s was written under one: an older configuration was put back and the manifest removed; refusing to upgrade again", errStorageNotSealed, found)
	}
	return nil
}

// setKeyring puts ring in cfg: sealed with keys in tok, and in the
// recovery copy when meta has a recovery public key (otherwise any copy in
// cfg is dropped).
func (m *sealManager) setKeyring(cfg *sealConfig, tok *hsm.Token, keys hsm.SealKeys, ring *seal.Keyring, meta *sealMeta) error {
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
func (m *sealManager) recoveryInfo() []byte {
	return []byte("hsm-transit/recovery\x00" + m.mountID)
}

// openToken opens the token cfg names. The caller adopts it or closes it.
func (m *sealManager) openToken(cfg *sealConfig) (*hsm.Token, error) {
	hc, err := cfg.hsmConfig()
	if err != nil {
		return nil, &hsm.Error{Kind: hsm.Configuration, Op: "resolve PIN", Err: err}
	}
	return hsm.Open(hc)
}

// adoptToken makes tok (possibly nil) the mount's token, releasing the
// previous one. m.mu is held.
func (m *sealManager) adoptToken(tok *hsm.Token) {
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

// tokenMechanisms returns what the mount's current token offers, asking it
// the first time only; nil when there is no token or it does not answer.
func (m *sealManager) tokenMechanisms() *hsm.MechanismSupport {
	tok := m.currentToken()
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

// currentToken returns the mount's token without waiting on transitions;
// nil before the mount was unsealed.
func (m *sealManager) currentToken() *hsm.Token { return m.current.Load() }

// afterUnseal finishes what a crash may have interrupted (the first seal's
// migration, a root key rotation) and loads what lives in sealed storage.
// It returns the snapshot now current. m.mu is held.
func (m *sealManager) afterUnseal(ctx context.Context, under logical.Storage, snap *sealSnapshot) *sealSnapshot {
	// A performance standby cannot write: the active node finishes what
	// was interrupted, and this node hears of it through invalidations.
	writable := !m.b.readOnlyNode()
	if writable && snap.meta.MigrationPending {
		snap = m.migrateLocked(ctx, under, snap)
	}
	if writable && len(snap.sealer.Keyring().Versions()) > 1 {
		if _, err := m.finishRotationLocked(ctx, under, snap); err != nil {
			m.b.Logger().Error("finishing an interrupted root key rotation", "error", err)
		}
		snap = m.state.Load()
	}
	if err := m.b.loadCacheSize(ctx, snap.sealer.Wrap(under)); err != nil {
		m.b.Logger().Warn("reading cache-config", "error", err)
	}
	snap.sealer.SetManifestCacheBytes(manifestCacheBytes(m.b.cacheSize()))
	return snap
}

// migrateLocked encrypts the entries written before the first seal, the
// one time plaintext entries are adopted, then records that it is done.
// m.mu is held.
func (m *sealManager) migrateLocked(ctx context.Context, under logical.Storage, snap *sealSnapshot) *sealSnapshot {
	n, err := snap.sealer.MigrateAll(ctx, under)
	if err != nil {
		m.b.Logger().Error("encrypting the entries stored before the seal (retried at the next unseal)", "error", err)
		return snap
	}
	meta := *snap.meta
	meta.MigrationPending = false
	if err := writeSealMeta(ctx, snap.sealer.Wrap(under), &meta); err != nil {
		m.b.Logger().Error("recording the end of the first seal's migration", "error", err)
		return snap
	}
	next := *snap
	next.meta, next.migrated = &meta, n
	m.setState(&next)
	if n > 0 {
		m.b.Logger().Info("encrypted the entries stored before the seal", "entries", n)
	}
	return &next
}

// wake asks the background loop to look again.
func (m *sealManager) wake() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// start begins background unsealing over the storage from Initialize.
func (m *sealManager) start(storage logical.Storage) {
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
func (m *sealManager) loop() {
	defer m.done.Done()
	for {
		wait := time.Hour
		if snap := m.state.Load(); snap.phase == phaseSealed && !snap.permanent {
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
			m.b.Logger().Warn("reading the seal configuration", "error", err)
		}
	}
}

// invalidate takes in a change another node made to the seal's own entries
// (seal/config, the sealed seal state), as a performance standby or
// secondary sees it: an emergency seal seals this node's copy at once; any
// other change (a new root key version, KEK, token or mechanism, the end of
// an emergency seal, recovery) is read and unsealed again in the
// background, without a reload.
func (m *sealManager) invalidate(ctx context.Context, key string) {
	under, _ := m.under.Load().(logical.Storage)
	if under == nil {
		return
	}
	if key == sealConfigPath {
		cfg, err := readSealConfig(ctx, under)
		if err == nil && cfg != nil && cfg.EmergencySealed {
			// Requests from now on find the mount sealed; the keyring
			// and token go below, under mu.
			m.setState(&sealSnapshot{phase: phaseSealed, cfg: cfg, lastErr: errEmergencySealed, permanent: true})
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
func (m *sealManager) reload(under logical.Storage) {
	ctx := context.Background()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.stopped {
		return
	}
	cfg, err := readSealConfig(ctx, under)
	if err != nil {
		m.b.Logger().Warn("reading the seal configuration another node changed", "error", err)
		return
	}
	snap := m.state.Load()
	switch {
	case cfg == nil:
		// Gone on the active node (only a storage writer does that):
		// forget everything; the next request reads storage again.
		m.dropLocked(&sealSnapshot{phase: phaseUnknown})
		return
	case cfg.EmergencySealed:
		m.sealLocked(cfg)
		m.b.Logger().Warn("emergency seal made on another node: root key, cached keys and the HSM session dropped from memory")
		return
	case snap.phase == phaseUnsealed && sameSealedKeyring(snap.cfg, cfg):
		// Only the sealed state may have changed (recovery set up, the
		// anti-rollback flag, an emergency seal recorded there).
		meta, err := readSealMeta(ctx, snap.sealer.Wrap(under))
		if err != nil || meta == nil {
			m.b.Logger().Warn("reading the seal state another node changed", "error", err)
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
	m.b.Logger().Info("the seal configuration changed on another node: unsealing again", "root_key_version", cfg.RootKeyVersion)
	m.unsealLocked(ctx, under, cfg)
}

// dropLocked forgets the root keyring, the cached keys and the token, and
// stores next. m.mu is held.
func (m *sealManager) dropLocked(next *sealSnapshot) {
	if snap := m.state.Load(); snap.sealer != nil {
		snap.sealer.Keyring().Wipe()
	}
	m.setState(next)
	m.stopAnchorLocked()
	m.adoptToken(nil)
	m.b.dropCachedKeys()
}

// sameSealedKeyring reports whether two configurations seal the same
// keyring the same way with the same token settings.
func sameSealedKeyring(a, b *sealConfig) bool {
	if a == nil || b == nil {
		return false
	}
	ja, errA := json.Marshal(a)
	jb, errB := json.Marshal(b)
	return errA == nil && errB == nil && bytes.Equal(ja, jb)
}

// close stops background work and forgets the root key and the token.
func (m *sealManager) close() {
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
	m.setState(&sealSnapshot{phase: phaseUnknown})
}

// readSealConfig returns the stored seal configuration, nil when none.
func readSealConfig(ctx context.Context, s logical.Storage) (*sealConfig, error) {
	e, err := s.Get(ctx, sealConfigPath)
	if err != nil {
		return nil, fmt.Errorf("reading the seal configuration: %w", err)
	}
	if e == nil {
		return nil, nil
	}
	var cfg sealConfig
	if err := json.Unmarshal(e.Value, &cfg); err != nil {
		return nil, fmt.Errorf("decoding the seal configuration: %w", err)
	}
	return &cfg, nil
}

// writeSealConfig stores the configuration in one Put, so that the sealed
// keyring and the label that sealed it change together.
func writeSealConfig(ctx context.Context, s logical.Storage, cfg *sealConfig) error {
	b, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	return s.Put(ctx, &logical.StorageEntry{Key: sealConfigPath, Value: b, SealWrap: true})
}

// gate makes a path operation run on sealed storage: the handler sees the
// mount's storage through the seal, or the caller gets the 400 or 503 that
// says why it cannot.
func (b *backend) gate(f framework.OperationFunc) framework.OperationFunc {
	return func(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
		s, err := b.seal.view(ctx, req.Storage)
		if err != nil {
			return nil, err
		}
		sealed := *req
		sealed.Storage = s
		return f(ctx, &sealed, d)
	}
}

// gateExistence runs an existence check on sealed storage. While the mount
// cannot unseal, it reports the object as existing, so that the request
// goes to the (gated) update handler and gets the seal's answer, whatever
// the caller's create capability.
func (b *backend) gateExistence(f framework.ExistenceFunc) framework.ExistenceFunc {
	return func(ctx context.Context, req *logical.Request, d *framework.FieldData) (bool, error) {
		s, err := b.seal.view(ctx, req.Storage)
		if err != nil {
			return true, nil
		}
		if n, ok := d.GetOk("name"); ok && strings.Contains(fmt.Sprint(n), "..") {
			// Storage refuses such a path, and Vault would answer the
			// check's error as a bare 500; the handler answers 400.
			return true, nil
		}
		sealed := *req
		sealed.Storage = s
		exists, err := f(ctx, &sealed, d)
		if errors.Is(err, seal.ErrEntryRefused) {
			// Vault hides an existence check's error behind "internal
			// error"; the handler meets the same refused entry and says
			// what it is. Only a refusal, which no retry changes, is
			// passed on: a transient error here must not turn a create
			// into an update for ACL purposes.
			return true, nil
		}
		return exists, err
	}
}

// gatePaths wraps every operation and existence check of paths so that
// they are refused until the root key is unsealed.
func (b *backend) gatePaths(paths []*framework.Path) []*framework.Path {
	for _, p := range paths {
		for _, op := range p.Operations {
			if po, ok := op.(*framework.PathOperation); ok {
				po.Callback = b.gate(po.Callback)
			}
		}
		if p.ExistenceCheck != nil {
			p.ExistenceCheck = b.gateExistence(p.ExistenceCheck)
		}
	}
	return paths
}
