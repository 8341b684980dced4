// Package p11shim builds and drives a PKCS#11 module for tests that forwards
// every call to a real module (SoftHSM2) and, switched at run time, imitates
// what real HSMs do differently: a FIPS-mode HSM that chooses the AES-GCM IV
// itself, a token without AES-GCM, a frozen network HSM, a device error and
// the lost sessions after it. The module is shim.c, compiled with the C
// compiler when a test first asks for it.
//
// Use from another package's test:
//
//	shim := p11shim.New(t, softhsmLibrary) // sets P11SHIM_TARGET, P11SHIM_CONTROL
//	t.Setenv(hsm.LibrariesEnv, shim.Library) // the hsm package loads allowlisted libraries only
//	... load shim.Library as the PKCS#11 library ...
//	shim.Set(p11shim.FIPSIV)  // from now on
//	shim.Set()                // no faults
//
// New uses t.Setenv, so such tests cannot call t.Parallel. A child process (a
// Vault server) needs Env() in its environment, and the shim's path in its
// HSM_TRANSIT_PKCS11_LIBRARIES (colon-separated).
//
// The module reads P11SHIM_CONTROL when it is loaded (C_GetFunctionList) and
// in C_Initialize, and P11SHIM_TARGET once per load of the module: all uses
// of the shim in one process should forward to the same target.
package p11shim

import (
	_ "embed"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// Environment variables read by the module and by Build.
const (
	TargetEnv  = "P11SHIM_TARGET"  // path of the real module
	ControlEnv = "P11SHIM_CONTROL" // path of the control file
	// RequireEnv, when set, turns a missing C compiler into a test
	// failure instead of a skip.
	RequireEnv = "HSM_TRANSIT_REQUIRE_SHIM"
)

// Words of the control file.
const (
	// FIPSIV: C_EncryptInit(CKM_AES_GCM) ignores the caller's IV, uses
	// 12 random bytes and writes them into the caller's IV buffer.
	FIPSIV = "fips-iv"
	// FIPSIVStrict: as FIPSIV, and a non-zero caller IV is refused with
	// CKR_MECHANISM_PARAM_INVALID.
	FIPSIVStrict = "fips-iv-strict"
	// IVHidden: as FIPSIV, but the IV used is not written back: a broken
	// token, whose AES-GCM ciphertexts cannot be opened again.
	IVHidden = "iv-hidden"
	// IVRepeat: as FIPSIV, but always the same IV: a broken token.
	IVRepeat = "iv-repeat"
	// NoGCM: the token has no CKM_AES_GCM (not listed, CKR_MECHANISM_INVALID).
	NoGCM = "no-gcm"
	// Hang: every call but C_GetFunctionList blocks while the word is set.
	Hang = "hang"
	// DeviceError: every call but C_Initialize, C_Finalize, C_GetInfo and
	// C_GetFunctionList fails with CKR_DEVICE_ERROR. Once one has failed,
	// sessions opened before stay invalid (CKR_SESSION_HANDLE_INVALID) and
	// C_OpenSession fails with CKR_DEVICE_ERROR, after the word is removed
	// too, until C_Finalize and C_Initialize.
	DeviceError = "device-error"
	// KWP: the token lists CKM_AES_KEY_WRAP_KWP (PKCS#11 3.0's number
	// for RFC 5649), with the flags of CKM_AES_KEY_WRAP_PAD, and runs it
	// as that.
	KWP = "kwp"
	// KWPWrapOnly: as KWP, but its flags lack CKF_UNWRAP.
	KWPWrapOnly = "kwp-wrap-only"
	// OAEPParamInvalid: CKM_RSA_PKCS_OAEP with a hash other than SHA-1 is
	// refused with CKR_MECHANISM_PARAM_INVALID (SoftHSM2 2.6 answers
	// CKR_ARGUMENTS_BAD).
	OAEPParamInvalid = "oaep-param-invalid"
	// SigLenRange: C_Verify reports a wrong signature as
	// CKR_SIGNATURE_LEN_RANGE instead of CKR_SIGNATURE_INVALID.
	SigLenRange = "sig-len-range"
	// VerifyFailed: C_Verify fails with CKR_FUNCTION_FAILED.
	VerifyFailed = "verify-failed"
	// KeygenFull: C_GenerateKey and C_GenerateKeyPair fail with
	// CKR_DEVICE_MEMORY (no room for another key).
	KeygenFull = "keygen-full"
)

//go:embed shim.c
var source []byte

var (
	buildOnce sync.Once
	buildDir  string
	buildLib  string
	buildErr  error
)

// errNoCompiler marks a build that could not start for want of a compiler.
var errNoCompiler = errors.New("no C compiler")

// Build compiles the shim once per process and returns the path of the
// shared library. It skips the test when there is no C compiler (cc, or
// $CC), unless HSM_TRANSIT_REQUIRE_SHIM is set. The library is left in
// os.TempDir()/p11shim-<pid>; a TestMain may call RemoveBuild.
func Build(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() { buildLib, buildErr = build() })
	if buildErr != nil {
		if errors.Is(buildErr, errNoCompiler) && os.Getenv(RequireEnv) == "" {
			t.Skipf("p11shim: %v (set %s to fail instead)", buildErr, RequireEnv)
		}
		t.Fatalf("p11shim: %v", buildErr)
	}
	return buildLib
}

