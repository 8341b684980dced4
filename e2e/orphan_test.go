//go:build linux

package e2e

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// orphanPRSetChildSubreaper is prctl's PR_SET_CHILD_SUBREAPER (linux/prctl.h).
const orphanPRSetChildSubreaper = 36

// TestOrphanedPluginExits: when Vault dies by SIGKILL, its plugin process
// (re-parented, still holding the mount's unsealed root keyring and a
// logged-in HSM session) notices that it lost its host, cleans up every
// mount and exits by itself within seconds, with status 1.
//
// "stderr broken" is the real case: the plugin's stderr is a pipe only the
// dead Vault read, so its shutdown logs to a broken pipe; it must not die of
// SIGPIPE there (before wiping anything) nor block. "stderr read" keeps a
// reader on that pipe (the test opens the plugin's fd 2 before killing
// Vault) to see what the plugin did: it logs losing its host and cleaning up
// the mount.
//
// The test process makes itself a child subreaper meanwhile, so that the
// orphaned plugin is re-parented to it (rather than to init) and its exit
// status can be read. The test is not parallel: no other test's processes
// can be orphaned to it meanwhile.
func TestOrphanedPluginExits(t *testing.T) {
	t.Run("stderr broken", func(t *testing.T) {
		out := orphanPlugin(t, false)
		require.Empty(t, out)
	})
	t.Run("stderr read", func(t *testing.T) {
		out := orphanPlugin(t, true)
		t.Logf("the plugin's log after Vault's death:\n%s", out)
		require.Contains(t, out, "lost the host process (Vault): the plugin's parent changed")
		require.Contains(t, out, "shutting down: dropping the mount's root key, cached keys and HSM session",
			"the mount was cleaned up (is the backend registered in Factory?)")
		require.NotContains(t, out, "did not finish in time")
	})
}

