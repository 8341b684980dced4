package mountseal

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// RecoverySet is what RecoveryInit made.
type RecoverySet struct {
	// Shares are the recovery shares, given out this once.
	Shares    []string
	Threshold int
}

// RecoveryInit sets up M-of-N recovery of the root keyring: it makes the
// shares and the recovery copy; earlier shares stop working.
func (m *Manager) RecoveryInit(ctx context.Context, s logical.Storage, shares, threshold int) (*RecoverySet, error) {
	if _, err := m.View(ctx, s); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	snap := m.state.Load()
	if snap.phase != PhaseUnsealed {
		return nil, sealUnavailable(snap)
	}
	public, macKey, made, err := seal.NewAuthenticatedRecovery(shares, threshold)
	if err != nil {
		return nil, asCaller(err)
	}
	meta := *snap.meta
	meta.RecoveryPublicKey, meta.RecoveryMACKey = public, macKey
	meta.RecoveryShares, meta.RecoveryThreshold = len(made), threshold
	cfg := *snap.cfg
	if cfg.RecoveryKeyring, err = seal.SealForRecoveryWithMAC(public, macKey, m.recoveryInfo(), snap.sealer.Keyring()); err != nil {
		return nil, err
	}
	cfg.RecoveryThreshold = meta.RecoveryThreshold
	// The public key is sealed first: a crash before the copy is stored
	// leaves shares nobody received, and the next keyring write makes the
	// copy for the public key that is sealed, never for one in plaintext.
	if err := WriteMeta(ctx, snap.sealer.Wrap(s), &meta); err != nil {
		return nil, err
	}
	if err := WriteConfig(ctx, s, &cfg); err != nil {
		return nil, err
	}
	next := *snap
	next.cfg, next.meta = &cfg, &meta
	m.setState(&next)
	m.host.Logger().Warn("recovery shares made; earlier shares, if any, no longer work", "shares", len(made), "threshold", meta.RecoveryThreshold)
	return &RecoverySet{Shares: made, Threshold: meta.RecoveryThreshold}, nil
}

// RestoreRequest is a write of seal/recovery/restore.
type RestoreRequest struct {
	// Shares are at least threshold recovery shares.
	Shares []string
	// LegacyCopy accepts a recovery copy that is not authenticated.
	LegacyCopy bool
	// Merge makes the new seal settings from the stored ones; its error
	// is the caller's.
	Merge func(cur *Config) (*Config, error)
	// GenerateKey and AntiRollback are as for Configure.
	GenerateKey  bool
	AntiRollback *bool
}

// Restored is what Restore did.
type Restored struct {
	// Config is the configuration stored now.
	Config *Config
	// View is the mount's storage seen through the restored seal.
	View logical.Storage
}

// Restore opens the recovery copy with the shares, checks that the keyring
// it holds is this mount's, seals it with the new HSM settings and unseals.
// Nothing changes unless all of that works, and nothing is done for a mount
// whose HSM still opens its keyring.
func (m *Manager) Restore(ctx context.Context, s logical.Storage, req RestoreRequest) (*Restored, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	cur, err := ReadConfig(ctx, s)
	if err != nil {
		return nil, err
	}
	if cur == nil || cur.RecoveryKeyring == nil {
		return nil, callerErr("recovery is not set up for this mount: seal/recovery/init makes the shares")
	}
	if err := m.checkCannotUnseal(cur); err != nil {
		return nil, asCaller(err)
	}
	if len(req.Shares) < cur.RecoveryThreshold {
		return nil, callerErr("%d shares given; %d are needed", len(req.Shares), cur.RecoveryThreshold)
	}
	ring, authenticated, err := seal.OpenRecovery(req.Shares, m.recoveryInfo(), cur.RecoveryKeyring)
	if err != nil {
		return nil, asCaller(err)
	}
	if !authenticated && !req.LegacyCopy {
		// Anyone who knows the public key can make such a copy, and a
		// storage writer who also moves the mount's entries aside leaves
		// no canary to tell theirs from the mount's.
		ring.Wipe()
		return nil, callerErr("the recovery copy is not authenticated (made by an older version, or planted by whoever can write storage): nothing was changed; if the shares are from a recovery set made before copies were authenticated and storage is known to be intact, restore with legacy_copy=true")
	}
	adopted := false
	defer func() {
		if !adopted {
			ring.Wipe()
		}
	}()
	// The canary: a copy that a storage writer planted (encrypted to the
	// recovery public key, which is no secret) holds a keyring of theirs,
	// which does not open what this mount sealed.
	if err := checkRecoveredKeyring(ctx, s, ring, authenticated); err != nil {
		return nil, asCaller(err)
	}
	next, err := req.Merge(cur)
	if err != nil {
		return nil, asCaller(err)
	}
	next.EmergencySealed = false
	// An older mount is upgraded under the new KEK.
	tok, err := m.openToken(next)
	if err != nil {
		return nil, classify(err)
	}
	defer func() {
		if !adopted {
			tok.Close()
		}
	}()
	if next.Mechanism == "" && cur != nil {
		next.Mechanism = string(cur.SealedKeys().Mechanism)
	}
	if err := m.resolveMechanism(tok, next); err != nil {
		return nil, classify(err)
	}
	if err := m.ensureSealKeys(tok, next.ConfiguredKeys(), req.GenerateKey); err != nil {
		return nil, classify(err)
	}
	// An older mount is upgraded under the new keys.
	keys := next.ConfiguredKeys()
	next.SealedWith, next.SealedMechanism, next.SealedHMAC = keys.Label, string(keys.Mechanism), keys.HMACLabel
	o, err := m.checkStorage(ctx, s, tok, next, ring)
	if err != nil {
		return nil, classify(err)
	}
	meta := *o.meta
	meta.EmergencySealed = false
	if err := WriteMeta(ctx, o.sealer.Wrap(s), &meta); err != nil {
		return nil, err
	}
	final := *o.cfg
	if err := m.setKeyring(&final, tok, keys, o.sealer.Keyring(), &meta); err != nil {
		return nil, classify(err)
	}
	if err := WriteConfig(ctx, s, &final); err != nil {
		return nil, err
	}
	m.adoptToken(tok)
	adopted = true
	unsealed := &Snapshot{phase: PhaseUnsealed, cfg: &final, meta: &meta, sealer: o.sealer}
	m.setState(unsealed)
	m.host.DropCachedKeys()
	unsealed = m.afterUnseal(ctx, s, unsealed)
	m.host.Logger().Warn("root keyring recovered from shares and sealed by a new KEK", "token", tok.Describe(), "key_label", next.KeyLabel)
	// The anchor lived in the lost HSM: the new one keeps it from now on.
	if err := m.applyAntiRollbackLocked(ctx, s, req.AntiRollback); err != nil {
		return nil, classify(err)
	}
	return &Restored{Config: &final, View: unsealed.sealer.Wrap(s)}, nil
}

