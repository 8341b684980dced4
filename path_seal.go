package hsmtransit

import (
	"context"
	"errors"
	"fmt"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// pathSealStatus reports the seal's state; it never holds a secret.
func (b *backend) pathSealStatus() *framework.Path {
	return &framework.Path{
		Pattern: "seal/status",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationSuffix: "seal-status",
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{Callback: b.pathSealStatusRead},
		},
		HelpSynopsis:    pathSealStatusHelpSyn,
		HelpDescription: pathSealStatusHelpDesc,
	}
}

// pathSealRotate rotates the root key.
func (b *backend) pathSealRotate() *framework.Path {
	return &framework.Path{
		Pattern: "seal/rotate",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "rotate",
			OperationSuffix: "root-key",
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathSealRotateWrite},
		},
		HelpSynopsis:    pathSealRotateHelpSyn,
		HelpDescription: pathSealRotateHelpDesc,
	}
}

// pathSealStatusRead describes the seal, trying to unseal first so that the
// answer is current.
func (b *backend) pathSealStatusRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	snap, err := b.seal.tryUnseal(ctx, req.Storage, false)
	if err != nil {
		return nil, err
	}
	data := map[string]interface{}{
		"configured": snap.phase == phaseSealed || snap.phase == phaseUnsealed,
		"sealed":     snap.phase != phaseUnsealed,
		"last_error": "",
	}
	if snap.lastErr != nil {
		data["last_error"] = snap.lastErr.Error()
	}
	if cfg := snap.cfg; cfg != nil {
		data["library"] = cfg.Library
		data["token_label"] = cfg.TokenLabel
		if cfg.Slot != nil {
			data["slot"] = *cfg.Slot
		}
		data["key_label"] = cfg.SealedWith
		data["root_key_version"] = cfg.RootKeyVersion
		keys := cfg.sealedKeys()
		data["mechanism"] = string(keys.Mechanism)
		if keys.Mechanism == hsm.AESCBCHMAC {
			data["hmac_key_label"] = keys.HMACLabel
		}
		data["hsm_timeout"] = int(callTimeout(cfg).Seconds())
	}
	if snap.phase == phaseUnsealed {
		// What the token offers, for choosing a mechanism (and whether
		// HSM-resident keys work there).
		if sup := b.seal.tokenMechanisms(); sup != nil {
			usable := make([]string, len(sup.Usable))
			for i, m := range sup.Usable {
				usable[i] = string(m)
			}
			data["token_mechanisms"] = usable
			data["hsm_keys_supported"] = sup.GCM
		}
	}
	if snap.sealer != nil {
		ring := snap.sealer.Keyring()
		data["root_key_version"] = ring.Active()
		data["rotation_pending"] = len(ring.Versions()) > 1
	}
	if snap.problem != nil {
		data["last_error"] = snap.problem.Error()
	}
	if meta := snap.meta; meta != nil {
		data["recovery_initialized"] = meta.RecoveryPublicKey != nil
		// Recovery set up by a version before copies were authenticated:
		// seal/recovery/init again makes shares whose copies are.
		data["recovery_authenticated"] = meta.RecoveryMACKey != nil
		data["recovery_shares"] = meta.RecoveryShares
		data["recovery_threshold"] = meta.RecoveryThreshold
		data["emergency_sealed"] = meta.EmergencySealed
		data["anti_rollback"] = meta.AntiRollback
	} else if cfg := snap.cfg; cfg != nil {
		// Sealed: what the plaintext configuration says, unverified.
		data["recovery_initialized"] = cfg.RecoveryKeyring != nil
		data["recovery_threshold"] = cfg.RecoveryThreshold
		data["emergency_sealed"] = cfg.EmergencySealed || errors.Is(snap.lastErr, errEmergencySealed)
	}
	return &logical.Response{Data: data}, nil
}

// pathSealRotateWrite rotates the root key: a new version from the HSM, then
// every entry re-encrypted under it, then the old versions dropped.
func (b *backend) pathSealRotateWrite(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	m := b.seal
	if _, err := m.view(ctx, req.Storage); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	snap := m.state.Load()
	if snap.phase != phaseUnsealed {
		return nil, sealUnavailable(snap)
	}
	if m.token == nil {
		return nil, unavailableErr("no HSM token is open for this mount; check seal/status")
	}
	newKey, err := m.token.Random(seal.RootKeySize)
	if err != nil {
		return errorResponse(err)
	}
	ring, err := snap.sealer.Keyring().Rotated(newKey)
	clear(newKey)
	if err != nil {
		return nil, err
	}
	// Store the keyring with both versions before any entry moves: a crash
	// from here on leaves every entry readable.
	if err := m.storeKeyringLocked(ctx, req.Storage, snap, ring); err != nil {
		return errorResponse(err)
	}
	snap = m.state.Load()
	snap.sealer.SetKeyring(ring)
	if rotationStoredHook != nil {
		rotationStoredHook()
	}
	n, err := m.finishRotationLocked(ctx, req.Storage, snap)
	if err != nil {
		if hsm.IsUnavailable(err) {
			// The new keyring is stored; the entries not yet resealed
			// stay readable, and the rotation completes at the next
			// seal/rotate or unseal.
			return nil, unavailableErr("the root key rotation was interrupted (%v); every entry stays readable, and writing seal/rotate again once the HSM answers completes it", err)
		}
		return nil, err
	}
	return &logical.Response{Data: map[string]interface{}{
		"root_key_version": ring.Active(),
		"entries_resealed": n,
	}}, nil
}

