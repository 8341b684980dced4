package hsm

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/stretchr/testify/require"
)

// These tests play a neighbouring mount: one that can configure another
// mount of the same plugin process (any allowed library path, any token,
// slot, PIN and key label) but does not know this mount's PIN.

// librarySpellings returns two allowlisted paths of the one SoftHSM2 file:
// the symlink and its target.
func librarySpellings(t *testing.T) (link, target string) {
	t.Helper()
	for _, p := range AllowedLibraries() {
		fi, err := os.Lstat(p)
		if err != nil || fi.Mode()&os.ModeSymlink == 0 {
			continue
		}
		real, err := filepath.EvalSymlinks(p)
		if err != nil {
			continue
		}
		for _, q := range AllowedLibraries() {
			if q == real {
				return p, real
			}
		}
	}
	t.Skip("no allowlisted symlink to another allowlisted SoftHSM2 path on this system")
	return "", ""
}

// slotOf returns the slot tok is connected to.
func slotOf(t *testing.T, tok *Token) uint {
	t.Helper()
	_, err := tok.Random(1)
	require.NoError(t, err)
	tok.conn.mu.Lock()
	defer tok.conn.mu.Unlock()
	return tok.conn.slot
}

// requireLockedOut asserts that tok can neither encrypt nor decrypt with
// the victim's key: its PIN is refused, being another than the one the
// process is logged in with (not for the failed-login bound), and the
// token is not asked.
func requireLockedOut(t *testing.T, tok *Token, kek string, sealed []byte) {
	t.Helper()
	before := loginCalls.Load()
	ct, err := tok.EncryptGCM(kek, []byte("x"), nil)
	require.Equal(t, Credentials, KindOf(err), "encrypt with the victim's KEK: %v", err)
	require.Nil(t, ct)
	requireOtherPINRefused(t, err)
	pt, err := tok.DecryptGCM(kek, sealed, nil)
	require.Equal(t, Credentials, KindOf(err), "decrypt with the victim's KEK: %v", err)
	require.Nil(t, pt)
	requireOtherPINRefused(t, err)
	_, err = tok.Random(4)
	require.Equal(t, Credentials, KindOf(err), "%v", err)
	requireOtherPINRefused(t, err)
	require.Zero(t, loginCalls.Load()-before, "the token was not asked to check the PIN")
}

func requireOtherPINRefused(t *testing.T, err error) {
	t.Helper()
	require.Contains(t, fmt.Sprint(err), "is logged in by this process with another PIN; this PIN is not tried")
	require.False(t, IsLoginLimited(err), "%v", err)
}

// TestWrongPINThroughAnotherSpellingOfTheLibrary: the victim logs in
// through the symlink; the neighbour names the file it links to, which
// loaded a second module with no record of the victim's login, and a wrong
// PIN was accepted as "already logged in".
func TestWrongPINThroughAnotherSpellingOfTheLibrary(t *testing.T) {
	link, target := librarySpellings(t)
	label := newTestToken(t)
	kek := uniqueLabel("kek")

	victim, err := Open(Config{Library: link, TokenLabel: label, PIN: testPIN})
	require.NoError(t, err)
	defer victim.Close()
	require.NoError(t, victim.GenerateKey(kek))
	sealed, err := victim.EncryptGCM(kek, []byte("secret"), nil)
	require.NoError(t, err)

	for _, cfg := range []Config{
		{Library: target, TokenLabel: label, PIN: "9999"},
		{Library: "/usr/lib/softhsm/../x86_64-linux-gnu/softhsm/libsofthsm2.so", TokenLabel: label, PIN: "8888"},
	} {
		if _, err := os.Stat(cfg.Library); err != nil {
			continue
		}
		neighbour, err := Open(cfg)
		require.NoError(t, err)
		requireLockedOut(t, neighbour, kek, sealed)
		neighbour.Close()
	}

	// The victim is unaffected, and the right PIN works through the other
	// spelling: it is the same library, logged in with that PIN.
	got, err := victim.DecryptGCM(kek, sealed, nil)
	require.NoError(t, err)
	require.Equal(t, []byte("secret"), got)
	other, err := Open(Config{Library: target, TokenLabel: label, PIN: testPIN})
	require.NoError(t, err)
	defer other.Close()
	got, err = other.DecryptGCM(kek, sealed, nil)
	require.NoError(t, err)
	require.Equal(t, []byte("secret"), got)
}

