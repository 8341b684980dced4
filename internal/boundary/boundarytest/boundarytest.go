// Package boundarytest calls a backend the way Vault's plugin boundary does,
// for tests of what crosses it.
package boundarytest

import (
	"context"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin/pb"
	"google.golang.org/grpc"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/boundary"
)

// Backend is a backend's HandleRequest, with the storage the test gives it.
type Backend func(ctx context.Context, req *logical.Request) (*logical.Response, error)

// SDKHandleRequest does what the SDK's gRPC server does with a HandleRequest
// call (plugin/grpc_backend_server.go): decode the body, call the backend,
// encode the response's data.
func SDKHandleRequest(backend Backend) grpc.UnaryHandler {
	return func(ctx context.Context, req interface{}) (interface{}, error) {
		lreq, err := pb.ProtoRequestToLogicalRequest(req.(*pb.HandleRequestArgs).Request)
		if err != nil {
			return &pb.HandleRequestReply{}, err
		}
		resp, respErr := backend(ctx, lreq)
		pbResp, err := pb.LogicalResponseToProtoResponse(resp)
		if err != nil {
			return &pb.HandleRequestReply{}, err
		}
		return &pb.HandleRequestReply{Response: pbResp, Err: pb.ErrToProtoErr(respErr)}, nil
	}
}

// HandleRequest sends an update of path with body (JSON) to backend as
// Vault's plugin boundary does, through boundary.UnaryInterceptor when
// intercepted is set, and returns the reply the plugin would send back.
func HandleRequest(backend Backend, path, body string, intercepted bool) (*pb.HandleRequestReply, error) {
	args := &pb.HandleRequestArgs{Request: &pb.Request{Path: path, Operation: string(logical.UpdateOperation), Data: body}}
	handler := SDKHandleRequest(backend)
	var out interface{}
	var err error
	if intercepted {
		out, err = boundary.UnaryInterceptor(context.Background(), args, &grpc.UnaryServerInfo{FullMethod: pb.Backend_HandleRequest_FullMethodName}, handler)
	} else {
		out, err = handler(context.Background(), args)
	}
	reply := boundary.Reply(out)
	return reply, err
}
