package hsm

// Tests written against mutants that lived (gremlins, the run on e2c2857):
// in mechanisms.go the blob formats' exact length bounds, the key-wrap
// mechanism chosen per module generation, which token answers are a blob
// that does not authenticate and the RSA-OAEP hash fallback; in module.go,
// ops.go, sealkeys.go and token.go the library loaded once, the slot's
// login forgotten with its last session, the spacing of rescans, failed key
// generations, the IVs remembered, destroying every key of a label, a slot
// that cannot be read, which operations run again, the handle cache, and
// finding more than one batch of objects. The
// token answers SoftHSM2 does not give come from the shim
// (internal/p11shim).

import (
	"bytes"
	"crypto/aes"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/p11shim"
)

// notAuthentic is the start of the message of errNotAuthentic.
const notAuthentic = "the sealed data or its associated data do not authenticate"

// An aes-kwp blob is a variant byte and an RFC 5649 wrap, whose shortest
// output is 16 bytes: a blob of 1+16 bytes is read (its variant checked, the
// wrap handed to the token), one of 1+15 bytes is refused as too short
// before anything else is looked at.
func TestKWPBlobOfTheShortestWrapIsRead(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	k := sealKeysFor(AESKWP)
	require.NoError(t, tok.EnsureSealKeys(k, true))
	aad := []byte("aad")

	// An unknown variant is only found in a blob long enough to be read.
	_, err := tok.openKWP(k.Label, append([]byte{9}, make([]byte, 16)...), aad)
	require.Equal(t, Failed, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "unknown variant 9")
	_, err = tok.openKWP(k.Label, append([]byte{9}, make([]byte, 15)...), aad)
	require.Equal(t, Failed, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "too short")
	require.NotContains(t, err.Error(), "unknown variant")

	// A known variant (1, SoftHSM2's CKM_AES_KEY_WRAP_PAD) with 16 bytes
	// of wrap reaches the token, which refuses to unwrap it (the integrity
	// check fails); with 15 it does not.
	v := kwpVariant[ckmAESKeyWrapPad]
	_, err = tok.openKWP(k.Label, append([]byte{v}, bytes.Repeat([]byte{0xa6}, 16)...), aad)
	require.Equal(t, Failed, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), notAuthentic)
	require.NotContains(t, err.Error(), "too short")
	_, err = tok.openKWP(k.Label, append([]byte{v}, bytes.Repeat([]byte{0xa6}, 15)...), aad)
	require.Equal(t, Failed, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "too short")
}

// An aes-cbc-hmac blob is a 16-byte IV, a CBC ciphertext with padding (one
// block at least, whole blocks) and a 32-byte tag: exactly the lengths
// 64, 80, 96, ... are handed to the token, every other length is refused as
// malformed; and the shortest blob, that of an empty plaintext, is 64 bytes
// and opens.
func TestCBCHMACBlobLengthsAreExact(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	k := sealKeysFor(AESCBCHMAC)
	require.NoError(t, tok.EnsureSealKeys(k, true))
	aad := []byte("aad")

	blob, err := tok.Seal(k, nil, aad)
	require.NoError(t, err)
	require.Len(t, blob, cbcIVSize+aes.BlockSize+hmacTagSize)
	got, err := tok.openCBCHMAC(k, blob, aad)
	require.NoError(t, err)
	require.Empty(t, got)

	// The HMAC input holds the AAD whole, however long, and none.
	for _, a := range [][]byte{nil, bytes.Repeat([]byte("a"), 4096)} {
		blob, err := tok.Seal(k, []byte("x"), a)
		require.NoError(t, err, "%d bytes of AAD", len(a))
		_, err = tok.openCBCHMAC(k, blob, append(bytes.Clone(a), 'b'))
		require.Equal(t, Failed, KindOf(err), "%d bytes of AAD, one more: %v", len(a), err)
	}

	for n := 0; n <= 2*cbcIVSize+3*aes.BlockSize+hmacTagSize; n++ {
		_, err := tok.openCBCHMAC(k, bytes.Repeat([]byte{0x5c}, n), aad)
		require.Equal(t, Failed, KindOf(err), "%d bytes: %v", n, err)
		wellFormed := n >= 64 && n%16 == 0
		if wellFormed {
			require.Contains(t, err.Error(), notAuthentic, "%d bytes", n)
			require.NotContains(t, err.Error(), "malformed", "%d bytes", n)
		} else {
			require.Contains(t, err.Error(), "malformed", "%d bytes", n)
		}
	}
}

