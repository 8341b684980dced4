// Command envelope-bench measures the hsm-transit CLI's envelope encryption
// against age and against the plugin's own transit/encrypt, side by side on
// one machine, and the CLI's peak memory (make bench-envelope; the figures
// are in BENCHMARKS.md, "Envelope encryption (issue 17)").
//
// Each tool's runs are interleaved (round 1 of every tool, then round 2, ...)
// so that the load of a shared machine spreads over all of them; the report
// gives the median and the range. The plaintext is zeros: AES-GCM and
// ChaCha20-Poly1305 run in time independent of the data, so zeros measure
// the same work as random bytes without a generator on the hot path.
package main

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"encoding/base64"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/envelope"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/vaultproc"
)

type options struct {
	vault, plugin, cli string
	size               int64
	rounds             int
	memSizes           string
	batchItems         int
	itemSize           int
	batchRequests      int
}

func main() {
	var o options
	flag.StringVar(&o.vault, "vault", "bin/vault", "the vault binary")
	flag.StringVar(&o.plugin, "plugin", "bin/vault-plugin-secrets-hsm-transit", "the plugin binary")
	flag.StringVar(&o.cli, "cli", "bin/hsm-transit", "the hsm-transit CLI binary")
	flag.Int64Var(&o.size, "size", 1<<30, "bytes per throughput run")
	flag.IntVar(&o.rounds, "rounds", 3, "interleaved rounds per tool")
	flag.StringVar(&o.memSizes, "mem-sizes", "1MiB,1GiB,10GiB", "input sizes of the peak-memory runs")
	flag.IntVar(&o.batchItems, "batch-items", 1000, "items per transit/encrypt batch")
	flag.IntVar(&o.itemSize, "item-size", 4096, "plaintext bytes per batch item")
	flag.IntVar(&o.batchRequests, "batch-requests", 4, "batch requests per transit round")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "envelope-bench:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	for _, tool := range []string{"age", "age-keygen", "/usr/bin/time"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found: install it (Debian: apt-get install -y age time)", tool)
		}
	}
	for _, p := range []*string{&o.vault, &o.plugin, &o.cli} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return err
		}
		*p = abs
	}
	memSizes, err := parseSizes(o.memSizes)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "envelope-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	v, err := startVault(o, dir)
	if err != nil {
		return err
	}
	defer v.Stop()
	env := append(os.Environ(), "VAULT_ADDR="+v.Addr, "VAULT_TOKEN="+v.Token)

	ageKey := filepath.Join(dir, "age.key")
	if out, err := exec.Command("age-keygen", "-o", ageKey).CombinedOutput(); err != nil {
		return fmt.Errorf("age-keygen: %v: %s", err, out)
	}
	pub, err := exec.Command("age-keygen", "-y", ageKey).Output()
	if err != nil {
		return fmt.Errorf("age-keygen -y: %w", err)
	}
	recipient := strings.TrimSpace(string(pub))

	// One ciphertext of each tool to decrypt in the rounds.
	hsmFile, ageFile := filepath.Join(dir, "zero.hsmenv"), filepath.Join(dir, "zero.age")
	if _, err := pipeRun(env, false, zeros(o.size), fileSink(hsmFile), o.cli, "encrypt", "-k", "transit/bench"); err != nil {
		return err
	}
	if _, err := pipeRun(env, false, zeros(o.size), fileSink(ageFile), "age", "-r", recipient); err != nil {
		return err
	}

	big := o.size
	tools := []struct {
		name string
		f    func() (wall, cpu time.Duration, err error)
	}{
		{"hsm-transit encrypt", func() (time.Duration, time.Duration, error) {
			return pipeRunCPU(env, false, zeros(big), discard, o.cli, "encrypt", "-k", "transit/bench")
		}},
		{"hsm-transit decrypt", func() (time.Duration, time.Duration, error) {
			return pipeRunCPU(env, false, fileSource(hsmFile), discard, o.cli, "decrypt")
		}},
		{"age encrypt (X25519)", func() (time.Duration, time.Duration, error) {
			return pipeRunCPU(env, false, zeros(big), discard, "age", "-r", recipient)
		}},
		{"age decrypt (X25519)", func() (time.Duration, time.Duration, error) {
			return pipeRunCPU(env, false, fileSource(ageFile), discard, "age", "-d", "-i", ageKey)
		}},
		{fmt.Sprintf("transit/encrypt (plugin), batches of %d × %d B, one client", o.batchItems, o.itemSize), func() (time.Duration, time.Duration, error) {
			d, err := batchesOf(v, o)
			return d, 0, err
		}},
		{"Go AES-256-GCM, one goroutine (64 KiB segments, as BenchmarkAESGCM)", func() (time.Duration, time.Duration, error) {
			d := aesGCM(256 << 20)
			return d, d, nil
		}},
		{"age encrypt, pipes grown to 1 MiB by the harness", func() (time.Duration, time.Duration, error) {
			return pipeRunCPU(env, true, zeros(big), discard, "age", "-r", recipient)
		}},
		{"age decrypt, pipes grown to 1 MiB by the harness", func() (time.Duration, time.Duration, error) {
			return pipeRunCPU(env, true, fileSource(ageFile), discard, "age", "-d", "-i", ageKey)
		}},
		{"cat, pipes grown to 1 MiB (no crypto: what the pipes and this harness allow)", func() (time.Duration, time.Duration, error) {
			return pipeRunCPU(env, true, zeros(big), discard, "cat")
		}},
		{"envelope.Writer in process, no pipes (GOMAXPROCS goroutines)", func() (time.Duration, time.Duration, error) {
			return inProcess(big, false)
		}},
		{"envelope.Reader in process, no pipes (GOMAXPROCS goroutines)", func() (time.Duration, time.Duration, error) {
			return inProcess(big, true)
		}},
	}
	bytesOf := func(i int) int64 {
		switch i {
		case 4:
			return int64(o.batchRequests) * int64(o.batchItems) * int64(o.itemSize)
		case 5:
			return 256 << 20
		}
		return o.size
	}
	rates := make([][]float64, len(tools))
	cpuRates := make([][]float64, len(tools))
	for round := 1; round <= o.rounds; round++ {
		for i, t := range tools {
			d, cpu, err := t.f()
			if err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
			rate := float64(bytesOf(i)) / d.Seconds() / 1e6
			rates[i] = append(rates[i], rate)
			if cpu > 0 {
				cpuRates[i] = append(cpuRates[i], float64(bytesOf(i))/cpu.Seconds()/1e6)
			}
			fmt.Fprintf(os.Stderr, "round %d: %-70s %8.1f MB/s wall, CPU %v\n", round, t.name, rate, cpu)
		}
	}

	fmt.Printf("Machine: %s; load average at the end: %s\n\n", machine(), loadavg())
	fmt.Printf("Throughput, %s through pipes, %d interleaved rounds: median (min–max); MB/s = 10^6 B/s of plaintext.\n", human(o.size), o.rounds)
	fmt.Printf("\"MB per CPU-second\" divides by the tool process's own user+sys time (getrusage), all its threads.\n\n")
	fmt.Println("| tool | MB/s (wall) median | range | MB per CPU-second, median |")
	fmt.Println("| --- | --- | --- | --- |")
	med := make([]float64, len(tools))
	for i, t := range tools {
		med[i] = median(rates[i])
		cpuCol := "—"
		if len(cpuRates[i]) > 0 {
			cpuCol = fmt.Sprintf("%.0f", median(cpuRates[i]))
		}
		fmt.Printf("| %s | %.0f | %.0f–%.0f | %s |\n", t.name, med[i], slices.Min(rates[i]), slices.Max(rates[i]), cpuCol)
	}
	fmt.Println()
	fmt.Println("| ratio (medians) | value | target |")
	fmt.Println("| --- | --- | --- |")
	fmt.Printf("| hsm-transit encrypt / age encrypt | %.2fx | ≥ 2x |\n", med[0]/med[2])
	fmt.Printf("| hsm-transit decrypt / age decrypt | %.2fx | ≥ 2x |\n", med[1]/med[3])
	fmt.Printf("| hsm-transit encrypt / age encrypt with 1 MiB pipes | %.2fx | (same pipes) |\n", med[0]/med[6])
	fmt.Printf("| hsm-transit decrypt / age decrypt with 1 MiB pipes | %.2fx | (same pipes) |\n", med[1]/med[7])
	fmt.Printf("| hsm-transit encrypt / transit/encrypt batches | %.0fx | ≥ 100x |\n", med[0]/med[4])
	fmt.Printf("| hsm-transit decrypt / transit/encrypt batches | %.0fx | ≥ 100x |\n", med[1]/med[4])
	fmt.Printf("| hsm-transit encrypt / one core's AES-256-GCM | %.2f | ≥ 0.5 |\n", med[0]/med[5])
	fmt.Printf("| hsm-transit decrypt / one core's AES-256-GCM | %.2f | ≥ 0.5 |\n", med[1]/med[5])
	fmt.Printf("| hsm-transit encrypt / cat through the same kind of pipes | %.2f | (ceiling 1) |\n", med[0]/med[8])
	fmt.Printf("| hsm-transit decrypt / cat through the same kind of pipes | %.2f | (ceiling 1) |\n", med[1]/med[8])
	fmt.Printf("| envelope.Writer in process / one core's AES-256-GCM | %.2f | ≥ 0.5 |\n", med[9]/med[5])
	fmt.Printf("| envelope.Reader in process / one core's AES-256-GCM | %.2f | ≥ 0.5 |\n", med[10]/med[5])

	fmt.Println()
	fmt.Println("Peak resident set (GNU time's %M) of each process of hsm-transit encrypt | hsm-transit decrypt:")
	fmt.Println()
	fmt.Println("| input | encrypt peak RSS | decrypt peak RSS | encrypt→decrypt pipeline MB/s |")
	fmt.Println("| --- | --- | --- | --- |")
	for _, size := range memSizes {
		encRSS, decRSS, d, err := chain(env, o.cli, size)
		if err != nil {
			return fmt.Errorf("memory run of %s: %w", human(size), err)
		}
		fmt.Printf("| %s | %.1f MiB | %.1f MiB | %.0f |\n", human(size), float64(encRSS)/1024, float64(decRSS)/1024, float64(size)/d.Seconds()/1e6)
	}
	return nil
}

