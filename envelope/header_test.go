package envelope

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestParseKeyRef(t *testing.T) {
	for in, want := range map[string]KeyRef{
		"transit/backups":           {"transit", "backups"},
		"/team/transit/backups/":    {"team/transit", "backups"},
		"a/b/c/key-with.dots_and-x": {"a/b/c", "key-with.dots_and-x"},
		"ns1/transit/k@v2":          {"ns1/transit", "k@v2"},
	} {
		got, err := ParseKeyRef(in)
		if err != nil || got != want {
			t.Errorf("ParseKeyRef(%q) = %+v, %v; want %+v", in, got, err, want)
		}
		if _, err := ParseKeyRef(got.String()); err != nil {
			t.Errorf("%q does not parse back", got)
		}
	}
	for _, bad := range []string{"", "backups", "/backups", "transit/", "tr\x00ansit/k", "transit/..", "transit/../k", "a//b/k", "transit/k-", "transit/.k", "transit/k?x", "transit/k%2e", "transit/k\u202e", "transit/" + strings.Repeat("k", 256)} {
		if _, err := ParseKeyRef(bad); err == nil {
			t.Errorf("ParseKeyRef(%q) accepted", bad)
		}
	}
}

func TestParseHeaderForInspect(t *testing.T) {
	ks := newMemKS()
	ks.rotate(refB.Mount, refB.Key, 10)
	file := encrypt(t, WriterOptions{KeyService: ks, Recipients: []KeyRef{refA, refB}, SegmentSize: 8192, Context: []byte{1, 2}, SlotHeadroom: 100}, []byte("x"))
	r := bytes.NewReader(file)
	h, err := ParseHeader(r)
	if err != nil {
		t.Fatal(err)
	}
	if rest := r.Len(); rest != 1+gcmTagLen {
		t.Fatalf("ParseHeader left %d bytes, want the body's %d", rest, 1+gcmTagLen)
	}
	if h.Version != 1 || h.SegmentSize != 8192 || len(h.Salt) != 32 || h.HeaderLength != len(file)-1-gcmTagLen {
		t.Fatalf("header %+v", h)
	}
	for i, want := range []struct {
		ref KeyRef
		ver int
	}{{refA, 1}, {refB, 10}} {
		rc := h.Recipients[i]
		if rc.KeyRef() != want.ref || rc.KeyVersion() != want.ver || rc.SlotCapacity != len(rc.Wrapped)+100 {
			t.Fatalf("recipient %d: %+v", i, rc)
		}
	}
	out, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		FormatVersion int    `json:"format_version"`
		SegmentSize   int    `json:"segment_size"`
		Context       string `json:"context"`
		Recipients    []struct {
			Mount, Key string
			Wrapped    string `json:"wrapped_key"`
			KeyVersion int    `json:"key_version"`
		}
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatal(err)
	}
	if got.FormatVersion != 1 || got.SegmentSize != 8192 || got.Context != "AQI=" || len(got.Recipients) != 2 ||
		got.Recipients[1].Mount != refB.Mount || got.Recipients[1].KeyVersion != 10 ||
		!strings.HasPrefix(got.Recipients[1].Wrapped, "vault:v10:") {
		t.Fatalf("JSON %s", out)
	}
}

func TestParseHeaderRejects(t *testing.T) {
	ks := newMemKS()
	file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, []byte("x"))
	h, _ := ParseHeader(bytes.NewReader(file))
	set := func(off int, b ...byte) []byte { c := bytes.Clone(file); copy(c[off:], b); return c }
	for name, c := range map[string]struct {
		data []byte
		kind error
	}{
		"bad magic":         {set(0, 'X'), ErrFormat},
		"version 2":         {set(7, 2), ErrFormat},
		"huge header":       {set(8, 0x7f, 0, 0, 0), ErrFormat},
		"header too short":  {set(8, 0, 0, 0, 10), ErrFormat},
		"segment too small": {set(12, 0, 0, 0x0f, 0xff), ErrFormat},
		"segment too large": {set(12, 1, 0, 0, 1), ErrFormat},
		"no recipients":     {set(fixedLen+2, 0), ErrFormat},
		"padding not zero":  {set(h.Recipients[0].lenOff+2+len(h.Recipients[0].Wrapped)+3, 1), ErrFormat},
		"wrapped too long":  {set(h.Recipients[0].lenOff, 0xff, 0xff), ErrFormat},
		"wrapped empty":     {set(h.Recipients[0].lenOff, 0, 0), ErrFormat},
		"not vault prefix":  {set(h.Recipients[0].lenOff+2, 'X'), ErrFormat},
		"cut":               {file[:fixedLen+1], ErrTruncated},
	} {
		if _, err := ParseHeader(bytes.NewReader(c.data)); !errors.Is(err, c.kind) {
			t.Errorf("%s: %v, want %v", name, err, c.kind)
		}
	}
}
