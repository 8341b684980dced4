package hsm

// Attacks on the seal mechanisms (mechanisms.go, sealkeys.go), the deadline
// code (token.go doWithin) and what the seal's unsealWith (internal/mountseal) does with
// labels read from plaintext storage. Each test PERFORMS an attack and fails
// when the attack succeeds. Those marked "failed before the fix" succeeded
// against the code as first written; each names what stops it now.

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/p11shim"
)

// attackImportSecret puts a token secret key with a value the caller knows into
// the token: what another application sharing the partition does with a
// transport key, a key-ceremony component or a JWT HMAC secret. Sensitive
// and not extractable now, but never CKA_ALWAYS_SENSITIVE: its value is
// known outside the token.
func attackImportSecret(t *testing.T, tok *Token, label string, keyType uint, value []byte, usage ...uint) {
	t.Helper()
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, value),
	}
	for _, u := range usage {
		tmpl = append(tmpl, pkcs11.NewAttribute(u, true))
	}
	require.NoError(t, tok.do("import test key", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		_, err := ctx.CreateObject(s, tmpl)
		return err
	}))
}

// attackWrapKWP is RFC 5649 (AES key wrap with padding) in software.
func attackWrapKWP(kek, p []byte) []byte {
	block, err := aes.NewCipher(kek)
	if err != nil {
		panic(err)
	}
	aiv := make([]byte, 8)
	copy(aiv, []byte{0xA6, 0x59, 0x59, 0xA6})
	binary.BigEndian.PutUint32(aiv[4:], uint32(len(p)))
	padded := append(append([]byte{}, p...), make([]byte, (8-len(p)%8)%8)...)
	n := len(padded) / 8
	if n == 1 {
		out := make([]byte, 16)
		block.Encrypt(out, append(aiv, padded...))
		return out
	}
	a := aiv
	r := make([][]byte, n)
	for i := range r {
		r[i] = append([]byte{}, padded[8*i:8*i+8]...)
	}
	b := make([]byte, 16)
	for j := 0; j < 6; j++ {
		for i := 0; i < n; i++ {
			block.Encrypt(b, append(append([]byte{}, a...), r[i]...))
			tv := uint64(n*j + i + 1)
			a = make([]byte, 8)
			binary.BigEndian.PutUint64(a, binary.BigEndian.Uint64(b[:8])^tv)
			r[i] = append([]byte{}, b[8:]...)
		}
	}
	out := append([]byte{}, a...)
	for _, x := range r {
		out = append(out, x...)
	}
	return out
}

func attackRand(n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return b
}

