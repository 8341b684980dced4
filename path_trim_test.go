package hsmtransit

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestTrim(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	var cts []string
	for i := 0; i < 4; i++ {
		cts = append(cts, e.encrypt(t, "k", "x", nil))
		e.mustWrite(t, "keys/k/rotate", nil)
	}
	requireStatus(t, e.write(t, "keys/k/trim", map[string]interface{}{"min_available_version": 2}), 400, "minimum available version cannot be set when minimum encryption version is not set")
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 3, "min_encryption_version": 4})

	cases := []struct {
		name string
		data map[string]interface{}
		msg  string
	}{
		{"missing", map[string]interface{}{}, "missing min_available_version"},
		{"above min decryption", map[string]interface{}{"min_available_version": 4}, "cannot be greater than minimum decryption version"},
		{"above min encryption", map[string]interface{}{"min_available_version": 5}, "cannot be greater than minmum encryption version"},
		{"zero", map[string]interface{}{"min_available_version": 0}, "should be positive"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			requireStatus(t, e.write(t, "keys/k/trim", tc.data), 400, tc.msg)
		})
	}

	data := e.mustWrite(t, "keys/k/trim", map[string]interface{}{"min_available_version": 3})
	require.Equal(t, float64(3), data["min_available_version"])
	keys := data["keys"].(map[string]interface{})
	require.NotContains(t, keys, "1")
	require.NotContains(t, keys, "2")
	require.Contains(t, keys, "3")

	requireStatus(t, e.write(t, "keys/k/trim", map[string]interface{}{"min_available_version": 2}), 400, "cannot be decremented")
	// Trimmed versions are gone for good: lowering min_decryption_version
	// below the available versions is refused.
	requireStatus(t, e.write(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 1}), 400, "min decryption version should not be less then min available version")
	e.b.invalidate(t.Context(), "policy/k")
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": cts[0]}), 400, "ciphertext or signature version is disallowed by policy (too old)")
	require.Equal(t, "x", e.decrypt(t, "k", cts[2], nil))
	requireStatus(t, e.write(t, "keys/none/trim", map[string]interface{}{"min_available_version": 1}), 400, "invalid key name")
}

// TestTrimDeletesSoftwareVersions shows a version decryptable before the
// trim (min_decryption_version lowered again brings it back) and gone after
// it: lowering min_decryption_version is refused, even after a restart, and
// no stored entry holds the key bytes of a trimmed version any more.
func TestTrimDeletesSoftwareVersions(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", map[string]interface{}{"exportable": true})
	var cts []string
	for i := 1; i <= 4; i++ {
		if i > 1 {
			e.mustWrite(t, "keys/k/rotate", nil)
		}
		cts = append(cts, e.encrypt(t, "k", fmt.Sprint("v", i), nil))
	}
	exported := e.read(t, "export/encryption-key/k").data["keys"].(map[string]interface{})
	require.Len(t, exported, 4)
	keyBytes := map[string][]byte{}
	for v, k := range exported {
		raw, err := base64.StdEncoding.DecodeString(k.(string))
		require.NoError(t, err)
		keyBytes[v] = raw
	}
	// storedVersions reports which versions' bytes some stored entry holds,
	// as the unsealed mount reads storage.
	storedVersions := func() map[string]bool {
		found := map[string]bool{}
		require.NoError(t, walkStorage(context.Background(), e.sealed(t), "", func(key string, value []byte) {
			for v, raw := range keyBytes {
				if bytes.Contains(value, []byte(base64.StdEncoding.EncodeToString(raw))) || bytes.Contains(value, raw) {
					found[v] = true
				}
			}
		}))
		return found
	}
	require.Equal(t, map[string]bool{"1": true, "2": true, "3": true, "4": true}, storedVersions(), "before the trim storage holds every version")

	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 3, "min_encryption_version": 4})
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": cts[0]}), 400, "too old")
	// Not trimmed yet: the old versions come back.
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 1})
	require.Equal(t, "v1", e.decrypt(t, "k", cts[0], nil), "before the trim version 1 decrypts")
	require.Equal(t, "v2", e.decrypt(t, "k", cts[1], nil))
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 3})

	data := e.mustWrite(t, "keys/k/trim", map[string]interface{}{"min_available_version": 3})
	require.Equal(t, float64(3), data["min_available_version"])
	require.ElementsMatch(t, []string{"3", "4"}, mapKeys(data["keys"].(map[string]interface{})))

	for _, restart := range []bool{false, true} {
		if restart {
			e = e.restart(t)
		}
		requireStatus(t, e.write(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 1}), 400, "min decryption version should not be less then min available version")
		requireStatus(t, e.write(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 2}), 400, "min decryption version should not be less then min available version")
		requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": cts[0]}), 400, "too old")
		requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": cts[1]}), 400, "too old")
		require.Equal(t, "v3", e.decrypt(t, "k", cts[2], nil), "restart %t", restart)
		require.Equal(t, "v4", e.decrypt(t, "k", cts[3], nil))
		read := e.read(t, "keys/k").data
		require.Equal(t, float64(3), read["min_available_version"], "restart %t", restart)
		require.ElementsMatch(t, []string{"3", "4"}, mapKeys(read["keys"].(map[string]interface{})), "restart %t", restart)
		got := e.read(t, "export/encryption-key/k").data["keys"].(map[string]interface{})
		require.Equal(t, map[string]interface{}{"3": exported["3"], "4": exported["4"]}, got, "restart %t", restart)
		requireStatus(t, e.read(t, "export/encryption-key/k/1"), 400, "version for export is below minimum decryption version")
		require.Equal(t, map[string]bool{"3": true, "4": true}, storedVersions(), "restart %t: the trimmed versions' bytes are gone from storage", restart)
	}
}

