// Command hsm-transit-load measures hsm-transit against Vault's built-in
// transit and against a floor plugin (and, for batches of 1000, a plugin
// that only moves the bytes, bench/wire), on one Vault server it starts itself:
// the same loads against each mount, interleaved, over several rounds. It
// prints requests/s, items/s, p50 and p99 and the ratios, and writes them as
// Markdown and as an SVG chart.
//
//	go run ./cmd/hsm-transit-load -vault bin/vault -plugin bin/vault-plugin-secrets-hsm-transit -floor bin/vault-plugin-floor -wire bin/vault-plugin-wire
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/vaultproc"
)

type options struct {
	vault, plugin, floor string
	wire                 string
	duration             time.Duration
	rounds               int
	out                  string
	memory               bool
	memoryKeys           int
	memoryCache          int
	skipLoads            bool
	only                 string
}

// main exits only after run returned, so that run's deferred stop of Vault
// (and removal of its directory) has happened.
func main() {
	var o options
	flag.StringVar(&o.vault, "vault", "bin/vault", "vault binary")
	flag.StringVar(&o.plugin, "plugin", "bin/vault-plugin-secrets-hsm-transit", "hsm-transit plugin binary")
	flag.StringVar(&o.floor, "floor", "bin/vault-plugin-floor", "floor plugin binary")
	flag.StringVar(&o.wire, "wire", "", "the plugin that only moves the bytes (bench/wire), measured on batches of 1000 if given")
	flag.DurationVar(&o.duration, "duration", 1500*time.Millisecond, "duration of each load on each mount, per round")
	flag.IntVar(&o.rounds, "rounds", 8, "rounds; each runs every load on every mount")
	flag.StringVar(&o.out, "out", "bench/results", "directory for results.md and ratios.svg")
	flag.BoolVar(&o.memory, "memory", true, "also measure the plugin's memory with many keys")
	flag.IntVar(&o.memoryKeys, "memory-keys", 100000, "keys to create and use in the memory run")
	flag.IntVar(&o.memoryCache, "memory-cache", 1000, "cache-config size for the memory run")
	flag.BoolVar(&o.skipLoads, "skip-loads", false, "run only the memory measurement")
	flag.StringVar(&o.only, "only", "", "run only the loads whose name starts with this")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "hsm-transit-load:", err)
		os.Exit(1)
	}
}

func run(o options) (err error) {
	dir, err := os.MkdirTemp("", "hsm-transit-load-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	v, err := startVault(o, dir)
	if err != nil {
		return err
	}
	defer v.Stop()
	defer func() {
		if err != nil {
			// What Vault logged (at warn and above) says why.
			fmt.Fprintf(os.Stderr, "hsm-transit-load: Vault's log:\n%s\n", v.LogSince(0))
		}
	}()
	if err := v.setup(); err != nil {
		return err
	}
	var report strings.Builder
	fmt.Fprintf(&report, "Machine: %s\n\n", machine())
	if !o.skipLoads {
		loop, err := newRawLoop(v)
		if err != nil {
			return err
		}
		results, raw, err := runLoads(o, v, loop)
		loop.close()
		if err != nil {
			return err
		}
		writeTables(&report, results, raw)
		if err := os.MkdirAll(o.out, 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(o.out, "ratios.svg"), []byte(chart(results, raw)), 0o644); err != nil {
			return err
		}
	}
	if o.memory {
		mem, err := measureMemory(o, v)
		if err != nil {
			return err
		}
		report.WriteString(mem)
	}
	fmt.Print(report.String())
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(o.out, "results.md"), []byte(report.String()), 0o644)
}

// machine describes where the run happened.
func machine() string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "model name") {
				cpu = strings.TrimSpace(strings.SplitN(line, ":", 2)[1])
				break
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		mem = strings.Fields(strings.SplitN(string(b), "\n", 2)[0])[1] + " kB RAM"
	}
	out, _ := exec.Command("nproc").Output()
	return fmt.Sprintf("%s, %s cores, %s, %s", cpu, strings.TrimSpace(string(out)), mem, time.Now().UTC().Format("2006-01-02"))
}

