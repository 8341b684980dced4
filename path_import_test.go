package hsmtransit

import (
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"hash"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"
	"github.com/tink-crypto/tink-go/v2/kwp/subtle"
)

// importWrappingPublicKey reads a mount's wrapping key.
func importWrappingPublicKey(t *testing.T, e *testEnv) (*rsa.PublicKey, string) {
	t.Helper()
	r := e.read(t, "wrapping_key")
	requireStatus(t, r, 200, "")
	pemText, ok := r.data["public_key"].(string)
	require.True(t, ok, "public_key missing: %#v", r.data)
	block, _ := pem.Decode([]byte(pemText))
	require.NotNil(t, block)
	require.Equal(t, "PUBLIC KEY", block.Type)
	pubAny, err := x509.ParsePKIXPublicKey(block.Bytes)
	require.NoError(t, err)
	pub, ok := pubAny.(*rsa.PublicKey)
	require.True(t, ok, "wrapping key is %T", pubAny)
	return pub, pemText
}

// importWrap wraps key material for keys/:name/import as Vault expects:
// RSA-OAEP(h) of a fresh AES-256 key under the mount's wrapping key, then the
// material wrapped with that AES key by KWP, concatenated, base64.
func importWrap(t *testing.T, e *testEnv, material []byte, h hash.Hash) string {
	t.Helper()
	pub, _ := importWrappingPublicKey(t, e)
	ephemeral := make([]byte, 32)
	_, err := rand.Read(ephemeral)
	require.NoError(t, err)
	wrappedKey, err := rsa.EncryptOAEP(h, rand.Reader, pub, ephemeral, nil)
	require.NoError(t, err)
	kwp, err := subtle.NewKWP(ephemeral)
	require.NoError(t, err)
	wrappedMaterial, err := kwp.Wrap(material)
	require.NoError(t, err)
	return base64.StdEncoding.EncodeToString(append(wrappedKey, wrappedMaterial...))
}

func importRandom(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return b
}

// importLocalCiphertext encrypts in transit's format with a local AES-GCM key.
func importLocalCiphertext(t *testing.T, key []byte, version, plaintext string) string {
	t.Helper()
	block, err := aes.NewCipher(key)
	require.NoError(t, err)
	gcm, err := cipher.NewGCM(block)
	require.NoError(t, err)
	nonce := importRandom(t, gcm.NonceSize())
	sealed := gcm.Seal(nonce, nonce, []byte(plaintext), nil)
	return "vault:" + version + ":" + base64.StdEncoding.EncodeToString(sealed)
}

func importPKCS8(t *testing.T, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	return der
}

func importPublicPEM(t *testing.T, pub crypto.PublicKey) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	require.NoError(t, err)
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
}

// importSigner is a locally generated key pair of a transit key type, with a
// way to check transit's signatures and to make ones transit verifies.
type importSigner struct {
	keyType  string
	signOpts map[string]interface{}
	key      crypto.Signer
	verify   func(pub crypto.PublicKey, input, sig []byte) bool
	sign     func(t *testing.T, key crypto.Signer, input []byte) []byte
}

var importRSAKey *rsa.PrivateKey

