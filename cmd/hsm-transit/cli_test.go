package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/envelope"
)

type result struct {
	code           int
	stdout, stderr string
}

// runCLI runs the command in process with the real Vault configuration
// (useFake points it at a fake transit).
func runCLI(t *testing.T, stdin []byte, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &env{
		stdin: bytes.NewReader(stdin), stdout: &out, stderr: &errb,
		keys: vaultKeyService, umask: 0o022,
	})
	return result{code, out.String(), errb.String()}
}

// noVault is a key service factory that fails the test if called.
func noVault(t *testing.T) func() (envelope.KeyService, error) {
	return func() (envelope.KeyService, error) {
		t.Error("the command asked for Vault")
		return nil, errors.New("no Vault here")
	}
}

func randBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return b
}

func writeFile(t *testing.T, dir, name string, b []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	require.NoError(t, os.WriteFile(p, b, 0o644))
	return p
}

// dirNames lists a directory, to show that no temporary file was left.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

func TestUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{nil, "usage: hsm-transit COMMAND"},
		{[]string{"bogus"}, `unknown command "bogus"`},
		{[]string{"encrypt"}, "-k MOUNT/KEY is required"},
		{[]string{"encrypt", "-k", "orders"}, `key reference "orders": want MOUNT/KEY`},
		{[]string{"encrypt", "-k", "transit/"}, "want MOUNT/KEY"},
		{[]string{"encrypt", "-k", "transit/a", "-context", "%%%"}, "-context is not base64"},
		{[]string{"encrypt", "-k", "transit/a", "in", "-o", "out"}, "flag -o after the file arguments"},
		{[]string{"encrypt", "-k", "transit/a", "a", "b"}, "at most one input file, got 2"},
		{[]string{"decrypt", "-x"}, "flag provided but not defined: -x"},
		{[]string{"rewrap"}, "rewrap needs at least one FILE"},
		{[]string{"inspect", "a", "b"}, "at most one input file"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run(context.Background(), tc.args, &env{stdin: strings.NewReader(""), stdout: &out, stderr: &errb, keys: noVault(t)})
			require.Equal(t, exitUsage, code, errb.String())
			require.Contains(t, errb.String(), tc.msg)
			require.Empty(t, out.String())
			if tc.args != nil {
				require.Equal(t, 1, strings.Count(errb.String(), "\n"), "one line: %q", errb.String())
			}
		})
	}
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"-h"}, {"help"}, {"encrypt", "-h"}, {"decrypt", "-h"}, {"rewrap", "-h"}, {"inspect", "-help"}} {
		var out, errb bytes.Buffer
		code := run(context.Background(), args, &env{stdin: strings.NewReader(""), stdout: &out, stderr: &errb, keys: noVault(t)})
		require.Equal(t, exitOK, code, args)
		require.Contains(t, out.String(), "usage: hsm-transit", args)
		require.Empty(t, errb.String())
	}
	var out bytes.Buffer
	run(context.Background(), []string{"-h"}, &env{stdout: &out, stderr: io.Discard})
	for _, code := range []string{"0  success", "1  usage", "2  Vault refused", "3  the input is not an authentic", "4  I/O", "5  rewrap"} {
		require.Contains(t, out.String(), code, "the usage documents the exit codes")
	}
}

