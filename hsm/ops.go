package hsm

import (
	"crypto/rand"
	"encoding/binary"
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
)

// Random returns n bytes from the token's random generator.
func (t *Token) Random(n int) ([]byte, error) {
	var out []byte
	err := t.do("generate random", true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		r, err := ctx.GenerateRandom(s, n)
		out = r
		return err
	})
	if err != nil {
		return nil, err
	}
	if len(out) != n {
		return nil, newError(Failed, "generate random", fmt.Errorf("token returned %d bytes, not %d", len(out), n))
	}
	return out, nil
}

// HasKey reports whether an AES key with the label is in the token.
func (t *Token) HasKey(label string) (bool, error) {
	err := t.do("find key", true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		_, err := t.conn.objectHandle(ctx, s, gen, label)
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
// sensitive and not extractable, usable only to encrypt and decrypt, and
// neither modifiable nor copyable, so that no session of the token's user
// can later widen what it may do (make it a derivation base, say, whose
// derived keys could be extractable). It is never retried, so that a failure
// cannot leave two keys with one label.
func (t *Token) GenerateKey(label string) error {
	return t.generateAESKey(label, false)
}

// generateAESKey is GenerateKey for a key that only encrypts and decrypts,
// or (wrap) one that only wraps and unwraps.
func (t *Token) generateAESKey(label string, wrap bool) error {
	if err := CheckKeyLabel(label); err != nil {
		return err
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
		mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}
		tmpl := kekTemplate(label, id, wrap)
		h, err := ctx.GenerateKey(s, mech, append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_COPYABLE, false)))
		var rv pkcs11.Error
		if errors.As(err, &rv) && rv == pkcs11.CKR_ATTRIBUTE_TYPE_INVALID {
			// CKA_COPYABLE is PKCS#11 2.40; older tokens do not know it
			// (nor C_CopyObject's use of it). The rest of the template
			// was accepted, and is still required.
			h, err = ctx.GenerateKey(s, mech, tmpl)
		}
		if err != nil {
			return err
		}
		t.conn.remember(gen, label, h)
		return nil
	})
}

// kekTemplate is the template of the keys GenerateKey makes, but for
// CKA_COPYABLE.
func kekTemplate(label string, id []byte, wrap bool) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, kekSize),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, !wrap),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, !wrap),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, wrap),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, wrap),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}
}

// kekSize is the size of a KEK in bytes: AES-256.
const kekSize = 32

// CheckKEK refuses, with a Configuration error naming the attribute, a key
// that should not be a KEK: not an AES-256 secret key, extractable or not
// sensitive (its value can leave the token), not sensitive or not
// unextractable from its birth (its value may be known), usable to derive keys (a
// derived key can be extractable), to wrap or unwrap (it can export other
// keys, or import keys chosen by whoever holds a wrapped blob), or unable
// to encrypt and decrypt. Modifiable and copyable keys are accepted: keys
// made outside this plugin on real HSMs often are, and the checks above
// read the attributes as they are now.
func (t *Token) CheckKEK(label string) error { return t.checkAESKey(label, false) }

