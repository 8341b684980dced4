package e2e

// Operational drills on a Raft cluster: the plugin process crashing under
// load, Vault crashing during a root key rotation, Raft snapshots restored
// where the KEK is and where it is not, and the HSM token going away under
// load.

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/p11shim"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// opsReq is one encryption of an opsLoad.
type opsReq struct {
	key        string
	start, end time.Time
	status     int // 200, an HTTP status, -1 for no answer
	msg        string
	pt, ct     string
}

func (r opsReq) lat() time.Duration { return r.end.Sub(r.start) }

// opsLoad encrypts continuously with every key in turn and records every
// request with its start, end and outcome.
type opsLoad struct {
	cl   *clusterLoad // for its encrypt
	keys []string
	mu   sync.Mutex
	reqs []opsReq
	stop atomic.Bool
	wg   sync.WaitGroup
}

func newOpsLoad(client *api.Client, mount string, keys []string) *opsLoad {
	return &opsLoad{cl: newClusterLoad(client, mount, keys), keys: keys}
}

func (l *opsLoad) run(workers int) {
	for w := 0; w < workers; w++ {
		l.wg.Add(1)
		go func(w int) {
			defer l.wg.Done()
			for i := 0; !l.stop.Load(); i++ {
				// A key of its own per worker: a key that waits on the
				// HSM holds up no other key's requests.
				key := l.keys[w%len(l.keys)]
				pt := fmt.Sprintf("w%d i%d %s", w, i, randomHex(4))
				ctx, cancel := clusterCtx(30 * time.Second)
				begin := time.Now()
				ct, st, err := l.cl.encrypt(ctx, key, pt)
				cancel()
				r := opsReq{key: key, start: begin, end: time.Now(), status: st, pt: pt, ct: ct}
				if err != nil {
					r.msg = err.Error()
				}
				l.mu.Lock()
				l.reqs = append(l.reqs, r)
				l.mu.Unlock()
				if err != nil {
					time.Sleep(20 * time.Millisecond)
				}
			}
		}(w)
	}
}

func (l *opsLoad) halt() {
	l.stop.Store(true)
	l.wg.Wait()
}

func (l *opsLoad) all() []opsReq {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]opsReq(nil), l.reqs...)
}

// firstOK is the end of the first successful request started at or after
// from with a key match accepts.
func (l *opsLoad) firstOK(from time.Time, match func(string) bool) (time.Time, bool) {
	var first time.Time
	for _, r := range l.all() {
		if r.status == 200 && !r.start.Before(from) && match(r.key) && (first.IsZero() || r.end.Before(first)) {
			first = r.end
		}
	}
	return first, !first.IsZero()
}

func (l *opsLoad) pairs() []clusterPair {
	var ps []clusterPair
	for _, r := range l.all() {
		if r.status == 200 {
			ps = append(ps, clusterPair{r.key, r.pt, r.ct})
		}
	}
	return ps
}

// opsSummary describes requests: count by status (with a first message
// for failures) and the slowest.
func opsSummary(reqs []opsReq) string {
	if len(reqs) == 0 {
		return "no requests"
	}
	counts := map[int]int{}
	first := map[int]string{}
	var max time.Duration
	for _, r := range reqs {
		counts[r.status]++
		if _, ok := first[r.status]; !ok && r.status != 200 {
			first[r.status] = oneLine(r.msg, 160)
		}
		if r.lat() > max {
			max = r.lat()
		}
	}
	var sts []int
	for s := range counts {
		sts = append(sts, s)
	}
	sort.Ints(sts)
	var parts []string
	for _, s := range sts {
		p := fmt.Sprintf("%d x%d", s, counts[s])
		if m := first[s]; m != "" {
			p += fmt.Sprintf(" (%q)", m)
		}
		parts = append(parts, p)
	}
	return fmt.Sprintf("%s, slowest %v", strings.Join(parts, ", "), max.Round(time.Millisecond))
}

func filterReqs(reqs []opsReq, f func(opsReq) bool) []opsReq {
	var out []opsReq
	for _, r := range reqs {
		if f(r) {
			out = append(out, r)
		}
	}
	return out
}

