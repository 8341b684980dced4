package hsm

import (
	"testing"

	"github.com/miekg/pkcs11"
	"github.com/stretchr/testify/require"
)

// A KEK imported with a value the importer knows (C_CreateObject with
// CKA_VALUE), then sensitive and not extractable: its importer (whoever once
// held the PIN) opens the sealed keyring offline. CheckKEK refuses it.
func TestCheckKEKRefusesAKeyOfKnownValue(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	label := uniqueLabel("known-kek")
	known := make([]byte, 32)
	for i := range known {
		known[i] = byte(i)
	}
	require.NoError(t, tok.do("import", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		_, err := ctx.CreateObject(s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, known),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		})
		return err
	}))
	err := tok.CheckKEK(label)
	require.Equal(t, Configuration, KindOf(err), "a KEK whose value its importer knows is adopted: %v", err)
	require.ErrorContains(t, err, "CKA_ALWAYS_SENSITIVE=false")
}
