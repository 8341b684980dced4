package main

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
)

const fakeToken = "s.cli-test-token"

// fakeTransit imitates the JSON of transit's datakey/plaintext, encrypt,
// decrypt and rewrap: wrapped keys are "vault:vN:" + base64(nonce ||
// AES-GCM) under a per-key, per-version key. The key named "denied" answers
// 403 with Vault's body; a wrong token too.
type fakeTransit struct {
	mu      sync.Mutex
	latest  map[string]int // mount/key -> latest version
	paths   []string
	tokens  []string
	srv     *httptest.Server
	failAll bool // answer 500 to everything
}

func newFakeTransit(t *testing.T) *fakeTransit {
	t.Helper()
	f := &fakeTransit{latest: map[string]int{}}
	f.srv = httptest.NewServer(f)
	t.Cleanup(f.srv.Close)
	return f
}

// useFake points the command's Vault configuration at f.
func useFake(t *testing.T, f *fakeTransit) {
	t.Helper()
	for _, v := range []string{"VAULT_NAMESPACE", "VAULT_AGENT_ADDR", "VAULT_CACERT", "VAULT_CLIENT_CERT", "VAULT_CLIENT_KEY"} {
		t.Setenv(v, "")
	}
	t.Setenv("VAULT_ADDR", f.srv.URL)
	t.Setenv("VAULT_TOKEN", fakeToken)
	t.Setenv("VAULT_MAX_RETRIES", "0")
	t.Setenv("HOME", t.TempDir())
}

func (f *fakeTransit) rotate(ref string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.latest[ref] = f.version(ref) + 1
}

// version is the latest version of ref; f.mu held.
func (f *fakeTransit) version(ref string) int {
	if v := f.latest[ref]; v > 0 {
		return v
	}
	return 1
}

func (f *fakeTransit) calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.paths...)
}

func (f *fakeTransit) reset() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.paths, f.tokens = nil, nil
}

func gcmFor(ref string, version int) cipher.AEAD {
	k := sha256.Sum256([]byte(fmt.Sprintf("fake transit %s v%d", ref, version)))
	b, err := aes.NewCipher(k[:])
	if err != nil {
		panic(err)
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		panic(err)
	}
	return g
}

func wrap(ref string, version int, pt []byte) string {
	g := gcmFor(ref, version)
	nonce := make([]byte, g.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		panic(err)
	}
	return "vault:v" + strconv.Itoa(version) + ":" + base64.StdEncoding.EncodeToString(g.Seal(nonce, nonce, pt, []byte(ref)))
}

func unwrap(ref, wrapped string) ([]byte, int, error) {
	rest, ok := strings.CutPrefix(wrapped, "vault:v")
	if !ok {
		return nil, 0, fmt.Errorf("invalid ciphertext: no prefix")
	}
	num, b64, _ := strings.Cut(rest, ":")
	v, err := strconv.Atoi(num)
	if err != nil {
		return nil, 0, fmt.Errorf("invalid ciphertext: version")
	}
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(raw) < 12 {
		return nil, 0, fmt.Errorf("invalid ciphertext: base64")
	}
	pt, err := gcmFor(ref, v).Open(nil, raw[:12], raw[12:], []byte(ref))
	if err != nil {
		return nil, 0, fmt.Errorf("cipher: message authentication failed")
	}
	return pt, v, nil
}

func (f *fakeTransit) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var body map[string]any
	_ = json.NewDecoder(r.Body).Decode(&body)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.paths = append(f.paths, r.Method+" "+r.URL.Path)
	f.tokens = append(f.tokens, r.Header.Get("X-Vault-Token"))
	if f.failAll {
		reply(w, http.StatusInternalServerError, map[string]any{"errors": []string{"internal error"}})
		return
	}
	p := strings.TrimPrefix(r.URL.Path, "/v1/")
	i := strings.LastIndexByte(p, '/')
	key, rest := p[i+1:], p[:i]
	if r.Header.Get("X-Vault-Token") != fakeToken || key == "denied" {
		reply(w, http.StatusForbidden, map[string]any{"errors": []string{"1 error occurred:\n\t* permission denied\n\n"}})
		return
	}
	var op, mount string
	for _, o := range []string{"datakey/plaintext", "encrypt", "decrypt", "rewrap"} {
		if m, ok := strings.CutSuffix(rest, "/"+o); ok {
			op, mount = o, m
		}
	}
	ref := mount + "/" + key
	var data map[string]any
	switch op {
	case "datakey/plaintext":
		pt := make([]byte, 32)
		_, _ = rand.Read(pt)
		data = map[string]any{"plaintext": base64.StdEncoding.EncodeToString(pt), "ciphertext": wrap(ref, f.version(ref), pt)}
	case "encrypt":
		pt, err := base64.StdEncoding.DecodeString(fmt.Sprint(body["plaintext"]))
		if err != nil {
			reply(w, http.StatusBadRequest, map[string]any{"errors": []string{"failed to decode plaintext"}})
			return
		}
		data = map[string]any{"ciphertext": wrap(ref, f.version(ref), pt)}
	case "decrypt", "rewrap":
		pt, _, err := unwrap(ref, fmt.Sprint(body["ciphertext"]))
		if err != nil {
			reply(w, http.StatusBadRequest, map[string]any{"errors": []string{err.Error()}})
			return
		}
		if op == "decrypt" {
			data = map[string]any{"plaintext": base64.StdEncoding.EncodeToString(pt)}
		} else {
			data = map[string]any{"ciphertext": wrap(ref, f.version(ref), pt)}
		}
	default:
		reply(w, http.StatusNotFound, map[string]any{"errors": []string{}})
		return
	}
	reply(w, http.StatusOK, map[string]any{"data": data})
}

func reply(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