func importSigners(t *testing.T) []importSigner {
	t.Helper()
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	if importRSAKey == nil {
		importRSAKey, err = rsa.GenerateKey(rand.Reader, 2048)
		require.NoError(t, err)
	}
	return []importSigner{
		{
			keyType: "ed25519",
			key:     edKey,
			verify: func(pub crypto.PublicKey, input, sig []byte) bool {
				return ed25519.Verify(pub.(ed25519.PublicKey), input, sig)
			},
			sign: func(t *testing.T, key crypto.Signer, input []byte) []byte {
				return ed25519.Sign(key.(ed25519.PrivateKey), input)
			},
		},
		{
			keyType: "ecdsa-p256",
			key:     ecKey,
			verify: func(pub crypto.PublicKey, input, sig []byte) bool {
				d := sha256.Sum256(input)
				return ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), d[:], sig)
			},
			sign: func(t *testing.T, key crypto.Signer, input []byte) []byte {
				d := sha256.Sum256(input)
				sig, err := ecdsa.SignASN1(rand.Reader, key.(*ecdsa.PrivateKey), d[:])
				require.NoError(t, err)
				return sig
			},
		},
		{
			keyType:  "rsa-2048",
			signOpts: map[string]interface{}{"signature_algorithm": "pkcs1v15"},
			key:      importRSAKey,
			verify: func(pub crypto.PublicKey, input, sig []byte) bool {
				d := sha256.Sum256(input)
				return rsa.VerifyPKCS1v15(pub.(*rsa.PublicKey), crypto.SHA256, d[:], sig) == nil
			},
			sign: func(t *testing.T, key crypto.Signer, input []byte) []byte {
				d := sha256.Sum256(input)
				sig, err := rsa.SignPKCS1v15(rand.Reader, key.(*rsa.PrivateKey), crypto.SHA256, d[:])
				require.NoError(t, err)
				return sig
			},
		},
	}
}

// importSign signs with transit and returns the raw signature.
func importSign(t *testing.T, e *testEnv, name string, s importSigner, input []byte) []byte {
	t.Helper()
	data := map[string]interface{}{"input": base64.StdEncoding.EncodeToString(input)}
	for k, v := range s.signOpts {
		data[k] = v
	}
	out := e.mustWrite(t, "sign/"+name, data)
	sig := out["signature"].(string)
	require.True(t, strings.HasPrefix(sig, "vault:v"), sig)
	raw, err := base64.StdEncoding.DecodeString(sig[strings.LastIndex(sig, ":")+1:])
	require.NoError(t, err)
	return raw
}

// importVerify asks transit to verify a locally made signature.
func importVerify(t *testing.T, e *testEnv, name string, s importSigner, input, sig []byte, version string) result {
	t.Helper()
	data := map[string]interface{}{
		"input":     base64.StdEncoding.EncodeToString(input),
		"signature": "vault:" + version + ":" + base64.StdEncoding.EncodeToString(sig),
	}
	for k, v := range s.signOpts {
		data[k] = v
	}
	return e.write(t, "verify/"+name, data)
}

func TestWrappingKey(t *testing.T) {
	e := getTestBackend(t)
	pub, first := importWrappingPublicKey(t, e)
	require.Equal(t, 4096, pub.N.BitLen())

	for i := 0; i < 3; i++ {
		_, again := importWrappingPublicKey(t, e)
		require.Equal(t, first, again, "the wrapping key changed between reads")
	}

	t.Run("not listed as a key", func(t *testing.T) {
		e.mustWrite(t, "keys/visible", nil)
		r := e.do(t, logical.ListOperation, "keys/", nil)
		requireStatus(t, r, 200, "")
		require.Equal(t, []interface{}{"visible"}, r.data["keys"])
	})
	t.Run("each mount has its own", func(t *testing.T) {
		_, other := importWrappingPublicKey(t, getTestBackend(t))
		require.NotEqual(t, first, other)
	})
}

func TestImportSymmetricKey(t *testing.T) {
	e := getTestBackend(t)
	cases := []struct {
		keyType string
		size    int
		hash    string
		newHash func() hash.Hash
	}{
		{"aes256-gcm96", 32, "", sha256.New},
		{"aes128-gcm96", 16, "SHA256", sha256.New},
		{"aes256-gcm96", 32, "SHA1", sha1.New},
	}
	for i, tc := range cases {
		t.Run(tc.keyType+"/"+tc.hash, func(t *testing.T) {
			name := "sym" + string(rune('a'+i))
			raw := importRandom(t, tc.size)
			data := map[string]interface{}{
				"type":       tc.keyType,
				"ciphertext": importWrap(t, e, raw, tc.newHash()),
			}
			if tc.hash != "" {
				data["hash_function"] = tc.hash
			}
			e.mustWrite(t, "keys/"+name+"/import", data)

			r := e.read(t, "keys/"+name)
			requireStatus(t, r, 200, "")
			require.Equal(t, true, r.data["imported_key"])
			require.Equal(t, tc.keyType, r.data["type"])
			require.Equal(t, float64(1), r.data["latest_version"])

			ct := importLocalCiphertext(t, raw, "v1", "made outside vault")
			require.Equal(t, "made outside vault", e.decrypt(t, name, ct, nil))

			// And the other way round.
			vct := e.encrypt(t, name, "made inside vault", nil)
			sealed, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(vct, "vault:v1:"))
			require.NoError(t, err)
			block, err := aes.NewCipher(raw)
			require.NoError(t, err)
			gcm, err := cipher.NewGCM(block)
			require.NoError(t, err)
			pt, err := gcm.Open(nil, sealed[:12], sealed[12:], nil)
			require.NoError(t, err)
			require.Equal(t, "made inside vault", string(pt))
		})
	}
}

