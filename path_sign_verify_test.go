package hsmtransit

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha3"
	"crypto/sha512"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"hash"
	"math/big"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"
)

// svHashes are the sign hash algorithms with their stdlib implementations.
var svHashes = map[string]struct {
	id  crypto.Hash
	new func() hash.Hash
}{
	"sha1":     {crypto.SHA1, sha1.New},
	"sha2-224": {crypto.SHA224, sha256.New224},
	"sha2-256": {crypto.SHA256, sha256.New},
	"sha2-384": {crypto.SHA384, sha512.New384},
	"sha2-512": {crypto.SHA512, sha512.New},
	"sha3-224": {crypto.SHA3_224, func() hash.Hash { return sha3.New224() }},
	"sha3-256": {crypto.SHA3_256, func() hash.Hash { return sha3.New256() }},
	"sha3-384": {crypto.SHA3_384, func() hash.Hash { return sha3.New384() }},
	"sha3-512": {crypto.SHA3_512, func() hash.Hash { return sha3.New512() }},
}

// svDigest hashes msg with the named algorithm using the standard library.
func svDigest(t *testing.T, alg string, msg []byte) (crypto.Hash, []byte) {
	t.Helper()
	h, ok := svHashes[alg]
	require.Truef(t, ok, "unknown test hash %q", alg)
	f := h.new()
	f.Write(msg)
	return h.id, f.Sum(nil)
}

// svKey creates a key of the given type, with extra creation options.
func svKey(t *testing.T, e *testEnv, name, keyType string, extra map[string]interface{}) {
	t.Helper()
	data := map[string]interface{}{"type": keyType}
	for k, v := range extra {
		data[k] = v
	}
	e.mustWrite(t, "keys/"+name, data)
}

// svSign signs through path with data and returns the signature and the
// reported key version, requiring a 200.
func svSign(t *testing.T, e *testEnv, path string, data map[string]interface{}) (string, int) {
	t.Helper()
	r := e.write(t, path, data)
	requireStatus(t, r, 200, "")
	sig, ok := r.data["signature"].(string)
	require.Truef(t, ok, "signature in %#v", r.data)
	ver, ok := r.data["key_version"].(float64)
	require.Truef(t, ok, "key_version in %#v", r.data)
	return sig, int(ver)
}

// svVerify verifies through path and returns valid, requiring a 200.
func svVerify(t *testing.T, e *testEnv, path string, data map[string]interface{}) bool {
	t.Helper()
	r := e.write(t, path, data)
	requireStatus(t, r, 200, "")
	valid, ok := r.data["valid"].(bool)
	require.Truef(t, ok, "valid in %#v", r.data)
	return valid
}

// svSigBytes checks a signature's vault:v<version>: prefix and decodes the
// rest with enc.
func svSigBytes(t *testing.T, sig string, version int, enc *base64.Encoding) []byte {
	t.Helper()
	prefix := fmt.Sprintf("vault:v%d:", version)
	require.Truef(t, strings.HasPrefix(sig, prefix), "signature %q lacks %q", sig, prefix)
	raw, err := enc.DecodeString(strings.TrimPrefix(sig, prefix))
	require.NoError(t, err)
	return raw
}

// svPublicKey reads one version's public key from export/public-key.
func svPublicKey(t *testing.T, e *testEnv, name string, version int) crypto.PublicKey {
	t.Helper()
	r := e.read(t, fmt.Sprintf("export/public-key/%s/%d", name, version))
	requireStatus(t, r, 200, "")
	keys, ok := r.data["keys"].(map[string]interface{})
	require.True(t, ok)
	s, ok := keys[strconv.Itoa(version)].(string)
	require.Truef(t, ok, "version %d in %#v", version, keys)
	if block, _ := pem.Decode([]byte(s)); block != nil {
		pub, err := x509.ParsePKIXPublicKey(block.Bytes)
		require.NoError(t, err)
		return pub
	}
	raw, err := base64.StdEncoding.DecodeString(s)
	require.NoError(t, err)
	require.Len(t, raw, ed25519.PublicKeySize)
	return ed25519.PublicKey(raw)
}

func svB64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func TestSignVerifyEveryKeyType(t *testing.T) {
	e := getTestBackend(t)
	msg := []byte("the quick brown fox")
	tampered := []byte("the quick brown fox!")
	cases := []struct {
		keyType string
		check   func(t *testing.T, pub crypto.PublicKey, sig []byte)
		slow    bool
	}{
		{keyType: "ecdsa-p256", check: svCheckECDSA("P-256")},
		{keyType: "ecdsa-p384", check: svCheckECDSA("P-384")},
		{keyType: "ecdsa-p521", check: svCheckECDSA("P-521")},
		{keyType: "ed25519", check: func(t *testing.T, pub crypto.PublicKey, sig []byte) {
			k, ok := pub.(ed25519.PublicKey)
			require.True(t, ok, "%T", pub)
			require.True(t, ed25519.Verify(k, msg, sig))
			require.False(t, ed25519.Verify(k, tampered, sig))
		}},
		{keyType: "rsa-2048", check: svCheckRSAPSS(2048)},
		{keyType: "rsa-3072", check: svCheckRSAPSS(3072), slow: true},
		{keyType: "rsa-4096", check: svCheckRSAPSS(4096), slow: true},
	}
	for _, tc := range cases {
		t.Run(tc.keyType, func(t *testing.T) {
			if tc.slow && testing.Short() {
				t.Skip("slow key generation")
			}
			svKey(t, e, tc.keyType, tc.keyType, nil)
			r := e.write(t, "sign/"+tc.keyType, map[string]interface{}{"input": svB64(msg)})
			requireStatus(t, r, 200, "")
			require.Equal(t, float64(1), r.data["key_version"])
			require.NotContains(t, r.data, "public_key", "only derived keys return a public key")
			sig := r.data["signature"].(string)
			tc.check(t, svPublicKey(t, e, tc.keyType, 1), svSigBytes(t, sig, 1, base64.StdEncoding))

			require.True(t, svVerify(t, e, "verify/"+tc.keyType, map[string]interface{}{"input": svB64(msg), "signature": sig}))
			require.False(t, svVerify(t, e, "verify/"+tc.keyType, map[string]interface{}{"input": svB64(tampered), "signature": sig}))
		})
	}
}

