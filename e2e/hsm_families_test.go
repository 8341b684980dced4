package e2e

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/p11env"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/p11shim"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// The HSM families beyond SoftHSM2 loaded directly: openCryptoki's soft
// token (no AES-GCM), a network HSM (p11-kit remoting in front of SoftHSM2)
// killed and frozen under load, and HSM-resident keys on a token that hangs
// and then fails with device errors (internal/p11shim).

// drillTimeout is the hsm_timeout of the drills' mounts, in seconds.
const drillTimeout = 2

// drillBound is the longest any request may take during a drill: the HSM
// deadline and a margin.
const drillBound = (drillTimeout + 2) * time.Second

// TestOpenCryptokiSeal seals mounts on openCryptoki 3.8.1's soft token,
// which has AES-CBC-PAD, SHA256-HMAC and RSA-OAEP but no AES-GCM: the
// mechanism chosen is aes-cbc-hmac, rsa-oaep works when asked for, and
// everything that needs AES-GCM is refused with a 400 that names it.
func TestOpenCryptokiSeal(t *testing.T) {
	ock := p11env.OpenCryptoki(t, "hsm-transit-e2e", "24681357")
	v := startVault(t, serverOptions{persistent: true, env: []string{hsm.LibrariesEnv + "=" + ock.Library}})
	v.registerPlugin(pluginName)
	for _, m := range []string{"ock", "ockrsa", "ockgcm"} {
		v.mustCLI("secrets", "enable", "-path="+m, "-plugin-version="+pluginVersion, pluginName)
	}
	c := v.client.Logical()
	seal := func(kek string, extra map[string]interface{}) map[string]interface{} {
		body := map[string]interface{}{"library": ock.Library, "token_label": ock.Label, "pin": ock.PIN,
			"key_label": kek, "generate_key": true}
		for k, val := range extra {
			body[k] = val
		}
		return body
	}

	// Mechanism chosen from the token: aes-cbc-hmac.
	sec, err := c.Write("ock/config/seal", seal("ock-kek", nil))
	require.NoError(t, err)
	require.Equal(t, "aes-cbc-hmac", sec.Data["mechanism"])
	require.Equal(t, "ock-kek-hmac", sec.Data["hmac_key_label"])
	st := sealStatus(t, c, "ock")
	require.Equal(t, false, st["sealed"])
	require.Equal(t, "aes-cbc-hmac", st["mechanism"])
	require.Equal(t, false, st["hsm_keys_supported"])
	mechs := fmt.Sprint(st["token_mechanisms"])
	require.Contains(t, mechs, "aes-cbc-hmac")
	require.Contains(t, mechs, "rsa-oaep")
	require.NotContains(t, mechs, "aes-gcm")
	t.Logf("openCryptoki: seal/status mechanism=%v token_mechanisms=%v hsm_keys_supported=%v", st["mechanism"], st["token_mechanisms"], st["hsm_keys_supported"])

	// The second mount asks for rsa-oaep, and the token makes the pair.
	start := time.Now()
	sec, err = c.Write("ockrsa/config/seal", seal("ock-rsa-kek", map[string]interface{}{"mechanism": "rsa-oaep"}))
	require.NoError(t, err)
	require.Equal(t, "rsa-oaep", sec.Data["mechanism"])
	t.Logf("openCryptoki: rsa-oaep seal with key pair generation took %v", time.Since(start).Round(time.Millisecond))
	require.Equal(t, "rsa-oaep", sealStatus(t, c, "ockrsa")["mechanism"])

	// Keys, ciphertexts before and after a root key rotation.
	made := map[string]map[string]string{} // mount/key -> ciphertext -> plaintext
	encrypt := func(mount, key, pt string) {
		t.Helper()
		sec, err := c.Write(mount+"/encrypt/"+key, map[string]interface{}{"plaintext": b64(pt)})
		require.NoError(t, err)
		if made[mount+"/"+key] == nil {
			made[mount+"/"+key] = map[string]string{}
		}
		made[mount+"/"+key][sec.Data["ciphertext"].(string)] = pt
	}
	check := func(stage string) {
		t.Helper()
		n := 0
		for mk, cts := range made {
			mount, key, _ := strings.Cut(mk, "/")
			for ct, pt := range cts {
				var sec *api.Secret
				// The first request after a restart may meet the unseal
				// under way.
				require.Eventuallyf(t, func() bool {
					sec, err = c.Write(mount+"/decrypt/"+key, map[string]interface{}{"ciphertext": ct})
					return err == nil
				}, 20*time.Second, 100*time.Millisecond, "%s: decrypt %s: %v; log:\n%s", stage, mk, err, v.log())
				require.Equal(t, pt, unb64(t, sec.Data["plaintext"].(string)), stage)
				n++
			}
		}
		t.Logf("openCryptoki %s: %d ciphertexts decrypt", stage, n)
	}
	for _, mount := range []string{"ock", "ockrsa"} {
		_, err = c.Write(mount+"/keys/k1", nil)
		require.NoError(t, err)
		_, err = c.Write(mount+"/keys/k2", map[string]interface{}{"type": "chacha20-poly1305"})
		require.NoError(t, err)
		encrypt(mount, "k1", mount+" one")
		encrypt(mount, "k2", mount+" two")
		sec, err = c.Write(mount+"/seal/rotate", nil)
		require.NoError(t, err, mount)
		require.Equal(t, "2", fmt.Sprint(sec.Data["root_key_version"]), mount)
		encrypt(mount, "k1", mount+" three")
	}
	check("before restart")

	// Refusals: AES-GCM is not there.
	code, body := v.rawRequest("POST", "ockgcm/config/seal", seal("ock-gcm-kek", map[string]interface{}{"mechanism": "aes-gcm"}))
	require.Equal(t, 400, code, "%v", body)
	require.Contains(t, fmt.Sprint(body["errors"]), "CKM_AES_GCM")
	t.Logf("openCryptoki: mechanism=aes-gcm -> %d %v", code, body["errors"])
	require.Equal(t, false, sealStatus(t, c, "ockgcm")["configured"])
	code, body = v.rawRequest("POST", "ock/keys/resident", map[string]interface{}{"hsm": true})
	require.Equal(t, 400, code, "%v", body)
	require.Contains(t, fmt.Sprint(body["errors"]), "CKM_AES_GCM")
	t.Logf("openCryptoki: hsm=true key -> %d %v", code, body["errors"])

	// Vault restarts: both mounts unseal from openCryptoki.
	v.restart()
	c = v.client.Logical()
	check("after restart")
	for mount, mech := range map[string]string{"ock": "aes-cbc-hmac", "ockrsa": "rsa-oaep"} {
		st := sealStatus(t, c, mount)
		require.Equal(t, false, st["sealed"], mount)
		require.Equal(t, mech, st["mechanism"], mount)
		require.Equal(t, "2", fmt.Sprint(st["root_key_version"]), mount)
		encrypt(mount, "k2", mount+" after restart")
	}
	check("after restart, new ciphertexts")
}

