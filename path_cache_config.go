package hsmtransit

import (
	"context"
	"fmt"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// cacheConfigStoragePath holds the policy cache size.
const cacheConfigStoragePath = "config/cache"

// cacheConfig is the stored cache-config.
type cacheConfig struct {
	Size int `json:"size"`
}

// pathCacheConfig reads and sets the size of the policy cache.
func (b *backend) pathCacheConfig() *framework.Path {
	return &framework.Path{
		Pattern: "cache-config",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
		},
		Fields: map[string]*framework.FieldSchema{
			"size": {
				Type:        framework.TypeInt,
				Default:     0,
				Description: fmt.Sprintf("Number of keys kept in memory: 0 for unbounded (default), else at least %d.", minCacheSize),
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback:     b.pathCacheConfigRead,
				Summary:      "Returns the size of the active cache",
				DisplayAttrs: &framework.DisplayAttributes{OperationSuffix: "cache-configuration"},
			},
			logical.UpdateOperation: &framework.PathOperation{
				Callback:     b.pathCacheConfigWrite,
				Summary:      "Configures a new cache of the specified size",
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "configure", OperationSuffix: "cache"},
			},
		},
		HelpSynopsis:    pathCacheConfigHelpSyn,
		HelpDescription: pathCacheConfigHelpDesc,
	}
}

// readCacheSize returns the stored cache size, 0 when none is stored. A
// stored size below the minimum is raised to it.
func readCacheSize(ctx context.Context, s logical.Storage) (int, error) {
	entry, err := s.Get(ctx, cacheConfigStoragePath)
	if err != nil {
		return 0, fmt.Errorf("reading cache config: %w", err)
	}
	if entry == nil {
		return 0, nil
	}
	var cfg cacheConfig
	if err := entry.DecodeJSON(&cfg); err != nil {
		return 0, fmt.Errorf("decoding cache config: %w", err)
	}
	if cfg.Size != 0 && cfg.Size < minCacheSize {
		return minCacheSize, nil
	}
	return cfg.Size, nil
}

// pathCacheConfigWrite stores a new cache size and resizes the cache.
func (b *backend) pathCacheConfigWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	size := d.Get("size").(int)
	if size < 0 || (size != 0 && size < minCacheSize) {
		return logical.ErrorResponse("size must be 0 or a value greater or equal to %d", minCacheSize), logical.ErrInvalidRequest
	}
	entry, err := logical.StorageEntryJSON(cacheConfigStoragePath, cacheConfig{Size: size})
	if err != nil {
		return nil, err
	}
	if err := req.Storage.Put(ctx, entry); err != nil {
		return nil, fmt.Errorf("storing cache config: %w", err)
	}
	if err := b.loadCacheSize(ctx, req.Storage); err != nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]interface{}{"size": size}}, nil
}

// pathCacheConfigRead returns the stored cache size.
func (b *backend) pathCacheConfigRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	if !b.lm.GetUseCache() {
		return logical.ErrorResponse("caching is disabled for this transit mount"), logical.ErrInvalidRequest
	}
	// Another node may have changed it: make the live cache follow.
	if err := b.loadCacheSize(ctx, req.Storage); err != nil {
		return nil, err
	}
	size, err := readCacheSize(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]interface{}{"size": size}}, nil
}

const pathCacheConfigHelpSyn = `Configure caching strategy`

const pathCacheConfigHelpDesc = `
This path reads and sets the size of the in-memory key cache; 0 means
unbounded. A bounded cache keeps memory bounded by the size, not the number of
keys, at the cost of loading evicted keys from storage again.
`
