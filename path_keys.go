package hsmtransit

import (
	"context"
	"crypto/ed25519"
	"crypto/elliptic"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// pathListKeys lists the mount's keys.
func (b *backend) pathListKeys() *framework.Path {
	return &framework.Path{
		Pattern: "keys/?$",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationSuffix: "keys",
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ListOperation: &framework.PathOperation{Callback: b.pathKeysList},
		},
		HelpSynopsis:    pathKeysHelpSyn,
		HelpDescription: pathKeysHelpDesc,
	}
}

// pathKeys creates, reads and deletes one key.
func (b *backend) pathKeys() *framework.Path {
	return &framework.Path{
		Pattern: "keys/" + framework.GenericNameRegex("name"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationSuffix: "key",
		},
		Fields: map[string]*framework.FieldSchema{
			"name": {Type: framework.TypeString, Description: "Name of the key"},
			"type": {
				Type:        framework.TypeString,
				Default:     "aes256-gcm96",
				Description: `Type of key to create: aes128-gcm96, aes256-gcm96 (default), chacha20-poly1305, ecdsa-p256, ecdsa-p384, ecdsa-p521, ed25519, rsa-2048, rsa-3072, rsa-4096 or hmac.`,
			},
			"derived": {
				Type:        framework.TypeBool,
				Description: "Enables key derivation: every request must carry a context, from which a per-context key is derived.",
			},
			"convergent_encryption": {
				Type:        framework.TypeBool,
				Description: "Enables convergent encryption (requires derived): the same plaintext and context always give the same ciphertext.",
			},
			"exportable": {
				Type:        framework.TypeBool,
				Description: "Allows every version of the key to be exported. Once set, it cannot be unset.",
			},
			"allow_plaintext_backup": {
				Type:        framework.TypeBool,
				Description: "Allows a plaintext backup of the key. Once set, it cannot be unset.",
			},
			"context": {
				Type:        framework.TypeString,
				Description: "Base64-encoded context; on read of a derived ed25519 key, returns the public key for this context.",
			},
			"auto_rotate_period": {
				Type:        framework.TypeDurationSecond,
				Default:     0,
				Description: "How long a version lives before the key is rotated automatically; 0 (default) disables, otherwise at least 1h.",
			},
			"key_size": {
				Type:        framework.TypeInt,
				Default:     0,
				Description: fmt.Sprintf("Key size in bytes; only for hmac keys, from %d to %d (default %d).", keysutil.HmacMinKeySize, keysutil.HmacMaxKeySize, defaultHMACKeySize),
			},
			"managed_key_name": {Type: framework.TypeString, Description: "Managed key name (Vault Enterprise only; refused)."},
			"managed_key_id":   {Type: framework.TypeString, Description: "Managed key ID (Vault Enterprise only; refused)."},
			"parameter_set":    {Type: framework.TypeString, Description: "ML-DSA or SLH-DSA parameter set (Vault Enterprise only; refused)."},
			"hybrid_key_type_pqc": {
				Type:        framework.TypeString,
				Description: "Post-quantum half of a hybrid key (Vault Enterprise only; refused).",
			},
			"hybrid_key_type_ec": {
				Type:        framework.TypeString,
				Description: "Elliptic-curve half of a hybrid key (Vault Enterprise only; refused).",
			},
			"hsm": {
				Type:        framework.TypeBool,
				Description: "Keep the key in the HSM: every version is generated, used and destroyed inside the token (aes256-gcm96 only). Not in built-in transit.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{
				Callback:     b.pathKeysWrite,
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "create"},
			},
			logical.ReadOperation: &framework.PathOperation{
				Callback:     b.pathKeysRead,
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "read"},
			},
			logical.DeleteOperation: &framework.PathOperation{
				Callback:     b.pathKeysDelete,
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "delete"},
			},
		},
		HelpSynopsis:    pathKeysHelpSyn,
		HelpDescription: pathKeysHelpDesc,
	}
}

