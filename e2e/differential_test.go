package e2e

import (
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// step is one scripted call, sent to both mounts. {{name}} in the path or in
// string values of the body is replaced by what capture stored from an
// earlier response of the same mount.
type step struct {
	method  string
	path    string
	body    map[string]interface{}
	capture map[string]string // variable -> dotted path in the response data
	// intended, when set, says why the plugin deliberately answers this
	// call differently from built-in transit.
	intended string
}

// diffSession is the scripted session, run against built-in transit and the
// plugin on one Vault server.
var diffSession = []step{
	// Key creation, every type and option, and refusals.
	{method: "POST", path: "keys/aes", body: map[string]interface{}{}},
	{method: "POST", path: "keys/aes128", body: map[string]interface{}{"type": "aes128-gcm96"}},
	{method: "POST", path: "keys/chacha", body: map[string]interface{}{"type": "chacha20-poly1305"}},
	{method: "POST", path: "keys/p256", body: map[string]interface{}{"type": "ecdsa-p256"}},
	{method: "POST", path: "keys/p384", body: map[string]interface{}{"type": "ecdsa-p384"}},
	{method: "POST", path: "keys/p521", body: map[string]interface{}{"type": "ecdsa-p521"}},
	{method: "POST", path: "keys/ed", body: map[string]interface{}{"type": "ed25519"}},
	{method: "POST", path: "keys/edd", body: map[string]interface{}{"type": "ed25519", "derived": true}},
	{method: "POST", path: "keys/rsa", body: map[string]interface{}{"type": "rsa-2048"}},
	{method: "POST", path: "keys/mac", body: map[string]interface{}{"type": "hmac", "key_size": 64}},
	{method: "POST", path: "keys/derived", body: map[string]interface{}{"derived": true}},
	{method: "POST", path: "keys/conv", body: map[string]interface{}{"derived": true, "convergent_encryption": true}},
	{method: "POST", path: "keys/exp", body: map[string]interface{}{"exportable": true, "allow_plaintext_backup": true}},
	{method: "POST", path: "keys/auto", body: map[string]interface{}{"auto_rotate_period": "2h"}},
	{method: "POST", path: "keys/aes", body: map[string]interface{}{"type": "rsa-2048"},
		// Built-in transit means to warn here, but its GetPolicy wrapper
		// always reports a key as new, so the warning never shows.
		intended: "the plugin warns that the key already existed (so the type given was not applied)"},
	{method: "POST", path: "keys/bad", body: map[string]interface{}{"type": "des"}},
	{method: "POST", path: "keys/bad", body: map[string]interface{}{"type": "aes256-cmac"}},
	{method: "POST", path: "keys/bad", body: map[string]interface{}{"convergent_encryption": true}},
	{method: "POST", path: "keys/bad", body: map[string]interface{}{"auto_rotate_period": "5m"}},
	{method: "POST", path: "keys/bad", body: map[string]interface{}{"key_size": 64}},
	{method: "POST", path: "keys/bad", body: map[string]interface{}{"type": "hmac", "key_size": 8}},
	{method: "GET", path: "keys/aes"},
	{method: "GET", path: "keys/rsa"},
	{method: "GET", path: "keys/p256"},
	{method: "GET", path: "keys/mac"},
	{method: "GET", path: "keys/conv"},
	{method: "GET", path: "keys/missing"},
	{method: "LIST", path: "keys"},

	// Encrypt, decrypt and their errors.
	{method: "POST", path: "encrypt/aes", body: map[string]interface{}{"plaintext": b64("hello")}, capture: map[string]string{"ct": "ciphertext"}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"ciphertext": "{{ct}}"}},
	{method: "POST", path: "encrypt/aes", body: map[string]interface{}{"plaintext": ""}},
	{method: "POST", path: "encrypt/aes", body: map[string]interface{}{}},
	{method: "POST", path: "encrypt/aes", body: map[string]interface{}{"plaintext": "not base64!"}},
	{method: "POST", path: "encrypt/aes", body: map[string]interface{}{"plaintext": b64("x"), "nonce": b64("123456789012")}},
	{method: "POST", path: "encrypt/aes", body: map[string]interface{}{"plaintext": b64("x"), "key_version": 2}},
	{method: "POST", path: "encrypt/aes", body: map[string]interface{}{"plaintext": b64("x"), "associated_data": b64("ad")}, capture: map[string]string{"ctad": "ciphertext"}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"ciphertext": "{{ctad}}", "associated_data": b64("ad")}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"ciphertext": "{{ctad}}", "associated_data": b64("other")}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"ciphertext": "abc"}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"ciphertext": "vault:v1"}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"ciphertext": "vault:vX:AAAA"}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"ciphertext": "vault:v1:%%%"}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"ciphertext": "vault:v1:AAAA"}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"ciphertext": "vault:v9:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"ciphertext": "vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}},
	{method: "POST", path: "decrypt/missing", body: map[string]interface{}{"ciphertext": "{{ct}}"}},
	{method: "POST", path: "encrypt/derived", body: map[string]interface{}{"plaintext": b64("x")}},
	{method: "POST", path: "encrypt/derived", body: map[string]interface{}{"plaintext": b64("x"), "context": b64("tenant")}, capture: map[string]string{"ctd": "ciphertext"}},
	{method: "POST", path: "decrypt/derived", body: map[string]interface{}{"ciphertext": "{{ctd}}", "context": b64("tenant")}},
	{method: "POST", path: "decrypt/derived", body: map[string]interface{}{"ciphertext": "{{ctd}}", "context": b64("other")}},
	{method: "POST", path: "decrypt/derived", body: map[string]interface{}{"ciphertext": "{{ctd}}"}},
	{method: "POST", path: "encrypt/conv", body: map[string]interface{}{"plaintext": b64("same"), "context": b64("c")}},
	{method: "POST", path: "encrypt/p256", body: map[string]interface{}{"plaintext": b64("x")}},
	{method: "POST", path: "encrypt/mac", body: map[string]interface{}{"plaintext": b64("x")}},
	{method: "POST", path: "encrypt/rsa", body: map[string]interface{}{"plaintext": b64("x"), "padding_scheme": "pkcs1v15"}, capture: map[string]string{"ctrsa": "ciphertext"}},
	{method: "POST", path: "decrypt/rsa", body: map[string]interface{}{"ciphertext": "{{ctrsa}}", "padding_scheme": "pkcs1v15"}},
	{method: "POST", path: "encrypt/rsa", body: map[string]interface{}{"plaintext": b64("x"), "associated_data": b64("ad")}},
	{method: "POST", path: "encrypt/aes", body: map[string]interface{}{"plaintext": b64("x"), "padding_scheme": "oaep"}},
	{method: "POST", path: "encrypt/aes", body: map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"plaintext": b64("a"), "padding_scheme": "oaep"},
	}}, intended: "a batch item with an invalid padding_scheme makes the batch 400, as any bad item does; built-in transit answers 200"},

	// Upsert on encrypt.
	{method: "POST", path: "encrypt/upserted", body: map[string]interface{}{"plaintext": b64("x"), "type": "chacha20-poly1305"}},
	{method: "GET", path: "keys/upserted"},
	{method: "POST", path: "encrypt/upsert-bad", body: map[string]interface{}{"plaintext": b64("x"), "type": "ecdsa-p256"}},
	{method: "POST", path: "encrypt/upsert-bad", body: map[string]interface{}{"plaintext": b64("x"), "type": "nope"}},
	{method: "POST", path: "encrypt/upsert-bad", body: map[string]interface{}{"plaintext": b64("x"), "convergent_encryption": true}},
	{method: "POST", path: "config/keys", body: map[string]interface{}{"disable_upsert": true}},
	{method: "GET", path: "config/keys"},
	{method: "POST", path: "encrypt/not-created", body: map[string]interface{}{"plaintext": b64("x")}},
	{method: "POST", path: "config/keys", body: map[string]interface{}{"disable_upsert": false}},

	// Batches. A body of 1 KiB or more is decoded by the plugin's fast path
	// (grpc_fastpath.go); the smaller ones by the SDK.
	{method: "POST", path: "encrypt/aes", body: largeBatch(40, 7), capture: map[string]string{"lct": "batch_results.39.ciphertext"}},
	{method: "POST", path: "encrypt/aes", body: withField(largeBatch(20, -1), "key_version", "not a number")},
	{method: "POST", path: "encrypt/new-from-large-batch", body: withField(largeBatch(20, -1), "key_version", "not a number")},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"partial_failure_response_code": 207, "batch_input": append(largeBatch(30, -1)["batch_input"].([]interface{}),
		map[string]interface{}{"ciphertext": "{{lct}}", "reference": "last", "key_version": 1.0})}},
	{method: "POST", path: "encrypt/aes", body: map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"plaintext": b64("a"), "reference": "ra"},
		map[string]interface{}{"plaintext": b64("b"), "reference": "rb"},
	}}, capture: map[string]string{"bct0": "batch_results.0.ciphertext", "bct1": "batch_results.1.ciphertext"}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"ciphertext": "{{bct0}}", "reference": "x"},
		map[string]interface{}{"ciphertext": "{{bct1}}", "reference": "y"},
	}}},
	{method: "POST", path: "encrypt/aes", body: map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"plaintext": b64("a"), "reference": "good"},
		map[string]interface{}{"plaintext": "%%", "reference": "bad"},
	}}},
	{method: "POST", path: "encrypt/aes", body: map[string]interface{}{"partial_failure_response_code": 207, "batch_input": []interface{}{
		map[string]interface{}{"plaintext": b64("a"), "reference": "good"},
		map[string]interface{}{"plaintext": "%%", "reference": "bad"},
	}}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"ciphertext": "{{bct0}}"},
		map[string]interface{}{"ciphertext": "junk"},
	}}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"partial_failure_response_code": 299, "batch_input": []interface{}{
		map[string]interface{}{"ciphertext": "{{bct0}}"},
		map[string]interface{}{"ciphertext": "junk"},
	}}},
	{method: "POST", path: "encrypt/aes", body: map[string]interface{}{"batch_input": []interface{}{}}},
	{method: "POST", path: "encrypt/derived", body: map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"plaintext": b64("a"), "context": b64("c")},
		map[string]interface{}{"plaintext": b64("b")},
	}}},

	// Rotation, configuration, rewrap, trim.
	{method: "POST", path: "keys/aes/rotate"},
	{method: "POST", path: "keys/missing/rotate"},
	{method: "POST", path: "rewrap/aes", body: map[string]interface{}{"ciphertext": "{{ct}}"}, capture: map[string]string{"ct2": "ciphertext"}},
	{method: "POST", path: "rewrap/aes", body: map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"ciphertext": "{{ct}}", "reference": "r"},
		map[string]interface{}{"ciphertext": "junk", "reference": "j"},
	}}},
	{method: "POST", path: "rewrap/aes", body: map[string]interface{}{}},
	{method: "POST", path: "rewrap/aes", body: map[string]interface{}{"ciphertext": "{{ctad}}", "associated_data": b64("ad")},
		intended: "rewrap takes associated_data; built-in transit ignores it, so a ciphertext made with associated data cannot be rewrapped there"},
	{method: "POST", path: "keys/aes/config", body: map[string]interface{}{"min_decryption_version": 2}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"ciphertext": "{{ct}}"}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"ciphertext": "{{ct2}}"}},
	{method: "POST", path: "keys/aes/config", body: map[string]interface{}{"min_decryption_version": 5}},
	{method: "POST", path: "keys/aes/config", body: map[string]interface{}{"min_encryption_version": 1}},
	{method: "POST", path: "keys/aes/config", body: map[string]interface{}{"min_decryption_version": 0}},
	{method: "POST", path: "keys/aes/config", body: map[string]interface{}{"min_encryption_version": 2, "deletion_allowed": true, "exportable": true, "auto_rotate_period": "48h"}},
	{method: "POST", path: "keys/aes/config", body: map[string]interface{}{"exportable": false}},
	{method: "POST", path: "keys/missing/config", body: map[string]interface{}{"deletion_allowed": true}},
	{method: "POST", path: "keys/aes/trim", body: map[string]interface{}{}},
	{method: "POST", path: "keys/aes/trim", body: map[string]interface{}{"min_available_version": 3}},
	{method: "POST", path: "keys/aes/trim", body: map[string]interface{}{"min_available_version": 2}},
	{method: "POST", path: "keys/aes/trim", body: map[string]interface{}{"min_available_version": 1}},

	// Datakeys.
	{method: "POST", path: "datakey/plaintext/aes", capture: map[string]string{"dk": "ciphertext"}},
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"ciphertext": "{{dk}}"}},
	{method: "POST", path: "datakey/wrapped/aes", body: map[string]interface{}{"bits": 512}},
	{method: "POST", path: "datakey/plaintext/aes", body: map[string]interface{}{"bits": 64}},
	{method: "POST", path: "datakey/other/aes"},
	{method: "POST", path: "datakey/plaintext/missing"},
	{method: "POST", path: "datakey/plaintext/derived"},
	{method: "POST", path: "datakey/plaintext/derived", body: map[string]interface{}{"context": b64("c")}},

	// Sign, verify, HMAC, hash, random.
	{method: "POST", path: "sign/p256", body: map[string]interface{}{"input": b64("doc")}, capture: map[string]string{"sig": "signature"}},
	{method: "POST", path: "verify/p256", body: map[string]interface{}{"input": b64("doc"), "signature": "{{sig}}"}},
	{method: "POST", path: "verify/p256", body: map[string]interface{}{"input": b64("other"), "signature": "{{sig}}"}},
	{method: "POST", path: "sign/p256/sha2-512", body: map[string]interface{}{"input": b64("doc"), "marshaling_algorithm": "jws"}},
	{method: "POST", path: "sign/ed", body: map[string]interface{}{"input": b64("doc")}},
	{method: "POST", path: "sign/rsa", body: map[string]interface{}{"input": b64("doc"), "signature_algorithm": "pkcs1v15"}},
	{method: "POST", path: "sign/aes", body: map[string]interface{}{"input": b64("doc")}},
	{method: "POST", path: "sign/missing", body: map[string]interface{}{"input": b64("doc")}},
	{method: "POST", path: "sign/p256", body: map[string]interface{}{"input": b64("doc"), "hash_algorithm": "md5"}},
	{method: "POST", path: "sign/ed", body: map[string]interface{}{"input": b64("doc"), "prehashed": true}},
	{method: "POST", path: "sign/p256", body: map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"input": b64("a"), "reference": "1"},
		map[string]interface{}{"input": "%%", "reference": "2"},
	}}},
	{method: "POST", path: "verify/p256", body: map[string]interface{}{"input": b64("doc")}},
	{method: "POST", path: "verify/p256", body: map[string]interface{}{"input": b64("doc"), "signature": "nope"}},
	{method: "POST", path: "hmac/aes", body: map[string]interface{}{"input": b64("m")}, capture: map[string]string{"mac": "hmac"}},
	{method: "POST", path: "verify/aes", body: map[string]interface{}{"input": b64("m"), "hmac": "{{mac}}"}},
	{method: "POST", path: "verify/aes", body: map[string]interface{}{"input": b64("n"), "hmac": "{{mac}}"}},
	{method: "POST", path: "hmac/mac/sha2-512", body: map[string]interface{}{"input": b64("m")}},
	{method: "POST", path: "hmac/aes", body: map[string]interface{}{}},
	{method: "POST", path: "hmac/aes", body: map[string]interface{}{"input": "%%"}},
	{method: "POST", path: "hmac/aes", body: map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"input": b64("a"), "reference": "1"},
		map[string]interface{}{"input": "%%", "reference": "2"},
	}}},
	{method: "POST", path: "hash", body: map[string]interface{}{"input": b64("abc")}},
	{method: "POST", path: "hash/sha3-256", body: map[string]interface{}{"input": b64("abc"), "format": "base64"}},
	{method: "POST", path: "hash", body: map[string]interface{}{"input": b64("abc"), "algorithm": "md5"}},
	{method: "POST", path: "hash", body: map[string]interface{}{}},
	{method: "POST", path: "random", body: map[string]interface{}{}},
	{method: "POST", path: "random/64", body: map[string]interface{}{"format": "hex"}},
	{method: "POST", path: "random/platform/8", body: map[string]interface{}{}},
	{method: "POST", path: "random", body: map[string]interface{}{"bytes": 0}},
	{method: "POST", path: "random", body: map[string]interface{}{"format": "oct"}},

	// Export, backup, restore.
	{method: "GET", path: "export/encryption-key/exp"},
	{method: "GET", path: "export/encryption-key/exp/1"},
	{method: "GET", path: "export/hmac-key/exp/latest"},
	{method: "GET", path: "export/encryption-key/aes128"},
	{method: "GET", path: "export/public-key/p256"},
	{method: "GET", path: "export/signing-key/exp"},
	{method: "GET", path: "export/bogus-key/exp"},
	{method: "GET", path: "export/encryption-key/exp/7"},
	{method: "GET", path: "export/encryption-key/missing"},
	{method: "GET", path: "backup/exp", capture: map[string]string{"backup": "backup"}},
	{method: "GET", path: "backup/aes128"},
	{method: "POST", path: "restore", body: map[string]interface{}{"backup": "{{backup}}"}},
	{method: "POST", path: "restore/exp-copy", body: map[string]interface{}{"backup": "{{backup}}"}},
	{method: "POST", path: "restore", body: map[string]interface{}{"backup": "{{backup}}", "force": true}},
	{method: "POST", path: "restore", body: map[string]interface{}{}},
	{method: "GET", path: "keys/exp-copy"},

	// Import, wrapping key, CSR, cache.
	{method: "GET", path: "wrapping_key"},
	{method: "POST", path: "keys/imported/import", body: map[string]interface{}{"ciphertext": b64(strings.Repeat("x", 100))}},
	{method: "POST", path: "keys/aes/import", body: map[string]interface{}{"ciphertext": b64(strings.Repeat("x", 600))}},
	{method: "POST", path: "keys/aes/import_version", body: map[string]interface{}{"ciphertext": b64(strings.Repeat("x", 600))}},
	{method: "POST", path: "keys/p256/csr"},
	{method: "POST", path: "keys/aes/csr"},
	{method: "GET", path: "cache-config"},
	{method: "POST", path: "cache-config", body: map[string]interface{}{"size": 5}},
	{method: "POST", path: "cache-config", body: map[string]interface{}{"size": 50}},
	{method: "GET", path: "cache-config"},

	// Deletion.
	{method: "POST", path: "keys/hmac-default", body: map[string]interface{}{"type": "hmac"},
		intended: "built-in transit fails (500) on an hmac key without key_size; the plugin makes a 32-byte key"},
	{method: "DELETE", path: "keys/rsa"},
	{method: "DELETE", path: "keys/aes"},
	{method: "GET", path: "keys/aes"},
	{method: "DELETE", path: "keys/missing"},
}

