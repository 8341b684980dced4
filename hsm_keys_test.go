package hsmtransit

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// tokenLabels lists the HSM objects of a mount's key.
func tokenLabels(t *testing.T, e *testEnv, token, key string) []string {
	t.Helper()
	tok, err := hsm.Open(hsm.Config{Library: softhsmLib, TokenLabel: token, PIN: testPIN})
	require.NoError(t, err)
	defer tok.Close()
	labels, err := tok.KeyLabels(fmt.Sprintf("hsm-transit/%s/%s/", e.mountUUID, key))
	require.NoError(t, err)
	return labels
}

func TestHSMKeyCreateAndRead(t *testing.T) {
	e := getTestBackend(t)
	data := e.mustWrite(t, "keys/vault-key", map[string]interface{}{"hsm": true})
	require.Equal(t, true, data["hsm"])
	require.Equal(t, "aes256-gcm96", data["type"])
	require.Equal(t, float64(1), data["latest_version"])
	labels := data["hsm_labels"].(map[string]interface{})
	label := fmt.Sprintf("hsm-transit/%s/vault-key/v1", e.mountUUID)
	require.Equal(t, label, labels["1"])
	require.Equal(t, []string{label}, tokenLabels(t, e, testToken, "vault-key"))

	tok, err := hsm.Open(hsm.Config{Library: softhsmLib, TokenLabel: testToken, PIN: testPIN})
	require.NoError(t, err)
	defer tok.Close()
	attrs, err := tok.Attributes(label)
	require.NoError(t, err)
	require.Equal(t, hsm.KeyAttributes{Sensitive: true, NeverExtractable: true, Token: true}, attrs)

	read := e.read(t, "keys/vault-key")
	require.Equal(t, data, read.data)
	r := e.write(t, "keys/vault-key", nil)
	require.Contains(t, r.resp.Warnings, "key vault-key already existed")
	require.Equal(t, true, r.data["hsm"])

	names := e.do(t, logical.ListOperation, "keys/", nil).data["keys"]
	require.Contains(t, names, "vault-key")

	// Only labels and metadata are stored.
	entry, err := e.sealed(t).Get(context.Background(), hsmKeyPrefix+"vault-key")
	require.NoError(t, err)
	require.Contains(t, string(entry.Value), label)
	require.NotContains(t, string(entry.Value), `"key"`)
	// And stored sealed, like every entry: a storage reader learns
	// nothing of them.
	check := requireMountSealed(t, e, nil)
	require.Contains(t, check.opened, hsmKeyPrefix+"vault-key")
}

