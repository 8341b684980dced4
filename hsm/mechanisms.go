package hsm

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/miekg/pkcs11"
)

// SealMechanism names how a token seals a blob (a mount's root keyring).
// Tokens differ in what they offer: AES-GCM is missing from older firmware
// and from every software token of Debian 12 but SoftHSM2, and network
// remoting may carry only mechanisms without parameters.
type SealMechanism string

const (
	// AESGCM is CKM_AES_GCM under an AES-256 KEK, the caller's AAD bound.
	AESGCM SealMechanism = "aes-gcm"
	// AESKWP is AES key wrap with padding (RFC 5649, NIST SP 800-38F KWP)
	// under an AES-256 KEK that may wrap and unwrap: the blob is wrapped
	// as a transient secret-key object, with a digest of the AAD inside.
	AESKWP SealMechanism = "aes-kwp"
	// AESCBCHMAC is CKM_AES_CBC_PAD under an AES-256 KEK, then
	// CKM_SHA256_HMAC under a second key in the token over the AAD, IV
	// and ciphertext (encrypt-then-MAC).
	AESCBCHMAC SealMechanism = "aes-cbc-hmac"
	// RSAOAEP is an RSA key pair (3072 bits or more) in the token: a fresh
	// AES-256 key encrypted with CKM_RSA_PKCS_OAEP, which AES-GCM (in this
	// process) keys over the blob with the AAD bound.
	RSAOAEP SealMechanism = "rsa-oaep"
)

// SealMechanisms lists the mechanisms in the order they are preferred when
// none is configured.
var SealMechanisms = []SealMechanism{AESGCM, AESKWP, AESCBCHMAC, RSAOAEP}

// ParseSealMechanism checks a mechanism name.
func ParseSealMechanism(name string) (SealMechanism, error) {
	m := SealMechanism(name)
	if slices.Contains(SealMechanisms, m) {
		return m, nil
	}
	names := make([]string, len(SealMechanisms))
	for i, m := range SealMechanisms {
		names[i] = string(m)
	}
	return "", newError(Configuration, "check mechanism", fmt.Errorf("mechanism %q is not one of %s", name, strings.Join(names, ", ")))
}

// SealKeys names a mechanism and the token objects it uses.
type SealKeys struct {
	Mechanism SealMechanism
	// Label is the AES KEK's label, or the RSA key pair's (both halves).
	Label string
	// HMACLabel is the HMAC key's label, for AESCBCHMAC only.
	HMACLabel string
}

// checkLabels refuses labels no key can have (an empty label would find
// every key).
func (k SealKeys) checkLabels() error {
	for _, l := range k.Labels() {
		if err := CheckKeyLabel(l); err != nil {
			return err
		}
	}
	return nil
}

// DefaultHMACLabel is the HMAC key's label when none is given.
func DefaultHMACLabel(kek string) string { return kek + "-hmac" }

// Labels returns every label the keys use.
func (k SealKeys) Labels() []string {
	if k.Mechanism == AESCBCHMAC {
		return []string{k.Label, k.HMACLabel}
	}
	return []string{k.Label}
}

// PKCS#11 mechanisms the seal mechanisms use. CKM_AES_KEY_WRAP_PAD is
// RFC 5649 in SoftHSM2 and PKCS#11 2.40; PKCS#11 3.0 gave KWP its own
// number, preferred when the token lists it.
const (
	ckmAESKeyWrapKWP = 0x210B
	ckmAESKeyWrapPad = pkcs11.CKM_AES_KEY_WRAP_PAD
)

// mechanismNames names the PKCS#11 mechanisms for messages and status.
var mechanismNames = map[uint]string{
	pkcs11.CKM_AES_GCM:                "CKM_AES_GCM",
	pkcs11.CKM_AES_CBC_PAD:            "CKM_AES_CBC_PAD",
	pkcs11.CKM_SHA256_HMAC:            "CKM_SHA256_HMAC",
	pkcs11.CKM_RSA_PKCS_OAEP:          "CKM_RSA_PKCS_OAEP",
	ckmAESKeyWrapKWP:                  "CKM_AES_KEY_WRAP_KWP",
	ckmAESKeyWrapPad:                  "CKM_AES_KEY_WRAP_PAD",
	pkcs11.CKM_AES_KEY_GEN:            "CKM_AES_KEY_GEN",
	pkcs11.CKM_GENERIC_SECRET_KEY_GEN: "CKM_GENERIC_SECRET_KEY_GEN",
	pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN:  "CKM_RSA_PKCS_KEY_PAIR_GEN",
}