// sealStatus reads a mount's seal/status.
func sealStatus(t *testing.T, c *api.Logical, mount string) map[string]interface{} {
	t.Helper()
	sec, err := c.Read(mount + "/seal/status")
	require.NoError(t, err)
	require.NotNil(t, sec)
	return sec.Data
}

// networkHSM is a Vault whose mount "net" is sealed by a SoftHSM2 token
// behind a p11-kit server, with rsa-oaep (the only seal mechanism p11-kit
// 0.24 carries) and hsm_timeout=drillTimeout, and three software keys.
type networkHSM struct {
	v    *vaultServer
	kit  *p11env.P11Kit
	seal map[string]interface{} // config/seal's settings, written again by the probe
	keys []string
}

func startNetworkHSM(t *testing.T) *networkHSM {
	t.Helper()
	conf, err := softhsm.Configure(t.TempDir())
	require.NoError(t, err)
	require.NoError(t, softhsm.InitToken(conf, "nethsm", hsmPIN))
	kit := p11env.StartP11Kit(t, softhsmLib, "nethsm", []string{"SOFTHSM2_CONF=" + conf})
	env := append(kit.Env(), hsm.LibrariesEnv+"="+kit.ClientLibrary)
	v := startVault(t, serverOptions{env: env})
	v.registerPlugin(pluginName)
	v.mustCLI("secrets", "enable", "-path=net", "-plugin-version="+pluginVersion, pluginName)
	n := &networkHSM{v: v, kit: kit, keys: []string{"sw-aes256", "sw-chacha", "sw-aes128"},
		seal: map[string]interface{}{"library": kit.ClientLibrary, "token_label": "nethsm", "pin": hsmPIN,
			"key_label": "net-kek", "mechanism": "rsa-oaep", "hsm_timeout": drillTimeout}}
	first := map[string]interface{}{"generate_key": true, "anti_rollback": false}
	for k, val := range n.seal {
		first[k] = val
	}
	start := time.Now()
	sec, err := v.client.Logical().Write("net/config/seal", first)
	require.NoError(t, err, "vault log:\n%s", v.log())
	require.Equal(t, "rsa-oaep", sec.Data["mechanism"])
	require.Equal(t, fmt.Sprint(drillTimeout), fmt.Sprint(sec.Data["hsm_timeout"]))
	t.Logf("network HSM: sealed through p11-kit (rsa-oaep, key pair generated) in %v", time.Since(start).Round(time.Millisecond))
	for i, typ := range []string{"aes256-gcm96", "chacha20-poly1305", "aes128-gcm96"} {
		_, err := v.client.Logical().Write("net/keys/"+n.keys[i], map[string]interface{}{"type": typ})
		require.NoError(t, err)
	}
	return n
}

