package boundary

import (
	"context"
	"unsafe"

	"github.com/hashicorp/vault/sdk/plugin/pb"
	"google.golang.org/grpc"
)

// UnaryInterceptor is installed on the plugin's gRPC server (Serve). For
// HandleRequest and HandleExistenceCheck it decodes a large request body
// itself (DecodedBody) and replaces it by "{}"; for HandleRequest it also
// lets the handler pre-encode the response's data (PreEncode) and puts
// those bytes in the reply (a pooledReply when they are in a pooled buffer,
// which codec.Marshal puts back). Every other call passes through untouched.
func UnaryInterceptor(ctx context.Context, req interface{}, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (interface{}, error) {
	var r *pb.Request
	var s *slot
	decode := requestDecode
	switch args := req.(type) {
	case *pb.HandleRequestArgs:
		if info.FullMethod == pb.Backend_HandleRequest_FullMethodName {
			r, s = args.Request, &slot{}
		}
	case *pb.HandleExistenceCheckArgs:
		if info.FullMethod == pb.Backend_HandleExistenceCheck_FullMethodName {
			r, decode = args.Request, existenceDecode
		}
	}
	if r != nil && len(r.Data) >= fastDecodeMin {
		if data, ok := decode(r.Data); ok {
			r.Data = emptyBody
			ctx = context.WithValue(ctx, decodedBodyKey{}, data)
		}
	}
	if s == nil {
		return handler(ctx, req)
	}
	out, err := handler(context.WithValue(ctx, slotKey{}, s), req)
	if reply, ok := out.(*pb.HandleRequestReply); ok && s.data != nil && reply.Response != nil && reply.Response.Data == standInJSON {
		// The slot's bytes are not written again: the string may share
		// them instead of copying a large answer.
		reply.Response.Data = unsafe.String(unsafe.SliceData(s.data), len(s.data))
		if s.buf != nil && err == nil {
			return &pooledReply{HandleRequestReply: reply, buf: s.buf}, nil
		}
	}
	return out, err
}
