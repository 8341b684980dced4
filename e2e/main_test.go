// Package e2e runs the plugin inside real Vault servers, through the clients
// its users have: the vault CLI, the Go API client and Vault Agent.
package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

const (
	pluginName    = "vault-plugin-secrets-hsm-transit"
	pluginVersion = "v0.1.0"
	modulePath    = "github.com/hsm-transit/vault-plugin-secrets-hsm-transit"
)

var (
	repoRoot  string
	vaultBin  string
	pluginBin string // the plugin at pluginVersion, built from this tree
	buildDir  string
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
	return m.Run()
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
