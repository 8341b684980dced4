package hsm

// Tests written against mutants that lived or were not covered (gremlins):
// each names the site it is for.

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/p11env"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/p11shim"
)

// plantData makes a private token data object as WriteData would, with
// extra attributes (CKA_DESTROYABLE, CKA_MODIFIABLE false).
func plantData(t *testing.T, tok *Token, label string, value []byte, extra ...*pkcs11.Attribute) {
	t.Helper()
	require.NoError(t, tok.do("plant data", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		_, err := ctx.CreateObject(s, append([]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, dataApplication),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, value),
		}, extra...))
		return err
	}))
}

// TestMutantDataNotDestroyable (data.go destroyAll, CKR_ACTION_PROHIBITED):
// a data object the token refuses to destroy (CKA_DESTROYABLE false) is a
// Configuration error naming CKA_DESTROYABLE, and its value stays.
func TestMutantDataNotDestroyable(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	label := uniqueLabel("undestroyable")
	plantData(t, tok, label, []byte("kept"), pkcs11.NewAttribute(pkcs11.CKA_DESTROYABLE, false))
	requireData(t, tok, label, []byte("kept"))

	err := tok.DestroyData(label)
	require.Equal(t, Configuration, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "cannot be destroyed (CKA_DESTROYABLE is false)")
	require.Contains(t, err.Error(), label)
	requireData(t, tok, label, []byte("kept"))
	require.Equal(t, 1, countData(t, tok, label))

	// Replacing its value needs it destroyed too (SoftHSM2 does not let
	// CKA_VALUE change): refused the same way, the old value kept, the
	// staging object with the new value left for the next attempt.
	err = tok.WriteData(label, []byte("new"))
	require.Equal(t, Configuration, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "cannot be destroyed (CKA_DESTROYABLE is false)")
	requireData(t, tok, label, []byte("kept"))
	require.Equal(t, 1, countData(t, tok, label))
	require.Equal(t, 1, countData(t, tok, label+stagingSuffix))
}

// TestMutantDataNotModifiable (data.go WriteData, the fall-back to
// replacement when CKA_VALUE cannot be set): an object with CKA_MODIFIABLE
// false (C_SetAttributeValue answers CKR_ACTION_PROHIBITED) is replaced
// through a staging object.
func TestMutantDataNotModifiable(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	label := uniqueLabel("unmodifiable")
	plantData(t, tok, label, []byte("old"), pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false))
	// What the token answers, so that the test stays about that answer.
	require.NoError(t, tok.do("probe", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		hs, err := findData(ctx, s, label)
		require.NoError(t, err)
		require.Len(t, hs, 1)
		err = ctx.SetAttributeValue(s, hs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, []byte("x"))})
		require.Equal(t, pkcs11.Error(pkcs11.CKR_ACTION_PROHIBITED), err)
		return nil
	}))

	require.NoError(t, tok.WriteData(label, []byte("new")))
	requireData(t, tok, label, []byte("new"))
	require.Equal(t, 1, countData(t, tok, label))
	require.Equal(t, 0, countData(t, tok, label+stagingSuffix), "no staging object left")
	require.NoError(t, tok.DestroyData(label))
}

// TestMutantLabelRefusals (labels.go checkLabel, CheckKeyLabel): each
// refusal says what is wrong, at the bounds.
func TestMutantLabelRefusals(t *testing.T) {
	refused := func(err error, want string) {
		t.Helper()
		require.Equal(t, Configuration, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), want)
	}
	refused(CheckKeyLabel(""), "key label: is required")
	refused(CheckTokenLabel(""), "token label: is required")
	require.NoError(t, CheckKeyLabel(strings.Repeat("k", maxKeyLabel)))
	refused(CheckKeyLabel(strings.Repeat("k", maxKeyLabel+1)), "key label: is 129 bytes long; use at most 128 bytes")
	require.NoError(t, CheckTokenLabel(strings.Repeat("t", maxTokenLabel)))
	refused(CheckTokenLabel(strings.Repeat("t", maxTokenLabel+1)), "token label: is 33 bytes long; use at most 32 bytes")
	refused(CheckKeyLabel("a\xffb"), "key label: is not valid UTF-8")
	// Not printable, but not a control character: refused in key labels
	// only.
	refused(CheckKeyLabel("ab\u200bc"), "key label: has the character U+200B at byte 2; use printable characters only")
	require.NoError(t, CheckTokenLabel("ab\u200bc"))
	refused(CheckKeyLabel("a\x00"), "has the character U+0000 at byte 1")
	refused(CheckTokenLabel("a\nb"), "token label: has the character U+000A at byte 1")
	require.True(t, notPrintable('\u00a0'))
	require.False(t, notPrintable('a'))
}