// checkCannotUnseal refuses recovery for a mount that is unsealed, or whose
// configured HSM still opens its keyring: recovery is for a lost HSM, and
// would otherwise list working HSM-resident keys as lost. m.mu is held.
func (m *Manager) checkCannotUnseal(cur *Config) error {
	if m.state.Load().phase == PhaseUnsealed {
		return errors.New("the mount is unsealed: its HSM works, and recovery is only for a mount whose HSM is lost")
	}
	tok, err := m.openToken(cur)
	if err != nil {
		return nil
	}
	defer tok.Close()
	ring, err := m.unsealWith(tok, cur)
	if err != nil {
		return nil
	}
	ring.Wipe()
	return errors.New("the mount's HSM still opens its root keyring: recovery is only for a lost HSM (seal/unseal ends an emergency seal; config/seal changes the HSM settings)")
}

// checkRecoveredKeyring checks that ring is this mount's. An authenticated
// copy was made by the mount (or the shares' holders); the keyring must
// still open the sealed manifest. An older, unauthenticated copy could be a
// storage writer's, along with a manifest of theirs: then every sealed
// entry of the mount must open under it, and one at least.
func checkRecoveredKeyring(ctx context.Context, s logical.Storage, ring *seal.Keyring, authenticated bool) error {
	refused := errors.New("the recovered keyring does not open this mount's sealed storage: the recovery copy in storage is not this mount's (replaced?); nothing was changed")
	if ring.Manifested() {
		if err := seal.NewSealer(ring, IsPlainPath).LoadManifest(ctx, s); err != nil {
			return refused
		}
		if authenticated {
			return nil
		}
	}
	opened, refusedOne := 0, false
	err := walkEntries(ctx, s, "", func(key string, value []byte) {
		if IsPlainPath(key) || !seal.IsSealed(value) || strings.HasPrefix(key, "manifest/") {
			return
		}
		if _, oerr := ring.Open(key, value); oerr != nil {
			refusedOne = true
		} else {
			opened++
		}
	})
	if err != nil {
		return err
	}
	if opened == 0 || refusedOne {
		return refused
	}
	return nil
}

// walkEntries calls f for each entry below prefix.
func walkEntries(ctx context.Context, s logical.Storage, prefix string, f func(key string, value []byte)) error {
	keys, err := s.List(ctx, prefix)
	if err != nil {
		return err
	}
	for _, k := range keys {
		if strings.HasSuffix(k, "/") {
			if err := walkEntries(ctx, s, prefix+k, f); err != nil {
				return err
			}
			continue
		}
		e, err := s.Get(ctx, prefix+k)
		if err != nil {
			return err
		}
		if e != nil {
			f(prefix+k, e.Value)
		}
	}
	return nil
}