func TestDifferentialAgainstBuiltinTransit(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{})
	v.mustCLI("secrets", "enable", "-path=builtin", "transit")
	v.mountPlugin("plugin")

	vars := map[string]map[string]string{"builtin": {}, "plugin": {}}
	var diffs, excused []string
	for i, st := range diffSession {
		label := fmt.Sprintf("#%d %s %s", i, st.method, st.path)
		var answers [2]answer
		for j, mount := range []string{"builtin", "plugin"} {
			path := substitute(st.path, vars[mount]).(string)
			body := substitute(st.body, vars[mount])
			if st.method == "LIST" {
				answers[j] = v.call("GET", mount+"/"+path+"?list=true", nil)
			} else {
				answers[j] = v.call(st.method, mount+"/"+path, body)
			}
			for name, field := range st.capture {
				if val, ok := lookup(answers[j].body, "data."+field).(string); ok {
					vars[mount][name] = val
				}
			}
		}
		for _, d := range compareAnswers(answers[0], answers[1]) {
			line := fmt.Sprintf("%s: %s", label, d)
			if st.intended != "" {
				excused = append(excused, line+" ("+st.intended+")")
				continue
			}
			if excuse, ok := excusable(answers[0], answers[1]); ok {
				excused = append(excused, line+" ("+excuse+")")
				continue
			}
			diffs = append(diffs, line)
		}
	}
	for _, d := range excused {
		t.Logf("intended difference: %s", d)
	}
	var added []string
	for k := range addedSeen {
		added = append(added, k)
	}
	sort.Strings(added)
	t.Logf("fields only the plugin returns (key lifecycle): %v", added)
	require.Emptyf(t, diffs, "differences from built-in transit:\n%s", strings.Join(diffs, "\n"))
}