// checkAESKey is CheckKEK, or (wrap) its counterpart for a key-wrapping KEK
// (aes-kwp): one that may wrap and unwrap, and need not encrypt.
func (t *Token) checkAESKey(label string, wrap bool) error {
	const op = "check KEK"
	return t.do(op, true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		h, err := t.conn.objectHandle(ctx, s, gen, label)
		if KindOf(err) == NotFound {
			// Say so when the label names an object of another kind.
			others, ferr := findObjects(ctx, s, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			})
			if ferr == nil && len(others) > 0 {
				return newError(Configuration, op, fmt.Errorf(
					"the KEK %q is not a secret key (CKA_CLASS is not CKO_SECRET_KEY); use an AES-256 secret key", label))
			}
		}
		if err != nil {
			return err
		}
		refuse := func(format string, args ...any) error {
			return newError(Configuration, op, fmt.Errorf("the KEK %q "+format, append([]any{label}, args...)...))
		}
		kt, err := ctx.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil)})
		if err != nil {
			return err
		}
		if v, ok := attrUint(kt[0]); !ok || v != pkcs11.CKK_AES {
			return refuse("is not an AES key (CKA_KEY_TYPE=0x%x); use an AES-256 key", v)
		}
		attrs, err := ctx.GetAttributeValue(s, h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, nil),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, nil),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, nil),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, nil),
			pkcs11.NewAttribute(pkcs11.CKA_ALWAYS_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_NEVER_EXTRACTABLE, nil),
		})
		if err != nil {
			return err
		}
		if n, ok := attrUint(attrs[0]); !ok || n != kekSize {
			return refuse("is not AES-256 (CKA_VALUE_LEN=%d); use a 32-byte AES key", n)
		}
		for _, c := range []struct {
			attr       *pkcs11.Attribute
			name, hint string
			want       bool
		}{
			{attrs[1], "CKA_EXTRACTABLE", "is extractable", false},
			{attrs[2], "CKA_SENSITIVE", "is not sensitive", true},
			{attrs[3], "CKA_DERIVE", "can derive keys", false},
			{attrs[4], "CKA_WRAP", map[bool]string{false: "can wrap keys", true: "cannot wrap keys"}[wrap], wrap},
			{attrs[5], "CKA_UNWRAP", map[bool]string{false: "can unwrap keys", true: "cannot unwrap keys"}[wrap], wrap},
			// A key-wrapping KEK may also encrypt or not.
			{attrs[6], "CKA_ENCRYPT", "cannot encrypt", !wrap || attrBool(attrs[6])},
			{attrs[7], "CKA_DECRYPT", "cannot decrypt", !wrap || attrBool(attrs[7])},
			// A key imported with a known value, or once extractable,
			// and only then locked down: whoever knew or took its value
			// opens the sealed keyring offline.
			{attrs[8], "CKA_ALWAYS_SENSITIVE", "was not always sensitive (imported, or its value was readable once)", true},
			{attrs[9], "CKA_NEVER_EXTRACTABLE", "was extractable once", true},
		} {
			if got := attrBool(c.attr); got != c.want {
				return refuse("%s (%s=%t); use a key with %s=%t (as generated by this plugin)", c.hint, c.name, got, c.name, c.want)
			}
		}
		return nil
	})
}

// attrBool reads a CK_BBOOL attribute.
func attrBool(a *pkcs11.Attribute) bool { return len(a.Value) == 1 && a.Value[0] != 0 }

// attrUint reads a CK_ULONG attribute, in the platform's byte order.
func attrUint(a *pkcs11.Attribute) (uint, bool) {
	switch len(a.Value) {
	case 4:
		return uint(binary.NativeEndian.Uint32(a.Value)), true
	case 8:
		return uint(binary.NativeEndian.Uint64(a.Value)), true
	}
	return 0, false
}

// KeyAttributes are the security attributes of a key, for checks.
type KeyAttributes struct {
	Sensitive, Extractable, NeverExtractable, Token bool
}

// Attributes reads a key's security attributes.
func (t *Token) Attributes(label string) (KeyAttributes, error) {
	var ka KeyAttributes
	err := t.do("read key attributes", true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		h, err := t.conn.objectHandle(ctx, s, gen, label)
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
		ka = KeyAttributes{attrBool(attrs[0]), attrBool(attrs[1]), attrBool(attrs[2]), attrBool(attrs[3])}
		return nil
	})
	if err != nil {
		return KeyAttributes{}, err
	}
	return ka, nil
}

