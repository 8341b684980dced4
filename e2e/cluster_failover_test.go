package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/stretchr/testify/require"
)

// clusterFailure is a request that failed: its end, status (-1: no
// answer) and error.
type clusterFailure struct {
	at     time.Time
	status int
	msg    string
}

// vaultNoActive is what a standby answers (500) while it knows no active
// node to forward to: Vault's, not the plugin's.
const vaultNoActive = "local node not active but active cluster node not found"

// class names a failure for the summary: its status, and for a 500 whose
// message is Vault's own standby answer, that.
func (f clusterFailure) class() string {
	if f.status == 500 && strings.Contains(f.msg, vaultNoActive) {
		return "500 (Vault standby: no active node)"
	}
	return fmt.Sprint(f.status)
}

// clusterPair is an acknowledged encryption.
type clusterPair struct {
	key, plaintext, ciphertext string
}

// clusterLoad encrypts continuously through a cluster client and records
// what was acknowledged and what failed.
type clusterLoad struct {
	client *api.Client
	mount  string
	keys   []string

	mu        sync.Mutex
	pairs     []clusterPair
	successes []time.Time
	failures  []clusterFailure
	maxLat    time.Duration
	stop      atomic.Bool
	wg        sync.WaitGroup
	rotations atomic.Int64
	rotErrors atomic.Int64
}

func newClusterLoad(client *api.Client, mount string, keys []string) *clusterLoad {
	return &clusterLoad{client: client, mount: mount, keys: keys}
}

// run starts workers encrypting with every key in turn, and a rotator
// rotating rotate every period.
func (l *clusterLoad) run(workers int, rotate []string, period time.Duration) {
	for w := 0; w < workers; w++ {
		l.wg.Add(1)
		go func(w int) {
			defer l.wg.Done()
			for i := 0; !l.stop.Load(); i++ {
				key := l.keys[(w+i)%len(l.keys)]
				pt := fmt.Sprintf("worker %d item %d %s", w, i, randomHex(4))
				ctx, cancel := clusterCtx(20 * time.Second)
				begin := time.Now()
				ct, st, err := l.encrypt(ctx, key, pt)
				cancel()
				end := time.Now()
				l.mu.Lock()
				if lat := end.Sub(begin); lat > l.maxLat {
					l.maxLat = lat
				}
				if err == nil {
					l.pairs = append(l.pairs, clusterPair{key, pt, ct})
					l.successes = append(l.successes, end)
					l.mu.Unlock()
					continue
				}
				l.failures = append(l.failures, clusterFailure{at: end, status: st, msg: fmt.Sprintf("%s: %v", key, err)})
				l.mu.Unlock()
				time.Sleep(20 * time.Millisecond)
			}
		}(w)
	}
	if len(rotate) > 0 {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for i := 0; !l.stop.Load(); i++ {
				time.Sleep(period)
				ctx, cancel := clusterCtx(20 * time.Second)
				// (A 307 the client does not follow is no error to
				// Logical().Write, but has no data.)
				sec, err := l.client.Logical().WriteWithContext(ctx, l.mount+"/keys/"+rotate[i%len(rotate)]+"/rotate", nil)
				cancel()
				if err == nil && sec != nil {
					l.rotations.Add(1)
				} else {
					l.rotErrors.Add(1)
				}
			}
		}()
	}
}

