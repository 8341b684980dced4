package boundary

// Attacks on the pooled batch answers (df3b913): a client of Vault who may
// call encrypt/decrypt on some key, sending many concurrent batches, tries
// to read or corrupt another request's answer, or to crash or swell the
// plugin. Each test fails if its attack succeeds.

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin/pb"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/proto"
)

// attackAnswer is request id's answer: its own bytes throughout (so that a
// byte of another answer shows), at sizes from a few bytes to past the
// pooled buffer the last answer's hint gives, so that some outgrow theirs.
func attackAnswer(id int) string {
	sizes := []int{1, 40, 3000, 60000, 250000, 9000, 180000}
	item := fmt.Sprintf("%08x", id)
	return `{"batch_results":[{"plaintext":"` + strings.Repeat(item, sizes[id%len(sizes)]/8+1) + `","reference":""}]}`
}

// preEncodeHandler answers as the plugin's HandleRequest does for a batch:
// PreEncode, then the SDK's reply with the stand-in.
func preEncodeHandler(answer string, err error) grpc.UnaryHandler {
	return func(ctx context.Context, _ interface{}) (interface{}, error) {
		resp := &logical.Response{Data: map[string]interface{}{"batch_results": "replaced"}}
		if !PreEncode(ctx, resp, func(dst []byte) []byte { return append(dst, answer...) }) {
			return nil, fmt.Errorf("not pre-encoded")
		}
		return &pb.HandleRequestReply{Response: &pb.Response{Data: standInJSON}}, err
	}
}

func interceptPooled(t testing.TB, answer string, herr error) (interface{}, error) {
	args := &pb.HandleRequestArgs{Request: &pb.Request{Path: "decrypt/k", Data: "{}"}}
	return UnaryInterceptor(context.Background(), args, &grpc.UnaryServerInfo{FullMethod: pb.Backend_HandleRequest_FullMethodName}, preEncodeHandler(answer, herr))
}

// Attack: concurrent batches, so that a buffer goes back to the pool and to
// another request while an answer's string still points at it. Each request
// yields between its answer being written and being marshalled, while the
// others cycle buffers through the pool; its reply must still hold its own
// bytes, and the codec must write exactly what proto.Marshal writes.
func TestAttackConcurrentAnswersStayTheirOwn(t *testing.T) {
	c := codec{&bufferPool{}}
	concurrently(t, 8, 60, func(id int) error {
		answer := attackAnswer(id)
		out, err := interceptPooled(t, answer, nil)
		if err != nil {
			return err
		}
		for i := 0; i < 3; i++ {
			runtime.Gosched()
		}
		if got := Reply(out).Response.Data; got != answer {
			return fmt.Errorf("request %d: its answer changed before it was marshalled (%d bytes, want %d)", id, len(got), len(answer))
		}
		want, _ := proto.Marshal(&pb.HandleRequestReply{Response: &pb.Response{Data: answer}})
		got, err := c.Marshal(out)
		if err != nil {
			return err
		}
		runtime.Gosched()
		if !bytes.Equal(want, got.Materialize()) {
			return fmt.Errorf("request %d: the message is not its answer", id)
		}
		got.Free()
		if pr, ok := out.(*pooledReply); ok && (pr.Response.Data != "" || pr.buf != nil) {
			return fmt.Errorf("request %d: the released reply still points at its buffer", id)
		}
		return nil
	})
}