func TestHSMKeyRefusals(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/soft", nil)
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})
	ct := e.encrypt(t, "hk", "x", nil)

	cases := []struct {
		name string
		op   logical.Operation
		path string
		data map[string]interface{}
		msg  string
	}{
		{"rsa type", logical.UpdateOperation, "keys/new", map[string]interface{}{"hsm": true, "type": "rsa-2048"}, "support type aes256-gcm96 only"},
		{"aes128", logical.UpdateOperation, "keys/new", map[string]interface{}{"hsm": true, "type": "aes128-gcm96"}, "support type aes256-gcm96 only"},
		{"derived", logical.UpdateOperation, "keys/new", map[string]interface{}{"hsm": true, "derived": true}, "not derived"},
		{"convergent", logical.UpdateOperation, "keys/new", map[string]interface{}{"hsm": true, "derived": true, "convergent_encryption": true}, "not derived"},
		{"exportable", logical.UpdateOperation, "keys/new", map[string]interface{}{"hsm": true, "exportable": true}, "cannot be exportable"},
		{"plaintext backup", logical.UpdateOperation, "keys/new", map[string]interface{}{"hsm": true, "allow_plaintext_backup": true}, "cannot be backed up"},
		{"software key of that name", logical.UpdateOperation, "keys/soft", map[string]interface{}{"hsm": true}, "already exists as a software key"},
		{"export", logical.ReadOperation, "export/encryption-key/hk", nil, "is HSM-resident"},
		{"backup", logical.ReadOperation, "backup/hk", nil, "is HSM-resident"},
		{"configure exportable", logical.UpdateOperation, "keys/hk/config", map[string]interface{}{"exportable": true}, "cannot be exported"},
		{"configure plaintext backup", logical.UpdateOperation, "keys/hk/config", map[string]interface{}{"allow_plaintext_backup": true}, "cannot be exported"},
		{"sign", logical.UpdateOperation, "sign/hk", map[string]interface{}{"input": b64("x")}, "is HSM-resident"},
		{"hmac", logical.UpdateOperation, "hmac/hk", map[string]interface{}{"input": b64("x")}, "is HSM-resident"},
		{"csr", logical.UpdateOperation, "keys/hk/csr", nil, "is HSM-resident"},
		{"import over it", logical.UpdateOperation, "keys/hk/import", map[string]interface{}{"public_key": "x", "type": "ed25519"}, "is HSM-resident"},
		{"restore over it", logical.UpdateOperation, "restore/hk", map[string]interface{}{"backup": b64(`{"policy":{"name":"x"}}`)}, "is HSM-resident"},
		{"context", logical.UpdateOperation, "encrypt/hk", map[string]interface{}{"plaintext": b64("x"), "context": b64("c")}, "not derived"},
		{"nonce", logical.UpdateOperation, "encrypt/hk", map[string]interface{}{"plaintext": b64("x"), "nonce": b64("123456789012")}, "provided nonce not allowed"},
		{"padding", logical.UpdateOperation, "decrypt/hk", map[string]interface{}{"ciphertext": ct, "padding_scheme": "oaep"}, "padding scheme"},
		{"datakey context", logical.UpdateOperation, "datakey/plaintext/hk", map[string]interface{}{"context": b64("c")}, "not derived"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			requireStatus(t, e.do(t, tc.op, tc.path, tc.data), 400, tc.msg)
		})
	}
	requireStatus(t, e.read(t, "keys/new"), 404, "")
	require.Equal(t, false, e.read(t, "keys/soft").data["hsm"] == true)
}

func TestHSMKeyCrypto(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})

	ct := e.encrypt(t, "hk", "inside the HSM", nil)
	require.True(t, strings.HasPrefix(ct, "vault:v1:"))
	require.Equal(t, "inside the HSM", e.decrypt(t, "hk", ct, nil))

	ad := map[string]interface{}{"associated_data": b64("row 7")}
	ctAD := e.encrypt(t, "hk", "with AAD", ad)
	require.Equal(t, "with AAD", e.decrypt(t, "hk", ctAD, ad))
	requireStatus(t, e.write(t, "decrypt/hk", map[string]interface{}{"ciphertext": ctAD}), 400, "message authentication failed")

	// Batches, with references and a bad item.
	r := e.write(t, "encrypt/hk", map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"plaintext": b64("a"), "reference": "1"},
		map[string]interface{}{"plaintext": "%%", "reference": "2"},
		map[string]interface{}{"plaintext": b64("c"), "reference": "3"},
	}})
	requireStatus(t, r, 400, "")
	res := r.data["batch_results"].([]interface{})
	require.Len(t, res, 3)
	require.Equal(t, "2", res[1].(map[string]interface{})["reference"])
	require.Contains(t, res[1].(map[string]interface{})["error"], "illegal base64")
	dec := e.mustWrite(t, "decrypt/hk", map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"ciphertext": res[0].(map[string]interface{})["ciphertext"], "reference": "a"},
		map[string]interface{}{"ciphertext": res[2].(map[string]interface{})["ciphertext"], "reference": "c"},
	}})
	got := dec["batch_results"].([]interface{})
	require.Len(t, got, 2)
	require.Equal(t, "a", unb64(t, got[0].(map[string]interface{})["plaintext"].(string)))
	require.Equal(t, "c", unb64(t, got[1].(map[string]interface{})["plaintext"].(string)))

	// Data keys from the HSM's generator, wrapped by the HSM key.
	for _, bits := range []int{128, 256, 512} {
		dk := e.mustWrite(t, "datakey/plaintext/hk", map[string]interface{}{"bits": bits})
		require.Len(t, unb64(t, dk["plaintext"].(string)), bits/8)
		require.Equal(t, unb64(t, dk["plaintext"].(string)), e.decrypt(t, "hk", dk["ciphertext"].(string), nil))
		wrapped := e.mustWrite(t, "datakey/wrapped/hk", map[string]interface{}{"bits": bits})
		require.NotContains(t, wrapped, "plaintext")
		require.Len(t, e.decrypt(t, "hk", wrapped["ciphertext"].(string), nil), bits/8)
	}

	// Rotate and rewrap.
	e.mustWrite(t, "keys/hk/rotate", nil)
	rw := e.mustWrite(t, "rewrap/hk", map[string]interface{}{"ciphertext": ct})
	require.True(t, strings.HasPrefix(rw["ciphertext"].(string), "vault:v2:"))
	require.Equal(t, "inside the HSM", e.decrypt(t, "hk", rw["ciphertext"].(string), nil))
	rw = e.mustWrite(t, "rewrap/hk", map[string]interface{}{"ciphertext": ctAD, "associated_data": b64("row 7")})
	require.Equal(t, "with AAD", e.decrypt(t, "hk", rw["ciphertext"].(string), ad))

	// Survives a restart: the metadata is in sealed storage, the key in the HSM.
	e = e.restart(t)
	require.Equal(t, "inside the HSM", e.decrypt(t, "hk", ct, nil))
	require.Equal(t, true, e.read(t, "keys/hk").data["hsm"])
}

