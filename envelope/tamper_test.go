package envelope

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
)

// tamperFixture is a small file of several segments.
type tamperFixture struct {
	ks   *memKS
	pt   []byte
	file []byte
	hlen int
	seg  int
}

func newTamperFixture(t *testing.T, size int, refs ...KeyRef) *tamperFixture {
	t.Helper()
	f := &tamperFixture{ks: newMemKS(), pt: randBytes(t, size), seg: MinSegmentSize}
	f.file = encrypt(t, WriterOptions{KeyService: f.ks, Recipients: refs, SegmentSize: f.seg, Context: []byte("ctx"), AAD: []byte("aad")}, f.pt)
	h, err := ParseHeader(bytes.NewReader(f.file))
	if err != nil {
		t.Fatal(err)
	}
	f.hlen = h.HeaderLength
	return f
}

func (f *tamperFixture) segCT() int { return f.seg + gcmTagLen }

// open decrypts a modified file and checks that it fails with one of the
// wanted kinds and that what Read released is whole authenticated segments,
// the plaintext's own, and no more than maxSegs of them.
func (f *tamperFixture) open(t *testing.T, name string, file []byte, maxSegs int, kinds ...error) error {
	t.Helper()
	got, err := decrypt(file, ReaderOptions{KeyService: f.ks, AAD: []byte("aad")})
	if err == nil {
		t.Fatalf("%s: decrypted without error", name)
	}
	ok := false
	for _, k := range kinds {
		ok = ok || errors.Is(err, k)
	}
	if !ok {
		t.Fatalf("%s: err %v, want one of %v", name, err, kinds)
	}
	if len(got)%f.seg != 0 || len(got) > maxSegs*f.seg || !bytes.Equal(got, f.pt[:len(got)]) {
		t.Fatalf("%s: released %d bytes of plaintext, want whole verified segments (at most %d)", name, len(got), maxSegs)
	}
	return err
}

func flip(b []byte, i int, mask byte) []byte {
	c := bytes.Clone(b)
	c[i] ^= mask
	return c
}

func TestHeaderByteFlips(t *testing.T) {
	f := newTamperFixture(t, 2*MinSegmentSize+100)
	h, err := ParseHeader(bytes.NewReader(f.file))
	if err != nil {
		t.Fatal(err)
	}
	r := h.Recipients[0]
	slotStart, slotEnd := r.lenOff, r.lenOff+2+r.SlotCapacity
	for i := range f.hlen {
		for _, mask := range []byte{0x01, 0x80, 0xff} {
			name := fmt.Sprintf("header byte %d ^ %#x", i, mask)
			var want []error
			switch {
			case i < 8: // magic, version
				want = []error{ErrFormat}
			case i < 12: // header length
				want = []error{ErrFormat, ErrTruncated, ErrAuth}
			case i < 16: // segment size
				want = []error{ErrFormat, ErrAuth}
			case i < fixedLen: // salt
				want = []error{ErrAuth}
			case i >= slotStart && i < slotEnd: // wrapped length, wrapped key, padding
				want = []error{ErrFormat, ErrUnwrap}
			case i >= f.hlen-tagLen: // the tag
				want = []error{ErrAuth}
			default:
				// Context, recipient count, hints, slot capacity: also inputs
				// to the key service, which may then refuse to unwrap.
				want = []error{ErrAuth, ErrFormat, ErrUnwrap}
			}
			f.open(t, name, flip(f.file, i, mask), 0, want...)
		}
	}
}

// TestSlotFlipOtherRecipient: a damaged slot denies only its recipient; the
// other still opens the file (the slots are not under the tag by design).
func TestSlotFlipOtherRecipient(t *testing.T) {
	f := newTamperFixture(t, 5000, refA, refB)
	h, err := ParseHeader(bytes.NewReader(f.file))
	if err != nil {
		t.Fatal(err)
	}
	r := h.Recipients[0]
	got, err := decrypt(flip(f.file, r.lenOff+2+10, 0x04), ReaderOptions{KeyService: f.ks, AAD: []byte("aad")})
	if err != nil || !bytes.Equal(got, f.pt) {
		t.Fatalf("damaged first slot: %v", err)
	}
}

func TestBodyByteFlips(t *testing.T) {
	f := newTamperFixture(t, 3*MinSegmentSize+100)
	for i := f.hlen; i < len(f.file); i++ {
		k := (i - f.hlen) / f.segCT()
		f.open(t, fmt.Sprintf("body byte %d (segment %d)", i, k), flip(f.file, i, 0x20), k, ErrAuth)
	}
}