// probe writes config/seal again with the same settings: it logs in to the
// token (a handle of its own joins the mount's connection) and lists its
// mechanisms, and answers 503 when the token cannot be reached.
func (n *networkHSM) probe(c *api.Client) func() error {
	return func() error {
		_, err := c.Logical().Write("net/config/seal", n.seal)
		return err
	}
}

// loadClient is a Go API client for load: no retries (each request is
// counted as sent), and a timeout that no request should come near.
func loadClient(t *testing.T, v *vaultServer) *api.Client {
	t.Helper()
	cfg := api.DefaultConfig()
	cfg.Address = v.addr
	cfg.MaxRetries = 0
	cfg.Timeout = 30 * time.Second
	c, err := api.NewClient(cfg)
	require.NoError(t, err)
	c.SetToken(v.token)
	return c
}

// drillEvent is one request of a drill; times are from the drill's start.
type drillEvent struct {
	kind       string
	start, end time.Duration
	code       int    // HTTP status; 0 for no answer
	msg        string // the error, if any
}

func (e drillEvent) latency() time.Duration { return e.end - e.start }

// drill runs load against a Vault and records every request.
type drill struct {
	t    *testing.T
	t0   time.Time
	stop chan struct{}
	wg   sync.WaitGroup

	mu     sync.Mutex
	events []drillEvent
	cts    map[string][][2]string // key -> (ciphertext, plaintext)
}

func newDrill(t *testing.T) *drill {
	return &drill{t: t, t0: time.Now(), stop: make(chan struct{}), cts: map[string][][2]string{}}
}

// now is the time since the drill began.
func (d *drill) now() time.Duration { return time.Since(d.t0) }

func (d *drill) record(kind string, start time.Time, err error) {
	ev := drillEvent{kind: kind, start: start.Sub(d.t0), end: d.now(), code: 200}
	if err != nil {
		var re *api.ResponseError
		if errors.As(err, &re) {
			ev.code, ev.msg = re.StatusCode, strings.Join(re.Errors, "; ")
		} else {
			ev.code, ev.msg = 0, err.Error()
		}
	}
	d.mu.Lock()
	d.events = append(d.events, ev)
	d.mu.Unlock()
}

