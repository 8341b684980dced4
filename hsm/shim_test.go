package hsm

import (
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/p11shim"
)

// These tests put a thin PKCS#11 module (internal/p11shim) between the
// package and SoftHSM2 that imitates what real HSMs do differently. The shim
// forwards to a copy of SoftHSM2's library, which the dynamic loader loads
// as a library of its own, so that the shim's C_Initialize and C_Finalize
// never touch the module the other tests use.

// newShim returns a shim over its own copy of SoftHSM2 and a fresh token.
func newShim(t *testing.T) (*p11shim.Shim, string) {
	t.Helper()
	dir := t.TempDir()
	copyLib := filepath.Join(dir, "libsofthsm2-copy.so")
	src, err := os.Open(softhsmLib)
	require.NoError(t, err)
	defer src.Close()
	dst, err := os.Create(copyLib)
	require.NoError(t, err)
	_, err = io.Copy(dst, src)
	require.NoError(t, err)
	require.NoError(t, dst.Close())
	shim := p11shim.New(t, copyLib)
	t.Setenv(LibrariesEnv, shim.Library+":"+softhsmLib)
	return shim, newTestToken(t)
}

func openShim(t *testing.T, shim *p11shim.Shim, label string, timeout time.Duration) *Token {
	t.Helper()
	tok, err := Open(Config{Library: shim.Library, TokenLabel: label, PIN: testPIN, CallTimeout: timeout, MaxSessions: 4})
	require.NoError(t, err)
	t.Cleanup(func() {
		shim.Set() // no faults, so that closing does not hang
		tok.Close()
	})
	return tok
}

// TestTokenChosenIV: a token that ignores the caller's AES-GCM IV and
// writes its own (CloudHSM, Luna in FIPS mode) still opens what it sealed,
// after a restart too, for the root keyring and HSM-resident keys alike;
// one that refuses a caller's IV is given a zeroed buffer to fill.
func TestTokenChosenIV(t *testing.T) {
	for _, mode := range []string{p11shim.FIPSIV, p11shim.FIPSIVStrict} {
		t.Run(mode, func(t *testing.T) {
			shim, label := newShim(t)
			shim.Set(mode)
			tok := openShim(t, shim, label, 0)
			kek := uniqueLabel("kek")
			k := SealKeys{Mechanism: AESGCM, Label: kek}
			require.NoError(t, tok.EnsureSealKeys(k, true))
			require.NoError(t, tok.CheckRoundTrip(k, []byte("aad")), "the first seal's canary")

			secret := []byte("the root keyring, 32 bytes long!")
			ivs := map[string]bool{}
			var blobs [][]byte
			for range 20 {
				blob, err := tok.Seal(k, secret, []byte("mount-a"))
				require.NoError(t, err)
				ivs[string(blob[:GCMNonceSize])] = true
				blobs = append(blobs, blob)
			}
			require.Len(t, ivs, 20, "every IV the token chose is kept, and they differ")
			require.Equal(t, mode == p11shim.FIPSIVStrict, tok.conn.tokenIV.Load(), "a zeroed IV buffer only when the token refused ours")

			// A restart: the module is unloaded and loaded again.
			tok.Close()
			again := openShim(t, shim, label, 0)
			for _, blob := range blobs {
				got, err := again.Open(k, blob, []byte("mount-a"))
				require.NoError(t, err)
				require.Equal(t, secret, got)
			}
			_, err := again.Open(k, blobs[0], []byte("mount-b"))
			require.Equal(t, Failed, KindOf(err), "%v", err)
		})
	}
}

// TestTokenWithoutGCM: a token without CKM_AES_GCM gets another mechanism
// when none is asked for, and says which one is missing.
func TestTokenWithoutGCM(t *testing.T) {
	shim, label := newShim(t)
	shim.Set(p11shim.NoGCM)
	tok := openShim(t, shim, label, 0)
	sup, err := tok.Mechanisms()
	require.NoError(t, err)
	require.False(t, sup.GCM)
	require.Equal(t, []SealMechanism{AESKWP, AESCBCHMAC, RSAOAEP}, sup.Usable)
	chosen, err := sup.Choose()
	require.NoError(t, err)
	require.Equal(t, AESKWP, chosen)
	require.Contains(t, sup.Supports(AESGCM).Error(), "CKM_AES_GCM")

	for _, m := range sup.Usable {
		k := sealKeysFor(m)
		require.NoError(t, tok.EnsureSealKeys(k, true), "%s", m)
		require.NoError(t, tok.CheckRoundTrip(k, []byte("aad")), "%s", m)
	}
	// What would have used AES-GCM fails as the token's refusal, not as a
	// lost token.
	kek := uniqueLabel("kek")
	require.NoError(t, tok.GenerateKey(kek))
	_, err = tok.EncryptGCM(kek, []byte("x"), nil)
	require.Equal(t, Configuration, KindOf(err), "%v", err)
}

