package p11env

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Fixed paths of the Debian opencryptoki package (3.8.1). The store and the
// daemon's socket are system-wide, which is why OpenCryptoki serialises its
// users with OCKLockFile.
const (
	ockConfig     = "/etc/opencryptoki/opencryptoki.conf"
	ockTmpfiles   = "/usr/lib/tmpfiles.d/opencryptoki.conf"
	ockSWTokDir   = "/var/lib/opencryptoki/swtok"
	ockSWTokShm   = "/dev/shm/var.lib.opencryptoki.swtok"
	ockSlotdPID   = "/run/pkcsslotd.pid"
	ockGroup      = "pkcs11"
	ockDefaultSO  = "87654321"
	ockSoftSTDLL  = "libpkcs11_sw.so"
	ockLibrary    = "libopencryptoki.so"
	ockStartLimit = 15 * time.Second
)

// OCKLockFile is the file OpenCryptoki holds an exclusive flock(2) on from
// the start of a test to the end of its cleanup, so that tests in parallel
// processes (go test runs packages in parallel) and in parallel goroutines
// take turns with the one system-wide soft token.
const OCKLockFile = "/tmp/hsm-transit-p11env-opencryptoki.lock"

// OCKSOPIN is the SO PIN OpenCryptoki gives the token.
const OCKSOPIN = "13572468"

// OCK is an initialised openCryptoki soft token, served by a pkcsslotd that
// runs until the test's cleanup.
type OCK struct {
	// Library is the absolute path of the PKCS#11 module to load
	// (…/pkcs11/libopencryptoki.so in the multiarch library directory; a
	// symlink to the versioned library).
	Library string
	// Slot is the soft token's slot ID (3 in the package's configuration).
	Slot uint
	// Label is the token label; PIN the user PIN; SOPIN the SO PIN.
	Label, PIN, SOPIN string
}

