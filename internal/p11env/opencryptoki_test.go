package p11env

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"math/big"
	"strconv"
	"testing"

	"github.com/miekg/pkcs11"
)

// ockFacts is what openCryptoki 3.8.1's soft token (Debian 12) does; the
// test fails when any of it changes.
var ockFacts = map[string]string{
	// C_GetMechanismList and C_GetMechanismInfo: no GCM, no key wrap.
	"mechanism CKM_AES_GCM":                  "absent",
	"mechanism CKM_AES_CBC_PAD":              "encrypt|decrypt|wrap|unwrap",
	"mechanism CKM_AES_KEY_WRAP":             "absent",
	"mechanism CKM_AES_KEY_WRAP_PAD":         "absent",
	"mechanism CKM_AES_KEY_WRAP_KWP(0x210B)": "absent",
	"mechanism CKM_SHA256_HMAC":              "sign|verify",
	"mechanism CKM_RSA_PKCS_OAEP":            "encrypt|decrypt|wrap|unwrap",
	"mechanism CKM_RSA_PKCS_KEY_PAIR_GEN":    "generate_key_pair",
	"mechanism CKM_AES_KEY_GEN":              "generate",
	"mechanism CKM_GENERIC_SECRET_KEY_GEN":   "generate",

	// What works in practice.
	"C_GetMechanismInfo(CKM_AES_GCM)":                "CKR_MECHANISM_INVALID",
	"C_EncryptInit(CKM_AES_GCM)":                     "CKR_MECHANISM_INVALID",
	"AES-256 token key: C_GenerateKey":               "CKR_OK",
	"AES-256 token key: CKA_VALUE":                   "CKR_ATTRIBUTE_SENSITIVE",
	"AES-256 token key: sensitive, extractable":      "true false",
	"CKM_AES_CBC_PAD, 16-byte IV: encrypt 33 bytes":  "CKR_OK, 48 bytes",
	"CKM_AES_CBC_PAD, 16-byte IV: decrypt":           "CKR_OK, round trip",
	"generic secret 32 bytes: C_GenerateKey":         "CKR_OK",
	"CKM_SHA256_HMAC: sign":                          "CKR_OK, 32 bytes",
	"CKM_SHA256_HMAC: verify":                        "CKR_OK",
	"CKM_SHA256_HMAC: verify other message":          "CKR_SIGNATURE_INVALID",
	"RSA-3072: C_GenerateKeyPair":                    "CKR_OK",
	"RSA-3072 OAEP SHA-256: encrypt":                 "CKR_OK, 384 bytes",
	"RSA-3072 OAEP SHA-256: decrypt":                 "CKR_OK, round trip",
	"RSA-3072 OAEP SHA-256: decrypt Go's ciphertext": "CKR_OK, round trip",
}