// TestMutantFormatWindow (limits.go formatWindow): whole hours as "2h",
// whole minutes as "15m", anything else as time.Duration writes it.
func TestMutantFormatWindow(t *testing.T) {
	for d, want := range map[time.Duration]string{
		time.Hour:                    "1h",
		2 * time.Hour:                "2h",
		24 * time.Hour:               "24h",
		90 * time.Minute:             "90m",
		15 * time.Minute:             "15m",
		time.Minute:                  "1m",
		time.Minute + time.Second:    "1m1s",
		59 * time.Second:             "59s",
		time.Hour + time.Millisecond: "1h0m0.001s",
		0:                            "0s",
	} {
		require.Equal(t, want, formatWindow(d), "%v", d)
	}
}

// plantRSAHalf imports one half of an RSA key pair under label.
func plantRSAHalf(t *testing.T, tok *Token, key *rsa.PrivateKey, class uint, label string) {
	t.Helper()
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, key.N.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(key.E)).Bytes()),
	}
	if class == pkcs11.CKO_PRIVATE_KEY {
		tmpl = append(tmpl,
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE_EXPONENT, key.D.Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_PRIME_1, key.Primes[0].Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_PRIME_2, key.Primes[1].Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_1, key.Precomputed.Dp.Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_2, key.Precomputed.Dq.Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_COEFFICIENT, key.Precomputed.Qinv.Bytes()),
		)
	}
	require.NoError(t, tok.do("plant RSA half", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		_, err := ctx.CreateObject(s, tmpl)
		return err
	}))
}

// TestMutantRSAHalfPair (sealkeys.go EnsureSealKeys, pub != priv): a token
// that holds one half of the RSA pair is refused, naming the half it holds,
// and no pair is generated over it, with generate set or not.
func TestMutantRSAHalfPair(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	for _, half := range []struct {
		class uint
		name  string
	}{{pkcs11.CKO_PUBLIC_KEY, "public key"}, {pkcs11.CKO_PRIVATE_KEY, "private key"}} {
		label := uniqueLabel("rsa-half")
		plantRSAHalf(t, tok, key, half.class, label)
		for _, generate := range []bool{false, true} {
			err := tok.EnsureSealKeys(SealKeys{Mechanism: RSAOAEP, Label: label}, generate)
			require.Equal(t, Configuration, KindOf(err), "%s, generate %t: %v", half.name, generate, err)
			require.Contains(t, err.Error(), "holds only the "+half.name+" of the RSA key pair labelled")
		}
		pub, priv, err := tok.hasKeyPair(label)
		require.NoError(t, err)
		require.Equal(t, half.class == pkcs11.CKO_PUBLIC_KEY, pub)
		require.Equal(t, half.class == pkcs11.CKO_PRIVATE_KEY, priv)
	}
}

// TestMutantSealCannotOpen (mechanisms.go Seal, KindOf(err) == Failed): a
// token whose AES-GCM blobs do not open again (it used an IV it did not
// write back) has Seal and CheckRoundTrip refuse with a Configuration error,
// not the Failed error of the open.
func TestMutantSealCannotOpen(t *testing.T) {
	shim, label := newShim(t)
	tok := openShim(t, shim, label, 0)
	k := SealKeys{Mechanism: AESGCM, Label: uniqueLabel("kek")}
	require.NoError(t, tok.EnsureSealKeys(k, true))
	require.NoError(t, tok.CheckRoundTrip(k, []byte("aad")))
	shim.Set(p11shim.IVHidden)
	blob, err := tok.Seal(k, []byte("secret"), []byte("aad"))
	require.Nil(t, blob)
	require.Equal(t, Configuration, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "the token cannot open what it sealed with aes-gcm")
	require.Contains(t, err.Error(), "nothing sealed with it is kept")
	err = tok.CheckRoundTrip(k, []byte("aad"))
	shim.Set()
	require.Equal(t, Configuration, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "the token cannot open what it sealed with aes-gcm")
	require.NoError(t, tok.CheckRoundTrip(k, []byte("aad")), "the token is fine again")
}

