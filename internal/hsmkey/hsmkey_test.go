package hsmkey

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// The store alone, on a real SoftHSM2 token: what the backend's tests
// check through requests, checked here without a backend.

const (
	testPIN   = "1234"
	testLabel = "hsmkey-test"
)

var testLib string

func TestMain(m *testing.M) {
	lib, err := softhsm.FindLibrary()
	if err != nil {
		fmt.Fprintln(os.Stderr, "these tests need a real token:", err)
		os.Exit(1)
	}
	testLib = lib
	dir, err := os.MkdirTemp("", "hsmkey-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if _, err := softhsm.Setup(dir, testPIN, testLabel); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// tokens is a Tokens whose token and mechanisms a test sets.
type tokens struct {
	tok atomic.Pointer[hsm.Token]
	sup atomic.Pointer[hsm.MechanismSupport]
}

func (t *tokens) CurrentToken() *hsm.Token               { return t.tok.Load() }
func (t *tokens) TokenMechanisms() *hsm.MechanismSupport { return t.sup.Load() }

func openToken(t *testing.T) *tokens {
	t.Helper()
	tok, err := hsm.Open(hsm.Config{Library: testLib, TokenLabel: testLabel, PIN: testPIN})
	require.NoError(t, err)
	t.Cleanup(tok.Close)
	ts := &tokens{}
	ts.tok.Store(tok)
	return ts
}

// mountID gives each test its own objects in the shared token.
func mountID(t *testing.T) string { return strings.ReplaceAll(t.Name(), "/", "-") }

func requireCaller(t *testing.T, err error, msg string) {
	t.Helper()
	var ue errutil.UserError
	require.ErrorAsf(t, err, &ue, "want the caller's error %q", msg)
	require.Contains(t, ue.Err, msg)
}

func requireUnavailable(t *testing.T, err error) {
	t.Helper()
	var coded logical.HTTPCodedError
	require.ErrorAs(t, err, &coded)
	require.Equal(t, http.StatusServiceUnavailable, coded.Code())
}

func TestVersionsLiveInTheToken(t *testing.T) {
	ctx, storage, ts := context.Background(), &logical.InmemStorage{}, openToken(t)
	s := NewStore(ts, mountID(t))
	tok := ts.CurrentToken()

	k, err := s.Create(ctx, storage, "orders", 0)
	require.NoError(t, err)
	require.Equal(t, 1, k.LatestVersion)
	has, err := tok.HasKey(s.Label("orders", 1))
	require.NoError(t, err)
	require.True(t, has, "version 1 is an object in the token")

	a1, err := s.AEAD(k, 1)
	require.NoError(t, err)
	ct1, err := a1.Encrypt([]byte("secret"), []byte("aad"))
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(string(ct1), string(Marker)))
	pt, err := a1.Decrypt(ct1, []byte("aad"))
	require.NoError(t, err)
	require.Equal(t, "secret", string(pt))
	_, err = a1.Decrypt(ct1, []byte("other"))
	requireCaller(t, err, "message authentication failed")
	empty, err := a1.Encrypt(nil, nil)
	require.NoError(t, err)
	require.Len(t, empty, len(Marker)+MinCiphertext)
	pt, err = a1.Decrypt(empty, nil)
	require.NoError(t, err, "nothing encrypted decrypts: a marked ciphertext of exactly a nonce and a tag")
	require.Empty(t, pt)
	long := []byte(strings.Repeat("a", 300))
	ctLong, err := a1.Encrypt([]byte("x"), long)
	require.NoError(t, err)
	_, err = a1.Decrypt(ctLong, long)
	require.NoError(t, err, "associated data longer than the AAD's first allocation")

	r1, err := s.Random(32)
	require.NoError(t, err)
	r2, err := s.Random(32)
	require.NoError(t, err)
	require.Len(t, r1, 32)
	require.NotEqual(t, r1, r2)

	// Storage holds metadata only: nothing of the plaintext or the
	// key's bytes, which never leave the token.
	e, err := storage.Get(ctx, StoragePrefix+"orders")
	require.NoError(t, err)
	require.NotNil(t, e)
	require.NotContains(t, string(e.Value), "secret")

	k.Lock()
	require.NoError(t, s.Rotate(ctx, storage, k))
	k.Unlock()
	a2, err := s.AEAD(k, 2)
	require.NoError(t, err)
	ct2, err := a2.Encrypt([]byte("secret"), nil)
	require.NoError(t, err)
	_, err = a1.Decrypt(ct2, nil)
	requireCaller(t, err, "message authentication failed") // a version's ciphertext is not another's
	pt, err = a1.Decrypt(ct1, []byte("aad"))
	require.NoError(t, err, "version 1 still decrypts after the rotation")
	require.Equal(t, "secret", string(pt))

	// Trimming destroys the object: metadata put back by a storage writer
	// does not bring the version back.
	before, err := storage.Get(ctx, StoragePrefix+"orders")
	require.NoError(t, err)
	k.Lock()
	require.NoError(t, s.DestroyBelow(ctx, storage, k, 2))
	k.Unlock()
	_, err = s.AEAD(k, 1)
	requireCaller(t, err, "no such key version")
	pt, err = a2.Decrypt(ct2, nil)
	require.NoError(t, err, "the version at the bound stays")
	require.Equal(t, "secret", string(pt))
	require.NoError(t, storage.Put(ctx, before))
	s.Invalidate("orders")
	old, err := s.Get(ctx, storage, "orders")
	require.NoError(t, err)
	require.Contains(t, old.Versions, 1, "the restored metadata names version 1")
	a1, err = s.AEAD(old, 1)
	require.NoError(t, err)
	_, err = a1.Decrypt(ct1, []byte("aad"))
	requireCaller(t, err, "no longer in the HSM")
}

func TestDeleteShredsEveryObject(t *testing.T) {
	ctx, storage, ts := context.Background(), &logical.InmemStorage{}, openToken(t)
	s := NewStore(ts, mountID(t))
	tok := ts.CurrentToken()
	k, err := s.Create(ctx, storage, "gone", 0)
	require.NoError(t, err)
	k.Lock()
	require.NoError(t, s.Rotate(ctx, storage, k))
	k.Unlock()
	// What an interrupted rotation leaves: an object no version records.
	require.NoError(t, tok.GenerateKey(s.Label("gone", 3)))
	a, err := s.AEAD(k, 2)
	require.NoError(t, err)
	ct, err := a.Encrypt([]byte("pt"), nil)
	require.NoError(t, err)
	saved, err := storage.Get(ctx, StoragePrefix+"gone")
	require.NoError(t, err)

	// A version whose object is gone already (an interrupted deletion)
	// does not stop the deletion, nor a trim.
	require.NoError(t, tok.DestroyKey(s.Label("gone", 1)))
	k.Lock()
	require.NoError(t, s.DestroyBelow(ctx, storage, k, 2))
	require.NotContains(t, k.Versions, 1)
	k.Versions[1] = Version{} // as if the trim had not been recorded
	require.NoError(t, s.Delete(ctx, storage, k))
	require.True(t, k.Deleted())
	k.Unlock()
	labels, err := tok.KeyLabels(s.LabelPrefix("gone"))
	require.NoError(t, err)
	require.Empty(t, labels, "every object of the key is destroyed, the stray one too")
	e, err := storage.Get(ctx, StoragePrefix+"gone")
	require.NoError(t, err)
	require.Nil(t, e)
	require.Nil(t, s.Cached("gone"))

	// A backup of storage from before the deletion decrypts nothing.
	require.NoError(t, storage.Put(ctx, saved))
	back, err := s.Get(ctx, storage, "gone")
	require.NoError(t, err)
	a, err = s.AEAD(back, 2)
	require.NoError(t, err)
	_, err = a.Decrypt(ct, nil)
	requireCaller(t, err, "no longer in the HSM")
}

// A neighbouring mount's store on the same token addresses its own
// objects only: another mount's ciphertext does not open under its key of
// the same name and version.
func TestAnotherMountsKeyOfTheSameName(t *testing.T) {
	ctx, ts := context.Background(), openToken(t)
	mine := NewStore(ts, mountID(t)+"-a")
	theirs := NewStore(ts, mountID(t)+"-b")
	km, err := mine.Create(ctx, &logical.InmemStorage{}, "k", 0)
	require.NoError(t, err)
	kt, err := theirs.Create(ctx, &logical.InmemStorage{}, "k", 0)
	require.NoError(t, err)
	require.NotEqual(t, mine.Label("k", 1), theirs.Label("k", 1))
	am, _ := mine.AEAD(km, 1)
	at, _ := theirs.AEAD(kt, 1)
	ct, err := am.Encrypt([]byte("pt"), nil)
	require.NoError(t, err)
	_, err = at.Decrypt(ct, nil)
	requireCaller(t, err, "message authentication failed")
}

// The first format (no marker, the caller's associated data alone) still
// opens, except with associated data in the plugin's namespace, which its
// own operations in the token use.
func TestFirstFormat(t *testing.T) {
	ctx, ts := context.Background(), openToken(t)
	s := NewStore(ts, mountID(t))
	k, err := s.Create(ctx, &logical.InmemStorage{}, "legacy", 0)
	require.NoError(t, err)
	tok := ts.CurrentToken()
	a, _ := s.AEAD(k, 1)

	old, err := tok.EncryptGCM(s.Label("legacy", 1), []byte("pt"), []byte("user aad"))
	require.NoError(t, err)
	pt, err := a.Decrypt(old, []byte("user aad"))
	require.NoError(t, err)
	require.Equal(t, "pt", string(pt))

	ns := []byte(Namespace + "root-keyring")
	forged, err := tok.EncryptGCM(s.Label("legacy", 1), []byte("pt"), ns)
	require.NoError(t, err)
	_, err = a.Decrypt(forged, ns)
	requireCaller(t, err, "message authentication failed")

	_, err = a.Decrypt(old[:MinCiphertext-1], nil)
	requireCaller(t, err, "invalid ciphertext length")
}

func TestNoTokenIsUnavailable(t *testing.T) {
	ctx, ts := context.Background(), &tokens{}
	s := NewStore(ts, mountID(t))
	_, err := s.Create(ctx, &logical.InmemStorage{}, "k", 0)
	requireUnavailable(t, err)
	_, err = s.Random(32)
	requireUnavailable(t, err)
	k := &Key{Name: "k", Versions: map[int]Version{1: {}}, LatestVersion: 1}
	a, err := s.AEAD(k, 1)
	require.NoError(t, err)
	_, err = a.Encrypt([]byte("pt"), nil)
	requireUnavailable(t, err)
	_, err = a.Decrypt(make([]byte, MinCiphertext), nil)
	requireUnavailable(t, err)
	for kind, code := range map[hsm.Kind]int{hsm.Unavailable: 503, hsm.Credentials: 503, hsm.Failed: 0, hsm.NotFound: 0} {
		err := CryptoError(fmt.Errorf("wrapped: %w", &hsm.Error{Kind: kind, Op: "C_Decrypt", Err: errors.New("x")}))
		require.Equal(t, code, codeOf(err), kind.String())
		if code == 0 {
			var ue errutil.UserError
			require.ErrorAs(t, err, &ue, kind.String())
		}
	}
}

func codeOf(err error) int {
	var coded logical.HTTPCodedError
	if errors.As(err, &coded) {
		return coded.Code()
	}
	return 0
}

func TestNamesThatCannotBeKeys(t *testing.T) {
	ctx, ts := context.Background(), openToken(t)
	s := NewStore(ts, mountID(t))
	storage := &logical.InmemStorage{}
	_, err := s.Create(ctx, storage, "a/../b", 0)
	requireCaller(t, err, `cannot contain ".."`)
	_, err = s.Create(ctx, storage, strings.Repeat("n", s.MaxNameLen()+1), 0)
	requireCaller(t, err, "too long for an HSM-resident key")
	k, err := s.Create(ctx, storage, strings.Repeat("n", s.MaxNameLen()), 0)
	require.NoError(t, err, "the longest name that fits")
	require.NoError(t, hsm.CheckKeyLabel(s.Label(k.Name, 1_000_000)))

	ts.sup.Store(&hsm.MechanismSupport{GCM: false})
	_, err = s.Create(ctx, storage, "no-gcm", 0)
	require.ErrorContains(t, err, "CKM_AES_GCM")
	has, herr := ts.CurrentToken().HasKey(s.Label("no-gcm", 1))
	require.NoError(t, herr)
	require.False(t, has, "nothing made in a token that cannot use it")
}

// failingPut fails every write.
type failingPut struct{ logical.InmemStorage }

func (f *failingPut) Put(context.Context, *logical.StorageEntry) error {
	return errors.New("storage is down")
}

// A rotation whose record fails leaves the key as it was, forgets the
// cached copy, and the next rotation replaces the object it left.
func TestRotationThatCannotBeRecorded(t *testing.T) {
	ctx, ts := context.Background(), openToken(t)
	s := NewStore(ts, mountID(t))
	storage := &logical.InmemStorage{}
	k, err := s.Create(ctx, storage, "k", 0)
	require.NoError(t, err)
	k.Lock()
	err = s.Rotate(ctx, &failingPut{}, k)
	k.Unlock()
	require.ErrorContains(t, err, "storage is down")
	require.Equal(t, 1, k.LatestVersion)
	require.NotContains(t, k.Versions, 2)
	require.Nil(t, s.Cached("k"), "read again from storage after a failed write")
	has, err := ts.CurrentToken().HasKey(s.Label("k", 2))
	require.NoError(t, err)
	require.True(t, has, "the object stays: the write may have landed")

	k, err = s.Get(ctx, storage, "k")
	require.NoError(t, err)
	k.Lock()
	require.NoError(t, s.Rotate(ctx, storage, k))
	k.Unlock()
	labels, err := ts.CurrentToken().KeyLabels(s.Label("k", 2))
	require.NoError(t, err)
	require.Len(t, labels, 1, "one object for version 2, not two")
}

func TestCache(t *testing.T) {
	ctx, ts := context.Background(), openToken(t)
	s := NewStore(ts, mountID(t))
	storage := &logical.InmemStorage{}
	for i := range 3 {
		_, err := s.Create(ctx, storage, fmt.Sprintf("k%d", i), 0)
		require.NoError(t, err)
	}
	require.Equal(t, 3, s.CacheLen())
	s.Resize(2)
	require.Equal(t, 2, s.CacheLen())
	s.Resize(0)
	s.Reset()
	require.Zero(t, s.CacheLen())
	k, err := s.Get(ctx, storage, "k1")
	require.NoError(t, err)
	again, err := s.Get(ctx, storage, "k1")
	require.NoError(t, err)
	require.Same(t, k, again, "a key is read from storage once")
	missing, err := s.Get(ctx, storage, "none")
	require.NoError(t, err)
	require.Nil(t, missing)
	require.NoError(t, storage.Put(ctx, &logical.StorageEntry{Key: StoragePrefix + "bad", Value: []byte("{")}))
	_, err = s.Get(ctx, storage, "bad")
	require.ErrorContains(t, err, `decoding HSM key "bad"`)
}

// DecryptBatch answers each item as Decrypt answers it alone: ciphertexts
// of the current format (with and without associated data, tampered, under
// the wrong associated data), of the first format, forged in the plugin's
// namespace, too short; EncryptBatch's ciphertexts open with Decrypt.
func TestBatchesAreOneByOne(t *testing.T) {
	ctx, ts := context.Background(), openToken(t)
	s := NewStore(ts, mountID(t))
	k, err := s.Create(ctx, &logical.InmemStorage{}, "batch", 0)
	require.NoError(t, err)
	tok := ts.CurrentToken()
	a, _ := s.AEAD(k, 1)

	pts := [][]byte{[]byte("one"), {}, []byte("three"), []byte("four"), []byte("five")}
	ads := [][]byte{nil, []byte("row 2"), nil, []byte("row 4")} // shorter: the last has none
	sealed, errs, err := a.EncryptBatch(pts, ads)
	require.NoError(t, err)
	for i := range pts {
		require.NoError(t, errs[i])
		var ad []byte
		if i < len(ads) {
			ad = ads[i]
		}
		got, err := a.Decrypt(sealed[i], ad)
		require.NoError(t, err, "item %d", i)
		require.Equal(t, string(pts[i]), string(got), "item %d", i)
	}

	first, err := tok.EncryptGCM(s.Label("batch", 1), []byte("first format"), []byte("user aad"))
	require.NoError(t, err)
	ns := []byte(Namespace + "root-keyring")
	forged, err := tok.EncryptGCM(s.Label("batch", 1), []byte("forged"), ns)
	require.NoError(t, err)
	tampered := bytes.Clone(sealed[2])
	tampered[len(tampered)-1] ^= 1
	cts := [][]byte{sealed[0], sealed[1], tampered, sealed[3], first, forged, sealed[4][:MinCiphertext-1], sealed[4]}
	cads := [][]byte{nil, []byte("row 2"), nil, []byte("not row 4"), []byte("user aad"), ns, nil, nil}
	opened, errs, err := a.DecryptBatch(cts, cads)
	require.NoError(t, err)
	for i := range cts {
		want, wantErr := a.Decrypt(cts[i], cads[i])
		if wantErr != nil {
			require.EqualError(t, errs[i], wantErr.Error(), "item %d", i)
			require.Nil(t, opened[i], "item %d", i)
			continue
		}
		require.NoError(t, errs[i], "item %d", i)
		require.Equal(t, string(want), string(opened[i]), "item %d", i)
	}
	require.Equal(t, "first format", string(opened[4]))
	require.Error(t, errs[2])
	require.Error(t, errs[5])

	_, _, err = a.DecryptBatch(make([][]byte, hsm.MaxGCMBatch+1), nil)
	require.Error(t, err)
	_, _, err = a.EncryptBatch(make([][]byte, hsm.MaxGCMBatch+1), nil)
	require.Error(t, err)
}
