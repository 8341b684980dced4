package hsmtransit

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
)

// HSM-resident keys: every version is an AES-256 object generated in the
// token and used there; storage (sealed) holds only labels and metadata.

// hsmKeyPrefix is where HSM-resident key metadata is stored.
const hsmKeyPrefix = "hsm/keys/"

// hsmKeyType is the one key type kept in the HSM so far.
const hsmKeyType = "aes256-gcm96"

// hsmKeyVersion is one version. Label records its object's label for
// older readers; operations compute the label from mount, name and version
// (hsmKeyStore.label) and never trust one read from storage.
type hsmKeyVersion struct {
	Label   string    `json:"label"`
	Created time.Time `json:"created"`
}

// hsmKey is an HSM-resident key's metadata. The methods that read it need
// mu read-locked; those that change it, write-locked.
type hsmKey struct {
	mu sync.RWMutex

	Name                 string                `json:"name"`
	Type                 string                `json:"type"`
	Versions             map[int]hsmKeyVersion `json:"versions"`
	LatestVersion        int                   `json:"latest_version"`
	MinDecryptionVersion int                   `json:"min_decryption_version"`
	MinEncryptionVersion int                   `json:"min_encryption_version"`
	MinAvailableVersion  int                   `json:"min_available_version"`
	DeletionAllowed      bool                  `json:"deletion_allowed"`
	AutoRotatePeriod     time.Duration         `json:"auto_rotate_period"`

	// deleted is set once the key is gone, for holders of a stale pointer.
	deleted bool
}

// settings returns the configurable fields, as for a software key.
func (k *hsmKey) settings() keySettings {
	return keySettings{
		minDecryption:   k.MinDecryptionVersion,
		minEncryption:   k.MinEncryptionVersion,
		deletionAllowed: k.DeletionAllowed,
		// An HSM key is never exportable nor backed up in plaintext.
		autoRotatePeriod: k.AutoRotatePeriod,
	}
}

// hsmKeyStore caches HSM-resident keys' metadata and serialises their
// creation and deletion.
type hsmKeyStore struct {
	b     *backend
	locks []*locksutil.LockEntry
	cache *keyCache[*hsmKey]
}

func newHSMKeyStore(b *backend) *hsmKeyStore {
	return &hsmKeyStore{b: b, locks: locksutil.CreateLocks(), cache: newKeyCache[*hsmKey]()}
}

// invalidate forgets a cached key another node changed.
func (s *hsmKeyStore) invalidate(name string) { s.cache.remove(name) }

// reset forgets every cached key.
func (s *hsmKeyStore) reset() { s.cache.purge() }

// cached returns the named key if it is in memory, without touching
// storage.
func (s *hsmKeyStore) cached(name string) *hsmKey {
	k, _ := s.cache.get(name)
	return k
}

// get returns the named HSM-resident key, or nil.
func (s *hsmKeyStore) get(ctx context.Context, storage logical.Storage, name string) (*hsmKey, error) {
	if k, ok := s.cache.get(name); ok {
		return k, nil
	}
	e, err := storage.Get(ctx, hsmKeyPrefix+name)
	if err != nil || e == nil {
		return nil, err
	}
	k := &hsmKey{}
	if err := json.Unmarshal(e.Value, k); err != nil {
		return nil, fmt.Errorf("decoding HSM key %q: %w", name, err)
	}
	return s.cache.addIfAbsent(name, k), nil
}

// persist stores k; mu is held.
func (k *hsmKey) persist(ctx context.Context, storage logical.Storage) error {
	b, err := json.Marshal(k)
	if err != nil {
		return err
	}
	return storage.Put(ctx, &logical.StorageEntry{Key: hsmKeyPrefix + k.Name, Value: b, SealWrap: true})
}

// token returns the mount's HSM token, or a 503 when there is none.
func (s *hsmKeyStore) token() (*hsm.Token, error) {
	tok := s.b.seal.currentToken()
	if tok == nil {
		return nil, unavailableErr("the mount has no HSM token open; check seal/status")
	}
	return tok, nil
}