func isHSMKey(k string) bool { return strings.HasPrefix(k, "hsm") }

// createOpsKeys creates the load's keys: software ones, and hsm=true for
// names beginning with hsm.
func createOpsKeys(t *testing.T, client *api.Client, mount string, keys []string) {
	t.Helper()
	for _, k := range keys {
		body := map[string]interface{}{}
		if isHSMKey(k) {
			body["hsm"] = true
		}
		if k == "sw-chacha" {
			body["type"] = "chacha20-poly1305"
		}
		_, err := client.Logical().Write(mount+"/keys/"+k, body)
		require.NoError(t, err, k)
	}
}

// TestClusterOpsCrashes runs, on one cluster, the plugin crash drill and
// then the Vault crash during seal/rotate.
func TestClusterOpsCrashes(t *testing.T) {
	t.Parallel()
	c := startCluster(t, clusterOptions{})
	t.Run("PluginCrash", func(t *testing.T) { opsPluginCrash(t, c) })
	if t.Failed() {
		return
	}
	t.Run("RotateCrash", func(t *testing.T) { opsRotateCrash(t, c) })
}

// opsPluginCrash: under load, SIGKILL of the active node's plugin process;
// Vault starts it again, it unseals from the HSM by itself, requests
// resume, and every acknowledged ciphertext decrypts.
func opsPluginCrash(t *testing.T, c *cluster) {
	client := c.client(t)
	keys := []string{"sw-a", "sw-b", "sw-chacha", "hsm-a"}
	createOpsKeys(t, client, "transit", keys)
	leader := c.leader(t)

	load := newOpsLoad(client, "transit", keys)
	load.run(8)
	time.Sleep(3 * time.Second)
	pids := leader.pluginPIDs()
	require.NotEmpty(t, pids, "no plugin process under the active node %s", leader.id)
	killedAt := time.Now()
	for _, p := range pids {
		require.NoError(t, syscall.Kill(p, syscall.SIGKILL))
	}
	// Back: the first success of every key with a request started after
	// the kill.
	var back time.Time
	require.Eventually(t, func() bool {
		back = time.Time{}
		for _, k := range keys {
			at, ok := load.firstOK(killedAt, func(s string) bool { return s == k })
			if !ok {
				return false
			}
			if at.After(back) {
				back = at
			}
		}
		return true
	}, 90*time.Second, 50*time.Millisecond, "encryption with every key did not resume after the plugin's death")
	time.Sleep(4 * time.Second)
	load.halt()
	newPIDs := leader.pluginPIDs()
	reqs := load.all()

	before := filterReqs(reqs, func(r opsReq) bool { return r.end.Before(killedAt) })
	during := filterReqs(reqs, func(r opsReq) bool { return !r.end.Before(killedAt) && !r.start.After(back) })
	after := filterReqs(reqs, func(r opsReq) bool { return r.start.After(back) })
	// The longest time without a success, around the kill.
	var oks []time.Time
	for _, r := range reqs {
		if r.status == 200 {
			oks = append(oks, r.end)
		}
	}
	sort.Slice(oks, func(i, j int) bool { return oks[i].Before(oks[j]) })
	var gap time.Duration
	for i := 1; i < len(oks); i++ {
		if d := oks[i].Sub(oks[i-1]); d > gap {
			gap = d
		}
	}
	var unsealed string
	for _, at := range leader.logTimes("unsealed the mount's root key") {
		if at.After(killedAt.Add(-time.Second)) {
			unsealed = fmt.Sprintf("%.3fs after the kill", at.Sub(killedAt).Seconds())
			break
		}
	}
	t.Logf("plugin crash on %s: killed plugin pids %v, now %v; every key back %.3fs after the kill; plugin unsealed from the HSM %s; longest gap without success %.3fs",
		leader.id, pids, newPIDs, back.Sub(killedAt).Seconds(), unsealed, gap.Seconds())
	t.Logf("before the kill: %s", opsSummary(before))
	t.Logf("from the kill until back: %s", opsSummary(during))
	t.Logf("after back: %s", opsSummary(after))
	require.NotEmpty(t, unsealed, "the restarted plugin logged no unseal of the root key")
	require.NotEmpty(t, newPIDs, "no plugin process under %s after the drill", leader.id)
	for _, p := range pids {
		require.False(t, processAlive(p), "killed plugin %d still alive", p)
	}
	for _, r := range before {
		require.Equalf(t, 200, r.status, "before the kill: %s: %s", r.key, r.msg)
	}
	for _, r := range after {
		require.Equalf(t, 200, r.status, "%.3fs after the kill, once the plugin was back: %s: %s", r.start.Sub(killedAt).Seconds(), r.key, r.msg)
	}
	// Between the kill and the plugin's return, Vault answers the requests
	// it had sent to the dead plugin with its own 500 ("internal error";
	// its log: "failed to run existence check: rpc error: code =
	// Unavailable ... connection reset by peer").
	var in500 []string
	for _, r := range during {
		switch r.status {
		case 200, 503:
		case 500:
			in500 = append(in500, fmt.Sprintf("%s started %+.3fs ended %+.3fs", r.key, r.start.Sub(killedAt).Seconds(), r.end.Sub(killedAt).Seconds()))
		default:
			t.Fatalf("%.3fs after the plugin's kill: %s answered %d: %s", r.end.Sub(killedAt).Seconds(), r.key, r.status, r.msg)
		}
	}
	rpcErrs := 0
	for _, at := range leader.logTimes("rpc error: code = Unavailable") {
		if !at.Before(killedAt.Add(-time.Second)) {
			rpcErrs++
		}
	}
	t.Logf("500s between the kill and the return (times from the kill): %d [%s]; Vault logged %d gRPC Unavailable errors from the dead plugin",
		len(in500), strings.Join(in500, "; "), rpcErrs)
	pairs := load.pairs()
	verifyClusterPairs(t, client, "transit", pairs)
	t.Logf("all %d acknowledged ciphertexts decrypt", len(pairs))
}

