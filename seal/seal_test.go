package seal

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"
)

func randomKey(t testing.TB) []byte {
	t.Helper()
	k := make([]byte, RootKeySize)
	_, err := rand.Read(k)
	require.NoError(t, err)
	return k
}

func plainSeal(path string) bool { return strings.HasPrefix(path, "seal/") }

func TestKeyringMarshalRoundTrip(t *testing.T) {
	k1, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	k2, err := k1.Rotated(randomKey(t))
	require.NoError(t, err)
	require.Equal(t, uint32(2), k2.Active())
	require.Equal(t, []uint32{1, 2}, k2.Versions())
	require.Equal(t, []uint32{1}, k1.Versions(), "rotation leaves the old keyring as it was")

	raw, err := k2.Marshal()
	require.NoError(t, err)
	back, err := UnmarshalKeyring(raw)
	require.NoError(t, err)
	require.Equal(t, k2.Versions(), back.Versions())
	ct, err := k2.Seal("p", []byte("v"))
	require.NoError(t, err)
	pt, err := back.Open("p", ct)
	require.NoError(t, err)
	require.Equal(t, []byte("v"), pt)

	for name, bad := range map[string]string{
		"not json":       "{",
		"no active key":  `{"active":3,"keys":{"1":"` + strings.Repeat("A", 43) + `="}}`,
		"short key":      `{"active":1,"keys":{"1":"AAAA"}}`,
		"bad version id": `{"active":1,"keys":{"x":"` + strings.Repeat("A", 43) + `="}}`,
	} {
		_, err := UnmarshalKeyring([]byte(bad))
		require.Error(t, err, name)
	}
	_, err = NewKeyring([]byte("short"))
	require.Error(t, err)
}

func TestSealOpen(t *testing.T) {
	k, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	secret := []byte(`{"keys":{"1":{"key":"c2VjcmV0IGtleSBieXRlcw=="}}}`)
	ct, err := k.Seal("policy/a", secret)
	require.NoError(t, err)
	require.True(t, IsSealed(ct))
	require.False(t, bytes.Contains(ct, secret))
	ct2, err := k.Seal("policy/a", secret)
	require.NoError(t, err)
	require.NotEqual(t, ct, ct2, "fresh nonce per write")

	pt, err := k.Open("policy/a", ct)
	require.NoError(t, err)
	require.Equal(t, secret, pt)

	_, err = k.Open("policy/b", ct)
	require.ErrorContains(t, err, "does not authenticate", "entries cannot be moved between paths")
	tampered := append([]byte{}, ct...)
	tampered[len(tampered)-1] ^= 1
	_, err = k.Open("policy/a", tampered)
	require.ErrorContains(t, err, "does not authenticate")
	_, err = k.Open("policy/a", secret)
	require.ErrorContains(t, err, "not sealed")

	other, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	_, err = other.Open("policy/a", ct)
	require.ErrorContains(t, err, "does not authenticate", "another mount's root key cannot open it")
	rotated, err := k.Rotated(randomKey(t))
	require.NoError(t, err)
	ct3, err := rotated.Seal("policy/a", secret)
	require.NoError(t, err)
	_, err = k.Open("policy/a", ct3)
	require.ErrorContains(t, err, "version 2")
}

