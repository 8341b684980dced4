package hsmtransit

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// pathConfigSeal configures the HSM that seals the mount's root key.
func (b *backend) pathConfigSeal() *framework.Path {
	return &framework.Path{
		Pattern: "config/seal",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
		},
		Fields: map[string]*framework.FieldSchema{
			"library": {
				Type:        framework.TypeString,
				Description: "Absolute path of the PKCS#11 library; it must be allowed by the operator (HSM_TRANSIT_PKCS11_LIBRARIES).",
			},
			"token_label": {Type: framework.TypeString, Description: "Label of the token; or give slot."},
			"slot":        {Type: framework.TypeInt, Description: "Slot number of the token; or give token_label."},
			"pin": {
				Type:        framework.TypeString,
				Description: "User PIN: the PIN, env://NAME (from the plugin's environment) or file:///path. Write-only.",
				DisplayAttrs: &framework.DisplayAttributes{
					Sensitive: true,
				},
			},
			"key_label": {Type: framework.TypeString, Description: "Label of the AES key in the token that seals the root key (the KEK)."},
			"generate_key": {
				Type:        framework.TypeBool,
				Description: "Create the KEK in the token when there is no key with key_label.",
			},
			"mechanism": {
				Type:        framework.TypeString,
				Description: "How the token seals the root keyring: aes-gcm, aes-kwp, aes-cbc-hmac or rsa-oaep. Chosen from what the token offers when not given (aes-gcm first); see seal/status.",
			},
			"hmac_key_label": {
				Type:        framework.TypeString,
				Description: "For mechanism aes-cbc-hmac: label of the HMAC-SHA256 key in the token. Default: key_label with -hmac appended.",
			},
			"hsm_timeout": {
				Type:        framework.TypeDurationSecond,
				Description: "Deadline of each HSM operation (default 5s): a token that does not answer within it makes the request fail with 503.",
			},
			"anti_rollback": {
				Type:        framework.TypeBool,
				Description: "Keep the storage manifest's anchor in the token and refuse, at unseal, storage rolled back to an older snapshot. One token write per storage write of the mount.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{
				Callback:     b.pathConfigSealWrite,
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "configure", OperationSuffix: "seal"},
			},
			logical.ReadOperation: &framework.PathOperation{
				Callback:     b.pathConfigSealRead,
				DisplayAttrs: &framework.DisplayAttributes{OperationSuffix: "seal-configuration"},
			},
		},
		HelpSynopsis:    pathConfigSealHelpSyn,
		HelpDescription: pathConfigSealHelpDesc,
	}
}

// mergeSealConfig applies the request's fields over the current
// configuration (nil when there is none) and checks the result.
func mergeSealConfig(cur *sealConfig, d *framework.FieldData) (*sealConfig, error) {
	next := &sealConfig{}
	if cur != nil {
		c := *cur
		next = &c
	}
	if v, ok := d.GetOk("library"); ok {
		next.Library = v.(string)
	}
	_, labelGiven := d.GetOk("token_label")
	_, slotGiven := d.GetOk("slot")
	if labelGiven && slotGiven {
		return nil, errors.New("give token_label or slot, not both")
	}
	if labelGiven {
		next.TokenLabel, next.Slot = d.Get("token_label").(string), nil
	}
	if slotGiven {
		n := d.Get("slot").(int)
		if n < 0 || n > math.MaxUint32 {
			return nil, fmt.Errorf("slot %d is out of range: a slot number is from 0 to %d", n, uint64(math.MaxUint32))
		}
		slot := uint(n)
		next.Slot, next.TokenLabel = &slot, ""
	}
	if v, ok := d.GetOk("pin"); ok {
		next.PIN = v.(string)
	}
	if v, ok := d.GetOk("key_label"); ok {
		next.KeyLabel = v.(string)
	}
	if v, ok := d.GetOk("mechanism"); ok {
		m, err := hsm.ParseSealMechanism(v.(string))
		if err != nil {
			return nil, errors.Unwrap(err)
		}
		next.Mechanism = string(m)
	}
	if v, ok := d.GetOk("hmac_key_label"); ok {
		next.HMACKeyLabel = v.(string)
		if next.HMACKeyLabel != "" {
			if err := checkKEKLabel(next.HMACKeyLabel); err != nil {
				return nil, fmt.Errorf("hmac_key_label: %w", err)
			}
		}
	}
	if v, ok := d.GetOk("hsm_timeout"); ok {
		n := v.(int)
		if n < 1 || n > maxCallTimeout {
			return nil, fmt.Errorf("hsm_timeout %ds is out of range: give from 1s to %ds", n, maxCallTimeout)
		}
		next.CallTimeout = n
	}
	var missing []string
	if next.Library == "" {
		missing = append(missing, "library")
	}
	if next.TokenLabel == "" && next.Slot == nil {
		missing = append(missing, "token_label (or slot)")
	}
	if next.PIN == "" {
		missing = append(missing, "pin")
	}
	if next.KeyLabel == "" {
		missing = append(missing, "key_label")
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("missing %v", missing)
	}
	lib, err := hsm.ResolveLibrary(next.Library)
	if err != nil {
		return nil, errors.Unwrap(err)
	}
	// Stored as resolved, so that every spelling of one library is one
	// configuration and one module.
	next.Library = lib
	if next.TokenLabel != "" {
		if err := hsm.CheckTokenLabel(next.TokenLabel); err != nil {
			return nil, errors.Unwrap(err)
		}
	}
	if err := checkKEKLabel(next.KeyLabel); err != nil {
		return nil, err
	}
	if _, err := resolvePIN(next.PIN); err != nil {
		return nil, err
	}
	return next, nil
}