// opsRotateCrash: a mount with 2,000 keys; seal/rotate measured once, then
// started again and the active Vault SIGKILLed part-way; the next active
// node completes the rotation by itself and every key works.
func opsRotateCrash(t *testing.T, c *cluster) {
	const nKeys = 2000
	client := c.client(t)
	client.SetClientTimeout(5 * time.Minute)
	l := client.Logical()

	// Create the keys in parallel, and one ciphertext of each.
	begin := time.Now()
	cts := make([]string, nKeys)
	var wg sync.WaitGroup
	var failed atomic.Int64
	var firstErr atomic.Value
	next := atomic.Int64{}
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= nKeys {
					return
				}
				name := fmt.Sprintf("rk-%04d", i)
				if _, err := l.Write("transit/keys/"+name, nil); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("%s: %v", name, err))
					continue
				}
				sec, err := l.Write("transit/encrypt/"+name, map[string]interface{}{"plaintext": b64(name)})
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("%s: %v", name, err))
					continue
				}
				cts[i] = sec.Data["ciphertext"].(string)
			}
		}()
	}
	wg.Wait()
	require.Zerof(t, failed.Load(), "creating keys: %v", firstErr.Load())
	created := time.Since(begin)

	status := func(cl *api.Client) map[string]interface{} {
		t.Helper()
		sec, err := cl.Logical().Read("transit/seal/status")
		require.NoError(t, err)
		return sec.Data
	}
	leader := c.leader(t)
	lc := leader.client()
	lc.SetClientTimeout(5 * time.Minute)
	st := status(lc)
	v0, _ := st["root_key_version"].(json.Number).Int64()

	// The rotation reseals every entry, one Raft write each (about three
	// entries a key: a measured run resealed 6012 for 2000 keys). Kill the
	// active Vault once the Raft index has moved by 40% of that: a full
	// rotation measured first took over a minute on a 2-core machine.
	raftIndex := func() int64 {
		sec, err := lc.Logical().Read("sys/storage/raft/autopilot/state")
		if err != nil || sec == nil {
			return -1
		}
		servers, _ := sec.Data["servers"].(map[string]interface{})
		s, _ := servers[leader.id].(map[string]interface{})
		n, _ := s["last_index"].(json.Number).Int64()
		return n
	}
	idx0 := raftIndex()
	require.Positive(t, idx0)
	target := idx0 + 3*nKeys*40/100
	rotErr := make(chan error, 1)
	rotStart := time.Now()
	go func() {
		_, err := lc.Logical().Write("transit/seal/rotate", nil)
		rotErr <- err
	}()
	var idx int64
	for time.Since(rotStart) < 3*time.Minute {
		if idx = raftIndex(); idx >= target {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	leader.kill()
	killedAt := leader.killedAt
	err := <-rotErr
	t.Logf("%d keys (and a ciphertext each) created in %.1fs; killed %s %.2fs into seal/rotate, Raft index +%d (target +%d); the rotate request got: %v",
		nKeys, created.Seconds(), leader.id, killedAt.Sub(rotStart).Seconds(), idx-idx0, target-idx0, err)
	require.Error(t, err, "the rotation finished before the kill: the drill did not interrupt it")
	completedBefore := false
	for _, at := range leader.logTimes("root key rotated") {
		if at.After(rotStart) {
			completedBefore = true
		}
	}
	require.False(t, completedBefore, "%s logged the end of the rotation before its kill", leader.id)

	nl, election := c.waitForNewLeader(t, leader, 90*time.Second)
	nc := nl.client()
	nc.SetClientTimeout(5 * time.Minute)
	// Meanwhile, when does the mount answer an encryption again?
	var probeMu sync.Mutex
	probeStatus := map[int]int{}
	var probeOK, probeOKEnd time.Time
	probeDone := make(chan struct{})
	go func() {
		defer close(probeDone)
		for time.Since(killedAt) < 4*time.Minute {
			begin := time.Now()
			_, err := l.Write("transit/encrypt/rk-0000", map[string]interface{}{"plaintext": b64("probe")})
			probeMu.Lock()
			probeStatus[clusterStatus(err)]++
			probeMu.Unlock()
			if err == nil {
				probeOK, probeOKEnd = begin, time.Now()
				return
			}
			time.Sleep(250 * time.Millisecond)
		}
	}()
	var last map[string]interface{}
	require.Eventuallyf(t, func() bool {
		s, err := nc.Logical().Read("transit/seal/status")
		if err != nil || s == nil {
			return false
		}
		last = s.Data
		return s.Data["sealed"] == false && s.Data["rotation_pending"] == false
	}, 3*time.Minute, 250*time.Millisecond, "the interrupted rotation did not complete by itself on %s: seal/status %v", nl.id, last)
	done := time.Since(killedAt)
	vEnd, _ := last["root_key_version"].(json.Number).Int64()
	var logged string
	for _, line := range strings.Split(nl.logTail(1<<20), "\n") {
		if strings.Contains(line, "root key rotated") || strings.Contains(line, "finishing an interrupted root key rotation") {
			logged = oneLine(line, 300)
		}
	}
	t.Logf("new leader %s %.2fs after the kill; seal/status rotation_pending=false, root key v%d (v%d before), %.2fs after the kill; its log: %s",
		nl.id, election.Seconds(), vEnd, v0, done.Seconds(), logged)
	require.Equal(t, v0+1, vEnd, "root key version after the rotation")
	<-probeDone
	var unsealedAt, rotatedAt string
	if ts := nl.logTimes("unsealed the mount's root key"); len(ts) > 0 {
		unsealedAt = fmt.Sprintf("%.2fs", ts[len(ts)-1].Sub(killedAt).Seconds())
	}
	if ts := nl.logTimes("root key rotated"); len(ts) > 0 {
		rotatedAt = fmt.Sprintf("%.2fs", ts[len(ts)-1].Sub(killedAt).Seconds())
	}
	t.Logf("after the kill: %s's plugin logged the unseal at %s and the rotation's end at %s; an encryption probe (every 250 ms) first succeeded: sent at %.2fs, answered at %.2fs; probe answers by status (0: success): %v",
		nl.id, unsealedAt, rotatedAt, probeOK.Sub(killedAt).Seconds(), probeOKEnd.Sub(killedAt).Seconds(), probeStatus)
	require.False(t, probeOK.IsZero(), "the mount did not encrypt again after the failover")

	// Every key: its old ciphertext decrypts, and it encrypts.
	begin = time.Now()
	next.Store(0)
	failed.Store(0)
	firstErr = atomic.Value{}
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= nKeys {
					return
				}
				name := fmt.Sprintf("rk-%04d", i)
				sec, err := l.Write("transit/decrypt/"+name, map[string]interface{}{"ciphertext": cts[i]})
				if err != nil || sec == nil || sec.Data["plaintext"] != b64(name) {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("decrypt %s: %v", name, err))
					continue
				}
				if _, err := l.Write("transit/encrypt/"+name, map[string]interface{}{"plaintext": b64("x")}); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("encrypt %s: %v", name, err))
				}
			}
		}()
	}
	wg.Wait()
	require.Zerof(t, failed.Load(), "%d of %d keys failed after the interrupted rotation; first: %v", failed.Load(), nKeys, firstErr.Load())
	t.Logf("all %d keys decrypt their ciphertext from before the rotation and encrypt (checked in %.1fs)", nKeys, time.Since(begin).Seconds())
}