// label names a version's object in the token by mount, key and version.
func (s *hsmKeyStore) label(name string, version int) string {
	return fmt.Sprintf("hsm-transit/%s/%s/v%d", s.b.seal.mountID, name, version)
}

// labelPrefix is the start of every label of a key's versions.
func (s *hsmKeyStore) labelPrefix(name string) string {
	return fmt.Sprintf("hsm-transit/%s/%s/", s.b.seal.mountID, name)
}

// create makes an HSM-resident key with its first version.
func (s *hsmKeyStore) create(ctx context.Context, storage logical.Storage, name string, autoRotate time.Duration) (*hsmKey, error) {
	if strings.Contains(name, "..") {
		return nil, errRelativeKeyName
	}
	// The label of a far later version must fit the token too.
	if l := s.label(name, 1_000_000); hsm.CheckKeyLabel(l) != nil {
		return nil, callerErr("key name %q is too long for an HSM-resident key: its object labels (%s...) must fit in 128 bytes; use a name of at most %d bytes",
			name, s.labelPrefix(name), max(0, 128-len(s.label("", 1_000_000))))
	}
	// HSM-resident keys are AES-GCM inside the token: a token without it
	// (openCryptoki 3.8, older firmware) is told apart from one that failed.
	if _, err := s.token(); err != nil {
		return nil, err
	}
	if sup := s.b.seal.tokenMechanisms(); sup != nil && !sup.GCM {
		// (A token that does not answer now fails below, as unavailable.)
		return nil, sup.ErrNoGCM()
	}
	k := &hsmKey{Name: name, Type: hsmKeyType, Versions: map[int]hsmKeyVersion{}, MinDecryptionVersion: 1, AutoRotatePeriod: autoRotate}
	if err := s.rotate(ctx, storage, k); err != nil {
		return nil, err
	}
	s.cache.add(name, k)
	return k, nil
}

// rotate generates the next version in the token, then records it; mu is
// held (or k is new). A crash in between leaves an unused object, never a
// version without one.
func (s *hsmKeyStore) rotate(ctx context.Context, storage logical.Storage, k *hsmKey) error {
	tok, err := s.token()
	if err != nil {
		return err
	}
	next := k.LatestVersion + 1
	label := s.label(k.Name, next)
	// A crash after a previous generation may have left the object.
	if has, err := tok.HasKey(label); err != nil {
		return err
	} else if has {
		if err := tok.DestroyKey(label); err != nil {
			return err
		}
	}
	if err := tok.GenerateKey(label); err != nil {
		return err
	}
	k.Versions[next] = hsmKeyVersion{Label: label, Created: time.Now().UTC()}
	k.LatestVersion = next
	if err := k.persist(ctx, storage); err != nil {
		delete(k.Versions, next)
		k.LatestVersion--
		// The object stays: a failed write may still have landed (Raft
		// commits what a Vault that dies mid-request wrote), and then
		// storage records a version whose object must exist. If it did
		// not land, the next rotation finds the object and replaces it.
		// Either way the key is read from storage again.
		s.cache.remove(k.Name)
		return err
	}
	return nil
}

// destroyBelow destroys the objects of versions below min (trim); mu is
// held. Versions are dropped from the metadata only once their object is
// gone, so that a failure can be retried.
func (s *hsmKeyStore) destroyBelow(ctx context.Context, storage logical.Storage, k *hsmKey, min int) error {
	tok, err := s.token()
	if err != nil {
		return err
	}
	for v := range k.Versions {
		if v >= min {
			continue
		}
		if err := tok.DestroyKey(s.label(k.Name, v)); err != nil && hsm.KindOf(err) != hsm.NotFound {
			// Record what is already gone; a retry destroys the rest.
			_ = k.persist(ctx, storage)
			return err
		}
		delete(k.Versions, v)
	}
	return k.persist(ctx, storage)
}

