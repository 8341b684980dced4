package envelope

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"testing"
)

// fuzzFixture is one small file, its key service and its plaintext, built
// with a fixed key service and salt so that seeds and mutations stay
// reproducible.
func fuzzFixture() (*fixedKS, []byte, []byte) {
	ks := &fixedKS{
		dataKey: bytes.Repeat([]byte{7}, 32),
		wrapped: map[string]string{"transit/k": "vault:v1:ZnV6eg==", "transit/j": "vault:v2:ZnV6eg=="},
	}
	pt := make([]byte, 9000)
	for i := range pt {
		pt[i] = byte(i % 251)
	}
	var out bytes.Buffer
	w, err := NewWriter(context.Background(), &out, WriterOptions{
		KeyService: ks, Recipients: []KeyRef{{"transit", "k"}, {"transit", "j"}},
		SegmentSize: MinSegmentSize, SlotHeadroom: 3, Rand: bytes.NewReader(make([]byte, 32)),
	})
	if err == nil {
		_, err = w.Write(pt)
	}
	if err == nil {
		err = w.Close()
	}
	if err != nil {
		panic(err)
	}
	return ks, out.Bytes(), pt
}

// FuzzParseHeader: ParseHeader never panics, and what it accepts
// re-marshals to the same bytes (the encoding is canonical).
func FuzzParseHeader(f *testing.F) {
	_, file, _ := fuzzFixture()
	f.Add(file)
	f.Add(file[:60])
	f.Add([]byte("HSMTENV\x01"))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ParseHeader(bytes.NewReader(data))
		if err != nil {
			if !errors.Is(err, ErrFormat) && !errors.Is(err, ErrTruncated) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		c := h.clone()
		body, err := c.marshal()
		if err != nil {
			t.Fatalf("accepted header does not re-marshal: %v", err)
		}
		if !bytes.Equal(body, data[:h.HeaderLength-tagLen]) {
			t.Fatal("re-marshalled header differs")
		}
		if _, err := json.Marshal(h); err != nil {
			t.Fatal(err)
		}
	})
}

// FuzzReader: any mutation of a valid file either decrypts to the original
// plaintext (only possible when the mutation is in the second recipient's
// slot, which the first recipient does not read) or fails with a typed
// error, having released only whole segments of the original plaintext.
func FuzzReader(f *testing.F) {
	ks, file, pt := fuzzFixture()
	f.Add(uint16(0), byte(1), uint16(0), []byte(nil))
	f.Add(uint16(300), byte(0x80), uint16(100), []byte{1})
	f.Add(uint16(5000), byte(0), uint16(4000), []byte(nil))
	f.Fuzz(func(t *testing.T, pos uint16, mask byte, cut uint16, extra []byte) {
		m := bytes.Clone(file)
		if int(pos) < len(m) {
			m[pos] ^= mask
		}
		m = m[:len(m)-min(int(cut), len(m))]
		m = append(m, extra...)
		r, err := NewReader(context.Background(), bytes.NewReader(m), ReaderOptions{KeyService: ks, Concurrency: 2})
		var got []byte
		if err == nil {
			got, err = io.ReadAll(r)
			r.Close()
		}
		if bytes.Equal(m, file) || (err == nil && bytes.Equal(got, pt)) {
			if err != nil {
				t.Fatalf("unmodified file failed: %v", err)
			}
			return
		}
		if err == nil {
			t.Fatalf("modified file decrypted to %d bytes", len(got))
		}
		for _, k := range []error{ErrFormat, ErrAuth, ErrTruncated, ErrUnwrap} {
			if errors.Is(err, k) {
				if len(got)%MinSegmentSize != 0 || !bytes.Equal(got, pt[:len(got)]) {
					t.Fatalf("released %d bytes that are not verified segments", len(got))
				}
				return
			}
		}
		t.Fatalf("untyped error %v", err)
	})
}
