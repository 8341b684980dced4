package hsmtransit

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
)

// pathRecoveryInit sets up M-of-N recovery of the root keyring.
func (b *backend) pathRecoveryInit() *framework.Path {
	return &framework.Path{
		Pattern: "seal/recovery/init",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "initialize",
			OperationSuffix: "seal-recovery",
		},
		Fields: map[string]*framework.FieldSchema{
			"shares":    {Type: framework.TypeInt, Default: 5, Description: "Number of recovery shares to make (N), at most 255."},
			"threshold": {Type: framework.TypeInt, Default: 3, Description: "Shares needed to recover (M), at least 2."},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathRecoveryInitWrite},
		},
		HelpSynopsis:    pathRecoveryInitHelpSyn,
		HelpDescription: pathRecoveryInitHelpDesc,
	}
}

// pathRecoveryRestore rebuilds the root keyring from shares and seals it
// with a new HSM.
func (b *backend) pathRecoveryRestore() *framework.Path {
	fields := b.pathConfigSeal().Fields
	fields["shares"] = &framework.FieldSchema{
		Type:        framework.TypeCommaStringSlice,
		Description: "At least threshold recovery shares, as seal/recovery/init returned them.",
	}
	fields["legacy_copy"] = &framework.FieldSchema{
		Type:        framework.TypeBool,
		Description: "Accept a recovery copy that is not authenticated (made before copies were); only when storage is known to be intact.",
	}
	return &framework.Path{
		Pattern: "seal/recovery/restore",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "restore",
			OperationSuffix: "seal-recovery",
		},
		Fields: fields,
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathRecoveryRestoreWrite},
		},
		HelpSynopsis:    pathRecoveryRestoreHelpSyn,
		HelpDescription: pathRecoveryRestoreHelpDesc,
	}
}

// pathEmergencySeal drops the root key and every cached key from memory.
func (b *backend) pathEmergencySeal() *framework.Path {
	return &framework.Path{
		Pattern: "seal/seal",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "seal",
			OperationSuffix: "mount",
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathEmergencySealWrite},
		},
		HelpSynopsis:    pathEmergencySealHelpSyn,
		HelpDescription: pathEmergencySealHelpDesc,
	}
}

// pathUnseal ends an emergency seal.
func (b *backend) pathUnseal() *framework.Path {
	return &framework.Path{
		Pattern: "seal/unseal",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "unseal",
			OperationSuffix: "mount",
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathUnsealWrite},
		},
		HelpSynopsis:    pathUnsealHelpSyn,
		HelpDescription: pathUnsealHelpDesc,
	}
}

// pathRecoveryInitWrite makes the shares, returned once, and the recovery
// copy.
func (b *backend) pathRecoveryInitWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	set, err := b.seal.RecoveryInit(ctx, req.Storage, d.Get("shares").(int), d.Get("threshold").(int))
	if err != nil {
		return sealErrorResponse(err)
	}
	resp := &logical.Response{Data: map[string]interface{}{
		"shares":    set.Shares,
		"threshold": set.Threshold,
	}}
	resp.AddWarning("the shares are shown this once: give each to a different custodian; any earlier shares no longer work")
	if lost, err := b.hsmKeyNames(ctx, req.Storage); err == nil && len(lost) > 0 {
		resp.AddWarning(fmt.Sprintf("HSM-resident keys (%s) live only in the HSM: recovery cannot bring them back", strings.Join(lost, ", ")))
	}
	return resp, nil
}

// pathRecoveryRestoreWrite rebuilds the root keyring from shares onto a new
// HSM (mountseal.Manager.Restore), and lists the HSM-resident keys lost with
// the old one.
func (b *backend) pathRecoveryRestoreWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	rreq := mountseal.RestoreRequest{
		Shares:      d.Get("shares").([]string),
		LegacyCopy:  d.Get("legacy_copy").(bool),
		Merge:       func(cur *mountseal.Config) (*mountseal.Config, error) { return mergeSealConfig(cur, d) },
		GenerateKey: d.Get("generate_key").(bool),
	}
	if v, ok := d.GetOk("anti_rollback"); ok {
		on := v.(bool)
		rreq.AntiRollback = &on
	}
	done, err := b.seal.Restore(ctx, req.Storage, rreq)
	if err != nil {
		return sealErrorResponse(err)
	}
	resp := describeSealConfig(done.Config)
	lost, err := b.hsmKeyNames(ctx, done.View)
	if err != nil {
		return nil, err
	}
	resp.Data["hsm_keys_lost"] = lost
	if len(lost) > 0 {
		resp.AddWarning(fmt.Sprintf("HSM-resident keys cannot be recovered from shares: %s lived only in the lost HSM; delete them", strings.Join(lost, ", ")))
	}
	return resp, nil
}

