package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/vault/api"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/envelope"
)

// TestEnvelope drives the hsm-transit CLI (built from this tree, run as a
// subprocess) and the envelope package against one real Vault with the
// plugin at transit/ and Vault's built-in transit at builtin/. The CLI and
// the package reach Vault through a counting proxy, so the number of Vault
// requests per file is measured, not assumed.
func TestEnvelope(t *testing.T) {
	t.Parallel()
	e := newEnvelopeEnv(t)
	root := e.v.client.Logical()
	for _, k := range []struct {
		path string
		body map[string]any
	}{
		{"transit/keys/orders", nil},
		{"transit/keys/rotating", nil},
		{"transit/keys/tenant", map[string]any{"derived": true}},
		{"transit/keys/multi", nil},
		{"builtin/keys/multi", nil},
		{"builtin/keys/plain", nil},
	} {
		_, err := root.Write(k.path, k.body)
		require.NoError(t, err, k.path)
	}

	t.Run("CLIAndPackageInterwork", func(t *testing.T) {
		pt := randomBytes(t, 3<<20+5)
		in := e.file(t, "in", pt)
		enc := filepath.Join(e.dir, "orders.enc")
		r := e.cli(t, nil, "encrypt", "-k", "transit/orders", "-aad", "release 1.2", "-o", enc, in)
		require.Equal(t, 0, r.code, r.stderr)
		require.Equal(t, []string{"PUT /v1/transit/datakey/plaintext/orders"}, e.proxy.take(), "one Vault call per encryption")

		got := e.packageDecrypt(t, enc, "release 1.2")
		require.Equal(t, pt, got)
		require.Equal(t, []string{"PUT /v1/transit/decrypt/orders"}, e.proxy.take(), "one Vault call per decryption")

		// The reverse, with a derived key and its context.
		file := e.packageEncrypt(t, pt, []envelope.KeyRef{{Mount: "transit", Key: "tenant"}}, []byte("tenant-7"))
		require.Equal(t, []string{"PUT /v1/transit/datakey/plaintext/tenant"}, e.proxy.take())
		out := filepath.Join(e.dir, "tenant.out")
		r = e.cli(t, nil, "decrypt", "-o", out, e.file(t, "tenant.enc", file))
		require.Equal(t, 0, r.code, r.stderr)
		require.Equal(t, []string{"PUT /v1/transit/decrypt/tenant"}, e.proxy.take())
		requireFile(t, out, pt)

		// The CLI with the same context, through pipes.
		r = e.cli(t, pt, "encrypt", "-k", "transit/tenant", "-context", "dGVuYW50LTc=")
		require.Equal(t, 0, r.code, r.stderr)
		r = e.cli(t, []byte(r.stdout), "decrypt")
		require.Equal(t, 0, r.code, r.stderr)
		require.True(t, bytes.Equal(pt, []byte(r.stdout)))
		require.Len(t, e.proxy.take(), 2)

		// Tampered: exit 3 naming the segment, no output.
		bad := bytes.Clone(file)
		bad[len(bad)-100] ^= 0x40
		out = filepath.Join(e.dir, "tampered.out")
		r = e.cli(t, nil, "decrypt", "-o", out, e.file(t, "tampered.enc", bad))
		require.Equal(t, 3, r.code, r.stderr)
		require.Contains(t, r.stderr, "segment 47: authentication failed")
		require.NoFileExists(t, out)
		e.proxy.take()
	})

	t.Run("RotationRewrapMinDecryptionVersion", func(t *testing.T) {
		pt := randomBytes(t, 1<<20)
		a := filepath.Join(e.dir, "rot-a.enc")
		r := e.cli(t, pt, "encrypt", "-k", "transit/rotating", "-o", a)
		require.Equal(t, 0, r.code, r.stderr)
		old, err := os.ReadFile(a)
		require.NoError(t, err)
		b := e.file(t, "rot-b.enc", old) // a copy that is never rewrapped

		_, err = root.Write("transit/keys/rotating/rotate", nil)
		require.NoError(t, err)
		r = e.cli(t, nil, "decrypt", "-o", filepath.Join(e.dir, "rot-a.out"), a)
		require.Equal(t, 0, r.code, "the old version still decrypts: %s", r.stderr)

		e.proxy.take()
		r = e.cli(t, nil, "rewrap", a)
		require.Equal(t, 0, r.code, r.stderr)
		require.Equal(t, a+": rewrapped (transit/rotating v1 -> transit/rotating v2)\n", r.stdout)
		require.Equal(t, []string{"PUT /v1/transit/rewrap/rotating"}, e.proxy.take())
		now, err := os.ReadFile(a)
		require.NoError(t, err)
		h, err := envelope.ParseHeader(bytes.NewReader(old))
		require.NoError(t, err)
		require.Equal(t, len(old), len(now), "rewrap works in place")
		require.Equal(t, old[h.HeaderLength:], now[h.HeaderLength:], "rewrap does not touch the body")

		_, err = root.Write("transit/keys/rotating/config", map[string]any{"min_decryption_version": 2})
		require.NoError(t, err)
		out := filepath.Join(e.dir, "rot.out")
		r = e.cli(t, nil, "decrypt", "-o", out, a)
		require.Equal(t, 0, r.code, r.stderr)
		requireFile(t, out, pt)

		// Without the rewrap, Vault refuses the old version, and so does
		// rewrap itself (transit's rewrap decrypts first): rewrap before
		// moving min_decryption_version.
		require.NoError(t, os.Remove(out))
		r = e.cli(t, nil, "decrypt", "-o", out, b)
		require.Equal(t, 2, r.code, r.stderr)
		require.Contains(t, r.stderr, "disallowed by policy")
		t.Logf("without the rewrap: %s", r.stderr)
		require.NoFileExists(t, out)
		r = e.cli(t, nil, "rewrap", b)
		require.Equal(t, 2, r.code, r.stderr)
		requireFile(t, b, old)
		e.proxy.take()
	})

	t.Run("PolicyWithoutDecrypt", func(t *testing.T) {
		require.NoError(t, e.v.client.Sys().PutPolicy("envelope-writer", `
path "transit/datakey/plaintext/orders" { capabilities = ["update"] }
path "transit/encrypt/orders" { capabilities = ["update"] }
`))
		sec, err := e.v.client.Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{"envelope-writer"}, NoDefaultPolicy: true})
		require.NoError(t, err)
		writer := sec.Auth.ClientToken
		pt := []byte("an artifact the writer may encrypt but not read back")
		enc := filepath.Join(e.dir, "writer.enc")
		r := e.cliAs(t, writer, pt, "encrypt", "-k", "transit/orders", "-o", enc)
		require.Equal(t, 0, r.code, r.stderr)
		out := filepath.Join(e.dir, "writer.out")
		r = e.cliAs(t, writer, nil, "decrypt", "-o", out, enc)
		require.Equal(t, 2, r.code, r.stderr)
		require.Contains(t, r.stderr, "permission denied")
		require.Equal(t, 1, strings.Count(r.stderr, "\n"), "one line: %q", r.stderr)
		t.Logf("no decrypt right: %s", r.stderr)
		require.NoFileExists(t, out)
		r = e.cli(t, nil, "decrypt", "-o", out, enc)
		require.Equal(t, 0, r.code, "a token with decrypt reads it: %s", r.stderr)
		requireFile(t, out, pt)
		e.proxy.take()
	})

	t.Run("HSMResidentKeyCryptoShredding", func(t *testing.T) {
		_, err := root.Write("transit/keys/shred", map[string]any{"hsm": true})
		require.NoError(t, err)
		pt := randomBytes(t, 200<<10)
		enc := filepath.Join(e.dir, "shred.enc")
		r := e.cli(t, pt, "encrypt", "-k", "transit/shred", "-o", enc)
		require.Equal(t, 0, r.code, r.stderr)
		out := filepath.Join(e.dir, "shred.out")
		r = e.cli(t, nil, "decrypt", "-o", out, enc)
		require.Equal(t, 0, r.code, r.stderr)
		requireFile(t, out, pt)
		require.NoError(t, os.Remove(out))

		_, err = root.Write("transit/keys/shred/config", map[string]any{"deletion_allowed": true})
		require.NoError(t, err)
		_, err = root.Delete("transit/keys/shred")
		require.NoError(t, err)
		r = e.cli(t, nil, "decrypt", "-o", out, enc)
		require.Equal(t, 2, r.code, r.stderr)
		require.Contains(t, r.stderr, "encryption key not found")
		t.Logf("after the delete: %s", r.stderr)
		require.NoFileExists(t, out)
		// A new key of the same name is another key: the file stays shredded.
		_, err = root.Write("transit/keys/shred", map[string]any{"hsm": true})
		require.NoError(t, err)
		r = e.cli(t, nil, "decrypt", "-o", out, enc)
		require.Equal(t, 2, r.code, r.stderr)
		require.NoFileExists(t, out)
		e.proxy.take()
	})

	t.Run("TwoRecipientsTwoMounts", func(t *testing.T) {
		pt := randomBytes(t, 700<<10)
		enc := filepath.Join(e.dir, "multi.enc")
		r := e.cli(t, pt, "encrypt", "-k", "transit/multi", "-k", "builtin/multi", "-o", enc)
		require.Equal(t, 0, r.code, r.stderr)
		require.Equal(t, []string{"PUT /v1/transit/datakey/plaintext/multi", "PUT /v1/builtin/encrypt/multi"}, e.proxy.take(),
			"one Vault call per recipient")
		r = e.cli(t, nil, "decrypt", enc)
		require.Equal(t, 0, r.code, r.stderr)
		require.Equal(t, []string{"PUT /v1/transit/decrypt/multi"}, e.proxy.take(), "the first recipient is enough")

		// A token that may decrypt only with the built-in mount's key: the
		// plugin's recipient is refused, the built-in one opens the file.
		require.NoError(t, e.v.client.Sys().PutPolicy("builtin-reader", `path "builtin/decrypt/multi" { capabilities = ["update"] }`))
		sec, err := e.v.client.Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{"builtin-reader"}, NoDefaultPolicy: true})
		require.NoError(t, err)
		out := filepath.Join(e.dir, "multi.out")
		r = e.cliAs(t, sec.Auth.ClientToken, nil, "decrypt", "-o", out, enc)
		require.Equal(t, 0, r.code, r.stderr)
		requireFile(t, out, pt)
		require.Equal(t, []string{"PUT /v1/transit/decrypt/multi", "PUT /v1/builtin/decrypt/multi"}, e.proxy.take())

		// The built-in key deleted: the plugin's recipient still opens it.
		_, err = root.Write("builtin/keys/multi/config", map[string]any{"deletion_allowed": true})
		require.NoError(t, err)
		_, err = root.Delete("builtin/keys/multi")
		require.NoError(t, err)
		require.NoError(t, os.Remove(out))
		r = e.cli(t, nil, "decrypt", "-o", out, enc)
		require.Equal(t, 0, r.code, r.stderr)
		requireFile(t, out, pt)

		// And both gone: Vault's refusal, each recipient named.
		_, err = root.Write("transit/keys/multi/config", map[string]any{"deletion_allowed": true})
		require.NoError(t, err)
		_, err = root.Delete("transit/keys/multi")
		require.NoError(t, err)
		r = e.cli(t, nil, "decrypt", enc)
		require.Equal(t, 2, r.code, r.stderr)
		require.Contains(t, r.stderr, "recipient 0 (transit/multi)")
		require.Contains(t, r.stderr, "recipient 1 (builtin/multi)")
		require.Empty(t, r.stdout)
		e.proxy.take()
	})

	t.Run("BuiltinTransit", func(t *testing.T) {
		pt := randomBytes(t, 2<<20)
		enc := filepath.Join(e.dir, "builtin.enc")
		r := e.cli(t, pt, "encrypt", "-k", "builtin/plain", "-o", enc)
		require.Equal(t, 0, r.code, r.stderr)
		require.Equal(t, []string{"PUT /v1/builtin/datakey/plaintext/plain"}, e.proxy.take())
		require.Equal(t, pt, e.packageDecrypt(t, enc, ""))
		r = e.cli(t, nil, "decrypt", enc)
		require.Equal(t, 0, r.code, r.stderr)
		require.True(t, bytes.Equal(pt, []byte(r.stdout)))
		require.Equal(t, []string{"PUT /v1/builtin/decrypt/plain", "PUT /v1/builtin/decrypt/plain"}, e.proxy.take())

		_, err := root.Write("builtin/keys/plain/rotate", nil)
		require.NoError(t, err)
		r = e.cli(t, nil, "rewrap", enc)
		require.Equal(t, 0, r.code, r.stderr)
		require.Contains(t, r.stdout, "builtin/plain v1 -> builtin/plain v2")
		file := e.packageEncrypt(t, pt, []envelope.KeyRef{{Mount: "builtin", Key: "plain"}}, nil)
		r = e.cli(t, file, "decrypt")
		require.Equal(t, 0, r.code, r.stderr)
		require.True(t, bytes.Equal(pt, []byte(r.stdout)))
		e.proxy.take()
	})

	t.Run("InspectNeedsNoVault", func(t *testing.T) {
		enc := filepath.Join(e.dir, "orders.enc")
		cmd := exec.Command(e.bin, "inspect", enc)
		cmd.Env = append(cleanEnv(), "VAULT_ADDR=http://127.0.0.1:1", "HOME="+t.TempDir())
		out, err := cmd.Output()
		require.NoError(t, err)
		var h struct {
			Version    int `json:"format_version"`
			Recipients []struct {
				Mount, Key string
				Wrapped    string `json:"wrapped_key"`
			}
		}
		require.NoError(t, json.Unmarshal(out, &h))
		require.Equal(t, 1, h.Version)
		require.Len(t, h.Recipients, 1)
		require.Equal(t, "transit", h.Recipients[0].Mount)
		require.Equal(t, "orders", h.Recipients[0].Key)
		require.True(t, strings.HasPrefix(h.Recipients[0].Wrapped, "vault:v1:"), h.Recipients[0].Wrapped)
		require.Empty(t, e.proxy.take(), "inspect sent nothing to Vault")
	})
}