// OpenCryptoki gives the test a freshly initialised openCryptoki soft token
// labelled label with user PIN pin (4 to 8 characters, the soft token's
// limits), and returns how to reach it.
//
// It skips the test (t.Skip) when openCryptoki is not installed (the
// library, pkcsslotd or pkcsconf is missing), or fails it instead when
// HSM_TRANSIT_REQUIRE_OPENCRYPTOKI is set. It must run as root: it writes
// the system-wide store and runs the slot daemon.
//
// Then it:
//   - takes an exclusive flock on OCKLockFile (blocking until whoever holds
//     it finishes), released in t.Cleanup: one test at a time, in any
//     process, owns openCryptoki. A test must not call OpenCryptoki twice
//     (the second call would wait for the first's cleanup forever);
//   - creates the pkcs11 group if missing and the directories of the
//     package's tmpfiles.d entry (systemd-tmpfiles --create, or the same
//     done here if systemd-tmpfiles is absent);
//   - fails if a pkcsslotd it did not start is running (a system service
//     would share the store);
//   - resets the soft token: deletes everything under
//     /var/lib/opencryptoki/swtok (destroying any real token kept there)
//     and its shared-memory file;
//   - starts `pkcsslotd -f` as a child process (without the daemon,
//     C_Initialize fails with CKR_HOST_MEMORY), stopped with SIGTERM in
//     t.Cleanup and waited for; it also gets SIGTERM if the test process
//     dies;
//   - initialises the token with pkcsconf: -I (label), -P (SO PIN OCKSOPIN),
//     -u (user PIN).
//
// The daemon stays up until the test's cleanup, so a subprocess (a Vault
// server loading Library) can use the token for the whole test; stop such
// processes, and C_Finalize in-process users, in cleanups registered after
// this call (they run first).
func OpenCryptoki(t testing.TB, label, pin string) *OCK {
	t.Helper()
	lib, err := findModule(ockLibrary)
	if err != nil {
		unavailable(t, RequireOpenCryptokiEnv, "openCryptoki is not installed (apt-get install opencryptoki): %v", err)
	}
	slotd, err := findProgram("pkcsslotd")
	if err != nil {
		unavailable(t, RequireOpenCryptokiEnv, "openCryptoki is not installed (apt-get install opencryptoki): %v", err)
	}
	pkcsconf, err := findProgram("pkcsconf")
	if err != nil {
		unavailable(t, RequireOpenCryptokiEnv, "openCryptoki is not installed (apt-get install opencryptoki): %v", err)
	}
	if n := len(pin); n < 4 || n > 8 {
		t.Fatalf("p11env: openCryptoki soft token PINs have 4 to 8 characters, not %d", n)
	}
	if len(label) == 0 || len(label) > 32 || strings.ContainsAny(label, "\n\r") {
		t.Fatalf("p11env: token label %q must be 1 to 32 bytes on one line", label)
	}
	slot, err := ockSoftSlot(ockConfig)
	if err != nil {
		t.Fatalf("p11env: %v", err)
	}

	waitStart := time.Now()
	lock, err := lockFile(OCKLockFile)
	if err != nil {
		t.Fatalf("p11env: %v", err)
	}
	t.Logf("p11env: took the openCryptoki lock %s after waiting %v", OCKLockFile, time.Since(waitStart).Round(time.Millisecond))
	t.Cleanup(func() { lock.Close() }) // runs last: closing releases the flock

	if err := ockPrepareSystem(); err != nil {
		t.Fatalf("p11env: preparing openCryptoki: %v", err)
	}
	if pid, ok := foreignSlotd(); ok {
		t.Fatalf("p11env: a pkcsslotd this package did not start is running (pid %d); stop it (systemctl stop pkcsslotd) before running these tests", pid)
	}
	if err := ockResetStore(); err != nil {
		t.Fatalf("p11env: resetting the openCryptoki soft token: %v", err)
	}

	d, err := startSlotd(slotd)
	if err != nil {
		t.Fatalf("p11env: %v", err)
	}
	t.Cleanup(func() {
		if err := d.stop(); err != nil {
			t.Errorf("p11env: stopping pkcsslotd: %v", err)
		}
	})
	// Ready once a client can read the token's info through the daemon.
	slotArg := strconv.FormatUint(uint64(slot), 10)
	var lastOut []byte
	err = waitFor(ockStartLimit, "pkcsslotd to serve slot "+slotArg, func() (bool, error) {
		if d.exited() {
			return false, fmt.Errorf("pkcsslotd exited: %s", d.out.String())
		}
		lastOut, err = exec.Command(pkcsconf, "-c", slotArg, "-t").CombinedOutput()
		return err == nil, nil
	})
	if err != nil {
		t.Fatalf("p11env: %v; pkcsconf -t said: %s", err, lastOut)
	}

	steps := []struct {
		stdin string
		args  []string
	}{
		{label + "\n", []string{"-c", slotArg, "-I", "-S", ockDefaultSO}},
		{"", []string{"-c", slotArg, "-P", "-S", ockDefaultSO, "-n", OCKSOPIN}},
		{"", []string{"-c", slotArg, "-u", "-S", OCKSOPIN, "-n", pin}},
	}
	for _, s := range steps {
		cmd := exec.Command(pkcsconf, s.args...)
		cmd.Stdin = strings.NewReader(s.stdin)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("p11env: pkcsconf %s: %v\n%s", strings.Join(s.args, " "), err, out)
		}
	}
	return &OCK{Library: lib, Slot: slot, Label: label, PIN: pin, SOPIN: OCKSOPIN}
}

// lockFile opens path and takes an exclusive flock on it, waiting as long
// as it takes. Closing the file releases the lock, as does the process's
// death.
func lockFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o666)
	if err != nil {
		return nil, fmt.Errorf("opening lock file: %w", err)
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("flock %s: %w", path, err)
	}
	return f, nil
}

var slotLine = regexp.MustCompile(`^\s*slot\s+(\d+)`)

// ockSoftSlot returns the slot the configuration gives the soft token.
func ockSoftSlot(conf string) (uint, error) {
	f, err := os.Open(conf)
	if err != nil {
		return 0, fmt.Errorf("reading openCryptoki's configuration: %w", err)
	}
	defer f.Close()
	slot := -1
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if m := slotLine.FindStringSubmatch(line); m != nil {
			slot, _ = strconv.Atoi(m[1])
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok && strings.TrimSpace(k) == "stdll" && strings.TrimSpace(v) == ockSoftSTDLL && slot >= 0 {
			return uint(slot), nil
		}
	}
	return 0, fmt.Errorf("%s gives no slot to %s", conf, ockSoftSTDLL)
}

