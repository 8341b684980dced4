// Command hsm-transit encrypts files too large for a Vault request with
// envelope encryption (docs/ENVELOPE.md): one transit call per file for a
// data key, AES-256-GCM on this machine for the bytes.
//
//	hsm-transit encrypt -k MOUNT/KEY [-k MOUNT2/KEY2 ...] [-context B64] [-aad STRING] [-o OUT] [IN]
//	hsm-transit decrypt [-aad STRING] [-o OUT] [IN]
//	hsm-transit rewrap FILE...
//	hsm-transit inspect [IN]
//
// It is configured like the vault CLI (VAULT_ADDR, VAULT_CACERT,
// VAULT_NAMESPACE, ... and VAULT_TOKEN or ~/.vault-token), and its exit codes
// are part of its interface: see usage.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// The first signal cancels ctx: the command stops and removes its
	// temporary file. A second one (say, while blocked reading a terminal)
	// kills as usual.
	go func() {
		<-ctx.Done()
		stop()
	}()
	growPipe(os.Stdin)
	growPipe(os.Stdout)
	code := run(ctx, os.Args[1:], &env{
		stdin:  os.Stdin,
		stdout: os.Stdout,
		stderr: os.Stderr,
		keys:   vaultKeyService,
		umask:  umask(),
	})
	stop()
	os.Exit(code)
}
