package hsm

import (
	"crypto/rand"
	"errors"
	"fmt"
	"strings"

	"github.com/miekg/pkcs11"
)

const (
	// GCMNonceSize and GCMTagSize are the AES-GCM parameters used inside
	// the token: a 96-bit IV and a 128-bit tag.
	GCMNonceSize = 12
	GCMTagSize   = 16
	// Mechanism names the sealing mechanism for status output.
	Mechanism = "CKM_AES_GCM"
)

// Random returns n bytes from the token's random generator.
func (t *Token) Random(n int) ([]byte, error) {
	var out []byte
	err := t.do("generate random", true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		var err error
		out, err = ctx.GenerateRandom(s, n)
		return err
	})
	if err == nil && len(out) != n {
		return nil, newError(Failed, "generate random", fmt.Errorf("token returned %d bytes, not %d", len(out), n))
	}
	return out, err
}

// HasKey reports whether an AES key with the label is in the token.
func (t *Token) HasKey(label string) (bool, error) {
	err := t.do("find key", true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		_, err := t.objectHandle(ctx, s, gen, label)
		return err
	})
	switch KindOf(err) {
	case 0:
		return true, nil
	case NotFound:
		return false, nil
	}
	return false, err
}

// GenerateKey makes an AES-256 key in the token: a token object, private,
// sensitive and not extractable, usable only to encrypt and decrypt. It is
// never retried, so that a failure cannot leave two keys with one label.
func (t *Token) GenerateKey(label string) error {
	if label == "" {
		return newError(Configuration, "generate key", errors.New("a key label is required"))
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return newError(Failed, "generate key", err)
	}
	return t.do("generate key", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		existing, err := findSecretKeys(ctx, s, label)
		if err != nil {
			return err
		}
		if len(existing) > 0 {
			return newError(Configuration, "generate key", fmt.Errorf("a key labelled %q already exists in token %s", label, t.Describe()))
		}
		h, err := ctx.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
			pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
			pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		})
		if err != nil {
			return err
		}
		t.mu.Lock()
		if t.gen == gen {
			t.handles[label] = h
		}
		t.mu.Unlock()
		return nil
	})
}

// KeyAttributes are the security attributes of a key, for checks.
type KeyAttributes struct {
	Sensitive, Extractable, NeverExtractable, Token bool
}

// Attributes reads a key's security attributes.
func (t *Token) Attributes(label string) (KeyAttributes, error) {
	var ka KeyAttributes
	err := t.do("read key attributes", true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		h, err := t.objectHandle(ctx, s, gen, label)
		if err != nil {
			return err
		}
		attrs, err := ctx.GetAttributeValue(s, h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_NEVER_EXTRACTABLE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil),
		})
		if err != nil {
			return err
		}
		flag := func(a *pkcs11.Attribute) bool { return len(a.Value) == 1 && a.Value[0] != 0 }
		ka = KeyAttributes{flag(attrs[0]), flag(attrs[1]), flag(attrs[2]), flag(attrs[3])}
		return nil
	})
	return ka, err
}

// EncryptGCM encrypts plaintext under the labelled key inside the token with
// AES-GCM, binding aad. It returns nonce || ciphertext || tag.
func (t *Token) EncryptGCM(label string, plaintext, aad []byte) ([]byte, error) {
	nonce := make([]byte, GCMNonceSize)
	if _, err := rand.Read(nonce); err != nil {
		return nil, newError(Failed, "encrypt", err)
	}
	var out []byte
	err := t.do("encrypt", true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		h, err := t.objectHandle(ctx, s, gen, label)
		if err != nil {
			return err
		}
		params := pkcs11.NewGCMParams(nonce, aad, GCMTagSize*8)
		defer params.Free()
		if err := ctx.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, h); err != nil {
			return err
		}
		ct, err := ctx.Encrypt(s, plaintext)
		if err != nil {
			return err
		}
		out = append(append(make([]byte, 0, len(nonce)+len(ct)), nonce...), ct...)
		return nil
	})
	return out, err
}

// DecryptGCM opens nonce || ciphertext || tag made by EncryptGCM.
func (t *Token) DecryptGCM(label string, sealed, aad []byte) ([]byte, error) {
	if len(sealed) < GCMNonceSize+GCMTagSize {
		return nil, newError(Failed, "decrypt", errors.New("ciphertext too short"))
	}
	var out []byte
	err := t.do("decrypt", true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		h, err := t.objectHandle(ctx, s, gen, label)
		if err != nil {
			return err
		}
		params := pkcs11.NewGCMParams(sealed[:GCMNonceSize], aad, GCMTagSize*8)
		defer params.Free()
		if err := ctx.DecryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, h); err != nil {
			return err
		}
		out, err = ctx.Decrypt(s, sealed[GCMNonceSize:])
		if err != nil && tokenStillThere(ctx, s) {
			// Tokens report a failed tag check in different ways, some
			// (SoftHSM2) as CKR_GENERAL_ERROR; with the session alive,
			// it is the input's fault.
			return newError(Failed, "decrypt", fmt.Errorf("ciphertext or associated data do not authenticate (%v)", err))
		}
		return err
	})
	return out, err
}

// tokenStillThere reports whether the session still answers, to tell a
// refused input from a lost token.
func tokenStillThere(ctx *pkcs11.Ctx, s pkcs11.SessionHandle) bool {
	_, err := ctx.GetSessionInfo(s)
	return err == nil
}

// DestroyKey deletes the labelled key from the token; a missing key is
// NotFound.
func (t *Token) DestroyKey(label string) error {
	defer t.forget(label)
	return t.do("destroy key", true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		found, err := findSecretKeys(ctx, s, label)
		if err != nil {
			return err
		}
		if len(found) == 0 {
			return newError(NotFound, "destroy key", fmt.Errorf("no AES key labelled %q in token %s", label, t.Describe()))
		}
		for _, h := range found {
			if err := ctx.DestroyObject(s, h); err != nil {
				return err
			}
		}
		return nil
	})
}

// KeyLabels lists the labels of the token's secret keys that start with
// prefix.
func (t *Token) KeyLabels(prefix string) ([]string, error) {
	var labels []string
	err := t.do("list keys", true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		found, err := findSecretKeys(ctx, s, "")
		if err != nil {
			return err
		}
		labels = labels[:0]
		for _, h := range found {
			attrs, err := ctx.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
			if err != nil {
				return err
			}
			if l := string(attrs[0].Value); strings.HasPrefix(l, prefix) {
				labels = append(labels, l)
			}
		}
		return nil
	})
	return labels, err
}