// TestHungTokenDeadline: a token that stops answering makes every operation
// fail as Unavailable within its deadline, however many are asked for, with
// no more goroutines left waiting than the session bound; when the token
// answers again, operations succeed again and the sessions that outlived
// their deadline are closed, not reused.
func TestHungTokenDeadline(t *testing.T) {
	shim, label := newShim(t)
	const deadline = 300 * time.Millisecond
	// Set up through a handle with the default deadline (on a busy
	// machine, generating a key can take longer than 300 ms); the short
	// deadline is that of a second handle on the same connection.
	setup := openShim(t, shim, label, 0)
	tok := openShim(t, shim, label, deadline)
	require.Same(t, setup.conn, tok.conn)
	kek := uniqueLabel("kek")
	require.NoError(t, setup.GenerateKey(kek))
	sealed, err := setup.EncryptGCM(kek, []byte("secret"), nil)
	require.NoError(t, err)

	before := runtime.NumGoroutine()
	timeoutsBefore := timeouts.Load()
	shim.Set(p11shim.Hang)
	const callers = 40
	var wg sync.WaitGroup
	errs := make([]error, callers)
	took := make([]time.Duration, callers)
	for i := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			_, errs[i] = tok.DecryptGCM(kek, sealed, nil)
			took[i] = time.Since(start)
		}()
	}
	wg.Wait()
	for i := range callers {
		require.Equal(t, Unavailable, KindOf(errs[i]), "%v", errs[i])
		require.True(t, IsTimeout(errs[i]), "%v", errs[i])
		// The deadline plus scheduling slack on a loaded 2-core machine;
		// without the deadline the call would never return.
		require.Less(t, took[i], deadline+2*time.Second, "caller %d waited %s", i, took[i])
	}
	// The hung calls hold at most the session bound's worth of goroutines.
	require.LessOrEqual(t, runtime.NumGoroutine(), before+4+2)
	require.Equal(t, int64(4), timeouts.Load()-timeoutsBefore,
		"4 calls reached the token and were abandoned; the rest timed out waiting for a session")

	shim.Set()
	require.Eventually(t, func() bool {
		got, err := tok.DecryptGCM(kek, sealed, nil)
		return err == nil && string(got) == "secret"
	}, 5*time.Second, 50*time.Millisecond)
	// The abandoned sessions were closed when their calls returned: only
	// sessions that finished their operation are pooled.
	require.Eventually(t, func() bool {
		tok.conn.mu.Lock()
		defer tok.conn.mu.Unlock()
		return len(tok.conn.idle) <= 1
	}, 5*time.Second, 50*time.Millisecond)
	for range 10 {
		_, err := tok.DecryptGCM(kek, sealed, nil)
		require.NoError(t, err)
	}
}

// TestDeviceErrorRecovery: a device error (a network HSM that went away)
// makes operations fail as Unavailable; once the device is back, the module
// is finalised and initialised again, the token found and logged in to
// again, by itself and within seconds.
func TestDeviceErrorRecovery(t *testing.T) {
	prev := minRescanInterval
	minRescanInterval = 200 * time.Millisecond
	defer func() { minRescanInterval = prev }()
	shim, label := newShim(t)
	tok := openShim(t, shim, label, 2*time.Second)
	kek := uniqueLabel("kek")
	require.NoError(t, tok.GenerateKey(kek))
	sealed, err := tok.EncryptGCM(kek, []byte("secret"), nil)
	require.NoError(t, err)
	logins := tok.conn.loginAttempts()

	shim.Set(p11shim.DeviceError)
	for range 5 {
		start := time.Now()
		_, err := tok.DecryptGCM(kek, sealed, nil)
		require.Equal(t, Unavailable, KindOf(err), "%v", err)
		require.Less(t, time.Since(start), time.Second, "a device error fails at once")
	}
	shim.Set()
	back := time.Now()
	require.Eventually(t, func() bool {
		got, err := tok.DecryptGCM(kek, sealed, nil)
		return err == nil && string(got) == "secret"
	}, 10*time.Second, 50*time.Millisecond)
	t.Logf("recovered %s after the device came back", time.Since(back).Round(time.Millisecond))
	require.Less(t, time.Since(back), 5*time.Second)
	require.Equal(t, logins+1, tok.conn.loginAttempts(), "logged in once again")
}

// TestRoundTripCatchesALostIV: a token that uses an IV of its own and does
// not say which (broken, or a caller that would not read it back) is found
// by the canary, before anything is sealed with it.
func TestRoundTripCatchesALostIV(t *testing.T) {
	shim, label := newShim(t)
	shim.Set(p11shim.IVHidden)
	tok := openShim(t, shim, label, 0)
	k := SealKeys{Mechanism: AESGCM, Label: uniqueLabel("kek")}
	require.NoError(t, tok.EnsureSealKeys(k, true))
	err := tok.CheckRoundTrip(k, []byte("aad"))
	require.Equal(t, Configuration, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "cannot open what it sealed with aes-gcm")
	shim.Set()
	require.NoError(t, tok.CheckRoundTrip(k, []byte("aad")))
}

// TestRepeatedIVRefused: a token that uses one AES-GCM IV twice has its
// second output refused: GCM under a repeated IV gives away the XOR of the
// plaintexts and the authentication key.
func TestRepeatedIVRefused(t *testing.T) {
	shim, label := newShim(t)
	tok := openShim(t, shim, label, 0)
	kek := uniqueLabel("kek")
	require.NoError(t, tok.GenerateKey(kek))
	shim.Set(p11shim.IVRepeat)
	first, err := tok.EncryptGCM(kek, []byte("one"), nil)
	require.NoError(t, err)
	_, err = tok.EncryptGCM(kek, []byte("two"), nil)
	require.Equal(t, Failed, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "IV it had used before")
	shim.Set()
	got, err := tok.DecryptGCM(kek, first, nil)
	require.NoError(t, err)
	require.Equal(t, "one", string(got))
	_, err = tok.EncryptGCM(kek, []byte("three"), nil)
	require.NoError(t, err)
}
