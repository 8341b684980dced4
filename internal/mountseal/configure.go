package mountseal

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"strings"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/hsmkey"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// CheckKEKLabel refuses a KEK label the token cannot hold, or one inside the
// plugin's own label namespace: there live HSM-resident keys, which crypto
// users may use with associated data of their choice, and a KEK among them
// would let them open or forge the sealed root keyring.
func CheckKEKLabel(label string) error {
	if err := hsm.CheckKeyLabel(label); err != nil {
		return errors.Unwrap(err)
	}
	if strings.HasPrefix(label, hsmkey.Namespace) {
		return fmt.Errorf("key_label %q is in the labels the plugin keeps for HSM-resident keys (%s...): choose a label outside it", label, hsmkey.Namespace)
	}
	return nil
}

// ConfigureRequest is a write of config/seal.
type ConfigureRequest struct {
	// Merge makes the configuration to apply from the stored one (nil
	// before the first seal), under the seal's lock; its error is the
	// caller's.
	Merge func(cur *Config) (*Config, error)
	// GenerateKey creates the KEK (and HMAC key) in the token when absent.
	GenerateKey bool
	// AntiRollback turns the anti-rollback anchor on or off; nil keeps it
	// as it is (in the token in use now, after a change of token).
	AntiRollback *bool
}

// Configured is what Configure did.
type Configured struct {
	// Config is the configuration stored now.
	Config *Config
	// EntriesEncrypted counts the entries stored before the first seal
	// that it encrypted; MigrationPending reports some it could not yet
	// (retried at every unseal).
	EntriesEncrypted int
	MigrationPending bool
	// AntiRollback reports the anchor on.
	AntiRollback bool
}

// Configure seals the mount (first write) or changes how it is sealed:
// another KEK, token, library or PIN. The root key never changes here and no
// entry is re-encrypted; the root keyring is re-sealed.
func (m *Manager) Configure(ctx context.Context, s logical.Storage, req ConfigureRequest) (*Configured, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	cur, err := ReadConfig(ctx, s)
	if err != nil {
		return nil, err
	}
	next, err := req.Merge(cur)
	if err != nil {
		return nil, asCaller(err)
	}
	done := &Configured{Config: next}
	if cur == nil {
		var snap *Snapshot
		if snap, err = m.initSealLocked(ctx, s, next, req.GenerateKey); err == nil {
			done.EntriesEncrypted, done.MigrationPending = snap.migrated, snap.meta.MigrationPending
		}
	} else {
		err = m.reconfigureLocked(ctx, s, cur, next, req.GenerateKey)
	}
	if err != nil {
		if hsm.IsTokenNotFound(err) && (cur == nil || !sameTokenAs(cur, next)) {
			// Settings that name no token or library here are the caller's
			// to fix; 503 is for a configured token that went away.
			return nil, callerErr("nothing was configured: %v; check library, token_label or slot", err)
		}
		return nil, classify(err)
	}
	if err := m.applyAntiRollbackLocked(ctx, s, req.AntiRollback); err != nil {
		return nil, classify(err)
	}
	done.AntiRollback = m.state.Load().meta.AntiRollback
	return done, nil
}

// initSealLocked seals a mount for the first time: a root key from the HSM's
// random generator, sealed by the KEK; then every entry already stored
// (a mount taken over from built-in transit) is encrypted under it.
func (m *Manager) initSealLocked(ctx context.Context, s logical.Storage, cfg *Config, generate bool) (*Snapshot, error) {
	tok, err := m.openToken(cfg)
	if err != nil {
		return nil, err
	}
	adopted := false
	defer func() {
		if !adopted {
			tok.Close()
		}
	}()
	if err := m.resolveMechanism(tok, cfg); err != nil {
		return nil, err
	}
	if err := m.ensureSealKeys(tok, cfg.ConfiguredKeys(), generate); err != nil {
		return nil, err
	}
	rootKey, err := tok.Random(seal.RootKeySize)
	if err != nil {
		return nil, err
	}
	ring, err := seal.NewKeyring(rootKey)
	clear(rootKey)
	if err != nil {
		return nil, err
	}
	ring = ring.WithManifest()
	// The manifest and the sealed state come first. Until the configuration
	// is stored they are sealed under a key nobody keeps, and a failed
	// attempt's are replaced by the next one's.
	if err := s.Delete(ctx, MetaPath); err != nil {
		return nil, err
	}
	if err := checkNothingSealed(ctx, s); err != nil {
		return nil, err
	}
	sealer := seal.NewSealer(ring, IsPlainPath)
	if err := sealer.InitManifest(ctx, s); err != nil {
		return nil, fmt.Errorf("writing the manifest of the mount's entries: %w", err)
	}
	meta := &Meta{MigrationPending: true}
	if err := WriteMeta(ctx, sealer.Wrap(s), meta); err != nil {
		return nil, err
	}
	if err := m.setKeyring(cfg, tok, cfg.ConfiguredKeys(), ring, meta); err != nil {
		return nil, err
	}
	if err := WriteConfig(ctx, s, cfg); err != nil {
		return nil, err
	}
	m.adoptToken(tok)
	adopted = true

	snap := &Snapshot{phase: PhaseUnsealed, cfg: cfg, meta: meta, sealer: sealer}
	m.setState(snap)
	snap = m.afterUnseal(ctx, s, snap)
	m.host.Logger().Info("mount sealed by the HSM", "token", tok.Describe(), "key_label", cfg.KeyLabel, "entries_encrypted", snap.migrated)
	return snap, nil
}

