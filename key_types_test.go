package hsmtransit

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestKeyTypeOperations runs every operation against every key type: each is
// answered 200 where the type supports it and 400, never 500, where not.
func TestKeyTypeOperations(t *testing.T) {
	e := getTestBackend(t)
	for _, kt := range allKeyTypes {
		if kt.name == "rsa-3072" || kt.name == "rsa-4096" {
			continue // same code paths as rsa-2048, slow to generate
		}
		t.Run(kt.name, func(t *testing.T) {
			name := "m-" + kt.name
			e.mustWrite(t, "keys/"+name, map[string]interface{}{"type": kt.name, "exportable": true, "allow_plaintext_backup": true})
			expect := func(ok bool) int {
				if ok {
					return 200
				}
				return 400
			}
			// refusal is the message a refused operation must give: ""
			// when it is expected to succeed.
			refusal := func(ok bool, msg string) string {
				if ok {
					return ""
				}
				return msg
			}
			noEncryption := refusal(kt.encrypt, "message encryption not supported for key type "+kt.name)
			noDecryption := refusal(kt.encrypt, "message decryption not supported for key type "+kt.name)
			noSigning := refusal(kt.sign, "does not support signing")

			r := e.write(t, "encrypt/"+name, map[string]interface{}{"plaintext": b64("x")})
			requireStatus(t, r, expect(kt.encrypt), noEncryption)
			ct := "vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
			if kt.encrypt {
				ct = r.data["ciphertext"].(string)
			} else {
				require.Contains(t, r.errorMessage(), "message encryption not supported")
			}
			requireStatus(t, e.write(t, "decrypt/"+name, map[string]interface{}{"ciphertext": ct}), expect(kt.encrypt), noDecryption)
			requireStatus(t, e.write(t, "rewrap/"+name, map[string]interface{}{"ciphertext": ct}), expect(kt.encrypt), noDecryption)
			requireStatus(t, e.write(t, "datakey/wrapped/"+name, nil), expect(kt.encrypt), noEncryption)

			r = e.write(t, "sign/"+name, map[string]interface{}{"input": b64("x")})
			requireStatus(t, r, expect(kt.sign), noSigning)
			sig := "vault:v1:AAAA"
			if kt.sign {
				sig = r.data["signature"].(string)
			} else {
				require.Contains(t, r.errorMessage(), "does not support signing")
			}
			r = e.write(t, "verify/"+name, map[string]interface{}{"input": b64("x"), "signature": sig})
			requireStatus(t, r, expect(kt.sign), noSigning)
			if kt.sign {
				require.Equal(t, true, r.data["valid"])
			}

			// Every type has an HMAC key.
			r = e.write(t, "hmac/"+name, map[string]interface{}{"input": b64("x")})
			requireStatus(t, r, 200, "")
			r = e.write(t, "verify/"+name, map[string]interface{}{"input": b64("x"), "hmac": r.data["hmac"]})
			requireStatus(t, r, 200, "")
			require.Equal(t, true, r.data["valid"])

			requireStatus(t, e.read(t, "export/encryption-key/"+name), expect(kt.encrypt), refusal(kt.encrypt, "encryption not supported for the key"))
			requireStatus(t, e.read(t, "export/signing-key/"+name), expect(kt.sign), refusal(kt.sign, "signing not supported for the key"))
			requireStatus(t, e.read(t, "export/public-key/"+name), expect(kt.sign), refusal(kt.sign, "unknown key type "+kt.name+" for export type public-key"))
			requireStatus(t, e.read(t, "export/hmac-key/"+name), 200, "")
			requireStatus(t, e.read(t, "backup/"+name), 200, "")

			// A context on a key that is not derived is ignored, as in
			// built-in transit.
			r = e.write(t, "encrypt/"+name, map[string]interface{}{"plaintext": b64("x"), "context": b64("c")})
			requireStatus(t, r, expect(kt.encrypt), noEncryption)
			if kt.encrypt {
				require.Equal(t, "x", e.decrypt(t, name, r.data["ciphertext"].(string), nil))
			}
			r = e.write(t, "keys/"+name+"/csr", nil)
			requireStatus(t, r, expect(kt.sign), noSigning)
			if kt.sign {
				require.True(t, strings.HasPrefix(r.data["csr"].(string), "-----BEGIN CERTIFICATE REQUEST-----"))
			}
		})
	}
}
