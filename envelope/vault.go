package envelope

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"

	"github.com/hashicorp/vault/api"
)

// VaultKeyService is the KeyService over Vault's transit API (built-in
// transit or hsm-transit). Errors wrap the *api.ResponseError, so errors.As
// finds the status code and Vault's messages ("permission denied").
type VaultKeyService struct {
	client *api.Client
}

// NewVaultKeyService returns a KeyService that sends its requests with c.
func NewVaultKeyService(c *api.Client) *VaultKeyService { return &VaultKeyService{client: c} }

// The hints it is given are checked (checkHint) when a header is parsed or
// a key reference read; this checks again, so that a KeyService caller that
// skipped those cannot send a request outside MOUNT/op/KEY.
func transitPath(mount, op, key string) (string, error) {
	if err := checkHint("mount", mount); err != nil {
		return "", err
	}
	if err := checkHint("key", key); err != nil {
		return "", err
	}
	return mount + "/" + op + "/" + key, nil
}

// write sends one request and returns the response's data.
func (v *VaultKeyService) write(ctx context.Context, path string, body map[string]any, keyContext []byte) (map[string]any, error) {
	if len(keyContext) > 0 {
		body["context"] = base64.StdEncoding.EncodeToString(keyContext)
	}
	s, err := v.client.Logical().WriteWithContext(ctx, path, body)
	if err != nil {
		return nil, fmt.Errorf("vault %s: %w", path, err)
	}
	if s == nil || s.Data == nil {
		return nil, fmt.Errorf("vault %s: empty response", path)
	}
	return s.Data, nil
}

func stringField(data map[string]any, path, name string) (string, error) {
	s, ok := data[name].(string)
	if !ok || s == "" {
		return "", fmt.Errorf("vault %s: response has no %s", path, name)
	}
	return s, nil
}

// decodeKey decodes a base64 plaintext field; the message never holds it.
func decodeKey(data map[string]any, path string) ([]byte, error) {
	s, err := stringField(data, path, "plaintext")
	if err != nil {
		return nil, err
	}
	k, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("vault %s: plaintext is not base64", path)
	}
	return k, nil
}

// DataKey implements KeyService with transit/datakey/plaintext/KEY.
func (v *VaultKeyService) DataKey(ctx context.Context, mount, key string, keyContext []byte) ([]byte, string, error) {
	path, err := transitPath(mount, "datakey/plaintext", key)
	if err != nil {
		return nil, "", err
	}
	data, err := v.write(ctx, path, map[string]any{"bits": 256}, keyContext)
	if err != nil {
		return nil, "", err
	}
	wrapped, err := stringField(data, path, "ciphertext")
	if err != nil {
		return nil, "", err
	}
	k, err := decodeKey(data, path)
	if err != nil {
		return nil, "", err
	}
	return k, wrapped, nil
}

// Wrap implements KeyService with transit/encrypt/KEY.
func (v *VaultKeyService) Wrap(ctx context.Context, mount, key string, keyContext, plaintext []byte) (string, error) {
	path, err := transitPath(mount, "encrypt", key)
	if err != nil {
		return "", err
	}
	data, err := v.write(ctx, path, map[string]any{"plaintext": base64.StdEncoding.EncodeToString(plaintext)}, keyContext)
	if err != nil {
		return "", err
	}
	return stringField(data, path, "ciphertext")
}

// Unwrap implements KeyService with transit/decrypt/KEY.
func (v *VaultKeyService) Unwrap(ctx context.Context, mount, key string, keyContext []byte, wrapped string) ([]byte, error) {
	path, err := transitPath(mount, "decrypt", key)
	if err != nil {
		return nil, err
	}
	data, err := v.write(ctx, path, map[string]any{"ciphertext": wrapped}, keyContext)
	if err != nil {
		return nil, err
	}
	return decodeKey(data, path)
}

// Rewrap implements KeyService with transit/rewrap/KEY.
func (v *VaultKeyService) Rewrap(ctx context.Context, mount, key string, keyContext []byte, wrapped string) (string, error) {
	path, err := transitPath(mount, "rewrap", key)
	if err != nil {
		return "", err
	}
	data, err := v.write(ctx, path, map[string]any{"ciphertext": wrapped}, keyContext)
	if err != nil {
		return "", err
	}
	return stringField(data, path, "ciphertext")
}

// IsPermissionDenied reports whether err comes from a Vault 403.
func IsPermissionDenied(err error) bool {
	var re *api.ResponseError
	return errors.As(err, &re) && re.StatusCode == 403
}