// TestVersionRulesForBothResidencies runs one table of rotations, minimum
// versions and trims against a software key and an HSM-resident key: every
// answer must be the one the table expects (built-in transit's), and so the
// same for both.
func TestVersionRulesForBothResidencies(t *testing.T) {
	type outcome struct {
		status  int
		message string
		// version is key_version (encrypt), latest_version (rotate),
		// min_decryption_version (config, trim) or the plaintext
		// (decrypt).
		version interface{}
	}
	type step struct {
		path string
		data map[string]interface{}
		// decrypt, when set, is the index of an earlier ciphertext.
		decrypt int
		want    outcome
	}
	ok := func(version interface{}) outcome { return outcome{status: 200, version: version} }
	refused := func(msg string) outcome { return outcome{status: 400, message: msg} }
	const tooOld = "ciphertext or signature version is disallowed by policy (too old)"
	steps := []step{
		{path: "encrypt", data: map[string]interface{}{"plaintext": b64("v1")}, decrypt: -1, want: ok(float64(1))},
		{path: "rotate", decrypt: -1, want: ok(float64(2))},
		{path: "encrypt", data: map[string]interface{}{"plaintext": b64("v2")}, decrypt: -1, want: ok(float64(2))},
		{path: "rotate", decrypt: -1, want: ok(float64(3))},
		{path: "encrypt", data: map[string]interface{}{"plaintext": b64("v3")}, decrypt: -1, want: ok(float64(3))},
		{path: "encrypt", data: map[string]interface{}{"plaintext": b64("x"), "key_version": 2}, decrypt: -1, want: ok(float64(2))},
		{path: "encrypt", data: map[string]interface{}{"plaintext": b64("x"), "key_version": 4}, decrypt: -1,
			want: refused("requested version for encryption is higher than the latest key version")},
		{path: "decrypt", decrypt: 0, want: ok("v1")},
		{path: "config", data: map[string]interface{}{"min_decryption_version": 2}, decrypt: -1, want: ok(float64(2))},
		{path: "decrypt", decrypt: 0, want: refused(tooOld)},
		{path: "decrypt", decrypt: 2, want: ok("v3")},
		{path: "config", data: map[string]interface{}{"min_encryption_version": 1}, decrypt: -1,
			want: refused("cannot set min encryption/decryption values; min encryption version of 1 must be greater than or equal to min decryption version of 2")},
		{path: "config", data: map[string]interface{}{"min_encryption_version": 3}, decrypt: -1, want: ok(float64(2))},
		{path: "encrypt", data: map[string]interface{}{"plaintext": b64("x"), "key_version": 2}, decrypt: -1,
			want: refused("requested version for encryption is less than the minimum encryption key version")},
		{path: "config", data: map[string]interface{}{"min_decryption_version": 4}, decrypt: -1,
			want: refused("cannot set min decryption version of 4, latest key version is 3")},
		{path: "config", data: map[string]interface{}{"min_decryption_version": 1}, decrypt: -1, want: ok(float64(1))},
		{path: "decrypt", decrypt: 0, want: ok("v1")},
		{path: "trim", data: map[string]interface{}{"min_available_version": 4}, decrypt: -1,
			want: refused("minimum available version cannot be greater than minmum encryption version")},
		{path: "config", data: map[string]interface{}{"min_decryption_version": 3}, decrypt: -1, want: ok(float64(3))},
		{path: "trim", data: map[string]interface{}{"min_available_version": 2}, decrypt: -1, want: ok(float64(3))},
		{path: "decrypt", decrypt: 0, want: refused(tooOld)},
		{path: "decrypt", decrypt: 2, want: ok("v3")},
		{path: "trim", data: map[string]interface{}{"min_available_version": 1}, decrypt: -1,
			want: refused("minimum available version cannot be decremented")},
		{path: "config", data: map[string]interface{}{"min_decryption_version": 1}, decrypt: -1,
			want: refused("min decryption version should not be less then min available version")},
		{path: "config", data: map[string]interface{}{"auto_rotate_period": "30m"}, decrypt: -1,
			want: refused("auto rotate period must be 0 to disable or at least an hour")},
		{path: "delete", decrypt: -1, want: refused("error deleting policy k: deletion is not allowed for this key")},
		{path: "config", data: map[string]interface{}{"deletion_allowed": true}, decrypt: -1, want: ok(float64(3))},
		{path: "delete", decrypt: -1, want: outcome{status: 204}},
		{path: "decrypt", decrypt: 2, want: refused("encryption key not found")},
	}
	run := func(hsmKey bool) []outcome {
		e := getTestBackend(t)
		e.mustWrite(t, "keys/k", map[string]interface{}{"hsm": hsmKey})
		var cts []string
		var out []outcome
		for _, st := range steps {
			var r result
			switch st.path {
			case "encrypt":
				r = e.write(t, "encrypt/k", st.data)
				if r.status == 200 {
					cts = append(cts, r.data["ciphertext"].(string))
				} else {
					cts = append(cts, "")
				}
			case "decrypt":
				r = e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": cts[st.decrypt]})
			case "rotate":
				r = e.write(t, "keys/k/rotate", nil)
			case "config":
				r = e.write(t, "keys/k/config", st.data)
			case "trim":
				r = e.write(t, "keys/k/trim", st.data)
			case "delete":
				r = e.del(t, "keys/k")
			}
			o := outcome{status: r.status, message: r.errorMessage()}
			if r.data != nil {
				o.version = r.data["key_version"]
				if st.path == "rotate" {
					o.version = r.data["latest_version"]
				}
				if o.version == nil {
					o.version = r.data["min_decryption_version"]
				}
				if p, ok := r.data["plaintext"].(string); ok {
					o.version = unb64(t, p)
				}
			}
			out = append(out, o)
		}
		return out
	}
	software, inHSM := run(false), run(true)
	for i, st := range steps {
		require.Equal(t, st.want, software[i], "software key, step %d (%s %v)", i, st.path, st.data)
		require.Equal(t, st.want, inHSM[i], "HSM-resident key, step %d (%s %v)", i, st.path, st.data)
	}
}

