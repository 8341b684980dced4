package e2e

import (
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/stretchr/testify/require"
)

// TestGoAPIClientSession drives the plugin with Vault's Go API client, as
// applications do: single items and batches.
func TestGoAPIClientSession(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{})
	v.mountPlugin("transit")
	c := v.client.Logical()

	_, err := c.Write("transit/keys/app", map[string]interface{}{"type": "aes256-gcm96"})
	require.NoError(t, err)
	sec, err := c.Write("transit/encrypt/app", map[string]interface{}{"plaintext": b64("hello")})
	require.NoError(t, err)
	ct := sec.Data["ciphertext"].(string)
	sec, err = c.Write("transit/decrypt/app", map[string]interface{}{"ciphertext": ct})
	require.NoError(t, err)
	require.Equal(t, "hello", unb64(t, sec.Data["plaintext"].(string)))

	// A batch of 50 with references, decrypted in order.
	var items []map[string]interface{}
	for i := 0; i < 50; i++ {
		items = append(items, map[string]interface{}{"plaintext": b64(fmt.Sprintf("row %d", i)), "reference": fmt.Sprint(i)})
	}
	sec, err = c.Write("transit/encrypt/app", map[string]interface{}{"batch_input": items})
	require.NoError(t, err)
	results, ok := sec.Data["batch_results"].([]interface{})
	require.True(t, ok, "batch_results: %v", sec.Data)
	require.Len(t, results, len(items), "one result per item sent")
	var dec []map[string]interface{}
	for i, r := range results {
		m := r.(map[string]interface{})
		require.Equal(t, fmt.Sprint(i), m["reference"])
		dec = append(dec, map[string]interface{}{"ciphertext": m["ciphertext"], "reference": m["reference"]})
	}
	sec, err = c.Write("transit/decrypt/app", map[string]interface{}{"batch_input": dec})
	require.NoError(t, err)
	decrypted, ok := sec.Data["batch_results"].([]interface{})
	require.True(t, ok, "batch_results: %v", sec.Data)
	require.Len(t, decrypted, len(dec), "one result per item sent")
	for i, r := range decrypted {
		m := r.(map[string]interface{})
		require.Equal(t, fmt.Sprintf("row %d", i), unb64(t, m["plaintext"].(string)))
		require.Equal(t, fmt.Sprint(i), m["reference"])
	}

	// One bad item: 400 with every result, or the caller's status code.
	bad := append(dec[:2:2], map[string]interface{}{"ciphertext": "garbage", "reference": "bad"})
	_, err = c.Write("transit/decrypt/app", map[string]interface{}{"batch_input": bad})
	var respErr *api.ResponseError
	require.ErrorAs(t, err, &respErr)
	require.Equal(t, 400, respErr.StatusCode)
	status, body := v.rawRequest("POST", "transit/decrypt/app", map[string]interface{}{"batch_input": bad, "partial_failure_response_code": 207})
	require.Equal(t, 207, status)
	got, ok := lookup(body, "data.batch_results").([]interface{})
	require.True(t, ok, "batch_results: %v", body)
	require.Len(t, got, len(bad), "one result per item sent")
	require.Equal(t, "invalid ciphertext: no prefix", got[2].(map[string]interface{})["error"])

	// Sign and verify, HMAC, hash, random.
	_, err = c.Write("transit/keys/signer", map[string]interface{}{"type": "ecdsa-p256"})
	require.NoError(t, err)
	sec, err = c.Write("transit/sign/signer/sha2-256", map[string]interface{}{"input": b64("release-1.0.tar.gz")})
	require.NoError(t, err)
	sec, err = c.Write("transit/verify/signer/sha2-256", map[string]interface{}{"input": b64("release-1.0.tar.gz"), "signature": sec.Data["signature"]})
	require.NoError(t, err)
	require.Equal(t, true, sec.Data["valid"])
	sec, err = c.Write("transit/hmac/app", map[string]interface{}{"input": b64("x")})
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(sec.Data["hmac"].(string), "vault:v1:"))
	sec, err = c.Write("transit/hash/sha2-512", map[string]interface{}{"input": b64("x"), "format": "base64"})
	require.NoError(t, err)
	sum, err := base64.StdEncoding.DecodeString(sec.Data["sum"].(string))
	require.NoError(t, err)
	require.Len(t, sum, 64)
	sec, err = c.Write("transit/random/16", map[string]interface{}{"format": "hex"})
	require.NoError(t, err)
	require.Len(t, sec.Data["random_bytes"], 32)

	// A missing key reads as nil, as from built-in transit.
	sec, err = c.Read("transit/keys/nope")
	require.NoError(t, err)
	require.Nil(t, sec)
}

// TestVaultAgentTemplate is the CI/CD scenario: a ciphertext kept in a
// repository is decrypted by a Vault Agent template into the file the
// deployment reads.
func TestVaultAgentTemplate(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{})
	v.mountPlugin("transit")
	_, err := v.client.Logical().Write("transit/keys/ci", nil)
	require.NoError(t, err)
	sec, err := v.client.Logical().Write("transit/encrypt/ci", map[string]interface{}{"plaintext": b64("db-password-s3cr3t")})
	require.NoError(t, err)
	ct := sec.Data["ciphertext"].(string)

	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	require.NoError(t, os.WriteFile(tokenFile, []byte(v.token), 0o600))
	out := filepath.Join(dir, "rendered", "db.env")
	tmpl := fmt.Sprintf(`DB_PASSWORD={{ with secret "transit/decrypt/ci" "ciphertext=%s" }}{{ .Data.plaintext | base64Decode }}{{ end }}`, ct)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "db.env.tpl"), []byte(tmpl), 0o600))
	config := fmt.Sprintf(`
vault {
  address = %q
}
auto_auth {
  method "token_file" {
    config = {
      token_file_path = %q
    }
  }
}
exit_after_auth = true
template {
  source      = %q
  destination = %q
}
`, v.addr, tokenFile, filepath.Join(dir, "db.env.tpl"), out)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "agent.hcl"), []byte(config), 0o600))

	cmd := exec.Command(vaultBin, "agent", "-config", filepath.Join(dir, "agent.hcl"))
	cmd.Env = append(os.Environ(), "VAULT_ADDR="+v.addr)
	done := make(chan []byte, 1)
	go func() {
		b, _ := cmd.CombinedOutput()
		done <- b
	}()
	var agentLog []byte
	select {
	case agentLog = <-done:
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("vault agent did not exit: %s", <-done)
	}
	rendered, err := os.ReadFile(out)
	require.NoErrorf(t, err, "agent log:\n%s", agentLog)
	require.Equal(t, "DB_PASSWORD=db-password-s3cr3t", string(rendered))
}
