package mountseal

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// The Manager is tested alone, against real SoftHSM2 tokens set up once per
// test binary (SoftHSM2 reads its configuration at C_Initialize), with a fake
// Host in place of the backend.
const (
	testPIN   = "4321"
	testToken = "mountseal-tests"
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
		fmt.Fprintln(os.Stderr, "the seal's tests need a real token:", err)
		return 1
	}
	softhsmLib = lib
	dir, err := os.MkdirTemp("", "hsm-transit-mountseal-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if softhsmConf, err = softhsm.Setup(dir, testPIN, testToken); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	// Tests give wrong PINs on purpose.
	defer hsm.SetFailedLoginLimit(1000, time.Minute)()
	return m.Run()
}

// fakeHost stands for the backend: it records what the seal asks of it.
type fakeHost struct {
	logger hclog.Logger

	mu       sync.Mutex
	unsealed int // calls of the on-unseal hook
	views    []logical.Storage
	dropped  int // calls of DropCachedKeys
	readOnly bool
}

func newFakeHost(tb testing.TB) *fakeHost {
	return &fakeHost{logger: hclog.New(&hclog.LoggerOptions{Name: tb.Name(), Level: hclog.Error})}
}

func (h *fakeHost) Logger() hclog.Logger { return h.logger }

func (h *fakeHost) ReadOnlyNode() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.readOnly
}

func (h *fakeHost) Unsealed(_ context.Context, view logical.Storage) int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.unsealed++
	h.views = append(h.views, view)
	return seal.DefaultManifestCacheBytes
}

func (h *fakeHost) DropCachedKeys() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.dropped++
}

// counts returns how often the hooks were called.
func (h *fakeHost) counts() (unsealed, dropped int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.unsealed, h.dropped
}

// waitUnsealedHook is requireUnsealedHook for an unseal made in the
// background: the unsealed state is published before the hook runs (both
// under the seal's lock, which the background retry holds, not the test).
func (h *fakeHost) waitUnsealedHook(tb testing.TB, want int) {
	tb.Helper()
	require.Eventually(tb, func() bool { n, _ := h.counts(); return n >= want }, 10*time.Second, 10*time.Millisecond)
	h.requireUnsealedHook(tb, want)
}

// requireUnsealedHook fails unless the on-unseal hook ran want times, with
// a view through the seal (one whose writes storage holds sealed).
func (h *fakeHost) requireUnsealedHook(tb testing.TB, want int) {
	tb.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	require.Equal(tb, want, h.unsealed, "the on-unseal hook ran")
	for _, v := range h.views {
		require.NotNil(tb, v)
	}
}

func newMountUUID(tb testing.TB) string {
	tb.Helper()
	b := make([]byte, 16)
	_, err := rand.Read(b)
	require.NoError(tb, err)
	return hex.EncodeToString(b)
}

// sealSettings is a configuration of the test token with KEK kek.
func sealSettings(token, kek string) func(cur *Config) (*Config, error) {
	return func(cur *Config) (*Config, error) {
		next := &Config{}
		if cur != nil {
			c := *cur
			next = &c
		}
		next.Library, next.TokenLabel, next.Slot, next.PIN, next.KeyLabel = softhsmLib, token, nil, testPIN, kek
		return next, next.Check()
	}
}

// withPIN changes only the PIN.
func withPIN(pin string) func(cur *Config) (*Config, error) {
	return func(cur *Config) (*Config, error) {
		next := *cur
		next.PIN = pin
		return &next, next.Check()
	}
}

// newManager returns a manager over s, closed at the end of the test.
func newManager(tb testing.TB, h Host, mountUUID string) *Manager {
	tb.Helper()
	m := New(h, mountUUID)
	tb.Cleanup(m.Close)
	return m
}

// unsealedManager returns a manager sealed (and so unsealed) by a new KEK
// in the test token, over new storage.
func unsealedManager(tb testing.TB) (*Manager, *fakeHost, logical.Storage) {
	tb.Helper()
	h := newFakeHost(tb)
	s := &logical.InmemStorage{}
	m := newManager(tb, h, newMountUUID(tb))
	_, err := m.Configure(context.Background(), s, ConfigureRequest{Merge: sealSettings(testToken, "kek-"+newMountUUID(tb)[:8]), GenerateKey: true})
	require.NoError(tb, err)
	require.Equal(tb, PhaseUnsealed, m.Snapshot().Phase())
	h.requireUnsealedHook(tb, 1)
	return m, h, s
}
