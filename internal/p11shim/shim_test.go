package p11shim_test

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/p11shim"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

const (
	pin      = "1234"
	label    = "shim"
	keyLabel = "shim-key"
)

func TestMain(m *testing.M) {
	code := m.Run()
	p11shim.RemoveBuild()
	os.Exit(code)
}

// env is one test's SoftHSM2 token behind the shim, with a logged-in
// session and an AES-256 token key.
type env struct {
	shim *p11shim.Shim
	p    *pkcs11.Ctx
	slot uint
	s    pkcs11.SessionHandle
	key  pkcs11.ObjectHandle
}

// watchdog turns a hung test into a crash with goroutine stacks.
func watchdog(t *testing.T) {
	timer := time.AfterFunc(60*time.Second, func() { panic("p11shim test " + t.Name() + " hung") })
	t.Cleanup(func() { timer.Stop() })
}

func setup(t *testing.T) *env {
	watchdog(t)
	lib, err := softhsm.FindLibrary()
	if err != nil {
		t.Skip(err)
	}
	shim := p11shim.New(t, lib)
	if _, err := softhsm.Setup(t.TempDir(), pin, label); err != nil {
		t.Fatal(err)
	}
	p := pkcs11.New(shim.Library)
	if p == nil {
		t.Fatalf("cannot load %s", shim.Library)
	}
	if err := p.Initialize(); err != nil {
		p.Destroy()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		shim.Set() // never finalise through a hang
		p.Finalize()
		p.Destroy()
	})
	e := &env{shim: shim, p: p}
	slots, err := p.GetSlotList(true)
	if err != nil || len(slots) == 0 {
		t.Fatalf("GetSlotList: %v %v", slots, err)
	}
	e.slot = slots[0]
	e.s = e.login(t)
	e.key, err = p.GenerateKey(e.s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, keyLabel),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
	})
	if err != nil {
		t.Fatalf("GenerateKey: %v", err)
	}
	return e
}

func (e *env) login(t *testing.T) pkcs11.SessionHandle {
	t.Helper()
	s, err := e.p.OpenSession(e.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatalf("OpenSession: %v", err)
	}
	if err := e.p.Login(s, pkcs11.CKU_USER, pin); err != nil && !isRV(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		t.Fatalf("Login: %v", err)
	}
	return s
}

func isRV(err error, rv uint) bool {
	var e pkcs11.Error
	return errors.As(err, &e) && uint(e) == rv
}

func wantRV(t *testing.T, what string, err error, rv uint) {
	t.Helper()
	if !isRV(err, rv) {
		t.Fatalf("%s: got %v, want %v", what, err, pkcs11.Error(rv))
	}
}

func randomBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// encrypt runs AES-GCM with the caller's iv and returns the ciphertext and
// the IV read back from the parameters after C_Encrypt.
func (e *env) encrypt(iv, pt []byte) (ct, usedIV []byte, err error) {
	params := pkcs11.NewGCMParams(iv, nil, 128)
	defer params.Free()
	if err := e.p.EncryptInit(e.s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, e.key); err != nil {
		return nil, nil, err
	}
	if ct, err = e.p.Encrypt(e.s, pt); err != nil {
		return nil, nil, err
	}
	return ct, params.IV(), nil
}

func (e *env) decrypt(iv, ct []byte) ([]byte, error) {
	params := pkcs11.NewGCMParams(iv, nil, 128)
	defer params.Free()
	if err := e.p.DecryptInit(e.s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, e.key); err != nil {
		return nil, err
	}
	return e.p.Decrypt(e.s, ct)
}

func TestNoFaults(t *testing.T) {
	e := setup(t)
	e.shim.Set("unknown-word")
	pt := []byte("through the shim")
	iv := randomBytes(t, 12)
	ct, used, err := e.encrypt(iv, pt)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(used, iv) {
		t.Fatalf("IV changed without fips-iv: %x -> %x", iv, used)
	}
	got, err := e.decrypt(iv, ct)
	if err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("decrypt: %q %v", got, err)
	}
}

func TestFIPSIV(t *testing.T) {
	e := setup(t)
	e.shim.Set(p11shim.FIPSIV)
	pt := []byte("the HSM chose the IV")
	iv := randomBytes(t, 12)
	orig := bytes.Clone(iv)
	ct, used, err := e.encrypt(iv, pt)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(iv, orig) {
		t.Fatal("the caller's Go slice was changed")
	}
	if len(used) != 12 || bytes.Equal(used, iv) {
		t.Fatalf("GCMParams.IV() = %x, want 12 bytes other than the caller's %x", used, iv)
	}
	if got, err := e.decrypt(iv, ct); err == nil {
		t.Fatalf("decrypt with the caller's IV succeeded: %q", got)
	}
	got, err := e.decrypt(used, ct)
	if err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("decrypt with the HSM's IV: %q %v", got, err)
	}

	// Wrong IV length: refused.
	_, _, err = e.encrypt(randomBytes(t, 16), pt)
	wantRV(t, "EncryptInit with a 16-byte IV", err, pkcs11.CKR_MECHANISM_PARAM_INVALID)
}

