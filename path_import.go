package hsmtransit

import (
	"context"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"errors"
	"fmt"
	"hash"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/tink-crypto/tink-go/v2/kwp/subtle"
)

// wrappedEphemeralKeyBytes is the size of the RSA-4096-OAEP-wrapped AES key
// at the start of an import ciphertext.
const wrappedEphemeralKeyBytes = 512

// importKeyFields are the fields import and import_version share.
func importKeyFields() map[string]*framework.FieldSchema {
	return map[string]*framework.FieldSchema{
		"name": {Type: framework.TypeString, Description: "The name of the key"},
		"ciphertext": {
			Type:        framework.TypeString,
			Description: "Base64 of: an ephemeral AES-256 key wrapped with RSA-OAEP by the wrapping key, then the key to import wrapped by that AES key (KWP, RFC 5649).",
		},
		"public_key": {
			Type:        framework.TypeString,
			Description: "PEM public key to import instead (asymmetric types only); ignored when ciphertext is set.",
		},
		"hash_function": {
			Type:        framework.TypeString,
			Default:     "SHA256",
			Description: "Hash of the RSA-OAEP step: SHA1, SHA224, SHA256 (default), SHA384 or SHA512.",
		},
	}
}

// pathImport imports an externally generated key as a new key.
func (b *backend) pathImport() *framework.Path {
	fields := importKeyFields()
	fields["type"] = &framework.FieldSchema{
		Type:        framework.TypeString,
		Default:     "aes256-gcm96",
		Description: "Type of the key being imported; any type keys/:name can create.",
	}
	fields["allow_rotation"] = &framework.FieldSchema{Type: framework.TypeBool, Description: "Allows Vault to rotate the imported key."}
	fields["derived"] = &framework.FieldSchema{Type: framework.TypeBool, Description: "Enables key derivation."}
	fields["exportable"] = &framework.FieldSchema{Type: framework.TypeBool, Description: "Allows export of the key."}
	fields["allow_plaintext_backup"] = &framework.FieldSchema{Type: framework.TypeBool, Description: "Allows a plaintext backup of the key."}
	fields["context"] = &framework.FieldSchema{Type: framework.TypeString, Description: "Base64-encoded context for key derivation."}
	fields["auto_rotate_period"] = &framework.FieldSchema{
		Type:        framework.TypeDurationSecond,
		Default:     0,
		Description: "Automatic rotation period (requires allow_rotation); 0 disables.",
	}
	return &framework.Path{
		Pattern: "keys/" + framework.GenericNameRegex("name") + "/import",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "import",
			OperationSuffix: "key",
		},
		Fields: fields,
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathImportWrite},
		},
		HelpSynopsis:    pathImportHelpSyn,
		HelpDescription: pathImportHelpDesc,
	}
}

// pathImportVersion imports a new version (or a private half) into an
// imported key.
func (b *backend) pathImportVersion() *framework.Path {
	fields := importKeyFields()
	fields["version"] = &framework.FieldSchema{
		Type:        framework.TypeInt,
		Description: "Version whose missing private key to import; a new version when omitted.",
	}
	return &framework.Path{
		Pattern: "keys/" + framework.GenericNameRegex("name") + "/import_version",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "import",
			OperationSuffix: "key-version",
		},
		Fields: fields,
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathImportVersionWrite},
		},
		HelpSynopsis:    pathImportVersionHelpSyn,
		HelpDescription: pathImportVersionHelpDesc,
	}
}

// importIsPrivate tells a private-key import (ciphertext) from a public-key
// one, refusing both or neither.
func importIsPrivate(d *framework.FieldData) (bool, error) {
	_, ct := d.Raw["ciphertext"]
	_, pub := d.Raw["public_key"]
	switch {
	case ct && pub:
		return false, errors.New("only one of the following fields, ciphertext and public_key, can be set")
	case !ct && !pub:
		return false, errors.New("one of ciphertext (a wrapped private key) or public_key is required")
	}
	return ct, nil
}

// importRequest turns the import fields into a policy request.
func importRequest(req *logical.Request, d *framework.FieldData) (keysutil.PolicyRequest, error) {
	if _, ok := d.Raw["convergent_encryption"]; ok {
		return keysutil.PolicyRequest{}, errors.New("import cannot be used on keys with convergent encryption enabled")
	}
	autoRotate := time.Duration(d.Get("auto_rotate_period").(int)) * time.Second
	allowRotation := d.Get("allow_rotation").(bool)
	if autoRotate > 0 && !allowRotation {
		return keysutil.PolicyRequest{}, errors.New("allow_rotation must be set to true if auto-rotation is enabled")
	}
	if autoRotate != 0 && autoRotate < time.Hour {
		return keysutil.PolicyRequest{}, errors.New("auto rotate period must be 0 to disable or at least an hour")
	}
	isPrivate, err := importIsPrivate(d)
	if err != nil {
		return keysutil.PolicyRequest{}, err
	}
	kt, err := parseKeyType(strings.ToLower(d.Get("type").(string)))
	if err != nil {
		return keysutil.PolicyRequest{}, err
	}
	derived := d.Get("derived").(bool)
	if err := checkDerivation(kt, derived, false); err != nil {
		return keysutil.PolicyRequest{}, err
	}
	if !isPrivate && !kt.ImportPublicKeySupported() {
		return keysutil.PolicyRequest{}, errors.New("provided type does not support public_key import")
	}
	return keysutil.PolicyRequest{
		Storage:                  req.Storage,
		Name:                     d.Get("name").(string),
		KeyType:                  kt,
		Derived:                  derived,
		Exportable:               d.Get("exportable").(bool),
		AllowPlaintextBackup:     d.Get("allow_plaintext_backup").(bool),
		AutoRotatePeriod:         autoRotate,
		AllowImportedKeyRotation: allowRotation,
		IsPrivateKey:             isPrivate,
	}, nil
}

