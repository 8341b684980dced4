package p11env

import (
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// recordingTB records whether unavailable skipped or failed; both end the
// call, as the real ones end the test's goroutine.
type recordingTB struct {
	testing.TB
	outcome, msg string
}

type stopped struct{}

func (r *recordingTB) Helper() {}
func (r *recordingTB) Fatalf(format string, args ...any) {
	r.outcome, r.msg = "fatal", format
	panic(stopped{})
}
func (r *recordingTB) Skipf(format string, args ...any) {
	r.outcome, r.msg = "skip", format
	panic(stopped{})
}

func runUnavailable(env string) (outcome string) {
	r := &recordingTB{}
	func() {
		defer func() {
			if v := recover(); v != nil {
				if _, ok := v.(stopped); !ok {
					panic(v)
				}
			}
		}()
		unavailable(r, env, "thing is not installed")
	}()
	return r.outcome
}

func TestUnavailableSkipsUnlessRequired(t *testing.T) {
	for _, env := range []string{RequireOpenCryptokiEnv, RequireP11KitEnv} {
		t.Setenv(env, "")
		if got := runUnavailable(env); got != "skip" {
			t.Errorf("%s unset: %s, want skip", env, got)
		}
		t.Setenv(env, "1")
		if got := runUnavailable(env); got != "fatal" {
			t.Errorf("%s set: %s, want fatal", env, got)
		}
	}
}

// TestLockFileExcludes: a second holder waits until the first closes.
func TestLockFileExcludes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	first, err := lockFile(path)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		second, err := lockFile(path)
		if err == nil {
			second.Close()
		}
		got <- err
	}()
	select {
	case <-got:
		t.Fatal("second lockFile returned while the first held the lock")
	case <-time.After(200 * time.Millisecond):
	}
	first.Close()
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("second lockFile still waiting after the first closed")
	}
}

func TestOCKSoftSlotParsesPackageConfig(t *testing.T) {
	slot, err := ockSoftSlot(ockConfig)
	if err != nil {
		if strings.Contains(err.Error(), "no such file") {
			t.Skip("openCryptoki is not installed")
		}
		t.Fatal(err)
	}
	if slot != 3 {
		t.Errorf("soft token slot %d, want 3 (Debian's opencryptoki.conf)", slot)
	}
}
