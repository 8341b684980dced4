package e2e

import (
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Bounds of the black-box fuzz test. HSM_TRANSIT_FUZZ_DURATION (a Go
// duration) runs it longer than make test's default.
const (
	fuzzDefaultDuration = 40 * time.Second
	fuzzSlowRequest     = 10 * time.Second
	fuzzMaxRSSGrowthKiB = 256 << 10
)

// fuzzKeys are made on both mounts before the run, one of each kind the
// paths take.
var fuzzKeys = map[string]map[string]interface{}{
	"aes":     {"exportable": true, "allow_plaintext_backup": true},
	"conv":    {"derived": true, "convergent_encryption": true},
	"chacha":  {"type": "chacha20-poly1305"},
	"rsa":     {"type": "rsa-2048"},
	"ecdsa":   {"type": "ecdsa-p256"},
	"ed":      {"type": "ed25519"},
	"mac":     {"type": "hmac", "key_size": 32},
	"deleted": {"deletion_allowed": true},
}

// fuzzPaths are the API table's paths (but config/seal and seal/*, which
// would seal the mount and are attacked on their own in attack_test.go),
// with the methods they take.
var fuzzPaths = []struct{ method, path string }{
	{"POST", "keys/%k"}, {"GET", "keys/%k"}, {"DELETE", "keys/%k"}, {"LIST", "keys"},
	{"POST", "keys/%k/config"}, {"POST", "keys/%k/rotate"}, {"POST", "keys/%k/trim"},
	{"POST", "keys/%k/import"}, {"POST", "keys/%k/import_version"}, {"POST", "keys/%k/csr"},
	{"POST", "keys/%k/set-certificate"},
	{"POST", "encrypt/%k"}, {"POST", "decrypt/%k"}, {"POST", "rewrap/%k"},
	{"POST", "datakey/plaintext/%k"}, {"POST", "datakey/wrapped/%k"},
	{"POST", "sign/%k"}, {"POST", "sign/%k/sha2-512"}, {"POST", "verify/%k"}, {"POST", "hmac/%k"}, {"POST", "hmac/%k/sha2-384"},
	{"POST", "hash"}, {"POST", "hash/sha3-256"}, {"POST", "random"}, {"POST", "random/32"}, {"POST", "random/platform/%n"},
	{"GET", "export/encryption-key/%k"}, {"GET", "export/hmac-key/%k/%n"}, {"GET", "export/public-key/%k"},
	{"GET", "byok-export/%k/%k"}, {"GET", "backup/%k"}, {"POST", "restore"}, {"POST", "restore/%k"},
	{"GET", "wrapping_key"}, {"GET", "cache-config"}, {"POST", "cache-config"}, {"GET", "config/keys"}, {"POST", "config/keys"},
	{"POST", "keys/%k/schedule-deletion"}, {"POST", "keys/%k/cancel-deletion"},
}

// fuzzFields are the fields the paths take; any may be sent to any path.
var fuzzFields = []string{
	"plaintext", "ciphertext", "context", "nonce", "key_version", "associated_data", "batch_input", "reference",
	"partial_failure_response_code", "type", "derived", "convergent_encryption", "exportable", "allow_plaintext_backup",
	"deletion_allowed", "min_decryption_version", "min_encryption_version", "min_available_version", "auto_rotate_period",
	"key_size", "bits", "input", "hash_algorithm", "algorithm", "signature", "hmac", "prehashed", "signature_algorithm",
	"marshaling_algorithm", "salt_length", "format", "urlsafe", "bytes", "source", "backup", "force", "name", "size",
	"disable_upsert", "padding_scheme", "disabled", "max_encryptions", "pending_days", "ciphertext", "public_key",
	"hash_function", "allow_rotation", "certificate_chain", "hsm",
}

// fuzzValue draws a value of any JSON shape, biased to what transit parses
// and to the edges where a parser breaks.
func fuzzValue(r *rand.Rand, depth int) interface{} {
	switch r.IntN(14) {
	case 0:
		return nil
	case 1:
		return r.IntN(2) == 0
	case 2:
		return []float64{0, 1, -1, 0.5, 1.5, 2, 128.5, 256, 1e9, math.Pow(2, 63), -math.Pow(2, 63), 1e308, 7}[r.IntN(13)]
	case 3:
		return []string{"", "1", "0", "true", "7.5", "-1", "0x10", "1e9", "null", "..", "a/b", "vault:v1:", "vault:v-1:AAAA", "vault:v99999999999:AA"}[r.IntN(14)]
	case 4:
		return b64([]string{"", "x", "a plaintext", strings.Repeat("z", 300), "\x00\xff"}[r.IntN(5)])
	case 5:
		return "vault:v" + strconv.Itoa(r.IntN(4)-1) + ":" + b64(strings.Repeat("q", r.IntN(80)))
	case 6:
		return []string{"sha2-256", "sha3-512", "none", "pss", "pkcs1v15", "asn1", "jws", "oaep", "aes256-gcm96", "rsa-2048", "hmac", "bogus", "1h", "-5s"}[r.IntN(14)]
	case 7:
		return strings.Repeat("A", r.IntN(5000))
	case 8, 9:
		if depth > 2 {
			return "leaf"
		}
		n := r.IntN(4)
		list := make([]interface{}, n)
		for i := range list {
			list[i] = fuzzObject(r, depth+1)
		}
		return list
	case 10:
		if depth > 2 {
			return 3
		}
		return fuzzObject(r, depth+1)
	case 11:
		return float64(r.IntN(10))
	case 12:
		return "vault:v1:" + b64(strings.Repeat("c", 28+r.IntN(40)))
	}
	return r.Float64() * 1000
}

func fuzzObject(r *rand.Rand, depth int) map[string]interface{} {
	n := r.IntN(5)
	m := make(map[string]interface{}, n)
	for i := 0; i < n; i++ {
		m[fuzzFields[r.IntN(len(fuzzFields))]] = fuzzValue(r, depth)
	}
	return m
}

// fuzzRequest draws a method, a path (with a key name, sometimes a strange
// one) and a body.
func fuzzRequest(r *rand.Rand) (method, path string, body map[string]interface{}) {
	p := fuzzPaths[r.IntN(len(fuzzPaths))]
	names := []string{"aes", "conv", "chacha", "rsa", "ecdsa", "ed", "mac", "deleted", "new", "a..b", "x%2Fy", strings.Repeat("n", 200)}
	path = strings.ReplaceAll(p.path, "%k", names[r.IntN(len(names))])
	path = strings.ReplaceAll(path, "%n", strconv.Itoa(r.IntN(600)-50))
	return p.method, path, fuzzObject(r, 0)
}

// TestBlackBoxFuzz sends generated requests to every path of the API table
// on the plugin and on built-in transit on one Vault server, and fails on a
// plugin 5xx, a plugin process restart, a request slower than
// fuzzSlowRequest, or plugin memory growth beyond fuzzMaxRSSGrowthKiB.
func TestBlackBoxFuzz(t *testing.T) {
	duration := fuzzDefaultDuration
	if s := os.Getenv("HSM_TRANSIT_FUZZ_DURATION"); s != "" {
		d, err := time.ParseDuration(s)
		require.NoError(t, err)
		duration = d
	}
	v := startVault(t, serverOptions{})
	v.mountPlugin("transit")
	v.mustCLI("secrets", "enable", "-path=builtin", "transit")
	for _, mount := range []string{"transit", "builtin"} {
		for name, data := range fuzzKeys {
			status, body := v.rawRequest("POST", mount+"/keys/"+name, data)
			require.Less(t, status, 300, "%s/keys/%s: %v", mount, name, body)
		}
	}
	pids := attackPluginPIDs(t, v)
	require.NotEmpty(t, pids)
	rss0 := fuzzRSS(t, pids[0])

	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d (set HSM_TRANSIT_FUZZ_DURATION to run longer)", seed)
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	counts := map[string]map[string]int{"transit": {}, "builtin": {}}
	var failures []string
	requests := 0
	for end := time.Now().Add(duration); time.Now().Before(end) && len(failures) < 10; requests++ {
		method, path, body := fuzzRequest(r)
		for _, mount := range []string{"transit", "builtin"} {
			started := time.Now()
			status, resp := v.rawRequest(method, mount+"/"+path, body)
			took := time.Since(started)
			counts[mount][fmt.Sprintf("%dxx", status/100)]++
			if mount != "transit" {
				continue
			}
			if status >= 500 {
				failures = append(failures, fmt.Sprintf("%d %s %s %v: %v", status, method, path, body, resp["errors"]))
			}
			if took > fuzzSlowRequest {
				failures = append(failures, fmt.Sprintf("%s %s took %s", method, path, took))
			}
		}
	}
	after := attackPluginPIDs(t, v)
	rss1 := fuzzRSS(t, pids[0])
	for _, mount := range []string{"transit", "builtin"} {
		classes := make([]string, 0, len(counts[mount]))
		for c, n := range counts[mount] {
			classes = append(classes, fmt.Sprintf("%s %d", c, n))
		}
		sort.Strings(classes)
		t.Logf("%s: %d requests: %s", mount, requests, strings.Join(classes, ", "))
	}
	t.Logf("plugin RSS %d KiB before, %d KiB after", rss0, rss1)
	require.Empty(t, failures, "plugin answers that fail the fuzz test (seed %d)", seed)
	require.Equal(t, pids, after, "the plugin process restarted (seed %d)", seed)
	require.Less(t, rss1-rss0, fuzzMaxRSSGrowthKiB, "plugin memory grew by %d KiB (seed %d)", rss1-rss0, seed)
}

// fuzzRSS reads a process's resident set in KiB.
func fuzzRSS(t *testing.T, pid int) int {
	t.Helper()
	status, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	require.NoError(t, err)
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			n, err := strconv.Atoi(f[1])
			require.NoError(t, err)
			return n
		}
	}
	t.Fatalf("no VmRSS for %d", pid)
	return 0
}