// TestAttackA_UnsealUsesUncheckedKeysFromStorage — failed before the fix
// (Token.Open now checks the keys, CheckSealKeys, for every mechanism).
//
// Attacker A (reads and writes the mount's storage; no PIN, no token
// access). sealed_with, sealed_hmac and sealed_mechanism are plaintext in
// config/seal. The seal's unsealWith (internal/mountseal/manager.go) checks
// them only against the HSM-resident namespace, and calls CheckSealKeys for
// rsa-oaep only, then tok.Open(keys, sealed_keyring, aad). Open does no check
// of its own. So the attacker names any token key whose value is known
// outside the token (imported by another application on the partition;
// config/seal would refuse it: CKA_ALWAYS_SENSITIVE=false), seals a keyring
// of their choosing to it in software with the mount's AAD (the mount UUID
// is no secret), and the plugin unseals it: every key and secret written to
// the mount afterwards is encrypted under a root key the attacker holds.
// The new mechanisms widen the keys that serve: aes-kwp takes any known
// AES *unwrap* key (a transport key), aes-cbc-hmac any known AES decrypt key
// plus any known HMAC secret with CKA_VERIFY.
func TestAttackA_UnsealUsesUncheckedKeysFromStorage(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	aad := []byte("hsm-transit/root-keyring\x00" + "0b4d1c2e-victim-mount-uuid")
	planted := []byte("the attacker's root keyring, marshalled")

	aesKey := attackRand(32)
	aesLabel := uniqueLabel("imported-aes")
	attackImportSecret(t, tok, aesLabel, pkcs11.CKK_AES, aesKey, pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT)
	wrapKey := attackRand(32)
	wrapLabel := uniqueLabel("imported-transport")
	attackImportSecret(t, tok, wrapLabel, pkcs11.CKK_AES, wrapKey, pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP)
	macKey := attackRand(32)
	macLabel := uniqueLabel("imported-jwt-hmac")
	attackImportSecret(t, tok, macLabel, pkcs11.CKK_GENERIC_SECRET, macKey, pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY)

	forge := map[SealMechanism]func() (SealKeys, []byte){
		AESGCM: func() (SealKeys, []byte) {
			block, _ := aes.NewCipher(aesKey)
			g, _ := cipher.NewGCM(block)
			nonce := attackRand(GCMNonceSize)
			return SealKeys{Mechanism: AESGCM, Label: aesLabel}, g.Seal(nonce, nonce, planted, aad)
		},
		AESKWP: func() (SealKeys, []byte) {
			body, err := kwpBody(planted, aad)
			require.NoError(t, err)
			return SealKeys{Mechanism: AESKWP, Label: wrapLabel}, append([]byte{kwpVariant[ckmAESKeyWrapPad]}, attackWrapKWP(wrapKey, body)...)
		},
		AESCBCHMAC: func() (SealKeys, []byte) {
			block, _ := aes.NewCipher(aesKey)
			iv := attackRand(cbcIVSize)
			pad := aes.BlockSize - len(planted)%aes.BlockSize
			pt := append(append([]byte{}, planted...), bytes.Repeat([]byte{byte(pad)}, pad)...)
			ct := make([]byte, len(pt))
			cipher.NewCBCEncrypter(block, iv).CryptBlocks(ct, pt)
			mac := hmac.New(sha256.New, macKey)
			mac.Write(cbcMACInput(aad, iv, ct))
			return SealKeys{Mechanism: AESCBCHMAC, Label: aesLabel, HMACLabel: macLabel}, append(append(iv, ct...), mac.Sum(nil)...)
		},
	}
	for _, m := range []SealMechanism{AESGCM, AESKWP, AESCBCHMAC} {
		t.Run(string(m), func(t *testing.T) {
			keys, blob := forge[m]()
			// Sanity: config/seal (EnsureSealKeys → CheckSealKeys) refuses
			// these keys, as it should.
			require.Equal(t, Configuration, KindOf(tok.CheckSealKeys(keys)), "config/seal refuses a key whose value is known")
			// The attack: the plugin opens the attacker's blob with the
			// keys that storage names.
			got, err := tok.Open(keys, blob, aad)
			if err == nil {
				t.Errorf("ATTACK SUCCEEDS (%s): a keyring sealed in software under a token key of known value (%s) opens as the mount's root keyring: %q. unsealWith (internal/mountseal/manager.go) checks key attributes for rsa-oaep only; CheckSealKeys must run for every mechanism before Open at unseal", m, keys.Labels(), got)
			}
			// Refused for the keys, as CheckSealKeys refuses them, not
			// for the blob: nothing was decrypted with them.
			require.Nil(t, got)
			require.Equal(t, Configuration, KindOf(err), "%v", err)
			require.EqualError(t, err, tok.CheckSealKeys(keys).Error())
		})
	}
}