// startVault starts a dev Vault with the plugin at transit/, sealed by a
// fresh SoftHSM2 token, and the key transit/keys/bench.
func startVault(o options, dir string) (*vaultproc.Server, error) {
	conf, err := softhsm.Configure(filepath.Join(dir, "softhsm"))
	if err != nil {
		return nil, err
	}
	if err := softhsm.InitToken(conf, "bench", "1234"); err != nil {
		return nil, err
	}
	lib, err := softhsm.FindLibrary()
	if err != nil {
		return nil, err
	}
	v, err := vaultproc.StartServer(vaultproc.ServerConfig{
		Vault: o.vault, Dir: filepath.Join(dir, "vault"), Env: []string{"SOFTHSM2_CONF=" + conf}, LogLevel: "warn",
	})
	if err != nil {
		return nil, err
	}
	if err := v.RegisterPlugin(o.plugin, vaultproc.Plugin{Name: "hsm-transit"}); err != nil {
		v.Stop()
		return nil, err
	}
	for _, r := range []struct {
		path string
		body map[string]any
	}{
		{"sys/mounts/transit", map[string]any{"type": "hsm-transit"}},
		{"transit/config/seal", map[string]any{"library": lib, "token_label": "bench", "pin": "1234", "key_label": "bench-kek", "generate_key": true}},
		{"transit/keys/bench", nil},
	} {
		if _, err := v.Call("POST", r.path, r.body); err != nil {
			v.Stop()
			return nil, err
		}
	}
	return v, nil
}