// encrypt sends one encryption and returns the ciphertext, or the answer's
// status and error. A 307 that the API client does not follow (it follows
// one redirect: a standby that cannot forward during an election points at
// the old leader) is an error here, not an empty success.
func (l *clusterLoad) encrypt(ctx context.Context, key, pt string) (string, int, error) {
	// Not Logical().WriteRaw: its body does not survive the redirect the
	// API client follows (ResetJSONBody re-marshals a nil Obj: "null").
	r := l.client.NewRequest(http.MethodPut, "/v1/"+l.mount+"/encrypt/"+key)
	if err := r.SetJSONBody(map[string]interface{}{"plaintext": b64(pt)}); err != nil {
		return "", 0, err
	}
	//lint:ignore SA1019 the status of an answer that is not an error is wanted (and the body must survive a redirect)
	resp, err := l.client.RawRequestWithContext(ctx, r)
	if resp != nil {
		defer resp.Body.Close()
	}
	if err != nil {
		return "", clusterStatus(err), err
	}
	if resp.StatusCode != 200 {
		loc, _ := resp.Location()
		return "", resp.StatusCode, fmt.Errorf("answer %d (location %v)", resp.StatusCode, loc)
	}
	sec, err := api.ParseSecret(resp.Body)
	if err != nil {
		return "", 200, err
	}
	ct, _ := sec.Data["ciphertext"].(string)
	if !strings.HasPrefix(ct, "vault:v") {
		return "", 200, fmt.Errorf("answer without a ciphertext: %v", sec.Data)
	}
	return ct, 200, nil
}

func (l *clusterLoad) halt() {
	l.stop.Store(true)
	l.wg.Wait()
}

// firstSuccessAfter is the first acknowledged encryption after t.
func (l *clusterLoad) firstSuccessAfter(t time.Time) (time.Time, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var first time.Time
	for _, s := range l.successes {
		if s.After(t) && (first.IsZero() || s.Before(first)) {
			first = s
		}
	}
	return first, !first.IsZero()
}

// longestGap is the longest time between two successive acknowledged
// encryptions, and when it began.
func (l *clusterLoad) longestGap() (time.Duration, time.Time) {
	l.mu.Lock()
	s := append([]time.Time(nil), l.successes...)
	l.mu.Unlock()
	sort.Slice(s, func(i, j int) bool { return s[i].Before(s[j]) })
	var gap time.Duration
	var at time.Time
	for i := 1; i < len(s); i++ {
		if d := s[i].Sub(s[i-1]); d > gap {
			gap, at = d, s[i-1]
		}
	}
	return gap, at
}

// errorSummary counts failures by class, with the first message and the
// span of each, in seconds from origin.
func (l *clusterLoad) errorSummary(origin time.Time) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.failures) == 0 {
		return "none"
	}
	type agg struct {
		n           int
		first, last time.Time
		msg         string
	}
	by := map[string]*agg{}
	var classes []string
	for _, f := range l.failures {
		a := by[f.class()]
		if a == nil {
			a = &agg{first: f.at, msg: f.msg}
			by[f.class()] = a
			classes = append(classes, f.class())
		}
		a.n++
		a.last = f.at
	}
	sort.Strings(classes)
	var parts []string
	for _, c := range classes {
		a := by[c]
		parts = append(parts, fmt.Sprintf("%s x%d from %.2fs to %.2fs (first: %s)", c, a.n,
			a.first.Sub(origin).Seconds(), a.last.Sub(origin).Seconds(), oneLine(a.msg, 200)))
	}
	return strings.Join(parts, "; ")
}

func oneLine(s string, max int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > max {
		s = s[:max] + "..."
	}
	return s
}

// verifyClusterPairs decrypts every pair, in batches per key, and requires
// each plaintext back.
func verifyClusterPairs(t *testing.T, client *api.Client, mount string, pairs []clusterPair) {
	t.Helper()
	byKey := map[string][]clusterPair{}
	for _, p := range pairs {
		byKey[p.key] = append(byKey[p.key], p)
	}
	const chunk = 500
	for key, ps := range byKey {
		for i := 0; i < len(ps); i += chunk {
			end := min(i+chunk, len(ps))
			var batch []interface{}
			for _, p := range ps[i:end] {
				batch = append(batch, map[string]interface{}{"ciphertext": p.ciphertext})
			}
			sec, err := client.Logical().Write(mount+"/decrypt/"+key, map[string]interface{}{"batch_input": batch})
			require.NoErrorf(t, err, "decrypting %d ciphertexts of %s", end-i, key)
			results := sec.Data["batch_results"].([]interface{})
			require.Len(t, results, end-i)
			for j, r := range results {
				m := r.(map[string]interface{})
				p := ps[i+j]
				require.Emptyf(t, m["error"], "%s: %s (of %q)", key, p.ciphertext, p.plaintext)
				require.Equalf(t, p.plaintext, unb64(t, m["plaintext"].(string)), "%s: %s", key, p.ciphertext)
			}
		}
	}
}