// MechanismSupport is what a token offers for the seal mechanisms.
type MechanismSupport struct {
	// Usable lists the seal mechanisms the token can run, in order of
	// preference.
	Usable []SealMechanism
	// Missing names, per unusable seal mechanism, the PKCS#11 mechanisms
	// (and flags) the token lacks.
	Missing map[SealMechanism][]string
	// CanGenerate says, per usable mechanism, whether the token can also
	// make its keys.
	CanGenerate map[SealMechanism]bool
	// GCM is whether HSM-resident keys (AES-GCM in the token) work.
	GCM bool
}

// Choose returns the preferred usable mechanism.
func (s MechanismSupport) Choose() (SealMechanism, error) {
	if len(s.Usable) == 0 {
		var why []string
		for _, m := range SealMechanisms {
			why = append(why, fmt.Sprintf("%s needs %s", m, strings.Join(s.Missing[m], " and ")))
		}
		return "", newError(Configuration, "choose mechanism", fmt.Errorf(
			"the token offers none of the seal mechanisms: %s", strings.Join(why, "; ")))
	}
	return s.Usable[0], nil
}

// Supports reports whether m is usable, and if not, a message naming what is
// missing.
func (s MechanismSupport) Supports(m SealMechanism) error {
	if slices.Contains(s.Usable, m) {
		return nil
	}
	return newError(Configuration, "check mechanism", fmt.Errorf(
		"the token lacks %s, which mechanism %s needs; it offers: %s", strings.Join(s.Missing[m], " and "), m, s.usableList()))
}

func (s MechanismSupport) usableList() string {
	if len(s.Usable) == 0 {
		return "none"
	}
	names := make([]string, len(s.Usable))
	for i, m := range s.Usable {
		names[i] = string(m)
	}
	return strings.Join(names, ", ")
}

// ErrNoGCM is the error of an HSM-resident key on a token without AES-GCM.
func (s MechanismSupport) ErrNoGCM() error {
	return newError(Configuration, "check mechanism", errors.New(
		"the token lacks CKM_AES_GCM (encrypt and decrypt), which HSM-resident keys need; keep the key in software (hsm=false), or use a token with AES-GCM"))
}

// Mechanisms asks the token which seal mechanisms it can run, from
// C_GetMechanismList and C_GetMechanismInfo.
func (t *Token) Mechanisms() (MechanismSupport, error) {
	var sup MechanismSupport
	err := t.do("list mechanisms", true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		slot, ok := t.conn.slotOf(gen)
		if !ok {
			return newError(Unavailable, "list mechanisms", errors.New("the connection to the token was reset"))
		}
		list, err := ctx.GetMechanismList(slot)
		if err != nil {
			return err
		}
		flags := map[uint]uint{}
		for _, m := range list {
			if _, want := mechanismNames[m.Mechanism]; !want {
				continue
			}
			info, err := ctx.GetMechanismInfo(slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(m.Mechanism, nil)})
			if err != nil {
				continue
			}
			flags[m.Mechanism] = info.Flags
		}
		sup = supportFrom(flags)
		return nil
	})
	if err != nil {
		return MechanismSupport{}, err
	}
	return sup, nil
}

