package hsmtransit

import (
	"context"
	"errors"
	"strings"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/boundary"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
)

// The backend's side of the plugin boundary (internal/boundary): request
// bodies the interceptor decoded are put back into the request, and batch
// answers are written as JSON here (preEncode, batch.go) instead of by the
// SDK's reflection.

// withDecodedBody puts back a body decoded by boundary.UnaryInterceptor.
func withDecodedBody(ctx context.Context, req *logical.Request) {
	if data, ok := boundary.DecodedBody(ctx); ok && req != nil && len(req.Data) == 0 {
		req.Data = data
	}
}

// HandleRequest serves the request as the framework does, with its body
// decoded by boundary.UnaryInterceptor, its batch answer pre-encoded, and an
// error of a kind (errors.go) answered by errorResponse.
//
// A write refused because this node is a performance standby comes back as
// logical.ErrReadOnly itself, whatever wrapped it on the way (a usage count,
// a manifest generation): Vault forwards such a request to the active node
// when the error is that one, and the plugin boundary carries only its text.
func (b *backend) HandleRequest(ctx context.Context, req *logical.Request) (*logical.Response, error) {
	withDecodedBody(ctx, req)
	resp, err := b.Backend.HandleRequest(ctx, req)
	if err == nil {
		preEncode(ctx, resp)
	}
	var typed *kindError
	if errors.As(err, &typed) || mountseal.KindOf(err) != 0 {
		// The SDK carries only its own error types across the boundary:
		// a kind becomes its answer here, whichever handler returned it.
		resp, err = errorResponse(err)
	}
	if err != nil && err != logical.ErrReadOnly &&
		(errors.Is(err, logical.ErrReadOnly) || strings.Contains(err.Error(), logical.ErrReadOnly.Error())) {
		return nil, logical.ErrReadOnly
	}
	return resp, err
}

// HandleExistenceCheck runs the existence check as the framework does, with
// the body decoded by boundary.UnaryInterceptor: the framework validates the body
// there, before Vault checks the ACL, as for built-in transit.
func (b *backend) HandleExistenceCheck(ctx context.Context, req *logical.Request) (bool, bool, error) {
	withDecodedBody(ctx, req)
	return b.Backend.HandleExistenceCheck(ctx, req)
}
