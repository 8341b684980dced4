package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin/pb"
	"google.golang.org/grpc"
)

// TestWireAnswersBatchesWithoutDecoding runs the wire plugin's interceptor
// and backend as the SDK's gRPC server would: the existence check and the
// request of an encrypt batch, each with its body emptied before the SDK
// decodes it, the reply carrying the canned answer of 1000 items; a body too
// small to be a batch is refused.
func TestWireAnswersBatchesWithoutDecoding(t *testing.T) {
	answers, err := cannedAnswers()
	if err != nil {
		t.Fatal(err)
	}
	b, err := factory(context.Background(), &logical.BackendConfig{StorageView: &logical.InmemStorage{}, System: logical.TestSystemView()})
	if err != nil {
		t.Fatal(err)
	}
	intercept := bytesOnly(answers)
	batch := `{"batch_input":[` + strings.Repeat(`{"plaintext":"QUJD"},`, 300) + `{"plaintext":"QUJD"}]}`

	var seen string
	check := &pb.HandleExistenceCheckArgs{Request: &pb.Request{Path: "encrypt/bench", Operation: "create", Data: batch}}
	_, err = intercept(context.Background(), check, &grpc.UnaryServerInfo{FullMethod: pb.Backend_HandleExistenceCheck_FullMethodName},
		func(ctx context.Context, req interface{}) (interface{}, error) {
			r, err := pb.ProtoRequestToLogicalRequest(req.(*pb.HandleExistenceCheckArgs).Request)
			if err != nil {
				return nil, err
			}
			seen = req.(*pb.HandleExistenceCheckArgs).Request.Data
			found, exists, err := b.HandleExistenceCheck(ctx, r)
			if !found || !exists {
				t.Errorf("existence check: found %v, exists %v", found, exists)
			}
			return &pb.HandleExistenceCheckReply{CheckFound: found, Exists: exists}, err
		})
	if err != nil || seen != "{}" {
		t.Fatalf("existence check: %v, body seen %q", err, seen)
	}

	call := func(path, body string) *pb.HandleRequestReply {
		args := &pb.HandleRequestArgs{Request: &pb.Request{Path: path, Operation: "update", Data: body}}
		out, err := intercept(context.Background(), args, &grpc.UnaryServerInfo{FullMethod: pb.Backend_HandleRequest_FullMethodName},
			func(ctx context.Context, req interface{}) (interface{}, error) {
				r, err := pb.ProtoRequestToLogicalRequest(req.(*pb.HandleRequestArgs).Request)
				if err != nil {
					return nil, err
				}
				resp, respErr := b.HandleRequest(ctx, r)
				pr, err := pb.LogicalResponseToProtoResponse(resp)
				return &pb.HandleRequestReply{Response: pr, Err: pb.ErrToProtoErr(respErr)}, err
			})
		if err != nil {
			t.Fatal(err)
		}
		return out.(*pb.HandleRequestReply)
	}
	for _, op := range []string{"encrypt", "decrypt"} {
		reply := call(op+"/bench", batch)
		var got struct {
			Results []map[string]interface{} `json:"batch_results"`
		}
		if reply.Err != nil || reply.Response == nil || json.Unmarshal([]byte(reply.Response.Data), &got) != nil || len(got.Results) != batchItems {
			t.Fatalf("%s: reply %v, %d results", op, reply, len(got.Results))
		}
		field := map[string]string{"encrypt": "ciphertext", "decrypt": "plaintext"}[op]
		if _, ok := got.Results[0][field].(string); !ok {
			t.Errorf("%s: first result %v has no %s", op, got.Results[0], field)
		}
	}
	if reply := call("encrypt/bench", `{"plaintext":"QUJD"}`); reply.Err == nil || !strings.Contains(reply.Response.Data, "only batches") {
		t.Errorf("a single item was not refused: %v", reply)
	}
}
