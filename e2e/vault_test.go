package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/hashicorp/vault/api"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// serverOptions configure a test Vault server.
type serverOptions struct {
	// persistent uses file storage in a directory that survives restarts;
	// otherwise the server runs in -dev mode with in-memory storage.
	persistent bool
	// rawStorage enables sys/raw, to inspect what the plugin stores.
	rawStorage bool
	// env is added to Vault's environment, and so to the plugin's.
	env []string
}

// vaultServer is a Vault process on a free loopback port, stopped when the
// test ends.
type vaultServer struct {
	t         testing.TB
	opts      serverOptions
	dir       string
	pluginDir string
	// hsmConf is the SOFTHSM2_CONF of the server's own token, empty when
	// the server uses the suite's (see sharedTokenTests).
	hsmConf   string
	addr      string
	token     string
	unsealKey string
	cmd       *exec.Cmd
	// exited is closed when cmd's process has exited. It is watched
	// without reaping the process, so that the one cmd.Wait (in stop, kill,
	// or a test's own) still finds it.
	exited  chan struct{}
	logFile *os.File
	client  *api.Client
}

// sharedTokenTests are the tests whose Vault must use the suite's SoftHSM2
// token rather than one of its own, and why. Every other server gets a copy
// of the token, so that no test sees another's HSM objects or sessions.
var sharedTokenTests = map[string]string{
	// It lists the token's objects from the test process, which has one
	// SoftHSM2 configuration (SOFTHSM2_CONF is read at C_Initialize).
	"TestHSMResidentKeyLifecycle": "the test process reads the token the plugin writes",
}

// startVault starts a server and waits until it answers, unsealed, with a
// root token.
func startVault(t testing.TB, opts serverOptions) *vaultServer {
	t.Helper()
	dir := t.TempDir()
	s := &vaultServer{t: t, opts: opts, dir: dir, pluginDir: filepath.Join(dir, "plugins")}
	require.NoError(t, os.MkdirAll(s.pluginDir, 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "data"), 0o700))
	if s.ownToken() {
		conf, err := copyToken(filepath.Join(dir, "softhsm"))
		require.NoError(t, err)
		s.hsmConf = conf
	}
	s.start()
	t.Cleanup(s.stop)
	return s
}

// ownToken reports whether the server gets a token of its own: unless its
// test shares the suite's, or names a SoftHSM2 configuration itself.
func (s *vaultServer) ownToken() bool {
	top, _, _ := strings.Cut(s.t.Name(), "/")
	if _, shared := sharedTokenTests[top]; shared {
		return false
	}
	for _, e := range s.opts.env {
		if strings.HasPrefix(e, "SOFTHSM2_CONF=") {
			return false
		}
	}
	return true
}

// Ports this process has handed out. None is handed out twice, even after
// its server stopped: a restarted server or a cluster node may still bind
// it, and so may the next server while the old socket lingers.
var (
	portsMu        sync.Mutex
	portsHandedOut = map[int]bool{}
)

