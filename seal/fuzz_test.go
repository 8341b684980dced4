package seal

import (
	"bytes"
	"context"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"
)

// FuzzStoredEntry: whatever bytes a storage writer puts at a path, the
// view answers with an error or, only for a value the mount sealed there,
// its plaintext; never a panic, never another value.
func FuzzStoredEntry(f *testing.F) {
	m := newMount(f)
	m.put("policy/k", "genuine")
	genuine := m.raw("policy/k")
	f.Add(genuine)
	f.Add(genuine[:len(genuine)-1])
	f.Add([]byte("hst\x02"))
	f.Add([]byte("hst\x01\x00\x00\x00\x01"))
	f.Add([]byte(`{"plaintext":"policy"}`))
	f.Fuzz(func(t *testing.T, value []byte) {
		require.NoError(t, m.under.Put(m.ctx, &logical.StorageEntry{Key: "policy/k", Value: value}))
		e, err := m.v.Get(context.Background(), "policy/k")
		if err != nil {
			require.ErrorIs(t, err, ErrEntryRefused)
			return
		}
		require.True(t, bytes.Equal(value, genuine), "a value the mount did not seal opened")
		require.Equal(t, "genuine", string(e.Value))
	})
}

// FuzzManifestPieces: bucket and root decoding refuse malformed bytes
// without a panic, and what decodes encodes to bytes that decode to the
// same (an overlong varint decodes, and is written back canonical; the
// pieces are sealed, so only the plugin's own encodings ever reach this).
func FuzzManifestPieces(f *testing.F) {
	b := (&bucket{size: 64}).with(update{"policy/a", liveRec(3)}, update{"policy/b", tombstone(7)})
	f.Add(b.encode())
	f.Add((&manifestRoot{counter: 9, activeVersion: 1}).encode())
	f.Add([]byte{1, 200})
	f.Fuzz(func(t *testing.T, in []byte) {
		if got, maxGen, err := decodeBucket(in); err == nil {
			again, maxGen2, err := decodeBucket(got.encode())
			require.NoError(t, err)
			require.Equal(t, got.paths, again.paths)
			require.Equal(t, got.recs, again.recs)
			require.Equal(t, maxGen, maxGen2)
		}
		if root, err := decodeRoot(in); err == nil {
			again, err := decodeRoot(root.encode())
			require.NoError(t, err)
			require.Equal(t, root, again)
		}
	})
}