// envelopeEnv is one Vault, the CLI binary and the counting proxy.
type envelopeEnv struct {
	v     *vaultServer
	bin   string
	dir   string
	proxy *countingProxy
	ks    envelope.KeyService
}

func newEnvelopeEnv(t *testing.T) *envelopeEnv {
	t.Helper()
	e := &envelopeEnv{dir: t.TempDir()}
	e.bin = filepath.Join(t.TempDir(), "hsm-transit")
	build := exec.Command("go", "build", "-o", e.bin, "./cmd/hsm-transit")
	build.Dir = repoRoot
	out, err := build.CombinedOutput()
	require.NoError(t, err, "go build ./cmd/hsm-transit: %s", out)

	e.v = startVault(t, serverOptions{})
	e.v.mountPlugin("transit")
	e.v.mustCLI("secrets", "enable", "-path=builtin", "transit")
	e.proxy = newCountingProxy(t, e.v.addr)

	cfg := api.DefaultConfig()
	cfg.Address = e.proxy.url
	c, err := api.NewClient(cfg)
	require.NoError(t, err)
	c.SetToken(e.v.token)
	e.ks = envelope.NewVaultKeyService(c)
	return e
}

type cliResult struct {
	code           int
	stdout, stderr string
}

// cli runs the CLI with the root token through the proxy.
func (e *envelopeEnv) cli(t *testing.T, stdin []byte, args ...string) cliResult {
	t.Helper()
	return e.cliAs(t, e.v.token, stdin, args...)
}

