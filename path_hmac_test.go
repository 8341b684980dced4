package hsmtransit

import (
	"crypto/hmac"
	"encoding/base64"
	"fmt"
	"hash"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// hmKey creates an exportable key of keyType with extra options.
func hmKey(t *testing.T, e *testEnv, name, keyType string, extra map[string]interface{}) {
	t.Helper()
	data := map[string]interface{}{"type": keyType, "exportable": true}
	for k, v := range extra {
		data[k] = v
	}
	e.mustWrite(t, "keys/"+name, data)
}

// hmExported reads a version's HMAC key through export/hmac-key.
func hmExported(t *testing.T, e *testEnv, name string, version int) []byte {
	t.Helper()
	r := e.read(t, fmt.Sprintf("export/hmac-key/%s/%d", name, version))
	requireStatus(t, r, 200, "")
	keys := r.data["keys"].(map[string]interface{})
	raw, err := base64.StdEncoding.DecodeString(keys[strconv.Itoa(version)].(string))
	require.NoError(t, err)
	require.NotEmpty(t, raw)
	return raw
}

// hmExpected computes "vault:v<version>:" + base64(HMAC(key, msg)) with the
// standard library.
func hmExpected(key []byte, version int, newHash func() hash.Hash, msg []byte) string {
	m := hmac.New(newHash, key)
	m.Write(msg)
	return fmt.Sprintf("vault:v%d:%s", version, base64.StdEncoding.EncodeToString(m.Sum(nil)))
}

// hmHMAC computes an HMAC through path, requiring a 200.
func hmHMAC(t *testing.T, e *testEnv, path string, data map[string]interface{}) string {
	t.Helper()
	r := e.write(t, path, data)
	requireStatus(t, r, 200, "")
	mac, ok := r.data["hmac"].(string)
	require.Truef(t, ok, "hmac in %#v", r.data)
	return mac
}

func TestHMACEveryKeyType(t *testing.T) {
	e := getTestBackend(t)
	msg := []byte("hmac input")
	cases := []struct {
		name, keyType string
		extra         map[string]interface{}
		keyLen        int
	}{
		{"aes256-gcm96", "aes256-gcm96", nil, 32},
		{"chacha20-poly1305", "chacha20-poly1305", nil, 32},
		{"ed25519", "ed25519", nil, 32},
		{"ecdsa-p256", "ecdsa-p256", nil, 32},
		{"hmac default size", "hmac", nil, 32},
		{"hmac key_size 48", "hmac", map[string]interface{}{"key_size": 48}, 48},
		{"hmac key_size 64", "hmac", map[string]interface{}{"key_size": 64}, 64},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			name := fmt.Sprintf("k%d", i)
			hmKey(t, e, name, c.keyType, c.extra)
			key := hmExported(t, e, name, 1)
			require.Len(t, key, c.keyLen)
			mac := hmHMAC(t, e, "hmac/"+name, map[string]interface{}{"input": svB64(msg)})
			require.Equal(t, hmExpected(key, 1, svHashes["sha2-256"].new, msg), mac)

			require.True(t, svVerify(t, e, "verify/"+name, map[string]interface{}{"input": svB64(msg), "hmac": mac}))
			require.False(t, svVerify(t, e, "verify/"+name, map[string]interface{}{"input": b64("tampered"), "hmac": mac}))
		})
	}

	t.Run("each key has its own HMAC key", func(t *testing.T) {
		require.NotEqual(t, hmExported(t, e, "k0", 1), hmExported(t, e, "k1", 1))
	})
}

