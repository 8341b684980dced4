package hsmtransit

import (
	"context"
	"crypto/rand"
	"fmt"
	"testing"

	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"
)

// policyCached reports whether the policy cache holds key name: a lookup
// over empty storage finds it only there.
func policyCached(t *testing.T, e *testEnv, name string) bool {
	t.Helper()
	p, _, err := e.b.lm.GetPolicy(context.Background(), keysutil.PolicyRequest{Storage: &logical.InmemStorage{}, Name: name}, rand.Reader)
	require.NoError(t, err)
	return p != nil
}

func TestCacheConfig(t *testing.T) {
	e := getTestBackend(t)
	require.Equal(t, float64(0), e.read(t, "cache-config").data["size"])
	requireStatus(t, e.write(t, "cache-config", map[string]interface{}{"size": 5}), 400, "size must be 0 or a value greater or equal to 10")
	requireStatus(t, e.write(t, "cache-config", map[string]interface{}{"size": -1}), 400, "size must be 0 or a value greater or equal to 10")
	require.Equal(t, float64(0), e.read(t, "cache-config").data["size"], "a refused size is not stored")
	require.Equal(t, float64(20), e.mustWrite(t, "cache-config", map[string]interface{}{"size": 20})["size"])
	require.Equal(t, float64(20), e.read(t, "cache-config").data["size"])
	require.Equal(t, 20, e.b.cacheSize())

	// A bounded cache evicts keys; they load again from storage.
	name := func(i int) string { return "k" + string(rune('a'+i%26)) + string(rune('a'+i/26)) }
	for i := 0; i < 40; i++ {
		e.mustWrite(t, "keys/"+name(i), nil)
	}
	ct := e.encrypt(t, "kaa", "still here", nil)
	require.True(t, policyCached(t, e, "kaa"), "kaa is cached once used")
	for i := 1; i < 40; i++ {
		e.encrypt(t, name(i), "x", nil)
	}
	require.False(t, policyCached(t, e, "kaa"), "39 keys used since kaa: the cache of 20 evicted it")
	require.True(t, policyCached(t, e, name(39)), "the key used last is cached")
	require.LessOrEqual(t, lruLen(e.b.aeads.c), 20)
	require.LessOrEqual(t, lruLen(e.b.lifecycle.cache), 20)
	require.Equal(t, "still here", e.decrypt(t, "kaa", ct, nil))
	require.True(t, policyCached(t, e, "kaa"), "kaa loaded again from storage")
}

// TestCacheResizeAppliesToPerKeyCaches fills every per-key cache while the
// cache is unbounded, then bounds it: the caches that already hold keys
// shrink to the new size at once, and stay within it as more keys are used;
// made unbounded again they grow past it.
func TestCacheResizeAppliesToPerKeyCaches(t *testing.T) {
	e := getTestBackend(t)
	const soft, hsmKeys, size = 30, 25, 10
	for i := 0; i < soft; i++ {
		e.encrypt(t, fmt.Sprintf("soft-%d", i), "x", nil) // upserts
	}
	for i := 0; i < hsmKeys; i++ {
		k := fmt.Sprintf("hsm-%d", i)
		e.mustWrite(t, "keys/"+k, map[string]interface{}{"hsm": true})
		e.encrypt(t, k, "x", nil)
	}
	// Unbounded: every key is held (the positive control).
	require.Equal(t, soft, lruLen(e.b.aeads.c), "one AEAD per software key version")
	require.Equal(t, hsmKeys, e.b.hsmKeys.CacheLen())
	require.Equal(t, soft+hsmKeys, lruLen(e.b.lifecycle.cache))

	e.mustWrite(t, "cache-config", map[string]interface{}{"size": size})
	require.Equal(t, size, lruLen(e.b.aeads.c), "the AEAD cache shrinks to the new size")
	require.Equal(t, size, e.b.hsmKeys.CacheLen(), "the HSM key cache shrinks to the new size")
	require.Equal(t, size, lruLen(e.b.lifecycle.cache), "the lifecycle cache shrinks to the new size")

	cts := map[string]string{}
	for i := 0; i < soft; i++ {
		k := fmt.Sprintf("soft-%d", i)
		cts[k] = e.encrypt(t, k, "again "+k, nil)
	}
	for i := 0; i < hsmKeys; i++ {
		k := fmt.Sprintf("hsm-%d", i)
		cts[k] = e.encrypt(t, k, "again "+k, nil)
	}
	require.Equal(t, size, lruLen(e.b.aeads.c))
	require.Equal(t, size, e.b.hsmKeys.CacheLen())
	require.Equal(t, size, lruLen(e.b.lifecycle.cache))
	for k, ct := range cts {
		require.Equal(t, "again "+k, e.decrypt(t, k, ct, nil), "evicted keys load again")
	}

	e.mustWrite(t, "cache-config", map[string]interface{}{"size": 0})
	for k, ct := range cts {
		require.Equal(t, "again "+k, e.decrypt(t, k, ct, nil))
	}
	require.Equal(t, soft, lruLen(e.b.aeads.c), "unbounded again: every key is held")
	require.Equal(t, hsmKeys, e.b.hsmKeys.CacheLen())
	require.Equal(t, soft+hsmKeys, lruLen(e.b.lifecycle.cache))
}
