package envelope

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"slices"
	"testing"
	"testing/iotest"
)

var (
	refA = KeyRef{Mount: "transit", Key: "backups"}
	refB = KeyRef{Mount: "dr/transit", Key: "backups-dr"}
)

func randBytes(tb testing.TB, n int) []byte {
	tb.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		tb.Fatal(err)
	}
	return b
}

// encrypt writes pt through a Writer, in uneven chunks so that segment
// boundaries fall inside Write calls.
func encrypt(tb testing.TB, opts WriterOptions, pt []byte) []byte {
	tb.Helper()
	if len(opts.Recipients) == 0 {
		opts.Recipients = []KeyRef{refA}
	}
	var out bytes.Buffer
	w, err := NewWriter(context.Background(), &out, opts)
	if err != nil {
		tb.Fatalf("NewWriter: %v", err)
	}
	for rest, step := pt, 1; len(rest) > 0; step = (step*3 + 1) % 100003 {
		n := min(step%7919+1, len(rest))
		if _, err := w.Write(rest[:n]); err != nil {
			tb.Fatalf("Write: %v", err)
		}
		rest = rest[n:]
	}
	if err := w.Close(); err != nil {
		tb.Fatalf("Close: %v", err)
	}
	return out.Bytes()
}

// decrypt reads the whole plaintext; on error it also returns what Read
// released before the error, which must be only authenticated segments.
func decrypt(file []byte, opts ReaderOptions) ([]byte, error) {
	r, err := NewReader(context.Background(), bytes.NewReader(file), opts)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	return io.ReadAll(r)
}

func TestRoundTrip(t *testing.T) {
	ks := newMemKS()
	for _, seg := range []int{MinSegmentSize, 5000, DefaultSegmentSize} {
		for _, size := range []int{0, 1, seg - 1, seg, seg + 1, 2 * seg, 3*seg + 7, 3 << 20} {
			for _, conc := range []int{1, 4} {
				t.Run(fmt.Sprintf("seg=%d/size=%d/conc=%d", seg, size, conc), func(t *testing.T) {
					pt := randBytes(t, size)
					opts := WriterOptions{KeyService: ks, SegmentSize: seg, Concurrency: conc}
					file := encrypt(t, opts, pt)
					nseg := max(1, (size+seg-1)/seg)
					h, err := ParseHeader(bytes.NewReader(file))
					if err != nil {
						t.Fatal(err)
					}
					if want := h.HeaderLength + size + nseg*gcmTagLen; len(file) != want {
						t.Fatalf("file is %d bytes, want %d", len(file), want)
					}
					got, err := decrypt(file, ReaderOptions{KeyService: ks, Concurrency: conc})
					if err != nil {
						t.Fatalf("decrypt: %v", err)
					}
					if !bytes.Equal(got, pt) {
						t.Fatalf("plaintext differs (got %d bytes, want %d)", len(got), len(pt))
					}
				})
			}
		}
	}
}

// TestReadSmallBuffers reads one byte at a time through iotest readers, on
// both sides, so that every short-read path is taken.
func TestReadSmallBuffers(t *testing.T) {
	ks := newMemKS()
	pt := randBytes(t, 3*MinSegmentSize+5)
	file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, pt)
	r, err := NewReader(context.Background(), iotest.HalfReader(bytes.NewReader(file)), ReaderOptions{KeyService: ks})
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(iotest.OneByteReader(r))
	if err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("got %d bytes, err %v; want %d bytes", len(got), err, len(pt))
	}
}

func TestAADAndContext(t *testing.T) {
	ks := newMemKS()
	pt := randBytes(t, 10000)
	keyCtx := []byte("tenant-42")
	file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize, Context: keyCtx, AAD: []byte("build 1234")}, pt)

	h, err := ParseHeader(bytes.NewReader(file))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(h.Context, keyCtx) {
		t.Fatalf("header context %q, want %q", h.Context, keyCtx)
	}
	got, err := decrypt(file, ReaderOptions{KeyService: ks, AAD: []byte("build 1234")})
	if err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("with the right AAD: %d bytes, %v", len(got), err)
	}
	for _, aad := range [][]byte{nil, []byte("build 1235"), []byte("build 1234\x00")} {
		got, err := decrypt(file, ReaderOptions{KeyService: ks, AAD: aad})
		if !errors.Is(err, ErrAuth) || len(got) != 0 {
			t.Errorf("AAD %q: got %d bytes, err %v; want ErrAuth and nothing", aad, len(got), err)
		}
	}
	// An AAD-less file refuses an AAD too.
	plain := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, pt)
	if _, err := decrypt(plain, ReaderOptions{KeyService: ks, AAD: []byte("x")}); !errors.Is(err, ErrAuth) {
		t.Errorf("unexpected AAD: err %v, want ErrAuth", err)
	}
}

