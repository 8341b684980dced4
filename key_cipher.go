package hsmtransit

import (
	"context"
	"crypto/rand"
	"runtime"

	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/hsmkey"
)

// keyCipher is what encrypt, decrypt, rewrap and datakey need of a key,
// whether its material lives in memory (a keysutil policy) or in the HSM.
type keyCipher interface {
	// encrypt encrypts a decoded item; it returns the ciphertext and the
	// version used. A field of the item the key refuses is a *fieldError,
	// which the batch code names (atItem).
	encrypt(it *batchItem) (string, int, error)
	// decrypt returns the base64 plaintext of a decoded item, with
	// paddingScheme for RSA keys.
	decrypt(it *batchItem, paddingScheme string) (string, error)
	// refusesNonce reports a key that refuses a nonce before using it
	// (rewrap checks it first, as built-in transit does).
	refusesNonce() bool
	// random returns n random bytes for a data key.
	random(n int) ([]byte, error)
	// latest is the latest version.
	latest() int
	// keyType is the key's type.
	keyType() keysutil.KeyType
	// defaultCap is the encryption cap of a version unless configured.
	defaultCap() uint64
	// parallelism is how many goroutines a large batch is spread over.
	parallelism() int
}

// eachEncrypter is a key that encrypts several items at a lower cost than
// one by one: an HSM-resident key, one call to the token for a run.
type eachEncrypter interface {
	// encryptEach is encrypt of each item items[i], i in todo, answered
	// through put.
	encryptEach(items []batchItem, todo []int, put func(i int, ct string, ver int, err error))
}

// eachDecrypter is eachEncrypter for decryption.
type eachDecrypter interface {
	// decryptEach is decrypt of each item items[i], i in todo, with its
	// own padding scheme, answered through put.
	decryptEach(items []batchItem, todo []int, put func(i int, pt string, err error))
}

// decryptEach decrypts items[i] for each i in todo with c, each with its
// own padding scheme, answering through put, all at once when c can.
func decryptEach(c keyCipher, items []batchItem, todo []int, put func(i int, pt string, err error)) {
	if e, ok := c.(eachDecrypter); ok {
		e.decryptEach(items, todo, put)
		return
	}
	for _, i := range todo {
		pt, err := c.decrypt(&items[i], items[i].PaddingScheme)
		put(i, pt, err)
	}
}

// encryptEach encrypts items[i] for each i in todo with c, answering
// through put, all at once when c can.
func encryptEach(c keyCipher, items []batchItem, todo []int, put func(i int, ct string, ver int, err error)) {
	if e, ok := c.(eachEncrypter); ok {
		e.encryptEach(items, todo, put)
		return
	}
	for _, i := range todo {
		ct, ver, err := c.encrypt(&items[i])
		put(i, ct, ver, err)
	}
}

// byteAEAD is one key version as a cipher over bytes, in the spirit of
// Tink's AEAD: Encrypt returns everything Decrypt needs (nonce, ciphertext,
// tag, and for an HSM-resident key its format's marker). The item code
// resolves the version, decodes the item and formats the ciphertext; the
// keys that have one (an HSM-resident key's versions, a software AES-GCM
// key used as it is) do only this.
type byteAEAD interface {
	Encrypt(plaintext, associatedData []byte) ([]byte, error)
	Decrypt(ciphertext, associatedData []byte) ([]byte, error)
}

// encryptWith encrypts pt with version ver's AEAD into transit's format.
func encryptWith(a byteAEAD, ver int, pt, aad []byte) (string, int, error) {
	raw, err := a.Encrypt(pt, aad)
	if err != nil {
		return "", 0, err
	}
	return formatCiphertext(ver, raw), ver, nil
}

// decryptWith opens a parsed ciphertext's payload into base64 plaintext.
func decryptWith(a byteAEAD, raw, aad []byte) (string, error) {
	pt, err := a.Decrypt(raw, aad)
	if err != nil {
		return "", err
	}
	return encodeBase64(pt), nil
}

// softwareCipher is a keysutil policy, held locked by the caller.
type softwareCipher struct {
	p     *keysutil.Policy
	aeads *aeadCache
	memo  *aeadMemo // this request's
}

func newSoftwareCipher(p *keysutil.Policy, aeads *aeadCache) softwareCipher {
	return softwareCipher{p: p, aeads: aeads, memo: &aeadMemo{}}
}

func (c softwareCipher) encrypt(it *batchItem) (string, int, error) {
	if fastPath(c.p) && it.Nonce == "" && it.PaddingScheme == "" {
		return c.aeads.encrypt(c.p, c.memo, it)
	}
	return encryptItem(c.p, it)
}

func (c softwareCipher) decrypt(it *batchItem, paddingScheme string) (string, error) {
	if fastPath(c.p) && paddingScheme == "" {
		return c.aeads.decrypt(c.p, c.memo, it)
	}
	return decryptItem(c.p, it, paddingScheme)
}