// hsmKeyNames lists the HSM-resident keys.
func (b *backend) hsmKeyNames(ctx context.Context, s logical.Storage) ([]string, error) {
	names, err := s.List(ctx, hsmKeyPrefix)
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	return names, nil
}

// dropCachedKeys forgets every key held in memory.
func (b *backend) dropCachedKeys() {
	b.cacheMu.Lock()
	if b.lm.GetUseCache() {
		_ = b.lm.InitCache(b.lm.GetCacheSize())
	}
	b.cacheMu.Unlock()
	b.hsmKeys.Reset()
	b.lifecycle.reset()
	b.aeads.c.purge()
}

// pathEmergencySealWrite seals the mount at once: the root key, every
// cached key and the mount's HSM session leave memory, and the mount stays
// sealed, across restarts, until seal/unseal.
func (b *backend) pathEmergencySealWrite(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	recorded, err := b.seal.EmergencySeal(ctx, req.Storage)
	if err != nil {
		return sealErrorResponse(err)
	}
	resp := &logical.Response{Data: map[string]interface{}{"sealed": true}}
	if !recorded {
		resp.AddWarning("the HSM could not be reached to record the emergency seal in the mount's sealed state: it is recorded in the plaintext configuration only, which whoever can write Vault's storage could undo; write seal/seal again once the HSM is back")
	}
	return resp, nil
}

// pathUnsealWrite ends an emergency seal: the HSM unseals the root key again.
func (b *backend) pathUnsealWrite(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	if err := b.seal.Unseal(ctx, req.Storage); err != nil {
		return sealErrorResponse(err)
	}
	return &logical.Response{Data: map[string]interface{}{"sealed": false}}, nil
}

// sealErrorResponse answers a seal operation's error: one of a
// mountseal.Kind as errorResponse does (400 or 503); any other (the seal's
// own coded 400 and 503, a storage failure, an internal error) as it is.
func sealErrorResponse(err error) (*logical.Response, error) {
	if mountseal.KindOf(err) != 0 {
		return errorResponse(err)
	}
	return nil, err
}

const pathRecoveryInitHelpSyn = `Set up M-of-N recovery of the mount's root key`

const pathRecoveryInitHelpDesc = `
Makes a recovery copy of the root keyring and returns N shares (Shamir's
secret sharing), of which threshold (M) open it; they are shown once. The copy
is encrypted to a public key (HPKE, MLKEM768-X25519), so it stays current
through root key rotations without the shares. Running it again makes new
shares; the old ones stop working. HSM-resident keys cannot be recovered this
way: they exist only in the HSM.
`

const pathRecoveryRestoreHelpSyn = `Recover the root key with M shares onto a new HSM`

const pathRecoveryRestoreHelpDesc = `
When the HSM was lost or zeroised: give at least threshold shares and the new
seal settings (library, token_label or slot, pin, key_label, generate_key, as
for config/seal). The root keyring is rebuilt, sealed by the new KEK and the
mount unseals. With too few or wrong shares nothing changes. HSM-resident keys
are listed as lost.
`

const pathEmergencySealHelpSyn = `Emergency seal: drop the root key and every key from memory`

const pathEmergencySealHelpDesc = `
Tamper response in software: the root key and every cached key leave memory
at once; every key operation answers 503 until seal/unseal, across restarts.
`

const pathUnsealHelpSyn = `End an emergency seal`

const pathUnsealHelpDesc = `
Unseals the root key with the HSM again after seal/seal.
`