func TestTwoRecipients(t *testing.T) {
	ks := newMemKS()
	pt := randBytes(t, 20000)
	file := encrypt(t, WriterOptions{KeyService: ks, Recipients: []KeyRef{refA, refB}, SegmentSize: MinSegmentSize}, pt)
	if got := ks.calls.Load(); got != 2 {
		t.Fatalf("encryption made %d key service calls, want 2 (datakey + one wrap)", got)
	}
	h, err := ParseHeader(bytes.NewReader(file))
	if err != nil {
		t.Fatal(err)
	}
	if len(h.Recipients) != 2 || h.Recipients[0].KeyRef() != refA || h.Recipients[1].KeyRef() != refB {
		t.Fatalf("recipients %+v", h.Recipients)
	}

	for _, c := range []struct {
		name   string
		refuse string
		calls  int64
	}{
		{"both work", "", 1},
		{"first refused", refA.Mount, 2},
		{"second refused", refB.Mount, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			ks.refuse = map[string]bool{c.refuse: true}
			defer func() { ks.refuse = map[string]bool{} }()
			ks.calls.Store(0)
			got, err := decrypt(file, ReaderOptions{KeyService: ks})
			if err != nil || !bytes.Equal(got, pt) {
				t.Fatalf("got %d bytes, err %v", len(got), err)
			}
			if n := ks.calls.Load(); n != c.calls {
				t.Fatalf("%d key service calls, want %d", n, c.calls)
			}
		})
	}

	t.Run("both refused", func(t *testing.T) {
		ks.refuse = map[string]bool{refA.Mount: true, refB.Mount: true}
		defer func() { ks.refuse = map[string]bool{} }()
		_, err := decrypt(file, ReaderOptions{KeyService: ks})
		if !errors.Is(err, ErrUnwrap) || !errors.Is(err, errDenied) {
			t.Fatalf("err %v, want ErrUnwrap wrapping both denials", err)
		}
		for _, name := range []string{"transit/backups", "dr/transit/backups-dr"} {
			if !bytes.Contains([]byte(err.Error()), []byte(name)) {
				t.Errorf("error %q does not name %s", err, name)
			}
		}
	})

	t.Run("filter by mount", func(t *testing.T) {
		ks.calls.Store(0)
		got, err := decrypt(file, ReaderOptions{KeyService: ks, Filter: func(r Recipient) bool { return r.Mount == refB.Mount }})
		if err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("got %d bytes, err %v", len(got), err)
		}
		if n := ks.calls.Load(); n != 1 {
			t.Fatalf("%d calls, want 1 (only the selected recipient)", n)
		}
		_, err = decrypt(file, ReaderOptions{KeyService: ks, Filter: func(Recipient) bool { return false }})
		if !errors.Is(err, ErrUnwrap) {
			t.Fatalf("no recipient selected: err %v, want ErrUnwrap", err)
		}
	})

	t.Run("key service per recipient", func(t *testing.T) {
		other := newMemKS() // cannot unwrap anything of ks
		other.calls.Store(0)
		ks.calls.Store(0)
		got, err := decrypt(file, ReaderOptions{KeyServiceFor: func(r Recipient) KeyService {
			if r.Mount == refA.Mount {
				return other
			}
			return ks
		}})
		if err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("got %d bytes, err %v", len(got), err)
		}
		if other.calls.Load() != 1 || ks.calls.Load() != 1 {
			t.Fatalf("calls: other %d, ks %d; want 1 and 1", other.calls.Load(), ks.calls.Load())
		}
	})
}

