package p11env

import (
	"bytes"
	"crypto/rand"
	"strconv"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// p11kitFacts is what p11-kit 0.24.1's remoting (Debian 12) carries of a
// SoftHSM2 2.6.1 token, and how its client behaves when the server dies or
// hangs; the test fails when any of it changes.
var p11kitFacts = map[string]string{
	// What the client module lists: it drops the provider's mechanisms
	// that are not on p11-kit's allow-list of mechanisms whose parameters
	// it can serialise (SoftHSM2 itself lists CBC_PAD, GCM, KEY_WRAP(_PAD)).
	"mechanism CKM_AES_CBC_PAD":              "absent",
	"mechanism CKM_AES_GCM":                  "absent",
	"mechanism CKM_AES_KEY_GEN":              "generate",
	"mechanism CKM_AES_KEY_WRAP":             "absent",
	"mechanism CKM_AES_KEY_WRAP_KWP(0x210B)": "absent",
	"mechanism CKM_AES_KEY_WRAP_PAD":         "absent",
	"mechanism CKM_GENERIC_SECRET_KEY_GEN":   "generate",
	"mechanism CKM_RSA_PKCS_KEY_PAIR_GEN":    "generate_key_pair",
	"mechanism CKM_RSA_PKCS_OAEP":            "encrypt|decrypt|wrap|unwrap",
	"mechanism CKM_SHA256_HMAC":              "sign|verify",

	// What works. Mechanisms off the allow-list fail in the client module
	// with CKR_MECHANISM_INVALID (the server never sees the call), with or
	// without a parameter. OAEP's parameters cross; SHA-256 OAEP fails
	// because SoftHSM2 2.6.1 supports only SHA-1 OAEP (see the control).
	"CKM_AES_CBC_PAD, 16-byte IV: decrypt":      "not reached",
	"CKM_AES_CBC_PAD, 16-byte IV: encrypt 33 B": "CKR_MECHANISM_INVALID",
	"CKM_AES_ECB: encrypt 16 B":                 "CKR_OK, 16 bytes",
	"CKM_AES_GCM: C_Encrypt":                    "not reached",
	"CKM_AES_GCM: C_EncryptInit":                "CKR_MECHANISM_INVALID",
	"CKM_SHA256_HMAC: sign":                     "CKR_OK, 32 bytes",
	"CKM_SHA256_HMAC: verify":                   "CKR_OK",
	"CKM_SHA256_HMAC: verify other message":     "CKR_SIGNATURE_INVALID",
	"CKO_DATA: CKA_VALUE":                       "CKR_OK, same value",
	"CKO_DATA: C_CreateObject":                  "CKR_OK",
	"CKO_DATA: C_DestroyObject":                 "CKR_OK",
	"CKO_DATA: find":                            "CKR_OK, 1 found",
	"CKO_DATA: find after destroy":              "CKR_OK, 0 found",
	"C_CreateObject generic secret 40 B":        "CKR_OK",
	"C_GenerateKey CKM_AES_KEY_GEN (token)":     "CKR_OK",
	"C_GenerateRandom(32)":                      "CKR_OK, 32 bytes",
	"C_UnwrapKey CKM_AES_KEY_WRAP_PAD":          "not reached",
	"C_WrapKey CKM_AES_KEY_WRAP_PAD":            "CKR_MECHANISM_INVALID",
	"RSA OAEP SHA-1: decrypt":                   "CKR_OK, round trip",
	"RSA OAEP SHA-1: encrypt":                   "CKR_OK, 256 bytes",
	"RSA OAEP SHA-256: decrypt":                 "not reached",
	"RSA OAEP SHA-256: encrypt":                 "CKR_ARGUMENTS_BAD",
	"RSA-2048: C_GenerateKeyPair":               "CKR_OK",

	// The same calls to SoftHSM2 loaded directly.
	"control, SoftHSM2 direct: CKM_AES_CBC_PAD encrypt 33 B":   "CKR_OK, 48 bytes",
	"control, SoftHSM2 direct: CKM_AES_GCM encrypt 9 B":        "CKR_OK, 25 bytes",
	"control, SoftHSM2 direct: C_WrapKey CKM_AES_KEY_WRAP_PAD": "CKR_OK, 48 bytes",
	"control, SoftHSM2 direct: RSA OAEP SHA-1: decrypt":        "CKR_OK, round trip",
	"control, SoftHSM2 direct: RSA OAEP SHA-1: encrypt":        "CKR_OK, 256 bytes",
	"control, SoftHSM2 direct: RSA OAEP SHA-256: decrypt":      "not reached",
	"control, SoftHSM2 direct: RSA OAEP SHA-256: encrypt":      "CKR_ARGUMENTS_BAD",

	// The server killed, restarted; the client finalised and initialised.
	"outage: live processes in the server's group":   "2",
	"outage: Kill, live processes left in the group": "0",
	"outage: Kill, C_GetTokenInfo":                   "CKR_DEVICE_ERROR",
	"outage: Kill, C_OpenSession":                    "CKR_DEVICE_ERROR",
	"outage: Kill, call returned within 1 s":         "yes",
	"outage: Kill, next call on the session":         "CKR_DEVICE_ERROR",
	"outage: Kill, second call":                      "CKR_DEVICE_ERROR",
	"outage: Restart, C_Finalize":                    "CKR_OK",
	"outage: Restart, C_Initialize":                  "CKR_OK",
	"outage: Restart, C_OpenSession (x3)":            "CKR_DEVICE_ERROR (all)",
	"outage: after reinit, C_Login":                  "CKR_OK",
	"outage: after reinit, C_OpenSession":            "CKR_OK",
	"outage: after reinit, decrypt old ECB block":    "CKR_OK, round trip",
	"outage: after reinit, find token AES key":       "CKR_OK, 1 found",
	"outage: after reinit, same slot ID":             "yes",

	// The server SIGSTOPped, then SIGCONTinued.
	"hang: Cont, call completes":       "CKR_OK",
	"hang: Stop, call blocked for 2 s": "yes",
}

const p11kitPIN = "1234"

func TestP11KitRemoting(t *testing.T) {
	provider, err := softhsm.FindLibrary()
	if err != nil {
		unavailable(t, RequireP11KitEnv, "%v", err)
	}
	conf, err := softhsm.Configure(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := softhsm.InitToken(conf, "p11kit", p11kitPIN); err != nil {
		t.Fatal(err)
	}
	k := StartP11Kit(t, provider, "p11kit", []string{"SOFTHSM2_CONF=" + conf})
	if len(k.Env()) != 1 || k.Env()[0] != "P11_KIT_SERVER_ADDRESS=unix:path="+k.Socket {
		t.Fatalf("Env() = %q", k.Env())
	}
	t.Setenv(P11KitAddressEnv, k.Address())

	p := pkcs11.New(k.ClientLibrary)
	if p == nil {
		t.Fatalf("loading %s failed", k.ClientLibrary)
	}
	if err := p.Initialize(); err != nil {
		t.Fatalf("C_Initialize: %v", err)
	}
	t.Cleanup(func() { // before the server's cleanup
		_ = p.Finalize()
		p.Destroy()
	})
	slot := findSlot(t, p, "p11kit")
	s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatalf("C_OpenSession: %v", err)
	}
	if err := p.Login(s, pkcs11.CKU_USER, p11kitPIN); err != nil {
		t.Fatalf("C_Login: %v", err)
	}

	facts := map[string]string{}
	mechanismFacts(t, p, slot, facts)

	rnd, err := p.GenerateRandom(s, 32)
	facts["C_GenerateRandom(32)"] = withLen(err, rnd)

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
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "p11kit-aes"),
	})
	facts["C_GenerateKey CKM_AES_KEY_GEN (token)"] = ckr(err)
	if err != nil {
		checkFacts(t, facts, p11kitFacts)
		t.FailNow()
	}

	// GCM.
	gcm := pkcs11.NewGCMParams(make([]byte, 12), []byte("aad"), 128)
	err = p.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, gcm)}, aes)
	facts["CKM_AES_GCM: C_EncryptInit"] = ckr(err)
	if err == nil {
		ct, err := p.Encrypt(s, []byte("plaintext"))
		facts["CKM_AES_GCM: C_Encrypt"] = withLen(err, ct)
	} else {
		facts["CKM_AES_GCM: C_Encrypt"] = "not reached"
	}
	gcm.Free()

	// CBC-PAD with an IV.
	iv := make([]byte, 16)
	_, _ = rand.Read(iv)
	cbcPT := bytes.Repeat([]byte("y"), 33)
	var cbcCT []byte
	err = p.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, iv)}, aes)
	if err == nil {
		cbcCT, err = p.Encrypt(s, cbcPT)
	}
	facts["CKM_AES_CBC_PAD, 16-byte IV: encrypt 33 B"] = withLen(err, cbcCT)
	if err == nil {
		var back []byte
		err = p.DecryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, iv)}, aes)
		if err == nil {
			back, err = p.Decrypt(s, cbcCT)
		}
		facts["CKM_AES_CBC_PAD, 16-byte IV: decrypt"] = roundTrip(err, back, cbcPT)
	} else {
		facts["CKM_AES_CBC_PAD, 16-byte IV: decrypt"] = "not reached"
	}

	// AES key wrap with padding (RFC 5649), no parameter.
	secret := make([]byte, 40)
	_, _ = rand.Read(secret)
	target, err := p.CreateObject(s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, secret),
	})
	facts["C_CreateObject generic secret 40 B"] = ckr(err)
	facts["C_WrapKey CKM_AES_KEY_WRAP_PAD"] = "not reached"
	facts["C_UnwrapKey CKM_AES_KEY_WRAP_PAD"] = "not reached"
	if err == nil {
		kwp := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP_PAD, nil)}
		wrapped, err := p.WrapKey(s, kwp, aes, target)
		facts["C_WrapKey CKM_AES_KEY_WRAP_PAD"] = withLen(err, wrapped)
		if err == nil {
			h, err := p.UnwrapKey(s, kwp, aes, wrapped, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
				pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
				pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
				pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
			})
			if err == nil {
				var attrs []*pkcs11.Attribute
				attrs, err = p.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
				if err == nil {
					facts["C_UnwrapKey CKM_AES_KEY_WRAP_PAD"] = roundTrip(nil, attrs[0].Value, secret) + ", CKA_VALUE read"
				}
			}
			if err != nil {
				facts["C_UnwrapKey CKM_AES_KEY_WRAP_PAD"] = ckr(err)
			}
		}
	}

	// HMAC-SHA-256 with a generated 32-byte generic secret.
	mac, err := p.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_GENERIC_SECRET_KEY_GEN, nil)}, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
	})
	if err != nil {
		t.Fatalf("C_GenerateKey generic secret: %v", err)
	}
	msg := []byte("message")
	hmacMech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_SHA256_HMAC, nil)}
	var tag []byte
	err = p.SignInit(s, hmacMech, mac)
	if err == nil {
		tag, err = p.Sign(s, msg)
	}
	facts["CKM_SHA256_HMAC: sign"] = withLen(err, tag)
	err = p.VerifyInit(s, hmacMech, mac)
	if err == nil {
		err = p.Verify(s, msg, tag)
	}
	facts["CKM_SHA256_HMAC: verify"] = ckr(err)
	err = p.VerifyInit(s, hmacMech, mac)
	if err == nil {
		err = p.Verify(s, []byte("other"), tag)
	}
	facts["CKM_SHA256_HMAC: verify other message"] = ckr(err)

	// RSA OAEP with SHA-256 parameters.
	pub, priv, err := p.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)},
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, 2048),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		},
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		})
	facts["RSA-2048: C_GenerateKeyPair"] = ckr(err)
	if err == nil {
		oaepFacts(p, s, pub, priv, "RSA", facts)
	}

	// Data objects.
	value := []byte("data object value")
	dataTemplate := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "p11kit-data"),
	}
	obj, err := p.CreateObject(s, append(dataTemplate,
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, "p11env"),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, value),
	))
	facts["CKO_DATA: C_CreateObject"] = ckr(err)
	found, err := findObjects(p, s, dataTemplate)
	facts["CKO_DATA: find"] = foundCount(err, found)
	if err == nil && len(found) == 1 && found[0] == obj {
		attrs, err := p.GetAttributeValue(s, obj, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
		if err != nil {
			facts["CKO_DATA: CKA_VALUE"] = ckr(err)
		} else if bytes.Equal(attrs[0].Value, value) {
			facts["CKO_DATA: CKA_VALUE"] = "CKR_OK, same value"
		} else {
			facts["CKO_DATA: CKA_VALUE"] = "CKR_OK, other value"
		}
	}
	facts["CKO_DATA: C_DestroyObject"] = ckr(p.DestroyObject(s, obj))
	found, err = findObjects(p, s, dataTemplate)
	facts["CKO_DATA: find after destroy"] = foundCount(err, found)

	// A block encrypted with the token key (CKM_AES_ECB: no parameter, so
	// p11-kit carries it), to show after the outage that the key found is
	// the same key.
	block := []byte("sixteen byte blk")
	var ecbCT []byte
	err = p.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_ECB, nil)}, aes)
	if err == nil {
		ecbCT, err = p.Encrypt(s, block)
	}
	facts["CKM_AES_ECB: encrypt 16 B"] = withLen(err, ecbCT)

	// Outage: the server dies under a logged-in session. The server has
	// forked one child for this process's connection; Kill ends both.
	pgid := k.proc.cmd.Process.Pid
	n, err := groupMembers(pgid)
	if err != nil {
		t.Fatal(err)
	}
	facts["outage: live processes in the server's group"] = strconv.Itoa(n)
	k.Kill()
	n, _ = groupMembers(pgid)
	facts["outage: Kill, live processes left in the group"] = strconv.Itoa(n)
	start := time.Now()
	err = within(t, 10*time.Second, func() error { _, err := p.GenerateRandom(s, 16); return err })
	facts["outage: Kill, next call on the session"] = ckr(err)
	facts["outage: Kill, call returned within 1 s"] = yesNo(time.Since(start) < time.Second)
	facts["outage: Kill, second call"] = ckr(within(t, 10*time.Second, func() error { _, err := p.GenerateRandom(s, 16); return err }))
	facts["outage: Kill, C_GetTokenInfo"] = ckr(within(t, 10*time.Second, func() error { _, err := p.GetTokenInfo(slot); return err }))
	facts["outage: Kill, C_OpenSession"] = ckr(within(t, 10*time.Second, func() error { _, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION); return err }))

	k.Restart()
	var results []string
	for i := 0; i < 3; i++ {
		results = append(results, ckr(within(t, 10*time.Second, func() error {
			_, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
			return err
		})))
		time.Sleep(100 * time.Millisecond)
	}
	facts["outage: Restart, C_OpenSession (x3)"] = sameOrList(results)
	facts["outage: Restart, C_Finalize"] = ckr(within(t, 10*time.Second, p.Finalize))
	facts["outage: Restart, C_Initialize"] = ckr(within(t, 10*time.Second, func() error { return p.Initialize() }))

	oldSlot := slot
	slot = findSlot(t, p, "p11kit")
	facts["outage: after reinit, same slot ID"] = yesNo(slot == oldSlot)
	s, err = p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	facts["outage: after reinit, C_OpenSession"] = ckr(err)
	if err != nil {
		checkFacts(t, facts, p11kitFacts)
		t.FailNow()
	}
	facts["outage: after reinit, C_Login"] = ckr(p.Login(s, pkcs11.CKU_USER, p11kitPIN))
	found, err = findObjects(p, s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "p11kit-aes"),
	})
	facts["outage: after reinit, find token AES key"] = foundCount(err, found)
	facts["outage: after reinit, decrypt old ECB block"] = "not reached"
	if err == nil && len(found) == 1 && ecbCT != nil {
		var back []byte
		err = p.DecryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_ECB, nil)}, found[0])
		if err == nil {
			back, err = p.Decrypt(s, ecbCT)
		}
		facts["outage: after reinit, decrypt old ECB block"] = roundTrip(err, back, block)
	}

	// Hang: the server is frozen; a call blocks until it is thawed.
	done := make(chan error, 1)
	k.Stop()
	go func() { _, err := p.GenerateRandom(s, 16); done <- err }()
	select {
	case err := <-done:
		facts["hang: Stop, call blocked for 2 s"] = "no: " + ckr(err)
	case <-time.After(2 * time.Second):
		facts["hang: Stop, call blocked for 2 s"] = "yes"
	}
	k.Cont()
	if facts["hang: Stop, call blocked for 2 s"] == "yes" {
		select {
		case err := <-done:
			facts["hang: Cont, call completes"] = ckr(err)
		case <-time.After(10 * time.Second):
			facts["hang: Cont, call completes"] = "still blocked 10 s after SIGCONT"
		}
	} else {
		facts["hang: Cont, call completes"] = "not reached"
	}

	softhsmControl(t, provider, conf, facts)
	checkFacts(t, facts, p11kitFacts)
}