// TestWrongPINAfterOneOfTwoConnectionsCloses: two connections share the
// process's login to a token (one names it by label, one by slot); when the
// first closes, the second's sessions keep the login alive, and a wrong PIN
// was accepted because the record of the PIN went with the first.
func TestWrongPINAfterOneOfTwoConnectionsCloses(t *testing.T) {
	label := newTestToken(t)
	kek := uniqueLabel("kek")

	byLabel, err := Open(Config{Library: softhsmLib, TokenLabel: label, PIN: testPIN})
	require.NoError(t, err)
	require.NoError(t, byLabel.GenerateKey(kek))
	slot := slotOf(t, byLabel)

	bySlot, err := Open(Config{Library: softhsmLib, Slot: &slot, PIN: testPIN, MaxSessions: 4})
	require.NoError(t, err)
	defer bySlot.Close()
	require.NotSame(t, byLabel.conn, bySlot.conn)
	sealed, err := bySlot.EncryptGCM(kek, []byte("secret"), nil)
	require.NoError(t, err)

	byLabel.Close()

	for _, cfg := range []Config{
		{Library: softhsmLib, TokenLabel: label, PIN: "9999"},
		{Library: softhsmLib, Slot: &slot, PIN: "8888"},
	} {
		neighbour, err := Open(cfg)
		require.NoError(t, err)
		requireLockedOut(t, neighbour, kek, sealed)
		neighbour.Close()
	}

	// The remaining connection, and a new one with the right PIN, work.
	got, err := bySlot.DecryptGCM(kek, sealed, nil)
	require.NoError(t, err)
	require.Equal(t, []byte("secret"), got)
	again := openToken(t, label, testPIN)
	_, err = again.DecryptGCM(kek, sealed, nil)
	require.NoError(t, err)
}

// TestLoginForgottenWithTheLastSession: once every session of the slot is
// closed the process is logged out, and a PIN is checked by the token again.
func TestLoginForgottenWithTheLastSession(t *testing.T) {
	label := newTestToken(t)
	good, err := Open(Config{Library: softhsmLib, TokenLabel: label, PIN: testPIN})
	require.NoError(t, err)
	_, err = good.Random(1)
	require.NoError(t, err)
	good.Close()

	before := loginCalls.Load()
	wrong := openToken(t, label, "9999")
	_, err = wrong.Random(1)
	require.Equal(t, Credentials, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "PIN refused by token")
	require.Equal(t, int64(1), loginCalls.Load()-before, "the token checked the PIN")

	_, err = openToken(t, label, testPIN).Random(1)
	require.NoError(t, err)
}

// TestFinalizeUnderLoad: while the victim encrypts and decrypts from many
// goroutines, the neighbour names tokens and slots that do not exist (each
// makes the module list its slots anew: C_Finalize, C_Initialize), through
// both spellings of the library, and feeds its own key garbage. C_Finalize
// under a C_Encrypt crashed the process.
func TestFinalizeUnderLoad(t *testing.T) {
	prev := minRescanInterval
	minRescanInterval = 0
	defer func() { minRescanInterval = prev }()

	libs := []string{softhsmLib}
	if link, target := librarySpellingsOrNone(); link != "" {
		libs = []string{link, target}
	}
	victimLabel, neighbourLabel := newTestToken(t), newTestToken(t)
	kek := uniqueLabel("kek")
	victim := openToken(t, victimLabel, testPIN)
	require.NoError(t, victim.GenerateKey(kek))
	neighbour := openToken(t, neighbourLabel, testPIN)
	require.NoError(t, neighbour.GenerateKey(kek))
	startGen := generationOf(victim)

	var (
		stop     atomic.Bool
		wg       sync.WaitGroup
		ops      atomic.Int64
		mu       sync.Mutex
		failures []error
	)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; !stop.Load(); i++ {
				msg := []byte(fmt.Sprintf("goroutine %d message %d", g, i))
				ct, err := victim.EncryptGCM(kek, msg, []byte("aad"))
				if err == nil {
					var pt []byte
					pt, err = victim.DecryptGCM(kek, ct, []byte("aad"))
					if err == nil && string(pt) != string(msg) {
						err = fmt.Errorf("round trip gave %q", pt)
					}
				}
				if err != nil {
					mu.Lock()
					failures = append(failures, err)
					mu.Unlock()
					return
				}
				ops.Add(1)
			}
		}(g)
	}

	garbage := make([]byte, GCMNonceSize+48)
	noSlot := uint(987654)
	// -short (make mutation runs the package once per mutant) takes fewer
	// rounds; each round finalises the module twice.
	rounds := 150
	if testing.Short() {
		rounds = 40
	}
	for i := 0; i < rounds; i++ {
		lib := libs[i%len(libs)]
		missing, err := Open(Config{Library: lib, TokenLabel: uniqueLabel("none"), PIN: "1111"})
		require.NoError(t, err)
		_, err = missing.Random(1)
		require.True(t, IsTokenNotFound(err), "%v", err)
		missing.Close()

		missing, err = Open(Config{Library: lib, Slot: &noSlot, PIN: "1111"})
		require.NoError(t, err)
		_, err = missing.Random(1)
		require.True(t, IsTokenNotFound(err), "%v", err)
		missing.Close()

		garbage[i%len(garbage)]++
		_, err = neighbour.DecryptGCM(kek, garbage, nil)
		require.Equal(t, Failed, KindOf(err), "%v", err)
	}
	stop.Store(true)
	wg.Wait()

	require.Empty(t, failures, "every operation of the victim succeeds")
	require.Positive(t, ops.Load())
	require.Greater(t, generationOf(victim)-startGen, uint64(rounds*2/3), "the neighbour did have the module finalised")
	t.Logf("%d victim round trips across %d module initialisations", ops.Load(), generationOf(victim)-startGen)
}

