package boundary

import (
	"bytes"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/plugin/pb"
	"github.com/stretchr/testify/require"
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
