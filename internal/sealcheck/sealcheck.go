// Package sealcheck holds what the unit and end-to-end sealed-storage tests
// share: the secrets looked for in raw storage, in every encoding they
// could be stored in, and the bytes of a sealed value that are flipped to
// check that it no longer opens. Only tests import it.
package sealcheck

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"testing"

	"github.com/stretchr/testify/require"
)

// Secrets names values that must not be found in raw storage: key bytes,
// plaintexts, data keys, recovery shares.
type Secrets map[string][]byte

// Add records a secret; it must be long enough not to turn up in random
// ciphertext by chance.
func (s Secrets) Add(t testing.TB, what string, value []byte) {
	t.Helper()
	require.GreaterOrEqualf(t, len(value), 8, "secret %q is too short to look for", what)
	s[what] = bytes.Clone(value)
}

// AddString records a text secret and, if it is base64, what it decodes to.
func (s Secrets) AddString(t testing.TB, what, value string) {
	t.Helper()
	s.Add(t, what, []byte(value))
	if b, err := base64.StdEncoding.DecodeString(value); err == nil && len(b) >= 8 {
		s.Add(t, what+" (decoded)", b)
	}
}

// AddExported records a key as export/ returns it: base64 key bytes or a
// PEM private key, whose private scalar, exponent and primes are recorded
// too, as bytes and in decimal (keysutil stores big integers as JSON
// numbers).
func (s Secrets) AddExported(t testing.TB, what, value string) {
	t.Helper()
	block, _ := pem.Decode([]byte(value))
	if block == nil {
		b, err := base64.StdEncoding.DecodeString(value)
		require.NoErrorf(t, err, "exported %s is neither PEM nor base64", what)
		s.Add(t, what, b)
		if len(b) == ed25519.PrivateKeySize {
			s.Add(t, what+" (seed)", ed25519.PrivateKey(b).Seed())
		}
		return
	}
	s.Add(t, what+" (DER)", block.Bytes)
	var key any
	var err error
	switch block.Type {
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	}
	require.NoErrorf(t, err, "exported %s", what)
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		b, err := k.Bytes()
		require.NoError(t, err)
		s.Add(t, what+" (D)", b)
		s.Add(t, what+" (D, decimal)", []byte(new(big.Int).SetBytes(b).String()))
	case *rsa.PrivateKey:
		s.Add(t, what+" (D)", k.D.Bytes())
		s.Add(t, what+" (D, decimal)", []byte(k.D.String()))
		for i, p := range k.Primes {
			s.Add(t, fmt.Sprintf("%s (prime %d)", what, i), p.Bytes())
			s.Add(t, fmt.Sprintf("%s (prime %d, decimal)", what, i), []byte(p.String()))
		}
	case ed25519.PrivateKey:
		s.Add(t, what+" (seed)", k.Seed())
	default:
		t.Fatalf("exported %s: unexpected key type %T", what, key)
	}
}

// Needles returns every form under which the secrets are looked for.
func (s Secrets) Needles() map[string][]byte {
	out := make(map[string][]byte, 5*len(s))
	for what, v := range s {
		out[what] = v
		out[what+" (base64)"] = []byte(base64.StdEncoding.EncodeToString(v))
		out[what+" (base64, unpadded)"] = []byte(base64.RawStdEncoding.EncodeToString(v))
		out[what+" (base64url)"] = []byte(base64.RawURLEncoding.EncodeToString(v))
		out[what+" (hex)"] = []byte(hex.EncodeToString(v))
	}
	return out
}

// FlipPositions are the bytes of a sealed value that are flipped: the
// magic, the root key version, the generation (hst\x02), the nonce, the
// ciphertext and the tag.
func FlipPositions(value []byte) []int {
	header := 8
	if bytes.HasPrefix(value, []byte("hst\x02")) {
		header = 16
	}
	n := len(value)
	seen := map[int]bool{}
	var out []int
	for _, p := range []int{0, 3, 5, 7, header - 1, header, header + 11, header + 12, (header + 12 + n) / 2, n - 16, n - 1} {
		if p >= 0 && p < n && !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	return out
}

// Flipped is value with one bit of byte pos flipped.
func Flipped(value []byte, pos int) []byte {
	out := bytes.Clone(value)
	out[pos] ^= 0x01
	return out
}
