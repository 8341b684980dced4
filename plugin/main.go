// Command vault-plugin-secrets-hsm-transit serves the hsm-transit secrets
// engine to Vault as an external, multiplexed plugin.
package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof" // served only when HSM_TRANSIT_PPROF_ADDR is set
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/api"

	hsmtransit "github.com/hsm-transit/vault-plugin-secrets-hsm-transit"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/boundary"
)

// pprofEnv names a loopback address (e.g. 127.0.0.1:6061) on which the
// plugin serves net/http/pprof, for profiling; unset, nothing is served.
const pprofEnv = "HSM_TRANSIT_PPROF_ADDR"

func main() {
	// Before anything else: the parent is read now, so that a Vault that
	// dies from here on is noticed.
	logger := hclog.New(&hclog.LoggerOptions{Level: hclog.Trace, Output: os.Stderr, JSONFormat: true})
	handleSignals(logger)
	hsmtransit.WatchHost(context.Background(), logger, os.Exit)

	if addr := os.Getenv(pprofEnv); addr != "" {
		servePprof(addr)
	}
	setGCPercent()
	meta := &api.PluginAPIClientMeta{}
	flags := meta.FlagSet()
	if err := flags.Parse(os.Args[1:]); err != nil {
		fatal(err)
	}
	if err := boundary.Serve(hsmtransit.Factory, logger, api.VaultPluginTLSProvider(meta.GetTLSConfig())); err != nil {
		fatal(err)
	}
	// Serve returns when Vault stopped the plugin (go-plugin's controller
	// Shutdown, sent by the client's Kill). Vault has normally cleaned up
	// every mount already; any it has not is cleaned up now.
	hsmtransit.ShutdownAll("the plugin server was stopped by Vault")
}

// defaultGCPercent is the garbage collector's target unless GOGC is set:
// batches allocate a request's items and answers and drop them at once, and
// at Go's default of 100 collecting and returning that memory took about a
// quarter of the plugin's CPU under batches of 1000 (pprof, BENCHMARKS.md).
// 200 lets the heap grow to three times what is live instead of twice.
const defaultGCPercent = 200

func setGCPercent() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(defaultGCPercent)
	}
}

// handleSignals decides what the signals that would end the process do.
//
// SIGPIPE: the logger writes to fd 2, a pipe that Vault reads. Once Vault is
// dead the pipe has no reader, and a Go program that has not called
// signal.Notify for SIGPIPE is killed by SIGPIPE when it writes to a broken
// pipe on fd 1 or 2 (os/signal, "SIGPIPE"): the first log line of the
// shutdown would kill the process before it wiped anything. With Notify,
// the signal goes to the channel (nobody reads it; the runtime drops what
// does not fit) and the write fails with EPIPE, which hclog ignores.
// signal.Ignore would do as much for this process, but SIG_IGN is inherited
// across exec by anything the process (or a PKCS#11 library) starts.
//
// SIGTERM and SIGHUP end a Go program at once by default; they now clean up
// every mount first (ShutdownAndExit), then exit 0. SIGINT is left to
// go-plugin, which ignores it on purpose: a Ctrl-C at Vault's terminal
// reaches the plugin too, and Vault itself then cleans up the mounts and
// stops the plugin. Vault's own way of stopping the plugin (the controller's
// Shutdown over gRPC, then SIGKILL after 2 s) is not a signal the process
// can act on, and does not need to be: Serve returns, see main.
func handleSignals(logger hclog.Logger) {
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		sig := <-stop
		hsmtransit.ShutdownAndExit(logger, "received "+sig.String(), 0, os.Exit)
	}()
}

// servePprof serves the profiling endpoints on a loopback address only.
func servePprof(addr string) {
	host, _, err := net.SplitHostPort(addr)
	if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
		fatal(fmt.Errorf("%s must be a loopback address, not %q", pprofEnv, addr))
	}
	go func() {
		if err := http.ListenAndServe(addr, nil); err != nil {
			hclog.New(&hclog.LoggerOptions{}).Error("pprof server stopped", "error", err)
		}
	}()
}

func fatal(err error) {
	hclog.New(&hclog.LoggerOptions{}).Error("plugin shutting down", "error", err)
	os.Exit(1)
}