func (d *drill) stopped() bool {
	select {
	case <-d.stop:
		return true
	default:
		return false
	}
}

// encryptor encrypts continuously with key on mount, keeping what it made.
func (d *drill) encryptor(c *api.Client, kind, mount, key string, worker int) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		for i := 0; !d.stopped(); i++ {
			pt := fmt.Sprintf("%s/%d/%d", key, worker, i)
			start := time.Now()
			sec, err := c.Logical().Write(mount+"/encrypt/"+key, map[string]interface{}{"plaintext": b64(pt)})
			d.record(kind, start, err)
			if err == nil {
				d.mu.Lock()
				d.cts[mount+"/"+key] = append(d.cts[mount+"/"+key], [2]string{sec.Data["ciphertext"].(string), pt})
				d.mu.Unlock()
			}
		}
	}()
}

// prober calls f every interval (or right after the previous call, when it
// took longer).
func (d *drill) prober(kind string, interval time.Duration, f func() error) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		for !d.stopped() {
			start := time.Now()
			d.record(kind, start, f())
			select {
			case <-d.stop:
			case <-time.After(time.Until(start.Add(interval))):
			}
		}
	}()
}

// finish stops the load and waits for the requests in flight.
func (d *drill) finish() time.Duration {
	close(d.stop)
	d.wg.Wait()
	return d.now()
}

// waitSuccess waits for a request of kind that succeeded and ended after
// from, and returns it.
func (d *drill) waitSuccess(kind string, from time.Duration, limit time.Duration) drillEvent {
	d.t.Helper()
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		d.mu.Lock()
		for _, e := range d.events {
			if e.kind == kind && e.code == 200 && e.end >= from {
				d.mu.Unlock()
				return e
			}
		}
		d.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
	}
	d.t.Fatalf("no successful %s request within %v after +%v:\n%s", kind, limit, from.Round(time.Millisecond), d.perSecond(nil))
	return drillEvent{}
}

// selectEvents returns the events of kind that match f (all when nil).
func (d *drill) selectEvents(kind string, f func(drillEvent) bool) []drillEvent {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []drillEvent
	for _, e := range d.events {
		if e.kind == kind && (f == nil || f(e)) {
			out = append(out, e)
		}
	}
	return out
}

// codes counts status codes: "200x812 503x4".
func codes(evs []drillEvent) string {
	count := map[int]int{}
	for _, e := range evs {
		count[e.code]++
	}
	var keys []int
	for k := range count {
		keys = append(keys, k)
	}
	sort.Ints(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%dx%d", k, count[k]))
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, " ")
}

func maxLatency(evs []drillEvent) time.Duration {
	var m time.Duration
	for _, e := range evs {
		m = max(m, e.latency())
	}
	return m
}

// phase is a named interval of a drill; requests belong to the phase they
// started in.
type phase struct {
	name     string
	from, to time.Duration
}

func phaseOf(phases []phase, at time.Duration) string {
	for _, p := range phases {
		if at >= p.from && at < p.to {
			return p.name
		}
	}
	return ""
}

// perSecond is the drill's table: per second, status codes per kind.
func (d *drill) perSecond(phases []phase) string {
	kinds := d.kinds()
	d.mu.Lock()
	evs := append([]drillEvent(nil), d.events...)
	d.mu.Unlock()
	last := 0
	for _, e := range evs {
		last = max(last, int(e.start/time.Second))
	}
	var b strings.Builder
	for s := 0; s <= last; s++ {
		fmt.Fprintf(&b, "  +%02ds %-9s", s, phaseOf(phases, time.Duration(s)*time.Second+time.Second/2))
		for _, k := range kinds {
			var in []drillEvent
			for _, e := range evs {
				if e.kind == k && int(e.start/time.Second) == s {
					in = append(in, e)
				}
			}
			fmt.Fprintf(&b, " | %s %-16s max %5dms", k, codes(in), maxLatency(in).Milliseconds())
		}
		b.WriteString("\n")
	}
	return b.String()
}

