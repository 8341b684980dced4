package hsm

import (
	"crypto/rand"
	"testing"
)

// BenchmarkEncryptGCM measures Token.EncryptGCM of 128 bytes from 16
// goroutines: the session pool and handle cache around C_EncryptInit and
// C_Encrypt.
func BenchmarkEncryptGCM(b *testing.B) {
	tok, pt := benchToken(b)
	b.SetParallelism(8) // 16 goroutines on 2 cores
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := tok.EncryptGCM("kek-bench", pt, nil); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
}

// BenchmarkEncryptGCMBatch is BenchmarkEncryptGCM with the same 16
// goroutines each encrypting runs of MaxGCMBatch items with EncryptGCMBatch
// (one session, handle lookup and deadline per run); ns/op and ops/s are
// per item, for comparison with BenchmarkEncryptGCM in the same run.
func BenchmarkEncryptGCMBatch(b *testing.B) {
	tok, pt := benchToken(b)
	b.SetParallelism(8)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		items := make([]GCMItem, 0, MaxGCMBatch)
		flush := func() bool {
			if len(items) == 0 {
				return true
			}
			if err := tok.EncryptGCMBatch("kek-bench", items); err != nil {
				b.Error(err)
				return false
			}
			items = items[:0]
			return true
		}
		for pb.Next() {
			items = append(items, GCMItem{In: pt})
			if len(items) == MaxGCMBatch && !flush() {
				return
			}
		}
		flush()
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
}

// benchToken opens token-a for a benchmark (closed when it ends), with an
// AES key labelled kek-bench, and returns 128 random bytes to encrypt.
func benchToken(b *testing.B) (*Token, []byte) {
	b.Helper()
	tok, err := Open(Config{Library: softhsmLib, TokenLabel: "token-a", PIN: testPIN})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(tok.Close)
	if has, _ := tok.HasKey("kek-bench"); !has {
		if err := tok.GenerateKey("kek-bench"); err != nil {
			b.Fatal(err)
		}
	}
	pt := make([]byte, 128)
	_, _ = rand.Read(pt)
	return tok, pt
}
