package hsm

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// The tests run against real SoftHSM2 tokens in a temporary directory.
// SOFTHSM2_CONF is read at C_Initialize, once per process, so TestMain sets
// it up before any test runs.

const testPIN = "1234"

var (
	softhsmLib  string
	softhsmConf string
	tokenDir    string
)

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	lib, err := softhsm.FindLibrary()
	if err != nil {
		fmt.Fprintln(os.Stderr, "hsm tests need a real token:", err)
		return 1
	}
	softhsmLib = lib
	// Tests make many tokens; SoftHSM2 sees only the first one made after
	// C_Initialize, and the tests do not wait for the spacing of rescans
	// (TestRescansAreSpaced checks it).
	minRescanInterval = 0
	dir, err := os.MkdirTemp("", "hsm-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	tokenDir = filepath.Join(dir, "tokens")
	if softhsmConf, err = softhsm.Setup(dir, testPIN, "token-a", "token-b"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}

// uniqueLabel returns prefix with a random suffix: the tokens live as long
// as the test process, which runs each test -count times.
func uniqueLabel(prefix string) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return prefix + "-" + hex.EncodeToString(b)
}

// newTestToken initialises a token of its own for a test that changes the
// token's state (its login, its failed logins, its presence).
func newTestToken(t *testing.T) string {
	t.Helper()
	label := uniqueLabel("t")
	require.NoError(t, softhsm.InitToken(softhsmConf, label, testPIN))
	return label
}

func openToken(t *testing.T, label, pin string) *Token {
	t.Helper()
	tok, err := Open(Config{Library: softhsmLib, TokenLabel: label, PIN: pin})
	require.NoError(t, err)
	t.Cleanup(tok.Close)
	return tok
}

func TestKEKGenerateAndAttributes(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	kek := uniqueLabel("kek-attrs")
	has, err := tok.HasKey(kek)
	require.NoError(t, err)
	require.False(t, has)
	require.NoError(t, tok.GenerateKey(kek))
	has, err = tok.HasKey(kek)
	require.NoError(t, err)
	require.True(t, has)

	attrs, err := tok.Attributes(kek)
	require.NoError(t, err)
	require.Equal(t, KeyAttributes{Sensitive: true, Extractable: false, NeverExtractable: true, Token: true}, attrs)

	err = tok.GenerateKey(kek)
	require.Equal(t, Configuration, KindOf(err), "a second key with the same label is refused: %v", err)
	require.Contains(t, err.Error(), fmt.Sprintf("a key labelled %q already exists", kek))
	labels, err := tok.KeyLabels(kek)
	require.NoError(t, err)
	require.Equal(t, []string{kek}, labels, "no second key was made")
}

func TestSealUnsealRoundTrip(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	kek := uniqueLabel("kek-roundtrip")
	require.NoError(t, tok.GenerateKey(kek))
	root, err := tok.Random(32)
	require.NoError(t, err)
	require.Len(t, root, 32)
	other, err := tok.Random(32)
	require.NoError(t, err)
	require.NotEqual(t, root, other)

	aad := []byte("mount-1234")
	sealed, err := tok.EncryptGCM(kek, root, aad)
	require.NoError(t, err)
	require.Len(t, sealed, GCMNonceSize+32+GCMTagSize)
	require.False(t, bytes.Contains(sealed, root))

	opened, err := tok.DecryptGCM(kek, sealed, aad)
	require.NoError(t, err)
	require.Equal(t, root, opened)

	_, err = tok.DecryptGCM(kek, sealed, []byte("mount-9999"))
	require.Equal(t, Failed, KindOf(err), "the AAD binds the mount: %v", err)
	require.Contains(t, err.Error(), "do not authenticate")
	for _, i := range []int{0, GCMNonceSize - 1, 20, len(sealed) - 1} {
		tampered := append([]byte{}, sealed...)
		tampered[i] ^= 1
		got, err := tok.DecryptGCM(kek, tampered, aad)
		require.Equal(t, Failed, KindOf(err), "byte %d flipped: %v", i, err)
		require.Contains(t, err.Error(), "do not authenticate", "byte %d flipped", i)
		require.Nil(t, got, "no plaintext of a blob that does not authenticate")
	}
	_, err = tok.DecryptGCM(kek, sealed[:10], aad)
	require.Equal(t, Failed, KindOf(err))
	require.Contains(t, err.Error(), "ciphertext too short")
	_, err = tok.DecryptGCM(kek, sealed[:GCMNonceSize+GCMTagSize-1], aad)
	require.Equal(t, Failed, KindOf(err))
	require.Contains(t, err.Error(), "ciphertext too short")
}

