package hsmtransit

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"strconv"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
)

// The hot path of software keys: AES-GCM keys used as they are (not
// derived, not convergent) encrypt and decrypt here with an AEAD built once
// per key version, instead of keysutil building an AES cipher and a GCM for
// every item. keysutil still owns the keys, their versions and the format;
// the output is byte for byte what keysutil makes, and the answers to bad
// input carry keysutil's messages.

// aeadCache holds the AES-GCM of each software key version in use.
type aeadCache struct {
	c *keyCache[*aeadEntry]
}

// aeadEntry is a version's AEAD and the key bytes it was made from, to
// notice a key replaced under the same name (deleted and created again,
// or restored).
type aeadEntry struct {
	key  []byte
	aead cipher.AEAD
}

func newAEADCache() *aeadCache { return &aeadCache{c: newKeyCache[*aeadEntry]()} }

// fastPath reports whether p's encryption can use a cached AEAD.
func fastPath(p *keysutil.Policy) bool {
	return (p.Type == keysutil.KeyType_AES256_GCM96 || p.Type == keysutil.KeyType_AES128_GCM96) &&
		!p.Derived && !p.ConvergentEncryption && p.VersionTemplate == ""
}

// get returns the AEAD of version ver of p, held locked by the caller.
func (a *aeadCache) get(p *keysutil.Policy, ver int) (cipher.AEAD, error) {
	entry, ok := p.Keys[strconv.Itoa(ver)]
	if !ok {
		return nil, errutil.UserError{Err: "no such key version"}
	}
	name := p.Name + "\x00" + strconv.Itoa(ver)
	if e, ok := a.c.get(name); ok && len(e.key) > 0 && len(entry.Key) > 0 && &e.key[0] == &entry.Key[0] {
		return e.aead, nil
	}
	block, err := aes.NewCipher(entry.Key)
	if err != nil {
		return nil, errutil.InternalError{Err: err.Error()}
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, errutil.InternalError{Err: err.Error()}
	}
	a.c.add(name, &aeadEntry{key: entry.Key, aead: aead})
	return aead, nil
}

// aeadMemo is what one request's items of a fast-path key share: the AEADs of
// the versions they used, so that an item finds its version's AEAD without
// the cache's lock and name. The caller holds the policy locked for the
// whole request, so a version cannot change under it.
type aeadMemo struct {
	versions atomic.Pointer[[]memoEntry]
}

type memoEntry struct {
	ver  int
	aead cipher.AEAD
}

// maxMemo bounds the versions a memo keeps (a batch normally uses one, a
// rewrap two).
const maxMemo = 8

// get returns version ver's AEAD: the memo's, else the cache's (kept in the
// memo then).
func (m *aeadMemo) get(a *aeadCache, p *keysutil.Policy, ver int) (cipher.AEAD, error) {
	var known []memoEntry
	if v := m.versions.Load(); v != nil {
		known = *v
		for _, e := range known {
			if e.ver == ver {
				return e.aead, nil
			}
		}
	}
	aead, err := a.get(p, ver)
	if err != nil || len(known) >= maxMemo {
		return aead, err
	}
	// Copy on write: other items read the old list meanwhile; if two
	// store at once, one entry is lost and looked up again later.
	grown := append(append(make([]memoEntry, 0, len(known)+1), known...), memoEntry{ver, aead})
	m.versions.Store(&grown)
	return aead, nil
}

// AES-GCM's nonce and tag sizes as keysutil uses them (cipher.NewGCM's).
const (
	gcmNonceSize = 12
	gcmTagSize   = 16
)

// sealBuffer returns a buffer for sealing a plaintext of b64's decoded
// length in place: room for the nonce, the plaintext decoded from b64,
// room for the tag. The error is keysutil's for bad base64.
func sealBuffer(b64 string) ([]byte, error) {
	buf := make([]byte, gcmNonceSize+base64.StdEncoding.DecodedLen(len(b64))+gcmTagSize)
	return decodeIntoSealBuffer(buf, b64)
}

// decodeIntoSealBuffer decodes b64 into buf after the nonce's room and
// returns buf cut to nonce, plaintext and tag.
func decodeIntoSealBuffer(buf []byte, b64 string) ([]byte, error) {
	n, err := base64.StdEncoding.Decode(buf[gcmNonceSize:], unsafe.Slice(unsafe.StringData(b64), len(b64)))
	if err != nil {
		return nil, errutil.UserError{Err: err.Error()}
	}
	return buf[: gcmNonceSize+n+gcmTagSize : gcmNonceSize+n+gcmTagSize], nil
}