// supportFrom works out the seal mechanisms from the flags of the PKCS#11
// mechanisms the token lists.
func supportFrom(flags map[uint]uint) MechanismSupport {
	sup := MechanismSupport{Missing: map[SealMechanism][]string{}, CanGenerate: map[SealMechanism]bool{}}
	has := func(mech, need uint) bool { f, ok := flags[mech]; return ok && f&need == need }
	type req struct {
		mech, need uint
		what       string
	}
	check := func(reqs ...req) []string {
		var missing []string
		for _, r := range reqs {
			if !has(r.mech, r.need) {
				missing = append(missing, mechanismNames[r.mech]+" ("+r.what+")")
			}
		}
		return missing
	}
	encDec := uint(pkcs11.CKF_ENCRYPT | pkcs11.CKF_DECRYPT)
	// Either number of KWP will do (the connection picks one per
	// token, kwpMechanism); the message names the older, more common one.
	kwp := uint(ckmAESKeyWrapKWP)
	if !has(kwp, pkcs11.CKF_WRAP|pkcs11.CKF_UNWRAP) {
		kwp = ckmAESKeyWrapPad
	}
	for _, m := range SealMechanisms {
		var missing []string
		gen := false
		switch m {
		case AESGCM:
			missing = check(req{pkcs11.CKM_AES_GCM, encDec, "encrypt, decrypt"})
			gen = has(pkcs11.CKM_AES_KEY_GEN, pkcs11.CKF_GENERATE)
			sup.GCM = len(missing) == 0
		case AESKWP:
			missing = check(req{kwp, pkcs11.CKF_WRAP | pkcs11.CKF_UNWRAP, "wrap, unwrap"})
			gen = has(pkcs11.CKM_AES_KEY_GEN, pkcs11.CKF_GENERATE)
		case AESCBCHMAC:
			missing = check(req{pkcs11.CKM_AES_CBC_PAD, encDec, "encrypt, decrypt"},
				req{pkcs11.CKM_SHA256_HMAC, pkcs11.CKF_SIGN | pkcs11.CKF_VERIFY, "sign, verify"})
			gen = has(pkcs11.CKM_AES_KEY_GEN, pkcs11.CKF_GENERATE) && has(pkcs11.CKM_GENERIC_SECRET_KEY_GEN, pkcs11.CKF_GENERATE)
		case RSAOAEP:
			missing = check(req{pkcs11.CKM_RSA_PKCS_OAEP, encDec, "encrypt, decrypt"})
			gen = has(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, pkcs11.CKF_GENERATE_KEY_PAIR)
		}
		if len(missing) > 0 {
			sup.Missing[m] = missing
			continue
		}
		sup.Usable = append(sup.Usable, m)
		sup.CanGenerate[m] = gen
	}
	return sup
}

// slotOf returns the slot of the connection of generation gen.
func (c *connection) slotOf(gen uint64) (uint, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.slot, c.gen == gen
}

// Domain separation of the blobs of the mechanisms other than AES-GCM (whose
// blobs keep the format of the versions before them).
const (
	kwpMagic    = "hsm-transit/seal/aes-kwp\x00"
	cbcMACMagic = "hsm-transit/seal/aes-cbc-hmac\x00"
	oaepMagic   = "hsm-transit/seal/rsa-oaep\x00"
)

// Blob sizes.
const (
	cbcIVSize   = 16
	hmacTagSize = 32
	oaepKeySize = 32
	// oaepMinBlob is the size of an rsa-oaep blob with an empty wrapped
	// key: the hash (1 byte), the wrapped key's length (2), the GCM nonce
	// (12) and tag (16).
	oaepMinBlob = 31
	// MinRSABits is the smallest RSA modulus accepted for rsa-oaep.
	MinRSABits = 3072
)

// Seal encrypts plaintext with the mechanism and keys, binding aad: a blob
// opens only with the same keys, mechanism and aad. The keys are checked
// first (CheckSealKeys), and the blob is opened again before it is returned:
// a token whose behaviour changed since it was configured (new firmware, an
// IV it chooses and does not report) must not leave a blob that nothing
// opens.
func (t *Token) Seal(k SealKeys, plaintext, aad []byte) ([]byte, error) {
	if err := t.CheckSealKeys(k); err != nil {
		return nil, err
	}
	blob, err := t.seal(k, plaintext, aad)
	if err != nil {
		return nil, err
	}
	got, err := t.open(k, blob, aad)
	if err != nil {
		if KindOf(err) == Failed {
			return nil, newError(Configuration, "seal", fmt.Errorf(
				"the token cannot open what it sealed with %s: %v; nothing sealed with it is kept", k.Mechanism, err))
		}
		return nil, err
	}
	same := subtle.ConstantTimeCompare(got, plaintext) == 1
	clear(got)
	if !same {
		return nil, newError(Configuration, "seal", fmt.Errorf(
			"the token gave back other data than it sealed with %s; nothing sealed with it is kept", k.Mechanism))
	}
	return blob, nil
}