// leaderTakeover reads from the new active node's log when it took over
// and when its plugin unsealed the mount after that.
func leaderTakeover(n *clusterNode, after time.Time) (acquired, unsealed time.Time) {
	for _, at := range n.logTimes("acquired lock, enabling active operation") {
		if at.After(after) {
			acquired = at
			break
		}
	}
	for _, at := range n.logTimes("unsealed the mount's root key") {
		if at.After(after) {
			unsealed = at
			break
		}
	}
	return acquired, unsealed
}

func describeTakeover(n *clusterNode, killedAt time.Time) string {
	acq, uns := leaderTakeover(n, killedAt)
	s := ""
	if !acq.IsZero() {
		s += fmt.Sprintf("%s acquired the HA lock %.2fs after the kill", n.id, acq.Sub(killedAt).Seconds())
	}
	if !uns.IsZero() && !acq.IsZero() {
		s += fmt.Sprintf(", its plugin unsealed the mount %.3fs later", uns.Sub(acq).Seconds())
	} else {
		s += ", no plugin unseal logged"
	}
	return s
}

// TestClusterFailoverUnderLoad: encryptions with software keys and an
// HSM-resident key run through the cluster client while the active node is
// killed; a standby takes over, its plugin unseals from the HSM by itself,
// and every encryption acknowledged before, during or after decrypts.
func TestClusterFailoverUnderLoad(t *testing.T) {
	c := startCluster(t, clusterOptions{})
	client := c.client(t)
	keys := []string{"sw-a", "sw-b", "sw-c", "sw-chacha", "hsm-a"}
	for _, k := range keys {
		body := map[string]interface{}{}
		switch {
		case strings.HasPrefix(k, "hsm"):
			body["hsm"] = true
		case k == "sw-chacha":
			body["type"] = "chacha20-poly1305"
		}
		_, err := client.Logical().Write("transit/keys/"+k, body)
		require.NoError(t, err, k)
	}

	load := newClusterLoad(client, "transit", keys)
	loadStart := time.Now()
	load.run(6, []string{"sw-a", "hsm-a"}, 700*time.Millisecond)
	time.Sleep(3 * time.Second)

	old := c.leader(t)
	orphansBefore := old.pluginPIDs()
	old.kill()
	killedAt := old.killedAt
	next, election := c.waitForNewLeader(t, old, 90*time.Second)
	electedAt := killedAt.Add(election)
	require.Eventually(t, func() bool {
		_, ok := load.firstSuccessAfter(old.diedAt)
		return ok
	}, 60*time.Second, 20*time.Millisecond, "encryption did not resume after the failover")
	first, _ := load.firstSuccessAfter(old.diedAt)
	time.Sleep(3 * time.Second)
	load.halt()
	loadTime := time.Since(loadStart)

	gap, gapAt := load.longestGap()
	var orphansAlive []int
	for _, p := range orphansBefore {
		if processAlive(p) {
			orphansAlive = append(orphansAlive, p)
		}
	}
	t.Logf("failover %s -> %s: election %.2fs after SIGKILL; %s; first acknowledged encryption %.3fs after the new leader was seen (%.2fs after the kill)",
		old.id, next.id, election.Seconds(), describeTakeover(next, killedAt),
		first.Sub(electedAt).Seconds(), first.Sub(killedAt).Seconds())
	t.Logf("load: %d encryptions acknowledged in %.1fs (6 workers, keys %v), %d rotations (%d failed); longest gap without success %.2fs (from %.2fs after the kill); slowest request %v",
		len(load.pairs), loadTime.Seconds(), keys, load.rotations.Load(), load.rotErrors.Load(),
		gap.Seconds(), gapAt.Sub(killedAt).Seconds(), load.maxLat.Round(time.Millisecond))
	t.Logf("errors by status (times from the kill): %s", load.errorSummary(killedAt))
	t.Logf("plugin processes of the killed Vault %v, still running after the failover: %v", orphansBefore, orphansAlive)

	var before, after int
	for _, s := range load.successes {
		if s.Before(killedAt) {
			before++
		} else {
			after++
		}
	}
	require.Positive(t, before)
	require.Positive(t, after)
	verifyClusterPairs(t, client, "transit", load.pairs)
	t.Logf("all %d acknowledged ciphertexts (%d before the kill, %d after) decrypt", len(load.pairs), before, after)

	// Usage counts are never below the acknowledged encryptions of each
	// version, across the failover.
	acked := map[string]map[string]int64{}
	for _, p := range load.pairs {
		v := strings.TrimPrefix(strings.SplitN(p.ciphertext, ":", 3)[1], "v")
		if acked[p.key] == nil {
			acked[p.key] = map[string]int64{}
		}
		acked[p.key][v]++
	}
	var counts []string
	for _, k := range keys {
		sec, err := client.Logical().Read("transit/keys/" + k)
		require.NoError(t, err)
		shown, _ := sec.Data["encryptions"].(map[string]interface{})
		var ackedSum, shownSum int64
		for v, n := range acked[k] {
			got, _ := shown[v].(json.Number)
			m, err := got.Int64()
			require.NoErrorf(t, err, "%s v%s: encryptions %v", k, v, shown)
			require.GreaterOrEqualf(t, m, n, "%s v%s: %d encryptions acknowledged, %d counted", k, v, n, m)
			ackedSum += n
			shownSum += m
		}
		counts = append(counts, fmt.Sprintf("%s %d/%d", k, ackedSum, shownSum))
	}
	t.Logf("usage counts per key, acknowledged/counted (each version checked): %s", strings.Join(counts, ", "))

	// Requests fail only while there is no active node (and a moment
	// after, for requests already on their way), and only with what Vault
	// answers then (a standby's 307 to the dead leader, or its 500 that it
	// knows no active node) or a 503 of a mount still unsealing: never a
	// 500 of the plugin's, a 4xx to a valid request, or no answer at all.
	load.mu.Lock()
	defer load.mu.Unlock()
	for _, f := range load.failures {
		require.Falsef(t, f.at.Before(killedAt) || f.at.After(electedAt.Add(5*time.Second)),
			"a request failed %.2fs after the kill, outside the failover (new leader at %.2fs): %d %s",
			f.at.Sub(killedAt).Seconds(), electedAt.Sub(killedAt).Seconds(), f.status, f.msg)
		switch f.class() {
		case "307", "503", "500 (Vault standby: no active node)":
		default:
			t.Fatalf("%.2fs after the kill (new leader at %.2fs), an encryption answered %d: %s",
				f.at.Sub(killedAt).Seconds(), electedAt.Sub(killedAt).Seconds(), f.status, f.msg)
		}
	}
}