// opsToken makes a SoftHSM2 configuration of its own with one token.
func opsToken(t *testing.T, label string) string {
	t.Helper()
	conf, err := softhsm.Configure(t.TempDir())
	require.NoError(t, err)
	require.NoError(t, softhsm.InitToken(conf, label, hsmPIN))
	return conf
}

func opsSealArgs(lib, token, kek string) []string {
	return []string{"library=" + lib, "token_label=" + token, "pin=" + hsmPIN,
		"key_label=" + kek, "generate_key=true"}
}

// TestClusterOpsHSMOutageAndSnapshots runs, on a cluster with a token of
// its own, the HSM outage drill under load, then takes a Raft snapshot and
// restores it into a cluster with the same token and into one whose token
// lacks the KEK.
func TestClusterOpsHSMOutageAndSnapshots(t *testing.T) {
	t.Parallel()
	const token = "ops-snap"
	conf := opsToken(t, token)
	kek := "ops-kek-" + randomHex(4)
	shim := newOpsShim(t)
	c := startCluster(t, clusterOptions{env: append(shim.env(), "SOFTHSM2_CONF="+conf), sealArgs: opsSealArgs(shim.lib, token, kek)})
	t.Run("HSMOutage", func(t *testing.T) { opsHSMOutage(t, c, conf, token, shim) })
	if t.Failed() {
		return
	}
	t.Run("Snapshots", func(t *testing.T) { opsSnapshots(t, c, conf, token, kek, shim) })
}

