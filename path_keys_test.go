package hsmtransit

import (
	"sort"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"
)

// allKeyTypes are the key types keys/:name creates, with what each supports.
var allKeyTypes = []struct {
	name                  string
	encrypt, sign, derive bool
}{
	{"aes128-gcm96", true, false, true},
	{"aes256-gcm96", true, false, true},
	{"chacha20-poly1305", true, false, true},
	{"ecdsa-p256", false, true, false},
	{"ecdsa-p384", false, true, false},
	{"ecdsa-p521", false, true, false},
	{"ed25519", false, true, true},
	{"rsa-2048", true, true, false},
	{"rsa-3072", true, true, false},
	{"rsa-4096", true, true, false},
	{"hmac", false, false, false},
}

func TestKeysCreateEveryType(t *testing.T) {
	e := getTestBackend(t)
	for _, kt := range allKeyTypes {
		t.Run(kt.name, func(t *testing.T) {
			data := e.mustWrite(t, "keys/k-"+kt.name, map[string]interface{}{"type": kt.name})
			require.Equal(t, kt.name, data["type"])
			require.Equal(t, float64(1), data["latest_version"])
			require.Equal(t, float64(1), data["min_decryption_version"])
			require.Equal(t, float64(0), data["min_encryption_version"])
			require.Equal(t, kt.encrypt, data["supports_encryption"])
			require.Equal(t, kt.encrypt, data["supports_decryption"])
			require.Equal(t, kt.sign, data["supports_signing"])
			require.Equal(t, kt.derive, data["supports_derivation"])
			require.Equal(t, false, data["deletion_allowed"])
			require.Equal(t, false, data["exportable"])
			require.Equal(t, false, data["imported_key"])

			read := e.read(t, "keys/k-"+kt.name)
			requireStatus(t, read, 200, "")
			require.Equal(t, data, read.data, "create returns what read returns")

			switch {
			case kt.name == "hmac":
				require.NotContains(t, read.data, "keys")
			case kt.sign:
				v1 := read.data["keys"].(map[string]interface{})["1"].(map[string]interface{})
				require.NotEmpty(t, v1["public_key"])
				require.NotEmpty(t, v1["name"])
				require.Contains(t, v1, "creation_time")
			default:
				v1 := read.data["keys"].(map[string]interface{})["1"]
				require.Greater(t, v1.(float64), float64(1e9), "creation time in Unix seconds")
			}
		})
	}
}

func TestKeysCreateErrors(t *testing.T) {
	e := getTestBackend(t)
	cases := []struct {
		name string
		data map[string]interface{}
		msg  string
	}{
		{"unknown type", map[string]interface{}{"type": "des"}, "unknown key type des"},
		{"enterprise cmac", map[string]interface{}{"type": "aes256-cmac"}, "only available in enterprise"},
		{"enterprise cbc", map[string]interface{}{"type": "aes256-cbc"}, "only available in enterprise"},
		{"enterprise ml-dsa", map[string]interface{}{"type": "ml-dsa", "parameter_set": "44"}, "only available in enterprise"},
		{"managed key", map[string]interface{}{"type": "managed_key"}, "only available in enterprise"},
		{"convergent without derived", map[string]interface{}{"convergent_encryption": true}, "convergent encryption requires derivation"},
		{"derived ecdsa", map[string]interface{}{"type": "ecdsa-p256", "derived": true}, "not supported for keys of type ecdsa-p256"},
		{"derived rsa", map[string]interface{}{"type": "rsa-2048", "derived": true}, "not supported for keys of type rsa-2048"},
		{"derived hmac", map[string]interface{}{"type": "hmac", "derived": true}, "not supported for keys of type hmac"},
		{"convergent ed25519", map[string]interface{}{"type": "ed25519", "derived": true, "convergent_encryption": true}, "convergent encryption not supported"},
		{"key_size on aes", map[string]interface{}{"key_size": 32}, "key_size is not valid"},
		{"hmac key_size too small", map[string]interface{}{"type": "hmac", "key_size": 8}, "invalid key_size 8"},
		{"hmac key_size too big", map[string]interface{}{"type": "hmac", "key_size": 10000}, "invalid key_size 10000"},
		{"auto rotate under an hour", map[string]interface{}{"auto_rotate_period": "30m"}, "at least an hour"},
		{"auto rotate not a duration", map[string]interface{}{"auto_rotate_period": "soon"}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := e.write(t, "keys/bad", tc.data)
			requireStatus(t, r, 400, tc.msg)
			requireStatus(t, e.read(t, "keys/bad"), 404, "")
		})
	}
}

