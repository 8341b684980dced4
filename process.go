package hsmtransit

import (
	"context"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// The plugin process outlives Vault when Vault dies without stopping it
// (SIGKILL, a crash, the OOM killer): the process is re-parented, keeps its
// gRPC listener open and, with it, every mount's unsealed root keyring and
// its logged-in HSM session. Nothing in go-plugin ends it: its Serve returns
// only when the host asks it to stop (the controller's Shutdown, over the
// connection that is gone), it does not watch stdin (the host hands the
// plugin its own stdin, often /dev/null) and it never looks at its parent.
// So the process watches its parent itself, and on losing it cleans up
// every mount it serves and exits.

const (
	// shutdownTimeout bounds ShutdownAll: a hung HSM must not keep the
	// process, and the key material in it, alive.
	shutdownTimeout = 3 * time.Second
	// hostPollInterval is how often WatchHost looks at the parent.
	hostPollInterval = 500 * time.Millisecond
	// logWait bounds how long the shutdown path waits for a log line once
	// the work it reports on is done (stderr may be a pipe nobody reads).
	logWait = 100 * time.Millisecond
)

// backendRegistry is the set of the process's live backends, one per mount.
type backendRegistry struct {
	mu sync.Mutex
	m  map[*backend]struct{}
}

// liveBackends holds every backend Factory returned and Clean did not end.
var liveBackends = &backendRegistry{m: make(map[*backend]struct{})}

// registerBackend records a new mount's backend (from Factory).
func registerBackend(b *backend) { liveBackends.add(b) }

// unregisterBackend forgets a backend once cleaned (from clean).
func unregisterBackend(b *backend) { liveBackends.remove(b) }

func (r *backendRegistry) add(b *backend) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.m[b] = struct{}{}
}

func (r *backendRegistry) remove(b *backend) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.m, b)
}

// list returns the registered backends. The registry is not locked while
// they are cleaned: clean unregisters its backend.
func (r *backendRegistry) list() []*backend {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*backend, 0, len(r.m))
	for b := range r.m {
		out = append(out, b)
	}
	return out
}

// ShutdownAll cleans up every mount of the process, as Vault's Cleanup
// would, before the process exits: each mount's root keyring is wiped and
// forgotten, its HSM session closed (logged out) and its cached keys
// dropped. The mounts are cleaned concurrently and ShutdownAll returns
// after at most about 3 s even if some cannot finish (a hung HSM): the
// caller exits then, which ends what is left. Each mount logs why.
func ShutdownAll(reason string) {
	liveBackends.shutdownAll(reason, shutdownTimeout)
}

// shutdownAll cleans every registered backend within timeout and returns
// how many did not finish in time.
func (r *backendRegistry) shutdownAll(reason string, timeout time.Duration) int {
	backends := r.list()
	if len(backends) == 0 {
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	done := make([]chan struct{}, len(backends))
	for i, b := range backends {
		done[i] = make(chan struct{})
		go func() {
			defer close(done[i])
			logged := logAsync(func() {
				b.Logger().Warn("shutting down: dropping the mount's root key, cached keys and HSM session", "mount_uuid", b.seal.MountID(), "reason", reason)
			})
			shutdownBackend(ctx, b)
			<-logged
		}()
	}
	var late []*backend
	for i, b := range backends {
		select {
		case <-done[i]:
		case <-ctx.Done():
		}
		select {
		case <-done[i]:
		default:
			late = append(late, b)
		}
	}
	if len(late) > 0 {
		waitLog(logAsync(func() {
			for _, b := range late {
				b.Logger().Error("the mount's cleanup did not finish in time; the process exits anyway", "mount_uuid", b.seal.MountID(), "timeout", timeout.String())
			}
		}))
	}
	return len(late)
}

// shutdownBackend runs the backend's cleanup and wipes the root keyring it
// held. clean forgets the keyring but does not overwrite it; once clean has
// returned, no transition of the seal refers to it any more (they read the
// state under the seal's lock, which clean reset), so overwriting it cannot
// reach storage, whereas a request still using the keyring's AEADs is not
// affected (they keep their own expanded keys, freed with the process).
func shutdownBackend(ctx context.Context, b *backend) {
	var ring *seal.Keyring
	if sealer := b.seal.Snapshot().Sealer(); sealer != nil {
		ring = sealer.Keyring()
	}
	b.clean(ctx)
	if ring != nil {
		ring.Wipe()
	}
}

// logAsync runs a logging call in a goroutine and returns a channel closed
// when it returns: a write to stderr that blocks (a pipe whose reader is
// alive but not reading) must not hold the shutdown. A write to a pipe
// whose reader is gone fails with EPIPE, which hclog ignores, provided the
// process does not die of SIGPIPE first: see the plugin's main.
func logAsync(f func()) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	return done
}

// waitLog waits for a logAsync call, at most logWait.
func waitLog(done <-chan struct{}) {
	t := time.NewTimer(logWait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
}

// exitMu makes the shutdown-then-exit path run once at a time (the host
// watch and a signal may race): the second caller finds nothing left to
// clean and exits too.
var exitMu sync.Mutex

// ShutdownAndExit logs why, runs ShutdownAll, then calls exit with code. It
// is the single path by which the process ends itself: on losing its host
// and on SIGTERM or SIGHUP.
func ShutdownAndExit(logger hclog.Logger, reason string, code int, exit func(code int)) {
	exitMu.Lock()
	defer exitMu.Unlock()
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	logged := logAsync(func() {
		logger.Warn("plugin process exiting: cleaning up every mount", "reason", reason)
	})
	ShutdownAll(reason)
	waitLog(logged)
	exit(code)
}

// WatchHost watches for the loss of the host (Vault): the process's parent
// changes when the parent dies, as the kernel re-parents the process to
// init or to the nearest subreaper. It reads the parent now, then polls it
// every 500 ms in the background until ctx ends; on a change it logs, runs
// ShutdownAll and calls exit(1) (ShutdownAndExit). Call it early in main, before serving.
//
// A parent that is already init (PID 1) at start tells nothing: either the
// plugin was orphaned before it looked, or the host is the PID 1 of a
// container, whose death ends every process of the namespace anyway.
//
// Linux's prctl(PR_SET_PDEATHSIG) is deliberately not used: it signals the
// child when the parent *thread* that forked it exits, not the parent
// process. Vault is a Go program; os/exec forks from whichever OS thread
// the goroutine runs on, and the Go runtime ends threads (a goroutine that
// exits while locked to its thread takes the thread with it), so the
// plugin would be killed while Vault is alive. It would also have to be set
// in the child after the fork, which races with the parent dying first.
func WatchHost(ctx context.Context, logger hclog.Logger, exit func(code int)) {
	w := &hostWatch{
		interval: hostPollInterval,
		getppid:  os.Getppid,
		lost: func(reason string) {
			ShutdownAndExit(logger, reason, 1, exit)
		},
	}
	w.start(ctx)
}

// hostWatch is WatchHost with what the tests replace: the poll interval,
// the source of the parent's PID and what is done on losing the host.
type hostWatch struct {
	interval time.Duration
	getppid  func() int
	lost     func(reason string)
}

// start reads the parent's PID now and polls in a goroutine; the returned
// channel is closed when the watch ends (ctx done, or the host lost and
// handled).
func (w *hostWatch) start(ctx context.Context) <-chan struct{} {
	initial := w.getppid()
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(w.interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if now := w.getppid(); now != initial {
				w.lost(fmt.Sprintf("lost the host process (Vault): the plugin's parent changed from PID %d to %d", initial, now))
				return
			}
		}
	}()
	return done
}