// checkKEKLabel refuses a KEK label the token cannot hold, or one inside the
// plugin's own label namespace: there live HSM-resident keys, which crypto
// users may use with associated data of their choice, and a KEK among them
// would let them open or forge the sealed root keyring.
func checkKEKLabel(label string) error {
	if err := hsm.CheckKeyLabel(label); err != nil {
		return errors.Unwrap(err)
	}
	if strings.HasPrefix(label, hsmNamespace) {
		return fmt.Errorf("key_label %q is in the labels the plugin keeps for HSM-resident keys (%s...): choose a label outside it", label, hsmNamespace)
	}
	return nil
}

// pathConfigSealWrite seals the mount (first write) or changes how it is
// sealed: another KEK, token, library or PIN. The root key never changes
// here and no entry is re-encrypted; the root keyring is re-sealed.
func (b *backend) pathConfigSealWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	m := b.seal
	m.mu.Lock()
	defer m.mu.Unlock()
	cur, err := readSealConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	next, err := mergeSealConfig(cur, d)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	generate := d.Get("generate_key").(bool)

	var resp *logical.Response
	if cur == nil {
		resp, err = m.initSealLocked(ctx, req.Storage, next, generate)
	} else {
		resp, err = m.reconfigureLocked(ctx, req.Storage, cur, next, generate)
	}
	if err != nil {
		if hsm.IsTokenNotFound(err) && (cur == nil || !sameTokenAs(cur, next)) {
			// Settings that name no token or library here are the caller's
			// to fix; 503 is for a configured token that went away.
			return logical.ErrorResponse("nothing was configured: %v; check library, token_label or slot", err), logical.ErrInvalidRequest
		}
		return errorResponse(err)
	}
	if err := m.applyAntiRollbackLocked(ctx, req.Storage, d); err != nil {
		return errorResponse(err)
	}
	resp.Data["anti_rollback"] = m.state.Load().meta.AntiRollback
	if next.pinSource() == "value" {
		resp.AddWarning("the PIN is kept in Vault's storage (encrypted by Vault's barrier); pin=env://NAME or pin=file:///path keeps it out of storage")
	}
	return resp, nil
}

