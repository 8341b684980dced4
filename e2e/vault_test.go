package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/stretchr/testify/require"
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
	addr      string
	token     string
	unsealKey string
	cmd       *exec.Cmd
	logFile   *os.File
	client    *api.Client
}

// startVault starts a server and waits until it answers, unsealed, with a
// root token.
func startVault(t testing.TB, opts serverOptions) *vaultServer {
	t.Helper()
	dir := t.TempDir()
	s := &vaultServer{t: t, opts: opts, dir: dir, pluginDir: filepath.Join(dir, "plugins")}
	require.NoError(t, os.MkdirAll(s.pluginDir, 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "data"), 0o700))
	s.start()
	t.Cleanup(s.stop)
	return s
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// start launches the process (again, after stop, on a new port).
func (s *vaultServer) start() {
	t := s.t
	t.Helper()
	port := freePort(t)
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
	s.logFile = logFile
	s.cmd = exec.Command(vaultBin, args...)
	s.cmd.Env = append(os.Environ(), s.opts.env...)
	s.cmd.Env = append(s.cmd.Env, "VAULT_LOG_LEVEL=debug")
	s.cmd.Stdout, s.cmd.Stderr = logFile, logFile
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, s.cmd.Start())

	cfg := api.DefaultConfig()
	cfg.Address = s.addr
	client, err := api.NewClient(cfg)
	require.NoError(t, err)
	s.client = client
	s.waitUp()
	if s.opts.persistent {
		s.initAndUnseal()
	}
	s.client.SetToken(s.token)
}

// waitUp waits for the listener to answer the health endpoint.
func (s *vaultServer) waitUp() {
	s.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(s.addr + "/v1/sys/health?uninitcode=200&sealedcode=200&standbyok=true")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		if s.cmd.ProcessState != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	s.t.Fatalf("vault did not come up at %s; log:\n%s", s.addr, s.log())
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

// stop ends the process and waits for it.
func (s *vaultServer) stop() {
	if s.cmd == nil || s.cmd.Process == nil || s.cmd.ProcessState != nil {
		return
	}
	// The plugin runs in Vault's process group; end them together.
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		_ = s.cmd.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
	_ = s.logFile.Close()
}

// kill ends the process with SIGKILL, as a crash would.
func (s *vaultServer) kill() {
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

func (s *vaultServer) log() string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "vault.log"))
	if len(b) > 20000 {
		b = b[len(b)-20000:]
	}
	return string(b)
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
