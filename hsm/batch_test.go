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
		items[i].Plaintext = bytes.Repeat([]byte{byte('a' + i)}, i*7)
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
		require.Len(t, it.Sealed, GCMNonceSize+len(it.Plaintext)+GCMTagSize, "item %d", i)
		iv := string(it.Sealed[:GCMNonceSize])
		prev, seen := ivs[iv]
		require.False(t, seen, "items %d and %d share an IV", prev, i)
		ivs[iv] = i
		got, err := tok.DecryptGCM(kek, it.Sealed, it.AAD)
		require.NoError(t, err, "item %d", i)
		require.Equal(t, it.Plaintext, got, "item %d", i)
		// Bound to its own associated data, not a neighbour's.
		other := items[(i+1)%len(items)].AAD
		if !bytes.Equal(other, it.AAD) {
			_, err = tok.DecryptGCM(kek, it.Sealed, other)
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
		require.Nil(t, it.Sealed, "item %d has a result from a failed call", i)
		require.NoError(t, it.Err, "item %d: the call's error is not copied to items", i)
	}
}

// TestEncryptGCMBatchItemRefused: an item the token fails (here, a broken
// token repeating its IV: the second and later outputs are refused) gets
// its own error; the items before it keep their results, and the batch
// does not stop at it.
func TestEncryptGCMBatchItemRefused(t *testing.T) {
	shim, label := newShim(t)
	tok := openShim(t, shim, label, 0)
	kek := uniqueLabel("kek")
	require.NoError(t, tok.GenerateKey(kek))
	shim.Set(p11shim.IVRepeat)
	items := batchItems(4)
	require.NoError(t, tok.EncryptGCMBatch(kek, items))
	require.NoError(t, items[0].Err)
	for i := 1; i < len(items); i++ {
		require.Equal(t, Failed, KindOf(items[i].Err), "item %d: %v", i, items[i].Err)
		require.Contains(t, items[i].Err.Error(), "IV it had used before")
		require.Nil(t, items[i].Sealed, "item %d", i)
	}
	shim.Set()
	got, err := tok.DecryptGCM(kek, items[0].Sealed, items[0].AAD)
	require.NoError(t, err)
	require.Equal(t, items[0].Plaintext, got)
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
		require.Nil(t, it.Sealed, "item %d", i)
	}
	shim.Set()

	shim.Set(p11shim.DeviceError)
	err = tok.EncryptGCMBatch(kek, batchItems(3))
	require.Equal(t, Unavailable, KindOf(err), "%v", err)
	shim.Set()
}
