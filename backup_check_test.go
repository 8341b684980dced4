package hsmtransit

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"
)

// editBackup decodes a backup, lets edit change its JSON, and encodes it.
func editBackup(t testing.TB, backup string, edit func(kd map[string]interface{})) string {
	t.Helper()
	raw, err := base64.StdEncoding.DecodeString(backup)
	require.NoError(t, err)
	var kd map[string]interface{}
	require.NoError(t, json.Unmarshal(raw, &kd))
	edit(kd)
	out, err := json.Marshal(kd)
	require.NoError(t, err)
	return base64.StdEncoding.EncodeToString(out)
}

// The backups a fuzz run through Vault found to crash the plugin process
// (issue 12): each is refused with a 400 naming the field, and no key is
// made. A crash here would take the test binary down.
func TestRestoreOfAnEditedBackupIsRefused(t *testing.T) {
	e := getTestBackend(t)
	cts := backupVersionedKey(t, e, "k")
	backup := backupOf(t, e, "k")
	policy := func(kd map[string]interface{}) map[string]interface{} { return kd["policy"].(map[string]interface{}) }
	cases := []struct {
		name string
		edit func(kd map[string]interface{})
		msg  string
	}{
		{"latest_version 1e9 (unbounded allocation)", func(kd map[string]interface{}) { policy(kd)["latest_version"] = 1e9 },
			"policy.latest_version 1000000000 is out of range"},
		{"latest_version far beyond the keys held", func(kd map[string]interface{}) {
			policy(kd)["latest_version"] = 100000
			policy(kd)["min_decryption_version"] = 3
		}, "policy.keys lacks version 6"},
		{"min_available_version 5, latest_version 2 (slice bounds)", func(kd map[string]interface{}) {
			p := policy(kd)
			p["min_available_version"], p["latest_version"], p["min_decryption_version"], p["min_encryption_version"], p["archive_version"] = 5, 2, 1, 0, 2
		}, "policy.min_available_version 5 is out of range"},
		{"keys null (nil map)", func(kd map[string]interface{}) { policy(kd)["keys"] = nil }, "policy.keys is missing"},
		{"no archive", func(kd map[string]interface{}) { delete(kd, "archived_keys") }, "archived_keys is missing"},
		{"a version name that is no number", func(kd map[string]interface{}) {
			policy(kd)["keys"].(map[string]interface{})["x"] = policy(kd)["keys"].(map[string]interface{})["5"]
		}, `policy.keys has version "x"`},
		{"key material of the wrong length", func(kd map[string]interface{}) {
			k := policy(kd)["keys"].(map[string]interface{})["5"].(map[string]interface{})
			k["key"] = base64.StdEncoding.EncodeToString([]byte("short"))
		}, "policy.keys.5.key is 5 bytes; a aes256-gcm96 key is 32 bytes"},
		{"unknown type", func(kd map[string]interface{}) { policy(kd)["type"] = 99 }, "policy.type 99 is not a key type"},
		{"archive_min_version above min_available_version", func(kd map[string]interface{}) { policy(kd)["archive_min_version"] = 3 },
			"policy.archive_min_version 3 does not fit"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := e.write(t, "restore/edited", map[string]interface{}{"backup": editBackup(t, backup, tc.edit)})
			requireStatus(t, r, 400, tc.msg)
			requireStatus(t, e.read(t, "keys/edited"), 404, "")
		})
	}
	// The genuine backup restores, with its versions intact.
	e.mustWrite(t, "restore/restored", map[string]interface{}{"backup": backup})
	for v := 3; v <= 5; v++ {
		require.Equal(t, e.decrypt(t, "k", cts[v], nil), e.decrypt(t, "restored", cts[v], nil))
	}
}

// encrypt to a key named with "..", which upsert would create: a 400 as in
// built-in transit, not a storage error answered 500.
func TestKeyNameWithDotDotIsRefused(t *testing.T) {
	e := getTestBackend(t)
	requireStatus(t, e.write(t, "encrypt/a..b", map[string]interface{}{"plaintext": b64("x")}), 400, "relative paths not supported")
	requireStatus(t, e.write(t, "keys/a..b", nil), 400, "relative paths not supported")
	backup := func() string {
		e.mustWrite(t, "keys/ok", map[string]interface{}{"exportable": true, "allow_plaintext_backup": true})
		return backupOf(t, e, "ok")
	}()
	requireStatus(t, e.write(t, "restore/a..b", map[string]interface{}{"backup": backup}), 400, "relative paths not supported")
}

// FuzzCheckBackup: whatever the bytes, checkBackup does not panic, and a
// backup it accepts restores through keysutil without a panic or an
// unbounded allocation; a refused one changes no storage.
func FuzzCheckBackup(f *testing.F) {
	e := getTestBackend(f)
	backupVersionedKey(f, e, "seed")
	f.Add(backupOf(f, e, "seed"))
	f.Add(b64(`{"policy":{"name":"x","keys":null,"latest_version":1}}`))
	f.Add(b64(`{"policy":{"name":"x","type":0,"keys":{"1":{"key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}},"latest_version":1000000000,"min_decryption_version":1,"archive_version":1},"archived_keys":{"keys":[{},{}]}}`))
	f.Add(b64(`{"policy":{"name":"x","type":0,"keys":{"1":{}},"latest_version":2,"min_available_version":5,"min_decryption_version":1},"archived_keys":{"keys":[]}}`))
	f.Fuzz(func(t *testing.T, backup string) {
		_, err := checkBackup(backup)
		if err != nil {
			return
		}
		fe := getTestBackend(t)
		before := storageKeys(t, fe)
		r := fe.write(t, "restore/fuzzed", map[string]interface{}{"backup": backup})
		require.Less(t, r.status, 500, "restore of an accepted backup: %d %s", r.status, r.errorMessage())
		if r.status >= 400 {
			require.Equal(t, before, storageKeys(t, fe), "a refused restore changed storage: %d %s", r.status, r.errorMessage())
		}
	})
}

// storageKeys lists every stored path, for "nothing changed" checks.
func storageKeys(t testing.TB, e *testEnv) []string {
	t.Helper()
	var keys []string
	require.NoError(t, walkStorage(context.Background(), e.storage, "", func(key string, _ []byte) { keys = append(keys, key) }))
	return keys
}