func librarySpellingsOrNone() (string, string) {
	for _, p := range AllowedLibraries() {
		real, err := filepath.EvalSymlinks(p)
		if err != nil || real == p {
			continue
		}
		for _, q := range AllowedLibraries() {
			if q == real {
				return p, real
			}
		}
	}
	return "", ""
}

func generationOf(tok *Token) uint64 {
	tok.conn.mod.calls.RLock()
	defer tok.conn.mod.calls.RUnlock()
	return tok.conn.mod.generation
}

// TestGeneralErrorKeepsTheModule: CKR_GENERAL_ERROR, which SoftHSM2 answers
// to a ciphertext that does not authenticate among others, drops only the
// connection that met it; it does not finalise the module under everyone.
func TestGeneralErrorKeepsTheModule(t *testing.T) {
	prev := minRescanInterval
	minRescanInterval = 0
	defer func() { minRescanInterval = prev }()

	victim := openToken(t, "token-a", testPIN)
	_, err := victim.Random(1)
	require.NoError(t, err)
	neighbour := openToken(t, "token-b", testPIN)
	gen := generationOf(victim)
	err = neighbour.do("provoke", false, func(*pkcs11.Ctx, pkcs11.SessionHandle, uint64) error {
		return pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)
	})
	require.Equal(t, Unavailable, KindOf(err), "%v", err)
	require.ErrorIs(t, err, pkcs11.Error(pkcs11.CKR_GENERAL_ERROR))
	_, err = victim.Random(1)
	require.NoError(t, err)
	require.Equal(t, gen, generationOf(victim), "the module was not finalised")
	victim.conn.mu.Lock()
	connected := victim.conn.gen == gen
	victim.conn.mu.Unlock()
	require.True(t, connected, "the victim's connection is intact")
}

// TestGeneratedKeyCannotBeWidened: with the token's PIN, a session could
// turn a generated KEK into a derivation base (whose derived keys can be
// extractable) or copy it with other attributes. The token must refuse.
func TestGeneratedKeyCannotBeWidened(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	kek := uniqueLabel("kek")
	require.NoError(t, tok.GenerateKey(kek))

	err := tok.do("test", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		h, err := tok.conn.objectHandle(ctx, s, gen, kek)
		if err != nil {
			return err
		}
		attrs, err := ctx.GetAttributeValue(s, h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_COPYABLE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, nil),
		})
		if err != nil {
			return err
		}
		for _, a := range attrs {
			require.False(t, attrBool(a), "attribute 0x%x", a.Type)
		}
		for _, a := range []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, true),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
		} {
			require.Error(t, ctx.SetAttributeValue(s, h, []*pkcs11.Attribute{a}), "setting attribute 0x%x", a.Type)
		}
		copied, err := ctx.CopyObject(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false)})
		if err == nil {
			_ = ctx.DestroyObject(s, copied)
		}
		require.Error(t, err, "copying the KEK")
		return nil
	})
	require.NoError(t, err)
	require.NoError(t, tok.CheckKEK(kek), "the key is as generated")
}

