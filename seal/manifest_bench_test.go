package seal

import (
	"context"
	"crypto/rand"
	"fmt"
	mrand "math/rand/v2"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// countingStorage counts what is written: the cost of a Put in storage.
type countingStorage struct {
	logical.Storage
	puts, bytes atomic.Int64
}

func (c *countingStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	c.puts.Add(1)
	c.bytes.Add(int64(len(e.Key) + len(e.Value)))
	return c.Storage.Put(ctx, e)
}

const (
	benchEntries = 100_000
	benchValue   = 1024 // about a policy's size
)

func benchKey(i int) string { return fmt.Sprintf("policy/key-%06d", i) }

// benchMount fills a mount with benchEntries entries; mode is "no manifest"
// (the format and cost before manifests), "manifest" (buckets cached) or
// "manifest, no cache" (every bucket read from storage).
func benchMount(b *testing.B, mode string) (*countingStorage, logical.Storage) {
	b.Helper()
	ctx := context.Background()
	under := &countingStorage{Storage: &logical.InmemStorage{}}
	key := make([]byte, RootKeySize)
	_, _ = rand.Read(key)
	k, err := NewKeyring(key)
	if err != nil {
		b.Fatal(err)
	}
	s := NewSealer(k, plainSeal)
	v := s.Wrap(under)
	value := make([]byte, benchValue)
	for i := 0; i < benchEntries; i++ {
		if err := v.Put(ctx, &logical.StorageEntry{Key: benchKey(i), Value: value}); err != nil {
			b.Fatal(err)
		}
	}
	if mode != "no manifest" {
		if mode == "manifest, no cache" {
			s.cacheLimit.Store(0)
		}
		if err := s.InitManifest(ctx, under); err != nil {
			b.Fatal(err)
		}
		// Every entry in the hst\x02 format at its own generation, as
		// after the first rotation.
		if _, err := s.ResealAll(ctx, under); err != nil {
			b.Fatal(err)
		}
	}
	return under, v
}

var benchModes = []string{"no manifest", "manifest", "manifest, no cache"}

// BenchmarkPut overwrites random entries of a mount holding 100,000.
func BenchmarkPut(b *testing.B) {
	for _, mode := range benchModes {
		b.Run(mode, func(b *testing.B) {
			under, v := benchMount(b, mode)
			ctx := context.Background()
			value := make([]byte, benchValue)
			puts0, bytes0 := under.puts.Load(), under.bytes.Load()
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := v.Put(ctx, &logical.StorageEntry{Key: benchKey(mrand.IntN(benchEntries)), Value: value}); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(under.puts.Load()-puts0)/float64(b.N), "storage-writes/op")
			b.ReportMetric(float64(under.bytes.Load()-bytes0)/float64(b.N), "storage-B/op")
		})
	}
}

// BenchmarkPutParallel is BenchmarkPut from GOMAXPROCS goroutines: the
// buckets' locks and the root's group commit at work.
func BenchmarkPutParallel(b *testing.B) {
	for _, mode := range benchModes[:2] {
		b.Run(mode, func(b *testing.B) {
			under, v := benchMount(b, mode)
			ctx := context.Background()
			puts0, bytes0 := under.puts.Load(), under.bytes.Load()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				value := make([]byte, benchValue)
				for pb.Next() {
					if err := v.Put(ctx, &logical.StorageEntry{Key: benchKey(mrand.IntN(benchEntries)), Value: value}); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			b.ReportMetric(float64(under.puts.Load()-puts0)/float64(b.N), "storage-writes/op")
			b.ReportMetric(float64(under.bytes.Load()-bytes0)/float64(b.N), "storage-B/op")
		})
	}
}

// BenchmarkGet reads random entries of a mount holding 100,000.
func BenchmarkGet(b *testing.B) {
	for _, mode := range benchModes {
		b.Run(mode, func(b *testing.B) {
			_, v := benchMount(b, mode)
			ctx := context.Background()
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				e, err := v.Get(ctx, benchKey(mrand.IntN(benchEntries)))
				if err != nil || e == nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkRotation is one root key rotation's pass over a mount holding
// 100,000 entries: Rotated, SetKeyring, ResealAll, SetKeyring(ActiveOnly)
// and, with a manifest, CompactManifest.
func BenchmarkRotation(b *testing.B) {
	for _, mode := range benchModes[:2] {
		b.Run(mode, func(b *testing.B) {
			under, v := benchMount(b, mode)
			s := v.(*view).s
			ctx := context.Background()
			puts0, bytes0 := under.puts.Load(), under.bytes.Load()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				key := make([]byte, RootKeySize)
				_, _ = rand.Read(key)
				ring, err := s.Keyring().Rotated(key)
				if err != nil {
					b.Fatal(err)
				}
				s.SetKeyring(ring)
				if n, err := s.ResealAll(ctx, under); err != nil || n != benchEntries {
					b.Fatal(n, err)
				}
				s.SetKeyring(ring.ActiveOnly())
				if mode != "no manifest" {
					if err := s.CompactManifest(ctx, under); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(under.puts.Load()-puts0)/float64(b.N), "storage-writes/op")
			b.ReportMetric(float64(under.bytes.Load()-bytes0)/float64(b.N), "storage-B/op")
		})
	}
}
