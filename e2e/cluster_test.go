package e2e

// A Raft cluster of real Vault servers with the plugin mounted, for tests
// of high availability. The harness itself needs of its caller only what
// clusterTB lists (testing.TB has it all), so that a load tool can drive
// it with a small adapter.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/vaultproc"
)

// clusterTB is what the harness needs of a test.
type clusterTB interface {
	Helper()
	Fatalf(format string, args ...any)
	Logf(format string, args ...any)
	Cleanup(func())
	TempDir() string
	Failed() bool
}

var _ clusterTB = (testing.TB)(nil)

// clusterOptions configure a cluster; the zero value is a three-node
// cluster with the plugin at transit/.
type clusterOptions struct {
	// nodes is the number of Vault servers (default 3).
	nodes int
	// mount is where the plugin is enabled (default "transit").
	mount string
	// env is added to every Vault's environment, and so to the plugin's
	// (the suite's SOFTHSM2_CONF is already there).
	env []string
	// registerEnv is added to the plugin's environment at registration,
	// such as HSM_TRANSIT_PKCS11_LIBRARIES=... or HSM_PIN=....
	registerEnv []string
	// sealArgs replace the `config/seal` arguments (default: the suite's
	// token, PIN and library, a new KEK of a label unique to the cluster,
	// generate_key=true).
	sealArgs []string
	// performanceMultiplier is Raft's performance_multiplier (0: Vault's
	// default, 5).
	performanceMultiplier int
	// logLevel is Vault's log level (default "info").
	logLevel string
}

// cluster is a Raft cluster of Vault servers on loopback, initialised with
// one unseal key, its nodes stopped and their directories removed when the
// test ends.
type cluster struct {
	t         clusterTB
	opts      clusterOptions
	dir       string
	nodes     []*clusterNode
	rootToken string
	unsealKey string
	kekLabel  string
	// startup is how long startCluster took.
	startup time.Duration
}

// clusterNode is one Vault server of a cluster.
type clusterNode struct {
	c           *cluster
	id          string // Raft node_id: node1, node2, ...
	dir         string
	pluginDir   string
	port        int
	clusterPort int
	addr        string // http://127.0.0.1:port

	mu sync.Mutex
	// proc is the Vault process of the last start; procs are those of
	// every start, each stopped at cleanup with the plugins left in its
	// process group.
	proc  *vaultproc.Process
	procs []*vaultproc.Process
	// orphans are plugin processes that outlived a kill().
	orphans []int
	// killedAt is when kill() last sent SIGKILL, diedAt when the process
	// was gone.
	killedAt, diedAt time.Time
}

