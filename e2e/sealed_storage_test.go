package e2e

// The sealed-storage property (issue 15) end to end: after a scenario run
// through a real Vault's API, every entry Vault stores under the mount
// (read back through sys/raw, as a storage reader would) but seal/config is
// sealed under the mount's root keyring, and no secret the scenario handed
// out or was given is readable there in any usual encoding.
//
// The root package's unit test (sealed_property_test.go) checks the same
// property on the backend's storage; this one checks what a real Vault
// wrote, with the keyring opened from that storage by the test itself, with
// the hsm and seal packages, the way the plugin opens it.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/sealcheck"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// rawPlainPaths are the entries the documentation (README, threat model)
// says are stored as they are. Written out, not taken from the plugin.
var rawPlainPaths = map[string]bool{"seal/config": true}

// rawSealConfigFields are the JSON fields of the plugin's seal
// configuration (mountseal.Config in internal/mountseal/config.go, internal to the plugin's module):
// seal/config may hold these and nothing else.
var rawSealConfigFields = map[string]bool{
	"library": true, "token_label": true, "slot": true, "pin": true, "key_label": true,
	"mechanism": true, "hmac_key_label": true, "hsm_timeout": true,
	"sealed_keyring": true, "sealed_with": true, "sealed_mechanism": true, "sealed_hmac": true,
	"root_key_version": true, "recovery_keyring": true, "recovery_threshold": true,
	"emergency_sealed": true, "recovery_public_key": true, "recovery_shares": true,
}

// rawSecrets are values that must not be found in raw storage.
type rawSecrets = sealcheck.Secrets

// rawByteFields returns the value itself and every string of a JSON value
// that decodes as base64, by where it is.
func rawByteFields(value []byte) map[string][]byte {
	out := map[string][]byte{"": value}
	var doc interface{}
	if json.Unmarshal(value, &doc) != nil {
		return out
	}
	var visit func(where string, v interface{})
	visit = func(where string, v interface{}) {
		switch x := v.(type) {
		case map[string]interface{}:
			for k, c := range x {
				visit(where+"."+k, c)
			}
		case []interface{}:
			for i, c := range x {
				visit(fmt.Sprintf("%s[%d]", where, i), c)
			}
		case string:
			for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
				if b, err := enc.DecodeString(x); err == nil && len(b) > 0 {
					out[where] = b
					return
				}
			}
		}
	}
	visit("", doc)
	return out
}

// rawMapStorage is a read-only logical.Storage over a copy of the raw
// entries, for loading the manifest as the plugin does.
type rawMapStorage map[string][]byte

func (m rawMapStorage) List(_ context.Context, prefix string) ([]string, error) {
	seen := map[string]bool{}
	var out []string
	for k := range m {
		rest, ok := strings.CutPrefix(k, prefix)
		if !ok {
			continue
		}
		if i := strings.Index(rest, "/"); i >= 0 {
			rest = rest[:i+1]
		}
		if !seen[rest] {
			seen[rest] = true
			out = append(out, rest)
		}
	}
	sort.Strings(out)
	return out, nil
}

func (m rawMapStorage) Get(_ context.Context, key string) (*logical.StorageEntry, error) {
	v, ok := m[key]
	if !ok {
		return nil, nil
	}
	return &logical.StorageEntry{Key: key, Value: bytes.Clone(v)}, nil
}

var errRawReadOnly = errors.New("the sealed-storage check writes nothing")

func (m rawMapStorage) Put(context.Context, *logical.StorageEntry) error { return errRawReadOnly }
func (m rawMapStorage) Delete(context.Context, string) error             { return errRawReadOnly }

// with returns a copy with key set to value.
func (m rawMapStorage) with(key string, value []byte) rawMapStorage {
	out := make(rawMapStorage, len(m))
	for k, v := range m {
		out[k] = v
	}
	out[key] = value
	return out
}