func TestHMACAlgorithms(t *testing.T) {
	e := getTestBackend(t)
	hmKey(t, e, "k", "aes256-gcm96", nil)
	key := hmExported(t, e, "k", 1)
	msg := []byte("algorithm test")

	for _, alg := range []string{"sha1", "sha2-224", "sha2-256", "sha2-384", "sha2-512", "sha3-224", "sha3-256", "sha3-384", "sha3-512"} {
		want := hmExpected(key, 1, svHashes[alg].new, msg)
		t.Run("body "+alg, func(t *testing.T) {
			mac := hmHMAC(t, e, "hmac/k", map[string]interface{}{"input": svB64(msg), "algorithm": alg})
			require.Equal(t, want, mac)
		})
		t.Run("url "+alg, func(t *testing.T) {
			// The URL's algorithm wins over the body's.
			body := "sha2-256"
			if alg == body {
				body = "sha2-512"
			}
			mac := hmHMAC(t, e, "hmac/k/"+alg, map[string]interface{}{"input": svB64(msg), "algorithm": body})
			require.Equal(t, want, mac)
		})
		t.Run("verify "+alg, func(t *testing.T) {
			for _, data := range []map[string]interface{}{
				{"hash_algorithm": alg},
				{"algorithm": alg}, // deprecated, used when hash_algorithm is absent
			} {
				data["input"] = svB64(msg)
				data["hmac"] = want
				require.True(t, svVerify(t, e, "verify/k", data), "%v", data)
			}
			require.True(t, svVerify(t, e, "verify/k/"+alg, map[string]interface{}{"input": svB64(msg), "hmac": want}))
			other := "sha2-384"
			if alg == other {
				other = "sha2-256"
			}
			require.False(t, svVerify(t, e, "verify/k/"+other, map[string]interface{}{"input": svB64(msg), "hmac": want}))
		})
	}

	t.Run("default is sha2-256", func(t *testing.T) {
		mac := hmHMAC(t, e, "hmac/k", map[string]interface{}{"input": svB64(msg)})
		require.Equal(t, hmExpected(key, 1, svHashes["sha2-256"].new, msg), mac)
		require.True(t, svVerify(t, e, "verify/k", map[string]interface{}{"input": svB64(msg), "hmac": mac}))
	})

	t.Run("hash_algorithm wins over algorithm on verify", func(t *testing.T) {
		mac := hmExpected(key, 1, svHashes["sha2-512"].new, msg)
		require.True(t, svVerify(t, e, "verify/k", map[string]interface{}{
			"input": svB64(msg), "hmac": mac, "hash_algorithm": "sha2-512", "algorithm": "sha2-256",
		}))
	})

	errCases := []struct {
		name, path string
		data       map[string]interface{}
	}{
		{"hmac none in body", "hmac/k", map[string]interface{}{"algorithm": "none"}},
		{"hmac none in URL", "hmac/k/none", nil},
		{"hmac unknown in body", "hmac/k", map[string]interface{}{"algorithm": "md5"}},
		{"hmac unknown in URL", "hmac/k/md5", nil},
		{"hmac empty algorithm", "hmac/k", map[string]interface{}{"algorithm": ""}},
		{"verify empty hash_algorithm", "verify/k", map[string]interface{}{"hash_algorithm": "", "hmac": "vault:v1:AAAA"}},
		{"verify none", "verify/k", map[string]interface{}{"hash_algorithm": "none", "hmac": "vault:v1:AAAA"}},
		{"verify unknown in URL", "verify/k/md5", map[string]interface{}{"hmac": "vault:v1:AAAA"}},
		{"verify unknown deprecated algorithm", "verify/k", map[string]interface{}{"algorithm": "md5", "hmac": "vault:v1:AAAA"}},
	}
	for _, c := range errCases {
		t.Run(c.name, func(t *testing.T) {
			data := map[string]interface{}{"input": svB64(msg)}
			for k, v := range c.data {
				data[k] = v
			}
			requireStatus(t, e.write(t, c.path, data), 400, "unsupported algorithm")
		})
	}
}