// answer is one HTTP answer.
type answer struct {
	status int
	body   map[string]interface{}
}

func (s *vaultServer) call(method, path string, body interface{}) answer {
	if m, ok := body.(map[string]interface{}); ok && m == nil {
		body = nil
	}
	status, decoded := s.rawRequest(method, path, body)
	return answer{status: status, body: decoded}
}

// excusable reports the differences this project makes on purpose: where
// built-in transit answers a caller's mistake with a 500, the plugin answers
// 400 with the same message.
func excusable(builtin, plugin answer) (string, bool) {
	if builtin.status == 500 && plugin.status == 400 {
		return "built-in transit answers this caller mistake with 500; the plugin with 400", true
	}
	return "", false
}

var varRef = regexp.MustCompile(`\{\{(\w+)\}\}`)

// substitute replaces {{name}} references in strings, maps and slices.
func substitute(v interface{}, vars map[string]string) interface{} {
	switch x := v.(type) {
	case string:
		return varRef.ReplaceAllStringFunc(x, func(m string) string { return vars[m[2:len(m)-2]] })
	case map[string]interface{}:
		if x == nil {
			return x
		}
		out := make(map[string]interface{}, len(x))
		for k, val := range x {
			out[k] = substitute(val, vars)
		}
		return out
	case []interface{}:
		out := make([]interface{}, len(x))
		for i, val := range x {
			out[i] = substitute(val, vars)
		}
		return out
	}
	return v
}

