package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// measureMemory creates and uses many keys on the plugin, with a bounded
// key cache and then an unbounded one, sampling the plugin process's
// resident memory.
func measureMemory(o options, v *vault) (string, error) {
	var sb strings.Builder
	fmt.Fprintf(&sb, "Memory: %d keys created and used (one encrypt each, 8 workers); the plugin's resident set (VmRSS):\n\n", o.memoryKeys)
	fmt.Fprintln(&sb, "| keys so far | cache-config size "+strconv.Itoa(o.memoryCache)+" | cache-config size 0 (unbounded) |")
	fmt.Fprintln(&sb, "| ---: | ---: | ---: |")
	var columns [2][]string
	var marks []int
	for run, size := range []int{o.memoryCache, 0} {
		mount := fmt.Sprintf("mem%d", run)
		lib, err := softhsm.FindLibrary()
		if err != nil {
			return "", err
		}
		for _, r := range []struct {
			path string
			body map[string]interface{}
		}{
			{"sys/mounts/" + mount, map[string]interface{}{"type": "hsm-transit"}},
			{mount + "/config/seal", map[string]interface{}{
				"library": lib, "token_label": "bench", "pin": "1234", "key_label": "bench-kek",
			}},
			{mount + "/cache-config", map[string]interface{}{"size": size}},
		} {
			if _, err := v.Call("POST", r.path, r.body); err != nil {
				return "", err
			}
		}
		step := o.memoryKeys / 5
		var next atomic.Int64
		var wg sync.WaitGroup
		var firstErr atomic.Value
		marks = marks[:0]
		for mark := step; mark <= o.memoryKeys; mark += step {
			for w := 0; w < 8; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						i := next.Add(1)
						if i > int64(mark) {
							return
						}
						_, err := v.Call("POST", fmt.Sprintf("%s/encrypt/key-%d", mount, i), map[string]interface{}{"plaintext": "aGVsbG8="})
						if err != nil {
							firstErr.Store(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			if err, ok := firstErr.Load().(error); ok {
				return "", err
			}
			rss, err := pluginRSS()
			if err != nil {
				return "", err
			}
			marks = append(marks, mark)
			columns[run] = append(columns[run], fmt.Sprintf("%.0f MiB", float64(rss)/1024))
			fmt.Fprintf(os.Stderr, "memory: cache size %d, %d keys: plugin RSS %d kB\n", size, mark, rss)
		}
		// Let the next run start from the same place: drop this mount.
		if _, err := v.Call("DELETE", "sys/mounts/"+mount, nil); err != nil {
			return "", err
		}
		time.Sleep(2 * time.Second)
	}
	for i, mark := range marks {
		fmt.Fprintf(&sb, "| %d | %s | %s |\n", mark, columns[0][i], columns[1][i])
	}
	sb.WriteString("\n")
	return sb.String(), nil
}

// pluginRSS returns the resident set, in kB, of the hsm-transit plugin
// process (the multiplexed process serves every mount).
func pluginRSS() (int, error) {
	procs, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		return 0, err
	}
	for _, p := range procs {
		cmd, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		// The plugin runs as <plugin directory>/hsm-transit.
		if argv0 := strings.SplitN(string(cmd), "\x00", 2)[0]; filepath.Base(argv0) != "hsm-transit" {
			continue
		}
		status, err := os.ReadFile(filepath.Join(filepath.Dir(p), "status"))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(status), "\n") {
			if strings.HasPrefix(line, "VmRSS:") {
				return strconv.Atoi(strings.Fields(line)[1])
			}
		}
	}
	return 0, fmt.Errorf("no hsm-transit plugin process found")
}