// batchesOf sends batchRequests transit/encrypt requests of batchItems items
// one after the other and returns the time they took.
func batchesOf(v *vaultproc.Server, o options) (time.Duration, error) {
	item := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{0x5a}, o.itemSize))
	in := make([]map[string]any, o.batchItems)
	for i := range in {
		in[i] = map[string]any{"plaintext": item}
	}
	body := map[string]any{"batch_input": in}
	start := time.Now()
	for range o.batchRequests {
		out, err := v.Call("POST", "transit/encrypt/bench", body)
		if err != nil {
			return 0, err
		}
		data, _ := out["data"].(map[string]any)
		res, _ := data["batch_results"].([]any)
		if len(res) != o.batchItems {
			return 0, fmt.Errorf("%d batch results, want %d", len(res), o.batchItems)
		}
	}
	return time.Since(start), nil
}

// fixedKeys is a KeyService with one data key and no Vault, for the
// in-process rows: they measure the package's pipeline alone.
type fixedKeys struct{ key []byte }

func (f fixedKeys) DataKey(context.Context, string, string, []byte) ([]byte, string, error) {
	return bytes.Clone(f.key), "vault:v1:bench", nil
}

func (f fixedKeys) Wrap(context.Context, string, string, []byte, []byte) (string, error) {
	return "vault:v1:bench", nil
}

func (f fixedKeys) Unwrap(context.Context, string, string, []byte, string) ([]byte, error) {
	return bytes.Clone(f.key), nil
}