// TestCheckKEK makes keys with each refused attribute directly through
// PKCS#11 and has CheckKEK name the attribute.
func TestCheckKEK(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	prefix := uniqueLabel("check")

	mk := func(label string, mech uint, override ...*pkcs11.Attribute) {
		t.Helper()
		tmpl := map[uint]*pkcs11.Attribute{}
		for _, a := range []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		} {
			tmpl[a.Type] = a
		}
		for _, a := range override {
			tmpl[a.Type] = a
		}
		tmpl[pkcs11.CKA_LABEL] = pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)
		var list []*pkcs11.Attribute
		for _, a := range tmpl {
			list = append(list, a)
		}
		require.NoError(t, tok.do("make test key", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
			_, err := ctx.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, list)
			return err
		}))
	}
	aes := uint(pkcs11.CKM_AES_KEY_GEN)
	cases := []struct {
		name, attr string
		mech       uint
		override   []*pkcs11.Attribute
	}{
		{"extractable", "CKA_EXTRACTABLE=true", aes, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true)}},
		{"not sensitive", "CKA_SENSITIVE=false", aes, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false)}},
		{"aes-128", "CKA_VALUE_LEN=16", aes, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 16)}},
		{"derive", "CKA_DERIVE=true", aes, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_DERIVE, true)}},
		{"wrap", "CKA_WRAP=true", aes, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_WRAP, true)}},
		{"unwrap", "CKA_UNWRAP=true", aes, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true)}},
		{"no encrypt", "CKA_ENCRYPT=false", aes, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false)}},
		{"generic secret", "CKA_KEY_TYPE", pkcs11.CKM_GENERIC_SECRET_KEY_GEN, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false), pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			label := prefix + "/" + c.name
			mk(label, c.mech, c.override...)
			err := tok.CheckKEK(label)
			require.Equal(t, Configuration, KindOf(err), "%v", err)
			require.Contains(t, err.Error(), c.attr)
			require.Contains(t, err.Error(), fmt.Sprintf("the KEK %q", label))
		})
	}

	t.Run("not a secret key", func(t *testing.T) {
		label := prefix + "/data"
		require.NoError(t, tok.do("make test object", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
			_, err := ctx.CreateObject(s, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
				pkcs11.NewAttribute(pkcs11.CKA_VALUE, []byte("not a key")),
			})
			return err
		}))
		err := tok.CheckKEK(label)
		require.Equal(t, Configuration, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), "CKA_CLASS")
	})
	t.Run("missing", func(t *testing.T) {
		require.Equal(t, NotFound, KindOf(tok.CheckKEK(prefix+"/none")))
	})
	t.Run("generated", func(t *testing.T) {
		label := prefix + "/generated"
		require.NoError(t, tok.GenerateKey(label))
		require.NoError(t, tok.CheckKEK(label))
	})
	t.Run("made elsewhere, modifiable and copyable", func(t *testing.T) {
		label := prefix + "/elsewhere"
		mk(label, aes, pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, true), pkcs11.NewAttribute(pkcs11.CKA_COPYABLE, true))
		require.NoError(t, tok.CheckKEK(label))
	})
}

var wrongPIN atomic.Int64

// wrongPINs opens n handles with wrong PINs never used before (a PIN used
// before may share a connection whose refusal is sticky) and returns their
// errors.
func wrongPINs(t *testing.T, label string, n int) []error {
	t.Helper()
	var errs []error
	for i := 0; i < n; i++ {
		tok := openToken(t, label, fmt.Sprintf("9%05d", wrongPIN.Add(1)))
		_, err := tok.Random(1)
		require.Equal(t, Credentials, KindOf(err), "%v", err)
		errs = append(errs, err)
	}
	return errs
}

