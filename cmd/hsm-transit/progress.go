package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// progressMin is the input size from which a progress bar is worth showing.
const progressMin = 64 << 20

// progress draws a progress line on stderr when stderr is a terminal and the
// input is large; otherwise every method is a no-op. It never goes to a pipe.
type progress struct {
	w     io.Writer
	size  int64 // -1: unknown (a pipe)
	n     atomic.Int64
	start time.Time
	quit  chan struct{}
	wg    sync.WaitGroup
}

// isTerminal reports whether w is a character device (a terminal), without
// golang.org/x/term, which the module does not require.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// showProgress decides whether to draw: a terminal, and an input known to be
// large or of unknown size (drawn only once it passes progressMin).
func showProgress(terminal bool, size int64) bool {
	return terminal && (size < 0 || size >= progressMin)
}

func startProgress(stderr io.Writer, size int64) *progress {
	if !showProgress(isTerminal(stderr), size) {
		return nil
	}
	p := &progress{w: stderr, size: size, start: time.Now(), quit: make(chan struct{})}
	p.wg.Add(1)
	go p.loop()
	return p
}

func (p *progress) add(n int) {
	if p != nil {
		p.n.Add(int64(n))
	}
}

func (p *progress) loop() {
	defer p.wg.Done()
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	drawn := false
	for {
		select {
		case <-p.quit:
			if drawn {
				fmt.Fprint(p.w, "\r\033[K")
			}
			return
		case <-t.C:
			n := p.n.Load()
			if p.size < 0 && n < progressMin {
				continue
			}
			fmt.Fprint(p.w, "\r\033[K"+p.line(n, time.Since(p.start)))
			drawn = true
		}
	}
}

// line formats one progress line.
func (p *progress) line(n int64, elapsed time.Duration) string {
	rate := float64(n) / max(elapsed.Seconds(), 1e-3)
	if p.size < 0 {
		return fmt.Sprintf("%s  %s/s", size(float64(n)), size(rate))
	}
	pct := 100 * float64(n) / float64(max(p.size, 1))
	const width = 30
	fill := min(int(pct*width/100), width)
	bar := make([]byte, width)
	for i := range bar {
		bar[i] = ' '
		if i < fill {
			bar[i] = '='
		}
	}
	return fmt.Sprintf("[%s] %3.0f%%  %s / %s  %s/s", bar, pct, size(float64(n)), size(float64(p.size)), size(rate))
}

func (p *progress) stop() {
	if p == nil {
		return
	}
	close(p.quit)
	p.wg.Wait()
}

func size(b float64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB"}
	i := 0
	for b >= 1024 && i < len(units)-1 {
		b /= 1024
		i++
	}
	return fmt.Sprintf("%.1f %s", b, units[i])
}
