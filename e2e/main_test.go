// Package e2e runs the plugin inside real Vault servers, through the clients
// its users have: the vault CLI, the Go API client and Vault Agent.
package e2e

import (
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

const (
	pluginName    = "vault-plugin-secrets-hsm-transit"
	pluginVersion = "v0.1.0"
	modulePath    = "github.com/hsm-transit/vault-plugin-secrets-hsm-transit"

	// The SoftHSM2 token test Vaults' plugins are sealed by. The suite's
	// SOFTHSM2_CONF reaches Vault, and so the plugin, through the
	// environment; startVault gives most servers a copy of their own
	// (copyToken) instead.
	hsmToken = "e2e"
	hsmPIN   = "246810"
	hsmKEK   = "e2e-kek"
)

var (
	repoRoot    string
	vaultBin    string
	pluginBin   string // the plugin at pluginVersion, built from this tree
	buildDir    string
	softhsmLib  string
	softhsmConf string
	// tokenTemplate is a copy of the suite token's files, with the KEK,
	// taken before any test ran; copyToken copies it for one server.
	tokenTemplate string
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	var err error
	if repoRoot, err = findRepoRoot(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	if buildDir, err = os.MkdirTemp("", "hsm-transit-e2e-"); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(buildDir)

	vaultBin = os.Getenv("HSM_TRANSIT_VAULT")
	if vaultBin == "" {
		vaultBin = filepath.Join(repoRoot, "bin", "vault")
	}
	if _, err := os.Stat(vaultBin); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: no Vault binary at %s; run `make vault` (it builds the pinned Vault once)\n", vaultBin)
		return 1
	}
	if pluginBin, err = buildPlugin(pluginVersion); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	if err := setupToken(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	return m.Run()
}

// setupToken makes a SoftHSM2 token with the KEK for the tests' mounts.
func setupToken() error {
	var err error
	if softhsmLib, err = softhsm.FindLibrary(); err != nil {
		return err
	}
	if softhsmConf, err = softhsm.Setup(filepath.Join(buildDir, "softhsm"), hsmPIN, hsmToken); err != nil {
		return err
	}
	tok, err := hsm.Open(hsm.Config{Library: softhsmLib, TokenLabel: hsmToken, PIN: hsmPIN})
	if err != nil {
		return err
	}
	err = tok.GenerateKey(hsmKEK)
	tok.Close()
	if err != nil {
		return err
	}
	tokenTemplate = filepath.Join(buildDir, "softhsm-template")
	return copyTree(filepath.Join(filepath.Dir(softhsmConf), "tokens"), tokenTemplate)
}

// copyToken makes a SoftHSM2 configuration in dir whose token directory is
// a copy of the suite's token as setupToken left it (same label, PIN and
// KEK), and returns its path for the server's SOFTHSM2_CONF. Objects the
// server then creates or destroys are in its copy alone.
func copyToken(dir string) (string, error) {
	conf, err := softhsm.Configure(dir)
	if err != nil {
		return "", err
	}
	return conf, copyTree(tokenTemplate, filepath.Join(dir, "tokens"))
}

// copyTree copies the directory from, files and subdirectories, into to.
func copyTree(from, to string) error {
	return filepath.WalkDir(from, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(from, path)
		if err != nil {
			return err
		}
		target := filepath.Join(to, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o700)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(target, b, 0o600)
	})
}

// findRepoRoot walks up from the test's directory to the module root.
func findRepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the test directory")
		}
		dir = parent
	}
}

// buildPlugin builds the plugin from this tree, reporting the given version,
// into a directory of its own.
func buildPlugin(version string) (string, error) {
	out := filepath.Join(buildDir, version, pluginName)
	cmd := exec.Command("go", "build", "-trimpath",
		"-ldflags", "-X "+modulePath+".Version="+version,
		"-o", out, "./plugin")
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building plugin %s: %v\n%s", version, err, b)
	}
	return out, nil
}
