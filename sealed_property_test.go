package hsmtransit

// The sealed-storage property (issue 15), for every test that reads the
// mount's raw storage: after any scenario, every entry under the mount but
// the documented plain ones is sealed under the mount's root keyring. The
// attacker is the storage reader/writer of DESIGN.md: reads and writes any
// entry below the seal (sys/raw, a backup), never the HSM.
//
// The list of plain paths is written out here, from the documentation
// (README, threat model: "every entry but seal/config is AES-256-GCM under
// the root key"), and deliberately not taken from mountseal.IsPlainPath: a change that
// widened what the backend stores in plaintext must fail this property, not
// move it along.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/sealcheck"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	sealpkg "github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// documentedPlainPaths are the entries the documentation says are stored as
// they are: the seal configuration, which carries the HSM-sealed keyring
// and the recovery copy (README, "Threat model").
var documentedPlainPaths = map[string]bool{"seal/config": true}

// Pieces of the seal's manifest (seal/manifest.go): sealed under the root
// keyring with the manifest's own purpose, so they do not open as entries;
// they are checked by loading the manifest.
const (
	propManifestRoot   = "manifest/root"
	propManifestBucket = "manifest/bucket/"
	propBucketCount    = 256
)

func isManifestPiece(path string) bool {
	if path == propManifestRoot {
		return true
	}
	rest, ok := strings.CutPrefix(path, propManifestBucket)
	if !ok || len(rest) != 2 {
		return false
	}
	_, err := hex.DecodeString(rest)
	return err == nil && strings.ToLower(rest) == rest
}

// propBucketOf is the manifest bucket a path falls in (seal.bucketIndex).
func propBucketOf(path string) int {
	h := sha256.Sum256([]byte(path))
	return int(h[0])
}

// propProbes gives, for each bucket, a path that no test writes and that
// falls in it: reading it through the seal loads (and checks) the bucket.
var propProbes = func() (p [propBucketCount]string) {
	found := 0
	for i := 0; found < propBucketCount; i++ {
		path := fmt.Sprintf("property-probe/%d", i)
		if idx := propBucketOf(path); p[idx] == "" {
			p[idx] = path
			found++
		}
	}
	return p
}()

// secretSet names values that must not be found in raw storage.
type secretSet = sealcheck.Secrets

// propertyStorage lets the property read storage and refuses every write:
// checking the mount must not change it. over, when set, replaces one
// entry's value (a flipped or moved copy).
type propertyStorage struct {
	under    logical.Storage
	overKey  string
	overWith []byte
}

var errPropertyReadOnly = errors.New("the sealed-storage property writes nothing")

func (r *propertyStorage) List(ctx context.Context, prefix string) ([]string, error) {
	return r.under.List(ctx, prefix)
}

func (r *propertyStorage) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	if r.overWith != nil && key == r.overKey {
		return &logical.StorageEntry{Key: key, Value: bytes.Clone(r.overWith)}, nil
	}
	e, err := r.under.Get(ctx, key)
	if e != nil {
		e = &logical.StorageEntry{Key: e.Key, Value: bytes.Clone(e.Value), SealWrap: e.SealWrap}
	}
	return e, err
}

func (r *propertyStorage) Put(context.Context, *logical.StorageEntry) error {
	return errPropertyReadOnly
}
func (r *propertyStorage) Delete(context.Context, string) error { return errPropertyReadOnly }

func (r *propertyStorage) with(key string, value []byte) *propertyStorage {
	return &propertyStorage{under: r.under, overKey: key, overWith: value}
}

// flipPositions are the bytes of a sealed value the property flips: the
// magic, the root key version, the generation (hst\x02), the nonce, the
// sealedCheck is what requireAllSealed found, for callers that check more.
type sealedCheck struct {
	// opened holds the plaintext of every sealed entry.
	opened map[string][]byte
	plain  []string
	pieces []string
}