// vault is the Vault server of the run: a dev server with the root token,
// and the SoftHSM2 configuration of the run's token.
type vault struct {
	*vaultproc.Server
	softhsm string
	o       options
}

// startVault sets up the run's SoftHSM2 token and starts Vault, its
// directories under dir. On error, nothing is left running.
func startVault(o options, dir string) (*vault, error) {
	conf, err := softhsm.Configure(filepath.Join(dir, "softhsm"))
	if err != nil {
		return nil, err
	}
	if err := softhsm.InitToken(conf, "bench", "1234"); err != nil {
		return nil, err
	}
	srv, err := vaultproc.StartServer(vaultproc.ServerConfig{
		Vault: o.vault, Dir: dir, Env: []string{"SOFTHSM2_CONF=" + conf}, LogLevel: "warn",
		Logf: func(format string, args ...any) {
			fmt.Fprintf(os.Stderr, "hsm-transit-load: "+format+"\n", args...)
		},
	})
	if err != nil {
		return nil, err
	}
	srv.HTTP = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, MaxConnsPerHost: 64}}
	return &vault{Server: srv, softhsm: conf, o: o}, nil
}

// data is the "data" object of an answer.
func data(out map[string]interface{}, err error) (map[string]interface{}, error) {
	if err != nil {
		return nil, err
	}
	d, ok := out["data"].(map[string]interface{})
	if !ok {
		return nil, fmt.Errorf("an answer without data: %v", out)
	}
	return d, nil
}

// setup mounts built-in transit, the plugin (sealed by SoftHSM2), the
// floor and the wire plugin if it is given, and creates the keys.
func (v *vault) setup() error {
	if v.o.wire != "" {
		if err := v.RegisterPlugin(v.o.wire, vaultproc.Plugin{Name: "wire"}); err != nil {
			return fmt.Errorf("registering %s: %w", v.o.wire, err)
		}
		if _, err := v.Call("POST", "sys/mounts/wire", map[string]interface{}{"type": "wire"}); err != nil {
			return err
		}
	}
	if err := v.RegisterPlugin(v.o.plugin, vaultproc.Plugin{Name: "hsm-transit"}); err != nil {
		return fmt.Errorf("registering %s: %w", v.o.plugin, err)
	}
	if err := v.RegisterPlugin(v.o.floor, vaultproc.Plugin{Name: "floor"}); err != nil {
		return fmt.Errorf("registering %s: %w", v.o.floor, err)
	}
	lib, err := softhsm.FindLibrary()
	if err != nil {
		return err
	}
	for _, r := range []struct {
		path string
		body map[string]interface{}
	}{
		{"sys/mounts/builtin", map[string]interface{}{"type": "transit"}},
		{"sys/mounts/plugin", map[string]interface{}{"type": "hsm-transit"}},
		{"sys/mounts/floor", map[string]interface{}{"type": "floor"}},
		{"plugin/config/seal", map[string]interface{}{
			"library": lib, "token_label": "bench", "pin": "1234", "key_label": "bench-kek", "generate_key": true,
		}},
		{"builtin/keys/bench", nil},
		{"plugin/keys/bench", nil},
		{"plugin/keys/bench-hsm", map[string]interface{}{"hsm": true}},
	} {
		if _, err := v.Call("POST", r.path, r.body); err != nil {
			return err
		}
	}
	return nil
}

// load is one kind of request, run by workers for a while.
type load struct {
	name    string
	workers int
	items   int
	mounts  []string
	// request builds a request for a mount: method, path, body.
	request func(mount string) (string, interface{})
}

// sample is what one load on one mount did in one round.
type sample struct {
	requests  int
	elapsed   time.Duration
	latencies []time.Duration
	cpu       cpuSplit
	// rounds is the requests/s of each round, in order.
	rounds []float64
}

// result aggregates a load on a mount over the rounds.
type result struct {
	load, mount string
	items       int
	requests    int
	elapsed     time.Duration
	p50, p99    time.Duration
	cpu         cpuSplit
	rounds      []float64
}

func (r result) rps() float64         { return float64(r.requests) / r.elapsed.Seconds() }
func (r result) itemsPerSec() float64 { return r.rps() * float64(r.items) }

