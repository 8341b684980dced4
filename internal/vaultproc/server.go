package vaultproc

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// ServerConfig describes a single Vault server on loopback.
type ServerConfig struct {
	// Vault is the vault binary.
	Vault string
	// Dir holds the server's vault.hcl, vault.log, plugins/ (its plugin
	// directory) and data/ (its file storage).
	Dir string
	// Persistent uses file storage in Dir/data, which survives restarts:
	// the server is initialised with one unseal key on its first start and
	// unsealed on every start. Otherwise it runs in -dev mode with
	// in-memory storage and the root token "root".
	Persistent bool
	// RawStorage enables sys/raw.
	RawStorage bool
	// Env is added to Vault's environment, and so to its plugins'.
	Env []string
	// LogLevel is Vault's log level; "debug" when empty.
	LogLevel string
	// Logf, when set, is told of a start retried on another port.
	Logf func(format string, args ...any)
}

// Server is a single Vault server on a free loopback port, answering,
// unsealed, with a root token (API.Token) once started.
type Server struct {
	API
	cfg ServerConfig
	// PluginDir is the server's plugin directory.
	PluginDir string
	// UnsealKey is a persistent server's one unseal key.
	UnsealKey string
	proc      *Process
}

// ErrAddrInUse is a start that failed because Vault could not bind its
// port.
var ErrAddrInUse = errors.New("address already in use")

// startAttempts bounds how often Start tries a new port when Vault finds
// its port taken by another process.
const startAttempts = 3

// NewServer prepares a server's directories without starting it.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.LogLevel == "" {
		cfg.LogLevel = "debug"
	}
	s := &Server{cfg: cfg, PluginDir: filepath.Join(cfg.Dir, "plugins")}
	if err := os.MkdirAll(s.PluginDir, 0o755); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(cfg.Dir, "data"), 0o700); err != nil {
		return nil, err
	}
	return s, nil
}

// StartServer prepares a server and starts it.
func StartServer(cfg ServerConfig) (*Server, error) {
	s, err := NewServer(cfg)
	if err != nil {
		return nil, err
	}
	if err := s.Start(); err != nil {
		s.Stop()
		return nil, err
	}
	return s, nil
}

// Start launches the process (again, after Stop, on a new port) and waits
// until it answers, unsealed.
func (s *Server) Start() error {
	for attempt := 1; ; attempt++ {
		port, err := ServerPort()
		if err != nil {
			return err
		}
		err = s.StartOnce(port, attempt)
		if err == nil {
			break
		}
		if errors.Is(err, ErrAddrInUse) && attempt < startAttempts {
			if s.cfg.Logf != nil {
				s.cfg.Logf("vault at %s: %v; trying another port", s.Addr, err)
			}
			continue
		}
		return err
	}
	if s.cfg.Persistent {
		return s.initAndUnseal()
	}
	return nil
}

// StartOnce launches the process on port and waits for it to answer. When
// it does not, the process is ended and reaped, and the error has its log
// (or is ErrAddrInUse).
func (s *Server) StartOnce(port, attempt int) error {
	s.Addr = fmt.Sprintf("http://127.0.0.1:%d", port)
	hcl := filepath.Join(s.cfg.Dir, "vault.hcl")
	config := fmt.Sprintf("plugin_directory = %q\ndisable_mlock = true\nraw_storage_endpoint = %t\napi_addr = %q\n",
		s.PluginDir, s.cfg.RawStorage, s.Addr)
	var args []string
	if s.cfg.Persistent {
		config += fmt.Sprintf(`
storage "file" {
  path = %q
}
listener "tcp" {
  address     = "127.0.0.1:%d"
  tls_disable = true
}
`, filepath.Join(s.cfg.Dir, "data"), port)
		args = []string{"server", "-config", hcl}
	} else {
		s.Token = "root"
		args = []string{"server", "-dev", "-dev-root-token-id=root",
			fmt.Sprintf("-dev-listen-address=127.0.0.1:%d", port), "-config", hcl}
	}
	if err := os.WriteFile(hcl, []byte(config), 0o600); err != nil {
		return err
	}
	logStart := int64(0)
	if info, err := os.Stat(s.LogPath()); err == nil {
		logStart = info.Size()
	}
	env := append(append([]string(nil), s.cfg.Env...), "VAULT_LOG_LEVEL="+s.cfg.LogLevel)
	proc, err := Start(Command{
		Vault: s.cfg.Vault, Args: args, Env: env, LogPath: s.LogPath(),
		Banner: fmt.Sprintf("==== harness: starting vault at %s (attempt %d)", s.Addr, attempt),
	})
	if err != nil {
		return err
	}
	s.proc = proc
	if err := proc.WaitUp(s.Addr); err != nil {
		// End the process that exited (or hung), so that Stop finds
		// nothing left to do.
		proc.Kill()
		tail := s.LogSince(logStart)
		if strings.Contains(tail, "address already in use") {
			return fmt.Errorf("%w: %v", ErrAddrInUse, err)
		}
		return fmt.Errorf("%v (%s); log:\n%s", err, proc.State(), tail)
	}
	return nil
}

