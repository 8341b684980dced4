package hsmtransit

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"strconv"

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

// encrypt is EncryptWithOptions for a fast-path key.
func (a *aeadCache) encrypt(p *keysutil.Policy, it *batchItem) (string, int, error) {
	ver, err := encryptionVersion(it.KeyVersion, p.LatestVersion, p.MinEncryptionVersion)
	if err != nil {
		return "", 0, err
	}
	pt, err := decodePlaintext(it.Plaintext)
	if err != nil {
		return "", 0, err
	}
	aead, err := a.get(p, ver)
	if err != nil {
		return "", 0, err
	}
	return encryptWith(gcmAEAD{aead}, ver, pt, it.aad)
}

// decrypt is DecryptWithOptions for a fast-path key.
func (a *aeadCache) decrypt(p *keysutil.Policy, it *batchItem) (string, error) {
	ver, raw, err := parseCiphertext(it.Ciphertext, p.LatestVersion, p.MinDecryptionVersion)
	if err != nil {
		return "", err
	}
	aead, err := a.get(p, ver)
	if err != nil {
		return "", err
	}
	return decryptWith(gcmAEAD{aead}, raw, it.aad)
}

// gcmAEAD is a software version's AES-GCM as a byteAEAD, in keysutil's
// format: a random nonce, then the sealed plaintext and its tag.
type gcmAEAD struct{ aead cipher.AEAD }

func (g gcmAEAD) Encrypt(plaintext, associatedData []byte) ([]byte, error) {
	n := g.aead.NonceSize()
	out := make([]byte, n, n+len(plaintext)+g.aead.Overhead())
	if _, err := rand.Read(out); err != nil {
		return nil, errutil.InternalError{Err: err.Error()}
	}
	return g.aead.Seal(out, out[:n], plaintext, associatedData), nil
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