const (
	rawManifestRoot   = "manifest/root"
	rawManifestBucket = "manifest/bucket/"
)

func rawIsManifestPiece(path string) bool {
	if path == rawManifestRoot {
		return true
	}
	rest, ok := strings.CutPrefix(path, rawManifestBucket)
	if !ok || len(rest) != 2 {
		return false
	}
	_, err := hex.DecodeString(rest)
	return err == nil && strings.ToLower(rest) == rest
}

// rawBucketOf is the manifest bucket a path falls in (seal.bucketIndex).
func rawBucketOf(path string) int {
	h := sha256.Sum256([]byte(path))
	return int(h[0])
}

// rawSealedReport is what checkRawSealed found: problems (empty when the
// property holds) and what was checked.
type rawSealedReport struct {
	problems []string
	opened   map[string][]byte // sealed entries' plaintexts
	plain    []string
	pieces   []string
	flips    int // flipped copies refused
	moves    int // moved copies refused
}

func (r *rawSealedReport) failf(format string, args ...any) {
	r.problems = append(r.problems, fmt.Sprintf(format, args...))
}

// checkRawSealed checks the property on values, a mount's raw entries by
// path relative to the mount, given ring, its root keyring as the HSM
// unseals it, and the needles to look for. It reports every problem rather
// than stop at the first, so that its own failures can be checked.
func checkRawSealed(values map[string][]byte, ring *seal.Keyring, needles map[string][]byte) *rawSealedReport {
	r := &rawSealedReport{opened: map[string][]byte{}}
	if len(values) == 0 {
		r.failf("the mount stored nothing")
		return r
	}
	paths := make([]string, 0, len(values))
	for p := range values {
		paths = append(paths, p)
	}
	sort.Strings(paths)

	// (b) No secret in any entry, in any encoding.
	for _, path := range paths {
		for field, b := range rawByteFields(values[path]) {
			for what, n := range needles {
				if bytes.Contains(b, n) {
					r.failf("%s is readable in raw storage: %s%s", what, path, field)
				}
			}
		}
	}

	// (a) Only seal/config is plain; (c) every other entry opens at its
	// own path only, and not with a byte flipped.
	var entries []string
	for _, path := range paths {
		value := values[path]
		switch {
		case rawPlainPaths[path]:
			r.plain = append(r.plain, path)
			r.checkSealConfig(path, value)
		case rawIsManifestPiece(path):
			r.pieces = append(r.pieces, path)
			if !seal.IsSealed(value) {
				r.failf("manifest piece %s is not sealed", path)
			} else if _, err := ring.Open(path, value); err == nil {
				r.failf("manifest piece %s opens as an entry", path)
			}
		case strings.HasPrefix(path, "manifest/"):
			r.failf("%s is under the manifest's reserved prefix but is no piece of it", path)
		default:
			entries = append(entries, path)
		}
	}
	for i, path := range entries {
		value := values[path]
		if !seal.IsSealed(value) {
			r.failf("%s is stored in plaintext: only seal/config may be (%.80q)", path, value)
			continue
		}
		pt, err := ring.Open(path, value)
		if err != nil {
			r.failf("%s does not open with the root keyring: %v", path, err)
			continue
		}
		r.opened[path] = pt
		for _, pos := range sealcheck.FlipPositions(value) {
			if _, err := ring.Open(path, sealcheck.Flipped(value, pos)); err == nil {
				r.failf("%s opens with byte %d of %d flipped", path, pos, len(value))
			} else {
				r.flips++
			}
		}
		other := "moved/" + path
		if len(entries) > 1 {
			other = entries[(i+1)%len(entries)]
		}
		for _, to := range []string{other, "moved/" + path} {
			if _, err := ring.Open(to, value); err == nil {
				r.failf("%s opens when moved to %s", path, to)
			} else {
				r.moves++
			}
		}
	}
	if !ring.Manifested() {
		if len(r.pieces) > 0 {
			r.failf("a keyring without a manifest, but manifest pieces in storage: %v", r.pieces)
		}
		return r
	}
	r.checkManifest(values, ring, entries)
	return r
}

