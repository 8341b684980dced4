package envelope

// Attack review of the v1 envelope format and its Go implementation.
//
// Each TestAttack* test performs one attack and FAILS if the attack
// succeeds; it passes when the defence holds. The attackers:
//
//	(1) storage: reads and rewrites files at rest, no Vault token;
//	(2) encrypter: a Vault user with encrypt (not decrypt) rights on a
//	    victim's key, or rights on another key/mount;
//	(3) malicious Vault: answers datakey/encrypt/decrypt/rewrap as it likes.
//
// Broken at the time of review (see the report):
//
//	TestAttackHintPathTraversalUnwrap, TestAttackHintPathTraversalRewrap:
//	the mount/key hints of an unauthenticated header are pasted into the
//	Vault request path (vault.go transitPath) and the Vault API client
//	cleans "..", so a storage attacker redirects the reader's (or the
//	rewrap operator's) authenticated PUT to any Vault endpoint, e.g.
//	auth/token/revoke-self.
//
//	TestAttackReaderCloseDuringRead: Reader.Close from another goroutine
//	while Read runs is a data race on Reader.err (go test -race).
//
//	TestAttackReadAfterClose: Read after Close still returns the rest of
//	the current segment, although Close documents that later Reads fail.

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"math"
	"os"
	"path"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// ---------------------------------------------------------------------------
// helpers

// rebuildHeader re-encodes h (after the caller changed it) and returns the
// file with that header, the old tag and the original body.
func rebuildHeader(t *testing.T, h *Header, file []byte) []byte {
	t.Helper()
	// marshal refuses hints Vault would not name a key or mount with:
	// write placeholders of the same lengths, then the attacker's bytes
	// over them (the first recipient's), as an editor of the file would.
	valid := h.clone()
	r0 := &valid.Recipients[0]
	evilMount, evilKey := r0.Mount, r0.Key
	r0.Mount, r0.Key = strings.Repeat("m", len(evilMount)), strings.Repeat("k", len(evilKey))
	body, err := valid.marshal()
	if err != nil {
		t.Fatalf("marshal: %v", err)
	}
	off := len(magic) + 1 + 4 + 4 + len(valid.Salt) + 2 + len(valid.Context) + 1
	if int(body[off]) != len(evilMount) {
		t.Fatalf("mount length byte at %d is %d, want %d", off, body[off], len(evilMount))
	}
	copy(body[off+1:], evilMount)
	off += 1 + len(evilMount)
	if int(body[off]) != len(evilKey) {
		t.Fatalf("key length byte at %d is %d, want %d", off, body[off], len(evilKey))
	}
	copy(body[off+1:], evilKey)
	out := append(body, h.tag...)
	return append(out, file[len(h.raw):]...)
}

