package hsmtransit

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// backupOf backs up a key, requiring success.
func backupOf(t testing.TB, e *testEnv, name string) string {
	t.Helper()
	r := e.read(t, "backup/"+name)
	requireStatus(t, r, 200, "")
	backup, ok := r.data["backup"].(string)
	require.True(t, ok, "%#v", r.data)
	require.NotEmpty(t, backup)
	return backup
}

// backupVersionedKey makes a backup-able key with five versions, one
// ciphertext per version, v1 trimmed and min_decryption_version 3 (so v2
// is archived only).
func backupVersionedKey(t testing.TB, e *testEnv, name string) map[int]string {
	t.Helper()
	e.mustWrite(t, "keys/"+name, map[string]interface{}{"exportable": true, "allow_plaintext_backup": true})
	cts := map[int]string{1: e.encrypt(t, name, "plaintext 1", nil)}
	for v := 2; v <= 5; v++ {
		e.mustWrite(t, "keys/"+name+"/rotate", nil)
		cts[v] = e.encrypt(t, name, fmt.Sprintf("plaintext %d", v), nil)
	}
	e.mustWrite(t, "keys/"+name+"/config", map[string]interface{}{"min_decryption_version": 3, "min_encryption_version": 3})
	e.mustWrite(t, "keys/"+name+"/trim", map[string]interface{}{"min_available_version": 2})
	return cts
}

// backupCheckDecrypts checks which versions' ciphertexts decrypt.
func backupCheckDecrypts(t *testing.T, e *testEnv, name string, cts map[int]string, from int) {
	t.Helper()
	for v := 1; v <= 5; v++ {
		r := e.write(t, "decrypt/"+name, map[string]interface{}{"ciphertext": cts[v]})
		if v < from {
			require.Equalf(t, 400, r.status, "version %d decrypted", v)
			continue
		}
		requireStatus(t, r, 200, "")
		require.Equal(t, fmt.Sprintf("plaintext %d", v), unb64(t, r.data["plaintext"].(string)), "version %d", v)
	}
}

func TestBackupRequiresExportableAndPlaintextBackup(t *testing.T) {
	e := getTestBackend(t)
	cases := []struct {
		name   string
		create map[string]interface{}
		status int
		msg    string
	}{
		{"neither", nil, 400, "exporting is disallowed"},
		{"exportable only", map[string]interface{}{"exportable": true}, 400, "plaintext backup is disallowed"},
		{"plaintext backup only", map[string]interface{}{"allow_plaintext_backup": true}, 400, "exporting is disallowed"},
		{"both", map[string]interface{}{"exportable": true, "allow_plaintext_backup": true}, 200, ""},
		{"both, rsa", map[string]interface{}{"type": "rsa-2048", "exportable": true, "allow_plaintext_backup": true}, 200, ""},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			name := fmt.Sprintf("k%d", i)
			e.mustWrite(t, "keys/"+name, tc.create)
			r := e.read(t, "backup/"+name)
			requireStatus(t, r, tc.status, tc.msg)
			if tc.status == 200 {
				require.NotEmpty(t, r.data["backup"])
				require.NotNil(t, e.read(t, "keys/"+name).data["backup_info"])
			} else {
				require.Nil(t, r.data["backup"])
				require.Nil(t, e.read(t, "keys/"+name).data["backup_info"], "a refused backup was recorded")
			}
		})
	}
	t.Run("missing key", func(t *testing.T) {
		r := e.read(t, "backup/nope")
		requireStatus(t, r, 404, "")
	})
	t.Run("allowed later through config", func(t *testing.T) {
		e.mustWrite(t, "keys/k0/config", map[string]interface{}{"exportable": true, "allow_plaintext_backup": true})
		backupOf(t, e, "k0")
	})
}

