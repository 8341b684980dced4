package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's CPU times; it is 100
// on every Linux architecture Go supports.
const clockTicks = 100

// cpuSplit is the CPU time a load used, by process: Vault itself, the plugin
// processes Vault started (all of them), and this tool (the clients).
type cpuSplit struct {
	vault, plugins, client time.Duration
}

func (a cpuSplit) total() time.Duration { return a.vault + a.plugins + a.client }

func (a cpuSplit) sub(b cpuSplit) cpuSplit {
	return cpuSplit{a.vault - b.vault, a.plugins - b.plugins, a.client - b.client}
}

func (a cpuSplit) add(b cpuSplit) cpuSplit {
	return cpuSplit{a.vault + b.vault, a.plugins + b.plugins, a.client + b.client}
}

// procStat reads a process's parent and its user+system CPU time.
func procStat(pid string) (ppid int, cpu time.Duration, ok bool) {
	b, err := os.ReadFile(filepath.Join("/proc", pid, "stat"))
	if err != nil {
		return 0, 0, false
	}
	// The command name is in parentheses and may hold spaces: fields
	// start after the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, false
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
	if len(f) < 13 {
		return 0, 0, false
	}
	ppid, _ = strconv.Atoi(f[1])
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return ppid, time.Duration(ut+st) * time.Second / clockTicks, true
}

// cpuNow samples the CPU time used so far by Vault (pid), its children, and
// this process. Plugin processes live as long as the run, so differences of
// two samples are the CPU a load used.
func cpuNow(vaultPid int) cpuSplit {
	var s cpuSplit
	_, s.vault, _ = procStat(strconv.Itoa(vaultPid))
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		if ppid, cpu, ok := procStat(e.Name()); ok && ppid == vaultPid {
			s.plugins += cpu
		}
	}
	s.client = selfCPU()
	return s
}

// selfCPU is the CPU time this process has used.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
