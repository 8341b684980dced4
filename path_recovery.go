package hsmtransit

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// errEmergencySealed is why an emergency-sealed mount answers 503.
var errEmergencySealed = errors.New("the mount was sealed by seal/seal (emergency seal); seal/unseal resumes it")

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
	public, shares, err := seal.NewRecovery(d.Get("shares").(int), d.Get("threshold").(int))
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	cfg := *snap.cfg
	cfg.RecoveryPublicKey, cfg.RecoveryShares, cfg.RecoveryThreshold = public, len(shares), d.Get("threshold").(int)
	if cfg.RecoveryKeyring, err = seal.SealForRecovery(public, m.recoveryInfo(), snap.sealer.Keyring()); err != nil {
		return nil, err
	}
	if err := writeSealConfig(ctx, req.Storage, &cfg); err != nil {
		return nil, err
	}
	m.state.Store(&sealSnapshot{phase: phaseUnsealed, cfg: &cfg, sealer: snap.sealer})
	m.b.Logger().Warn("recovery shares made; earlier shares, if any, no longer work", "shares", len(shares), "threshold", cfg.RecoveryThreshold)

	resp := &logical.Response{Data: map[string]interface{}{
		"shares":    shares,
		"threshold": cfg.RecoveryThreshold,
	}}
	resp.AddWarning("the shares are shown this once: give each to a different custodian; any earlier shares no longer work")
	if lost, err := m.b.hsmKeyNames(ctx, req.Storage); err == nil && len(lost) > 0 {
		resp.AddWarning(fmt.Sprintf("HSM-resident keys (%s) live only in the HSM: recovery cannot bring them back", strings.Join(lost, ", ")))
	}
	return resp, nil
}

// pathRecoveryRestoreWrite opens the recovery copy with the shares, seals the
// keyring with the new HSM settings and unseals. Nothing changes unless the
// shares open the copy and the new HSM seals it.
func (b *backend) pathRecoveryRestoreWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	m := b.seal
	m.mu.Lock()
	defer m.mu.Unlock()
	cur, err := readSealConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	if cur == nil || cur.RecoveryPublicKey == nil {
		return logical.ErrorResponse("recovery is not set up for this mount: seal/recovery/init makes the shares"), logical.ErrInvalidRequest
	}
	shares := d.Get("shares").([]string)
	if len(shares) < cur.RecoveryThreshold {
		return logical.ErrorResponse("%d shares given; %d are needed", len(shares), cur.RecoveryThreshold), logical.ErrInvalidRequest
	}
	ring, err := seal.OpenWithShares(shares, m.recoveryInfo(), cur.RecoveryKeyring)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	next, err := mergeSealConfig(cur, d)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	next.EmergencySealed = false
	tok, err := m.openToken(next)
	if err != nil {
		return hsmErrorResponse(err)
	}
	if err := ensureKEK(tok, next.KeyLabel, d.Get("generate_key").(bool)); err != nil {
		tok.Close()
		return hsmErrorResponse(err)
	}
	if err := m.setKeyring(next, tok, next.KeyLabel, ring); err != nil {
		tok.Close()
		return hsmErrorResponse(err)
	}
	if err := writeSealConfig(ctx, req.Storage, next); err != nil {
		tok.Close()
		return nil, err
	}
	m.adoptToken(tok)
	unsealed := &sealSnapshot{phase: phaseUnsealed, cfg: next, sealer: seal.NewSealer(ring, isPlainPath)}
	m.state.Store(unsealed)
	m.b.dropCachedKeys()
	m.afterUnseal(ctx, req.Storage, unsealed)
	m.b.Logger().Warn("root keyring recovered from shares and sealed by a new KEK", "token", tok.Describe(), "key_label", next.KeyLabel)

	resp := describeSealConfig(next)
	lost, err := m.b.hsmKeyNames(ctx, unsealed.sealer.Wrap(req.Storage))
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
	b.hsmKeys.reset()
	b.lifecycle.reset()
	b.aeads.c.purge()
}

// pathEmergencySealWrite seals the mount at once: the root key and every
// cached key leave memory, and the mount stays sealed, across restarts,
// until seal/unseal.
func (b *backend) pathEmergencySealWrite(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	m := b.seal
	m.mu.Lock()
	defer m.mu.Unlock()
	cfg, err := readSealConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	if cfg == nil {
		return logical.ErrorResponse(errNotConfigured.Error()), logical.ErrInvalidRequest
	}
	cfg.EmergencySealed = true
	if err := writeSealConfig(ctx, req.Storage, cfg); err != nil {
		return nil, fmt.Errorf("recording the emergency seal: %w", err)
	}
	// Memory goes even if storing the flag failed: the seal is the point.
	m.sealLocked(cfg)
	m.b.Logger().Warn("emergency seal: root key and cached keys dropped from memory")
	return &logical.Response{Data: map[string]interface{}{"sealed": true}}, nil
}

// sealLocked drops the root key and every cached key; m.mu is held.
func (m *sealManager) sealLocked(cfg *sealConfig) {
	if snap := m.state.Load(); snap.sealer != nil {
		snap.sealer.Keyring().Wipe()
	}
	m.state.Store(&sealSnapshot{phase: phaseSealed, cfg: cfg, lastErr: errEmergencySealed, permanent: true})
	m.b.dropCachedKeys()
}

// pathUnsealWrite ends an emergency seal: the HSM unseals the root key again.
func (b *backend) pathUnsealWrite(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	m := b.seal
	m.mu.Lock()
	defer m.mu.Unlock()
	cfg, err := readSealConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	if cfg == nil {
		return logical.ErrorResponse(errNotConfigured.Error()), logical.ErrInvalidRequest
	}
	if m.state.Load().phase == phaseUnsealed && !cfg.EmergencySealed {
		return &logical.Response{Data: map[string]interface{}{"sealed": false}}, nil
	}
	ring, err := m.openKeyring(cfg)
	if err != nil {
		if hsm.IsUnavailable(err) {
			return nil, logical.CodedError(http.StatusServiceUnavailable, err.Error())
		}
		return hsmErrorResponse(err)
	}
	cfg.EmergencySealed = false
	if err := writeSealConfig(ctx, req.Storage, cfg); err != nil {
		ring.Wipe()
		return nil, err
	}
	snap := &sealSnapshot{phase: phaseUnsealed, cfg: cfg, sealer: seal.NewSealer(ring, isPlainPath)}
	m.state.Store(snap)
	m.afterUnseal(ctx, req.Storage, snap)
	m.b.Logger().Warn("unsealed after an emergency seal")
	return &logical.Response{Data: map[string]interface{}{"sealed": false}}, nil
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