func TestHSMKeyTrimAndDeleteDestroyObjects(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})
	var cts []string
	for i := 0; i < 3; i++ {
		if i > 0 {
			e.mustWrite(t, "keys/hk/rotate", nil)
		}
		cts = append(cts, e.encrypt(t, "hk", fmt.Sprint("v", i+1), nil))
	}
	require.Len(t, tokenLabels(t, e, testToken, "hk"), 3)

	e.mustWrite(t, "keys/hk/config", map[string]interface{}{"min_decryption_version": 2, "min_encryption_version": 2})
	e.mustWrite(t, "keys/hk/trim", map[string]interface{}{"min_available_version": 2})
	labels := tokenLabels(t, e, testToken, "hk")
	require.Len(t, labels, 2)
	require.NotContains(t, labels, fmt.Sprintf("hsm-transit/%s/hk/v1", e.mountUUID))
	require.Equal(t, "v2", e.decrypt(t, "hk", cts[1], nil))

	// A copy of storage taken before the delete: crypto-shredding means it
	// is no use once the HSM objects are destroyed.
	snapshot := copyStorage(t, e.storage)

	requireStatus(t, e.del(t, "keys/hk"), 400, "deletion is not allowed")
	e.mustWrite(t, "keys/hk/config", map[string]interface{}{"deletion_allowed": true})
	requireStatus(t, e.del(t, "keys/hk"), 204, "")
	require.Empty(t, tokenLabels(t, e, testToken, "hk"), "every object of the key is destroyed")
	requireStatus(t, e.read(t, "keys/hk"), 404, "")
	requireStatus(t, e.write(t, "decrypt/hk", map[string]interface{}{"ciphertext": cts[2]}), 400, "encryption key not found")

	// The same name again is a new key: the old ciphertexts stay dead.
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})
	requireStatus(t, e.write(t, "decrypt/hk", map[string]interface{}{"ciphertext": cts[0]}), 400, "message authentication failed")
	// The deleted key's tombstone and the new key's entries are sealed.
	requireMountSealed(t, e, nil)

	restored := startBackend(t, snapshot, e.mountUUID)
	for _, ct := range cts[1:] {
		r := restored.write(t, "decrypt/hk", map[string]interface{}{"ciphertext": ct})
		// Restored storage cannot bring the key back: the objects are gone.
		requireStatus(t, r, 400, "this version of the key is no longer in the HSM (it was destroyed)")
	}
}