// TestAttackA_CBCHMACRetaggedForAnotherMount — failed before the fix (the
// same: the known HMAC key is refused by Open's checks).
//
// Attackers A and C together, same precondition as above (an HMAC secret of
// known value on the token). For aes-cbc-hmac the mount's AAD is bound only
// by the MAC, and the MAC key is whatever sealed_hmac in storage names
// (unchecked at unseal). The victim's blob, re-tagged in software with the
// known HMAC key for a neighbour mount's AAD, opens to the victim's root
// keyring under the victim's KEK, whose value nobody knows: a mount whose
// storage the attacker writes unseals with another mount's root keyring, and
// MAC-before-decrypt no longer stands between storage and CBC decryption
// (CKM_AES_CBC_PAD padding errors and keyring parse errors come back
// differently through config/seal's answer: a padding oracle).
func TestAttackA_CBCHMACRetaggedForAnotherMount(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	victimKeys := sealKeysFor(AESCBCHMAC)
	require.NoError(t, tok.EnsureSealKeys(victimKeys, true))
	victimAAD := []byte("hsm-transit/root-keyring\x00victim-uuid")
	secret := []byte("the victim's root keyring")
	blob, err := tok.Seal(victimKeys, secret, victimAAD)
	require.NoError(t, err)

	macKey := attackRand(32)
	macLabel := uniqueLabel("imported-jwt-hmac")
	attackImportSecret(t, tok, macLabel, pkcs11.CKK_GENERIC_SECRET, macKey, pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY)
	neighbourAAD := []byte("hsm-transit/root-keyring\x00neighbour-uuid")
	iv, ct := blob[:cbcIVSize], blob[cbcIVSize:len(blob)-hmacTagSize]
	mac := hmac.New(sha256.New, macKey)
	mac.Write(cbcMACInput(neighbourAAD, iv, ct))
	forged := append(append(append([]byte{}, iv...), ct...), mac.Sum(nil)...)
	forgedKeys := SealKeys{Mechanism: AESCBCHMAC, Label: victimKeys.Label, HMACLabel: macLabel}
	got, err := tok.Open(forgedKeys, forged, neighbourAAD)
	if err == nil {
		t.Errorf("ATTACK SUCCEEDS: the victim's aes-cbc-hmac keyring, re-tagged with a known HMAC key named by storage, opens under another mount's AAD: %q", got)
	}
	// Refused for the HMAC key, before the tag is checked or anything is
	// decrypted (no padding oracle).
	require.Nil(t, got)
	require.Equal(t, Configuration, KindOf(err), "%v", err)
	require.EqualError(t, err, tok.CheckSealKeys(forgedKeys).Error())
	require.Contains(t, err.Error(), macLabel)
}

// attackOpenWithin runs Open in a goroutine and reports whether it returned
// within d; it waits for it (after release) and closes what it opened.
func attackOpenWithin(t *testing.T, cfg Config, d time.Duration, release func()) bool {
	t.Helper()
	type opened struct {
		tok *Token
		err error
	}
	ch := make(chan opened, 1)
	go func() {
		o, err := Open(cfg)
		ch <- opened{o, err}
	}()
	var got opened
	inTime := true
	select {
	case got = <-ch:
	case <-time.After(3 * time.Second):
		inTime = false
	}
	release()
	if !inTime {
		select {
		case got = <-ch:
		case <-time.After(30 * time.Second):
			t.Fatal("hsm.Open stayed blocked after the token answered again")
		}
	}
	require.NoError(t, got.err)
	got.tok.Close()
	return inTime
}