// A wrong tag that the token reports as CKR_SIGNATURE_INVALID (SoftHSM2)
// or CKR_SIGNATURE_LEN_RANGE (some tokens) is a blob that does not
// authenticate (Failed, said so); a token that fails C_Verify otherwise is
// not a forged blob but a token failing (Unavailable), and the blob opens
// once the token works again.
func TestCBCHMACVerifyAnswersClassified(t *testing.T) {
	shim, label := newShim(t)
	tok := openShim(t, shim, label, 0)
	k := sealKeysFor(AESCBCHMAC)
	require.NoError(t, tok.EnsureSealKeys(k, true))
	aad := []byte("aad")
	blob, err := tok.Seal(k, []byte("secret"), aad)
	require.NoError(t, err)
	bad := bytes.Clone(blob)
	bad[len(bad)-1] ^= 1

	for _, words := range [][]string{nil, {p11shim.SigLenRange}} {
		shim.Set(words...)
		_, err = tok.Open(k, bad, aad)
		require.Equal(t, Failed, KindOf(err), "%q: %v", words, err)
		require.Contains(t, err.Error(), notAuthentic, "%q", words)
		got, err := tok.Open(k, blob, aad)
		require.NoError(t, err, "%q", words)
		require.Equal(t, "secret", string(got))
	}

	shim.Set(p11shim.VerifyFailed)
	for _, b := range [][]byte{blob, bad} {
		_, err = tok.Open(k, b, aad)
		require.Equal(t, Unavailable, KindOf(err), "%v", err)
		require.NotContains(t, err.Error(), notAuthentic)
		require.Contains(t, err.Error(), "CKR_FUNCTION_FAILED")
	}
	shim.Set()
	got, err := tok.Open(k, blob, aad)
	require.NoError(t, err)
	require.Equal(t, "secret", string(got))
}

// A token that refuses RSA-OAEP with SHA-256, SHA-512 and SHA-384 as
// CKR_MECHANISM_PARAM_INVALID, or as CKR_ARGUMENTS_BAD (SoftHSM2 2.6), gets
// the next hash, down to SHA-1: the blob records SHA-1 (4) and opens. The
// blob relabelled with a hash the token refuses is not authentic (Failed,
// and said so), whichever way the token refuses it.
func TestOAEPFallsBackToSHA1OnRefusedHashes(t *testing.T) {
	shim, label := newShim(t)
	tok := openShim(t, shim, label, 0)
	k := sealKeysFor(RSAOAEP)
	require.NoError(t, tok.EnsureSealKeys(k, true))
	aad := []byte("aad")
	for _, words := range [][]string{nil, {p11shim.OAEPParamInvalid}} {
		shim.Set(words...)
		blob, err := tok.Seal(k, []byte("secret"), aad)
		require.NoError(t, err, "%q", words)
		require.Equal(t, byte(4), blob[0], "%q: SHA-1", words)
		got, err := tok.Open(k, blob, aad)
		require.NoError(t, err, "%q", words)
		require.Equal(t, "secret", string(got))
		for _, h := range oaepHashes {
			if h.id == blob[0] {
				continue
			}
			got, err := tok.Open(k, append([]byte{h.id}, blob[1:]...), aad)
			require.Equal(t, Failed, KindOf(err), "%q, relabelled with hash %d: %v", words, h.id, err)
			require.Contains(t, err.Error(), "do not authenticate", "%q: the refusal is named as the blob's", words)
			require.Nil(t, got)
		}
	}
	shim.Set()
}

