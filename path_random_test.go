package hsmtransit

import (
	"encoding/base64"
	"encoding/hex"
	"testing"

	"github.com/stretchr/testify/require"
)

// rndBytes requests random bytes and decodes them with the expected format.
func rndBytes(t *testing.T, e *testEnv, path string, data map[string]interface{}, format string) ([]byte, result) {
	t.Helper()
	r := e.write(t, path, data)
	requireStatus(t, r, 200, "")
	s, ok := r.data["random_bytes"].(string)
	require.Truef(t, ok, "random_bytes in %#v", r.data)
	var raw []byte
	var err error
	switch format {
	case "hex":
		raw, err = hex.DecodeString(s)
	case "base64":
		raw, err = base64.StdEncoding.DecodeString(s)
	default:
		t.Fatalf("unknown test format %q", format)
	}
	require.NoErrorf(t, err, "%s random_bytes %q", format, s)
	return raw, r
}

func TestRandom(t *testing.T) {
	e := getTestBackend(t)
	cases := []struct {
		name, path string
		data       map[string]interface{}
		format     string
		n          int
		warning    string
	}{
		{"default", "random", nil, "base64", 32, ""},
		{"body bytes", "random", map[string]interface{}{"bytes": 10}, "base64", 10, ""},
		{"url bytes", "random/64", nil, "base64", 64, ""},
		{"url bytes win over body", "random/16", map[string]interface{}{"bytes": 48}, "base64", 16, ""},
		{"url source platform", "random/platform", nil, "base64", 32, ""},
		{"url source with body bytes", "random/platform", map[string]interface{}{"bytes": 20}, "base64", 20, ""},
		{"url source and bytes", "random/platform/16", nil, "base64", 16, ""},
		{"url source all", "random/all/24", nil, "base64", 24, ""},
		{"hex", "random", map[string]interface{}{"format": "hex"}, "hex", 32, ""},
		{"hex with url bytes", "random/7", map[string]interface{}{"format": "hex"}, "hex", 7, ""},
		{"one byte", "random", map[string]interface{}{"bytes": 1}, "base64", 1, ""},
		{"maximum", "random", map[string]interface{}{"bytes": 131072}, "base64", 131072, ""},
		{"url source seal", "random/seal", nil, "base64", 32, "no seal/entropy augmentation available, using platform entropy source"},
		{"url source seal and bytes", "random/seal/12", map[string]interface{}{"format": "hex"}, "hex", 12, "no seal/entropy augmentation available, using platform entropy source"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			raw, r := rndBytes(t, e, c.path, c.data, c.format)
			require.Len(t, raw, c.n)
			if c.warning == "" {
				require.Empty(t, r.resp.Warnings)
			} else {
				require.Contains(t, r.resp.Warnings, c.warning)
			}
		})
	}

	// As in built-in transit, source is a URL parameter: the framework
	// replaces a body source with the path's (empty) capture.
	t.Run("body source is replaced by the URL's", func(t *testing.T) {
		raw, r := rndBytes(t, e, "random", map[string]interface{}{"source": "seal"}, "base64")
		require.Len(t, raw, 32)
		require.NotContains(t, r.resp.Warnings, "no seal/entropy augmentation available, using platform entropy source")
		require.Len(t, r.resp.Warnings, 1)
		require.Contains(t, r.resp.Warnings[0], "[source]")
	})

	t.Run("two requests differ", func(t *testing.T) {
		a, _ := rndBytes(t, e, "random", nil, "base64")
		b, _ := rndBytes(t, e, "random", nil, "base64")
		require.NotEqual(t, a, b)
		require.NotEqual(t, make([]byte, 32), a)
	})
}

func TestRandomErrors(t *testing.T) {
	e := getTestBackend(t)
	cases := []struct {
		name, path string
		data       map[string]interface{}
		msg        string
	}{
		{"zero bytes", "random", map[string]interface{}{"bytes": 0}, `"bytes" cannot be less than 1`},
		{"negative bytes", "random", map[string]interface{}{"bytes": -5}, `"bytes" cannot be less than 1`},
		{"zero bytes in URL", "random/0", nil, `"bytes" cannot be less than 1`},
		{"too many bytes", "random", map[string]interface{}{"bytes": 131073}, `"bytes" should be less than 131072`},
		{"too many bytes in URL", "random/platform/131073", nil, `"bytes" should be less than 131072`},
		{"bad URL byte count", "random/abc", nil, "error parsing url-set byte count"},
		{"bad URL byte count after source", "random/platform/abc", nil, "error parsing url-set byte count"},
		{"bad format", "random", map[string]interface{}{"format": "base32"}, `unsupported encoding format "base32"`},
		{"bad format with URL bytes", "random/8", map[string]interface{}{"format": "binary"}, `unsupported encoding format "binary"`},
		{"unknown source", "random/hsm/16", nil, `unsupported entropy source "hsm"`},
		{"bytes not a number", "random", map[string]interface{}{"bytes": "many"}, "bytes"},
		{"empty format", "random", map[string]interface{}{"format": ""}, `unsupported encoding format ""`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			requireStatus(t, e.write(t, c.path, c.data), 400, c.msg)
		})
	}
}
