package hsmtransit

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	mrand "math/rand/v2"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/stretchr/testify/require"
)

// TestBatchSealsInPlace: the software fast path decodes a batch's
// plaintexts into one buffer and seals each where it lies (decodePlaintexts,
// aeadCache.encrypt). A batch of plaintexts of every length from 0 to 300
// bytes, in random order and with bad base64 among them, is encrypted
// through the plugin boundary and directly; every ciphertext decrypts to
// its own item's plaintext (a seal that ran into its neighbour's room
// would break the neighbour's), every bad item gets base64's error, and the
// ciphertexts are all different.
func TestBatchSealsInPlace(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	var plaintexts []string
	for n := 0; n <= 300; n++ {
		buf := make([]byte, n)
		_, err := rand.Read(buf)
		require.NoError(t, err)
		plaintexts = append(plaintexts, base64.StdEncoding.EncodeToString(buf))
	}
	plaintexts = append(plaintexts, "not base64!", "eA=", "====")
	mrand.Shuffle(len(plaintexts), func(i, j int) { plaintexts[i], plaintexts[j] = plaintexts[j], plaintexts[i] })
	items := make([]map[string]string, len(plaintexts))
	for i, pt := range plaintexts {
		items[i] = map[string]string{"plaintext": pt, "reference": fmt.Sprint(i)}
	}
	body, err := json.Marshal(map[string]interface{}{"batch_input": items})
	require.NoError(t, err)

	for _, intercepted := range []bool{true, false} {
		var out struct {
			Data struct {
				BatchResults []encryptResult `json:"batch_results"`
			} `json:"data"`
		}
		// The bad items make it a 400, whose body comes raw.
		var coded struct {
			Status int    `json:"http_status_code"`
			Body   string `json:"http_raw_body"`
		}
		require.NoError(t, json.Unmarshal([]byte(e.viaBoundary(t, "encrypt/k", string(body), intercepted)), &coded))
		require.Equal(t, 400, coded.Status)
		require.NoError(t, json.Unmarshal([]byte(coded.Body), &out))
		require.Len(t, out.Data.BatchResults, len(plaintexts))
		seen := map[string]bool{}
		for i, r := range out.Data.BatchResults {
			require.Equal(t, fmt.Sprint(i), r.Reference)
			if _, err := base64.StdEncoding.DecodeString(plaintexts[i]); err != nil {
				require.Equal(t, err.Error(), r.Error, "item %d", i)
				require.Empty(t, r.Ciphertext)
				continue
			}
			require.Empty(t, r.Error, "item %d", i)
			require.True(t, strings.HasPrefix(r.Ciphertext, "vault:v1:"), r.Ciphertext)
			require.False(t, seen[r.Ciphertext], "item %d: a ciphertext seen before", i)
			seen[r.Ciphertext] = true
			require.Equal(t, unb64(t, plaintexts[i]), e.decrypt(t, "k", r.Ciphertext, nil), "item %d (intercepted %v)", i, intercepted)
		}
	}
}

// TestAEADMemoKeepsVersionsApart: a request's memo of AEADs hands each
// version its own (a rewrap decrypts with an old version and encrypts with
// the latest on the same cipher), and keeps no more than maxMemo.
func TestAEADMemoKeepsVersionsApart(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	for i := 0; i < maxMemo+2; i++ {
		e.mustWrite(t, "keys/k/rotate", nil)
	}
	p, unlock, err := e.b.readPolicy(t.Context(), e.sealed(t), "k", false)
	require.NoError(t, err)
	defer unlock()
	c := newSoftwareCipher(p, e.b.aeads)
	pt := base64.StdEncoding.EncodeToString([]byte("memo"))
	cts := map[int]string{}
	for round := 0; round < 2; round++ {
		for v := 1; v <= p.LatestVersion; v++ {
			ct, ver, err := c.encrypt(&batchItem{Plaintext: pt, KeyVersion: v})
			require.NoError(t, err)
			require.Equal(t, v, ver)
			cts[v] = ct
		}
		for v, ct := range cts {
			// keysutil, which knows nothing of the memo, decrypts each
			// with the version it names.
			got, err := p.Decrypt(nil, nil, ct)
			require.NoError(t, err, "version %d", v)
			require.Equal(t, pt, got)
			got, err = c.decrypt(&batchItem{Ciphertext: ct}, "")
			require.NoError(t, err)
			require.Equal(t, pt, got)
		}
	}
	require.Len(t, *c.memo.versions.Load(), maxMemo)
}

// TestGCMAEADIsKeysutilsFormat: the software version's byte-level AEAD
// (gcmAEAD, a byteAEAD) writes what keysutil decrypts, through
// encryptWith and through the in-place seal the batch path uses, and opens
// what keysutil wrote; a changed byte or other associated data is refused.
func TestGCMAEADIsKeysutilsFormat(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	p, unlock, err := e.b.readPolicy(t.Context(), e.sealed(t), "k", false)
	require.NoError(t, err)
	defer unlock()
	aead, err := e.b.aeads.get(p, 1)
	require.NoError(t, err)
	var g byteAEAD = gcmAEAD{aead}
	pt := []byte("byte-level AEAD")
	ct, ver, err := encryptWith(g, 1, pt, nil)
	require.NoError(t, err)
	require.Equal(t, 1, ver)
	got, err := p.Decrypt(nil, nil, ct)
	require.NoError(t, err)
	require.Equal(t, base64.StdEncoding.EncodeToString(pt), got)

	buf := make([]byte, gcmNonceSize+len(pt)+gcmTagSize)
	copy(buf[gcmNonceSize:], pt)
	sealed, err := gcmAEAD{aead}.sealInPlace(buf, nil)
	require.NoError(t, err)
	require.Equal(t, &buf[0], &sealed[0], "sealed where it lay")
	got, err = p.Decrypt(nil, nil, formatCiphertext(1, sealed))
	require.NoError(t, err)
	require.Equal(t, base64.StdEncoding.EncodeToString(pt), got)
	_, err = gcmAEAD{aead}.sealInPlace(make([]byte, gcmNonceSize+gcmTagSize-1), nil)
	require.Error(t, err)

	kct, err := p.EncryptWithOptions(keysutil.EncryptionOptions{}, base64.StdEncoding.EncodeToString(pt))
	require.NoError(t, err)
	_, raw, err := parseCiphertext(kct, 1, 0)
	require.NoError(t, err)
	opened, err := g.Decrypt(append([]byte(nil), raw...), nil)
	require.NoError(t, err)
	require.Equal(t, pt, opened)
	_, err = g.Decrypt(append([]byte(nil), raw...), []byte("other"))
	require.Error(t, err)
	raw[len(raw)-1] ^= 1
	_, err = g.Decrypt(raw, nil)
	require.Error(t, err)
	_, err = g.Decrypt(raw[:gcmNonceSize-1], nil)
	require.Error(t, err)
}
