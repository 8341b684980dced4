package hsmtransit

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin/pb"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
)

// fastDecodeCorpus holds bodies of the shapes Vault sends, and the corners
// where JSON decoders tend to differ.
var fastDecodeCorpus = []string{
	`{}`,
	`{"plaintext":"aGVsbG8=","context":"","key_version":2}`,
	`{"batch_input":[{"plaintext":"aGVsbG8=","reference":"r1"},{"ciphertext":"vault:v1:abc","key_version":1.0}]}`,
	`{"batch_input":[],"partial_failure_response_code":400}`,
	`{"n":[0,-0,1e3,1.5e-7,-12.25,9007199254740993,18446744073709551616,1E+2]}`,
	`{"s":"\u00e9\u4e2d\ud83d\ude00 \"quoted\" \\ \/ \b\f\n\r\t","t":"\u0000"}`,
	`{"nested":{"a":{"b":[{"c":null},true,false,[1,[2,[3]]]]}}}`,
	`{"dup":1,"dup":"second"}`,
	`{"unicode key é":"v","":"empty key"}`,
	`{"big":"` + strings.Repeat("QUJD", 4096) + `"}`,
	` {"space" : [ 1 , 2 ] } `,
}

func stdDecode(body string) (map[string]interface{}, error) {
	m := map[string]interface{}{}
	err := json.Unmarshal([]byte(body), &m)
	return m, err
}

func TestFastDecodeMatchesStdlib(t *testing.T) {
	for i, body := range fastDecodeCorpus {
		want, err := stdDecode(body)
		require.NoError(t, err, "corpus[%d]", i)
		got, ok := fastDecode(body)
		require.True(t, ok, "corpus[%d]: fast decoder refused valid JSON", i)
		require.True(t, reflect.DeepEqual(want, got), "corpus[%d]:\nstdlib %#v\nfast   %#v", i, want, got)
	}
	// What the standard library refuses, the fast decoder refuses too (the
	// interceptor then leaves the body to the SDK, which reports it).
	for _, bad := range []string{``, `[1,2]`, `"s"`, `{"a":}`, `{"a":1`, `{"a":1}x`, `{'a':1}`, `{"a":01}`, `{"a":NaN}`} {
		_, err := stdDecode(bad)
		require.Error(t, err, bad)
		_, ok := fastDecode(bad)
		require.False(t, ok, "fast decoder accepted %q", bad)
	}
}

// FuzzFastDecode: whatever the fast decoder accepts, the standard library
// decodes to the same map.
func FuzzFastDecode(f *testing.F) {
	for _, body := range fastDecodeCorpus {
		f.Add(body)
	}
	f.Fuzz(func(t *testing.T, body string) {
		got, ok := fastDecode(body)
		if !ok {
			return
		}
		want, err := stdDecode(body)
		if err != nil {
			t.Fatalf("fast decoder accepted %q, encoding/json refuses it: %v", body, err)
		}
		if !reflect.DeepEqual(want, got) {
			t.Fatalf("%q:\nstdlib %#v\nfast   %#v", body, want, got)
		}
	})
}

// intercept runs the interceptor on a message and returns what the handler
// received.
func intercept(t *testing.T, method string, msg interface{}) (context.Context, interface{}) {
	t.Helper()
	var gotCtx context.Context
	var gotMsg interface{}
	_, err := GRPCUnaryInterceptor(context.Background(), msg, &grpc.UnaryServerInfo{FullMethod: method},
		func(ctx context.Context, req interface{}) (interface{}, error) {
			gotCtx, gotMsg = ctx, req
			return nil, nil
		})
	require.NoError(t, err)
	return gotCtx, gotMsg
}

func TestInterceptorHandsTheDecodedBodyToHandleRequest(t *testing.T) {
	body := `{"batch_input":[` + strings.Repeat(`{"plaintext":"aGVsbG8gd29ybGQ="},`, 99) + `{"plaintext":""}]}`
	args := &pb.HandleRequestArgs{Request: &pb.Request{Path: "encrypt/k", Data: body}}
	ctx, msg := intercept(t, pb.Backend_HandleRequest_FullMethodName, args)
	require.Same(t, args, msg)
	require.Equal(t, emptyBody, args.Request.Data)
	want, _ := stdDecode(body)
	require.Equal(t, want, ctx.Value(decodedBodyKey{}))

	// Small bodies, bodies the decoder refuses, and other methods pass
	// through untouched.
	for _, tc := range []struct {
		method string
		msg    interface{}
		data   func() string
	}{
		{pb.Backend_HandleRequest_FullMethodName, &pb.HandleRequestArgs{Request: &pb.Request{Path: "encrypt/k", Data: `{"plaintext":"aGk="}`}}, nil},
		{pb.Backend_HandleRequest_FullMethodName, &pb.HandleRequestArgs{Request: &pb.Request{Path: "encrypt/k", Data: `{"plaintext":"` + strings.Repeat("a", 2000) + `"`}}, nil},
		{pb.Backend_HandleRequest_FullMethodName, &pb.HandleRequestArgs{}, nil},
		{pb.Backend_HandleExistenceCheck_FullMethodName, &pb.HandleExistenceCheckArgs{Request: &pb.Request{Path: "keys/k", Data: body}}, nil},
		{pb.Backend_HandleExistenceCheck_FullMethodName, &pb.HandleExistenceCheckArgs{Request: &pb.Request{Path: "encrypt/k/extra", Data: body}}, nil},
		{pb.Backend_InvalidateKey_FullMethodName, &pb.InvalidateKeyArgs{Key: "policy/k"}, nil},
	} {
		before := fmt.Sprintf("%v", tc.msg)
		ctx, _ := intercept(t, tc.method, tc.msg)
		require.Equal(t, before, fmt.Sprintf("%v", tc.msg), "%s changed", tc.method)
		require.Nil(t, ctx.Value(decodedBodyKey{}))
	}

	// The existence check of encrypt/<name> gets an empty body.
	ec := &pb.HandleExistenceCheckArgs{Request: &pb.Request{Path: "encrypt/k", Data: body}}
	ctx, _ = intercept(t, pb.Backend_HandleExistenceCheck_FullMethodName, ec)
	require.Equal(t, emptyBody, ec.Request.Data)
	require.Nil(t, ctx.Value(decodedBodyKey{}))
}