// TestParseFlags: -k repeated and nested mounts reach the header, in order;
// "--" lets a file name start with a dash.
func TestParseFlags(t *testing.T) {
	f := newFakeTransit(t)
	useFake(t, f)
	dir := t.TempDir()
	writeFile(t, dir, "-odd", []byte("data"))
	t.Chdir(dir)
	r := runCLI(t, nil, "encrypt", "-k", "transit/orders", "-k", "/team/transit/backups/", "-o", "x.enc", "--", "-odd")
	require.Equal(t, exitOK, r.code, r.stderr)
	require.Equal(t, []string{"PUT /v1/transit/datakey/plaintext/orders", "PUT /v1/team/transit/encrypt/backups"}, f.calls())

	var h struct {
		Version     int `json:"format_version"`
		SegmentSize int `json:"segment_size"`
		Recipients  []struct {
			Mount, Key string
			Wrapped    string `json:"wrapped_key"`
			KeyVersion int    `json:"key_version"`
		}
	}
	var out bytes.Buffer
	code := run(context.Background(), []string{"inspect", "x.enc"}, &env{stdout: &out, stderr: io.Discard, keys: noVault(t)})
	require.Equal(t, exitOK, code)
	require.NoError(t, json.Unmarshal(out.Bytes(), &h))
	require.Equal(t, 1, h.Version)
	require.Equal(t, envelope.DefaultSegmentSize, h.SegmentSize)
	require.Len(t, h.Recipients, 2)
	require.Equal(t, "transit", h.Recipients[0].Mount)
	require.Equal(t, "orders", h.Recipients[0].Key)
	require.Equal(t, "team/transit", h.Recipients[1].Mount)
	require.Equal(t, "backups", h.Recipients[1].Key)
	require.True(t, strings.HasPrefix(h.Recipients[1].Wrapped, "vault:v1:"))
	require.Equal(t, 1, h.Recipients[1].KeyVersion)
}

// TestRoundTrip: files and pipes, one Vault request per encryption (one
// more per extra recipient) and one per decryption, the token sent, the
// output modes, and no temporary file left behind.
func TestRoundTrip(t *testing.T) {
	f := newFakeTransit(t)
	useFake(t, f)
	dir := t.TempDir()
	pt := randBytes(t, 3*envelope.DefaultSegmentSize+17)
	in := writeFile(t, dir, "data", pt)
	enc := filepath.Join(dir, "data.enc")
	dec := filepath.Join(dir, "data.out")

	r := runCLI(t, nil, "encrypt", "-k", "transit/orders", "-aad", "build 42", "-context", "dGVuYW50", "-o", enc, in)
	require.Equal(t, exitOK, r.code, r.stderr)
	require.Empty(t, r.stdout)
	require.Len(t, f.calls(), 1)
	fi, err := os.Stat(enc)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o644), fi.Mode().Perm(), "encrypt output follows the umask")

	f.reset()
	r = runCLI(t, nil, "decrypt", "-aad", "build 42", "-o", dec, enc)
	require.Equal(t, exitOK, r.code, r.stderr)
	require.Equal(t, []string{"PUT /v1/transit/decrypt/orders"}, f.calls())
	require.Equal(t, []string{fakeToken}, f.tokens)
	got, err := os.ReadFile(dec)
	require.NoError(t, err)
	require.Equal(t, pt, got)
	fi, err = os.Stat(dec)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "plaintext output is 0600")
	require.ElementsMatch(t, []string{"data", "data.enc", "data.out"}, dirNames(t, dir))

	// Pipes: stdin to stdout both ways, empty input included.
	for _, p := range [][]byte{pt, {}} {
		r = runCLI(t, p, "encrypt", "-k", "transit/orders")
		require.Equal(t, exitOK, r.code, r.stderr)
		r = runCLI(t, []byte(r.stdout), "decrypt", "-")
		require.Equal(t, exitOK, r.code, r.stderr)
		require.Equal(t, string(p), r.stdout)
	}

	// A wrong -aad: not authentic, and no output.
	r = runCLI(t, nil, "decrypt", "-aad", "build 43", "-o", filepath.Join(dir, "wrong"), enc)
	require.Equal(t, exitAuth, r.code)
	require.Contains(t, r.stderr, "header")
	require.NoFileExists(t, filepath.Join(dir, "wrong"))
}

