// Command vault-plugin-secrets-hsm-transit serves the hsm-transit secrets
// engine to Vault as an external, multiplexed plugin.
package main

import (
	"fmt"
	"math"
	"net"
	"net/http"
	_ "net/http/pprof" // served only when HSM_TRANSIT_PPROF_ADDR is set
	"os"

	"github.com/hashicorp/go-hclog"
	goplugin "github.com/hashicorp/go-plugin"
	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/sdk/helper/pluginutil"
	"github.com/hashicorp/vault/sdk/plugin"
	"google.golang.org/grpc"

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
	if err := serve(api.VaultPluginTLSProvider(meta.GetTLSConfig())); err != nil {
		fatal(err)
	}
}

// serve does what the SDK's plugin.ServeMultiplex does, as of
// github.com/hashicorp/vault/sdk v0.20.0 (the same protocol versions,
// multiplexing, logger, message size limits, mlock and handshake): check it
// against sdk/plugin/serve.go when the SDK is upgraded. It adds
// hsmtransit.GRPCUnaryInterceptor to the gRPC server, which ServeMultiplex
// has no option for.
func serve(tlsProvider plugin.TLSProviderFunc) error {
	logger := hclog.New(&hclog.LoggerOptions{Level: hclog.Trace, Output: os.Stderr, JSONFormat: true})
	backend := func(multiplex bool) goplugin.PluginSet {
		return goplugin.PluginSet{plugin.BackendPluginName: &plugin.GRPCBackendPlugin{
			Factory:             hsmtransit.Factory,
			MultiplexingSupport: multiplex,
			Logger:              logger,
		}}
	}
	if err := pluginutil.OptionallyEnableMlock(); err != nil {
		return err
	}
	goplugin.Serve(&goplugin.ServeConfig{
		HandshakeConfig: plugin.HandshakeConfig,
		// Versions 3 and 4 serve Vaults older than multiplexing (they
		// need TLSProvider); Vault 1.12 and later speak version 5.
		VersionedPlugins: map[int]goplugin.PluginSet{3: backend(false), 4: backend(false), 5: backend(true)},
		Logger:           logger,
		TLSProvider:      tlsProvider,
		GRPCServer: func(opts []grpc.ServerOption) *grpc.Server {
			opts = append(opts,
				grpc.MaxRecvMsgSize(math.MaxInt32),
				grpc.MaxSendMsgSize(math.MaxInt32),
				grpc.ChainUnaryInterceptor(hsmtransit.GRPCUnaryInterceptor))
			return goplugin.DefaultGRPCServer(opts)
		},
	})
	return nil
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
