package hsm

import (
	"bytes"
	"testing"

	"github.com/miekg/pkcs11"
	"github.com/stretchr/testify/require"
)

// sealKeysFor names fresh keys for a mechanism.
func sealKeysFor(m SealMechanism) SealKeys {
	label := uniqueLabel("seal-" + string(m))
	k := SealKeys{Mechanism: m, Label: label}
	if m == AESCBCHMAC {
		k.HMACLabel = DefaultHMACLabel(label)
	}
	return k
}

func TestMechanismsOfSoftHSM2(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	sup, err := tok.Mechanisms()
	require.NoError(t, err)
	// SoftHSM2 2.6 has every mechanism; aes-gcm comes first.
	require.Equal(t, []SealMechanism{AESGCM, AESKWP, AESCBCHMAC, RSAOAEP}, sup.Usable)
	require.True(t, sup.GCM)
	for _, m := range sup.Usable {
		require.True(t, sup.CanGenerate[m], "%s", m)
	}
	chosen, err := sup.Choose()
	require.NoError(t, err)
	require.Equal(t, AESGCM, chosen)
}

func TestSupportFrom(t *testing.T) {
	// openCryptoki 3.8's soft token: no GCM, no key wrap.
	flags := map[uint]uint{
		pkcs11.CKM_AES_CBC_PAD:            pkcs11.CKF_ENCRYPT | pkcs11.CKF_DECRYPT | pkcs11.CKF_WRAP | pkcs11.CKF_UNWRAP,
		pkcs11.CKM_SHA256_HMAC:            pkcs11.CKF_SIGN | pkcs11.CKF_VERIFY,
		pkcs11.CKM_RSA_PKCS_OAEP:          pkcs11.CKF_ENCRYPT | pkcs11.CKF_DECRYPT,
		pkcs11.CKM_AES_KEY_GEN:            pkcs11.CKF_GENERATE,
		pkcs11.CKM_GENERIC_SECRET_KEY_GEN: pkcs11.CKF_GENERATE,
	}
	sup := supportFrom(flags)
	require.Equal(t, []SealMechanism{AESCBCHMAC, RSAOAEP}, sup.Usable)
	require.False(t, sup.GCM)
	require.True(t, sup.CanGenerate[AESCBCHMAC])
	require.False(t, sup.CanGenerate[RSAOAEP], "no key pair generation listed")
	err := sup.Supports(AESGCM)
	require.Equal(t, Configuration, KindOf(err))
	require.Contains(t, err.Error(), "CKM_AES_GCM")
	require.Contains(t, err.Error(), "aes-cbc-hmac, rsa-oaep")
	require.Contains(t, sup.ErrNoGCM().Error(), "CKM_AES_GCM")

	// Only encryption of GCM is not enough.
	sup = supportFrom(map[uint]uint{pkcs11.CKM_AES_GCM: pkcs11.CKF_ENCRYPT})
	require.Empty(t, sup.Usable)
	_, err = sup.Choose()
	require.Equal(t, Configuration, KindOf(err))
	require.Contains(t, err.Error(), "aes-gcm needs CKM_AES_GCM (encrypt, decrypt)")

	// Either number of KWP makes aes-kwp usable.
	for _, m := range []uint{ckmAESKeyWrapKWP, ckmAESKeyWrapPad} {
		sup = supportFrom(map[uint]uint{m: pkcs11.CKF_WRAP | pkcs11.CKF_UNWRAP})
		require.Equal(t, []SealMechanism{AESKWP}, sup.Usable, "0x%x", m)
	}
}

func TestSealMechanismsRoundTrip(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	aad := []byte("mount-1234/root-keyring")
	secret := bytes.Repeat([]byte("root keyring "), 30)
	blobs := map[SealMechanism][]byte{}
	keys := map[SealMechanism]SealKeys{}
	for _, m := range SealMechanisms {
		t.Run(string(m), func(t *testing.T) {
			k := sealKeysFor(m)
			err := tok.EnsureSealKeys(k, false)
			require.Equal(t, NotFound, KindOf(err), "missing keys without generate_key: %v", err)
			require.Contains(t, err.Error(), "generate_key=true")
			require.NoError(t, tok.EnsureSealKeys(k, true))
			require.NoError(t, tok.EnsureSealKeys(k, false), "found and checked the second time")
			require.NoError(t, tok.CheckRoundTrip(k, aad))

			blob, err := tok.Seal(k, secret, aad)
			require.NoError(t, err)
			require.False(t, bytes.Contains(blob, secret[:16]), "the blob holds no plaintext")
			again, err := tok.Seal(k, secret, aad)
			require.NoError(t, err)
			require.NotEqual(t, blob, again, "sealing is randomised")
			got, err := tok.Open(k, blob, aad)
			require.NoError(t, err)
			require.Equal(t, secret, got)

			_, err = tok.Open(k, blob, []byte("mount-9999/root-keyring"))
			require.Equal(t, Failed, KindOf(err), "another mount's AAD: %v", err)
			for _, i := range []int{0, len(blob) / 2, len(blob) - 1} {
				bad := append([]byte{}, blob...)
				bad[i] ^= 0x40
				_, err = tok.Open(k, bad, aad)
				require.Equal(t, Failed, KindOf(err), "byte %d flipped: %v", i, err)
			}
			_, err = tok.Open(k, blob[:len(blob)-1], aad)
			require.Equal(t, Failed, KindOf(err), "truncated: %v", err)
			_, err = tok.Open(k, nil, aad)
			require.Equal(t, Failed, KindOf(err), "empty: %v", err)
			blobs[m], keys[m] = blob, k
		})
	}
	// A blob of one mechanism never opens as another's, with the other's
	// keys or with its own label.
	for m, blob := range blobs {
		for other, k := range keys {
			if other == m {
				continue
			}
			got, err := tok.Open(k, blob, aad)
			require.Equal(t, Failed, KindOf(err), "%s blob opened as %s: %v", m, other, err)
			require.Nil(t, got, "%s blob opened as %s", m, other)
		}
	}
}

