package hsmtransit

import (
	"context"
	"errors"
	"strings"

	segjson "github.com/segmentio/encoding/json"
	"google.golang.org/grpc"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin/pb"
)

// The plugin boundary's JSON.
//
// Vault hands each request to an external plugin as a protobuf message whose
// body is a JSON string; the SDK's gRPC server decodes it into a map with
// encoding/json, twice for a write: once for Vault's existence check and once
// for the request. For a batch of 1000 items that decoding was 37% of the
// plugin's CPU (pprof, see BENCHMARKS.md). GRPCUnaryInterceptor makes it
// cheaper without changing what any handler sees: a body of 1 KiB or more,
// nested no deeper than a batch is, is decoded by a faster decoder that gives
// the same map as encoding/json (checked by TestFastDecodeMatchesStdlib and
// FuzzFastDecode), and handed to HandleExistenceCheck and HandleRequest in
// the context; the SDK then decodes only "{}". If the body is nested deeper
// or the fast decoder refuses it, nothing is changed and the SDK decodes the
// body as before.

// GRPCUnaryInterceptor is installed on the plugin's gRPC server (see
// plugin/main.go). It replaces a request body by "{}" only when it hands the
// decoded body to the backend in the context.
func GRPCUnaryInterceptor(ctx context.Context, req interface{}, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (interface{}, error) {
	var r *pb.Request
	switch args := req.(type) {
	case *pb.HandleRequestArgs:
		if info.FullMethod == pb.Backend_HandleRequest_FullMethodName {
			r = args.Request
		}
	case *pb.HandleExistenceCheckArgs:
		if info.FullMethod == pb.Backend_HandleExistenceCheck_FullMethodName {
			r = args.Request
		}
	}
	if r != nil && len(r.Data) >= fastDecodeMin {
		if data, ok := fastDecode(r.Data); ok {
			r.Data = emptyBody
			ctx = context.WithValue(ctx, decodedBodyKey{}, data)
		}
	}
	return handler(ctx, req)
}

const emptyBody = "{}"

// fastDecodeMin is the body size from which the fast decoder is used; below
// it the SDK's decoding costs too little to matter.
const fastDecodeMin = 1024

// fastDecodeMaxDepth is the deepest nesting the fast decoder is given: a
// batch, {"batch_input":[{"plaintext":...}]}, is 3 deep. The fast decoder
// rescans a value's subtree at every level, so its cost grows with depth
// times size; deeper bodies are left to encoding/json, which scans once.
const fastDecodeMaxDepth = 4

// decodedBodyKey carries a request body decoded by GRPCUnaryInterceptor to
// the backend.
type decodedBodyKey struct{}

// fastDecode decodes a JSON object as encoding/json.Unmarshal into a
// map[string]interface{} does, or reports false, and then the SDK decodes
// it: for a body nested deeper than fastDecodeMaxDepth, one the decoder
// refuses, and (defensively: every mount shares this process) a panic in the
// decoder.
func fastDecode(body string) (data map[string]interface{}, ok bool) {
	if nestingDepth(body) > fastDecodeMaxDepth {
		return nil, false
	}
	defer func() {
		if recover() != nil {
			data, ok = nil, false
		}
	}()
	data = map[string]interface{}{}
	if err := segjson.Unmarshal([]byte(body), &data); err != nil {
		return nil, false
	}
	return data, true
}

// nestingDepth is the deepest nesting of objects and arrays in a JSON text,
// by one linear scan that skips strings. It does not validate the text.
func nestingDepth(body string) int {
	depth, deepest, inString := 0, 0, false
	for i := 0; i < len(body); i++ {
		c := body[i]
		if inString {
			switch c {
			case '\\':
				i++ // the escaped byte cannot end the string
			case '"':
				inString = false
			}
			continue
		}
		switch c {
		case '"':
			inString = true
		case '{', '[':
			depth++
			if depth > deepest {
				deepest = depth
			}
		case '}', ']':
			depth--
		}
	}
	return deepest
}

// withDecodedBody puts back a body decoded by GRPCUnaryInterceptor.
func withDecodedBody(ctx context.Context, req *logical.Request) {
	if data, ok := ctx.Value(decodedBodyKey{}).(map[string]interface{}); ok && req != nil && len(req.Data) == 0 {
		req.Data = data
	}
}

// HandleRequest serves the request as the framework does, with its body
// decoded by GRPCUnaryInterceptor.
//
// A write refused because this node is a performance standby comes back as
// logical.ErrReadOnly itself, whatever wrapped it on the way (a usage count,
// a manifest generation): Vault forwards such a request to the active node
// when the error is that one, and the plugin boundary carries only its text.
func (b *backend) HandleRequest(ctx context.Context, req *logical.Request) (*logical.Response, error) {
	withDecodedBody(ctx, req)
	resp, err := b.Backend.HandleRequest(ctx, req)
	if err != nil && err != logical.ErrReadOnly &&
		(errors.Is(err, logical.ErrReadOnly) || strings.Contains(err.Error(), logical.ErrReadOnly.Error())) {
		return nil, logical.ErrReadOnly
	}
	return resp, err
}

// HandleExistenceCheck runs the existence check as the framework does, with
// the body decoded by GRPCUnaryInterceptor: the framework validates the body
// there, before Vault checks the ACL, as for built-in transit.
func (b *backend) HandleExistenceCheck(ctx context.Context, req *logical.Request) (bool, bool, error) {
	withDecodedBody(ctx, req)
	return b.Backend.HandleExistenceCheck(ctx, req)
}