func TestViewSealsEverythingButPlainPaths(t *testing.T) {
	ctx := context.Background()
	under := &logical.InmemStorage{}
	k, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	s := NewSealer(k, plainSeal)
	v := s.Wrap(under)

	require.NoError(t, v.Put(ctx, &logical.StorageEntry{Key: "policy/k", Value: []byte("key material"), SealWrap: true}))
	require.NoError(t, v.Put(ctx, &logical.StorageEntry{Key: "seal/config", Value: []byte("non-secret")}))

	raw, err := under.Get(ctx, "policy/k")
	require.NoError(t, err)
	require.True(t, IsSealed(raw.Value))
	require.False(t, bytes.Contains(raw.Value, []byte("key material")))
	raw, err = under.Get(ctx, "seal/config")
	require.NoError(t, err)
	require.Equal(t, []byte("non-secret"), raw.Value)

	e, err := v.Get(ctx, "policy/k")
	require.NoError(t, err)
	require.Equal(t, []byte("key material"), e.Value)
	e, err = v.Get(ctx, "missing")
	require.NoError(t, err)
	require.Nil(t, e)
	keys, err := v.List(ctx, "policy/")
	require.NoError(t, err)
	require.Equal(t, []string{"k"}, keys)

	// An entry planted in storage unsealed is refused, not trusted.
	require.NoError(t, under.Put(ctx, &logical.StorageEntry{Key: "policy/planted", Value: []byte("{}")}))
	_, err = v.Get(ctx, "policy/planted")
	require.ErrorContains(t, err, "not sealed")

	require.NoError(t, v.Delete(ctx, "policy/k"))
	e, err = v.Get(ctx, "policy/k")
	require.NoError(t, err)
	require.Nil(t, e)
}

func TestMigrateAllThenResealAllRotates(t *testing.T) {
	ctx := context.Background()
	under := &logical.InmemStorage{}
	// Entries written before the mount was sealed, as built-in transit
	// leaves them.
	for i := 0; i < 5; i++ {
		require.NoError(t, under.Put(ctx, &logical.StorageEntry{Key: fmt.Sprintf("policy/k%d", i), Value: []byte(fmt.Sprintf("plain %d", i))}))
	}
	require.NoError(t, under.Put(ctx, &logical.StorageEntry{Key: "archive/deep/k0", Value: []byte("archived")}))
	require.NoError(t, under.Put(ctx, &logical.StorageEntry{Key: "seal/config", Value: []byte("as is")}))

	k1, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	s := NewSealer(k1, plainSeal)
	n, err := s.MigrateAll(ctx, under)
	require.NoError(t, err)
	require.Equal(t, 6, n)
	n, err = s.ResealAll(ctx, under)
	require.NoError(t, err)
	require.Equal(t, 0, n, "nothing left to do")

	k2, err := k1.Rotated(randomKey(t))
	require.NoError(t, err)
	s.SetKeyring(k2)
	n, err = s.ResealAll(ctx, under)
	require.NoError(t, err)
	require.Equal(t, 6, n)
	s.SetKeyring(k2.ActiveOnly())

	v := s.Wrap(under)
	for i := 0; i < 5; i++ {
		e, err := v.Get(ctx, fmt.Sprintf("policy/k%d", i))
		require.NoError(t, err)
		require.Equal(t, fmt.Sprintf("plain %d", i), string(e.Value))
		raw, err := under.Get(ctx, fmt.Sprintf("policy/k%d", i))
		require.NoError(t, err)
		ver, _ := SealedVersion(raw.Value)
		require.Equal(t, uint32(2), ver)
	}
	raw, err := under.Get(ctx, "seal/config")
	require.NoError(t, err)
	require.Equal(t, "as is", string(raw.Value))
}

// TestRotationWithConcurrentWrites re-encrypts while writers keep writing:
// once the pass is over, every entry is at the new version and holds the
// last value written to it.
func TestRotationWithConcurrentWrites(t *testing.T) {
	ctx := context.Background()
	under := &logical.InmemStorage{}
	k1, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	s := NewSealer(k1, plainSeal)
	v := s.Wrap(under)
	const keys = 200
	for i := 0; i < keys; i++ {
		require.NoError(t, v.Put(ctx, &logical.StorageEntry{Key: fmt.Sprintf("policy/%d", i), Value: []byte("0")}))
	}

	var wg sync.WaitGroup
	stop := make(chan struct{})
	last := make([]int, keys)
	var mu sync.Mutex
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for n := 1; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				i := (n*7 + w*13) % keys
				mu.Lock()
				last[i]++
				val := last[i]
				err := v.Put(ctx, &logical.StorageEntry{Key: fmt.Sprintf("policy/%d", i), Value: []byte(fmt.Sprint(val))})
				mu.Unlock()
				if err != nil {
					t.Error(err)
					return
				}
			}
		}(w)
	}
	k2, err := k1.Rotated(randomKey(t))
	require.NoError(t, err)
	s.SetKeyring(k2)
	_, err = s.ResealAll(ctx, under)
	require.NoError(t, err)
	s.SetKeyring(k2.ActiveOnly())
	close(stop)
	wg.Wait()

	for i := 0; i < keys; i++ {
		e, err := v.Get(ctx, fmt.Sprintf("policy/%d", i))
		require.NoError(t, err, "entry %d readable with the old version dropped", i)
		require.Equal(t, fmt.Sprint(last[i]), string(e.Value), "entry %d keeps its last write", i)
	}
}

