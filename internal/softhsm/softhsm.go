// Package softhsm sets up SoftHSM2 tokens for tests and development: a
// configuration file in a directory of the caller's, and initialised tokens.
package softhsm

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// Libraries are the places Debian and Ubuntu install SoftHSM2's module.
var Libraries = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
}

// FindLibrary returns the installed SoftHSM2 module.
func FindLibrary() (string, error) {
	for _, p := range Libraries {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("SoftHSM2 is not installed (apt-get install -y softhsm2)")
}

// Setup writes a configuration (Configure), points SOFTHSM2_CONF at it for
// this process and the processes it starts, and initialises one token per
// label with user PIN pin.
func Setup(dir, pin string, labels ...string) (conf string, err error) {
	if conf, err = Configure(dir); err != nil {
		return "", err
	}
	if err := os.Setenv("SOFTHSM2_CONF", conf); err != nil {
		return "", err
	}
	for _, label := range labels {
		if err := InitToken(conf, label, pin); err != nil {
			return "", err
		}
	}
	return conf, nil
}

// Configure writes dir/softhsm2.conf with tokens in dir/tokens and returns
// its path, for a process started with SOFTHSM2_CONF set to it.
func Configure(dir string) (string, error) {
	tokens := filepath.Join(dir, "tokens")
	if err := os.MkdirAll(tokens, 0o700); err != nil {
		return "", err
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	body := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens)
	return conf, os.WriteFile(conf, []byte(body), 0o600)
}

// TokenDir returns the directory SoftHSM2 keeps the labelled token in,
// under a configuration made by Configure.
func TokenDir(conf, label string) (string, error) {
	root := filepath.Join(filepath.Dir(conf), "tokens")
	entries, err := os.ReadDir(root)
	if err != nil {
		return "", err
	}
	// SoftHSM2 stores the label as a 32-byte, blank-padded attribute
	// value after its length: match it whole, not a label it contains.
	want := append([]byte{0, 0, 0, 0, 0, 0, 0, 32}, fmt.Sprintf("%-32s", label)...)
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(root, e.Name(), "token.object"))
		if err == nil && bytes.Contains(b, want) {
			return filepath.Join(root, e.Name()), nil
		}
	}
	return "", fmt.Errorf("no token labelled %q under %s", label, root)
}

// InitToken initialises a new token with the label in the configuration's
// token directory.
func InitToken(conf, label, pin string) error {
	cmd := exec.Command("softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", pin+"-so")
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("softhsm2-util --init-token %s: %v\n%s", label, err, out)
	}
	return nil
}
