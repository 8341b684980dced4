package hsm

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// EnsureSealKeys makes sure the token holds the keys k names, fit for its
// mechanism. Keys found are checked (CheckSealKeys); missing ones are made
// when generate is set, and are otherwise a NotFound error that says how to
// get them.
func (t *Token) EnsureSealKeys(k SealKeys, generate bool) error {
	if err := k.checkLabels(); err != nil {
		return err
	}
	missing := func(what, label string) error {
		if !generate {
			return newError(NotFound, "find KEK", fmt.Errorf(
				"no %s labelled %q in token %s; create it, or write generate_key=true to have the plugin create it", what, label, t.Describe()))
		}
		return nil
	}
	switch k.Mechanism {
	case AESGCM, AESKWP, AESCBCHMAC:
		has, err := t.HasKey(k.Label)
		if err != nil {
			return err
		}
		if !has {
			if err := missing("AES key", k.Label); err != nil {
				return err
			}
			if err := t.generateAESKey(k.Label, k.Mechanism == AESKWP); err != nil {
				return err
			}
		}
		if k.Mechanism == AESCBCHMAC {
			has, err := t.HasKey(k.HMACLabel)
			if err != nil {
				return err
			}
			if !has {
				if err := missing("HMAC key", k.HMACLabel); err != nil {
					return err
				}
				if err := t.generateHMACKey(k.HMACLabel); err != nil {
					return err
				}
			}
		}
	case RSAOAEP:
		pub, priv, err := t.hasKeyPair(k.Label)
		if err != nil {
			return err
		}
		if pub != priv {
			return newError(Configuration, "find KEK", fmt.Errorf(
				"token %s holds only the %s of the RSA key pair labelled %q; both halves are needed",
				t.Describe(), map[bool]string{true: "public key", false: "private key"}[pub], k.Label))
		}
		if !pub {
			if err := missing("RSA key pair", k.Label); err != nil {
				return err
			}
			if err := t.generateRSAKeyPair(k.Label); err != nil {
				return err
			}
		}
	default:
		_, err := ParseSealMechanism(string(k.Mechanism))
		return err
	}
	return t.CheckSealKeys(k)
}

// CheckSealKeys refuses, with a Configuration error naming the attribute,
// keys that should not seal a root keyring: see CheckKEK for AES keys; the
// HMAC key of aes-cbc-hmac must be a sign-and-verify-only secret of 32 bytes
// or more; the RSA private key of rsa-oaep must be sensitive, never
// extractable and 3072 bits or more, and its public key private to the
// token's user (whoever reads it can seal a keyring of their choosing).
func (t *Token) CheckSealKeys(k SealKeys) error {
	if err := k.checkLabels(); err != nil {
		return err
	}
	switch k.Mechanism {
	case AESGCM:
		return t.checkAESKey(k.Label, false)
	case AESKWP:
		return t.checkAESKey(k.Label, true)
	case AESCBCHMAC:
		if k.HMACLabel == k.Label {
			return newError(Configuration, "check KEK", errors.New("hmac_key_label must differ from key_label: one key must not both encrypt and authenticate"))
		}
		if err := t.checkAESKey(k.Label, false); err != nil {
			return err
		}
		return t.checkHMACKey(k.HMACLabel)
	case RSAOAEP:
		return t.checkRSAKeyPair(k.Label)
	}
	_, err := ParseSealMechanism(string(k.Mechanism))
	return err
}

// secretTemplate is the common part of the templates of generated keys.
func secretTemplate(label string, id []byte) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}
}

func newKeyID() ([]byte, error) {
	id := make([]byte, 16)
	_, err := rand.Read(id)
	return id, err
}

// generateHMACKey makes a 256-bit generic secret in the token that only
// signs and verifies.
func (t *Token) generateHMACKey(label string) error {
	const op = "generate HMAC key"
	id, err := newKeyID()
	if err != nil {
		return newError(Failed, op, err)
	}
	return t.do(op, false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		if existing, err := findSecretKeys(ctx, s, label); err != nil {
			return err
		} else if len(existing) > 0 {
			return newError(Configuration, op, fmt.Errorf("a key labelled %q already exists in token %s", label, t.Describe()))
		}
		tmpl := append(secretTemplate(label, id),
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, hmacKeySize),
			pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
			pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		)
		h, err := ctx.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_GENERIC_SECRET_KEY_GEN, nil)}, tmpl)
		if err != nil {
			return err
		}
		t.conn.remember(gen, label, h)
		return nil
	})
}

// hmacKeySize is the size of a generated HMAC key, and the least accepted.
const hmacKeySize = 32

// ckkSHA256HMAC is CKK_SHA256_HMAC (PKCS#11 2.40), a key type some tokens
// give HMAC keys.
const ckkSHA256HMAC = 0x2B