// craftFile builds a file from segments sealed directly under a fixed,
// attacker-known data key, with any index and final flag: what a holder of
// the data key (or a malicious Vault) can do.
func craftFile(t *testing.T, dataKey []byte, segSize int, segs []struct {
	pt    []byte
	idx   uint64
	final bool
}) ([]byte, *fixedKS) {
	t.Helper()
	ks := &fixedKS{dataKey: dataKey, wrapped: map[string]string{"transit/backups": "vault:v1:Y3JhZnQ="}}
	var out bytes.Buffer
	w, err := NewWriter(context.Background(), &out, WriterOptions{KeyService: ks, Recipients: []KeyRef{refA}, SegmentSize: segSize})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	h, err := ParseHeader(bytes.NewReader(out.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	keys, err := deriveKeys(dataKey, h.Salt)
	if err != nil {
		t.Fatal(err)
	}
	file := bytes.Clone(out.Bytes()[:h.HeaderLength])
	var nonce [nonceLen]byte
	for _, s := range segs {
		segmentNonce(&nonce, s.idx, s.final)
		file = keys.payload.Seal(file, nonce[:], s.pt, nil)
	}
	return file, ks
}

// readAllByteByByte reads r one byte at a time, to catch any release of
// bytes of a segment before it authenticated.
func readAllByteByByte(r io.Reader) ([]byte, error) {
	var out []byte
	b := make([]byte, 1)
	for {
		n, err := r.Read(b)
		out = append(out, b[:n]...)
		if err != nil {
			if err == io.EOF {
				return out, nil
			}
			return out, err
		}
	}
}

// requestsStayInTransit checks that every request the fake Vault received
// is OP on some MOUNT/OP/KEY path, as the KeyService method intends.
func requestsStayInTransit(t *testing.T, ft *fakeTransit, op string) {
	t.Helper()
	ft.mu.Lock()
	defer ft.mu.Unlock()
	if len(ft.reqs) == 0 {
		return
	}
	for _, r := range ft.reqs {
		if !strings.HasPrefix(r.Path, "/v1/") || path.Base(path.Dir(r.Path)) != op {
			t.Errorf("ATTACK SUCCEEDED: the header's hints sent the caller's token to %s %s (body %v), not to MOUNT/%s/KEY",
				r.Method, r.Path, r.Body, op)
		}
	}
}

// ---------------------------------------------------------------------------
// Attacker 1: storage access, no token.

// TestAttackHintPathTraversalUnwrap: the attacker edits the key (or mount)
// hint of a file at rest to "../../auth/token/revoke-self". The reader calls
// Unwrap with the hint before the tag can be checked, VaultKeyService builds
// "transit/decrypt/../../auth/token/revoke-self", and the Vault API client
// cleans it (path.Join) into "/v1/auth/token/revoke-self": the victim's token
// revokes itself (allowed by Vault's default policy). Any endpoint that
// takes a PUT works the same way (a KV v1 overwrite, sys/seal for a root
// token, transit/keys/X/rotate ...).
func TestAttackHintPathTraversalUnwrap(t *testing.T) {
	for name, edit := range map[string]func(*Recipient){
		"key hint":   func(r *Recipient) { r.Key = "../../auth/token/revoke-self" },
		"mount hint": func(r *Recipient) { r.Mount, r.Key = "auth/token/revoke-self", ".." },
	} {
		t.Run(name, func(t *testing.T) {
			ft, vks := newFakeVault(t)
			file := encrypt(t, WriterOptions{KeyService: vks, Recipients: []KeyRef{refA}, SegmentSize: MinSegmentSize}, []byte("secret backup"))
			h, err := ParseHeader(bytes.NewReader(file))
			if err != nil {
				t.Fatal(err)
			}
			h2 := h.clone()
			edit(&h2.Recipients[0])
			evil := rebuildHeader(t, h2, file)
			ft.mu.Lock()
			ft.reqs = nil
			ft.mu.Unlock()

			_, err = decrypt(evil, ReaderOptions{KeyService: vks})
			if err == nil {
				t.Fatal("tampered file decrypted")
			}
			requestsStayInTransit(t, ft, "decrypt")

			// ReaderAt takes the same path.
			ft.mu.Lock()
			ft.reqs = nil
			ft.mu.Unlock()
			if _, err := NewReaderAt(t.Context(), bytes.NewReader(evil), int64(len(evil)), ReaderOptions{KeyService: vks}); err == nil {
				t.Fatal("ReaderAt accepted the tampered file")
			}
			requestsStayInTransit(t, ft, "decrypt")
		})
	}
}

// TestAttackHintPathTraversalRewrap: the same edit, met by Rewrap, which
// never checks the tag and typically runs as a batch job with a privileged
// token over a whole bucket.
func TestAttackHintPathTraversalRewrap(t *testing.T) {
	ft, vks := newFakeVault(t)
	file := encrypt(t, WriterOptions{KeyService: vks, Recipients: []KeyRef{refA}, SegmentSize: MinSegmentSize}, []byte("secret backup"))
	h, _ := ParseHeader(bytes.NewReader(file))
	h2 := h.clone()
	h2.Recipients[0].Key = "../../sys/seal"
	p := writeTemp(t, rebuildHeader(t, h2, file))
	ft.mu.Lock()
	ft.reqs = nil
	ft.mu.Unlock()
	_, _ = rewrapFile(t, p, vks)
	requestsStayInTransit(t, ft, "rewrap")
}

// TestAttackSpliceAndReorder: segments moved, duplicated, or spliced from
// another file under the same transit key (same AAD, same segment size), and
// a header of one file on the body of another. Nothing but ErrAuth/ErrFormat/
// ErrTruncated, and only authenticated prefix plaintext is released, byte by
// byte reads included.
func TestAttackSpliceAndReorder(t *testing.T) {
	ks := newMemKS()
	seg := MinSegmentSize
	segCT := seg + gcmTagLen
	ptA := randBytes(t, 4*seg+123)
	ptB := randBytes(t, 4*seg+123)
	opts := WriterOptions{KeyService: ks, Recipients: []KeyRef{refA}, SegmentSize: seg, AAD: []byte("x")}
	a := encrypt(t, opts, ptA)
	b := encrypt(t, opts, ptB)
	ha, _ := ParseHeader(bytes.NewReader(a))
	hb, _ := ParseHeader(bytes.NewReader(b))
	H := ha.HeaderLength
	if hb.HeaderLength != H {
		t.Fatal("fixture: header lengths differ")
	}
	segOf := func(f []byte, i int) []byte {
		end := min(H+(i+1)*segCT, len(f))
		return f[H+i*segCT : end]
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	cases := map[string][]byte{
		"swap 1,2":               cat(a[:H], segOf(a, 0), segOf(a, 2), segOf(a, 1), segOf(a, 3), segOf(a, 4)),
		"duplicate 1":            cat(a[:H], segOf(a, 0), segOf(a, 1), segOf(a, 1), segOf(a, 2), segOf(a, 3), segOf(a, 4)),
		"drop 2":                 cat(a[:H], segOf(a, 0), segOf(a, 1), segOf(a, 3), segOf(a, 4)),
		"segment 2 from b":       cat(a[:H], segOf(a, 0), segOf(a, 1), segOf(b, 2), segOf(a, 3), segOf(a, 4)),
		"final from b":           cat(a[:H], segOf(a, 0), segOf(a, 1), segOf(a, 2), segOf(a, 3), segOf(b, 4)),
		"header a, body b":       cat(a[:H], b[H:]),
		"header b, body a":       cat(b[:H], a[H:]),
		"final moved earlier":    cat(a[:H], segOf(a, 0), segOf(a, 4)),
		"final only":             cat(a[:H], segOf(a, 4)),
		"slot b, rest a":         cat(a[:ha.Recipients[0].lenOff], b[hb.Recipients[0].lenOff:H], a[H:]),
		"two files concatenated": cat(a, b),
	}
	for name, f := range cases {
		r, err := NewReader(context.Background(), bytes.NewReader(f), ReaderOptions{KeyService: ks, AAD: []byte("x"), Concurrency: 3})
		var got []byte
		if err == nil {
			got, err = readAllByteByByte(r)
			r.Close()
		}
		if err == nil {
			t.Errorf("ATTACK SUCCEEDED: %s: accepted (%d bytes)", name, len(got))
			continue
		}
		if !errors.Is(err, ErrAuth) && !errors.Is(err, ErrFormat) && !errors.Is(err, ErrTruncated) {
			t.Errorf("%s: unexpected error kind %v", name, err)
		}
		if len(got)%seg != 0 || !bytes.Equal(got, ptA[:len(got)]) {
			t.Errorf("ATTACK SUCCEEDED: %s: released %d bytes that are not an authenticated prefix of the plaintext", name, len(got))
		}
		if ra, err := NewReaderAt(context.Background(), bytes.NewReader(f), int64(len(f)), ReaderOptions{KeyService: ks, AAD: []byte("x")}); err == nil {
			buf := make([]byte, ra.Size())
			n, err := ra.ReadAt(buf, 0)
			if err == nil {
				t.Errorf("ATTACK SUCCEEDED: %s: ReaderAt read %d bytes without error", name, n)
			} else if !bytes.Equal(buf[:n], ptA[:n]) {
				t.Errorf("ATTACK SUCCEEDED: %s: ReaderAt released unauthenticated bytes", name)
			}
		}
	}
}

// TestAttackTruncateEverywhere: the file cut at every segment boundary and at
// a spread of offsets inside segments and the header. A cut file must never
// end in a clean EOF, in Reader or ReaderAt.
func TestAttackTruncateEverywhere(t *testing.T) {
	ks := newMemKS()
	seg := MinSegmentSize
	for _, size := range []int{0, 1, seg, 2 * seg, 2*seg + 1} {
		pt := randBytes(t, size)
		file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: seg}, pt)
		cuts := map[int]bool{}
		for c := 0; c < len(file); c += 61 {
			cuts[c] = true
		}
		h, _ := ParseHeader(bytes.NewReader(file))
		for c := h.HeaderLength; c < len(file); c += seg + gcmTagLen {
			for d := -17; d <= 17; d++ {
				if c+d >= 0 && c+d < len(file) {
					cuts[c+d] = true
				}
			}
		}
		for c := range cuts {
			f := file[:c]
			got, err := decrypt(f, ReaderOptions{KeyService: ks})
			if err == nil {
				t.Fatalf("ATTACK SUCCEEDED: plaintext %d, cut at %d/%d: clean EOF after %d bytes", size, c, len(file), len(got))
			}
			if !bytes.Equal(got, pt[:len(got)]) {
				t.Fatalf("ATTACK SUCCEEDED: cut at %d released bytes that are not the plaintext's", c)
			}
			if _, err := NewReaderAt(context.Background(), bytes.NewReader(f), int64(len(f)), ReaderOptions{KeyService: ks}); err == nil {
				t.Fatalf("ATTACK SUCCEEDED: ReaderAt accepted a file cut at %d/%d", c, len(file))
			}
		}
	}
}

// TestAttackNoUnauthenticatedRelease: with a bit flipped anywhere in a
// segment, the Reader (read one byte at a time) releases no byte of that
// segment or later.
func TestAttackNoUnauthenticatedRelease(t *testing.T) {
	ks := newMemKS()
	seg := MinSegmentSize
	pt := randBytes(t, 3*seg+500)
	file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: seg, Concurrency: 2}, pt)
	h, _ := ParseHeader(bytes.NewReader(file))
	for _, i := range []int{0, 1, seg - 1, seg + 15, seg + 16, 2*(seg+16) + 3, 3*(seg+16) + 10, len(file) - h.HeaderLength - 1} {
		f := flip(file, h.HeaderLength+i, 0x40)
		victim := i / (seg + gcmTagLen)
		r, err := NewReader(context.Background(), bytes.NewReader(f), ReaderOptions{KeyService: ks})
		if err != nil {
			t.Fatal(err)
		}
		got, err := readAllByteByByte(r)
		r.Close()
		if !errors.Is(err, ErrAuth) {
			t.Fatalf("flip at body byte %d: err %v, want ErrAuth", i, err)
		}
		if len(got) != victim*seg || !bytes.Equal(got, pt[:len(got)]) {
			t.Fatalf("ATTACK SUCCEEDED: flip in segment %d released %d bytes", victim, len(got))
		}
	}
}