func TestHMACKeyVersion(t *testing.T) {
	e := getTestBackend(t)
	hmKey(t, e, "k", "hmac", map[string]interface{}{"key_size": 32})
	e.mustWrite(t, "keys/k/rotate", nil)
	e.mustWrite(t, "keys/k/rotate", nil)
	msg := []byte("versioned")
	sha256New := svHashes["sha2-256"].new

	keys := map[int][]byte{}
	for v := 1; v <= 3; v++ {
		keys[v] = hmExported(t, e, "k", v)
	}
	require.NotEqual(t, keys[1], keys[2])
	require.NotEqual(t, keys[2], keys[3])

	macs := map[int]string{}
	cases := []struct {
		name      string
		requested int
		want      int
	}{
		{"latest by default", 0, 3},
		{"version 1", 1, 1},
		{"version 2", 2, 2},
		{"version 3 explicitly", 3, 3},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			data := map[string]interface{}{"input": svB64(msg)}
			if c.requested != 0 {
				data["key_version"] = c.requested
			}
			mac := hmHMAC(t, e, "hmac/k", data)
			require.Equal(t, hmExpected(keys[c.want], c.want, sha256New, msg), mac)
			macs[c.want] = mac
			require.True(t, svVerify(t, e, "verify/k", map[string]interface{}{"input": svB64(msg), "hmac": mac}))
		})
	}

	errCases := []struct {
		name    string
		version int
		msg     string
	}{
		{"beyond latest", 4, "key version does not exist"},
		{"negative", -1, "key version does not exist"},
	}
	for _, c := range errCases {
		t.Run(c.name, func(t *testing.T) {
			r := e.write(t, "hmac/k", map[string]interface{}{"input": svB64(msg), "key_version": c.version})
			requireStatus(t, r, 400, c.msg)
		})
	}

	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_encryption_version": 2})
	minEnc := []struct {
		name    string
		version int
		status  int
		msg     string
	}{
		{"below min_encryption_version", 1, 400, "cannot generate HMAC: version is too old (disallowed by policy)"},
		{"at min_encryption_version", 2, 200, ""},
		{"latest explicitly", 3, 200, ""},
	}
	for _, c := range minEnc {
		t.Run(c.name, func(t *testing.T) {
			r := e.write(t, "hmac/k", map[string]interface{}{"input": svB64(msg), "key_version": c.version})
			requireStatus(t, r, c.status, c.msg)
			if c.status == 200 {
				require.Equal(t, hmExpected(keys[c.version], c.version, sha256New, msg), r.data["hmac"])
			}
		})
	}

	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 2})
	body := strings.TrimPrefix(macs[3], "vault:v3:")
	verifyCases := []struct {
		name   string
		mac    string
		status int
		msg    string
	}{
		{"below min_decryption_version", macs[1], 400, "cannot verify HMAC: version is too old (disallowed by policy)"},
		{"at min_decryption_version", macs[2], 200, ""},
		{"version too new", "vault:v4:" + body, 400, "invalid HMAC: version is too new"},
	}
	for _, c := range verifyCases {
		t.Run("verify "+c.name, func(t *testing.T) {
			r := e.write(t, "verify/k", map[string]interface{}{"input": svB64(msg), "hmac": c.mac})
			requireStatus(t, r, c.status, c.msg)
			if c.status == 200 {
				require.Equal(t, true, r.data["valid"])
			}
		})
	}
}

func TestHMACVerify(t *testing.T) {
	e := getTestBackend(t)
	hmKey(t, e, "k", "ed25519", nil)
	msg := []byte("verify the mac")
	mac := hmHMAC(t, e, "hmac/k", map[string]interface{}{"input": svB64(msg)})
	body := strings.TrimPrefix(mac, "vault:v1:")
	raw, err := base64.StdEncoding.DecodeString(body)
	require.NoError(t, err)
	raw[0] ^= 1
	flipped := "vault:v1:" + base64.StdEncoding.EncodeToString(raw)

	validCases := []struct {
		name, input, mac string
		valid            bool
	}{
		{"matching", svB64(msg), mac, true},
		{"tampered input", b64("verify the mac!"), mac, false},
		{"tampered hmac", svB64(msg), flipped, false},
		{"truncated hmac", svB64(msg), "vault:v1:" + base64.StdEncoding.EncodeToString(raw[:16]), false},
	}
	for _, c := range validCases {
		t.Run(c.name, func(t *testing.T) {
			require.Equal(t, c.valid, svVerify(t, e, "verify/k", map[string]interface{}{"input": c.input, "hmac": c.mac}))
		})
	}

	errCases := []struct {
		name, path string
		data       map[string]interface{}
		msg        string
	}{
		{"no prefix", "verify/k", map[string]interface{}{"input": svB64(msg), "hmac": body}, "invalid HMAC to verify: no prefix"},
		{"one field", "verify/k", map[string]interface{}{"input": svB64(msg), "hmac": "vault:v1"}, "invalid HMAC: wrong number of fields"},
		{"bad version", "verify/k", map[string]interface{}{"input": svB64(msg), "hmac": "vault:vone:" + body}, "invalid HMAC: version number could not be decoded"},
		{"hmac not base64", "verify/k", map[string]interface{}{"input": svB64(msg), "hmac": "vault:v1:!!"}, "unable to decode verification HMAC as base64"},
		{"version too new", "verify/k", map[string]interface{}{"input": svB64(msg), "hmac": "vault:v2:" + body}, "invalid HMAC: version is too new"},
		{"input not base64", "verify/k", map[string]interface{}{"input": "!!", "hmac": mac}, "unable to decode input as base64"},
		{"unknown key", "verify/nope", map[string]interface{}{"input": svB64(msg), "hmac": mac}, "encryption key not found"},
	}
	for _, c := range errCases {
		t.Run(c.name, func(t *testing.T) {
			requireStatus(t, e.write(t, c.path, c.data), 400, c.msg)
		})
	}
}

