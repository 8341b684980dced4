package envelope

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
)

// WriterOptions configure NewWriter.
type WriterOptions struct {
	// KeyService wraps the data key (required).
	KeyService KeyService
	// Recipients are the transit keys that can open the file (one or more).
	// The first gets a data key from transit/datakey; each further one wraps
	// the same data key with transit/encrypt: one Vault request per recipient.
	Recipients []KeyRef
	// Context is the derivation context for derived transit keys; it is
	// stored in the header and must be the same for every recipient.
	Context []byte
	// AAD is associated data bound to the file through the header tag; the
	// same bytes must be given to decrypt. It is not stored in the file.
	AAD []byte
	// SegmentSize is the plaintext size of each segment (default 64 KiB,
	// MinSegmentSize to MaxSegmentSize).
	SegmentSize int
	// Concurrency is the number of encrypting goroutines (default GOMAXPROCS).
	Concurrency int
	// SlotHeadroom is the room reserved in each recipient slot beyond its
	// wrapped key, for a longer key after rewrap (default DefaultSlotHeadroom;
	// negative means none).
	SlotHeadroom int
	// Rand is the source of the salt (default crypto/rand). For test vectors.
	Rand io.Reader
}

// Writer encrypts a stream into an envelope file. It is not safe for
// concurrent use. Close must be called: it writes the final segment and
// stops the encrypting goroutines.
type Writer struct {
	ctx     context.Context
	keys    *fileKeys
	segSize int
	p       *pipeline
	inPool  *bufPool
	outPool *bufPool
	cur     *[]byte
	n       int // bytes in cur
	idx     uint64
	closed  bool
	outDone chan struct{}

	mu  sync.Mutex
	err error
}

// NewWriter obtains a data key for the recipients, writes the header to w and
// returns a Writer for the plaintext. Encryption runs on Concurrency
// goroutines, with at most 2×Concurrency segments in flight; the ciphertext
// reaches w in order.
func NewWriter(ctx context.Context, w io.Writer, opts WriterOptions) (*Writer, error) {
	if opts.KeyService == nil {
		return nil, errors.New("envelope: no key service")
	}
	if len(opts.Recipients) == 0 || len(opts.Recipients) > MaxRecipients {
		return nil, fmt.Errorf("envelope: 1 to %d recipients, got %d", MaxRecipients, len(opts.Recipients))
	}
	// A mount may be given as Vault prints it ("transit/"); the header
	// holds it without the slashes.
	opts.Recipients = slices.Clone(opts.Recipients)
	for i := range opts.Recipients {
		r := &opts.Recipients[i]
		r.Mount = strings.Trim(r.Mount, "/")
		if err := checkHint("mount", r.Mount); err != nil {
			return nil, err
		}
		if err := checkHint("key", r.Key); err != nil {
			return nil, err
		}
	}
	segSize := opts.SegmentSize
	if segSize == 0 {
		segSize = DefaultSegmentSize
	}
	if segSize < MinSegmentSize || segSize > MaxSegmentSize {
		return nil, fmt.Errorf("envelope: segment size %d not in [%d, %d]", segSize, MinSegmentSize, MaxSegmentSize)
	}
	if len(opts.Context) > MaxContextLen {
		return nil, fmt.Errorf("envelope: context longer than %d bytes", MaxContextLen)
	}
	headroom := opts.SlotHeadroom
	if headroom == 0 {
		headroom = DefaultSlotHeadroom
	}
	headroom = max(headroom, 0)
	rnd := opts.Rand
	if rnd == nil {
		rnd = rand.Reader
	}

	h := &Header{Version: Version, SegmentSize: segSize, Salt: make([]byte, saltLen), Context: opts.Context}
	if _, err := io.ReadFull(rnd, h.Salt); err != nil {
		return nil, fmt.Errorf("envelope: salt: %w", err)
	}
	dataKey, err := wrapForAll(ctx, opts.KeyService, opts.Recipients, opts.Context, h, headroom)
	if err != nil {
		return nil, err
	}
	defer clear(dataKey)
	keys, err := deriveKeys(dataKey, h.Salt)
	if err != nil {
		return nil, err
	}
	defer clear(keys.header)
	body, err := h.marshal()
	if err != nil {
		return nil, err
	}
	hdr := append(body, h.computeTag(keys.header, body, opts.AAD)...)
	if _, err := w.Write(hdr); err != nil {
		return nil, fmt.Errorf("envelope: writing header: %w", err)
	}

	ew := &Writer{
		ctx:     ctx,
		keys:    &fileKeys{payload: keys.payload},
		segSize: segSize,
		inPool:  newBufPool(segSize, true),
		outPool: newBufPool(segSize+gcmTagLen, false),
		outDone: make(chan struct{}),
	}
	ew.p = newPipeline(opts.Concurrency, ew.seal)
	go ew.output(w)
	return ew, nil
}