// TestTrimDestroysHSMVersions shows an HSM-resident version decryptable
// before the trim, and not after it even from a copy of storage taken
// before the trim: its HSM object is destroyed.
func TestTrimDestroysHSMVersions(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})
	var cts []string
	for i := 1; i <= 3; i++ {
		if i > 1 {
			e.mustWrite(t, "keys/hk/rotate", nil)
		}
		cts = append(cts, e.encrypt(t, "hk", fmt.Sprint("v", i), nil))
	}
	label := func(v int) string { return fmt.Sprintf("hsm-transit/%s/hk/v%d", e.mountUUID, v) }
	require.ElementsMatch(t, []string{label(1), label(2), label(3)}, tokenLabels(t, e, testToken, "hk"))
	e.mustWrite(t, "keys/hk/config", map[string]interface{}{"min_decryption_version": 2, "min_encryption_version": 2})
	requireStatus(t, e.write(t, "decrypt/hk", map[string]interface{}{"ciphertext": cts[0]}), 400, "too old")
	e.mustWrite(t, "keys/hk/config", map[string]interface{}{"min_decryption_version": 1})
	require.Equal(t, "v1", e.decrypt(t, "hk", cts[0], nil), "before the trim version 1 decrypts")
	// Storage as it is before the trim, with version 1 decryptable.
	before := copyStorage(t, e.storage)

	e.mustWrite(t, "keys/hk/config", map[string]interface{}{"min_decryption_version": 2})
	data := e.mustWrite(t, "keys/hk/trim", map[string]interface{}{"min_available_version": 2})
	require.Equal(t, float64(2), data["min_available_version"])
	require.ElementsMatch(t, []string{"2", "3"}, mapKeys(data["hsm_labels"].(map[string]interface{})))
	require.ElementsMatch(t, []string{label(2), label(3)}, tokenLabels(t, e, testToken, "hk"), "version 1's object is destroyed")

	e = e.restart(t)
	requireStatus(t, e.write(t, "keys/hk/config", map[string]interface{}{"min_decryption_version": 1}), 400, "min decryption version should not be less then min available version")
	requireStatus(t, e.write(t, "decrypt/hk", map[string]interface{}{"ciphertext": cts[0]}), 400, "too old")
	require.Equal(t, "v2", e.decrypt(t, "hk", cts[1], nil))
	require.Equal(t, "v3", e.decrypt(t, "hk", cts[2], nil))
	read := e.read(t, "keys/hk").data
	require.Equal(t, float64(2), read["min_available_version"])
	require.ElementsMatch(t, []string{"2", "3"}, mapKeys(read["hsm_labels"].(map[string]interface{})))

	// The storage from before the trim still allows version 1, but its
	// object is gone: only the trim makes it undecryptable.
	old := startBackend(t, before, e.mountUUID)
	require.Eventually(t, func() bool { return old.read(t, "seal/status").data["sealed"] == false }, 10*time.Second, 50*time.Millisecond)
	require.Equal(t, "v2", old.decrypt(t, "hk", cts[1], nil), "the copy of storage works")
	r := old.write(t, "decrypt/hk", map[string]interface{}{"ciphertext": cts[0]})
	requireStatus(t, r, 400, "this version of the key is no longer in the HSM (it was destroyed)")
	require.Contains(t, r.errorMessage(), label(1), "the error names the object that is gone")
}

func mapKeys(m map[string]interface{}) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