// encrypt is EncryptWithOptions for a fast-path key. The plaintext is
// sealed where it was decoded (the item's sealBuf, else a buffer made
// here), and the result written as transit's string in one allocation.
func (a *aeadCache) encrypt(p *keysutil.Policy, memo *aeadMemo, it *batchItem) (string, int, error) {
	ver, err := encryptionVersion(it.KeyVersion, p.LatestVersion, p.MinEncryptionVersion)
	if err != nil {
		return "", 0, err
	}
	buf := it.sealBuf
	if buf == nil {
		if buf, err = sealBuffer(it.Plaintext); err != nil {
			return "", 0, err
		}
	}
	aead, err := memo.get(a, p, ver)
	if err != nil {
		return "", 0, err
	}
	// The item's plaintext becomes ciphertext: it must not be read again.
	it.sealBuf = nil
	// (gcmAEAD called as it is: as a byteAEAD, encryptWith's argument, it
	// would be an allocation per item.)
	sealed, err := gcmAEAD{aead}.sealInPlace(buf, it.aad)
	if err != nil {
		return "", 0, err
	}
	return formatCiphertext(ver, sealed), ver, nil
}

// openScratch holds buffers for the decoded ciphertexts of decrypt, which
// are opened in place and not kept.
var openScratch = sync.Pool{New: func() any { return new([]byte) }}

// maxScratch is the largest buffer openScratch keeps.
const maxScratch = 64 << 10

// decrypt is DecryptWithOptions for a fast-path key.
func (a *aeadCache) decrypt(p *keysutil.Policy, memo *aeadMemo, it *batchItem) (string, error) {
	scratch := openScratch.Get().(*[]byte)
	defer func() {
		// The opened plaintext is not left in the pool's buffers.
		clear(*scratch)
		if cap(*scratch) <= maxScratch {
			openScratch.Put(scratch)
		}
	}()
	ver, raw, err := parseCiphertextInto(it.Ciphertext, p.LatestVersion, p.MinDecryptionVersion, scratch)
	if err != nil {
		return "", err
	}
	aead, err := memo.get(a, p, ver)
	if err != nil {
		return "", err
	}
	// (gcmAEAD called as it is: as a byteAEAD, decryptWith's argument, it
	// would be an allocation per item.)
	pt, err := gcmAEAD{aead}.Decrypt(raw, it.aad)
	if err != nil {
		return "", err
	}
	return encodeBase64(pt), nil
}

// gcmAEAD is a software version's AES-GCM as a byteAEAD, in keysutil's
// format: a random nonce, then the sealed plaintext and its tag. The batch
// path calls its in-place forms directly (sealInPlace, and Decrypt, which
// opens in place: the plaintext it returns overwrites ciphertext).
type gcmAEAD struct{ aead cipher.AEAD }

var _ byteAEAD = gcmAEAD{}

func (g gcmAEAD) Encrypt(plaintext, associatedData []byte) ([]byte, error) {
	buf := make([]byte, gcmNonceSize+len(plaintext)+gcmTagSize)
	copy(buf[gcmNonceSize:], plaintext)
	return g.sealInPlace(buf, associatedData)
}

// sealInPlace seals buf, which holds room for the nonce, the plaintext and
// room for the tag, into nonce || ciphertext || tag in the same bytes.
func (g gcmAEAD) sealInPlace(buf, associatedData []byte) ([]byte, error) {
	if g.aead.NonceSize() != gcmNonceSize || g.aead.Overhead() != gcmTagSize || len(buf) < gcmNonceSize+gcmTagSize {
		return nil, errutil.InternalError{Err: "unexpected AES-GCM nonce or tag size"}
	}
	nonce := buf[:gcmNonceSize]
	if _, err := rand.Read(nonce); err != nil {
		return nil, errutil.InternalError{Err: err.Error()}
	}
	// Seal's output starts exactly where the plaintext is, which its
	// contract allows (in-place encryption).
	return g.aead.Seal(nonce, nonce, buf[gcmNonceSize:len(buf)-gcmTagSize], associatedData), nil
}

func (g gcmAEAD) Decrypt(ciphertext, associatedData []byte) ([]byte, error) {
	n := g.aead.NonceSize()
	if len(ciphertext) < n {
		return nil, errutil.UserError{Err: "invalid ciphertext length"}
	}
	pt, err := g.aead.Open(ciphertext[n:n], ciphertext[:n], ciphertext[n:], associatedData)
	if err != nil {
		return nil, errutil.UserError{Err: err.Error()}
	}
	return pt, nil
}
