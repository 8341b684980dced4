package envelope

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
)

func TestReaderAtRandomRanges(t *testing.T) {
	ks := newMemKS()
	rng := rand.New(rand.NewPCG(1, 2))
	for _, size := range []int{0, 1, MinSegmentSize, 5*MinSegmentSize + 123, 7 * MinSegmentSize} {
		pt := randBytes(t, size)
		file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, pt)
		ra, err := NewReaderAt(context.Background(), bytes.NewReader(file), int64(len(file)), ReaderOptions{KeyService: ks})
		if err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		if ra.Size() != int64(size) {
			t.Fatalf("Size() = %d, want %d", ra.Size(), size)
		}
		for range 200 {
			off := rng.IntN(size + 10)
			n := rng.IntN(3*MinSegmentSize + 1)
			buf := make([]byte, n)
			got, err := ra.ReadAt(buf, int64(off))
			wantN := max(0, min(n, size-off))
			if got != wantN {
				t.Fatalf("size %d ReadAt(%d, %d) = %d bytes, want %d", size, n, off, got, wantN)
			}
			if wantN < n && err != io.EOF {
				t.Fatalf("size %d ReadAt(%d, %d): err %v, want io.EOF", size, n, off, err)
			}
			if wantN == n && err != nil {
				t.Fatalf("size %d ReadAt(%d, %d): %v", size, n, off, err)
			}
			if got > 0 && !bytes.Equal(buf[:got], pt[off:off+got]) {
				t.Fatalf("size %d ReadAt(%d, %d): wrong plaintext", size, n, off)
			}
		}
		// The whole file through a SectionReader equals the plaintext.
		all, err := io.ReadAll(io.NewSectionReader(ra, 0, ra.Size()))
		if err != nil || !bytes.Equal(all, pt) {
			t.Fatalf("size %d: full read: %v", size, err)
		}
	}
}

// countingReaderAt counts the bytes read.
type countingReaderAt struct {
	r io.ReaderAt
	n int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	c.n += int64(len(p))
	return c.r.ReadAt(p, off)
}

func TestReaderAtReadsOnlyCoveredSegments(t *testing.T) {
	ks := newMemKS()
	pt := randBytes(t, 50*MinSegmentSize)
	file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, pt)
	cr := &countingReaderAt{r: bytes.NewReader(file)}
	ra, err := NewReaderAt(context.Background(), cr, int64(len(file)), ReaderOptions{KeyService: ks})
	if err != nil {
		t.Fatal(err)
	}
	cr.n = 0
	buf := make([]byte, 10)
	if _, err := ra.ReadAt(buf, 20*MinSegmentSize+MinSegmentSize-5); err != nil { // spans segments 20 and 21
		t.Fatal(err)
	}
	if want := int64(2 * (MinSegmentSize + gcmTagLen)); cr.n != want {
		t.Fatalf("read %d ciphertext bytes, want %d (two segments)", cr.n, want)
	}
	if !bytes.Equal(buf, pt[21*MinSegmentSize-5:21*MinSegmentSize+5]) {
		t.Fatal("wrong plaintext")
	}
}

func TestReaderAtRefusesTamperedFiles(t *testing.T) {
	ks := newMemKS()
	pt := randBytes(t, 4*MinSegmentSize+100)
	file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, pt)
	h, _ := ParseHeader(bytes.NewReader(file))
	segCT := MinSegmentSize + gcmTagLen
	open := func(f []byte) (*ReaderAt, error) {
		return NewReaderAt(context.Background(), bytes.NewReader(f), int64(len(f)), ReaderOptions{KeyService: ks})
	}
	for k := 1; k <= 4; k++ {
		_, err := open(file[:h.HeaderLength+k*segCT])
		if !errors.Is(err, ErrTruncated) {
			t.Errorf("cut after segment %d: %v, want ErrTruncated", k-1, err)
		}
	}
	if _, err := open(file[:h.HeaderLength]); !errors.Is(err, ErrTruncated) {
		t.Errorf("header only: %v, want ErrTruncated", err)
	}
	if _, err := open(append(bytes.Clone(file), 0)); !errors.Is(err, ErrAuth) {
		t.Errorf("appended byte: %v, want ErrAuth", err)
	}
	if _, err := open(flip(file, 20, 1)); !errors.Is(err, ErrAuth) {
		t.Errorf("salt flipped: %v, want ErrAuth", err)
	}

	// A flip in segment 2 fails reads that cover it, and only those.
	ra, err := open(flip(file, h.HeaderLength+2*segCT+7, 1))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 3*MinSegmentSize)
	n, err := ra.ReadAt(buf, 0)
	if !errors.Is(err, ErrAuth) || n != 2*MinSegmentSize || !bytes.Contains([]byte(err.Error()), []byte("segment 2")) {
		t.Fatalf("range over segment 2: n %d, err %v", n, err)
	}
	if _, err := ra.ReadAt(buf[:100], 3*MinSegmentSize); err != nil {
		t.Fatalf("range after segment 2: %v", err)
	}
}