// TestClusterStateSurvivesFailover: min_decryption_version, usage counts,
// scheduled deletion and suspension written on one active node are in force
// on the next.
func TestClusterStateSurvivesFailover(t *testing.T) {
	t.Parallel()
	c := startCluster(t, clusterOptions{})
	client := c.client(t)
	l := client.Logical()
	write := func(path string, body map[string]interface{}) *api.Secret {
		t.Helper()
		sec, err := l.Write("transit/"+path, body)
		require.NoError(t, err, path)
		return sec
	}
	encrypt := func(key, pt string) string {
		t.Helper()
		return write("encrypt/"+key, map[string]interface{}{"plaintext": b64(pt)}).Data["ciphertext"].(string)
	}
	readKey := func(l *api.Logical, key string) map[string]interface{} {
		t.Helper()
		sec, err := l.Read("transit/keys/" + key)
		require.NoError(t, err, key)
		return sec.Data
	}
	count := func(l *api.Logical, key, version string) int64 {
		t.Helper()
		enc, _ := readKey(l, key)["encryptions"].(map[string]interface{})
		n, err := enc[version].(json.Number).Int64()
		require.NoError(t, err, "%s v%s: %v", key, version, enc)
		return n
	}

	// Rotated keys with min_decryption_version raised: a software key
	// (five versions, min 3) and an HSM-resident one (three versions, min 2).
	type rotated struct {
		key      string
		versions int
		min      int
		cts      []string // cts[i] is made with version i+1
	}
	rot := []*rotated{{key: "rot-sw", versions: 5, min: 3}, {key: "rot-hsm", versions: 3, min: 2}}
	for _, r := range rot {
		write("keys/"+r.key, map[string]interface{}{"hsm": strings.HasSuffix(r.key, "hsm")})
		for v := 1; v <= r.versions; v++ {
			if v > 1 {
				write("keys/"+r.key+"/rotate", nil)
			}
			ct := encrypt(r.key, fmt.Sprintf("%s v%d", r.key, v))
			require.True(t, strings.HasPrefix(ct, fmt.Sprintf("vault:v%d:", v)), ct)
			r.cts = append(r.cts, ct)
		}
		write("keys/"+r.key+"/config", map[string]interface{}{"min_decryption_version": r.min})
	}

	// Usage counts: one key counted past its first reservation (a batch
	// larger than the 4096 reserved ahead), one capped at 10 with 7 used.
	const singles, batchSize = 137, 5000
	write("keys/counted", nil)
	for i := 0; i < singles; i++ {
		encrypt("counted", "c")
	}
	var batch []interface{}
	for i := 0; i < batchSize; i++ {
		batch = append(batch, map[string]interface{}{"plaintext": b64(fmt.Sprint(i))})
	}
	write("encrypt/counted", map[string]interface{}{"batch_input": batch})
	write("keys/capped", nil)
	write("keys/capped/config", map[string]interface{}{"max_encryptions": 10})
	var cappedCTs []string
	for i := 0; i < 7; i++ {
		cappedCTs = append(cappedCTs, encrypt("capped", fmt.Sprint("capped ", i)))
	}

	// Scheduled for deletion, and suspended.
	write("keys/doomed", nil)
	doomedCT := encrypt("doomed", "doomed")
	deletion := write("keys/doomed/schedule-deletion", map[string]interface{}{"pending_days": 7}).Data["deletion_time"]
	require.NotEmpty(t, deletion)
	write("keys/off", map[string]interface{}{"hsm": true})
	offCT := encrypt("off", "off")
	write("keys/off/config", map[string]interface{}{"disabled": true})

	// What the state is, checked on an active node.
	check := func(where string, l *api.Logical) {
		t.Helper()
		for _, r := range rot {
			k := readKey(l, r.key)
			require.Equalf(t, json.Number(fmt.Sprint(r.versions)), k["latest_version"], "%s: %s", where, r.key)
			require.Equalf(t, json.Number(fmt.Sprint(r.min)), k["min_decryption_version"], "%s: %s", where, r.key)
			for i, ct := range r.cts {
				sec, err := l.Write("transit/decrypt/"+r.key, map[string]interface{}{"ciphertext": ct})
				if i+1 < r.min {
					require.Equalf(t, 400, clusterStatus(err), "%s: %s v%d is below min_decryption_version: %v", where, r.key, i+1, err)
					continue
				}
				require.NoErrorf(t, err, "%s: %s v%d", where, r.key, i+1)
				require.Equal(t, fmt.Sprintf("%s v%d", r.key, i+1), unb64(t, sec.Data["plaintext"].(string)))
			}
		}
		require.GreaterOrEqualf(t, count(l, "counted", "1"), int64(singles+batchSize), "%s: the count of counted v1 is under the truth", where)
		require.GreaterOrEqualf(t, count(l, "capped", "1"), int64(7), "%s: the count of capped v1 is under the truth", where)

		k := readKey(l, "doomed")
		require.Equalf(t, deletion, k["deletion_time"], "%s: doomed", where)
		require.Equalf(t, true, k["disabled"], "%s: doomed", where)
		_, err := l.Write("transit/decrypt/doomed", map[string]interface{}{"ciphertext": doomedCT})
		require.Equalf(t, 400, clusterStatus(err), "%s: decrypt with a key scheduled for deletion: %v", where, err)
		require.Containsf(t, fmt.Sprint(err), "scheduled for destruction", "%s", where)

		require.Equalf(t, true, readKey(l, "off")["disabled"], "%s: off", where)
		for _, p := range []string{"encrypt/off", "decrypt/off", "rewrap/off", "datakey/plaintext/off"} {
			_, err := l.Write("transit/"+p, map[string]interface{}{"plaintext": b64("x"), "ciphertext": offCT})
			require.Equalf(t, 400, clusterStatus(err), "%s: %s on a disabled key: %v", where, p, err)
		}
	}
	old := c.leader(t)
	check("before the failover, on "+old.id, old.client().Logical())
	countedBefore := count(l, "counted", "1")
	cappedBefore := count(l, "capped", "1")

	old.kill()
	next, election := c.waitForNewLeader(t, old, 90*time.Second)
	require.NoError(t, c.waitMountAnswers(next.client(), 30*time.Second))
	check("after the failover, on "+next.id, next.client().Logical())
	t.Logf("failover %s -> %s: election %.2fs after SIGKILL; %s", old.id, next.id, election.Seconds(), describeTakeover(next, old.killedAt))
	check("after the failover, through the cluster client", l)
	countedAfter := count(l, "counted", "1")
	cappedAfter := count(l, "capped", "1")
	t.Logf("usage counts: counted v1 true %d, shown %d before and %d after the failover; capped v1 (max 10) true 7, shown %d before and %d after",
		singles+batchSize, countedBefore, countedAfter, cappedBefore, cappedAfter)

	// The cap holds across the failover: five more encryptions with capped
	// put at most 10 in all under version 1, and every ciphertext decrypts.
	for i := 7; i < 12; i++ {
		cappedCTs = append(cappedCTs, encrypt("capped", fmt.Sprint("capped ", i)))
	}
	v1 := 0
	for i, ct := range cappedCTs {
		if strings.HasPrefix(ct, "vault:v1:") {
			v1++
		}
		sec := write("decrypt/capped", map[string]interface{}{"ciphertext": ct})
		require.Equal(t, fmt.Sprint("capped ", i), unb64(t, sec.Data["plaintext"].(string)))
	}
	require.LessOrEqual(t, v1, 10, "version 1 of capped encrypted more than max_encryptions across the failover")
	t.Logf("capped: %d of 12 ciphertexts under v1, latest version now %v", v1, readKey(l, "capped")["latest_version"])

	// And the new active node can change it all back.
	write("keys/doomed/cancel-deletion", nil)
	sec := write("decrypt/doomed", map[string]interface{}{"ciphertext": doomedCT})
	require.Equal(t, "doomed", unb64(t, sec.Data["plaintext"].(string)))
	write("keys/off/config", map[string]interface{}{"disabled": false})
	sec = write("decrypt/off", map[string]interface{}{"ciphertext": offCT})
	require.Equal(t, "off", unb64(t, sec.Data["plaintext"].(string)))
	encrypt("off", "on again")
}

