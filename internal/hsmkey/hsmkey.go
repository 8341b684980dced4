// Package hsmkey keeps a mount's HSM-resident keys: every version is an
// AES-256 object generated in the token and used there; the mount's
// (sealed) storage holds only each key's metadata.
//
// A Store is given what it needs instead of the backend: the mount's ID,
// which names every object it makes in the token and is bound into every
// operation's associated data, and a Tokens that returns the mount's token
// as it is now (nil while sealed; another one after a reconnect). It knows
// nothing of requests: callers resolve versions, decode items and format
// ciphertexts, and use a version through its AEAD, which encrypts and
// decrypts bytes in the spirit of Tink's AEAD.
//
// Errors are those the plugin's error mapping classifies: the caller's
// mistakes are errutil.UserError, an unreachable token a 503
// logical.CodedError, and the rest as they come.
package hsmkey

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"strings"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
)

const (
	// StoragePrefix is where key metadata is stored.
	StoragePrefix = "hsm/keys/"
	// Type is the one key type kept in the HSM so far.
	Type = "aes256-gcm96"
	// Namespace starts every label and associated-data tag the plugin uses
	// in the token. No configured KEK label may start with it, so that no
	// HSM-resident key operation can reach the KEK, nor the reverse.
	Namespace = "hsm-transit/"
)

// Marker starts the payload of ciphertexts made with the domain-separated
// associated data (see keyAAD). Ciphertexts of the first format start with
// a random nonce instead.
var Marker = []byte("hsk\x02")

// Tokens gives the mount's token as it is now.
type Tokens interface {
	// CurrentToken is the mount's open token, or nil.
	CurrentToken() *hsm.Token
	// TokenMechanisms is what the current token offers, or nil when it
	// has not been asked (or did not answer).
	TokenMechanisms() *hsm.MechanismSupport
}

// Version is one version of a key. Label records its object's label for
// older readers; operations compute the label from mount, name and version
// (Store.Label) and never trust one read from storage.
type Version struct {
	Label   string    `json:"label"`
	Created time.Time `json:"created"`
}

// Key is an HSM-resident key's metadata, as stored. Readers hold it
// read-locked (RLock), writers locked (Lock); the Store's methods that
// take a Key say which they need.
type Key struct {
	mu sync.RWMutex

	Name                 string          `json:"name"`
	Type                 string          `json:"type"`
	Versions             map[int]Version `json:"versions"`
	LatestVersion        int             `json:"latest_version"`
	MinDecryptionVersion int             `json:"min_decryption_version"`
	MinEncryptionVersion int             `json:"min_encryption_version"`
	MinAvailableVersion  int             `json:"min_available_version"`
	DeletionAllowed      bool            `json:"deletion_allowed"`
	AutoRotatePeriod     time.Duration   `json:"auto_rotate_period"`

	// deleted is set once the key is gone, for holders of a stale pointer.
	deleted bool
}

// Lock, Unlock, RLock and RUnlock lock the key's metadata.
func (k *Key) Lock()    { k.mu.Lock() }
func (k *Key) Unlock()  { k.mu.Unlock() }
func (k *Key) RLock()   { k.mu.RLock() }
func (k *Key) RUnlock() { k.mu.RUnlock() }

// Deleted reports a key deleted since it was looked up; the lock is held.
func (k *Key) Deleted() bool { return k.deleted }

// Store caches a mount's HSM-resident keys' metadata and makes, rotates and
// destroys their objects in the token.
type Store struct {
	tokens  Tokens
	mountID string
	// Locks serialise the creation of a name (software or HSM-resident:
	// one name, one key) with locksutil.LockForKey.
	Locks []*locksutil.LockEntry
	cache *lru.Cache[string, *Key]
}

// NewStore returns the store of the mount mountID, whose token tokens gives.
func NewStore(tokens Tokens, mountID string) *Store {
	c, err := lru.New[string, *Key](math.MaxInt32)
	if err != nil {
		panic(err) // only for a size below 1
	}
	return &Store{tokens: tokens, mountID: mountID, Locks: locksutil.CreateLocks(), cache: c}
}

