package hsmtransit

import (
	"context"
	"errors"
	"fmt"
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
	public, macKey, shares, err := seal.NewAuthenticatedRecovery(d.Get("shares").(int), d.Get("threshold").(int))
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	meta := *snap.meta
	meta.RecoveryPublicKey, meta.RecoveryMACKey = public, macKey
	meta.RecoveryShares, meta.RecoveryThreshold = len(shares), d.Get("threshold").(int)
	cfg := *snap.cfg
	if cfg.RecoveryKeyring, err = seal.SealForRecoveryWithMAC(public, macKey, m.recoveryInfo(), snap.sealer.Keyring()); err != nil {
		return nil, err
	}
	cfg.RecoveryThreshold = meta.RecoveryThreshold
	// The public key is sealed first: a crash before the copy is stored
	// leaves shares nobody received, and the next keyring write makes the
	// copy for the public key that is sealed, never for one in plaintext.
	if err := writeSealMeta(ctx, snap.sealer.Wrap(req.Storage), &meta); err != nil {
		return nil, err
	}
	if err := writeSealConfig(ctx, req.Storage, &cfg); err != nil {
		return nil, err
	}
	next := *snap
	next.cfg, next.meta = &cfg, &meta
	m.setState(&next)
	m.b.Logger().Warn("recovery shares made; earlier shares, if any, no longer work", "shares", len(shares), "threshold", meta.RecoveryThreshold)

	resp := &logical.Response{Data: map[string]interface{}{
		"shares":    shares,
		"threshold": meta.RecoveryThreshold,
	}}
	resp.AddWarning("the shares are shown this once: give each to a different custodian; any earlier shares no longer work")
	if lost, err := m.b.hsmKeyNames(ctx, req.Storage); err == nil && len(lost) > 0 {
		resp.AddWarning(fmt.Sprintf("HSM-resident keys (%s) live only in the HSM: recovery cannot bring them back", strings.Join(lost, ", ")))
	}
	return resp, nil
}

