package hsmtransit

import (
	"context"
	"fmt"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// pathRotate adds a new version to a key.
func (b *backend) pathRotate() *framework.Path {
	return &framework.Path{
		Pattern: "keys/" + framework.GenericNameRegex("name") + "/rotate",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "rotate",
			OperationSuffix: "key",
		},
		Fields: map[string]*framework.FieldSchema{
			"name":             {Type: framework.TypeString, Description: "Name of the key"},
			"managed_key_name": {Type: framework.TypeString, Description: "Managed key name (Vault Enterprise only; ignored)."},
			"managed_key_id":   {Type: framework.TypeString, Description: "Managed key ID (Vault Enterprise only; ignored)."},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathRotateWrite},
		},
		HelpSynopsis:    pathRotateHelpSyn,
		HelpDescription: pathRotateHelpDesc,
	}
}

// pathRotateWrite rotates the key and returns its new description.
func (b *backend) pathRotateWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	if k, unlockHSM, err := b.hsmKeyFor(ctx, req.Storage, name, true); err != nil || k != nil {
		defer unlockHSM()
		if err != nil {
			return nil, err
		}
		if err := b.hsmKeys.rotate(ctx, req.Storage, k); err != nil {
			return errorResponse(err)
		}
		b.Logger().Info("rotated HSM-resident key on request", "name", name, "version", k.LatestVersion)
		return b.describeHSMKey(ctx, req.Storage, k)
	}
	p, unlock, err := b.readPolicy(ctx, req.Storage, name, true)
	defer unlock()
	if err != nil {
		return nil, err
	}
	if p == nil {
		return logical.ErrorResponse("key not found"), logical.ErrInvalidRequest
	}
	if p.Imported && !p.AllowImportedKeyRotation {
		// keysutil refuses this with a plain error; it is the caller's to fix.
		return logical.ErrorResponse("imported key %s does not allow rotation within Vault", name), logical.ErrInvalidRequest
	}
	if err := p.Rotate(ctx, req.Storage, b.GetRandomReader()); err != nil {
		return nil, fmt.Errorf("rotating key %q: %w", name, err)
	}
	b.Logger().Info("rotated key on request", "name", name, "version", p.LatestVersion)
	return b.describeKey(ctx, req.Storage, p, nil)
}

const pathRotateHelpSyn = `Rotate named encryption key`

const pathRotateHelpDesc = `
This path rotates the named key: new encryptions use the new version, while
older versions still decrypt down to min_decryption_version.
`
