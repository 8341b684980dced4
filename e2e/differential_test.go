package e2e

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
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
	"github.com/tink-crypto/tink-go/v2/kwp/subtle"
)

// step is one scripted call, sent to both mounts. {{name}} in the path or in
// string values of the body is replaced by what capture stored from an
// earlier response of the same mount.
type step struct {
	method  string
	path    string
	body    map[string]interface{}
	capture map[string]string // variable -> dotted path in the response data
	// exact names data fields (dotted paths under data) that would be
	// compared by shape as fresh randomness (see freshField) but are
	// deterministic in this step: both mounts hold the same imported key.
	exact []string
	// want, when set, is the status both mounts must answer (so that two
	// equal failures do not pass for agreement).
	want int
	// swap sends each mount the values the other mount's answers captured
	// (for keys both hold: the two must interoperate).
	swap bool
	// fresh names data fields made of fresh randomness in this step only,
	// compared by shape (a datakey's plaintext).
	fresh []string
	// intended lists the differences the plugin makes on purpose in this
	// step, each by what differs (a difference's what) and why. Any other
	// difference of the step fails, and so does an intended one that no
	// longer occurs.
	intended []intent
}

// intent excuses one difference of a step.
type intent struct {
	what string // as difference.what: "status 500 vs 400", "errors", "warnings", "data.x"
	why  string
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
		intended: []intent{{"warnings", "the plugin warns that the key already existed (so the type given was not applied)"}}},
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
	}}, intended: []intent{{"status 200 vs 400", "a batch item with an invalid padding_scheme makes the batch 400, as any bad item does; built-in transit answers 200"}}},

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
	// (internal/boundary); the smaller ones by the SDK. Plain batch answers
	// are encoded by the plugin.
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
		intended: rewrapAD},
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
	{method: "POST", path: "datakey/plaintext/aes", capture: map[string]string{"dk": "ciphertext"}, fresh: []string{"plaintext"}},
	// Each mount's own datakey comes back; the two differ.
	{method: "POST", path: "decrypt/aes", body: map[string]interface{}{"ciphertext": "{{dk}}"}, fresh: []string{"plaintext"}},
	{method: "POST", path: "datakey/wrapped/aes", body: map[string]interface{}{"bits": 512}},
	{method: "POST", path: "datakey/plaintext/aes", body: map[string]interface{}{"bits": 64}},
	{method: "POST", path: "datakey/other/aes"},
	{method: "POST", path: "datakey/plaintext/missing"},
	{method: "POST", path: "datakey/plaintext/derived"},
	{method: "POST", path: "datakey/plaintext/derived", body: map[string]interface{}{"context": b64("c")}, fresh: []string{"plaintext"}},

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

	// The same key material imported into both mounts (diffImports): what
	// it computes deterministically must be equal, not only alike.
	{method: "POST", path: "keys/known-mac/import", body: map[string]interface{}{"ciphertext": "{{wrapped_mac}}", "type": "hmac"}, want: 204},
	{method: "POST", path: "hmac/known-mac", body: map[string]interface{}{"input": b64("m")}, exact: []string{"hmac"}, want: 200},
	{method: "POST", path: "hmac/known-mac/sha2-512", body: map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"input": b64("a"), "reference": "1"},
		map[string]interface{}{"input": b64("b"), "reference": "2"},
	}}, exact: []string{"batch_results.0.hmac", "batch_results.1.hmac"}, want: 200},
	{method: "POST", path: "keys/known-ed/import", body: map[string]interface{}{"ciphertext": "{{wrapped_ed}}", "type": "ed25519"}, want: 204},
	{method: "GET", path: "keys/known-ed", exact: []string{"keys.1.public_key"}, want: 200},
	{method: "POST", path: "sign/known-ed", body: map[string]interface{}{"input": b64("doc")}, exact: []string{"signature"}, capture: map[string]string{"edsig": "signature"}, want: 200},
	{method: "POST", path: "verify/known-ed", body: map[string]interface{}{"input": b64("doc"), "signature": "{{edsig}}"}, swap: true, want: 200},
	{method: "GET", path: "export/public-key/known-ed", exact: []string{"keys.1"}, want: 200},
	// Ciphertexts have random nonces (and import refuses convergent
	// keys), so each mount decrypts the other's instead.
	{method: "POST", path: "keys/known-aes/import", body: map[string]interface{}{"ciphertext": "{{wrapped_aes}}", "derived": true}, want: 204},
	{method: "POST", path: "encrypt/known-aes", body: map[string]interface{}{"plaintext": b64("same"), "context": b64("c")}, capture: map[string]string{"kct": "ciphertext"}, want: 200},
	{method: "POST", path: "decrypt/known-aes", body: map[string]interface{}{"ciphertext": "{{kct}}", "context": b64("c")}, swap: true, want: 200},
	{method: "POST", path: "decrypt/known-aes", body: map[string]interface{}{"ciphertext": "{{kct}}", "context": b64("other")}, swap: true, want: 400},

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
		intended: hmacDefaultSize},
	{method: "DELETE", path: "keys/rsa"},
	{method: "DELETE", path: "keys/aes"},
	{method: "GET", path: "keys/aes"},
	{method: "DELETE", path: "keys/missing"},
}