// phaseReport summarises each phase per kind.
func (d *drill) phaseReport(phases []phase) string {
	var b strings.Builder
	for _, p := range phases {
		fmt.Fprintf(&b, "  %-9s +%5.1fs..+%5.1fs", p.name, p.from.Seconds(), p.to.Seconds())
		for _, k := range d.kinds() {
			evs := d.selectEvents(k, func(e drillEvent) bool { return e.start >= p.from && e.start < p.to })
			fmt.Fprintf(&b, " | %s %s max %dms", k, codes(evs), maxLatency(evs).Milliseconds())
		}
		b.WriteString("\n")
	}
	return b.String()
}

func (d *drill) kinds() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	seen := map[string]bool{}
	var kinds []string
	for _, e := range d.events {
		if !seen[e.kind] {
			seen[e.kind] = true
			kinds = append(kinds, e.kind)
		}
	}
	sort.Strings(kinds)
	return kinds
}

// requireCodes fails with the events whose code is not among allowed.
func requireCodes(t *testing.T, what string, evs []drillEvent, allowed ...int) {
	t.Helper()
	var bad []string
	for _, e := range evs {
		ok := false
		for _, a := range allowed {
			ok = ok || e.code == a
		}
		if !ok && len(bad) < 10 {
			bad = append(bad, fmt.Sprintf("+%.3fs..+%.3fs %d %s", e.start.Seconds(), e.end.Seconds(), e.code, e.msg))
		}
	}
	if len(bad) > 0 {
		t.Errorf("%s: %d requests (%s), want only %v; first ones:\n  %s", what, len(evs), codes(evs), allowed, strings.Join(bad, "\n  "))
	}
}

// firstMessages lists the distinct error messages of evs, for the report.
func firstMessages(evs []drillEvent, n int) string {
	seen := map[string]bool{}
	var out []string
	for _, e := range evs {
		if e.msg == "" || len(out) >= n {
			continue
		}
		m := strings.TrimPrefix(strings.Join(strings.Fields(e.msg), " "), "1 error occurred: * ")
		if len(m) > 160 {
			m = m[:160] + "..."
		}
		m = fmt.Sprintf("%d %s", e.code, m)
		if !seen[m] {
			seen[m] = true
			out = append(out, m)
		}
	}
	return strings.Join(out, "\n    ")
}

// verifyCiphertexts decrypts everything the drill's encryptors made, in
// batches, and returns how many.
func (d *drill) verifyCiphertexts(c *api.Client) int {
	t := d.t
	t.Helper()
	n := 0
	for mk, pairs := range d.cts {
		mount, key, _ := strings.Cut(mk, "/")
		for i := 0; i < len(pairs); i += 500 {
			chunk := pairs[i:min(i+500, len(pairs))]
			items := make([]interface{}, len(chunk))
			for j, p := range chunk {
				items[j] = map[string]interface{}{"ciphertext": p[0]}
			}
			sec, err := c.Logical().Write(mount+"/decrypt/"+key, map[string]interface{}{"batch_input": items})
			require.NoError(t, err, mk)
			results := sec.Data["batch_results"].([]interface{})
			require.Len(t, results, len(chunk))
			for j, r := range results {
				rm := r.(map[string]interface{})
				require.Emptyf(t, rm["error"], "%s: ciphertext %s", mk, chunk[j][0])
				require.Equal(t, chunk[j][1], unb64(t, rm["plaintext"].(string)), mk)
				n++
			}
		}
	}
	return n
}