func (t *Token) seal(k SealKeys, plaintext, aad []byte) ([]byte, error) {
	switch k.Mechanism {
	case AESGCM, "":
		return t.EncryptGCM(k.Label, plaintext, aad)
	case AESKWP:
		return t.sealKWP(k.Label, plaintext, aad)
	case AESCBCHMAC:
		return t.sealCBCHMAC(k, plaintext, aad)
	case RSAOAEP:
		return t.sealOAEP(k.Label, plaintext, aad)
	}
	_, err := ParseSealMechanism(string(k.Mechanism))
	return nil, err
}

// Open opens a blob Seal made. A blob that does not authenticate (another
// key, mechanism or aad, or edited) is a Failed error. The keys are checked
// first (CheckSealKeys): the labels come from storage, and a storage writer
// could name keys whose value is known outside the token (one imported by
// another application), or an RSA key pair whose public key anyone reads,
// and seal a blob of their own under them.
func (t *Token) Open(k SealKeys, blob, aad []byte) ([]byte, error) {
	if err := t.CheckSealKeys(k); err != nil {
		return nil, err
	}
	return t.open(k, blob, aad)
}

func (t *Token) open(k SealKeys, blob, aad []byte) ([]byte, error) {
	switch k.Mechanism {
	case AESGCM, "":
		return t.DecryptGCM(k.Label, blob, aad)
	case AESKWP:
		return t.openKWP(k.Label, blob, aad)
	case AESCBCHMAC:
		return t.openCBCHMAC(k, blob, aad)
	case RSAOAEP:
		return t.openOAEP(k.Label, blob, aad)
	}
	_, err := ParseSealMechanism(string(k.Mechanism))
	return nil, err
}

// errNotAuthentic is the Failed error of a blob that does not open.
func errNotAuthentic(op string, cause error) error {
	msg := "the sealed data or its associated data do not authenticate"
	if cause != nil {
		msg += " (" + cause.Error() + ")"
	}
	return newError(Failed, op, errors.New(msg))
}

// kwpBody is what aes-kwp wraps: a magic, the SHA-256 of the AAD, a random
// salt (key wrap is deterministic: without it, sealing the same keyring
// twice would show), the plaintext's length and the plaintext. The wrap's
// integrity check covers all of it. The length is there because some tokens
// (SoftHSM2 2.6) give an unwrapped generic secret back with RFC 5649's zero
// padding on.
func kwpBody(plaintext, aad []byte) ([]byte, error) {
	d := sha256.Sum256(aad)
	b := append([]byte(kwpMagic), d[:]...)
	salt := make([]byte, kwpSaltSize)
	if _, err := rand.Read(salt); err != nil {
		return nil, err
	}
	b = append(b, salt...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(plaintext)))
	return append(b, plaintext...), nil
}

const kwpSaltSize = 16

// kwpPlaintext checks an unwrapped body against aad and returns its
// plaintext.
func kwpPlaintext(body, aad []byte) ([]byte, bool) {
	want := sha256.Sum256(aad)
	head := len(kwpMagic) + len(want) + kwpSaltSize + 4
	if len(body) < head || string(body[:len(kwpMagic)]) != kwpMagic ||
		subtle.ConstantTimeCompare(body[len(kwpMagic):len(kwpMagic)+len(want)], want[:]) != 1 {
		return nil, false
	}
	n := int(binary.BigEndian.Uint32(body[head-4 : head]))
	rest := body[head:]
	if n > len(rest) || len(rest)-n >= 8 {
		return nil, false
	}
	for _, b := range rest[n:] {
		if b != 0 {
			return nil, false
		}
	}
	return append([]byte{}, rest[:n]...), true
}

