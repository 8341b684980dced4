package hsmtransit

import (
	"context"

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
	k, unlock, err := b.lockKey(ctx, req.Storage, name, true)
	defer unlock()
	if err != nil {
		return nil, err
	}
	if k == nil {
		return logical.ErrorResponse("key not found"), logical.ErrInvalidRequest
	}
	if err := k.rotate(ctx, req.Storage); err != nil {
		return errorResponse(err)
	}
	b.Logger().Info("rotated key on request", "name", name, "residency", k.residency(), "version", k.latest())
	return k.describe(ctx, req.Storage, nil)
}

const pathRotateHelpSyn = `Rotate named encryption key`

const pathRotateHelpDesc = `
This path rotates the named key: new encryptions use the new version, while
older versions still decrypt down to min_decryption_version.
`
