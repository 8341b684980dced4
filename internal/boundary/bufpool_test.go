package boundary

import (
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/mem"
)

var _ mem.BufferPool = (*bufferPool)(nil)

func TestBufferPoolClasses(t *testing.T) {
	p := &bufferPool{}
	for _, c := range []struct{ size, capacity int }{
		{0, 256}, {1, 256}, {256, 256}, {257, 512}, {4096, 4096}, {4097, 8192},
		{150_000, 1 << 18}, {1<<24 - 1, 1 << 24}, {1 << 24, 1 << 24},
	} {
		b := p.Get(c.size)
		require.Len(t, *b, c.size)
		require.Equal(t, c.capacity, cap(*b), "size %d", c.size)
		p.Put(b)
	}
	big := p.Get(1<<24 + 1)
	require.Len(t, *big, 1<<24+1)
	require.Equal(t, 1<<24+1, cap(*big), "beyond the classes: allocated as asked")
}

func TestBufferPoolReusesByClass(t *testing.T) {
	p := &bufferPool{}
	// sync.Pool may drop what it is given (a GC; one Put in four under
	// the race detector): try a few times.
	reused := false
	for range 20 {
		b := p.Get(3000)
		p.Put(b)
		again := p.Get(2500)
		require.Len(t, *again, 2500)
		require.Equal(t, 4096, cap(*again))
		if &(*again)[0] == &(*b)[0] {
			reused = true
			break
		}
	}
	require.True(t, reused, "a buffer of the class came back")

	// The smallest and the largest class are kept too.
	for _, size := range []int{1 << minClass, 1 << maxClass} {
		kept := false
		for range 20 {
			b := p.Get(size)
			p.Put(b)
			again := p.Get(size/2 + 1)
			if &(*again)[:1][0] == &(*b)[:1][0] {
				kept = true
				break
			}
		}
		require.True(t, kept, "a buffer of %d bytes came back", size)
	}

	// A buffer not made here (capacity not a power of two) is not kept.
	odd := make([]byte, 3000)
	p.Put(&odd)
	for range 10 {
		got := p.Get(3000)
		require.NotSame(t, &odd[0], &(*got)[0])
	}
}

// Put clears what was written in a buffer, in the class it keeps and beyond
// the classes alike, before anyone can Get it again.
func TestBufferPoolPutClears(t *testing.T) {
	p := &bufferPool{}
	for _, size := range []int{10, 3000, 150_000, 1<<24 + 1} {
		b := p.Get(size)
		for i := range *b {
			(*b)[i] = 0xaa
		}
		kept := *b
		p.Put(b)
		require.Equal(t, make([]byte, size), kept, "size %d", size)
	}
}