// TestAttackParserDoS: headers built to make the parser panic, loop or
// allocate: every length at its maximum, lengths that overrun, a header
// length of 4 GiB, and random bytes after a valid prefix. Also Rewrap and
// NewReaderAt on them. Bounded time, no panic, allocation bounded by
// maxHeaderLen.
func TestAttackParserDoS(t *testing.T) {
	if maxHeaderLen > 1<<18 {
		t.Fatalf("maxHeaderLen %d: a header can make the parser allocate too much", maxHeaderLen)
	}
	prefix := func(hlen uint32, seg uint32) []byte {
		b := []byte(magic)
		b = append(b, Version)
		b = binary.BigEndian.AppendUint32(b, hlen)
		b = binary.BigEndian.AppendUint32(b, seg)
		return append(b, make([]byte, saltLen)...)
	}
	var inputs [][]byte
	inputs = append(inputs,
		prefix(math.MaxUint32, MinSegmentSize),
		prefix(maxHeaderLen, MinSegmentSize),
		prefix(maxHeaderLen+1, MinSegmentSize),
		prefix(0, MinSegmentSize),
		prefix(fixedLen+2+1+tagLen, math.MaxUint32),
	)
	// Every field at 0xff..: context 65535, count 255, names 255, capacity 65535.
	full := append(prefix(maxHeaderLen, MinSegmentSize), bytes.Repeat([]byte{0xff}, maxHeaderLen-fixedLen)...)
	inputs = append(inputs, full)
	// Valid context and count 16, each recipient claiming capacity 65535.
	b := prefix(0, MinSegmentSize)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = append(b, 16)
	for range 16 {
		b = append(b, 1, 'm', 1, 'k', 0xff, 0xff, 0xff, 0xff)
	}
	b = append(b, make([]byte, tagLen)...)
	binary.BigEndian.PutUint32(b[8:12], uint32(len(b)))
	inputs = append(inputs, b)
	// Random tails after a valid fixed part, for a while.
	_, valid, _ := fuzzFixture()
	for i := range 300 {
		n := 1 + i*37%len(valid)
		f := bytes.Clone(valid[:n])
		f = append(f, randBytes(t, i%200)...)
		if len(f) > 12 {
			binary.BigEndian.PutUint32(f[8:12], uint32(min(len(f), maxHeaderLen)))
		}
		inputs = append(inputs, f)
	}
	ks := newMemKS()
	deadline := time.Now().Add(30 * time.Second)
	for i, in := range inputs {
		func() {
			defer func() {
				if p := recover(); p != nil {
					t.Errorf("ATTACK SUCCEEDED: input %d: panic %v", i, p)
				}
			}()
			_, _ = ParseHeader(bytes.NewReader(in))
			_, _ = NewReaderAt(context.Background(), bytes.NewReader(in), int64(len(in)), ReaderOptions{KeyService: ks})
			r, err := NewReader(context.Background(), bytes.NewReader(in), ReaderOptions{KeyService: ks})
			if err == nil {
				_, _ = io.Copy(io.Discard, r)
				r.Close()
			}
			p := writeTemp(t, in)
			_, _ = rewrapFile(t, p, ks)
		}()
		if time.Now().After(deadline) {
			t.Fatalf("ATTACK SUCCEEDED: parsing is too slow (input %d)", i)
		}
	}
}