// opsShim is internal/p11shim over a copy of SoftHSM2's module, driven
// through its control file (p11shim.New would t.Setenv, which a parallel
// test cannot).
type opsShim struct {
	lib, target, control string
}

func newOpsShim(t *testing.T) *opsShim {
	t.Helper()
	dir := t.TempDir()
	s := &opsShim{lib: p11shim.Build(t), target: filepath.Join(dir, "libsofthsm2-copy.so"), control: filepath.Join(dir, "p11shim.control")}
	copyFile(t, softhsmLib, s.target)
	s.set(t)
	return s
}

func (s *opsShim) env() []string {
	return []string{p11shim.TargetEnv + "=" + s.target, p11shim.ControlEnv + "=" + s.control, hsm.LibrariesEnv + "=" + s.lib}
}

// set replaces the fault words atomically, as Shim.Set does.
func (s *opsShim) set(t *testing.T, words ...string) {
	t.Helper()
	tmp := s.control + ".tmp"
	require.NoError(t, os.WriteFile(tmp, []byte(strings.Join(words, " ")+"\n"), 0o600))
	require.NoError(t, os.Rename(tmp, s.control))
}

// opsHSMOutage: under load, the token goes away three ways, each followed
// by its return: its directory moved away (SoftHSM2 keeps an open token in
// memory: see the figures), every call failing with CKR_DEVICE_ERROR (an
// unreachable HSM, through the shim), every call hanging.
func opsHSMOutage(t *testing.T, c *cluster, conf, token string, shim *opsShim) {
	const bound = 7 * time.Second // hsm_timeout (default 5 s) + 2 s
	client := c.client(t)
	keys := []string{"sw-a", "sw-b", "sw-chacha", "hsm-a"}
	createOpsKeys(t, client, "transit", keys)
	dir, err := softhsm.TokenDir(conf, token)
	require.NoError(t, err)
	aside := dir + ".aside"
	defer func() {
		_ = os.Rename(aside, dir)
		shim.set(t)
	}()

	type phase struct {
		name                  string
		down, up              func()
		hold                  time.Duration
		must503               bool
		goneAt, backAt, recov time.Time
	}
	phases := []*phase{
		{name: "token directory moved away", hold: 6 * time.Second,
			down: func() { require.NoError(t, os.Rename(dir, aside)) },
			up:   func() { require.NoError(t, os.Rename(aside, dir)) }},
		{name: "CKR_DEVICE_ERROR on every call (shim)", hold: 5 * time.Second, must503: true,
			down: func() { shim.set(t, p11shim.DeviceError) }, up: func() { shim.set(t) }},
		{name: "every call hangs (shim)", hold: 6 * time.Second, must503: true,
			down: func() { shim.set(t, p11shim.Hang) }, up: func() { shim.set(t) }},
	}
	load := newOpsLoad(client, "transit", keys)
	load.run(8)
	loadStart := time.Now()
	time.Sleep(3 * time.Second)
	for _, ph := range phases {
		ph.goneAt = time.Now()
		ph.down()
		time.Sleep(ph.hold)
		ph.backAt = time.Now()
		ph.up()
		require.Eventuallyf(t, func() bool {
			_, ok := load.firstOK(ph.backAt, isHSMKey)
			return ok
		}, 60*time.Second, 50*time.Millisecond, "%s: HSM-resident key requests did not recover after the token came back", ph.name)
		ph.recov, _ = load.firstOK(ph.backAt, isHSMKey)
		time.Sleep(2 * time.Second)
	}
	load.halt()
	reqs := load.all()
	between := func(from, to time.Time, hsmKey bool) []opsReq {
		return filterReqs(reqs, func(r opsReq) bool {
			return isHSMKey(r.key) == hsmKey && !r.start.Before(from) && r.start.Before(to)
		})
	}
	// Requests of the HSM-resident key in flight at any time of [from, to).
	overlap := func(from, to time.Time) []opsReq {
		return filterReqs(reqs, func(r opsReq) bool {
			return isHSMKey(r.key) && !r.end.Before(from) && r.start.Before(to)
		})
	}
	t.Logf("before: software keys %s | HSM-resident key %s", opsSummary(between(loadStart.Add(-time.Minute), phases[0].goneAt, false)),
		opsSummary(between(loadStart.Add(-time.Minute), phases[0].goneAt, true)))
	for i, ph := range phases {
		nextStart := time.Now()
		if i+1 < len(phases) {
			nextStart = phases[i+1].goneAt
		}
		t.Logf("%s for %v: software keys %s | HSM-resident key in flight while gone: %s | started after the return until recovery: %s | after recovery: %s | recovered %.3fs after the return",
			ph.name, ph.hold, opsSummary(between(ph.goneAt, ph.recov, false)), opsSummary(overlap(ph.goneAt, ph.backAt)),
			opsSummary(between(ph.backAt, ph.recov, true)), opsSummary(between(ph.recov, nextStart, true)), ph.recov.Sub(ph.backAt).Seconds())
	}

	for _, r := range reqs {
		require.LessOrEqualf(t, r.lat(), bound, "%s took %v", r.key, r.lat())
		if !isHSMKey(r.key) {
			require.Equalf(t, 200, r.status, "software key %s: %s", r.key, r.msg)
			continue
		}
		var in *phase
		for _, ph := range phases {
			if !r.end.Before(ph.goneAt) && r.start.Before(ph.recov) {
				in = ph
			}
		}
		if in == nil {
			require.Equalf(t, 200, r.status, "HSM-resident key outside the outages: %s", r.msg)
			continue
		}
		require.Containsf(t, []int{200, 503}, r.status, "%s: %.2fs after it began: %s", in.name, r.start.Sub(in.goneAt).Seconds(), r.msg)
	}
	for _, ph := range phases {
		n503 := 0
		for _, r := range overlap(ph.goneAt, ph.backAt) {
			if r.status == 503 {
				n503++
			}
		}
		if ph.must503 {
			require.Positivef(t, n503, "%s: no HSM-resident key request failed", ph.name)
		}
		require.Lessf(t, ph.recov.Sub(ph.backAt), 30*time.Second, "%s: recovery took too long", ph.name)
	}
	pairs := load.pairs()
	verifyClusterPairs(t, client, "transit", pairs)
	t.Logf("all %d acknowledged ciphertexts decrypt; bound on every request %v", len(pairs), bound)
}

