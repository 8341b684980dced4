package hsmtransit

import (
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/chacha20poly1305"
)

// exportKeys reads export/<what> and returns its keys map, requiring a 200.
func exportKeys(t *testing.T, e *testEnv, what string) map[string]string {
	t.Helper()
	r := e.read(t, "export/"+what)
	requireStatus(t, r, 200, "")
	raw, ok := r.data["keys"].(map[string]interface{})
	require.Truef(t, ok, "keys of export/%s: %#v", what, r.data["keys"])
	out := make(map[string]string, len(raw))
	for v, k := range raw {
		s, ok := k.(string)
		require.True(t, ok)
		out[v] = s
	}
	return out
}

// exportSplitCiphertext parses "vault:vN:" + base64(...) into its bytes.
func exportSplitCiphertext(t *testing.T, ct, version string) []byte {
	t.Helper()
	prefix := "vault:" + version + ":"
	require.True(t, strings.HasPrefix(ct, prefix), ct)
	raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(ct, prefix))
	require.NoError(t, err)
	return raw
}

// exportSignature returns the raw bytes of a sign/ signature.
func exportSignature(t *testing.T, e *testEnv, key string, input []byte, extra map[string]interface{}) []byte {
	t.Helper()
	data := map[string]interface{}{"input": base64.StdEncoding.EncodeToString(input)}
	for k, v := range extra {
		data[k] = v
	}
	out := e.mustWrite(t, "sign/"+key, data)
	return exportSplitCiphertext(t, out["signature"].(string), "v1")
}

func exportPEM(t *testing.T, s, blockType string) []byte {
	t.Helper()
	block, rest := pem.Decode([]byte(s))
	require.NotNil(t, block, "no PEM in %q", s)
	require.Equal(t, blockType, block.Type)
	require.Empty(t, strings.TrimSpace(string(rest)))
	return block.Bytes
}

func TestExportSymmetricEncryptionKey(t *testing.T) {
	cases := []struct {
		keyType string
		size    int
		aead    func(t *testing.T, key []byte) cipher.AEAD
	}{
		{"aes128-gcm96", 16, exportAESGCM},
		{"aes256-gcm96", 32, exportAESGCM},
		{"chacha20-poly1305", 32, func(t *testing.T, key []byte) cipher.AEAD {
			a, err := chacha20poly1305.New(key)
			require.NoError(t, err)
			return a
		}},
	}
	for _, tc := range cases {
		t.Run(tc.keyType, func(t *testing.T) {
			e := getTestBackend(t)
			e.mustWrite(t, "keys/k", map[string]interface{}{"type": tc.keyType, "exportable": true})
			ct := e.encrypt(t, "k", "exported plaintext", nil)

			keys := exportKeys(t, e, "encryption-key/k")
			require.Len(t, keys, 1)
			key, err := base64.StdEncoding.DecodeString(keys["1"])
			require.NoError(t, err)
			require.Len(t, key, tc.size)

			aead := tc.aead(t, key)
			raw := exportSplitCiphertext(t, ct, "v1")
			require.Greater(t, len(raw), aead.NonceSize())
			pt, err := aead.Open(nil, raw[:aead.NonceSize()], raw[aead.NonceSize():], nil)
			require.NoError(t, err)
			require.Equal(t, "exported plaintext", string(pt))

			// What export hands out is nowhere in raw storage.
			secrets := secretSet{}
			secrets.AddExported(t, "k v1", keys["1"])
			secrets.Add(t, "the plaintext", []byte("exported plaintext"))
			requireMountSealed(t, e, secrets)
		})
	}
}

func exportAESGCM(t *testing.T, key []byte) cipher.AEAD {
	t.Helper()
	block, err := aes.NewCipher(key)
	require.NoError(t, err)
	a, err := cipher.NewGCM(block)
	require.NoError(t, err)
	return a
}