// The key-wrap mechanism of aes-kwp is asked of the token once per module
// generation: a token listing CKM_AES_KEY_WRAP_KWP for wrap and unwrap gets
// it (variant 2), one whose KWP cannot unwrap gets CKM_AES_KEY_WRAP_PAD
// (variant 1); within one generation the first answer is kept, even if
// the token would now answer otherwise.
func TestKWPMechanismChosenOncePerGeneration(t *testing.T) {
	shim, label := newShim(t)
	shim.Set(p11shim.KWP)
	tok := openShim(t, shim, label, 0)
	k := sealKeysFor(AESKWP)
	require.NoError(t, tok.EnsureSealKeys(k, true))
	aad := []byte("aad")

	blob, err := tok.Seal(k, []byte("secret"), aad)
	require.NoError(t, err)
	require.Equal(t, kwpVariant[ckmAESKeyWrapKWP], blob[0], "KWP, listed for wrap and unwrap")

	shim.Set(p11shim.KWPWrapOnly)
	again, err := tok.Seal(k, []byte("secret"), aad)
	require.NoError(t, err)
	require.Equal(t, kwpVariant[ckmAESKeyWrapKWP], again[0], "the answer of this generation is kept")
	for _, b := range [][]byte{blob, again} {
		got, err := tok.Open(k, b, aad)
		require.NoError(t, err)
		require.Equal(t, "secret", string(got))
	}
}

// A token that lists CKM_AES_KEY_WRAP_KWP without CKF_UNWRAP has aes-kwp
// seal with CKM_AES_KEY_WRAP_PAD (variant 1): what KWP wraps it could not
// unwrap.
func TestKWPThatCannotUnwrapIsNotChosen(t *testing.T) {
	shim, label := newShim(t)
	shim.Set(p11shim.KWPWrapOnly)
	tok := openShim(t, shim, label, 0)
	k := sealKeysFor(AESKWP)
	require.NoError(t, tok.EnsureSealKeys(k, true))
	blob, err := tok.Seal(k, []byte("secret"), []byte("aad"))
	require.NoError(t, err)
	require.Equal(t, kwpVariant[ckmAESKeyWrapPad], blob[0])
}

// After the module is initialised again (a device error and recovery: the
// token may be another one of a cluster, or have new firmware), the
// key-wrap mechanism is asked again, not taken from the generation before.
func TestKWPMechanismAskedAgainInANewGeneration(t *testing.T) {
	prev := minRescanInterval
	minRescanInterval = 200 * time.Millisecond
	defer func() { minRescanInterval = prev }()
	shim, label := newShim(t)
	shim.Set(p11shim.KWP)
	tok := openShim(t, shim, label, 2*time.Second)
	k := sealKeysFor(AESKWP)
	require.NoError(t, tok.EnsureSealKeys(k, true))
	aad := []byte("aad")
	blob, err := tok.Seal(k, []byte("secret"), aad)
	require.NoError(t, err)
	require.Equal(t, kwpVariant[ckmAESKeyWrapKWP], blob[0])
	tok.conn.mu.Lock()
	gen := tok.conn.gen
	tok.conn.mu.Unlock()

	shim.Set(p11shim.DeviceError)
	_, err = tok.Seal(k, []byte("secret"), aad)
	require.Equal(t, Unavailable, KindOf(err), "%v", err)
	shim.Set(p11shim.KWPWrapOnly)
	require.Eventually(t, func() bool {
		_, err := tok.Open(k, blob, aad)
		return err == nil
	}, 10*time.Second, 50*time.Millisecond)
	tok.conn.mu.Lock()
	require.NotEqual(t, gen, tok.conn.gen, "a new generation")
	tok.conn.mu.Unlock()

	again, err := tok.Seal(k, []byte("secret"), aad)
	require.NoError(t, err)
	require.Equal(t, kwpVariant[ckmAESKeyWrapPad], again[0], "asked again: KWP cannot unwrap now")
	got, err := tok.Open(k, again, aad)
	require.NoError(t, err)
	require.Equal(t, "secret", string(got))
}

