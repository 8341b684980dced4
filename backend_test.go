package hsmtransit

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-uuid"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// The unit tests run every backend sealed by a real SoftHSM2 token, set up
// once per test binary (SoftHSM2 reads its configuration at C_Initialize).
const (
	testPIN     = "4321"
	testToken   = "unit-tests"
	testKEK     = "unit-kek"
	outageToken = "outage-tests"
	spareToken  = "spare-tests"
	hsmOutage   = "hsm-key-outage-tests"
)

var (
	softhsmLib  string
	softhsmConf string
)

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	lib, err := softhsm.FindLibrary()
	if err != nil {
		fmt.Fprintln(os.Stderr, "unit tests need a real token:", err)
		return 1
	}
	softhsmLib = lib
	dir, err := os.MkdirTemp("", "hsm-transit-unit-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if softhsmConf, err = softhsm.Setup(dir, testPIN, testToken, outageToken, spareToken, hsmOutage); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	// Tests write wrong PINs on purpose, many more than the per-token
	// bound on failed logins that protects a real HSM (tested in hsm/).
	defer hsm.SetFailedLoginLimit(1000, time.Minute)()
	tok, err := hsm.Open(hsm.Config{Library: lib, TokenLabel: testToken, PIN: testPIN})
	if err == nil {
		err = tok.GenerateKey(testKEK)
		tok.Close()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "creating the test KEK:", err)
		return 1
	}
	return m.Run()
}

// testSealConfig is the config/seal of the unit tests' token and KEK.
func testSealConfig() map[string]interface{} {
	return map[string]interface{}{
		"library":     softhsmLib,
		"token_label": testToken,
		"pin":         testPIN,
		"key_label":   testKEK,
	}
}

// testEnv is a backend over in-memory storage, as Vault would run it.
type testEnv struct {
	b         *backend
	storage   logical.Storage
	mountUUID string
}

// getTestBackend returns an initialised backend with empty storage, sealed
// by the test token.
func getTestBackend(tb testing.TB) *testEnv {
	tb.Helper()
	e := startBackend(tb, &logical.InmemStorage{}, newMountUUID(tb))
	e.mustWrite(tb, "config/seal", testSealConfig())
	return e
}

// startBackend starts a backend over storage as a (re)started plugin
// process would: Factory, then Initialize. It is not configured or waited
// for.
func startBackend(tb testing.TB, s logical.Storage, mountUUID string) *testEnv {
	tb.Helper()
	conf := logical.TestBackendConfig()
	conf.Logger = hclog.NewNullLogger()
	conf.StorageView = nil // external plugins have no storage in Factory
	conf.BackendUUID = mountUUID
	lb, err := Factory(context.Background(), conf)
	require.NoError(tb, err)
	b := lb.(*backend)
	require.NoError(tb, b.Initialize(context.Background(), &logical.InitializationRequest{Storage: s}))
	tb.Cleanup(func() { b.Cleanup(context.Background()) })
	return &testEnv{b: b, storage: s, mountUUID: mountUUID}
}

func newMountUUID(tb testing.TB) string {
	tb.Helper()
	id, err := uuid.GenerateUUID()
	require.NoError(tb, err)
	return id
}

// restart stops this backend and starts another over the same storage and
// mount, as a plugin restart or a Vault restart does.
func (e *testEnv) restart(tb testing.TB) *testEnv {
	tb.Helper()
	e.b.Cleanup(context.Background())
	return startBackend(tb, e.storage, e.mountUUID)
}

// result is a request's outcome as an HTTP client of Vault would see it.
type result struct {
	status int
	data   map[string]interface{}
	resp   *logical.Response
	err    error
}

// errorMessage is the error text a client would get, "" on success.
func (r result) errorMessage() string {
	if r.resp != nil && r.resp.IsError() {
		return r.resp.Error().Error()
	}
	if r.err != nil {
		return r.err.Error()
	}
	if r.data != nil {
		if e, ok := r.data["error"].(string); ok {
			return e
		}
	}
	return ""
}

// do sends a request the way Vault core does: an update to a path with an
// existence check becomes a create when the check says the object is missing,
// and the status code is what Vault's HTTP layer would send.
func (e *testEnv) do(tb testing.TB, op logical.Operation, path string, data map[string]interface{}) result {
	tb.Helper()
	ctx := context.Background()
	req := &logical.Request{Operation: op, Path: path, Data: data, Storage: e.storage}
	if op == logical.UpdateOperation {
		checkFound, exists, err := e.b.HandleExistenceCheck(ctx, req)
		if err == nil && checkFound && !exists {
			req.Operation = logical.CreateOperation
		}
	}
	resp, err := e.b.HandleRequest(ctx, req)
	return toResult(tb, req, resp, err)
}

