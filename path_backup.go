package hsmtransit

import (
	"context"
	"errors"
	"fmt"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// pathBackup returns a plaintext backup of a key that allows one.
func (b *backend) pathBackup() *framework.Path {
	return &framework.Path{
		Pattern: "backup/" + framework.GenericNameRegex("name"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "back-up",
			OperationSuffix: "key",
		},
		Fields: map[string]*framework.FieldSchema{
			"name": {Type: framework.TypeString, Description: "Name of the key"},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{Callback: b.pathBackupRead},
		},
		HelpSynopsis:    pathBackupHelpSyn,
		HelpDescription: pathBackupHelpDesc,
	}
}

// pathBackupRead backs up the key: its policy and archived versions, in the
// format of built-in transit, so that either engine restores the other's.
func (b *backend) pathBackupRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	if err := b.checkBackupAllowed(ctx, req.Storage, name); err != nil {
		return nil, err
	}
	var backup string
	err := b.withLM(ctx, req.Storage, func(lm *keysutil.LockManager) error {
		var berr error
		backup, berr = lm.BackupPolicy(ctx, req.Storage, name)
		return berr
	})
	if err != nil {
		return nil, fmt.Errorf("backing up key %q: %w", name, err)
	}
	return &logical.Response{Data: map[string]interface{}{"backup": backup}}, nil
}

// checkBackupAllowed answers 404 for a missing key and 400 for one that does
// not allow plaintext backup. (keysutil takes its own, exclusive, lock for the
// backup, so this check releases the policy before it.)
func (b *backend) checkBackupAllowed(ctx context.Context, s logical.Storage, name string) error {
	p, unlock, err := b.readPolicy(ctx, s, name, false)
	defer unlock()
	switch {
	case err != nil:
		return err
	case p == nil:
		return logical.CodedError(404, fmt.Sprintf("key %q not found", name))
	case !p.Exportable:
		return callerErr("exporting is disallowed on the policy; set exportable on keys/%s/config", name)
	case !p.AllowPlaintextBackup:
		return callerErr("plaintext backup is disallowed on the policy; set allow_plaintext_backup on keys/%s/config", name)
	}
	return nil
}

var errKeyNameIsPath = errors.New("key names cannot be paths")

const pathBackupHelpSyn = `Backup the named key`

const pathBackupHelpDesc = `
This path returns a plaintext backup of the named key, all versions included,
for keys created or configured with exportable and allow_plaintext_backup.
restore/ takes it back, here or in Vault's built-in transit engine.
`