// TestAttackReaderAtSizes: sizes and offsets chosen to break the integer
// arithmetic of ReaderAt: negative, zero, beyond the file, near MaxInt64
// (where bodyLen+segCT overflows), offsets near MaxInt64.
func TestAttackReaderAtSizes(t *testing.T) {
	ks := newMemKS()
	pt := randBytes(t, 3*MinSegmentSize+7)
	file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, pt)
	h, _ := ParseHeader(bytes.NewReader(file))
	sizes := []int64{-1, math.MinInt64, 0, 1, int64(h.HeaderLength), int64(h.HeaderLength) + 15,
		int64(len(file)) - 1, int64(len(file)) + 1, int64(len(file)) + MinSegmentSize + 16,
		1 << 40, 1 << 62, math.MaxInt64, math.MaxInt64 - 1, math.MaxInt64 - MinSegmentSize/2, math.MaxInt64 - int64(h.HeaderLength)}
	for _, size := range sizes {
		func() {
			defer func() {
				if p := recover(); p != nil {
					t.Errorf("ATTACK SUCCEEDED: size %d: panic %v", size, p)
				}
			}()
			ra, err := NewReaderAt(context.Background(), bytes.NewReader(file), size, ReaderOptions{KeyService: ks})
			if err == nil {
				t.Errorf("ATTACK SUCCEEDED: size %d (file is %d): accepted, plaintext size %d", size, len(file), ra.Size())
			}
		}()
	}
	ra, err := NewReaderAt(context.Background(), bytes.NewReader(file), int64(len(file)), ReaderOptions{KeyService: ks})
	if err != nil {
		t.Fatal(err)
	}
	if ra.Size() != int64(len(pt)) {
		t.Fatalf("size %d, want %d", ra.Size(), len(pt))
	}
	buf := make([]byte, 100)
	for _, off := range []int64{-1, math.MinInt64, ra.Size(), ra.Size() + 1, math.MaxInt64, math.MaxInt64 - 50} {
		func() {
			defer func() {
				if p := recover(); p != nil {
					t.Errorf("ATTACK SUCCEEDED: ReadAt(off %d): panic %v", off, p)
				}
			}()
			if n, err := ra.ReadAt(buf, off); err == nil || n != 0 {
				t.Errorf("ReadAt(off %d) = %d, %v; want 0 and an error", off, n, err)
			}
		}()
	}
	n, err := ra.ReadAt(buf, ra.Size()-10)
	if n != 10 || err != io.EOF || !bytes.Equal(buf[:10], pt[len(pt)-10:]) {
		t.Fatalf("ReadAt at the end: %d %v", n, err)
	}
}

// TestAttackHeaderTagCoverage checks the doc's claim about what the tag
// covers: a change to any header byte outside the recipients' length fields
// and slots changes the authenticated bytes (or fails to parse), the AAD is
// length-prefixed, and the authenticated encoding is injective across
// different recipient layouts.
func TestAttackHeaderTagCoverage(t *testing.T) {
	_, file, _ := fuzzFixture()
	h, err := ParseHeader(bytes.NewReader(file))
	if err != nil {
		t.Fatal(err)
	}
	body := h.raw[:len(h.raw)-tagLen]
	base := h.authenticated(body, []byte("aad"))
	inSlot := func(i int) bool {
		for _, r := range h.Recipients {
			if i >= r.lenOff && i < r.lenOff+2+r.SlotCapacity {
				return true
			}
		}
		return false
	}
	for i := range body {
		if inSlot(i) {
			continue
		}
		m := bytes.Clone(h.raw)
		m[i] ^= 0x01
		h2, err := parseRaw(m)
		if err != nil {
			continue
		}
		if bytes.Equal(h2.authenticated(m[:len(m)-tagLen], []byte("aad")), base) {
			t.Errorf("ATTACK SUCCEEDED: header byte %d is outside the slots but not authenticated", i)
		}
	}
	// AAD boundary: moving bytes between the header and the AAD is not
	// possible because the header part is self-delimiting and the AAD
	// length is fixed-width.
	if bytes.Equal(h.authenticated(body, []byte("ab")), h.authenticated(body, []byte("abc"))) {
		t.Error("AAD not length-prefixed")
	}
	// Same authenticated bytes from two recipient layouts: move capacity
	// between recipients (capacity is covered, so this must change them).
	h3 := h.clone()
	h3.Recipients[0].SlotCapacity++
	h3.Recipients[1].SlotCapacity--
	b3, err := h3.marshal()
	if err == nil && bytes.Equal(h3.authenticated(b3, []byte("aad")), base) {
		t.Error("ATTACK SUCCEEDED: slot capacities can be moved between recipients under the same tag")
	}
	// The full reader on every single-byte change outside slots.
	ks, _, _ := fuzzFixture()
	for i := range body {
		if inSlot(i) {
			continue
		}
		m := flip(file, i, 0x80)
		if _, err := decrypt(m, ReaderOptions{KeyService: ks}); err == nil {
			t.Errorf("ATTACK SUCCEEDED: header byte %d changed, file still accepted", i)
		}
	}
}

// TestAttackFinalSegmentRules: files crafted by a holder of the data key
// (the strongest attacker on the body), each breaking one final-segment
// rule. Reader and ReaderAt must refuse all, and agree.
func TestAttackFinalSegmentRules(t *testing.T) {
	seg := MinSegmentSize
	dk := bytes.Repeat([]byte{3}, 32)
	full := func(c byte) []byte { return bytes.Repeat([]byte{c}, seg) }
	type s = struct {
		pt    []byte
		idx   uint64
		final bool
	}
	cases := map[string][]s{
		"no final, ends at boundary":   {{full(1), 0, false}, {full(2), 1, false}},
		"final flag in the middle":     {{full(1), 0, true}, {full(2), 1, false}, {[]byte("x"), 2, true}},
		"two finals":                   {{full(1), 0, true}, {[]byte("x"), 1, true}},
		"empty final after full":       {{full(1), 0, false}, {nil, 1, true}},
		"short non-final":              {{[]byte("abc"), 0, false}},
		"short non-final then final":   {{[]byte("abc"), 0, false}, {[]byte("x"), 1, true}},
		"empty non-final alone":        {{nil, 0, false}},
		"index skips":                  {{full(1), 0, false}, {[]byte("x"), 2, true}},
		"index 2^64-1":                 {{full(1), math.MaxUint64, false}, {[]byte("x"), 0, true}},
		"oversize segment (S+1 bytes)": {{append(full(1), 1), 0, true}},
		"full final then data":         {{full(1), 0, true}, {[]byte("x"), 1, true}},
	}
	for name, segs := range cases {
		file, ks := craftFile(t, dk, seg, segs)
		got, err := decrypt(file, ReaderOptions{KeyService: ks})
		if err == nil {
			t.Errorf("ATTACK SUCCEEDED: %s: Reader accepted %d bytes", name, len(got))
		}
		if ra, err := NewReaderAt(context.Background(), bytes.NewReader(file), int64(len(file)), ReaderOptions{KeyService: ks}); err == nil {
			buf := make([]byte, ra.Size())
			if _, err := ra.ReadAt(buf, 0); err == nil {
				t.Errorf("ATTACK SUCCEEDED: %s: ReaderAt read %d bytes", name, len(buf))
			}
		}
	}
	// The legitimate encodings are accepted (the rules are not too strict).
	for name, segs := range map[string][]s{
		"empty file":           {{nil, 0, true}},
		"one full final":       {{full(1), 0, true}},
		"full then short":      {{full(1), 0, false}, {[]byte("x"), 1, true}},
		"full then full final": {{full(1), 0, false}, {full(2), 1, true}},
	} {
		file, ks := craftFile(t, dk, seg, segs)
		if _, err := decrypt(file, ReaderOptions{KeyService: ks}); err != nil {
			t.Errorf("%s: valid encoding refused: %v", name, err)
		}
	}
}

