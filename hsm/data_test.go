package hsm

import (
	"fmt"
	"sync"
	"testing"

	"github.com/miekg/pkcs11"
	"github.com/stretchr/testify/require"
)

// countData counts the token's data objects labelled label, as the token
// sees them (private ones included: tok is logged in).
func countData(t *testing.T, tok *Token, label string) int {
	t.Helper()
	var n int
	require.NoError(t, tok.do("count data", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		hs, err := findObjects(ctx, s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		})
		n = len(hs)
		return err
	}))
	return n
}

func requireData(t *testing.T, tok *Token, label string, want []byte) {
	t.Helper()
	got, found, err := tok.ReadData(label)
	require.NoError(t, err)
	require.True(t, found, "data object %q", label)
	require.Equal(t, want, got)
}

func TestDataRoundTripOverwriteDestroy(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	label := uniqueLabel("counter")

	got, found, err := tok.ReadData(label)
	require.NoError(t, err)
	require.False(t, found)
	require.Nil(t, got)

	require.NoError(t, tok.WriteData(label, []byte{0, 0, 0, 1}))
	requireData(t, tok, label, []byte{0, 0, 0, 1})

	// Overwrite, with values longer and shorter than before: one object.
	require.NoError(t, tok.WriteData(label, []byte("a longer value than the first one")))
	requireData(t, tok, label, []byte("a longer value than the first one"))
	require.NoError(t, tok.WriteData(label, []byte{7}))
	requireData(t, tok, label, []byte{7})
	require.Equal(t, 1, countData(t, tok, label), "overwriting does not make a second object")
	require.Equal(t, 0, countData(t, tok, label+stagingSuffix))

	// The object is what the API promises.
	require.NoError(t, tok.do("attributes", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		hs, err := findData(ctx, s, label)
		require.NoError(t, err)
		require.Len(t, hs, 1)
		attrs, err := ctx.GetAttributeValue(s, hs[0], []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, nil),
		})
		require.NoError(t, err)
		require.True(t, attrBool(attrs[0]))
		require.True(t, attrBool(attrs[1]))
		require.Equal(t, "hsm-transit", string(attrs[2].Value))
		return nil
	}))

	// Another handle on the token sees the same value.
	requireData(t, openToken(t, "token-a", testPIN), label, []byte{7})

	require.NoError(t, tok.DestroyData(label))
	_, found, err = tok.ReadData(label)
	require.NoError(t, err)
	require.False(t, found)
	require.NoError(t, tok.DestroyData(label), "absent is not an error")
	require.Equal(t, 0, countData(t, tok, label))

	// Written again after being destroyed.
	require.NoError(t, tok.WriteData(label, []byte("again")))
	requireData(t, tok, label, []byte("again"))
	require.NoError(t, tok.DestroyData(label))
}

func TestDataLabelsChecked(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	for _, label := range []string{"", "bad\x00label", "tab\there", string(make([]byte, 200))} {
		require.Equal(t, Configuration, KindOf(tok.WriteData(label, []byte{1})), "%q", label)
		_, _, err := tok.ReadData(label)
		require.Equal(t, Configuration, KindOf(err), "%q", label)
		require.Equal(t, Configuration, KindOf(tok.DestroyData(label)), "%q", label)
	}
}

func TestDataPersistsAcrossOpen(t *testing.T) {
	label := newTestToken(t)
	name := uniqueLabel("counter")

	tok, err := Open(Config{Library: softhsmLib, TokenLabel: label, PIN: testPIN})
	require.NoError(t, err)
	require.NoError(t, tok.WriteData(name, []byte("42")))
	conn := tok.conn
	tok.Close()

	again := openToken(t, label, testPIN)
	require.NotSame(t, conn, again.conn, "a new connection, with a new login")
	requireData(t, again, name, []byte("42"))
	require.NoError(t, again.WriteData(name, []byte("43")))
	requireData(t, again, name, []byte("43"))
	require.Equal(t, 1, countData(t, again, name))
}