func copyStorage(t *testing.T, s logical.Storage) logical.Storage {
	t.Helper()
	out := &logical.InmemStorage{}
	require.NoError(t, walkStorage(context.Background(), s, "", func(key string, value []byte) {
		require.NoError(t, out.Put(context.Background(), &logical.StorageEntry{Key: key, Value: append([]byte{}, value...)}))
	}))
	return out
}

// TestHSMKeyConcurrency has 120 goroutines use one HSM-resident key while it
// rotates.
func TestHSMKeyConcurrency(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})
	var wg sync.WaitGroup
	errs := make(chan error, 1000)
	for w := 0; w < 120; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 5; i++ {
				if w%40 == 0 && i == 2 {
					if _, err := e.call(logical.UpdateOperation, "keys/hk/rotate", nil); err != nil {
						errs <- err
					}
				}
				pt := b64(fmt.Sprintf("%d/%d", w, i))
				resp, err := e.call(logical.UpdateOperation, "encrypt/hk", map[string]interface{}{"plaintext": pt})
				if err != nil {
					errs <- err
					continue
				}
				resp, err = e.call(logical.UpdateOperation, "decrypt/hk", map[string]interface{}{"ciphertext": resp.Data["ciphertext"]})
				if err != nil {
					errs <- err
					continue
				}
				if resp.Data["plaintext"] != pt {
					errs <- fmt.Errorf("round trip of %s gave %v", pt, resp.Data["plaintext"])
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	require.Equal(t, float64(4), e.read(t, "keys/hk").data["latest_version"])
}

func TestHSMKeyOutageAndRecovery(t *testing.T) {
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	e.mustWrite(t, "config/seal", withSeal(map[string]interface{}{"token_label": hsmOutage, "key_label": "kek", "generate_key": true}))
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})
	ct := e.encrypt(t, "hk", "kept in the HSM", nil)

	dir, err := softhsm.TokenDir(softhsmConf, hsmOutage)
	require.NoError(t, err)
	aside := filepath.Join(t.TempDir(), "aside")
	require.NoError(t, os.Rename(dir, aside))
	// The root key stays unsealed in memory: software keys keep working,
	// the HSM-resident key does not.
	e.mustWrite(t, "keys/soft", nil)
	e.encrypt(t, "soft", "still fine", nil)
	requireStatus(t, e.write(t, "decrypt/hk", map[string]interface{}{"ciphertext": ct}), 503, "HSM is unavailable")
	requireStatus(t, e.write(t, "encrypt/hk", map[string]interface{}{"plaintext": b64("x")}), 503, "HSM is unavailable")

	require.NoError(t, os.Rename(aside, dir))
	require.Eventually(t, func() bool {
		r := e.write(t, "decrypt/hk", map[string]interface{}{"ciphertext": ct})
		return r.status == 200
	}, 20*time.Second, 100*time.Millisecond)
	require.Equal(t, "kept in the HSM", e.decrypt(t, "hk", ct, nil))
}

