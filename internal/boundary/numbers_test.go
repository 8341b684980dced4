package boundary

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestNumbersFit: numbersFit refuses exactly the valid JSON texts with a
// number encoding/json cannot decode into an interface{} (out of a
// float64's range), wherever the number is, and is not misled by numbers'
// look-alikes inside strings, escaped quotes among them.
func TestNumbersFit(t *testing.T) {
	long := "1" + strings.Repeat("0", 308) // 1e308 written out: fits
	tooLong := long + "0"                  // 1e309: does not
	for _, text := range []string{
		`[]`, `[{}]`, `[1, -2.5, 0, 3e2, 1E-400, -0.0e+1]`,
		`[1e308]`, `[1e309]`, `[-1e309]`, `[1E400]`, `[{"a":1e400}]`, `[{"a":[{"b":-2e999}]}]`,
		`[` + long + `]`, `[` + tooLong + `]`, `[-` + tooLong + `]`, `[` + tooLong + `.5]`,
		`["1e400"]`, `[{"1e400":"x"}]`, `["\"1e400"]`, `["\\", 1e400]`, `["\\\"", 5]`,
		`["a\"b", "c\\\\", 1e999]`, `["\u0022 1e999"]`, `[{"x":"` + tooLong + `"}]`,
		`[true, false, null, "x", 7]`,
		// Out-of-range look-alikes at every offset into a string, so that
		// a jump that lands short of the closing quote reads one.
		`["a1e400"]`, `["ab1e400"]`, `["abc1e400"]`, `["abcd1e400"]`, `[{"k":"ab-1e999"}]`,
	} {
		var v interface{}
		want := json.Unmarshal([]byte(text), &v) == nil
		if got := numbersFit([]byte(text)); got != want {
			t.Errorf("numbersFit(%.60q) = %v; encoding/json decodes it: %v", text, got, want)
		}
	}
}