// svCheckECDSA checks an ASN.1 ECDSA signature of sha2-256("the quick brown
// fox") with the standard library.
func svCheckECDSA(curve string) func(t *testing.T, pub crypto.PublicKey, sig []byte) {
	return func(t *testing.T, pub crypto.PublicKey, sig []byte) {
		k, ok := pub.(*ecdsa.PublicKey)
		require.True(t, ok, "%T", pub)
		require.Equal(t, curve, k.Curve.Params().Name)
		digest := sha256.Sum256([]byte("the quick brown fox"))
		require.True(t, ecdsa.VerifyASN1(k, digest[:], sig))
		other := sha256.Sum256([]byte("the quick brown fox!"))
		require.False(t, ecdsa.VerifyASN1(k, other[:], sig))
	}
}

// svCheckRSAPSS checks an RSA-PSS (auto salt) signature of
// sha2-256("the quick brown fox") with the standard library.
func svCheckRSAPSS(bits int) func(t *testing.T, pub crypto.PublicKey, sig []byte) {
	return func(t *testing.T, pub crypto.PublicKey, sig []byte) {
		k, ok := pub.(*rsa.PublicKey)
		require.True(t, ok, "%T", pub)
		require.Equal(t, bits, k.N.BitLen())
		digest := sha256.Sum256([]byte("the quick brown fox"))
		require.NoError(t, rsa.VerifyPSS(k, crypto.SHA256, digest[:], sig, nil))
		other := sha256.Sum256([]byte("the quick brown fox!"))
		require.Error(t, rsa.VerifyPSS(k, crypto.SHA256, other[:], sig, nil))
	}
}

// svCheckSig verifies sig over digest (of msg) with an ECDSA or RSA-PSS key.
func svCheckSig(t *testing.T, pub crypto.PublicKey, h crypto.Hash, digest, sig []byte) {
	t.Helper()
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		require.True(t, ecdsa.VerifyASN1(k, digest, sig), "ecdsa signature does not verify")
	case *rsa.PublicKey:
		require.NoError(t, rsa.VerifyPSS(k, h, digest, sig, nil))
	default:
		t.Fatalf("unexpected public key %T", pub)
	}
}

func TestSignHashAlgorithms(t *testing.T) {
	e := getTestBackend(t)
	svKey(t, e, "ec", "ecdsa-p256", nil)
	svKey(t, e, "rsa", "rsa-2048", nil)
	pubs := map[string]crypto.PublicKey{"ec": svPublicKey(t, e, "ec", 1), "rsa": svPublicKey(t, e, "rsa", 1)}
	msg := []byte("hash me")

	type tc struct {
		name, key, alg string
		inURL          bool
	}
	var cases []tc
	for _, key := range []string{"ec", "rsa"} {
		for _, alg := range []string{"sha1", "sha2-224", "sha2-256", "sha2-384", "sha2-512", "sha3-224", "sha3-256", "sha3-384", "sha3-512"} {
			cases = append(cases,
				tc{name: key + "/body/" + alg, key: key, alg: alg},
				tc{name: key + "/url/" + alg, key: key, alg: alg, inURL: true})
		}
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := "sign/" + c.key
			data := map[string]interface{}{"input": svB64(msg)}
			if c.inURL {
				path += "/" + c.alg
				// The URL's algorithm wins over the body's.
				data["hash_algorithm"] = "sha2-256"
				if c.alg == "sha2-256" {
					data["hash_algorithm"] = "sha2-512"
				}
			} else {
				data["hash_algorithm"] = c.alg
			}
			sig, ver := svSign(t, e, path, data)
			require.Equal(t, 1, ver)
			h, digest := svDigest(t, c.alg, msg)
			svCheckSig(t, pubs[c.key], h, digest, svSigBytes(t, sig, 1, base64.StdEncoding))

			// Verify with the algorithm in the body, then in the URL.
			require.True(t, svVerify(t, e, "verify/"+c.key, map[string]interface{}{
				"input": svB64(msg), "signature": sig, "hash_algorithm": c.alg,
			}))
			require.True(t, svVerify(t, e, "verify/"+c.key+"/"+c.alg, map[string]interface{}{
				"input": svB64(msg), "signature": sig,
			}))
			other := "sha2-384"
			if c.alg == other {
				other = "sha2-256"
			}
			require.False(t, svVerify(t, e, "verify/"+c.key, map[string]interface{}{
				"input": svB64(msg), "signature": sig, "hash_algorithm": other,
			}), "verified with the wrong hash algorithm")
		})
	}
}

func TestSignPrehashed(t *testing.T) {
	e := getTestBackend(t)
	svKey(t, e, "p256", "ecdsa-p256", nil)
	svKey(t, e, "p384", "ecdsa-p384", nil)
	svKey(t, e, "rsa", "rsa-2048", nil)
	msg := []byte("prehash me")
	cases := []struct {
		name, key, alg, sigAlg string
	}{
		{"ecdsa-p256 sha2-256", "p256", "sha2-256", ""},
		{"ecdsa-p384 sha2-384", "p384", "sha2-384", ""},
		{"rsa pss sha2-512", "rsa", "sha2-512", "pss"},
		{"rsa pkcs1v15 sha2-256", "rsa", "sha2-256", "pkcs1v15"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h, digest := svDigest(t, c.alg, msg)
			opts := map[string]interface{}{"hash_algorithm": c.alg, "signature_algorithm": c.sigAlg}
			with := func(extra map[string]interface{}) map[string]interface{} {
				out := map[string]interface{}{}
				for k, v := range opts {
					out[k] = v
				}
				for k, v := range extra {
					out[k] = v
				}
				return out
			}
			sig, _ := svSign(t, e, "sign/"+c.key, with(map[string]interface{}{"input": svB64(digest), "prehashed": true}))
			raw := svSigBytes(t, sig, 1, base64.StdEncoding)
			pub := svPublicKey(t, e, c.key, 1)
			if c.sigAlg == "pkcs1v15" {
				require.NoError(t, rsa.VerifyPKCS1v15(pub.(*rsa.PublicKey), h, digest, raw))
			} else {
				svCheckSig(t, pub, h, digest, raw)
			}

			// The same signature verifies over the digest (prehashed) and over
			// the message (hashed by the engine).
			require.True(t, svVerify(t, e, "verify/"+c.key, with(map[string]interface{}{
				"input": svB64(digest), "prehashed": true, "signature": sig,
			})))
			require.True(t, svVerify(t, e, "verify/"+c.key, with(map[string]interface{}{
				"input": svB64(msg), "signature": sig,
			})))
			// The message passed as if it were the digest is something else.
			_, otherDigest := svDigest(t, c.alg, []byte("another message"))
			require.False(t, svVerify(t, e, "verify/"+c.key, with(map[string]interface{}{
				"input": svB64(otherDigest), "prehashed": true, "signature": sig,
			})))
		})
	}

	t.Run("rsa prehashed input of the wrong length", func(t *testing.T) {
		r := e.write(t, "sign/rsa", map[string]interface{}{
			"input": svB64([]byte("not a sha2-256 digest")), "prehashed": true, "hash_algorithm": "sha2-256",
		})
		requireStatus(t, r, 400, "input must be hashed with given hash")
		require.Nil(t, r.data["signature"])
	})
}