func (f fixedKeys) Rewrap(_ context.Context, _, _ string, _ []byte, w string) (string, error) {
	return w, nil
}

var inProcessFile []byte

// inProcess encrypts (or decrypts) size zero bytes with the envelope package
// in this process, from and to memory, and returns the wall and CPU time.
func inProcess(size int64, decrypt bool) (time.Duration, time.Duration, error) {
	ks := fixedKeys{key: bytes.Repeat([]byte{7}, 32)}
	refs := []envelope.KeyRef{{Mount: "transit", Key: "bench"}}
	ctx := context.Background()
	if decrypt && inProcessFile == nil {
		var buf bytes.Buffer
		w, err := envelope.NewWriter(ctx, &buf, envelope.WriterOptions{KeyService: ks, Recipients: refs})
		if err != nil {
			return 0, 0, err
		}
		if err := zeros(size)(w); err != nil {
			return 0, 0, err
		}
		if err := w.Close(); err != nil {
			return 0, 0, err
		}
		inProcessFile = buf.Bytes()
	}
	runtime.GC()
	cpu0 := selfCPU()
	start := time.Now()
	if decrypt {
		r, err := envelope.NewReader(ctx, bytes.NewReader(inProcessFile), envelope.ReaderOptions{KeyService: ks})
		if err != nil {
			return 0, 0, err
		}
		n, err := io.CopyBuffer(io.Discard, r, make([]byte, 1<<20))
		if err != nil || n != size {
			return 0, 0, fmt.Errorf("decrypted %d bytes: %v", n, err)
		}
	} else {
		w, err := envelope.NewWriter(ctx, io.Discard, envelope.WriterOptions{KeyService: ks, Recipients: refs})
		if err != nil {
			return 0, 0, err
		}
		if err := zeros(size)(w); err != nil {
			return 0, 0, err
		}
		if err := w.Close(); err != nil {
			return 0, 0, err
		}
	}
	return time.Since(start), selfCPU() - cpu0, nil
}

// selfCPU is this process's user+sys time so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// aesGCM seals size bytes in 64 KiB segments on one goroutine, as the
// envelope package's BenchmarkAESGCM does, and returns the time.
func aesGCM(size int) time.Duration {
	block, err := aes.NewCipher(make([]byte, 32))
	if err != nil {
		panic(err)
	}
	g, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	const seg = 64 << 10
	buf := make([]byte, seg, seg+16)
	nonce := make([]byte, 12)
	runtime.GC()
	start := time.Now()
	for i := range size / seg {
		nonce[0] = byte(i)
		g.Seal(buf[:0], nonce, buf, nil)
	}
	return time.Since(start)
}

// source writes a child's input into w; sink reads its output from r.
type source func(w io.Writer) error
type sink func(r io.Reader) error

// zeros writes n zero bytes in 1 MiB writes, as a good producer does.
func zeros(n int64) source {
	return func(w io.Writer) error {
		buf := make([]byte, 1<<20)
		for n > 0 {
			k := min(n, int64(len(buf)))
			if _, err := w.Write(buf[:k]); err != nil {
				return err
			}
			n -= k
		}
		return nil
	}
}

func fileSource(path string) source {
	return func(w io.Writer) error {
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{f}, make([]byte, 1<<20))
		return err
	}
}

func discard(r io.Reader) error {
	_, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{r}, make([]byte, 1<<20))
	return err
}

func fileSink(path string) sink {
	return func(r io.Reader) error {
		f, err := os.Create(path)
		if err != nil {
			return err
		}
		_, err = io.CopyBuffer(struct{ io.Writer }{f}, struct{ io.Reader }{r}, make([]byte, 1<<20))
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		return err
	}
}

// fSetPipeSz is Linux's F_SETPIPE_SZ.
const fSetPipeSz = 1031

// pipeRun runs a command between two pipes, as in a shell pipeline, and
// returns its wall time. The pipes have Linux's default 64 KiB buffer
// unless bigPipes, which grows them to 1 MiB (hsm-transit grows its own).
func pipeRun(env []string, bigPipes bool, in source, out sink, name string, args ...string) (time.Duration, error) {
	d, _, err := pipeRunCPU(env, bigPipes, in, out, name, args...)
	return d, err
}

