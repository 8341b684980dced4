// Package vaultproc starts Vault servers on loopback for the end-to-end
// tests and the load tool: free ports that are never handed out twice, a
// server process in a process group of its own (its plugin processes join
// it), waiting until it answers, stopping it and its plugins for sure, and
// registering plugin binaries. It reports through errors and an optional
// log function, never through package testing: the load tool is a normal
// binary.
package vaultproc

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// StopGrace is how long Stop waits after SIGTERM before it sends SIGKILL.
const StopGrace = 15 * time.Second

// Command is a Vault process to start.
type Command struct {
	// Vault is the vault binary.
	Vault string
	// Args are its arguments, such as "server", "-config", path.
	Args []string
	// Env is added to this process's environment (later entries win).
	Env []string
	// LogPath is the file Vault's output is appended to.
	LogPath string
	// Banner, when not empty, is written to the log before Vault starts,
	// so that one start's lines can be told from another's.
	Banner string
}

// Process is a Vault process, the leader of a process group of its own.
// It is reaped once, by Wait (which Stop and Kill call): until then, even
// after it exited, its PID and so its process group ID cannot be reused,
// and signalling the group reaches only its own plugin processes.
type Process struct {
	cmd *exec.Cmd
	log *os.File
	// exited is closed when the process has exited, watched without
	// reaping it (waitExit).
	exited   chan struct{}
	reapOnce sync.Once
	reaped   chan struct{}
	waitErr  error
}

// Start launches the command in a process group of its own.
func Start(c Command) (*Process, error) {
	log, err := os.OpenFile(c.LogPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	if c.Banner != "" {
		fmt.Fprintln(log, c.Banner)
	}
	cmd := exec.Command(c.Vault, c.Args...)
	cmd.Env = append(os.Environ(), c.Env...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		log.Close()
		return nil, fmt.Errorf("starting %s: %w", c.Vault, err)
	}
	p := &Process{cmd: cmd, log: log, exited: make(chan struct{}), reaped: make(chan struct{})}
	go func(pid int) {
		defer close(p.exited)
		waitExit(pid)
	}(cmd.Process.Pid)
	return p, nil
}

// Pid is Vault's process ID, which is also its process group's.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Exited is closed once the process has exited (reaped or not).
func (p *Process) Exited() <-chan struct{} { return p.exited }

// Running reports whether the process has not exited.
func (p *Process) Running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// Reaped reports whether Wait has collected the process.
func (p *Process) Reaped() bool {
	select {
	case <-p.reaped:
		return true
	default:
		return false
	}
}

// State is the exit state, nil until the process was reaped.
func (p *Process) State() *os.ProcessState {
	if !p.Reaped() {
		return nil
	}
	return p.cmd.ProcessState
}

// Wait waits for the process to exit and reaps it, once: later and
// concurrent calls return the same result. It closes the log.
func (p *Process) Wait() error {
	p.reapOnce.Do(func() {
		p.waitErr = p.cmd.Wait()
		_ = p.log.Close()
		close(p.reaped)
	})
	return p.waitErr
}

// Stop ends the process group (Vault and the plugin processes it started):
// SIGTERM, then SIGKILL once Vault has exited or after grace, and reaps
// Vault. A process already reaped is left alone: its group ID may since
// belong to another process group.
func (p *Process) Stop(grace time.Duration) {
	if p.Reaped() {
		return
	}
	pgid := p.Pid()
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(grace):
	}
	// Plugins that outlived Vault (a crash, or a slow exit) end here.
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	<-p.exited
	_ = p.Wait()
}

// Kill ends the process group with SIGKILL and reaps Vault.
func (p *Process) Kill() {
	if p.Reaped() {
		return
	}
	_ = syscall.Kill(-p.Pid(), syscall.SIGKILL)
	<-p.exited
	_ = p.Wait()
}

// Crash ends Vault alone with SIGKILL, as a crash would, and waits until it
// has exited; its plugin processes are left to themselves. It is not
// reaped: a later Stop still reaches the plugins that outlived it.
func (p *Process) Crash() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

// upTimeout bounds how long WaitUp waits for a server to answer.
const upTimeout = 60 * time.Second

// WaitUp waits until the server at addr (http://127.0.0.1:port) answers
// sys/health, whether uninitialised, sealed, standby or active, and fails
// at once when the process exits first.
func (p *Process) WaitUp(addr string) error {
	deadline := time.After(upTimeout)
	// Each probe is bounded, so that a listener that accepts and never
	// answers does not hold WaitUp past its deadline.
	probe := &http.Client{Timeout: 2 * time.Second}
	for {
		resp, err := probe.Get(addr + "/v1/sys/health?uninitcode=200&sealedcode=200&standbyok=true")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		select {
		case <-p.exited:
			return fmt.Errorf("vault exited during start-up at %s", addr)
		case <-deadline:
			return fmt.Errorf("vault did not come up at %s within %v", addr, upTimeout)
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
