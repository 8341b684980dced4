package hsm

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/p11shim"
)

// batchItems is n items of distinct plaintexts (the first empty) and
// associated data (every third item without).
func batchItems(n int) []GCMItem {
	items := make([]GCMItem, n)
	for i := range items {
		items[i].In = bytes.Repeat([]byte{byte('a' + i)}, i*7)
		if i%3 != 0 {
			items[i].AAD = []byte(fmt.Sprintf("aad-%d", i))
		}
	}
	return items
}

// TestEncryptGCMBatch: each item of a batch is sealed as EncryptGCM seals
// it, under its own IV and bound to its own associated data, whatever the
// others are; what fails every item fails the call and leaves no result.
func TestEncryptGCMBatch(t *testing.T) {
	tok := openToken(t, newTestToken(t), testPIN)
	kek := uniqueLabel("kek")
	require.NoError(t, tok.GenerateKey(kek))

	items := batchItems(MaxGCMBatch)
	require.NoError(t, tok.EncryptGCMBatch(kek, items))
	ivs := map[string]int{}
	for i, it := range items {
		require.NoError(t, it.Err, "item %d", i)
		require.Len(t, it.Out, GCMNonceSize+len(it.In)+GCMTagSize, "item %d", i)
		iv := string(it.Out[:GCMNonceSize])
		prev, seen := ivs[iv]
		require.False(t, seen, "items %d and %d share an IV", prev, i)
		ivs[iv] = i
		got, err := tok.DecryptGCM(kek, it.Out, it.AAD)
		require.NoError(t, err, "item %d", i)
		require.Equal(t, it.In, got, "item %d", i)
		// Bound to its own associated data, not a neighbour's.
		other := items[(i+1)%len(items)].AAD
		if !bytes.Equal(other, it.AAD) {
			_, err = tok.DecryptGCM(kek, it.Out, other)
			require.Equal(t, Failed, KindOf(err), "item %d opened with item %d's associated data", i, (i+1)%len(items))
		}
	}

	// One item alone, and none, are batches too.
	one := batchItems(2)[1:]
	require.NoError(t, tok.EncryptGCMBatch(kek, one))
	require.NoError(t, one[0].Err)
	require.NoError(t, tok.EncryptGCMBatch(kek, nil))

	over := batchItems(MaxGCMBatch + 1)
	err := tok.EncryptGCMBatch(kek, over)
	require.Error(t, err)
	require.Contains(t, err.Error(), "at most 16")

	missing := batchItems(3)
	err = tok.EncryptGCMBatch(uniqueLabel("absent"), missing)
	require.Equal(t, NotFound, KindOf(err), "%v", err)
	for i, it := range missing {
		require.Nil(t, it.Out, "item %d has a result from a failed call", i)
		require.NoError(t, it.Err, "item %d: the call's error is not copied to items", i)
	}
}

// TestEncryptGCMBatchItemRefused: an item the token fails (here, a broken
// token repeating its IV: the second and later outputs are refused) gets
// its own error; the items before it keep their results, and the batch
// does not stop at it.
func TestEncryptGCMBatchItemRefused(t *testing.T) {
	shim, tok, kek := shimWithKEK(t)
	shim.Set(p11shim.IVRepeat)
	items := batchItems(4)
	require.NoError(t, tok.EncryptGCMBatch(kek, items))
	require.NoError(t, items[0].Err)
	for i := 1; i < len(items); i++ {
		require.Equal(t, Failed, KindOf(items[i].Err), "item %d: %v", i, items[i].Err)
		require.Contains(t, items[i].Err.Error(), "IV it had used before")
		require.Nil(t, items[i].Out, "item %d", i)
	}
	shim.Set()
	got, err := tok.DecryptGCM(kek, items[0].Out, items[0].AAD)
	require.NoError(t, err)
	require.Equal(t, items[0].In, got)
}

// TestEncryptGCMBatchDeadline: a batch on a token that stops answering
// returns at the deadline, with no item's result, like EncryptGCM; a device
// error fails the whole batch as Unavailable.
func TestEncryptGCMBatchDeadline(t *testing.T) {
	shim, label := newShim(t)
	setup := openShim(t, shim, label, 0)
	const deadline = 300 * time.Millisecond
	tok := openShim(t, shim, label, deadline)
	kek := uniqueLabel("kek")
	require.NoError(t, setup.GenerateKey(kek))
	require.NoError(t, tok.EncryptGCMBatch(kek, batchItems(2)))

	shim.Set(p11shim.Hang)
	items := batchItems(5)
	start := time.Now()
	err := tok.EncryptGCMBatch(kek, items)
	require.True(t, IsTimeout(err), "%v", err)
	require.Less(t, time.Since(start), deadline+2*time.Second)
	for i, it := range items {
		require.Nil(t, it.Out, "item %d", i)
	}
	shim.Set()

	// A device error inside the batch (the session pooled and the key's
	// handle known, so that the first call to fail is C_EncryptInit) voids
	// the connection: the whole batch fails, after its one rerun.
	require.Eventually(t, func() bool { return tok.EncryptGCMBatch(kek, batchItems(2)) == nil },
		5*time.Second, 50*time.Millisecond)
	shim.Set(p11shim.DeviceError)
	items = batchItems(3)
	err = tok.EncryptGCMBatch(kek, items)
	require.Equal(t, Unavailable, KindOf(err), "%v", err)
	for i, it := range items {
		require.Nil(t, it.Out, "item %d", i)
		require.NoError(t, it.Err, "item %d: the call's error is not copied to items", i)
	}
	shim.Set()
}