// pathKeysList lists key names, leaving out internal entries below a slash.
func (b *backend) pathKeysList(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	entries, err := req.Storage.List(ctx, policyPrefix)
	if err != nil {
		return nil, fmt.Errorf("listing keys: %w", err)
	}
	hsmEntries, err := req.Storage.List(ctx, hsmKeyPrefix)
	if err != nil {
		return nil, fmt.Errorf("listing HSM-resident keys: %w", err)
	}
	names := make([]string, 0, len(entries)+len(hsmEntries))
	for _, e := range append(entries, hsmEntries...) {
		if !strings.HasSuffix(e, "/") {
			names = append(names, e)
		}
	}
	sort.Strings(names)
	return logical.ListResponse(names), nil
}

// keyTypes maps the API's key type names to keysutil's.
var keyTypes = map[string]keysutil.KeyType{
	"aes128-gcm96":      keysutil.KeyType_AES128_GCM96,
	"aes256-gcm96":      keysutil.KeyType_AES256_GCM96,
	"chacha20-poly1305": keysutil.KeyType_ChaCha20_Poly1305,
	"ecdsa-p256":        keysutil.KeyType_ECDSA_P256,
	"ecdsa-p384":        keysutil.KeyType_ECDSA_P384,
	"ecdsa-p521":        keysutil.KeyType_ECDSA_P521,
	"ed25519":           keysutil.KeyType_ED25519,
	"rsa-2048":          keysutil.KeyType_RSA2048,
	"rsa-3072":          keysutil.KeyType_RSA3072,
	"rsa-4096":          keysutil.KeyType_RSA4096,
	"hmac":              keysutil.KeyType_HMAC,
	// Known to Vault but implemented only in Vault Enterprise: refused by
	// parseKeyType with transit's message.
	"managed_key": keysutil.KeyType_MANAGED_KEY,
	"aes128-cmac": keysutil.KeyType_AES128_CMAC,
	"aes192-cmac": keysutil.KeyType_AES192_CMAC,
	"aes256-cmac": keysutil.KeyType_AES256_CMAC,
	"ml-dsa":      keysutil.KeyType_ML_DSA,
	"slh-dsa":     keysutil.KeyType_SLH_DSA,
	"hybrid":      keysutil.KeyType_HYBRID,
	"aes128-cbc":  keysutil.KeyType_AES128_CBC,
	"aes256-cbc":  keysutil.KeyType_AES256_CBC,
}

// parseKeyType turns a type name into a key type this engine can create, or
// a caller-facing error.
func parseKeyType(name string) (keysutil.KeyType, error) {
	kt, ok := keyTypes[name]
	if !ok {
		return 0, fmt.Errorf("unknown key type %v", name)
	}
	if kt.IsEnterpriseOnly() {
		return 0, fmt.Errorf(errEnterpriseOnly, kt)
	}
	return kt, nil
}

// defaultHMACKeySize is the size in bytes of an hmac key created without
// key_size.
const defaultHMACKeySize = 32

