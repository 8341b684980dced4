package hsmtransit

import (
	"math"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"
)

// The inputs a fuzz run through Vault found coerced by the SDK's weak
// decoding (issue 12), each sent as an external plugin receives it (a JSON
// number as float64): a 400 naming the field, and nothing changed.
func TestNumbersAreNotCoercedIntoBoolsAndInts(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	ct := e.encrypt(t, "k", "x", nil)
	cases := []struct {
		name, path string
		data       map[string]interface{}
		msg        string
	}{
		{"exportable=0.5", "keys/k/config", map[string]interface{}{"exportable": 0.5}, "exportable: must be true or false, not 0.5"},
		{"exportable=0.5 at creation", "keys/new", map[string]interface{}{"exportable": 0.5}, "exportable: must be true or false"},
		{"deletion_allowed=-1", "keys/k/config", map[string]interface{}{"deletion_allowed": -1.0}, "deletion_allowed: must be true or false, not -1"},
		{"derived=2", "keys/new", map[string]interface{}{"derived": 2.0}, "derived: must be true or false, not 2"},
		{"convergent_encryption=-1", "keys/new", map[string]interface{}{"convergent_encryption": -1.0}, "convergent_encryption: must be true or false"},
		{"generate_key=2", "config/seal", map[string]interface{}{"generate_key": 2.0}, "generate_key: must be true or false, not 2"},
		{"generate_key=1.5", "config/seal", map[string]interface{}{"generate_key": 1.5}, "generate_key: must be true or false, not 1.5"},
		{"generate_key=null", "config/seal", map[string]interface{}{"generate_key": nil}, "generate_key: must be true or false, not null"},
		{"key_version=1.5", "encrypt/k", map[string]interface{}{"plaintext": b64("x"), "key_version": 1.5}, "key_version: must be a whole number"},
		{"bits=128.5", "datakey/plaintext/k", map[string]interface{}{"bits": 128.5}, "bits: must be a whole number"},
		{"shares=5.5", "seal/recovery/init", map[string]interface{}{"shares": 5.5}, "shares: must be a whole number"},
		{"shares=2^63", "seal/recovery/init", map[string]interface{}{"shares": math.Pow(2, 63)}, "shares: must be a whole number (at most 2^53 in size)"},
		{"pending_days=7.5", "keys/k/schedule-deletion", map[string]interface{}{"pending_days": 7.5}, "pending_days: must be a whole number"},
		{"slot=2^63-1", "config/seal", map[string]interface{}{"slot": math.Pow(2, 63) - 1}, "slot: must be a whole number"},
		{"min_decryption_version=true", "keys/k/config", map[string]interface{}{"min_decryption_version": true}, "min_decryption_version: must be a whole number"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			requireStatus(t, e.write(t, tc.path, tc.data), 400, tc.msg)
		})
	}
	// Nothing changed: the key is neither exportable nor deletable nor
	// scheduled, no key was created, the seal is as it was.
	k := e.read(t, "keys/k").data
	require.Equal(t, false, k["exportable"])
	require.Equal(t, false, k["deletion_allowed"])
	require.Nil(t, k["deletion_time"])
	requireStatus(t, e.read(t, "keys/new"), 404, "")
	require.Equal(t, false, e.read(t, "seal/status").data["recovery_initialized"])
	require.Equal(t, "x", e.decrypt(t, "k", ct, nil))

	// The forms built-in transit accepts stay accepted.
	for _, ok := range []interface{}{true, false, "true", "false", "1", "0", "t", 1.0, 0.0} {
		requireStatus(t, e.write(t, "keys/k/config", map[string]interface{}{"allow_plaintext_backup": ok}), 200, "")
	}
	for _, ok := range []interface{}{1.0, "1", 1} {
		requireStatus(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x"), "key_version": ok}), 200, "")
	}
}

func TestStrictParsers(t *testing.T) {
	for _, v := range []interface{}{true, false, "true", "TRUE", "0", 0.0, 1.0, 1, int64(0)} {
		require.NoError(t, strictBool(v), "%#v", v)
	}
	for _, v := range []interface{}{nil, 0.5, -1.0, 2.0, "yes", "", []interface{}{}, map[string]interface{}{}} {
		require.Error(t, strictBool(v), "%#v", v)
	}
	for _, v := range []interface{}{0.0, -3.0, 7, int64(1 << 40), "7", "0x10", float64(1 << 53)} {
		require.NoError(t, strictInt(v), "%#v", v)
	}
	for _, v := range []interface{}{nil, 1.5, true, "7.5", "", math.Pow(2, 63), math.NaN(), math.Inf(1), []interface{}{}} {
		require.Error(t, strictInt(v), "%#v", v)
	}
}

// FuzzStrictInt: whatever a JSON number or string is, strictInt accepts it
// only if it is a whole number that an int64 holds exactly.
func FuzzStrictInt(f *testing.F) {
	for _, s := range []float64{0, 1.5, -1, 1 << 53, 1<<53 + 2, math.MaxFloat64} {
		f.Add(s, "")
	}
	f.Add(0.0, "7")
	f.Add(0.0, "7.5")
	f.Fuzz(func(t *testing.T, n float64, s string) {
		if err := strictInt(n); err == nil {
			require.Equal(t, n, math.Trunc(n))
			require.LessOrEqual(t, math.Abs(n), float64(maxExactInt))
			require.Equal(t, n, float64(int64(n)))
		}
		if err := strictInt(s); err == nil {
			require.NotEmpty(t, s)
		}
	})
}

// FuzzStrictBool: strictBool accepts a string only if strconv.ParseBool
// reads it, and a number only if it is 0 or 1.
func FuzzStrictBool(f *testing.F) {
	for _, s := range []string{"true", "1", "0.5", "", "yes", "TRUE"} {
		f.Add(s, 0.5)
	}
	f.Add("x", 1.0)
	f.Fuzz(func(t *testing.T, s string, n float64) {
		if strictBool(s) == nil {
			_, err := strconv.ParseBool(s)
			require.NoError(t, err)
		}
		if strictBool(n) == nil {
			require.True(t, n == 0 || n == 1, "%v", n)
		}
	})
}