func TestBackupRestoreRoundTrip(t *testing.T) {
	e := getTestBackend(t)
	cts := backupVersionedKey(t, e, "k")
	backupCheckDecrypts(t, e, "k", cts, 3)

	before := time.Now().Add(-time.Minute)
	backup := backupOf(t, e, "k")

	e.mustWrite(t, "keys/k/config", map[string]interface{}{"deletion_allowed": true})
	r := e.del(t, "keys/k")
	require.Contains(t, []int{200, 204}, r.status, r.errorMessage())
	require.Equal(t, 404, e.read(t, "keys/k").status)

	r = e.write(t, "restore", map[string]interface{}{"backup": backup})
	requireStatus(t, r, 204, "")

	key := e.read(t, "keys/k")
	requireStatus(t, key, 200, "")
	require.Equal(t, float64(5), key.data["latest_version"])
	require.Equal(t, float64(3), key.data["min_decryption_version"])
	require.Equal(t, float64(2), key.data["min_available_version"])

	t.Run("backup_info and restore_info", func(t *testing.T) {
		for _, field := range []string{"backup_info", "restore_info"} {
			info, ok := key.data[field].(map[string]interface{})
			require.True(t, ok, "%s: %#v", field, key.data[field])
			require.Equal(t, float64(5), info["version"], field)
			ts, err := time.Parse(time.RFC3339Nano, info["time"].(string))
			require.NoError(t, err)
			require.True(t, ts.After(before), "%s time %v", field, ts)
		}
	})
	t.Run("versions above min_decryption_version decrypt", func(t *testing.T) {
		backupCheckDecrypts(t, e, "k", cts, 3)
	})
	t.Run("archived version 2 came back", func(t *testing.T) {
		e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 2})
		backupCheckDecrypts(t, e, "k", cts, 2)
	})
	t.Run("trimmed version 1 stays gone", func(t *testing.T) {
		r := e.write(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 1})
		requireStatus(t, r, 400, "min decryption version should not be less then min available version")
	})
	t.Run("encrypts with the latest version", func(t *testing.T) {
		ct := e.encrypt(t, "k", "after restore", nil)
		require.Contains(t, ct, "vault:v5:")
		require.Equal(t, "after restore", e.decrypt(t, "k", ct, nil))
	})
}

func TestRestoreUnderNewName(t *testing.T) {
	e := getTestBackend(t)
	cts := backupVersionedKey(t, e, "orig")
	backup := backupOf(t, e, "orig")

	r := e.write(t, "restore/copy", map[string]interface{}{"backup": backup})
	requireStatus(t, r, 204, "")

	copyKey := e.read(t, "keys/copy")
	requireStatus(t, copyKey, 200, "")
	require.Equal(t, "copy", copyKey.data["name"])
	backupCheckDecrypts(t, e, "copy", cts, 3)

	// The archive is the copy's own: lowering its min_decryption_version
	// reaches archived version 2.
	e.mustWrite(t, "keys/copy/config", map[string]interface{}{"min_decryption_version": 2})
	backupCheckDecrypts(t, e, "copy", cts, 2)

	// The original is unchanged and still there.
	backupCheckDecrypts(t, e, "orig", cts, 3)
	require.Nil(t, e.read(t, "keys/orig").data["restore_info"])

	// Rotating the copy does not touch the original.
	e.mustWrite(t, "keys/copy/rotate", nil)
	require.Equal(t, float64(6), e.read(t, "keys/copy").data["latest_version"])
	require.Equal(t, float64(5), e.read(t, "keys/orig").data["latest_version"])
}

func TestRestoreOntoExistingKey(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", map[string]interface{}{"exportable": true, "allow_plaintext_backup": true})
	oldCT := e.encrypt(t, "k", "old key", nil)
	backup := backupOf(t, e, "k")

	e.mustWrite(t, "keys/other", nil)
	otherCT := e.encrypt(t, "other", "other key", nil)

	cases := []struct {
		name string
		path string
		data map[string]interface{}
	}{
		{"same name", "restore", map[string]interface{}{"backup": backup}},
		{"same name, force false", "restore", map[string]interface{}{"backup": backup, "force": false}},
		{"onto another key", "restore/other", map[string]interface{}{"backup": backup}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := e.write(t, tc.path, tc.data)
			requireStatus(t, r, 400, "already exists")
		})
	}
	require.Equal(t, "other key", e.decrypt(t, "other", otherCT, nil), "a refused restore changed the key")

	t.Run("force", func(t *testing.T) {
		r := e.write(t, "restore/other", map[string]interface{}{"backup": backup, "force": true})
		requireStatus(t, r, 204, "")
		// "other" is now the backed-up key.
		require.Equal(t, "old key", e.decrypt(t, "other", oldCT, nil))
		r = e.write(t, "decrypt/other", map[string]interface{}{"ciphertext": otherCT})
		requireStatus(t, r, 400, "message authentication failed")
	})
	t.Run("force onto itself after rotation", func(t *testing.T) {
		e.mustWrite(t, "keys/k/rotate", nil)
		require.Equal(t, float64(2), e.read(t, "keys/k").data["latest_version"])
		r := e.write(t, "restore", map[string]interface{}{"backup": backup, "force": true})
		requireStatus(t, r, 204, "")
		require.Equal(t, float64(1), e.read(t, "keys/k").data["latest_version"])
		require.Equal(t, "old key", e.decrypt(t, "k", oldCT, nil))
	})
}

