package p11env

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// P11KitClientModule is the file name of p11-kit's client module, in the
// multiarch pkcs11 directory (Debian package p11-kit-modules).
const P11KitClientModule = "p11-kit-client.so"

// P11KitAddressEnv is the variable p11-kit's client module reads the
// server's address from, in C_Initialize.
const P11KitAddressEnv = "P11_KIT_SERVER_ADDRESS"

// P11Kit is a p11-kit server (`p11-kit server -f`) exporting one token of a
// provider module on a unix socket: a stand-in for a network HSM. Clients
// load ClientLibrary with Env() in their environment.
//
// The server forks a child per client connection; the child serves that
// connection's PKCS#11 calls through its own instance of the provider. The
// server runs in its own process group, and Kill, Stop and Cont signal the
// whole group, children included.
//
// A client is affected by the server's state as follows (p11-kit 0.24.1;
// asserted by this package's tests): after Kill, calls on an open session
// fail with CKR_DEVICE_ERROR at once; after Restart the client module must
// be finalised and initialised again (C_Finalize, C_Initialize) before it
// reaches the new server, and sessions must be opened and logged in anew;
// while Stop'ped, calls block until Cont.
//
// The methods are safe for concurrent use, but Kill, Restart, Stop and Cont
// fail the test with t.Fatal when they cannot do their job, so call them
// from the test's goroutine (a PKCS#11 call that may block belongs in
// another goroutine).
type P11Kit struct {
	// Socket is the absolute path of the server's unix socket.
	Socket string
	// ClientLibrary is the absolute path of p11-kit-client.so.
	ClientLibrary string
	// Provider is the module the server serves, TokenLabel its token.
	Provider, TokenLabel string

	t      testing.TB
	server string   // the p11-kit program
	env    []string // added to the server's environment

	mu   sync.Mutex
	proc *p11kitProc // nil when not running
}

// p11kitProc is one run of the server.
type p11kitProc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
}

// StartP11Kit starts a p11-kit server exporting the token labelled
// tokenLabel of module provider (an absolute path) on a unix socket in a
// temporary directory, with env added to the server's environment (for
// SoftHSM2, SOFTHSM2_CONF=...: see internal/softhsm.Configure and
// InitToken). t.Cleanup kills the server and its children and waits for
// them.
//
// It skips the test when p11-kit or its client module is not installed, or
// fails it instead when HSM_TRANSIT_REQUIRE_P11KIT is set.
//
// A client process gets the server's address from its environment at
// C_Initialize: start it with Env() added to its environment. A Go test
// loading ClientLibrary in-process can instead set the variable
// (t.Setenv(P11KitAddressEnv, ...) or os.Setenv, which with cgo also sets
// the C environment the module reads) before C_Initialize.
func StartP11Kit(t testing.TB, provider, tokenLabel string, env []string) *P11Kit {
	t.Helper()
	server, err := findProgram("p11-kit")
	if err != nil {
		unavailable(t, RequireP11KitEnv, "p11-kit is not installed (apt-get install p11-kit p11-kit-modules): %v", err)
	}
	client, err := findModule(P11KitClientModule)
	if err != nil {
		unavailable(t, RequireP11KitEnv, "p11-kit's client module is not installed (apt-get install p11-kit-modules): %v", err)
	}
	if !filepath.IsAbs(provider) {
		t.Fatalf("p11env: provider %q must be an absolute path", provider)
	}
	if _, err := os.Stat(provider); err != nil {
		t.Fatalf("p11env: provider: %v", err)
	}
	if strings.ContainsAny(tokenLabel, ";?%") {
		// Would need percent-encoding in the PKCS#11 URI.
		t.Fatalf("p11env: token label %q has characters this helper does not encode", tokenLabel)
	}
	k := &P11Kit{
		Socket:        filepath.Join(socketDir(t), "p11-kit.sock"),
		ClientLibrary: client,
		Provider:      provider,
		TokenLabel:    tokenLabel,
		t:             t,
		server:        server,
		env:           append([]string(nil), env...),
	}
	t.Cleanup(func() {
		if err := k.kill(); err != nil {
			t.Errorf("p11env: %v", err)
		}
	})
	if err := k.start(); err != nil {
		t.Fatalf("p11env: %v", err)
	}
	return k
}

