package hsmtransit

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
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
	backedUp, err := backedUpName(backup)
	if err != nil {
		return logical.ErrorResponse("invalid backup: %s", err), logical.ErrInvalidRequest
	}
	name := d.Get("name").(string)
	if name == "" {
		name = backedUp
	}
	if strings.Contains(name, "/") {
		return logical.ErrorResponse(errKeyNameIsPath.Error()), logical.ErrInvalidRequest
	}
	if k, err := b.hsmKeys.get(ctx, req.Storage, name); err != nil {
		return nil, err
	} else if k != nil {
		return logical.ErrorResponse("key %q is HSM-resident; restore the backup under another name", name), logical.ErrInvalidRequest
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

// backedUpName checks that a backup holds a key and returns its name.
// keysutil assumes both and would panic on a backup without a policy.
func backedUpName(backup string) (string, error) {
	raw, err := base64.StdEncoding.DecodeString(backup)
	if err != nil {
		return "", fmt.Errorf("not base64: %w", err)
	}
	var kd struct {
		Policy *struct {
			Name string `json:"name"`
		} `json:"policy"`
	}
	if err := json.Unmarshal(raw, &kd); err != nil {
		return "", fmt.Errorf("not a transit key backup: %w", err)
	}
	if kd.Policy == nil {
		return "", errors.New("the backup holds no key policy")
	}
	return kd.Policy.Name, nil
}

const pathRestoreHelpSyn = `Restore the named key`

const pathRestoreHelpDesc = `
This path restores a key from a backup made by backup/ (here or in Vault's
built-in transit engine). With force, an existing key of the same name is
overwritten.
`