func TestSignRSASignatureAlgorithm(t *testing.T) {
	e := getTestBackend(t)
	svKey(t, e, "rsa", "rsa-2048", nil)
	pub := svPublicKey(t, e, "rsa", 1).(*rsa.PublicKey)
	msg := []byte("rsa message")
	digest := sha256.Sum256(msg)
	isPSS := func(t *testing.T, sig []byte) {
		require.NoError(t, rsa.VerifyPSS(pub, crypto.SHA256, digest[:], sig, nil))
		require.Error(t, rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig))
	}
	isPKCS1v15 := func(t *testing.T, sig []byte) {
		require.NoError(t, rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig))
		require.Error(t, rsa.VerifyPSS(pub, crypto.SHA256, digest[:], sig, nil))
	}
	cases := []struct {
		name, sigAlg, other string
		check               func(t *testing.T, sig []byte)
	}{
		{"default is pss", "", "pkcs1v15", isPSS},
		{"pss", "pss", "pkcs1v15", isPSS},
		{"pkcs1v15", "pkcs1v15", "pss", isPKCS1v15},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			data := map[string]interface{}{"input": svB64(msg)}
			if c.sigAlg != "" {
				data["signature_algorithm"] = c.sigAlg
			}
			sig, _ := svSign(t, e, "sign/rsa", data)
			c.check(t, svSigBytes(t, sig, 1, base64.StdEncoding))
			data["signature"] = sig
			require.True(t, svVerify(t, e, "verify/rsa", data))
			data["signature_algorithm"] = c.other
			require.False(t, svVerify(t, e, "verify/rsa", data), "verified with the other scheme")
		})
	}

	for _, path := range []string{"sign/rsa", "verify/rsa"} {
		t.Run("unknown scheme on "+path, func(t *testing.T) {
			r := e.write(t, path, map[string]interface{}{
				"input": svB64(msg), "signature_algorithm": "foo", "signature": "vault:v1:AAAA",
			})
			requireStatus(t, r, 400, "unsupported rsa signature algorithm")
		})
	}
}

func TestSignRSASaltLength(t *testing.T) {
	e := getTestBackend(t)
	svKey(t, e, "rsa", "rsa-2048", nil)
	pub := svPublicKey(t, e, "rsa", 1).(*rsa.PublicKey)
	msg := []byte("salty")
	digest := sha256.Sum256(msg)
	maxSalt := 2048/8 - sha256.Size - 2

	cases := []struct {
		name, salt string
		wantSalt   int // the exact salt length in the signature
		otherSalt  string
	}{
		{"auto", "auto", maxSalt, "hash"},
		{"hash", "hash", sha256.Size, "20"},
		{"upper-case hash", "HASH", sha256.Size, "20"},
		{"number", "20", 20, "hash"},
		{"zero", "0", 0, "hash"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			data := map[string]interface{}{"input": svB64(msg), "salt_length": c.salt}
			sig, _ := svSign(t, e, "sign/rsa", data)
			raw := svSigBytes(t, sig, 1, base64.StdEncoding)
			require.NoError(t, rsa.VerifyPSS(pub, crypto.SHA256, digest[:], raw, &rsa.PSSOptions{SaltLength: c.wantSalt}))
			wrong := c.wantSalt + 1
			require.Error(t, rsa.VerifyPSS(pub, crypto.SHA256, digest[:], raw, &rsa.PSSOptions{SaltLength: wrong}))

			data["signature"] = sig
			require.True(t, svVerify(t, e, "verify/rsa", data))
			delete(data, "salt_length") // auto detects any salt length
			require.True(t, svVerify(t, e, "verify/rsa", data))
			data["salt_length"] = c.otherSalt
			require.False(t, svVerify(t, e, "verify/rsa", data), "verified with salt_length %s", c.otherSalt)
		})
	}

	errCases := []struct{ name, salt, msg string }{
		{"not a number", "abc", "salt length neither 'auto', 'hash', nor an int"},
		{"empty", "", "salt length neither 'auto', 'hash', nor an int"},
		{"below -1", "-3", "salt length is invalid"},
		{"above the maximum", "1000", "requested salt length 1000 is invalid"},
	}
	for _, c := range errCases {
		for _, path := range []string{"sign/rsa", "verify/rsa"} {
			t.Run(c.name+" on "+path, func(t *testing.T) {
				r := e.write(t, path, map[string]interface{}{
					"input": svB64(msg), "salt_length": c.salt,
					"signature": "vault:v1:" + svB64(make([]byte, 256)),
				})
				requireStatus(t, r, 400, c.msg)
			})
		}
	}
}

