// Command vault-plugin-floor is the benchmarks' floor: an external Vault
// plugin that encrypts and decrypts with one in-memory AES-256-GCM key and
// does nothing else. What it costs is the plugin boundary itself: the gRPC
// round trips for the request and for Vault's existence check, and JSON
// across it. It is for benchmarks only.
package main

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"os"
	"strings"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin"
)

func main() {
	meta := &api.PluginAPIClientMeta{}
	if err := meta.FlagSet().Parse(os.Args[1:]); err != nil {
		fatal(err)
	}
	if err := plugin.ServeMultiplex(&plugin.ServeOpts{
		BackendFactoryFunc: factory,
		TLSProviderFunc:    api.VaultPluginTLSProvider(meta.GetTLSConfig()),
	}); err != nil {
		fatal(err)
	}
}

func fatal(err error) {
	hclog.New(&hclog.LoggerOptions{}).Error("floor plugin", "error", err)
	os.Exit(1)
}

type floor struct {
	*framework.Backend
	aead cipher.AEAD
}

func factory(ctx context.Context, conf *logical.BackendConfig) (logical.Backend, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	f := &floor{aead: aead}
	name := framework.GenericNameRegex("name")
	exists := func(context.Context, *logical.Request, *framework.FieldData) (bool, error) { return true, nil }
	f.Backend = &framework.Backend{
		BackendType: logical.TypeLogical,
		Paths: []*framework.Path{
			{
				Pattern: "encrypt/" + name,
				Fields: map[string]*framework.FieldSchema{
					"name":      {Type: framework.TypeString},
					"plaintext": {Type: framework.TypeString},
				},
				// Like transit's encrypt: Vault asks whether the key exists.
				ExistenceCheck: exists,
				Operations: map[logical.Operation]framework.OperationHandler{
					logical.UpdateOperation: &framework.PathOperation{Callback: f.encrypt},
					logical.CreateOperation: &framework.PathOperation{Callback: f.encrypt},
				},
			},
			{
				Pattern: "decrypt/" + name,
				Fields: map[string]*framework.FieldSchema{
					"name":       {Type: framework.TypeString},
					"ciphertext": {Type: framework.TypeString},
				},
				Operations: map[logical.Operation]framework.OperationHandler{
					logical.UpdateOperation: &framework.PathOperation{Callback: f.decrypt},
				},
			},
		},
	}
	if err := f.Setup(ctx, conf); err != nil {
		return nil, err
	}
	return f, nil
}

func (f *floor) encrypt(_ context.Context, _ *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	pt, err := base64.StdEncoding.DecodeString(d.Get("plaintext").(string))
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	nonce := make([]byte, f.aead.NonceSize(), f.aead.NonceSize()+len(pt)+f.aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	ct := f.aead.Seal(nonce, nonce, pt, nil)
	return &logical.Response{Data: map[string]interface{}{
		"ciphertext":  "vault:v1:" + base64.StdEncoding.EncodeToString(ct),
		"key_version": 1,
	}}, nil
}

func (f *floor) decrypt(_ context.Context, _ *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(d.Get("ciphertext").(string), "vault:v1:"))
	if err != nil || len(raw) < f.aead.NonceSize() {
		return logical.ErrorResponse("invalid ciphertext"), logical.ErrInvalidRequest
	}
	pt, err := f.aead.Open(nil, raw[:f.aead.NonceSize()], raw[f.aead.NonceSize():], nil)
	if err != nil {
		return logical.ErrorResponse(errors.New("cipher: message authentication failed").Error()), logical.ErrInvalidRequest
	}
	return &logical.Response{Data: map[string]interface{}{"plaintext": base64.StdEncoding.EncodeToString(pt)}}, nil
}