func TestHSMKeyAutoRotate(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true, "auto_rotate_period": "1h"})
	k, unlock, err := e.b.hsmKeyFor(context.Background(), e.sealed(t), "hk", true)
	require.NoError(t, err)
	v := k.Versions[1]
	v.Created = v.Created.Add(-2 * time.Hour)
	k.Versions[1] = v
	unlock()
	require.NoError(t, e.b.periodic(context.Background(), &logical.Request{Storage: e.storage}))
	require.Equal(t, float64(2), e.read(t, "keys/hk").data["latest_version"])
	require.Len(t, tokenLabels(t, e, testToken, "hk"), 2)
}

// A name whose labels would not fit a token label is a 400 that says how
// long a name may be, and leaves nothing in the token.
func TestHSMKeyNameTooLong(t *testing.T) {
	e := getTestBackend(t)
	name := strings.Repeat("n", 100)
	r := e.write(t, "keys/"+name, map[string]interface{}{"hsm": true})
	requireStatus(t, r, 400, "too long for an HSM-resident key")
	requireStatus(t, r, 400, "use a name of at most")
	requireStatus(t, e.read(t, "keys/"+name), 404, "")
	labels, err := openTestToken(t).KeyLabels(e.b.hsmKeys.LabelPrefix(name))
	require.NoError(t, err)
	require.Empty(t, labels)
	// The longest name allowed works.
	short := strings.Repeat("n", 128-len(e.b.hsmKeys.Label("", 1_000_000)))
	e.mustWrite(t, "keys/"+short, map[string]interface{}{"hsm": true})
	require.Equal(t, "fits", e.decrypt(t, short, e.encrypt(t, short, "fits", nil), nil))
}

// landedFailingStorage stores one write to failKey and then reports it
// failed, as a Vault that dies mid-request does when Raft already committed
// the write.
type landedFailingStorage struct {
	logical.Storage
	failKey atomic.Value // string
}

func (s *landedFailingStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	if err := s.Storage.Put(ctx, e); err != nil {
		return err
	}
	if k, _ := s.failKey.Load().(string); k != "" && e.Key == k {
		s.failKey.Store("")
		return errors.New("connection to Vault lost")
	}
	return nil
}

// TestHSMKeyRotationWriteThatLandedKeepsItsObject: a rotation whose record
// was stored though the write reported an error keeps the new version's
// object in the token: storage records the version, so its object must
// exist (a failover once left such a key answering 400 until rotated again).
func TestHSMKeyRotationWriteThatLandedKeepsItsObject(t *testing.T) {
	fs := &landedFailingStorage{Storage: &logical.InmemStorage{}}
	e := startBackend(t, fs, newMountUUID(t))
	e.mustWrite(t, "config/seal", testSealConfig())
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})
	ct1 := e.encrypt(t, "hk", "before", nil)
	fs.failKey.Store(hsmKeyPrefix + "hk")
	r := e.write(t, "keys/hk/rotate", nil)
	requireStatus(t, r, 500, "connection to Vault lost") // the rotation reports the failed write
	ct2 := e.encrypt(t, "hk", "after", nil)
	require.True(t, strings.HasPrefix(ct2, "vault:v2:"), "storage records v2, and the key is read again from it: %s", ct2)
	require.Equal(t, "after", e.decrypt(t, "hk", ct2, nil))
	require.Equal(t, "before", e.decrypt(t, "hk", ct1, nil))
	// A restart reads the same.
	e2 := e.restart(t)
	require.Equal(t, "after", e2.decrypt(t, "hk", ct2, nil))
}