// lookup follows a dotted path (map keys and list indexes).
func lookup(v interface{}, path string) interface{} {
	for _, part := range strings.Split(path, ".") {
		switch x := v.(type) {
		case map[string]interface{}:
			v = x[part]
		case []interface{}:
			var i int
			if _, err := fmt.Sscan(part, &i); err != nil || i >= len(x) {
				return nil
			}
			v = x[i]
		default:
			return nil
		}
	}
	return v
}

// compareAnswers lists the differences between two answers: status, errors,
// warnings and data, where values made of fresh randomness (ciphertexts,
// keys, signatures, times) must have the same shape rather than be equal.
func compareAnswers(a, b answer) []string {
	var diffs []string
	if a.status != b.status {
		diffs = append(diffs, fmt.Sprintf("status %d (built-in) vs %d (plugin); errors %v vs %v", a.status, b.status, a.body["errors"], b.body["errors"]))
	}
	if !reflect.DeepEqual(a.body["errors"], b.body["errors"]) {
		diffs = append(diffs, fmt.Sprintf("errors %v vs %v", a.body["errors"], b.body["errors"]))
	}
	if !reflect.DeepEqual(normaliseWarnings(a.body["warnings"]), normaliseWarnings(b.body["warnings"])) {
		diffs = append(diffs, fmt.Sprintf("warnings %v vs %v", a.body["warnings"], b.body["warnings"]))
	}
	compareValues("data", a.body["data"], b.body["data"], &diffs)
	return diffs
}