// networkDrill runs software-key encryptions and the config/seal probe
// against a network HSM, calls fault at +2 s and resume after the outage,
// and checks and reports the figures.
func networkDrill(t *testing.T, name string, fault, resume func(*p11env.P11Kit)) {
	n := startNetworkHSM(t)
	lc := loadClient(t, n.v)
	d := newDrill(t)
	for i, key := range append(n.keys, n.keys[0]) {
		d.encryptor(lc, "sw", "net", key, i)
	}
	d.prober("hsm", 100*time.Millisecond, n.probe(lc))

	time.Sleep(2 * time.Second)
	tFault := d.now()
	fault(n.kit)
	tFaulted := d.now()
	time.Sleep(5 * time.Second)
	tResume := d.now()
	resume(n.kit)
	tResumed := d.now()
	rec := d.waitSuccess("hsm", tResumed, 30*time.Second)
	time.Sleep(2 * time.Second)
	tEnd := d.finish()

	phases := []phase{
		{"before", 0, tFault},
		{"outage", tFault, tResume},
		{"recovery", tResume, rec.end},
		{"after", rec.end, tEnd + time.Second},
	}
	sw := d.selectEvents("sw", nil)
	hsmEvs := d.selectEvents("hsm", nil)
	outage := d.selectEvents("hsm", func(e drillEvent) bool { return e.start >= tFaulted && e.end <= tResume })
	after := d.selectEvents("hsm", func(e drillEvent) bool { return e.start >= rec.end })
	before := d.selectEvents("hsm", func(e drillEvent) bool { return e.end <= tFault })

	// The ciphertexts first: the report below depends on nothing failing.
	verified := d.verifyCiphertexts(n.v.client)
	st := sealStatus(t, n.v.client.Logical(), "net")

	t.Logf("%s drill report (hsm = config/seal rewrite through p11-kit, every 100 ms; sw = encrypt with 3 software keys, 4 workers; hsm_timeout=%ds):\n"+
		"  fault at +%.2fs (returned +%.2fs), resumed at +%.2fs (returned +%.2fs), first HSM success at +%.2fs: recovery %v after resume\n"+
		"  totals: sw %s (max %v) | hsm %s (max %v)\n"+
		"  hsm wholly inside the outage: %s, max %v\n"+
		"  error messages:\n    %s\n"+
		"  ciphertexts decrypted after the drill: %d; seal/status sealed=%v token_mechanisms=%v\n"+
		"per phase:\n%sper second:\n%s",
		name, drillTimeout,
		tFault.Seconds(), tFaulted.Seconds(), tResume.Seconds(), tResumed.Seconds(), rec.end.Seconds(), (rec.end - tResumed).Round(time.Millisecond),
		codes(sw), maxLatency(sw).Round(time.Millisecond), codes(hsmEvs), maxLatency(hsmEvs).Round(time.Millisecond),
		codes(outage), maxLatency(outage).Round(time.Millisecond),
		firstMessages(append(append([]drillEvent(nil), sw...), hsmEvs...), 6),
		verified, st["sealed"], st["token_mechanisms"],
		d.phaseReport(phases), d.perSecond(phases))

	requireCodes(t, "software-key encryptions throughout", sw, 200)
	requireCodes(t, "HSM requests before the fault", before, 200)
	require.NotEmpty(t, outage, "HSM requests inside the outage")
	requireCodes(t, "HSM requests inside the outage", outage, 503)
	requireCodes(t, "HSM requests overall", hsmEvs, 200, 503)
	require.NotEmpty(t, after)
	requireCodes(t, "HSM requests after recovery", after, 200)
	require.Less(t, maxLatency(hsmEvs), drillBound, "HSM request latency")
	require.Less(t, maxLatency(sw), drillBound, "software-key request latency")
	require.Less(t, rec.end-tResumed, 10*time.Second, "recovery time")
	require.Equal(t, false, st["sealed"])
	require.NotEmpty(t, st["token_mechanisms"], "seal/status reaches the token again")
	require.Positive(t, verified)
}