// EncryptGCM encrypts plaintext under the labelled key inside the token with
// AES-GCM, binding aad. It returns iv || ciphertext || tag, with the IV the
// token used: HSMs in FIPS mode (AWS CloudHSM, Luna) make their own and write
// it into the mechanism parameters, ignoring or refusing the caller's. The
// plugin proposes a random IV; a token that refuses it
// (CKR_MECHANISM_PARAM_INVALID) is given a zeroed buffer to fill from then
// on. An IV that is not GCMNonceSize bytes, or left zero, is refused.
func (t *Token) EncryptGCM(label string, plaintext, aad []byte) ([]byte, error) {
	var out []byte
	err := t.do("encrypt", true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		h, err := t.conn.objectHandle(ctx, s, gen, label)
		if err != nil {
			return err
		}
		sealed, err := t.sealGCM(ctx, s, h, plaintext, aad)
		if err != nil {
			return err
		}
		out = sealed
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// GCMItem is one item of EncryptGCMBatch or DecryptGCMBatch: its input
// and associated data, then its output or its error. Sealed is iv ||
// ciphertext || tag, as EncryptGCM returns it.
type GCMItem struct {
	// In is the plaintext to encrypt, or what to decrypt (sealed).
	In, AAD []byte
	// Out is the item's sealed output, or its plaintext; nil on Err.
	Out []byte
	Err error
}

// MaxGCMBatch is the most items EncryptGCMBatch or DecryptGCMBatch takes
// at once: they share
// one deadline, the token's call timeout (5 s by default, so a token may
// take up to about 300 ms per encryption before a full batch misses it).
const MaxGCMBatch = 16

// EncryptGCMBatch does EncryptGCM for each item, in order, on one pooled
// session within one deadline: one session, key handle and deadline for up
// to MaxGCMBatch encryptions instead of one each, which on a batch request
// was most of the plugin's own CPU around the token's (pprof). An item the
// token refuses gets its own error (Err) and the others go on; the call's
// error is for what fails them all (the key not found, the token lost or
// not answering within the deadline), and then no item has a result. A
// failure that voids the connection runs the whole batch once more on a
// fresh one, as EncryptGCM does for its one item.
func (t *Token) EncryptGCMBatch(label string, items []GCMItem) error {
	return t.gcmBatch("encrypt", label, items, t.sealGCM)
}

// gcmBatch runs one(item's In, AAD) for each item on one pooled session
// within one deadline, for EncryptGCMBatch and DecryptGCMBatch (op).
func (t *Token) gcmBatch(op, label string, items []GCMItem, one func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, h pkcs11.ObjectHandle, in, aad []byte) ([]byte, error)) error {
	if len(items) > MaxGCMBatch {
		return newError(Failed, op, fmt.Errorf("%d items in one batch; at most %d", len(items), MaxGCMBatch))
	}
	var results [MaxGCMBatch][]byte
	var errs [MaxGCMBatch]error
	err := t.do(op, true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		h, err := t.conn.objectHandle(ctx, s, gen, label)
		if err != nil {
			return err
		}
		// Results stay here until every item is done: when the deadline
		// passes, do returns and f runs on (see do).
		var out [MaxGCMBatch][]byte
		var outErrs [MaxGCMBatch]error
		for i := range items {
			out[i], outErrs[i] = one(ctx, s, h, items[i].In, items[i].AAD)
			if outErrs[i] != nil && needsReconnect(outErrs[i]) {
				return outErrs[i]
			}
		}
		results, errs = out, outErrs
		return nil
	})
	if err != nil {
		return err
	}
	for i := range items {
		items[i].Out, items[i].Err = results[i], classify(op, errs[i])
	}
	return nil
}

// sealGCM is one EncryptGCM on session s with key h: a random IV proposed,
// or the token's own once it refused one.
func (t *Token) sealGCM(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, h pkcs11.ObjectHandle, plaintext, aad []byte) ([]byte, error) {
	tokenIV := t.conn.tokenIV.Load()
	iv := make([]byte, GCMNonceSize)
	if !tokenIV {
		if _, err := rand.Read(iv); err != nil {
			return nil, newError(Failed, "encrypt", err)
		}
	}
	used, ct, err := encryptGCM(ctx, s, h, iv, plaintext, aad)
	var rv pkcs11.Error
	if !tokenIV && errors.As(err, &rv) && rv == pkcs11.CKR_MECHANISM_PARAM_INVALID {
		clear(iv)
		if used, ct, err = encryptGCM(ctx, s, h, iv, plaintext, aad); err == nil {
			t.conn.tokenIV.Store(true)
		}
	}
	if err != nil {
		return nil, err
	}
	if err := checkIV(used); err != nil {
		return nil, err
	}
	if err := t.conn.rememberIV(used); err != nil {
		return nil, err
	}
	return append(used, ct...), nil
}

// encryptGCM runs one AES-GCM encryption and returns the IV as the token
// left it in the parameters, and ciphertext || tag.
func encryptGCM(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, h pkcs11.ObjectHandle, iv, plaintext, aad []byte) (used, ct []byte, err error) {
	params := pkcs11.NewGCMParams(iv, aad, GCMTagSize*8)
	defer params.Free()
	if err := ctx.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, h); err != nil {
		return nil, nil, err
	}
	if ct, err = ctx.Encrypt(s, plaintext); err != nil {
		return nil, nil, err
	}
	if len(ct) != len(plaintext)+GCMTagSize {
		return nil, nil, newError(Failed, "encrypt", fmt.Errorf("the token returned %d bytes of AES-GCM output for %d bytes of input, not %d", len(ct), len(plaintext), len(plaintext)+GCMTagSize))
	}
	return params.IV(), ct, nil
}