// An rsa-oaep blob is a hash byte, the wrapped key's length n (2 bytes), the
// wrapped key, a 12-byte nonce and a 16-byte tag: a blob of exactly
// 3+n+12+16 bytes is read (its hash checked, the key handed to the token),
// one byte less is refused as too short before anything else is looked at,
// for n = 0 (the shortest blob) as for larger n.
func TestOAEPBlobBoundsAreExact(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	k := sealKeysFor(RSAOAEP)
	require.NoError(t, tok.EnsureSealKeys(k, true))
	aad := []byte("aad")
	blobOf := func(id byte, n, size int) []byte {
		b := append([]byte{id}, byte(n>>8), byte(n))
		return append(b, bytes.Repeat([]byte{0x3c}, size-3)...)
	}
	for _, n := range []int{0, 1, 384, 0xffff} {
		min := 3 + n + 12 + 16
		_, err := tok.openOAEP(k.Label, blobOf(9, n, min), aad)
		require.Equal(t, Failed, KindOf(err), "n %d: %v", n, err)
		require.Contains(t, err.Error(), "unknown hash 9", "n %d", n)
		_, err = tok.openOAEP(k.Label, blobOf(9, n, min-1), aad)
		require.Equal(t, Failed, KindOf(err), "n %d: %v", n, err)
		require.Contains(t, err.Error(), "too short", "n %d", n)

		// With a known hash (SHA-1, which SoftHSM2 2.6 takes), the token
		// is asked to unwrap and refuses.
		_, err = tok.openOAEP(k.Label, blobOf(4, n, min), aad)
		require.Equal(t, Failed, KindOf(err), "n %d: %v", n, err)
		require.Contains(t, err.Error(), notAuthentic, "n %d", n)
		require.NotContains(t, err.Error(), "too short", "n %d", n)
	}
	for size := range 3 + 12 + 16 {
		_, err := tok.openOAEP(k.Label, bytes.Repeat([]byte{0}, size), aad)
		require.Equal(t, Failed, KindOf(err), "%d bytes: %v", size, err)
		require.Contains(t, err.Error(), "too short", "%d bytes", size)
	}
}

// CheckRoundTrip with keys that are not there fails as Seal does (the key
// is not found), not as a token that cannot open what it sealed.
func TestRoundTripOfMissingKeysIsNotFound(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	for _, m := range SealMechanisms {
		err := tok.CheckRoundTrip(sealKeysFor(m), []byte("aad"))
		require.Equal(t, NotFound, KindOf(err), "%s: %v", m, err)
		require.NotContains(t, err.Error(), "cannot open what it sealed", "%s", m)
	}
}

// A PKCS#11 library is loaded once per file and process: loading it again
// gives the same context; a file that is not a library is not remembered
// (it may be replaced by one).
func TestLibraryLoadedOncePerFile(t *testing.T) {
	id, err := identify(softhsmLib)
	require.NoError(t, err)
	first := loadLibrary(id, softhsmLib)
	require.NotNil(t, first)
	require.Same(t, first, loadLibrary(id, softhsmLib))

	junk := t.TempDir() + "/libjunk.so"
	require.NoError(t, os.WriteFile(junk, []byte("not a library"), 0o600))
	jid, err := identify(junk)
	require.NoError(t, err)
	require.Nil(t, loadLibrary(jid, junk))
	loaded.Lock()
	_, remembered := loaded.byFile[jid]
	loaded.Unlock()
	require.False(t, remembered)
}

// Closing a token's last session logs the process out of it (PKCS#11): the
// package forgets that slot's login then, so a handle opened afterwards
// with another PIN has that PIN tried by the token (and refused as
// incorrect), not refused unasked as another PIN of a login that is over;
// the right PIN logs in again.
func TestLoginForgottenWithTheSlotsLastSession(t *testing.T) {
	keep := openToken(t, newTestToken(t), testPIN) // keeps the module loaded
	label := newTestToken(t)
	first := openToken(t, label, testPIN)
	require.Same(t, keep.conn.mod, first.conn.mod)
	has, err := first.HasKey("none")
	require.NoError(t, err)
	require.False(t, has)
	first.Close()

	wrong := openToken(t, label, "87654321")
	_, err = wrong.HasKey("none")
	require.Equal(t, Credentials, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "PIN refused by token")
	require.Contains(t, err.Error(), "CKR_PIN_INCORRECT")

	again := openToken(t, label, testPIN)
	_, err = again.HasKey("none")
	require.NoError(t, err)
}