// transientSecret is the template of the session object that carries a
// value through C_WrapKey and C_UnwrapKey: never a token object, readable
// while it lives, destroyed at once.
func transientSecret(value []byte) []*pkcs11.Attribute {
	t := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
	}
	if value != nil {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_VALUE, value))
	}
	return t
}

// kwpVariant is the first byte of an aes-kwp blob: which PKCS#11 mechanism
// wrapped it.
var kwpVariant = map[uint]byte{ckmAESKeyWrapPad: 1, ckmAESKeyWrapKWP: 2}

func (t *Token) sealKWP(label string, plaintext, aad []byte) ([]byte, error) {
	const op = "seal (aes-kwp)"
	body, err := kwpBody(plaintext, aad)
	if err != nil {
		return nil, newError(Failed, op, err)
	}
	defer clear(body)
	var out []byte
	err = t.do(op, true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		kek, err := t.conn.objectHandle(ctx, s, gen, label)
		if err != nil {
			return err
		}
		mech := t.conn.kwpMechanism(ctx, gen)
		obj, err := ctx.CreateObject(s, transientSecret(body))
		if err != nil {
			return err
		}
		defer func() { _ = ctx.DestroyObject(s, obj) }()
		wrapped, err := ctx.WrapKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, kek, obj)
		if err != nil {
			return err
		}
		out = append([]byte{kwpVariant[mech]}, wrapped...)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

func (t *Token) openKWP(label string, blob, aad []byte) ([]byte, error) {
	const op = "open (aes-kwp)"
	if len(blob) < 1+16 {
		return nil, errNotAuthentic(op, errors.New("too short"))
	}
	var mech uint
	for m, v := range kwpVariant {
		if v == blob[0] {
			mech = m
		}
	}
	if mech == 0 {
		return nil, errNotAuthentic(op, fmt.Errorf("unknown variant %d", blob[0]))
	}
	var body []byte
	err := t.do(op, true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		kek, err := t.conn.objectHandle(ctx, s, gen, label)
		if err != nil {
			return err
		}
		obj, err := ctx.UnwrapKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, kek, blob[1:], transientSecret(nil))
		if err != nil {
			if tokenStillThere(ctx, s) {
				return errNotAuthentic(op, err)
			}
			return err
		}
		defer func() { _ = ctx.DestroyObject(s, obj) }()
		attrs, err := ctx.GetAttributeValue(s, obj, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
		if err != nil {
			return err
		}
		body = attrs[0].Value
		return nil
	})
	if err != nil {
		return nil, err
	}
	defer clear(body)
	pt, ok := kwpPlaintext(body, aad)
	if !ok {
		return nil, errNotAuthentic(op, errors.New("wrapped for other associated data"))
	}
	return pt, nil
}

// kwpMechanism returns the key-wrap mechanism to use, asking the token once
// per module generation (after a reconnect, the token may be another one
// of a cluster, or have new firmware).
func (c *connection) kwpMechanism(ctx *pkcs11.Ctx, gen uint64) uint {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.kwp != 0 && c.kwpGen == gen {
		return c.kwp
	}
	c.kwp, c.kwpGen = ckmAESKeyWrapPad, gen
	if info, err := ctx.GetMechanismInfo(c.slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(ckmAESKeyWrapKWP, nil)}); err == nil &&
		info.Flags&(pkcs11.CKF_WRAP|pkcs11.CKF_UNWRAP) == pkcs11.CKF_WRAP|pkcs11.CKF_UNWRAP {
		c.kwp = ckmAESKeyWrapKWP
	}
	return c.kwp
}

// cbcMACInput is what the HMAC of aes-cbc-hmac covers.
func cbcMACInput(aad, iv, ct []byte) []byte {
	n := binary.BigEndian.AppendUint64(nil, uint64(len(aad)))
	return slices.Concat([]byte(cbcMACMagic), n, aad, iv, ct)
}

