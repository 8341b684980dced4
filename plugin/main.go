// Command vault-plugin-secrets-hsm-transit serves the hsm-transit secrets
// engine to Vault as an external, multiplexed plugin.
package main

import (
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof" // served only when HSM_TRANSIT_PPROF_ADDR is set
	"os"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/sdk/plugin"

	hsmtransit "github.com/hsm-transit/vault-plugin-secrets-hsm-transit"
)

// pprofEnv names a loopback address (e.g. 127.0.0.1:6061) on which the
// plugin serves net/http/pprof, for profiling; unset, nothing is served.
const pprofEnv = "HSM_TRANSIT_PPROF_ADDR"

func main() {
	if addr := os.Getenv(pprofEnv); addr != "" {
		servePprof(addr)
	}
	meta := &api.PluginAPIClientMeta{}
	flags := meta.FlagSet()
	if err := flags.Parse(os.Args[1:]); err != nil {
		fatal(err)
	}
	err := plugin.ServeMultiplex(&plugin.ServeOpts{
		BackendFactoryFunc: hsmtransit.Factory,
		TLSProviderFunc:    api.VaultPluginTLSProvider(meta.GetTLSConfig()),
	})
	if err != nil {
		fatal(err)
	}
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
