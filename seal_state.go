package hsmtransit

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
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

// sealConfig is the stored seal configuration. Everything in it is
// non-secret except a literal PIN (env:// and file:// references keep the
// PIN out of storage); the keyring is sealed by the KEK.
type sealConfig struct {
	Library    string `json:"library"`
	TokenLabel string `json:"token_label,omitempty"`
	Slot       *uint  `json:"slot,omitempty"`
	PIN        string `json:"pin"`
	KeyLabel   string `json:"key_label"`
	// SealedKeyring is the root keyring sealed inside the HSM with
	// CKM_AES_GCM under the KEK labelled SealedWith, the mount bound in the
	// AAD.
	SealedKeyring []byte `json:"sealed_keyring"`
	SealedWith    string `json:"sealed_with"`
	// RootKeyVersion is the active root key version, for status.
	RootKeyVersion uint32 `json:"root_key_version"`

	// The recovery copy: the same keyring encrypted to a public key whose
	// private half only M of N shares rebuild. Kept in this entry so that
	// it changes with the keyring in one write.
	RecoveryPublicKey []byte `json:"recovery_public_key,omitempty"`
	RecoveryKeyring   []byte `json:"recovery_keyring,omitempty"`
	RecoveryShares    int    `json:"recovery_shares,omitempty"`
	RecoveryThreshold int    `json:"recovery_threshold,omitempty"`

	// EmergencySealed holds the mount sealed, across restarts, until
	// seal/unseal.
	EmergencySealed bool `json:"emergency_sealed,omitempty"`
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

// resolvePIN returns the PIN a configuration names.
func resolvePIN(ref string) (string, error) {
	switch {
	case strings.HasPrefix(ref, "env://"):
		name := strings.TrimPrefix(ref, "env://")
		pin := os.Getenv(name)
		if pin == "" {
			return "", fmt.Errorf("the PIN's environment variable %s is not set in the plugin's environment (vault plugin register -env %s=...)", name, name)
		}
		return pin, nil
	case strings.HasPrefix(ref, "file://"):
		path := strings.TrimPrefix(ref, "file://")
		b, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("reading the PIN file %s: %w", path, err)
		}
		pin := strings.TrimRight(string(b), "\r\n")
		if pin == "" {
			return "", fmt.Errorf("the PIN file %s is empty", path)
		}
		return pin, nil
	}
	return ref, nil
}

// hsmConfig is the token configuration of a seal configuration.
func (c *sealConfig) hsmConfig() (hsm.Config, error) {
	pin, err := resolvePIN(c.PIN)
	if err != nil {
		return hsm.Config{}, err
	}
	return hsm.Config{Library: c.Library, TokenLabel: c.TokenLabel, Slot: c.Slot, PIN: pin}, nil
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
	phase  sealPhase
	cfg    *sealConfig
	sealer *seal.Sealer
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

	// mu serialises transitions: configure, unseal, rotate, close.
	mu    sync.Mutex
	token *hsm.Token
	// current mirrors token for readers that must not wait on mu.
	current atomic.Pointer[hsm.Token]
	// storage is the mount's storage from Initialize, for background
	// unsealing.
	storage logical.Storage
	// stop ends the background work at Clean.
	stop    chan struct{}
	stopped bool
	kick    chan struct{}
	done    sync.WaitGroup
}