// reservePorts returns n loopback ports, free when asked and never handed
// out before; with span > 1 each also has the span-1 ports after it free
// and reserved (Vault binds its cluster listener on the API port + 1). The
// listeners probing them are held until all are chosen, so the kernel does
// not offer one twice; a server may still lose a port to another process
// before it binds, which start retries.
func reservePorts(n, span int) ([]int, error) {
	portsMu.Lock()
	defer portsMu.Unlock()
	var held []net.Listener
	defer func() {
		for _, l := range held {
			l.Close()
		}
	}()
	var ports []int
	for attempt := 0; len(ports) < n; attempt++ {
		if attempt > 1000 {
			return nil, fmt.Errorf("no %d free loopback ports after %d tries", n, attempt)
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		held = append(held, l)
		port := l.Addr().(*net.TCPAddr).Port
		ok := !portsHandedOut[port] && port+span-1 <= 65535
		for next := port + 1; ok && next < port+span; next++ {
			if portsHandedOut[next] {
				ok = false
				break
			}
			nl, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", next))
			if err != nil {
				ok = false
				break
			}
			held = append(held, nl)
		}
		if !ok {
			continue
		}
		for p := port; p < port+span; p++ {
			portsHandedOut[p] = true
		}
		ports = append(ports, port)
	}
	return ports, nil
}

// freePort returns a port for a server's API, with the next one free for
// its cluster listener.
func freePort(t testing.TB) int {
	t.Helper()
	ports, err := reservePorts(1, 2)
	require.NoError(t, err)
	return ports[0]
}

// startAttempts bounds how often start tries a new port when Vault finds
// its port taken by another process.
const startAttempts = 3

// start launches the process (again, after stop, on a new port).
func (s *vaultServer) start() {
	t := s.t
	t.Helper()
	for attempt := 1; ; attempt++ {
		err := s.startOnce(freePort(t), attempt)
		if err == nil {
			break
		}
		if errors.Is(err, errAddrInUse) && attempt < startAttempts {
			t.Logf("vault at %s: %v; trying another port", s.addr, err)
			continue
		}
		t.Fatalf("%v", err)
	}
	if s.opts.persistent {
		s.initAndUnseal()
	}
	s.client.SetToken(s.token)
}

// errAddrInUse is a start that failed because Vault could not bind its
// port.
var errAddrInUse = errors.New("address already in use")

// startOnce launches the process on port and waits for it to answer.
func (s *vaultServer) startOnce(port, attempt int) error {
	t := s.t
	t.Helper()
	s.addr = fmt.Sprintf("http://127.0.0.1:%d", port)

	config := fmt.Sprintf("plugin_directory = %q\ndisable_mlock = true\nraw_storage_endpoint = %t\napi_addr = %q\n",
		s.pluginDir, s.opts.rawStorage, s.addr)
	var args []string
	if s.opts.persistent {
		config += fmt.Sprintf(`
storage "file" {
  path = %q
}
listener "tcp" {
  address     = "127.0.0.1:%d"
  tls_disable = true
}
`, filepath.Join(s.dir, "data"), port)
		args = []string{"server", "-config", filepath.Join(s.dir, "vault.hcl")}
	} else {
		s.token = "root"
		args = []string{"server", "-dev", "-dev-root-token-id=root",
			fmt.Sprintf("-dev-listen-address=127.0.0.1:%d", port),
			"-config", filepath.Join(s.dir, "vault.hcl")}
	}
	require.NoError(t, os.WriteFile(filepath.Join(s.dir, "vault.hcl"), []byte(config), 0o600))

	logFile, err := os.OpenFile(filepath.Join(s.dir, "vault.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	require.NoError(t, err)
	info, err := logFile.Stat()
	require.NoError(t, err)
	logStart := info.Size()
	fmt.Fprintf(logFile, "==== harness: starting vault at %s (attempt %d)\n", s.addr, attempt)
	s.logFile = logFile
	s.cmd = exec.Command(vaultBin, args...)
	s.cmd.Env = os.Environ()
	if s.hsmConf != "" {
		s.cmd.Env = append(s.cmd.Env, "SOFTHSM2_CONF="+s.hsmConf)
	}
	s.cmd.Env = append(s.cmd.Env, s.opts.env...)
	s.cmd.Env = append(s.cmd.Env, "VAULT_LOG_LEVEL=debug")
	s.cmd.Stdout, s.cmd.Stderr = logFile, logFile
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, s.cmd.Start())
	exited := make(chan struct{})
	s.exited = exited
	go func(pid int) {
		defer close(exited)
		waitExit(pid)
	}(s.cmd.Process.Pid)

	cfg := api.DefaultConfig()
	cfg.Address = s.addr
	client, err := api.NewClient(cfg)
	require.NoError(t, err)
	s.client = client
	if err := s.waitUp(); err != nil {
		// Reap the process that exited (or is killed here, if it hung),
		// so that stop finds nothing left to do.
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		_ = s.cmd.Wait()
		_ = s.logFile.Close()
		tail := s.logSince(logStart)
		if strings.Contains(tail, "address already in use") {
			return fmt.Errorf("%w: %v", errAddrInUse, err)
		}
		return fmt.Errorf("%v (%s); log:\n%s", err, s.cmd.ProcessState, tail)
	}
	return nil
}

// waitUp waits for the listener to answer the health endpoint, and fails at
// once when the process exits first.
func (s *vaultServer) waitUp() error {
	deadline := time.After(60 * time.Second)
	// Each probe is bounded, so that a listener that accepts and never
	// answers does not hold waitUp past its deadline.
	probe := &http.Client{Timeout: 2 * time.Second}
	for {
		resp, err := probe.Get(s.addr + "/v1/sys/health?uninitcode=200&sealedcode=200&standbyok=true")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		select {
		case <-s.exited:
			return fmt.Errorf("vault exited during start-up at %s", s.addr)
		case <-deadline:
			return fmt.Errorf("vault did not come up at %s within 60s", s.addr)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// waitExit blocks until the child process pid has exited, without reaping
// it (waitid with WNOWAIT): its exec.Cmd's Wait still collects it, once.
// It returns at once if the process was already reaped.
func waitExit(pid int) {
	const pPID = 1 // idtype P_PID
	var siginfo [128]byte
	for {
		_, _, errno := syscall.Syscall6(syscall.SYS_WAITID, pPID, uintptr(pid),
			uintptr(unsafe.Pointer(&siginfo[0])), syscall.WEXITED|syscall.WNOWAIT, 0, 0)
		if errno != syscall.EINTR {
			return
		}
	}
}

// initAndUnseal initialises a persistent server on first start and unseals it
// on every start.
func (s *vaultServer) initAndUnseal() {
	t := s.t
	t.Helper()
	sys := s.client.Sys()
	inited, err := sys.InitStatus()
	require.NoError(t, err)
	if !inited {
		resp, err := sys.Init(&api.InitRequest{SecretShares: 1, SecretThreshold: 1})
		require.NoError(t, err)
		s.unsealKey, s.token = resp.KeysB64[0], resp.RootToken
	}
	st, err := sys.Unseal(s.unsealKey)
	require.NoError(t, err)
	require.False(t, st.Sealed)
	s.client.SetToken(s.token)
	// Wait for the node to become active.
	require.Eventually(t, func() bool {
		_, err := s.client.Logical().Read("sys/mounts")
		return err == nil
	}, 30*time.Second, 200*time.Millisecond, "vault did not become active; log:\n%s", s.log())
}

// stop ends the process and waits for it. A process already reaped (by
// kill, a failed start, or a test's own cmd.Wait) is left alone: Wait is
// called once per process.
func (s *vaultServer) stop() {
	if s.cmd == nil || s.cmd.Process == nil || s.cmd.ProcessState != nil {
		return
	}
	// The plugin runs in Vault's process group; end them together.
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(15 * time.Second):
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-s.exited
	}
	_ = s.cmd.Wait()
	_ = s.logFile.Close()
}

// kill ends the process with SIGKILL, as a crash would.
func (s *vaultServer) kill() {
	if s.cmd.ProcessState != nil {
		return
	}
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	_ = s.cmd.Wait()
	_ = s.logFile.Close()
}

// restart stops and starts the server; a persistent one keeps its storage.
func (s *vaultServer) restart() {
	s.t.Helper()
	s.stop()
	s.start()
}

// logSince returns the server's log from offset on, its last 20000 bytes
// when longer.
func (s *vaultServer) logSince(offset int64) string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "vault.log"))
	if offset < int64(len(b)) {
		b = b[offset:]
	} else {
		b = nil
	}
	if len(b) > 20000 {
		b = b[len(b)-20000:]
	}
	return string(b)
}

// log returns the server's log, its last 20000 bytes when longer.
func (s *vaultServer) log() string {
	return s.logSince(0)
}

// cli runs the vault CLI against this server.
func (s *vaultServer) cli(args ...string) (string, error) {
	s.t.Helper()
	cmd := exec.Command(vaultBin, args...)
	cmd.Env = append(os.Environ(), "VAULT_ADDR="+s.addr, "VAULT_TOKEN="+s.token, "VAULT_FORMAT=")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// mustCLI runs the CLI and requires success.
func (s *vaultServer) mustCLI(args ...string) string {
	s.t.Helper()
	out, err := s.cli(args...)
	require.NoErrorf(s.t, err, "vault %s:\n%s", strings.Join(args, " "), out)
	return out
}

// cliJSON runs the CLI with -format=json and decodes the output.
func (s *vaultServer) cliJSON(args ...string) map[string]interface{} {
	s.t.Helper()
	full := append([]string{args[0], "-format=json"}, args[1:]...)
	out := s.mustCLI(full...)
	var v map[string]interface{}
	require.NoErrorf(s.t, json.Unmarshal([]byte(out), &v), "output: %s", out)
	return v
}

// installPlugin copies a plugin binary into the plugin directory under the
// file name, and returns its SHA-256.
func (s *vaultServer) installPlugin(bin, fileName string) string {
	s.t.Helper()
	src, err := os.Open(bin)
	require.NoError(s.t, err)
	defer src.Close()
	dst, err := os.OpenFile(filepath.Join(s.pluginDir, fileName), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o755)
	require.NoError(s.t, err)
	h := sha256.New()
	_, err = io.Copy(io.MultiWriter(dst, h), src)
	require.NoError(s.t, err)
	require.NoError(s.t, dst.Close())
	return hex.EncodeToString(h.Sum(nil))
}

// registerPlugin installs this tree's plugin and registers it under name at
// pluginVersion, with extra `vault plugin register` flags.
func (s *vaultServer) registerPlugin(name string, flags ...string) {
	s.t.Helper()
	sum := s.installPlugin(pluginBin, pluginName)
	args := []string{"plugin", "register", "-sha256=" + sum, "-version=" + pluginVersion, "-command=" + pluginName}
	args = append(args, flags...)
	args = append(args, "secret", name)
	s.mustCLI(args...)
}

// mountPlugin registers the plugin, enables it at path and seals the mount
// with the test token.
func (s *vaultServer) mountPlugin(path string) {
	s.t.Helper()
	s.registerPlugin(pluginName)
	s.mustCLI("secrets", "enable", "-path="+path, "-plugin-version="+pluginVersion, pluginName)
	s.configureSeal(path)
}

// configureSeal seals a plugin mount with the test token's KEK.
func (s *vaultServer) configureSeal(path string) {
	s.t.Helper()
	s.mustCLI("write", path+"/config/seal", "library="+softhsmLib, "token_label="+hsmToken,
		"pin="+hsmPIN, "key_label="+hsmKEK)
}

// rawRequest sends a request and returns the status code and the decoded
// body, for comparing exact answers.
func (s *vaultServer) rawRequest(method, path string, body interface{}) (int, map[string]interface{}) {
	s.t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		require.NoError(s.t, err)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(context.Background(), method, s.addr+"/v1/"+path, rd)
	require.NoError(s.t, err)
	req.Header.Set("X-Vault-Token", s.token)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(s.t, err)
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	require.NoError(s.t, err)
	var decoded map[string]interface{}
	if len(bytes.TrimSpace(raw)) > 0 {
		require.NoErrorf(s.t, json.Unmarshal(raw, &decoded), "body: %s", raw)
	}
	return resp.StatusCode, decoded
}

// TestHarnessStartFailures: a Vault that exits during start-up fails its
// start at once, with its log, and is reaped once; one that finds its port
// taken fails as errAddrInUse, which start retries on another port.
func TestHarnessStartFailures(t *testing.T) {
	t.Parallel()
	newServer := func(env ...string) *vaultServer {
		dir := t.TempDir()
		return &vaultServer{t: t, opts: serverOptions{env: env}, dir: dir, pluginDir: filepath.Join(dir, "plugins")}
	}

	s := newServer("VAULT_LOG_FORMAT=bogus") // Vault refuses it and exits
	begin := time.Now()
	err := s.startOnce(freePort(t), 1)
	took := time.Since(begin)
	require.Error(t, err)
	require.Less(t, took, 20*time.Second, "a Vault that exits is noticed before the 60 s timeout")
	require.Contains(t, err.Error(), "exited during start-up")
	require.Contains(t, err.Error(), "unknown log format", "the error shows the log")
	require.NotErrorIs(t, err, errAddrInUse)
	require.NotNil(t, s.cmd.ProcessState, "the process is reaped")
	s.stop() // finds it reaped: no second Wait, no hang

	taken, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer taken.Close()
	s = newServer()
	err = s.startOnce(taken.Addr().(*net.TCPAddr).Port, 1)
	require.ErrorIs(t, err, errAddrInUse)
	require.NotNil(t, s.cmd.ProcessState, "the process is reaped")
}

// TestHarnessReservePorts: concurrent reservations never share a port,
// including the port after each one kept for Vault's cluster listener.
func TestHarnessReservePorts(t *testing.T) {
	t.Parallel()
	const workers, each = 8, 10
	got := make(chan []int, workers)
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var ports []int
			for j := 0; j < each; j++ {
				p, err := reservePorts(1, 2)
				if err != nil {
					t.Error(err)
					return
				}
				ports = append(ports, p[0], p[0]+1)
			}
			got <- ports
		}()
	}
	wg.Wait()
	close(got)
	seen := map[int]bool{}
	for ports := range got {
		for _, p := range ports {
			require.Falsef(t, seen[p], "port %d handed out twice", p)
			seen[p] = true
		}
	}
	require.Len(t, seen, workers*each*2)
	more, err := freePorts(4)
	require.NoError(t, err)
	for _, p := range more {
		require.Falsef(t, seen[p], "port %d handed out again", p)
	}
}