func TestHMACBatch(t *testing.T) {
	e := getTestBackend(t)
	hmKey(t, e, "k", "aes256-gcm96", nil)
	key := hmExported(t, e, "k", 1)
	sha512New := svHashes["sha2-512"].new

	r := e.write(t, "hmac/k/sha2-512", map[string]interface{}{
		"input": b64("ignored when batch_input is set"),
		"batch_input": []interface{}{
			map[string]interface{}{"input": b64("one"), "reference": "r1"},
			map[string]interface{}{"input": "not base64!", "reference": "r-bad"},
			map[string]interface{}{"reference": "r-missing"},
			map[string]interface{}{"input": b64("two"), "reference": "r2"},
			map[string]interface{}{"input": b64("three")},
		},
	})
	requireStatus(t, r, 200, "")
	require.NotContains(t, r.data, "hmac")
	results, ok := r.data["batch_results"].([]interface{})
	require.True(t, ok, "%#v", r.data)
	wants := []struct {
		ref, msg, err string
	}{
		{ref: "r1", msg: "one"},
		{ref: "r-bad", err: "unable to decode input as base64"},
		{ref: "r-missing", err: "missing input for HMAC"},
		{ref: "r2", msg: "two"},
		{ref: "", msg: "three"},
	}
	require.Len(t, results, len(wants))
	macs := make([]string, len(wants))
	for i, w := range wants {
		t.Run(fmt.Sprintf("hmac item %d", i), func(t *testing.T) {
			item := results[i].(map[string]interface{})
			require.Equal(t, w.ref, item["reference"])
			if w.err != "" {
				require.Contains(t, item["error"], w.err)
				require.NotContains(t, item, "hmac")
				return
			}
			require.NotContains(t, item, "error")
			macs[i] = item["hmac"].(string)
			require.Equal(t, hmExpected(key, 1, sha512New, []byte(w.msg)), macs[i])
		})
	}

	r = e.write(t, "verify/k/sha2-512", map[string]interface{}{
		"batch_input": []interface{}{
			map[string]interface{}{"input": b64("one"), "hmac": macs[0], "reference": "v1"},
			map[string]interface{}{"input": b64("two"), "hmac": macs[0], "reference": "v-swapped"},
			map[string]interface{}{"input": b64("two"), "hmac": strings.TrimPrefix(macs[3], "vault:v1:"), "reference": "v-no-prefix"},
			map[string]interface{}{"input": b64("two"), "hmac": macs[3], "reference": "v2"},
			map[string]interface{}{"input": "!!", "hmac": macs[4], "reference": "v-bad-input"},
			map[string]interface{}{"input": b64("three"), "hmac": macs[4]},
		},
	})
	requireStatus(t, r, 200, "")
	results, ok = r.data["batch_results"].([]interface{})
	require.True(t, ok, "%#v", r.data)
	verifyWants := []verifyWant{
		{"v1", true, ""},
		{"v-swapped", false, ""},
		{"v-no-prefix", false, "invalid HMAC to verify: no prefix"},
		{"v2", true, ""},
		{"v-bad-input", false, "unable to decode input as base64"},
		{"", true, ""},
	}
	requireVerifyResults(t, results, verifyWants)
}

func TestHMACErrors(t *testing.T) {
	e := getTestBackend(t)
	hmKey(t, e, "k", "aes256-gcm96", nil)
	cases := []struct {
		name, path string
		data       map[string]interface{}
		msg        string
	}{
		{"missing input", "hmac/k", map[string]interface{}{}, "missing input for HMAC"},
		{"input not base64", "hmac/k", map[string]interface{}{"input": "not base64!"}, "unable to decode input as base64"},
		{"unknown key", "hmac/nope", map[string]interface{}{"input": b64("x")}, "encryption key not found"},
		{"empty batch", "hmac/k", map[string]interface{}{"batch_input": []interface{}{}}, "missing batch input to process"},
		{"batch item with a non-string", "hmac/k", map[string]interface{}{"batch_input": []interface{}{map[string]interface{}{"input": 1}}}, "expected type 'string'"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			requireStatus(t, e.write(t, c.path, c.data), 400, c.msg)
		})
	}
}