// keyCreateRequest turns the create fields into a policy request, or a
// caller-facing error.
func keyCreateRequest(req *logical.Request, d *framework.FieldData) (keysutil.PolicyRequest, error) {
	derived := d.Get("derived").(bool)
	convergent := d.Get("convergent_encryption").(bool)
	autoRotate := time.Duration(d.Get("auto_rotate_period").(int)) * time.Second
	keySize := d.Get("key_size").(int)

	if autoRotate != 0 && autoRotate < time.Hour {
		return keysutil.PolicyRequest{}, fmt.Errorf("auto rotate period must be 0 to disable or at least an hour")
	}
	if convergent && !derived {
		return keysutil.PolicyRequest{}, fmt.Errorf("convergent encryption requires derivation to be enabled")
	}
	kt, err := parseKeyType(d.Get("type").(string))
	if err != nil {
		return keysutil.PolicyRequest{}, err
	}
	if kt == keysutil.KeyType_HMAC && keySize == 0 {
		// Built-in transit fails (500) without a key_size; a 256-bit key
		// is the sensible default, and the size every other key's HMAC key has.
		keySize = defaultHMACKeySize
	}
	if keySize != 0 {
		if kt != keysutil.KeyType_HMAC {
			return keysutil.PolicyRequest{}, fmt.Errorf("key_size is not valid for algorithm %v", kt)
		}
		if keySize < keysutil.HmacMinKeySize || keySize > keysutil.HmacMaxKeySize {
			return keysutil.PolicyRequest{}, fmt.Errorf("invalid key_size %d", keySize)
		}
	}
	if err := checkDerivation(kt, derived, convergent); err != nil {
		return keysutil.PolicyRequest{}, err
	}
	return keysutil.PolicyRequest{
		Upsert:               true,
		Storage:              req.Storage,
		Name:                 d.Get("name").(string),
		KeyType:              kt,
		KeySize:              keySize,
		Derived:              derived,
		Convergent:           convergent,
		Exportable:           d.Get("exportable").(bool),
		AllowPlaintextBackup: d.Get("allow_plaintext_backup").(bool),
		AutoRotatePeriod:     autoRotate,
	}, nil
}

// checkDerivation refuses derivation and convergence where the key type has
// neither, with keysutil's messages, before anything is created.
func checkDerivation(kt keysutil.KeyType, derived, convergent bool) error {
	switch {
	case kt == keysutil.KeyType_ED25519 && convergent:
		return fmt.Errorf("convergent encryption not supported for keys of type %v", kt)
	case kt == keysutil.KeyType_ED25519, kt.DerivationSupported():
		return nil
	case derived || convergent:
		return fmt.Errorf("key derivation and convergent encryption not supported for keys of type %v", kt)
	}
	return nil
}

// pathKeysWrite creates a key, or returns the existing one with a warning.
func (b *backend) pathKeysWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	// One name, one key: software and HSM-resident creation exclude each
	// other.
	lock := locksutil.LockForKey(b.hsmKeys.Locks, name)
	lock.Lock()
	defer lock.Unlock()
	if k, unlock, err := b.hsmKeyFor(ctx, req.Storage, name, false); err != nil || k != nil {
		defer unlock()
		if err != nil {
			return nil, err
		}
		resp, err := b.describeHSMKey(ctx, req.Storage, k)
		if err != nil {
			return nil, err
		}
		resp.AddWarning(fmt.Sprintf("key %s already existed", name))
		return resp, nil
	}
	if d.Get("hsm").(bool) {
		return b.createHSMKey(ctx, req, d)
	}
	polReq, err := keyCreateRequest(req, d)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	p, upserted, unlock, err := b.lockedPolicy(ctx, polReq, true)
	defer unlock()
	if errors.Is(err, errRelativeKeyName) {
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("creating key: %w", err)
	}
	if p == nil {
		return nil, fmt.Errorf("creating key: returned policy was nil")
	}
	resp, err := b.describeKey(ctx, req.Storage, p, nil)
	if err != nil {
		return nil, err
	}
	if !upserted {
		resp.AddWarning(fmt.Sprintf("key %s already existed", polReq.Name))
	}
	return resp, nil
}

// createHSMKey creates an HSM-resident key; the name lock is held.
func (b *backend) createHSMKey(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	if err := checkHSMKeyRequest(d); err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	if p, unlock, err := b.readPolicy(ctx, req.Storage, name, false); err != nil || p != nil {
		unlock()
		if err != nil {
			return nil, err
		}
		return logical.ErrorResponse("key %s already exists as a software key; residency is chosen when a key is created", name), logical.ErrInvalidRequest
	}
	k, err := b.hsmKeys.Create(ctx, req.Storage, name, time.Duration(d.Get("auto_rotate_period").(int))*time.Second)
	if err != nil {
		return errorResponse(err)
	}
	k.RLock()
	defer k.RUnlock()
	b.Logger().Info("created HSM-resident key", "name", name)
	return b.describeHSMKey(ctx, req.Storage, k)
}