// delete destroys every version's object, then the metadata: after it, no
// ciphertext of the key can be decrypted, whatever backup of storage exists.
func (s *hsmKeyStore) delete(ctx context.Context, storage logical.Storage, k *hsmKey) error {
	tok, err := s.token()
	if err != nil {
		return err
	}
	for v := range k.Versions {
		if err := tok.DestroyKey(s.label(k.Name, v)); err != nil && hsm.KindOf(err) != hsm.NotFound {
			return err
		}
	}
	// Also whatever an interrupted rotation left behind.
	labels, err := tok.KeyLabels(s.labelPrefix(k.Name))
	if err != nil {
		return err
	}
	for _, l := range labels {
		if err := tok.DestroyKey(l); err != nil && hsm.KindOf(err) != hsm.NotFound {
			return err
		}
	}
	if err := storage.Delete(ctx, hsmKeyPrefix+k.Name); err != nil {
		return err
	}
	k.deleted = true
	s.cache.remove(k.Name)
	return nil
}

// hsmCryptoError turns an HSM failure into a caller error when the input is
// at fault, keeping the token's unavailability a 503.
func hsmCryptoError(err error) error {
	switch hsm.KindOf(err) {
	case hsm.Failed:
		return callerErr("cipher: message authentication failed")
	case hsm.NotFound:
		return callerErr("this version of the key is no longer in the HSM (it was destroyed): %v", err)
	case hsm.Unavailable, hsm.Credentials:
		return unavailableErr("the HSM is unavailable: %v", err)
	}
	return err
}

// encrypt encrypts a decoded item with version it.KeyVersion (0: latest)
// inside the HSM; mu is read-locked.
func (s *hsmKeyStore) encrypt(k *hsmKey, it *batchItem) (string, int, error) {
	if err := checkHSMItem(it, it.PaddingScheme); err != nil {
		return "", 0, err
	}
	ver, err := encryptionVersion(it.KeyVersion, k.LatestVersion, k.MinEncryptionVersion)
	if err != nil {
		return "", 0, err
	}
	pt, err := decodePlaintext(it.Plaintext)
	if err != nil {
		return "", 0, err
	}
	if _, ok := k.Versions[ver]; !ok {
		return "", 0, errutil.UserError{Err: "no such key version"}
	}
	tok, err := s.token()
	if err != nil {
		return "", 0, err
	}
	sealed, err := tok.EncryptGCM(s.label(k.Name, ver), pt, s.keyAAD(k.Name, ver, it.aad))
	if err != nil {
		return "", 0, hsmCryptoError(err)
	}
	out := make([]byte, 0, len(hsmCiphertextMarker)+len(sealed))
	return formatCiphertext(ver, append(append(out, hsmCiphertextMarker...), sealed...)), ver, nil
}

// decrypt decrypts a decoded item inside the HSM; mu is read-locked. The
// errors are those of a software key.
func (s *hsmKeyStore) decrypt(k *hsmKey, it *batchItem, paddingScheme string) (string, error) {
	if err := checkHSMItem(it, paddingScheme); err != nil {
		return "", err
	}
	ver, sealed, err := parseCiphertext(it.Ciphertext, k.LatestVersion, k.MinDecryptionVersion)
	if err != nil {
		return "", err
	}
	if len(sealed) < hsm.GCMNonceSize+hsm.GCMTagSize {
		return "", errutil.UserError{Err: "invalid ciphertext length"}
	}
	if _, ok := k.Versions[ver]; !ok {
		return "", errutil.UserError{Err: "no such key version"}
	}
	tok, err := s.token()
	if err != nil {
		return "", err
	}
	label := s.label(k.Name, ver)
	var pt []byte
	if body, ok := bytes.CutPrefix(sealed, hsmCiphertextMarker); ok && len(body) >= hsm.GCMNonceSize+hsm.GCMTagSize {
		pt, err = tok.DecryptGCM(label, body, s.keyAAD(k.Name, ver, it.aad))
		if hsm.KindOf(err) != hsm.Failed {
			return hsmPlaintext(pt, err)
		}
		// A ciphertext of the first format whose random nonce happens
		// to start with the marker: try it as such below.
	}
	// The first format bound the caller's associated data alone. It stays
	// readable, but never with associated data in the plugin's own
	// namespace, which its own HSM operations (the sealed root keyring)
	// use.
	if bytes.HasPrefix(it.aad, []byte(hsmNamespace)) {
		return "", errutil.UserError{Err: "cipher: message authentication failed"}
	}
	return hsmPlaintext(tok.DecryptGCM(label, sealed, it.aad))
}

