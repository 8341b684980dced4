package e2e

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestMigrationBetweenBuiltinAndPlugin moves keys both ways with backup and
// restore: every ciphertext made before the move decrypts after it, and the
// key keeps its versions and settings.
func TestMigrationBetweenBuiltinAndPlugin(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{})
	v.mustCLI("secrets", "enable", "-path=builtin", "transit")
	v.mountPlugin("plugin")
	c := v.client.Logical()

	for _, dir := range []struct{ from, to string }{{"builtin", "plugin"}, {"plugin", "builtin"}} {
		t.Run(dir.from+"-to-"+dir.to, func(t *testing.T) {
			for _, kt := range []string{"aes256-gcm96", "chacha20-poly1305", "ed25519", "rsa-2048"} {
				name := fmt.Sprintf("mig-%s-%s", dir.from, kt)
				_, err := c.Write(dir.from+"/keys/"+name, map[string]interface{}{
					"type": kt, "exportable": true, "allow_plaintext_backup": true,
				})
				require.NoError(t, err)

				// Three versions, each with data made under it.
				var cts, sigs []string
				for i := 0; i < 3; i++ {
					if i > 0 {
						_, err = c.Write(dir.from+"/keys/"+name+"/rotate", nil)
						require.NoError(t, err)
					}
					if kt == "ed25519" {
						sec, err := c.Write(dir.from+"/sign/"+name, map[string]interface{}{"input": b64(fmt.Sprint(i))})
						require.NoError(t, err)
						sigs = append(sigs, sec.Data["signature"].(string))
						continue
					}
					sec, err := c.Write(dir.from+"/encrypt/"+name, map[string]interface{}{"plaintext": b64(fmt.Sprintf("v%d data", i+1))})
					require.NoError(t, err)
					cts = append(cts, sec.Data["ciphertext"].(string))
				}
				_, err = c.Write(dir.from+"/keys/"+name+"/config", map[string]interface{}{"min_decryption_version": 2})
				require.NoError(t, err)

				sec, err := c.Read(dir.from + "/backup/" + name)
				require.NoError(t, err)
				_, err = c.Write(dir.to+"/restore", map[string]interface{}{"backup": sec.Data["backup"]})
				require.NoError(t, err)

				key, err := c.Read(dir.to + "/keys/" + name)
				require.NoError(t, err)
				require.Equal(t, kt, key.Data["type"])
				require.EqualValues(t, "3", fmt.Sprint(key.Data["latest_version"]))
				require.EqualValues(t, "2", fmt.Sprint(key.Data["min_decryption_version"]))

				for i, ct := range cts {
					sec, err := c.Write(dir.to+"/decrypt/"+name, map[string]interface{}{"ciphertext": ct})
					if i == 0 {
						require.Error(t, err, "v1 stays below min_decryption_version after the move")
						continue
					}
					require.NoError(t, err)
					require.Equal(t, fmt.Sprintf("v%d data", i+1), unb64(t, sec.Data["plaintext"].(string)))
				}
				for i, sig := range sigs {
					if i == 0 {
						continue // v1 is below min_decryption_version
					}
					sec, err := c.Write(dir.to+"/verify/"+name, map[string]interface{}{"input": b64(fmt.Sprint(i)), "signature": sig})
					require.NoError(t, err)
					require.Equal(t, true, sec.Data["valid"])
				}
				// The new home encrypts, and the old one reads its output.
				if kt != "ed25519" {
					sec, err := c.Write(dir.to+"/encrypt/"+name, map[string]interface{}{"plaintext": b64("after")})
					require.NoError(t, err)
					sec, err = c.Write(dir.from+"/decrypt/"+name, map[string]interface{}{"ciphertext": sec.Data["ciphertext"]})
					require.NoError(t, err)
					require.Equal(t, "after", unb64(t, sec.Data["plaintext"].(string)))
				}
			}
		})
	}
}
