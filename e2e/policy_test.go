package e2e

import (
	"testing"

	"github.com/hashicorp/vault/api"
	"github.com/stretchr/testify/require"
)

// Role separation from the seed, done with Vault ACLs: a crypto user may
// only encrypt and decrypt with its key; a security officer manages keys but
// cannot use them. The README shows the same two policies.
const (
	cryptoUserPolicy = `
path "transit/encrypt/app" {
  capabilities = ["update"]
}
path "transit/decrypt/app" {
  capabilities = ["update"]
}
`
	securityOfficerPolicy = `
path "transit/keys/*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}
path "transit/keys" {
  capabilities = ["list"]
}
path "transit/config/*" {
  capabilities = ["read", "update"]
}
`
)

func TestPolicyRoleSeparation(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{})
	v.mountPlugin("transit")
	root := v.client.Logical()
	for _, k := range []string{"app", "other"} {
		_, err := root.Write("transit/keys/"+k, map[string]interface{}{"exportable": true})
		require.NoError(t, err)
	}
	require.NoError(t, v.client.Sys().PutPolicy("crypto-user", cryptoUserPolicy))
	require.NoError(t, v.client.Sys().PutPolicy("security-officer", securityOfficerPolicy))

	user := tokenClient(t, v, "crypto-user")
	officer := tokenClient(t, v, "security-officer")

	sec, err := user.Write("transit/encrypt/app", map[string]interface{}{"plaintext": b64("pii")})
	require.NoError(t, err)
	ct := sec.Data["ciphertext"].(string)
	sec, err = user.Write("transit/decrypt/app", map[string]interface{}{"ciphertext": ct})
	require.NoError(t, err)
	require.Equal(t, "pii", unb64(t, sec.Data["plaintext"].(string)))

	denied := []struct {
		name string
		f    func() error
	}{
		{"read key", func() error { _, err := user.Read("transit/keys/app"); return err }},
		{"list keys", func() error { _, err := user.List("transit/keys"); return err }},
		{"rotate", func() error { _, err := user.Write("transit/keys/app/rotate", nil); return err }},
		{"configure", func() error {
			_, err := user.Write("transit/keys/app/config", map[string]interface{}{"deletion_allowed": true})
			return err
		}},
		{"export", func() error { _, err := user.Read("transit/export/encryption-key/app"); return err }},
		{"backup", func() error { _, err := user.Read("transit/backup/app"); return err }},
		{"delete", func() error { _, err := user.Delete("transit/keys/app"); return err }},
		{"trim", func() error {
			_, err := user.Write("transit/keys/app/trim", map[string]interface{}{"min_available_version": 1})
			return err
		}},
		{"encrypt with another key", func() error {
			_, err := user.Write("transit/encrypt/other", map[string]interface{}{"plaintext": b64("x")})
			return err
		}},
		{"datakey", func() error { _, err := user.Write("transit/datakey/plaintext/app", nil); return err }},
		{"officer decrypts", func() error {
			_, err := officer.Write("transit/decrypt/app", map[string]interface{}{"ciphertext": ct})
			return err
		}},
		{"officer exports", func() error { _, err := officer.Read("transit/export/encryption-key/app"); return err }},
	}
	for _, d := range denied {
		t.Run(d.name, func(t *testing.T) {
			err := d.f()
			var re *api.ResponseError
			require.ErrorAs(t, err, &re)
			require.Equal(t, 403, re.StatusCode)
		})
	}

	// encrypt to a missing key is a create: update alone does not create.
	_, err = user.Write("transit/encrypt/app", map[string]interface{}{"plaintext": b64("x")})
	require.NoError(t, err)
	require.NoError(t, v.client.Sys().PutPolicy("crypto-user-2", `path "transit/encrypt/*" { capabilities = ["update"] }`))
	user2 := tokenClient(t, v, "crypto-user-2")
	_, err = user2.Write("transit/encrypt/other", map[string]interface{}{"plaintext": b64("x")})
	require.NoError(t, err, "update suffices for an existing key")
	_, err = user2.Write("transit/encrypt/brand-new", map[string]interface{}{"plaintext": b64("x")})
	var re *api.ResponseError
	require.ErrorAs(t, err, &re)
	require.Equal(t, 403, re.StatusCode, "creating a key through encrypt needs create")

	// The officer manages keys.
	_, err = officer.Write("transit/keys/app/rotate", nil)
	require.NoError(t, err)
	key, err := officer.Read("transit/keys/app")
	require.NoError(t, err)
	require.Equal(t, "2", key.Data["latest_version"].(interface{ String() string }).String())
	_, err = officer.Write("transit/keys/app/config", map[string]interface{}{"min_decryption_version": 2})
	require.NoError(t, err)
	_, err = user.Write("transit/decrypt/app", map[string]interface{}{"ciphertext": ct})
	require.ErrorAs(t, err, &re)
	require.Equal(t, 400, re.StatusCode, "the officer's policy now refuses v1")
}

// tokenClient returns a client with a fresh token carrying one policy.
func tokenClient(t *testing.T, v *vaultServer, policy string) *api.Logical {
	t.Helper()
	sec, err := v.client.Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{policy}, NoDefaultPolicy: true})
	require.NoError(t, err)
	c, err := v.client.Clone()
	require.NoError(t, err)
	c.SetToken(sec.Auth.ClientToken)
	return c.Logical()
}