// pathRecoveryRestoreWrite opens the recovery copy with the shares, checks
// that the keyring it holds is this mount's, seals it with the new HSM
// settings and unseals. Nothing changes unless all of that works, and
// nothing is done for a mount whose HSM still opens its keyring.
func (b *backend) pathRecoveryRestoreWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	m := b.seal
	m.mu.Lock()
	defer m.mu.Unlock()
	cur, err := readSealConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	if cur == nil || cur.RecoveryKeyring == nil {
		return logical.ErrorResponse("recovery is not set up for this mount: seal/recovery/init makes the shares"), logical.ErrInvalidRequest
	}
	if err := m.checkCannotUnseal(cur); err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	shares := d.Get("shares").([]string)
	if len(shares) < cur.RecoveryThreshold {
		return logical.ErrorResponse("%d shares given; %d are needed", len(shares), cur.RecoveryThreshold), logical.ErrInvalidRequest
	}
	ring, authenticated, err := seal.OpenRecovery(shares, m.recoveryInfo(), cur.RecoveryKeyring)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	if !authenticated && !d.Get("legacy_copy").(bool) {
		// Anyone who knows the public key can make such a copy, and a
		// storage writer who also moves the mount's entries aside leaves
		// no canary to tell theirs from the mount's.
		ring.Wipe()
		return logical.ErrorResponse("the recovery copy is not authenticated (made by an older version, or planted by whoever can write storage): nothing was changed; if the shares are from a recovery set made before copies were authenticated and storage is known to be intact, restore with legacy_copy=true"), logical.ErrInvalidRequest
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
	if err := checkRecoveredKeyring(ctx, req.Storage, ring, authenticated); err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	next, err := mergeSealConfig(cur, d)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	next.EmergencySealed = false
	// An older mount is upgraded under the new KEK.
	tok, err := m.openToken(next)
	if err != nil {
		return errorResponse(err)
	}
	defer func() {
		if !adopted {
			tok.Close()
		}
	}()
	if next.Mechanism == "" && cur != nil {
		next.Mechanism = string(cur.sealedKeys().Mechanism)
	}
	if err := m.resolveMechanism(tok, next); err != nil {
		return errorResponse(err)
	}
	if err := m.ensureSealKeys(tok, next.configuredKeys(), d.Get("generate_key").(bool)); err != nil {
		return errorResponse(err)
	}
	// An older mount is upgraded under the new keys.
	keys := next.configuredKeys()
	next.SealedWith, next.SealedMechanism, next.SealedHMAC = keys.Label, string(keys.Mechanism), keys.HMACLabel
	o, err := m.checkStorage(ctx, req.Storage, tok, next, ring)
	if err != nil {
		return errorResponse(err)
	}
	meta := *o.meta
	meta.EmergencySealed = false
	if err := writeSealMeta(ctx, o.sealer.Wrap(req.Storage), &meta); err != nil {
		return nil, err
	}
	final := *o.cfg
	if err := m.setKeyring(&final, tok, keys, o.sealer.Keyring(), &meta); err != nil {
		return errorResponse(err)
	}
	if err := writeSealConfig(ctx, req.Storage, &final); err != nil {
		return nil, err
	}
	m.adoptToken(tok)
	adopted = true
	unsealed := &sealSnapshot{phase: phaseUnsealed, cfg: &final, meta: &meta, sealer: o.sealer}
	m.setState(unsealed)
	m.b.dropCachedKeys()
	unsealed = m.afterUnseal(ctx, req.Storage, unsealed)
	m.b.Logger().Warn("root keyring recovered from shares and sealed by a new KEK", "token", tok.Describe(), "key_label", next.KeyLabel)
	// The anchor lived in the lost HSM: the new one keeps it from now on.
	if err := m.applyAntiRollbackLocked(ctx, req.Storage, d); err != nil {
		return errorResponse(err)
	}

	resp := describeSealConfig(&final)
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

// checkCannotUnseal refuses recovery for a mount that is unsealed, or whose
// configured HSM still opens its keyring: recovery is for a lost HSM, and
// would otherwise list working HSM-resident keys as lost. m.mu is held.
func (m *sealManager) checkCannotUnseal(cur *sealConfig) error {
	if m.state.Load().phase == phaseUnsealed {
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
		if err := seal.NewSealer(ring, isPlainPath).LoadManifest(ctx, s); err != nil {
			return refused
		}
		if authenticated {
			return nil
		}
	}
	opened, refusedOne := 0, false
	err := walkEntries(ctx, s, "", func(key string, value []byte) {
		if isPlainPath(key) || !seal.IsSealed(value) || strings.HasPrefix(key, "manifest/") {
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
	// Recorded twice: in the sealed state, which a storage writer cannot
	// undo, and in the plaintext configuration, so that a restart stays
	// sealed without asking the HSM. Memory goes even if a write failed:
	// the seal is the point.
	var errs []error
	snap := m.state.Load()
	if snap.phase != phaseUnsealed {
		// Sealed (the HSM away, or sealed already by a seal/seal that
		// could only be recorded in plaintext): open the sealed state if
		// the HSM allows, so that the flag is recorded where a storage
		// writer cannot clear it.
		if opened, err := m.openMount(ctx, req.Storage, cfg); err == nil {
			snap = opened
		}
	}
	// openMount stays sealed only when the sealed state records an
	// emergency seal already.
	recorded := snap.phase == phaseSealed && snap != m.state.Load() && errors.Is(snap.lastErr, errEmergencySealed)
	if snap.phase == phaseUnsealed {
		meta := *snap.meta
		meta.EmergencySealed = true
		if err := writeSealMeta(ctx, snap.sealer.Wrap(req.Storage), &meta); err != nil {
			errs = append(errs, err)
		} else {
			recorded = true
		}
		snap.sealer.Keyring().Wipe()
	}
	cfg.EmergencySealed = true
	if err := writeSealConfig(ctx, req.Storage, cfg); err != nil {
		errs = append(errs, err)
	}
	m.sealLocked(cfg)
	m.b.Logger().Warn("emergency seal: root key, cached keys and the HSM session dropped from memory")
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("the mount is sealed in memory, but recording the emergency seal failed (a restart would unseal it): %w", err)
	}
	resp := &logical.Response{Data: map[string]interface{}{"sealed": true}}
	if !recorded {
		resp.AddWarning("the HSM could not be reached to record the emergency seal in the mount's sealed state: it is recorded in the plaintext configuration only, which whoever can write Vault's storage could undo; write seal/seal again once the HSM is back")
	}
	return resp, nil
}

// sealLocked drops the root key, every cached key and the mount's token (its
// sessions close and the token logs out unless another mount of the process
// uses the same token and PIN); m.mu is held.
func (m *sealManager) sealLocked(cfg *sealConfig) {
	if snap := m.state.Load(); snap.sealer != nil {
		snap.sealer.Keyring().Wipe()
	}
	m.setState(&sealSnapshot{phase: phaseSealed, cfg: cfg, lastErr: errEmergencySealed, permanent: true})
	m.stopAnchorLocked()
	m.adoptToken(nil)
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
	tok, err := m.openToken(cfg)
	if err != nil {
		return unsealErrorResponse(err)
	}
	adopted := false
	defer func() {
		if !adopted {
			tok.Close()
		}
	}()
	ring, err := m.unsealWith(tok, cfg)
	if err != nil {
		return unsealErrorResponse(err)
	}
	o, err := m.checkStorage(ctx, req.Storage, tok, cfg, ring)
	if err != nil {
		ring.Wipe()
		return unsealErrorResponse(err)
	}
	meta := *o.meta
	meta.EmergencySealed = false
	if err := writeSealMeta(ctx, o.sealer.Wrap(req.Storage), &meta); err != nil {
		ring.Wipe()
		return nil, err
	}
	next := *o.cfg
	next.EmergencySealed = false
	if err := writeSealConfig(ctx, req.Storage, &next); err != nil {
		ring.Wipe()
		return nil, err
	}
	m.adoptToken(tok)
	adopted = true
	snap := &sealSnapshot{phase: phaseUnsealed, cfg: &next, meta: &meta, sealer: o.sealer}
	m.setState(snap)
	m.afterUnseal(ctx, req.Storage, snap)
	m.b.Logger().Warn("unsealed after an emergency seal")
	return &logical.Response{Data: map[string]interface{}{"sealed": false}}, nil
}

// unsealErrorResponse answers a failed seal/unseal: 503 while the HSM cannot
// be reached, otherwise as config/seal does.
func unsealErrorResponse(err error) (*logical.Response, error) {
	if hsm.IsUnavailable(err) {
		return nil, unavailableErr("%v", err)
	}
	if errors.Is(err, errStorageNotSealed) {
		return nil, err
	}
	return errorResponse(err)
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
