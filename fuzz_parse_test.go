package hsmtransit

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"
)

// FuzzParseCiphertext: a ciphertext string is parsed or refused as the
// caller's error, never a panic; an accepted one names a version inside the
// key's window and its payload formats back to the same string.
func FuzzParseCiphertext(f *testing.F) {
	for _, s := range []string{"vault:v1:AAAA", "vault:v0:", "vault:v-1:AAAA", "vault:v99999999999999999999:AA", "vault:v2", "vault:", "", "vault:v1:!!"} {
		f.Add(s, 3, 1)
	}
	f.Fuzz(func(t *testing.T, ct string, latest, minDecryption int) {
		if minDecryption < 1 || latest < minDecryption {
			return // no key has such a window
		}
		ver, raw, err := parseCiphertext(ct, latest, minDecryption)
		if err != nil {
			return
		}
		require.LessOrEqual(t, ver, latest)
		require.GreaterOrEqual(t, ver, minDecryption)
		if formatCiphertext(ver, raw) != ct {
			// Only a non-canonical spelling of the same thing may differ:
			// it must parse to the same version and payload.
			ver2, raw2, err := parseCiphertext(formatCiphertext(ver, raw), latest, minDecryption)
			require.NoError(t, err)
			require.Equal(t, ver, ver2)
			require.Equal(t, raw, raw2)
		}
	})
}

// FuzzDecodeBatchInput: whatever JSON stands in batch_input, decoding it
// gives an error or one item per element, each holding the element's
// string fields; never a panic.
func FuzzDecodeBatchInput(f *testing.F) {
	for _, s := range []string{
		`[{"plaintext":"YQ=="}]`, `[{"plaintext":"YQ==","key_version":1.5}]`, `[{"plaintext":"YQ==","key_version":"2"}]`,
		`[{}]`, `[1]`, `[]`, `"x"`, `{"plaintext":"YQ=="}`, `[{"plaintext":7}]`, `[{"plaintext":null,"context":"Yw=="}]`,
		`[{"plaintext":"YQ==","reference":"r","associated_data":"!!"}]`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		var raw interface{}
		if json.Unmarshal([]byte(body), &raw) != nil {
			return
		}
		items, err := decodeBatchInput(raw, "plaintext", "missing plaintext to encrypt")
		if err != nil {
			return
		}
		list := raw.([]interface{})
		require.Len(t, items, len(list))
		for i, el := range list {
			m := el.(map[string]interface{})
			if s, ok := m["plaintext"].(string); ok {
				require.Equal(t, s, items[i].Plaintext)
			}
			if s, ok := m["reference"].(string); ok {
				require.Equal(t, s, items[i].Reference)
			}
		}
	})
}
