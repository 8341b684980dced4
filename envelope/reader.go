package envelope

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
)

// ReaderOptions configure NewReader and NewReaderAt.
type ReaderOptions struct {
	// KeyService unwraps the data key for every recipient, unless
	// KeyServiceFor is set.
	KeyService KeyService
	// KeyServiceFor, if set, returns the key service for a recipient (for
	// instance one Vault client per mount), or nil to skip that recipient.
	KeyServiceFor func(Recipient) KeyService
	// Filter, if set, restricts the recipients tried to those it accepts
	// (for instance by mount). Recipients are tried in header order.
	Filter func(Recipient) bool
	// AAD is the associated data given at encryption.
	AAD []byte
	// Concurrency is the number of decrypting goroutines of a Reader
	// (default GOMAXPROCS). A ReaderAt decrypts in the calling goroutine;
	// callers parallelise by issuing ReadAt calls concurrently.
	Concurrency int
}

// open unwraps the data key with the first recipient that works (one key
// service call if the first one does), derives the keys and checks the header
// tag. A recipient whose key unwraps but fails the tag is reported and the
// next one tried: a slot swapped in from another file must not hide a good one.
func open(ctx context.Context, h *Header, opts ReaderOptions) (*fileKeys, error) {
	var errs []error
	tried := 0
	for i, r := range h.Recipients {
		if opts.Filter != nil && !opts.Filter(r) {
			continue
		}
		ks := opts.KeyService
		if opts.KeyServiceFor != nil {
			ks = opts.KeyServiceFor(r)
		}
		if ks == nil {
			continue
		}
		tried++
		dataKey, err := ks.Unwrap(ctx, r.Mount, r.Key, h.Context, r.Wrapped)
		if err != nil {
			errs = append(errs, fmt.Errorf("recipient %d (%s/%s): %w", i, r.Mount, r.Key, err))
			if ctx.Err() != nil {
				break
			}
			continue
		}
		keys, err := deriveKeys(dataKey, h.Salt)
		clear(dataKey)
		if err != nil {
			// A data key of the wrong size: the slot is not this file's.
			errs = append(errs, fmt.Errorf("recipient %d (%s/%s): %v: %w", i, r.Mount, r.Key, err, ErrAuth))
			continue
		}
		err = h.verify(keys, opts.AAD)
		if err == nil {
			clear(keys.header)
			keys.header = nil
			return keys, nil
		}
		clear(keys.header)
		errs = append(errs, fmt.Errorf("recipient %d (%s/%s): %w", i, r.Mount, r.Key, err))
	}
	if tried == 0 {
		return nil, fmt.Errorf("envelope: no recipient selected (of %d in the header): %w", len(h.Recipients), ErrUnwrap)
	}
	// If some recipient unwrapped but the tag failed, the file (or the AAD) is
	// at fault, not the caller's rights: report ErrAuth first.
	for _, e := range errs {
		if errors.Is(e, ErrAuth) {
			return nil, fmt.Errorf("envelope: %w", errors.Join(errs...))
		}
	}
	return nil, fmt.Errorf("envelope: %w: %w", ErrUnwrap, errors.Join(errs...))
}

// Reader decrypts an envelope stream. Read returns plaintext only of
// segments that authenticated, in order. Because plaintext is released
// segment by segment, a caller must treat everything it read as void if Read
// ends with an error other than io.EOF (write to a temporary file, rename on
// success). Close stops the decrypting goroutines early; they also stop at
// the end of the stream, at the first error and when ctx ends.
type Reader struct {
	ctx     context.Context
	hdr     *Header
	keys    *fileKeys
	segSize int
	p       *pipeline
	inPool  *bufPool
	outPool *bufPool

	cur      *segJob
	pending  []byte
	sawFinal bool

	// mu guards err, which Close (from any goroutine) and Read set.
	mu        sync.Mutex
	err       error
	closed    atomic.Bool
	closeOnce sync.Once
}

// fail records err unless an error is recorded already, and returns the
// recorded one.
func (r *Reader) fail(err error) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err == nil {
		r.err = err
	}
	return r.err
}

func (r *Reader) failed() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// NewReader reads and authenticates the header of the envelope in r (one
// key service call when the first selected recipient can unwrap) and returns
// a Reader of the plaintext.
func NewReader(ctx context.Context, r io.Reader, opts ReaderOptions) (*Reader, error) {
	h, err := ParseHeader(r)
	if err != nil {
		return nil, err
	}
	keys, err := open(ctx, h, opts)
	if err != nil {
		return nil, err
	}
	er := &Reader{
		ctx:     ctx,
		hdr:     h,
		keys:    keys,
		segSize: h.SegmentSize,
		inPool:  newBufPool(h.SegmentSize+gcmTagLen, false),
		outPool: newBufPool(h.SegmentSize, true),
	}
	er.p = newPipeline(opts.Concurrency, er.openSegment)
	go er.feed(bufio.NewReaderSize(r, 64<<10))
	return er, nil
}

// Header returns a copy of the authenticated header.
func (r *Reader) Header() *Header { return r.hdr.clone() }

