package main

import (
	"crypto/rand"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// rawResult is the ceiling for HSM-resident keys: C_EncryptInit and
// C_Encrypt of 128 bytes with AES-GCM, in a loop, on the same token and key
// at the same concurrency, from this process with no Vault in between. It
// runs interleaved with the HSM loads, round by round.
type rawResult struct {
	workers  int
	requests int
	elapsed  time.Duration
	// cpu is this process's CPU time during the loop: the loop and the
	// PKCS#11 module (SoftHSM2 runs in the caller's process).
	cpu time.Duration
	// rounds is the operations/s of each round.
	rounds []float64
}

func (r rawResult) rps() float64 { return float64(r.requests) / r.elapsed.Seconds() }

// rawLoop holds what the raw PKCS#11 loop needs: the module, one session
// per worker, the HSM-resident key's object.
type rawLoop struct {
	p         *pkcs11.Ctx
	sessions  []pkcs11.SessionHandle
	key       pkcs11.ObjectHandle
	plaintext []byte
}

// newRawLoop opens the bench token from this process, logged in, with
// hsmSessions sessions, and finds the plugin's HSM-resident key version 1.
func newRawLoop(v *vault) (*rawLoop, error) {
	lib, err := softhsm.FindLibrary()
	if err != nil {
		return nil, err
	}
	key, err := data(v.Call("GET", "plugin/keys/bench-hsm", nil))
	if err != nil {
		return nil, err
	}
	labels, _ := key["hsm_labels"].(map[string]interface{})
	label, ok := labels["1"].(string)
	if !ok {
		return nil, fmt.Errorf("plugin/keys/bench-hsm has no HSM label for version 1: %v", key)
	}
	if err := os.Setenv("SOFTHSM2_CONF", v.softhsm); err != nil {
		return nil, err
	}
	r := &rawLoop{p: pkcs11.New(lib), plaintext: make([]byte, 128)}
	if r.p == nil {
		return nil, fmt.Errorf("cannot load %s", lib)
	}
	if err := r.p.Initialize(); err != nil {
		return nil, err
	}
	slots, err := r.p.GetSlotList(true)
	if err != nil {
		return nil, err
	}
	var slot uint
	found := false
	for _, s := range slots {
		if info, err := r.p.GetTokenInfo(s); err == nil && strings.TrimSpace(info.Label) == "bench" {
			slot, found = s, true
		}
	}
	if !found {
		return nil, fmt.Errorf("no bench token")
	}
	for i := 0; i < hsmSessions; i++ {
		s, err := r.p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return nil, err
		}
		r.sessions = append(r.sessions, s)
	}
	if err := r.p.Login(r.sessions[0], pkcs11.CKU_USER, "1234"); err != nil {
		return nil, err
	}
	if err := r.p.FindObjectsInit(r.sessions[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)}); err != nil {
		return nil, err
	}
	objs, _, err := r.p.FindObjects(r.sessions[0], 1)
	_ = r.p.FindObjectsFinal(r.sessions[0])
	if err != nil || len(objs) == 0 {
		return nil, fmt.Errorf("HSM key %s not found: %v", label, err)
	}
	r.key = objs[0]
	_, _ = rand.Read(r.plaintext)
	return r, nil
}

func (r *rawLoop) close() {
	_ = r.p.Finalize()
	r.p.Destroy()
}

// run encrypts with every session for d and returns the operations done.
func (r *rawLoop) run(d time.Duration) (sample, error) {
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
		total    int
	)
	cpu0 := selfCPU()
	deadline := time.Now().Add(d)
	start := time.Now()
	for _, s := range r.sessions {
		wg.Add(1)
		go func(s pkcs11.SessionHandle) {
			defer wg.Done()
			n := 0
			nonce := make([]byte, 12)
			for time.Now().Before(deadline) {
				_, _ = rand.Read(nonce)
				params := pkcs11.NewGCMParams(nonce, nil, 128)
				err := r.p.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, r.key)
				if err == nil {
					_, err = r.p.Encrypt(s, r.plaintext)
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
			total += n
			mu.Unlock()
		}(s)
	}
	wg.Wait()
	return sample{requests: total, elapsed: time.Since(start), cpu: cpuSplit{client: selfCPU() - cpu0}}, firstErr
}