// wrapForAll gets the data key wrapped for every recipient and fills
// h.Recipients. It returns the plaintext data key.
func wrapForAll(ctx context.Context, ks KeyService, refs []KeyRef, keyContext []byte, h *Header, headroom int) ([]byte, error) {
	first := refs[0]
	dataKey, wrapped, err := ks.DataKey(ctx, first.Mount, first.Key, keyContext)
	if err != nil {
		return nil, fmt.Errorf("envelope: data key from %s: %w", first, err)
	}
	if len(dataKey) != keyLen {
		clear(dataKey)
		return nil, fmt.Errorf("envelope: data key from %s is %d bytes, want %d", first, len(dataKey), keyLen)
	}
	all := []string{wrapped}
	for _, r := range refs[1:] {
		wr, err := ks.Wrap(ctx, r.Mount, r.Key, keyContext, dataKey)
		if err != nil {
			clear(dataKey)
			return nil, fmt.Errorf("envelope: wrapping the data key with %s: %w", r, err)
		}
		all = append(all, wr)
	}
	for i, wr := range all {
		if err := checkWrapped(wr); err != nil {
			clear(dataKey)
			return nil, fmt.Errorf("envelope: %s: %v", refs[i], err)
		}
		capacity := min(len(wr)+headroom, MaxSlotCapacity)
		if len(wr) > capacity {
			clear(dataKey)
			return nil, fmt.Errorf("envelope: %s: wrapped key of %d bytes: %w", refs[i], len(wr), ErrSlotFull)
		}
		h.Recipients = append(h.Recipients, Recipient{Mount: refs[i].Mount, Key: refs[i].Key, Wrapped: wr, SlotCapacity: capacity})
	}
	return dataKey, nil
}

// seal runs on a worker.
func (w *Writer) seal(j *segJob) {
	var nonce [nonceLen]byte
	segmentNonce(&nonce, j.idx, j.final)
	j.out = w.outPool.get()
	j.res = w.keys.payload.Seal((*j.out)[:0], nonce[:], (*j.in)[:j.inLen], nil)
	w.inPool.put(j.in)
	j.in = nil
}

// output writes sealed segments to dst in order.
func (w *Writer) output(dst io.Writer) {
	defer close(w.outDone)
	for j := range w.p.order {
		<-j.done
		if w.failed() == nil {
			if _, err := dst.Write(j.res); err != nil {
				w.fail(fmt.Errorf("envelope: writing segment %d: %w", j.idx, err))
			}
		}
		w.outPool.put(j.out)
	}
}

func (w *Writer) fail(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err == nil {
		w.err = err
	}
	w.p.halt()
}

func (w *Writer) failed() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// Write encrypts p. A segment is sealed only once the next byte arrives (or
// at Close), because only then is it known not to be the last.
func (w *Writer) Write(p []byte) (int, error) {
	if w.closed {
		return 0, errors.New("envelope: write after close")
	}
	written := 0
	for len(p) > 0 {
		if err := w.failed(); err != nil {
			return written, err
		}
		if err := w.ctx.Err(); err != nil {
			w.fail(err)
			return written, err
		}
		if w.cur == nil {
			w.cur = w.inPool.get()
		} else if w.n == w.segSize {
			if err := w.send(false); err != nil {
				return written, err
			}
			w.cur = w.inPool.get()
		}
		c := copy((*w.cur)[w.n:], p)
		w.n += c
		p = p[c:]
		written += c
	}
	return written, nil
}

// ReadFrom encrypts what src holds until its end, reading it straight into
// the segments' buffers (io.Copy uses it). Close must still be called.
func (w *Writer) ReadFrom(src io.Reader) (int64, error) {
	if w.closed {
		return 0, errors.New("envelope: write after close")
	}
	var total int64
	for {
		if err := w.failed(); err != nil {
			return total, err
		}
		if err := w.ctx.Err(); err != nil {
			w.fail(err)
			return total, err
		}
		if w.cur == nil {
			w.cur = w.inPool.get()
		}
		if w.n == w.segSize {
			// A full segment goes out only once more data follows: the
			// last one must carry the final flag, and an empty final
			// segment after a full one is not a valid file.
			next := w.inPool.get()
			n, err := src.Read((*next)[:w.segSize])
			if n > 0 {
				if serr := w.send(false); serr != nil {
					w.inPool.put(next)
					return total, serr
				}
				w.cur, w.n = next, n
				total += int64(n)
			} else {
				w.inPool.put(next)
			}
			if err == io.EOF {
				return total, nil
			}
			if err != nil {
				return total, err
			}
			continue
		}
		n, err := src.Read((*w.cur)[w.n:w.segSize])
		w.n += n
		total += int64(n)
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

func (w *Writer) send(final bool) error {
	j := &segJob{idx: w.idx, final: final, in: w.cur, inLen: w.n}
	w.cur, w.n = nil, 0
	w.idx++
	if !w.p.submit(j) {
		return w.failed()
	}
	return nil
}

// Close seals the final segment (which is empty only if nothing was
// written), waits for every segment to reach the underlying writer and
// returns the first error. It does not close the underlying writer.
func (w *Writer) Close() error {
	if w.closed {
		return w.failed()
	}
	w.closed = true
	if w.cur == nil {
		w.cur = w.inPool.get()
	}
	if w.failed() == nil {
		if err := w.ctx.Err(); err != nil {
			w.fail(err)
		} else {
			_ = w.send(true) // a failure is recorded by fail
		}
	}
	w.p.finish()
	<-w.outDone
	w.p.workers.Wait()
	return w.failed()
}