// initSealLocked seals a mount for the first time: a root key from the HSM's
// random generator, sealed by the KEK; then every entry already stored
// (a mount taken over from built-in transit) is encrypted under it.
func (m *sealManager) initSealLocked(ctx context.Context, s logical.Storage, cfg *sealConfig, generate bool) (*logical.Response, error) {
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
	if err := m.ensureSealKeys(tok, cfg.configuredKeys(), generate); err != nil {
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
	if err := s.Delete(ctx, sealMetaPath); err != nil {
		return nil, err
	}
	if err := checkNothingSealed(ctx, s); err != nil {
		return nil, err
	}
	sealer := seal.NewSealer(ring, isPlainPath)
	if err := sealer.InitManifest(ctx, s); err != nil {
		return nil, fmt.Errorf("writing the manifest of the mount's entries: %w", err)
	}
	meta := &sealMeta{MigrationPending: true}
	if err := writeSealMeta(ctx, sealer.Wrap(s), meta); err != nil {
		return nil, err
	}
	if err := m.setKeyring(cfg, tok, cfg.configuredKeys(), ring, meta); err != nil {
		return nil, err
	}
	if err := writeSealConfig(ctx, s, cfg); err != nil {
		return nil, err
	}
	m.adoptToken(tok)
	adopted = true

	snap := &sealSnapshot{phase: phaseUnsealed, cfg: cfg, meta: meta, sealer: sealer}
	m.setState(snap)
	snap = m.afterUnseal(ctx, s, snap)
	m.b.Logger().Info("mount sealed by the HSM", "token", tok.Describe(), "key_label", cfg.KeyLabel, "entries_encrypted", snap.migrated)
	resp := describeSealConfig(cfg)
	if snap.migrated > 0 {
		resp.Data["entries_encrypted"] = snap.migrated
	}
	if snap.meta.MigrationPending {
		resp.AddWarning("the mount is sealed, but some entries stored before it could not be encrypted yet; this is retried at every unseal (see the plugin's log)")
	}
	return resp, nil
}

// checkNothingSealed refuses a first seal over storage that a seal wrote
// before: its configuration is gone (removed outside the plugin), and
// sealing again would adopt whatever plaintext entries were planted beside
// the mount's sealed ones. A failed first seal leaves only the manifest,
// which is written anew.
func checkNothingSealed(ctx context.Context, s logical.Storage) error {
	var found string
	err := walkEntries(ctx, s, "", func(key string, value []byte) {
		if found == "" && !isPlainPath(key) && !strings.HasPrefix(key, "manifest/") && seal.IsSealed(value) {
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
func (m *sealManager) reconfigureLocked(ctx context.Context, s logical.Storage, cur, next *sealConfig, generate bool) (*logical.Response, error) {
	snap := m.state.Load()
	if cur.EmergencySealed || errors.Is(snap.lastErr, errEmergencySealed) {
		return nil, &hsm.Error{Kind: hsm.Configuration, Op: "configure seal", Err: errors.New("the mount is emergency-sealed: write seal/unseal first")}
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
		return nil, err
	}
	adopted := false
	defer func() {
		if !adopted {
			tok.Close()
		}
	}()
	unsealed := snap
	if snap.phase != phaseUnsealed {
		if unsealed, err = m.openWith(ctx, s, tok, cur); err != nil {
			return nil, err
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
		next.Mechanism = string(cur.sealedKeys().Mechanism)
	}
	if err := m.resolveMechanism(tok, next); err != nil {
		return nil, err
	}
	if next.configuredKeys() != cur.sealedKeys() || !sameToken {
		if err := m.ensureSealKeys(tok, next.configuredKeys(), generate); err != nil {
			return nil, err
		}
		if err := m.setKeyring(next, tok, next.configuredKeys(), ring, unsealed.meta); err != nil {
			return nil, err
		}
		if err := m.checkSealed(tok, next, ring); err != nil {
			return nil, err
		}
	} else {
		// Only the PIN or the deadline changed: a successful login
		// proves the PIN.
		if _, err := tok.Mechanisms(); err != nil {
			return nil, err
		}
	}
	next.RootKeyVersion = ring.Active()
	if err := writeSealConfig(ctx, s, next); err != nil {
		return nil, err
	}
	if !sameToken && unsealed.meta.AntiRollback && m.token != nil {
		// The old token's anchor stops here, while the old KEK there may
		// still open a configuration put back from before the move: retire
		// it, so that no storage unseals through that token again.
		if err := m.token.WriteData(m.antiRollbackLabel(), binary.BigEndian.AppendUint64(nil, math.MaxUint64)); err != nil {
			m.b.Logger().Warn("retiring the anti-rollback anchor in the previous token", "error", err)
		}
	}
	m.adoptToken(tok)
	adopted = true
	done := &sealSnapshot{phase: phaseUnsealed, cfg: next, meta: unsealed.meta, sealer: unsealed.sealer, problem: unsealed.problem}
	m.setState(done)
	if snap.phase != phaseUnsealed {
		m.afterUnseal(ctx, s, done)
	}
	m.b.Logger().Info("seal configuration changed", "token", tok.Describe(), "key_label", next.KeyLabel)
	return describeSealConfig(next), nil
}

// openWith unseals cfg's keyring with tok and checks storage against it,
// for a mount that is sealed now. m.mu is held.
func (m *sealManager) openWith(ctx context.Context, s logical.Storage, tok *hsm.Token, cfg *sealConfig) (*sealSnapshot, error) {
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
func (m *sealManager) checkSealed(tok *hsm.Token, cfg *sealConfig, ring *seal.Keyring) error {
	check, err := tok.Open(cfg.sealedKeys(), cfg.SealedKeyring, m.aad)
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
func (m *sealManager) applyAntiRollbackLocked(ctx context.Context, s logical.Storage, d *framework.FieldData) error {
	if v, ok := d.GetOk("anti_rollback"); ok {
		return m.setAntiRollbackLocked(ctx, s, v.(bool))
	}
	if snap := m.state.Load(); snap.meta != nil && snap.meta.AntiRollback {
		return m.setAntiRollbackLocked(ctx, s, true)
	}
	return nil
}

// sameTokenAs reports whether two configurations name the same token.
func sameTokenAs(a, b *sealConfig) bool {
	return a.Library == b.Library && a.TokenLabel == b.TokenLabel && sameSlot(a.Slot, b.Slot)
}

func sameSlot(a, b *uint) bool {
	return (a == nil && b == nil) || (a != nil && b != nil && *a == *b)
}

// maxCallTimeout bounds hsm_timeout, in seconds.
const maxCallTimeout = 300

// resolveMechanism checks that the token offers cfg's mechanism, or chooses
// one from what it offers when cfg names none (a first seal). m.mu is held.
func (m *sealManager) resolveMechanism(tok *hsm.Token, cfg *sealConfig) error {
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
func (m *sealManager) ensureSealKeys(tok *hsm.Token, keys hsm.SealKeys, generate bool) error {
	if err := tok.EnsureSealKeys(keys, generate); err != nil {
		return err
	}
	return tok.CheckRoundTrip(keys, append([]byte("hsm-transit/canary\x00"), m.aad...))
}

// describeSealConfig is config/seal's read: everything but the PIN.
func describeSealConfig(cfg *sealConfig) *logical.Response {
	data := map[string]interface{}{
		"library":          cfg.Library,
		"token_label":      cfg.TokenLabel,
		"key_label":        cfg.KeyLabel,
		"mechanism":        string(cfg.configuredKeys().Mechanism),
		"hsm_timeout":      int(callTimeout(cfg).Seconds()),
		"pin_set":          cfg.PIN != "",
		"pin_source":       cfg.pinSource(),
		"root_key_version": cfg.RootKeyVersion,
	}
	if cfg.Slot != nil {
		data["slot"] = *cfg.Slot
	}
	if k := cfg.configuredKeys(); k.Mechanism == hsm.AESCBCHMAC {
		data["hmac_key_label"] = k.HMACLabel
	}
	return &logical.Response{Data: data}
}

// pathConfigSealRead returns the seal configuration without the PIN.
func (b *backend) pathConfigSealRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	cfg, err := readSealConfig(ctx, req.Storage)
	if err != nil || cfg == nil {
		return nil, err
	}
	return describeSealConfig(cfg), nil
}

const pathConfigSealHelpSyn = `Configure the PKCS#11 HSM that seals the mount's root key`

const pathConfigSealHelpDesc = `
The first write seals the mount: the plugin logs in to the token, finds (or
with generate_key creates) the AES key-encryption key key_label, draws a
256-bit root key from the token's random generator and stores it only sealed
by that key inside the HSM, with mechanism (aes-gcm, aes-kwp, aes-cbc-hmac or
rsa-oaep; when not given, the first the token offers; seal/status lists
them). hsm_timeout bounds every HSM call (default 5s). Every storage entry of the mount is
then encrypted under the root key. Until then, key and crypto paths answer 400.

Later writes change how the root key is sealed without re-encrypting any
entry: a new key_label (or token) re-seals it under the new key; a new pin is
checked by logging in. The PIN is write-only: pin=env://NAME reads it from
the plugin's environment and pin=file:///path from a file, keeping it out of
Vault's storage. library must be on the operator's allowlist, set with
vault plugin register -env HSM_TRANSIT_PKCS11_LIBRARIES=/path/a.so:/path/b.so
(SoftHSM2's Debian paths when unset).
`