// opsRestore restores snapshot file into cluster d, which becomes the
// snapshot's cluster: its unseal key and root token are src's.
func opsRestore(t *testing.T, src, d *cluster, file string) {
	t.Helper()
	leader := d.leader(t)
	d.mustCLI(leader, "operator", "raft", "snapshot", "restore", "-force", file)
	d.unsealKey, d.rootToken = src.unsealKey, src.rootToken
	// Vault seals itself after a forced restore: unseal with the old
	// cluster's key; then its root token works.
	var last string
	deadline := time.Now().Add(90 * time.Second)
	for {
		for _, n := range d.nodes {
			if n.health() == 503 {
				_, _ = n.client().Sys().Unseal(d.unsealKey)
			}
		}
		ok, why := leader.isActive()
		last = why
		if ok {
			_, err := leader.client().Auth().Token().LookupSelf()
			if err == nil {
				break
			}
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the restore, unsealed with the old cluster's key and using its root token: %s", last)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func opsSnapshots(t *testing.T, c *cluster, conf, token, kek string, shim *opsShim) {
	client := c.client(t)
	l := client.Logical()
	swKeys := []string{"snap-sw", "snap-chacha", "snap-exp"}
	allKeys := append(append([]string(nil), swKeys...), "snap-hsm")
	for _, k := range allKeys {
		body := map[string]interface{}{}
		switch k {
		case "snap-chacha":
			body["type"] = "chacha20-poly1305"
		case "snap-exp":
			body["exportable"], body["allow_plaintext_backup"] = true, true
		case "snap-hsm":
			body["hsm"] = true
		}
		_, err := l.Write("transit/keys/"+k, body)
		require.NoError(t, err, k)
	}
	_, err := l.Write("transit/keys/snap-exp/rotate", nil)
	require.NoError(t, err)
	cts := map[string]string{}
	for _, k := range allKeys {
		sec, err := l.Write("transit/encrypt/"+k, map[string]interface{}{"plaintext": b64("snap " + k)})
		require.NoError(t, err, k)
		cts[k] = sec.Data["ciphertext"].(string)
	}
	sec, err := l.Read("transit/export/encryption-key/snap-exp")
	require.NoError(t, err)
	exported := sec.Data["keys"].(map[string]interface{})
	require.Len(t, exported, 2)

	file := filepath.Join(t.TempDir(), "raft.snap")
	c.mustCLI(c.leader(t), "operator", "raft", "snapshot", "save", file)
	raw, err := os.ReadFile(file)
	require.NoError(t, err)

	// Nothing in the snapshot, nor in any member of its archive, holds the
	// exportable key's bytes.
	blobs := map[string][]byte{"file": raw}
	if gz, err := gzip.NewReader(bytes.NewReader(raw)); err == nil {
		un, err := io.ReadAll(gz)
		require.NoError(t, err)
		blobs["gunzipped"] = un
		tr := tar.NewReader(bytes.NewReader(un))
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			require.NoError(t, err)
			b, err := io.ReadAll(tr)
			require.NoError(t, err)
			blobs["member "+h.Name] = b
		}
	}
	var members []string
	for name, b := range blobs {
		members = append(members, fmt.Sprintf("%s (%d B)", name, len(b)))
		for ver, k := range exported {
			keyBytes, err := base64.StdEncoding.DecodeString(k.(string))
			require.NoError(t, err)
			require.Len(t, keyBytes, 32)
			for form, needle := range map[string][]byte{"raw": keyBytes, "base64": []byte(k.(string)),
				"base64url": []byte(base64.RawURLEncoding.EncodeToString(keyBytes)), "hex": []byte(fmt.Sprintf("%x", keyBytes))} {
				require.Falsef(t, bytes.Contains(b, needle), "snap-exp v%s's bytes (%s) in the snapshot's %s", ver, form, name)
			}
		}
	}
	sort.Strings(members)
	t.Logf("snapshot %d bytes; scanned %s: no version of snap-exp's key (raw, base64, base64url, hex) in any", len(raw), strings.Join(members, ", "))

	// Into a new one-node cluster on the same token: everything works.
	same := startCluster(t, clusterOptions{nodes: 1, env: append(shim.env(), "SOFTHSM2_CONF="+conf),
		sealArgs: opsSealArgs(shim.lib, token, "ops-other-"+randomHex(4))})
	opsRestore(t, c, same, file)
	sc := same.client(t)
	require.NoError(t, same.waitMountAnswers(sc, 60*time.Second))
	for _, k := range allKeys {
		sec, err := sc.Logical().Write("transit/decrypt/"+k, map[string]interface{}{"ciphertext": cts[k]})
		require.NoErrorf(t, err, "decrypt %s after the restore on the same token", k)
		require.Equal(t, "snap "+k, unb64(t, sec.Data["plaintext"].(string)))
		_, err = sc.Logical().Write("transit/encrypt/"+k, map[string]interface{}{"plaintext": b64("x")})
		require.NoErrorf(t, err, "encrypt %s after the restore", k)
	}
	st, err := sc.Logical().Read("transit/seal/status")
	require.NoError(t, err)
	t.Logf("restored into a 1-node cluster on the same token: all %d keys decrypt the old cluster's ciphertexts and encrypt; seal/status key_label=%v sealed=%v",
		len(allKeys), st.Data["key_label"], st.Data["sealed"])

	// Into a cluster whose token (same label, SoftHSM2 configuration of its
	// own) has no key of that label: the mount stays sealed.
	conf2 := opsToken(t, token)
	other := startCluster(t, clusterOptions{nodes: 1, env: append(shim.env(), "SOFTHSM2_CONF="+conf2),
		sealArgs: opsSealArgs(shim.lib, token, "ops-other-"+randomHex(4))})
	opsRestore(t, c, other, file)
	oc := other.client(t)
	var status map[string]interface{}
	require.Eventually(t, func() bool {
		s, err := oc.Logical().Read("transit/seal/status")
		if err != nil || s == nil {
			return false
		}
		status = s.Data
		return s.Data["key_label"] == kek && s.Data["last_error"] != ""
	}, 60*time.Second, 250*time.Millisecond, "seal/status after the restore into a token without the KEK: %v", status)
	t.Logf("restored into a cluster whose token lacks %s: seal/status sealed=%v configured=%v last_error=%q",
		kek, status["sealed"], status["configured"], status["last_error"])
	require.Equal(t, true, status["sealed"])
	require.Contains(t, fmt.Sprint(status["last_error"]), kek)
	var first string
	for _, k := range allKeys {
		for _, call := range []struct {
			what string
			f    func() error
		}{
			{"decrypt", func() error {
				_, err := oc.Logical().Write("transit/decrypt/"+k, map[string]interface{}{"ciphertext": cts[k]})
				return err
			}},
			{"encrypt", func() error {
				_, err := oc.Logical().Write("transit/encrypt/"+k, map[string]interface{}{"plaintext": b64("x")})
				return err
			}},
			{"read", func() error { _, err := oc.Logical().Read("transit/keys/" + k); return err }},
		} {
			err := call.f()
			require.Equalf(t, 503, clusterStatus(err), "%s %s without the KEK: %v", call.what, k, err)
			require.Containsf(t, err.Error(), kek, "%s %s: the 503 does not name the missing KEK", call.what, k)
			if first == "" {
				first = oneLine(err.Error(), 300)
			}
		}
	}
	_, err = oc.Logical().Read("transit/export/encryption-key/snap-exp")
	require.Equal(t, 503, clusterStatus(err), "export without the KEK: %v", err)
	t.Logf("without the KEK: decrypt, encrypt and read of all %d keys and export of snap-exp answer 503; e.g. %s", len(allKeys), first)
}
