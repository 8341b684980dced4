package envelope

import (
	"context"
	"fmt"
	"io"
)

// ReaderAt decrypts any range of an envelope file, reading only the segments
// the range covers. It is safe for concurrent use.
type ReaderAt struct {
	ra      io.ReaderAt
	hdr     *Header
	keys    *fileKeys
	segSize int64
	nseg    int64 // number of segments
	size    int64 // plaintext size
}

// NewReaderAt authenticates the header of the envelope file ra of size bytes
// and checks its last segment, so that a file truncated at a segment boundary
// is refused here. The plaintext size follows from the file size, the header
// length and the segment size.
func NewReaderAt(ctx context.Context, ra io.ReaderAt, size int64, opts ReaderOptions) (*ReaderAt, error) {
	h, err := ParseHeader(io.NewSectionReader(ra, 0, size))
	if err != nil {
		return nil, err
	}
	segCT := int64(h.SegmentSize + gcmTagLen)
	bodyLen := size - int64(h.HeaderLength)
	if bodyLen <= 0 {
		return nil, fmt.Errorf("envelope: no segment after the header: %w", ErrTruncated)
	}
	nseg := (bodyLen + segCT - 1) / segCT
	last := bodyLen - (nseg-1)*segCT
	if last < gcmTagLen {
		return nil, fmt.Errorf("envelope: truncated in segment %d: %w", nseg-1, ErrTruncated)
	}
	keys, err := open(ctx, h, opts)
	if err != nil {
		return nil, err
	}
	r := &ReaderAt{
		ra:      ra,
		hdr:     h,
		keys:    keys,
		segSize: int64(h.SegmentSize),
		nseg:    nseg,
		size:    (nseg-1)*int64(h.SegmentSize) + last - gcmTagLen,
	}
	buf := make([]byte, h.SegmentSize)
	if _, err := r.segment(nseg-1, buf); err != nil {
		return nil, err
	}
	clear(buf)
	return r, nil
}

// Size returns the plaintext size.
func (r *ReaderAt) Size() int64 { return r.size }

// Header returns a copy of the authenticated header.
func (r *ReaderAt) Header() *Header { return r.hdr.clone() }

// segment reads and opens segment i into dst (of segment size).
func (r *ReaderAt) segment(i int64, dst []byte) ([]byte, error) {
	segCT := r.segSize + gcmTagLen
	off := int64(r.hdr.HeaderLength) + i*segCT
	n := segCT
	if i == r.nseg-1 {
		n = r.size - i*r.segSize + gcmTagLen
	}
	ct := make([]byte, n)
	if m, err := r.ra.ReadAt(ct, off); m < len(ct) {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil, fmt.Errorf("envelope: segment %d: file shrank: %w", i, ErrTruncated)
		}
		return nil, fmt.Errorf("envelope: reading segment %d: %w", i, err)
	}
	return openChunk(r.keys, int(r.segSize), uint64(i), i == r.nseg-1, ct, dst[:0])
}

// ReadAt reads len(p) plaintext bytes from offset off. As io.ReaderAt
// requires, it returns io.EOF when fewer bytes remain, and an error names
// the segment that failed; p holds no plaintext of a segment that failed.
func (r *ReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("envelope: negative offset %d", off)
	}
	if off >= r.size {
		return 0, io.EOF
	}
	want := len(p)
	if int64(want) > r.size-off {
		p = p[:r.size-off]
	}
	buf := make([]byte, r.segSize)
	defer clear(buf)
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		i := pos / r.segSize
		pt, err := r.segment(i, buf)
		if err != nil {
			return n, err
		}
		n += copy(p[n:], pt[pos-i*r.segSize:])
	}
	if n < want {
		return n, io.EOF
	}
	return n, nil
}
