package envelope

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"testing"
	"testing/iotest"
)

// chunkReader hands out its data in reads of exactly n bytes, and io.EOF
// alone in a read of its own, as a pipe does: after full segments the end
// comes with no data, which must not make an empty final segment.
type chunkReader struct {
	data []byte
	n    int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	k := min(len(p), c.n, len(c.data))
	copy(p, c.data[:k])
	c.data = c.data[k:]
	return k, nil
}

// TestCopyBothWays: io.Copy into a Writer (its ReadFrom) and out of a
// Reader (its WriteTo) make and read the same files as Write and Read, for
// every size around the segment boundaries and every way a source can cut
// its reads.
func TestCopyBothWays(t *testing.T) {
	ks := newMemKS()
	seg := MinSegmentSize
	for _, size := range []int{0, 1, seg - 1, seg, seg + 1, 2 * seg, 3*seg + 7, 5 * seg} {
		pt := randBytes(t, size)
		sources := map[string]func() io.Reader{
			"segment reads": func() io.Reader { return &chunkReader{data: pt, n: seg} },
			"odd reads":     func() io.Reader { return &chunkReader{data: pt, n: 777} },
			"one byte":      func() io.Reader { return iotest.OneByteReader(bytes.NewReader(pt)) },
			"data with EOF": func() io.Reader { return iotest.DataErrReader(bytes.NewReader(pt)) },
		}
		for name, src := range sources {
			t.Run(fmt.Sprintf("size=%d/%s", size, name), func(t *testing.T) {
				var out bytes.Buffer
				w, err := NewWriter(context.Background(), &out, WriterOptions{KeyService: ks, Recipients: []KeyRef{refA}, SegmentSize: seg, Concurrency: 2})
				if err != nil {
					t.Fatal(err)
				}
				n, err := io.Copy(w, src())
				if err != nil || n != int64(size) {
					t.Fatalf("io.Copy into the writer: %d, %v", n, err)
				}
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
				file := out.Bytes()
				h, err := ParseHeader(bytes.NewReader(file))
				if err != nil {
					t.Fatal(err)
				}
				nseg := max(1, (size+seg-1)/seg)
				if want := h.HeaderLength + size + nseg*gcmTagLen; len(file) != want {
					t.Fatalf("file is %d bytes, want %d (as Write makes it)", len(file), want)
				}
				byRead, err := decrypt(file, ReaderOptions{KeyService: ks})
				if err != nil || !bytes.Equal(byRead, pt) {
					t.Fatalf("Read: %v, equal %v", err, bytes.Equal(byRead, pt))
				}
				r, err := NewReader(context.Background(), bytes.NewReader(file), ReaderOptions{KeyService: ks})
				if err != nil {
					t.Fatal(err)
				}
				defer r.Close()
				var got bytes.Buffer
				if n, err := io.Copy(&got, r); err != nil || n != int64(size) || !bytes.Equal(got.Bytes(), pt) {
					t.Fatalf("io.Copy out of the reader: %d, %v, equal %v", n, err, bytes.Equal(got.Bytes(), pt))
				}
			})
		}
	}
}

// TestWriteToReleasesOnlyAuthenticSegments: out of a file with a flipped
// byte in its third segment, WriteTo writes the first two segments and
// fails with ErrAuth; cut after a segment, it fails as truncated.
func TestWriteToReleasesOnlyAuthenticSegments(t *testing.T) {
	ks := newMemKS()
	seg := MinSegmentSize
	pt := randBytes(t, 5*seg)
	file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: seg}, pt)
	h, err := ParseHeader(bytes.NewReader(file))
	if err != nil {
		t.Fatal(err)
	}
	bad := flip(bytes.Clone(file), h.HeaderLength+2*(seg+gcmTagLen)+10, 0x01)
	for name, c := range map[string]struct {
		file []byte
		kind error
		good int
	}{
		"flipped":   {bad, ErrAuth, 2 * seg},
		"truncated": {file[:h.HeaderLength+3*(seg+gcmTagLen)], ErrTruncated, 3 * seg},
	} {
		r, err := NewReader(context.Background(), bytes.NewReader(c.file), ReaderOptions{KeyService: ks, Concurrency: 3})
		if err != nil {
			t.Fatal(err)
		}
		var got bytes.Buffer
		_, err = io.Copy(&got, r)
		r.Close()
		if !errors.Is(err, c.kind) {
			t.Fatalf("%s: %v, want %v", name, err, c.kind)
		}
		if got.Len() > c.good || !bytes.Equal(got.Bytes(), pt[:got.Len()]) {
			t.Fatalf("%s: released %d bytes, at most the %d authentic ones", name, got.Len(), c.good)
		}
	}
}