func TestOpenCryptokiSoftToken(t *testing.T) {
	ock := OpenCryptoki(t, "p11env ock", "1234")

	p := pkcs11.New(ock.Library)
	if p == nil {
		t.Fatalf("loading %s failed", ock.Library)
	}
	if err := p.Initialize(); err != nil {
		t.Fatalf("C_Initialize: %v", err)
	}
	// Registered after OpenCryptoki: runs before the daemon stops.
	t.Cleanup(func() {
		if err := p.Finalize(); err != nil {
			t.Errorf("C_Finalize: %v", err)
		}
		p.Destroy()
	})

	ti, err := p.GetTokenInfo(ock.Slot)
	if err != nil {
		t.Fatalf("C_GetTokenInfo(%d): %v", ock.Slot, err)
	}
	if ti.Label != ock.Label {
		t.Fatalf("token label %q, want %q", ti.Label, ock.Label)
	}
	if ti.Flags&pkcs11.CKF_USER_PIN_INITIALIZED == 0 || ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
		t.Fatalf("token flags %#x: not initialised", ti.Flags)
	}
	s, err := p.OpenSession(ock.Slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatalf("C_OpenSession: %v", err)
	}
	if err := p.Login(s, pkcs11.CKU_USER, ock.PIN); err != nil {
		t.Fatalf("C_Login: %v", err)
	}
	if err := p.Login(s, pkcs11.CKU_USER, "9999"); ckr(err) != "CKR_USER_ALREADY_LOGGED_IN" {
		t.Errorf("second C_Login: %v", ckr(err))
	}

	facts := map[string]string{}
	mechanismFacts(t, p, ock.Slot, facts)

	_, err = p.GetMechanismInfo(ock.Slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, nil)})
	facts["C_GetMechanismInfo(CKM_AES_GCM)"] = ckr(err)

	// AES-256 token key, sensitive and not extractable.
	aes, err := p.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "aes"),
	})
	facts["AES-256 token key: C_GenerateKey"] = ckr(err)
	if err == nil {
		_, err := p.GetAttributeValue(s, aes, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
		facts["AES-256 token key: CKA_VALUE"] = ckr(err)
		attrs, err := p.GetAttributeValue(s, aes, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
		})
		if err != nil {
			facts["AES-256 token key: sensitive, extractable"] = ckr(err)
		} else {
			facts["AES-256 token key: sensitive, extractable"] = boolAttr(attrs[0]) + " " + boolAttr(attrs[1])
		}

		err = p.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, pkcs11.NewGCMParams(make([]byte, 12), nil, 128))}, aes)
		facts["C_EncryptInit(CKM_AES_GCM)"] = ckr(err)

		iv := make([]byte, 16)
		_, _ = rand.Read(iv)
		pt := bytes.Repeat([]byte("x"), 33)
		var ct []byte
		err = p.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, iv)}, aes)
		if err == nil {
			ct, err = p.Encrypt(s, pt)
		}
		facts["CKM_AES_CBC_PAD, 16-byte IV: encrypt 33 bytes"] = withLen(err, ct)
		if err == nil {
			var back []byte
			err = p.DecryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, iv)}, aes)
			if err == nil {
				back, err = p.Decrypt(s, ct)
			}
			facts["CKM_AES_CBC_PAD, 16-byte IV: decrypt"] = roundTrip(err, back, pt)
		}
	}

	// 32-byte generic secret, HMAC-SHA-256.
	mac, err := p.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_GENERIC_SECRET_KEY_GEN, nil)}, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
	})
	facts["generic secret 32 bytes: C_GenerateKey"] = ckr(err)
	if err == nil {
		msg := []byte("message")
		hmacMech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_SHA256_HMAC, nil)}
		var tag []byte
		err = p.SignInit(s, hmacMech, mac)
		if err == nil {
			tag, err = p.Sign(s, msg)
		}
		facts["CKM_SHA256_HMAC: sign"] = withLen(err, tag)
		if err == nil {
			err = firstErr(p.VerifyInit(s, hmacMech, mac))
			if err == nil {
				err = p.Verify(s, msg, tag)
			}
			facts["CKM_SHA256_HMAC: verify"] = ckr(err)
			err = firstErr(p.VerifyInit(s, hmacMech, mac))
			if err == nil {
				err = p.Verify(s, []byte("other"), tag)
			}
			facts["CKM_SHA256_HMAC: verify other message"] = ckr(err)
		}
	}

	// RSA-3072 and OAEP with SHA-256.
	pub, priv, err := p.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)},
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, 3072),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		},
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		})
	facts["RSA-3072: C_GenerateKeyPair"] = ckr(err)
	if err == nil {
		oaep := func() []*pkcs11.Mechanism {
			return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP,
				pkcs11.NewOAEPParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, pkcs11.CKZ_DATA_SPECIFIED, nil))}
		}
		pt := []byte("a 32-byte data encryption key..")
		var ct []byte
		err = p.EncryptInit(s, oaep(), pub)
		if err == nil {
			ct, err = p.Encrypt(s, pt)
		}
		facts["RSA-3072 OAEP SHA-256: encrypt"] = withLen(err, ct)
		if err == nil {
			var back []byte
			err = p.DecryptInit(s, oaep(), priv)
			if err == nil {
				back, err = p.Decrypt(s, ct)
			}
			facts["RSA-3072 OAEP SHA-256: decrypt"] = roundTrip(err, back, pt)
		}
		// Interoperability: Go encrypts to the public key, the token decrypts.
		attrs, err := p.GetAttributeValue(s, pub, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, nil),
		})
		if err != nil {
			t.Fatalf("reading the RSA public key: %v", err)
		}
		goPub := &rsa.PublicKey{N: new(big.Int).SetBytes(attrs[0].Value), E: int(new(big.Int).SetBytes(attrs[1].Value).Int64())}
		goCT, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, goPub, pt, nil)
		if err != nil {
			t.Fatalf("rsa.EncryptOAEP: %v", err)
		}
		var back []byte
		err = p.DecryptInit(s, oaep(), priv)
		if err == nil {
			back, err = p.Decrypt(s, goCT)
		}
		facts["RSA-3072 OAEP SHA-256: decrypt Go's ciphertext"] = roundTrip(err, back, pt)
	}

	checkFacts(t, facts, ockFacts)

	if err := p.Logout(s); err != nil {
		t.Errorf("C_Logout: %v", err)
	}
	if err := p.CloseSession(s); err != nil {
		t.Errorf("C_CloseSession: %v", err)
	}
}