// TestMutantDataStagingDroppedAfterSet (data.go WriteData, err == nil after
// C_SetAttributeValue): on a token that lets CKA_VALUE of a data object
// change (openCryptoki's soft token; SoftHSM2 does not), the value is set
// in place, and a staging object left by an interrupted replacement is
// destroyed, so that it cannot come back as the value.
func TestMutantDataStagingDroppedAfterSet(t *testing.T) {
	ock := p11env.OpenCryptoki(t, "hst-ock-data", "24681357")
	t.Setenv(LibrariesEnv, ock.Library+":"+softhsmLib)
	tok, err := Open(Config{Library: ock.Library, TokenLabel: ock.Label, PIN: ock.PIN})
	require.NoError(t, err)
	t.Cleanup(tok.Close)
	label := uniqueLabel("in-place")
	staging := label + stagingSuffix

	require.NoError(t, tok.WriteData(label, []byte("old")))
	var main pkcs11.ObjectHandle
	require.NoError(t, tok.do("probe", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		hs, err := findData(ctx, s, label)
		require.NoError(t, err)
		require.Len(t, hs, 1)
		main = hs[0]
		// The token sets CKA_VALUE in place: what this test is about.
		return ctx.SetAttributeValue(s, main, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, []byte("set"))})
	}))
	requireData(t, tok, label, []byte("set"))

	plantData(t, tok, staging, []byte("stale staged value"))
	require.Equal(t, 1, countData(t, tok, staging))
	require.NoError(t, tok.WriteData(label, []byte("new")))
	requireData(t, tok, label, []byte("new"))
	require.Equal(t, 0, countData(t, tok, staging), "the stale staging object is destroyed")
	require.Equal(t, 1, countData(t, tok, label))
	require.NoError(t, tok.do("same object", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		hs, err := findData(ctx, s, label)
		require.Equal(t, []pkcs11.ObjectHandle{main}, hs, "set in place, not replaced")
		return err
	}))

	// With the object gone, the staging value would have been read.
	require.NoError(t, tok.DestroyData(label))
	_, found, err := tok.ReadData(label)
	require.NoError(t, err)
	require.False(t, found)
}

// A failed login counts for exactly the window: at the instant the refusal
// message names ("until ..."), the token is tried again.
func TestFailedLoginLeavesTheWindowAtItsEnd(t *testing.T) {
	defer SetFailedLoginLimit(1, time.Minute)()
	t0 := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	clock := t0
	loginClock = func() time.Time { return clock }
	defer func() { loginClock = time.Now }()
	key := loginKey{slot: 7, serial: "window"}
	failedLogin(key)
	clock = t0.Add(time.Minute - time.Nanosecond)
	err := checkLogin(key, "t")
	require.True(t, IsLoginLimited(err), "%v", err)
	require.Contains(t, err.Error(), "until 12:01:00 UTC")
	clock = t0.Add(time.Minute)
	require.NoError(t, checkLogin(key, "t"))
}

// With the bound removed, failures are not kept: a process that tries a
// wrong PIN in a loop does not grow a list of times.
func TestNoLoginBoundKeepsNoFailures(t *testing.T) {
	defer SetFailedLoginLimit(0, time.Minute)()
	key := loginKey{slot: 8, serial: "unbounded"}
	for range 5 {
		failedLogin(key)
		require.NoError(t, checkLogin(key, "t"))
	}
	failedLogins.Lock()
	defer failedLogins.Unlock()
	require.Empty(t, failedLogins.at)
}

// Every label of a seal key set is checked, not only the first.
func TestSealKeysCheckEveryLabel(t *testing.T) {
	require.NoError(t, SealKeys{Mechanism: AESCBCHMAC, Label: "kek", HMACLabel: "mac"}.checkLabels())
	require.Error(t, SealKeys{Mechanism: AESCBCHMAC, Label: "kek", HMACLabel: ""}.checkLabels())
	require.Error(t, SealKeys{Mechanism: AESCBCHMAC, Label: "", HMACLabel: "mac"}.checkLabels())
}

// The aes-kwp body opens at every plaintext length, with RFC 5649's zero
// padding (up to 7 bytes) that some tokens leave on, and not with 8 bytes
// of it, a non-zero byte of it, a length beyond the body, or another AAD.
func TestKWPBodyBounds(t *testing.T) {
	aad := []byte("seal/keyring")
	for n := range 20 {
		pt := bytes.Repeat([]byte{0xa5}, n)
		body, err := kwpBody(pt, aad)
		require.NoError(t, err)
		for pad := range 8 {
			got, ok := kwpPlaintext(append(bytes.Clone(body), make([]byte, pad)...), aad)
			require.True(t, ok, "length %d, padding %d", n, pad)
			require.Equal(t, pt, got)
		}
		_, ok := kwpPlaintext(append(bytes.Clone(body), make([]byte, 8)...), aad)
		require.False(t, ok, "length %d: 8 bytes of padding are not RFC 5649's", n)
		_, ok = kwpPlaintext(append(bytes.Clone(body), 0, 1), aad)
		require.False(t, ok, "length %d: padding that is not zero", n)
		_, ok = kwpPlaintext(body, []byte("seal/other"))
		require.False(t, ok, "length %d: another AAD", n)
		if n > 0 {
			_, ok = kwpPlaintext(body[:len(body)-1], aad)
			require.False(t, ok, "length %d: a body one byte short of its length", n)
		}
	}
}