// TestAttackD_HungTokenFreezesEveryOpen — (a) FAILS at 477e540..5e3e928,
// passes since 4ac8e5b (Close releases the tokens lock first and is bounded
// by the deadline); (b) failed before the fix (module.release no longer
// holds the modules lock while it waits for calls in flight).
//
// Attacker D (a network HSM that stops answering, or attacker C pointing
// their own mount at one). The deadline covers do, but not Close: the seal
// (internal/mountseal) closes the token after every failed unseal (openMount)
// and in adoptToken.
//
// (a) Before 4ac8e5b, Token.Close (token.go:183-208) holds the process-wide
// `tokens` lock across C_CloseSession: the hung token's Close blocks every
// hsm.Open of the process, on any token and library.
//
// (b) module.release (module.go:120-128; 95-103 before 4ac8e5b) takes the process-wide `modules`
// lock, then calls.Lock, which waits for every call still in flight on that
// module, abandoned ones included (README: "never while a call is in
// flight"). An abandoned operation parked inside f (here: WriteData waiting
// for dataMu, which a hung token on a third library holds; equally any
// PKCS#11 call that outlives its deadline) makes the last Close of its
// module hold `modules` for as long as it lasts: acquireModule, and so
// hsm.Open of every library, blocks behind it.
func TestAttackD_HungTokenFreezesEveryOpen(t *testing.T) {
	other := Config{Library: softhsmLib, TokenLabel: "token-a", PIN: testPIN, CallTimeout: time.Second}
	t.Run("close of a hung token", func(t *testing.T) {
		shim, label := newShim(t)
		tok, err := Open(Config{Library: shim.Library, TokenLabel: label, PIN: testPIN, CallTimeout: 300 * time.Millisecond, MaxSessions: 4})
		require.NoError(t, err)
		t.Cleanup(func() { shim.Set(); tok.Close() })
		_, err = tok.Random(4)
		require.NoError(t, err)
		shim.Set(p11shim.Hang)
		_, err = tok.Random(4)
		require.True(t, IsTimeout(err), "%v", err)
		go tok.Close() // as openMount does after a failed unseal
		time.Sleep(200 * time.Millisecond)
		require.True(t, attackOpenWithin(t, other, 3*time.Second, func() { shim.Set() }),
			"ATTACK SUCCEEDS: the hung token's Close held the process-wide tokens lock (token.go:188) across C_CloseSession: hsm.Open of an unrelated token and library blocked")
	})
	t.Run("last close behind an abandoned call", func(t *testing.T) {
		// The module's last handle closes while one of its calls is
		// abandoned but still running: finalising waits for that call,
		// and must not hold up Open of any other library meanwhile.
		shim, label := newShim(t)
		hung := openShim(t, shim, label, 300*time.Millisecond)
		_, err := hung.Random(4)
		require.NoError(t, err)
		shim.Set(p11shim.Hang)
		require.True(t, IsTimeout(hung.WriteData(uniqueLabel("anchor"), []byte{1})))
		go hung.Close() // the module's last handle
		time.Sleep(800 * time.Millisecond)
		require.True(t, attackOpenWithin(t, other, 3*time.Second, func() { shim.Set() }),
			"ATTACK SUCCEEDS: module.release holds the process-wide modules lock while calls.Lock waits for an abandoned call: hsm.Open of every library blocked")
	})
}

// TestAttackD_HungTokenHoldsDataMuForAllTokens — failed before the fix
// (data operations now lock one label of one token, not the process).
//
// Attacker D. This commit moved dataMu (process-wide, every token) inside
// the operation "so that one abandoned at its deadline still holds it"
// (data.go:18-27, 114, 164, 206). A token that hangs inside WriteData or
// ReadData then holds it for as long as it hangs: the anti-rollback anchors
// of every mount on every other, healthy token time out (each such call
// also parks a goroutine holding a session slot), so their storage writes
// and unseals fail.
func TestAttackD_HungTokenHoldsDataMuForAllTokens(t *testing.T) {
	shim, label := newShim(t)
	hung := openShim(t, shim, label, 300*time.Millisecond)
	_, err := hung.Random(4) // logged in, a session pooled
	require.NoError(t, err)

	healthy, err := Open(Config{Library: softhsmLib, TokenLabel: "token-a", PIN: testPIN, CallTimeout: time.Second})
	require.NoError(t, err)
	t.Cleanup(healthy.Close)
	anchor := uniqueLabel("anchor")
	require.NoError(t, healthy.WriteData(anchor, []byte{1}))
	t.Cleanup(func() { _ = healthy.DestroyData(anchor) })

	shim.Set(p11shim.Hang)
	err = hung.WriteData(uniqueLabel("neighbour-anchor"), []byte{1})
	require.True(t, IsTimeout(err), "%v", err)

	werr := healthy.WriteData(anchor, []byte{2})
	_, _, rerr := healthy.ReadData(anchor)
	shim.Set()
	require.NoError(t, werr, "ATTACK SUCCEEDS: a hung token's abandoned WriteData holds the process-wide dataMu (data.go:114): WriteData on an unrelated healthy token fails")
	require.NoError(t, rerr, "ATTACK SUCCEEDS: ReadData on an unrelated healthy token fails behind the hung token's dataMu")
}

