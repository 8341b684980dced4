package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestClusterRepeatedStepDown steps the active node down three times in a
// row (the CLI twice, then the HTTP API), each time on the node that became
// active by the step-down before, and requires every step-down to move
// leadership to another node, which the node stepping down logs.
//
// It was written for the soak's step-downs, of which only the first moved
// leadership: the others, run on a node that had joined through
// retry_join, answered success and did nothing. That node had been
// unsealed twice over (the harness gave it the unseal key again while
// Vault was still unsealing it after the join), so that it ran two HA
// loops (runStandby, "core: entering standby mode" twice in its log), and
// the loop that became active listened on a manual step-down channel that
// sys/step-down no longer sent to (core.go: each unsealInternal makes
// c.manualStepDownCh anew; ha.go StepDown sends to c.manualStepDownCh,
// non-blocking, logging "manual step-down operation already queued" once
// its one-slot buffer is full). See clusterNode.unseal.
//
// Vault itself has no hold-off on stepping down soon after becoming
// active: StepDown (vault/ha.go) answers success without doing anything
// only when the node is sealed or a standby; otherwise it queues the
// step-down. The node that stepped down waits manualStepDownSleepPeriod
// (10 s, vault/core.go) before contending again. HSM_TRANSIT_STEPDOWN_WAIT
// (default 25s) is the pause between the first and the second step-down.
func TestClusterRepeatedStepDown(t *testing.T) {
	t.Parallel()
	wait := 25 * time.Second
	if s := os.Getenv("HSM_TRANSIT_STEPDOWN_WAIT"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("HSM_TRANSIT_STEPDOWN_WAIT: %v", err)
		}
		wait = d
	}
	c := startCluster(t, clusterOptions{})
	client := c.client(t)
	if _, err := client.Logical().Write("transit/keys/sd", nil); err != nil {
		t.Fatal(err)
	}

	steps := []struct {
		how   string
		pause time.Duration // before this step-down
	}{
		{"cli", 0},
		{"cli", wait},
		// Soon after: 12 s, so that the node stepped down first has
		// waited out its 10 s and may be chosen.
		{"http", 12 * time.Second},
	}
	var path []string
	for i, s := range steps {
		time.Sleep(s.pause)
		old := c.leader(t)
		// c.leader and what the cluster says agree.
		if got := haStatusActive(t, c); got != old.addr {
			t.Fatalf("step-down %d: c.leader is %s (%s), sys/ha-status says %q is active", i+1, old.id, old.addr, got)
		}
		if i == 0 {
			path = append(path, old.id)
		}
		logSize := logLen(old)
		from := time.Now()
		var answer string
		switch s.how {
		case "cli":
			out, rc := cliStepDownOn(c, old)
			answer = fmt.Sprintf("CLI exit %d %q", rc, out)
			if rc != 0 {
				t.Fatalf("step-down %d: vault operator step-down on %s: %s", i+1, old.id, answer)
			}
		case "http":
			code, body := httpStepDownOn(c, old)
			answer = fmt.Sprintf("HTTP %d %q", code, body)
			if code != http.StatusNoContent {
				t.Fatalf("step-down %d: PUT sys/step-down on %s: %s", i+1, old.id, answer)
			}
		}
		n, took, err := c.pollLeader(old, 30*time.Second)
		since := logSince(old, logSize)
		if err != nil {
			active, why := old.isActive()
			t.Fatalf("step-down %d (%s) of %s: no other node active after 30 s (%v); %s still active: %v (%s); its log since:\n%s",
				i+1, s.how, old.id, err, old.id, active, why, since)
		}
		if !strings.Contains(since, "core: stepping down from active operation to standby") {
			t.Errorf("step-down %d of %s: it did not log stepping down; its log since:\n%s", i+1, old.id, since)
		}
		if strings.Contains(since, "manual step-down operation already queued") {
			t.Errorf("step-down %d of %s: a step-down was left queued; its log since:\n%s", i+1, old.id, since)
		}
		t.Logf("step-down %d (%s): %s -> %s in %v (%s, at %.1fs)", i+1, s.how, old.id, n.id, took.Round(time.Millisecond),
			answer, time.Since(from).Seconds())
		path = append(path, n.id)
	}
	// The mount answers through the last active node.
	if _, err := client.Logical().Write("transit/encrypt/sd", map[string]interface{}{"plaintext": b64("x")}); err != nil {
		t.Fatalf("after the step-downs: %v", err)
	}
	for _, n := range c.nodes {
		if st := n.logLines("core: entering standby mode"); len(st) != 1 {
			t.Errorf("%s entered standby mode %d times:\n%s", n.id, len(st), strings.Join(st, "\n"))
		}
	}
	t.Logf("leadership: %s", strings.Join(path, " -> "))
}

// haStatusActive is the API address of the node sys/ha-status calls
// active, as the first node that answers it says.
func haStatusActive(t *testing.T, c *cluster) string {
	t.Helper()
	var last string
	for _, n := range c.liveNodes() {
		req, _ := http.NewRequest(http.MethodGet, n.addr+"/v1/sys/ha-status", nil)
		req.Header.Set("X-Vault-Token", c.rootToken)
		hc := http.Client{Timeout: 10 * time.Second}
		resp, err := hc.Do(req)
		if err != nil {
			last = err.Error()
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var st struct {
			Nodes []struct {
				APIAddress string `json:"api_address"`
				Active     bool   `json:"active_node"`
			} `json:"nodes"`
		}
		if resp.StatusCode != 200 || json.Unmarshal(b, &st) != nil {
			last = fmt.Sprintf("%d %s", resp.StatusCode, oneLine(string(b), 200))
			continue
		}
		for _, x := range st.Nodes {
			if x.Active {
				return x.APIAddress
			}
		}
		return ""
	}
	t.Fatalf("sys/ha-status: no node answered (%s)", last)
	return ""
}

// cliStepDownOn runs `vault operator step-down` against n, returning its
// output and exit code.
func cliStepDownOn(c *cluster, n *clusterNode) (string, int) {
	cmd := exec.Command(vaultBin, "operator", "step-down")
	cmd.Env = append(os.Environ(), "VAULT_ADDR="+n.addr, "VAULT_TOKEN="+c.rootToken, "VAULT_FORMAT=")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	rc := 0
	if err := cmd.Run(); err != nil {
		rc = -1
		if ee, ok := err.(*exec.ExitError); ok {
			rc = ee.ExitCode()
		}
	}
	return strings.TrimSpace(out.String()), rc
}

// httpStepDownOn PUTs sys/step-down on n.
func httpStepDownOn(c *cluster, n *clusterNode) (int, string) {
	req, _ := http.NewRequest(http.MethodPut, n.addr+"/v1/sys/step-down", nil)
	req.Header.Set("X-Vault-Token", c.rootToken)
	hc := http.Client{Timeout: 30 * time.Second}
	resp, err := hc.Do(req)
	if err != nil {
		return -1, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, oneLine(string(b), 300)
}

// logLen is the length of the node's log so far.
func logLen(n *clusterNode) int64 {
	st, err := os.Stat(filepath.Join(n.dir, "vault.log"))
	if err != nil {
		return 0
	}
	return st.Size()
}

// logSince is the node's log from offset on.
func logSince(n *clusterNode, offset int64) string {
	b, _ := os.ReadFile(filepath.Join(n.dir, "vault.log"))
	if offset > int64(len(b)) {
		offset = int64(len(b))
	}
	return string(b[offset:])
}
