package hsmtransit

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"
)

// byokPair is two mounts, with B's wrapping key imported into A as "dst".
func byokPair(t *testing.T) (a, b *testEnv) {
	t.Helper()
	a, b = getTestBackend(t), getTestBackend(t)
	_, pemB := importWrappingPublicKey(t, b)
	a.mustWrite(t, "keys/dst/import", map[string]interface{}{"type": "rsa-4096", "public_key": pemB})
	return a, b
}

// byokExport reads byok-export/<path> and returns its keys.
func byokExport(t *testing.T, e *testEnv, path string, data map[string]interface{}) map[string]string {
	t.Helper()
	r := e.do(t, logical.ReadOperation, "byok-export/"+path, data)
	requireStatus(t, r, 200, "")
	raw, ok := r.data["keys"].(map[string]interface{})
	require.True(t, ok, "%#v", r.data)
	out := map[string]string{}
	for v, k := range raw {
		out[v] = k.(string)
	}
	return out
}

func TestBYOKExportBetweenMounts(t *testing.T) {
	a, b := byokPair(t)
	a.mustWrite(t, "keys/src", map[string]interface{}{"type": "aes256-gcm96", "exportable": true})
	ct1 := a.encrypt(t, "src", "first version", nil)
	a.mustWrite(t, "keys/src/rotate", nil)
	ct2 := a.encrypt(t, "src", "second version", nil)

	all := byokExport(t, a, "dst/src", nil)
	require.Len(t, all, 2)

	t.Run("name and type", func(t *testing.T) {
		r := a.read(t, "byok-export/dst/src")
		require.Equal(t, "src", r.data["name"])
		require.Equal(t, "aes256-gcm96", r.data["type"])
	})

	t.Run("all versions", func(t *testing.T) {
		b.mustWrite(t, "keys/all/import", map[string]interface{}{"ciphertext": all["1"]})
		require.Equal(t, "first version", b.decrypt(t, "all", ct1, nil))
		b.mustWrite(t, "keys/all/import_version", map[string]interface{}{"ciphertext": all["2"]})
		require.Equal(t, "second version", b.decrypt(t, "all", ct2, nil))
		require.Equal(t, "first version", b.decrypt(t, "all", ct1, nil))
	})

	versionCases := []struct {
		version string
		want    string
		ct      string
		pt      string
	}{
		{"latest", "2", ct2, "second version"},
		{"1", "1", ct1, "first version"},
		{"v1", "1", ct1, "first version"},
		{"v2", "2", ct2, "second version"},
	}
	for i, tc := range versionCases {
		t.Run("version "+tc.version, func(t *testing.T) {
			keys := byokExport(t, a, "dst/src/"+tc.version, nil)
			require.Len(t, keys, 1)
			wrapped, ok := keys[tc.want]
			require.True(t, ok, "%v", keys)
			name := "v" + string(rune('a'+i))
			// Fresh wrapping each time, so not the same bytes; but the
			// same key inside.
			b.mustWrite(t, "keys/"+name+"/import", map[string]interface{}{"ciphertext": wrapped})
			// The imported key is version 1 in B, so relabel the ciphertext.
			raw := tc.ct[len("vault:v"+tc.want+":"):]
			require.Equal(t, tc.pt, b.decrypt(t, name, "vault:v1:"+raw, nil))
		})
	}

	t.Run("hash SHA512", func(t *testing.T) {
		keys := byokExport(t, a, "dst/src/1", map[string]interface{}{"hash": "SHA512"})
		r := b.write(t, "keys/sha512/import", map[string]interface{}{"ciphertext": keys["1"]})
		requireStatus(t, r, 400, "unwrapping the ephemeral AES key (check hash_function and that the wrapping key is this mount's)")
		b.mustWrite(t, "keys/sha512/import", map[string]interface{}{"ciphertext": keys["1"], "hash_function": "SHA512"})
		require.Equal(t, "first version", b.decrypt(t, "sha512", ct1, nil))
	})
}

func TestBYOKExportSigningKey(t *testing.T) {
	a, b := byokPair(t)
	a.mustWrite(t, "keys/ec", map[string]interface{}{"type": "ecdsa-p256", "exportable": true})
	keys := byokExport(t, a, "dst/ec", nil)
	b.mustWrite(t, "keys/ec/import", map[string]interface{}{"type": "ecdsa-p256", "ciphertext": keys["1"]})

	input := base64.StdEncoding.EncodeToString([]byte("signed in B"))
	sig := b.mustWrite(t, "sign/ec", map[string]interface{}{"input": input})["signature"]
	r := a.write(t, "verify/ec", map[string]interface{}{"input": input, "signature": sig})
	requireStatus(t, r, 200, "")
	require.Equal(t, true, r.data["valid"], "A does not verify B's signature: not the same key")
}

func TestBYOKExportErrors(t *testing.T) {
	a, _ := byokPair(t)
	a.mustWrite(t, "keys/src", map[string]interface{}{"exportable": true})
	a.mustWrite(t, "keys/src/rotate", nil)
	a.mustWrite(t, "keys/src/config", map[string]interface{}{"min_decryption_version": 2})
	a.mustWrite(t, "keys/locked", nil)
	a.mustWrite(t, "keys/aesdst", nil)
	a.mustWrite(t, "keys/ecdst", map[string]interface{}{"type": "ecdsa-p256"})

	cases := []struct {
		name string
		path string
		data map[string]interface{}
		msg  string
	}{
		{"destination missing", "nope/src", nil, "destination"},
		{"destination aes", "aesdst/src", nil, "RSA"},
		{"destination ecdsa", "ecdst/src", nil, "RSA"},
		{"source missing", "dst/nope", nil, "source"},
		{"source not exportable", "dst/locked", nil, "not exportable"},
		{"bad hash", "dst/src", map[string]interface{}{"hash": "MD5"}, "unknown hash function"},
		{"source is destination", "dst/dst", nil, "source and destination must be different keys"},
		{"version missing", "dst/src/9", nil, "version does not exist"},
		{"version below min_decryption_version", "dst/src/1", nil, "below minimum decryption version"},
		{"bad version", "dst/src/vv", nil, "invalid key version"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := a.do(t, logical.ReadOperation, "byok-export/"+tc.path, tc.data)
			t.Logf("%d %s", r.status, r.errorMessage())
			requireStatus(t, r, 400, tc.msg)
			require.Nil(t, r.data["keys"])
		})
	}
}

// A key version without private material has nothing to wrap: asking for it
// is the caller's mistake, not a server error.
func TestBYOKExportPublicOnlySource(t *testing.T) {
	a, _ := byokPair(t)
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	a.mustWrite(t, "keys/pub/import", map[string]interface{}{
		"type":       "ecdsa-p256",
		"exportable": true,
		"public_key": importPublicPEM(t, ecKey.Public()),
	})
	r := a.read(t, "byok-export/dst/pub")
	requireStatus(t, r, 400, "version 1 of key pub has no private key to export (imported as a public key)")
	require.Nil(t, r.data["keys"])
}