// RemoveBuild removes the directory Build compiled into, for a TestMain
// after m.Run.
func RemoveBuild() error {
	if buildDir == "" {
		return nil
	}
	return os.RemoveAll(buildDir)
}

func build() (string, error) {
	cc := os.Getenv("CC")
	if cc == "" {
		cc = "cc"
	}
	ccPath, err := exec.LookPath(cc)
	if err != nil {
		return "", fmt.Errorf("%w: %v", errNoCompiler, err)
	}
	inc, err := pkcs11Headers()
	if err != nil {
		return "", err
	}
	buildDir = filepath.Join(os.TempDir(), fmt.Sprintf("p11shim-%d", os.Getpid()))
	if err := os.MkdirAll(buildDir, 0o700); err != nil {
		return "", err
	}
	src := filepath.Join(buildDir, "shim.c")
	if err := os.WriteFile(src, source, 0o600); err != nil {
		return "", err
	}
	lib := filepath.Join(buildDir, "libp11shim.so")
	cmd := exec.Command(ccPath, "-std=c99", "-O1", "-Wall", "-Wextra", "-Werror",
		"-fPIC", "-shared", "-I", inc, "-o", lib, src, "-ldl", "-lpthread")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out)
	}
	return lib, nil
}

// pkcs11Headers returns the directory of github.com/miekg/pkcs11, which
// has pkcs11.h, pkcs11t.h and pkcs11f.h.
func pkcs11Headers() (string, error) {
	// go test puts $GOROOT/bin first in the test's PATH.
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/miekg/pkcs11").Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%v: %s", err, ee.Stderr)
		}
		return "", fmt.Errorf("go list -m github.com/miekg/pkcs11: %v", err)
	}
	dir := strings.TrimSpace(string(out))
	if _, err := os.Stat(filepath.Join(dir, "pkcs11.h")); err != nil {
		return "", fmt.Errorf("PKCS#11 headers of github.com/miekg/pkcs11: %v", err)
	}
	return dir, nil
}

// Shim is the built module, set up for one test to forward to Target.
type Shim struct {
	Library string // the shim's shared library, to load as the PKCS#11 module
	Control string // the control file
	Target  string // the real module

	t testing.TB
}

// New builds the shim and points it, for the rest of the test, at target
// and a fresh control file with no faults (t.Setenv of P11SHIM_TARGET and
// P11SHIM_CONTROL: the test cannot be parallel). Set the environment before
// the module is loaded: it is read by C_GetFunctionList and C_Initialize.
func New(t testing.TB, target string) *Shim {
	t.Helper()
	s := &Shim{
		Library: Build(t),
		Control: filepath.Join(t.TempDir(), "p11shim.control"),
		Target:  target,
		t:       t,
	}
	t.Setenv(TargetEnv, target)
	t.Setenv(ControlEnv, s.Control)
	return s
}

// Set replaces the fault words (none: no faults). The file is replaced
// atomically, so the module sees either the old words or the new ones. Call
// it from the test's goroutine (it fails the test on error).
func (s *Shim) Set(words ...string) {
	s.t.Helper()
	tmp, err := os.CreateTemp(filepath.Dir(s.Control), ".control-*")
	if err == nil {
		_, err = tmp.WriteString(strings.Join(words, " ") + "\n")
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			err = os.Rename(tmp.Name(), s.Control)
		}
		if err != nil {
			os.Remove(tmp.Name())
		}
	}
	if err != nil {
		s.t.Fatalf("p11shim: set %q: %v", words, err)
	}
}

// Env returns the environment assignments a child process (a Vault server)
// needs to use the shim; add Library to its HSM_TRANSIT_PKCS11_LIBRARIES.
func (s *Shim) Env() []string {
	return []string{TargetEnv + "=" + s.Target, ControlEnv + "=" + s.Control}
}