// feed reads segments and queues them. A segment is final when it is short
// or when nothing follows it; openSegment then checks the flag.
func (r *Reader) feed(br *bufio.Reader) {
	defer r.p.finish()
	segCT := r.segSize + gcmTagLen
	for idx := uint64(0); ; idx++ {
		if r.ctx.Err() != nil {
			r.p.submit(&segJob{idx: idx, err: r.ctx.Err()})
			return
		}
		buf := r.inPool.get()
		n, err := io.ReadFull(br, (*buf)[:segCT])
		j := &segJob{idx: idx, in: buf, inLen: n}
		switch {
		case err == io.EOF:
			// Only at idx 0: a full segment followed by EOF is final.
			r.inPool.put(buf)
			j.in, j.err = nil, fmt.Errorf("envelope: no segment after the header: %w", ErrTruncated)
		case err == io.ErrUnexpectedEOF:
			j.final = true
		case err != nil:
			r.inPool.put(buf)
			j.in, j.err = nil, fmt.Errorf("envelope: reading segment %d: %w", idx, err)
		default:
			if _, perr := br.Peek(1); perr == io.EOF {
				j.final = true
			} else if perr != nil {
				r.inPool.put(buf)
				j.in, j.err = nil, fmt.Errorf("envelope: reading after segment %d: %w", idx, perr)
			}
		}
		if j.err != nil {
			r.p.submit(j)
			return
		}
		if !r.p.submit(j) || j.final {
			return
		}
	}
}

// openSegment runs on a worker.
func (r *Reader) openSegment(j *segJob) {
	if j.err != nil || j.in == nil {
		return
	}
	defer func() { r.inPool.put(j.in); j.in = nil }()
	j.out = r.outPool.get()
	j.res, j.err = openChunk(r.keys, r.segSize, j.idx, j.final, (*j.in)[:j.inLen], (*j.out)[:0])
}

// openChunk authenticates and decrypts one segment's ciphertext into dst.
// final says whether the segment is the last in the file (by its position).
// The errors tell truncation at a segment boundary and trailing data from
// tampering, by trying the other flag; no plaintext is returned on error.
func openChunk(k *fileKeys, segSize int, idx uint64, final bool, ct, dst []byte) ([]byte, error) {
	if len(ct) < gcmTagLen {
		return nil, fmt.Errorf("envelope: truncated in segment %d: %w", idx, ErrTruncated)
	}
	var nonce [nonceLen]byte
	segmentNonce(&nonce, idx, final)
	pt, err := k.payload.Open(dst, nonce[:], ct, nil)
	if err == nil {
		if final && idx > 0 && len(pt) == 0 {
			// Only the whole file's final segment may be empty.
			return nil, segmentErr(idx, ErrFormat, "empty final segment after another segment")
		}
		return pt, nil
	}
	// Diagnose, never release: the other flag tells why the position is wrong.
	segmentNonce(&nonce, idx, !final)
	if _, err2 := k.payload.Open(dst, nonce[:], ct, nil); err2 == nil {
		clear(dst[:cap(dst)][:len(ct)-gcmTagLen])
		if final {
			return nil, fmt.Errorf("envelope: truncated after segment %d (no final segment): %w", idx, ErrTruncated)
		}
		return nil, segmentErr(idx, ErrFormat, "data after the final segment")
	}
	if final && len(ct) < segSize+gcmTagLen {
		return nil, segmentErr(idx, ErrAuth, "short last segment (truncated or modified)")
	}
	return nil, segmentErr(idx, ErrAuth, "")
}

// Read reads plaintext.
func (r *Reader) Read(p []byte) (int, error) {
	if r.closed.Load() {
		return 0, r.failed()
	}
	for len(r.pending) == 0 {
		if err := r.next(); err != nil {
			return 0, err
		}
	}
	n := copy(p, r.pending)
	r.pending = r.pending[n:]
	return n, nil
}

// WriteTo writes the rest of the plaintext to w, each segment as soon as it
// authenticated and straight from the buffer it was opened into (io.Copy
// uses it). It returns nil at the end of an authentic stream, and else the
// error Read would have given.
func (r *Reader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		if r.closed.Load() {
			return total, r.failed()
		}
		if len(r.pending) > 0 {
			n, err := w.Write(r.pending)
			total += int64(n)
			r.pending = r.pending[n:]
			if err == nil && n == 0 {
				err = io.ErrShortWrite
			}
			if err != nil {
				return total, err
			}
			continue
		}
		if err := r.next(); err == io.EOF {
			return total, nil
		} else if err != nil {
			return total, err
		}
	}
}

// next makes the next segment's plaintext pending, once it authenticated;
// io.EOF after the final segment.
func (r *Reader) next() error {
	if r.cur != nil {
		r.outPool.put(r.cur.out)
		r.cur = nil
	}
	if err := r.failed(); err != nil {
		return err
	}
	if r.sawFinal {
		return io.EOF
	}
	var j *segJob
	var ok bool
	select {
	case j, ok = <-r.p.order:
	case <-r.ctx.Done():
		err := r.fail(r.ctx.Err())
		r.Close()
		return err
	}
	if !ok {
		return r.fail(fmt.Errorf("envelope: stream stopped before its final segment: %w", ErrTruncated))
	}
	<-j.done
	if j.err != nil {
		r.outPool.put(j.out)
		err := r.fail(j.err)
		r.Close()
		return err
	}
	r.cur, r.pending, r.sawFinal = j, j.res, j.final
	return nil
}

// Close stops decryption; later Reads fail. It may be called from another
// goroutine than Read's, to abort it. It does not close the
// underlying reader.
func (r *Reader) Close() error {
	r.closeOnce.Do(func() {
		r.p.halt()
		// Drain so the feeder and workers finish and return their buffers.
		go func() {
			for j := range r.p.order {
				<-j.done
				r.outPool.put(j.out)
			}
		}()
		r.fail(errors.New("envelope: reader closed"))
		r.closed.Store(true)
	})
	return nil
}
