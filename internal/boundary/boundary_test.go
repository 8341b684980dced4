package boundary

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/plugin/pb"
	segjson "github.com/segmentio/encoding/json"
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

// fastDecode is decodeWithBatch decoding batch_input as any other field.
func fastDecode(body string) (map[string]interface{}, bool) {
	return decodeWithBatch(body, func(segjson.RawMessage) (interface{}, bool) { return nil, false })
}

// materialize replaces a batch_input of *RawObject by the maps their Map
// gives, or fails the test when one does not decode.
func materialize(t testing.TB, data map[string]interface{}) map[string]interface{} {
	batch, ok := data["batch_input"].(*RawBatch)
	if !ok {
		return data
	}
	list := batch.Objects()
	out := make(map[string]interface{}, len(data))
	for k, v := range data {
		out[k] = v
	}
	maps := make([]interface{}, len(list))
	for i, el := range list {
		obj, ok := el.(*RawObject)
		if !ok {
			t.Fatalf("batch_input[%d] is a %T among raw objects", i, el)
		}
		m, ok := obj.Map()
		if !ok {
			t.Fatalf("batch_input[%d] %q does not decode", i, *obj)
		}
		maps[i] = m
	}
	out["batch_input"] = maps
	return out
}

// TestRequestDecodeHandsOverObjects: requestDecode gives batch_input's
// objects undecoded exactly when it is an array of objects only, and each
// decodes (Map) to what encoding/json gives for it.
func TestRequestDecodeHandsOverObjects(t *testing.T) {
	for _, tc := range []struct {
		body string
		raw  bool
	}{
		{`{"batch_input":[{"plaintext":"eA=="},{"ciphertext":"vault:v1:x","key_version":2}],"k":1}`, true},
		{`{"batch_input":[ {"a":1} , {"b":[1,null]} ]}`, true},
		{`{"batch_input":[]}`, true},
		{`{"batch_input":[{"a":1},"s"]}`, false},
		{`{"batch_input":[{"a":1},null]}`, false},
		{`{"batch_input":[[1]]}`, false},
		{`{"batch_input":{"a":1}}`, false},
		{`{"batch_input":"[{}]"}`, false},
		{`{"batch_input":[{"a":"\u00e9\ud800"}],"batch_input":[{"b":2}]}`, true},
	} {
		got, ok := requestDecode(tc.body)
		require.True(t, ok, tc.body)
		_, raw := got["batch_input"].(*RawBatch)
		require.Equal(t, tc.raw, raw, tc.body)
		want, err := stdDecode(tc.body)
		require.NoError(t, err)
		require.Equal(t, want, materialize(t, got), tc.body)
	}
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
		req, ok := requestDecode(body)
		require.True(t, ok, "corpus[%d]: requestDecode refused valid JSON", i)
		require.Equal(t, want, materialize(t, req), "corpus[%d]", i)
	}
	// What the standard library refuses, the fast decoder refuses too (the
	// interceptor then leaves the body to the SDK, which reports it).
	for _, bad := range []string{``, `[1,2]`, `"s"`, `{"a":}`, `{"a":1`, `{"a":1}x`, `{'a':1}`, `{"a":01}`, `{"a":NaN}`,
		// Inside batch_input's objects, which requestDecode hands over
		// undecoded: they are checked all the same.
		`{"batch_input":[{"a":tru}]}`, `{"batch_input":[{"a":1,}]}`, `{"batch_input":[{"a" 1}]}`,
		`{"batch_input":[{"a":01}]}`, `{"batch_input":[{"a":"x}]}`, `{"batch_input":[{"a":1}}]}`,
		`{"batch_input":[{"a":1},]}`, `{"batch_input":[{"a":"\q"}]}`, `{"batch_input":[{a:1}]}`,
		`{"a":` + strings.Repeat("[", 10001) + strings.Repeat("]", 10001) + `}`} {
		_, err := stdDecode(bad)
		require.Error(t, err, bad)
		_, ok := fastDecode(bad)
		require.False(t, ok, "fast decoder accepted %q", bad)
		_, ok = requestDecode(bad)
		require.False(t, ok, "requestDecode accepted %q", bad)
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
		req, ok := requestDecode(body)
		if !ok {
			t.Fatalf("requestDecode refused %q, which the fast decoder takes", body)
		}
		if req := materialize(t, req); !reflect.DeepEqual(want, req) {
			t.Fatalf("%q:\nstdlib  %#v\nrequest %#v", body, want, req)
		}
	})
}

// intercept runs the interceptor on a message and returns what the handler
// received.
func intercept(t *testing.T, method string, msg interface{}) (context.Context, interface{}) {
	t.Helper()
	var gotCtx context.Context
	var gotMsg interface{}
	_, err := UnaryInterceptor(context.Background(), msg, &grpc.UnaryServerInfo{FullMethod: method},
		func(ctx context.Context, req interface{}) (interface{}, error) {
			gotCtx, gotMsg = ctx, req
			return nil, nil
		})
	require.NoError(t, err)
	return gotCtx, gotMsg
}

