package hsmtransit

import (
	"encoding/json"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/boundary"
)

// wireCorpus holds batch_input objects: the common shapes (read without a
// map) and those fromWire must leave to the map path (escapes, non-ASCII,
// values of the wrong type, odd key_versions, repeated keys).
var wireCorpus = []string{
	`{"plaintext":"aGVsbG8="}`,
	`{"plaintext":"aGVsbG8=","reference":"r-1","key_version":2,"context":"Y3R4","nonce":"","associated_data":"YWQ="}`,
	`{"ciphertext":"vault:v1:abc+/=","iv":"aXY=","padding_scheme":"oaep","encrypt_padding_scheme":"pss","decrypt_padding_scheme":"oaep"}`,
	` { "plaintext" : "eA==" , "key_version" : -3 } `,
	`{"plaintext":null,"reference":null,"key_version":null}`,
	`{"plaintext":"eA==","plaintext":null}`,
	`{"plaintext":null,"plaintext":"eA=="}`,
	`{"plaintext":"eA==","plaintext":5}`,
	`{"plaintext":5,"plaintext":"eA=="}`,
	`{"Plaintext":"eA=="}`,
	`{"PLAINTEXT":"eA==","reference":"x"}`,
	`{}`,
	`{"reference":"no plaintext"}`,
	`{"plaintext":"eA==","unknown":{"a":[1,2,{"b":null}]},"other":[true,false]}`,
	`{"plaintext":"\u0065A=="}`,
	`{"plaintext":"eA==","reference":"caf\u00e9"}`,
	`{"plaintext":"eA==","reference":"café"}`,
	`{"plaintext":"eA==","reference":"\ud800"}`,
	`{"plaintext":"eA==","reference":"<&>"}`,
	`{"plain\u0074ext":"eA=="}`,
	`{"plaintext":true}`,
	`{"plaintext":["eA=="]}`,
	`{"plaintext":{"a":"b"}}`,
	`{"plaintext":1.5}`,
	`{"plaintext":"eA==","key_version":1.0}`,
	`{"plaintext":"eA==","key_version":1.5}`,
	`{"plaintext":"eA==","key_version":1e2}`,
	`{"plaintext":"eA==","key_version":"2"}`,
	`{"plaintext":"eA==","key_version":"x"}`,
	`{"plaintext":"eA==","key_version":true}`,
	`{"plaintext":"eA==","key_version":-0}`,
	`{"plaintext":"eA==","key_version":123456789012345}`,
	`{"plaintext":"eA==","key_version":999999999999999}`,
	`{"plaintext":"eA==","key_version":9007199254740993}`, // 16 digits, above 2^53: rounded as a float64
	`{"plaintext":"eA==","key_version":-9007199254740993}`,
	`{"plaintext":"eA==","key_version":1234567890123456789}`,
	`{"plaintext":"eA==","key_version":99999999999999999999999}`,
	`{"plaintext":"eA==","key_version":2,"key_version":null}`,
	`{"plaintext":"` + strings.Repeat("QUJD", 300) + `"}`,
	`{"plaintext":"eA==","n":-1.5e3,"t":true,"f":false,"z":null,"s":"x"}`,
	`{"plaintext":"eA==","key_version":null,"key_version":3}`,
	`{"plaintext":"eA==","key_version":3,"key_version":null}`,
	`{"plaintext":"eA==","reference":"a","reference":null}`,
	`{"plaintext":"eA==","reference":null,"reference":"b"}`,
	`{"ciphertext":null}`,
	`{"":"empty key","plaintext":"eA=="}`,
	`{ }`,
	"{\t\"plaintext\"\r\n:\n\"eA==\"\t}",
	`{"plaintext":"eA==","key_version":-12}`,
	`{"plaintext":"eA==","key_version":0}`,
	`{"plaintext":"eA==","key_version":1,"reference":"r","context":"","nonce":null}`,
}