// checkHSMKeyRequest refuses, with a reason, what an HSM-resident key
// cannot be.
func checkHSMKeyRequest(d *framework.FieldData) error {
	if t := d.Get("type").(string); t != hsmKeyType {
		return fmt.Errorf("HSM-resident keys support type %s only, not %s", hsmKeyType, t)
	}
	for _, f := range []struct{ field, why string }{
		{"derived", "HSM-resident keys are not derived: the key never leaves the HSM to have a per-context key derived from it"},
		{"convergent_encryption", "HSM-resident keys do not support convergent encryption"},
		{"exportable", "HSM-resident keys cannot be exportable: their material never leaves the HSM"},
		{"allow_plaintext_backup", "HSM-resident keys cannot be backed up in plaintext: their material never leaves the HSM"},
	} {
		if d.Get(f.field).(bool) {
			return errors.New(f.why)
		}
	}
	if d.Get("key_size").(int) != 0 {
		return errors.New("key_size is not valid for HSM-resident keys")
	}
	if p := time.Duration(d.Get("auto_rotate_period").(int)) * time.Second; p != 0 && p < time.Hour {
		return errors.New("auto rotate period must be 0 to disable or at least an hour")
	}
	return nil
}

// pathKeysRead describes a key; 404 when it does not exist.
func (b *backend) pathKeysRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	var keyContext []byte
	if raw := d.Get("context").(string); raw != "" {
		var err error
		if keyContext, err = base64.StdEncoding.DecodeString(raw); err != nil {
			return logical.ErrorResponse("failed to base64-decode context"), logical.ErrInvalidRequest
		}
	}
	k, unlock, err := b.lockKey(ctx, req.Storage, d.Get("name").(string), false)
	defer unlock()
	if err != nil || k == nil {
		return nil, err
	}
	return k.describe(ctx, req.Storage, keyContext)
}

// pathKeysDelete deletes a key whose deletion_allowed is set.
func (b *backend) pathKeysDelete(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	if err := b.deleteKey(ctx, req.Storage, d.Get("name").(string), false); err != nil {
		return errorResponse(err)
	}
	return nil, nil
}

// formatKeyPolicy describes a key as built-in transit does. The caller holds
// the policy's lock.
func formatKeyPolicy(p *keysutil.Policy, keyContext []byte) (*logical.Response, error) {
	data := map[string]interface{}{
		"name":                   p.Name,
		"type":                   p.Type.String(),
		"derived":                p.Derived,
		"deletion_allowed":       p.DeletionAllowed,
		"min_available_version":  p.MinAvailableVersion,
		"min_decryption_version": p.MinDecryptionVersion,
		"min_encryption_version": p.MinEncryptionVersion,
		"latest_version":         p.LatestVersion,
		"exportable":             p.Exportable,
		"allow_plaintext_backup": p.AllowPlaintextBackup,
		"supports_encryption":    p.Type.EncryptionSupported(),
		"supports_decryption":    p.Type.DecryptionSupported(),
		"supports_signing":       p.Type.SigningSupported(),
		"supports_derivation":    p.Type.DerivationSupported(),
		"auto_rotate_period":     int64(p.AutoRotatePeriod.Seconds()),
		"imported_key":           p.Imported,
	}
	if p.KeySize != 0 {
		data["key_size"] = p.KeySize
	}
	if p.Imported {
		data["imported_key_allow_rotation"] = p.AllowImportedKeyRotation
	}
	if p.BackupInfo != nil {
		data["backup_info"] = map[string]interface{}{"time": p.BackupInfo.Time, "version": p.BackupInfo.Version}
	}
	if p.RestoreInfo != nil {
		data["restore_info"] = map[string]interface{}{"time": p.RestoreInfo.Time, "version": p.RestoreInfo.Version}
	}
	if p.Derived {
		switch p.KDF {
		case keysutil.Kdf_hmac_sha256_counter:
			data["kdf"] = "hmac-sha256-counter"
			data["kdf_mode"] = "hmac-sha256-counter"
		case keysutil.Kdf_hkdf_sha256:
			data["kdf"] = "hkdf_sha256"
		}
		data["convergent_encryption"] = p.ConvergentEncryption
		if p.ConvergentEncryption {
			data["convergent_encryption_version"] = p.ConvergentVersion
		}
	}

	switch {
	case p.Type.EncryptionSupported() && !p.Type.SigningSupported():
		// Symmetric keys: version -> creation time in Unix seconds.
		versions := make(map[string]int64, len(p.Keys))
		for v, k := range p.Keys {
			versions[v] = k.DeprecatedCreationTime
		}
		data["keys"] = versions
	case p.Type.SigningSupported():
		versions := make(map[string]map[string]interface{}, len(p.Keys))
		for v, k := range p.Keys {
			desc, err := describeAsymmetricVersion(p, v, k, keyContext)
			if err != nil {
				return nil, err
			}
			versions[v] = desc
		}
		data["keys"] = versions
	}
	return &logical.Response{Data: data}, nil
}