func TestRecoveryShares(t *testing.T) {
	k1, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	ring, err := k1.Rotated(randomKey(t))
	require.NoError(t, err)
	info := []byte("mount-a")

	pub, shares, err := NewRecovery(5, 3)
	require.NoError(t, err)
	require.Len(t, shares, 5)
	sealed, err := SealForRecovery(pub, info, ring)
	require.NoError(t, err)
	raw, err := ring.Marshal()
	require.NoError(t, err)
	require.False(t, bytes.Contains(sealed, raw))

	for _, pick := range [][]int{{0, 1, 2}, {4, 2, 0}, {1, 3, 4}, {0, 1, 2, 3, 4}} {
		var given []string
		for _, i := range pick {
			given = append(given, shares[i])
		}
		back, err := OpenWithShares(given, info, sealed)
		require.NoError(t, err, "shares %v", pick)
		require.Equal(t, ring.Versions(), back.Versions())
		ct, err := ring.Seal("p", []byte("x"))
		require.NoError(t, err)
		pt, err := back.Open("p", ct)
		require.NoError(t, err)
		require.Equal(t, []byte("x"), pt)
	}

	// Too few, a wrong share, another set's share, another mount.
	_, err = OpenWithShares(shares[:2], info, sealed)
	require.ErrorIs(t, err, ErrSharesDoNotOpen)
	_, otherShares, err := NewRecovery(5, 3)
	require.NoError(t, err)
	_, err = OpenWithShares([]string{shares[0], shares[1], otherShares[2]}, info, sealed)
	require.ErrorIs(t, err, ErrSharesDoNotOpen)
	flipped, _ := base64.StdEncoding.DecodeString(shares[2])
	flipped[3] ^= 1
	_, err = OpenWithShares([]string{shares[0], shares[1], base64.StdEncoding.EncodeToString(flipped)}, info, sealed)
	require.ErrorIs(t, err, ErrSharesDoNotOpen)
	_, err = OpenWithShares(shares[:3], []byte("mount-b"), sealed)
	require.ErrorIs(t, err, ErrSharesDoNotOpen)
	_, err = OpenWithShares([]string{shares[0], shares[0], shares[1]}, info, sealed)
	require.Error(t, err, "a duplicate share")
	_, err = OpenWithShares([]string{"not base64!", shares[1], shares[2]}, info, sealed)
	require.ErrorContains(t, err, "share 1 is not a recovery share")

	for _, bad := range [][2]int{{3, 1}, {2, 3}, {256, 3}} {
		_, _, err := NewRecovery(bad[0], bad[1])
		require.Error(t, err, "shares %d threshold %d", bad[0], bad[1])
	}
}

