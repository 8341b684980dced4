package hsm

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/p11env"
)

// TestOpenCryptokiSoftToken runs the package against a second, independent
// PKCS#11 implementation: openCryptoki 3.8.1's soft token, which has no
// AES-GCM and no key wrap. The mechanisms it has seal and open, across a
// restart of the module; the ones it lacks are refused by name; a wrong PIN
// is refused and not retried.
func TestOpenCryptokiSoftToken(t *testing.T) {
	ock := p11env.OpenCryptoki(t, "hst-ock-hsm", "24681357")
	t.Setenv(LibrariesEnv, ock.Library+":"+softhsmLib)
	cfg := Config{Library: ock.Library, TokenLabel: ock.Label, PIN: ock.PIN}
	tok, err := Open(cfg)
	require.NoError(t, err)
	defer func() { tok.Close() }()

	sup, err := tok.Mechanisms()
	require.NoError(t, err)
	require.Equal(t, []SealMechanism{AESCBCHMAC, RSAOAEP}, sup.Usable)
	require.False(t, sup.GCM)
	require.True(t, sup.CanGenerate[AESCBCHMAC])
	require.True(t, sup.CanGenerate[RSAOAEP])
	chosen, err := sup.Choose()
	require.NoError(t, err)
	require.Equal(t, AESCBCHMAC, chosen)
	for _, m := range []SealMechanism{AESGCM, AESKWP} {
		err := sup.Supports(m)
		require.Equal(t, Configuration, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), map[SealMechanism]string{AESGCM: "CKM_AES_GCM", AESKWP: "CKM_AES_KEY_WRAP_PAD"}[m])
	}

	aad := []byte("hsm-transit/root-keyring\x00mount-ock")
	secret := []byte("a root keyring of some length, more than one AES block")
	blobs := map[SealMechanism][]byte{}
	keys := map[SealMechanism]SealKeys{}
	for _, m := range sup.Usable {
		k := SealKeys{Mechanism: m, Label: "kek-" + string(m)}
		if m == AESCBCHMAC {
			k.HMACLabel = DefaultHMACLabel(k.Label)
		}
		require.NoError(t, tok.EnsureSealKeys(k, true), "%s", m)
		require.NoError(t, tok.CheckRoundTrip(k, aad), "%s", m)
		blob, err := tok.Seal(k, secret, aad)
		require.NoError(t, err)
		if m == RSAOAEP {
			require.Equal(t, byte(1), blob[0], "openCryptoki takes OAEP with SHA-256")
		}
		bad := append([]byte{}, blob...)
		bad[len(bad)/2] ^= 1
		_, err = tok.Open(k, bad, aad)
		require.Equal(t, Failed, KindOf(err), "%s: %v", m, err)
		_, err = tok.Open(k, blob, []byte("another mount"))
		require.Equal(t, Failed, KindOf(err), "%s: %v", m, err)
		blobs[m], keys[m] = blob, k
	}

	// The AES-GCM a KEK would need is refused by the token as a
	// configuration matter, not as a lost token.
	require.NoError(t, tok.GenerateKey("kek-gcm"))
	_, err = tok.EncryptGCM("kek-gcm", secret, aad)
	require.Equal(t, Configuration, KindOf(err), "%v", err)

	// A restart: the module is finalised and unloaded, then loaded again.
	tok.Close()
	tok, err = Open(cfg)
	require.NoError(t, err)
	for m, blob := range blobs {
		got, err := tok.Open(keys[m], blob, aad)
		require.NoError(t, err, "%s", m)
		require.Equal(t, secret, got)
		require.NoError(t, tok.CheckSealKeys(keys[m]))
	}

	// A wrong PIN is refused by the token (no session of the right PIN is
	// open), and the refusal is sticky.
	tok.Close()
	wrong, err := Open(Config{Library: ock.Library, Slot: &ock.Slot, PIN: "00000000"})
	require.NoError(t, err)
	defer wrong.Close()
	_, err = wrong.Mechanisms()
	require.Equal(t, Credentials, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "CKR_PIN_INCORRECT")
	_, err = wrong.Mechanisms()
	require.Equal(t, Credentials, KindOf(err), "%v", err)
}