func TestRestoreErrors(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", map[string]interface{}{"exportable": true, "allow_plaintext_backup": true})
	backup := backupOf(t, e, "k")

	slashed, err := json.Marshal(map[string]interface{}{"policy": map[string]interface{}{"name": "a/b"}})
	require.NoError(t, err)

	cases := []struct {
		name string
		path string
		data map[string]interface{}
		msg  string
	}{
		{"missing backup", "restore", nil, "'backup' must be supplied"},
		{"empty backup", "restore/x", map[string]interface{}{"backup": ""}, "'backup' must be supplied"},
		{"garbage backup", "restore", map[string]interface{}{"backup": "!!! not a backup !!!"}, "invalid backup: not base64"},
		{"garbage backup, named", "restore/x", map[string]interface{}{"backup": "!!! not a backup !!!"}, "invalid backup: not base64"},
		{"base64 of garbage", "restore/x", map[string]interface{}{"backup": b64("not json")}, "invalid backup: not a transit key backup"},
		{"name with a slash", "restore/a/b", map[string]interface{}{"backup": backup}, "key names cannot be paths"},
		{"backed-up name with a slash", "restore", map[string]interface{}{"backup": editBackup(t, backup, func(kd map[string]interface{}) {
			kd["policy"].(map[string]interface{})["name"] = "a/b"
		})}, "key names cannot be paths"},
		{"a backup that is only a name", "restore", map[string]interface{}{"backup": base64.StdEncoding.EncodeToString(slashed)}, "policy.latest_version 0 is out of range"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := e.write(t, tc.path, tc.data)
			t.Logf("%d %s", r.status, r.errorMessage())
			requireStatus(t, r, 400, tc.msg)
		})
	}
	require.Equal(t, 404, e.read(t, "keys/x").status)
	require.Equal(t, 404, e.read(t, "keys/a").status)
}

// JSON without a policy is a caller's malformed backup: it must be refused,
// not crash the plugin.
func TestRestoreBackupWithoutPolicy(t *testing.T) {
	e := getTestBackend(t)
	cases := []struct {
		name string
		path string
		json string
		msg  string
	}{
		{"empty object", "restore", `{}`, "invalid backup: the backup holds no key policy"},
		{"empty object, named", "restore/x", `{}`, "invalid backup: the backup holds no key policy"},
		{"null policy, named", "restore/x", `{"policy":null,"archived_keys":null}`, "invalid backup: the backup holds no key policy"},
		{"policy without a name", "restore", `{"policy":{"type":0,"keys":{}}}`, "invalid backup: policy.latest_version 0 is out of range"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var r result
			var panicked interface{}
			func() {
				defer func() { panicked = recover() }()
				r = e.write(t, tc.path, map[string]interface{}{"backup": b64(tc.json)})
			}()
			require.Nil(t, panicked, "restore panicked: %v", panicked)
			requireStatus(t, r, 400, tc.msg)
		})
	}
}

func TestRestoreIntoAnotherMount(t *testing.T) {
	a, b := getTestBackend(t), getTestBackend(t)
	cts := backupVersionedKey(t, a, "k")
	backup := backupOf(t, a, "k")

	r := b.write(t, "restore", map[string]interface{}{"backup": backup})
	requireStatus(t, r, 204, "")
	backupCheckDecrypts(t, b, "k", cts, 3)
	b.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 2})
	backupCheckDecrypts(t, b, "k", cts, 2)

	// B's ciphertexts decrypt in A too: the same key.
	ct := b.encrypt(t, "k", "plaintext 5", nil)
	require.Equal(t, "plaintext 5", a.decrypt(t, "k", ct, nil))

	info, ok := b.read(t, "keys/k").data["restore_info"].(map[string]interface{})
	require.True(t, ok)
	require.Equal(t, float64(5), info["version"])
	require.Nil(t, a.read(t, "keys/k").data["restore_info"])
}
