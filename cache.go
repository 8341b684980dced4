package hsmtransit

import (
	"math"

	lru "github.com/hashicorp/golang-lru/v2"
)

// keyCache is a per-key cache bounded like the policy cache: by
// cache-config's size, or unbounded when that is 0. Everything the plugin
// keeps per key goes through one, so that memory follows the cache size and
// not the number of keys.
type keyCache[V any] struct {
	c *lru.Cache[string, V]
}

func newKeyCache[V any]() *keyCache[V] {
	c, err := lru.New[string, V](lruSize(0))
	if err != nil {
		panic(err) // only for a size below 1, which lruSize never gives
	}
	return &keyCache[V]{c: c}
}

// lruSize maps cache-config's size (0: unbounded) to an LRU capacity.
func lruSize(size int) int {
	if size <= 0 {
		return math.MaxInt32
	}
	return size
}

func (k *keyCache[V]) get(name string) (V, bool) { return k.c.Get(name) }

// addIfAbsent stores v unless another goroutine stored one first, and
// returns the one kept.
func (k *keyCache[V]) addIfAbsent(name string, v V) V {
	if prev, ok, _ := k.c.PeekOrAdd(name, v); ok {
		return prev
	}
	return v
}

func (k *keyCache[V]) add(name string, v V) { k.c.Add(name, v) }
func (k *keyCache[V]) remove(name string)   { k.c.Remove(name) }
func (k *keyCache[V]) purge()               { k.c.Purge() }
func (k *keyCache[V]) resize(size int)      { k.c.Resize(lruSize(size)) }
