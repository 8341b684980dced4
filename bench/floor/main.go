// Command vault-plugin-floor is the benchmarks' floor: an external Vault
// plugin that encrypts and decrypts with one in-memory AES-256-GCM key and
// does nothing else, one item or a batch_input of them. What it costs is the
// plugin boundary as the SDK gives it: the gRPC round trips for the request
// and for Vault's existence check, and JSON across it. It is for benchmarks
// only: it checks nothing a real engine must (no key versions, no context).
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
					"name":        {Type: framework.TypeString},
					"plaintext":   {Type: framework.TypeString},
					"batch_input": {Type: framework.TypeSlice},
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
					"name":        {Type: framework.TypeString},
					"ciphertext":  {Type: framework.TypeString},
					"batch_input": {Type: framework.TypeSlice},
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
	return f.each(d, "plaintext", f.seal)
}

func (f *floor) decrypt(_ context.Context, _ *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	return f.each(d, "ciphertext", f.open)
}

// each runs op on the request's field, or on that field of every item of
// batch_input, and answers as transit does.
func (f *floor) each(d *framework.FieldData, field string, op func(string) (map[string]interface{}, error)) (*logical.Response, error) {
	raw, isBatch := d.GetOk("batch_input")
	if !isBatch {
		out, err := op(d.Get(field).(string))
		if err != nil {
			return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
		}
		return &logical.Response{Data: out}, nil
	}
	items := raw.([]interface{})
	results := make([]map[string]interface{}, len(items))
	for i, it := range items {
		m, _ := it.(map[string]interface{})
		s, _ := m[field].(string)
		out, err := op(s)
		if err != nil {
			out = map[string]interface{}{"error": err.Error()}
		}
		results[i] = out
	}
	return &logical.Response{Data: map[string]interface{}{"batch_results": results}}, nil
}

func (f *floor) seal(plaintext string) (map[string]interface{}, error) {
	pt, err := base64.StdEncoding.DecodeString(plaintext)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, f.aead.NonceSize(), f.aead.NonceSize()+len(pt)+f.aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	ct := f.aead.Seal(nonce, nonce, pt, nil)
	return map[string]interface{}{"ciphertext": "vault:v1:" + base64.StdEncoding.EncodeToString(ct), "key_version": 1}, nil
}

func (f *floor) open(ciphertext string) (map[string]interface{}, error) {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(ciphertext, "vault:v1:"))
	if err != nil || len(raw) < f.aead.NonceSize() {
		return nil, errors.New("invalid ciphertext")
	}
	pt, err := f.aead.Open(nil, raw[:f.aead.NonceSize()], raw[f.aead.NonceSize():], nil)
	if err != nil {
		return nil, errors.New("cipher: message authentication failed")
	}
	return map[string]interface{}{"plaintext": base64.StdEncoding.EncodeToString(pt)}, nil
}
