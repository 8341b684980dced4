package hsmtransit

import (
	"crypto/sha256"
	"crypto/sha3"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"testing"

	"github.com/stretchr/testify/require"
)

// hsSums are the hash path's algorithms computed with the standard library.
var hsSums = map[string]func([]byte) []byte{
	"sha2-224": func(b []byte) []byte { s := sha256.Sum224(b); return s[:] },
	"sha2-256": func(b []byte) []byte { s := sha256.Sum256(b); return s[:] },
	"sha2-384": func(b []byte) []byte { s := sha512.Sum384(b); return s[:] },
	"sha2-512": func(b []byte) []byte { s := sha512.Sum512(b); return s[:] },
	"sha3-224": func(b []byte) []byte { s := sha3.Sum224(b); return s[:] },
	"sha3-256": func(b []byte) []byte { s := sha3.Sum256(b); return s[:] },
	"sha3-384": func(b []byte) []byte { s := sha3.Sum384(b); return s[:] },
	"sha3-512": func(b []byte) []byte { s := sha3.Sum512(b); return s[:] },
}

// hsSum hashes through path and returns the sum, requiring a 200.
func hsSum(t *testing.T, e *testEnv, path string, data map[string]interface{}) string {
	t.Helper()
	r := e.write(t, path, data)
	requireStatus(t, r, 200, "")
	sum, ok := r.data["sum"].(string)
	require.Truef(t, ok, "sum in %#v", r.data)
	return sum
}

func TestHashAlgorithms(t *testing.T) {
	e := getTestBackend(t)
	input := []byte("The quick brown fox jumps over the lazy dog")
	for _, alg := range []string{"sha2-224", "sha2-256", "sha2-384", "sha2-512", "sha3-224", "sha3-256", "sha3-384", "sha3-512"} {
		want := hsSums[alg](input)
		cases := []struct {
			name, path string
			data       map[string]interface{}
			encode     func([]byte) string
		}{
			{"body hex", "hash", map[string]interface{}{"algorithm": alg}, hex.EncodeToString},
			{"body explicit hex", "hash", map[string]interface{}{"algorithm": alg, "format": "hex"}, hex.EncodeToString},
			{"body base64", "hash", map[string]interface{}{"algorithm": alg, "format": "base64"}, base64.StdEncoding.EncodeToString},
			// The URL's algorithm wins over the body's.
			{"url hex", "hash/" + alg, map[string]interface{}{"algorithm": "sha2-999"}, hex.EncodeToString},
			{"url base64", "hash/" + alg, map[string]interface{}{"format": "base64"}, base64.StdEncoding.EncodeToString},
		}
		for _, c := range cases {
			t.Run(alg+" "+c.name, func(t *testing.T) {
				c.data["input"] = base64.StdEncoding.EncodeToString(input)
				require.Equal(t, c.encode(want), hsSum(t, e, c.path, c.data))
			})
		}
	}

	t.Run("default is sha2-256 hex", func(t *testing.T) {
		sum := hsSum(t, e, "hash", map[string]interface{}{"input": base64.StdEncoding.EncodeToString(input)})
		require.Equal(t, "d7a8fbb307d7809469ca9abcb0082e4f8d5651e46d3cdb762d02d0bf37c9e592", sum)
	})

	t.Run("empty input", func(t *testing.T) {
		sum := hsSum(t, e, "hash/sha2-256", map[string]interface{}{"input": ""})
		require.Equal(t, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", sum)
	})
}

func TestHashErrors(t *testing.T) {
	e := getTestBackend(t)
	in := b64("x")
	cases := []struct {
		name, path string
		data       map[string]interface{}
		msg        string
	}{
		{"missing input", "hash", map[string]interface{}{}, "input missing"},
		{"missing input with algorithm", "hash/sha2-512", map[string]interface{}{"format": "base64"}, "input missing"},
		{"input not base64", "hash", map[string]interface{}{"input": "not base64!"}, "unable to decode input as base64"},
		{"bad format", "hash", map[string]interface{}{"input": in, "format": "base32"}, "unsupported encoding format base32"},
		{"bad algorithm in body", "hash", map[string]interface{}{"input": in, "algorithm": "md5"}, "unsupported algorithm md5"},
		{"bad algorithm in URL", "hash/md5", map[string]interface{}{"input": in}, "unsupported algorithm md5"},
		{"sha1 is not a hash algorithm", "hash/sha1", map[string]interface{}{"input": in}, "unsupported algorithm sha1"},
		{"empty format", "hash", map[string]interface{}{"input": in, "format": ""}, "unsupported encoding format"},
		{"empty algorithm", "hash", map[string]interface{}{"input": in, "algorithm": ""}, "unsupported algorithm"},
		{"none is not a hash algorithm", "hash", map[string]interface{}{"input": in, "algorithm": "none"}, "unsupported algorithm none"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			requireStatus(t, e.write(t, c.path, c.data), 400, c.msg)
		})
	}
}