// startCluster starts the servers, initialises and unseals them, registers
// and enables the plugin and seals its mount with the suite's SoftHSM2
// token.
func startCluster(t clusterTB, opts clusterOptions) *cluster {
	t.Helper()
	begin := time.Now()
	if opts.nodes == 0 {
		opts.nodes = 3
	}
	if opts.mount == "" {
		opts.mount = "transit"
	}
	if opts.logLevel == "" {
		opts.logLevel = "info"
	}
	c := &cluster{t: t, opts: opts, dir: t.TempDir()}
	if keep := os.Getenv("HSM_TRANSIT_CLUSTER_KEEP"); keep != "" {
		// Directories (logs, Raft data) kept for a look afterwards.
		dir, err := os.MkdirTemp(keep, "cluster-")
		if err != nil {
			t.Fatalf("cluster: %v", err)
		}
		c.dir = dir
	}
	var phases []string
	mark := func(what string) {
		phases = append(phases, fmt.Sprintf("%s %.1fs", what, time.Since(begin).Seconds()))
	}
	c.kekLabel = "cluster-kek-" + randomHex(6)
	var sum string // the plugin's SHA-256, as installed on every node

	ports, err := vaultproc.ReservePorts(2*opts.nodes, 1)
	if err != nil {
		t.Fatalf("cluster: %v", err)
	}
	for i := 0; i < opts.nodes; i++ {
		n := &clusterNode{
			c:           c,
			id:          fmt.Sprintf("node%d", i+1),
			port:        ports[2*i],
			clusterPort: ports[2*i+1],
		}
		n.addr = fmt.Sprintf("http://127.0.0.1:%d", n.port)
		n.dir = filepath.Join(c.dir, n.id)
		n.pluginDir = filepath.Join(n.dir, "plugins")
		for _, d := range []string{n.pluginDir, filepath.Join(n.dir, "raft")} {
			if err := os.MkdirAll(d, 0o700); err != nil {
				t.Fatalf("cluster: %v", err)
			}
		}
		if sum, err = vaultproc.InstallPlugin(pluginBin, n.pluginDir, pluginName); err != nil {
			t.Fatalf("cluster: %v", err)
		}
		c.nodes = append(c.nodes, n)
	}
	for _, n := range c.nodes {
		if err := n.writeConfig(); err != nil {
			t.Fatalf("cluster: %v", err)
		}
	}
	t.Cleanup(c.stop)

	for _, n := range c.nodes {
		if err := n.startProcess(); err != nil {
			t.Fatalf("cluster: %v", err)
		}
	}
	for _, n := range c.nodes {
		if err := n.waitListening(); err != nil {
			t.Fatalf("cluster: %v", err)
		}
	}

	mark("listening")
	// Initialise node 1 with one unseal key, unseal it, and wait for it to
	// be active.
	first := c.nodes[0]
	out, err := c.cli(first, "operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json")
	if err != nil {
		t.Fatalf("cluster: vault operator init: %v\n%s", err, out)
	}
	var init struct {
		Keys      []string `json:"unseal_keys_b64"`
		RootToken string   `json:"root_token"`
	}
	if err := json.Unmarshal([]byte(out), &init); err != nil || len(init.Keys) != 1 || init.RootToken == "" {
		t.Fatalf("cluster: vault operator init answered %q (%v)", out, err)
	}
	c.unsealKey, c.rootToken = init.Keys[0], init.RootToken
	if err := first.unseal(60 * time.Second); err != nil {
		t.Fatalf("cluster: %v", err)
	}
	if err := first.waitHealth(60*time.Second, 200); err != nil {
		t.Fatalf("cluster: node1 did not become active: %v", err)
	}
	mark("node1 active")
	// New servers join as non-voters and autopilot promotes them once they
	// have been stable this long (Vault's default is 10 s).
	if _, err := first.client().Logical().Write("sys/storage/raft/autopilot/configuration", map[string]interface{}{
		"server_stabilization_time": "1s",
	}); err != nil {
		t.Fatalf("cluster: autopilot configuration: %v", err)
	}

	// The others join through retry_join once unsealed with the same key.
	errs := make(chan error, len(c.nodes))
	for _, n := range c.nodes[1:] {
		go func(n *clusterNode) { errs <- n.unseal(90 * time.Second) }(n)
	}
	for range c.nodes[1:] {
		if err := <-errs; err != nil {
			t.Fatalf("cluster: %v", err)
		}
	}
	mark("unsealed")
	if err := c.waitVoters(opts.nodes, 90*time.Second); err != nil {
		t.Fatalf("cluster: %v", err)
	}
	mark("voters")
	for _, n := range c.nodes[1:] {
		if err := n.waitHealth(60*time.Second, 429); err != nil {
			t.Fatalf("cluster: %s did not become a standby: %v", n.id, err)
		}
	}

	// The plugin catalog and mount table are replicated: register and
	// enable once, on the active node.
	catalog := vaultproc.API{Addr: first.addr, Token: c.rootToken}
	if err := catalog.RegisterPlugin(vaultproc.Plugin{
		Name: pluginName, Command: pluginName, SHA256: sum, Version: pluginVersion, Env: opts.registerEnv,
	}); err != nil {
		t.Fatalf("cluster: registering the plugin: %v", err)
	}
	c.mustCLI(first, "secrets", "enable", "-path="+opts.mount, "-plugin-version="+pluginVersion, pluginName)
	seal := opts.sealArgs
	if seal == nil {
		seal = []string{"library=" + softhsmLib, "token_label=" + hsmToken, "pin=" + hsmPIN,
			"key_label=" + c.kekLabel, "generate_key=true"}
	}
	c.mustCLI(first, append([]string{"write", opts.mount + "/config/seal"}, seal...)...)

	mark("mounted")
	// Every node answers for the mount (standbys forward to the active).
	for _, n := range c.nodes {
		if err := c.waitMountAnswers(n.client(), 60*time.Second); err != nil {
			t.Fatalf("cluster: the mount does not answer through %s: %v", n.id, err)
		}
	}
	c.startup = time.Since(begin)
	t.Logf("cluster: %d nodes up, plugin mounted at %s/ and sealed, in %v (%s; %s)",
		opts.nodes, opts.mount, c.startup.Round(time.Millisecond), strings.Join(phases, ", "), c.describe())
	return c
}

