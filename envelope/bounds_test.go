package envelope

import (
	"errors"
	"strings"
	"testing"
)

// Every bound of the header at its limit and one past it.

func TestHintBounds(t *testing.T) {
	longest := strings.Repeat("k", maxHintLen)
	if err := checkHint("key", longest); err != nil {
		t.Fatalf("a key name of %d bytes: %v", maxHintLen, err)
	}
	if err := checkHint("key", longest+"k"); !errors.Is(err, ErrFormat) {
		t.Fatalf("a key name of %d bytes: %v", maxHintLen+1, err)
	}
	if err := checkHint("key", ""); !errors.Is(err, ErrFormat) {
		t.Fatalf("an empty key name: %v", err)
	}
	// Each end of each range of name bytes, and the byte past it.
	for _, ok := range []string{"0", "9", "a", "z", "A", "Z", "_", "a.b", "a@b", "a-b", "_x_"} {
		if !vaultName(ok) {
			t.Errorf("%q refused", ok)
		}
	}
	for _, bad := range []string{"/", ":", "`", "{", "@", "[", "a/b", "a:b", "a`b", "a{b", "a[b", ".a", "a.", "-a", "a-", "@a", "a@", "a b", "é"} {
		if vaultName(bad) {
			t.Errorf("%q accepted", bad)
		}
	}
	// The message says how a mount is made.
	if err := checkHint("mount", "a//b"); err == nil || !strings.Contains(err.Error(), "in segments joined by /") {
		t.Errorf("mount message: %v", err)
	}
	if err := checkHint("key", "a/b"); err == nil || strings.Contains(err.Error(), "segments") {
		t.Errorf("key message: %v", err)
	}
}

func TestWrappedBytes(t *testing.T) {
	if err := checkWrapped(wrappedPfx + "1:!~"); err != nil {
		t.Fatalf("the printable ends: %v", err)
	}
	for _, bad := range []string{wrappedPfx + "1: x", wrappedPfx + "1:\x7f", wrappedPfx + "1:\x20", "vault:x1:abc"} {
		if checkWrapped(bad) == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func boundsHeader(recipients, contextLen, wrappedLen, capacity int) *Header {
	h := &Header{Version: Version, SegmentSize: MinSegmentSize, Salt: make([]byte, saltLen), Context: make([]byte, contextLen)}
	for range recipients {
		h.Recipients = append(h.Recipients, Recipient{Mount: "transit", Key: "k", Wrapped: wrappedPfx + "1:" + strings.Repeat("A", wrappedLen-len(wrappedPfx)-2), SlotCapacity: capacity})
	}
	return h
}

func TestMarshalBounds(t *testing.T) {
	for _, c := range []struct {
		name                      string
		recipients, ctx, wl, capa int
		want                      error
	}{
		{"longest context", 1, MaxContextLen, 20, 20, nil},
		{"context one too long", 1, MaxContextLen + 1, 20, 20, ErrFormat},
		{"most recipients", MaxRecipients, 0, 20, 20, nil},
		{"one recipient too many", MaxRecipients + 1, 0, 20, 20, ErrFormat},
		{"no recipient", 0, 0, 20, 20, ErrFormat},
		{"wrapped key filling its slot", 1, 0, 40, 40, nil},
		{"wrapped key one past its slot", 1, 0, 41, 40, ErrSlotFull},
		{"largest slot", 1, 0, 40, MaxSlotCapacity, nil},
		{"slot one too large", 1, 0, 40, MaxSlotCapacity + 1, ErrSlotFull},
	} {
		_, err := boundsHeader(c.recipients, c.ctx, c.wl, c.capa).marshal()
		if c.want == nil && err != nil || c.want != nil && !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
}