func TestExportRSAKeys(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/rsa", map[string]interface{}{"type": "rsa-2048", "exportable": true})

	pubDER := exportPEM(t, exportKeys(t, e, "public-key/rsa")["1"], "PUBLIC KEY")
	pubAny, err := x509.ParsePKIXPublicKey(pubDER)
	require.NoError(t, err)
	pub, ok := pubAny.(*rsa.PublicKey)
	require.True(t, ok)
	require.Equal(t, 2048, pub.N.BitLen())

	input := []byte("signed by rsa")
	sig := exportSignature(t, e, "rsa", input, map[string]interface{}{"signature_algorithm": "pkcs1v15"})
	digest := sha256.Sum256(input)
	require.NoError(t, rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig))

	for _, exportType := range []string{"encryption-key", "signing-key"} {
		t.Run(exportType, func(t *testing.T) {
			der := exportPEM(t, exportKeys(t, e, exportType+"/rsa")["1"], "RSA PRIVATE KEY")
			priv, err := x509.ParsePKCS1PrivateKey(der)
			require.NoError(t, err)
			require.NoError(t, priv.Validate())
			require.True(t, priv.PublicKey.Equal(pub), "private key does not match the public key")
		})
	}
	secrets := secretSet{}
	secrets.AddExported(t, "rsa v1", exportKeys(t, e, "encryption-key/rsa")["1"])
	requireMountSealed(t, e, secrets)
}

func TestExportECDSAKeys(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/ec", map[string]interface{}{"type": "ecdsa-p256", "exportable": true})

	input := []byte("signed by ecdsa")
	sig := exportSignature(t, e, "ec", input, nil)
	digest := sha256.Sum256(input)

	var privPub, pubPub *ecdsa.PublicKey
	t.Run("signing-key", func(t *testing.T) {
		der := exportPEM(t, exportKeys(t, e, "signing-key/ec")["1"], "EC PRIVATE KEY")
		priv, err := x509.ParseECPrivateKey(der)
		require.NoError(t, err)
		require.Equal(t, "P-256", priv.Curve.Params().Name)
		privPub = &priv.PublicKey
		require.True(t, ecdsa.VerifyASN1(privPub, digest[:], sig), "signature does not verify with the exported private key's public half")
	})
	t.Run("public-key", func(t *testing.T) {
		der := exportPEM(t, exportKeys(t, e, "public-key/ec")["1"], "PUBLIC KEY")
		pubAny, err := x509.ParsePKIXPublicKey(der)
		require.NoError(t, err)
		var ok bool
		pubPub, ok = pubAny.(*ecdsa.PublicKey)
		require.True(t, ok)
		require.True(t, ecdsa.VerifyASN1(pubPub, digest[:], sig), "signature does not verify with the exported public key")
	})
	require.NotNil(t, privPub)
	require.NotNil(t, pubPub)
	require.True(t, privPub.Equal(pubPub))
	secrets := secretSet{}
	secrets.AddExported(t, "ec v1", exportKeys(t, e, "signing-key/ec")["1"])
	requireMountSealed(t, e, secrets)
}

func TestExportEd25519Keys(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/ed", map[string]interface{}{"type": "ed25519", "exportable": true})

	input := []byte("signed by ed25519")
	sig := exportSignature(t, e, "ed", input, nil)

	privRaw, err := base64.StdEncoding.DecodeString(exportKeys(t, e, "signing-key/ed")["1"])
	require.NoError(t, err)
	require.Len(t, privRaw, ed25519.PrivateKeySize)
	priv := ed25519.PrivateKey(privRaw)

	pubRaw, err := base64.StdEncoding.DecodeString(exportKeys(t, e, "public-key/ed")["1"])
	require.NoError(t, err)
	require.Len(t, pubRaw, ed25519.PublicKeySize)
	pub := ed25519.PublicKey(pubRaw)

	require.True(t, pub.Equal(priv.Public()))
	require.True(t, ed25519.Verify(pub, input, sig))
	require.Equal(t, sig, ed25519.Sign(priv, input), "ed25519 signatures are deterministic")
	secrets := secretSet{}
	secrets.Add(t, "ed v1", priv)
	secrets.Add(t, "ed v1 (seed)", priv.Seed())
	requireMountSealed(t, e, secrets)
}

func TestExportHMACKey(t *testing.T) {
	for _, keyType := range []string{"hmac", "aes256-gcm96"} {
		t.Run(keyType, func(t *testing.T) {
			e := getTestBackend(t)
			e.mustWrite(t, "keys/k", map[string]interface{}{"type": keyType, "exportable": true})
			key, err := base64.StdEncoding.DecodeString(exportKeys(t, e, "hmac-key/k")["1"])
			require.NoError(t, err)
			require.NotEmpty(t, key)

			input := []byte("mac me")
			out := e.mustWrite(t, "hmac/k", map[string]interface{}{"input": base64.StdEncoding.EncodeToString(input)})
			got := exportSplitCiphertext(t, out["hmac"].(string), "v1")
			m := hmac.New(sha256.New, key)
			m.Write(input)
			require.Equal(t, m.Sum(nil), got, "the exported key does not compute Vault's HMAC")
			requireMountSealed(t, e, secretSet{"the HMAC key": key})
		})
	}
}

