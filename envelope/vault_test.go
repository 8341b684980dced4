package envelope

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/vault/api"
)

// fakeTransit imitates the JSON of Vault's transit endpoints datakey,
// encrypt, decrypt and rewrap, with memKS doing the cryptography. Keys named
// "denied" answer 403 with Vault's body.
type fakeTransit struct {
	t  *testing.T
	ks *memKS

	mu   sync.Mutex
	reqs []fakeReq
}

type fakeReq struct {
	Method, Path string
	Body         map[string]any
}

func (f *fakeTransit) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var body map[string]any
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		http.Error(w, `{"errors":["bad json"]}`, http.StatusBadRequest)
		return
	}
	f.mu.Lock()
	f.reqs = append(f.reqs, fakeReq{r.Method, r.URL.Path, body})
	f.mu.Unlock()
	if r.Header.Get("X-Vault-Token") != "test-token" {
		writeJSON(w, http.StatusForbidden, map[string]any{"errors": []string{"permission denied"}})
		return
	}
	// /v1/<mount...>/<op>/<key>, op possibly "datakey/plaintext".
	p := strings.TrimPrefix(r.URL.Path, "/v1/")
	i := strings.LastIndexByte(p, '/')
	key, rest := p[i+1:], p[:i]
	if key == "denied" {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusForbidden)
		_, _ = w.Write([]byte(`{"errors":["1 error occurred:\n\t* permission denied\n\n"]}`))
		return
	}
	var keyCtx []byte
	if c, ok := body["context"].(string); ok {
		var err error
		if keyCtx, err = base64.StdEncoding.DecodeString(c); err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]any{"errors": []string{"failed to base64-decode context"}})
			return
		}
	}
	ctx := r.Context()
	var data map[string]any
	var err error
	switch {
	case strings.HasSuffix(rest, "/datakey/plaintext"):
		mount := strings.TrimSuffix(rest, "/datakey/plaintext")
		if bits, _ := body["bits"].(float64); bits != 256 {
			f.t.Errorf("datakey bits = %v, want 256", body["bits"])
		}
		var pt []byte
		var ct string
		if pt, ct, err = f.ks.DataKey(ctx, mount, key, keyCtx); err == nil {
			data = map[string]any{"plaintext": base64.StdEncoding.EncodeToString(pt), "ciphertext": ct, "key_version": 1}
		}
	case strings.HasSuffix(rest, "/encrypt"):
		var pt []byte
		if pt, err = base64.StdEncoding.DecodeString(body["plaintext"].(string)); err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]any{"errors": []string{"failed to base64-decode plaintext"}})
			return
		}
		var ct string
		if ct, err = f.ks.Wrap(ctx, strings.TrimSuffix(rest, "/encrypt"), key, keyCtx, pt); err == nil {
			data = map[string]any{"ciphertext": ct, "key_version": 1}
		}
	case strings.HasSuffix(rest, "/decrypt"):
		var pt []byte
		if pt, err = f.ks.Unwrap(ctx, strings.TrimSuffix(rest, "/decrypt"), key, keyCtx, body["ciphertext"].(string)); err == nil {
			data = map[string]any{"plaintext": base64.StdEncoding.EncodeToString(pt)}
		}
	case strings.HasSuffix(rest, "/rewrap"):
		var ct string
		if ct, err = f.ks.Rewrap(ctx, strings.TrimSuffix(rest, "/rewrap"), key, keyCtx, body["ciphertext"].(string)); err == nil {
			data = map[string]any{"ciphertext": ct, "key_version": f.ks.version(strings.TrimSuffix(rest, "/rewrap"), key)}
		}
	default:
		writeJSON(w, http.StatusNotFound, map[string]any{"errors": []string{}})
		return
	}
	if err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]any{"errors": []string{err.Error()}})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"request_id": "0b8f5b5e-0000-0000-0000-000000000000", "lease_id": "", "renewable": false,
		"lease_duration": 0, "data": data, "wrap_info": nil, "warnings": nil, "auth": nil,
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func newFakeVault(t *testing.T) (*fakeTransit, *VaultKeyService) {
	t.Helper()
	for _, v := range []string{"VAULT_ADDR", "VAULT_TOKEN", "VAULT_NAMESPACE", "VAULT_AGENT_ADDR", "VAULT_MAX_RETRIES"} {
		t.Setenv(v, "")
	}
	ft := &fakeTransit{t: t, ks: newMemKS()}
	srv := httptest.NewServer(ft)
	t.Cleanup(srv.Close)
	cfg := api.DefaultConfig()
	cfg.Address = srv.URL
	cfg.MaxRetries = 0
	c, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken("test-token")
	return ft, NewVaultKeyService(c)
}

