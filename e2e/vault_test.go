package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/vaultproc"
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

// vaultServer is a Vault process on a free loopback port (a
// vaultproc.Server), stopped when the test ends.
type vaultServer struct {
	t    testing.TB
	opts serverOptions
	srv  *vaultproc.Server
	dir  string
	// hsmConf is the SOFTHSM2_CONF of the server's own token, empty when
	// the server uses the suite's (see sharedTokenTests).
	hsmConf string
	// addr and token are the server's of its current start.
	addr   string
	token  string
	client *api.Client
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
	s := newVaultServer(t, opts)
	s.start()
	t.Cleanup(s.stop)
	return s
}

// newVaultServer prepares a server's directory, and its own copy of the
// SoftHSM2 token unless it shares the suite's, without starting it.
func newVaultServer(t testing.TB, opts serverOptions) *vaultServer {
	t.Helper()
	s := &vaultServer{t: t, opts: opts, dir: t.TempDir()}
	env := opts.env
	if s.ownToken() {
		conf, err := copyToken(filepath.Join(s.dir, "softhsm"))
		require.NoError(t, err)
		s.hsmConf = conf
		env = append([]string{"SOFTHSM2_CONF=" + conf}, env...)
	}
	srv, err := vaultproc.NewServer(vaultproc.ServerConfig{
		Vault: vaultBin, Dir: s.dir, Persistent: opts.persistent, RawStorage: opts.rawStorage,
		Env: env, Logf: t.Logf,
	})
	require.NoError(t, err)
	s.srv = srv
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

// freePort returns a port for a server's API, with the next one free for
// its cluster listener.
func freePort(t testing.TB) int {
	t.Helper()
	port, err := vaultproc.ServerPort()
	require.NoError(t, err)
	return port
}

// start launches the process (again, after stop, on a new port).
func (s *vaultServer) start() {
	s.t.Helper()
	if err := s.srv.Start(); err != nil {
		s.t.Fatalf("%v", err)
	}
	s.addr, s.token = s.srv.Addr, s.srv.Token
	cfg := api.DefaultConfig()
	cfg.Address = s.addr
	client, err := api.NewClient(cfg)
	require.NoError(s.t, err)
	client.SetToken(s.token)
	s.client = client
}

// pid is the Vault process's ID.
func (s *vaultServer) pid() int { return s.srv.Pid() }

// stop ends the server and its plugin processes, and waits for them.
func (s *vaultServer) stop() { s.srv.Stop() }

// kill ends the server and its plugins with SIGKILL, as a crash would.
func (s *vaultServer) kill() { s.srv.Kill() }

// restart stops and starts the server; a persistent one keeps its storage.
func (s *vaultServer) restart() {
	s.t.Helper()
	s.stop()
	s.start()
}

// log returns the server's log, its last 20000 bytes when longer.
func (s *vaultServer) log() string {
	return s.srv.Log()
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
	sum, err := s.srv.InstallPlugin(bin, fileName)
	require.NoError(s.t, err)
	return sum
}

// registerPlugin installs this tree's plugin and registers it under name at
// pluginVersion, with env added to the plugin's environment.
func (s *vaultServer) registerPlugin(name string, env ...string) {
	s.t.Helper()
	require.NoError(s.t, s.srv.RegisterPlugin(pluginBin, vaultproc.Plugin{
		Name: name, Command: pluginName, Version: pluginVersion, Env: env,
	}))
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
	status, out, err := s.srv.Do(method, path, body)
	require.NoError(s.t, err)
	return status, out
}

// TestHarnessStartFailures: a Vault that exits during start-up fails its
// start at once, with its log, and is reaped once; one that finds its port
// taken fails as vaultproc.ErrAddrInUse, which start retries on another
// port.
func TestHarnessStartFailures(t *testing.T) {
	t.Parallel()
	s := newVaultServer(t, serverOptions{env: []string{"VAULT_LOG_FORMAT=bogus"}}) // Vault refuses it and exits
	begin := time.Now()
	err := s.srv.StartOnce(freePort(t), 1)
	took := time.Since(begin)
	require.Error(t, err)
	require.Less(t, took, 20*time.Second, "a Vault that exits is noticed before the 60 s timeout")
	require.Contains(t, err.Error(), "exited during start-up")
	require.Contains(t, err.Error(), "unknown log format", "the error shows the log")
	require.NotErrorIs(t, err, vaultproc.ErrAddrInUse)
	require.NotNil(t, s.srv.Process().State(), "the process is reaped")
	s.stop() // finds it reaped: no second Wait, no hang

	taken, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer taken.Close()
	s = newVaultServer(t, serverOptions{})
	err = s.srv.StartOnce(taken.Addr().(*net.TCPAddr).Port, 1)
	require.ErrorIs(t, err, vaultproc.ErrAddrInUse)
	require.NotNil(t, s.srv.Process().State(), "the process is reaped")
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

	pids := childPluginPIDs(v.pid())
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