// oaepFacts records RSA-OAEP encryption and decryption with SHA-256 and
// with SHA-1 parameters (label absent).
func oaepFacts(p *pkcs11.Ctx, s pkcs11.SessionHandle, pub, priv pkcs11.ObjectHandle, prefix string, facts map[string]string) {
	for _, h := range []struct {
		name      string
		hash, mgf uint
	}{
		{"SHA-256", pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256},
		{"SHA-1", pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1},
	} {
		oaep := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP,
			pkcs11.NewOAEPParams(h.hash, h.mgf, pkcs11.CKZ_DATA_SPECIFIED, nil))}
		pt := []byte("a data key")
		var ct, back []byte
		err := p.EncryptInit(s, oaep, pub)
		if err == nil {
			ct, err = p.Encrypt(s, pt)
		}
		facts[prefix+" OAEP "+h.name+": encrypt"] = withLen(err, ct)
		if err != nil {
			facts[prefix+" OAEP "+h.name+": decrypt"] = "not reached"
			continue
		}
		err = p.DecryptInit(s, oaep, priv)
		if err == nil {
			back, err = p.Decrypt(s, ct)
		}
		facts[prefix+" OAEP "+h.name+": decrypt"] = roundTrip(err, back, pt)
	}
}

// softhsmControl records what SoftHSM2 itself does, loaded in-process
// without p11-kit, with the calls p11-kit refuses: which refusals are
// p11-kit's and which the provider's.
func softhsmControl(t *testing.T, provider, conf string, facts map[string]string) {
	const label = "direct"
	if err := softhsm.InitToken(conf, label, p11kitPIN); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", conf)
	p := pkcs11.New(provider)
	if p == nil {
		t.Fatalf("loading %s failed", provider)
	}
	if err := p.Initialize(); err != nil {
		t.Fatalf("SoftHSM2 C_Initialize: %v", err)
	}
	defer func() {
		_ = p.Finalize()
		p.Destroy()
	}()
	s, err := p.OpenSession(findSlot(t, p, label), pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatalf("SoftHSM2 C_OpenSession: %v", err)
	}
	if err := p.Login(s, pkcs11.CKU_USER, p11kitPIN); err != nil {
		t.Fatalf("SoftHSM2 C_Login: %v", err)
	}
	const prefix = "control, SoftHSM2 direct:"
	aes, err := p.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
	})
	if err != nil {
		t.Fatalf("SoftHSM2 C_GenerateKey: %v", err)
	}
	gcm := pkcs11.NewGCMParams(make([]byte, 12), []byte("aad"), 128)
	var ct []byte
	err = p.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, gcm)}, aes)
	if err == nil {
		ct, err = p.Encrypt(s, []byte("plaintext"))
	}
	gcm.Free()
	facts[prefix+" CKM_AES_GCM encrypt 9 B"] = withLen(err, ct)
	err = p.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, make([]byte, 16))}, aes)
	if err == nil {
		ct, err = p.Encrypt(s, bytes.Repeat([]byte("y"), 33))
	}
	facts[prefix+" CKM_AES_CBC_PAD encrypt 33 B"] = withLen(err, ct)
	target, err := p.CreateObject(s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, make([]byte, 40)),
	})
	if err != nil {
		t.Fatalf("SoftHSM2 C_CreateObject: %v", err)
	}
	wrapped, err := p.WrapKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP_PAD, nil)}, aes, target)
	facts[prefix+" C_WrapKey CKM_AES_KEY_WRAP_PAD"] = withLen(err, wrapped)
	pub, priv, err := p.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)},
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, 2048),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		},
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		})
	if err != nil {
		t.Fatalf("SoftHSM2 C_GenerateKeyPair: %v", err)
	}
	oaepFacts(p, s, pub, priv, prefix+" RSA", facts)
}