// TestHSMKeyBatchRuns: a batch on an HSM-resident key is encrypted,
// decrypted and rewrapped in runs, one call to the token per run, step and
// version (hsmItemsEncrypt, hsmItemsDecrypt, rewrapEach); every item
// still gets its own answer: the version it asked for, its own plaintext
// and associated data, and for an item refused, the error that item alone
// gets in a request of its own. The batch is large enough to be spread
// over workers and mixes versions within runs, through the plugin boundary
// and without it.
func TestHSMKeyBatchRuns(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})
	e.mustWrite(t, "keys/hk/rotate", nil)
	e.mustWrite(t, "keys/hk/rotate", nil) // versions 1 to 3

	const n = 150
	items := make([]interface{}, n)
	for i := range items {
		it := map[string]interface{}{"plaintext": b64(fmt.Sprintf("item %d", i)), "reference": fmt.Sprint(i)}
		if v := i % 4; v != 0 {
			it["key_version"] = v
		}
		if i%5 == 1 {
			it["associated_data"] = b64(fmt.Sprintf("row %d", i))
		}
		switch {
		case i%13 == 5:
			it["plaintext"] = "%%not base64"
		case i%17 == 6:
			it["key_version"] = 9
		case i%19 == 7:
			it["nonce"] = b64("twelve bytes")
		}
		items[i] = it
	}
	check := func(t *testing.T, results []interface{}, refusals bool) {
		require.Equal(t, len(items), len(results), "results")
		failed := 0
		for i, r := range results {
			got := r.(map[string]interface{})
			in := items[i].(map[string]interface{})
			require.Equal(t, in["reference"], got["reference"], "item %d", i)
			single := e.write(t, "encrypt/hk", in)
			if msg, _ := got["error"].(string); msg != "" {
				failed++
				requireStatus(t, single, 400, "")
				require.Equal(t, single.errorMessage(), msg, "item %d: the batch's error is not the item's own", i)
				continue
			}
			requireStatus(t, single, 200, "")
			want := in["key_version"]
			if want == nil {
				want = 3
			}
			ct := got["ciphertext"].(string)
			require.True(t, strings.HasPrefix(ct, fmt.Sprintf("vault:v%d:", want)), "item %d: %s", i, ct)
			extra := map[string]interface{}{}
			if ad, ok := in["associated_data"]; ok {
				extra["associated_data"] = ad
				// Bound to its own associated data.
				requireStatus(t, e.write(t, "decrypt/hk", map[string]interface{}{"ciphertext": ct}), 400, "message authentication failed")
			}
			require.Equal(t, unb64(t, in["plaintext"].(string)), e.decrypt(t, "hk", ct, extra), "item %d", i)
		}
		if refusals {
			require.Greater(t, failed, 20, "the refused items are there")
		} else {
			require.Zero(t, failed)
		}
	}

	var sealed []interface{} // the map run's results
	t.Run("map", func(t *testing.T) {
		r := e.write(t, "encrypt/hk", map[string]interface{}{"batch_input": items})
		requireStatus(t, r, 400, "")
		require.Contains(t, r.data, "batch_results", "%s", r.errorMessage())
		sealed = r.data["batch_results"].([]interface{})
		check(t, sealed, true)
	})
	// Through the boundary, a batch with refused items comes back as a
	// 400 with a raw body; one without, pre-encoded (boundary.PreEncode).
	viaBoundary := func(t *testing.T, items []interface{}) []interface{} {
		body, err := json.Marshal(map[string]interface{}{"batch_input": items})
		require.NoError(t, err)
		var reply struct {
			Status       int           `json:"http_status_code"`
			Body         string        `json:"http_raw_body"`
			BatchResults []interface{} `json:"batch_results"`
		}
		require.NoError(t, json.Unmarshal([]byte(e.viaBoundary(t, "encrypt/hk", string(body), true)), &reply))
		if reply.Status == 0 {
			return reply.BatchResults
		}
		require.Equal(t, 400, reply.Status)
		var coded struct {
			Data struct {
				BatchResults []interface{} `json:"batch_results"`
			} `json:"data"`
		}
		require.NoError(t, json.Unmarshal([]byte(reply.Body), &coded))
		return coded.Data.BatchResults
	}
	t.Run("boundary", func(t *testing.T) {
		check(t, viaBoundary(t, items), true)
	})
	t.Run("boundary, none refused", func(t *testing.T) {
		var good []interface{}
		for _, it := range items {
			in := it.(map[string]interface{})
			if single := e.write(t, "encrypt/hk", in); single.status == 200 {
				good = append(good, it)
			}
		}
		require.Greater(t, len(good), 100)
		saved := items
		items = good
		defer func() { items = saved }()
		check(t, viaBoundary(t, good), false)
	})

	// Decryption in runs too: each answer, plaintext or error, is the
	// item's own request's, with ciphertexts tampered with, under the
	// wrong associated data, of a version that is not there, too short.
	var dec []interface{} // the decrypt run's items
	t.Run("decrypt", func(t *testing.T) {
		for i, r := range sealed {
			ct, _ := r.(map[string]interface{})["ciphertext"].(string)
			if ct == "" {
				continue
			}
			it := map[string]interface{}{"ciphertext": ct, "reference": fmt.Sprint(i)}
			if ad, ok := items[i].(map[string]interface{})["associated_data"]; ok {
				it["associated_data"] = ad
			}
			switch {
			case i%7 == 3:
				it["associated_data"] = b64("not this item's")
			case i%11 == 4:
				flip := []byte(ct)
				flip[len(flip)-5] ^= 1
				it["ciphertext"] = string(flip)
			case i%13 == 2:
				it["ciphertext"] = "vault:v9:" + strings.SplitN(ct, ":", 3)[2]
			case i%17 == 8:
				it["ciphertext"] = "vault:v1:aHNrAgAA"
			}
			dec = append(dec, it)
		}
		require.Greater(t, len(dec), 100)
		r := e.write(t, "decrypt/hk", map[string]interface{}{"batch_input": dec})
		requireStatus(t, r, 400, "")
		results := r.data["batch_results"].([]interface{})
		require.Equal(t, len(dec), len(results))
		failed := 0
		for j, res := range results {
			got := res.(map[string]interface{})
			single := e.write(t, "decrypt/hk", dec[j].(map[string]interface{}))
			require.Equal(t, dec[j].(map[string]interface{})["reference"], got["reference"])
			if msg, _ := got["error"].(string); msg != "" {
				failed++
				requireStatus(t, single, 400, "")
				require.Equal(t, single.errorMessage(), msg, "item %d", j)
				continue
			}
			requireStatus(t, single, 200, "")
			require.Equal(t, single.data["plaintext"], got["plaintext"], "item %d", j)
		}
		require.Greater(t, failed, 20)
		require.Less(t, failed, len(dec)-50)
	})

	// Rewrap in runs: each answer is the item's own request's, its
	// ciphertext of the same version opening to the same plaintext.
	t.Run("rewrap", func(t *testing.T) {
		require.NotEmpty(t, dec)
		withNonce := map[string]interface{}{}
		for k, v := range dec[0].(map[string]interface{}) {
			withNonce[k] = v
		}
		withNonce["nonce"] = b64("twelve bytes")
		dec := append(append([]interface{}{}, dec...), withNonce)
		r := e.write(t, "rewrap/hk", map[string]interface{}{"batch_input": dec})
		requireStatus(t, r, 200, "")
		results := r.data["batch_results"].([]interface{})
		require.Equal(t, len(dec), len(results))
		failed := 0
		for j, res := range results {
			got := res.(map[string]interface{})
			in := dec[j].(map[string]interface{})
			require.Equal(t, in["reference"], got["reference"])
			single := e.write(t, "rewrap/hk", in)
			if msg, _ := got["error"].(string); msg != "" {
				failed++
				requireStatus(t, single, 400, "")
				require.Equal(t, single.errorMessage(), msg, "item %d", j)
				continue
			}
			requireStatus(t, single, 200, "")
			require.Equal(t, single.data["key_version"], got["key_version"], "item %d", j)
			extra := map[string]interface{}{}
			if ad, ok := in["associated_data"]; ok {
				extra["associated_data"] = ad
			}
			require.Equal(t, e.decrypt(t, "hk", single.data["ciphertext"].(string), extra),
				e.decrypt(t, "hk", got["ciphertext"].(string), extra), "item %d", j)
		}
		require.Greater(t, failed, 20)
		require.Less(t, failed, len(dec)-50)
	})
}
