package hsmtransit

import (
	"context"
	"errors"
	"fmt"

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
	if k, unlockHSM, err := b.hsmKeyFor(ctx, req.Storage, d.Get("name").(string), true); err != nil || k != nil {
		defer unlockHSM()
		if err != nil {
			return nil, err
		}
		if !ok {
			return logical.ErrorResponse("missing min_available_version"), logical.ErrInvalidRequest
		}
		return b.trimHSMKey(ctx, req.Storage, k, raw.(int))
	}
	p, unlock, err := b.readPolicy(ctx, req.Storage, d.Get("name").(string), true)
	defer unlock()
	if err != nil {
		return nil, err
	}
	if p == nil {
		return logical.ErrorResponse("invalid key name"), logical.ErrInvalidRequest
	}
	if !ok {
		return logical.ErrorResponse("missing min_available_version"), logical.ErrInvalidRequest
	}
	minAvailable := raw.(int)
	if err := checkTrim(p.MinAvailableVersion, p.MinEncryptionVersion, p.MinDecryptionVersion, minAvailable); err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	prev := p.MinAvailableVersion
	p.MinAvailableVersion = minAvailable
	if err := p.Persist(ctx, req.Storage); err != nil {
		p.MinAvailableVersion = prev
		return nil, fmt.Errorf("persisting trimmed key: %w", err)
	}
	return b.describeKey(ctx, req.Storage, p, nil)
}

// trimHSMKey raises an HSM-resident key's min_available_version and destroys
// the objects of the versions below it; the key is held exclusively.
func (b *backend) trimHSMKey(ctx context.Context, s logical.Storage, k *hsmKey, minAvailable int) (*logical.Response, error) {
	if err := checkTrim(k.MinAvailableVersion, k.MinEncryptionVersion, k.MinDecryptionVersion, minAvailable); err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	k.MinAvailableVersion = minAvailable
	if err := b.hsmKeys.destroyBelow(ctx, s, k, minAvailable); err != nil {
		return errorResponse(err)
	}
	return b.describeHSMKey(ctx, s, k)
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