// TestAttackRewrapStorage: Rewrap on files an attacker prepared: non-zero
// padding, a length field beyond the slot, a slot that is not a transit
// ciphertext. Rewrap must refuse and write nothing. And a rolled-back slot is
// rewrapped to a valid file (no corruption).
func TestAttackRewrapStorage(t *testing.T) {
	ks := newMemKS()
	pt := randBytes(t, 2*MinSegmentSize)
	file := encrypt(t, WriterOptions{KeyService: ks, Recipients: []KeyRef{refA, refB}, SegmentSize: MinSegmentSize}, pt)
	h, _ := ParseHeader(bytes.NewReader(file))
	r := h.Recipients[0]
	edits := map[string]func([]byte){
		"non-zero padding": func(f []byte) { f[r.lenOff+2+r.SlotCapacity-1] = 'A' },
		"length > slot":    func(f []byte) { binary.BigEndian.PutUint16(f[r.lenOff:], uint16(r.SlotCapacity+1)) },
		"length 0":         func(f []byte) { binary.BigEndian.PutUint16(f[r.lenOff:], 0) },
		"not transit":      func(f []byte) { copy(f[r.lenOff+2:], "xault") },
		"space in slot":    func(f []byte) { f[r.lenOff+2+10] = ' ' },
	}
	ks.rotate(refA.Mount, refA.Key, 2)
	ks.rotate(refB.Mount, refB.Key, 2)
	for name, edit := range edits {
		f := bytes.Clone(file)
		edit(f)
		p := writeTemp(t, f)
		changed, err := rewrapFile(t, p, ks)
		after, _ := os.ReadFile(p)
		if err == nil || changed || !bytes.Equal(after, f) {
			t.Errorf("ATTACK SUCCEEDED: %s: rewrap changed=%v err=%v, file modified=%v", name, changed, err, !bytes.Equal(after, f))
		}
	}
	// Rollback then rewrap: still valid.
	p := writeTemp(t, file)
	if _, err := rewrapFile(t, p, ks); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(p)
	if got, err := decrypt(after, ReaderOptions{KeyService: ks}); err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("rewrapped file: %v", err)
	}
}

// ---------------------------------------------------------------------------
// Attacker 2: encrypt rights on the victim's key, or own keys.

// TestAttackRecipientSubstitution: the attacker owns key A (all rights) and
// can only encrypt with the victim's key B. They write a file whose slot A
// wraps K1 and slot B wraps K2, hoping A's readers and B's readers see
// different plaintexts (an "invisible salamander" across recipients), or
// they replace B's slot with a wrapped key of their own or from another file.
// The victim restricted to B must refuse every such file.
func TestAttackRecipientSubstitution(t *testing.T) {
	ks := newMemKS()
	pt1 := []byte("pay 10 to alice")
	file := encrypt(t, WriterOptions{KeyService: ks, Recipients: []KeyRef{refA, refB}, SegmentSize: MinSegmentSize}, pt1)
	h, _ := ParseHeader(bytes.NewReader(file))
	rb := h.Recipients[1]
	onlyB := ReaderOptions{KeyService: ks, Filter: func(r Recipient) bool { return r.Mount == refB.Mount }}
	put := func(f []byte, wrapped string) []byte {
		f = bytes.Clone(f)
		slot := f[rb.lenOff+2 : rb.lenOff+2+rb.SlotCapacity]
		clear(slot)
		copy(slot, wrapped)
		binary.BigEndian.PutUint16(f[rb.lenOff:], uint16(len(wrapped)))
		return f
	}
	k2 := randBytes(t, 32)
	w2, _ := ks.Wrap(t.Context(), refB.Mount, refB.Key, nil, k2)
	other := encrypt(t, WriterOptions{KeyService: ks, Recipients: []KeyRef{refB}, SegmentSize: MinSegmentSize}, []byte("pay 10000 to mallory"))
	ho, _ := ParseHeader(bytes.NewReader(other))
	for name, f := range map[string][]byte{
		"slot B wraps an attacker key": put(file, w2),
		"slot B from another file":     put(file, ho.Recipients[0].Wrapped),
	} {
		if got, err := decrypt(f, onlyB); err == nil || len(got) > 0 {
			t.Errorf("ATTACK SUCCEEDED: %s: B read %q (err %v)", name, got, err)
		} else if !errors.Is(err, ErrAuth) {
			t.Errorf("%s: err %v, want ErrAuth", name, err)
		}
		// A's view is unchanged: A's slot is intact.
		if got, err := decrypt(f, ReaderOptions{KeyService: ks, Filter: func(r Recipient) bool { return r.Mount == refA.Mount }}); err != nil || !bytes.Equal(got, pt1) {
			t.Errorf("%s: A: %v", name, err)
		}
	}
	// The attacker knows K2 and writes a whole header + body under K2 for
	// B, reusing the victim file's salt and hints: a different header tag,
	// so it cannot be mixed with the victim's body.
	ksK2 := &fixedKS{dataKey: k2, wrapped: map[string]string{refB.String(): w2}}
	forged := encrypt(t, WriterOptions{KeyService: ksK2, Recipients: []KeyRef{refB}, SegmentSize: MinSegmentSize, Rand: bytes.NewReader(h.Salt)}, []byte("x"))
	hf, _ := ParseHeader(bytes.NewReader(forged))
	mixed := append(bytes.Clone(forged[:hf.HeaderLength]), file[h.HeaderLength:]...)
	if got, err := decrypt(mixed, onlyB); err == nil {
		t.Errorf("ATTACK SUCCEEDED: forged header on the victim's body decrypted to %q", got)
	}
}