// Finalisations for a rescan are spaced: minRescanInterval after one that a
// successful operation followed, then twice the spacing before with each
// one that nothing succeeded after, up to maxRescanInterval; a finalisation
// is allowed at the very instant the spacing ends.
func TestRescanSpacingDoublesUntilSuccess(t *testing.T) {
	prevMin, prevMax, prevClock := minRescanInterval, maxRescanInterval, rescanClock
	minRescanInterval, maxRescanInterval = time.Second, 4*time.Second
	t0 := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	clock := t0
	rescanClock = func() time.Time { return clock }
	defer func() { minRescanInterval, maxRescanInterval, rescanClock = prevMin, prevMax, prevClock }()

	shim, label := newShim(t)
	tok := openShim(t, shim, label, 0)
	_, err := tok.HasKey("none") // a success
	require.NoError(t, err)
	m := tok.conn.mod
	gen := func() uint64 {
		m.calls.RLock()
		defer m.calls.RUnlock()
		return m.generation
	}
	reinit := func() { require.NoError(t, m.initialize()) } // nothing succeeds

	require.True(t, m.reset(gen()), "the first one")
	last := t0
	for _, spacing := range []time.Duration{2 * time.Second, 4 * time.Second, 4 * time.Second} {
		reinit()
		clock = last.Add(spacing - time.Nanosecond)
		require.False(t, m.reset(gen()), "%s after the last, nothing succeeded: the spacing is %s", spacing-time.Nanosecond, spacing)
		clock = last.Add(spacing)
		require.True(t, m.reset(gen()), "%s after the last", spacing)
		last = clock
	}

	// A success brings the spacing back to minRescanInterval.
	reinit()
	m.succeeded.Store(true)
	clock = last.Add(time.Second - time.Nanosecond)
	require.False(t, m.reset(gen()))
	clock = last.Add(time.Second)
	require.True(t, m.reset(gen()), "a success since the last")

	// The token works after all this.
	_, err = tok.HasKey("none")
	require.NoError(t, err)
}

// A token that cannot make the key (no room left) has GenerateKey fail with
// its answer, and no key is there; when it can, the new key's handle is
// remembered for the generation, so that its first use need not search.
func TestGenerateKeyFailureIsReported(t *testing.T) {
	shim, label := newShim(t)
	tok := openShim(t, shim, label, 0)
	kek := uniqueLabel("kek")
	shim.Set(p11shim.KeygenFull)
	err := tok.GenerateKey(kek)
	require.Equal(t, Unavailable, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "CKR_DEVICE_MEMORY")
	shim.Set()
	has, err := tok.HasKey(kek)
	require.NoError(t, err)
	require.False(t, has)

	require.NoError(t, tok.GenerateKey(kek))
	tok.conn.mu.Lock()
	_, remembered := tok.conn.handles[kek]
	tok.conn.mu.Unlock()
	require.True(t, remembered)
	sealed, err := tok.EncryptGCM(kek, []byte("x"), nil)
	require.NoError(t, err)
	got, err := tok.DecryptGCM(kek, sealed, nil)
	require.NoError(t, err)
	require.Equal(t, "x", string(got))
}

// EnsureSealKeys on a token that cannot make the HMAC key of aes-cbc-hmac
// (its AES key is there) or the RSA key pair of rsa-oaep fails with the
// token's answer, not with what checking the keys that are not there would
// say; nothing is left behind.
func TestSealKeyGenerationFailureIsReported(t *testing.T) {
	shim, label := newShim(t)
	tok := openShim(t, shim, label, 0)
	cbc := sealKeysFor(AESCBCHMAC)
	require.NoError(t, tok.GenerateKey(cbc.Label))
	oaep := sealKeysFor(RSAOAEP)
	shim.Set(p11shim.KeygenFull)
	for _, k := range []SealKeys{cbc, oaep} {
		err := tok.EnsureSealKeys(k, true)
		require.Equal(t, Unavailable, KindOf(err), "%s: %v", k.Mechanism, err)
		require.Contains(t, err.Error(), "CKR_DEVICE_MEMORY", "%s", k.Mechanism)
	}
	shim.Set()
	has, err := tok.HasKey(cbc.HMACLabel)
	require.NoError(t, err)
	require.False(t, has)
	pub, priv, err := tok.hasKeyPair(oaep.Label)
	require.NoError(t, err)
	require.False(t, pub || priv)
	for _, k := range []SealKeys{cbc, oaep} {
		require.NoError(t, tok.EnsureSealKeys(k, true), "%s", k.Mechanism)
		require.NoError(t, tok.CheckRoundTrip(k, []byte("aad")), "%s", k.Mechanism)
	}
}

