package hsmtransit

import (
	"context"
	"crypto/rand"

	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// keyCipher is what encrypt, decrypt, rewrap and datakey need of a key,
// whether its material lives in memory (a keysutil policy) or in the HSM.
type keyCipher interface {
	// encrypt encrypts a decoded item; it returns the ciphertext and the
	// version used.
	encrypt(it *batchItem, index int) (string, int, error)
	// decrypt returns the base64 plaintext of a decoded item.
	decrypt(it *batchItem, paddingScheme, paddingField string, index int) (string, error)
	// random returns n random bytes for a data key.
	random(n int) ([]byte, error)
	// latest is the latest version.
	latest() int
	// keyType is the key's type.
	keyType() keysutil.KeyType
	// defaultCap is the encryption cap of a version unless configured.
	defaultCap() uint64
}

// softwareCipher is a keysutil policy, held locked by the caller.
type softwareCipher struct{ p *keysutil.Policy }

func (c softwareCipher) encrypt(it *batchItem, index int) (string, int, error) {
	return encryptItem(c.p, it, index)
}

func (c softwareCipher) decrypt(it *batchItem, paddingScheme, paddingField string, index int) (string, error) {
	return decryptItem(c.p, it, paddingScheme, paddingField, index)
}

func (c softwareCipher) random(n int) ([]byte, error) {
	buf := make([]byte, n)
	_, err := rand.Read(buf)
	return buf, err
}

func (c softwareCipher) latest() int { return c.p.LatestVersion }

func (c softwareCipher) keyType() keysutil.KeyType { return c.p.Type }

func (c softwareCipher) defaultCap() uint64 { return defaultCap(c.p.Type, c.p.ConvergentEncryption) }

// hsmCipher is an HSM-resident key, read-locked by the caller.
type hsmCipher struct {
	s *hsmKeyStore
	k *hsmKey
}

func (c hsmCipher) encrypt(it *batchItem, _ int) (string, int, error) {
	return c.s.encrypt(c.k, it)
}

func (c hsmCipher) decrypt(it *batchItem, paddingScheme, _ string, _ int) (string, error) {
	return c.s.decrypt(c.k, it, paddingScheme)
}

// random draws a data key from the HSM's generator.
func (c hsmCipher) random(n int) ([]byte, error) {
	tok, err := c.s.token()
	if err != nil {
		return nil, err
	}
	buf, err := tok.Random(n)
	if err != nil {
		return nil, hsmCryptoError(err)
	}
	return buf, nil
}

func (c hsmCipher) latest() int { return c.k.LatestVersion }

func (c hsmCipher) keyType() keysutil.KeyType { return keysutil.KeyType_AES256_GCM96 }

// defaultCap is NIST's AES-GCM bound: the HSM draws a random IV each time.
func (c hsmCipher) defaultCap() uint64 { return gcmRandomNonceLimit }

// lockedCipher finds the key for a crypto operation: an HSM-resident key if
// one has the name, else the keysutil policy (created when polReq.Upsert).
// It is nil when neither exists. unlock must be called once.
func (b *backend) lockedCipher(ctx context.Context, polReq keysutil.PolicyRequest) (c keyCipher, upserted bool, unlock func(), err error) {
	k, err := b.hsmKeys.get(ctx, polReq.Storage, polReq.Name)
	if err != nil {
		return nil, false, func() {}, err
	}
	if k != nil {
		k.mu.RLock()
		if k.deleted {
			k.mu.RUnlock()
			return nil, false, func() {}, nil
		}
		return hsmCipher{s: b.hsmKeys, k: k}, false, k.mu.RUnlock, nil
	}
	p, upserted, unlock, err := b.lockedPolicy(ctx, polReq, false)
	if err != nil || p == nil {
		return nil, false, unlock, err
	}
	return softwareCipher{p: p}, upserted, unlock, nil
}

// usableCipher is lockedCipher for a cryptographic operation: a disabled
// key is refused.
func (b *backend) usableCipher(ctx context.Context, polReq keysutil.PolicyRequest) (keyCipher, bool, func(), error) {
	c, upserted, unlock, err := b.lockedCipher(ctx, polReq)
	if err != nil || c == nil {
		return c, upserted, unlock, err
	}
	if err := b.checkEnabled(ctx, polReq.Storage, polReq.Name); err != nil {
		unlock()
		return nil, false, func() {}, err
	}
	return c, upserted, unlock, nil
}

// hsmKeyFor returns the named HSM-resident key locked (exclusively or
// shared), or nil when there is none.
func (b *backend) hsmKeyFor(ctx context.Context, s logical.Storage, name string, exclusive bool) (*hsmKey, func(), error) {
	k, err := b.hsmKeys.get(ctx, s, name)
	if err != nil || k == nil {
		return nil, func() {}, err
	}
	lock, unlock := k.mu.RLock, k.mu.RUnlock
	if exclusive {
		lock, unlock = k.mu.Lock, k.mu.Unlock
	}
	lock()
	if k.deleted {
		unlock()
		return nil, func() {}, nil
	}
	return k, unlock, nil
}
