package hsmtransit

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/hsmkey"
)

// pathKeysConfig configures a key's version window, deletion, export, backup
// and automatic rotation.
func (b *backend) pathKeysConfig() *framework.Path {
	return &framework.Path{
		Pattern: "keys/" + framework.GenericNameRegex("name") + "/config",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "configure",
			OperationSuffix: "key",
		},
		Fields: map[string]*framework.FieldSchema{
			"name": {Type: framework.TypeString, Description: "Name of the key"},
			"min_decryption_version": {
				Type:        framework.TypeInt,
				Description: "Oldest version allowed to decrypt (or, for signing keys, to verify).",
			},
			"min_encryption_version": {
				Type:        framework.TypeInt,
				Description: "Oldest version allowed to encrypt (or sign); 0 allows only the latest.",
			},
			"deletion_allowed": {Type: framework.TypeBool, Description: "Whether the key may be deleted."},
			"exportable": {
				Type:        framework.TypeBool,
				Description: "Allows export of the key. Once set, it cannot be unset.",
			},
			"allow_plaintext_backup": {
				Type:        framework.TypeBool,
				Description: "Allows a plaintext backup of the key. Once set, it cannot be unset.",
			},
			"auto_rotate_period": {
				Type:        framework.TypeDurationSecond,
				Description: "How long a version lives before automatic rotation; 0 disables, otherwise at least 1h.",
			},
			"disabled": {
				Type:        framework.TypeBool,
				Description: "Suspend the key: every cryptographic operation is refused until it is set false again. Not in built-in transit.",
			},
			"max_encryptions": {
				Type:        framework.TypeInt,
				Description: "Encryptions allowed per version before the key rotates by itself; 0 for no cap. Defaults to 0.9 x 2^32 for AES-GCM keys with random nonces (NIST SP 800-38D). Not in built-in transit.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathKeysConfigWrite},
		},
		HelpSynopsis:    pathKeysConfigHelpSyn,
		HelpDescription: pathKeysConfigHelpDesc,
	}
}

// keyConfigChange is a parsed keys/:name/config request: nil fields were not
// given.
type keyConfigChange struct {
	minDecryption        *int
	minEncryption        *int
	deletionAllowed      *bool
	exportable           *bool
	allowPlaintextBackup *bool
	autoRotatePeriod     *time.Duration
}

func parseKeyConfigChange(d *framework.FieldData) (keyConfigChange, error) {
	var c keyConfigChange
	if v, ok := d.GetOk("min_decryption_version"); ok {
		n := v.(int)
		c.minDecryption = &n
	}
	if v, ok := d.GetOk("min_encryption_version"); ok {
		n := v.(int)
		c.minEncryption = &n
	}
	if v, ok := d.GetOk("deletion_allowed"); ok {
		x := v.(bool)
		c.deletionAllowed = &x
	}
	if v, ok := d.GetOk("exportable"); ok {
		x := v.(bool)
		c.exportable = &x
	}
	if v, ok := d.GetOk("allow_plaintext_backup"); ok {
		x := v.(bool)
		c.allowPlaintextBackup = &x
	}
	v, ok, err := d.GetOkErr("auto_rotate_period")
	if err != nil {
		return c, err
	}
	if ok {
		p := time.Duration(v.(int)) * time.Second
		c.autoRotatePeriod = &p
	}
	return c, nil
}

// pathKeysConfigWrite applies a configuration change to an existing key; a
// refused change leaves the key as it was.
func (b *backend) pathKeysConfigWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	change, err := parseKeyConfigChange(d)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	lcChange, err := parseLifecycleChange(d)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	k, unlock, err := b.lockKey(ctx, req.Storage, name, true)
	defer unlock()
	if err != nil {
		return nil, err
	}
	if k == nil {
		return logical.ErrorResponse(fmt.Sprintf("no existing key named %s could be found", name)), logical.ErrInvalidRequest
	}
	warning, err := k.configure(ctx, req.Storage, change, lcChange)
	if err != nil {
		return errorResponse(err)
	}
	resp, err := k.describe(ctx, req.Storage, nil)
	return withWarning(resp, err, warning)
}

// withWarning adds warning, if any, to a description that succeeded.
func withWarning(resp *logical.Response, err error, warning string) (*logical.Response, error) {
	if err == nil && warning != "" {
		resp.AddWarning(warning)
	}
	return resp, err
}