func TestVaultCallsPerOperation(t *testing.T) {
	ks := newMemKS()
	pt := randBytes(t, 5*DefaultSegmentSize)
	file := encrypt(t, WriterOptions{KeyService: ks}, pt)
	if n := ks.calls.Load(); n != 1 {
		t.Fatalf("encryption: %d calls, want 1", n)
	}
	ks.calls.Store(0)
	if _, err := decrypt(file, ReaderOptions{KeyService: ks}); err != nil {
		t.Fatal(err)
	}
	if n := ks.calls.Load(); n != 1 {
		t.Fatalf("decryption: %d calls, want 1", n)
	}
	ks.calls.Store(0)
	ra, err := NewReaderAt(context.Background(), bytes.NewReader(file), int64(len(file)), ReaderOptions{KeyService: ks})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 100)
	if _, err := ra.ReadAt(buf, 3*DefaultSegmentSize); err != nil {
		t.Fatal(err)
	}
	if n := ks.calls.Load(); n != 1 {
		t.Fatalf("ReaderAt: %d calls, want 1", n)
	}
}

func TestWriterOptionErrors(t *testing.T) {
	ks := newMemKS()
	for name, opts := range map[string]WriterOptions{
		"no key service":      {Recipients: []KeyRef{refA}},
		"no recipient":        {KeyService: ks},
		"segment too small":   {KeyService: ks, Recipients: []KeyRef{refA}, SegmentSize: MinSegmentSize - 1},
		"segment too large":   {KeyService: ks, Recipients: []KeyRef{refA}, SegmentSize: MaxSegmentSize + 1},
		"empty key name":      {KeyService: ks, Recipients: []KeyRef{{Mount: "transit"}}},
		"control char mount":  {KeyService: ks, Recipients: []KeyRef{{Mount: "tr\nansit", Key: "k"}}},
		"context too long":    {KeyService: ks, Recipients: []KeyRef{refA}, Context: make([]byte, MaxContextLen+1)},
		"too many recipients": {KeyService: ks, Recipients: slices.Repeat([]KeyRef{refA}, MaxRecipients+1)},
	} {
		ks.calls.Store(0)
		if _, err := NewWriter(context.Background(), io.Discard, opts); err == nil {
			t.Errorf("%s: NewWriter accepted it", name)
		}
		if ks.calls.Load() != 0 {
			t.Errorf("%s: a key service call before the options were checked", name)
		}
	}
	ks.refuse[refA.Mount] = true
	_, err := NewWriter(context.Background(), io.Discard, WriterOptions{KeyService: ks, Recipients: []KeyRef{refA}})
	if !errors.Is(err, errDenied) || !bytes.Contains([]byte(err.Error()), []byte("transit/backups")) {
		t.Fatalf("refused data key: %v", err)
	}
}

// failWriter fails after n bytes.
type failWriter struct{ n int }

func (f *failWriter) Write(p []byte) (int, error) {
	if len(p) > f.n {
		return 0, errors.New("disk full")
	}
	f.n -= len(p)
	return len(p), nil
}

func TestWriterPropagatesWriteError(t *testing.T) {
	ks := newMemKS()
	w, err := NewWriter(context.Background(), &failWriter{n: 2000}, WriterOptions{KeyService: ks, Recipients: []KeyRef{refA}, SegmentSize: MinSegmentSize})
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, MinSegmentSize)
	var werr error
	for i := 0; i < 100 && werr == nil; i++ {
		_, werr = w.Write(chunk)
	}
	cerr := w.Close()
	if cerr == nil || !bytes.Contains([]byte(cerr.Error()), []byte("disk full")) {
		t.Fatalf("Close: %v, want the disk full error", cerr)
	}
}

func TestContextCancel(t *testing.T) {
	ks := newMemKS()
	file := encrypt(t, WriterOptions{KeyService: ks, SegmentSize: MinSegmentSize}, randBytes(t, 40*MinSegmentSize))
	ctx, cancel := context.WithCancel(context.Background())
	r, err := NewReader(ctx, bytes.NewReader(file), ReaderOptions{KeyService: ks})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := io.ReadFull(r, make([]byte, MinSegmentSize)); err != nil {
		t.Fatal(err)
	}
	cancel()
	_, err = io.ReadAll(r)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("after cancel: %v, want context.Canceled", err)
	}
}