func TestDataNeedsThePIN(t *testing.T) {
	label := newTestToken(t)
	name := uniqueLabel("counter")
	good := openToken(t, label, testPIN)
	require.NoError(t, good.WriteData(name, []byte("secret counter")))

	// While the right PIN's login is in place, and after it ended.
	for _, closeGood := range []bool{false, true} {
		if closeGood {
			good.Close()
		}
		bad := openToken(t, label, fmt.Sprintf("%04d", 9999-btoi(closeGood)))
		// Refused by this package while the right PIN is logged in, by
		// the token once that login ended.
		why := "logged in by this process with another PIN"
		if closeGood {
			why = "PIN refused by token"
		}
		got, found, err := bad.ReadData(name)
		require.Equal(t, Credentials, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), why)
		require.False(t, IsLoginLimited(err), "%v", err)
		require.False(t, found)
		require.Nil(t, got)
		err = bad.WriteData(name, []byte("rolled back"))
		require.Equal(t, Credentials, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), why)
		err = bad.DestroyData(name)
		require.Equal(t, Credentials, KindOf(err), "%v", err)
		require.Contains(t, err.Error(), why)
		bad.Close()
	}

	requireData(t, openToken(t, label, testPIN), name, []byte("secret counter"))
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func TestDataAndKeysAreApart(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	prefix := uniqueLabel("apart") + "-"
	dataOnly, both := prefix+"data", prefix+"both"

	require.NoError(t, tok.WriteData(dataOnly, []byte{1}))
	has, err := tok.HasKey(dataOnly)
	require.NoError(t, err)
	require.False(t, has, "a data object is not a key")
	labels, err := tok.KeyLabels(prefix)
	require.NoError(t, err)
	require.Empty(t, labels)
	_, err = tok.EncryptGCM(dataOnly, []byte("x"), nil)
	require.Equal(t, NotFound, KindOf(err), "%v", err)

	// A key and a data object of one label.
	require.NoError(t, tok.GenerateKey(both))
	_, found, err := tok.ReadData(both)
	require.NoError(t, err)
	require.False(t, found, "a key is not a data object")
	require.NoError(t, tok.DestroyData(both), "no data object: nothing to do")
	require.NoError(t, tok.WriteData(both, []byte{2}))
	requireData(t, tok, both, []byte{2})
	require.NoError(t, tok.WriteData(both, []byte{3}))
	requireData(t, tok, both, []byte{3})
	has, err = tok.HasKey(both)
	require.NoError(t, err)
	require.True(t, has)
	labels, err = tok.KeyLabels(prefix)
	require.NoError(t, err)
	require.Equal(t, []string{both}, labels)
	sealed, err := tok.EncryptGCM(both, []byte("still a key"), nil)
	require.NoError(t, err)

	require.NoError(t, tok.DestroyData(both))
	has, err = tok.HasKey(both)
	require.NoError(t, err)
	require.True(t, has, "destroying the data object leaves the key")
	opened, err := tok.DecryptGCM(both, sealed, nil)
	require.NoError(t, err)
	require.Equal(t, []byte("still a key"), opened)
	require.NoError(t, tok.DestroyKey(both))
	requireData(t, tok, dataOnly, []byte{1})
	require.NoError(t, tok.DestroyData(dataOnly))
}