// describe lists the nodes' API addresses.
func (c *cluster) describe() string {
	var parts []string
	for _, n := range c.nodes {
		parts = append(parts, n.id+"="+n.addr)
	}
	return strings.Join(parts, " ")
}

// stop ends every process of the cluster, and prints the logs of a failed
// test.
func (c *cluster) stop() {
	var wg sync.WaitGroup
	for _, n := range c.nodes {
		wg.Add(1)
		go func(n *clusterNode) {
			defer wg.Done()
			n.stop()
		}(n)
	}
	wg.Wait()
	if c.t.Failed() {
		for _, n := range c.nodes {
			c.t.Logf("cluster: log of %s (%s), last 12000 bytes:\n%s", n.id, n.addr, n.logTail(12000))
		}
	}
}

// liveNodes are the nodes whose Vault process is running.
func (c *cluster) liveNodes() []*clusterNode {
	var out []*clusterNode
	for _, n := range c.nodes {
		if n.running() {
			out = append(out, n)
		}
	}
	return out
}

// leader returns the active node, waiting up to a minute for there to be
// one: the live node whose sys/leader says is_self.
func (c *cluster) leader(t clusterTB) *clusterNode {
	t.Helper()
	n, _, err := c.pollLeader(nil, 60*time.Second)
	if err != nil {
		t.Fatalf("cluster: %v", err)
	}
	return n
}

// waitForNewLeader waits up to timeout for a live node other than old to
// be active, and returns it and the time it took: since old was killed
// (SIGKILL sent by kill) when it was, else since the call.
func (c *cluster) waitForNewLeader(t clusterTB, old *clusterNode, timeout time.Duration) (*clusterNode, time.Duration) {
	t.Helper()
	n, d, err := c.pollLeader(old, timeout)
	if err != nil {
		t.Fatalf("cluster: %v", err)
	}
	if old != nil {
		old.mu.Lock()
		killed := old.killedAt
		old.mu.Unlock()
		if !killed.IsZero() && !old.running() {
			d = time.Since(killed)
		}
	}
	return n, d
}

func (c *cluster) pollLeader(not *clusterNode, timeout time.Duration) (*clusterNode, time.Duration, error) {
	start := time.Now()
	var last string
	for time.Since(start) < timeout {
		for _, n := range c.liveNodes() {
			if n == not {
				continue
			}
			ok, why := n.isActive()
			if ok {
				return n, time.Since(start), nil
			}
			last = n.id + ": " + why
		}
		time.Sleep(25 * time.Millisecond)
	}
	return nil, time.Since(start), fmt.Errorf("no active node after %v (last: %s)", timeout, last)
}

// waitVoters waits until the Raft configuration has want voters.
func (c *cluster) waitVoters(want int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		voters, desc, err := c.voters()
		if err == nil && voters == want {
			return nil
		}
		last = fmt.Sprintf("%s (%v)", desc, err)
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("the Raft configuration did not reach %d voters in %v: %s", want, timeout, last)
}

// voters counts the voters in the Raft configuration, as
// `vault operator raft list-peers` shows it.
func (c *cluster) voters() (int, string, error) {
	for _, n := range c.liveNodes() {
		sec, err := n.client().Logical().Read("sys/storage/raft/configuration")
		if err != nil || sec == nil {
			continue
		}
		cfg, _ := sec.Data["config"].(map[string]interface{})
		servers, _ := cfg["servers"].([]interface{})
		voters := 0
		var desc []string
		for _, s := range servers {
			m, _ := s.(map[string]interface{})
			if m["voter"] == true {
				voters++
			}
			desc = append(desc, fmt.Sprintf("%v(voter=%v leader=%v)", m["node_id"], m["voter"], m["leader"]))
		}
		return voters, strings.Join(desc, " "), nil
	}
	return 0, "", errors.New("no node answered sys/storage/raft/configuration")
}

