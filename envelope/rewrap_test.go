package envelope

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func writeTemp(t *testing.T, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "file.hte")
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func rewrapFile(t *testing.T, path string, ks KeyService) (bool, error) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return Rewrap(context.Background(), f, ks)
}

func TestRewrapInPlace(t *testing.T) {
	ks := newMemKS()
	pt := randBytes(t, 3*MinSegmentSize+9)
	orig := encrypt(t, WriterOptions{KeyService: ks, Recipients: []KeyRef{refA, refB}, SegmentSize: MinSegmentSize, AAD: []byte("a")}, pt)
	h0, _ := ParseHeader(bytes.NewReader(orig))
	path := writeTemp(t, orig)

	changed, err := rewrapFile(t, path, ks)
	if err != nil || changed {
		t.Fatalf("no rotation: changed %v, err %v; want false, nil", changed, err)
	}

	ks.rotate(refA.Mount, refA.Key, 9)
	ks.rotate(refB.Mount, refB.Key, 10) // "v10" is one byte longer than "v1"
	ks.pad = 40
	ks.calls.Store(0)
	changed, err = rewrapFile(t, path, ks)
	if err != nil || !changed {
		t.Fatalf("after rotation: changed %v, err %v; want true, nil", changed, err)
	}
	if n := ks.calls.Load(); n != 2 {
		t.Fatalf("%d key service calls, want 2 (one rewrap per recipient)", n)
	}
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != len(orig) {
		t.Fatalf("size changed: %d -> %d", len(orig), len(after))
	}
	if !bytes.Equal(after[h0.HeaderLength:], orig[h0.HeaderLength:]) {
		t.Fatal("body changed")
	}
	h1, err := ParseHeader(bytes.NewReader(after))
	if err != nil {
		t.Fatal(err)
	}
	if v := h1.Recipients[0].KeyVersion(); v != 9 {
		t.Fatalf("recipient 0 at version %d, want 9", v)
	}
	if v := h1.Recipients[1].KeyVersion(); v != 10 {
		t.Fatalf("recipient 1 at version %d, want 10", v)
	}
	if !bytes.Equal(h1.tag, h0.tag) {
		t.Fatal("the tag changed; rewrap must not need it to")
	}
	// Each recipient alone still decrypts.
	for _, refuse := range []string{refA.Mount, refB.Mount} {
		ks.refuse = map[string]bool{refuse: true}
		got, err := decrypt(after, ReaderOptions{KeyService: ks, AAD: []byte("a")})
		if err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("after rewrap, %s refused: %v", refuse, err)
		}
	}
}

func TestRewrapTooLongLeavesFileUntouched(t *testing.T) {
	ks := newMemKS()
	pt := randBytes(t, 100)
	orig := encrypt(t, WriterOptions{KeyService: ks, Recipients: []KeyRef{refA, refB}, SegmentSize: MinSegmentSize, SlotHeadroom: 8}, pt)
	path := writeTemp(t, orig)
	// The first recipient's new key fits; the second's does not: nothing is written.
	ks.rotate(refA.Mount, refA.Key, 2)
	ks.rotate(refB.Mount, refB.Key, 2)
	ks.pad = 20
	changed, err := rewrapFile(t, path, ks)
	if !errors.Is(err, ErrSlotFull) || changed {
		t.Fatalf("changed %v, err %v; want false, ErrSlotFull", changed, err)
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(after, orig) {
		t.Fatal("file modified by a refused rewrap")
	}
}

func TestRewrapErrors(t *testing.T) {
	ks := newMemKS()
	orig := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, []byte("x"))
	path := writeTemp(t, orig)
	ks.refuse[refA.Mount] = true
	if _, err := rewrapFile(t, path, ks); !errors.Is(err, errDenied) {
		t.Fatalf("refused: %v", err)
	}
	bad := writeTemp(t, []byte("not an envelope at all, just text"))
	if _, err := rewrapFile(t, bad, ks); !errors.Is(err, ErrFormat) {
		t.Fatalf("not an envelope: %v", err)
	}
}