// TestNetworkHSMKillDrill: the network HSM's server is killed under load,
// stays down 5 s and is started again. Software keys keep encrypting from
// the root keyring in memory; HSM requests answer 503 within the deadline;
// the plugin reconnects by itself.
func TestNetworkHSMKillDrill(t *testing.T) {
	networkDrill(t, "kill", (*p11env.P11Kit).Kill, (*p11env.P11Kit).Restart)
}

// TestNetworkHSMFreezeDrill: the network HSM's server is frozen (SIGSTOP)
// under load for 5 s, then continued. HSM requests answer 503 within the
// deadline instead of hanging; software keys keep working.
func TestNetworkHSMFreezeDrill(t *testing.T) {
	networkDrill(t, "freeze", (*p11env.P11Kit).Stop, (*p11env.P11Kit).Cont)
}

// TestHungHSMResidentKeys: HSM-resident keys encrypt under load on a token
// (SoftHSM2 behind internal/p11shim) that hangs for 4.5 s, and later fails
// every call with CKR_DEVICE_ERROR for 3 s. Meanwhile their requests answer
// 503 within the deadline, software keys keep working, and afterwards the
// plugin recovers by itself and every ciphertext decrypts.
func TestHungHSMResidentKeys(t *testing.T) {
	// A copy of SoftHSM2's module of the test's own, behind the shim.
	target := filepath.Join(t.TempDir(), "libsofthsm2-copy.so")
	copyFile(t, softhsmLib, target)
	shim := p11shim.New(t, target)
	conf, err := softhsm.Configure(t.TempDir())
	require.NoError(t, err)
	require.NoError(t, softhsm.InitToken(conf, "hung", hsmPIN))
	env := append(shim.Env(), "SOFTHSM2_CONF="+conf, hsm.LibrariesEnv+"="+shim.Library)
	v := startVault(t, serverOptions{env: env})
	v.registerPlugin(pluginName)
	v.mustCLI("secrets", "enable", "-path=hung", "-plugin-version="+pluginVersion, pluginName)
	c := v.client.Logical()
	sec, err := c.Write("hung/config/seal", map[string]interface{}{"library": shim.Library, "token_label": "hung",
		"pin": hsmPIN, "key_label": "hung-kek", "generate_key": true, "hsm_timeout": drillTimeout})
	require.NoError(t, err, "vault log:\n%s", v.log())
	require.Equal(t, "aes-gcm", sec.Data["mechanism"])
	st := sealStatus(t, c, "hung")
	require.Equal(t, true, st["hsm_keys_supported"])
	for _, k := range []string{"hk1", "hk2"} {
		sec, err := c.Write("hung/keys/"+k, map[string]interface{}{"hsm": true})
		require.NoError(t, err)
		require.Equal(t, true, sec.Data["hsm"])
	}
	_, err = c.Write("hung/keys/sk", nil)
	require.NoError(t, err)

	lc := loadClient(t, v)
	d := newDrill(t)
	for i, k := range []string{"hk1", "hk1", "hk2", "hk2"} {
		d.encryptor(lc, "hsm", "hung", k, i)
	}
	d.encryptor(lc, "sw", "hung", "sk", 0)

	time.Sleep(1500 * time.Millisecond)
	tHang := d.now()
	shim.Set(p11shim.Hang)
	// Not a multiple of the deadline: the blocked requests' second round
	// times out inside the hang.
	time.Sleep(4500 * time.Millisecond)
	tHangEnd := d.now()
	shim.Set()
	rec1 := d.waitSuccess("hsm", tHangEnd, 30*time.Second)
	time.Sleep(time.Second)
	tDev := d.now()
	shim.Set(p11shim.DeviceError)
	time.Sleep(3 * time.Second)
	tDevEnd := d.now()
	shim.Set()
	rec2 := d.waitSuccess("hsm", tDevEnd, 30*time.Second)
	time.Sleep(1500 * time.Millisecond)
	tEnd := d.finish()

	phases := []phase{
		{"before", 0, tHang},
		{"hang", tHang, tHangEnd},
		{"recovery", tHangEnd, rec1.end},
		{"between", rec1.end, tDev},
		{"deverror", tDev, tDevEnd},
		{"recovery", tDevEnd, rec2.end},
		{"after", rec2.end, tEnd + time.Second},
	}
	inside := func(from, to time.Duration) []drillEvent {
		return d.selectEvents("hsm", func(e drillEvent) bool { return e.start >= from && e.end <= to })
	}
	sw := d.selectEvents("sw", nil)
	hsmEvs := d.selectEvents("hsm", nil)
	hang, deverr := inside(tHang, tHangEnd), inside(tDev, tDevEnd)
	before := d.selectEvents("hsm", func(e drillEvent) bool { return e.end <= tHang })
	between := d.selectEvents("hsm", func(e drillEvent) bool { return e.start >= rec1.end && e.end <= tDev })
	after := d.selectEvents("hsm", func(e drillEvent) bool { return e.start >= rec2.end })

	verified := d.verifyCiphertexts(v.client)
	t.Logf("hung-HSM drill report (hsm = encrypt with 2 HSM-resident keys, 4 workers; sw = 1 software-key worker; hsm_timeout=%ds):\n"+
		"  hang +%.2fs..+%.2fs, first HSM success +%.2fs: recovery %v; device-error +%.2fs..+%.2fs, first HSM success +%.2fs: recovery %v\n"+
		"  totals: sw %s (max %v) | hsm %s (max %v)\n"+
		"  hsm wholly inside the hang: %s, max %v; inside the device errors: %s, max %v\n"+
		"  error messages:\n    %s\n"+
		"  ciphertexts decrypted after the drill: %d\n"+
		"per phase:\n%sper second:\n%s",
		drillTimeout,
		tHang.Seconds(), tHangEnd.Seconds(), rec1.end.Seconds(), (rec1.end - tHangEnd).Round(time.Millisecond),
		tDev.Seconds(), tDevEnd.Seconds(), rec2.end.Seconds(), (rec2.end - tDevEnd).Round(time.Millisecond),
		codes(sw), maxLatency(sw).Round(time.Millisecond), codes(hsmEvs), maxLatency(hsmEvs).Round(time.Millisecond),
		codes(hang), maxLatency(hang).Round(time.Millisecond), codes(deverr), maxLatency(deverr).Round(time.Millisecond),
		firstMessages(append(append([]drillEvent(nil), sw...), hsmEvs...), 6),
		verified, d.phaseReport(phases), d.perSecond(phases))

	requireCodes(t, "software-key encryptions throughout", sw, 200)
	requireCodes(t, "HSM-key encryptions before the faults", before, 200)
	require.NotEmpty(t, hang)
	requireCodes(t, "HSM-key encryptions inside the hang", hang, 503)
	require.NotEmpty(t, deverr)
	requireCodes(t, "HSM-key encryptions inside the device errors", deverr, 503)
	requireCodes(t, "HSM-key encryptions overall", hsmEvs, 200, 503)
	require.NotEmpty(t, between)
	requireCodes(t, "HSM-key encryptions between the faults", between, 200)
	require.NotEmpty(t, after)
	requireCodes(t, "HSM-key encryptions after recovery", after, 200)
	require.Less(t, maxLatency(hsmEvs), drillBound, "HSM-key request latency")
	require.Less(t, maxLatency(sw), drillBound, "software-key request latency")
	require.Less(t, rec1.end-tHangEnd, 10*time.Second, "recovery after the hang")
	require.Less(t, rec2.end-tDevEnd, 10*time.Second, "recovery after the device errors")
	require.Positive(t, verified)
}

// copyFile copies a file's bytes.
func copyFile(t *testing.T, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	require.NoError(t, err)
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	require.NoError(t, err)
	_, err = io.Copy(dst, src)
	require.NoError(t, err)
	require.NoError(t, dst.Close())
}