// waitMountAnswers waits for the mount's seal/status to say unsealed.
func (c *cluster) waitMountAnswers(client *api.Client, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		sec, err := client.Logical().Read(c.opts.mount + "/seal/status")
		if err == nil && sec != nil && sec.Data["sealed"] == false {
			return nil
		}
		if err == nil && sec != nil {
			err = fmt.Errorf("seal/status: %v", sec.Data)
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	return last
}

// client returns an API client for the cluster with the root token. It
// sends each request to one live node (standbys forward to the active node)
// and moves on to the next node when a request gets no answer, so that a
// dead node costs no request. It does not retry answers: MaxRetries is 0.
func (c *cluster) client(t clusterTB) *api.Client {
	t.Helper()
	cfg := api.DefaultConfig()
	cfg.Address = "http://" + clusterHost
	cfg.MaxRetries = 0
	cfg.Timeout = 30 * time.Second
	base := cfg.HttpClient.Transport
	ft := &failoverTransport{base: base}
	for _, n := range c.nodes {
		ft.hosts = append(ft.hosts, strings.TrimPrefix(n.addr, "http://"))
	}
	cfg.HttpClient.Transport = ft
	client, err := api.NewClient(cfg)
	if err != nil {
		t.Fatalf("cluster: %v", err)
	}
	client.SetToken(c.rootToken)
	return client
}

// clusterHost is the host name of the cluster client's address: its
// transport sends such requests to a live node.
const clusterHost = "vault-cluster.invalid"

// failoverTransport sends a request for clusterHost to its current node,
// and on a transport error (refused, reset, EOF: no answer) to the next,
// making that one current. A request for another host (the API client
// following a standby's redirect to the active node) goes there first, and
// to the nodes in turn if that host does not answer. A request that reached
// a node which then died may have been carried out there; it is sent again
// elsewhere.
type failoverTransport struct {
	base  http.RoundTripper
	hosts []string
	cur   atomic.Int64
	// switches counts moves to another host.
	switches atomic.Int64
}

func (f *failoverTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	var body []byte
	if req.Body != nil && req.Body != http.NoBody {
		b, err := io.ReadAll(req.Body)
		req.Body.Close()
		if err != nil {
			return nil, err
		}
		body = b
	}
	send := func(host string) (*http.Response, error) {
		r := req.Clone(req.Context())
		r.URL.Host = host
		r.Host = host
		if body != nil {
			r.Body = io.NopCloser(bytes.NewReader(body))
			r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
			r.ContentLength = int64(len(body))
		}
		return f.base.RoundTrip(r)
	}
	var lastErr error
	if req.URL.Host != clusterHost {
		resp, err := send(req.URL.Host)
		if err == nil || req.Context().Err() != nil {
			return resp, err
		}
		lastErr = err
	}
	start := int(f.cur.Load())
	for i := 0; i < len(f.hosts); i++ {
		idx := (start + i) % len(f.hosts)
		resp, err := send(f.hosts[idx])
		if err == nil {
			if i > 0 && f.cur.CompareAndSwap(int64(start), int64(idx)) {
				f.switches.Add(1)
			}
			return resp, nil
		}
		lastErr = err
		if req.Context().Err() != nil {
			break
		}
	}
	return nil, lastErr
}

// cli runs the vault CLI against a node with the root token.
func (c *cluster) cli(n *clusterNode, args ...string) (string, error) {
	cmd := exec.Command(vaultBin, args...)
	cmd.Env = append(os.Environ(), "VAULT_ADDR="+n.addr, "VAULT_TOKEN="+c.rootToken, "VAULT_FORMAT=")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String() + stderr.String(), err
	}
	return stdout.String(), nil
}

func (c *cluster) mustCLI(n *clusterNode, args ...string) string {
	c.t.Helper()
	out, err := c.cli(n, args...)
	if err != nil {
		c.t.Fatalf("cluster: vault %s on %s: %v\n%s", strings.Join(args, " "), n.id, err, out)
	}
	return out
}