func (e *envelopeEnv) cliAs(t *testing.T, token string, stdin []byte, args ...string) cliResult {
	t.Helper()
	cmd := exec.Command(e.bin, args...)
	cmd.Env = append(cleanEnv(), "VAULT_ADDR="+e.proxy.url, "VAULT_TOKEN="+token, "HOME="+e.dir)
	cmd.Stdin = bytes.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	return cliResult{code, out.String(), errb.String()}
}

// cleanEnv is the test's environment without any VAULT_ variable.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VAULT_") {
			env = append(env, kv)
		}
	}
	return env
}

func (e *envelopeEnv) file(t *testing.T, name string, b []byte) string {
	t.Helper()
	p := filepath.Join(e.dir, name)
	require.NoError(t, os.WriteFile(p, b, 0o600))
	return p
}

func (e *envelopeEnv) packageEncrypt(t *testing.T, pt []byte, refs []envelope.KeyRef, keyCtx []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := envelope.NewWriter(context.Background(), &buf, envelope.WriterOptions{KeyService: e.ks, Recipients: refs, Context: keyCtx})
	require.NoError(t, err)
	_, err = w.Write(pt)
	require.NoError(t, err)
	require.NoError(t, w.Close())
	return buf.Bytes()
}

func (e *envelopeEnv) packageDecrypt(t *testing.T, path, aad string) []byte {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	r, err := envelope.NewReader(context.Background(), f, envelope.ReaderOptions{KeyService: e.ks, AAD: []byte(aad)})
	require.NoError(t, err)
	defer r.Close()
	b, err := io.ReadAll(r)
	require.NoError(t, err)
	return b
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return b
}

func requireFile(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "%s: %d bytes, want %d", path, len(got), len(want))
}

// countingProxy is a reverse proxy in front of Vault that records each API
// request's method and path: the real number of Vault calls a client makes.
type countingProxy struct {
	url  string
	mu   sync.Mutex
	reqs []string
}

func newCountingProxy(t *testing.T, vaultAddr string) *countingProxy {
	t.Helper()
	target, err := url.Parse(vaultAddr)
	require.NoError(t, err)
	p := &countingProxy{}
	rp := httputil.NewSingleHostReverseProxy(target)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.reqs = append(p.reqs, r.Method+" "+r.URL.Path)
		p.mu.Unlock()
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	p.url = srv.URL
	return p
}

// take returns the requests recorded since the last take.
func (p *countingProxy) take() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	r := p.reqs
	p.reqs = nil
	return r
}