// Resize bounds the cache to size keys (0: unbounded), as cache-config
// bounds the policy cache.
func (s *Store) Resize(size int) {
	if size <= 0 {
		size = math.MaxInt32
	}
	s.cache.Resize(size)
}

// CacheLen is how many keys are in memory.
func (s *Store) CacheLen() int { return s.cache.Len() }

// Invalidate forgets a cached key another node changed.
func (s *Store) Invalidate(name string) { s.cache.Remove(name) }

// Reset forgets every cached key.
func (s *Store) Reset() { s.cache.Purge() }

// Cached returns the named key if it is in memory, without touching
// storage.
func (s *Store) Cached(name string) *Key {
	k, _ := s.cache.Get(name)
	return k
}

// Get returns the named key, or nil.
func (s *Store) Get(ctx context.Context, storage logical.Storage, name string) (*Key, error) {
	if k, ok := s.cache.Get(name); ok {
		return k, nil
	}
	e, err := storage.Get(ctx, StoragePrefix+name)
	if err != nil || e == nil {
		return nil, err
	}
	k := &Key{}
	if err := json.Unmarshal(e.Value, k); err != nil {
		return nil, fmt.Errorf("decoding HSM key %q: %w", name, err)
	}
	if prev, ok, _ := s.cache.PeekOrAdd(name, k); ok {
		return prev, nil
	}
	return k, nil
}

// Persist stores k's metadata; k is locked.
func (s *Store) Persist(ctx context.Context, storage logical.Storage, k *Key) error {
	b, err := json.Marshal(k)
	if err != nil {
		return err
	}
	return storage.Put(ctx, &logical.StorageEntry{Key: StoragePrefix + k.Name, Value: b, SealWrap: true})
}

// Token returns the mount's token, or a 503 when there is none.
func (s *Store) Token() (*hsm.Token, error) {
	tok := s.tokens.CurrentToken()
	if tok == nil {
		return nil, logical.CodedError(http.StatusServiceUnavailable, "the mount has no HSM token open; check seal/status")
	}
	return tok, nil
}

// Label names a version's object in the token by mount, key and version.
func (s *Store) Label(name string, version int) string {
	return fmt.Sprintf("%s%s/%s/v%d", Namespace, s.mountID, name, version)
}

// LabelPrefix is the start of every label of a key's versions.
func (s *Store) LabelPrefix(name string) string {
	return fmt.Sprintf("%s%s/%s/", Namespace, s.mountID, name)
}

// MaxNameLen is the longest key name whose labels fit the token up to a
// millionth version.
func (s *Store) MaxNameLen() int { return max(0, 128-len(s.Label("", 1_000_000))) }

// Create makes a key with its first version; the name's lock (Locks) is
// held.
func (s *Store) Create(ctx context.Context, storage logical.Storage, name string, autoRotate time.Duration) (*Key, error) {
	if strings.Contains(name, "..") {
		return nil, errutil.UserError{Err: `key names cannot contain "..": relative paths not supported`}
	}
	// The label of a far later version must fit the token too.
	if l := s.Label(name, 1_000_000); hsm.CheckKeyLabel(l) != nil {
		return nil, errutil.UserError{Err: fmt.Sprintf("key name %q is too long for an HSM-resident key: its object labels (%s...) must fit in 128 bytes; use a name of at most %d bytes",
			name, s.LabelPrefix(name), s.MaxNameLen())}
	}
	// HSM-resident keys are AES-GCM inside the token: a token without it
	// (openCryptoki 3.8, older firmware) is told apart from one that failed.
	if _, err := s.Token(); err != nil {
		return nil, err
	}
	if sup := s.tokens.TokenMechanisms(); sup != nil && !sup.GCM {
		// (A token that does not answer now fails below, as unavailable.)
		return nil, sup.ErrNoGCM()
	}
	k := &Key{Name: name, Type: Type, Versions: map[int]Version{}, MinDecryptionVersion: 1, AutoRotatePeriod: autoRotate}
	if err := s.Rotate(ctx, storage, k); err != nil {
		return nil, err
	}
	s.cache.Add(name, k)
	return k, nil
}