// The connection remembers exactly the last recentIVLimit AES-GCM IVs: the
// oldest is forgotten when one more comes, and not before.
func TestRecentIVsAreTheLastLimit(t *testing.T) {
	c := &connection{}
	iv := func(i int) []byte {
		b := make([]byte, GCMNonceSize)
		b[0], b[1], b[2] = 1, byte(i>>8), byte(i)
		return b
	}
	for i := range recentIVLimit {
		require.NoError(t, c.rememberIV(iv(i)))
	}
	require.Error(t, c.rememberIV(iv(0)), "the oldest of %d is remembered", recentIVLimit)
	require.NoError(t, c.rememberIV(iv(recentIVLimit)))
	require.Error(t, c.rememberIV(iv(1)), "the second oldest is remembered still")
	require.NoError(t, c.rememberIV(iv(0)), "the oldest is forgotten")
	require.Len(t, c.recentIVs, recentIVLimit)
	require.Len(t, c.recentIVOrder, recentIVLimit)
}

// AES-GCM of an empty plaintext is the 12-byte IV and the 16-byte tag: 28
// bytes open (to nothing); 27 are refused as too short.
func TestGCMOfNothingOpens(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	kek := uniqueLabel("kek")
	require.NoError(t, tok.GenerateKey(kek))
	sealed, err := tok.EncryptGCM(kek, nil, []byte("aad"))
	require.NoError(t, err)
	require.Len(t, sealed, GCMNonceSize+GCMTagSize)
	got, err := tok.DecryptGCM(kek, sealed, []byte("aad"))
	require.NoError(t, err)
	require.Empty(t, got)
	_, err = tok.DecryptGCM(kek, sealed[:len(sealed)-1], []byte("aad"))
	require.Equal(t, Failed, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "too short")
}

// DestroyKey destroys every secret key with the label, not only the first
// (another application may have made one under the same label).
func TestDestroyKeyDestroysEveryKeyOfTheLabel(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	label := uniqueLabel("twice")
	for i := range 3 {
		attackImportSecret(t, tok, label, pkcs11.CKK_AES, bytes.Repeat([]byte{byte(i + 1)}, 32), pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT)
	}
	count := func() int {
		var n int
		require.NoError(t, tok.do("count", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
			hs, err := findSecretKeys(ctx, s, label)
			n = len(hs)
			return err
		}))
		return n
	}
	require.Equal(t, 3, count())
	require.NoError(t, tok.DestroyKey(label))
	require.Equal(t, 0, count())
	require.Equal(t, NotFound, KindOf(tok.DestroyKey(label)))
}

// A token configured by slot that the library cannot read (a device error)
// is unavailable but not reported as absent: only CKR_SLOT_ID_INVALID,
// CKR_TOKEN_NOT_PRESENT and CKR_TOKEN_NOT_RECOGNIZED say there is no token
// in the slot.
func TestSlotThatCannotBeReadIsNotAbsent(t *testing.T) {
	shim, label := newShim(t)
	byLabel := openShim(t, shim, label, 0)
	_, err := byLabel.HasKey("none")
	require.NoError(t, err)
	byLabel.conn.mu.Lock()
	slot := byLabel.conn.slot
	byLabel.conn.mu.Unlock()

	tok, err := Open(Config{Library: shim.Library, Slot: &slot, PIN: testPIN, CallTimeout: 2 * time.Second})
	require.NoError(t, err)
	t.Cleanup(func() {
		shim.Set()
		tok.Close()
	})
	shim.Set(p11shim.DeviceError)
	_, err = tok.HasKey("none")
	require.Equal(t, Unavailable, KindOf(err), "%v", err)
	require.False(t, IsTokenNotFound(err), "%v", err)
	require.Contains(t, err.Error(), fmt.Sprintf("reading the token in slot %d", slot))

	// A slot that does not exist is absent.
	other := slot + 1000
	shim.Set()
	gone, err := Open(Config{Library: shim.Library, Slot: &other, PIN: testPIN})
	require.NoError(t, err)
	t.Cleanup(gone.Close)
	_, err = gone.HasKey("none")
	require.True(t, IsTokenNotFound(err), "%v", err)
}