// socketDir returns a directory for a unix socket: t.TempDir(), unless its
// path is too long for a socket address (108 bytes with the name), then a
// shorter temporary directory removed at cleanup.
func socketDir(t testing.TB) string {
	dir := t.TempDir()
	if len(dir) < 80 {
		return dir
	}
	dir, err := os.MkdirTemp("", "p11kit")
	if err != nil {
		t.Fatalf("p11env: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// Env returns the environment a client process needs:
// P11_KIT_SERVER_ADDRESS=unix:path=<Socket>.
func (k *P11Kit) Env() []string {
	return []string{P11KitAddressEnv + "=" + k.Address()}
}

// Address is the value of P11_KIT_SERVER_ADDRESS for this server.
func (k *P11Kit) Address() string { return "unix:path=" + k.Socket }

// Kill sends SIGKILL to the server and the children serving connections,
// and waits until they are gone: the HSM has crashed. A no-op when the
// server is not running.
func (k *P11Kit) Kill() {
	k.t.Helper()
	if err := k.kill(); err != nil {
		k.t.Fatalf("p11env: %v", err)
	}
}

// Restart starts the server again on the same socket path, after killing
// it if it is still running; the stale socket file is removed first. The
// token is the same (the provider keeps token objects in its store).
func (k *P11Kit) Restart() {
	k.t.Helper()
	if err := k.kill(); err != nil {
		k.t.Fatalf("p11env: %v", err)
	}
	if err := k.start(); err != nil {
		k.t.Fatalf("p11env: %v", err)
	}
}

// Stop sends SIGSTOP to the server and its children: the HSM hangs, and
// clients' calls block until Cont.
func (k *P11Kit) Stop() { k.signal(syscall.SIGSTOP) }

// Cont sends SIGCONT to the server and its children, after Stop.
func (k *P11Kit) Cont() { k.signal(syscall.SIGCONT) }

// Running reports whether the server is running (it may be stopped).
func (k *P11Kit) Running() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.proc != nil
}

func (k *P11Kit) signal(sig syscall.Signal) {
	k.t.Helper()
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.proc == nil {
		k.t.Fatalf("p11env: p11-kit server is not running (signal %v)", sig)
	}
	if err := syscall.Kill(-k.proc.cmd.Process.Pid, sig); err != nil {
		k.t.Fatalf("p11env: signalling p11-kit's process group: %v", err)
	}
}

// start runs the server and waits until it listens.
func (k *P11Kit) start() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.proc != nil {
		return errors.New("p11-kit server already running")
	}
	if err := os.Remove(k.Socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing stale socket: %w", err)
	}
	p := &p11kitProc{out: &syncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(k.server, "server", "-f", "-n", k.Socket, "--provider", k.Provider, "pkcs11:token="+k.TokenLabel)
	p.cmd.Env = append(os.Environ(), k.env...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	// Own process group, so that signals reach the per-connection
	// children; SIGKILL if the test process dies.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return fmt.Errorf("starting p11-kit server: %w", err)
	}
	go func() {
		_ = p.cmd.Wait()
		close(p.done)
	}()
	k.proc = p
	// With -f the server prints its address and pid once it listens.
	err := waitFor(10*time.Second, "p11-kit server to listen on "+k.Socket, func() (bool, error) {
		select {
		case <-p.done:
			return false, fmt.Errorf("p11-kit server exited: %s", p.out.String())
		default:
		}
		fi, err := os.Stat(k.Socket)
		return err == nil && fi.Mode()&os.ModeSocket != 0 && strings.Contains(p.out.String(), "P11_KIT_SERVER_PID="), nil
	})
	if err != nil {
		k.killLocked()
		return err
	}
	return nil
}

// kill ends the server and its children, if running.
func (k *P11Kit) kill() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.killLocked()
}

func (k *P11Kit) killLocked() error {
	p := k.proc
	if p == nil {
		return nil
	}
	k.proc = nil
	pgid := p.cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		return fmt.Errorf("p11-kit server (pid %d) survived SIGKILL for 10 s", pgid)
	}
	// The children were reparented when the server died; wait for them
	// too, so the provider's store is free.
	if err := waitGroupGone(pgid, 10*time.Second); err != nil {
		return fmt.Errorf("p11-kit server's children: %w", err)
	}
	return nil
}