// decodeBothWays runs decodeBatchInput on obj twice: as the map the SDK
// would decode (encoding/json) and as the raw object the interceptor hands
// over; it reports whether obj is a JSON object at all.
func decodeBothWays(t testing.TB, objs []string, required string) (bool, []batchItem, error, []batchItem, error) {
	maps := make([]interface{}, len(objs))
	raws := make([]interface{}, len(objs))
	for i, obj := range objs {
		var m map[string]interface{}
		if err := json.Unmarshal([]byte(obj), &m); err != nil || m == nil {
			return false, nil, nil, nil, nil
		}
		maps[i] = m
		o := boundary.RawObject(strings.TrimSpace(obj))
		raws[i] = &o
	}
	wantItems, wantErr := decodeBatchInput(maps, required, "missing it")
	gotItems, gotErr := decodeBatchInput(raws, required, "missing it")
	return true, wantItems, wantErr, gotItems, gotErr
}

// TestWireItemsAreTheMapsItems: decodeBatchInput gives the same items and
// the same error whether an item comes as a map or as the body's bytes,
// alone and as a batch of every corpus object, for each required field.
func TestWireItemsAreTheMapsItems(t *testing.T) {
	var fast int
	for _, required := range []string{"plaintext", "ciphertext", ""} {
		for _, obj := range wireCorpus {
			ok, want, wantErr, got, gotErr := decodeBothWays(t, []string{obj}, required)
			require.True(t, ok, obj)
			require.Equal(t, wantErr, gotErr, "%s (required %q)", obj, required)
			require.Equal(t, want, got, "%s (required %q)", obj, required)
			var it batchItem
			if _, ok := it.fromWire([]byte(strings.TrimSpace(obj)), required); ok {
				fast++
			}
		}
		ok, want, wantErr, got, gotErr := decodeBothWays(t, wireCorpus, required)
		require.True(t, ok)
		require.Equal(t, wantErr, gotErr, "required %q", required)
		require.Equal(t, want, got, "required %q", required)
	}
	// The corpus exercises both paths: the common shapes are read without
	// a map, the others are not.
	require.Greater(t, fast, 3*10)
	require.Less(t, fast, 3*len(wireCorpus)-3*10)
}

// TestWireTakesTheCommonShapes: fromWire reads without a map exactly what
// its doc promises to (plain ASCII strings, null, plain integers of up to
// 15 digits for key_version, scalars in fields it does not know), and
// leaves the rest to the map path. Both give the same items
// (TestWireItemsAreTheMapsItems); this is about which one does the work: a
// check that refused a common shape by mistake would cost the fast path
// silently.
func TestWireTakesTheCommonShapes(t *testing.T) {
	for obj, fast := range map[string]bool{
		`{"plaintext":"aGVsbG8="}`: true,
		`{"plaintext":"aGVsbG8=","reference":"r-1","key_version":2,"context":"Y3R4","nonce":"","associated_data":"YWQ="}`: true,
		` { "plaintext" : "eA==" , "key_version" : -3 } `:                                                                 true,
		"{\t\"plaintext\"\r\n:\n\"eA==\"\t}":                                                                              true,
		`{"plaintext":null,"reference":null,"key_version":null}`:                                                          true,
		`{"plaintext":"eA==","plaintext":null}`:                                                                           true,
		`{}`:                                                                                                              true,
		` { } `:                                                                                                           true,
		`{"reference":"no plaintext"}`:                                                                                    true,
		`{"plaintext":"eA==","n":-1.5e3,"t":true,"f":false,"z":null,"s":"x"}`:                                             true,
		`{"plaintext":"eA==","key_version":0}`:                                                                            true,
		`{"plaintext":"eA==","key_version":-0}`:                                                                           true,
		`{"plaintext":"eA==","key_version":9}`:                                                                            true,
		`{"plaintext":"eA==","key_version":10}`:                                                                           true,
		`{"plaintext":"eA==","key_version":-12}`:                                                                          true,
		`{"plaintext":"eA==","key_version":123456789012345}`:                                                              true,
		`{"plaintext":"eA==","key_version":999999999999999}`:                                                              true,
		`{"":"empty key","plaintext":"eA=="}`:                                                                             true,
		`{"plaintext":"eA==","reference":" !#~"}`:                                                                         true,

		`{"plaintext":"\u0065A=="}`:                            false,
		`{"plaintext":"eA==","reference":"café"}`:              false,
		`{"plaintext":true}`:                                   false,
		`{"plaintext":1.5}`:                                    false,
		`{"plaintext":["eA=="]}`:                               false,
		`{"plaintext":{"a":"b"}}`:                              false,
		`{"plaintext":"eA==","unknown":{"a":1}}`:               false,
		`{"plaintext":"eA==","unknown":[1]}`:                   false,
		`{"plaintext":"eA==","key_version":1.0}`:               false,
		`{"plaintext":"eA==","key_version":1e2}`:               false,
		`{"plaintext":"eA==","key_version":"2"}`:               false,
		`{"plaintext":"eA==","key_version":true}`:              false,
		`{"plaintext":"eA==","key_version":1234567890123456}`:  false,
		`{"plaintext":"eA==","key_version":-9007199254740993}`: false,
	} {
		var it batchItem
		_, ok := it.fromWire([]byte(strings.TrimSpace(obj)), "plaintext")
		require.Equal(t, fast, ok, "%s", obj)
		if !ok {
			require.Equal(t, batchItem{}, it, "%s: an item left to the map path is left zero", obj)
		}
	}
}