// normaliseWarnings drops the mount path from warnings that quote it.
func normaliseWarnings(w interface{}) interface{} {
	list, ok := w.([]interface{})
	if !ok {
		return w
	}
	out := make([]string, 0, len(list))
	for _, x := range list {
		out = append(out, strings.NewReplacer("builtin/", "M/", "plugin/", "M/").Replace(fmt.Sprint(x)))
	}
	sort.Strings(out)
	return out
}

func compareValues(path string, a, b interface{}, diffs *[]string) {
	switch x := a.(type) {
	case map[string]interface{}:
		y, ok := b.(map[string]interface{})
		if !ok {
			*diffs = append(*diffs, fmt.Sprintf("%s: %T vs %T", path, a, b))
			return
		}
		keys := map[string]bool{}
		for k := range x {
			keys[k] = true
		}
		for k := range y {
			keys[k] = true
		}
		for k := range keys {
			av, aok := x[k]
			bv, bok := y[k]
			switch {
			case !aok && additions[k]:
				// A new feature's field: clients of built-in transit
				// ignore fields they do not know.
				addedSeen[k] = true
			case !aok:
				*diffs = append(*diffs, fmt.Sprintf("%s.%s only in the plugin's answer", path, k))
			case !bok:
				*diffs = append(*diffs, fmt.Sprintf("%s.%s missing from the plugin's answer", path, k))
			default:
				compareValues(path+"."+k, av, bv, diffs)
			}
		}
	case []interface{}:
		y, ok := b.([]interface{})
		if !ok || len(x) != len(y) {
			*diffs = append(*diffs, fmt.Sprintf("%s: %v vs %v", path, a, b))
			return
		}
		for i := range x {
			compareValues(fmt.Sprintf("%s.%d", path, i), x[i], y[i], diffs)
		}
	case string:
		y, ok := b.(string)
		if !ok || (x != y && shape(x) != shape(y)) {
			*diffs = append(*diffs, fmt.Sprintf("%s: %q vs %q", path, a, b))
		}
	case float64:
		y, ok := b.(float64)
		// Creation times in Unix seconds differ by when each key was made.
		if !ok || (x != y && !(x > 1e9 && y > 1e9)) {
			*diffs = append(*diffs, fmt.Sprintf("%s: %v vs %v", path, a, b))
		}
	default:
		if !reflect.DeepEqual(a, b) {
			*diffs = append(*diffs, fmt.Sprintf("%s: %v vs %v", path, a, b))
		}
	}
}

