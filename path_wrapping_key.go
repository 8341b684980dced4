package hsmtransit

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"strconv"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// wrappingKeyName is where the import wrapping key lives among the policies;
// the slash keeps it out of keys/ listings.
const wrappingKeyName = "import/wrapping-key"

// pathWrappingKey returns the public half of the key that wraps imports.
func (b *backend) pathWrappingKey() *framework.Path {
	return &framework.Path{
		Pattern: "wrapping_key",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationSuffix: "wrapping-key",
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{Callback: b.pathWrappingKeyRead},
		},
		HelpSynopsis:    pathWrappingKeyHelpSyn,
		HelpDescription: pathWrappingKeyHelpDesc,
	}
}

// pathWrappingKeyRead returns the wrapping key's public key in PEM.
func (b *backend) pathWrappingKeyRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	priv, err := b.wrappingKey(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKIXPublicKey(priv.Public())
	if err != nil {
		return nil, fmt.Errorf("error marshaling RSA public key: %w", err)
	}
	return &logical.Response{Data: map[string]interface{}{
		"public_key": string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})),
	}}, nil
}

// wrappingKey returns the mount's RSA-4096 import wrapping key, creating it
// on first use.
func (b *backend) wrappingKey(ctx context.Context, s logical.Storage) (*rsa.PrivateKey, error) {
	p, _, unlock, err := b.lockedPolicy(ctx, keysutil.PolicyRequest{
		Upsert:  true,
		Storage: s,
		Name:    wrappingKeyName,
		KeyType: keysutil.KeyType_RSA4096,
	}, false)
	defer unlock()
	if err != nil {
		return nil, fmt.Errorf("loading wrapping key: %w", err)
	}
	if p == nil {
		return nil, fmt.Errorf("loading wrapping key: returned policy was nil")
	}
	entry, ok := p.Keys[strconv.Itoa(p.LatestVersion)]
	if !ok || entry.RSAKey == nil {
		return nil, fmt.Errorf("wrapping key has no RSA private key")
	}
	return entry.RSAKey, nil
}

const pathWrappingKeyHelpSyn = "Returns the public key to use for wrapping imported keys"

const pathWrappingKeyHelpDesc = `
This path returns the RSA-4096 public key that wraps keys being imported
through keys/:name/import and keys/:name/import_version.
`
