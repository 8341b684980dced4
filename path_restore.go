package hsmtransit

import (
	"context"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// pathRestore restores a key from a backup, under its own name or another.
func (b *backend) pathRestore() *framework.Path {
	return &framework.Path{
		Pattern: "restore" + framework.OptionalParamRegex("name"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "restore",
			OperationSuffix: "key|and-rename-key",
		},
		Fields: map[string]*framework.FieldSchema{
			"backup": {Type: framework.TypeString, Description: "The backup, as returned by backup/"},
			"name":   {Type: framework.TypeString, Description: "Name for the restored key; the backed-up name when omitted."},
			"force": {
				Type:        framework.TypeBool,
				Default:     false,
				Description: "Overwrite a key of the same name.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathRestoreWrite},
		},
		HelpSynopsis:    pathRestoreHelpSyn,
		HelpDescription: pathRestoreHelpDesc,
	}
}

// pathRestoreWrite restores the backup.
func (b *backend) pathRestoreWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	backup := d.Get("backup").(string)
	if backup == "" {
		return logical.ErrorResponse("'backup' must be supplied"), logical.ErrInvalidRequest
	}
	// The name given is checked first: restoring over an HSM-resident key
	// is refused whatever the backup holds.
	name := d.Get("name").(string)
	if name != "" {
		if resp, err := b.checkRestoreName(ctx, req.Storage, name); resp != nil || err != nil {
			return resp, err
		}
	}
	backedUp, err := checkBackup(backup)
	if err != nil {
		return logical.ErrorResponse("invalid backup: %s", err), logical.ErrInvalidRequest
	}
	if name == "" {
		name = backedUp
		if resp, err := b.checkRestoreName(ctx, req.Storage, name); resp != nil || err != nil {
			return resp, err
		}
	}
	err = b.withLM(ctx, req.Storage, func(lm *keysutil.LockManager) error {
		return lm.RestorePolicy(ctx, req.Storage, name, backup, d.Get("force").(bool))
	})
	if err != nil {
		// A malformed backup or an existing key: the caller's to fix.
		return logical.ErrorResponse("restoring key: %s", err), logical.ErrInvalidRequest
	}
	return nil, nil
}

// checkRestoreName refuses a name a restored key cannot take.
func (b *backend) checkRestoreName(ctx context.Context, s logical.Storage, name string) (*logical.Response, error) {
	switch {
	case strings.Contains(name, "/"):
		return logical.ErrorResponse(errKeyNameIsPath.Error()), logical.ErrInvalidRequest
	case strings.Contains(name, ".."):
		return nil, errRelativeKeyName
	}
	if k, err := b.hsmKeys.Get(ctx, s, name); err != nil {
		return nil, err
	} else if k != nil {
		return logical.ErrorResponse("key %q is HSM-resident; restore the backup under another name", name), logical.ErrInvalidRequest
	}
	return nil, nil
}

const pathRestoreHelpSyn = `Restore the named key`

const pathRestoreHelpDesc = `
This path restores a key from a backup made by backup/ (here or in Vault's
built-in transit engine). With force, an existing key of the same name is
overwritten.
`