func (t *Token) sealCBCHMAC(k SealKeys, plaintext, aad []byte) ([]byte, error) {
	const op = "seal (aes-cbc-hmac)"
	iv := make([]byte, cbcIVSize)
	if _, err := rand.Read(iv); err != nil {
		return nil, newError(Failed, op, err)
	}
	var out []byte
	err := t.do(op, true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		kek, err := t.conn.objectHandle(ctx, s, gen, k.Label)
		if err != nil {
			return err
		}
		mac, err := t.conn.objectHandle(ctx, s, gen, k.HMACLabel)
		if err != nil {
			return err
		}
		if err := ctx.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, iv)}, kek); err != nil {
			return err
		}
		ct, err := ctx.Encrypt(s, plaintext)
		if err != nil {
			return err
		}
		if err := ctx.SignInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_SHA256_HMAC, nil)}, mac); err != nil {
			return err
		}
		tag, err := ctx.Sign(s, cbcMACInput(aad, iv, ct))
		if err != nil {
			return err
		}
		if len(tag) != hmacTagSize {
			return newError(Failed, op, fmt.Errorf("the token returned a %d-byte HMAC-SHA256", len(tag)))
		}
		out = slices.Concat(iv, ct, tag)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

func (t *Token) openCBCHMAC(k SealKeys, blob, aad []byte) ([]byte, error) {
	const op = "open (aes-cbc-hmac)"
	// The IV, then CBC with padding (at least one block), then the tag.
	ctLen := len(blob) - cbcIVSize - hmacTagSize
	if ctLen < aes.BlockSize || ctLen%aes.BlockSize != 0 {
		return nil, errNotAuthentic(op, errors.New("malformed"))
	}
	iv, ct, tag := blob[:cbcIVSize], blob[cbcIVSize:len(blob)-hmacTagSize], blob[len(blob)-hmacTagSize:]
	var out []byte
	err := t.do(op, true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		kek, err := t.conn.objectHandle(ctx, s, gen, k.Label)
		if err != nil {
			return err
		}
		mac, err := t.conn.objectHandle(ctx, s, gen, k.HMACLabel)
		if err != nil {
			return err
		}
		if err := ctx.VerifyInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_SHA256_HMAC, nil)}, mac); err != nil {
			return err
		}
		if err := ctx.Verify(s, cbcMACInput(aad, iv, ct), tag); err != nil {
			var rv pkcs11.Error
			if errors.As(err, &rv) && (rv == pkcs11.CKR_SIGNATURE_INVALID || rv == pkcs11.CKR_SIGNATURE_LEN_RANGE) {
				return errNotAuthentic(op, nil)
			}
			return err
		}
		if err := ctx.DecryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, iv)}, kek); err != nil {
			return err
		}
		pt, err := ctx.Decrypt(s, ct)
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

// oaepHashes are the hashes tried for RSA-OAEP, SHA-256 first, then the
// strongest the token takes; the blob's first byte records the one used.
var oaepHashes = []struct {
	id        byte
	hash, mgf uint
}{
	{1, pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256},
	{2, pkcs11.CKM_SHA512, pkcs11.CKG_MGF1_SHA512},
	{3, pkcs11.CKM_SHA384, pkcs11.CKG_MGF1_SHA384},
	{4, pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1},
}

func oaepMechanism(hash, mgf uint) []*pkcs11.Mechanism {
	return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP,
		pkcs11.NewOAEPParams(hash, mgf, pkcs11.CKZ_DATA_SPECIFIED, nil))}
}

// oaepAAD binds the software AES-GCM layer of rsa-oaep.
func oaepAAD(aad []byte) []byte { return append([]byte(oaepMagic), aad...) }