// TestHarnessOwnToken: a server gets a token of its own: its plugin runs
// with the server's SoftHSM2 configuration, and its HSM keys are stored in
// that token's directory.
func TestHarnessOwnToken(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{})
	require.NotEmpty(t, v.hsmConf, "the server has its own SoftHSM2 configuration")
	require.NotEqual(t, softhsmConf, v.hsmConf)
	v.mountPlugin("transit")
	own, err := softhsm.TokenDir(v.hsmConf, hsmToken)
	require.NoError(t, err)
	before := dirEntries(t, own)

	pids := childPluginPIDs(v.cmd.Process.Pid)
	require.Len(t, pids, 1, "one plugin process")
	environ, err := os.ReadFile(filepath.Join("/proc", fmt.Sprint(pids[0]), "environ"))
	require.NoError(t, err)
	var conf []string
	for _, e := range strings.Split(string(environ), "\x00") {
		if strings.HasPrefix(e, "SOFTHSM2_CONF=") {
			conf = append(conf, e)
		}
	}
	require.Equal(t, []string{"SOFTHSM2_CONF=" + v.hsmConf}, conf, "the plugin's SOFTHSM2_CONF")

	v.mustCLI("write", "transit/keys/own", "hsm=true")
	require.Greater(t, dirEntries(t, own), before, "the HSM key's object is in the server's token")
}

// dirEntries counts the files in dir.
func dirEntries(t *testing.T, dir string) int {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	return len(entries)
}