// orphanPlugin starts Vault with an unsealed plugin mount in use, SIGKILLs
// Vault alone and requires every plugin process to exit with status 1
// within 5 s. With readStderr, it returns what the plugin wrote to stderr
// from just before the kill.
func orphanPlugin(t *testing.T, readStderr bool) string {
	v := startVault(t, serverOptions{})
	v.mountPlugin("hsm")
	c := v.client.Logical()
	_, err := c.Write("hsm/keys/k", nil)
	require.NoError(t, err)
	sec, err := c.Write("hsm/encrypt/k", map[string]interface{}{"plaintext": b64("held in the plugin")})
	require.NoError(t, err)
	sec, err = c.Write("hsm/decrypt/k", map[string]interface{}{"ciphertext": sec.Data["ciphertext"]})
	require.NoError(t, err)
	require.Equal(t, "held in the plugin", unb64(t, sec.Data["plaintext"].(string)))
	st, err := c.Read("hsm/seal/status")
	require.NoError(t, err)
	require.Equal(t, false, st.Data["sealed"], "the mount is unsealed: %v", st.Data)

	pids := attackPluginPIDs(t, v)
	require.NotEmpty(t, pids, "the plugin runs")
	vaultPID := v.pid()

	orphanSubreaper(t, true)
	t.Cleanup(func() {
		// A plugin that outlived the test (reported by it) is ended here,
		// and reaped when it is the test's child.
		for _, pid := range pids {
			exe, _ := os.Readlink(filepath.Join("/proc", fmt.Sprint(pid), "exe"))
			if orphanAlive(pid) && strings.HasPrefix(filepath.Base(exe), pluginName) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			if orphanParent(pid) == os.Getpid() {
				var ws syscall.WaitStatus
				_, _ = syscall.Wait4(pid, &ws, 0, nil)
			}
		}
		orphanSubreaper(t, false)
	})

	var stderr bytes.Buffer
	copied := make(chan struct{})
	if readStderr {
		// One more reader of the pipe Vault reads the plugin's stderr
		// from; it reaches EOF when the plugin exits.
		require.Len(t, pids, 1)
		f, err := os.Open(filepath.Join("/proc", fmt.Sprint(pids[0]), "fd", "2"))
		require.NoError(t, err)
		go func() {
			defer close(copied)
			defer f.Close()
			_, _ = io.Copy(&stderr, f)
		}()
	} else {
		close(copied)
	}

	// SIGKILL Vault alone, not its process group: the plugin is orphaned.
	require.NoError(t, syscall.Kill(vaultPID, syscall.SIGKILL))
	killed := time.Now()
	// Left unreaped: vaultServer.stop reaps it, after ending whatever is
	// still in its process group.
	<-v.srv.Process().Exited()
	t.Logf("SIGKILLed Vault (PID %d); plugin process(es) %v", vaultPID, pids)

	const limit = 5 * time.Second
	deadline := killed.Add(limit)
	var slowest time.Duration
	for _, pid := range pids {
		for orphanAlive(pid) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		took := time.Since(killed)
		require.Falsef(t, orphanAlive(pid), "plugin process %d still running %v after Vault was killed (parent now %d)",
			pid, limit, orphanParent(pid))
		slowest = max(slowest, took)

		// A zombie leader of a multithreaded process is reaped only once
		// its other threads are gone too: poll.
		var ws syscall.WaitStatus
		wpid, err := syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		for err == nil && wpid == 0 && time.Now().Before(deadline.Add(time.Second)) {
			time.Sleep(5 * time.Millisecond)
			wpid, err = syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		}
		switch {
		case err == nil && wpid == pid:
			t.Logf("plugin process %d exited %v after Vault's SIGKILL: %s", pid, took.Round(time.Millisecond), orphanWaitStatus(ws))
			require.Truef(t, ws.Exited() && ws.ExitStatus() == 1,
				"the plugin must exit through its shutdown (status 1), not %s", orphanWaitStatus(ws))
		default:
			// Re-parented elsewhere (a subreaper above the test): gone is
			// all that can be told.
			t.Logf("plugin process %d gone %v after Vault's SIGKILL (not reaped here: %v)", pid, took.Round(time.Millisecond), err)
		}
	}
	t.Logf("every plugin process was gone %v after Vault's SIGKILL", slowest.Round(time.Millisecond))
	select {
	case <-copied:
	case <-time.After(5 * time.Second):
		t.Fatal("the plugin's stderr did not close")
	}
	return stderr.String()
}

// orphanSubreaper makes the test process a child subreaper, or not.
func orphanSubreaper(t *testing.T, on bool) {
	t.Helper()
	arg := uintptr(0)
	if on {
		arg = 1
	}
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, orphanPRSetChildSubreaper, arg, 0); errno != 0 {
		t.Fatalf("prctl(PR_SET_CHILD_SUBREAPER, %d): %v", arg, errno)
	}
}

// orphanAlive reports whether pid is a running process: neither gone nor a
// zombie (exited, not reaped yet).
func orphanAlive(pid int) bool {
	state, _ := orphanProcStat(pid)
	return state != "" && state != "Z" && state != "X"
}

// orphanParent returns pid's parent, 0 when unknown.
func orphanParent(pid int) int {
	_, ppid := orphanProcStat(pid)
	return ppid
}

// orphanProcStat reads a process's state and parent from /proc/<pid>/stat.
func orphanProcStat(pid int) (state string, ppid int) {
	stat, err := os.ReadFile(filepath.Join("/proc", fmt.Sprint(pid), "stat"))
	if err != nil {
		return "", 0
	}
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return "", 0
	}
	fields := strings.Fields(string(stat[i+1:]))
	if len(fields) < 2 {
		return "", 0
	}
	_, _ = fmt.Sscan(fields[1], &ppid)
	return fields[0], ppid
}

func orphanWaitStatus(ws syscall.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("exit status %d", ws.ExitStatus())
	case ws.Signaled():
		return fmt.Sprintf("killed by %v", ws.Signal())
	}
	return fmt.Sprintf("wait status %#x", uint32(ws))
}
