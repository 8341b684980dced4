package boundary

import (
	"fmt"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"
)

// codec is gRPC's protobuf codec for the plugin's server, with its
// buffers from bufferPool. gRPC's own codec takes them from the default
// pool whatever the server is given, and that pool clears a buffer's whole
// capacity at each Get (a 1 MiB buffer for a 150 KB batch request, each
// way). Marshal fills the buffer it gets to the message's size and
// Unmarshal copies the message into it, so no byte of an earlier message
// is ever read.
type codec struct{ pool *bufferPool }

func (codec) Name() string { return "proto" }

func protoMessage(v any) (proto.Message, error) {
	switch m := v.(type) {
	case protoadapt.MessageV1:
		return protoadapt.MessageV2Of(m), nil
	case protoadapt.MessageV2:
		return m, nil
	}
	return nil, fmt.Errorf("proto codec: %T is not a protobuf message", v)
}

func (c codec) Marshal(v any) (mem.BufferSlice, error) {
	if r, ok := v.(*pooledReply); ok {
		if r.buf == nil {
			// Released by an earlier Marshal: its answer is gone.
			return nil, fmt.Errorf("proto codec: a pooled reply marshalled again after its answer was released")
		}
		// The message copies the answer's bytes; then they are not
		// needed any more.
		defer r.release()
		v = r.HandleRequestReply
	}
	m, err := protoMessage(v)
	if err != nil {
		return nil, err
	}
	size := proto.Size(m)
	if mem.IsBelowBufferPoolingThreshold(size) {
		b, err := proto.Marshal(m)
		if err != nil {
			return nil, err
		}
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	}
	buf := c.pool.Get(size)
	out, err := proto.MarshalOptions{}.MarshalAppend((*buf)[:0], m)
	if err != nil {
		c.pool.Put(buf)
		return nil, err
	}
	*buf = out
	return mem.BufferSlice{mem.NewBuffer(buf, c.pool)}, nil
}

func (c codec) Unmarshal(data mem.BufferSlice, v any) error {
	m, err := protoMessage(v)
	if err != nil {
		return err
	}
	buf := data.MaterializeToBuffer(c.pool)
	defer buf.Free()
	return proto.Unmarshal(buf.ReadOnlyData(), m)
}