// An operation whose session fails in a way that voids the connection
// (CKR_SESSION_HANDLE_INVALID) is run once more when it may be repeated,
// and only once when it may not (key generation: the first run may have
// made the key).
func TestOnlyRepeatableOperationsRunAgain(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	for _, retry := range []bool{false, true} {
		runs := 0
		err := tok.do("op", retry, func(*pkcs11.Ctx, pkcs11.SessionHandle, uint64) error {
			runs++
			return pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID)
		})
		require.Error(t, err)
		want := 1
		if retry {
			want = 2
		}
		require.Equal(t, want, runs, "retry %t", retry)
	}
	_, err := tok.HasKey("none")
	require.NoError(t, err)
}

// A successful operation marks the module as working (which brings the
// rescan spacing back to its least); a failed one does not.
func TestOnlySuccessMarksTheModuleWorking(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	m := tok.conn.mod
	m.succeeded.Store(false)
	err := tok.do("op", true, func(*pkcs11.Ctx, pkcs11.SessionHandle, uint64) error {
		return pkcs11.Error(pkcs11.CKR_DATA_INVALID)
	})
	require.Equal(t, Failed, KindOf(err), "%v", err)
	require.False(t, m.succeeded.Load())
	require.NoError(t, tok.do("op", true, func(*pkcs11.Ctx, pkcs11.SessionHandle, uint64) error { return nil }))
	require.True(t, m.succeeded.Load())
}

// findObjects returns every match, however many batches of 100 they take:
// 99, exactly 100, 101, 200 and 250.
func TestFindObjectsReturnsEveryBatch(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	require.NoError(t, tok.do("find many", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		for _, n := range []int{99, 100, 101, 200, 250} {
			label := uniqueLabel("many")
			tmpl := []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			}
			var made []pkcs11.ObjectHandle
			for range n {
				h, err := ctx.CreateObject(s, tmpl)
				require.NoError(t, err)
				made = append(made, h)
			}
			found, err := findObjects(ctx, s, tmpl)
			require.NoError(t, err)
			require.ElementsMatch(t, made, found, "%d objects", n)
			for _, h := range made {
				require.NoError(t, ctx.DestroyObject(s, h))
			}
		}
		return nil
	}))
}

// keyHandle's cache of key-pair halves is used within the generation its
// entries belong to, and not for a caller of another generation.
func TestKeyHandleCacheIsPerGeneration(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	k := sealKeysFor(RSAOAEP)
	require.NoError(t, tok.EnsureSealKeys(k, true))
	require.NoError(t, tok.do("key handle", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		c := tok.conn
		searched, err := c.keyHandle(ctx, s, gen, pkcs11.CKO_PUBLIC_KEY, k.Label)
		require.NoError(t, err)
		const sentinel = pkcs11.ObjectHandle(0x7fff_fff0)
		require.NotEqual(t, sentinel, searched)
		c.mu.Lock()
		c.handles[fmt.Sprintf("\x00%d\x00%s", pkcs11.CKO_PUBLIC_KEY, k.Label)] = sentinel
		c.mu.Unlock()
		h, err := c.keyHandle(ctx, s, gen, pkcs11.CKO_PUBLIC_KEY, k.Label)
		require.NoError(t, err)
		require.Equal(t, sentinel, h, "the cached entry, within its generation")
		h, err = c.keyHandle(ctx, s, gen+1, pkcs11.CKO_PUBLIC_KEY, k.Label)
		require.NoError(t, err)
		require.Equal(t, searched, h, "searched again for another generation")
		c.mu.Lock()
		delete(c.handles, fmt.Sprintf("\x00%d\x00%s", pkcs11.CKO_PUBLIC_KEY, k.Label))
		c.mu.Unlock()
		return nil
	}))
}