// A storage writer knows the recovery public key and can encrypt a keyring
// of theirs to it. An authenticated copy tells the mount's own from theirs.
func TestRecoveryCopyAuthenticated(t *testing.T) {
	info := []byte("mount-a")
	ring, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	pub, macKey, shares, err := NewAuthenticatedRecovery(3, 2)
	require.NoError(t, err)
	copyOf, err := SealForRecoveryWithMAC(pub, macKey, info, ring)
	require.NoError(t, err)

	back, authenticated, err := OpenRecovery(shares[:2], info, copyOf)
	require.NoError(t, err)
	require.True(t, authenticated)
	require.Equal(t, ring.Versions(), back.Versions())

	// The attacker's own keyring, to the same public key: untagged...
	theirs, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	planted, err := SealForRecovery(pub, info, theirs)
	require.NoError(t, err)
	_, authenticated, err = OpenRecovery(shares[:2], info, planted)
	require.NoError(t, err)
	require.False(t, authenticated, "an untagged copy is reported as such, for the caller's stronger check")
	// ...or tagged with a tag they made up, or the mount's tag moved over.
	for name, tag := range map[string][]byte{
		"made-up tag":   randomKey(t),
		"the mount's":   copyOf[len(recoveryCopyMagic) : len(recoveryCopyMagic)+recoveryTagSize],
		"under another": recoveryTag(randomKey(t), info, planted),
	} {
		forged := append(append(append([]byte(nil), recoveryCopyMagic...), tag...), planted...)
		_, _, err = OpenRecovery(shares[:2], info, forged)
		require.ErrorIs(t, err, ErrRecoveryCopyForged, name)
	}
	// A copy cut down to its tag (or less) is no copy this set made; with
	// one byte of ciphertext more the tag is checked, and fails, and HPKE
	// then cannot tell damaged ciphertext from wrong shares.
	for n := len(recoveryCopyMagic); n <= len(recoveryCopyMagic)+recoveryTagSize; n++ {
		_, _, err = OpenRecovery(shares[:2], info, copyOf[:n])
		require.ErrorIs(t, err, ErrRecoveryCopyForged, "cut to %d bytes", n)
	}
	_, _, err = OpenRecovery(shares[:2], info, copyOf[:len(recoveryCopyMagic)+recoveryTagSize+1])
	require.ErrorIs(t, err, ErrSharesDoNotOpen, "a tag over other bytes")
	// Wrong shares are still told as such on a tagged copy.
	_, _, other, err := NewAuthenticatedRecovery(3, 2)
	require.NoError(t, err)
	_, _, err = OpenRecovery(other[:2], info, copyOf)
	require.ErrorIs(t, err, ErrSharesDoNotOpen)
	// The tag binds the mount: the copy does not pass for another's.
	_, _, err = OpenRecovery(shares[:2], []byte("mount-b"), copyOf)
	require.Error(t, err)
}

// TestSharesWithTheSameCoordinate: a share of another recovery set whose
// x-coordinate (last byte) is that of a share given with it is refused as
// any share of another set is (shamir.Combine alone said "duplicate part
// detected", which made TestRecoveryShares fail about once in a hundred
// runs), and the same share given twice is named as such.
func TestSharesWithTheSameCoordinate(t *testing.T) {
	k1, err := NewKeyring(randomKey(t))
	require.NoError(t, err)
	pub, shares, err := NewRecovery(5, 3)
	require.NoError(t, err)
	info := []byte("mount")
	sealed, err := SealForRecovery(pub, info, k1)
	require.NoError(t, err)
	mine, _ := base64.StdEncoding.DecodeString(shares[0])
	var twin string
	for tries := 0; twin == "" && tries < 2000; tries++ {
		_, other, err := NewRecovery(5, 3)
		require.NoError(t, err)
		for _, o := range other {
			d, _ := base64.StdEncoding.DecodeString(o)
			if d[len(d)-1] == mine[len(mine)-1] {
				twin = o
				break
			}
		}
	}
	require.NotEmpty(t, twin, "no share of another set with the same coordinate in 2000 sets")
	_, err = OpenWithShares([]string{shares[0], shares[1], twin}, info, sealed)
	require.ErrorIs(t, err, ErrSharesDoNotOpen)
	_, err = OpenWithShares([]string{twin, shares[1], shares[0]}, info, sealed)
	require.ErrorIs(t, err, ErrSharesDoNotOpen)

	_, err = OpenWithShares([]string{shares[0], shares[1], shares[0]}, info, sealed)
	require.EqualError(t, err, "share 1 and share 3 are the same share; give shares that are all different")
	_, err = OpenWithShares([]string{shares[2], shares[2]}, info, sealed)
	require.EqualError(t, err, "share 1 and share 2 are the same share; give shares that are all different")

	// Distinct shares of this set still open it.
	back, err := OpenWithShares([]string{shares[4], shares[0], shares[2]}, info, sealed)
	require.NoError(t, err)
	require.Equal(t, k1.Versions(), back.Versions())
}