// Rotate generates the next version in the token, then records it; k is
// locked (or new). A crash in between leaves an unused object, never a
// version without one.
func (s *Store) Rotate(ctx context.Context, storage logical.Storage, k *Key) error {
	tok, err := s.Token()
	if err != nil {
		return err
	}
	next := k.LatestVersion + 1
	label := s.Label(k.Name, next)
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
	k.Versions[next] = Version{Label: label, Created: time.Now().UTC()}
	k.LatestVersion = next
	if err := s.Persist(ctx, storage, k); err != nil {
		delete(k.Versions, next)
		k.LatestVersion--
		// The object stays: a failed write may still have landed (Raft
		// commits what a Vault that dies mid-request wrote), and then
		// storage records a version whose object must exist. If it did
		// not land, the next rotation finds the object and replaces it.
		// Either way the key is read from storage again.
		s.cache.Remove(k.Name)
		return err
	}
	return nil
}

// DestroyBelow destroys the objects of versions below min (trim); k is
// locked. Versions are dropped from the metadata only once their object is
// gone, so that a failure can be retried.
func (s *Store) DestroyBelow(ctx context.Context, storage logical.Storage, k *Key, min int) error {
	tok, err := s.Token()
	if err != nil {
		return err
	}
	for v := range k.Versions {
		if v >= min {
			continue
		}
		if err := tok.DestroyKey(s.Label(k.Name, v)); err != nil && hsm.KindOf(err) != hsm.NotFound {
			// Record what is already gone; a retry destroys the rest.
			_ = s.Persist(ctx, storage, k)
			return err
		}
		delete(k.Versions, v)
	}
	return s.Persist(ctx, storage, k)
}

// Delete destroys every version's object, then the metadata; k is locked.
// After it, no ciphertext of the key can be decrypted, whatever backup of
// storage exists.
func (s *Store) Delete(ctx context.Context, storage logical.Storage, k *Key) error {
	tok, err := s.Token()
	if err != nil {
		return err
	}
	for v := range k.Versions {
		if err := tok.DestroyKey(s.Label(k.Name, v)); err != nil && hsm.KindOf(err) != hsm.NotFound {
			return err
		}
	}
	// Also whatever an interrupted rotation left behind.
	labels, err := tok.KeyLabels(s.LabelPrefix(k.Name))
	if err != nil {
		return err
	}
	for _, l := range labels {
		if err := tok.DestroyKey(l); err != nil && hsm.KindOf(err) != hsm.NotFound {
			return err
		}
	}
	if err := storage.Delete(ctx, StoragePrefix+k.Name); err != nil {
		return err
	}
	k.deleted = true
	s.cache.Remove(k.Name)
	return nil
}

// Random draws n bytes from the token's generator.
func (s *Store) Random(n int) ([]byte, error) {
	tok, err := s.Token()
	if err != nil {
		return nil, err
	}
	buf, err := tok.Random(n)
	if err != nil {
		return nil, CryptoError(err)
	}
	return buf, nil
}

// CryptoError turns an HSM failure into the caller's error when the input
// is at fault, keeping the token's unavailability a 503.
func CryptoError(err error) error {
	switch hsm.KindOf(err) {
	case hsm.Failed:
		return errutil.UserError{Err: "cipher: message authentication failed"}
	case hsm.NotFound:
		return errutil.UserError{Err: fmt.Sprintf("this version of the key is no longer in the HSM (it was destroyed): %v", err)}
	case hsm.Unavailable, hsm.Credentials:
		return logical.CodedError(http.StatusServiceUnavailable, fmt.Sprintf("the HSM is unavailable: %v", err))
	}
	return err
}

// AEAD is one version of a key as a cipher over bytes, in the spirit of
// Tink's AEAD: the token draws the nonce, and the associated data is bound
// to the mount, the key and the version besides the caller's.
type AEAD struct {
	s       *Store
	name    string
	version int
}