// TestAttackWrongSizeUnwrap: a slot crafted so that Unwrap returns a key of
// the wrong size (e.g. an attacker's transit/encrypt of 16 or 0 bytes) must
// fail cleanly as ErrAuth and must not stop the next recipient.
func TestAttackWrongSizeUnwrap(t *testing.T) {
	ks := newMemKS()
	pt := []byte("payload")
	file := encrypt(t, WriterOptions{KeyService: ks, Recipients: []KeyRef{refA, refB}, SegmentSize: MinSegmentSize}, pt)
	h, _ := ParseHeader(bytes.NewReader(file))
	r := h.Recipients[0]
	for _, n := range []int{0, 16, 31, 33, 64} {
		w, _ := ks.Wrap(t.Context(), refA.Mount, refA.Key, nil, make([]byte, n))
		if len(w) > r.SlotCapacity {
			continue
		}
		f := bytes.Clone(file)
		slot := f[r.lenOff+2 : r.lenOff+2+r.SlotCapacity]
		clear(slot)
		copy(slot, w)
		binary.BigEndian.PutUint16(f[r.lenOff:], uint16(len(w)))
		got, err := decrypt(f, ReaderOptions{KeyService: ks})
		if err != nil || !bytes.Equal(got, pt) {
			t.Errorf("%d-byte key in slot A: %v (recipient B should still open it)", n, err)
		}
		_, err = decrypt(f, ReaderOptions{KeyService: ks, Filter: func(x Recipient) bool { return x.Mount == refA.Mount }})
		if !errors.Is(err, ErrAuth) {
			t.Errorf("%d-byte key, only A: %v, want ErrAuth", n, err)
		}
	}
}

// ---------------------------------------------------------------------------
// Attacker 3: a malicious or compromised Vault.

// evilKS answers like memKS except where a hook says otherwise.
type evilKS struct {
	*memKS
	dataKey func() ([]byte, string, error)
	wrap    func() (string, error)
	unwrap  func() ([]byte, error)
	rewrap  func() (string, error)
	lastKey [][]byte // every data key slice handed out, to check zeroing
	mu      sync.Mutex
}

func (e *evilKS) keep(b []byte) []byte {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.lastKey = append(e.lastKey, b)
	return b
}

func (e *evilKS) DataKey(ctx context.Context, m, k string, c []byte) ([]byte, string, error) {
	if e.dataKey != nil {
		dk, w, err := e.dataKey()
		return e.keep(dk), w, err
	}
	dk, w, err := e.memKS.DataKey(ctx, m, k, c)
	return e.keep(dk), w, err
}

func (e *evilKS) Wrap(ctx context.Context, m, k string, c, pt []byte) (string, error) {
	if e.wrap != nil {
		return e.wrap()
	}
	return e.memKS.Wrap(ctx, m, k, c, pt)
}

func (e *evilKS) Unwrap(ctx context.Context, m, k string, c []byte, w string) ([]byte, error) {
	if e.unwrap != nil {
		dk, err := e.unwrap()
		return e.keep(dk), err
	}
	dk, err := e.memKS.Unwrap(ctx, m, k, c, w)
	return e.keep(dk), err
}

func (e *evilKS) Rewrap(ctx context.Context, m, k string, c []byte, w string) (string, error) {
	if e.rewrap != nil {
		return e.rewrap()
	}
	return e.memKS.Rewrap(ctx, m, k, c, w)
}

// TestAttackMaliciousVault: short/long data keys, wrapped keys that overflow
// a slot (up to 1 MiB), are not transit ciphertexts or carry control bytes,
// unwraps to a wrong key, rewraps that do not fit. The client must refuse
// without panic, without writing a header, and must never write a slot
// bigger than MaxSlotCapacity.
func TestAttackMaliciousVault(t *testing.T) {
	good := "vault:v1:" + strings.Repeat("A", 40)
	writerCases := map[string]*evilKS{
		"16-byte data key": {dataKey: func() ([]byte, string, error) { return make([]byte, 16), good, nil }},
		"33-byte data key": {dataKey: func() ([]byte, string, error) { return make([]byte, 33), good, nil }},
		"nil data key":     {dataKey: func() ([]byte, string, error) { return nil, good, nil }},
		"1 MiB wrapped key": {dataKey: func() ([]byte, string, error) {
			return make([]byte, 32), "vault:v1:" + strings.Repeat("A", 1<<20), nil
		}},
		"8193-byte wrapped key": {dataKey: func() ([]byte, string, error) {
			return make([]byte, 32), "vault:v1:" + strings.Repeat("A", MaxSlotCapacity-8), nil
		}},
		"not vault:v":        {dataKey: func() ([]byte, string, error) { return make([]byte, 32), "AAAA", nil }},
		"empty wrapped":      {dataKey: func() ([]byte, string, error) { return make([]byte, 32), "", nil }},
		"newline in wrapped": {dataKey: func() ([]byte, string, error) { return make([]byte, 32), "vault:v1:AA\nAA", nil }},
		"NUL in wrapped":     {dataKey: func() ([]byte, string, error) { return make([]byte, 32), "vault:v1:AA\x00", nil }},
		"second recipient's wrap too long": {wrap: func() (string, error) {
			return "vault:v1:" + strings.Repeat("B", 70000), nil
		}},
	}
	for name, e := range writerCases {
		e.memKS = newMemKS()
		var out bytes.Buffer
		func() {
			defer func() {
				if p := recover(); p != nil {
					t.Errorf("ATTACK SUCCEEDED: %s: panic %v", name, p)
				}
			}()
			w, err := NewWriter(context.Background(), &out, WriterOptions{KeyService: e, Recipients: []KeyRef{refA, refB}, SegmentSize: MinSegmentSize})
			if err == nil {
				_ = w.Close()
				t.Errorf("ATTACK SUCCEEDED: %s: writer accepted the answer", name)
			} else if out.Len() != 0 {
				t.Errorf("%s: %d header bytes written before the error", name, out.Len())
			}
		}()
	}
	// The 8192-byte wrapped key exactly at the maximum: accepted, slot ≤ max.
	e := &evilKS{memKS: newMemKS(), dataKey: func() ([]byte, string, error) {
		return make([]byte, 32), "vault:v1:" + strings.Repeat("A", MaxSlotCapacity-9), nil
	}}
	var out bytes.Buffer
	if w, err := NewWriter(context.Background(), &out, WriterOptions{KeyService: e, Recipients: []KeyRef{refA}}); err == nil {
		_ = w.Close()
		h, err := ParseHeader(bytes.NewReader(out.Bytes()))
		if err != nil || h.Recipients[0].SlotCapacity > MaxSlotCapacity {
			t.Errorf("max-size wrapped key: %v", err)
		}
	}

	// Reader: Vault's decrypt returns a wrong key of every size.
	ks := newMemKS()
	file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, []byte("data"))
	for _, n := range []int{0, 1, 31, 32, 33, 1 << 20} {
		e := &evilKS{memKS: ks, unwrap: func() ([]byte, error) { return randBytes(t, n), nil }}
		if got, err := decrypt(file, ReaderOptions{KeyService: e}); err == nil || len(got) > 0 || !errors.Is(err, ErrAuth) {
			t.Errorf("ATTACK SUCCEEDED: decrypt answered a %d-byte wrong key: got %q, err %v", n, got, err)
		}
	}

	// Rewrap: an answer too long for the slot, or not a ciphertext: nothing
	// written.
	for name, ans := range map[string]string{
		"too long": "vault:v2:" + strings.Repeat("C", 5000),
		"garbage":  "vault:v2:\xff",
		"empty":    "",
	} {
		e := &evilKS{memKS: ks, rewrap: func() (string, error) { return ans, nil }}
		p := writeTemp(t, file)
		changed, err := rewrapFile(t, p, e)
		after, _ := os.ReadFile(p)
		if err == nil || changed || !bytes.Equal(after, file) {
			t.Errorf("ATTACK SUCCEEDED: rewrap answered %s: changed=%v err=%v", name, changed, err)
		}
	}
	// A rewrap answer that fits but wraps another key: Rewrap cannot tell
	// (by design, it never sees the data key); the next reader must.
	w2, _ := ks.Wrap(t.Context(), refA.Mount, refA.Key, nil, randBytes(t, 32))
	e2 := &evilKS{memKS: ks, rewrap: func() (string, error) { return w2, nil }}
	p := writeTemp(t, file)
	if _, err := rewrapFile(t, p, e2); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(p)
	if _, err := decrypt(after, ReaderOptions{KeyService: ks}); !errors.Is(err, ErrAuth) {
		t.Errorf("ATTACK SUCCEEDED: a substituted rewrap answer was not detected by the reader: %v", err)
	}
}