func TestMissingKEK(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	_, err := tok.EncryptGCM("no-such-kek", []byte("x"), nil)
	require.Equal(t, NotFound, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), `no AES key labelled "no-such-kek"`)
	err = tok.DestroyKey("no-such-kek")
	require.Equal(t, NotFound, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), `no AES key labelled "no-such-kek"`)
	_, err = tok.DecryptGCM("no-such-kek", make([]byte, GCMNonceSize+GCMTagSize+1), nil)
	require.Equal(t, NotFound, KindOf(err), "%v", err)
}

func TestKEKRotationBetweenLabels(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	prefix := uniqueLabel("kek") + "-"
	kekOld, kekNew := prefix+"old", prefix+"new"
	require.NoError(t, tok.GenerateKey(kekOld))
	require.NoError(t, tok.GenerateKey(kekNew))
	secret := []byte("root key bytes, 32 of them......")
	underOld, err := tok.EncryptGCM(kekOld, secret, nil)
	require.NoError(t, err)

	// Re-seal: open under the old KEK, seal under the new one.
	opened, err := tok.DecryptGCM(kekOld, underOld, nil)
	require.NoError(t, err)
	underNew, err := tok.EncryptGCM(kekNew, opened, nil)
	require.NoError(t, err)
	got, err := tok.DecryptGCM(kekOld, underNew, nil)
	require.Equal(t, Failed, KindOf(err), "the old KEK cannot open what the new one sealed: %v", err)
	require.Contains(t, err.Error(), "do not authenticate")
	require.Nil(t, got)
	// The refusal is the blob's fault: the connection is intact, and the
	// old KEK still opens its own blobs.
	opened, err = tok.DecryptGCM(kekOld, underOld, nil)
	require.NoError(t, err)
	require.Equal(t, secret, opened)
	got, err = tok.DecryptGCM(kekNew, underNew, nil)
	require.NoError(t, err)
	require.Equal(t, secret, got)

	require.NoError(t, tok.DestroyKey(kekOld))
	has, err := tok.HasKey(kekOld)
	require.NoError(t, err)
	require.False(t, has)
	labels, err := tok.KeyLabels(prefix)
	require.NoError(t, err)
	require.Equal(t, []string{kekNew}, labels)
}

func TestWrongPINIsNotRetried(t *testing.T) {
	label := newTestToken(t)
	tok := openToken(t, label, "0000")
	for i := 0; i < 5; i++ {
		_, err := tok.Random(8)
		require.Equal(t, Credentials, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), "PIN refused by token")
		require.Contains(t, err.Error(), "CKR_PIN_INCORRECT", "the token's own refusal")
		require.False(t, IsLoginLimited(err), "refused by the token, not by the bound: %v", err)
	}
	require.Equal(t, 1, tok.conn.loginAttempts(), "one refused login, then the error is sticky")

	// The right PIN is another Token and works.
	good := openToken(t, label, testPIN)
	_, err := good.Random(8)
	require.NoError(t, err)

	// Once logged in with the right PIN, another PIN is refused without
	// asking the token (which would answer "already logged in").
	before := loginCalls.Load()
	other := openToken(t, label, "9999")
	_, err = other.Random(8)
	require.Equal(t, Credentials, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "logged in by this process with another PIN")
	require.False(t, IsLoginLimited(err), "%v", err)
	require.Zero(t, loginCalls.Load()-before, "the token was not asked")
	_, err = good.Random(8)
	require.NoError(t, err, "the right PIN's login is untouched")
}

func TestTokensAreSharedAndBounded(t *testing.T) {
	a1 := openToken(t, "token-a", testPIN)
	a2 := openToken(t, "token-a", testPIN)
	require.NotSame(t, a1, a2, "one handle per Open")
	require.Same(t, a1.conn, a2.conn, "one connection per library, token and PIN in a process")
	a3, err := Open(Config{Library: softhsmLib, TokenLabel: "token-a", PIN: testPIN})
	require.NoError(t, err)
	a3.Close()
	a3.Close() // harmless: it does not release the others' reference
	_, err = a1.Random(4)
	require.NoError(t, err)
	tokens.Lock()
	refs := a1.conn.refs
	tokens.Unlock()
	require.Equal(t, 2, refs)

	// The handles of a connection share its bound of DefaultMaxSessions
	// sessions (MaxSessions unset): operations through both run no more
	// than that many at once, and the others wait for a session.
	label := newTestToken(t)
	cfg := Config{Library: softhsmLib, TokenLabel: label, PIN: testPIN, CallTimeout: 2 * time.Second}
	b1, err := Open(cfg)
	require.NoError(t, err)
	t.Cleanup(b1.Close)
	b2, err := Open(cfg)
	require.NoError(t, err)
	t.Cleanup(b2.Close)
	require.Same(t, b1.conn, b2.conn)
	_, err = b1.Random(1)
	require.NoError(t, err)
	_, err = b2.Random(1)
	require.NoError(t, err)
	requireSessionBound(t, []*Token{b1, b2}, DefaultMaxSessions)
}