// FuzzWireItems: for any JSON object, an item read from the body's bytes is
// the item read from encoding/json's map, with the same error.
func FuzzWireItems(f *testing.F) {
	for _, obj := range wireCorpus {
		f.Add(obj)
	}
	f.Fuzz(func(t *testing.T, obj string) {
		for _, required := range []string{"plaintext", "ciphertext", ""} {
			ok, want, wantErr, got, gotErr := decodeBothWays(t, []string{obj}, required)
			if !ok {
				return
			}
			if !reflect.DeepEqual(wantErr, gotErr) || !reflect.DeepEqual(want, got) {
				t.Fatalf("%q (required %q):\nmap  %#v %v\nwire %#v %v", obj, required, want, wantErr, got, gotErr)
			}
		}
	})
}

// TestForEachRunPartitions: forEachRun hands f every index of [0, n)
// exactly once, in runs of 1 to itemRun contiguous indexes (never an empty
// one), in order when the batch is small or there is one worker.
func TestForEachRunPartitions(t *testing.T) {
	for _, n := range []int{0, 1, itemRun - 1, itemRun, itemRun + 1, parallelThreshold - 1, parallelThreshold, parallelThreshold + 1, 1000} {
		for _, workers := range []int{1, 2, 16} {
			var mu sync.Mutex
			var runs [][2]int
			seen := make([]int, n)
			forEachRun(n, workers, func(start, end int) {
				mu.Lock()
				defer mu.Unlock()
				runs = append(runs, [2]int{start, end})
				for i := start; i < end; i++ {
					seen[i]++
				}
			})
			for _, r := range runs {
				require.Greater(t, r[1], r[0], "n=%d workers=%d: an empty run %v", n, workers, r)
				require.LessOrEqual(t, r[1]-r[0], itemRun, "n=%d workers=%d: run %v", n, workers, r)
			}
			for i, c := range seen {
				require.Equal(t, 1, c, "n=%d workers=%d: index %d handed %d times", n, workers, i, c)
			}
			require.Equal(t, (n+itemRun-1)/itemRun, len(runs), "n=%d workers=%d", n, workers)
			if n < parallelThreshold || workers == 1 {
				for k := 1; k < len(runs); k++ {
					require.Equal(t, runs[k-1][1], runs[k][0], "n=%d workers=%d: runs out of order", n, workers)
				}
			}
		}
	}
}