// AEAD returns version v of k; k is read-locked and stays so while the
// AEAD is used. A version the key does not have is the caller's error.
func (s *Store) AEAD(k *Key, v int) (AEAD, error) {
	if _, ok := k.Versions[v]; !ok {
		return AEAD{}, errutil.UserError{Err: "no such key version"}
	}
	return AEAD{s: s, name: k.Name, version: v}, nil
}

// MinCiphertext is the shortest payload Decrypt can open: a nonce and a tag.
const MinCiphertext = hsm.GCMNonceSize + hsm.GCMTagSize

// Encrypt seals plaintext with associatedData: Marker, the nonce, the
// ciphertext and the tag.
func (a AEAD) Encrypt(plaintext, associatedData []byte) ([]byte, error) {
	tok, err := a.s.Token()
	if err != nil {
		return nil, err
	}
	sealed, err := tok.EncryptGCM(a.s.Label(a.name, a.version), plaintext, a.s.keyAAD(a.name, a.version, associatedData))
	if err != nil {
		return nil, CryptoError(err)
	}
	return withMarker(sealed), nil
}

// withMarker is Marker followed by what the token sealed.
func withMarker(sealed []byte) []byte {
	return append(append(make([]byte, 0, len(Marker)+len(sealed)), Marker...), sealed...)
}

// batchAAD returns the associated data the token binds to item i of a
// batch: the key's with associatedData[i] (none when shorter), the key's
// alone made once for every item without its own.
func (a AEAD) batchAAD(associatedData [][]byte) func(i int) []byte {
	var bare []byte
	return func(i int) []byte {
		if i < len(associatedData) && len(associatedData[i]) > 0 {
			return a.s.keyAAD(a.name, a.version, associatedData[i])
		}
		if bare == nil {
			bare = a.s.keyAAD(a.name, a.version, nil)
		}
		return bare
	}
}

// EncryptBatch is Encrypt of each plaintext with its associated data
// (associatedData[i], or none when shorter), at most hsm.MaxGCMBatch of
// them, in one call to the token (Token.EncryptGCMBatch): sealed[i] or
// errs[i] is item i's; err is what fails them all.
func (a AEAD) EncryptBatch(plaintexts, associatedData [][]byte) (sealed [][]byte, errs []error, err error) {
	tok, err := a.s.Token()
	if err != nil {
		return nil, nil, err
	}
	var buf [hsm.MaxGCMBatch]hsm.GCMItem
	if len(plaintexts) > len(buf) {
		return nil, nil, fmt.Errorf("%d items in one HSM batch; at most %d", len(plaintexts), len(buf))
	}
	items := buf[:len(plaintexts)]
	aad := a.batchAAD(associatedData)
	for i, pt := range plaintexts {
		items[i].In, items[i].AAD = pt, aad(i)
	}
	if err := tok.EncryptGCMBatch(a.s.Label(a.name, a.version), items); err != nil {
		return nil, nil, CryptoError(err)
	}
	sealed, errs = make([][]byte, len(items)), make([]error, len(items))
	for i, it := range items {
		if it.Err != nil {
			errs[i] = CryptoError(it.Err)
			continue
		}
		sealed[i] = withMarker(it.Out)
	}
	return sealed, errs, nil
}

// Decrypt opens what Encrypt made, or a ciphertext of the first format
// (the caller's associated data alone, no Marker).
func (a AEAD) Decrypt(ciphertext, associatedData []byte) ([]byte, error) {
	if len(ciphertext) < MinCiphertext {
		return nil, errutil.UserError{Err: "invalid ciphertext length"}
	}
	tok, err := a.s.Token()
	if err != nil {
		return nil, err
	}
	label := a.s.Label(a.name, a.version)
	if body, ok := bytes.CutPrefix(ciphertext, Marker); ok && len(body) >= MinCiphertext {
		pt, err := tok.DecryptGCM(label, body, a.s.keyAAD(a.name, a.version, associatedData))
		if hsm.KindOf(err) != hsm.Failed {
			return plaintext(pt, err)
		}
		// A ciphertext of the first format whose random nonce happens
		// to start with the marker: try it as such below.
	}
	return a.decryptFirstFormat(tok, label, ciphertext, associatedData)
}

