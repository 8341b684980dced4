package envelope

import (
	"runtime"
	"sync"
)

// The writer and the reader share one concurrency design. One goroutine feeds
// segments in file order; each segment is queued twice: on jobs, which a
// fixed set of workers take in any order to seal or open, and on order, which
// one consumer takes in file order, waiting on each segment's done channel.
// order's capacity bounds the segments in flight (read but not yet consumed),
// so memory is O(concurrency × segment size) whatever the file size. Workers
// touch nothing but their own segment, so no lock is needed.

// segJob is one segment on its way through the pipeline.
type segJob struct {
	idx   uint64
	final bool
	in    *[]byte // input buffer, from a pool
	inLen int     // bytes of *in that hold the segment
	out   *[]byte // output buffer, from a pool
	res   []byte  // the result, a prefix of *out
	err   error
	done  chan struct{}
}

type pipeline struct {
	jobs     chan *segJob
	order    chan *segJob
	stop     chan struct{}
	stopOnce sync.Once
	workers  sync.WaitGroup
}

// newPipeline starts workers goroutines running work on each job.
func newPipeline(workers int, work func(*segJob)) *pipeline {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	inflight := 2 * workers
	p := &pipeline{
		jobs:  make(chan *segJob, inflight+1),
		order: make(chan *segJob, inflight),
		stop:  make(chan struct{}),
	}
	p.workers.Add(workers)
	for range workers {
		go func() {
			defer p.workers.Done()
			for j := range p.jobs {
				work(j)
				close(j.done)
			}
		}()
	}
	return p
}

// submit queues j, blocking while the pipeline is full. It returns false,
// without queueing, once halt was called.
func (p *pipeline) submit(j *segJob) bool {
	j.done = make(chan struct{})
	select {
	case p.order <- j:
	case <-p.stop:
		return false
	}
	// jobs holds at most cap(order)+1 entries (those in order and the one the
	// consumer is waiting on), so this send never blocks for long.
	p.jobs <- j
	return true
}

// finish is called once by the feeding side after its last submit.
func (p *pipeline) finish() {
	close(p.jobs)
	close(p.order)
}

// halt makes further submits fail; it is safe to call many times.
func (p *pipeline) halt() { p.stopOnce.Do(func() { close(p.stop) }) }

// bufPool hands out byte slices of one size. A pool of plaintext buffers
// clears them on return, so that plaintext does not linger in buffers
// waiting for reuse or collection; ciphertext buffers are not cleared.
type bufPool struct {
	size      int
	plaintext bool
	pool      sync.Pool
}

func newBufPool(size int, plaintext bool) *bufPool {
	bp := &bufPool{size: size, plaintext: plaintext}
	bp.pool.New = func() any { b := make([]byte, size); return &b }
	return bp
}

func (bp *bufPool) get() *[]byte { return bp.pool.Get().(*[]byte) }

// put returns b to the pool.
func (bp *bufPool) put(b *[]byte) {
	if b == nil {
		return
	}
	if bp.plaintext {
		clear(*b)
	}
	bp.pool.Put(b)
}