// TestDecryptGCMBatch: each item of a batch opens to its own plaintext, and
// an item that does not open (tampered, under another item's associated
// data, too short) fails alone, as DecryptGCM fails it.
func TestDecryptGCMBatch(t *testing.T) {
	shim, tok, kek := shimWithKEK(t)
	sealed := batchItems(MaxGCMBatch)
	require.NoError(t, tok.EncryptGCMBatch(kek, sealed))

	open := make([]GCMItem, len(sealed))
	for i, it := range sealed {
		open[i] = GCMItem{In: bytes.Clone(it.Out), AAD: it.AAD}
	}
	open[3].In[len(open[3].In)-1] ^= 1       // tampered tag
	open[4].AAD = []byte("another item's")   // wrong associated data
	open[5].In = open[5].In[:GCMNonceSize+3] // too short
	open[7].In[GCMNonceSize] ^= 0x80         // tampered ciphertext
	refused := map[int]bool{3: true, 4: true, 5: true, 7: true}
	require.NoError(t, tok.DecryptGCMBatch(kek, open))
	for i, it := range open {
		if refused[i] {
			require.Equal(t, Failed, KindOf(it.Err), "item %d: %v", i, it.Err)
			require.Nil(t, it.Out, "item %d", i)
			_, single := tok.DecryptGCM(kek, it.In, it.AAD)
			require.Equal(t, Failed, KindOf(single), "item %d alone", i)
			continue
		}
		require.NoError(t, it.Err, "item %d", i)
		require.Equal(t, sealed[i].In, it.Out, "item %d", i)
	}
	require.Contains(t, open[5].Err.Error(), "too short")

	require.Error(t, tok.DecryptGCMBatch(kek, make([]GCMItem, MaxGCMBatch+1)))
	err := tok.DecryptGCMBatch(uniqueLabel("absent"), open[:2])
	require.Equal(t, NotFound, KindOf(err), "%v", err)

	shim.Set(p11shim.DeviceError)
	again := []GCMItem{{In: sealed[1].Out, AAD: sealed[1].AAD}}
	err = tok.DecryptGCMBatch(kek, again)
	require.Equal(t, Unavailable, KindOf(err), "%v", err)
	require.Nil(t, again[0].Out)
	shim.Set()
}

// An item the token refuses with a PKCS#11 return value (here
// CKR_MECHANISM_INVALID from a token without AES-GCM) gets the error a
// single EncryptGCM or DecryptGCM gets for it: classified, with its kind,
// not the bare return value.
func TestGCMBatchItemErrorsAreClassified(t *testing.T) {
	shim, tok, kek := shimWithKEK(t)
	sealed := batchItems(3)
	require.NoError(t, tok.EncryptGCMBatch(kek, sealed))

	shim.Set(p11shim.NoGCM)
	defer shim.Set()
	_, single := tok.EncryptGCM(kek, sealed[0].In, sealed[0].AAD)
	require.NotZero(t, KindOf(single), "%v", single)
	items := batchItems(3)
	require.NoError(t, tok.EncryptGCMBatch(kek, items))
	for i, it := range items {
		require.Equal(t, KindOf(single), KindOf(it.Err), "encrypt item %d: %v", i, it.Err)
		require.Equal(t, single.Error(), it.Err.Error(), "encrypt item %d", i)
	}

	_, single = tok.DecryptGCM(kek, sealed[0].Out, sealed[0].AAD)
	require.NotZero(t, KindOf(single), "%v", single)
	open := make([]GCMItem, len(sealed))
	for i, it := range sealed {
		open[i] = GCMItem{In: it.Out, AAD: it.AAD}
	}
	require.NoError(t, tok.DecryptGCMBatch(kek, open))
	for i, it := range open {
		require.Equal(t, KindOf(single), KindOf(it.Err), "decrypt item %d: %v", i, it.Err)
	}
}

// shimWithKEK is a token behind the shim, with no deadline, and the label
// of an AES key generated in it.
func shimWithKEK(t *testing.T) (*p11shim.Shim, *Token, string) {
	t.Helper()
	shim, label := newShim(t)
	tok := openShim(t, shim, label, 0)
	kek := uniqueLabel("kek")
	require.NoError(t, tok.GenerateKey(kek))
	return shim, tok, kek
}