func TestImportAsymmetricPrivateKey(t *testing.T) {
	e := getTestBackend(t)
	for _, s := range importSigners(t) {
		t.Run(s.keyType, func(t *testing.T) {
			name := "priv-" + s.keyType
			e.mustWrite(t, "keys/"+name+"/import", map[string]interface{}{
				"type":       s.keyType,
				"ciphertext": importWrap(t, e, importPKCS8(t, s.key), sha256.New()),
			})
			input := []byte("signed by an imported key")
			sig := importSign(t, e, name, s, input)
			require.True(t, s.verify(s.key.Public(), input, sig), "transit's signature does not verify with the local public key")
			require.False(t, s.verify(s.key.Public(), []byte("other input"), sig))

			r := importVerify(t, e, name, s, input, s.sign(t, s.key, input), "v1")
			requireStatus(t, r, 200, "")
			require.Equal(t, true, r.data["valid"])
		})
	}
}

func TestImportPublicKeyOnly(t *testing.T) {
	e := getTestBackend(t)
	for _, s := range importSigners(t) {
		t.Run(s.keyType, func(t *testing.T) {
			name := "pub-" + s.keyType
			e.mustWrite(t, "keys/"+name+"/import", map[string]interface{}{
				"type":       s.keyType,
				"public_key": importPublicPEM(t, s.key.Public()),
			})
			input := []byte("verified by a public key")
			sig := s.sign(t, s.key, input)

			r := importVerify(t, e, name, s, input, sig, "v1")
			requireStatus(t, r, 200, "")
			require.Equal(t, true, r.data["valid"])

			r = importVerify(t, e, name, s, []byte("tampered"), sig, "v1")
			requireStatus(t, r, 200, "")
			require.Equal(t, false, r.data["valid"])

			r = e.write(t, "sign/"+name, map[string]interface{}{"input": base64.StdEncoding.EncodeToString(input)})
			requireStatus(t, r, 400, "does not contain a private part")

			// The private half can be supplied later for that version.
			e.mustWrite(t, "keys/"+name+"/import_version", map[string]interface{}{
				"version":    1,
				"ciphertext": importWrap(t, e, importPKCS8(t, s.key), sha256.New()),
			})
			r = e.read(t, "keys/"+name)
			require.Equal(t, float64(1), r.data["latest_version"])
			tsig := importSign(t, e, name, s, input)
			require.True(t, s.verify(s.key.Public(), input, tsig))
		})
	}
}

func TestImportVersion(t *testing.T) {
	e := getTestBackend(t)
	first, second := importRandom(t, 32), importRandom(t, 32)
	e.mustWrite(t, "keys/k/import", map[string]interface{}{"ciphertext": importWrap(t, e, first, sha256.New())})
	ct1 := importLocalCiphertext(t, first, "v1", "one")

	e.mustWrite(t, "keys/k/import_version", map[string]interface{}{"ciphertext": importWrap(t, e, second, sha256.New())})
	r := e.read(t, "keys/k")
	require.Equal(t, float64(2), r.data["latest_version"])
	keys, ok := r.data["keys"].(map[string]interface{})
	require.True(t, ok)
	require.Len(t, keys, 2)

	cases := []struct {
		name string
		ct   string
		want string
	}{
		{"v1 still decrypts", ct1, "one"},
		{"v2 is the new key", importLocalCiphertext(t, second, "v2", "two"), "two"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, e.decrypt(t, "k", tc.ct, nil))
		})
	}
	t.Run("new encryptions use v2", func(t *testing.T) {
		ct := e.encrypt(t, "k", "latest", nil)
		require.True(t, strings.HasPrefix(ct, "vault:v2:"), ct)
	})
	t.Run("v1 material under the v2 label fails", func(t *testing.T) {
		r := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": importLocalCiphertext(t, first, "v2", "x")})
		requireStatus(t, r, 400, "message authentication failed")
	})
}

