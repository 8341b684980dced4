package hsmtransit

import (
	"context"
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
// plugin's CPU (pprof, see BENCHMARKS.md). GRPCUnaryInterceptor takes two
// costs off that path without changing what any handler sees:
//
//   - An existence check on a path whose check reads only the path (encrypt/
//     <name>: "does the key exist?") is handed an empty body, so the batch is
//     not decoded for it. The handler validates the body as before.
//   - A request's body is decoded once, with a faster decoder that gives the
//     same map as encoding/json (checked by TestFastDecodeMatchesStdlib and
//     FuzzFastDecode), and handed to Backend.HandleRequest in the context; the
//     SDK then decodes only "{}". If the fast decoder fails, nothing is
//     changed and the SDK decodes the body as before.

// GRPCUnaryInterceptor is installed on the plugin's gRPC server (see
// plugin/main.go). It only ever replaces a request body by "{}" when it keeps
// the decoded body for the handler, or when the path's existence check does
// not read the body.
func GRPCUnaryInterceptor(ctx context.Context, req interface{}, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (interface{}, error) {
	switch info.FullMethod {
	case pb.Backend_HandleExistenceCheck_FullMethodName:
		if args, ok := req.(*pb.HandleExistenceCheckArgs); ok && args.Request != nil &&
			existenceCheckIgnoresBody(args.Request.Path) {
			args.Request.Data = emptyBody
		}
	case pb.Backend_HandleRequest_FullMethodName:
		if args, ok := req.(*pb.HandleRequestArgs); ok && args.Request != nil && len(args.Request.Data) >= fastDecodeMin {
			if data, ok := fastDecode(args.Request.Data); ok {
				args.Request.Data = emptyBody
				ctx = context.WithValue(ctx, decodedBodyKey{}, data)
			}
		}
	}
	return handler(ctx, req)
}

const emptyBody = "{}"

// fastDecodeMin is the body size from which the fast decoder is used; below
// it the SDK's decoding costs too little to matter.
const fastDecodeMin = 1024

// decodedBodyKey carries a request body decoded by GRPCUnaryInterceptor to
// Backend.HandleRequest.
type decodedBodyKey struct{}

// existenceCheckIgnoresBody reports whether the existence check of the route
// that serves path reads nothing but the path. TestExistenceChecksIgnoreBody
// fails when a route gains an existence check not covered here.
func existenceCheckIgnoresBody(path string) bool {
	name, ok := strings.CutPrefix(path, "encrypt/")
	return ok && name != "" && !strings.Contains(name, "/")
}

// fastDecode decodes a JSON object as encoding/json.Unmarshal into a
// map[string]interface{} does.
func fastDecode(body string) (map[string]interface{}, bool) {
	data := map[string]interface{}{}
	if err := segjson.Unmarshal([]byte(body), &data); err != nil {
		return nil, false
	}
	return data, true
}

// HandleRequest puts back a body decoded by GRPCUnaryInterceptor, then
// serves the request as the framework does.
func (b *backend) HandleRequest(ctx context.Context, req *logical.Request) (*logical.Response, error) {
	if data, ok := ctx.Value(decodedBodyKey{}).(map[string]interface{}); ok && req != nil && len(req.Data) == 0 {
		req.Data = data
	}
	return b.Backend.HandleRequest(ctx, req)
}
