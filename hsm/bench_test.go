package hsm

import (
	"crypto/rand"
	"testing"
)

// BenchmarkEncryptGCM measures Token.EncryptGCM of 128 bytes from 16
// goroutines: the session pool and handle cache around C_EncryptInit and
// C_Encrypt.
func BenchmarkEncryptGCM(b *testing.B) {
	tok, err := Open(Config{Library: softhsmLib, TokenLabel: "token-a", PIN: testPIN})
	if err != nil {
		b.Fatal(err)
	}
	defer tok.Close()
	if has, _ := tok.HasKey("kek-bench"); !has {
		if err := tok.GenerateKey("kek-bench"); err != nil {
			b.Fatal(err)
		}
	}
	pt := make([]byte, 128)
	_, _ = rand.Read(pt)
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