// TestDataDuplicatesAndPublicObjects: two private objects of one label are
// a Configuration error; a public one (which needs no PIN to make) is
// ignored, so that it can neither roll the value back nor block it.
func TestDataDuplicatesAndPublicObjects(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	label := uniqueLabel("dup")
	create := func(private bool, value string) {
		require.NoError(t, tok.do("create", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
			_, err := ctx.CreateObject(s, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, private),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
				pkcs11.NewAttribute(pkcs11.CKA_VALUE, []byte(value)),
			})
			return err
		}))
	}

	create(false, "public")
	_, found, err := tok.ReadData(label)
	require.NoError(t, err)
	require.False(t, found, "a public object is not read")
	require.NoError(t, tok.WriteData(label, []byte("private")))
	requireData(t, tok, label, []byte("private"))

	create(true, "second")
	_, _, err = tok.ReadData(label)
	require.Equal(t, Configuration, KindOf(err), "%v", err)
	require.Contains(t, err.Error(), "2 data objects")
	require.Equal(t, Configuration, KindOf(tok.WriteData(label, []byte("x"))))

	require.NoError(t, tok.DestroyData(label))
	_, found, err = tok.ReadData(label)
	require.NoError(t, err)
	require.False(t, found)
	require.Equal(t, 1, countData(t, tok, label), "the public object is left alone")
	require.NoError(t, tok.do("cleanup", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		hs, err := findObjects(ctx, s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		})
		for _, h := range hs {
			if err == nil {
				err = ctx.DestroyObject(s, h)
			}
		}
		return err
	}))
}

// TestDataConcurrentWriters: writers of one label in the process make one
// object between them.
func TestDataConcurrentWriters(t *testing.T) {
	a := openToken(t, "token-a", testPIN)
	b := openToken(t, "token-a", testPIN)
	label := uniqueLabel("race")
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := 0; i < 20; i++ {
		for _, tok := range []*Token{a, b} {
			wg.Add(1)
			go func(tok *Token, i int) {
				defer wg.Done()
				if err := tok.WriteData(label, []byte{byte(i)}); err != nil {
					errs <- err
					return
				}
				if _, found, err := tok.ReadData(label); err != nil || !found {
					errs <- fmt.Errorf("read: found %t, %v", found, err)
				}
			}(tok, i)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	require.Equal(t, 1, countData(t, a, label))
	require.NoError(t, a.DestroyData(label))
}

func TestDataEmptyValue(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	label := uniqueLabel("empty")
	require.NoError(t, tok.WriteData(label, nil))
	got, found, err := tok.ReadData(label)
	require.NoError(t, err)
	require.True(t, found)
	require.Empty(t, got)
	require.NoError(t, tok.WriteData(label, []byte("now set")))
	requireData(t, tok, label, []byte("now set"))
	require.NoError(t, tok.DestroyData(label))
}

// TestDataInterruptedReplacement plays the states an interrupted
// replacement leaves (SoftHSM2 refuses to change CKA_VALUE of a data
// object, so WriteData replaces it through a staging object).
func TestDataInterruptedReplacement(t *testing.T) {
	tok := openToken(t, "token-a", testPIN)
	label := uniqueLabel("staged")
	staging := label + stagingSuffix
	require.Error(t, CheckKeyLabel(staging), "no caller's label is a staging label")
	stage := func(value string) {
		require.NoError(t, tok.do("stage", false, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
			_, err := createData(ctx, s, staging, []byte(value))
			return err
		}))
	}

	// Interrupted after the staging object was made: the old value holds.
	require.NoError(t, tok.WriteData(label, []byte("old")))
	stage("new")
	requireData(t, tok, label, []byte("old"))
	require.NoError(t, tok.WriteData(label, []byte("newer")))
	requireData(t, tok, label, []byte("newer"))
	require.Equal(t, 0, countData(t, tok, staging), "the stale staging object is gone")

	// Interrupted after the old object was destroyed: the staging value
	// is read, and the next write completes the replacement.
	require.NoError(t, tok.DestroyData(label))
	stage("staged")
	requireData(t, tok, label, []byte("staged"))
	require.NoError(t, tok.WriteData(label, []byte("final")))
	requireData(t, tok, label, []byte("final"))
	require.Equal(t, 1, countData(t, tok, label))
	require.Equal(t, 0, countData(t, tok, staging))

	// Destroy removes staging objects too, so nothing comes back.
	stage("leftover")
	require.NoError(t, tok.DestroyData(label))
	_, found, err := tok.ReadData(label)
	require.NoError(t, err)
	require.False(t, found)
	require.Equal(t, 0, countData(t, tok, staging))
}