func TestSignHashAlgorithmNone(t *testing.T) {
	e := getTestBackend(t)
	svKey(t, e, "rsa", "rsa-2048", nil)
	pub := svPublicKey(t, e, "rsa", 1).(*rsa.PublicKey)
	// With no hash, PKCS#1 v1.5 signs the input as given (no DigestInfo).
	input := []byte("raw input with no DigestInfo")

	t.Run("prehashed pkcs1v15 in the body", func(t *testing.T) {
		data := map[string]interface{}{
			"input": svB64(input), "hash_algorithm": "none", "prehashed": true, "signature_algorithm": "pkcs1v15",
		}
		sig, _ := svSign(t, e, "sign/rsa", data)
		raw := svSigBytes(t, sig, 1, base64.StdEncoding)
		require.NoError(t, rsa.VerifyPKCS1v15(pub, crypto.Hash(0), input, raw))
		data["signature"] = sig
		require.True(t, svVerify(t, e, "verify/rsa", data))
		data["input"] = svB64([]byte("other input"))
		require.False(t, svVerify(t, e, "verify/rsa", data))
	})

	t.Run("prehashed pkcs1v15 in the URL", func(t *testing.T) {
		data := map[string]interface{}{"input": svB64(input), "prehashed": true, "signature_algorithm": "pkcs1v15"}
		sig, _ := svSign(t, e, "sign/rsa/none", data)
		require.NoError(t, rsa.VerifyPKCS1v15(pub, crypto.Hash(0), input, svSigBytes(t, sig, 1, base64.StdEncoding)))
		data["signature"] = sig
		require.True(t, svVerify(t, e, "verify/rsa/none", data))
	})

	const want = "hash_algorithm=none requires both prehashed=true and signature_algorithm=pkcs1v15"
	errCases := []struct {
		name string
		data map[string]interface{}
	}{
		{"not prehashed", map[string]interface{}{"signature_algorithm": "pkcs1v15"}},
		{"pss", map[string]interface{}{"prehashed": true, "signature_algorithm": "pss"}},
		{"default scheme", map[string]interface{}{"prehashed": true}},
	}
	for _, c := range errCases {
		for _, path := range []string{"sign/rsa", "verify/rsa"} {
			t.Run(c.name+" on "+path, func(t *testing.T) {
				data := map[string]interface{}{"input": svB64(input), "hash_algorithm": "none", "signature": "vault:v1:AAAA"}
				for k, v := range c.data {
					data[k] = v
				}
				requireStatus(t, e.write(t, path, data), 400, want)
			})
		}
	}
}

func TestSignMarshalingJWS(t *testing.T) {
	e := getTestBackend(t)
	msg := []byte("jws payload")
	digest := sha256.Sum256(msg)
	urlSafe := regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
	cases := []struct {
		keyType string
		size    int // bytes of r and of s
	}{
		{"ecdsa-p256", 32},
		{"ecdsa-p384", 48},
		{"ecdsa-p521", 66},
	}
	for _, c := range cases {
		t.Run(c.keyType, func(t *testing.T) {
			svKey(t, e, c.keyType, c.keyType, nil)
			pub := svPublicKey(t, e, c.keyType, 1).(*ecdsa.PublicKey)
			data := map[string]interface{}{"input": svB64(msg), "marshaling_algorithm": "jws"}
			sig, _ := svSign(t, e, "sign/"+c.keyType, data)
			encoded := strings.TrimPrefix(sig, "vault:v1:")
			require.Regexp(t, urlSafe, encoded, "unpadded base64url")
			raw := svSigBytes(t, sig, 1, base64.RawURLEncoding)
			require.Len(t, raw, 2*c.size)
			r := new(big.Int).SetBytes(raw[:c.size])
			s := new(big.Int).SetBytes(raw[c.size:])
			require.True(t, ecdsa.Verify(pub, digest[:], r, s))

			data["signature"] = sig
			require.True(t, svVerify(t, e, "verify/"+c.keyType, data))
			data["input"] = svB64([]byte("other payload"))
			require.False(t, svVerify(t, e, "verify/"+c.keyType, data))
		})
	}

	svKey(t, e, "ec", "ecdsa-p256", nil)
	for _, path := range []string{"sign/ec", "verify/ec"} {
		t.Run("invalid marshaling on "+path, func(t *testing.T) {
			r := e.write(t, path, map[string]interface{}{
				"input": svB64(msg), "marshaling_algorithm": "der", "signature": "vault:v1:AAAA",
			})
			requireStatus(t, r, 400, `invalid marshaling type "der"`)
		})
	}
}

func TestSignEd25519Derived(t *testing.T) {
	e := getTestBackend(t)
	svKey(t, e, "ed", "ed25519", map[string]interface{}{"derived": true})
	msg := []byte("derived message")
	ctx1, ctx2 := b64("context one"), b64("context two")

	signWith := func(t *testing.T, ctx string) (string, ed25519.PublicKey) {
		r := e.write(t, "sign/ed", map[string]interface{}{"input": svB64(msg), "context": ctx})
		requireStatus(t, r, 200, "")
		pubB64, ok := r.data["public_key"].(string)
		require.Truef(t, ok, "public_key in %#v", r.data)
		raw, err := base64.StdEncoding.DecodeString(pubB64)
		require.NoError(t, err)
		require.Len(t, raw, ed25519.PublicKeySize)
		return r.data["signature"].(string), raw
	}
	sig1, pub1 := signWith(t, ctx1)
	sig2, pub2 := signWith(t, ctx2)

	t.Run("public keys differ per context and verify independently", func(t *testing.T) {
		require.NotEqual(t, pub1, pub2)
		require.True(t, ed25519.Verify(pub1, msg, svSigBytes(t, sig1, 1, base64.StdEncoding)))
		require.True(t, ed25519.Verify(pub2, msg, svSigBytes(t, sig2, 1, base64.StdEncoding)))
		require.False(t, ed25519.Verify(pub1, msg, svSigBytes(t, sig2, 1, base64.StdEncoding)))
		// keys/:name with a context returns the same per-context public key.
		rr := e.do(t, logical.ReadOperation, "keys/ed", map[string]interface{}{"context": ctx1})
		requireStatus(t, rr, 200, "")
		keys := rr.data["keys"].(map[string]interface{})
		require.Equal(t, svB64(pub1), keys["1"].(map[string]interface{})["public_key"])
	})

	verifyCases := []struct {
		name, sig, ctx string
		valid          bool
	}{
		{"own context", sig1, ctx1, true},
		{"other context", sig1, ctx2, false},
		{"second signature with its context", sig2, ctx2, true},
	}
	for _, c := range verifyCases {
		t.Run("verify "+c.name, func(t *testing.T) {
			require.Equal(t, c.valid, svVerify(t, e, "verify/ed", map[string]interface{}{
				"input": svB64(msg), "signature": c.sig, "context": c.ctx,
			}))
		})
	}

	errCases := []struct {
		name, path string
		data       map[string]interface{}
		msg        string
	}{
		{"sign without context", "sign/ed", map[string]interface{}{"input": svB64(msg)}, "context"},
		{"verify without context", "verify/ed", map[string]interface{}{"input": svB64(msg), "signature": sig1}, "context"},
		{"sign with non-base64 context", "sign/ed", map[string]interface{}{"input": svB64(msg), "context": "%%%"}, "failed to base64-decode context"},
		{"verify with non-base64 context", "verify/ed", map[string]interface{}{"input": svB64(msg), "signature": sig1, "context": "%%%"}, "failed to parse context"},
	}
	for _, c := range errCases {
		t.Run(c.name, func(t *testing.T) {
			requireStatus(t, e.write(t, c.path, c.data), 400, c.msg)
		})
	}
}

