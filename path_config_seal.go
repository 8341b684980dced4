package hsmtransit

import (
	"context"
	"errors"
	"fmt"
	"math"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
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
func mergeSealConfig(cur *mountseal.Config, d *framework.FieldData) (*mountseal.Config, error) {
	next := &mountseal.Config{}
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
			if err := mountseal.CheckKEKLabel(next.HMACKeyLabel); err != nil {
				return nil, fmt.Errorf("hmac_key_label: %w", err)
			}
		}
	}
	if v, ok := d.GetOk("hsm_timeout"); ok {
		n := v.(int)
		if n < 1 || n > mountseal.MaxCallTimeout {
			return nil, fmt.Errorf("hsm_timeout %ds is out of range: give from 1s to %ds", n, mountseal.MaxCallTimeout)
		}
		next.CallTimeout = n
	}
	if err := next.Check(); err != nil {
		return nil, err
	}
	return next, nil
}

// pathConfigSealWrite seals the mount (first write) or changes how it is
// sealed: another KEK, token, library or PIN. The root key never changes
// here and no entry is re-encrypted; the root keyring is re-sealed.
func (b *backend) pathConfigSealWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	creq := mountseal.ConfigureRequest{
		Merge:       func(cur *mountseal.Config) (*mountseal.Config, error) { return mergeSealConfig(cur, d) },
		GenerateKey: d.Get("generate_key").(bool),
	}
	if v, ok := d.GetOk("anti_rollback"); ok {
		on := v.(bool)
		creq.AntiRollback = &on
	}
	done, err := b.seal.Configure(ctx, req.Storage, creq)
	if err != nil {
		return sealErrorResponse(err)
	}
	resp := describeSealConfig(done.Config)
	if done.EntriesEncrypted > 0 {
		resp.Data["entries_encrypted"] = done.EntriesEncrypted
	}
	if done.MigrationPending {
		resp.AddWarning("the mount is sealed, but some entries stored before it could not be encrypted yet; this is retried at every unseal (see the plugin's log)")
	}
	resp.Data["anti_rollback"] = done.AntiRollback
	if done.Config.PINSource() == "value" {
		resp.AddWarning("the PIN is kept in Vault's storage (encrypted by Vault's barrier); pin=env://NAME or pin=file:///path keeps it out of storage")
	}
	return resp, nil
}

// describeSealConfig is config/seal's read: everything but the PIN.
func describeSealConfig(cfg *mountseal.Config) *logical.Response {
	data := map[string]interface{}{
		"library":          cfg.Library,
		"token_label":      cfg.TokenLabel,
		"key_label":        cfg.KeyLabel,
		"mechanism":        string(cfg.ConfiguredKeys().Mechanism),
		"hsm_timeout":      int(cfg.HSMTimeout().Seconds()),
		"pin_set":          cfg.PIN != "",
		"pin_source":       cfg.PINSource(),
		"root_key_version": cfg.RootKeyVersion,
	}
	if cfg.Slot != nil {
		data["slot"] = *cfg.Slot
	}
	if k := cfg.ConfiguredKeys(); k.Mechanism == hsm.AESCBCHMAC {
		data["hmac_key_label"] = k.HMACLabel
	}
	return &logical.Response{Data: data}
}

// pathConfigSealRead returns the seal configuration without the PIN.
func (b *backend) pathConfigSealRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	cfg, err := mountseal.ReadConfig(ctx, req.Storage)
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