// describeAsymmetricVersion gives one version of a signing key: its public
// key, certificate chain and creation time.
func describeAsymmetricVersion(p *keysutil.Policy, version string, k keysutil.KeyEntry, keyContext []byte) (map[string]interface{}, error) {
	created := k.CreationTime
	if created.IsZero() {
		created = time.Unix(k.DeprecatedCreationTime, 0)
	}
	desc := map[string]interface{}{
		"name":              "",
		"public_key":        k.FormattedPublicKey,
		"certificate_chain": pemChain(k.CertificateChain),
		"creation_time":     created,
		"hybrid_public_key": "",
	}
	switch p.Type {
	case keysutil.KeyType_ECDSA_P256:
		desc["name"] = elliptic.P256().Params().Name
	case keysutil.KeyType_ECDSA_P384:
		desc["name"] = elliptic.P384().Params().Name
	case keysutil.KeyType_ECDSA_P521:
		desc["name"] = elliptic.P521().Params().Name
	case keysutil.KeyType_ED25519:
		desc["name"] = "ed25519"
		if p.Derived {
			// A derived key has a public key per context only.
			desc["public_key"] = ""
			if len(keyContext) != 0 {
				ver, err := strconv.Atoi(version)
				if err != nil {
					return nil, fmt.Errorf("invalid version %q: %w", version, err)
				}
				priv, err := p.GetKey(keyContext, ver, 32)
				if err != nil {
					return nil, fmt.Errorf("deriving key for its public half: %w", err)
				}
				desc["public_key"] = base64.StdEncoding.EncodeToString(ed25519.PrivateKey(priv).Public().(ed25519.PublicKey))
			}
		}
	case keysutil.KeyType_RSA2048, keysutil.KeyType_RSA3072, keysutil.KeyType_RSA4096:
		desc["name"] = p.Type.String()
		pub, err := encodeRSAPublicKey(&k)
		if err != nil {
			return nil, err
		}
		desc["public_key"] = pub
	}
	return desc, nil
}

// pemChain joins a DER certificate chain into concatenated PEM blocks.
func pemChain(chain [][]byte) string {
	if chain == nil {
		return ""
	}
	blocks := make([]string, 0, len(chain))
	for _, der := range chain {
		blocks = append(blocks, strings.TrimSpace(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))))
	}
	return strings.Join(blocks, "\n")
}

const pathKeysHelpSyn = `Manage named encryption keys`

const pathKeysHelpDesc = `
This path creates, reads and deletes named keys. Writing to a new name
creates a key of the given type from fresh random bytes; writing to an existing
name returns it unchanged with a warning. A key can be deleted only once its
deletion_allowed is set through keys/:name/config.
`
