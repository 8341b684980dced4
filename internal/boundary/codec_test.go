package boundary

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin/pb"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
)

// The codec writes and reads what gRPC's protobuf codec does, from buffers
// that held other messages before.
func TestCodecIsProtobufs(t *testing.T) {
	pool := &bufferPool{}
	c := codec{pool}
	for _, n := range []int{0, 10, 4 << 10, 150_000, 1 << 20} {
		// Dirty every class the message may use.
		for size := 256; size <= 1<<22; size *= 2 {
			b := pool.Get(size)
			for i := range *b {
				(*b)[i] = 0xaa
			}
			pool.Put(b)
		}
		msg := &pb.HandleRequestArgs{StorageID: 7, Request: &pb.Request{ID: "id", Path: "encrypt/k", Data: strings.Repeat("x", n)}}
		want, err := proto.Marshal(msg)
		require.NoError(t, err)
		got, err := c.Marshal(msg)
		require.NoError(t, err)
		require.True(t, bytes.Equal(want, got.Materialize()), "size %d", n)
		got.Free()

		// The message cut into pieces, as frames bring it.
		var pieces mem.BufferSlice
		for i := 0; i < len(want); i += 16 << 10 {
			pieces = append(pieces, mem.SliceBuffer(want[i:min(len(want), i+16<<10)]))
		}
		var back pb.HandleRequestArgs
		require.NoError(t, c.Unmarshal(pieces, &back))
		require.True(t, proto.Equal(msg, &back), "size %d", n)
	}
	_, err := c.Marshal("not a message")
	require.ErrorContains(t, err, "not a protobuf message")
	require.ErrorContains(t, c.Unmarshal(nil, 42), "not a protobuf message")
	require.Equal(t, "proto", c.Name())
}

// A pre-encoded answer goes out as the SDK's reply would, and its buffer
// comes back to the pool cleared, with the reply no longer pointing at it.
func TestCodecReleasesPooledAnswer(t *testing.T) {
	c := codec{&bufferPool{}}
	answer := `{"batch_results":[{"plaintext":"` + strings.Repeat("c2VjcmV0", 4000) + `","reference":""}]}`
	for round := 0; round < 4; round++ {
		handler := func(ctx context.Context, _ interface{}) (interface{}, error) {
			resp := &logical.Response{Data: map[string]interface{}{"batch_results": "replaced"}}
			require.True(t, PreEncode(ctx, resp, func(dst []byte) []byte { return append(dst, answer...) }))
			return &pb.HandleRequestReply{Response: &pb.Response{Data: standInJSON}}, nil
		}
		args := &pb.HandleRequestArgs{Request: &pb.Request{Path: "decrypt/k", Data: "{}"}}
		out, err := UnaryInterceptor(context.Background(), args, &grpc.UnaryServerInfo{FullMethod: pb.Backend_HandleRequest_FullMethodName}, func(ctx context.Context, req interface{}) (interface{}, error) {
			return handler(ctx, req)
		})
		require.NoError(t, err)
		require.Equal(t, answer, Reply(out).Response.Data)
		pr, ok := out.(*pooledReply)
		if round == 0 {
			// The first answer of its size outgrows the buffer it
			// got; the next ones fit theirs.
			continue
		}
		require.True(t, ok, "round %d: a pre-encoded answer in a pooled buffer comes back as a pooledReply, got %T", round, out)
		buf := pr.buf

		want, err := proto.Marshal(&pb.HandleRequestReply{Response: &pb.Response{Data: answer}})
		require.NoError(t, err)
		got, err := c.Marshal(out)
		require.NoError(t, err)
		require.True(t, bytes.Equal(want, got.Materialize()), "round %d", round)
		got.Free()

		require.Empty(t, pr.Response.Data, "the reply still points at the released buffer")
		require.Nil(t, pr.buf)
		require.Equal(t, make([]byte, len(answer)), (*buf)[:len(answer)], "the answer's bytes were not cleared")
	}
}

// preEncodeWith runs PreEncode in an intercepted call, with encode.
func preEncodeWith(t *testing.T, encode func(dst []byte) []byte) interface{} {
	t.Helper()
	args := &pb.HandleRequestArgs{Request: &pb.Request{Path: "decrypt/k", Data: "{}"}}
	out, err := UnaryInterceptor(context.Background(), args, &grpc.UnaryServerInfo{FullMethod: pb.Backend_HandleRequest_FullMethodName},
		func(ctx context.Context, _ interface{}) (interface{}, error) {
			require.True(t, PreEncode(ctx, &logical.Response{}, encode))
			return &pb.HandleRequestReply{Response: &pb.Response{Data: standInJSON}}, nil
		})
	require.NoError(t, err)
	return out
}

// An answer that outgrows its pooled buffer piece by piece, as appendBatch
// writes one, leaves a partial copy in it up to its capacity: all of that
// is cleared before the buffer goes back, not only the hint's length.
func TestOutgrownAnswerBufferIsCleared(t *testing.T) {
	small := strings.Repeat("s", 300)
	preEncodeWith(t, func(dst []byte) []byte { return append(dst, small...) }) // the hint: about 375 bytes
	var first []byte
	out := preEncodeWith(t, func(dst []byte) []byte {
		first = dst[:cap(dst)] // the pooled buffer's whole array
		for range 100 {
			dst = append(dst, "c2VjcmV0IHBsYWludGV4dA=="...)
		}
		return dst
	})
	_, pooled := out.(*pooledReply)
	require.False(t, pooled, "the answer was to outgrow the buffer it got")
	require.Greater(t, cap(first), 375)
	require.Equal(t, make([]byte, cap(first)), first, "the outgrown buffer kept part of the answer")
}

// An answer about the size of the last one fits the buffer it gets even
// when it reserves an eighth more first, as appendBatch does: the hint
// leaves that margin. (250 KB answers: without the margin the buffer's
// class, 256 KiB, would be outgrown every time.)
func TestAnswerOfTheLastSizeFitsItsBuffer(t *testing.T) {
	answer := strings.Repeat("a", 250_000)
	encode := func(dst []byte) []byte {
		dst = slices.Grow(dst, len(answer)*9/8)
		return append(dst, answer...)
	}
	preEncodeWith(t, encode)
	for round := range 3 {
		out := preEncodeWith(t, encode)
		_, pooled := out.(*pooledReply)
		require.True(t, pooled, "round %d: the answer outgrew its pooled buffer", round)
		require.Equal(t, answer, Reply(out).Response.Data)
	}
}
