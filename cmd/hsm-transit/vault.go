package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/hashicorp/vault/api"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/envelope"
)

// vaultKeyService builds the Vault client as the vault CLI does: the api
// package's DefaultConfig reads VAULT_ADDR, VAULT_CACERT, VAULT_NAMESPACE,
// VAULT_CLIENT_TIMEOUT, ...; NewClient reads VAULT_TOKEN. Without
// VAULT_TOKEN the token comes from ~/.vault-token, which the vault CLI's
// default token helper writes on `vault login` (the api package does not
// read it).
func vaultKeyService() (envelope.KeyService, error) {
	cfg := api.DefaultConfig()
	if cfg.Error != nil {
		return nil, &vaultError{err: fmt.Errorf("configuration: %w", cfg.Error)}
	}
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, &vaultError{err: fmt.Errorf("configuration: %w", err)}
	}
	if c.Token() == "" {
		tok, err := tokenFromHelperFile()
		if err != nil {
			return nil, &vaultError{err: err}
		}
		c.SetToken(tok)
	}
	return &classified{ks: envelope.NewVaultKeyService(c)}, nil
}

// tokenFromHelperFile reads ~/.vault-token; a missing file means no token
// (Vault then answers "permission denied", which names the problem).
func tokenFromHelperFile() (string, error) {
	home, err := os.UserHomeDir()
	if err != nil {
		return "", nil
	}
	b, err := os.ReadFile(filepath.Join(home, ".vault-token"))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("reading the token file: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// vaultError is a failure of a Vault request (exit code 2): Vault refused it
// or could not be reached. Its message is Vault's, on one line, without the
// request body (which may hold a data key).
type vaultError struct {
	err error
}

func (e *vaultError) Error() string {
	var re *api.ResponseError
	if errors.As(e.err, &re) {
		msgs := make([]string, 0, len(re.Errors))
		for _, m := range re.Errors {
			msgs = append(msgs, oneLine(strings.ReplaceAll(m, "1 error occurred:", "")))
		}
		detail := strings.Join(msgs, "; ")
		if detail == "" {
			detail = "no error message"
		}
		return fmt.Sprintf("Vault refused %s %s (HTTP %d): %s", re.HTTPMethod, re.URL, re.StatusCode, detail)
	}
	return "Vault: " + oneLine(e.err.Error())
}

func (e *vaultError) Unwrap() error { return e.err }

// classified marks every key service error as a vaultError, so that the exit
// code does not depend on how the envelope package wraps it.
type classified struct {
	ks envelope.KeyService
}

func mark(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) {
		return err
	}
	return &vaultError{err: err}
}

func (c *classified) DataKey(ctx context.Context, mount, key string, keyContext []byte) ([]byte, string, error) {
	pt, wrapped, err := c.ks.DataKey(ctx, mount, key, keyContext)
	return pt, wrapped, mark(err)
}

func (c *classified) Wrap(ctx context.Context, mount, key string, keyContext, plaintext []byte) (string, error) {
	wrapped, err := c.ks.Wrap(ctx, mount, key, keyContext, plaintext)
	return wrapped, mark(err)
}

func (c *classified) Unwrap(ctx context.Context, mount, key string, keyContext []byte, wrapped string) ([]byte, error) {
	pt, err := c.ks.Unwrap(ctx, mount, key, keyContext, wrapped)
	return pt, mark(err)
}

func (c *classified) Rewrap(ctx context.Context, mount, key string, keyContext []byte, wrapped string) (string, error) {
	nw, err := c.ks.Rewrap(ctx, mount, key, keyContext, wrapped)
	return nw, mark(err)
}