func TestTruncation(t *testing.T) {
	for _, size := range []int{3 * MinSegmentSize, 3*MinSegmentSize + 100} {
		f := newTamperFixture(t, size)
		nseg := (len(f.file) - f.hlen + f.segCT() - 1) / f.segCT()
		// Inside the header.
		for _, n := range []int{1, 7, 8, 20, f.hlen - 1} {
			f.open(t, fmt.Sprintf("size %d cut at %d", size, n), f.file[:n], 0, ErrTruncated)
		}
		// At every segment boundary, then just after it and just before the next.
		for k := range nseg {
			at := f.hlen + k*f.segCT()
			f.open(t, fmt.Sprintf("size %d cut after segment %d", size, k), f.file[:at], k, ErrTruncated)
			for _, d := range []int{1, gcmTagLen - 1} {
				f.open(t, fmt.Sprintf("size %d cut at %d in segment %d", size, d, k), f.file[:at+d], k, ErrTruncated)
			}
			for _, d := range []int{gcmTagLen, gcmTagLen + 1, f.segCT() / 2, f.segCT() - 1} {
				if at+d >= len(f.file) {
					continue
				}
				f.open(t, fmt.Sprintf("size %d cut at %d in segment %d", size, d, k), f.file[:at+d], k, ErrAuth)
			}
		}
		f.open(t, "drop last byte", f.file[:len(f.file)-1], nseg-1, ErrAuth)
	}
	// An empty input is not an envelope (the CLI's likeliest mistake).
	if _, err := decrypt(nil, ReaderOptions{KeyService: newMemKS()}); !errors.Is(err, ErrFormat) {
		t.Fatalf("empty input: %v, want ErrFormat", err)
	}
}

func TestSegmentReordering(t *testing.T) {
	f := newTamperFixture(t, 4*MinSegmentSize+10) // segments 0..4, 4 is short
	body := f.file[f.hlen:]
	seg := func(i int) []byte { return body[i*f.segCT() : min((i+1)*f.segCT(), len(body))] }
	build := func(order ...int) []byte {
		out := bytes.Clone(f.file[:f.hlen])
		for _, i := range order {
			out = append(out, seg(i)...)
		}
		return out
	}
	for _, c := range []struct {
		name  string
		order []int
		max   int
		kinds []error
	}{
		{"swap 1 and 2", []int{0, 2, 1, 3, 4}, 1, []error{ErrAuth}},
		{"duplicate 1", []int{0, 1, 1, 2, 3, 4}, 2, []error{ErrAuth}},
		{"drop 2", []int{0, 1, 3, 4}, 2, []error{ErrAuth}},
		{"drop the final segment", []int{0, 1, 2, 3}, 3, []error{ErrTruncated}},
		{"final segment first", []int{4, 0, 1, 2, 3}, 0, []error{ErrAuth}},
		{"replay segment 0 at the end", []int{0, 1, 2, 3, 4, 0}, 4, []error{ErrAuth}},
	} {
		f.open(t, c.name, build(c.order...), c.max, c.kinds...)
	}
}

func TestAppendedData(t *testing.T) {
	for _, size := range []int{0, 100, 2 * MinSegmentSize, 2*MinSegmentSize + 5} {
		f := newTamperFixture(t, size)
		nseg := max(1, (size+f.seg-1)/f.seg)
		for _, extra := range [][]byte{{0}, randBytes(t, gcmTagLen), randBytes(t, f.segCT()), f.file[f.hlen:]} {
			name := fmt.Sprintf("size %d + %d bytes", size, len(extra))
			// The final segment may be released only if it was full and
			// authenticated as non-final; it never is, being final.
			f.open(t, name, append(bytes.Clone(f.file), extra...), nseg-1, ErrAuth, ErrFormat)
		}
	}
	// A full final segment followed by data is named as such.
	f := newTamperFixture(t, 2*MinSegmentSize)
	err := f.open(t, "after a full final segment", append(bytes.Clone(f.file), 1, 2, 3), 1, ErrFormat)
	if !bytes.Contains([]byte(err.Error()), []byte("segment 1: data after the final segment")) {
		t.Fatalf("message %q does not name the final segment", err)
	}
}