// additions are the fields the plugin adds to key descriptions for features
// built-in transit lacks (the key lifecycle); they are listed, not failed.
var additions = map[string]bool{"disabled": true, "max_encryptions": true, "encryptions": true, "deletion_time": true}

// addedSeen records which additions the session met.
var addedSeen = map[string]bool{}

var versioned = regexp.MustCompile(`^vault:v(\d+):(.*)$`)

// shape describes a value made of fresh randomness by its form, so that two
// mounts' ciphertexts, keys and times compare equal when alike.
func shape(s string) string {
	if m := versioned.FindStringSubmatch(s); m != nil {
		return "vault:v" + m[1] + ":" + shape(m[2])
	}
	if _, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return "time"
	}
	if block, _ := pem.Decode([]byte(s)); block != nil {
		return "pem:" + block.Type
	}
	if raw, err := base64.StdEncoding.DecodeString(s); err == nil && len(s) >= 8 {
		switch {
		case json.Valid(raw):
			return "base64-json"
		case len(raw) > 2 && raw[0] == 0x30 && int(raw[1]) == len(raw)-2:
			return "base64-der" // ECDSA signatures vary in length
		}
		return fmt.Sprintf("base64:%d", len(raw))
	}
	if raw, err := base64.RawURLEncoding.DecodeString(s); err == nil && len(s) >= 16 {
		return fmt.Sprintf("base64url:%d", len(raw))
	}
	if regexp.MustCompile(`^[0-9a-f]{16,}$`).MatchString(s) {
		return fmt.Sprintf("hex:%d", len(s))
	}
	return s
}

// largeBatch is a batch_input of n items with references, large enough for
// the plugin's fast decoding path; item bad (if in range) has a plaintext
// that is not base64.
func largeBatch(n, bad int) map[string]interface{} {
	items := make([]interface{}, n)
	for i := range items {
		pt := b64(fmt.Sprintf("row %03d of a batch large enough for the fast path", i))
		if i == bad {
			pt = "%%not base64"
		}
		items[i] = map[string]interface{}{"plaintext": pt, "ciphertext": pt, "reference": fmt.Sprint("ref-", i)}
	}
	return map[string]interface{}{"batch_input": items, "partial_failure_response_code": 207}
}

func withField(body map[string]interface{}, k string, v interface{}) map[string]interface{} {
	body[k] = v
	return body
}
