package p11env

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
)

// ckr names the PKCS#11 return value of err: "CKR_OK" for nil.
func ckr(err error) string {
	if err == nil {
		return "CKR_OK"
	}
	var e pkcs11.Error
	if errors.As(err, &e) {
		// e.Error() is "pkcs11: 0x30: CKR_DEVICE_ERROR".
		msg := e.Error()
		return msg[strings.LastIndex(msg, " ")+1:]
	}
	return "go error: " + err.Error()
}

// mechFlagNames lists the mechanism flags the facts tables record.
var mechFlagNames = []struct {
	flag uint
	name string
}{
	{pkcs11.CKF_ENCRYPT, "encrypt"},
	{pkcs11.CKF_DECRYPT, "decrypt"},
	{pkcs11.CKF_WRAP, "wrap"},
	{pkcs11.CKF_UNWRAP, "unwrap"},
	{pkcs11.CKF_SIGN, "sign"},
	{pkcs11.CKF_VERIFY, "verify"},
	{pkcs11.CKF_GENERATE, "generate"},
	{pkcs11.CKF_GENERATE_KEY_PAIR, "generate_key_pair"},
}

// CKM_AES_KEY_WRAP_KWP is 0x210B, CKM_AES_KEY_WRAP_KWP in PKCS#11 3.0
// (miekg/pkcs11 v1.1.2 has no name for it).
const ckmAESKeyWrapKWP = 0x210B

// factMechanisms are the mechanisms whose support the facts tables record.
var factMechanisms = []struct {
	mech uint
	name string
}{
	{pkcs11.CKM_AES_GCM, "CKM_AES_GCM"},
	{pkcs11.CKM_AES_CBC_PAD, "CKM_AES_CBC_PAD"},
	{pkcs11.CKM_AES_KEY_WRAP, "CKM_AES_KEY_WRAP"},
	{pkcs11.CKM_AES_KEY_WRAP_PAD, "CKM_AES_KEY_WRAP_PAD"},
	{ckmAESKeyWrapKWP, "CKM_AES_KEY_WRAP_KWP(0x210B)"},
	{pkcs11.CKM_SHA256_HMAC, "CKM_SHA256_HMAC"},
	{pkcs11.CKM_RSA_PKCS_OAEP, "CKM_RSA_PKCS_OAEP"},
	{pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, "CKM_RSA_PKCS_KEY_PAIR_GEN"},
	{pkcs11.CKM_AES_KEY_GEN, "CKM_AES_KEY_GEN"},
	{pkcs11.CKM_GENERIC_SECRET_KEY_GEN, "CKM_GENERIC_SECRET_KEY_GEN"},
}

// mechanismFacts records, for each of factMechanisms, "absent" or the
// flags C_GetMechanismList and C_GetMechanismInfo give it.
func mechanismFacts(t *testing.T, p *pkcs11.Ctx, slot uint, facts map[string]string) {
	t.Helper()
	list, err := p.GetMechanismList(slot)
	if err != nil {
		t.Fatalf("C_GetMechanismList: %v", err)
	}
	have := map[uint]bool{}
	for _, m := range list {
		have[m.Mechanism] = true
	}
	for _, fm := range factMechanisms {
		key := "mechanism " + fm.name
		if !have[fm.mech] {
			facts[key] = "absent"
			continue
		}
		info, err := p.GetMechanismInfo(slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(fm.mech, nil)})
		if err != nil {
			facts[key] = "listed; C_GetMechanismInfo: " + ckr(err)
			continue
		}
		var names []string
		for _, f := range mechFlagNames {
			if info.Flags&f.flag != 0 {
				names = append(names, f.name)
			}
		}
		facts[key] = strings.Join(names, "|")
	}
}

// checkFacts compares the facts found with the facts expected, failing the
// test with the whole table when they differ.
func checkFacts(t *testing.T, got, want map[string]string) {
	t.Helper()
	keys := map[string]bool{}
	for k := range got {
		keys[k] = true
	}
	for k := range want {
		keys[k] = true
	}
	var sorted []string
	for k := range keys {
		sorted = append(sorted, k)
	}
	sort.Strings(sorted)
	var table, diff strings.Builder
	for _, k := range sorted {
		fmt.Fprintf(&table, "\t%-50s = %s\n", k, got[k])
		if got[k] != want[k] {
			fmt.Fprintf(&diff, "\t%-50s got %q, want %q\n", k, got[k], want[k])
		}
	}
	t.Logf("facts:\n%s", table.String())
	if diff.Len() > 0 {
		t.Errorf("facts changed:\n%s", diff.String())
	}
}

// firstErr returns the first non-nil error.
func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