// toResult computes the status code as Vault's HTTP layer does, including
// responses that carry their own code (batch partial failures).
func toResult(tb testing.TB, req *logical.Request, resp *logical.Response, err error) result {
	tb.Helper()
	r := result{resp: resp, err: err}
	if resp != nil && resp.Data != nil {
		if raw, ok := resp.Data[logical.HTTPStatusCode]; ok {
			r.status = raw.(int)
			var body []byte
			switch raw := resp.Data[logical.HTTPRawBody].(type) {
			case []byte:
				body = raw
			case string:
				body = []byte(raw)
			}
			var decoded struct {
				Data     map[string]interface{} `json:"data"`
				Warnings []string               `json:"warnings"`
			}
			require.NoError(tb, json.Unmarshal(body, &decoded))
			r.data = decoded.Data
			return r
		}
	}
	if coded, ok := err.(logical.HTTPCodedError); ok {
		r.status = coded.Code()
		return r
	}
	status, _ := logical.RespondErrorCommon(req, resp, err)
	switch {
	case status != 0:
		r.status = status
	case resp == nil:
		r.status = http.StatusNoContent
	default:
		r.status = http.StatusOK
	}
	if resp != nil && !resp.IsError() {
		// Round-trip through JSON, as the plugin boundary and HTTP do.
		raw, jerr := json.Marshal(resp.Data)
		require.NoError(tb, jerr)
		require.NoError(tb, json.Unmarshal(raw, &r.data))
	}
	return r
}

// write, read, del and list are shorthands for do.
func (e *testEnv) write(tb testing.TB, path string, data map[string]interface{}) result {
	tb.Helper()
	return e.do(tb, logical.UpdateOperation, path, data)
}

func (e *testEnv) read(tb testing.TB, path string) result {
	tb.Helper()
	return e.do(tb, logical.ReadOperation, path, nil)
}

func (e *testEnv) del(tb testing.TB, path string) result {
	tb.Helper()
	return e.do(tb, logical.DeleteOperation, path, nil)
}

// mustWrite writes and requires a 200 or 204.
func (e *testEnv) mustWrite(tb testing.TB, path string, data map[string]interface{}) map[string]interface{} {
	tb.Helper()
	r := e.write(tb, path, data)
	require.Containsf(tb, []int{200, 204}, r.status, "write %s: %d %s", path, r.status, r.errorMessage())
	return r.data
}

// requireStatus asserts the status and, when msg is set, that the error
// message contains it.
func requireStatus(tb testing.TB, r result, status int, msg string) {
	tb.Helper()
	require.Equalf(tb, status, r.status, "error: %q", r.errorMessage())
	if msg != "" {
		require.Contains(tb, r.errorMessage(), msg)
	}
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func unb64(tb testing.TB, s string) string {
	tb.Helper()
	raw, err := base64.StdEncoding.DecodeString(s)
	require.NoError(tb, err)
	return string(raw)
}

// encrypt and decrypt are the happy-path helpers.
func (e *testEnv) encrypt(tb testing.TB, key, plaintext string, extra map[string]interface{}) string {
	tb.Helper()
	data := map[string]interface{}{"plaintext": b64(plaintext)}
	for k, v := range extra {
		data[k] = v
	}
	out := e.mustWrite(tb, "encrypt/"+key, data)
	return out["ciphertext"].(string)
}

func (e *testEnv) decrypt(tb testing.TB, key, ciphertext string, extra map[string]interface{}) string {
	tb.Helper()
	data := map[string]interface{}{"ciphertext": ciphertext}
	for k, v := range extra {
		data[k] = v
	}
	out := e.mustWrite(tb, "decrypt/"+key, data)
	return unb64(tb, out["plaintext"].(string))
}

// sealed returns the test storage as the unsealed mount sees it.
func (e *testEnv) sealed(tb testing.TB) logical.Storage {
	tb.Helper()
	s, err := e.b.seal.View(context.Background(), e.storage)
	require.NoError(tb, err)
	return s
}

func TestFactoryDoesNotTouchStorage(t *testing.T) {
	conf := logical.TestBackendConfig()
	conf.StorageView = nil
	// A nil storage view panics on any access: Factory must not need it.
	b, err := Factory(context.Background(), conf)
	require.NoError(t, err)
	require.NotNil(t, b)
}

func TestCacheSizeIsReadOnceUnsealed(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "cache-config", map[string]interface{}{"size": 42})

	// A restarted plugin reads the (sealed) cache-config as soon as the
	// root key is unsealed, without any request.
	e = e.restart(t)
	require.Eventually(t, func() bool { return e.b.cacheSize() == 42 }, 10*time.Second, 20*time.Millisecond)
}

