package main

import (
	"crypto/rand"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// rawResult is the ceiling for HSM-resident keys: C_EncryptInit and
// C_Encrypt of 128 bytes with AES-GCM, in a loop, on the same token and key
// at the same concurrency, from this process with no Vault in between.
type rawResult struct {
	workers  int
	requests int
	elapsed  time.Duration
}

func (r rawResult) rps() float64 { return float64(r.requests) / r.elapsed.Seconds() }

func rawPKCS11(v *vault, o options) (rawResult, error) {
	lib, err := softhsm.FindLibrary()
	if err != nil {
		return rawResult{}, err
	}
	key := v.must("GET", "plugin/keys/bench-hsm", nil)["data"].(map[string]interface{})
	label := key["hsm_labels"].(map[string]interface{})["1"].(string)

	if err := os.Setenv("SOFTHSM2_CONF", v.softhsm); err != nil {
		return rawResult{}, err
	}
	p := pkcs11.New(lib)
	if p == nil {
		return rawResult{}, fmt.Errorf("cannot load %s", lib)
	}
	if err := p.Initialize(); err != nil {
		return rawResult{}, err
	}
	defer p.Destroy()
	defer p.Finalize()
	slots, err := p.GetSlotList(true)
	if err != nil {
		return rawResult{}, err
	}
	var slot uint
	found := false
	for _, s := range slots {
		if info, err := p.GetTokenInfo(s); err == nil && len(info.Label) >= 5 && info.Label[:5] == "bench" {
			slot, found = s, true
		}
	}
	if !found {
		return rawResult{}, fmt.Errorf("no bench token")
	}
	const workers = hsmSessions
	sessions := make([]pkcs11.SessionHandle, workers)
	for i := range sessions {
		if sessions[i], err = p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION); err != nil {
			return rawResult{}, err
		}
	}
	if err := p.Login(sessions[0], pkcs11.CKU_USER, "1234"); err != nil {
		return rawResult{}, err
	}
	if err := p.FindObjectsInit(sessions[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)}); err != nil {
		return rawResult{}, err
	}
	objs, _, err := p.FindObjects(sessions[0], 1)
	_ = p.FindObjectsFinal(sessions[0])
	if err != nil || len(objs) == 0 {
		return rawResult{}, fmt.Errorf("HSM key %s not found: %v", label, err)
	}
	plaintext := make([]byte, 128)
	_, _ = rand.Read(plaintext)

	var total rawResult
	total.workers = workers
	for round := 0; round < o.rounds; round++ {
		var wg sync.WaitGroup
		var mu sync.Mutex
		var firstErr error
		deadline := time.Now().Add(o.duration)
		start := time.Now()
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func(s pkcs11.SessionHandle) {
				defer wg.Done()
				n := 0
				nonce := make([]byte, 12)
				for time.Now().Before(deadline) {
					_, _ = rand.Read(nonce)
					params := pkcs11.NewGCMParams(nonce, nil, 128)
					err := p.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, objs[0])
					if err == nil {
						_, err = p.Encrypt(s, plaintext)
					}
					params.Free()
					if err != nil {
						mu.Lock()
						firstErr = err
						mu.Unlock()
						return
					}
					n++
				}
				mu.Lock()
				total.requests += n
				mu.Unlock()
			}(sessions[w])
		}
		wg.Wait()
		total.elapsed += time.Since(start)
		if firstErr != nil {
			return total, firstErr
		}
		fmt.Fprintf(os.Stderr, "round %d: raw PKCS#11 C_Encrypt loop %8.0f ops/s\n", round+1, total.rps())
	}
	return total, nil
}