// boolAttr renders a CK_BBOOL attribute value.
func boolAttr(a *pkcs11.Attribute) string {
	if len(a.Value) == 1 && a.Value[0] != 0 {
		return "true"
	}
	if len(a.Value) == 1 {
		return "false"
	}
	return "?"
}

// withLen renders an operation's outcome with its output's length.
func withLen(err error, out []byte) string {
	if err != nil {
		return ckr(err)
	}
	return "CKR_OK, " + strconv.Itoa(len(out)) + " bytes"
}

// roundTrip renders a decryption's outcome, checking it gave back want.
func roundTrip(err error, got, want []byte) string {
	if err != nil {
		return ckr(err)
	}
	if !bytes.Equal(got, want) {
		return "CKR_OK, wrong plaintext"
	}
	return "CKR_OK, round trip"
}

// TestOpenCryptokiParallelTests: parallel tests in one process take turns
// (the flock is per open file, so goroutines exclude each other too), and
// each gets a fresh token: its own label, no objects of the other's.
func TestOpenCryptokiParallelTests(t *testing.T) {
	for _, label := range []string{"parallel a", "parallel b"} {
		t.Run(label, func(t *testing.T) {
			t.Parallel()
			ock := OpenCryptoki(t, label, "87654321")
			p := pkcs11.New(ock.Library)
			if p == nil {
				t.Fatalf("loading %s failed", ock.Library)
			}
			if err := p.Initialize(); err != nil {
				t.Fatalf("C_Initialize: %v", err)
			}
			t.Cleanup(func() {
				if err := p.Finalize(); err != nil {
					t.Errorf("C_Finalize: %v", err)
				}
				p.Destroy()
			})
			ti, err := p.GetTokenInfo(ock.Slot)
			if err != nil || ti.Label != label {
				t.Fatalf("token label %q (%v), want %q", ti.Label, err, label)
			}
			s, err := p.OpenSession(ock.Slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
			if err != nil {
				t.Fatalf("C_OpenSession: %v", err)
			}
			if err := p.Login(s, pkcs11.CKU_USER, ock.PIN); err != nil {
				t.Fatalf("C_Login: %v", err)
			}
			dataObjects := []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA)}
			if found, err := findObjects(p, s, dataObjects); err != nil || len(found) != 0 {
				t.Fatalf("fresh token holds %d data objects (%v)", len(found), err)
			}
			if _, err := p.CreateObject(s, append(dataObjects,
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
				pkcs11.NewAttribute(pkcs11.CKA_VALUE, []byte(label)),
			)); err != nil {
				t.Fatalf("C_CreateObject: %v", err)
			}
			if found, err := findObjects(p, s, dataObjects); err != nil || len(found) != 1 {
				t.Fatalf("token holds %d data objects (%v), want 1", len(found), err)
			}
		})
	}
}