// TestExistenceChecksIgnoreBody: the only routes with an existence check are
// those existenceCheckIgnoresBody names, and their answer is the same with
// and without the body, for a key that exists and one that does not, with
// a valid body and one the handler refuses.
func TestExistenceChecksIgnoreBody(t *testing.T) {
	e := getTestBackend(t)
	var withCheck []string
	for _, p := range e.b.Backend.Paths {
		if p.ExistenceCheck != nil {
			withCheck = append(withCheck, p.Pattern)
		}
	}
	require.Equal(t, []string{"^encrypt/" + framework.GenericNameRegex("name") + "$"}, withCheck,
		"a route gained an existence check: make sure it reads only the path, then add it to existenceCheckIgnoresBody")
	require.True(t, existenceCheckIgnoresBody("encrypt/my-key"))
	for _, p := range []string{"encrypt/", "encrypt/a/b", "keys/a", "decrypt/a", "xencrypt/a"} {
		require.False(t, existenceCheckIgnoresBody(p), p)
	}

	e.mustWrite(t, "keys/present", nil)
	ctx := context.Background()
	for _, name := range []string{"present", "absent"} {
		for _, body := range []map[string]interface{}{
			{"plaintext": b64("x")},
			{"batch_input": []interface{}{map[string]interface{}{"plaintext": b64("x")}}},
			{"plaintext": b64("x"), "key_version": "not a number"},
		} {
			full := &logical.Request{Operation: logical.UpdateOperation, Path: "encrypt/" + name, Data: body, Storage: e.storage}
			empty := &logical.Request{Operation: logical.UpdateOperation, Path: "encrypt/" + name, Data: map[string]interface{}{}, Storage: e.storage}
			f1, x1, err1 := e.b.HandleExistenceCheck(ctx, full)
			f2, x2, err2 := e.b.HandleExistenceCheck(ctx, empty)
			require.NoError(t, err2)
			require.True(t, f2)
			require.Equal(t, name == "present", x2)
			if err1 == nil {
				require.Equal(t, []bool{f1, x1}, []bool{f2, x2}, "%s %v", name, body)
			} else {
				// The body check the existence check did is
				// still done by the handler: still a 400.
				req := &logical.Request{Operation: logical.UpdateOperation, Path: "encrypt/" + name, Data: body, Storage: e.storage}
				if !x2 {
					req.Operation = logical.CreateOperation
				}
				resp, err := e.b.HandleRequest(ctx, req)
				require.Equal(t, 400, toResult(t, req, resp, err).status, "%s %v: %v", name, body, err1)
			}
		}
	}
}

// TestHandleRequestUsesTheDecodedBody: a batch whose body came in the
// context encrypts every item, in order, and decrypts back.
func TestHandleRequestUsesTheDecodedBody(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	var items []string
	for i := 0; i < 200; i++ {
		items = append(items, fmt.Sprintf(`{"plaintext":%q,"reference":"r%d"}`, b64(fmt.Sprint("item ", i)), i))
	}
	args := &pb.HandleRequestArgs{Request: &pb.Request{Path: "encrypt/k", Data: `{"batch_input":[` + strings.Join(items, ",") + `]}`}}
	ctx, _ := intercept(t, pb.Backend_HandleRequest_FullMethodName, args)
	require.Equal(t, emptyBody, args.Request.Data)

	req := &logical.Request{Operation: logical.UpdateOperation, Path: "encrypt/k", Data: map[string]interface{}{}, Storage: e.storage}
	resp, err := e.b.HandleRequest(ctx, req)
	require.NoError(t, err)
	results := resp.Data["batch_results"].([]encryptResult)
	require.Len(t, results, 200)
	for i, r := range results {
		require.Empty(t, r.Error)
		require.Equal(t, fmt.Sprint("r", i), r.Reference)
		require.Equal(t, fmt.Sprint("item ", i), e.decrypt(t, "k", r.Ciphertext, nil))
	}

	// A request that carries its own body keeps it.
	req = &logical.Request{Operation: logical.UpdateOperation, Path: "encrypt/k", Data: map[string]interface{}{"plaintext": b64("own")}, Storage: e.storage}
	resp, err = e.b.HandleRequest(ctx, req)
	require.NoError(t, err)
	require.Equal(t, "own", e.decrypt(t, "k", resp.Data["ciphertext"].(string), nil))
}