// TestFailedLoginsBounded: every wrong PIN a neighbour writes was a real
// C_Login, and a real HSM locks its user PIN after a few.
func TestFailedLoginsBounded(t *testing.T) {
	label := newTestToken(t)
	before := loginCalls.Load()
	errs := wrongPINs(t, label, 6)
	require.Equal(t, int64(3), loginCalls.Load()-before, "three wrong PINs reach the token, no more")
	for _, err := range errs[:3] {
		require.Contains(t, err.Error(), "PIN refused by token")
		require.False(t, IsLoginLimited(err))
	}
	for _, err := range errs[3:] {
		require.True(t, IsLoginLimited(err), "%v", err)
		require.Regexp(t, `3 failed logins to token "`+label+`" in the last 15m; refused without trying the token until \d\d:\d\d:\d\d UTC, to keep it from locking`, err.Error())
	}

	// The right PIN is refused too: the bound must not tell it apart.
	right := openToken(t, label, testPIN)
	_, err := right.Random(1)
	require.True(t, IsLoginLimited(err), "%v", err)
	require.Equal(t, Credentials, KindOf(err))
	require.Equal(t, int64(3), loginCalls.Load()-before)
}

// TestFailedLoginsBoundSparesTheLoggedIn: while the victim is logged in,
// wrong PINs are refused without C_Login but count all the same; past the
// bound the victim keeps working, even when it must log in again, and a new
// handle is refused even with the right PIN.
func TestFailedLoginsBoundSparesTheLoggedIn(t *testing.T) {
	prev := minRescanInterval
	minRescanInterval = 0
	defer func() { minRescanInterval = prev }()

	label := newTestToken(t)
	kek := uniqueLabel("kek")
	victim := openToken(t, label, testPIN)
	require.NoError(t, victim.GenerateKey(kek))

	before := loginCalls.Load()
	errs := wrongPINs(t, label, 5)
	require.Zero(t, loginCalls.Load()-before, "compared with the victim's login, not tried")
	require.Contains(t, errs[0].Error(), "logged in by this process with another PIN")
	require.True(t, IsLoginLimited(errs[3]), "%v", errs[3])
	require.True(t, IsLoginLimited(errs[4]), "%v", errs[4])

	_, err := victim.EncryptGCM(kek, []byte("x"), nil)
	require.NoError(t, err)

	// A rescan logs everyone out; the victim logs in again.
	gen := generationOf(victim)
	missing := openToken(t, uniqueLabel("none"), testPIN)
	_, err = missing.Random(1)
	require.True(t, IsTokenNotFound(err), "%v", err)
	_, err = victim.EncryptGCM(kek, []byte("x"), nil)
	require.NoError(t, err)
	require.Greater(t, generationOf(victim), gen)

	// A new handle is a new login attempt, right PIN or not.
	late := openToken(t, label, testPIN)
	require.Same(t, victim.conn, late.conn)
	_, err = late.EncryptGCM(kek, []byte("x"), nil)
	require.True(t, IsLoginLimited(err), "%v", err)
	slot := slotOf(t, victim)
	bySlot, err := Open(Config{Library: softhsmLib, Slot: &slot, PIN: testPIN})
	require.NoError(t, err)
	defer bySlot.Close()
	_, err = bySlot.Random(1)
	require.True(t, IsLoginLimited(err), "by slot, the same token: %v", err)
}

// TestFailedLoginsWindow: the bound counts failures in a sliding window;
// once they leave it, logins are tried again.
func TestFailedLoginsWindow(t *testing.T) {
	defer SetFailedLoginLimit(2, 1500*time.Millisecond)()
	label := newTestToken(t)
	errs := wrongPINs(t, label, 3)
	require.True(t, IsLoginLimited(errs[2]), "%v", errs[2])
	require.Contains(t, errs[2].Error(), "2 failed logins to token")
	require.Contains(t, errs[2].Error(), "in the last 1.5s")

	right := openToken(t, label, testPIN)
	_, err := right.Random(1)
	require.True(t, IsLoginLimited(err), "%v", err)
	require.Eventually(t, func() bool {
		_, err = right.Random(1)
		return err == nil
	}, 5*time.Second, 100*time.Millisecond, "last error: %v", err)

	// A success does not reset the count of failures.
	wrongPINs(t, label, 2)
	_, err = openToken(t, label, testPIN).Random(1)
	require.True(t, IsLoginLimited(err), "%v", err)
}

func TestSetFailedLoginLimitOff(t *testing.T) {
	defer SetFailedLoginLimit(0, 0)()
	label := newTestToken(t)
	before := loginCalls.Load()
	for _, err := range wrongPINs(t, label, 5) {
		require.False(t, IsLoginLimited(err))
	}
	require.Equal(t, int64(5), loginCalls.Load()-before)
}