func TestConfigurationRefused(t *testing.T) {
	slot := uint(0)
	cases := map[string]Config{
		"library not allowed":  {Library: "/tmp/evil.so", TokenLabel: "token-a", PIN: testPIN},
		"relative library":     {Library: "libsofthsm2.so", TokenLabel: "token-a", PIN: testPIN},
		"traversal":            {Library: "/usr/lib/softhsm/../../../tmp/evil.so", TokenLabel: "token-a", PIN: testPIN},
		"no token":             {Library: softhsmLib, PIN: testPIN},
		"both label and slot":  {Library: softhsmLib, TokenLabel: "token-a", Slot: &slot, PIN: testPIN},
		"no PIN":               {Library: softhsmLib, TokenLabel: "token-a"},
		"no library":           {TokenLabel: "token-a", PIN: testPIN},
		"empty allowlist path": {Library: "/", TokenLabel: "token-a", PIN: testPIN},
	}
	for name, cfg := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := Open(cfg)
			require.Equal(t, Configuration, KindOf(err), "%v", err)
		})
	}
	t.Run("allowlist from the environment", func(t *testing.T) {
		t.Setenv(LibrariesEnv, "/opt/hsm/lib.so")
		_, err := Open(Config{Library: softhsmLib, TokenLabel: "token-a", PIN: testPIN})
		require.Equal(t, Configuration, KindOf(err))
		require.Contains(t, err.Error(), LibrariesEnv)
	})
}

func TestUnknownTokenIsUnavailable(t *testing.T) {
	tok := openToken(t, "no-such-token", testPIN)
	_, err := tok.Random(4)
	require.Equal(t, Unavailable, KindOf(err), "%v", err)
	// The other tokens of the module still work after the rescan.
	_, err = openToken(t, "token-a", testPIN).Random(4)
	require.NoError(t, err)
}

func TestConcurrentUseOfTwoTokens(t *testing.T) {
	a := openToken(t, "token-a", testPIN)
	b := openToken(t, "token-b", testPIN)
	kek := uniqueLabel("kek-conc")
	require.NoError(t, a.GenerateKey(kek))
	require.NoError(t, b.GenerateKey(kek))
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for i := 0; i < 100; i++ {
		for _, tok := range []*Token{a, b} {
			wg.Add(1)
			go func(tok *Token, i int) {
				defer wg.Done()
				msg := []byte(fmt.Sprintf("message %d", i))
				ct, err := tok.EncryptGCM(kek, msg, []byte("aad"))
				if err != nil {
					errs <- err
					return
				}
				pt, err := tok.DecryptGCM(kek, ct, []byte("aad"))
				if err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(pt, msg) {
					errs <- fmt.Errorf("round trip gave %q", pt)
				}
			}(tok, i)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	a.conn.mu.Lock()
	defer a.conn.mu.Unlock()
	require.LessOrEqual(t, len(a.conn.idle), DefaultMaxSessions, "sessions stay bounded")
}

// TestTokenRemovedAndRestored takes the token directory away while the
// token is in use: operations fail as unavailable, then work again once it
// is back, on the same Token, with no reconfiguration.
func TestTokenRemovedAndRestored(t *testing.T) {
	label := newTestToken(t)
	tok := openToken(t, label, testPIN)
	require.NoError(t, tok.GenerateKey("kek-outage"))
	sealed, err := tok.EncryptGCM("kek-outage", []byte("survives"), nil)
	require.NoError(t, err)

	dir, err := softhsm.TokenDir(softhsmConf, label)
	require.NoError(t, err)
	aside := filepath.Join(filepath.Dir(tokenDir), "aside-"+filepath.Base(dir))
	require.NoError(t, os.Rename(dir, aside))
	for i := 0; i < 3; i++ {
		_, err = tok.DecryptGCM("kek-outage", sealed, nil)
		require.Equal(t, Unavailable, KindOf(err), "%v", err)
		_, err = tok.Random(4)
		require.Equal(t, Unavailable, KindOf(err), "%v", err)
	}
	// The other token of the module kept working through the rescans.
	_, err = openToken(t, "token-a", testPIN).Random(4)
	require.NoError(t, err)

	require.NoError(t, os.Rename(aside, dir))
	var got []byte
	require.Eventually(t, func() bool {
		got, err = tok.DecryptGCM("kek-outage", sealed, nil)
		return err == nil
	}, 10*time.Second, 100*time.Millisecond, "last error: %v", err)
	require.Equal(t, []byte("survives"), got)
}