func TestFIPSIVStrict(t *testing.T) {
	e := setup(t)
	e.shim.Set(p11shim.FIPSIVStrict)
	pt := []byte("zeroed IV buffer")
	_, _, err := e.encrypt(randomBytes(t, 12), pt)
	wantRV(t, "EncryptInit with a caller IV", err, pkcs11.CKR_MECHANISM_PARAM_INVALID)

	zero := make([]byte, 12)
	ct, used, err := e.encrypt(zero, pt)
	if err != nil {
		t.Fatalf("EncryptInit with a zero IV: %v", err)
	}
	if len(used) != 12 || bytes.Equal(used, zero) {
		t.Fatalf("GCMParams.IV() = %x, want 12 non-zero bytes", used)
	}
	got, err := e.decrypt(used, ct)
	if err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("decrypt: %q %v", got, err)
	}
}

func hasMechanism(list []*pkcs11.Mechanism, m uint) bool {
	for _, x := range list {
		if x.Mechanism == m {
			return true
		}
	}
	return false
}

func TestNoGCM(t *testing.T) {
	e := setup(t)
	list, err := e.p.GetMechanismList(e.slot)
	if err != nil || !hasMechanism(list, pkcs11.CKM_AES_GCM) {
		t.Fatalf("the target lists no AES-GCM: %v", err)
	}

	e.shim.Set(p11shim.NoGCM)
	list, err = e.p.GetMechanismList(e.slot)
	if err != nil {
		t.Fatal(err)
	}
	if hasMechanism(list, 0x1087) {
		t.Fatal("CKM_AES_GCM listed under no-gcm")
	}
	if !hasMechanism(list, pkcs11.CKM_AES_CBC_PAD) {
		t.Fatal("CKM_AES_CBC_PAD missing under no-gcm")
	}
	_, err = e.p.GetMechanismInfo(e.slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, nil)})
	wantRV(t, "GetMechanismInfo(CKM_AES_GCM)", err, pkcs11.CKR_MECHANISM_INVALID)
	if _, err := e.p.GetMechanismInfo(e.slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, nil)}); err != nil {
		t.Fatalf("GetMechanismInfo(CKM_AES_CBC_PAD): %v", err)
	}
	_, _, err = e.encrypt(randomBytes(t, 12), []byte("x"))
	wantRV(t, "EncryptInit(CKM_AES_GCM)", err, pkcs11.CKR_MECHANISM_INVALID)
	_, err = e.decrypt(randomBytes(t, 12), make([]byte, 32))
	wantRV(t, "DecryptInit(CKM_AES_GCM)", err, pkcs11.CKR_MECHANISM_INVALID)

	e.shim.Set()
	if _, _, err := e.encrypt(randomBytes(t, 12), []byte("x")); err != nil {
		t.Fatalf("AES-GCM after clearing no-gcm: %v", err)
	}
}

func TestHang(t *testing.T) {
	e := setup(t)
	e.shim.Set(p11shim.Hang)
	done := make(chan error, 1)
	go func() {
		_, err := e.p.GenerateRandom(e.s, 16)
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("call returned during hang: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	e.shim.Set()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("call after hang: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("call still blocked 5s after hang was cleared")
	}
}

func TestDeviceError(t *testing.T) {
	e := setup(t)
	old := e.s

	e.shim.Set(p11shim.DeviceError)
	_, err := e.p.GenerateRandom(old, 16)
	wantRV(t, "GenerateRandom during the outage", err, pkcs11.CKR_DEVICE_ERROR)
	_, err = e.p.GetSlotList(true)
	wantRV(t, "GetSlotList during the outage", err, pkcs11.CKR_DEVICE_ERROR)
	_, err = e.p.OpenSession(e.slot, pkcs11.CKF_SERIAL_SESSION)
	wantRV(t, "OpenSession during the outage", err, pkcs11.CKR_DEVICE_ERROR)
	if _, err := e.p.GetInfo(); err != nil {
		t.Fatalf("GetInfo during the outage: %v", err)
	}

	e.shim.Set()
	_, err = e.p.GenerateRandom(old, 16)
	wantRV(t, "GenerateRandom on the old session", err, pkcs11.CKR_SESSION_HANDLE_INVALID)
	_, err = e.p.OpenSession(e.slot, pkcs11.CKF_SERIAL_SESSION)
	wantRV(t, "OpenSession after the outage", err, pkcs11.CKR_DEVICE_ERROR)
	if _, err := e.p.GetSlotList(true); err != nil {
		t.Fatalf("GetSlotList after the outage: %v", err)
	}
	// Initialize without Finalize does not recover.
	wantRV(t, "Initialize without Finalize", e.p.Initialize(), pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)
	_, err = e.p.OpenSession(e.slot, pkcs11.CKF_SERIAL_SESSION)
	wantRV(t, "OpenSession after a bare Initialize", err, pkcs11.CKR_DEVICE_ERROR)

	if err := e.p.Finalize(); err != nil {
		t.Fatalf("Finalize: %v", err)
	}
	if err := e.p.Initialize(); err != nil {
		t.Fatalf("Initialize: %v", err)
	}
	e.s = e.login(t)
	if err := e.p.FindObjectsInit(e.s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, keyLabel)}); err != nil {
		t.Fatal(err)
	}
	found, _, err := e.p.FindObjects(e.s, 2)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.p.FindObjectsFinal(e.s); err != nil {
		t.Fatal(err)
	}
	if len(found) != 1 {
		t.Fatalf("found %d keys labelled %s, want 1", len(found), keyLabel)
	}
	e.key = found[0]
	pt := []byte("after recovery")
	iv := randomBytes(t, 12)
	ct, _, err := e.encrypt(iv, pt)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := e.decrypt(iv, ct); err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("decrypt after recovery: %q %v", got, err)
	}
}
