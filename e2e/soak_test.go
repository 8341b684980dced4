package e2e

// The soak run (issue 14): `make soak`, not part of make test or CI.

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/stretchr/testify/require"
)

// soakEnvDuration enables TestSoak and says how long its open-loop phase
// runs ("10m"). HSM_TRANSIT_SOAK_CAPACITY (default 20s), _ROTATE (10s),
// _STEPDOWN (2m), _LOAD (0.7: the fraction of measured capacity) and
// _WORKERS (16: closed-loop workers of the capacity phase) change the rest.
const soakEnvDuration = "HSM_TRANSIT_SOAK_DURATION"

func soakEnv(t *testing.T, name string, def time.Duration) time.Duration {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	require.NoErrorf(t, err, "%s=%q", name, v)
	return d
}

func soakEnvFloat(t *testing.T, name string, def float64) float64 {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	f, err := strconv.ParseFloat(v, 64)
	require.NoErrorf(t, err, "%s=%q", name, v)
	return f
}

// soakDo sends one request through the cluster client and returns the
// answer's data, or its status (-1: no answer) and error. Any answer but a
// 200 or 204 is an error, a 307 the API client did not follow included.
func soakDo(ctx context.Context, client *api.Client, method, path string, body map[string]interface{}) (map[string]interface{}, int, error) {
	r := client.NewRequest(method, "/v1/"+path)
	if body != nil {
		if err := r.SetJSONBody(body); err != nil {
			return nil, 0, err
		}
	}
	//lint:ignore SA1019 the status of an answer that is not an error is wanted (and the body must survive a redirect)
	resp, err := client.RawRequestWithContext(ctx, r)
	if resp != nil {
		defer resp.Body.Close()
	}
	if err != nil {
		return nil, clusterStatus(err), err
	}
	if resp.StatusCode == 204 {
		return nil, 204, nil
	}
	if resp.StatusCode != 200 {
		loc, _ := resp.Location()
		return nil, resp.StatusCode, fmt.Errorf("answer %d (location %v)", resp.StatusCode, loc)
	}
	sec, err := api.ParseSecret(resp.Body)
	if err != nil || sec == nil {
		return nil, 200, fmt.Errorf("unreadable answer: %v", err)
	}
	return sec.Data, 200, nil
}

// soakStats collects what the soak saw.
type soakStats struct {
	mu sync.Mutex
	// latencies of successful and failed requests by operation, from send
	// to answer; queued adds the wait since the request's scheduled time.
	lat, queued map[string][]time.Duration
	ok          map[string]int
	failures    []clusterFailure
	failureOp   []string
	samples     []clusterPair
	// last acknowledged pair per key, for the decryptions.
	last map[string]clusterPair
}

func newSoakStats() *soakStats {
	return &soakStats{
		lat: map[string][]time.Duration{}, queued: map[string][]time.Duration{},
		ok: map[string]int{}, last: map[string]clusterPair{},
	}
}

func (s *soakStats) record(op string, sched, begin, end time.Time, status int, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lat[op] = append(s.lat[op], end.Sub(begin))
	if !sched.IsZero() {
		s.queued[op] = append(s.queued[op], end.Sub(sched))
	}
	if err == nil {
		s.ok[op]++
		return
	}
	s.failures = append(s.failures, clusterFailure{at: end, status: status, msg: op + ": " + err.Error()})
	s.failureOp = append(s.failureOp, op)
}

func percentiles(ds []time.Duration) string {
	if len(ds) == 0 {
		return "n/a"
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	p := func(q float64) time.Duration { return s[min(len(s)-1, int(q*float64(len(s))))] }
	r := func(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d.Microseconds())/1000) }
	return fmt.Sprintf("p50 %s p99 %s p99.9 %s max %s", r(p(0.50)), r(p(0.99)), r(p(0.999)), r(s[len(s)-1]))
}

