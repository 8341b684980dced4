package hsmtransit

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// The mount's side of its seal (internal/mountseal): what the seal asks of
// the backend, and the gate that keeps key paths shut while it is sealed.

// sealHost is the backend as its seal sees it (mountseal.Host).
type sealHost struct{ b *backend }

func (h sealHost) Logger() hclog.Logger { return h.b.Logger() }

func (h sealHost) ReadOnlyNode() bool { return h.b.mustNotWrite() }

func (h sealHost) DropCachedKeys() { h.b.dropCachedKeys() }

// Unsealed reads the cache size kept in sealed storage, so that the manifest
// cache follows the key cache's bound.
func (h sealHost) Unsealed(ctx context.Context, view logical.Storage) int64 {
	if err := h.b.loadCacheSize(ctx, view); err != nil {
		h.b.Logger().Warn("reading cache-config", "error", err)
	}
	return manifestCacheBytes(h.b.cacheSize())
}

// gate makes a path operation run on sealed storage: the handler sees the
// mount's storage through the seal, or the caller gets the 400 or 503 that
// says why it cannot.
func (b *backend) gate(f framework.OperationFunc) framework.OperationFunc {
	return func(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
		s, err := b.seal.View(ctx, req.Storage)
		if err != nil {
			return nil, err
		}
		sealed := *req
		sealed.Storage = s
		return f(ctx, &sealed, d)
	}
}

// gateExistence runs an existence check on sealed storage. While the mount
// cannot unseal, it reports the object as existing, so that the request
// goes to the (gated) update handler and gets the seal's answer, whatever
// the caller's create capability.
func (b *backend) gateExistence(f framework.ExistenceFunc) framework.ExistenceFunc {
	return func(ctx context.Context, req *logical.Request, d *framework.FieldData) (bool, error) {
		s, err := b.seal.View(ctx, req.Storage)
		if err != nil {
			return true, nil
		}
		if n, ok := d.GetOk("name"); ok && strings.Contains(fmt.Sprint(n), "..") {
			// Storage refuses such a path, and Vault would answer the
			// check's error as a bare 500; the handler answers 400.
			return true, nil
		}
		sealed := *req
		sealed.Storage = s
		exists, err := f(ctx, &sealed, d)
		if errors.Is(err, seal.ErrEntryRefused) {
			// Vault hides an existence check's error behind "internal
			// error"; the handler meets the same refused entry and says
			// what it is. Only a refusal, which no retry changes, is
			// passed on: a transient error here must not turn a create
			// into an update for ACL purposes.
			return true, nil
		}
		return exists, err
	}
}

// gatePaths wraps every operation and existence check of paths so that
// they are refused until the root key is unsealed.
func (b *backend) gatePaths(paths []*framework.Path) []*framework.Path {
	for _, p := range paths {
		for _, op := range p.Operations {
			if po, ok := op.(*framework.PathOperation); ok {
				po.Callback = b.gate(po.Callback)
			}
		}
		if p.ExistenceCheck != nil {
			p.ExistenceCheck = b.gateExistence(p.ExistenceCheck)
		}
	}
	return paths
}