func TestSignEd25519Refusals(t *testing.T) {
	e := getTestBackend(t)
	svKey(t, e, "ed", "ed25519", nil)
	msg := svB64([]byte("pure ed25519 only"))
	sig, _ := svSign(t, e, "sign/ed", map[string]interface{}{"input": msg})

	// Built-in transit checks these per item: the message names the item, and
	// a batch answers 200 with the error on each item.
	const (
		prehashed = "only Pure Ed25519 signatures supported, prehashed must be false"
		sha512    = "only Pure Ed25519 signatures supported, hash_alogithm should not be set"
		sigCtx    = "only Pure Ed25519 signatures supported, signature_context must be empty"
		signPfx   = "failed to parse batch item: "
		verifyPfx = "failed to parse item: failed to parse batch item: "
	)
	cases := []struct {
		name, path string
		data       map[string]interface{}
		msg        string
	}{
		{"sign prehashed", "sign/ed", map[string]interface{}{"prehashed": true}, signPfx + prehashed},
		{"verify prehashed", "verify/ed", map[string]interface{}{"prehashed": true}, verifyPfx + prehashed},
		{"sign sha2-512 in body", "sign/ed", map[string]interface{}{"hash_algorithm": "sha2-512"}, signPfx + sha512},
		{"sign sha2-512 in URL", "sign/ed/sha2-512", nil, signPfx + sha512},
		{"verify sha2-512 in body", "verify/ed", map[string]interface{}{"hash_algorithm": "sha2-512"}, verifyPfx + sha512},
		{"verify sha2-512 in URL", "verify/ed/sha2-512", nil, verifyPfx + sha512},
		{"sign signature_context", "sign/ed", map[string]interface{}{"signature_context": b64("x")}, signPfx + sigCtx},
		{"verify signature_context", "verify/ed", map[string]interface{}{"signature_context": b64("x")}, verifyPfx + sigCtx},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			data := map[string]interface{}{"input": msg, "signature": sig}
			for k, v := range c.data {
				data[k] = v
			}
			requireStatus(t, e.write(t, c.path, data), 400, c.msg)
		})
	}

	batchCases := []struct {
		name, path string
		opts       map[string]interface{}
		items      []interface{}
		errs       []string // per item, "" for success
	}{
		{"sign prehashed", "sign/ed", map[string]interface{}{"prehashed": true}, []interface{}{
			map[string]interface{}{"input": msg, "reference": "a"},
			map[string]interface{}{"input": msg, "reference": "b"},
		}, []string{signPfx + prehashed, signPfx + prehashed}},
		{"sign sha2-512 in URL", "sign/ed/sha2-512", nil, []interface{}{
			map[string]interface{}{"input": msg, "reference": "a"},
		}, []string{signPfx + sha512}},
		{"verify prehashed", "verify/ed", map[string]interface{}{"prehashed": true}, []interface{}{
			map[string]interface{}{"input": msg, "signature": sig, "reference": "a"},
		}, []string{verifyPfx + prehashed}},
		{"sign signature_context on one item", "sign/ed", nil, []interface{}{
			map[string]interface{}{"input": msg, "reference": "a"},
			map[string]interface{}{"input": msg, "signature_context": b64("x"), "reference": "b"},
		}, []string{"", signPfx + sigCtx}},
		{"verify signature_context on one item", "verify/ed", nil, []interface{}{
			map[string]interface{}{"input": msg, "signature": sig, "signature_context": b64("x"), "reference": "a"},
			map[string]interface{}{"input": msg, "signature": sig, "reference": "b"},
		}, []string{verifyPfx + sigCtx, ""}},
	}
	for _, c := range batchCases {
		t.Run("batch "+c.name, func(t *testing.T) {
			data := map[string]interface{}{"batch_input": c.items}
			for k, v := range c.opts {
				data[k] = v
			}
			r := e.write(t, c.path, data)
			requireStatus(t, r, 200, "")
			results, ok := r.data["batch_results"].([]interface{})
			require.True(t, ok, "%#v", r.data)
			require.Len(t, results, len(c.errs))
			for i, want := range c.errs {
				item := results[i].(map[string]interface{})
				require.Equal(t, c.items[i].(map[string]interface{})["reference"], item["reference"])
				if want == "" {
					require.NotContains(t, item, "error")
					continue
				}
				require.Equal(t, want, item["error"], "item %d", i)
				require.Empty(t, item["signature"])
				if _, isVerify := item["valid"]; isVerify {
					require.Equal(t, false, item["valid"])
				}
			}
		})
	}

	// Other hash algorithms are ignored by pure Ed25519, as in built-in transit.
	t.Run("sha2-384 is ignored", func(t *testing.T) {
		s, _ := svSign(t, e, "sign/ed", map[string]interface{}{"input": msg, "hash_algorithm": "sha2-384"})
		require.True(t, svVerify(t, e, "verify/ed", map[string]interface{}{"input": msg, "signature": s}))
	})
}