// TestTamperedLeavesNoOutput: a modified or truncated file exits 3 naming
// the segment, creates no output (nor temporary file) and leaves an existing
// output untouched.
func TestTamperedLeavesNoOutput(t *testing.T) {
	f := newFakeTransit(t)
	useFake(t, f)
	pt := randBytes(t, 5*envelope.DefaultSegmentSize)
	r := runCLI(t, pt, "encrypt", "-k", "transit/orders")
	require.Equal(t, exitOK, r.code, r.stderr)
	file := []byte(r.stdout)
	h, err := envelope.ParseHeader(bytes.NewReader(file))
	require.NoError(t, err)
	seg := envelope.DefaultSegmentSize + 16

	flipped := bytes.Clone(file)
	flipped[h.HeaderLength+3*seg+100] ^= 1
	cases := map[string]struct {
		file []byte
		msg  string
	}{
		"bit flip in segment 3":  {flipped, "segment 3: authentication failed"},
		"truncated at a segment": {file[:h.HeaderLength+4*seg], "truncated after segment 3"},
		"truncated in a segment": {file[:len(file)-10], "segment 4"},
		"header only":            {file[:h.HeaderLength], "truncated"},
		"not an envelope":        {pt, "not an hsm-transit envelope"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			sub := t.TempDir()
			in := writeFile(t, sub, "in.enc", tc.file)
			out := filepath.Join(sub, "out")
			r := runCLI(t, nil, "decrypt", "-o", out, in)
			require.Equal(t, exitAuth, r.code, r.stderr)
			require.Contains(t, r.stderr, tc.msg)
			require.Equal(t, 1, strings.Count(r.stderr, "\n"))
			require.Equal(t, []string{"in.enc"}, dirNames(t, sub), "no output, no temporary file")

			require.NoError(t, os.WriteFile(out, []byte("previous"), 0o600))
			r = runCLI(t, nil, "decrypt", "-o", out, in)
			require.Equal(t, exitAuth, r.code)
			got, err := os.ReadFile(out)
			require.NoError(t, err)
			require.Equal(t, "previous", string(got), "an existing output is not replaced")
		})
	}
}

// TestVaultErrors: a refusal exits 2 with Vault's message on one line, and
// neither the plaintext nor a data key appears in it.
func TestVaultErrors(t *testing.T) {
	f := newFakeTransit(t)
	useFake(t, f)
	dir := t.TempDir()
	secret := "TOP-SECRET-PLAINTEXT"

	r := runCLI(t, []byte(secret), "encrypt", "-k", "transit/denied", "-o", filepath.Join(dir, "x.enc"))
	require.Equal(t, exitVault, r.code)
	require.Contains(t, r.stderr, "permission denied")
	require.Contains(t, r.stderr, "transit/datakey/plaintext/denied")
	require.Equal(t, 1, strings.Count(r.stderr, "\n"), r.stderr)
	require.NotContains(t, r.stderr, secret)
	require.Empty(t, dirNames(t, dir))

	// Decrypt with a token that Vault refuses.
	r = runCLI(t, []byte(secret), "encrypt", "-k", "transit/orders")
	require.Equal(t, exitOK, r.code, r.stderr)
	file := r.stdout
	t.Setenv("VAULT_TOKEN", "s.other")
	r = runCLI(t, []byte(file), "decrypt", "-o", filepath.Join(dir, "x"))
	require.Equal(t, exitVault, r.code)
	require.Contains(t, r.stderr, "permission denied")
	require.Empty(t, dirNames(t, dir))

	// A Vault that fails, and one that is not there.
	t.Setenv("VAULT_TOKEN", fakeToken)
	f.failAll = true
	r = runCLI(t, []byte(file), "decrypt")
	require.Equal(t, exitVault, r.code)
	require.Contains(t, r.stderr, "internal error")
	require.Empty(t, r.stdout)
	t.Setenv("VAULT_ADDR", "http://127.0.0.1:1")
	r = runCLI(t, []byte(file), "decrypt")
	require.Equal(t, exitVault, r.code)
	require.Contains(t, r.stderr, "connection refused")
}