// writeConfig writes the node's server configuration: Raft storage that
// retry-joins every other node, a plain-HTTP listener with its own cluster
// address.
func (n *clusterNode) writeConfig() error {
	var joins strings.Builder
	for _, o := range n.c.nodes {
		if o != n {
			fmt.Fprintf(&joins, "  retry_join {\n    leader_api_addr = %q\n  }\n", o.addr)
		}
	}
	pm := ""
	if n.c.opts.performanceMultiplier > 0 {
		pm = fmt.Sprintf("  performance_multiplier = %d\n", n.c.opts.performanceMultiplier)
	}
	// Autopilot promotes a joined non-voter once it has been stable for
	// server_stabilization_time (set to 1 s after init), checked every
	// reconcile interval (Vault's default is 10 s).
	config := fmt.Sprintf(`storage "raft" {
  path    = %q
  node_id = %q
  autopilot_reconcile_interval = "1s"
  autopilot_update_interval    = "1s"
%s%s}

listener "tcp" {
  address         = "127.0.0.1:%d"
  cluster_address = "127.0.0.1:%d"
  tls_disable     = true
}

api_addr         = %q
cluster_addr     = "https://127.0.0.1:%d"
disable_mlock    = true
plugin_directory = %q
ui               = false
`, filepath.Join(n.dir, "raft"), n.id, pm, joins.String(), n.port, n.clusterPort, n.addr, n.clusterPort, n.pluginDir)
	return os.WriteFile(filepath.Join(n.dir, "vault.hcl"), []byte(config), 0o600)
}

// startProcess launches vault server, in a process group of its own (the
// plugin joins it), logging to the node's vault.log.
func (n *clusterNode) startProcess() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	proc, err := vaultproc.Start(vaultproc.Command{
		Vault:   vaultBin,
		Args:    []string{"server", "-config", filepath.Join(n.dir, "vault.hcl")},
		Env:     append(append([]string(nil), n.c.opts.env...), "VAULT_LOG_LEVEL="+n.c.opts.logLevel),
		LogPath: filepath.Join(n.dir, "vault.log"),
		Banner:  fmt.Sprintf("==== harness: starting %s at %s", n.id, time.Now().UTC().Format(time.RFC3339Nano)),
	})
	if err != nil {
		return fmt.Errorf("starting %s: %w", n.id, err)
	}
	n.proc = proc
	n.procs = append(n.procs, proc)
	return nil
}

// process is the Vault process of the node's last start, nil before it.
func (n *clusterNode) process() *vaultproc.Process {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.proc
}

// running reports whether the node's Vault process is alive.
func (n *clusterNode) running() bool {
	p := n.process()
	return p != nil && p.Running()
}

// pid is the Vault process's id, 0 when none runs.
func (n *clusterNode) pid() int {
	p := n.process()
	if p == nil || !p.Running() {
		return 0
	}
	return p.Pid()
}

// kill ends the Vault process with SIGKILL, as a crash would. Only Vault:
// its plugin processes are left to themselves, and listed in orphans.
func (n *clusterNode) kill() {
	p := n.process()
	if p == nil || !p.Running() {
		return
	}
	plugins := n.pluginPIDs()
	at := time.Now()
	p.Crash()
	n.mu.Lock()
	n.killedAt, n.diedAt = at, time.Now()
	n.orphans = append(n.orphans, plugins...)
	n.mu.Unlock()
	n.logf("==== harness: SIGKILL of vault (pid %d) at %s; plugin processes %v",
		p.Pid(), n.killedAt.UTC().Format(time.RFC3339Nano), plugins)
}

// logf appends a line of the harness's to the node's log.
func (n *clusterNode) logf(format string, args ...any) {
	f, err := os.OpenFile(filepath.Join(n.dir, "vault.log"), os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, format+"\n", args...)
}

// restart starts Vault again on the same data directory and ports, and
// unseals it; it rejoins the cluster as a standby.
func (n *clusterNode) restart(t clusterTB) {
	t.Helper()
	if n.running() {
		t.Fatalf("cluster: restart of %s, which is running", n.id)
	}
	if err := n.startProcess(); err != nil {
		t.Fatalf("cluster: %v", err)
	}
	if err := n.waitListening(); err != nil {
		t.Fatalf("cluster: %v", err)
	}
	if err := n.unseal(60 * time.Second); err != nil {
		t.Fatalf("cluster: %v", err)
	}
	if err := n.waitHealth(60*time.Second, 200, 429); err != nil {
		t.Fatalf("cluster: %s did not rejoin: %v", n.id, err)
	}
}

// stop ends the node's processes of every start, with the plugins left in
// their process groups.
func (n *clusterNode) stop() {
	n.mu.Lock()
	procs := append([]*vaultproc.Process(nil), n.procs...)
	n.mu.Unlock()
	for _, p := range procs {
		p.Stop(vaultproc.StopGrace)
	}
}

// pluginPIDs lists the plugin processes whose parent is this node's Vault.
func (n *clusterNode) pluginPIDs() []int {
	pid := n.pid()
	if pid == 0 {
		return nil
	}
	return childPluginPIDs(pid)
}