func TestSignKeyVersion(t *testing.T) {
	e := getTestBackend(t)
	svKey(t, e, "ec", "ecdsa-p256", nil)
	e.mustWrite(t, "keys/ec/rotate", nil)
	e.mustWrite(t, "keys/ec/rotate", nil)
	msg := []byte("versioned")
	digest := sha256.Sum256(msg)

	sigs := map[int]string{}
	cases := []struct {
		name      string
		requested int
		want      int
	}{
		{"latest by default", 0, 3},
		{"version 1", 1, 1},
		{"version 2", 2, 2},
		{"version 3", 3, 3},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			data := map[string]interface{}{"input": svB64(msg)}
			if c.requested != 0 {
				data["key_version"] = c.requested
			}
			sig, ver := svSign(t, e, "sign/ec", data)
			require.Equal(t, c.want, ver)
			raw := svSigBytes(t, sig, c.want, base64.StdEncoding)
			require.True(t, ecdsa.VerifyASN1(svPublicKey(t, e, "ec", c.want).(*ecdsa.PublicKey), digest[:], raw))
			if c.want != 1 {
				// Signed by that version, not by version 1.
				require.False(t, ecdsa.VerifyASN1(svPublicKey(t, e, "ec", 1).(*ecdsa.PublicKey), digest[:], raw))
			}
			require.True(t, svVerify(t, e, "verify/ec", map[string]interface{}{"input": svB64(msg), "signature": sig}))
			sigs[c.want] = sig
		})
	}

	errCases := []struct {
		name    string
		version int
		msg     string
	}{
		{"negative", -1, "requested version for signing is negative"},
		{"beyond latest", 4, "requested version for signing is higher than the latest key version"},
	}
	for _, c := range errCases {
		t.Run(c.name, func(t *testing.T) {
			r := e.write(t, "sign/ec", map[string]interface{}{"input": svB64(msg), "key_version": c.version})
			requireStatus(t, r, 400, c.msg)
		})
	}

	e.mustWrite(t, "keys/ec/config", map[string]interface{}{"min_encryption_version": 2})
	minEncCases := []struct {
		name    string
		version int
		status  int
		msg     string
	}{
		{"below min_encryption_version", 1, 400, "requested version for signing is less than the minimum encryption key version"},
		{"at min_encryption_version", 2, 200, ""},
		{"latest", 0, 200, ""},
	}
	for _, c := range minEncCases {
		t.Run(c.name, func(t *testing.T) {
			r := e.write(t, "sign/ec", map[string]interface{}{"input": svB64(msg), "key_version": c.version})
			requireStatus(t, r, c.status, c.msg)
		})
	}
	t.Run("old signatures still verify before min_decryption_version moves", func(t *testing.T) {
		require.True(t, svVerify(t, e, "verify/ec", map[string]interface{}{"input": svB64(msg), "signature": sigs[1]}))
	})

	e.mustWrite(t, "keys/ec/config", map[string]interface{}{"min_decryption_version": 2})
	verifyCases := []struct {
		name   string
		sig    string
		status int
		msg    string
	}{
		{"below min_decryption_version", sigs[1], 400, "disallowed by policy (too old)"},
		{"at min_decryption_version", sigs[2], 200, ""},
		{"version too new", "vault:v4:" + strings.TrimPrefix(sigs[3], "vault:v3:"), 400, "invalid signature: version is too new"},
	}
	for _, c := range verifyCases {
		t.Run("verify "+c.name, func(t *testing.T) {
			r := e.write(t, "verify/ec", map[string]interface{}{"input": svB64(msg), "signature": c.sig})
			requireStatus(t, r, c.status, c.msg)
			if c.status == 200 {
				require.Equal(t, true, r.data["valid"])
			}
		})
	}
}

func TestSignErrors(t *testing.T) {
	e := getTestBackend(t)
	svKey(t, e, "ec", "ecdsa-p256", nil)
	svKey(t, e, "aes", "aes256-gcm96", nil)
	svKey(t, e, "mac", "hmac", map[string]interface{}{"key_size": 32})
	in := svB64([]byte("x"))
	cases := []struct {
		name, path string
		data       map[string]interface{}
		msg        string
	}{
		{"unknown key", "sign/nope", map[string]interface{}{"input": in}, "signing key not found"},
		{"aes256-gcm96 key", "sign/aes", map[string]interface{}{"input": in}, "key type aes256-gcm96 does not support signing"},
		{"hmac key", "sign/mac", map[string]interface{}{"input": in}, "key type hmac does not support signing"},
		{"invalid hash algorithm in body", "sign/ec", map[string]interface{}{"input": in, "hash_algorithm": "md5"}, `invalid hash algorithm "md5"`},
		{"invalid hash algorithm in URL", "sign/ec/md5", map[string]interface{}{"input": in}, `invalid hash algorithm "md5"`},
		{"invalid marshaling", "sign/ec", map[string]interface{}{"input": in, "marshaling_algorithm": "pem"}, `invalid marshaling type "pem"`},
		{"empty marshaling", "sign/ec", map[string]interface{}{"input": in, "marshaling_algorithm": ""}, `invalid marshaling type ""`},
		{"input not base64", "sign/ec", map[string]interface{}{"input": "not base64!"}, "unable to decode input"},
		{"context not base64", "sign/ec", map[string]interface{}{"input": in, "context": "%%"}, "failed to base64-decode context"},
		{"empty batch", "sign/ec", map[string]interface{}{"batch_input": []interface{}{}}, "missing batch input to process"},
		{"batch of non-objects", "sign/ec", map[string]interface{}{"batch_input": []interface{}{"x"}}, "expected a map"},
		{"batch item with a non-string", "sign/ec", map[string]interface{}{"batch_input": []interface{}{map[string]interface{}{"input": 5}}}, "expected type 'string'"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			requireStatus(t, e.write(t, c.path, c.data), 400, c.msg)
		})
	}
}

