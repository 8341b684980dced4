package hsmtransit

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"
)

// call is a goroutine-safe request: it reports instead of failing the test.
func (e *testEnv) call(op logical.Operation, path string, data map[string]interface{}) (*logical.Response, error) {
	resp, err := e.b.HandleRequest(context.Background(), &logical.Request{
		Operation: op, Path: path, Data: data, Storage: e.storage,
	})
	if resp != nil && resp.IsError() {
		err = resp.Error()
	}
	return resp, err
}

// ciphertextVersion reads N from vault:vN:.
func ciphertextVersion(ct string) int {
	parts := strings.SplitN(strings.TrimPrefix(ct, "vault:v"), ":", 2)
	v, _ := strconv.Atoi(parts[0])
	return v
}

// TestConcurrentCryptoWithRotationAndTrim runs 200 goroutines against one key:
// most encrypt and decrypt, while others rotate it, raise its minimum
// versions and trim it. Minimums only ever rise here, so a decryption refused
// as too old must be of a version below the minimum seen afterwards, every
// ciphertext of a version still allowed at the end must decrypt, and every
// one of a version below the final minimum must be refused.
//
// Goroutines report failures through a channel; the first one stops every
// goroutine, so that a failing run ends at once instead of waiting for the
// test binary's timeout.
func TestConcurrentCryptoWithRotationAndTrim(t *testing.T) {
	const (
		workers    = 180
		rotators   = 8
		configurer = 8
		trimmers   = 4
		iterations = 25
	)
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)

	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		made     = map[string]string{} // ciphertext -> plaintext
		failures = make(chan string, workers+rotators+configurer+trimmers)
		// failed closes at the first failure: every goroutine stops.
		failed   = make(chan struct{})
		failOnce sync.Once
		// done closes when key management is to stop: a fifth of the
		// work left, or the workers ended (by failing or not).
		done     = make(chan struct{})
		doneOnce sync.Once
	)
	stopManagement := func() { doneOnce.Do(func() { close(done) }) }
	fail := func(format string, args ...interface{}) {
		select {
		case failures <- fmt.Sprintf(format, args...):
		default: // enough failures to report already
		}
		failOnce.Do(func() { close(failed) })
		stopManagement()
	}
	stopped := func() bool {
		select {
		case <-failed:
			return true
		default:
			return false
		}
	}
	readMins := func() (latest, minDecryption int, ok bool) {
		resp, err := e.call(logical.ReadOperation, "keys/k", nil)
		if err != nil {
			fail("read key: %v", err)
			return 0, 0, false
		}
		return resp.Data["latest_version"].(int), resp.Data["min_decryption_version"].(int), true
	}

	var background sync.WaitGroup
	loop := func(f func()) {
		background.Add(1)
		go func() {
			defer background.Done()
			for {
				select {
				case <-done:
					return
				default:
					f()
				}
			}
		}()
	}
	managing := make(chan struct{})
	var managingOnce sync.Once
	for i := 0; i < rotators; i++ {
		loop(func() {
			if _, err := e.call(logical.UpdateOperation, "keys/k/rotate", nil); err != nil {
				fail("rotate: %v", err)
				return
			}
			managingOnce.Do(func() { close(managing) })
		})
	}
	var configMu sync.Mutex
	for i := 0; i < configurer; i++ {
		loop(func() {
			// Read and raise under one lock, so that a stale read never
			// lowers the minimums: they must only rise in this test.
			configMu.Lock()
			defer configMu.Unlock()
			latest, cur, ok := readMins()
			if !ok || latest-3 <= cur {
				return
			}
			target := latest - 3 // keep the last three versions
			_, err := e.call(logical.UpdateOperation, "keys/k/config", map[string]interface{}{
				"min_decryption_version": target, "min_encryption_version": target,
			})
			if err != nil {
				fail("config: %v", err)
			}
		})
	}
	for i := 0; i < trimmers; i++ {
		loop(func() {
			resp, err := e.call(logical.ReadOperation, "keys/k", nil)
			if err != nil {
				fail("read: %v", err)
				return
			}
			minEnc := resp.Data["min_encryption_version"].(int)
			minDecNow := resp.Data["min_decryption_version"].(int)
			target := min(minEnc, minDecNow)
			if target <= resp.Data["min_available_version"].(int) || minEnc == 0 {
				return
			}
			_, err = e.call(logical.UpdateOperation, "keys/k/trim", map[string]interface{}{"min_available_version": target})
			if err != nil && !strings.Contains(err.Error(), "cannot be decremented") {
				fail("trim: %v", err)
			}
		})
	}

	var refusedTooOld atomic.Int64
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			// Key management runs before the first encryption: the
			// work cannot all be done before the first rotation.
			select {
			case <-managing:
			case <-failed:
				return
			}
			for i := 0; i < iterations && !stopped(); i++ {
				pt := fmt.Sprintf("worker %d item %d", w, i)
				resp, err := e.call(logical.UpdateOperation, "encrypt/k", map[string]interface{}{"plaintext": b64(pt)})
				if err != nil {
					fail("encrypt: %v", err)
					return
				}
				ct := resp.Data["ciphertext"].(string)
				mu.Lock()
				made[ct] = pt
				if len(made) == workers*iterations*4/5 {
					// Key management stops for the last fifth of the
					// work, so that the end state has allowed ciphertexts
					// to check.
					stopManagement()
				}
				mu.Unlock()

				resp, err = e.call(logical.UpdateOperation, "decrypt/k", map[string]interface{}{"ciphertext": ct})
				switch {
				case err == nil:
					if got := resp.Data["plaintext"].(string); got != b64(pt) {
						fail("decrypt gave %q, want %q", got, b64(pt))
						return
					}
				case strings.Contains(err.Error(), "too old"):
					refusedTooOld.Add(1)
					_, minNow, ok := readMins()
					if ok && ciphertextVersion(ct) >= minNow {
						fail("v%d refused as too old while min_decryption_version is %d", ciphertextVersion(ct), minNow)
						return
					}
				default:
					fail("decrypt %s: %v", ct, err)
					return
				}
			}
		}(w)
	}

	wg.Wait()
	// Workers that all stopped early never reach the four-fifths mark.
	stopManagement()
	background.Wait()
	close(failures)
	var reported []string
	for f := range failures {
		reported = append(reported, f)
	}
	require.Empty(t, reported)

	latest, finalMin, ok := readMins()
	require.True(t, ok)
	require.Greater(t, latest, 10, "rotations happened during the run")
	require.Greater(t, finalMin, 1, "min_decryption_version moved during the run")
	require.Equal(t, workers*iterations, len(made), "every encryption succeeded")
	checked, refused := 0, 0
	for ct, pt := range made {
		if ciphertextVersion(ct) < finalMin {
			requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 400,
				"ciphertext or signature version is disallowed by policy (too old)")
			refused++
			continue
		}
		require.Equal(t, pt, e.decrypt(t, "k", ct, nil))
		checked++
	}
	require.Greater(t, checked, 0)
	require.Greater(t, refused, 0, "ciphertexts of versions below the final minimum exist and are refused")
	// Trimmed versions cannot be allowed again.
	resp, err := e.call(logical.ReadOperation, "keys/k", nil)
	require.NoError(t, err)
	minAvail := resp.Data["min_available_version"].(int)
	require.Greater(t, minAvail, 1, "trims happened during the run")
	requireStatus(t, e.write(t, "keys/k/config", map[string]interface{}{"min_decryption_version": minAvail - 1}), 400,
		"min decryption version should not be less then min available version")
	t.Logf("%d ciphertexts, %d still allowed and checked, %d refused at the end, %d refused during the run; latest v%d, min_decryption_version %d",
		len(made), checked, refused, refusedTooOld.Load(), latest, finalMin)
}