func TestImportErrors(t *testing.T) {
	e := getTestBackend(t)
	aesKey := importRandom(t, 32)
	good := importWrap(t, e, aesKey, sha256.New())
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	ecPEM := importPublicPEM(t, ecKey.Public())

	e.mustWrite(t, "keys/exists", nil)

	cases := []struct {
		name   string
		data   map[string]interface{}
		status int
		msg    string
	}{
		{"convergent_encryption given", map[string]interface{}{"ciphertext": good, "convergent_encryption": true, "derived": true}, 400, "convergent encryption"},
		{"auto_rotate_period without allow_rotation", map[string]interface{}{"ciphertext": good, "auto_rotate_period": "24h"}, 400, "allow_rotation must be set to true"},
		{"both ciphertext and public_key", map[string]interface{}{"ciphertext": good, "public_key": ecPEM, "type": "ecdsa-p256"}, 400, "only one of"},
		{"neither ciphertext nor public_key", map[string]interface{}{"type": "aes256-gcm96"}, 400, "ciphertext"},
		{"bad base64", map[string]interface{}{"ciphertext": "not base64!!"}, 400, "base64"},
		{"too short ciphertext", map[string]interface{}{"ciphertext": base64.StdEncoding.EncodeToString(importRandom(t, 100))}, 400, "too short"},
		{"just the wrapped key", map[string]interface{}{"ciphertext": base64.StdEncoding.EncodeToString(importRandom(t, 512))}, 400, "too short"},
		{"unknown hash_function", map[string]interface{}{"ciphertext": good, "hash_function": "MD5"}, 400, "unknown hash function"},
		{"wrong hash_function", map[string]interface{}{"ciphertext": good, "hash_function": "SHA1"}, 400, "decryption error"},
		{"garbage after a valid wrapped key", map[string]interface{}{"ciphertext": base64.StdEncoding.EncodeToString(append(importRandom(t, 512), importRandom(t, 40)...))}, 400, ""},
		{"unknown type", map[string]interface{}{"ciphertext": good, "type": "aes512-gcm"}, 400, "unknown key type"},
		{"public_key for aes", map[string]interface{}{"public_key": ecPEM, "type": "aes256-gcm96"}, 400, "does not support public_key import"},
		{"wrong key size", map[string]interface{}{"ciphertext": good, "type": "aes128-gcm96"}, 400, "invalid key size"},
		{"aes bytes as ecdsa", map[string]interface{}{"ciphertext": good, "type": "ecdsa-p256"}, 400, ""},
		{"public key of another type", map[string]interface{}{"public_key": ecPEM, "type": "ed25519"}, 400, ""},
		{"public key not PEM", map[string]interface{}{"public_key": "nope", "type": "ecdsa-p256"}, 400, ""},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			name := "bad" + string(rune('a'+i))
			r := e.write(t, "keys/"+name+"/import", tc.data)
			t.Logf("%d %s", r.status, r.errorMessage())
			requireStatus(t, r, tc.status, tc.msg)
			require.Equal(t, 404, e.read(t, "keys/"+name).status, "a failed import left a key behind")
		})
	}

	t.Run("existing key", func(t *testing.T) {
		r := e.write(t, "keys/exists/import", map[string]interface{}{"ciphertext": good})
		requireStatus(t, r, 400, "cannot be used with an existing key")
		require.Equal(t, false, e.read(t, "keys/exists").data["imported_key"])
	})

	e.mustWrite(t, "keys/imported/import", map[string]interface{}{"ciphertext": good})
	e.mustWrite(t, "keys/rotatable/import", map[string]interface{}{"ciphertext": good, "allow_rotation": true, "auto_rotate_period": "24h"})
	e.mustWrite(t, "keys/pubonly/import", map[string]interface{}{"type": "ecdsa-p256", "public_key": ecPEM})
	otherEC, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	otherWrapped := importWrap(t, e, importPKCS8(t, otherEC), sha256.New())

	versionCases := []struct {
		name   string
		path   string
		data   map[string]interface{}
		status int
		msg    string
	}{
		{"import_version on a non-imported key", "keys/exists/import_version", map[string]interface{}{"ciphertext": good}, 400, "can only be used with an imported key"},
		{"import_version on a missing key", "keys/missing/import_version", map[string]interface{}{"ciphertext": good}, 400, "no key found"},
		{"import_version with both fields", "keys/imported/import_version", map[string]interface{}{"ciphertext": good, "public_key": ecPEM}, 400, "only one of"},
		{"import_version public_key for aes", "keys/imported/import_version", map[string]interface{}{"public_key": ecPEM}, 400, "does not support public_key import"},
		{"import_version wrong hash", "keys/imported/import_version", map[string]interface{}{"ciphertext": good, "hash_function": "SHA512"}, 400, ""},
		{"rotate without allow_rotation", "keys/imported/rotate", nil, 400, "does not allow rotation"},
		{"import_version private key not matching the version", "keys/pubonly/import_version", map[string]interface{}{"ciphertext": otherWrapped, "version": 1}, 400, ""},
		{"import_version of a version that does not exist", "keys/pubonly/import_version", map[string]interface{}{"ciphertext": otherWrapped, "version": 7}, 400, ""},
	}
	for _, tc := range versionCases {
		t.Run(tc.name, func(t *testing.T) {
			r := e.write(t, tc.path, tc.data)
			t.Logf("%d %s", r.status, r.errorMessage())
			requireStatus(t, r, tc.status, tc.msg)
		})
	}
	require.Equal(t, float64(1), e.read(t, "keys/imported").data["latest_version"])
	require.Equal(t, 404, e.read(t, "keys/missing").status)
	r := e.write(t, "sign/pubonly", map[string]interface{}{"input": b64("x")})
	requireStatus(t, r, 400, "does not contain a private part")

	t.Run("rotate with allow_rotation", func(t *testing.T) {
		r := e.read(t, "keys/rotatable")
		require.Equal(t, true, r.data["imported_key_allow_rotation"])
		require.Equal(t, float64(24*3600), r.data["auto_rotate_period"])
		e.mustWrite(t, "keys/rotatable/rotate", nil)
		require.Equal(t, float64(2), e.read(t, "keys/rotatable").data["latest_version"])
		ct := importLocalCiphertext(t, aesKey, "v1", "still here")
		require.Equal(t, "still here", e.decrypt(t, "rotatable", ct, nil))
	})
}

func TestImportHMACKey(t *testing.T) {
	e := getTestBackend(t)
	cases := []struct {
		name string
		size int
	}{
		{"32 bytes", 32},
		{"64 bytes", 64},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			name := "mac" + string(rune('a'+i))
			raw := importRandom(t, tc.size)
			e.mustWrite(t, "keys/"+name+"/import", map[string]interface{}{
				"type":       "hmac",
				"ciphertext": importWrap(t, e, raw, sha256.New()),
			})
			input := []byte("mac input")
			out := e.mustWrite(t, "hmac/"+name, map[string]interface{}{"input": base64.StdEncoding.EncodeToString(input)})
			m := hmac.New(sha256.New, raw)
			m.Write(input)
			require.Equal(t, "vault:v1:"+base64.StdEncoding.EncodeToString(m.Sum(nil)), out["hmac"])
			require.Equal(t, float64(tc.size), e.read(t, "keys/"+name).data["key_size"])
		})
	}
}