func (t *Token) checkHMACKey(label string) error {
	const op = "check HMAC key"
	return t.do(op, true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		h, err := t.conn.objectHandle(ctx, s, gen, label)
		if err != nil {
			return err
		}
		refuse := func(format string, args ...any) error {
			return newError(Configuration, op, fmt.Errorf("the HMAC key %q "+format, append([]any{label}, args...)...))
		}
		kt, err := ctx.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil)})
		if err != nil {
			return err
		}
		if v, ok := attrUint(kt[0]); !ok || (v != pkcs11.CKK_GENERIC_SECRET && v != ckkSHA256HMAC) {
			return refuse("is not a generic secret (CKA_KEY_TYPE=0x%x); use a CKK_GENERIC_SECRET key", v)
		}
		attrs, err := ctx.GetAttributeValue(s, h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_ALWAYS_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_NEVER_EXTRACTABLE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_SIGN, nil),
			pkcs11.NewAttribute(pkcs11.CKA_VERIFY, nil),
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, nil),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, nil),
		})
		if err != nil {
			return err
		}
		if n, ok := attrUint(attrs[0]); !ok || n < hmacKeySize {
			return refuse("is shorter than %d bytes (CKA_VALUE_LEN=%d)", hmacKeySize, n)
		}
		return checkFlags(refuse, []flagCheck{
			{attrs[1], "CKA_EXTRACTABLE", false},
			{attrs[2], "CKA_SENSITIVE", true},
			{attrs[3], "CKA_ALWAYS_SENSITIVE", true},
			{attrs[4], "CKA_NEVER_EXTRACTABLE", true},
			{attrs[5], "CKA_SIGN", true},
			{attrs[6], "CKA_VERIFY", true},
			{attrs[7], "CKA_DERIVE", false},
			{attrs[8], "CKA_WRAP", false},
			{attrs[9], "CKA_UNWRAP", false},
		})
	})
}

type flagCheck struct {
	attr *pkcs11.Attribute
	name string
	want bool
}

func checkFlags(refuse func(string, ...any) error, checks []flagCheck) error {
	for _, c := range checks {
		if got := attrBool(c.attr); got != c.want {
			return refuse("has %s=%t; use a key with %s=%t (as generated by this plugin)", c.name, got, c.name, c.want)
		}
	}
	return nil
}

// hasKeyPair reports which halves of an RSA key pair labelled label the
// token holds.
func (t *Token) hasKeyPair(label string) (pub, priv bool, err error) {
	var p, q bool
	err = t.do("find key pair", true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		p, q = false, false
		for _, half := range []struct {
			class uint
			found *bool
		}{{pkcs11.CKO_PUBLIC_KEY, &p}, {pkcs11.CKO_PRIVATE_KEY, &q}} {
			_, err := t.conn.keyHandle(ctx, s, gen, half.class, label)
			switch KindOf(err) {
			case 0:
				*half.found = true
			case NotFound:
			default:
				return err
			}
		}
		return nil
	})
	if err != nil {
		return false, false, err
	}
	return p, q, nil
}

// generateRSAKeyPair makes an RSA-3072 key pair for rsa-oaep: the private
// key sensitive, never extractable, only decrypting; the public key only
// encrypting, and private to the token's user.
func (t *Token) generateRSAKeyPair(label string) error {
	const op = "generate RSA key pair"
	id, err := newKeyID()
	if err != nil {
		return newError(Failed, op, err)
	}
	return t.doSlow(op, false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		pub := []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, MinRSABits),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		}
		priv := append(secretTemplate(label, id),
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		)
		_, _, err := ctx.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)}, pub, priv)
		return err
	})
}

func (t *Token) checkRSAKeyPair(label string) error {
	const op = "check RSA key pair"
	return t.do(op, true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		refuse := func(format string, args ...any) error {
			return newError(Configuration, op, fmt.Errorf("the RSA key pair %q "+format, append([]any{label}, args...)...))
		}
		priv, err := t.conn.keyHandle(ctx, s, gen, pkcs11.CKO_PRIVATE_KEY, label)
		if err != nil {
			return err
		}
		pub, err := t.conn.keyHandle(ctx, s, gen, pkcs11.CKO_PUBLIC_KEY, label)
		if err != nil {
			return err
		}
		pa, err := ctx.GetAttributeValue(s, priv, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_ALWAYS_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_NEVER_EXTRACTABLE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, nil),
		})
		if err != nil {
			return err
		}
		if v, ok := attrUint(pa[0]); !ok || v != pkcs11.CKK_RSA {
			return refuse("is not an RSA key (CKA_KEY_TYPE=0x%x)", v)
		}
		modulus := bytes.TrimLeft(pa[1].Value, "\x00")
		if bits := bitLen(modulus); bits < MinRSABits {
			return refuse("has a %d-bit modulus; use %d bits or more", bits, MinRSABits)
		}
		if err := checkFlags(refuse, []flagCheck{
			{pa[2], "CKA_EXTRACTABLE", false},
			{pa[3], "CKA_SENSITIVE", true},
			{pa[4], "CKA_ALWAYS_SENSITIVE", true},
			{pa[5], "CKA_NEVER_EXTRACTABLE", true},
			{pa[6], "CKA_DECRYPT", true},
		}); err != nil {
			return err
		}
		qa, err := ctx.GetAttributeValue(s, pub, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, nil),
		})
		if err != nil {
			return err
		}
		if !bytes.Equal(bytes.TrimLeft(qa[0].Value, "\x00"), modulus) {
			return refuse("has a public key that does not match its private key")
		}
		if !attrBool(qa[1]) {
			// Whoever reads the public key could seal a root keyring of
			// their own choosing and put it in storage.
			return refuse("has a public key readable without logging in (CKA_PRIVATE=false): whoever reads it can seal a root keyring of their choosing; use a public key with CKA_PRIVATE=true (as generated by this plugin)")
		}
		if !attrBool(qa[2]) {
			return refuse("has a public key that cannot encrypt (CKA_ENCRYPT=false)")
		}
		return nil
	})
}

// bitLen is the length in bits of a big-endian number without leading
// zero bytes.
func bitLen(b []byte) int {
	if len(b) == 0 {
		return 0
	}
	n := 8 * (len(b) - 1)
	for v := b[0]; v != 0; v >>= 1 {
		n++
	}
	return n
}
