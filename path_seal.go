package hsmtransit

import (
	"context"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
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
	snap, err := b.seal.Status(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	data := map[string]interface{}{
		"configured": snap.Configured(),
		"sealed":     snap.Phase() != mountseal.PhaseUnsealed,
		"last_error": "",
	}
	if snap.LastErr() != nil {
		data["last_error"] = snap.LastErr().Error()
	}
	if cfg := snap.Config(); cfg != nil {
		data["library"] = cfg.Library
		data["token_label"] = cfg.TokenLabel
		if cfg.Slot != nil {
			data["slot"] = *cfg.Slot
		}
		data["key_label"] = cfg.SealedWith
		data["root_key_version"] = cfg.RootKeyVersion
		keys := cfg.SealedKeys()
		data["mechanism"] = string(keys.Mechanism)
		if keys.Mechanism == hsm.AESCBCHMAC {
			data["hmac_key_label"] = keys.HMACLabel
		}
		data["hsm_timeout"] = int(cfg.HSMTimeout().Seconds())
	}
	if snap.Phase() == mountseal.PhaseUnsealed {
		// What the token offers, for choosing a mechanism (and whether
		// HSM-resident keys work there).
		if sup := b.seal.TokenMechanisms(); sup != nil {
			usable := make([]string, len(sup.Usable))
			for i, m := range sup.Usable {
				usable[i] = string(m)
			}
			data["token_mechanisms"] = usable
			data["hsm_keys_supported"] = sup.GCM
		}
	}
	if sealer := snap.Sealer(); sealer != nil {
		ring := sealer.Keyring()
		data["root_key_version"] = ring.Active()
		data["rotation_pending"] = len(ring.Versions()) > 1
	}
	if snap.Problem() != nil {
		data["last_error"] = snap.Problem().Error()
	}
	if meta := snap.Meta(); meta != nil {
		data["recovery_initialized"] = meta.RecoveryPublicKey != nil
		// Recovery set up by a version before copies were authenticated:
		// seal/recovery/init again makes shares whose copies are.
		data["recovery_authenticated"] = meta.RecoveryMACKey != nil
		data["recovery_shares"] = meta.RecoveryShares
		data["recovery_threshold"] = meta.RecoveryThreshold
		data["emergency_sealed"] = meta.EmergencySealed
		data["anti_rollback"] = meta.AntiRollback
	} else if cfg := snap.Config(); cfg != nil {
		// Sealed: what the plaintext configuration says, unverified.
		data["recovery_initialized"] = cfg.RecoveryKeyring != nil
		data["recovery_threshold"] = cfg.RecoveryThreshold
		data["emergency_sealed"] = snap.EmergencySealed()
	}
	return &logical.Response{Data: data}, nil
}

// pathSealRotateWrite rotates the root key: a new version from the HSM, then
// every entry re-encrypted under it, then the old versions dropped.
func (b *backend) pathSealRotateWrite(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	done, err := b.seal.Rotate(ctx, req.Storage)
	if err != nil {
		return sealErrorResponse(err)
	}
	return &logical.Response{Data: map[string]interface{}{
		"root_key_version": done.RootKeyVersion,
		"entries_resealed": done.EntriesResealed,
	}}, nil
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