func plaintext128() string {
	b := make([]byte, 128)
	_, _ = rand.Read(b)
	return base64.StdEncoding.EncodeToString(b)
}

func batchOf(n int, field, value string) map[string]interface{} {
	items := make([]interface{}, n)
	for i := range items {
		items[i] = map[string]interface{}{field: value}
	}
	return map[string]interface{}{"batch_input": items}
}

// hsmSessions is the concurrency of the HSM loads and of the raw PKCS#11
// loop they are compared with: the plugin's session pool size.
const hsmSessions = hsm.DefaultMaxSessions

func runLoads(o options, v *vault, loop *rawLoop) ([]result, rawResult, error) {
	pt := plaintext128()
	encrypt := func(path string) (string, error) {
		d, err := data(v.Call("POST", path, map[string]interface{}{"plaintext": pt}))
		if err != nil {
			return "", err
		}
		ct, ok := d["ciphertext"].(string)
		if !ok {
			return "", fmt.Errorf("%s answered no ciphertext: %v", path, d)
		}
		return ct, nil
	}
	cts := map[string]string{}
	for _, m := range []string{"builtin", "plugin", "floor"} {
		ct, err := encrypt(m + "/encrypt/bench")
		if err != nil {
			return nil, rawResult{}, err
		}
		cts[m] = ct
	}
	hsmCT, err := encrypt("plugin/encrypt/bench-hsm")
	if err != nil {
		return nil, rawResult{}, err
	}
	batch100, batch1000 := batchOf(100, "plaintext", pt), batchOf(1000, "plaintext", pt)
	ctBatch := map[string]map[string]interface{}{}
	for _, m := range []string{"builtin", "plugin", "floor"} {
		ctBatch[m] = batchOf(1000, "ciphertext", cts[m])
	}
	all := []string{"builtin", "plugin", "floor"}
	both := []string{"builtin", "plugin"}
	// Batches of 1000 also on the wire plugin, which answers a batch of
	// 1000 to any batch (its decrypt batch is the floor's).
	batches := all
	if o.wire != "" {
		batches = append(all[:len(all):len(all)], "wire")
		ctBatch["wire"] = ctBatch["floor"]
	}
	loads := []load{
		{name: "encrypt, 1 item", workers: 8, items: 1, mounts: all, request: func(m string) (string, interface{}) {
			return m + "/encrypt/bench", map[string]interface{}{"plaintext": pt}
		}},
		{name: "decrypt, 1 item", workers: 8, items: 1, mounts: all, request: func(m string) (string, interface{}) {
			return m + "/decrypt/bench", map[string]interface{}{"ciphertext": cts[m]}
		}},
		{name: "encrypt, batch of 100", workers: 4, items: 100, mounts: all, request: func(m string) (string, interface{}) {
			return m + "/encrypt/bench", batch100
		}},
		{name: "encrypt, batch of 1000", workers: 2, items: 1000, mounts: batches, request: func(m string) (string, interface{}) {
			return m + "/encrypt/bench", batch1000
		}},
		{name: "decrypt, batch of 1000", workers: 2, items: 1000, mounts: batches, request: func(m string) (string, interface{}) {
			return m + "/decrypt/bench", ctBatch[m]
		}},
		{name: "datakey", workers: 8, items: 1, mounts: both, request: func(m string) (string, interface{}) {
			return m + "/datakey/wrapped/bench", map[string]interface{}{}
		}},
		{name: "HSM-resident key: encrypt, 1 item", workers: hsmSessions, items: 1, mounts: []string{"plugin"}, request: func(m string) (string, interface{}) {
			return m + "/encrypt/bench-hsm", map[string]interface{}{"plaintext": pt}
		}},
		{name: "HSM-resident key: decrypt, 1 item", workers: hsmSessions, items: 1, mounts: []string{"plugin"}, request: func(m string) (string, interface{}) {
			return m + "/decrypt/bench-hsm", map[string]interface{}{"ciphertext": hsmCT}
		}},
		// Batches spread over the plugin's pool of 16 HSM sessions, the
		// raw loop's concurrency.
		{name: "HSM-resident key: encrypt, batch of 1000", workers: 2, items: 1000, mounts: []string{"plugin"}, request: func(m string) (string, interface{}) {
			return m + "/encrypt/bench-hsm", batch1000
		}},
	}
	if o.only != "" {
		var kept []load
		for _, l := range loads {
			if strings.HasPrefix(l.name, o.only) {
				kept = append(kept, l)
			}
		}
		loads = kept
	}
	acc := map[string]*sample{}
	raw := rawResult{workers: hsmSessions}
	for round := 0; round < o.rounds; round++ {
		for li, l := range loads {
			// Interleave: the order of mounts changes each round.
			order := append([]string(nil), l.mounts...)
			for k := 0; k < (round+li)%len(order); k++ {
				order = append(order[1:], order[0])
			}
			if strings.HasPrefix(l.name, "HSM-resident key: encrypt, batch") {
				// The raw loop's turn, in the same round as the load
				// it is compared with.
				s, err := loop.run(o.duration)
				if err != nil {
					return nil, raw, err
				}
				raw.requests += s.requests
				raw.elapsed += s.elapsed
				raw.cpu += s.cpu.client
				raw.rounds = append(raw.rounds, float64(s.requests)/s.elapsed.Seconds())
				fmt.Fprintf(os.Stderr, "round %d: %-36s %-8s %8.0f ops/s\n", round+1, "raw PKCS#11 C_Encrypt loop", "-", float64(s.requests)/s.elapsed.Seconds())
			}
			for _, m := range order {
				s, err := runOne(v, l, m, o.duration)
				if err != nil {
					return nil, raw, err
				}
				key := l.name + "\x00" + m
				if acc[key] == nil {
					acc[key] = &sample{}
				}
				acc[key].requests += s.requests
				acc[key].elapsed += s.elapsed
				acc[key].latencies = append(acc[key].latencies, s.latencies...)
				acc[key].cpu = acc[key].cpu.add(s.cpu)
				acc[key].rounds = append(acc[key].rounds, float64(s.requests)/s.elapsed.Seconds())
				fmt.Fprintf(os.Stderr, "round %d: %-36s %-8s %8.0f req/s\n", round+1, l.name, m, float64(s.requests)/s.elapsed.Seconds())
			}
		}
	}
	var out []result
	for _, l := range loads {
		for _, m := range l.mounts {
			s := acc[l.name+"\x00"+m]
			sort.Slice(s.latencies, func(i, j int) bool { return s.latencies[i] < s.latencies[j] })
			out = append(out, result{
				load: l.name, mount: m, items: l.items, requests: s.requests, elapsed: s.elapsed,
				p50: percentile(s.latencies, 0.50), p99: percentile(s.latencies, 0.99),
				cpu: s.cpu, rounds: s.rounds,
			})
		}
	}
	return out, raw, nil
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[int(float64(len(sorted)-1)*p)]
}