func (t *Token) sealOAEP(label string, plaintext, aad []byte) ([]byte, error) {
	const op = "seal (rsa-oaep)"
	dk := make([]byte, oaepKeySize)
	defer clear(dk)
	if _, err := rand.Read(dk); err != nil {
		return nil, newError(Failed, op, err)
	}
	var head []byte
	err := t.do(op, true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		pub, err := t.conn.keyHandle(ctx, s, gen, pkcs11.CKO_PUBLIC_KEY, label)
		if err != nil {
			return err
		}
		var last error
		for _, h := range oaepHashes {
			if err := ctx.EncryptInit(s, oaepMechanism(h.hash, h.mgf), pub); err != nil {
				var rv pkcs11.Error
				// SoftHSM2 2.6 answers CKR_ARGUMENTS_BAD to any hash
				// but SHA-1.
				if errors.As(err, &rv) && (rv == pkcs11.CKR_MECHANISM_PARAM_INVALID || rv == pkcs11.CKR_ARGUMENTS_BAD) {
					last = err
					continue
				}
				return err
			}
			wrapped, err := ctx.Encrypt(s, dk)
			if err != nil {
				return err
			}
			// The length must fit the blob's 2-byte field.
			n := uint16(len(wrapped))
			if int(n) != len(wrapped) {
				return newError(Configuration, op, errors.New("the RSA key is too large"))
			}
			b := []byte{h.id}
			b = binary.BigEndian.AppendUint16(b, n)
			head = append(b, wrapped...)
			return nil
		}
		return last
	})
	if err != nil {
		return nil, err
	}
	block, _ := aes.NewCipher(dk)
	aead, _ := cipher.NewGCM(block)
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, newError(Failed, op, err)
	}
	out := append(head, nonce...)
	return aead.Seal(out, nonce, plaintext, oaepAAD(aad)), nil
}

func (t *Token) openOAEP(label string, blob, aad []byte) ([]byte, error) {
	const op = "open (rsa-oaep)"
	if len(blob) < oaepMinBlob {
		return nil, errNotAuthentic(op, errors.New("too short"))
	}
	n := int(binary.BigEndian.Uint16(blob[1:3]))
	if len(blob) < oaepMinBlob+n {
		return nil, errNotAuthentic(op, errors.New("too short"))
	}
	idx := slices.IndexFunc(oaepHashes, func(h struct {
		id        byte
		hash, mgf uint
	}) bool {
		return h.id == blob[0]
	})
	if idx < 0 {
		return nil, errNotAuthentic(op, fmt.Errorf("unknown hash %d", blob[0]))
	}
	h := oaepHashes[idx]
	wrapped, rest := blob[3:3+n], blob[3+n:]
	var dk []byte
	err := t.do(op, true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error {
		priv, err := t.conn.keyHandle(ctx, s, gen, pkcs11.CKO_PRIVATE_KEY, label)
		if err != nil {
			return err
		}
		if err := ctx.DecryptInit(s, oaepMechanism(h.hash, h.mgf), priv); err != nil {
			var rv pkcs11.Error
			// A hash the token refuses (SoftHSM2 2.6: any but SHA-1)
			// is one it never sealed with (sealOAEP falls back): the
			// blob's fault, not the token's.
			if errors.As(err, &rv) && (rv == pkcs11.CKR_MECHANISM_PARAM_INVALID || rv == pkcs11.CKR_ARGUMENTS_BAD) &&
				tokenStillThere(ctx, s) {
				return errNotAuthentic(op, err)
			}
			return err
		}
		k, err := ctx.Decrypt(s, wrapped)
		if err != nil {
			if tokenStillThere(ctx, s) {
				return errNotAuthentic(op, err)
			}
			return err
		}
		dk = k
		return nil
	})
	if err != nil {
		return nil, err
	}
	defer clear(dk)
	if len(dk) != oaepKeySize {
		return nil, errNotAuthentic(op, errors.New("wrong key size"))
	}
	block, _ := aes.NewCipher(dk)
	aead, _ := cipher.NewGCM(block)
	pt, err := aead.Open(nil, rest[:12], rest[12:], oaepAAD(aad))
	if err != nil {
		return nil, errNotAuthentic(op, nil)
	}
	return pt, nil
}

// CheckRoundTrip seals a random canary with the keys, so that a token that
// cannot give back what it sealed (one that replaces the AES-GCM IV and does
// not say which it used, say) is found before anything depends on it: Seal
// opens what it sealed and compares it before it returns.
func (t *Token) CheckRoundTrip(k SealKeys, aad []byte) error {
	canary := make([]byte, 48)
	if _, err := rand.Read(canary); err != nil {
		return newError(Failed, "check round trip", err)
	}
	_, err := t.Seal(k, canary, aad)
	return err
}