// checkSealConfig checks the plain entry is the seal configuration and no
// more.
func (r *rawSealedReport) checkSealConfig(path string, value []byte) {
	if seal.IsSealed(value) {
		r.failf("%s is documented as plain but looks sealed", path)
		return
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(value, &fields); err != nil {
		r.failf("%s is not the seal configuration's JSON: %v", path, err)
		return
	}
	for f := range fields {
		if !rawSealConfigFields[f] {
			r.failf("%s holds a field the seal configuration does not have: %s", path, f)
		}
	}
	if _, ok := fields["sealed_keyring"]; !ok {
		r.failf("%s does not hold the HSM-sealed keyring", path)
	}
}

// checkManifest loads the manifest from the raw entries as a fresh unseal
// does: every sealed entry reads back the same through it; the manifest
// root and its buckets refuse a flipped byte.
func (r *rawSealedReport) checkManifest(values map[string][]byte, ring *seal.Keyring, entries []string) {
	ctx := context.Background()
	store := rawMapStorage(values)
	load := func(s logical.Storage) (*seal.Sealer, error) {
		sealer := seal.NewSealer(ring, func(p string) bool { return rawPlainPaths[p] })
		return sealer, sealer.LoadManifest(ctx, s)
	}
	root, ok := values[rawManifestRoot]
	if !ok {
		r.failf("the keyring says the mount has a manifest, but %s is absent", rawManifestRoot)
		return
	}
	sealer, err := load(store)
	if err != nil {
		r.failf("the manifest does not load with the root keyring: %v", err)
		return
	}
	view := sealer.Wrap(store)
	byBucket := map[int]string{}
	for _, path := range entries {
		want, ok := r.opened[path]
		if !ok {
			continue
		}
		byBucket[rawBucketOf(path)] = path
		e, err := view.Get(ctx, path)
		switch {
		case err != nil:
			r.failf("%s is refused by the manifest: %v", path, err)
		case e == nil:
			r.failf("%s reads as absent through the manifest", path)
		case !bytes.Equal(e.Value, want):
			r.failf("%s reads differently through the manifest", path)
		}
	}
	for _, pos := range sealcheck.FlipPositions(root) {
		if _, err := load(store.with(rawManifestRoot, sealcheck.Flipped(root, pos))); err == nil {
			r.failf("the manifest loads with byte %d of its root flipped", pos)
		} else {
			r.flips++
		}
	}
	// A bucket with a byte flipped refuses the entries it covers.
	for idx, path := range byBucket {
		bpath := fmt.Sprintf("%s%02x", rawManifestBucket, idx)
		bucket, ok := values[bpath]
		if !ok {
			r.failf("%s has no manifest bucket (%s absent)", path, bpath)
			continue
		}
		flippedStore := store.with(bpath, sealcheck.Flipped(bucket, len(bucket)-1))
		s, err := load(flippedStore)
		if err != nil {
			r.failf("the manifest does not load with bucket %s flipped (the root alone should): %v", bpath, err)
			continue
		}
		if _, err := s.Wrap(flippedStore).Get(ctx, path); err == nil {
			r.failf("%s is read through bucket %s with a byte flipped", path, bpath)
		} else {
			r.flips++
		}
	}
}

// rawEntries reads every raw entry below the mount's storage prefix,
// keyed by path relative to it.
func rawEntries(t *testing.T, c *api.Logical, root string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	rawWalk(t, c, root, func(path string, value []byte) {
		out[strings.TrimPrefix(path, root)] = value
	})
	return out
}

// rawMountKeyring opens the mount's root keyring the way the plugin does:
// seal/config from raw storage, the token it names opened with the PIN
// through the hsm package, the sealed keyring opened in the HSM with the
// mount's backend UUID in the AAD, and seal.UnmarshalKeyring. It returns
// the keyring, its serialised form and the AAD.
func rawMountKeyring(t *testing.T, cfgValue []byte, backendUUID string) (*seal.Keyring, []byte) {
	t.Helper()
	var cfg struct {
		Library         string `json:"library"`
		TokenLabel      string `json:"token_label"`
		Slot            *uint  `json:"slot"`
		PIN             string `json:"pin"`
		SealedKeyring   []byte `json:"sealed_keyring"`
		SealedWith      string `json:"sealed_with"`
		SealedMechanism string `json:"sealed_mechanism"`
		SealedHMAC      string `json:"sealed_hmac"`
		RootKeyVersion  uint32 `json:"root_key_version"`
	}
	require.NoError(t, json.Unmarshal(cfgValue, &cfg))
	require.NotEmpty(t, cfg.SealedKeyring)
	require.Equal(t, hsmPIN, cfg.PIN, "the scenario gave the PIN as a value")
	tok, err := hsm.Open(hsm.Config{Library: cfg.Library, TokenLabel: cfg.TokenLabel, Slot: cfg.Slot, PIN: cfg.PIN})
	require.NoError(t, err)
	defer tok.Close()
	keys := hsm.SealKeys{Mechanism: hsm.SealMechanism(cfg.SealedMechanism), Label: cfg.SealedWith, HMACLabel: cfg.SealedHMAC}
	if keys.Mechanism == "" {
		keys.Mechanism = hsm.AESGCM
	}
	aad := []byte("hsm-transit/root-keyring\x00" + backendUUID)
	raw, err := tok.Open(keys, cfg.SealedKeyring, aad)
	require.NoError(t, err, "the stored keyring does not open with the HSM")
	// The binding is the mount's: under another mount's AAD it does not open.
	_, err = tok.Open(keys, cfg.SealedKeyring, []byte("hsm-transit/root-keyring\x00"+backendUUID+"x"))
	require.Error(t, err, "the sealed keyring opens for another mount")
	ring, err := seal.UnmarshalKeyring(raw)
	require.NoError(t, err)
	require.Equal(t, cfg.RootKeyVersion, ring.Active(), "seal/config's root_key_version is the keyring's")
	return ring, raw
}

// rawRootKeySecrets records the root key bytes of ring, its serialised
// form, and the recovery MAC key of the opened seal state.
func rawRootKeySecrets(t *testing.T, s rawSecrets, ring *seal.Keyring, raw []byte, opened map[string][]byte) {
	t.Helper()
	s.Add(t, "the serialised root keyring", raw)
	b, err := ring.Marshal()
	require.NoError(t, err)
	var stored struct {
		Keys map[string][]byte `json:"keys"`
	}
	require.NoError(t, json.Unmarshal(b, &stored))
	require.NotEmpty(t, stored.Keys)
	for v, k := range stored.Keys {
		s.Add(t, "root key v"+v, k)
	}
	if st, ok := opened["config/seal-state"]; ok {
		var meta struct {
			RecoveryMACKey []byte `json:"recovery_mac_key"`
		}
		require.NoError(t, json.Unmarshal(st, &meta))
		if len(meta.RecoveryMACKey) > 0 {
			s.Add(t, "the recovery MAC key", meta.RecoveryMACKey)
		}
	}
}

// TestEveryRawEntryIsSealed runs the sealed-storage property against a real
// Vault: a mount goes through every feature that writes storage through the
// API, then every entry under logical/<mount uuid>/ is read through sys/raw
// and checked with the root keyring the test opens itself from the HSM.
// The checker is shown to catch a planted plaintext entry, a flipped or
// moved entry, a secret planted anywhere, and a keyring that is not the
// mount's.
func TestEveryRawEntryIsSealed(t *testing.T) {
	t.Parallel()
	// The test process opens the token the plugin seals with, and a process
	// has one SoftHSM2 configuration: the server uses the suite's token
	// (with unique labels for what it creates).
	v := startVault(t, serverOptions{rawStorage: true, env: []string{"SOFTHSM2_CONF=" + softhsmConf}})
	v.mountPlugin("transit")
	c := v.client.Logical()
	secrets := rawSecrets{}
	tag := fmt.Sprintf("%x", sha256.Sum256([]byte(t.Name()+v.addr)))[:12]

	write := func(path string, data map[string]interface{}) *api.Secret {
		t.Helper()
		sec, err := c.Write("transit/"+path, data)
		require.NoErrorf(t, err, "write %s", path)
		return sec
	}
	read := func(path string) *api.Secret {
		t.Helper()
		sec, err := c.Read("transit/" + path)
		require.NoErrorf(t, err, "read %s", path)
		require.NotNilf(t, sec, "read %s", path)
		return sec
	}
	plaintext := func(key string) string {
		p := "e2e sealed plaintext for " + key + " " + tag
		secrets.Add(t, "plaintext given to "+key, []byte(p))
		return b64(p)
	}
	roundTrip := func(key string) string {
		t.Helper()
		p := plaintext(key)
		ct := write("encrypt/"+key, map[string]interface{}{"plaintext": p}).Data["ciphertext"].(string)
		require.Equal(t, p, write("decrypt/"+key, map[string]interface{}{"ciphertext": ct}).Data["plaintext"])
		return ct
	}
	export := func(kind, name string) {
		t.Helper()
		keys := read("export/" + kind + "/" + name).Data["keys"].(map[string]interface{})
		require.NotEmpty(t, keys)
		for ver, k := range keys {
			secrets.AddExported(t, fmt.Sprintf("%s %s v%s", name, kind, ver), k.(string))
		}
	}

	// Software keys of several types: rotated, used, exported, backed up.
	for _, kt := range []struct{ typ, kind string }{
		{"aes256-gcm96", "encryption-key"}, {"chacha20-poly1305", "encryption-key"},
		{"rsa-2048", "encryption-key"}, {"ecdsa-p256", "signing-key"},
		{"ed25519", "signing-key"}, {"hmac", "hmac-key"},
	} {
		name := "sw-" + kt.typ
		write("keys/"+name, map[string]interface{}{"type": kt.typ, "exportable": true, "allow_plaintext_backup": true})
		write("keys/"+name+"/rotate", nil)
		switch kt.kind {
		case "encryption-key":
			roundTrip(name)
		case "signing-key":
			sig := write("sign/"+name, map[string]interface{}{"input": plaintext(name)}).Data["signature"]
			require.NotEmpty(t, sig)
		}
		require.NotEmpty(t, write("hmac/"+name, map[string]interface{}{"input": plaintext(name + " hmac")}).Data["hmac"])
		export(kt.kind, name)
		if kt.kind != "hmac-key" {
			export("hmac-key", name)
		}
	}
	backup := read("backup/sw-aes256-gcm96").Data["backup"].(string)
	secrets.AddString(t, "backup of sw-aes256-gcm96", backup)
	write("restore/restored", map[string]interface{}{"backup": backup})
	roundTrip("restored")
	write("keys/sw-aes256-gcm96/rotate", nil)
	write("keys/sw-aes256-gcm96/config", map[string]interface{}{"min_decryption_version": 2, "min_encryption_version": 3})
	write("keys/sw-aes256-gcm96/trim", map[string]interface{}{"min_available_version": 2})
	dk := write("datakey/plaintext/sw-chacha20-poly1305", nil)
	secrets.AddString(t, "data key of sw-chacha20-poly1305", dk.Data["plaintext"].(string))

	// HSM-resident keys: rotated, used, a data key, one deleted.
	write("keys/hk", map[string]interface{}{"hsm": true})
	hct := roundTrip("hk")
	write("keys/hk/rotate", nil)
	write("keys/hk/rotate", nil)
	write("keys/hk/config", map[string]interface{}{"min_decryption_version": 1, "min_encryption_version": 2})
	roundTrip("hk")
	hdk := write("datakey/plaintext/hk", nil)
	secrets.AddString(t, "data key of hk", hdk.Data["plaintext"].(string))
	write("keys/hk-gone", map[string]interface{}{"hsm": true})
	roundTrip("hk-gone")
	write("keys/hk-gone/config", map[string]interface{}{"deletion_allowed": true})
	_, err := c.Delete("transit/keys/hk-gone")
	require.NoError(t, err)

	// Lifecycle records: a usage cap with counts, a disabled key,
	// scheduled deletion of both residencies, a cancelled one.
	write("keys/capped", nil)
	write("keys/capped/config", map[string]interface{}{"max_encryptions": 1000})
	for range 3 {
		roundTrip("capped")
	}
	write("keys/off", nil)
	roundTrip("off")
	write("keys/off/config", map[string]interface{}{"disabled": true})
	write("keys/doomed", nil)
	write("keys/doomed/schedule-deletion", map[string]interface{}{"pending_days": 7})
	write("keys/hk-doomed", map[string]interface{}{"hsm": true})
	write("keys/hk-doomed/schedule-deletion", map[string]interface{}{"pending_days": 30})
	write("keys/spared", nil)
	write("keys/spared/schedule-deletion", map[string]interface{}{"pending_days": 7})
	write("keys/spared/cancel-deletion", nil)

	// Mount configuration, recovery, root key rotation, a new KEK, the
	// anti-rollback anchor, an emergency seal and its end.
	write("cache-config", map[string]interface{}{"size": 500})
	write("config/keys", map[string]interface{}{"disable_upsert": true})
	write("config/seal", map[string]interface{}{"anti_rollback": true})
	rec := write("seal/recovery/init", map[string]interface{}{"shares": 3, "threshold": 2})
	shares := rec.Data["shares"].([]interface{})
	require.Len(t, shares, 3)
	for i, share := range shares {
		secrets.AddString(t, fmt.Sprintf("recovery share %d", i), share.(string))
	}
	require.Equal(t, "2", fmt.Sprint(write("seal/rotate", nil).Data["root_key_version"]))
	write("config/seal", map[string]interface{}{"key_label": "e2e-sealed-kek-" + tag, "generate_key": true})
	write("seal/seal", nil)
	write("seal/unseal", nil)
	require.Equal(t, plaintextOf(t, "hk", tag), write("decrypt/hk", map[string]interface{}{"ciphertext": hct}).Data["plaintext"])
	st := read("seal/status").Data
	require.Equal(t, false, st["sealed"])
	require.Equal(t, true, st["recovery_initialized"])

	// The mount's storage, through sys/raw.
	mounts, err := v.client.Sys().ListMounts()
	require.NoError(t, err)
	mount := mounts["transit/"]
	require.NotNil(t, mount)
	root := "sys/raw/logical/" + mount.UUID + "/"
	table := attackRawGet(t, c, "sys/raw/core/mounts")
	var decoded interface{}
	require.NoError(t, json.Unmarshal(table, &decoded))
	backendUUID := attackFindBackendUUID(decoded, mount.UUID)
	require.NotEmpty(t, backendUUID, "backend_aware_uuid of transit/ in the mount table")

	check := func(stage string) (map[string][]byte, *seal.Keyring, map[string][]byte, *rawSealedReport) {
		t.Helper()
		values := rawEntries(t, c, root)
		require.Contains(t, values, "seal/config", "%s: the mount has a seal configuration", stage)
		ring, raw := rawMountKeyring(t, values["seal/config"], backendUUID)
		// The opened seal state gives the recovery MAC key: a first pass
		// opens it, the second looks for it too.
		first := checkRawSealed(values, ring, secrets.Needles())
		all := rawSecrets{}
		for k, v := range secrets {
			all[k] = v
		}
		rawRootKeySecrets(t, all, ring, raw, first.opened)
		require.Contains(t, all, "the recovery MAC key", "%s: the opened seal state holds the recovery MAC key", stage)
		needles := all.Needles()
		rep := checkRawSealed(values, ring, needles)
		if len(rep.problems) > 0 {
			t.Fatalf("%s: the sealed-storage property does not hold (%d problems):\n%s", stage, len(rep.problems), strings.Join(rep.problems, "\n"))
		}
		require.Equal(t, []string{"seal/config"}, rep.plain, stage)
		t.Logf("%s: %d entries: %d sealed entries opened (%d flipped and %d moved copies refused), %d manifest pieces, plain %v, %d secrets in %d encodings",
			stage, len(values), len(rep.opened), rep.flips, rep.moves, len(rep.pieces), rep.plain, len(all), len(needles))
		return values, ring, needles, rep
	}

	values, ring, needles, rep := check("after the scenario")
	// The scenario reached every kind of entry the property is about.
	for _, prefix := range []string{"policy/", "archive/", "hsm/keys/", "lifecycle/keys/", "lifecycle/deletions/", "config/seal-state", "config/cache", "config/keys"} {
		found := false
		for path := range rep.opened {
			found = found || strings.HasPrefix(path, prefix)
		}
		require.Truef(t, found, "the scenario left nothing under %s to check: %v", prefix, keysOfBytes(rep.opened))
	}
	require.Contains(t, rep.opened, "hsm/keys/hk")
	require.Contains(t, rep.pieces, rawManifestRoot)
	require.Greater(t, rep.flips, len(rep.opened))
	require.Equal(t, 2*len(rep.opened), rep.moves)
	require.GreaterOrEqual(t, len(secrets), 40, "the scenario recorded its secrets")

	// The checker catches what it should. Planted through sys/raw: a
	// plaintext entry holding a known plaintext.
	planted := "planted/plain"
	attackRawPut(t, c, root+planted, []byte("a note: "+plaintextOf(t, "hk", tag)))
	bad := checkRawSealed(rawEntries(t, c, root), ring, needles)
	requireProblem(t, bad, planted+" is stored in plaintext")
	requireProblem(t, bad, "plaintext given to hk (base64) is readable in raw storage: "+planted)
	_, err = c.Delete(root + planted)
	require.NoError(t, err)
	_, ok := attackRawTryGet(t, c, root+planted)
	require.False(t, ok, "the planted entry is deleted")

	// In memory (so as not to break the mount): a second plain entry
	// beside seal/config, a flipped entry, a moved entry, an entry sealed
	// under another keyring, a secret inside seal/config, a stray manifest
	// piece, a flipped manifest root, and a keyring not the mount's.
	mutate := func(name, key string, value []byte, want string) {
		t.Helper()
		m := rawMapStorage(values).with(key, value)
		requireProblem(t, checkRawSealed(m, ring, needles), want)
		t.Logf("mutation %q: reported", name)
	}
	mutate("plain entry under seal/", "seal/extra", []byte(`{"note":"plain"}`), "seal/extra is stored in plaintext")
	policy := values["policy/capped"]
	require.NotNil(t, policy)
	mutate("flipped entry", "policy/capped", sealcheck.Flipped(policy, len(policy)-1), "policy/capped does not open with the root keyring")
	mutate("moved entry", "policy/off", policy, "policy/off does not open with the root keyring")
	require.Contains(t, rep.opened, "hsm/keys/hk")
	mutate("HSM key metadata stored unencrypted", "hsm/keys/hk", rep.opened["hsm/keys/hk"], "hsm/keys/hk is stored in plaintext")
	other, err := seal.NewKeyring(bytes.Repeat([]byte{7}, 32))
	require.NoError(t, err)
	foreign, err := other.Seal("policy/capped", rep.opened["policy/capped"])
	require.NoError(t, err)
	mutate("entry under another keyring", "policy/capped", foreign, "policy/capped does not open with the root keyring")
	opened := rep.opened["policy/sw-aes256-gcm96"]
	require.NotNil(t, opened)
	mutate("policy stored unencrypted", "policy/sw-aes256-gcm96", opened, "sw-aes256-gcm96 encryption-key v2")
	var cfg map[string]interface{}
	require.NoError(t, json.Unmarshal(values["seal/config"], &cfg))
	cfg["recovery_keyring"] = shares[0] // a share in the plain entry
	leaky, err := json.Marshal(cfg)
	require.NoError(t, err)
	mutate("share in seal/config", "seal/config", leaky, "recovery share 0")
	var stored struct {
		Keys map[string][]byte `json:"keys"`
	}
	ringJSON, err := ring.Marshal()
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(ringJSON, &stored))
	cfg["recovery_keyring"] = stored.Keys[fmt.Sprint(ring.Active())] // a root key in the plain entry
	leaky, err = json.Marshal(cfg)
	require.NoError(t, err)
	mutate("root key in seal/config", "seal/config", leaky, fmt.Sprintf("root key v%d", ring.Active()))
	cfg["recovery_mac_key"] = "c29tZXRoaW5n"
	leaky, err = json.Marshal(cfg)
	require.NoError(t, err)
	mutate("unknown field in seal/config", "seal/config", leaky, "holds a field the seal configuration does not have: recovery_mac_key")
	mutate("stray manifest entry", "manifest/extra", []byte("x"), "manifest/extra is under the manifest's reserved prefix")
	mroot := values[rawManifestRoot]
	mutate("flipped manifest root", rawManifestRoot, sealcheck.Flipped(mroot, len(mroot)-1), "the manifest does not load with the root keyring")
	// A manifest bucket replaced by another bucket's value.
	ownBucket := fmt.Sprintf("%s%02x", rawManifestBucket, rawBucketOf("policy/capped"))
	var otherBucket string
	for _, p := range keysOfBytes(rep.opened) {
		if b := fmt.Sprintf("%s%02x", rawManifestBucket, rawBucketOf(p)); b != ownBucket {
			otherBucket = b
			break
		}
	}
	require.NotEmpty(t, otherBucket)
	mutate("manifest bucket swapped", ownBucket, values[otherBucket], "policy/capped is refused by the manifest")
	requireProblem(t, checkRawSealed(values, other, needles), "does not open with the root keyring")
	requireProblem(t, checkRawSealed(map[string][]byte{}, ring, needles), "the mount stored nothing")

	// After a reload, the plugin reads its storage afresh and unseals from
	// the HSM; it still decrypts, and the property still holds.
	_, err = c.Write("sys/plugins/reload/backend", map[string]interface{}{"mounts": []string{"transit/"}})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		sec, err := c.Write("transit/decrypt/hk", map[string]interface{}{"ciphertext": hct})
		return err == nil && sec.Data["plaintext"] == plaintextOf(t, "hk", tag)
	}, 60*time.Second, 250*time.Millisecond, "the mount unseals after the reload")
	roundTrip("hk")
	check("after a reload")
}

// plaintextOf is the base64 plaintext the scenario gave key.
func plaintextOf(t *testing.T, key, tag string) string {
	t.Helper()
	return b64("e2e sealed plaintext for " + key + " " + tag)
}

func keysOfBytes(m map[string][]byte) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// requireProblem requires the checker to have reported a problem
// containing want.
func requireProblem(t *testing.T, r *rawSealedReport, want string) {
	t.Helper()
	require.NotEmpty(t, r.problems, "the checker reports nothing, want %q", want)
	for _, p := range r.problems {
		if strings.Contains(p, want) {
			return
		}
	}
	t.Fatalf("the checker does not report %q; it reports:\n%s", want, strings.Join(r.problems, "\n"))
}
