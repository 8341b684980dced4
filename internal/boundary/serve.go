package boundary

import (
	"math"
	"runtime"

	"github.com/hashicorp/go-hclog"
	goplugin "github.com/hashicorp/go-plugin"
	"github.com/hashicorp/vault/sdk/helper/pluginutil"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/experimental"
)

// sdkChecked is the SDK version whose plugin.ServeMultiplex Serve follows,
// and serveSHA256 the SHA-256 of that version's plugin/serve.go: see the
// package doc for what to re-check when either changes.
const (
	sdkChecked  = "v0.20.0"
	serveSHA256 = "f69219a95e5b9a20774b6e000d063102f53209d3b706695e646767391c37757b"
)

// The gRPC server's flow-control windows and I/O buffers (see Serve).
const (
	streamWindow = 1 << 20
	connWindow   = 4 << 20
	ioBuffer     = 256 << 10
)

// streamWorkers is how many calls run on long-lived goroutines at once:
// Vault sends a plugin as many calls at once as it has requests for it (and
// an existence check before each write), more than the cores. With one
// worker per core, make bench's 8 concurrent single items started most
// calls on a new goroutine, whose stack then grew (runtime.newstack, 6% of
// the plugin's CPU on single items, pprof). An idle worker costs its stack.
// Two workers are held for the process's life by go-plugin's own streams
// (the broker's StartStream and StreamStdio, which Vault's client opens at
// once): with one worker per core on two cores, no call ever ran on one.
func streamWorkers() uint32 { return uint32(max(32, runtime.GOMAXPROCS(0))) }

// serverOptions are what Serve adds to go-plugin's gRPC server options: the
// message size limits ServeMultiplex sets, the transport's sizes, the
// interceptors (outer ones, then UnaryInterceptor), and a buffer pool with
// the codec that uses it.
func serverOptions(outer ...grpc.UnaryServerInterceptor) []grpc.ServerOption {
	pool := &bufferPool{}
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(math.MaxInt32),
		grpc.MaxSendMsgSize(math.MaxInt32),
		// A batch request is hundreds of KB: windows that take one
		// whole, so Vault sends it without waiting for window updates,
		// and buffers that read and write it in few calls.
		grpc.InitialWindowSize(streamWindow),
		grpc.InitialConnWindowSize(connWindow),
		grpc.ReadBufferSize(ioBuffer),
		grpc.WriteBufferSize(ioBuffer),
		// Calls run on long-lived goroutines, whose stacks have grown
		// already, rather than on a new one each; when all are busy gRPC
		// starts one as it would without.
		grpc.NumStreamWorkers(streamWorkers()),
		grpc.ChainUnaryInterceptor(append(outer[:len(outer):len(outer)], UnaryInterceptor)...),
		experimental.BufferPool(pool),
		grpc.ForceServerCodecV2(codec{pool}),
	}
}

// Serve serves factory's backend to Vault as the SDK's plugin.ServeMultiplex
// does (the same protocol versions, multiplexing, logger, message size
// limits, mlock and handshake), with UnaryInterceptor on the gRPC server,
// after the outer interceptors if any (the plugin has none; bench/wire
// uses one). It returns when Vault stops the plugin.
func Serve(factory logical.Factory, logger hclog.Logger, tlsProvider plugin.TLSProviderFunc, outer ...grpc.UnaryServerInterceptor) error {
	backend := func(multiplex bool) goplugin.PluginSet {
		return goplugin.PluginSet{plugin.BackendPluginName: &plugin.GRPCBackendPlugin{
			Factory:             factory,
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
			opts = append(opts, serverOptions(outer...)...)
			return goplugin.DefaultGRPCServer(opts)
		},
	})
	return nil
}
