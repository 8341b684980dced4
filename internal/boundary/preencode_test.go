package boundary_test

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin/pb"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/boundary"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/boundary/boundarytest"
)

// A response pre-encoded by the handler reaches Vault as those bytes; one
// that is not, or a call made without the interceptor, is the SDK's.
func TestPreEncodedResponseReachesTheReply(t *testing.T) {
	data := map[string]interface{}{"batch_results": []map[string]interface{}{{"plaintext": "aGk=", "reference": "<r>"}}}
	sdkJSON, err := json.Marshal(data)
	require.NoError(t, err)
	// The plumbing is checked with bytes the SDK would not write for data
	// (a handler's must be the SDK's; the callers' tests check theirs), so
	// that what reached the reply is known to be the handler's.
	const handlers = `{"batch_results":[{"plaintext":"aGk=","reference":"written by the handler"}]}`
	pre := func(ctx context.Context, _ *logical.Request) (*logical.Response, error) {
		resp := &logical.Response{Data: data}
		boundary.PreEncode(ctx, resp, func(dst []byte) []byte { return append(dst, handlers...) })
		return resp, nil
	}
	call := func(backend func(context.Context, *logical.Request) (*logical.Response, error)) *pb.HandleRequestReply {
		out, err := boundary.UnaryInterceptor(context.Background(), &pb.HandleRequestArgs{Request: &pb.Request{Path: "decrypt/k", Operation: "update", Data: "{}"}},
			&grpc.UnaryServerInfo{FullMethod: pb.Backend_HandleRequest_FullMethodName}, boundarytest.SDKHandleRequest(backend))
		require.NoError(t, err)
		return boundary.Reply(out)
	}
	require.Equal(t, handlers, call(pre).Response.Data)

	// Without the interceptor, PreEncode leaves the response alone.
	resp, err := pre(context.Background(), nil)
	require.NoError(t, err)
	require.Equal(t, data, resp.Data)

	// A response with nothing pre-encoded in an intercepted call is the
	// SDK's, as is a nil response.
	require.Equal(t, string(sdkJSON), call(func(context.Context, *logical.Request) (*logical.Response, error) {
		return &logical.Response{Data: data}, nil
	}).Response.Data)
	require.Nil(t, call(func(ctx context.Context, _ *logical.Request) (*logical.Response, error) {
		require.False(t, boundary.PreEncode(ctx, nil, func(dst []byte) []byte { panic("encoded for no response") }))
		return nil, nil
	}).Response)

	// Not pre-encoded: the SDK's encoding passes.
	plain := func(context.Context, *logical.Request) (*logical.Response, error) {
		return &logical.Response{Data: map[string]interface{}{"plaintext": "aGk="}}, nil
	}
	require.Equal(t, `{"plaintext":"aGk="}`, call(plain).Response.Data)

	// Pre-encoded, then replaced by another answer (as a status code does):
	// the stand-in is not what went out, and nothing is swapped.
	replaced := func(ctx context.Context, req *logical.Request) (*logical.Response, error) {
		_, _ = pre(ctx, req)
		return logical.RespondWithStatusCode(&logical.Response{Data: map[string]interface{}{"x": 1}}, req, 400)
	}
	got := call(replaced).Response.Data
	require.NotContains(t, got, "hsm_transit_pre_encoded")
	require.NotContains(t, got, "batch_results")
}