// TestTokenFile: without VAULT_TOKEN the token comes from ~/.vault-token,
// as the vault CLI's token helper leaves it.
func TestTokenFile(t *testing.T) {
	f := newFakeTransit(t)
	useFake(t, f)
	t.Setenv("VAULT_TOKEN", "")
	require.NoError(t, os.WriteFile(filepath.Join(os.Getenv("HOME"), ".vault-token"), []byte(fakeToken+"\n"), 0o600))
	r := runCLI(t, []byte("x"), "encrypt", "-k", "transit/orders")
	require.Equal(t, exitOK, r.code, r.stderr)
	require.Equal(t, []string{fakeToken}, f.tokens)
}

// TestInspectNeedsNoVault: inspect prints the header with no Vault
// configured at all.
func TestInspectNeedsNoVault(t *testing.T) {
	f := newFakeTransit(t)
	useFake(t, f)
	r := runCLI(t, []byte("x"), "encrypt", "-k", "transit/orders", "-k", "other/backup")
	require.Equal(t, exitOK, r.code, r.stderr)
	var out bytes.Buffer
	code := run(context.Background(), []string{"inspect"}, &env{stdin: strings.NewReader(r.stdout), stdout: &out, stderr: io.Discard, keys: noVault(t)})
	require.Equal(t, exitOK, code)
	var h map[string]any
	require.NoError(t, json.Unmarshal(out.Bytes(), &h))
	recips := h["recipients"].([]any)
	require.Len(t, recips, 2)
	require.Equal(t, "backup", recips[1].(map[string]any)["key"])
	require.EqualValues(t, 1, h["format_version"])
}

// TestRewrap: rewrap moves the wrapped keys to the latest version in place
// (same size, body untouched, no backup left), reports each file, goes on
// past a bad file and exits with the first failure's code.
func TestRewrap(t *testing.T) {
	f := newFakeTransit(t)
	useFake(t, f)
	dir := t.TempDir()
	pt := randBytes(t, 2*envelope.DefaultSegmentSize+1)
	a := filepath.Join(dir, "a.enc")
	require.Equal(t, exitOK, runCLI(t, pt, "encrypt", "-k", "transit/orders", "-k", "backup/orders", "-o", a).code)
	bad := writeFile(t, dir, "bad.enc", []byte("not an envelope at all, no"))

	// Transit's rewrap re-encrypts even at the same version (a new nonce),
	// so the header is rewritten; the versions stay.
	r := runCLI(t, nil, "rewrap", a)
	require.Equal(t, exitOK, r.code, r.stderr)
	require.Equal(t, a+": rewrapped (transit/orders v1, backup/orders v1 -> transit/orders v1, backup/orders v1)\n", r.stdout)
	before, err := os.ReadFile(a)
	require.NoError(t, err)

	f.rotate("transit/orders")
	f.rotate("transit/orders")
	f.reset()
	r = runCLI(t, nil, "rewrap", bad, a)
	require.Equal(t, exitAuth, r.code, "the first failure's code")
	require.Contains(t, r.stderr, "bad.enc: envelope: header: not an hsm-transit envelope")
	require.Equal(t, a+": rewrapped (transit/orders v1, backup/orders v1 -> transit/orders v3, backup/orders v1)\n", r.stdout)
	require.Equal(t, []string{"PUT /v1/transit/rewrap/orders", "PUT /v1/backup/rewrap/orders"}, f.calls())
	after, err := os.ReadFile(a)
	require.NoError(t, err)
	require.Equal(t, len(before), len(after))
	h, err := envelope.ParseHeader(bytes.NewReader(before))
	require.NoError(t, err)
	require.Equal(t, before[h.HeaderLength:], after[h.HeaderLength:], "the body is not touched")
	require.ElementsMatch(t, []string{"a.enc", "bad.enc"}, dirNames(t, dir), "no header backup left")

	r = runCLI(t, nil, "decrypt", a)
	require.Equal(t, exitOK, r.code, r.stderr)
	require.Equal(t, string(pt), r.stdout)

	r = runCLI(t, nil, "rewrap", filepath.Join(dir, "missing.enc"))
	require.Equal(t, exitIO, r.code)
}