// requireAllSealed asserts the sealed-storage property of raw, a mount's
// storage below the seal, given ring, its root keyring as the HSM unseals
// it, and the scenario's secrets:
//
//   - no entry holds a secret (nor the root keys), in any encoding;
//   - every entry but the documented plain ones and the manifest's pieces
//     opens with ring at its own path (seal.Keyring.Open, the path in the
//     AAD), does not open with any one byte flipped nor at another path,
//     and reads back the same through a seal that loads the manifest from
//     storage afresh (so the manifest covers it);
//   - the manifest loads with ring, and refuses its root or any bucket
//     with a byte flipped or moved to another bucket's path; no piece of it
//     opens as an entry;
//   - a documented plain entry is not sealed-looking junk but what it is
//     documented to be (seal/config's fields), and holds no secret.
func requireAllSealed(t testing.TB, raw logical.Storage, ring *sealpkg.Keyring, secrets secretSet) sealedCheck {
	t.Helper()
	ctx := context.Background()
	ro := &propertyStorage{under: raw}

	all := secretSet{}
	for k, v := range secrets {
		all[k] = v
	}
	addRootKeys(t, all, ring)
	needles := all.Needles()

	values := map[string][]byte{}
	require.NoError(t, walkStorage(ctx, ro, "", func(key string, value []byte) { values[key] = bytes.Clone(value) }))
	require.NotEmpty(t, values, "the mount stored nothing")
	paths := make([]string, 0, len(values))
	for p := range values {
		paths = append(paths, p)
	}
	sort.Strings(paths)

	res := sealedCheck{opened: map[string][]byte{}}
	var entries []string
	for _, path := range paths {
		value := values[path]
		for field, b := range byteFields(value) {
			for what, n := range needles {
				if bytes.Contains(b, n) {
					t.Errorf("%s is readable in raw storage: %s%s", what, path, field)
				}
			}
		}
		switch {
		case documentedPlainPaths[path]:
			res.plain = append(res.plain, path)
			requireDocumentedPlain(t, path, value)
		case isManifestPiece(path):
			res.pieces = append(res.pieces, path)
			require.Truef(t, sealpkg.IsSealed(value), "manifest piece %s is not sealed", path)
			_, err := ring.Open(path, value)
			require.Errorf(t, err, "manifest piece %s opens as an entry", path)
		case strings.HasPrefix(path, "manifest/"):
			t.Errorf("%s is under the manifest's reserved prefix but is no piece of it", path)
		default:
			entries = append(entries, path)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	for i, path := range entries {
		value := values[path]
		require.Truef(t, sealpkg.IsSealed(value), "%s is stored in plaintext: only %v may be (%.80q)", path, keysOf(documentedPlainPaths), value)
		pt, err := ring.Open(path, value)
		require.NoErrorf(t, err, "%s does not open with the root keyring", path)
		res.opened[path] = pt
		for _, pos := range sealcheck.FlipPositions(value) {
			_, err := ring.Open(path, sealcheck.Flipped(value, pos))
			require.Errorf(t, err, "%s opens with byte %d of %d flipped", path, pos, len(value))
		}
		other := "moved/" + path
		if len(entries) > 1 {
			other = entries[(i+1)%len(entries)]
		}
		_, err = ring.Open(other, value)
		require.Errorf(t, err, "%s opens when moved to %s", path, other)
	}

	t.Logf("sealed-storage property: %d sealed entries opened, %d manifest pieces, plain %v, %d secrets in %d encodings",
		len(res.opened), len(res.pieces), res.plain, len(all), len(needles))
	if !ring.Manifested() {
		require.Empty(t, res.pieces, "a keyring without a manifest, but manifest pieces in storage")
		return res
	}
	requireManifestSealed(t, ro, ring, values, entries, res.opened)
	return res
}

// requireManifestSealed checks the manifest as a fresh unseal reads it.
func requireManifestSealed(t testing.TB, ro *propertyStorage, ring *sealpkg.Keyring, values map[string][]byte, entries []string, opened map[string][]byte) {
	t.Helper()
	ctx := context.Background()
	plain := func(p string) bool { return documentedPlainPaths[p] }
	load := func(s logical.Storage) (*sealpkg.Sealer, error) {
		sealer := sealpkg.NewSealer(ring, plain)
		return sealer, sealer.LoadManifest(ctx, s)
	}

	root, ok := values[propManifestRoot]
	require.Truef(t, ok, "the keyring says the mount has a manifest, but %s is absent", propManifestRoot)
	sealer, err := load(ro)
	require.NoError(t, err, "the manifest does not load with the root keyring")
	view := sealer.Wrap(ro)
	for _, path := range entries {
		e, err := view.Get(ctx, path)
		require.NoErrorf(t, err, "%s is refused by the manifest", path)
		require.NotNilf(t, e, "%s", path)
		require.Equalf(t, opened[path], e.Value, "%s reads differently through the manifest", path)
	}

	for _, pos := range sealcheck.FlipPositions(root) {
		_, err := load(ro.with(propManifestRoot, sealcheck.Flipped(root, pos)))
		require.Errorf(t, err, "the manifest loads with byte %d of its root flipped", pos)
	}

	var buckets []int
	for idx := range propBucketCount {
		if _, ok := values[fmt.Sprintf("%s%02x", propManifestBucket, idx)]; ok {
			buckets = append(buckets, idx)
		}
	}
	require.NotEmpty(t, buckets, "the manifest has no bucket")
	// Every bucket, as stored (or absent), answers for a path in it that
	// nobody wrote: it opens with the root keyring, and the root does not
	// record one that is missing.
	for idx, probe := range propProbes {
		s, err := load(ro)
		require.NoError(t, err)
		e, err := s.Wrap(ro).Get(ctx, probe)
		require.NoErrorf(t, err, "bucket %02x is refused as stored", idx)
		require.Nil(t, e)
	}
	for i, idx := range buckets {
		path := fmt.Sprintf("%s%02x", propManifestBucket, idx)
		value := values[path]
		probe := propProbes[idx]
		// Flipped, a bucket is refused...
		for _, pos := range sealcheck.FlipPositions(value) {
			s, err := load(ro.with(path, sealcheck.Flipped(value, pos)))
			require.NoError(t, err)
			_, err = s.Wrap(ro.with(path, sealcheck.Flipped(value, pos))).Get(ctx, probe)
			require.Errorf(t, err, "bucket %s is accepted with byte %d flipped", path, pos)
		}
		// ...and so is another bucket's value put in its place.
		if len(buckets) > 1 {
			from := fmt.Sprintf("%s%02x", propManifestBucket, buckets[(i+1)%len(buckets)])
			moved := ro.with(path, values[from])
			s, err := load(moved)
			require.NoError(t, err)
			_, err = s.Wrap(moved).Get(ctx, probe)
			require.Errorf(t, err, "bucket %s is accepted with %s's value", path, from)
		}
	}
}

// requireDocumentedPlain checks a plain entry is what the documentation
// says it is, and no more.
func requireDocumentedPlain(t testing.TB, path string, value []byte) {
	t.Helper()
	require.Falsef(t, sealpkg.IsSealed(value), "%s is documented as plain but looks sealed", path)
	switch path {
	case "seal/config":
		var fields map[string]json.RawMessage
		require.NoErrorf(t, json.Unmarshal(value, &fields), "%s is not the seal configuration's JSON", path)
		allowed := jsonFieldNames(reflect.TypeOf(mountseal.Config{}))
		for f := range fields {
			require.Containsf(t, allowed, f, "%s holds a field the seal configuration does not have", path)
		}
		require.Contains(t, fields, "sealed_keyring", "%s holds the HSM-sealed keyring", path)
	default:
		t.Fatalf("no check for documented plain entry %s", path)
	}
}

func jsonFieldNames(typ reflect.Type) map[string]bool {
	out := map[string]bool{}
	for i := range typ.NumField() {
		name, _, _ := strings.Cut(typ.Field(i).Tag.Get("json"), ",")
		if name != "" && name != "-" {
			out[name] = true
		}
	}
	return out
}

// addRootKeys records the root key bytes of ring as secrets.
func addRootKeys(t testing.TB, s secretSet, ring *sealpkg.Keyring) {
	t.Helper()
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
}

func keysOf(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// mountKeyring unseals the mount's root keyring from its stored seal
// configuration with the HSM, as the plugin does, independently of the
// plugin's memory, and checks that the running mount holds the same.
func mountKeyring(t testing.TB, e *testEnv) (*sealpkg.Keyring, []byte) {
	t.Helper()
	cfg, err := mountseal.ReadConfig(context.Background(), e.storage)
	require.NoError(t, err)
	require.NotNil(t, cfg, "the mount has no seal configuration")
	hc, err := cfg.HSMConfig()
	require.NoError(t, err)
	tok, err := hsm.Open(hc)
	require.NoError(t, err)
	defer tok.Close()
	raw, err := tok.Open(cfg.SealedKeys(), cfg.SealedKeyring, rootAADOf(e))
	require.NoError(t, err, "the stored keyring does not open with the HSM")
	ring, err := sealpkg.UnmarshalKeyring(raw)
	require.NoError(t, err)
	if snap := e.b.seal.Snapshot(); snap.Sealer() != nil {
		mem := snap.Sealer().Keyring()
		require.Equal(t, mem.Active(), ring.Active(), "the stored keyring is the one in use")
		require.Equal(t, mem.Versions(), ring.Versions())
	}
	return ring, raw
}

// requireMountSealed is requireAllSealed for a test mount: its keyring from
// the HSM, and the secrets of its seal state (the recovery MAC key) added
// to the caller's.
func requireMountSealed(t testing.TB, e *testEnv, secrets secretSet) sealedCheck {
	t.Helper()
	ring, raw := mountKeyring(t, e)
	all := secretSet{}
	for k, v := range secrets {
		all[k] = v
	}
	all.Add(t, "the serialised root keyring", raw)
	if snap := e.b.seal.Snapshot(); snap.Meta() != nil && len(snap.Meta().RecoveryMACKey) > 0 {
		all.Add(t, "the recovery MAC key", snap.Meta().RecoveryMACKey)
	}
	return requireAllSealed(t, e.storage, ring, all)
}

// propertyScenario takes a mount through every feature that writes storage
// and returns it with the secrets it handed out or was given.
func propertyScenario(t *testing.T) (*testEnv, secretSet) {
	t.Helper()
	e := getTestBackend(t)
	s := secretSet{}
	tag := newMountUUID(t)[:8]
	plaintext := func(key string) string {
		p := "property plaintext for " + key + " " + tag
		s.Add(t, "plaintext given to "+key, []byte(p))
		return p
	}
	export := func(kind, name string) {
		for v, k := range exportKeys(t, e, kind+"/"+name) {
			s.AddExported(t, fmt.Sprintf("%s v%s", name, v), k)
		}
	}

	// Software keys of every kind, rotated, used, exported.
	for _, kt := range []struct{ name, kind string }{
		{"aes256-gcm96", "encryption-key"}, {"aes128-gcm96", "encryption-key"},
		{"chacha20-poly1305", "encryption-key"}, {"rsa-2048", "encryption-key"},
		{"ecdsa-p256", "signing-key"}, {"ed25519", "signing-key"}, {"hmac", "hmac-key"},
	} {
		name := "sw-" + kt.name
		e.mustWrite(t, "keys/"+name, map[string]interface{}{"type": kt.name, "exportable": true, "allow_plaintext_backup": true})
		e.mustWrite(t, "keys/"+name+"/rotate", nil)
		switch kt.kind {
		case "encryption-key":
			p := plaintext(name)
			require.Equal(t, p, e.decrypt(t, name, e.encrypt(t, name, p, nil), nil))
		case "signing-key":
			e.mustWrite(t, "sign/"+name, map[string]interface{}{"input": b64(plaintext(name))})
		case "hmac-key":
			e.mustWrite(t, "hmac/"+name, map[string]interface{}{"input": b64(plaintext(name))})
		}
		export(kt.kind, name)
	}
	// Derived and convergent, and a data key.
	e.mustWrite(t, "keys/conv", map[string]interface{}{"derived": true, "convergent_encryption": true, "exportable": true})
	e.encrypt(t, "conv", plaintext("conv"), map[string]interface{}{"context": b64("ctx-" + tag)})
	export("encryption-key", "conv")
	dk := e.mustWrite(t, "datakey/plaintext/sw-aes256-gcm96", nil)
	s.AddString(t, "data key of sw-aes256-gcm96", dk["plaintext"].(string))
	// Imported key material (BYOK), known to the test byte for byte.
	material := importRandom(t, 32)
	s.Add(t, "imported key material", material)
	e.mustWrite(t, "keys/imported/import", map[string]interface{}{"type": "aes256-gcm96", "ciphertext": importWrap(t, e, material, sha256.New())})
	e.encrypt(t, "imported", plaintext("imported"), nil)
	// Versions: minimums, trim.
	e.mustWrite(t, "keys/sw-aes256-gcm96/rotate", nil)
	e.mustWrite(t, "keys/sw-aes256-gcm96/config", map[string]interface{}{"min_decryption_version": 2, "min_encryption_version": 3})
	e.mustWrite(t, "keys/sw-aes256-gcm96/trim", map[string]interface{}{"min_available_version": 2})

	// Backup and restore under another name.
	backup := backupOf(t, e, "sw-aes128-gcm96")
	s.AddString(t, "backup of sw-aes128-gcm96", backup)
	e.mustWrite(t, "restore/restored", map[string]interface{}{"backup": backup})
	e.encrypt(t, "restored", plaintext("restored"), nil)

	// HSM-resident keys: rotated, with minimums, a data key, one deleted.
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})
	p := plaintext("hk")
	ct := e.encrypt(t, "hk", p, nil)
	e.mustWrite(t, "keys/hk/rotate", nil)
	e.mustWrite(t, "keys/hk/rotate", nil)
	e.mustWrite(t, "keys/hk/config", map[string]interface{}{"min_decryption_version": 1, "min_encryption_version": 2, "auto_rotate_period": "24h"})
	require.Equal(t, p, e.decrypt(t, "hk", ct, nil))
	hdk := e.mustWrite(t, "datakey/plaintext/hk", nil)
	s.AddString(t, "data key of hk", hdk["plaintext"].(string))
	e.mustWrite(t, "keys/hk-gone", map[string]interface{}{"hsm": true})
	e.mustWrite(t, "keys/hk-gone/config", map[string]interface{}{"deletion_allowed": true})
	requireStatus(t, e.del(t, "keys/hk-gone"), 204, "")

	// Lifecycle records: a usage cap with counts, a disabled key,
	// scheduled deletions of both residencies, a deleted software key.
	e.mustWrite(t, "keys/capped", nil)
	e.mustWrite(t, "keys/capped/config", map[string]interface{}{"max_encryptions": 1000})
	for range 3 {
		e.encrypt(t, "capped", plaintext("capped"), nil)
	}
	e.mustWrite(t, "keys/off", nil)
	e.mustWrite(t, "keys/off/config", map[string]interface{}{"disabled": true})
	e.mustWrite(t, "keys/doomed", nil)
	e.mustWrite(t, "keys/doomed/schedule-deletion", map[string]interface{}{"pending_days": 7})
	e.mustWrite(t, "keys/hk-doomed", map[string]interface{}{"hsm": true})
	e.mustWrite(t, "keys/hk-doomed/schedule-deletion", map[string]interface{}{"pending_days": 30})
	e.mustWrite(t, "keys/gone", nil)
	e.mustWrite(t, "keys/gone/config", map[string]interface{}{"deletion_allowed": true})
	requireStatus(t, e.del(t, "keys/gone"), 204, "")

	// Mount configuration.
	e.mustWrite(t, "cache-config", map[string]interface{}{"size": 500})
	e.mustWrite(t, "config/keys", map[string]interface{}{"disable_upsert": true})

	// The anchor in the token, recovery, then a root key rotation (the
	// copy follows it), a new KEK, an emergency seal and unseal.
	e.mustWrite(t, "config/seal", map[string]interface{}{"anti_rollback": true})
	r := e.mustWrite(t, "seal/recovery/init", map[string]interface{}{"shares": 3, "threshold": 2})
	for i, share := range r["shares"].([]interface{}) {
		s.AddString(t, fmt.Sprintf("recovery share %d", i), share.(string))
	}
	require.Equal(t, float64(2), e.mustWrite(t, "seal/rotate", nil)["root_key_version"])
	e.mustWrite(t, "config/seal", map[string]interface{}{"key_label": uniq(t, "kek-prop"), "generate_key": true})
	e.mustWrite(t, "seal/seal", nil)
	e.mustWrite(t, "seal/unseal", nil)
	require.Equal(t, p, e.decrypt(t, "hk", ct, nil))
	return e, s
}

// TestEveryEntryIsSealedAfterEveryFeature runs the property after a mount
// used every feature that writes storage, and again after a restart.
func TestEveryEntryIsSealedAfterEveryFeature(t *testing.T) {
	e, secrets := propertyScenario(t)
	check := requireMountSealed(t, e, secrets)
	require.Equal(t, []string{"seal/config"}, check.plain)
	for _, prefix := range []string{policyPrefix, archivePrefix, hsmKeyPrefix, lifecyclePrefix, deletionPrefix, mountseal.MetaPath, cacheConfigStoragePath, keysConfigStoragePath} {
		found := false
		for path := range check.opened {
			found = found || strings.HasPrefix(path, prefix)
		}
		require.Truef(t, found, "the scenario left nothing under %s to check", prefix)
	}
	require.Contains(t, check.opened, hsmKeyPrefix+"hk")
	require.Contains(t, check.pieces, propManifestRoot)

	e = e.restart(t)
	e.encrypt(t, "hk", "after the restart, hk", nil)
	requireMountSealed(t, e, secrets)
}

// recordingTB stands in for a test, so that the property's own failures
// can be observed: FailNow ends the goroutine, as testing's does.
type recordingTB struct {
	testing.TB
	mu     sync.Mutex
	failed bool
	msgs   []string
}

func (r *recordingTB) Helper()             {}
func (r *recordingTB) Logf(string, ...any) {}
func (r *recordingTB) Errorf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failed = true
	r.msgs = append(r.msgs, fmt.Sprintf(format, args...))
}
func (r *recordingTB) Error(args ...any) { r.Errorf("%s", fmt.Sprint(args...)) }
func (r *recordingTB) Fail() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failed = true
}
func (r *recordingTB) FailNow()                          { r.Fail(); runtime.Goexit() }
func (r *recordingTB) Fatalf(format string, args ...any) { r.Errorf(format, args...); runtime.Goexit() }
func (r *recordingTB) Fatal(args ...any)                 { r.Error(args...); runtime.Goexit() }
func (r *recordingTB) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}