// findSlot returns the slot whose token has the label.
func findSlot(t *testing.T, p *pkcs11.Ctx, label string) uint {
	t.Helper()
	slots, err := p.GetSlotList(true)
	if err != nil {
		t.Fatalf("C_GetSlotList: %v", err)
	}
	for _, sl := range slots {
		if ti, err := p.GetTokenInfo(sl); err == nil && ti.Label == label {
			return sl
		}
	}
	t.Fatalf("no token labelled %q among slots %v", label, slots)
	return 0
}

// findObjects returns the handles of the objects matching the template.
func findObjects(p *pkcs11.Ctx, s pkcs11.SessionHandle, template []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := p.FindObjectsInit(s, template); err != nil {
		return nil, err
	}
	hs, _, err := p.FindObjects(s, 100)
	if ferr := p.FindObjectsFinal(s); err == nil {
		err = ferr
	}
	return hs, err
}

func foundCount(err error, hs []pkcs11.ObjectHandle) string {
	if err != nil {
		return ckr(err)
	}
	return "CKR_OK, " + strconv.Itoa(len(hs)) + " found"
}

// within runs f in a goroutine and waits for it at most d, failing the test
// if it takes longer (the goroutine is left behind; the test's cleanup
// kills the server, which ends the call).
func within(t *testing.T, d time.Duration, f func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		t.Fatalf("PKCS#11 call still blocked after %v", d)
		return nil
	}
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// sameOrList renders repeated results: "X (all)" or the list.
func sameOrList(rs []string) string {
	for _, r := range rs[1:] {
		if r != rs[0] {
			var b bytes.Buffer
			for i, r := range rs {
				if i > 0 {
					b.WriteString(", ")
				}
				b.WriteString(r)
			}
			return b.String()
		}
	}
	return rs[0] + " (all)"
}
