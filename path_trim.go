package hsmtransit

import (
	"context"
	"errors"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// pathTrim deletes a key's oldest versions for good.
func (b *backend) pathTrim() *framework.Path {
	return &framework.Path{
		Pattern: "keys/" + framework.GenericNameRegex("name") + "/trim",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "trim",
			OperationSuffix: "key",
		},
		Fields: map[string]*framework.FieldSchema{
			"name": {Type: framework.TypeString, Description: "Name of the key"},
			"min_available_version": {
				Type:        framework.TypeInt,
				Description: "Versions below this one are permanently deleted. At most the lesser of min_decryption_version and min_encryption_version.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathTrimWrite},
		},
		HelpSynopsis:    pathTrimHelpSyn,
		HelpDescription: pathTrimHelpDesc,
	}
}

// pathTrimWrite raises min_available_version and persists the trimmed key.
func (b *backend) pathTrimWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	raw, ok, err := d.GetOkErr("min_available_version")
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	k, unlock, err := b.lockKey(ctx, req.Storage, d.Get("name").(string), true)
	defer unlock()
	if err != nil {
		return nil, err
	}
	if k == nil {
		return logical.ErrorResponse("invalid key name"), logical.ErrInvalidRequest
	}
	if !ok {
		return logical.ErrorResponse("missing min_available_version"), logical.ErrInvalidRequest
	}
	if err := k.trim(ctx, req.Storage, raw.(int)); err != nil {
		return errorResponse(err)
	}
	return k.describe(ctx, req.Storage, nil)
}

// checkTrim applies built-in transit's rules for min_available_version.
func checkTrim(minAvailable, minEncryption, minDecryption, v int) error {
	switch {
	case v < minAvailable:
		return errors.New("minimum available version cannot be decremented")
	case minEncryption == 0:
		return errors.New("minimum available version cannot be set when minimum encryption version is not set")
	case minDecryption == 0:
		return errors.New("minimum available version cannot be set when minimum decryption version is not set")
	case v > minEncryption:
		return errors.New("minimum available version cannot be greater than minmum encryption version")
	case v > minDecryption:
		return errors.New("minimum available version cannot be greater than minimum decryption version")
	case v < 0:
		return errors.New("minimum available version cannot be negative")
	case v == 0:
		return errors.New("minimum available version should be positive")
	}
	return nil
}

const pathTrimHelpSyn = `Trim key versions of a named key`

const pathTrimHelpDesc = `
This path permanently deletes the versions of a key below min_available_version.
Trimming only happens from the lower end of version numbers.
`
