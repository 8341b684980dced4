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
	"slices"
	"strconv"
)

// RootKeySize is the size of a root key: AES-256.
const RootKeySize = 32

// Keyring is an immutable set of root key versions, one of them active for
// new writes. Rotation builds a new Keyring.
type Keyring struct {
	active   uint32
	versions map[uint32]*rootKey
	// manifest records that this mount's storage has a manifest (see
	// manifest.go): it rides in the HSM-sealed serialisation, so that a
	// storage writer cannot make the manifest's absence look legitimate.
	manifest bool
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

// Manifested reports whether the mount's storage has a manifest that must be
// loaded before the keyring serves.
func (k *Keyring) Manifested() bool { return k.manifest }

// WithManifest returns a copy of the keyring with the manifest flag set.
// Rotated and ActiveOnly keep the flag.
func (k *Keyring) WithManifest() *Keyring {
	next := &Keyring{active: k.active, versions: make(map[uint32]*rootKey, len(k.versions)), manifest: true}
	for v, r := range k.versions {
		next.versions[v] = r
	}
	return next
}

// Active returns the version new writes use.
func (k *Keyring) Active() uint32 { return k.active }

// Versions lists the versions held, oldest first.
func (k *Keyring) Versions() []uint32 {
	out := make([]uint32, 0, len(k.versions))
	for v := range k.versions {
		out = append(out, v)
	}
	slices.Sort(out)
	return out
}

// Rotated returns a keyring with key as a new active version after the
// latest, keeping the older versions to read existing entries.
func (k *Keyring) Rotated(key []byte) (*Keyring, error) {
	rk, err := newRootKey(key)
	if err != nil {
		return nil, err
	}
	next := &Keyring{versions: make(map[uint32]*rootKey), manifest: k.manifest}
	for v, r := range k.versions {
		next.versions[v] = r
	}
	vs := k.Versions()
	next.active = vs[len(vs)-1] + 1 // after the latest, active or not
	next.versions[next.active] = rk
	return next, nil
}

// ActiveOnly returns a keyring with the active version alone, once no entry
// needs the others.
func (k *Keyring) ActiveOnly() *Keyring {
	return &Keyring{active: k.active, versions: map[uint32]*rootKey{k.active: k.versions[k.active]}, manifest: k.manifest}
}

// storedKeyring is the keyring's serialised form, which only ever leaves
// memory sealed by the HSM (or by recovery shares).
type storedKeyring struct {
	Active uint32            `json:"active"`
	Keys   map[string][]byte `json:"keys"`
	// Manifest is absent in serialisations made before manifests existed.
	Manifest bool `json:"manifest,omitempty"`
}

// Marshal serialises the keyring. The result holds key bytes: seal it.
func (k *Keyring) Marshal() ([]byte, error) {
	s := storedKeyring{Active: k.active, Keys: make(map[string][]byte, len(k.versions)), Manifest: k.manifest}
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
	k := &Keyring{active: s.Active, versions: make(map[uint32]*rootKey, len(s.Keys)), manifest: s.Manifest}
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

// Entry formats. Both start with a magic, which tells sealed entries from
// ones written before the mount was sealed, and the root key version:
//
//	hst\x01: magic(4) | version(4) | nonce(12) | ciphertext and tag
//	hst\x02: magic(4) | version(4) | generation(8) | nonce(12) | ciphertext and tag
//
// The generation (big endian) is what the manifest compares to refuse an
// older copy of an entry (manifest.go); hst\x01 entries are generation 0.
var (
	entryMagicV1 = []byte("hst\x01")
	entryMagicV2 = []byte("hst\x02")
)

const (
	headerSize   = 8  // hst\x01: magic 4, version 4
	headerSizeV2 = 16 // hst\x02: magic 4, version 4, generation 8
	nonceSize    = 12
)

// header is what a sealed value's clear prefix says.
type header struct {
	format  byte // 1 or 2
	version uint32
	gen     uint64
	body    int // offset of the nonce
}

func parseHeader(value []byte) (header, bool) {
	// An if chain rather than a switch: gremlins counts case expressions
	// as never covered.
	if len(value) >= headerSize+nonceSize && string(value[:4]) == string(entryMagicV1) {
		return header{format: 1, version: binary.BigEndian.Uint32(value[4:8]), body: headerSize}, true
	}
	if len(value) >= headerSizeV2+nonceSize && string(value[:4]) == string(entryMagicV2) {
		return header{format: 2, version: binary.BigEndian.Uint32(value[4:8]), gen: binary.BigEndian.Uint64(value[8:16]), body: headerSizeV2}, true
	}
	return header{}, false
}

// IsSealed reports whether an entry value is in a sealed format.
func IsSealed(value []byte) bool {
	_, ok := parseHeader(value)
	return ok
}

// SealedVersion returns the root key version of a sealed entry value.
func SealedVersion(value []byte) (uint32, bool) {
	h, ok := parseHeader(value)
	return h.version, ok
}

// SealedGeneration returns the generation a sealed entry value claims (0
// for the hst\x01 format). It is authenticated only once the value opens.
func SealedGeneration(value []byte) (uint64, bool) {
	h, ok := parseHeader(value)
	return h.gen, ok
}

// entryAAD binds an hst\x01 value to its storage path, so that entries
// cannot be swapped for one another.
func entryAAD(path string, version uint32) []byte {
	// No capacity hints here or below: their arithmetic would be mutants
	// that no test can tell apart (make mutation).
	aad := []byte("hsm-transit/entry\x00")
	aad = append(aad, path...)
	aad = append(aad, 0)
	return binary.BigEndian.AppendUint32(aad, version)
}

// Purposes of hst\x02 values: an entry the view wrote, or a piece of the
// manifest. A value sealed for one never opens as the other. Neither tag is
// a prefix of the hst\x01 tag nor the other way round, and the path is
// length-prefixed, so no two (purpose, path, version, generation) share an
// AAD.
const (
	purposeEntry    = "hsm-transit/entry/v2\x00"
	purposeManifest = "hsm-transit/manifest/v2\x00"
)

func entryAADv2(purpose, path string, version uint32, gen uint64) []byte {
	aad := []byte(purpose)
	aad = binary.BigEndian.AppendUint32(aad, uint32(len(path)))
	aad = append(aad, path...)
	aad = binary.BigEndian.AppendUint32(aad, version)
	return binary.BigEndian.AppendUint64(aad, gen)
}

// Seal encrypts value for path under the active version, in the hst\x01
// format (no generation). The Sealer writes hst\x02 once the mount has a
// manifest.
func (k *Keyring) Seal(path string, value []byte) ([]byte, error) {
	rk := k.versions[k.active]
	out := make([]byte, headerSize+nonceSize)
	copy(out, entryMagicV1)
	binary.BigEndian.PutUint32(out[4:8], k.active)
	if _, err := rand.Read(out[headerSize:]); err != nil {
		return nil, fmt.Errorf("generating nonce: %w", err)
	}
	return rk.aead.Seal(out, out[headerSize:], value, entryAAD(path, k.active)), nil
}

// sealV2 encrypts value for (purpose, path) at generation gen under the
// active version, in the hst\x02 format.
func (k *Keyring) sealV2(purpose, path string, gen uint64, value []byte) ([]byte, error) {
	rk := k.versions[k.active]
	out := make([]byte, headerSizeV2+nonceSize)
	copy(out, entryMagicV2)
	binary.BigEndian.PutUint32(out[4:8], k.active)
	binary.BigEndian.PutUint64(out[8:16], gen)
	if _, err := rand.Read(out[headerSizeV2:]); err != nil {
		return nil, fmt.Errorf("generating nonce: %w", err)
	}
	return rk.aead.Seal(out, out[headerSizeV2:], value, entryAADv2(purpose, path, k.active, gen)), nil
}

// ErrEntryRefused is what every refusal of a stored entry matches
// (errors.Is): one the plugin did not seal, one that does not authenticate,
// an older copy the manifest refuses. Such an entry stays refused whatever
// the caller does; only storage that was edited outside the plugin holds
// one.
var ErrEntryRefused = errors.New("storage entry refused")

// refusedError is a refusal with its own message that matches
// ErrEntryRefused.
type refusedError struct{ msg string }

func (e *refusedError) Error() string        { return e.msg }
func (e *refusedError) Is(target error) bool { return target == ErrEntryRefused }

func refusedf(format string, args ...any) error {
	return &refusedError{msg: fmt.Sprintf(format, args...)}
}

// Open decrypts a value Seal (or the Sealer) made for path. It checks no
// generation: that is the manifest's job.
func (k *Keyring) Open(path string, sealed []byte) ([]byte, error) {
	h, ok := parseHeader(sealed)
	if !ok {
		return nil, refusedf("storage entry %q is not sealed by this mount's root key", path)
	}
	return k.open(purposeEntry, path, h, sealed)
}

// open decrypts sealed, whose header is h.
func (k *Keyring) open(purpose, path string, h header, sealed []byte) ([]byte, error) {
	rk, ok := k.versions[h.version]
	if !ok {
		return nil, refusedf("storage entry %q is sealed by root key version %d, which this keyring does not hold", path, h.version)
	}
	var aad []byte
	if h.format == 1 {
		if purpose != purposeEntry {
			return nil, fmt.Errorf("storage entry %q is in the hst\x01 format, which only entries use", path)
		}
		aad = entryAAD(path, h.version)
	} else {
		aad = entryAADv2(purpose, path, h.version, h.gen)
	}
	pt, err := rk.aead.Open(nil, sealed[h.body:h.body+nonceSize], sealed[h.body+nonceSize:], aad)
	if err != nil {
		return nil, refusedf("storage entry %q does not authenticate under root key version %d (modified, or moved from another path)", path, h.version)
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