func TestExitCodes(t *testing.T) {
	re := &api.ResponseError{HTTPMethod: "PUT", URL: "http://v/v1/transit/decrypt/k", StatusCode: 403, Errors: []string{"1 error occurred:\n\t* permission denied\n\n"}}
	for _, tc := range []struct {
		err  error
		code int
	}{
		{nil, exitOK},
		{usagef("x"), exitUsage},
		{fmt.Errorf("envelope: %w", &vaultError{err: re}), exitVault},
		{fmt.Errorf("envelope: %w: %w", envelope.ErrUnwrap, errors.New("recipient 0")), exitVault},
		{fmt.Errorf("envelope: segment 3: %w", envelope.ErrAuth), exitAuth},
		{fmt.Errorf("envelope: header: %w", envelope.ErrFormat), exitAuth},
		{fmt.Errorf("envelope: %w", envelope.ErrTruncated), exitAuth},
		{fmt.Errorf("envelope: %w", envelope.ErrSlotFull), exitSlotFull},
		{fmt.Errorf("envelope: reading segment 1: %w", &ioError{op: "reading stdin", err: io.ErrClosedPipe}), exitIO},
		{fmt.Errorf("envelope: header: %w", &ioError{op: "reading in", err: errors.New("EIO")}), exitIO},
		{context.Canceled, exitSignal},
		{errors.New("anything else"), exitIO},
	} {
		require.Equal(t, tc.code, exitCode(tc.err), "%v", tc.err)
	}
	msg := (&vaultError{err: re}).Error()
	require.Equal(t, "Vault refused PUT http://v/v1/transit/decrypt/k (HTTP 403): permission denied", msg)
	require.Equal(t, "a; b c", oneLine("a\n\n\tb   c\n"))
}

func TestProgressOnlyOnTerminals(t *testing.T) {
	require.False(t, showProgress(false, 10<<30), "never in a pipe")
	require.False(t, showProgress(true, 1<<20), "not for small inputs")
	require.True(t, showProgress(true, 1<<30))
	require.True(t, showProgress(true, -1), "unknown size: drawn once large")
	require.False(t, isTerminal(&bytes.Buffer{}))
	require.Nil(t, startProgress(&bytes.Buffer{}, 1<<40))
	p := &progress{size: 1 << 30}
	require.Contains(t, p.line(512<<20, time.Second), " 50%  512.0 MiB / 1.0 GiB  512.0 MiB/s")
}

// TestIOErrorsAndInterrupt: an output that cannot be created and a missing
// input exit 4; an interrupted command exits 130 and leaves no file.
func TestIOErrorsAndInterrupt(t *testing.T) {
	f := newFakeTransit(t)
	useFake(t, f)
	dir := t.TempDir()
	r := runCLI(t, []byte("x"), "encrypt", "-k", "transit/orders", "-o", filepath.Join(dir, "no", "such", "dir", "x.enc"))
	require.Equal(t, exitIO, r.code, r.stderr)
	r = runCLI(t, nil, "decrypt", filepath.Join(dir, "missing.enc"))
	require.Equal(t, exitIO, r.code, r.stderr)
	require.Contains(t, r.stderr, "no such file")

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var out, errb bytes.Buffer
	code := run(ctx, []string{"encrypt", "-k", "transit/orders", "-o", filepath.Join(dir, "x.enc")}, &env{
		stdin: bytes.NewReader(randBytes(t, 1<<20)), stdout: &out, stderr: &errb, keys: vaultKeyService,
	})
	require.Equal(t, exitSignal, code, errb.String())
	require.Empty(t, dirNames(t, dir))
}