func TestInterceptorHandsTheDecodedBodyToTheBackend(t *testing.T) {
	body := `{"batch_input":[` + strings.Repeat(`{"plaintext":"aGVsbG8gd29ybGQ="},`, 99) + `{"plaintext":""}],"key_version":2,"context":"\u003cx\u003e"}`
	want, _ := stdDecode(body)
	// The existence check gets every field but batch_input's items.
	wantExists, _ := stdDecode(body)
	wantExists["batch_input"] = []interface{}{}
	for _, method := range []string{pb.Backend_HandleRequest_FullMethodName, pb.Backend_HandleExistenceCheck_FullMethodName} {
		req := &pb.Request{Path: "encrypt/k", Data: body}
		var msg interface{} = &pb.HandleRequestArgs{Request: req}
		expected := want
		if method == pb.Backend_HandleExistenceCheck_FullMethodName {
			msg, expected = &pb.HandleExistenceCheckArgs{Request: req}, wantExists
		}
		ctx, got := intercept(t, method, msg)
		require.Same(t, msg, got)
		require.Equal(t, emptyBody, req.Data)
		decoded, _ := ctx.Value(decodedBodyKey{}).(map[string]interface{})
		require.Equal(t, expected, materialize(t, decoded), method)
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

// stringCorpus holds strings whose JSON encodings differ between encoders:
// HTML characters, control characters, quotes, invalid UTF-8, U+2028.
var stringCorpus = []string{
	"", "aGVsbG8=", "vault:v1:abc+/=", "ref-1", "<script>&amp;</script>", "a\"b\\c",
	"\x00\x01\x1f\x7f", "\b\f\n\r\t", "caf\u00e9 \u4e2d \U0001F600", "\u2028\u2029",
	"\xff\xfe", "\xe2\x82", "trailing \xc3", strings.Repeat("QUJD", 1000),
}

// AppendString writes every string byte for byte as encoding/json does.
func TestAppendStringIsEncodingJSONs(t *testing.T) {
	for _, s := range stringCorpus {
		want, err := json.Marshal(s)
		require.NoError(t, err)
		require.Equal(t, string(want), string(AppendString(nil, s)), "%q", s)
		require.Equal(t, "x"+string(want), string(AppendString([]byte("x"), s)), "appends")
	}
	for c := 0; c < 256; c++ {
		s := string([]byte{byte(c)})
		want, _ := json.Marshal(s)
		require.Equal(t, string(want), string(AppendString(nil, s)), "byte %#x", c)
	}
}

func FuzzAppendString(f *testing.F) {
	for _, s := range stringCorpus {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		want, _ := json.Marshal(s)
		if got := AppendString(nil, s); string(got) != string(want) {
			t.Fatalf("%q: encoding/json %s, AppendString %s", s, want, got)
		}
	})
}

// TestServeMatchesTheSDK fails when the SDK in go.mod is not the one Serve
// was checked against: see the package doc for what to re-check.
func TestServeMatchesTheSDK(t *testing.T) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Version}} {{.Dir}}", "github.com/hashicorp/vault/sdk").Output()
	require.NoError(t, err)
	version, dir, _ := strings.Cut(strings.TrimSpace(string(out)), " ")
	require.Equal(t, sdkChecked, version, "go.mod has another SDK than Serve follows: re-check Serve and the interceptor (package doc), then update sdkChecked and serveSHA256")
	src, err := os.ReadFile(filepath.Join(dir, "plugin", "serve.go"))
	require.NoError(t, err)
	sum := sha256.Sum256(src)
	require.Equal(t, serveSHA256, hex.EncodeToString(sum[:]), "the SDK's plugin/serve.go is not the one Serve follows")
}

// The stand-in the interceptor looks for is what the SDK writes for the
// data PreEncode leaves in the response.
func TestStandInIsWhatTheSDKWrites(t *testing.T) {
	got, err := json.Marshal(map[string]interface{}{standInKey: true})
	require.NoError(t, err)
	require.Equal(t, standInJSON, string(got))
}

// Bodies from exactly fastDecodeMin bytes are decoded by the fast path;
// one byte less is left to the SDK.
func TestFastDecodeFromItsMinimum(t *testing.T) {
	for _, size := range []int{fastDecodeMin - 1, fastDecodeMin, fastDecodeMin + 1} {
		body := `{"pad":"` + strings.Repeat("p", size-10) + `"}`
		require.Len(t, body, size)
		req := &pb.Request{Path: "encrypt/k", Data: body}
		ctx, _ := intercept(t, pb.Backend_HandleRequest_FullMethodName, &pb.HandleRequestArgs{Request: req})
		_, decoded := DecodedBody(ctx)
		require.Equal(t, size >= fastDecodeMin, decoded, "%d bytes", size)
		require.Equal(t, size >= fastDecodeMin, req.Data == emptyBody, "%d bytes", size)
	}
}