func TestRecipientSlotSwappedFromOtherFile(t *testing.T) {
	f := newTamperFixture(t, 5000)
	// Another file under the same transit key and AAD: its slot unwraps fine,
	// to its own data key, which fails this file's header tag.
	other := encrypt(t, WriterOptions{KeyService: f.ks, Recipients: []KeyRef{refA}, SegmentSize: f.seg, Context: []byte("ctx"), AAD: []byte("aad")}, f.pt)
	h, _ := ParseHeader(bytes.NewReader(f.file))
	ho, _ := ParseHeader(bytes.NewReader(other))
	r, ro := h.Recipients[0], ho.Recipients[0]
	if r.lenOff != ro.lenOff || r.SlotCapacity != ro.SlotCapacity {
		t.Fatal("fixture: the two files' slots differ in place")
	}
	mixed := bytes.Clone(f.file)
	copy(mixed[r.lenOff:r.lenOff+2+r.SlotCapacity], other[ro.lenOff:])
	f.open(t, "slot from another file", mixed, 0, ErrAuth)

	// An attacker with encrypt rights wraps a data key of their own choosing.
	wrapped, err := f.ks.Wrap(t.Context(), refA.Mount, refA.Key, []byte("ctx"), randBytes(t, 32))
	if err != nil {
		t.Fatal(err)
	}
	forged := bytes.Clone(f.file)
	slot := forged[r.lenOff+2 : r.lenOff+2+r.SlotCapacity]
	clear(slot)
	copy(slot, wrapped)
	forged[r.lenOff], forged[r.lenOff+1] = byte(len(wrapped)>>8), byte(len(wrapped))
	f.open(t, "forged slot", forged, 0, ErrAuth)
}

func TestRecipientRemoved(t *testing.T) {
	f := newTamperFixture(t, 5000, refA, refB)
	h, err := ParseHeader(bytes.NewReader(f.file))
	if err != nil {
		t.Fatal(err)
	}
	for _, keep := range [][]Recipient{h.Recipients[:1], h.Recipients[1:]} {
		h2 := h.clone()
		h2.Recipients = keep
		body, err := h2.marshal()
		if err != nil {
			t.Fatal(err)
		}
		file := append(append(body, h.tag...), f.file[f.hlen:]...)
		f.open(t, "recipient removed", file, 0, ErrAuth)
	}
	// Same with a recipient renamed (a valid hint, still authenticated).
	h2 := h.clone()
	h2.Recipients[1].Mount = "elsewhere"
	body, _ := h2.marshal()
	f.open(t, "hint renamed", append(append(body, h.tag...), f.file[f.hlen:]...), 0, ErrAuth)
}

func TestNoSegments(t *testing.T) {
	f := newTamperFixture(t, 0)
	f.open(t, "header only", f.file[:f.hlen], 0, ErrTruncated)
	f.open(t, "empty segment short", f.file[:len(f.file)-1], 0, ErrTruncated)
}

// TestEmptyFinalSegmentRule: a key holder who seals an empty final segment
// after a full one (which the Writer never does) is refused, so each
// plaintext has exactly one encoding.
func TestEmptyFinalSegmentRule(t *testing.T) {
	ks := &fixedKS{dataKey: bytes.Repeat([]byte{9}, 32), wrapped: map[string]string{"transit/backups": "vault:v1:eA=="}}
	pt := randBytes(t, MinSegmentSize)
	file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, pt)
	h, _ := ParseHeader(bytes.NewReader(file))
	keys, err := deriveKeys(ks.dataKey, h.Salt)
	if err != nil {
		t.Fatal(err)
	}
	var nonce [nonceLen]byte
	crafted := bytes.Clone(file[:h.HeaderLength])
	segmentNonce(&nonce, 0, false)
	crafted = keys.payload.Seal(crafted, nonce[:], pt, nil)
	segmentNonce(&nonce, 1, true)
	crafted = keys.payload.Seal(crafted, nonce[:], nil, nil)
	got, err := decrypt(crafted, ReaderOptions{KeyService: ks})
	if !errors.Is(err, ErrFormat) || !bytes.Contains([]byte(err.Error()), []byte("segment 1: empty final segment")) {
		t.Fatalf("err %v, want ErrFormat about segment 1", err)
	}
	if !bytes.Equal(got, pt) {
		t.Fatalf("released %d bytes, want segment 0 (authenticated as non-final) only", len(got))
	}
	if _, err := NewReaderAt(t.Context(), bytes.NewReader(crafted), int64(len(crafted)), ReaderOptions{KeyService: ks}); !errors.Is(err, ErrFormat) {
		t.Fatalf("ReaderAt: %v, want ErrFormat", err)
	}
}