// TestAttackDataKeyReuse: a Vault that hands the same data key to every
// file. The per-file random salt must still give each file its own keys, so
// that (key, nonce) pairs never repeat across files.
func TestAttackDataKeyReuse(t *testing.T) {
	ks := &fixedKS{dataKey: bytes.Repeat([]byte{5}, 32), wrapped: map[string]string{refA.String(): "vault:v1:c2FtZQ=="}}
	pt := make([]byte, MinSegmentSize+1) // zeros: equal ciphertexts would show
	a := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, pt)
	b := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, pt)
	ha, _ := ParseHeader(bytes.NewReader(a))
	hb, _ := ParseHeader(bytes.NewReader(b))
	if bytes.Equal(ha.Salt, hb.Salt) {
		t.Fatal("ATTACK SUCCEEDED: two files got the same salt")
	}
	if bytes.Equal(a[ha.HeaderLength:ha.HeaderLength+32], b[hb.HeaderLength:hb.HeaderLength+32]) {
		t.Fatal("ATTACK SUCCEEDED: same keystream in two files under a reused data key")
	}
	// Domain separation: payload and header keys differ, both from HKDF
	// with distinct info strings.
	ka, _ := deriveKeys(ks.dataKey, ha.Salt)
	var nonce [nonceLen]byte
	segmentNonce(&nonce, 0, false)
	if bytes.Equal(ka.payload.Seal(nil, nonce[:], make([]byte, 32), nil)[:32], ka.header) {
		t.Fatal("payload and header keys related")
	}
	// Nonces: index and flag each change the nonce; the counter is 64 bits
	// of the 88, upper bytes zero.
	seen := map[[nonceLen]byte]bool{}
	for _, idx := range []uint64{0, 1, 255, 256, 1 << 32, math.MaxUint64} {
		for _, fin := range []bool{false, true} {
			segmentNonce(&nonce, idx, fin)
			if seen[nonce] || nonce[0]|nonce[1]|nonce[2] != 0 {
				t.Fatalf("nonce collision or layout at %d/%v: %x", idx, fin, nonce)
			}
			seen[nonce] = true
		}
	}
}

// ---------------------------------------------------------------------------
// Secrets in memory and in errors.

// TestAttackDataKeyZeroized: the data key slices handed to the package by the
// key service are zeroed once NewWriter/NewReader/NewReaderAt return, as
// doc.go claims; so are the diagnostic plaintext buffers of openChunk.
func TestAttackDataKeyZeroized(t *testing.T) {
	e := &evilKS{memKS: newMemKS()}
	file := encrypt(t, WriterOptions{KeyService: e, Recipients: []KeyRef{refA, refB}, SegmentSize: MinSegmentSize}, []byte("hello"))
	if _, err := decrypt(file, ReaderOptions{KeyService: e}); err != nil {
		t.Fatal(err)
	}
	if _, err := NewReaderAt(t.Context(), bytes.NewReader(file), int64(len(file)), ReaderOptions{KeyService: e}); err != nil {
		t.Fatal(err)
	}
	if len(e.lastKey) != 3 {
		t.Fatalf("%d keys handed out, want 3", len(e.lastKey))
	}
	for i, k := range e.lastKey {
		if !bytes.Equal(k, make([]byte, len(k))) {
			t.Errorf("data key %d not zeroed after use", i)
		}
	}
	// openChunk, diagnosing a cut at a segment boundary, opens the segment
	// with the other flag: the plaintext it decrypted must not stay in dst.
	dk := bytes.Repeat([]byte{8}, 32)
	keys, _ := deriveKeys(dk, make([]byte, 32))
	var nonce [nonceLen]byte
	segmentNonce(&nonce, 0, false)
	pt := bytes.Repeat([]byte{0xAB}, MinSegmentSize)
	ct := keys.payload.Seal(nil, nonce[:], pt, nil)
	dst := make([]byte, MinSegmentSize)
	if _, err := openChunk(keys, MinSegmentSize, 0, true, ct, dst[:0]); !errors.Is(err, ErrTruncated) {
		t.Fatalf("err %v", err)
	}
	if bytes.Contains(dst, []byte{0xAB, 0xAB, 0xAB, 0xAB}) {
		t.Error("plaintext of a refused segment left in the buffer")
	}
}

