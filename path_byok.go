package hsmtransit

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"fmt"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// pathBYOKExport exports a key wrapped for import into another transit
// engine, under that engine's wrapping key (imported here as an RSA key).
func (b *backend) pathBYOKExport() *framework.Path {
	return &framework.Path{
		Pattern: "byok-export/" + framework.GenericNameRegex("destination") + "/" + framework.GenericNameRegex("source") + framework.OptionalParamRegex("version"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "byok",
			OperationSuffix: "key|key-version",
		},
		Fields: map[string]*framework.FieldSchema{
			"destination": {Type: framework.TypeString, Description: "RSA key to wrap with: usually another engine's wrapping key, imported as a public key."},
			"source":      {Type: framework.TypeString, Description: "Exportable key to export."},
			"version":     {Type: framework.TypeString, Description: "Version to export: a number, v<number> or latest; all when omitted."},
			"hash": {
				Type:        framework.TypeString,
				Default:     "SHA256",
				Description: "Hash for the RSA-OAEP step: SHA1, SHA224, SHA256 (default), SHA384 or SHA512.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{Callback: b.pathBYOKExportRead},
		},
		HelpSynopsis:    pathBYOKExportHelpSyn,
		HelpDescription: pathBYOKExportHelpDesc,
	}
}

// pathBYOKExportRead wraps each selected version of the source key.
func (b *backend) pathBYOKExportRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	hashName := d.Get("hash").(string)
	if _, err := parseHashFn(hashName); err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	dst, unlockDst, err := b.readPolicy(ctx, req.Storage, d.Get("destination").(string), false)
	defer unlockDst()
	if err != nil {
		return nil, err
	}
	if dst == nil {
		return logical.ErrorResponse("no such destination key to export to"), logical.ErrInvalidRequest
	}
	if !dst.Type.PaddingSchemesSupported() {
		return logical.ErrorResponse("destination key must be an RSA key, not %s", dst.Type), logical.ErrInvalidRequest
	}
	srcName := d.Get("source").(string)
	if srcName == dst.Name {
		// Both locks are shared, but a second lookup of the same name would
		// take the same policy lock twice.
		return logical.ErrorResponse("source and destination must be different keys"), logical.ErrInvalidRequest
	}
	src, unlockSrc, err := b.readPolicy(ctx, req.Storage, srcName, false)
	defer unlockSrc()
	if err != nil {
		return nil, err
	}
	if src == nil {
		return logical.ErrorResponse("no such source key for export"), logical.ErrInvalidRequest
	}
	if !src.Exportable {
		return logical.ErrorResponse("key is not exportable"), logical.ErrInvalidRequest
	}
	versions, err := selectVersions(src, d.Get("version").(string))
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	keys := make(map[string]string, len(versions))
	for _, v := range versions {
		entry := src.Keys[v]
		if entry.IsPrivateKeyMissing() {
			return logical.ErrorResponse("version %s of key %s has no private key to export (imported as a public key)", v, src.Name), logical.ErrInvalidRequest
		}
		wrapped, err := wrapForExport(dst, src.Type, &entry, hashName)
		if err != nil {
			return nil, fmt.Errorf("wrapping version %s: %w", v, err)
		}
		keys[v] = wrapped
	}
	return &logical.Response{Data: map[string]interface{}{
		"name": src.Name,
		"type": src.Type.String(),
		"keys": keys,
	}}, nil
}

// wrapForExport wraps one version's private material under dst's latest
// version, in the format keys/:name/import takes.
func wrapForExport(dst *keysutil.Policy, kt keysutil.KeyType, k *keysutil.KeyEntry, hashName string) (string, error) {
	var target any
	switch kt {
	case keysutil.KeyType_AES128_GCM96, keysutil.KeyType_AES256_GCM96, keysutil.KeyType_ChaCha20_Poly1305, keysutil.KeyType_HMAC:
		target = k.Key
	case keysutil.KeyType_RSA2048, keysutil.KeyType_RSA3072, keysutil.KeyType_RSA4096:
		target = k.RSAKey
	case keysutil.KeyType_ECDSA_P256, keysutil.KeyType_ECDSA_P384, keysutil.KeyType_ECDSA_P521:
		target = &ecdsa.PrivateKey{PublicKey: *ecPublic(k, curveOf(kt)), D: k.EC_D}
	case keysutil.KeyType_ED25519:
		target = ed25519.PrivateKey(k.Key)
	default:
		return "", fmt.Errorf("unable to export to unknown key type: %v", kt)
	}
	h, err := parseHashFn(hashName)
	if err != nil {
		return "", err
	}
	return dst.WrapKey(0, target, kt, h)
}

const pathBYOKExportHelpSyn = `Securely export named encryption or signing key`

const pathBYOKExportHelpDesc = `
This path exports an exportable key wrapped for another transit engine: the
destination is that engine's wrapping key (read from its wrapping_key path and
imported here as an rsa-4096 public key), and the result goes to its
keys/:name/import path. Unlike export/, the key material never travels in
plaintext.
`