// runOne runs a load's workers against one mount for d.
func runOne(v *vault, l load, mount string, d time.Duration) (sample, error) {
	path, body := l.request(mount)
	payload, err := json.Marshal(body)
	if err != nil {
		return sample{}, err
	}
	var (
		mu       sync.Mutex
		s        sample
		firstErr error
		wg       sync.WaitGroup
	)
	cpu0 := cpuNow(v.Pid())
	deadline := time.Now().Add(d)
	start := time.Now()
	for w := 0; w < l.workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var lat []time.Duration
			for time.Now().Before(deadline) {
				t0 := time.Now()
				req, _ := http.NewRequest("POST", v.Addr+"/v1/"+path, bytes.NewReader(payload))
				req.Header.Set("X-Vault-Token", v.Token)
				resp, err := v.HTTP.Do(req)
				if err == nil {
					if resp.StatusCode != 200 {
						head, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
						err = fmt.Errorf("%s: status %d: %s", path, resp.StatusCode, head)
					}
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					return
				}
				lat = append(lat, time.Since(t0))
			}
			mu.Lock()
			s.requests += len(lat)
			s.latencies = append(s.latencies, lat...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	s.elapsed = time.Since(start)
	s.cpu = cpuNow(v.Pid()).sub(cpu0)
	return s, firstErr
}
