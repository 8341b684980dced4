// Package seal holds a mount's root keyring and the storage that encrypts
// every entry under it. The keyring itself is sealed by the HSM elsewhere;
// here it is plaintext in memory only.
package seal

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
)

// RootKeySize is the size of a root key: AES-256.
const RootKeySize = 32

// Keyring is an immutable set of root key versions, one of them active for
// new writes. Rotation builds a new Keyring.
type Keyring struct {
	active   uint32
	versions map[uint32]*rootKey
}

type rootKey struct {
	raw  []byte
	aead cipher.AEAD // built once per version, never per request
}

func newRootKey(raw []byte) (*rootKey, error) {
	if len(raw) != RootKeySize {
		return nil, fmt.Errorf("root key must be %d bytes, got %d", RootKeySize, len(raw))
	}
	block, err := aes.NewCipher(raw)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &rootKey{raw: append([]byte(nil), raw...), aead: aead}, nil
}

// NewKeyring returns a keyring whose only, active, version is 1.
func NewKeyring(key []byte) (*Keyring, error) {
	rk, err := newRootKey(key)
	if err != nil {
		return nil, err
	}
	return &Keyring{active: 1, versions: map[uint32]*rootKey{1: rk}}, nil
}

// Active returns the version new writes use.
func (k *Keyring) Active() uint32 { return k.active }

// Versions lists the versions held, oldest first.
func (k *Keyring) Versions() []uint32 {
	out := make([]uint32, 0, len(k.versions))
	for v := range k.versions {
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// Rotated returns a keyring with key as a new active version after the
// latest, keeping the older versions to read existing entries.
func (k *Keyring) Rotated(key []byte) (*Keyring, error) {
	rk, err := newRootKey(key)
	if err != nil {
		return nil, err
	}
	next := &Keyring{versions: make(map[uint32]*rootKey, len(k.versions)+1)}
	for v, r := range k.versions {
		next.versions[v] = r
		if v > next.active {
			next.active = v
		}
	}
	next.active++
	next.versions[next.active] = rk
	return next, nil
}

// ActiveOnly returns a keyring with the active version alone, once no entry
// needs the others.
func (k *Keyring) ActiveOnly() *Keyring {
	return &Keyring{active: k.active, versions: map[uint32]*rootKey{k.active: k.versions[k.active]}}
}

// storedKeyring is the keyring's serialised form, which only ever leaves
// memory sealed by the HSM (or by recovery shares).
type storedKeyring struct {
	Active uint32            `json:"active"`
	Keys   map[string][]byte `json:"keys"`
}

// Marshal serialises the keyring. The result holds key bytes: seal it.
func (k *Keyring) Marshal() ([]byte, error) {
	s := storedKeyring{Active: k.active, Keys: make(map[string][]byte, len(k.versions))}
	for v, r := range k.versions {
		s.Keys[strconv.FormatUint(uint64(v), 10)] = r.raw
	}
	return json.Marshal(s)
}

// UnmarshalKeyring parses what Marshal produced.
func UnmarshalKeyring(b []byte) (*Keyring, error) {
	var s storedKeyring
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("decoding root keyring: %w", err)
	}
	k := &Keyring{active: s.Active, versions: make(map[uint32]*rootKey, len(s.Keys))}
	for vs, raw := range s.Keys {
		v, err := strconv.ParseUint(vs, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("decoding root keyring: bad version %q", vs)
		}
		rk, err := newRootKey(raw)
		if err != nil {
			return nil, fmt.Errorf("decoding root keyring version %d: %w", v, err)
		}
		k.versions[uint32(v)] = rk
	}
	if _, ok := k.versions[k.active]; !ok {
		return nil, errors.New("decoding root keyring: the active version is missing")
	}
	return k, nil
}

// Entry format: magic, root key version, nonce, ciphertext and tag. The
// magic tells sealed entries from ones written before the mount was sealed.
var entryMagic = []byte("hst\x01")

const (
	headerSize = 4 + 4 // magic, version
	nonceSize  = 12
)

// IsSealed reports whether an entry value is in the sealed format.
func IsSealed(value []byte) bool {
	return len(value) >= headerSize+nonceSize && string(value[:4]) == string(entryMagic)
}

// SealedVersion returns the root key version of a sealed entry value.
func SealedVersion(value []byte) (uint32, bool) {
	if !IsSealed(value) {
		return 0, false
	}
	return binary.BigEndian.Uint32(value[4:8]), true
}

// entryAAD binds a sealed value to its storage path, so that entries cannot
// be swapped for one another.
func entryAAD(path string, version uint32) []byte {
	aad := make([]byte, 0, len("hsm-transit/entry\x00")+len(path)+5)
	aad = append(aad, "hsm-transit/entry\x00"...)
	aad = append(aad, path...)
	aad = append(aad, 0)
	return binary.BigEndian.AppendUint32(aad, version)
}

// Seal encrypts value for path under the active version.
func (k *Keyring) Seal(path string, value []byte) ([]byte, error) {
	rk := k.versions[k.active]
	out := make([]byte, headerSize+nonceSize, headerSize+nonceSize+len(value)+rk.aead.Overhead())
	copy(out, entryMagic)
	binary.BigEndian.PutUint32(out[4:8], k.active)
	if _, err := rand.Read(out[headerSize:]); err != nil {
		return nil, fmt.Errorf("generating nonce: %w", err)
	}
	return rk.aead.Seal(out, out[headerSize:], value, entryAAD(path, k.active)), nil
}

// Open decrypts a value Seal made for path.
func (k *Keyring) Open(path string, sealed []byte) ([]byte, error) {
	v, ok := SealedVersion(sealed)
	if !ok {
		return nil, fmt.Errorf("storage entry %q is not sealed by this mount's root key", path)
	}
	rk, ok := k.versions[v]
	if !ok {
		return nil, fmt.Errorf("storage entry %q is sealed by root key version %d, which this keyring does not hold", path, v)
	}
	pt, err := rk.aead.Open(nil, sealed[headerSize:headerSize+nonceSize], sealed[headerSize+nonceSize:], entryAAD(path, v))
	if err != nil {
		return nil, fmt.Errorf("storage entry %q does not authenticate under root key version %d (modified, or moved from another path)", path, v)
	}
	return pt, nil
}

// Wipe overwrites the key bytes this keyring holds. The AEADs built from
// them keep their own expanded copies until collected.
func (k *Keyring) Wipe() {
	for _, r := range k.versions {
		clear(r.raw)
	}
}