func TestInvalidateCacheConfigReloadsSize(t *testing.T) {
	e := getTestBackend(t)
	// Another node stores a new size and Vault invalidates the key here.
	entry, err := logical.StorageEntryJSON(cacheConfigStoragePath, cacheConfig{Size: 25})
	require.NoError(t, err)
	require.NoError(t, e.sealed(t).Put(context.Background(), entry))
	e.b.invalidate(context.Background(), cacheConfigStoragePath)
	e.mustWrite(t, "keys/k", nil)
	require.Equal(t, 25, e.b.cacheSize())
}

func TestInvalidatePolicyDropsCachedKey(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	ct := e.encrypt(t, "k", "secret", nil)

	// Another node rotates the key and moves min_decryption_version past v1,
	// writing storage directly; only invalidation tells this node.
	p, err := keysutil.LoadPolicy(context.Background(), e.sealed(t), "policy/k")
	require.NoError(t, err)
	require.NoError(t, p.Rotate(context.Background(), e.sealed(t), rand.Reader))
	p.MinDecryptionVersion = 2
	require.NoError(t, p.Persist(context.Background(), e.sealed(t)))

	require.Equal(t, "secret", e.decrypt(t, "k", ct, nil), "cached policy still allows v1")
	e.b.invalidate(context.Background(), "policy/k")
	r := e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct})
	requireStatus(t, r, 400, "disallowed by policy (too old)")
}

func TestAutoRotate(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/due", map[string]interface{}{"auto_rotate_period": "1h"})
	e.mustWrite(t, "keys/fresh", map[string]interface{}{"auto_rotate_period": "24h"})
	e.mustWrite(t, "keys/never", nil)

	// Age every key's latest version by two hours.
	for _, name := range []string{"due", "fresh", "never"} {
		ageVersion1(t, e, name, 2*time.Hour)
	}

	require.NoError(t, e.b.periodic(context.Background(), &logical.Request{Storage: e.storage}))
	for name, want := range map[string]float64{"due": 2, "fresh": 1, "never": 1} {
		r := e.read(t, "keys/"+name)
		require.Equal(t, want, r.data["latest_version"], name)
	}

	// The next walk waits for the check interval.
	p, unlock, err := e.b.readPolicy(context.Background(), e.sealed(t), "due", true)
	require.NoError(t, err)
	entry := p.Keys["2"]
	entry.CreationTime = entry.CreationTime.Add(-2 * time.Hour)
	p.Keys["2"] = entry
	unlock()
	require.NoError(t, e.b.periodic(context.Background(), &logical.Request{Storage: e.storage}))
	require.Equal(t, float64(2), e.read(t, "keys/due").data["latest_version"])

	e.b.nextAutoRotate = time.Time{}
	require.NoError(t, e.b.periodic(context.Background(), &logical.Request{Storage: e.storage}))
	require.Equal(t, float64(3), e.read(t, "keys/due").data["latest_version"])
	// What the periodic function wrote is sealed like the rest.
	requireMountSealed(t, e, nil)
}

func TestUnknownPathIs404(t *testing.T) {
	e := getTestBackend(t)
	r := e.write(t, "nope/x", nil)
	require.Equal(t, 404, r.status)
}

// ageVersion1 makes a software key's version 1 d older, as if it had
// been created d earlier (auto-rotation's clock).
func ageVersion1(t *testing.T, e *testEnv, name string, d time.Duration) {
	t.Helper()
	p, unlock, err := e.b.readPolicy(context.Background(), e.sealed(t), name, true)
	require.NoError(t, err)
	defer unlock()
	entry := p.Keys["1"]
	entry.CreationTime = entry.CreationTime.Add(-d)
	p.Keys["1"] = entry
	require.NoError(t, p.Persist(context.Background(), e.sealed(t)))
}