func TestLabels(t *testing.T) {
	huge := strings.Repeat("a", 1<<20)
	for _, bad := range []string{"", huge, "\x00", "a\x00b", "a\nb", "\t", "a\x7f", "\xff\xfe", strings.Repeat("x", 33), "trailing "} {
		err := CheckTokenLabel(bad)
		require.Equal(t, Configuration, KindOf(err), "token label %.40q: %v", bad, err)
		require.Less(t, len(err.Error()), 200, "the message does not quote a huge label")
	}
	for _, good := range []string{"token-a", strings.Repeat("x", 32), "Ünïcødé token", " leading"} {
		require.NoError(t, CheckTokenLabel(good), "%q", good)
	}
	for _, bad := range []string{"", huge, "\x00", "a\nb", "a\rb", "a\u200bb", "\xc3", strings.Repeat("k", 129)} {
		err := CheckKeyLabel(bad)
		require.Equal(t, Configuration, KindOf(err), "key label %.40q: %v", bad, err)
		require.Less(t, len(err.Error()), 200)
	}
	for _, good := range []string{"kek", "hsm-transit/0b5e1c3a-2f7e-4c7b-9a55-6a8f2d0c1e9b/name/v12", strings.Repeat("k", 128), "clé 1"} {
		require.NoError(t, CheckKeyLabel(good), "%q", good)
	}

	_, err := Open(Config{Library: softhsmLib, TokenLabel: strings.Repeat("x", 33), PIN: testPIN})
	require.Equal(t, Configuration, KindOf(err), "%v", err)
	_, err = Open(Config{Library: softhsmLib, TokenLabel: "a\nb", PIN: testPIN})
	require.Equal(t, Configuration, KindOf(err), "%v", err)

	tok := openToken(t, "token-a", testPIN)
	for _, bad := range []string{huge, "a\nb", "\x00"} {
		err := tok.GenerateKey(bad)
		require.Equal(t, Configuration, KindOf(err), "%v", err)
	}
}

func TestResolveLibrary(t *testing.T) {
	real, err := filepath.EvalSymlinks(softhsmLib)
	require.NoError(t, err)
	for _, p := range []string{
		softhsmLib,
		real,
		"/usr/lib/softhsm/../softhsm/libsofthsm2.so",
		"//usr/lib/softhsm/libsofthsm2.so",
		"/usr/lib/softhsm/./libsofthsm2.so",
	} {
		if _, err := os.Stat(p); err != nil {
			continue
		}
		got, err := ResolveLibrary(p)
		require.NoError(t, err, p)
		require.Equal(t, real, got, p)
		require.NoError(t, CheckLibrary(p))
	}

	// A symlink anyone made to an allowed library loads the allowed code:
	// accepted, as the file it names.
	link := filepath.Join(t.TempDir(), "lib.so")
	require.NoError(t, os.Symlink(real, link))
	got, err := ResolveLibrary(link)
	require.NoError(t, err)
	require.Equal(t, real, got)

	notAllowed := func(p string) string {
		t.Helper()
		_, err := ResolveLibrary(p)
		require.Equal(t, Configuration, KindOf(err), "%s: %v", p, err)
		require.Contains(t, err.Error(), "is not allowed or not present")
		require.Contains(t, err.Error(), LibrariesEnv)
		return strings.Replace(err.Error(), p, "PATH", 1)
	}
	other := filepath.Join(t.TempDir(), "other.so")
	require.NoError(t, os.WriteFile(other, []byte("not a library"), 0o600))
	require.Equal(t, notAllowed(other), notAllowed(filepath.Join(t.TempDir(), "missing.so")),
		"the message does not tell an existing file from a missing one")
	notAllowed("/usr/lib/softhsm/../../../tmp/evil.so")
	notAllowed("/usr/lib/softhsm")
	for _, p := range []string{"/usr/lib/softhsm/", softhsmLib + "/", "", "libsofthsm2.so", "./x.so"} {
		_, err := ResolveLibrary(p)
		require.Equal(t, Configuration, KindOf(err), "%q: %v", p, err)
	}

	t.Run("allowlist from the environment", func(t *testing.T) {
		t.Setenv(LibrariesEnv, "/opt/hsm/missing.so:"+other)
		_, err := ResolveLibrary("/opt/hsm/missing.so")
		require.Equal(t, Configuration, KindOf(err))
		require.Contains(t, err.Error(), "is not installed")
		got, err := ResolveLibrary(other)
		require.NoError(t, err)
		require.Equal(t, other, got)
		notAllowed(softhsmLib)
	})
}