// pipeRunCPU is pipeRun that also returns the child's CPU time (user+sys).
func pipeRunCPU(env []string, bigPipes bool, in source, out sink, name string, args ...string) (time.Duration, time.Duration, error) {
	inR, inW, err := os.Pipe()
	if err != nil {
		return 0, 0, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return 0, 0, err
	}
	if bigPipes {
		for _, f := range []*os.File{inW, outR} {
			if _, _, e := syscall.Syscall(syscall.SYS_FCNTL, f.Fd(), fSetPipeSz, 1<<20); e != 0 {
				return 0, 0, fmt.Errorf("F_SETPIPE_SZ: %v", e)
			}
		}
	}
	cmd := exec.Command(name, args...)
	cmd.Env, cmd.Stdin, cmd.Stdout = env, inR, outW
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, 0, err
	}
	inR.Close()
	outW.Close()
	inErr := make(chan error, 1)
	go func() {
		err := in(inW)
		inW.Close()
		inErr <- err
	}()
	outErr := out(outR)
	outR.Close()
	err = cmd.Wait()
	d := time.Since(start)
	if ierr := <-inErr; err == nil {
		err = ierr
	}
	if err == nil {
		err = outErr
	}
	if err != nil {
		return 0, 0, fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return d, cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime(), nil
}

// chain runs hsm-transit encrypt | hsm-transit decrypt on size zero bytes
// and returns each process's peak resident set in KiB and the wall time.
func chain(env []string, cli string, size int64) (int64, int64, time.Duration, error) {
	pr, pw, err := os.Pipe()
	if err != nil {
		return 0, 0, 0, err
	}
	rssDir, err := os.MkdirTemp("", "rss-")
	if err != nil {
		return 0, 0, 0, err
	}
	defer os.RemoveAll(rssDir)
	encRSS, decRSS := filepath.Join(rssDir, "enc"), filepath.Join(rssDir, "dec")
	enc := exec.Command("/usr/bin/time", "-f", "%M", "-o", encRSS, cli, "encrypt", "-k", "transit/bench")
	enc.Env, enc.Stdout = env, pw
	feed, err := enc.StdinPipe()
	if err != nil {
		return 0, 0, 0, err
	}
	dec := exec.Command("/usr/bin/time", "-f", "%M", "-o", decRSS, cli, "decrypt")
	dec.Env, dec.Stdin = env, pr
	counter := &countWriter{}
	dec.Stdout = counter
	var encErr, decErr bytes.Buffer
	enc.Stderr, dec.Stderr = &encErr, &decErr
	start := time.Now()
	if err := enc.Start(); err != nil {
		return 0, 0, 0, err
	}
	if err := dec.Start(); err != nil {
		enc.Process.Kill()
		return 0, 0, 0, err
	}
	pw.Close()
	pr.Close()
	ferr := zeros(size)(feed)
	feed.Close()
	e1 := enc.Wait()
	e2 := dec.Wait()
	d := time.Since(start)
	if ferr != nil || e1 != nil || e2 != nil {
		return 0, 0, 0, fmt.Errorf("feed: %v; encrypt: %v %s; decrypt: %v %s", ferr, e1, encErr.String(), e2, decErr.String())
	}
	if counter.n != size {
		return 0, 0, 0, fmt.Errorf("decrypted %d bytes, want %d", counter.n, size)
	}
	e, err := readKiB(encRSS)
	if err != nil {
		return 0, 0, 0, err
	}
	dd, err := readKiB(decRSS)
	return e, dd, d, err
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// readKiB reads the peak resident set GNU time wrote (%M, in KiB). GNU time
// is used rather than this process's wait4: Linux keeps in ru_maxrss the
// high-water mark of the memory the child shared with its parent before
// exec, that is, this harness's.
func readKiB(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	var n int64
	_, err = fmt.Sscan(strings.TrimSpace(string(b)), &n)
	return n, err
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func parseSizes(s string) ([]int64, error) {
	var out []int64
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		var n int64
		var unit string
		if _, err := fmt.Sscanf(f, "%d%s", &n, &unit); err != nil {
			return nil, fmt.Errorf("size %q: want e.g. 1MiB, 1GiB", f)
		}
		switch unit {
		case "KiB":
			n <<= 10
		case "MiB":
			n <<= 20
		case "GiB":
			n <<= 30
		default:
			return nil, fmt.Errorf("size %q: unit KiB, MiB or GiB", f)
		}
		out = append(out, n)
	}
	return out, nil
}

func human(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d B", n)
}

func machine() string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	return fmt.Sprintf("%s, %d cores, %s", cpu, runtime.NumCPU(), time.Now().UTC().Format("2006-01-02"))
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Join(strings.Fields(string(b))[:3], " ")
}