// Printable ASCII that needs no escape (base64, the bulk of a batch) is
// copied without an allocation; every other byte goes through
// encoding/json, which allocates.
func TestAppendStringCopiesPlainASCII(t *testing.T) {
	buf := make([]byte, 0, 64)
	for c := 0; c < 256; c++ {
		s := string([]byte{byte(c)}) + "x"
		allocs := testing.AllocsPerRun(5, func() { buf = AppendString(buf[:0], s) })
		plain := c >= 0x20 && c <= 0x7e && !strings.ContainsRune(`"\<>&`, rune(c))
		require.Equal(t, plain, allocs == 0, "byte %#x: %v allocations", c, allocs)
	}
}

// nestingDepthByteByByte is the scan nestingDepth does, one byte at a time:
// the reference its jumps over strings must agree with.
func nestingDepthByteByByte(body string) int {
	depth, deepest, inString := 0, 0, false
	for i := 0; i < len(body); i++ {
		c := body[i]
		if inString {
			if c == '\\' {
				i++
			} else if c == '"' {
				inString = false
			}
			continue
		}
		switch c {
		case '"':
			inString = true
		case '{', '[':
			depth++
			deepest = max(deepest, depth)
		case '}', ']':
			depth--
		}
	}
	return deepest
}

func TestNestingDepthJumpsAsItScans(t *testing.T) {
	for _, s := range []string{``, `"`, `"\`, `"\"`, `"\\"[`, `"\\\"[`, `{"a":"[\"]"}`, `[["\\\\"],{"b":"\\"}]`, `"abc\`, `{"x":"y"`} {
		require.Equal(t, nestingDepthByteByByte(s), nestingDepth(s), "%q", s)
	}
	alphabet := []byte(`"\{}[]ab,:`)
	r := rand.New(rand.NewPCG(3, 4))
	for range 20000 {
		b := make([]byte, r.IntN(40))
		for i := range b {
			b[i] = alphabet[r.IntN(len(alphabet))]
		}
		require.Equal(t, nestingDepthByteByByte(string(b)), nestingDepth(string(b)), "%q", b)
	}
}

// TestExistenceDecodeIsFastDecodeButTheItems: for every corpus body,
// existenceDecode gives what encoding/json gives, except an array under
// batch_input, which it gives empty; a body fastDecode refuses it refuses.
func TestExistenceDecodeIsFastDecodeButTheItems(t *testing.T) {
	bodies := []string{
		`{"batch_input":"not a list","pad":"` + strings.Repeat("p", 1100) + `"}`,
		`{"batch_input":{"plaintext":"eA=="},"x":[1,2]}`,
		`{"batch_input":["a",1,null,[2]],"key_version":"3","n":1.5e3}`,
		`{"batch_input":null,"b":true}`,
		`{"batch_input":[],"s":"caf\u00e9 \ud83d\ude00"}`,
		`{"batch_input":[{"plaintext":"eA=="}],"batch_input":"last wins"}`,
		`{"plain":"x"}`,
		`{"batch_input":[{"context":["x"]}],"a":{"b":[1]}}`, // as deep as the fast decoders go
		`{"batch_input":[{"context":[["x"]]}],"pad":"x"}`,   // one deeper: both leave it to the SDK
		`{"batch_input":[{"plaintext":"eA=="}]} trailing`,
		`{"batch_input":[{"plaintext":"eA=="}]`,
		`[1,2]`,
	}
	for _, s := range stringCorpus {
		q, _ := json.Marshal(s)
		bodies = append(bodies, `{"batch_input":[{"plaintext":`+string(q)+`}],"reference":`+string(q)+`}`)
	}
	for _, body := range bodies {
		want, wantErr := stdDecode(body)
		got, ok := existenceDecode(body)
		_, fastOK := fastDecode(body)
		require.Equal(t, fastOK, ok, "%.80s", body)
		if !ok {
			// Refused: bodies encoding/json refuses too, and those
			// nested deeper than a batch, left to the SDK.
			require.True(t, wantErr != nil || nestingDepth(body) > fastDecodeMaxDepth, "refused a body encoding/json decodes: %.80s", body)
			continue
		}
		require.NoError(t, wantErr, "%.80s", body)
		if items, isList := want["batch_input"].([]interface{}); isList {
			require.NotNil(t, items)
			want["batch_input"] = []interface{}{}
		}
		require.Equal(t, want, got, "%.80s", body)
	}
}
