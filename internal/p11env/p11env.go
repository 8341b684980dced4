// Package p11env gives tests PKCS#11 implementations other than a SoftHSM2
// token loaded directly (see internal/softhsm for that):
//
//   - OpenCryptoki: openCryptoki's soft token (slot 3 of the Debian
//     package's configuration), behind its slot daemon pkcsslotd.
//   - StartP11Kit: a p11-kit server exporting one token of a provider
//     module (SoftHSM2, say) on a unix socket, reached through p11-kit's
//     client module, as a stand-in for a network HSM whose server can be
//     killed, restarted, frozen and thawed.
//
// Each helper skips the test when its software is not installed, unless an
// environment variable demands it (then the test fails): see RequireEnv
// constants. Everything a helper starts is stopped by t.Cleanup.
//
// Debian packages: opencryptoki (3.8.1 on Debian 12), p11-kit and
// p11-kit-modules (0.24.1). .ci/run installs them.
package p11env

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Environment variables that turn a skip for missing software into a test
// failure, for CI machines that must run these tests.
const (
	RequireOpenCryptokiEnv = "HSM_TRANSIT_REQUIRE_OPENCRYPTOKI"
	RequireP11KitEnv       = "HSM_TRANSIT_REQUIRE_P11KIT"
)

// unavailable skips the test for missing software, or fails it when the
// environment variable env is set.
func unavailable(t testing.TB, env, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv(env) != "" {
		t.Fatalf("%s (and %s is set)", msg, env)
	}
	t.Skipf("%s (set %s to fail instead of skipping)", msg, env)
}

// ModuleDirs are the multiarch directories Debian installs PKCS#11 modules
// in, this machine's architecture first.
func ModuleDirs() []string {
	dirs := []string{"/usr/lib/x86_64-linux-gnu/pkcs11", "/usr/lib/aarch64-linux-gnu/pkcs11"}
	if runtime.GOARCH == "arm64" {
		dirs[0], dirs[1] = dirs[1], dirs[0]
	}
	return append(dirs, "/usr/lib/pkcs11")
}

// findModule returns the absolute path of the named module in ModuleDirs.
func findModule(name string) (string, error) {
	for _, d := range ModuleDirs() {
		p := filepath.Join(d, name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s is not in any of %s", name, strings.Join(ModuleDirs(), ", "))
}

// findProgram returns the path of an executable, looking in PATH and then
// in the system directories (a non-root PATH often lacks /usr/sbin).
func findProgram(name string) (string, error) {
	for _, d := range append(filepath.SplitList(os.Getenv("PATH")), "/usr/sbin", "/usr/bin", "/sbin", "/bin") {
		if d == "" {
			continue
		}
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s is not installed", name)
}

// groupAlive reports whether a process of process group pgid is still
// running: not gone and not a zombie. Children a server forked are
// reparented on its death to a process that may never reap them, so waiting
// on them is not possible; a zombie holds no socket or token, so it counts
// as gone.
func groupAlive(pgid int) bool {
	n, err := groupMembers(pgid)
	if err != nil {
		// No /proc: fall back to kill(0), which counts zombies.
		return syscall.Kill(-pgid, 0) == nil
	}
	return n > 0
}

// groupMembers counts the live (not zombie) processes of process group
// pgid, from /proc.
func groupMembers(pgid int) (int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...; comm may hold spaces and ')'.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 3 || f[0] == "Z" || f[0] == "X" {
			continue
		}
		if g, err := strconv.Atoi(f[2]); err == nil && g == pgid && pid > 0 {
			n++
		}
	}
	return n, nil
}

// waitGroupGone waits until no live process is left in process group pgid.
func waitGroupGone(pgid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for groupAlive(pgid) {
		if time.Now().After(deadline) {
			return fmt.Errorf("process group %d still has live processes after %v", pgid, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

// waitFor polls cond every 10 ms until it returns true, fails with an error
// (returned), or timeout passes.
func waitFor(timeout time.Duration, what string, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("timed out waiting for " + what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
