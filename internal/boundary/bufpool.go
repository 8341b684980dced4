package boundary

import (
	"math/bits"
	"sync"
)

// bufferPool is the gRPC server's pool of message buffers (Serve installs
// it). gRPC's default pool clears a buffer's whole capacity at every Get,
// and gives a 150 KB batch request a 1 MiB buffer: clearing it was about a
// tenth of the plugin's CPU on batches (pprof). This one keeps buffers by
// power-of-two capacity and does not clear them at Get: gRPC asks for
// exactly the length it then reads into (a frame, a message) and fills it,
// so no byte of an earlier message is ever read from a buffer it gets. Put
// clears what was written instead (see Put). (gRPC clears its
// global pool's buffers as a defence against a consumer that would read
// memory it did not fill; its maintainers plan uninitialised buffers for
// their own internal uses, grpc-go issue 8790 and pull request 8910. This
// pool serves only this server and the codec below, whose every use fills
// the buffer first.)
type bufferPool struct {
	classes [maxClass + 1]sync.Pool
}

const (
	// minClass..maxClass are the pooled capacities, 2^8 B to 2^24 B;
	// larger buffers are allocated and left to the garbage collector.
	minClass = 8
	maxClass = 24
)

// class is the power of two that holds size bytes.
func class(size int) int {
	return max(minClass, bits.Len(uint(max(size, 1)-1)))
}

// Get returns a buffer of length size, with a power-of-two capacity.
func (p *bufferPool) Get(size int) *[]byte {
	c := class(size)
	if c > maxClass {
		b := make([]byte, size)
		return &b
	}
	if v, ok := p.classes[c].Get().(*[]byte); ok {
		*v = (*v)[:size]
		return v
	}
	b := make([]byte, size, 1<<c)
	return &b
}

// Put keeps buf for a later Get of its class; a buffer whose capacity is
// not one of the classes (not made here) is left to the garbage collector.
// Either way, buf's bytes up to its length are cleared first: messages in
// and out carry plaintexts (an encrypt request's, a decrypt answer's), and
// a pooled buffer would keep them in memory until it is used again. The
// length is what was filled (Get gives a buffer of the size asked, gRPC
// and the codec fill it), so this costs a clear of what was written, not of
// the whole capacity as gRPC's default pool's Get does.
func (p *bufferPool) Put(buf *[]byte) {
	clear(*buf)
	c := cap(*buf)
	if c < 1<<minClass || c > 1<<maxClass || c&(c-1) != 0 {
		return
	}
	p.classes[bits.Len(uint(c))-1].Put(buf)
}