// initAndUnseal initialises a persistent server on its first start, unseals
// it, and waits until it is active.
func (s *Server) initAndUnseal() error {
	st, err := s.Call("GET", "sys/init", nil)
	if err != nil {
		return err
	}
	if inited, _ := st["initialized"].(bool); !inited {
		out, err := s.Call("PUT", "sys/init", map[string]any{"secret_shares": 1, "secret_threshold": 1})
		if err != nil {
			return err
		}
		keys, _ := out["keys_base64"].([]any)
		token, _ := out["root_token"].(string)
		if len(keys) != 1 || token == "" {
			return fmt.Errorf("sys/init answered %v", out)
		}
		s.UnsealKey, _ = keys[0].(string)
		s.Token = token
	}
	out, err := s.Call("PUT", "sys/unseal", map[string]any{"key": s.UnsealKey})
	if err != nil {
		return err
	}
	if sealed, _ := out["sealed"].(bool); sealed {
		return fmt.Errorf("vault at %s still sealed after the unseal key: %v", s.Addr, out)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := s.Call("GET", "sys/mounts", nil)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("vault at %s did not become active: %v; log:\n%s", s.Addr, err, s.Log())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Process is the server's current process, nil before its first start.
func (s *Server) Process() *Process { return s.proc }

// Pid is the Vault process's ID.
func (s *Server) Pid() int { return s.proc.Pid() }

// Stop ends the server and its plugin processes (Process.Stop).
func (s *Server) Stop() {
	if s.proc != nil {
		s.proc.Stop(StopGrace)
	}
}

// Kill ends the server and its plugin processes with SIGKILL, as a crash
// of the machine would.
func (s *Server) Kill() {
	if s.proc != nil {
		s.proc.Kill()
	}
}

// Restart stops and starts the server; a persistent one keeps its storage.
func (s *Server) Restart() error {
	s.Stop()
	return s.Start()
}

// LogPath is the file Vault's output goes to, over every start.
func (s *Server) LogPath() string { return filepath.Join(s.cfg.Dir, "vault.log") }

// LogSince returns the server's log from offset on, its last 20000 bytes
// when longer.
func (s *Server) LogSince(offset int64) string {
	b, _ := os.ReadFile(s.LogPath())
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

// Log returns the server's log, its last 20000 bytes when longer.
func (s *Server) Log() string { return s.LogSince(0) }

// InstallPlugin copies a plugin binary into the plugin directory as
// fileName, and returns its SHA-256.
func (s *Server) InstallPlugin(bin, fileName string) (string, error) {
	return InstallPlugin(bin, s.PluginDir, fileName)
}

// RegisterPlugin installs the binary bin as p.Command (p.Name when empty)
// and registers it with its digest.
func (s *Server) RegisterPlugin(bin string, p Plugin) error {
	if p.Command == "" {
		p.Command = p.Name
	}
	sum, err := s.InstallPlugin(bin, p.Command)
	if err != nil {
		return err
	}
	p.SHA256 = sum
	return s.API.RegisterPlugin(p)
}