// checkNothingSealed refuses a first seal over storage that a seal wrote
// before: its configuration is gone (removed outside the plugin), and
// sealing again would adopt whatever plaintext entries were planted beside
// the mount's sealed ones. A failed first seal leaves only the manifest,
// which is written anew.
func checkNothingSealed(ctx context.Context, s logical.Storage) error {
	var found string
	err := walkEntries(ctx, s, "", func(key string, value []byte) {
		if found == "" && !IsPlainPath(key) && !strings.HasPrefix(key, "manifest/") && seal.IsSealed(value) {
			found = key
		}
	})
	if err != nil {
		return err
	}
	if found != "" {
		return &hsm.Error{Kind: hsm.Configuration, Op: "seal mount", Err: fmt.Errorf(
			"the mount's storage holds sealed entries (%s) but no seal configuration: it was removed outside the plugin; put seal/config back, or use seal/recovery/restore", found)}
	}
	return nil
}

// reconfigureLocked applies a new configuration to a sealed mount. The
// keyring is re-sealed under the new KEK (or token) when they change; a
// mount that could not unseal is unsealed with the new settings first.
// Whatever fails, the mount keeps the token it had.
func (m *Manager) reconfigureLocked(ctx context.Context, s logical.Storage, cur, next *Config, generate bool) error {
	snap := m.state.Load()
	if cur.EmergencySealed || errors.Is(snap.lastErr, ErrEmergencySealed) {
		return &hsm.Error{Kind: hsm.Configuration, Op: "configure seal", Err: errors.New("the mount is emergency-sealed: write seal/unseal first")}
	}
	sameToken := sameTokenAs(cur, next)
	if next.PIN != cur.PIN && sameToken && m.token != nil {
		// PKCS#11 login is per process: a new PIN can only be checked once
		// the old login is gone. If the new PIN is refused, the old one
		// logs in again, so that a mistake here does not take the
		// mount's HSM-resident keys down.
		m.adoptToken(nil)
		defer func() {
			if m.token == nil {
				if tok, err := m.openToken(cur); err == nil {
					m.adoptToken(tok)
				}
			}
		}()
	}
	tok, err := m.openToken(next)
	if err != nil {
		return err
	}
	adopted := false
	defer func() {
		if !adopted {
			tok.Close()
		}
	}()
	unsealed := snap
	if snap.phase != PhaseUnsealed {
		if unsealed, err = m.openWith(ctx, s, tok, cur); err != nil {
			return err
		}
		// Unsealing may have upgraded the stored configuration.
		next.SealedKeyring, next.SealedWith = unsealed.cfg.SealedKeyring, unsealed.cfg.SealedWith
		next.RecoveryKeyring, next.RecoveryThreshold = unsealed.cfg.RecoveryKeyring, unsealed.cfg.RecoveryThreshold
		next.LegacyRecoveryPublicKey, next.LegacyRecoveryShares = nil, 0
	}
	ring := unsealed.sealer.Keyring()
	if next.Mechanism == "" {
		// Not given, not stored (a mount sealed before mechanisms): the
		// keyring's.
		next.Mechanism = string(cur.SealedKeys().Mechanism)
	}
	if err := m.resolveMechanism(tok, next); err != nil {
		return err
	}
	if next.ConfiguredKeys() != cur.SealedKeys() || !sameToken {
		if err := m.ensureSealKeys(tok, next.ConfiguredKeys(), generate); err != nil {
			return err
		}
		if err := m.setKeyring(next, tok, next.ConfiguredKeys(), ring, unsealed.meta); err != nil {
			return err
		}
		if err := m.checkSealed(tok, next, ring); err != nil {
			return err
		}
	} else {
		// Only the PIN or the deadline changed: a successful login
		// proves the PIN.
		if _, err := tok.Mechanisms(); err != nil {
			return err
		}
	}
	next.RootKeyVersion = ring.Active()
	if err := WriteConfig(ctx, s, next); err != nil {
		return err
	}
	if !sameToken && unsealed.meta.AntiRollback && m.token != nil {
		// The old token's anchor stops here, while the old KEK there may
		// still open a configuration put back from before the move: retire
		// it, so that no storage unseals through that token again.
		if err := m.token.WriteData(m.AntiRollbackLabel(), binary.BigEndian.AppendUint64(nil, math.MaxUint64)); err != nil {
			m.host.Logger().Warn("retiring the anti-rollback anchor in the previous token", "error", err)
		}
	}
	m.adoptToken(tok)
	adopted = true
	done := &Snapshot{phase: PhaseUnsealed, cfg: next, meta: unsealed.meta, sealer: unsealed.sealer, problem: unsealed.problem}
	m.setState(done)
	if snap.phase != PhaseUnsealed {
		m.afterUnseal(ctx, s, done)
	}
	m.host.Logger().Info("seal configuration changed", "token", tok.Describe(), "key_label", next.KeyLabel)
	return nil
}