func TestOneModulePerLibraryFile(t *testing.T) {
	link, target := librarySpellings(t)
	a := openToken(t, "token-a", testPIN)
	b, err := Open(Config{Library: target, TokenLabel: "token-b", PIN: testPIN})
	require.NoError(t, err)
	defer b.Close()
	c, err := Open(Config{Library: link, TokenLabel: "token-a", PIN: testPIN})
	require.NoError(t, err)
	defer c.Close()
	require.Same(t, a.conn.mod, b.conn.mod)
	require.Same(t, a.conn, c.conn, "one connection whatever the spelling")
}

func TestIsTokenNotFound(t *testing.T) {
	_, err := openToken(t, uniqueLabel("none"), testPIN).Random(1)
	require.True(t, IsTokenNotFound(err), "%v", err)
	require.True(t, IsUnavailable(err))

	slot := uint(987654)
	tok, err := Open(Config{Library: softhsmLib, Slot: &slot, PIN: testPIN})
	require.NoError(t, err)
	defer tok.Close()
	_, err = tok.Random(1)
	require.True(t, IsTokenNotFound(err), "%v", err)
	require.True(t, IsUnavailable(err))

	t.Run("library cannot be loaded", func(t *testing.T) {
		junk := filepath.Join(t.TempDir(), "junk.so")
		require.NoError(t, os.WriteFile(junk, []byte("not a library"), 0o600))
		t.Setenv(LibrariesEnv, junk)
		tok, err := Open(Config{Library: junk, TokenLabel: "token-a", PIN: testPIN})
		require.NoError(t, err)
		defer tok.Close()
		_, err = tok.Random(1)
		require.True(t, IsTokenNotFound(err), "%v", err)
		require.True(t, IsUnavailable(err))
	})

	require.False(t, IsTokenNotFound(nil))
	_, err = Open(Config{Library: "/tmp/evil.so", TokenLabel: "x", PIN: testPIN})
	require.False(t, IsTokenNotFound(err))
	_, err = openToken(t, newTestToken(t), "0000").Random(1)
	require.Equal(t, Credentials, KindOf(err), "%v", err)
	require.False(t, IsTokenNotFound(err))
}

// TestRescansAreSpaced: naming a token that is not there has the module
// list its slots anew, which stops every mount of the library and logs them
// all out; a neighbour cannot have that done more than once a
// minRescanInterval.
func TestRescansAreSpaced(t *testing.T) {
	victim := openToken(t, "token-a", testPIN)
	_, err := victim.Random(1)
	require.NoError(t, err)
	mod := victim.conn.mod
	mod.calls.Lock()
	mod.lastReset = time.Time{}
	mod.calls.Unlock()
	prev := minRescanInterval
	minRescanInterval = time.Hour
	defer func() { minRescanInterval = prev }()

	gen := generationOf(victim)
	for i := 0; i < 20; i++ {
		_, err := openToken(t, uniqueLabel("none"), testPIN).Random(1)
		require.True(t, IsTokenNotFound(err), "%v", err)
		_, err = victim.Random(1)
		require.NoError(t, err)
	}
	require.Equal(t, gen+1, generationOf(victim), "one rescan, the others refused")
}

// TestUnverifiableLoginRefused: code of this process that does not go
// through this package logged in to the token; the token answers "already
// logged in" to any PIN, and this package cannot tell whether the PIN is
// right, so it refuses it.
func TestUnverifiableLoginRefused(t *testing.T) {
	label := newTestToken(t)
	tok := openToken(t, label, testPIN)
	_, err := tok.Random(1) // the module is loaded and initialised
	require.NoError(t, err)
	slot := slotOf(t, tok)
	tok.Close()

	// The dynamic loader hands out the module's own copy of the library.
	other := pkcs11.New(softhsmLib)
	require.NotNil(t, other)
	defer other.Destroy()
	_ = other.Initialize() // already initialised by the module
	s, err := other.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	require.NoError(t, err)
	defer func() { _ = other.CloseSession(s) }()
	require.NoError(t, other.Login(s, pkcs11.CKU_USER, testPIN))

	for _, pin := range []string{"9999", testPIN} {
		_, err = openToken(t, label, pin).Random(1)
		require.Equal(t, Credentials, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), "logged in by this process with a PIN it cannot verify")
	}
}