// decryptFirstFormat opens a ciphertext of the first format, which bound
// the caller's associated data alone. It stays readable, but never with
// associated data in the plugin's own namespace, which its own HSM
// operations (the sealed root keyring) use.
func (a AEAD) decryptFirstFormat(tok *hsm.Token, label string, ciphertext, associatedData []byte) ([]byte, error) {
	if bytes.HasPrefix(associatedData, []byte(Namespace)) {
		return nil, errutil.UserError{Err: "cipher: message authentication failed"}
	}
	return plaintext(tok.DecryptGCM(label, ciphertext, associatedData))
}

// DecryptBatch is Decrypt of each ciphertext with its associated data
// (associatedData[i], or none when shorter), at most hsm.MaxGCMBatch of
// them: the ciphertexts of the current format in one call to the token
// (Token.DecryptGCMBatch); those of the first format, and those that do
// not open as the current one, each as Decrypt tries them.
func (a AEAD) DecryptBatch(ciphertexts, associatedData [][]byte) (plaintexts [][]byte, errs []error, err error) {
	if len(ciphertexts) > hsm.MaxGCMBatch {
		return nil, nil, fmt.Errorf("%d items in one HSM batch; at most %d", len(ciphertexts), hsm.MaxGCMBatch)
	}
	tok, err := a.s.Token()
	if err != nil {
		return nil, nil, err
	}
	ad := func(i int) []byte {
		if i < len(associatedData) {
			return associatedData[i]
		}
		return nil
	}
	label := a.s.Label(a.name, a.version)
	plaintexts, errs = make([][]byte, len(ciphertexts)), make([]error, len(ciphertexts))
	var buf [hsm.MaxGCMBatch]hsm.GCMItem
	var at [hsm.MaxGCMBatch]int // the item of each of buf's
	current := buf[:0]
	aad := a.batchAAD(associatedData)
	for i, ct := range ciphertexts {
		if len(ct) < MinCiphertext {
			errs[i] = errutil.UserError{Err: "invalid ciphertext length"}
			continue
		}
		body, ok := bytes.CutPrefix(ct, Marker)
		if !ok || len(body) < MinCiphertext {
			plaintexts[i], errs[i] = a.decryptFirstFormat(tok, label, ct, ad(i))
			continue
		}
		at[len(current)] = i
		current = append(current, hsm.GCMItem{In: body, AAD: aad(i)})
	}
	if len(current) == 0 {
		return plaintexts, errs, nil
	}
	if err := tok.DecryptGCMBatch(label, current); err != nil {
		return nil, nil, CryptoError(err)
	}
	for j, it := range current {
		i := at[j]
		switch {
		case it.Err == nil:
			plaintexts[i] = it.Out
		case hsm.KindOf(it.Err) == hsm.Failed:
			// Perhaps of the first format, its nonce starting with
			// the marker.
			plaintexts[i], errs[i] = a.decryptFirstFormat(tok, label, ciphertexts[i], ad(i))
		default:
			errs[i] = CryptoError(it.Err)
		}
	}
	return plaintexts, errs, nil
}

// plaintext is a token's answer to a decryption, its error as a request's.
func plaintext(pt []byte, err error) ([]byte, error) {
	if err != nil {
		return nil, CryptoError(err)
	}
	return pt, nil
}

// keyAAD is the associated data of a key operation: a purpose tag, the
// mount, key name and version, then the caller's associated data. Nothing
// else the plugin seals in the token (the root keyring, under
// "hsm-transit/root-keyring") can be opened or forged with it, and a
// ciphertext of one key or version cannot pass for another's.
func (s *Store) keyAAD(name string, version int, callerAAD []byte) []byte {
	aad := make([]byte, 0, 128) // grown by append for long names or AAD
	aad = append(aad, Namespace+"hsm-key\x00"...)
	for _, f := range []string{s.mountID, name} {
		aad = binary.BigEndian.AppendUint32(aad, uint32(len(f)))
		aad = append(aad, f...)
	}
	aad = binary.BigEndian.AppendUint64(aad, uint64(version))
	return append(aad, callerAAD...)
}