func TestSealKeysRefused(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)

	t.Run("gcm KEK used for kwp", func(t *testing.T) {
		k := sealKeysFor(AESGCM)
		require.NoError(t, tok.EnsureSealKeys(k, true))
		k.Mechanism = AESKWP
		err := tok.EnsureSealKeys(k, false)
		require.Equal(t, Configuration, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), "CKA_WRAP")
	})
	t.Run("kwp KEK used for gcm", func(t *testing.T) {
		k := sealKeysFor(AESKWP)
		require.NoError(t, tok.EnsureSealKeys(k, true))
		k.Mechanism = AESGCM
		err := tok.EnsureSealKeys(k, false)
		require.Equal(t, Configuration, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), "can wrap keys")
	})
	t.Run("one key for encryption and MAC", func(t *testing.T) {
		k := sealKeysFor(AESCBCHMAC)
		k.HMACLabel = k.Label
		err := tok.EnsureSealKeys(k, true)
		require.Equal(t, Configuration, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), "hmac_key_label must differ")
	})
	t.Run("an AES key as the HMAC key", func(t *testing.T) {
		k := sealKeysFor(AESCBCHMAC)
		require.NoError(t, tok.GenerateKey(k.HMACLabel))
		err := tok.EnsureSealKeys(k, true)
		require.Equal(t, Configuration, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), "CKA_KEY_TYPE")
	})
	t.Run("extractable HMAC key", func(t *testing.T) {
		k := sealKeysFor(AESCBCHMAC)
		require.NoError(t, tok.do("make test key", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
			_, err := ctx.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_GENERIC_SECRET_KEY_GEN, nil)}, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
				pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
				pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
				pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
				pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
				pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
				pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, k.HMACLabel),
			})
			return err
		}))
		err := tok.EnsureSealKeys(k, true)
		require.Equal(t, Configuration, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), "CKA_EXTRACTABLE=true")
	})
	mkPair := func(t *testing.T, label string, bits int, pubPrivate bool) {
		require.NoError(t, tok.doSlow("make test key pair", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
			_, _, err := ctx.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)},
				[]*pkcs11.Attribute{
					pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
					pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, pubPrivate),
					pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
					pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, bits),
					pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
					pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
				}, []*pkcs11.Attribute{
					pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
					pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
					pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
					pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
					pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
					pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
				})
			return err
		}))
	}
	t.Run("RSA-2048", func(t *testing.T) {
		k := sealKeysFor(RSAOAEP)
		mkPair(t, k.Label, 2048, true)
		err := tok.EnsureSealKeys(k, true)
		require.Equal(t, Configuration, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), "2048-bit modulus")
	})
	t.Run("RSA public key readable without login", func(t *testing.T) {
		k := sealKeysFor(RSAOAEP)
		mkPair(t, k.Label, 3072, false)
		err := tok.EnsureSealKeys(k, true)
		require.Equal(t, Configuration, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), "CKA_PRIVATE=false")
	})
	t.Run("RSA made elsewhere, 3072 bits", func(t *testing.T) {
		k := sealKeysFor(RSAOAEP)
		mkPair(t, k.Label, 3072, true)
		require.NoError(t, tok.EnsureSealKeys(k, false))
		require.NoError(t, tok.CheckRoundTrip(k, []byte("aad")))
	})
	t.Run("unknown mechanism", func(t *testing.T) {
		err := tok.EnsureSealKeys(SealKeys{Mechanism: "aes-ecb", Label: uniqueLabel("x")}, true)
		require.Equal(t, Configuration, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), "aes-gcm, aes-kwp, aes-cbc-hmac, rsa-oaep")
	})
}

// TestOAEPBlobNamingAnotherHash: an rsa-oaep blob that names a hash other
// than the one it was sealed with (a foreign blob whose first byte happens
// to be a hash id, as another mechanism's blob was, now and then, in
// TestSealMechanismsRoundTrip) is refused as not authentic, whether or not
// the token can do that hash (SoftHSM2 2.6 answers CKR_ARGUMENTS_BAD to
// any but SHA-1), never as the token being unavailable.
func TestOAEPBlobNamingAnotherHash(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	aad := []byte("mount-1234/root-keyring")
	k := sealKeysFor(RSAOAEP)
	require.NoError(t, tok.EnsureSealKeys(k, true))
	blob, err := tok.Seal(k, []byte("root keyring"), aad)
	require.NoError(t, err)
	for _, h := range oaepHashes {
		if h.id == blob[0] {
			continue
		}
		other := append([]byte{h.id}, blob[1:]...)
		got, err := tok.Open(k, other, aad)
		require.Equal(t, Failed, KindOf(err), "blob relabelled with hash %d: %v", h.id, err)
		require.Nil(t, got)
	}
	got, err := tok.Open(k, blob, aad)
	require.NoError(t, err)
	require.Equal(t, "root keyring", string(got))
}
