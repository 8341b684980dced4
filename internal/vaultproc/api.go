package vaultproc

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
)

// API sends requests to one Vault server with a token.
type API struct {
	// Addr is the server's address, http://127.0.0.1:port.
	Addr string
	// Token is sent as X-Vault-Token when not empty.
	Token string
	// HTTP is the client the requests go through; http.DefaultClient when
	// nil.
	HTTP *http.Client
}

// Do sends one request to /v1/path, with body encoded as JSON when not
// nil, and returns the status and the decoded answer (nil when empty). A
// status of 300 or more is not an error here; an answer that is not JSON
// is, with its status and body.
func (a *API) Do(method, path string, body any) (int, map[string]any, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(context.Background(), method, a.Addr+"/v1/"+path, rd)
	if err != nil {
		return 0, nil, err
	}
	if a.Token != "" {
		req.Header.Set("X-Vault-Token", a.Token)
	}
	client := a.HTTP
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, nil, err
	}
	var out map[string]any
	if len(bytes.TrimSpace(raw)) > 0 {
		if err := json.Unmarshal(raw, &out); err != nil {
			return resp.StatusCode, nil, fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, raw)
		}
	}
	return resp.StatusCode, out, nil
}

// Call is Do for a request that must succeed: a status of 300 or more is
// an error, with Vault's errors.
func (a *API) Call(method, path string, body any) (map[string]any, error) {
	status, out, err := a.Do(method, path, body)
	if err != nil {
		return nil, err
	}
	if status >= 300 {
		return out, fmt.Errorf("%s %s: %d %v", method, path, status, out["errors"])
	}
	return out, nil
}

// Plugin is an entry of the plugin catalog.
type Plugin struct {
	// Type is the plugin's type; "secret" when empty.
	Type string
	// Name is the name it is registered, and mounted, under.
	Name string
	// Command is its file name in the plugin directory.
	Command string
	// SHA256 is the file's digest, in hex.
	SHA256 string
	// Version is the version it is registered at; none when empty.
	Version string
	// Env is added to the plugin process's environment.
	Env []string
}

// RegisterPlugin adds the plugin to the catalog.
func (a *API) RegisterPlugin(p Plugin) error {
	if p.Type == "" {
		p.Type = "secret"
	}
	body := map[string]any{"sha256": p.SHA256, "command": p.Command}
	if p.Version != "" {
		body["version"] = p.Version
	}
	if len(p.Env) > 0 {
		body["env"] = p.Env
	}
	_, err := a.Call("PUT", "sys/plugins/catalog/"+p.Type+"/"+p.Name, body)
	return err
}

// InstallPlugin copies the binary bin into dir as fileName, executable,
// and returns its SHA-256 in hex.
func InstallPlugin(bin, dir, fileName string) (string, error) {
	src, err := os.Open(bin)
	if err != nil {
		return "", err
	}
	defer src.Close()
	dst, err := os.OpenFile(filepath.Join(dir, fileName), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o755)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(dst, h), src); err != nil {
		dst.Close()
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), dst.Close()
}
