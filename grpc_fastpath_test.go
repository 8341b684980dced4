package hsmtransit

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"

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
	`{"nested":{"a":[{"c":null},true,false,[]]}}`,
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
		if nestingDepth(body) > fastDecodeMaxDepth {
			require.False(t, ok, "corpus[%d]: nested deeper than the fast path takes", i)
			continue
		}
		require.True(t, ok, "corpus[%d]: fast decoder refused valid JSON", i)
		require.True(t, reflect.DeepEqual(want, got), "corpus[%d]:\nstdlib %#v\nfast   %#v", i, want, got)
	}
	// What the standard library refuses, the fast decoder refuses too (the
	// interceptor then leaves the body to the SDK, which reports it).
	for _, bad := range []string{``, `[1,2]`, `"s"`, `{"a":}`, `{"a":1`, `{"a":1}x`, `{'a':1}`, `{"a":01}`, `{"a":NaN}`,
		`{"a":` + strings.Repeat("[", 10001) + strings.Repeat("]", 10001) + `}`} {
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

func TestInterceptorHandsTheDecodedBodyToTheBackend(t *testing.T) {
	body := `{"batch_input":[` + strings.Repeat(`{"plaintext":"aGVsbG8gd29ybGQ="},`, 99) + `{"plaintext":""}]}`
	want, _ := stdDecode(body)
	for _, method := range []string{pb.Backend_HandleRequest_FullMethodName, pb.Backend_HandleExistenceCheck_FullMethodName} {
		req := &pb.Request{Path: "encrypt/k", Data: body}
		var msg interface{} = &pb.HandleRequestArgs{Request: req}
		if method == pb.Backend_HandleExistenceCheck_FullMethodName {
			msg = &pb.HandleExistenceCheckArgs{Request: req}
		}
		ctx, got := intercept(t, method, msg)
		require.Same(t, msg, got)
		require.Equal(t, emptyBody, req.Data)
		require.Equal(t, want, ctx.Value(decodedBodyKey{}))
	}

	// Small bodies, deeply nested ones, bodies the decoder refuses, and
	// other methods pass through untouched.
	deep := `{"batch_input":[{"context":[[["x"]]]}],"pad":"` + strings.Repeat("a", 2000) + `"}`
	require.Equal(t, 6, nestingDepth(deep))
	require.Equal(t, 1, nestingDepth(`{"s":"[{\"[{"}`))
	for _, tc := range []struct {
		method string
		msg    interface{}
	}{
		{pb.Backend_HandleRequest_FullMethodName, &pb.HandleRequestArgs{Request: &pb.Request{Path: "encrypt/k", Data: `{"plaintext":"aGk="}`}}},
		{pb.Backend_HandleRequest_FullMethodName, &pb.HandleRequestArgs{Request: &pb.Request{Path: "encrypt/k", Data: `{"plaintext":"` + strings.Repeat("a", 2000) + `"`}}},
		{pb.Backend_HandleRequest_FullMethodName, &pb.HandleRequestArgs{Request: &pb.Request{Path: "encrypt/k", Data: deep}}},
		{pb.Backend_HandleExistenceCheck_FullMethodName, &pb.HandleExistenceCheckArgs{Request: &pb.Request{Path: "encrypt/k", Data: deep}}},
		{pb.Backend_HandleRequest_FullMethodName, &pb.HandleRequestArgs{}},
		{pb.Backend_HandleExistenceCheck_FullMethodName, &pb.HandleExistenceCheckArgs{}},
		{pb.Backend_InvalidateKey_FullMethodName, &pb.InvalidateKeyArgs{Key: "policy/k"}},
		// A message under another method's name is not touched.
		{pb.Backend_Setup_FullMethodName, &pb.HandleRequestArgs{Request: &pb.Request{Path: "encrypt/k", Data: body}}},
	} {
		before := fmt.Sprintf("%v", tc.msg)
		ctx, _ := intercept(t, tc.method, tc.msg)
		require.Equal(t, before, fmt.Sprintf("%v", tc.msg), "%s changed", tc.method)
		require.Nil(t, ctx.Value(decodedBodyKey{}))
	}
}

// TestExistenceCheckWithDecodedBody: the existence check answers the same,
// with the same error, whether the body came in the request or in the
// context, for a key that exists and one that does not, for a valid body
// and one the framework refuses.
func TestExistenceCheckWithDecodedBody(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/present", nil)
	for _, name := range []string{"present", "absent"} {
		for _, body := range []string{
			`{"plaintext":"eA==","reference":"` + strings.Repeat("r", 1100) + `"}`,
			`{"batch_input":[{"plaintext":"eA=="}],"pad":"` + strings.Repeat("p", 1100) + `"}`,
			`{"plaintext":"eA==","key_version":"not a number","pad":"` + strings.Repeat("p", 1100) + `"}`,
		} {
			data, _ := stdDecode(body)
			stock := &logical.Request{Operation: logical.UpdateOperation, Path: "encrypt/" + name, Data: data, Storage: e.storage}
			f1, x1, err1 := e.b.HandleExistenceCheck(context.Background(), stock)

			args := &pb.HandleExistenceCheckArgs{Request: &pb.Request{Path: "encrypt/" + name, Data: body}}
			ctx, _ := intercept(t, pb.Backend_HandleExistenceCheck_FullMethodName, args)
			require.Equal(t, emptyBody, args.Request.Data)
			fast := &logical.Request{Operation: logical.UpdateOperation, Path: "encrypt/" + name, Data: map[string]interface{}{}, Storage: e.storage}
			f2, x2, err2 := e.b.HandleExistenceCheck(ctx, fast)

			require.Equal(t, []bool{f1, x1}, []bool{f2, x2}, "%s %.60s", name, body)
			require.Equal(t, fmt.Sprint(err1), fmt.Sprint(err2), "%s %.60s", name, body)
			if strings.Contains(body, "not a number") {
				require.Error(t, err2, "the framework validates the body in the existence check")
			} else {
				require.NoError(t, err2)
				require.True(t, f2)
				require.Equal(t, name == "present", x2)
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