func TestVerifyErrors(t *testing.T) {
	e := getTestBackend(t)
	svKey(t, e, "ec", "ecdsa-p256", nil)
	svKey(t, e, "aes", "aes256-gcm96", nil)
	in := svB64([]byte("verify me"))
	sig, _ := svSign(t, e, "sign/ec", map[string]interface{}{"input": in})
	body := strings.TrimPrefix(sig, "vault:v1:")

	cases := []struct {
		name, path string
		data       map[string]interface{}
		msg        string
	}{
		{"no signature, hmac or cmac", "verify/ec", map[string]interface{}{"input": in}, "missing one of 'signature', 'hmac' or 'cmac' arguments to verify"},
		{"cmac", "verify/ec", map[string]interface{}{"input": in, "cmac": "vault:v1:AAAA"}, "cmac is only available in enterprise versions of Vault"},
		{"signature without vault: prefix", "verify/ec", map[string]interface{}{"input": in, "signature": body}, "invalid signature: no prefix"},
		{"signature with one field", "verify/ec", map[string]interface{}{"input": in, "signature": "vault:v1"}, "invalid signature: wrong number of fields"},
		{"signature with a bad version", "verify/ec", map[string]interface{}{"input": in, "signature": "vault:vx:" + body}, "version number could not be decoded"},
		{"signature not base64", "verify/ec", map[string]interface{}{"input": in, "signature": "vault:v1:!!!"}, "invalid base64 signature value"},
		{"signature not ASN.1", "verify/ec", map[string]interface{}{"input": in, "signature": "vault:v1:" + b64("garbage")}, "supplied signature is invalid"},
		{"input not base64", "verify/ec", map[string]interface{}{"input": "!!", "signature": sig}, "failed to parse input"},
		{"unknown key", "verify/nope", map[string]interface{}{"input": in, "signature": sig}, "signature verification key not found"},
		{"aes256-gcm96 key", "verify/aes", map[string]interface{}{"input": in, "signature": sig}, "key type aes256-gcm96 does not support signing"},
		{"invalid hash algorithm", "verify/ec", map[string]interface{}{"input": in, "signature": sig, "hash_algorithm": "md5"}, `invalid hash algorithm "md5"`},
		{"invalid hash algorithm in URL", "verify/ec/md5", map[string]interface{}{"input": in, "signature": sig}, `invalid hash algorithm "md5"`},
		{"empty batch", "verify/ec", map[string]interface{}{"batch_input": []interface{}{}}, "missing batch input to process"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			requireStatus(t, e.write(t, c.path, c.data), 400, c.msg)
		})
	}

	// As in built-in transit, a missing input is the empty input.
	t.Run("missing input is the empty input", func(t *testing.T) {
		empty, _ := svSign(t, e, "sign/ec", map[string]interface{}{})
		require.True(t, svVerify(t, e, "verify/ec", map[string]interface{}{"input": "", "signature": empty}))
		require.True(t, svVerify(t, e, "verify/ec", map[string]interface{}{"signature": empty}))
		require.False(t, svVerify(t, e, "verify/ec", map[string]interface{}{"signature": sig}))
	})

	// As in built-in transit, an item with both signature and hmac is a
	// signature item: the hmac is ignored.
	t.Run("signature wins over hmac", func(t *testing.T) {
		require.True(t, svVerify(t, e, "verify/ec", map[string]interface{}{"input": in, "signature": sig, "hmac": "vault:v1:AAAA"}))
		require.False(t, svVerify(t, e, "verify/ec", map[string]interface{}{"input": b64("other"), "signature": sig, "hmac": "vault:v1:AAAA"}))
	})
}

func TestSignVerifyBatch(t *testing.T) {
	e := getTestBackend(t)
	svKey(t, e, "ec", "ecdsa-p256", nil)
	pub := svPublicKey(t, e, "ec", 1).(*ecdsa.PublicKey)
	msgs := []string{"first", "second", "third"}

	r := e.write(t, "sign/ec", map[string]interface{}{
		"input": b64("ignored when batch_input is set"),
		"batch_input": []interface{}{
			map[string]interface{}{"input": b64(msgs[0]), "reference": "r-0"},
			map[string]interface{}{"input": "not base64!", "reference": "r-bad"},
			map[string]interface{}{"input": b64(msgs[1]), "reference": "r-1"},
			map[string]interface{}{"reference": "r-missing"},
			map[string]interface{}{"input": b64(msgs[2])},
		},
	})
	requireStatus(t, r, 200, "")
	results, ok := r.data["batch_results"].([]interface{})
	require.True(t, ok, "%#v", r.data)
	require.Len(t, results, 5)
	require.NotContains(t, r.data, "signature")

	type want struct {
		ref, msg, err string
	}
	wants := []want{
		{ref: "r-0", msg: msgs[0]},
		{ref: "r-bad", err: "unable to decode input"},
		{ref: "r-1", msg: msgs[1]},
		{ref: "r-missing", err: "missing input"},
		{ref: "", msg: msgs[2]},
	}
	sigs := make([]string, len(wants))
	for i, w := range wants {
		t.Run(fmt.Sprintf("sign item %d", i), func(t *testing.T) {
			item := results[i].(map[string]interface{})
			require.Equal(t, w.ref, item["reference"])
			if w.err != "" {
				require.Contains(t, item["error"], w.err)
				require.Empty(t, item["signature"])
				return
			}
			require.NotContains(t, item, "error")
			require.Equal(t, float64(1), item["key_version"])
			sigs[i] = item["signature"].(string)
			digest := sha256.Sum256([]byte(w.msg))
			require.True(t, ecdsa.VerifyASN1(pub, digest[:], svSigBytes(t, sigs[i], 1, base64.StdEncoding)))
		})
	}

	r = e.write(t, "verify/ec", map[string]interface{}{
		"batch_input": []interface{}{
			map[string]interface{}{"input": b64(msgs[0]), "signature": sigs[0], "reference": "v-0"},
			map[string]interface{}{"input": b64(msgs[1]), "signature": sigs[0], "reference": "v-swapped"},
			map[string]interface{}{"input": "!!", "signature": sigs[2], "reference": "v-bad-input"},
			map[string]interface{}{"input": b64(msgs[1]), "signature": sigs[2], "reference": "v-1"},
			map[string]interface{}{"input": b64(msgs[2]), "signature": strings.TrimPrefix(sigs[4], "vault:v1:"), "reference": "v-no-prefix"},
			map[string]interface{}{"input": b64(msgs[2]), "signature": sigs[4]},
		},
	})
	requireStatus(t, r, 200, "")
	results, ok = r.data["batch_results"].([]interface{})
	require.True(t, ok, "%#v", r.data)
	require.NotContains(t, r.data, "valid")
	verifyWants := []verifyWant{
		{"v-0", true, ""},
		{"v-swapped", false, ""},
		{"v-bad-input", false, "failed to parse input"},
		{"v-1", true, ""},
		{"v-no-prefix", false, "invalid signature: no prefix"},
		{"", true, ""},
	}
	requireVerifyResults(t, results, verifyWants)
}