// ockPrepareSystem does what the package's maintainer scripts and boot do:
// the pkcs11 group, and the directories of its tmpfiles.d entry (those under
// /run vanish at reboot).
func ockPrepareSystem() error {
	if _, err := user.LookupGroup(ockGroup); err != nil {
		if out, err := exec.Command("groupadd", "--system", ockGroup).CombinedOutput(); err != nil {
			// Another process may have just made it.
			if _, err2 := user.LookupGroup(ockGroup); err2 != nil {
				return fmt.Errorf("groupadd --system %s: %v: %s", ockGroup, err, out)
			}
		}
	}
	if tmpfiles, err := findProgram("systemd-tmpfiles"); err == nil {
		if out, err := exec.Command(tmpfiles, "--create", ockTmpfiles).CombinedOutput(); err != nil {
			return fmt.Errorf("systemd-tmpfiles --create %s: %v: %s", ockTmpfiles, err, out)
		}
		return nil
	}
	return createTmpfilesDirs(ockTmpfiles)
}

// createTmpfilesDirs creates the "d" entries of a tmpfiles.d file, for
// machines without systemd-tmpfiles.
func createTmpfilesDirs(conf string) error {
	b, err := os.ReadFile(conf)
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || f[0] != "d" {
			continue
		}
		mode, err := strconv.ParseUint(f[2], 8, 32)
		if err != nil {
			return fmt.Errorf("%s: bad mode in %q", conf, line)
		}
		if err := ensureDir(f[1], os.FileMode(mode), f[3], f[4]); err != nil {
			return err
		}
	}
	return nil
}

// ensureDir makes dir (and parents) with the mode and owners.
func ensureDir(dir string, mode os.FileMode, owner, group string) error {
	if err := os.MkdirAll(dir, mode); err != nil {
		return err
	}
	uid, gid := -1, -1
	if u, err := user.Lookup(owner); err == nil {
		uid, _ = strconv.Atoi(u.Uid)
	}
	if g, err := user.LookupGroup(group); err == nil {
		gid, _ = strconv.Atoi(g.Gid)
	}
	if err := os.Chown(dir, uid, gid); err != nil {
		return err
	}
	return os.Chmod(dir, mode)
}

// foreignSlotd returns the pid of a running pkcsslotd named by the daemon's
// pid file. Called with the lock held, any such daemon is not one of this
// package's (those are stopped before the lock is released, and get SIGTERM
// when their test process dies).
func foreignSlotd() (int, bool) {
	b, err := os.ReadFile(ockSlotdPID)
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, false
	}
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil || strings.TrimSpace(string(comm)) != "pkcsslotd" {
		return 0, false // a stale pid file
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err == nil {
		if i := bytes.LastIndexByte(stat, ')'); i >= 0 {
			if f := strings.Fields(string(stat[i+1:])); len(f) > 0 && f[0] == "Z" {
				return 0, false
			}
		}
	}
	return pid, true
}

// ockResetStore empties the soft token's store, leaving the directory
// layout the package installs, and removes the token's shared memory, so
// that the next pkcsconf -I starts from a token with the default SO PIN.
func ockResetStore() error {
	entries, err := os.ReadDir(ockSWTokDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(ockSWTokDir, e.Name())); err != nil {
			return err
		}
	}
	if err := ensureDir(ockSWTokDir, 0o770, "root", ockGroup); err != nil {
		return err
	}
	if err := ensureDir(filepath.Join(ockSWTokDir, "TOK_OBJ"), 0o770, "root", ockGroup); err != nil {
		return err
	}
	if err := os.Remove(ockSWTokShm); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// slotd is a running pkcsslotd -f.
type slotd struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
	err  error // of Wait, set before done is closed
}

func startSlotd(path string) (*slotd, error) {
	d := &slotd{out: &syncBuffer{}, done: make(chan struct{})}
	d.cmd = exec.Command(path, "-f")
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := d.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting pkcsslotd: %w", err)
	}
	go func() {
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	return d, nil
}

func (d *slotd) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM (the daemon then removes its shared memory and
// socket) and waits; SIGKILL after 10 s.
func (d *slotd) stop() error {
	if d.exited() {
		return fmt.Errorf("pkcsslotd had already exited (%v): %s", d.err, d.out.String())
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		return nil
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
		return fmt.Errorf("pkcsslotd ignored SIGTERM for 10 s; killed")
	}
}

// syncBuffer collects a process's output for error messages.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
