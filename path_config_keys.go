package hsmtransit

import (
	"context"
	"fmt"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// keysConfigStoragePath holds the mount-wide key settings.
const keysConfigStoragePath = "config/keys"

// keysConfig is the stored config/keys.
type keysConfig struct {
	DisableUpsert bool `json:"disable_upsert"`
}

// pathConfigKeys reads and sets the mount-wide key settings.
func (b *backend) pathConfigKeys() *framework.Path {
	return &framework.Path{
		Pattern: "config/keys",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
		},
		Fields: map[string]*framework.FieldSchema{
			"disable_upsert": {
				Type:        framework.TypeBool,
				Description: "Refuse to create a missing key on encrypt (upsert).",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{
				Callback:     b.pathConfigKeysWrite,
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "configure", OperationSuffix: "keys"},
			},
			logical.ReadOperation: &framework.PathOperation{
				Callback:     b.pathConfigKeysRead,
				DisplayAttrs: &framework.DisplayAttributes{OperationSuffix: "keys-configuration"},
			},
		},
		HelpSynopsis:    pathConfigKeysHelpSyn,
		HelpDescription: pathConfigKeysHelpDesc,
	}
}

// readKeysConfig returns the stored config/keys, or the defaults.
func readKeysConfig(ctx context.Context, s logical.Storage) (keysConfig, error) {
	var cfg keysConfig
	entry, err := s.Get(ctx, keysConfigStoragePath)
	if err != nil {
		return cfg, fmt.Errorf("failed to fetch keys configuration: %w", err)
	}
	if entry == nil {
		return cfg, nil
	}
	if err := entry.DecodeJSON(&cfg); err != nil {
		return cfg, fmt.Errorf("failed to decode keys configuration: %w", err)
	}
	return cfg, nil
}

// pathConfigKeysWrite sets disable_upsert (false when omitted, as in
// built-in transit).
func (b *backend) pathConfigKeysWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	cfg, err := readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	if want := d.Get("disable_upsert").(bool); want != cfg.DisableUpsert {
		cfg.DisableUpsert = want
		entry, err := logical.StorageEntryJSON(keysConfigStoragePath, cfg)
		if err != nil {
			return nil, err
		}
		if err := req.Storage.Put(ctx, entry); err != nil {
			return nil, fmt.Errorf("storing keys configuration: %w", err)
		}
	}
	return &logical.Response{Data: map[string]interface{}{"disable_upsert": cfg.DisableUpsert}}, nil
}

// pathConfigKeysRead returns the mount-wide key settings.
func (b *backend) pathConfigKeysRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	cfg, err := readKeysConfig(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]interface{}{"disable_upsert": cfg.DisableUpsert}}, nil
}

const pathConfigKeysHelpSyn = `Configuration common across all keys`

const pathConfigKeysHelpDesc = `
This path configures what applies to every key of the mount; currently
whether encrypt may create a missing key (disable_upsert).
`