// rotationStoredHook, when set (by tests), runs between storing the rotated
// keyring and resealing the entries.
var rotationStoredHook func()

// storeKeyringLocked seals ring under the configured KEK and stores it with
// the configuration, in one write. m.mu is held.
func (m *sealManager) storeKeyringLocked(ctx context.Context, s logical.Storage, snap *sealSnapshot, ring *seal.Keyring) error {
	if m.token == nil {
		return unavailableErr("no HSM token is open for this mount; check config/seal")
	}
	cfg := *snap.cfg
	if err := m.setKeyring(&cfg, m.token, cfg.sealedKeys(), ring, snap.meta); err != nil {
		return err
	}
	if err := writeSealConfig(ctx, s, &cfg); err != nil {
		return err
	}
	next := *snap
	next.cfg = &cfg
	m.setState(&next)
	return nil
}

// resumeRotation completes a root key rotation that a storage failure
// interrupted in this process.
func (m *sealManager) resumeRotation(ctx context.Context, s logical.Storage) {
	if !m.mu.TryLock() {
		return
	}
	defer m.mu.Unlock()
	snap := m.state.Load()
	if snap.phase != phaseUnsealed || len(snap.sealer.Keyring().Versions()) < 2 {
		return
	}
	if _, err := m.finishRotationLocked(ctx, s, snap); err != nil {
		m.b.Logger().Warn("resuming the root key rotation", "error", err)
	}
}

// finishRotationLocked re-encrypts every entry under the active version and
// drops the others, returning how many entries changed. It is also how an
// interrupted rotation completes after a restart. m.mu is held.
func (m *sealManager) finishRotationLocked(ctx context.Context, s logical.Storage, snap *sealSnapshot) (int, error) {
	n, err := snap.sealer.ResealAll(ctx, s)
	var planted *seal.PlaintextEntriesError
	var unreadable *seal.UnreadableEntriesError
	var problem error
	if errors.As(err, &planted) || errors.As(err, &unreadable) {
		// Entries that the plugin did not write (planted in plaintext,
		// edited, or older copies put back): never adopted, and
		// reported until a rotation finds them gone. They do not hold
		// the rotation up: nothing of the mount can be read from them,
		// before or after the old root key versions go.
		m.b.Logger().Error("storage holds entries this mount did not seal, or older copies of its entries; they are refused", "error", err)
		problem, err = err, nil
	}
	if cur := m.state.Load(); cur.problem != problem {
		next := *cur
		next.problem = problem
		m.setState(&next)
	}
	if err != nil {
		return n, fmt.Errorf("re-encrypting entries under the new root key (the rotation completes at the next rotation or restart): %w", err)
	}
	pruned := snap.sealer.Keyring().ActiveOnly()
	if err := m.storeKeyringLocked(ctx, s, m.state.Load(), pruned); err != nil {
		return n, err
	}
	// The manifest keeps its tombstones: a copy of seal/config from before
	// this rotation still opens the old versions (the KEK opens any copy),
	// and a deleted entry's old copy put back with it must stay refused.
	snap.sealer.SetKeyring(pruned)
	m.b.Logger().Info("root key rotated", "root_key_version", pruned.Active(), "entries_resealed", n)
	return n, nil
}

const pathSealStatusHelpSyn = `Report the state of the mount's HSM seal`

const pathSealStatusHelpDesc = `
Reports whether the mount is sealed by an HSM (configured) and whether its
root key is in memory (sealed: false), with the library, token and KEK in
use, the mechanism, the root key version and the last error. No secret is
ever part of it.
`

const pathSealRotateHelpSyn = `Rotate the mount's root key`

const pathSealRotateHelpDesc = `
Draws a new root key from the HSM, stores the root keyring with the old and
new versions sealed by the KEK, re-encrypts every storage entry under the new
version, then drops the old one. A crash at any point leaves every entry
readable; the re-encryption completes at the next unseal.
`