// pluginRSS reads VmRSS of every plugin process of every node.
func pluginRSS(c *cluster) string {
	var parts []string
	for _, n := range c.nodes {
		var ps []string
		for _, pid := range n.pluginPIDs() {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
			rss := "?"
			if err == nil {
				for _, line := range strings.Split(string(b), "\n") {
					if strings.HasPrefix(line, "VmRSS:") {
						f := strings.Fields(line)
						if len(f) >= 2 {
							if kb, err := strconv.Atoi(f[1]); err == nil {
								rss = fmt.Sprintf("%.1f MiB", float64(kb)/1024)
							}
						}
					}
				}
			}
			ps = append(ps, fmt.Sprintf("pid %d %s", pid, rss))
		}
		if len(ps) == 0 {
			ps = []string{"no plugin process"}
		}
		parts = append(parts, n.id+": "+strings.Join(ps, ", "))
	}
	return strings.Join(parts, "; ")
}

// pluginRSSKiB sums VmRSS of each node's plugin processes.
func pluginRSSKiB(c *cluster) map[string]int {
	out := map[string]int{}
	for _, n := range c.nodes {
		for _, pid := range n.pluginPIDs() {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
			if err != nil {
				continue
			}
			for _, line := range strings.Split(string(b), "\n") {
				if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
					kb, _ := strconv.Atoi(f[1])
					out[n.id] += kb
				}
			}
		}
	}
	return out
}

// soakWindow is a leader change: from the step-down's start to a node
// being seen active, plus a grace for requests already under way.
type soakWindow struct{ from, to time.Time }

