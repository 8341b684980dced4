package envelope

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"io"
	"runtime"
	"testing"
)

const benchSize = 64 << 20

func BenchmarkWriter(b *testing.B) {
	ks := newMemKS()
	pt := randBytes(b, benchSize)
	for _, conc := range []int{1, runtime.GOMAXPROCS(0)} {
		b.Run(fmt.Sprintf("conc=%d", conc), func(b *testing.B) {
			b.SetBytes(benchSize)
			for b.Loop() {
				w, err := NewWriter(context.Background(), io.Discard, WriterOptions{KeyService: ks, Recipients: []KeyRef{refA}, Concurrency: conc})
				if err != nil {
					b.Fatal(err)
				}
				if _, err := w.Write(pt); err != nil {
					b.Fatal(err)
				}
				if err := w.Close(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkReader(b *testing.B) {
	ks := newMemKS()
	file := encrypt(b, WriterOptions{KeyService: ks}, randBytes(b, benchSize))
	buf := make([]byte, 256<<10)
	for _, conc := range []int{1, runtime.GOMAXPROCS(0)} {
		b.Run(fmt.Sprintf("conc=%d", conc), func(b *testing.B) {
			b.SetBytes(benchSize)
			for b.Loop() {
				r, err := NewReader(context.Background(), bytes.NewReader(file), ReaderOptions{KeyService: ks, Concurrency: conc})
				if err != nil {
					b.Fatal(err)
				}
				n, err := io.CopyBuffer(io.Discard, r, buf)
				if err != nil || n != benchSize {
					b.Fatalf("%d bytes, %v", n, err)
				}
			}
		})
	}
}

// BenchmarkAESGCM is the single-core baseline: Go's AES-256-GCM sealing
// 64 KiB segments in place, with nothing else.
func BenchmarkAESGCM(b *testing.B) {
	block, err := aes.NewCipher(make([]byte, 32))
	if err != nil {
		b.Fatal(err)
	}
	g, err := cipher.NewGCM(block)
	if err != nil {
		b.Fatal(err)
	}
	seg := make([]byte, DefaultSegmentSize, DefaultSegmentSize+gcmTagLen)
	var nonce [nonceLen]byte
	b.SetBytes(benchSize)
	for b.Loop() {
		for i := range benchSize / DefaultSegmentSize {
			segmentNonce(&nonce, uint64(i), false)
			g.Seal(seg[:0], nonce[:], seg, nil)
		}
	}
}