// The differences some steps make on purpose, each named.
var (
	rewrapADWhy = "rewrap takes associated_data; built-in transit ignores it, so a ciphertext made with associated data cannot be rewrapped there"
	rewrapAD    = []intent{{"status 400 vs 200", rewrapADWhy}, {"errors", rewrapADWhy}, {"data", rewrapADWhy}}

	hmacDefaultSizeWhy = "built-in transit fails (500) on an hmac key without key_size; the plugin makes a 32-byte key"
	hmacDefaultSize    = []intent{{"status 500 vs 200", hmacDefaultSizeWhy}, {"errors", hmacDefaultSizeWhy}, {"data", hmacDefaultSizeWhy}}
)

func TestDifferentialAgainstBuiltinTransit(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{})
	v.mustCLI("secrets", "enable", "-path=builtin", "transit")
	v.mountPlugin("plugin")

	vars := map[string]map[string]string{"builtin": diffImports(t, v, "builtin"), "plugin": diffImports(t, v, "plugin")}
	var diffs, excused []string
	for i, st := range diffSession {
		label := fmt.Sprintf("#%d %s %s", i, st.method, st.path)
		var answers [2]answer
		for j, mount := range []string{"builtin", "plugin"} {
			from := mount
			if st.swap {
				from = map[string]string{"builtin": "plugin", "plugin": "builtin"}[mount]
			}
			path := substitute(st.path, vars[from]).(string)
			body := substitute(st.body, vars[from])
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
		if st.want != 0 && (answers[0].status != st.want || answers[1].status != st.want) {
			diffs = append(diffs, fmt.Sprintf("%s: status %d (built-in) and %d (plugin), want %d: %v vs %v",
				label, answers[0].status, answers[1].status, st.want, answers[0].body, answers[1].body))
		}
		for _, e := range st.exact {
			// A field the step promises is deterministic must be there.
			if lookup(answers[0].body, "data."+e) == nil {
				diffs = append(diffs, fmt.Sprintf("%s: data.%s, compared exactly, is missing from built-in transit's answer", label, e))
			}
		}
		got, stale := excuse(st, compareAnswers(answers[0], answers[1], st))
		for _, d := range got {
			line := fmt.Sprintf("%s: %s", label, d.detail)
			if d.why != "" {
				excused = append(excused, line+" ("+d.why+")")
				continue
			}
			diffs = append(diffs, line)
		}
		for _, in := range stale {
			diffs = append(diffs, fmt.Sprintf("%s: the intended difference %q (%s) did not occur", label, in.what, in.why))
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

// excuse gives each difference the step's intended names its reason, and
// returns the intents that matched no difference. (compareAnswers has
// already excused the 500-for-400 answers, excusable.)
func excuse(st step, diffs []difference) ([]difference, []intent) {
	used := make([]bool, len(st.intended))
	for i := range diffs {
		for k, in := range st.intended {
			if in.what == diffs[i].what {
				diffs[i].why, used[k] = in.why, true
			}
		}
	}
	var stale []intent
	for k, in := range st.intended {
		if !used[k] {
			stale = append(stale, in)
		}
	}
	return diffs, stale
}

// diffImports wraps fixed key material for the mount's wrapping key, as
// keys/:name/import takes it, so that both mounts hold the same keys: an
// HMAC key, an Ed25519 key and an AES-256 key. The variables are the
// ciphertexts to import.
func diffImports(t *testing.T, v *vaultServer, mount string) map[string]string {
	t.Helper()
	status, body := v.rawRequest("GET", mount+"/wrapping_key", nil)
	require.Equal(t, 200, status, "%s/wrapping_key: %v", mount, body)
	block, _ := pem.Decode([]byte(lookup(body, "data.public_key").(string)))
	require.NotNil(t, block, "%s/wrapping_key is not PEM", mount)
	pubAny, err := x509.ParsePKIXPublicKey(block.Bytes)
	require.NoError(t, err)
	pub, ok := pubAny.(*rsa.PublicKey)
	require.True(t, ok, "%s/wrapping_key is %T", mount, pubAny)

	ed := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, ed25519.SeedSize))
	edDER, err := x509.MarshalPKCS8PrivateKey(ed)
	require.NoError(t, err)
	wrap := func(material []byte) string {
		ephemeral := make([]byte, 32)
		_, err := rand.Read(ephemeral)
		require.NoError(t, err)
		wrappedKey, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, ephemeral, nil)
		require.NoError(t, err)
		kwp, err := subtle.NewKWP(ephemeral)
		require.NoError(t, err)
		wrapped, err := kwp.Wrap(material)
		require.NoError(t, err)
		return base64.StdEncoding.EncodeToString(append(wrappedKey, wrapped...))
	}
	return map[string]string{
		"wrapped_mac": wrap(bytes.Repeat([]byte("mac-key!"), 4)),
		"wrapped_ed":  wrap(edDER),
		"wrapped_aes": wrap(bytes.Repeat([]byte("aes-key!"), 4)),
	}
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
// 400 with built-in transit's message (it may add context around it). Only
// the status and the errors may differ then.
func excusable(builtin, plugin answer) (string, bool) {
	if builtin.status != 500 || plugin.status != 400 {
		return "", false
	}
	bm, pm := errorMessages(builtin), errorMessages(plugin)
	if len(bm) == 0 || len(bm) != len(pm) {
		return "", false
	}
	for i := range bm {
		if bm[i] == "" || !strings.Contains(pm[i], bm[i]) {
			return "", false
		}
	}
	return "built-in transit answers this caller mistake with 500; the plugin with 400 and the same message", true
}

// errorMessages are an answer's errors, each without the multierror
// wrapping ("1 error occurred:\n\t* ...") Vault adds to some.
func errorMessages(a answer) []string {
	list, _ := a.body["errors"].([]interface{})
	out := make([]string, 0, len(list))
	for _, e := range list {
		msg := strings.TrimSpace(fmt.Sprint(e))
		if rest, ok := strings.CutPrefix(msg, "1 error occurred:"); ok {
			msg = strings.TrimPrefix(strings.TrimSpace(rest), "* ")
		}
		out = append(out, msg)
	}
	return out
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

// difference is one way two answers differ: what (the status pair,
// "errors", "warnings" or the data field's dotted path), in words, and, once
// excused, why.
type difference struct {
	what, detail, why string
}

// compareAnswers lists the differences between two answers: status, errors,
// warnings and data. Data is compared exactly, but for values made of fresh
// randomness (freshField), which must have the same shape. An error answer
// must carry a message.
func compareAnswers(a, b answer, st step) []difference {
	var diffs []difference
	add := func(what, format string, args ...interface{}) {
		diffs = append(diffs, difference{what: what, detail: fmt.Sprintf(format, args...)})
	}
	if a.status != b.status {
		add(fmt.Sprintf("status %d vs %d", a.status, b.status),
			"status %d (built-in) vs %d (plugin); errors %v vs %v", a.status, b.status, a.body["errors"], b.body["errors"])
	}
	for _, x := range []struct {
		name string
		a    answer
	}{{"built-in transit", a}, {"plugin", b}} {
		if x.a.status >= 400 && !explained(x.a) {
			add("errors", "%s answers %d without an error message: %v", x.name, x.a.status, x.a.body)
		}
	}
	if !reflect.DeepEqual(a.body["errors"], b.body["errors"]) {
		add("errors", "errors %v vs %v", a.body["errors"], b.body["errors"])
	}
	if !reflect.DeepEqual(normaliseWarnings(a.body["warnings"]), normaliseWarnings(b.body["warnings"])) {
		add("warnings", "warnings %v vs %v", a.body["warnings"], b.body["warnings"])
	}
	compareValues("data", a.body["data"], b.body["data"], st, &diffs)
	if why, ok := excusable(a, b); ok {
		for i := range diffs {
			if diffs[i].what == "errors" || diffs[i].what == "status 500 vs 400" {
				diffs[i].why = why
			}
		}
	}
	return diffs
}

// explained reports whether an error answer says what went wrong: each of
// its errors has a message; or a failed batch item has; or it is Vault's
// not-found answer, a 404 with an empty error list.
func explained(a answer) bool {
	msgs := errorMessages(a)
	if len(msgs) > 0 {
		for _, m := range msgs {
			if m == "" {
				return false
			}
		}
		return true
	}
	if a.status == 404 {
		return true
	}
	results, _ := lookup(a.body, "data.batch_results").([]interface{})
	for _, r := range results {
		if msg, _ := lookup(r, "error").(string); msg != "" {
			return true
		}
	}
	return false
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

// compareValues adds to diffs how a (built-in transit's) and b (the
// plugin's) differ at path and below.
func compareValues(path string, a, b interface{}, st step, diffs *[]difference) {
	add := func(format string, args ...interface{}) {
		*diffs = append(*diffs, difference{what: path, detail: fmt.Sprintf(format, args...)})
	}
	switch x := a.(type) {
	case map[string]interface{}:
		y, ok := b.(map[string]interface{})
		if !ok {
			add("%s: %T vs %T", path, a, b)
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
				*diffs = append(*diffs, difference{what: path + "." + k, detail: fmt.Sprintf("%s.%s only in the plugin's answer", path, k)})
			case !bok:
				*diffs = append(*diffs, difference{what: path + "." + k, detail: fmt.Sprintf("%s.%s missing from the plugin's answer", path, k)})
			default:
				compareValues(path+"."+k, av, bv, st, diffs)
			}
		}
	case []interface{}:
		y, ok := b.([]interface{})
		if !ok || len(x) != len(y) {
			add("%s: %v vs %v", path, a, b)
			return
		}
		for i := range x {
			compareValues(fmt.Sprintf("%s.%d", path, i), x[i], y[i], st, diffs)
		}
	case string:
		y, ok := b.(string)
		switch {
		case !ok:
			add("%s: %q vs %v", path, a, b)
		case x == y:
		case !freshField(path, st):
			add("%s: %q vs %q (compared exactly)", path, a, b)
		case shape(x) != shape(y):
			add("%s: %q vs %q (compared by shape: %s vs %s)", path, a, b, shape(x), shape(y))
		}
	case float64:
		y, ok := b.(float64)
		// Creation times in Unix seconds differ by when each key was made.
		if !ok || (x != y && !(freshField(path, st) && x > 1e9 && y > 1e9)) {
			add("%s: %v vs %v", path, a, b)
		}
	default:
		if !reflect.DeepEqual(a, b) {
			add("%s: %v vs %v", path, a, b)
		}
	}
}

// freshPaths match the data fields made of fresh randomness wherever they
// appear (a key made on each mount, a random nonce, a randomised
// signature): two mounts' values are alike in shape, never equal.
var freshPaths = regexp.MustCompile(`^data\.(` + strings.Join([]string{
	`ciphertext`, `batch_results\.\d+\.ciphertext`, // random nonces; each mount's own key
	`signature`, `batch_results\.\d+\.signature`, // each mount's own key
	`hmac`, `batch_results\.\d+\.hmac`, // each mount's own key
	`random_bytes`,
	`backup`,                                // the key material and times
	`keys\.\d+`,                             // a version's creation time (Unix seconds) or exported key material
	`keys\.\d+\.(public_key|creation_time)`, // an asymmetric version
	`public_key`, `csr`,                     // the wrapping key; a CSR signed by each mount's own key
	`(backup_info|restore_info)\.time`,
}, "|") + `)$`)

// freshField reports whether the data field at path (starting "data.") is
// compared by shape in this step.
func freshField(path string, st step) bool {
	field := strings.TrimPrefix(path, "data.")
	for _, e := range st.exact {
		if e == field {
			return false
		}
	}
	for _, f := range st.fresh {
		if f == field {
			return true
		}
	}
	return freshPaths.MatchString(path)
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

// TestDifferentialComparison checks the comparison itself, without Vault:
// what it must report and what it may let pass.
func TestDifferentialComparison(t *testing.T) {
	t.Parallel()
	ok := func(data map[string]interface{}) answer {
		return answer{status: 200, body: map[string]interface{}{"data": data}}
	}
	fail := func(status int, msg string) answer {
		return answer{status: status, body: map[string]interface{}{"errors": []interface{}{msg}}}
	}
	sha := func(s string) string {
		sum := sha256.Sum256([]byte(s))
		return fmt.Sprintf("%x", sum)
	}
	twoWhy := []intent{{"status 200 vs 400", "why"}}
	tests := []struct {
		name       string
		st         step
		a, b       answer
		unexcused  []string // whats of the differences left unexcused
		staleWhats []string
	}{
		{name: "hash of another input", a: ok(map[string]interface{}{"sum": sha("hello")}), b: ok(map[string]interface{}{"sum": sha("HELLO")}),
			unexcused: []string{"data.sum"}},
		{name: "plaintext of another case", a: ok(map[string]interface{}{"plaintext": b64("hello")}), b: ok(map[string]interface{}{"plaintext": b64("HELLO")}),
			unexcused: []string{"data.plaintext"}},
		{name: "ciphertexts alike", a: ok(map[string]interface{}{"ciphertext": "vault:v1:" + b64("0123456789abcdef")}), b: ok(map[string]interface{}{"ciphertext": "vault:v1:" + b64("fedcba9876543210")})},
		{name: "ciphertexts of other versions", a: ok(map[string]interface{}{"ciphertext": "vault:v1:" + b64("0123456789abcdef")}), b: ok(map[string]interface{}{"ciphertext": "vault:v2:" + b64("fedcba9876543210")}),
			unexcused: []string{"data.ciphertext"}},
		{name: "an hmac both mounts' key makes", st: step{exact: []string{"hmac"}},
			a: ok(map[string]interface{}{"hmac": "vault:v1:" + b64("0123456789abcdef")}), b: ok(map[string]interface{}{"hmac": "vault:v1:" + b64("fedcba9876543210")}),
			unexcused: []string{"data.hmac"}},
		{name: "a datakey's plaintext", st: step{fresh: []string{"plaintext"}},
			a: ok(map[string]interface{}{"plaintext": b64("0123456789abcdef")}), b: ok(map[string]interface{}{"plaintext": b64("fedcba9876543210")})},
		{name: "an intended status, nothing else", st: step{intended: twoWhy},
			a: ok(map[string]interface{}{"x": "1"}), b: answer{status: 400, body: map[string]interface{}{"data": map[string]interface{}{"x": "2"}, "errors": []interface{}{"bad"}}},
			unexcused: []string{"errors", "data.x"}},
		{name: "an intended difference that did not occur", st: step{intended: twoWhy},
			a: ok(nil), b: ok(nil), staleWhats: []string{"status 200 vs 400"}},
		{name: "500 to 400 with built-in's message", a: fail(500, "1 error occurred:\n\t* key \"k\" already exists\n\n"), b: fail(400, "restoring key: key \"k\" already exists")},
		{name: "500 to 400 with another message", a: fail(500, "1 error occurred:\n\t* key \"k\" already exists\n\n"), b: fail(400, "internal error"),
			unexcused: []string{"status 500 vs 400", "errors"}},
		{name: "an error without a message", a: fail(400, "bad input"), b: fail(400, ""),
			unexcused: []string{"errors", "errors"}},
		{name: "the same error", a: fail(400, "bad input"), b: fail(400, "bad input")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			diffs, stale := excuse(tc.st, compareAnswers(tc.a, tc.b, tc.st))
			var unexcused []string
			for _, d := range diffs {
				if d.why == "" {
					unexcused = append(unexcused, d.what)
				}
			}
			var staleWhats []string
			for _, in := range stale {
				staleWhats = append(staleWhats, in.what)
			}
			sort.Strings(unexcused)
			sort.Strings(tc.unexcused)
			require.Equal(t, tc.unexcused, unexcused, "%v", diffs)
			require.Equal(t, tc.staleWhats, staleWhats)
		})
	}
}