func TestVaultKeyServiceRoundTrip(t *testing.T) {
	ft, vks := newFakeVault(t)
	pt := randBytes(t, 3*MinSegmentSize+1)
	keyCtx := []byte("tenant")
	file := encrypt(t, WriterOptions{KeyService: vks, Recipients: []KeyRef{{Mount: "/transit/", Key: "k1"}, {Mount: "team/transit", Key: "k2"}}, Context: keyCtx, SegmentSize: MinSegmentSize}, pt)

	want := []struct{ path, field string }{
		{"/v1/transit/datakey/plaintext/k1", "bits"},
		{"/v1/team/transit/encrypt/k2", "plaintext"},
	}
	if len(ft.reqs) != len(want) {
		t.Fatalf("%d requests, want %d: %+v", len(ft.reqs), len(want), ft.reqs)
	}
	for i, w := range want {
		r := ft.reqs[i]
		if r.Path != w.path || r.Body[w.field] == nil || r.Body["context"] != base64.StdEncoding.EncodeToString(keyCtx) {
			t.Fatalf("request %d: %+v, want %s with %s and the context", i, r, w.path, w.field)
		}
		if r.Method != http.MethodPut && r.Method != http.MethodPost {
			t.Fatalf("request %d: method %s", i, r.Method)
		}
	}

	ft.reqs = nil
	got, err := decrypt(file, ReaderOptions{KeyService: vks})
	if err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("decrypt: %v", err)
	}
	if len(ft.reqs) != 1 || ft.reqs[0].Path != "/v1/transit/decrypt/k1" || !strings.HasPrefix(ft.reqs[0].Body["ciphertext"].(string), "vault:v1:") {
		t.Fatalf("decrypt requests %+v", ft.reqs)
	}

	ft.ks.rotate("transit", "k1", 2)
	path := writeTemp(t, file)
	if changed, err := rewrapFile(t, path, vks); err != nil || !changed {
		t.Fatalf("rewrap: %v %v", changed, err)
	}
	if last := ft.reqs[len(ft.reqs)-1]; last.Path != "/v1/team/transit/rewrap/k2" {
		t.Fatalf("last request %s", last.Path)
	}
}

func TestVaultKeyServicePermissionDenied(t *testing.T) {
	_, vks := newFakeVault(t)
	_, err := NewWriter(context.Background(), &bytes.Buffer{}, WriterOptions{KeyService: vks, Recipients: []KeyRef{{Mount: "transit", Key: "denied"}}})
	var re *api.ResponseError
	if !errors.As(err, &re) || re.StatusCode != http.StatusForbidden {
		t.Fatalf("err %v, want an *api.ResponseError with 403", err)
	}
	if !strings.Contains(err.Error(), "permission denied") || !strings.Contains(err.Error(), "transit/datakey/plaintext/denied") {
		t.Fatalf("message %q should name the path and Vault's error", err)
	}
	if !IsPermissionDenied(err) {
		t.Fatal("IsPermissionDenied = false")
	}

	// Decrypting with a recipient that is denied and one that works.
	_, vks2 := newFakeVault(t)
	file := encrypt(t, WriterOptions{KeyService: vks2, Recipients: []KeyRef{{Mount: "transit", Key: "ok"}}, SegmentSize: MinSegmentSize}, []byte("hello"))
	h, _ := ParseHeader(bytes.NewReader(file))
	_, err = vks2.Unwrap(context.Background(), "transit", "denied", nil, h.Recipients[0].Wrapped)
	if !IsPermissionDenied(err) {
		t.Fatalf("unwrap with a denied key: %v", err)
	}
	if strings.Contains(err.Error(), h.Recipients[0].Wrapped) {
		t.Fatal("the error carries the wrapped key")
	}
}

func TestVaultKeyServiceBadResponses(t *testing.T) {
	for name, body := range map[string]string{
		"no data":           `{"data":null}`,
		"no plaintext":      `{"data":{"ciphertext":"vault:v1:AAAA"}}`,
		"plaintext not b64": `{"data":{"ciphertext":"vault:v1:AAAA","plaintext":"%%%"}}`,
		"short data key":    `{"data":{"ciphertext":"vault:v1:AAAA","plaintext":"AAAA"}}`,
	} {
		t.Run(name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				_, _ = w.Write([]byte(body))
			}))
			defer srv.Close()
			cfg := api.DefaultConfig()
			cfg.Address = srv.URL
			cfg.MaxRetries = 0
			c, err := api.NewClient(cfg)
			if err != nil {
				t.Fatal(err)
			}
			c.SetToken("x")
			_, err = NewWriter(context.Background(), &bytes.Buffer{}, WriterOptions{KeyService: NewVaultKeyService(c), Recipients: []KeyRef{refA}})
			if err == nil {
				t.Fatal("accepted")
			}
			if strings.Contains(err.Error(), "AAAA") {
				t.Fatalf("error %q carries key material", err)
			}
		})
	}
}