// TestClusterEmergencySeal: an emergency seal made on the active node holds
// on the node that takes over after it is killed; seal/unseal ends it for
// the cluster, also across a further failover.
func TestClusterEmergencySeal(t *testing.T) {
	t.Parallel()
	c := startCluster(t, clusterOptions{})
	client := c.client(t)
	l := client.Logical()
	cts := map[string]string{}
	for _, k := range []string{"es-sw", "es-hsm"} {
		_, err := l.Write("transit/keys/"+k, map[string]interface{}{"hsm": k == "es-hsm"})
		require.NoError(t, err)
		sec, err := l.Write("transit/encrypt/"+k, map[string]interface{}{"plaintext": b64("before " + k)})
		require.NoError(t, err)
		cts[k] = sec.Data["ciphertext"].(string)
	}

	requireSealed := func(where string, l *api.Logical) {
		t.Helper()
		for k, ct := range cts {
			_, err := l.Write("transit/decrypt/"+k, map[string]interface{}{"ciphertext": ct})
			require.Equalf(t, 503, clusterStatus(err), "%s: decrypt/%s: %v", where, k, err)
			_, err = l.Write("transit/encrypt/"+k, map[string]interface{}{"plaintext": b64("x")})
			require.Equalf(t, 503, clusterStatus(err), "%s: encrypt/%s: %v", where, k, err)
			_, err = l.Read("transit/keys/" + k)
			require.Equalf(t, 503, clusterStatus(err), "%s: keys/%s: %v", where, k, err)
		}
		sec, err := l.Read("transit/seal/status")
		require.NoErrorf(t, err, "%s: seal/status", where)
		require.Equalf(t, true, sec.Data["sealed"], "%s: seal/status %v", where, sec.Data)
		require.Equalf(t, true, sec.Data["emergency_sealed"], "%s: seal/status %v", where, sec.Data)
	}
	requireWorks := func(where string, l *api.Logical) {
		t.Helper()
		for k, ct := range cts {
			sec, err := l.Write("transit/decrypt/"+k, map[string]interface{}{"ciphertext": ct})
			require.NoErrorf(t, err, "%s: decrypt/%s", where, k)
			require.Equal(t, "before "+k, unb64(t, sec.Data["plaintext"].(string)))
			_, err = l.Write("transit/encrypt/"+k, map[string]interface{}{"plaintext": b64("x")})
			require.NoErrorf(t, err, "%s: encrypt/%s", where, k)
		}
		sec, err := l.Read("transit/seal/status")
		require.NoErrorf(t, err, "%s: seal/status", where)
		require.Equalf(t, false, sec.Data["sealed"], "%s: seal/status %v", where, sec.Data)
		require.Equalf(t, false, sec.Data["emergency_sealed"], "%s: seal/status %v", where, sec.Data)
	}

	old := c.leader(t)
	_, err := old.client().Logical().Write("transit/seal/seal", nil)
	require.NoError(t, err)
	requireSealed("after seal/seal, on "+old.id, old.client().Logical())
	for _, n := range c.nodes {
		if n != old {
			requireSealed("after seal/seal, through standby "+n.id, n.client().Logical())
			break
		}
	}

	old.kill()
	next, election := c.waitForNewLeader(t, old, 90*time.Second)
	t.Logf("failover %s -> %s: election %.2fs after SIGKILL; %s", old.id, next.id, election.Seconds(), describeTakeover(next, old.killedAt))
	// The new active node's plugin must not unseal on its own.
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		requireSealed("after the failover, on "+next.id, next.client().Logical())
		time.Sleep(500 * time.Millisecond)
	}
	if acq, uns := leaderTakeover(next, old.killedAt); !uns.IsZero() {
		t.Logf("note: %s's plugin logged an unseal of the root key at %v (HA lock at %v), yet answers as sealed", next.id, uns, acq)
	}

	unsealStart := time.Now()
	_, err = l.Write("transit/seal/unseal", nil)
	require.NoError(t, err)
	t.Logf("seal/unseal on %s answered in %v", next.id, time.Since(unsealStart).Round(time.Millisecond))
	requireWorks("after seal/unseal, on "+next.id, next.client().Logical())
	requireWorks("after seal/unseal, through the cluster client", l)

	// Another failover: the killed node rejoins, the active one dies, and
	// the mount stays unsealed on the third.
	old.restart(t)
	require.NoError(t, c.waitVoters(3, 60*time.Second))
	next.kill()
	third, election2 := c.waitForNewLeader(t, next, 90*time.Second)
	require.NoError(t, c.waitMountAnswers(third.client(), 30*time.Second))
	t.Logf("second failover %s -> %s: election %.2fs after SIGKILL; %s", next.id, third.id, election2.Seconds(), describeTakeover(third, next.killedAt))
	requireWorks("after the second failover, on "+third.id, third.client().Logical())
	requireWorks("after the second failover, through the cluster client", l)
}