// pathImportWrite creates a key from imported material.
func (b *backend) pathImportWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	polReq, err := importRequest(req, d)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	existing, unlock, err := b.readPolicy(ctx, req.Storage, polReq.Name, false)
	unlock()
	if err != nil {
		return nil, err
	}
	if existing != nil {
		return logical.ErrorResponse("the import path cannot be used with an existing key; use import-version to rotate an existing imported key"), logical.ErrInvalidRequest
	}
	key, err := b.importedKeyMaterial(ctx, req.Storage, d, polReq.KeyType, polReq.IsPrivateKey)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	err = b.withLM(ctx, req.Storage, func(lm *keysutil.LockManager) error {
		return lm.ImportPolicy(ctx, polReq, key, b.GetRandomReader())
	})
	if err != nil {
		// keysutil's import errors describe the material the caller sent.
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	return nil, nil
}

// pathImportVersionWrite adds imported material to an imported key.
func (b *backend) pathImportVersionWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	isPrivate, err := importIsPrivate(d)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	p, unlock, err := b.readPolicy(ctx, req.Storage, name, true)
	defer unlock()
	switch {
	case err != nil:
		return nil, err
	case p == nil:
		return logical.ErrorResponse(fmt.Sprintf("no key found with name %s; to import a new key, use the import/ endpoint", name)), logical.ErrInvalidRequest
	case !p.Imported:
		return logical.ErrorResponse("the import_version endpoint can only be used with an imported key"), logical.ErrInvalidRequest
	case p.ConvergentEncryption:
		return logical.ErrorResponse("import_version cannot be used on keys with convergent encryption enabled"), logical.ErrInvalidRequest
	case !isPrivate && !p.Type.ImportPublicKeySupported():
		return logical.ErrorResponse("provided type does not support public_key import"), logical.ErrInvalidRequest
	}
	key, err := b.importedKeyMaterial(ctx, req.Storage, d, p.Type, isPrivate)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	if v, ok := d.GetOk("version"); ok {
		if err = p.KeyVersionCanBeUpdated(v.(int), isPrivate); err == nil {
			err = p.ImportPrivateKeyForVersion(ctx, req.Storage, v.(int), key)
		}
	} else {
		err = p.ImportPublicOrPrivate(ctx, req.Storage, key, isPrivate, b.GetRandomReader())
	}
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	return nil, nil
}

// importedKeyMaterial returns the key to import: unwrapped from ciphertext,
// or the PEM public key as given.
func (b *backend) importedKeyMaterial(ctx context.Context, s logical.Storage, d *framework.FieldData, kt keysutil.KeyType, isPrivate bool) ([]byte, error) {
	if !isPrivate {
		return []byte(d.Get("public_key").(string)), nil
	}
	h, err := parseHashFn(d.Get("hash_function").(string))
	if err != nil {
		return nil, err
	}
	ct, err := base64.StdEncoding.DecodeString(d.Get("ciphertext").(string))
	if err != nil {
		return nil, fmt.Errorf("ciphertext is not valid base64: %w", err)
	}
	return b.unwrapImport(ctx, s, ct, h)
}

// unwrapImport opens an import ciphertext: RSA-OAEP with the wrapping key for
// the ephemeral AES key, then KWP for the key itself.
func (b *backend) unwrapImport(ctx context.Context, s logical.Storage, ct []byte, h hash.Hash) ([]byte, error) {
	if len(ct) <= wrappedEphemeralKeyBytes {
		return nil, errors.New("provided ciphertext is too short")
	}
	wrapping, err := b.wrappingKey(ctx, s)
	if err != nil {
		return nil, err
	}
	ephemeral, err := rsa.DecryptOAEP(h, b.GetRandomReader(), wrapping, ct[:wrappedEphemeralKeyBytes], nil)
	if err != nil {
		return nil, fmt.Errorf("unwrapping the ephemeral AES key (check hash_function and that the wrapping key is this mount's): %w", err)
	}
	defer clear(ephemeral)
	if len(ephemeral) != 32 {
		return nil, errors.New("expected ephemeral AES key to be 256-bit")
	}
	kwp, err := subtle.NewKWP(ephemeral)
	if err != nil {
		return nil, fmt.Errorf("preparing KWP: %w", err)
	}
	key, err := kwp.Unwrap(ct[wrappedEphemeralKeyBytes:])
	if err != nil {
		return nil, fmt.Errorf("unwrapping the imported key: %w", err)
	}
	return key, nil
}

// parseHashFn resolves the OAEP hash names of import and byok-export.
func parseHashFn(name string) (hash.Hash, error) {
	switch strings.ToUpper(name) {
	case "SHA1":
		return sha1.New(), nil
	case "SHA224":
		return sha256.New224(), nil
	case "SHA256":
		return sha256.New(), nil
	case "SHA384":
		return sha512.New384(), nil
	case "SHA512":
		return sha512.New(), nil
	}
	return nil, fmt.Errorf("unknown hash function: %s", name)
}

const pathImportHelpSyn = "Imports an externally-generated key into a new transit key"

const pathImportHelpDesc = `
This path creates a key from material generated elsewhere, wrapped with the
key from wrapping_key (or, for asymmetric types, from a plaintext public key).
It cannot replace an existing key; use import_version for that.
`

const pathImportVersionHelpSyn = "Imports an externally-generated key into an existing imported key"

const pathImportVersionHelpDesc = `
This path adds a version to an imported key from material generated elsewhere,
or with version set, supplies the private half of a version imported as a
public key only.
`