// TestSoak runs the cluster for HSM_TRANSIT_SOAK_DURATION at a fraction of
// its measured capacity, with root-key and key rotations every 10 s and a
// step-down of the active node every 2 minutes, then decrypts a sample of
// what it acknowledged.
func TestSoak(t *testing.T) {
	durStr := os.Getenv(soakEnvDuration)
	if durStr == "" {
		t.Skipf("set %s (e.g. 10m) to run the soak; make soak does", soakEnvDuration)
	}
	duration, err := time.ParseDuration(durStr)
	require.NoError(t, err)
	capTime := soakEnv(t, "HSM_TRANSIT_SOAK_CAPACITY", 20*time.Second)
	rotEvery := soakEnv(t, "HSM_TRANSIT_SOAK_ROTATE", 10*time.Second)
	stepEvery := soakEnv(t, "HSM_TRANSIT_SOAK_STEPDOWN", 2*time.Minute)
	fraction := soakEnvFloat(t, "HSM_TRANSIT_SOAK_LOAD", 0.7)
	capWorkers := int(soakEnvFloat(t, "HSM_TRANSIT_SOAK_WORKERS", 16))

	c := startCluster(t, clusterOptions{})
	client := c.client(t)
	ft, ok := client.CloneConfig().HttpClient.Transport.(*failoverTransport)
	require.True(t, ok, "the cluster client's transport")
	if tr, ok := ft.base.(*http.Transport); ok {
		tr.MaxIdleConnsPerHost = 256 // keep connections for every worker
	}
	// routeTo points the cluster client at a node, as a load balancer
	// that health-checks for the active node does after a leader change.
	routeTo := func(n *clusterNode) {
		for i, o := range c.nodes {
			if o == n {
				ft.cur.Store(int64(i))
			}
		}
	}
	routeTo(c.leader(t))
	keys := []string{"sw-a", "sw-b", "sw-chacha", "hsm-a"}
	for _, k := range keys {
		body := map[string]interface{}{}
		switch k {
		case "hsm-a":
			body["hsm"] = true
		case "sw-chacha":
			body["type"] = "chacha20-poly1305"
		}
		_, err := client.Logical().Write("transit/keys/"+k, body)
		require.NoError(t, err, k)
	}

	var seq, acked atomic.Int64
	// one runs the i-th operation of the mix: 9 in 10 are encryptions, the
	// tenth decrypts the latest acknowledged ciphertext of its key.
	one := func(st *soakStats, sched time.Time, sample bool) {
		i := seq.Add(1)
		key := keys[int(i)%len(keys)]
		ctx, cancel := clusterCtx(20 * time.Second)
		defer cancel()
		if (i/int64(len(keys)))%10 == 0 {
			st.mu.Lock()
			p, ok := st.last[key]
			st.mu.Unlock()
			if ok {
				begin := time.Now()
				data, status, err := soakDo(ctx, client, http.MethodPut, "transit/decrypt/"+key, map[string]interface{}{"ciphertext": p.ciphertext})
				end := time.Now()
				if err == nil {
					if pt, _ := data["plaintext"].(string); pt != b64(p.plaintext) {
						status, err = 200, fmt.Errorf("decrypt of %s gave %q, not %q", p.ciphertext, pt, b64(p.plaintext))
					}
				}
				st.record("decrypt", sched, begin, end, status, err)
				return
			}
		}
		pt := fmt.Sprintf("soak %d %s", i, randomHex(8))
		begin := time.Now()
		data, status, err := soakDo(ctx, client, http.MethodPut, "transit/encrypt/"+key, map[string]interface{}{"plaintext": b64(pt)})
		end := time.Now()
		var ct string
		if err == nil {
			ct, _ = data["ciphertext"].(string)
			if !strings.HasPrefix(ct, "vault:v") {
				status, err = 200, fmt.Errorf("answer without a ciphertext: %v", data)
			}
		}
		st.record("encrypt", sched, begin, end, status, err)
		if err == nil {
			st.mu.Lock()
			st.last[key] = clusterPair{key, pt, ct}
			if sample && acked.Add(1)%100 == 0 {
				st.samples = append(st.samples, clusterPair{key, pt, ct})
			}
			st.mu.Unlock()
		}
	}

	// Capacity: closed loop, capWorkers workers, for capTime.
	capStats := newSoakStats()
	var stop atomic.Bool
	var wg sync.WaitGroup
	capStart := time.Now()
	for w := 0; w < capWorkers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				one(capStats, time.Time{}, false)
			}
		}()
	}
	time.Sleep(capTime)
	stop.Store(true)
	wg.Wait()
	capElapsed := time.Since(capStart)
	capOK := capStats.ok["encrypt"] + capStats.ok["decrypt"]
	capacity := float64(capOK) / capElapsed.Seconds()
	t.Logf("soak: capacity %.0f req/s (%d ok, %d failed in %.1fs, %d closed-loop workers; encrypt %s; decrypt %s)",
		capacity, capOK, len(capStats.failures), capElapsed.Seconds(), capWorkers,
		percentiles(capStats.lat["encrypt"]), percentiles(capStats.lat["decrypt"]))
	require.Empty(t, capStats.failures, "failures while measuring capacity: %v", capStats.failures)
	rate := fraction * capacity
	require.Greater(t, rate, 1.0)

	// The soak: open loop at rate for duration.
	st := newSoakStats()
	rssStart := pluginRSS(c)
	leaderStart := c.leader(t)
	t.Logf("soak: %v at %.0f req/s (%.0f%% of capacity); rotations every %v, step-down every %v; leader %s; plugin RSS at start: %s",
		duration, rate, 100*fraction, rotEvery, stepEvery, leaderStart.id, rssStart)

	// At most poolSize requests are in flight and poolSize more waiting:
	// a request due when all are taken is not sent, and counted as
	// dropped.
	const poolSize = 64
	jobs := make(chan time.Time, poolSize)
	var pool sync.WaitGroup
	for w := 0; w < poolSize; w++ {
		pool.Add(1)
		go func() {
			defer pool.Done()
			for sched := range jobs {
				one(st, sched, true)
			}
		}()
	}
	soakStart := time.Now()
	soakEnd := soakStart.Add(duration)
	var dropped, issued int64
	var bg sync.WaitGroup
	bg.Add(1)
	go func() { // the pacer
		defer bg.Done()
		defer close(jobs)
		for {
			now := time.Now()
			if now.After(soakEnd) {
				return
			}
			due := int64(now.Sub(soakStart).Seconds() * rate)
			for ; issued < due; issued++ {
				sched := soakStart.Add(time.Duration(float64(issued) / rate * float64(time.Second)))
				select {
				case jobs <- sched:
				default:
					dropped++
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()

	// Rotations: the root key and, in turn, one key, every rotEvery.
	var rotMu sync.Mutex
	rotOK := map[string]int{}
	rotFail := map[string][]string{}
	var rotFailAt []time.Time
	rotLat := map[string][]time.Duration{}
	maxRSS := map[string]int{} // node: largest plugin VmRSS seen, KiB
	var resealed []string      // entries_resealed of each seal/rotate
	bg.Add(1)
	go func() {
		defer bg.Done()
		for i := 0; ; i++ {
			next := soakStart.Add(time.Duration(i+1) * rotEvery)
			if next.After(soakEnd) {
				return
			}
			time.Sleep(time.Until(next))
			for id, kb := range pluginRSSKiB(c) {
				rotMu.Lock()
				maxRSS[id] = max(maxRSS[id], kb)
				rotMu.Unlock()
			}
			for _, p := range []string{"seal/rotate", "keys/" + keys[i%len(keys)] + "/rotate"} {
				kind := p
				if strings.HasPrefix(p, "keys/") {
					kind = "keys/*/rotate"
				}
				ctx, cancel := clusterCtx(20 * time.Second)
				begin := time.Now()
				data, status, err := soakDo(ctx, client, http.MethodPut, "transit/"+p, nil)
				d := time.Since(begin)
				cancel()
				rotMu.Lock()
				rotLat[kind] = append(rotLat[kind], d)
				if err == nil {
					rotOK[kind]++
					if kind == "seal/rotate" {
						resealed = append(resealed, fmt.Sprint(data["entries_resealed"]))
					}
				} else {
					rotFailAt = append(rotFailAt, begin, time.Now())
					rotFail[kind] = append(rotFail[kind], fmt.Sprintf("%.1fs %d %s", time.Since(soakStart).Seconds(), status, oneLine(err.Error(), 160)))
				}
				rotMu.Unlock()
			}
		}
	}()

	// Step-downs every stepEvery, on the active node.
	var windows []soakWindow
	var stepLog []string
	leaderChanges := 0
	for i := 1; ; i++ {
		next := soakStart.Add(time.Duration(i) * stepEvery)
		if next.After(soakEnd.Add(-5 * time.Second)) {
			break
		}
		time.Sleep(time.Until(next))
		old := c.leader(t)
		from := time.Now()
		out, err := c.cli(old, "operator", "step-down")
		cliDone := time.Now()
		// Wait, up to 60 s, for the old node to stand down and then for a
		// node (it again, maybe) to be active.
		var downAt time.Time
		var n *clusterNode
		for time.Since(from) < 60*time.Second && n == nil {
			if downAt.IsZero() {
				if ok, _ := old.isActive(); !ok {
					downAt = time.Now()
				} else if time.Since(from) > 15*time.Second {
					downAt = from // it never stood down, as far as was seen
				}
			}
			if !downAt.IsZero() {
				for _, o := range c.liveNodes() {
					if ok, _ := o.isActive(); ok {
						n = o
						break
					}
				}
			}
			time.Sleep(25 * time.Millisecond)
		}
		if n == nil {
			n = c.leader(t)
		}
		seen := time.Now()
		routeTo(n)
		windows = append(windows, soakWindow{from, seen.Add(5 * time.Second)})
		if n != old {
			leaderChanges++
		}
		note := ""
		if err != nil {
			note = fmt.Sprintf(" (step-down failed: %v %s)", err, oneLine(out, 160))
		}
		down := "not seen to stand down in 15s"
		if downAt != from {
			down = fmt.Sprintf("stood down %.2fs after", downAt.Sub(from).Seconds())
		}
		stepLog = append(stepLog, fmt.Sprintf("at %.0fs %s -> %s (CLI %.2fs; %s %s; %s active %.2fs after)%s",
			from.Sub(soakStart).Seconds(), old.id, n.id, cliDone.Sub(from).Seconds(), old.id, down, n.id, seen.Sub(from).Seconds(), note))
		t.Logf("soak: step-down %d %s", i, stepLog[len(stepLog)-1])
	}
	time.Sleep(time.Until(soakEnd))
	bg.Wait()
	pool.Wait()
	rssEnd := pluginRSS(c)
	leaderEnd := c.leader(t)

	// The report.
	st.mu.Lock()
	total := len(st.lat["encrypt"]) + len(st.lat["decrypt"])
	var all, allQueued []time.Duration
	for _, op := range []string{"encrypt", "decrypt"} {
		all = append(all, st.lat[op]...)
		allQueued = append(allQueued, st.queued[op]...)
	}
	inWindow := func(at time.Time) bool {
		for _, w := range windows {
			if !at.Before(w.from) && !at.After(w.to) {
				return true
			}
		}
		return false
	}
	byClass := map[string]int{}
	var outside []clusterFailure
	for _, f := range st.failures {
		cl := f.class()
		if inWindow(f.at) {
			cl += " during a leader change"
		} else {
			outside = append(outside, f)
		}
		byClass[cl]++
	}
	var classes []string
	for cl, n := range byClass {
		classes = append(classes, fmt.Sprintf("%s x%d", cl, n))
	}
	sort.Strings(classes)
	if len(classes) == 0 {
		classes = []string{"none"}
	}
	samples := append([]clusterPair(nil), st.samples...)
	st.mu.Unlock()
	rotMu.Lock()
	var rotFails []string
	rotOutside := 0
	for i := 0; i < len(rotFailAt); i += 2 {
		if !inWindow(rotFailAt[i]) && !inWindow(rotFailAt[i+1]) {
			rotOutside++
		}
	}
	for k, v := range rotFail {
		rotFails = append(rotFails, fmt.Sprintf("%s x%d (first: %s)", k, len(v), v[0]))
	}
	rotMu.Unlock()

	t.Logf("soak report: %v open loop at %.0f req/s target (%.0f%% of %.0f req/s measured), %.0f req/s done",
		duration, rate, 100*fraction, capacity, float64(total)/duration.Seconds())
	t.Logf("  requests: %d (encrypt %d ok of %d, decrypt %d ok of %d); not sent (all workers busy): %d",
		total, st.ok["encrypt"], len(st.lat["encrypt"]), st.ok["decrypt"], len(st.lat["decrypt"]), dropped)
	t.Logf("  errors by status: %s", strings.Join(classes, ", "))
	t.Logf("  latency, send to answer: all %s; encrypt %s; decrypt %s",
		percentiles(all), percentiles(st.lat["encrypt"]), percentiles(st.lat["decrypt"]))
	t.Logf("  latency, scheduled time to answer (with queueing): %s", percentiles(allQueued))
	t.Logf("  rotations: seal/rotate %d ok (%s), keys/*/rotate %d ok (%s), failed: %v",
		rotOK["seal/rotate"], percentiles(rotLat["seal/rotate"]), rotOK["keys/*/rotate"], percentiles(rotLat["keys/*/rotate"]), rotFails)
	t.Logf("  entries resealed by each seal/rotate: %s", strings.Join(resealed, " "))
	t.Logf("  step-downs: %d, leader moved %d times (%s -> %s overall): %s",
		len(stepLog), leaderChanges, leaderStart.id, leaderEnd.id, strings.Join(stepLog, "; "))
	t.Logf("  plugin RSS at start: %s", rssStart)
	t.Logf("  plugin RSS at end:   %s", rssEnd)
	rotMu.Lock()
	t.Logf("  largest plugin RSS per node, sampled every %v: %v (KiB)", rotEvery, maxRSS)
	rotMu.Unlock()
	for i, f := range outside {
		if i == 10 {
			break
		}
		t.Logf("  failure outside a leader change at %.2fs: %d %s", f.at.Sub(soakStart).Seconds(), f.status, oneLine(f.msg, 300))
	}

	verifyClusterPairs(t, client, "transit", samples)
	t.Logf("  all %d sampled ciphertexts (1%% of acknowledged encryptions) decrypt after the soak", len(samples))

	require.NotEmpty(t, samples)
	// Each step-down moves leadership (the one stepping down waits 10 s
	// before contending again). One that does not is a node deaf to
	// step-downs, as a node unsealed twice over was (clusterNode.unseal).
	require.Equalf(t, len(stepLog), leaderChanges, "step-downs that did not move leadership: %s", strings.Join(stepLog, "; "))
	require.Emptyf(t, outside, "%d requests failed outside leader changes", len(outside))
	bad := 0
	for _, f := range st.failures {
		switch f.class() {
		case "307", "503", "500 (Vault standby: no active node)":
		default:
			if bad++; bad > 10 {
				continue
			}
			t.Errorf("during a leader change, a request answered %d (not a Vault election answer): %s", f.status, oneLine(f.msg, 300))
		}
	}
	require.Zerof(t, rotOutside, "rotations failed outside leader changes: %v", rotFails)
}