// childPluginPIDs lists the processes running the plugin whose parent is
// pid (from /proc).
func childPluginPIDs(parent int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	want := strconv.Itoa(parent)
	var pids []int
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		fields := strings.Fields(string(stat[i+1:]))
		if len(fields) < 2 || fields[1] != want {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err == nil && strings.HasPrefix(filepath.Base(exe), pluginName) {
			pids = append(pids, p)
		}
	}
	return pids
}

// processAlive reports whether pid exists and is not a zombie.
func processAlive(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(stat, ')')
	return i >= 0 && !strings.HasPrefix(strings.TrimSpace(string(stat[i+1:])), "Z")
}

// client is an API client for this node alone, with the root token.
func (n *clusterNode) client() *api.Client {
	cfg := api.DefaultConfig()
	cfg.Address = n.addr
	cfg.MaxRetries = 0
	cfg.Timeout = 30 * time.Second
	client, err := api.NewClient(cfg)
	if err != nil {
		panic(err) // only a malformed address fails
	}
	client.SetToken(n.c.rootToken)
	return client
}

// health is the status code of the node's sys/health (200 active, 429
// standby, 503 sealed, 501 not initialised), 0 when it does not answer.
func (n *clusterNode) health() int {
	hc := http.Client{Timeout: 2 * time.Second}
	resp, err := hc.Get(n.addr + "/v1/sys/health")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// waitListening waits for the node's listener to answer
// (vaultproc.Process.WaitUp).
func (n *clusterNode) waitListening() error {
	p := n.process()
	if p == nil {
		return fmt.Errorf("%s was not started", n.id)
	}
	if err := p.WaitUp(n.addr); err != nil {
		return fmt.Errorf("%s: %v; log:\n%s", n.id, err, n.logTail(8000))
	}
	return nil
}

// waitHealth waits for sys/health to answer one of codes.
func (n *clusterNode) waitHealth(timeout time.Duration, codes ...int) error {
	deadline := time.Now().Add(timeout)
	last := 0
	for time.Now().Before(deadline) {
		last = n.health()
		for _, c := range codes {
			if last == c {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s: sys/health answers %d, not %v, after %v", n.id, last, codes, timeout)
}

// unseal gives the node the unseal key, and waits for it to be unsealed. A
// node that has not yet joined through retry_join refuses the key (not
// initialised); it is given it again. A key that was accepted is not given
// again while the node finishes unsealing: a node joining through
// retry_join accepts it, completes the join, and answers "sealed" while a
// goroutine of Vault's (unsealWithRaft, vault/core.go) waits for the
// keyring to arrive and then unseals it. Had the key been given again in
// that time, Vault 1.21 unseals the node twice over (once in that call,
// the join being over, and once from that goroutine, which does not check
// whether the node is still sealed): two runStandby loops, each with its
// own manual step-down channel, of which sys/step-down sends only to the
// second's (c.manualStepDownCh). When the first loop is the one that wins
// the Raft leadership, every step-down of that node answers success and
// does nothing (once the channel's one slot is full: "manual step-down
// operation already queued"). unsealedOnce checks for a second unseal.
func (n *clusterNode) unseal(timeout time.Duration) error {
	client := n.client()
	deadline := time.Now().Add(timeout)
	var last error
	var accepted time.Time
	for time.Now().Before(deadline) {
		if !accepted.IsZero() {
			st, err := client.Sys().SealStatus()
			if err == nil && !st.Sealed {
				return n.unsealedOnce()
			}
			if err == nil {
				err = fmt.Errorf("still sealed %v after the key was accepted", time.Since(accepted).Round(time.Millisecond))
			}
			last = err
			// Give the key again only if the node has plainly not
			// gone on with it.
			if time.Since(accepted) < 30*time.Second {
				if !n.running() {
					break
				}
				time.Sleep(250 * time.Millisecond)
				continue
			}
			accepted = time.Time{}
		}
		st, err := client.Sys().Unseal(n.c.unsealKey)
		if err == nil && !st.Sealed {
			return n.unsealedOnce()
		}
		if err == nil {
			accepted = time.Now()
			err = fmt.Errorf("still sealed (progress %d/%d)", st.Progress, st.T)
		}
		last = err
		if !n.running() {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	return fmt.Errorf("unsealing %s: %v; log:\n%s", n.id, last, n.logTail(8000))
}

// unsealedOnce checks that, since the harness last started it, Vault
// entered standby mode (started its HA loop, runStandby) once: a node
// unsealed twice over has two such loops, and ignores step-downs (see
// unseal). It waits a little for a late second unseal to show.
func (n *clusterNode) unsealedOnce() error {
	time.Sleep(1500 * time.Millisecond)
	b, _ := os.ReadFile(filepath.Join(n.dir, "vault.log"))
	if i := bytes.LastIndex(b, []byte("==== harness: starting ")); i >= 0 {
		b = b[i:]
	}
	var standbys []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "core: entering standby mode") {
			standbys = append(standbys, l)
		}
	}
	if len(standbys) > 1 {
		return fmt.Errorf("%s: Vault entered standby mode %d times since it was started (unsealed twice over):\n%s",
			n.id, len(standbys), strings.Join(standbys, "\n"))
	}
	return nil
}

// logLines are the node's log lines (of every start) that contain substr.
func (n *clusterNode) logLines(substr string) []string {
	b, _ := os.ReadFile(filepath.Join(n.dir, "vault.log"))
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return out
}

// isActive asks the node's sys/leader whether it is the active node.
func (n *clusterNode) isActive() (bool, string) {
	hc := http.Client{Timeout: 2 * time.Second}
	resp, err := hc.Get(n.addr + "/v1/sys/leader")
	if err != nil {
		return false, err.Error()
	}
	defer resp.Body.Close()
	var l struct {
		IsSelf        bool   `json:"is_self"`
		LeaderAddress string `json:"leader_address"`
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return false, fmt.Sprintf("%d %s", resp.StatusCode, bytes.TrimSpace(b))
	}
	if err := json.Unmarshal(b, &l); err != nil {
		return false, err.Error()
	}
	return l.IsSelf, fmt.Sprintf("is_self=%v leader=%q", l.IsSelf, l.LeaderAddress)
}

// logTail is the end of the node's log.
func (n *clusterNode) logTail(max int) string {
	b, _ := os.ReadFile(filepath.Join(n.dir, "vault.log"))
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return string(b)
}

// logTimes returns the times of the log lines (of every start) that
// contain substr, from Vault's timestamps.
func (n *clusterNode) logTimes(substr string) []time.Time {
	f, err := os.Open(filepath.Join(n.dir, "vault.log"))
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []time.Time
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.Contains(line, substr) {
			continue
		}
		ts, _, _ := strings.Cut(line, " ")
		if t, err := time.Parse(time.RFC3339Nano, ts); err == nil {
			out = append(out, t)
		}
	}
	return out
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// clusterStatus is the HTTP status of a failed API call: 0 for success, -1
// for no answer at all.
func clusterStatus(err error) int {
	if err == nil {
		return 0
	}
	var re *api.ResponseError
	if errors.As(err, &re) {
		return re.StatusCode
	}
	return -1
}

// clusterCtx is a context for one request of a load.
func clusterCtx(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

// TestClusterHarness starts a cluster and checks the harness's own
// promises: three voters, one active node, the client surviving the death
// of the node it uses, a killed node restarting as a standby.
func TestClusterHarness(t *testing.T) {
	t.Parallel()
	c := startCluster(t, clusterOptions{})
	client := c.client(t)
	_, err := client.Logical().Write("transit/keys/h", nil)
	if err != nil {
		t.Fatal(err)
	}
	leader := c.leader(t)
	pids := leader.pluginPIDs()
	t.Logf("leader %s, plugin processes %v", leader.id, pids)
	if len(pids) == 0 {
		t.Fatalf("no plugin process under the active node")
	}
	// Point the client at the node to be killed: kill a standby, then use
	// the client; it moves on.
	var standby *clusterNode
	for _, n := range c.nodes {
		if n != leader {
			standby = n
			break
		}
	}
	standby.kill()
	for i := 0; i < 6; i++ {
		if _, err := client.Logical().Write("transit/encrypt/h", map[string]interface{}{"plaintext": b64("x")}); err != nil {
			t.Fatalf("with %s dead: %v", standby.id, err)
		}
	}
	standby.restart(t)
	if err := c.waitVoters(3, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := c.leader(t); got != leader {
		t.Fatalf("leader moved from %s to %s on a standby's restart", leader.id, got.id)
	}
}