func (c softwareCipher) refusesNonce() bool { return !nonceAllowed(c.p) }

func (c softwareCipher) random(n int) ([]byte, error) {
	buf := make([]byte, n)
	_, err := rand.Read(buf)
	return buf, err
}

func (c softwareCipher) latest() int { return c.p.LatestVersion }

func (c softwareCipher) keyType() keysutil.KeyType { return c.p.Type }

func (c softwareCipher) defaultCap() uint64 { return defaultCap(c.p.Type, c.p.ConvergentEncryption) }

// parallelism is one goroutine per core: software keys are CPU-bound.
func (c softwareCipher) parallelism() int { return runtime.GOMAXPROCS(0) }

// hsmCipher is an HSM-resident key, read-locked by the caller.
type hsmCipher struct {
	s *hsmkey.Store
	k *hsmkey.Key
}

func (c hsmCipher) encrypt(it *batchItem) (string, int, error) {
	return hsmItemEncrypt(c.s, c.k, it)
}

func (c hsmCipher) encryptEach(items []batchItem, todo []int, put func(i int, ct string, ver int, err error)) {
	hsmItemsEncrypt(c.s, c.k, items, todo, put)
}

func (c hsmCipher) decrypt(it *batchItem, paddingScheme string) (string, error) {
	return hsmItemDecrypt(c.s, c.k, it, paddingScheme)
}

func (c hsmCipher) decryptEach(items []batchItem, todo []int, put func(i int, pt string, err error)) {
	hsmItemsDecrypt(c.s, c.k, items, todo, put)
}

// refusesNonce is false: an HSM-resident key checks each item's fields as
// it uses them (checkHSMItem).
func (c hsmCipher) refusesNonce() bool { return false }

// random draws a data key from the HSM's generator.
func (c hsmCipher) random(n int) ([]byte, error) { return c.s.Random(n) }

func (c hsmCipher) latest() int { return c.k.LatestVersion }

func (c hsmCipher) keyType() keysutil.KeyType { return keysutil.KeyType_AES256_GCM96 }

// defaultCap is NIST's AES-GCM bound: the HSM draws a random IV each time.
func (c hsmCipher) defaultCap() uint64 { return gcmRandomNonceLimit }

// parallelism lets one batch use every session of the token's pool: HSM
// calls wait on the token, not on the CPU, and the pool bounds what all
// requests together hold (others queue for a session meanwhile).
func (c hsmCipher) parallelism() int { return hsm.DefaultMaxSessions }

// lockedCipher finds the key for a crypto operation: an HSM-resident key if
// one has the name, else the keysutil policy (created when polReq.Upsert).
// It is nil when neither exists. unlock must be called once.
//
// The lookups go from memory to storage: a cached HSM-resident key, then
// the policy cache, then stored HSM-resident keys, so that a key in use
// costs no storage round trip whatever its residency.
func (b *backend) lockedCipher(ctx context.Context, polReq keysutil.PolicyRequest) (c keyCipher, upserted bool, unlock func(), err error) {
	if k := b.hsmKeys.Cached(polReq.Name); k != nil {
		return lockedHSMCipher(b.hsmKeys, k)
	}
	lookup := polReq
	lookup.Upsert = false
	p, _, unlock, err := b.lockedPolicy(ctx, lookup, false)
	if err != nil {
		return nil, false, unlock, err
	}
	if p != nil {
		return newSoftwareCipher(p, b.aeads), false, unlock, nil
	}
	k, err := b.hsmKeys.Get(ctx, polReq.Storage, polReq.Name)
	if err != nil {
		return nil, false, func() {}, err
	}
	if k != nil {
		return lockedHSMCipher(b.hsmKeys, k)
	}
	if !polReq.Upsert {
		return nil, false, func() {}, nil
	}
	p, upserted, unlock, err = b.lockedPolicy(ctx, polReq, false)
	if err != nil || p == nil {
		return nil, false, unlock, err
	}
	return newSoftwareCipher(p, b.aeads), upserted, unlock, nil
}

// lockedHSMCipher read-locks an HSM-resident key for a crypto operation.
func lockedHSMCipher(s *hsmkey.Store, k *hsmkey.Key) (keyCipher, bool, func(), error) {
	k.RLock()
	if k.Deleted() {
		k.RUnlock()
		return nil, false, func() {}, nil
	}
	return hsmCipher{s: s, k: k}, false, k.RUnlock, nil
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
func (b *backend) hsmKeyFor(ctx context.Context, s logical.Storage, name string, exclusive bool) (*hsmkey.Key, func(), error) {
	k, err := b.hsmKeys.Get(ctx, s, name)
	if err != nil || k == nil {
		return nil, func() {}, err
	}
	lock, unlock := k.RLock, k.RUnlock
	if exclusive {
		lock, unlock = k.Lock, k.Unlock
	}
	lock()
	if k.Deleted() {
		unlock()
		return nil, func() {}, nil
	}
	return k, unlock, nil
}