func TestExportVersions(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", map[string]interface{}{"exportable": true})
	e.mustWrite(t, "keys/k/rotate", nil)
	e.mustWrite(t, "keys/k/rotate", nil)

	all := exportKeys(t, e, "encryption-key/k")
	require.Len(t, all, 3)
	require.NotEqual(t, all["1"], all["2"])
	require.NotEqual(t, all["2"], all["3"])

	cases := []struct {
		version string
		want    string
	}{
		{"latest", "3"},
		{"1", "1"},
		{"v1", "1"},
		{"2", "2"},
		{"v3", "3"},
	}
	for _, tc := range cases {
		t.Run(tc.version, func(t *testing.T) {
			keys := exportKeys(t, e, "encryption-key/k/"+tc.version)
			require.Equal(t, map[string]string{tc.want: all[tc.want]}, keys)
		})
	}

	t.Run("response names the key", func(t *testing.T) {
		r := e.read(t, "export/encryption-key/k/latest")
		requireStatus(t, r, 200, "")
		require.Equal(t, "k", r.data["name"])
		require.Equal(t, "aes256-gcm96", r.data["type"])
	})

	secrets := secretSet{}
	for v, k := range all {
		secrets.AddExported(t, "k v"+v, k)
	}
	requireMountSealed(t, e, secrets)
}

func TestExportErrors(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/locked", nil)
	e.mustWrite(t, "keys/locked-ec", map[string]interface{}{"type": "ecdsa-p256"})
	e.mustWrite(t, "keys/aes", map[string]interface{}{"exportable": true})
	e.mustWrite(t, "keys/ec", map[string]interface{}{"type": "ecdsa-p256", "exportable": true})
	e.mustWrite(t, "keys/old", map[string]interface{}{"exportable": true})
	e.mustWrite(t, "keys/old/rotate", nil)
	e.mustWrite(t, "keys/old/config", map[string]interface{}{"min_decryption_version": 2})

	cases := []struct {
		name   string
		path   string
		status int
		msg    string
	}{
		{"not exportable", "export/encryption-key/locked", 400, "private key material is not exportable"},
		{"not exportable hmac", "export/hmac-key/locked", 400, "private key material is not exportable"},
		{"not exportable signing", "export/signing-key/locked-ec", 400, "private key material is not exportable"},
		{"invalid type", "export/bogus-key/aes", 400, "invalid export type: bogus-key"},
		{"cmac", "export/cmac-key/aes", 400, "only available in enterprise"},
		{"encryption key of signing-only key", "export/encryption-key/ec", 400, "encryption not supported for the key"},
		{"signing key of aes", "export/signing-key/aes", 400, "signing not supported for the key"},
		{"public key of aes", "export/public-key/aes", 400, "unknown key type aes256-gcm96 for export type public-key"},
		{"below min_decryption_version", "export/encryption-key/old/1", 400, "below minimum decryption version"},
		{"missing version", "export/encryption-key/aes/7", 400, "version does not exist or cannot be found"},
		{"bad version string", "export/encryption-key/aes/vx", 400, "invalid key version"},
		{"missing key", "export/encryption-key/nope", 404, ""},
		{"certificate chain without chain", "export/certificate-chain/ec", 400, "does not have a certificate chain"},
		{"certificate chain of aes", "export/certificate-chain/aes", 400, "certificate chain not supported"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := e.read(t, tc.path)
			requireStatus(t, r, tc.status, tc.msg)
			require.Nil(t, r.data["keys"])
		})
	}

	t.Run("public key of non-exportable signing key", func(t *testing.T) {
		der := exportPEM(t, exportKeys(t, e, "public-key/locked-ec")["1"], "PUBLIC KEY")
		_, err := x509.ParsePKIXPublicKey(der)
		require.NoError(t, err)
	})
	t.Run("latest still exportable above min_decryption_version", func(t *testing.T) {
		require.Len(t, exportKeys(t, e, "encryption-key/old/2"), 1)
	})
}