// configureHSMKey applies a configuration change to an HSM-resident key,
// held exclusively: the rules of software keys, and never exportable.
func (b *backend) configureHSMKey(ctx context.Context, s logical.Storage, k *hsmkey.Key, change keyConfigChange, lcChange lifecycleChange) (string, error) {
	if (change.exportable != nil && *change.exportable) || (change.allowPlaintextBackup != nil && *change.allowPlaintextBackup) {
		return "", callerErr("HSM-resident keys cannot be exported or backed up in plaintext: their material never leaves the HSM")
	}
	prev := hsmKeySettings(k)
	next := prev
	warning, err := next.apply(k.LatestVersion, k.MinAvailableVersion, change)
	if err != nil {
		return "", callerErr("%s", err)
	}
	if err := b.checkLifecycleChange(ctx, s, k.Name, lcChange); err != nil {
		return "", err
	}
	if next != prev {
		k.MinDecryptionVersion, k.MinEncryptionVersion = next.minDecryption, next.minEncryption
		k.DeletionAllowed, k.AutoRotatePeriod = next.deletionAllowed, next.autoRotatePeriod
		if err := b.hsmKeys.Persist(ctx, s, k); err != nil {
			k.MinDecryptionVersion, k.MinEncryptionVersion = prev.minDecryption, prev.minEncryption
			k.DeletionAllowed, k.AutoRotatePeriod = prev.deletionAllowed, prev.autoRotatePeriod
			return "", fmt.Errorf("persisting key configuration: %w", err)
		}
	}
	return warning, b.applyLifecycleChange(ctx, s, k.Name, lcChange)
}

// keySettings are the configurable fields of a policy.
type keySettings struct {
	minDecryption, minEncryption int
	deletionAllowed, exportable  bool
	allowPlaintextBackup         bool
	autoRotatePeriod             time.Duration
}

func keySettingsOf(p *keysutil.Policy) keySettings {
	return keySettings{
		minDecryption:        p.MinDecryptionVersion,
		minEncryption:        p.MinEncryptionVersion,
		deletionAllowed:      p.DeletionAllowed,
		exportable:           p.Exportable,
		allowPlaintextBackup: p.AllowPlaintextBackup,
		autoRotatePeriod:     p.AutoRotatePeriod,
	}
}

func (s keySettings) storeIn(p *keysutil.Policy) {
	p.MinDecryptionVersion = s.minDecryption
	p.MinEncryptionVersion = s.minEncryption
	p.DeletionAllowed = s.deletionAllowed
	p.Exportable = s.exportable
	p.AllowPlaintextBackup = s.allowPlaintextBackup
	p.AutoRotatePeriod = s.autoRotatePeriod
}

// apply validates c against the key and folds it into s, with built-in
// transit's rules and messages. It returns a warning for the caller.
func (s *keySettings) apply(latest, minAvailable int, c keyConfigChange) (string, error) {
	before := *s
	var warning string
	if c.minDecryption != nil {
		v := *c.minDecryption
		switch {
		case v < 0:
			return "", errors.New("min decryption version cannot be negative")
		case v == 0:
			v = 1
			warning = "since Vault 0.3, transit key numbering starts at 1; forcing minimum to 1"
		}
		if v != s.minDecryption && v > latest {
			return "", fmt.Errorf("cannot set min decryption version of %d, latest key version is %d", v, latest)
		}
		s.minDecryption = v
	}
	if c.minEncryption != nil {
		v := *c.minEncryption
		if v < 0 {
			return "", errors.New("min encryption version cannot be negative")
		}
		if v != s.minEncryption && v > latest {
			return "", fmt.Errorf("cannot set min encryption version of %d, latest key version is %d", v, latest)
		}
		s.minEncryption = v
	}
	if s.minEncryption > 0 && s.minEncryption < s.minDecryption {
		return "", fmt.Errorf("cannot set min encryption/decryption values; min encryption version of %d must be greater than or equal to min decryption version of %d", s.minEncryption, s.minDecryption)
	}
	if c.deletionAllowed != nil {
		s.deletionAllowed = *c.deletionAllowed
	}
	// Version numbering starts at 1; a key from before Vault 0.3 is upgraded.
	if s.minDecryption == 0 {
		s.minDecryption = 1
	}
	// Exportability and plaintext backup can be granted, never taken back.
	if c.exportable != nil && *c.exportable {
		s.exportable = true
	}
	if c.allowPlaintextBackup != nil && *c.allowPlaintextBackup {
		s.allowPlaintextBackup = true
	}
	if c.autoRotatePeriod != nil {
		v := *c.autoRotatePeriod
		if v != 0 && v < time.Hour {
			return "", errors.New("auto rotate period must be 0 to disable or at least an hour")
		}
		s.autoRotatePeriod = v
	}
	if *s != before {
		switch {
		case minAvailable > s.minEncryption:
			return "", errors.New("min encryption version should not be less than min available version")
		case minAvailable > s.minDecryption:
			return "", errors.New("min decryption version should not be less then min available version")
		}
	}
	return warning, nil
}

const pathKeysConfigHelpSyn = `Configure a named encryption key`

const pathKeysConfigHelpDesc = `
This path configures a key: the oldest versions allowed to decrypt and to
encrypt (min_decryption_version, min_encryption_version), whether it may be
deleted, exported or backed up in plaintext, and its automatic rotation period.
`