// EmergencySeal seals the mount at once: the root key, every cached key
// and the mount's HSM session leave memory, and the mount stays sealed,
// across restarts, until Unseal. recorded is false when the HSM could not
// be reached to record the seal in the sealed state (only the plaintext
// configuration, which a storage writer could undo, records it then).
func (m *Manager) EmergencySeal(ctx context.Context, s logical.Storage) (recorded bool, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	cfg, err := ReadConfig(ctx, s)
	if err != nil {
		return false, err
	}
	if cfg == nil {
		return false, asCaller(ErrNotConfigured)
	}
	// Recorded twice: in the sealed state, which a storage writer cannot
	// undo, and in the plaintext configuration, so that a restart stays
	// sealed without asking the HSM. Memory goes even if a write failed:
	// the seal is the point.
	var errs []error
	snap := m.state.Load()
	if snap.phase != PhaseUnsealed {
		// Sealed (the HSM away, or sealed already by a seal/seal that
		// could only be recorded in plaintext): open the sealed state if
		// the HSM allows, so that the flag is recorded where a storage
		// writer cannot clear it.
		if opened, err := m.openMount(ctx, s, cfg); err == nil {
			snap = opened
		}
	}
	// openMount stays sealed only when the sealed state records an
	// emergency seal already.
	recorded = snap.phase == PhaseSealed && snap != m.state.Load() && errors.Is(snap.lastErr, ErrEmergencySealed)
	if snap.phase == PhaseUnsealed {
		meta := *snap.meta
		meta.EmergencySealed = true
		if err := WriteMeta(ctx, snap.sealer.Wrap(s), &meta); err != nil {
			errs = append(errs, err)
		} else {
			recorded = true
		}
		snap.sealer.Keyring().Wipe()
	}
	cfg.EmergencySealed = true
	if err := WriteConfig(ctx, s, cfg); err != nil {
		errs = append(errs, err)
	}
	m.sealLocked(cfg)
	m.host.Logger().Warn("emergency seal: root key, cached keys and the HSM session dropped from memory")
	if err := errors.Join(errs...); err != nil {
		return false, fmt.Errorf("the mount is sealed in memory, but recording the emergency seal failed (a restart would unseal it): %w", err)
	}
	return recorded, nil
}

// sealLocked drops the root key, every cached key and the mount's token (its
// sessions close and the token logs out unless another mount of the process
// uses the same token and PIN); m.mu is held.
func (m *Manager) sealLocked(cfg *Config) {
	if snap := m.state.Load(); snap.sealer != nil {
		snap.sealer.Keyring().Wipe()
	}
	m.setState(&Snapshot{phase: PhaseSealed, cfg: cfg, lastErr: ErrEmergencySealed, permanent: true})
	m.stopAnchorLocked()
	m.adoptToken(nil)
	m.host.DropCachedKeys()
}

// Unseal ends an emergency seal: the HSM unseals the root key again. It
// does nothing for a mount that is unsealed and not emergency-sealed.
func (m *Manager) Unseal(ctx context.Context, s logical.Storage) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	cfg, err := ReadConfig(ctx, s)
	if err != nil {
		return err
	}
	if cfg == nil {
		return asCaller(ErrNotConfigured)
	}
	if m.state.Load().phase == PhaseUnsealed && !cfg.EmergencySealed {
		return nil
	}
	tok, err := m.openToken(cfg)
	if err != nil {
		return unsealErr(err)
	}
	adopted := false
	defer func() {
		if !adopted {
			tok.Close()
		}
	}()
	ring, err := m.unsealWith(tok, cfg)
	if err != nil {
		return unsealErr(err)
	}
	o, err := m.checkStorage(ctx, s, tok, cfg, ring)
	if err != nil {
		ring.Wipe()
		return unsealErr(err)
	}
	meta := *o.meta
	meta.EmergencySealed = false
	if err := WriteMeta(ctx, o.sealer.Wrap(s), &meta); err != nil {
		ring.Wipe()
		return err
	}
	next := *o.cfg
	next.EmergencySealed = false
	if err := WriteConfig(ctx, s, &next); err != nil {
		ring.Wipe()
		return err
	}
	m.adoptToken(tok)
	adopted = true
	snap := &Snapshot{phase: PhaseUnsealed, cfg: &next, meta: &meta, sealer: o.sealer}
	m.setState(snap)
	m.afterUnseal(ctx, s, snap)
	m.host.Logger().Warn("unsealed after an emergency seal")
	return nil
}

// unsealErr classifies a failed Unseal: unavailable while the HSM cannot be
// reached; storage that does not check out as it is (an internal error);
// otherwise as for Configure.
func unsealErr(err error) error {
	if hsm.IsUnavailable(err) {
		return unavailableErr("%v", err)
	}
	if errors.Is(err, ErrStorageNotSealed) {
		return err
	}
	return classify(err)
}