// TestAttackD_SealReturnsABlobItCannotOpen — failed before the fix (Seal
// now opens the blob again before returning it).
//
// Attacker D (a token whose AES-GCM IV handling changes after the canary:
// a firmware update, an HA group with a member in FIPS mode that does not
// write its IV back). The canary runs at config/seal only
// (internal/mountseal/configure.go ensureSealKeys); Seal itself returns whatever the token gave,
// and the root key rotation re-seals and stores the keyring without opening
// it (internal/mountseal/rotate.go storeKeyringLocked, pruned in finishRotationLocked; reconfigureLocked has
// checkSealed, rotation does not), then prunes the old version: the mount
// cannot unseal again, and only recovery shares bring it back.
func TestAttackD_SealReturnsABlobItCannotOpen(t *testing.T) {
	shim, label := newShim(t)
	tok := openShim(t, shim, label, 0)
	k := SealKeys{Mechanism: AESGCM, Label: uniqueLabel("kek")}
	require.NoError(t, tok.EnsureSealKeys(k, true))
	require.NoError(t, tok.CheckRoundTrip(k, []byte("aad")), "the canary passes at configuration")

	shim.Set(p11shim.IVHidden)
	blob, err := tok.Seal(k, []byte("the rotated root keyring"), []byte("aad"))
	shim.Set()
	if err != nil {
		return // refused: the defence holds
	}
	_, err = tok.Open(k, blob, []byte("aad"))
	require.NoError(t, err, "ATTACK SUCCEEDS: Seal returned, without error, a blob that never opens (the token used an IV it did not write back); rotation stores such a blob unchecked and prunes the old keyring")
}

// TestAttackB_C_CBCHMACSplicesRefused — passes (non-finding).
//
// A neighbour (C) who names this mount's HMAC key as their own
// hmac_key_label gets tags under it over their own AAD; the canary's AAD
// is another string again. The MAC input is magic || len64(aad) || aad ||
// iv || ct, so no tag over one (aad, iv, ct) verifies another split of the
// same bytes, and no blob of one AAD opens under another.
func TestAttackB_C_CBCHMACSplicesRefused(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	k := sealKeysFor(AESCBCHMAC)
	require.NoError(t, tok.EnsureSealKeys(k, true))
	victim := []byte("hsm-transit/root-keyring\x00victim")
	blob, err := tok.Seal(k, bytes.Repeat([]byte("k"), 40), victim)
	require.NoError(t, err)
	iv := blob[:cbcIVSize]
	// Move the IV into the AAD and a block of ciphertext into the IV.
	spliced := append([]byte{}, blob[cbcIVSize:]...)
	_, err = tok.Open(k, spliced, append(append([]byte{}, victim...), iv...))
	require.Error(t, err)
	require.Equal(t, Failed, KindOf(err), "%v", err)
	// A neighbour's canary with this mount's keys does not open as the
	// root keyring.
	canary, err := tok.Seal(k, []byte("x"), append([]byte("hsm-transit/canary\x00"), victim...))
	require.NoError(t, err)
	_, err = tok.Open(k, canary, victim)
	require.Equal(t, Failed, KindOf(err), "%v", err)
}

// TestAttackA_KWPTransientObjectsDestroyed — passes (non-finding).
//
// aes-kwp unwraps storage's blob into an extractable, non-sensitive session
// object. It must be gone after a good blob, a blob for another AAD, a
// corrupted blob, and a seal.
func TestAttackA_KWPTransientObjectsDestroyed(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	k := sealKeysFor(AESKWP)
	require.NoError(t, tok.EnsureSealKeys(k, true))
	blob, err := tok.Seal(k, []byte("keyring"), []byte("a"))
	require.NoError(t, err)
	_, err = tok.Open(k, blob, []byte("a"))
	require.NoError(t, err)
	_, err = tok.Open(k, blob, []byte("b"))
	require.Equal(t, Failed, KindOf(err))
	bad := append([]byte{}, blob...)
	bad[5] ^= 1
	_, err = tok.Open(k, bad, []byte("a"))
	require.Equal(t, Failed, KindOf(err))
	var n int
	require.NoError(t, tok.do("count session objects", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		found, err := findObjects(ctx, s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false)})
		n = len(found)
		return err
	}))
	require.Zero(t, n, "session objects left behind by aes-kwp")
}