func hsmPlaintext(pt []byte, err error) (string, error) {
	if err != nil {
		return "", hsmCryptoError(err)
	}
	return base64.StdEncoding.EncodeToString(pt), nil
}

// hsmNamespace starts every label and associated-data tag the plugin uses
// in the token. No configured KEK label may start with it, so that no
// HSM-resident key operation can reach the KEK, nor the reverse.
const hsmNamespace = "hsm-transit/"

// hsmCiphertextMarker starts the payload of ciphertexts made with the
// domain-separated associated data (keyAAD). Ciphertexts of the first
// format start with a random nonce instead.
var hsmCiphertextMarker = []byte("hsk\x02")

// keyAAD is the associated data of an HSM-resident key operation: a purpose
// tag, the mount, key name and version, then the caller's associated data.
// Nothing else the plugin seals in the token (the root keyring, under
// "hsm-transit/root-keyring") can be opened or forged with it, and a
// ciphertext of one key or version cannot pass for another's.
func (s *hsmKeyStore) keyAAD(name string, version int, callerAAD []byte) []byte {
	aad := make([]byte, 0, 64+len(name)+len(callerAAD))
	aad = append(aad, hsmNamespace+"hsm-key\x00"...)
	for _, f := range []string{s.b.seal.mountID, name} {
		aad = binary.BigEndian.AppendUint32(aad, uint32(len(f)))
		aad = append(aad, f...)
	}
	aad = binary.BigEndian.AppendUint64(aad, uint64(version))
	return append(aad, callerAAD...)
}

// checkHSMItem refuses what an HSM-resident key does not do.
func checkHSMItem(it *batchItem, paddingScheme string) error {
	switch {
	case it.Context != "":
		return errutil.UserError{Err: "HSM-resident keys are not derived: context is not supported"}
	case it.Nonce != "":
		return errNonceNotAllowed
	case paddingScheme != "":
		return errutil.UserError{Err: fmt.Sprintf("unsupported key type %s for padding scheme", hsmKeyType)}
	}
	return nil
}

// describe is keys/:name's read of an HSM-resident key: built-in transit's
// fields, plus hsm and the labels of the versions.
func (k *hsmKey) describe(label func(name string, version int) string) *logical.Response {
	versions := make(map[string]int64, len(k.Versions))
	labels := make(map[string]string, len(k.Versions))
	for v, ver := range k.Versions {
		versions[strconv.Itoa(v)] = ver.Created.Unix()
		labels[strconv.Itoa(v)] = label(k.Name, v)
	}
	return &logical.Response{Data: map[string]interface{}{
		"name":                   k.Name,
		"type":                   k.Type,
		"derived":                false,
		"deletion_allowed":       k.DeletionAllowed,
		"min_available_version":  k.MinAvailableVersion,
		"min_decryption_version": k.MinDecryptionVersion,
		"min_encryption_version": k.MinEncryptionVersion,
		"latest_version":         k.LatestVersion,
		"exportable":             false,
		"allow_plaintext_backup": false,
		"supports_encryption":    true,
		"supports_decryption":    true,
		"supports_signing":       false,
		"supports_derivation":    false,
		"auto_rotate_period":     int64(k.AutoRotatePeriod.Seconds()),
		"imported_key":           false,
		"keys":                   versions,
		"hsm":                    true,
		"hsm_labels":             labels,
	}}
}

// errHSMKeyUnsupported refuses an operation an HSM-resident key lacks.
func errHSMKeyUnsupported(name, what string) error {
	return callerErr("key %q is HSM-resident: %s is not supported for it; HSM-resident keys support keys/:name (read, config, rotate, trim, delete), encrypt, decrypt, rewrap and datakey, and their material never leaves the HSM", name, what)
}