// propertyFails runs requireAllSealed and returns what it reported; "" if
// it held.
func propertyFails(t *testing.T, s logical.Storage, ring *sealpkg.Keyring, secrets secretSet) string {
	t.Helper()
	rec := &recordingTB{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		requireAllSealed(rec, s, ring, secrets)
	}()
	<-done
	if !rec.Failed() {
		return ""
	}
	return strings.Join(rec.msgs, "\n")
}

// TestSealedPropertyCatchesTampering checks the property itself: it holds
// on a mount's storage as the plugin left it, and fails on each thing a
// storage writer (or a bug that wrote past the seal) could leave behind.
func TestSealedPropertyCatchesTampering(t *testing.T) {
	ctx := context.Background()
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", map[string]interface{}{"exportable": true})
	e.encrypt(t, "k", "tamper-test plaintext", nil)
	olderLifecycle := rawGet(t, e, lifecyclePrefix+"k")
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"disabled": true})
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})
	e.mustWrite(t, "keys/gone", nil)
	e.mustWrite(t, "keys/gone/config", map[string]interface{}{"deletion_allowed": true})
	gonePolicy := rawGet(t, e, "policy/gone")
	require.NotNil(t, gonePolicy)
	requireStatus(t, e.del(t, "keys/gone"), 204, "")
	ring, _ := mountKeyring(t, e)
	secrets := secretSet{}
	secrets.AddExported(t, "k v1", exportKeys(t, e, "encryption-key/k")["1"])
	secrets.Add(t, "the plaintext", []byte("tamper-test plaintext"))

	require.Empty(t, propertyFails(t, e.storage, ring, secrets), "the property holds on the plugin's own storage")

	opened := func(s logical.Storage, path string) []byte {
		entry, err := s.Get(ctx, path)
		require.NoError(t, err)
		require.NotNil(t, entry, path)
		pt, err := ring.Open(path, entry.Value)
		require.NoError(t, err)
		return pt
	}
	put := func(s logical.Storage, path string, value []byte) {
		require.NoError(t, s.Put(ctx, &logical.StorageEntry{Key: path, Value: value}))
	}
	rootKey := func() []byte {
		b, err := ring.Marshal()
		require.NoError(t, err)
		var stored struct {
			Keys map[string][]byte `json:"keys"`
		}
		require.NoError(t, json.Unmarshal(b, &stored))
		return stored.Keys[fmt.Sprint(ring.Active())]
	}
	other, err := sealpkg.NewKeyring(importRandom(t, 32))
	require.NoError(t, err)

	for _, tc := range []struct {
		name   string
		tamper func(s logical.Storage)
		want   string
	}{
		{"HSM key metadata stored unencrypted", func(s logical.Storage) {
			put(s, hsmKeyPrefix+"hk", opened(s, hsmKeyPrefix+"hk"))
		}, "hsm/keys/hk is stored in plaintext"},
		{"lifecycle record stored unencrypted", func(s logical.Storage) {
			put(s, lifecyclePrefix+"k", opened(s, lifecyclePrefix+"k"))
		}, "lifecycle/keys/k is stored in plaintext"},
		{"a policy in plaintext leaks its key", func(s logical.Storage) {
			put(s, "policy/k", opened(s, "policy/k"))
		}, "k v1"},
		{"an undocumented plain entry beside seal/config", func(s logical.Storage) {
			put(s, "seal/extra", []byte(`{"note":"plain"}`))
		}, "seal/extra is stored in plaintext"},
		{"a plaintext planted anywhere", func(s logical.Storage) {
			put(s, "notes/x", []byte("tamper-test plaintext"))
		}, "the plaintext"},
		{"a root key in seal/config", func(s logical.Storage) {
			var m map[string]interface{}
			entry, err := s.Get(ctx, "seal/config")
			require.NoError(t, err)
			require.NoError(t, json.Unmarshal(entry.Value, &m))
			m["sealed_keyring"] = base64.StdEncoding.EncodeToString(rootKey())
			b, err := json.Marshal(m)
			require.NoError(t, err)
			put(s, "seal/config", b)
		}, "root key v"},
		{"an unknown field in seal/config", func(s logical.Storage) {
			var m map[string]interface{}
			entry, err := s.Get(ctx, "seal/config")
			require.NoError(t, err)
			require.NoError(t, json.Unmarshal(entry.Value, &m))
			m["recovery_mac_key"] = "c29tZXRoaW5n"
			b, err := json.Marshal(m)
			require.NoError(t, err)
			put(s, "seal/config", b)
		}, "holds a field the seal configuration does not have"},
		{"an entry sealed under another keyring", func(s logical.Storage) {
			v, err := other.Seal("policy/k", opened(s, "policy/k"))
			require.NoError(t, err)
			put(s, "policy/k", v)
		}, "policy/k does not open with the root keyring"},
		{"an entry modified", func(s logical.Storage) {
			entry, err := s.Get(ctx, "policy/k")
			require.NoError(t, err)
			put(s, "policy/k", sealcheck.Flipped(entry.Value, len(entry.Value)-1))
		}, "policy/k does not open with the root keyring"},
		{"an entry moved to another path", func(s logical.Storage) {
			entry, err := s.Get(ctx, "archive/k")
			require.NoError(t, err)
			put(s, "archive/hk", entry.Value)
		}, "archive/hk does not open with the root keyring"},
		{"an older copy of an entry put back", func(s logical.Storage) {
			put(s, lifecyclePrefix+"k", olderLifecycle)
		}, "lifecycle/keys/k is refused by the manifest"},
		{"a deleted entry put back", func(s logical.Storage) {
			put(s, "policy/gone", gonePolicy)
		}, "policy/gone is refused by the manifest"},
		{"an entry sealed without the manifest", func(s logical.Storage) {
			v, err := ring.Seal("policy/new", []byte("{}"))
			require.NoError(t, err)
			put(s, "policy/new", v)
		}, "policy/new is refused by the manifest"},
		{"a manifest bucket deleted", func(s logical.Storage) {
			require.NoError(t, s.Delete(ctx, fmt.Sprintf("%s%02x", propManifestBucket, propBucketOf("policy/k"))))
		}, "refused"},
		{"the manifest root modified", func(s logical.Storage) {
			entry, err := s.Get(ctx, propManifestRoot)
			require.NoError(t, err)
			put(s, propManifestRoot, sealcheck.Flipped(entry.Value, len(entry.Value)-1))
		}, "the manifest does not load with the root keyring"},
		{"a stray entry under the manifest's prefix", func(s logical.Storage) {
			put(s, "manifest/extra", []byte("x"))
		}, "manifest/extra is under the manifest's reserved prefix"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := copyStorage(t, e.storage)
			tc.tamper(s)
			msg := propertyFails(t, s, ring, secrets)
			require.NotEmpty(t, msg, "the property holds on tampered storage")
			require.Contains(t, msg, tc.want)
		})
	}
}