// openWith unseals cfg's keyring with tok and checks storage against it,
// for a mount that is sealed now. m.mu is held.
func (m *Manager) openWith(ctx context.Context, s logical.Storage, tok *hsm.Token, cfg *Config) (*Snapshot, error) {
	ring, err := m.unsealWith(tok, cfg)
	if err != nil {
		return nil, fmt.Errorf("the new settings do not unseal the root keyring (sealed by KEK %q): %w", cfg.SealedWith, err)
	}
	o, err := m.checkStorage(ctx, s, tok, cfg, ring)
	if err == nil && o.meta.EmergencySealed {
		err = &hsm.Error{Kind: hsm.Configuration, Op: "configure seal", Err: errors.New("the mount is emergency-sealed: write seal/unseal first")}
	}
	if err != nil {
		ring.Wipe()
		return nil, err
	}
	return o.snapshot(), nil
}

// checkSealed proves that cfg's sealed keyring opens to ring before it is
// stored.
func (m *Manager) checkSealed(tok *hsm.Token, cfg *Config, ring *seal.Keyring) error {
	check, err := tok.Open(cfg.SealedKeys(), cfg.SealedKeyring, m.aad)
	if err != nil {
		return err
	}
	defer clear(check)
	want, err := ring.Marshal()
	if err != nil {
		return err
	}
	defer clear(want)
	if !bytes.Equal(check, want) {
		return errors.New("the re-sealed root keyring does not open to itself")
	}
	return nil
}

// applyAntiRollbackLocked applies anti_rollback when given, and otherwise
// keeps an anchor that is on current in the token the mount uses now (after
// a change of token). m.mu is held.
func (m *Manager) applyAntiRollbackLocked(ctx context.Context, s logical.Storage, on *bool) error {
	if on != nil {
		return m.setAntiRollbackLocked(ctx, s, *on)
	}
	if snap := m.state.Load(); snap.meta != nil && snap.meta.AntiRollback {
		return m.setAntiRollbackLocked(ctx, s, true)
	}
	return nil
}

// sameTokenAs reports whether two configurations name the same token.
func sameTokenAs(a, b *Config) bool {
	return a.Library == b.Library && a.TokenLabel == b.TokenLabel && sameSlot(a.Slot, b.Slot)
}

func sameSlot(a, b *uint) bool {
	return (a == nil && b == nil) || (a != nil && b != nil && *a == *b)
}

// resolveMechanism checks that the token offers cfg's mechanism, or chooses
// one from what it offers when cfg names none (a first seal). m.mu is held.
func (m *Manager) resolveMechanism(tok *hsm.Token, cfg *Config) error {
	sup, err := tok.Mechanisms()
	if err != nil {
		return err
	}
	if cfg.Mechanism == "" {
		chosen, err := sup.Choose()
		if err != nil {
			return err
		}
		cfg.Mechanism = string(chosen)
		return nil
	}
	return sup.Supports(hsm.SealMechanism(cfg.Mechanism))
}

// ensureSealKeys makes sure the keys are in the token, creating them when
// allowed (a key the plugin adopts rather than generates must never leave
// the token and serve for nothing else), and that the token gives back what
// it seals with them, before anything depends on it.
func (m *Manager) ensureSealKeys(tok *hsm.Token, keys hsm.SealKeys, generate bool) error {
	if err := tok.EnsureSealKeys(keys, generate); err != nil {
		return err
	}
	return tok.CheckRoundTrip(keys, append([]byte("hsm-transit/canary\x00"), m.aad...))
}
