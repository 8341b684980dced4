package hsmtransit

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestCacheConfig(t *testing.T) {
	e := getTestBackend(t)
	require.Equal(t, float64(0), e.read(t, "cache-config").data["size"])
	requireStatus(t, e.write(t, "cache-config", map[string]interface{}{"size": 5}), 400, "size must be 0 or a value greater or equal to 10")
	requireStatus(t, e.write(t, "cache-config", map[string]interface{}{"size": -1}), 400, "")
	require.Equal(t, float64(20), e.mustWrite(t, "cache-config", map[string]interface{}{"size": 20})["size"])
	require.Equal(t, float64(20), e.read(t, "cache-config").data["size"])
	require.Equal(t, 20, e.b.cacheSize())

	// A bounded cache evicts keys; they load again from storage.
	for i := 0; i < 40; i++ {
		e.mustWrite(t, "keys/k"+string(rune('a'+i%26))+string(rune('a'+i/26)), nil)
	}
	ct := e.encrypt(t, "kaa", "still here", nil)
	for i := 1; i < 40; i++ {
		e.encrypt(t, "k"+string(rune('a'+i%26))+string(rune('a'+i/26)), "x", nil)
	}
	require.Equal(t, "still here", e.decrypt(t, "kaa", ct, nil))
}