// TestAttackErrorsDoNotLeak: no error message carries the data key, a
// derived key or plaintext, in any encoding, over a range of failures.
func TestAttackErrorsDoNotLeak(t *testing.T) {
	dk := bytes.Repeat([]byte{0x5a}, 32)
	ks := &fixedKS{dataKey: dk, wrapped: map[string]string{refA.String(): "vault:v1:bGVhaw==", refB.String(): "vault:v1:bGVhaw=="}}
	pt := bytes.Repeat([]byte("TOPSECRET-"), 1000)
	file := encrypt(t, WriterOptions{KeyService: ks, Recipients: []KeyRef{refA, refB}, SegmentSize: MinSegmentSize, AAD: []byte("a")}, pt)
	h, _ := ParseHeader(bytes.NewReader(file))
	keys, _ := deriveKeys(dk, h.Salt)
	secrets := [][]byte{dk, keys.header, pt[:10]}
	var errs []error
	add := func(_ any, err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	add(decrypt(file, ReaderOptions{KeyService: ks})) // wrong AAD
	add(decrypt(flip(file, len(file)-1, 1), ReaderOptions{KeyService: ks, AAD: []byte("a")}))
	add(decrypt(file[:len(file)-MinSegmentSize], ReaderOptions{KeyService: ks, AAD: []byte("a")}))
	add(decrypt(append(bytes.Clone(file), 1), ReaderOptions{KeyService: ks, AAD: []byte("a")}))
	add(decrypt(file, ReaderOptions{KeyService: &evilKS{memKS: newMemKS(), unwrap: func() ([]byte, error) { return dk[:31], nil }}}))
	add(NewReaderAt(t.Context(), bytes.NewReader(file), int64(len(file)-1), ReaderOptions{KeyService: ks, AAD: []byte("a")}))
	add(NewWriter(t.Context(), io.Discard, WriterOptions{KeyService: &evilKS{memKS: newMemKS(), dataKey: func() ([]byte, string, error) { return dk[:31], "vault:v1:x", nil }}, Recipients: []KeyRef{refA}}))
	if len(errs) < 7 {
		t.Fatalf("only %d failures", len(errs))
	}
	for _, err := range errs {
		msg := err.Error()
		for _, s := range secrets {
			for _, enc := range []string{string(s), hex.EncodeToString(s), base64.StdEncoding.EncodeToString(s), base64.RawStdEncoding.EncodeToString(s)} {
				if len(enc) >= 8 && strings.Contains(msg, enc) {
					t.Errorf("ATTACK SUCCEEDED: error %q carries a secret", msg)
				}
			}
			if strings.Contains(msg, "[90 90 90") || strings.Contains(msg, "0x5a5a") {
				t.Errorf("ATTACK SUCCEEDED: error %q carries key bytes", msg)
			}
		}
	}
}

// ---------------------------------------------------------------------------
// Concurrency.

// TestAttackNoGoroutineLeak: readers abandoned early with Close, readers
// that hit an error, writers whose destination fails, writers cancelled: all
// goroutines end.
func TestAttackNoGoroutineLeak(t *testing.T) {
	ks := newMemKS()
	pt := randBytes(t, 40*MinSegmentSize)
	file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, pt)
	runtime.GC()
	before := runtime.NumGoroutine()
	for i := range 20 {
		r, err := NewReader(context.Background(), bytes.NewReader(file), ReaderOptions{KeyService: ks, Concurrency: 4})
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 1+i*1000)
		_, _ = r.Read(buf)
		r.Close()
		r.Close()
		// Tampered: error mid-stream.
		_, _ = decrypt(flip(file, len(file)/2, 1), ReaderOptions{KeyService: ks, Concurrency: 4})
		// Cancelled context.
		ctx, cancel := context.WithCancel(context.Background())
		r2, err := NewReader(ctx, bytes.NewReader(file), ReaderOptions{KeyService: ks, Concurrency: 3})
		if err != nil {
			t.Fatal(err)
		}
		_, _ = r2.Read(buf)
		cancel()
		_, _ = io.Copy(io.Discard, r2)
		// Writer with a failing destination.
		w, err := NewWriter(context.Background(), &failAfter{n: 3 * MinSegmentSize}, WriterOptions{KeyService: ks, Recipients: []KeyRef{refA}, SegmentSize: MinSegmentSize, Concurrency: 4})
		if err != nil {
			t.Fatal(err)
		}
		_, _ = w.Write(pt)
		_ = w.Close()
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		runtime.GC()
		n := runtime.NumGoroutine()
		if n <= before+1 {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("ATTACK SUCCEEDED: %d goroutines before, %d after:\n%s", before, n, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type failAfter struct{ n int }

func (f *failAfter) Write(p []byte) (int, error) {
	if f.n -= len(p); f.n < 0 {
		return 0, errors.New("disk full")
	}
	return len(p), nil
}

// TestAttackReadAfterClose: Reader.Close's contract ("Close stops
// decryption; later Reads fail", reader.go:261) against the implementation:
// Read serves r.pending before it looks at r.err (reader.go:223-258), so
// after Close it keeps returning the rest of the current segment.
func TestAttackReadAfterClose(t *testing.T) {
	ks := newMemKS()
	file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, randBytes(t, 3*MinSegmentSize))
	r, err := NewReader(context.Background(), bytes.NewReader(file), ReaderOptions{KeyService: ks})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Read(make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	r.Close()
	if n, err := r.Read(make([]byte, 100)); err == nil || n != 0 {
		t.Errorf("BROKEN CONTRACT: Read after Close returned %d bytes, err %v; Close says later Reads fail", n, err)
	}
}

// slowReader delivers its bytes in small pieces with pauses.
type slowReader struct{ r io.Reader }

func (s *slowReader) Read(p []byte) (int, error) {
	time.Sleep(50 * time.Microsecond)
	return s.r.Read(p[:min(len(p), 1000)])
}

// TestAttackReaderCloseDuringRead: Close called from another goroutine while
// Read is running (the usual way to abort a consumer). Under -race this
// reports the unsynchronised access to Reader.err (reader.go:228/273-275);
// without -race it checks that the Read returns an error, not EOF, and that
// nothing hangs.
func TestAttackReaderCloseDuringRead(t *testing.T) {
	ks := newMemKS()
	pt := randBytes(t, 64*MinSegmentSize)
	file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, pt)
	r, err := NewReader(context.Background(), &slowReader{bytes.NewReader(file)}, ReaderOptions{KeyService: ks, Concurrency: 2})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, r)
		done <- err
	}()
	time.Sleep(5 * time.Millisecond)
	r.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Log("read finished before Close")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("ATTACK SUCCEEDED: Read did not return after Close")
	}
}