// concurrently runs f for ids 0 to workers*rounds-1 on workers goroutines,
// each taking rounds ids in turn and stopping at its first error; every
// error fails t.
func concurrently(t *testing.T, workers, rounds int, f func(id int) error) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for r := 0; r < rounds; r++ {
				if err := f(w*rounds + r); err != nil {
					errs <- err
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// Attack: a handler that pre-encodes and then fails (or answers with other
// data than the stand-in). Its buffer must not go back to the pool while
// the reply it returned still points at it: after other answers have gone
// through the pool, the reply still reads its own answer.
func TestAttackAnswerOfAFailedCallIsNotRecycled(t *testing.T) {
	answer := attackAnswer(2) // 3000 bytes, in the hint's buffer
	for _, tc := range []struct {
		name string
		run  func() (interface{}, error)
	}{
		{"handler error", func() (interface{}, error) { return interceptPooled(t, answer, fmt.Errorf("backend failed")) }},
		{"not the stand-in", func() (interface{}, error) {
			args := &pb.HandleRequestArgs{Request: &pb.Request{Path: "decrypt/k", Data: "{}"}}
			return UnaryInterceptor(context.Background(), args, &grpc.UnaryServerInfo{FullMethod: pb.Backend_HandleRequest_FullMethodName},
				func(ctx context.Context, _ interface{}) (interface{}, error) {
					resp := &logical.Response{Data: map[string]interface{}{}}
					PreEncode(ctx, resp, func(dst []byte) []byte { return append(dst, answer...) })
					return &pb.HandleRequestReply{Response: &pb.Response{Data: `{"other":1}`}}, nil
				})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			interceptPooled(t, answer, nil) // the hint: a buffer of this answer's class
			out, _ := tc.run()
			_, pooled := out.(*pooledReply)
			require.False(t, pooled, "a reply not sent as the answer came back pooled")
			before := Reply(out).Response.Data
			c := codec{&bufferPool{}}
			for i := 0; i < 50; i++ {
				other, err := interceptPooled(t, strings.Repeat("x", len(answer)), nil)
				require.NoError(t, err)
				m, err := c.Marshal(other)
				require.NoError(t, err)
				m.Free()
			}
			require.Equal(t, before, Reply(out).Response.Data, "the failed call's reply was overwritten by other answers")
		})
	}
}

// Attack: an answer gRPC fails to marshal (here invalid UTF-8 in a proto3
// string; a message too large fails after Marshal, once released). Its
// plaintexts must still be cleared and its buffer come back.
func TestAttackMarshalFailureStillClears(t *testing.T) {
	answer := "\xff" + strings.Repeat("p", 999)
	interceptPooled(t, answer, nil)
	out, err := interceptPooled(t, answer, nil)
	require.NoError(t, err)
	pr, ok := out.(*pooledReply)
	require.True(t, ok, "%T", out)
	buf := pr.buf
	_, err = codec{&bufferPool{}}.Marshal(out)
	require.Error(t, err)
	require.Empty(t, pr.Response.Data)
	require.Equal(t, make([]byte, len(answer)), (*buf)[:len(answer)], "a failed marshal left the plaintext in the pooled buffer")
}

// Attack (hardening; gRPC 1.75.1 marshals a unary reply once, in
// sendResponse): a pooled reply marshalled a second time must neither crash
// the plugin nor go out with its answer emptied.
func TestAttackPooledReplyMarshalledTwice(t *testing.T) {
	answer := attackAnswer(3)
	interceptPooled(t, answer, nil)
	out, err := interceptPooled(t, answer, nil)
	require.NoError(t, err)
	_, ok := out.(*pooledReply)
	require.True(t, ok, "%T", out)
	c := codec{&bufferPool{}}
	_, err = c.Marshal(out)
	require.NoError(t, err)
	func() {
		defer func() {
			if p := recover(); p != nil {
				t.Errorf("a second Marshal of a pooled reply panics (a crash of the plugin): %v", p)
			}
		}()
		m, err := c.Marshal(out)
		if err == nil {
			t.Errorf("a second Marshal of a released reply sent %d bytes, not the answer", m.Len())
		}
	}()
}

// Attack: one huge answer sets the global hint, and every request that
// starts before another answer resets it gets a buffer of that size,
// whatever its own answer: a client who may send one large batch makes the
// plugin allocate (and zero) that much again for each small answer of
// anyone's served meanwhile. A small answer's buffer must stay small.
func TestAttackHugeAnswerDoesNotSizeOthersBuffers(t *testing.T) {
	huge := strings.Repeat("A", 8<<20)
	ctx := context.WithValue(context.Background(), slotKey{}, &slot{})
	require.True(t, PreEncode(ctx, &logical.Response{}, func(dst []byte) []byte { return append(dst, huge...) }))
	s := &slot{}
	ctx = context.WithValue(context.Background(), slotKey{}, s)
	require.True(t, PreEncode(ctx, &logical.Response{}, func(dst []byte) []byte { return append(dst, `{"batch_results":[]}`...) }))
	require.LessOrEqual(t, cap(s.data), 2<<20, "a 20-byte answer got a %d-byte buffer from another request's answer", cap(s.data))
}

// backendStub answers HandleRequest as the plugin does for a batch, with the
// answer of the request's id (its path).
type backendStub struct {
	pb.UnimplementedBackendServer
}

func (backendStub) HandleRequest(ctx context.Context, args *pb.HandleRequestArgs) (*pb.HandleRequestReply, error) {
	var id int
	if _, err := fmt.Sscanf(args.Request.Path, "decrypt/%d", &id); err != nil {
		return nil, err
	}
	out, err := preEncodeHandler(attackAnswer(id), nil)(ctx, args)
	if err != nil {
		return nil, err
	}
	return out.(*pb.HandleRequestReply), nil
}

// outPayloads is a stats handler that reads the reply gRPC hands it after
// sending it, as any stats handler would.
type outPayloads struct {
	mu   sync.Mutex
	seen []string
}

func (*outPayloads) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (*outPayloads) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}
func (*outPayloads) HandleConn(context.Context, stats.ConnStats) {}
func (h *outPayloads) HandleRPC(_ context.Context, s stats.RPCStats) {
	if p, ok := s.(*stats.OutPayload); ok {
		if r, ok := p.Payload.(*pooledReply); ok {
			h.mu.Lock()
			h.seen = append(h.seen, r.Response.Data)
			h.mu.Unlock()
		}
	}
}

// Attack, through gRPC itself with the server's options (stream workers,
// windows, the codec, the interceptor) and a stats handler: concurrent
// batch calls each get their own answer, byte for byte; what reaches the
// stats handler after the send holds no answer's bytes.
func TestAttackConcurrentCallsThroughGRPC(t *testing.T) {
	sh := &outPayloads{}
	srv := grpc.NewServer(append(serverOptions(), grpc.StatsHandler(sh))...)
	pb.RegisterBackendServer(srv, backendStub{})
	lis := bufconn.Listen(1 << 20)
	go srv.Serve(lis)
	defer srv.Stop()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	client := pb.NewBackendClient(conn)

	concurrently(t, 8, 25, func(id int) error {
		reply, err := client.HandleRequest(context.Background(), &pb.HandleRequestArgs{Request: &pb.Request{Path: fmt.Sprintf("decrypt/%d", id), Data: "{}"}})
		if err != nil {
			return err
		}
		if reply.Response.Data != attackAnswer(id) {
			return fmt.Errorf("call %d got another answer's bytes or a corrupted answer (%d bytes)", id, len(reply.Response.Data))
		}
		return nil
	})
	sh.mu.Lock()
	defer sh.mu.Unlock()
	require.NotEmpty(t, sh.seen, "no answer went out pooled")
	for _, d := range sh.seen {
		require.Empty(t, d, "a stats handler read a released answer's bytes")
	}
}