// checkIV refuses an IV read back from a token that cannot be the one it
// used: of another size, or all zero (a buffer the token did not fill).
func checkIV(iv []byte) error {
	if len(iv) != GCMNonceSize {
		return newError(Failed, "encrypt", fmt.Errorf("the token used a %d-byte AES-GCM IV; only %d bytes are supported", len(iv), GCMNonceSize))
	}
	for _, b := range iv {
		if b != 0 {
			return nil
		}
	}
	return newError(Failed, "encrypt", errors.New("the token left the AES-GCM IV zero; it neither used the IV given nor wrote back its own"))
}

// recentIVLimit is how many IVs a connection remembers.
const recentIVLimit = 4096

// rememberIV refuses an IV among the connection's recent ones, and
// remembers it. Only a broken token repeats a random or counter IV; a
// repetition this catches is one too many, and the ones it cannot see (in
// another process, or long ago) are the token's to prevent.
func (c *connection) rememberIV(iv []byte) error {
	var k [GCMNonceSize]byte
	copy(k[:], iv)
	c.ivMu.Lock()
	defer c.ivMu.Unlock()
	if _, seen := c.recentIVs[k]; seen {
		return newError(Failed, "encrypt", errors.New("the token used an AES-GCM IV it had used before; refusing its output (GCM under a repeated IV is broken)"))
	}
	if c.recentIVs == nil {
		c.recentIVs = make(map[[GCMNonceSize]byte]struct{}, recentIVLimit)
		c.recentIVOrder = make([][GCMNonceSize]byte, 0, recentIVLimit)
	}
	if len(c.recentIVOrder) < recentIVLimit {
		c.recentIVOrder = append(c.recentIVOrder, k)
	} else {
		// A ring: the oldest is at ivNext.
		delete(c.recentIVs, c.recentIVOrder[c.ivNext])
		c.recentIVOrder[c.ivNext] = k
		c.ivNext = (c.ivNext + 1) % recentIVLimit
	}
	c.recentIVs[k] = struct{}{}
	return nil
}

// DecryptGCM opens iv || ciphertext || tag made by EncryptGCM.
func (t *Token) DecryptGCM(label string, sealed, aad []byte) ([]byte, error) {
	if err := checkSealed(sealed); err != nil {
		return nil, err
	}
	var out []byte
	err := t.do("decrypt", true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		h, err := t.conn.objectHandle(ctx, s, gen, label)
		if err != nil {
			return err
		}
		pt, err := openGCM(ctx, s, h, sealed, aad)
		if err != nil {
			return err
		}
		out = pt
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// DecryptGCMBatch does DecryptGCM for each item, as EncryptGCMBatch does
// EncryptGCM: on one session within one deadline, an item that does not
// open (or that the token refuses) with its own error.
func (t *Token) DecryptGCMBatch(label string, items []GCMItem) error {
	return t.gcmBatch("decrypt", label, items, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, h pkcs11.ObjectHandle, sealed, aad []byte) ([]byte, error) {
		if err := checkSealed(sealed); err != nil {
			return nil, err
		}
		return openGCM(ctx, s, h, sealed, aad)
	})
}

// checkSealed refuses what cannot be iv || ciphertext || tag.
func checkSealed(sealed []byte) error {
	if len(sealed) < GCMNonceSize+GCMTagSize {
		return newError(Failed, "decrypt", errors.New("ciphertext too short"))
	}
	return nil
}

// openGCM is one DecryptGCM on session s with key h. A failure with the
// session still answering is the input's: Failed.
func openGCM(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, h pkcs11.ObjectHandle, sealed, aad []byte) ([]byte, error) {
	params := pkcs11.NewGCMParams(sealed[:GCMNonceSize], aad, GCMTagSize*8)
	defer params.Free()
	if err := ctx.DecryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, h); err != nil {
		return nil, err
	}
	pt, err := ctx.Decrypt(s, sealed[GCMNonceSize:])
	if err != nil && tokenStillThere(ctx, s) {
		// Tokens report a failed tag check in different ways, some
		// (SoftHSM2) as CKR_GENERAL_ERROR; with the session alive,
		// it is the input's fault.
		return nil, newError(Failed, "decrypt", fmt.Errorf("ciphertext or associated data do not authenticate (%v)", err))
	}
	return pt, err
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
	defer t.conn.forget(label)
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
	if err != nil {
		return nil, err
	}
	return labels, nil
}