func TestSignVerifyBatchDerivedEd25519(t *testing.T) {
	e := getTestBackend(t)
	svKey(t, e, "ed", "ed25519", map[string]interface{}{"derived": true})
	contexts := []string{b64("tenant-a"), b64("tenant-b")}
	r := e.write(t, "sign/ed", map[string]interface{}{
		"batch_input": []interface{}{
			map[string]interface{}{"input": b64("m"), "context": contexts[0], "reference": "a"},
			map[string]interface{}{"input": b64("m"), "context": contexts[1], "reference": "b"},
		},
	})
	requireStatus(t, r, 200, "")
	results := r.data["batch_results"].([]interface{})
	require.Len(t, results, 2)
	var sigs []string
	var pubs []string
	for i, ref := range []string{"a", "b"} {
		item := results[i].(map[string]interface{})
		require.Equal(t, ref, item["reference"])
		pubB64, ok := item["publickey"].(string)
		require.True(t, ok, "publickey in %#v", item)
		pub, err := base64.StdEncoding.DecodeString(pubB64)
		require.NoError(t, err)
		sig := item["signature"].(string)
		require.True(t, ed25519.Verify(pub, []byte("m"), svSigBytes(t, sig, 1, base64.StdEncoding)))
		sigs = append(sigs, sig)
		pubs = append(pubs, pubB64)
	}
	require.NotEqual(t, pubs[0], pubs[1])

	cases := []struct {
		name  string
		items []interface{}
		valid []bool
	}{
		{"matching contexts", []interface{}{
			map[string]interface{}{"input": b64("m"), "context": contexts[0], "signature": sigs[0]},
			map[string]interface{}{"input": b64("m"), "context": contexts[1], "signature": sigs[1]},
		}, []bool{true, true}},
		{"swapped contexts", []interface{}{
			map[string]interface{}{"input": b64("m"), "context": contexts[1], "signature": sigs[0]},
			map[string]interface{}{"input": b64("m"), "context": contexts[0], "signature": sigs[1]},
		}, []bool{false, false}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := e.write(t, "verify/ed", map[string]interface{}{"batch_input": c.items})
			requireStatus(t, r, 200, "")
			results := r.data["batch_results"].([]interface{})
			require.Len(t, results, len(c.valid))
			for i, v := range c.valid {
				require.Equal(t, v, results[i].(map[string]interface{})["valid"], "item %d", i)
			}
		})
	}
}

func TestVerifyBatchKinds(t *testing.T) {
	e := getTestBackend(t)
	svKey(t, e, "ec", "ecdsa-p256", nil)
	in := b64("x")
	sig, _ := svSign(t, e, "sign/ec", map[string]interface{}{"input": in})
	mac := e.mustWrite(t, "hmac/ec", map[string]interface{}{"input": in})["hmac"].(string)

	cases := []struct {
		name  string
		items []interface{}
		msg   string
	}{
		{"signature and hmac mixed", []interface{}{
			map[string]interface{}{"input": in, "signature": sig},
			map[string]interface{}{"input": in, "hmac": mac},
		}, "elements of batch_input must all provide either 'signature', 'hmac' or 'cmac'"},
		{"some items without signature", []interface{}{
			map[string]interface{}{"input": in, "signature": sig},
			map[string]interface{}{"input": in},
		}, "some elements of batch_input are missing 'signature'"},
		{"some items without hmac", []interface{}{
			map[string]interface{}{"input": in, "hmac": mac},
			map[string]interface{}{"input": in},
		}, "some elements of batch_input are missing 'hmac'"},
		{"no item with signature, hmac or cmac", []interface{}{
			map[string]interface{}{"input": in},
		}, "no batch_input elements have 'signature', 'hmac' or 'cmac'"},
		{"cmac items", []interface{}{
			map[string]interface{}{"input": in, "cmac": "vault:v1:AAAA"},
		}, "cmac is only available in enterprise versions of Vault"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			requireStatus(t, e.write(t, "verify/ec", map[string]interface{}{"batch_input": c.items}), 400, c.msg)
		})
	}

	t.Run("all hmac items are verified as HMACs", func(t *testing.T) {
		r := e.write(t, "verify/ec", map[string]interface{}{"batch_input": []interface{}{
			map[string]interface{}{"input": in, "hmac": mac, "reference": "ok"},
			map[string]interface{}{"input": b64("y"), "hmac": mac, "reference": "tampered"},
		}})
		requireStatus(t, r, 200, "")
		results := r.data["batch_results"].([]interface{})
		require.Len(t, results, 2)
		require.Equal(t, true, results[0].(map[string]interface{})["valid"])
		require.Equal(t, "ok", results[0].(map[string]interface{})["reference"])
		require.Equal(t, false, results[1].(map[string]interface{})["valid"])
		require.Equal(t, "tampered", results[1].(map[string]interface{})["reference"])
	})
}

// verifyWant is what one verify batch item should answer.
type verifyWant struct {
	ref   string
	valid bool
	err   string
}

// requireVerifyResults checks a verify batch's results item by item.
func requireVerifyResults(t *testing.T, results []interface{}, wants []verifyWant) {
	t.Helper()
	require.Len(t, results, len(wants))
	for i, w := range wants {
		t.Run(fmt.Sprintf("verify item %d", i), func(t *testing.T) {
			item := results[i].(map[string]interface{})
			require.Equal(t, w.ref, item["reference"])
			require.Equal(t, w.valid, item["valid"])
			if w.err == "" {
				require.NotContains(t, item, "error")
			} else {
				require.Contains(t, item["error"], w.err)
			}
		})
	}
}