func TestKeysCreateOptions(t *testing.T) {
	e := getTestBackend(t)
	data := e.mustWrite(t, "keys/opts", map[string]interface{}{
		"derived":                true,
		"convergent_encryption":  true,
		"exportable":             true,
		"allow_plaintext_backup": true,
		"auto_rotate_period":     "2h",
	})
	require.Equal(t, true, data["derived"])
	require.Equal(t, "hkdf_sha256", data["kdf"])
	require.Equal(t, true, data["convergent_encryption"])
	require.Equal(t, float64(-1), data["convergent_encryption_version"])
	require.Equal(t, true, data["exportable"])
	require.Equal(t, true, data["allow_plaintext_backup"])
	require.Equal(t, float64(7200), data["auto_rotate_period"])

	data = e.mustWrite(t, "keys/mac", map[string]interface{}{"type": "hmac", "key_size": 64})
	require.Equal(t, float64(64), data["key_size"])
}

func TestKeysCreateExistingWarns(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	r := e.write(t, "keys/k", map[string]interface{}{"type": "rsa-2048"})
	requireStatus(t, r, 200, "")
	require.Equal(t, []string{"key k already existed"}, r.resp.Warnings)
	require.Equal(t, "aes256-gcm96", r.data["type"], "an existing key is not replaced")
}

func TestKeysReadMissingIs404(t *testing.T) {
	e := getTestBackend(t)
	requireStatus(t, e.read(t, "keys/missing"), 404, "")
}

func TestKeysReadDerivedEd25519PublicKey(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/ed", map[string]interface{}{"type": "ed25519", "derived": true})

	noContext := e.read(t, "keys/ed").data["keys"].(map[string]interface{})["1"].(map[string]interface{})
	require.Equal(t, "", noContext["public_key"], "a derived key has no context-free public key")

	r := e.do(t, logical.ReadOperation, "keys/ed", map[string]interface{}{"context": b64("tenant-a")})
	a := r.data["keys"].(map[string]interface{})["1"].(map[string]interface{})["public_key"].(string)
	r = e.do(t, logical.ReadOperation, "keys/ed", map[string]interface{}{"context": b64("tenant-b")})
	bKey := r.data["keys"].(map[string]interface{})["1"].(map[string]interface{})["public_key"].(string)
	require.NotEmpty(t, a)
	require.NotEqual(t, a, bKey, "each context derives its own key")

	r = e.do(t, logical.ReadOperation, "keys/ed", map[string]interface{}{"context": "%%%"})
	requireStatus(t, r, 400, "failed to base64-decode context")
}

func TestKeysDelete(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	ct := e.encrypt(t, "k", "gone soon", nil)

	requireStatus(t, e.del(t, "keys/k"), 400, "deletion is not allowed for this key")
	require.Equal(t, "gone soon", e.decrypt(t, "k", ct, nil), "a refused delete changes nothing")

	e.mustWrite(t, "keys/k/config", map[string]interface{}{"deletion_allowed": true})
	requireStatus(t, e.del(t, "keys/k"), 204, "")
	requireStatus(t, e.read(t, "keys/k"), 404, "")
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 400, "encryption key not found")

	requireStatus(t, e.del(t, "keys/k"), 400, "not found")

	// The same name can be created again, with new key material.
	e.mustWrite(t, "keys/k", nil)
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 400, "message authentication failed")
}

func TestKeysList(t *testing.T) {
	e := getTestBackend(t)
	requireStatus(t, e.do(t, logical.ListOperation, "keys/", nil), 404, "")
	for _, n := range []string{"b", "a", "c"} {
		e.mustWrite(t, "keys/"+n, nil)
	}
	// The import wrapping key is stored among the policies but is not a key.
	requireStatus(t, e.read(t, "wrapping_key"), 200, "")

	r := e.do(t, logical.ListOperation, "keys/", nil)
	requireStatus(t, r, 200, "")
	var names []string
	for _, k := range r.data["keys"].([]interface{}) {
		names = append(names, k.(string))
	}
	sort.Strings(names)
	require.Equal(t, []string{"a", "b", "c"}, names)
}

func TestKeysInvalidNames(t *testing.T) {
	e := getTestBackend(t)
	for _, name := range []string{"a/b", "-lead", "trail-", "sp ace"} {
		t.Run(name, func(t *testing.T) {
			r := e.write(t, "keys/"+name, nil)
			requireStatus(t, r, 404, "unsupported path")
			requireStatus(t, e.read(t, "keys/"+name), 404, "unsupported path")
		})
	}
}