func newSealManager(b *backend, mountUUID string) *sealManager {
	m := &sealManager{
		b:       b,
		mountID: mountUUID,
		aad:     []byte("hsm-transit/root-keyring\x00" + mountUUID),
		stop:    make(chan struct{}),
		kick:    make(chan struct{}, 1),
	}
	m.state.Store(&sealSnapshot{phase: phaseUnknown})
	return m
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
	if snap.permanent {
		msg += "; fix config/seal to unseal"
	} else {
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
	deadline := time.Now().Add(unsealWait)
	for !m.mu.TryLock() {
		snap := m.state.Load()
		if snap.phase == phaseUnsealed || time.Now().After(deadline) {
			return snap, nil
		}
		select {
		case <-ctx.Done():
			return m.state.Load(), nil
		case <-time.After(10 * time.Millisecond):
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
		m.state.Store(snap)
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
	ring, err := m.openKeyring(cfg)
	if err != nil {
		snap := &sealSnapshot{phase: phaseSealed, cfg: cfg, lastErr: err}
		switch hsm.KindOf(err) {
		case hsm.Credentials, hsm.Failed, hsm.Configuration:
			snap.permanent = true
		default:
			snap.backoff = min(max(2*prev.backoff, unsealRetryFirst), unsealRetryMax)
			snap.nextTry = time.Now().Add(snap.backoff)
			m.wake()
		}
		m.b.Logger().Warn("cannot unseal the mount's root key", "error", err, "retry_in", snap.backoff.String())
		m.state.Store(snap)
		return snap
	}
	snap := &sealSnapshot{phase: phaseUnsealed, cfg: cfg, sealer: seal.NewSealer(ring, isPlainPath)}
	m.state.Store(snap)
	m.b.Logger().Info("unsealed the mount's root key", "token", m.token.Describe(), "key_label", cfg.SealedWith, "root_key_version", ring.Active())
	m.afterUnseal(ctx, under, snap)
	return snap
}

// openKeyring unseals the stored keyring with the configured token, which
// becomes the mount's token on success. m.mu is held.
func (m *sealManager) openKeyring(cfg *sealConfig) (*seal.Keyring, error) {
	tok, err := m.openToken(cfg)
	if err != nil {
		return nil, err
	}
	ring, err := m.unsealWith(tok, cfg)
	if err != nil {
		tok.Close()
		return nil, err
	}
	m.adoptToken(tok)
	return ring, nil
}

// unsealWith opens cfg's sealed keyring with tok.
func (m *sealManager) unsealWith(tok *hsm.Token, cfg *sealConfig) (*seal.Keyring, error) {
	raw, err := tok.DecryptGCM(cfg.SealedWith, cfg.SealedKeyring, m.aad)
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

// setKeyring puts ring in cfg: sealed under tok's KEK label, and in the
// recovery copy when recovery is set up.
func (m *sealManager) setKeyring(cfg *sealConfig, tok *hsm.Token, label string, ring *seal.Keyring) error {
	raw, err := ring.Marshal()
	if err != nil {
		return err
	}
	defer clear(raw)
	sealed, err := tok.EncryptGCM(label, raw, m.aad)
	if err != nil {
		return err
	}
	if cfg.RecoveryPublicKey != nil {
		if cfg.RecoveryKeyring, err = seal.SealForRecovery(cfg.RecoveryPublicKey, m.recoveryInfo(), ring); err != nil {
			return fmt.Errorf("updating the recovery copy: %w", err)
		}
	}
	cfg.SealedKeyring, cfg.SealedWith, cfg.RootKeyVersion = sealed, label, ring.Active()
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

// currentToken returns the mount's token without waiting on transitions;
// nil before the mount was unsealed.
func (m *sealManager) currentToken() *hsm.Token { return m.current.Load() }

// afterUnseal finishes what a crash may have interrupted (a root key
// rotation) and loads what lives in sealed storage.
func (m *sealManager) afterUnseal(ctx context.Context, under logical.Storage, snap *sealSnapshot) {
	if len(snap.sealer.Keyring().Versions()) > 1 {
		if _, err := m.finishRotationLocked(ctx, under, snap); err != nil {
			m.b.Logger().Error("finishing an interrupted root key rotation", "error", err)
		}
	}
	if err := m.b.loadCacheSize(ctx, snap.sealer.Wrap(under)); err != nil {
		m.b.Logger().Warn("reading cache-config", "error", err)
	}
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
	m.adoptToken(nil)
	m.state.Store(&sealSnapshot{phase: phaseUnknown})
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
		sealed := *req
		sealed.Storage = s
		return f(ctx, &sealed, d)
	}
}

// gatePaths wraps every operation of every path but the seal's own, and
// hash and random, which use no key.
func (b *backend) gatePaths(paths []*framework.Path) []*framework.Path {
	for _, p := range paths {
		if strings.HasPrefix(p.Pattern, "config/seal") || strings.HasPrefix(p.Pattern, "seal/") ||
			strings.HasPrefix(p.Pattern, "hash") || strings.HasPrefix(p.Pattern, "random") {
			continue
		}
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
