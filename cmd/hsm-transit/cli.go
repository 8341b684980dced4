package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/envelope"
)

// Exit codes: part of the command's interface, documented in usage and in
// the README's "Large data" section.
const (
	exitOK       = 0 // success
	exitUsage    = 1 // bad command line: unknown command or flag, bad key reference
	exitVault    = 2 // Vault refused (e.g. permission denied, key not found) or was unreachable
	exitAuth     = 3 // the file is not an authentic envelope: modified, truncated, wrong -aad, not an envelope
	exitIO       = 4 // reading the input or writing the output failed
	exitSlotFull = 5 // rewrap: the new wrapped key does not fit its slot; re-encrypt the file
	exitSignal   = 130
)

const usageText = `usage: hsm-transit COMMAND [flags] [args]

Envelope encryption of large files with a Vault transit key (hsm-transit or
Vault's built-in transit): one Vault request per file, AES-256-GCM locally.
File format: docs/ENVELOPE.md.

commands:
  encrypt -k MOUNT/KEY [-k MOUNT2/KEY2 ...] [-context B64] [-aad STRING] [-o OUT] [IN]
  decrypt [-aad STRING] [-o OUT] [IN]
  rewrap FILE...
  inspect [IN]

IN absent or "-" is stdin; OUT absent is stdout. Flags come before the file
arguments (Go's flag convention; "--" ends the flags). "hsm-transit COMMAND -h"
describes a command.

Vault is configured as for the vault CLI: VAULT_ADDR, VAULT_CACERT,
VAULT_NAMESPACE, ... and the token from VAULT_TOKEN, else ~/.vault-token.

exit codes (each failure prints one line on stderr, "hsm-transit: ..."):
  0  success
  1  usage: unknown command or flag, bad key reference or -context
  2  Vault refused the request or is unreachable; the message carries Vault's
     error, e.g. "permission denied"
  3  the input is not an authentic envelope (modified, truncated, wrong -aad,
     not an envelope); the message names the header or the segment
  4  I/O error reading the input or writing the output
  5  rewrap: a new wrapped key does not fit its slot (re-encrypt the file)
  130 interrupted
`

var commandUsage = map[string]string{
	"encrypt": `usage: hsm-transit encrypt -k MOUNT/KEY [-k MOUNT2/KEY2 ...] [-context B64] [-aad STRING] [-o OUT] [IN]

Encrypts IN (default stdin) into an envelope file written to OUT (default
stdout). -k names a transit key as MOUNT/KEY, the last element being the key
("transit/orders", "team/transit/orders"); repeat it for more recipients, any
of whom can decrypt (one Vault request per recipient). With -o the file
appears only once complete: it is written to a temporary file beside OUT and
renamed after the last segment was written and synced. Without -o, stdout
must not be a terminal.

flags:
`,
	"decrypt": `usage: hsm-transit decrypt [-aad STRING] [-o OUT] [IN]

Decrypts the envelope file IN (default stdin) to OUT (default stdout), with
one Vault request (transit/decrypt of the data key). With -o, OUT (mode 0600)
appears only after every segment authenticated; on any failure it is not
created and an existing OUT is left untouched. To stdout, plaintext is
released segment by segment as each authenticates: on a non-zero exit,
discard what was written.

flags:
`,
	"rewrap": `usage: hsm-transit rewrap FILE...

Rewraps each file's data key under the latest version of its transit keys
(transit/rewrap, one request per recipient; needs rewrap rights only) and
writes the header in place: the body is not read, so the cost does not depend
on the file size. The old header is saved beside the file and synced before
the write, and removed once the new one is synced. Prints one line per file on
stdout; a failed file is reported on stderr and the others still processed;
the exit code is that of the first failure.
`,
	"inspect": `usage: hsm-transit inspect [IN]

Prints the header of the envelope file IN (default stdin) as JSON: format
version, segment size, the recipients' mounts, keys and wrapped data keys
(vault:vN:...). Needs no Vault and no token. Nothing printed is authenticated
until the file is decrypted.
`,
}

// env is what a run of the command sees of the world.
type env struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	// keys returns the key service (Vault); called only by commands that
	// need it, so inspect works without any Vault configuration.
	keys func() (envelope.KeyService, error)
	// umask applies to encrypt's output file.
	umask os.FileMode
}

// usageError is a command-line mistake (exit code 1).
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// run runs one command line and returns the exit code.
func run(ctx context.Context, args []string, e *env) int {
	if len(args) == 0 {
		fmt.Fprint(e.stderr, usageText)
		return exitUsage
	}
	cmd, rest := args[0], args[1:]
	var err error
	switch cmd {
	case "-h", "-help", "--help", "help":
		fmt.Fprint(e.stdout, usageText)
		return exitOK
	case "encrypt":
		err = cmdEncrypt(ctx, rest, e)
	case "decrypt":
		err = cmdDecrypt(ctx, rest, e)
	case "rewrap":
		err = cmdRewrap(ctx, rest, e)
	case "inspect":
		err = cmdInspect(rest, e)
	default:
		err = usagef("unknown command %q (want encrypt, decrypt, rewrap or inspect; see hsm-transit -h)", cmd)
		cmd = ""
	}
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	if err == nil {
		return exitOK
	}
	var re *reported
	if errors.As(err, &re) {
		return re.code
	}
	prefix := "hsm-transit: "
	if cmd != "" {
		prefix += cmd + ": "
	}
	fmt.Fprintln(e.stderr, prefix+oneLine(err.Error()))
	return exitCode(err)
}

// reported is an error already printed (rewrap prints one line per file),
// carrying the exit code.
type reported struct{ code int }

func (r *reported) Error() string { return fmt.Sprintf("exit %d", r.code) }

// exitCode maps an error to the documented exit codes. Our own I/O errors
// come first (a read that failed says nothing about the file), then the
// file's: a file whose tag fails after Vault unwrapped its key is not
// authentic, whatever else failed.
func exitCode(err error) int {
	var ue *usageError
	var ve *vaultError
	var ie *ioError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ue):
		return exitUsage
	case errors.As(err, &ie):
		return exitIO
	case errors.Is(err, context.Canceled):
		return exitSignal
	case errors.Is(err, envelope.ErrAuth), errors.Is(err, envelope.ErrFormat), errors.Is(err, envelope.ErrTruncated):
		return exitAuth
	case errors.Is(err, envelope.ErrSlotFull):
		return exitSlotFull
	case errors.Is(err, envelope.ErrUnwrap), errors.As(err, &ve):
		return exitVault
	default:
		return exitIO
	}
}

// oneLine folds a multi-line message (Vault's errors, errors.Join) into one
// line, so that scripts can rely on one line per failure.
func oneLine(s string) string {
	lines := strings.FieldsFunc(s, func(r rune) bool { return r == '\n' || r == '\r' })
	for i, l := range lines {
		lines[i] = strings.TrimPrefix(strings.Join(strings.Fields(l), " "), "* ")
	}
	out := lines[:0]
	for _, l := range lines {
		if l != "" && l != "*" {
			out = append(out, l)
		}
	}
	return strings.Join(out, "; ")
}

// newFlagSet returns a flag set that reports its errors to parse instead of
// printing them (flag calls Usage on every error; help is printed by parse).
func newFlagSet(name string, e *env) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	return fs
}

// printHelp prints a command's usage and flags to stdout (-h was asked for).
func printHelp(fs *flag.FlagSet, w io.Writer) {
	fmt.Fprint(w, commandUsage[fs.Name()])
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
}

// parse parses flags, which come before the file arguments (Go's
// convention). A later argument that looks like a flag is refused rather
// than taken for a file name, since it is almost always a misplaced flag;
// "--" makes every following argument a file name.
func parse(fs *flag.FlagSet, args []string, e *env) ([]string, error) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printHelp(fs, e.stdout)
			return nil, err
		}
		return nil, usagef("%v (see hsm-transit %s -h)", err, fs.Name())
	}
	pos := fs.Args()
	dashdash := len(args) > len(pos) && args[len(args)-len(pos)-1] == "--"
	if !dashdash && len(pos) > 1 {
		for _, a := range pos[1:] {
			if len(a) > 1 && a[0] == '-' {
				return nil, usagef("flag %s after the file arguments: flags come first (see hsm-transit %s -h)", a, fs.Name())
			}
		}
	}
	return pos, nil
}

// keyRefs is the repeatable -k flag.
type keyRefs []envelope.KeyRef

func (k *keyRefs) String() string {
	var s []string
	for _, r := range *k {
		s = append(s, r.String())
	}
	return strings.Join(s, ",")
}

func (k *keyRefs) Set(v string) error {
	r, err := envelope.ParseKeyRef(v)
	if err != nil {
		return errors.New(strings.TrimPrefix(err.Error(), "envelope: "))
	}
	*k = append(*k, r)
	return nil
}

// oneInput returns the single optional file argument.
func oneInput(fs *flag.FlagSet, pos []string) (string, error) {
	switch len(pos) {
	case 0:
		return "-", nil
	case 1:
		return pos[0], nil
	default:
		return "", usagef("%s takes at most one input file, got %d (see hsm-transit %s -h)", fs.Name(), len(pos), fs.Name())
	}
}

func cmdEncrypt(ctx context.Context, args []string, e *env) error {
	fs := newFlagSet("encrypt", e)
	var refs keyRefs
	fs.Var(&refs, "k", "transit key `MOUNT/KEY` (repeatable: one recipient each)")
	keyCtx := fs.String("context", "", "derivation context for derived keys, `base64`")
	aad := fs.String("aad", "", "associated data bound to the file; decrypt needs the same `string`")
	out := fs.String("o", "", "output `file` (default stdout)")
	pos, err := parse(fs, args, e)
	if err != nil {
		return err
	}
	in, err := oneInput(fs, pos)
	if err != nil {
		return err
	}
	if len(refs) == 0 {
		return usagef("-k MOUNT/KEY is required (see hsm-transit encrypt -h)")
	}
	if len(refs) > envelope.MaxRecipients {
		return usagef("at most %d recipients (-k), got %d", envelope.MaxRecipients, len(refs))
	}
	if (*out == "" || *out == "-") && isTerminal(e.stdout) {
		return usagef("refusing to write an encrypted file to a terminal: use -o OUT or redirect stdout")
	}
	var kc []byte
	if *keyCtx != "" {
		if kc, err = base64.StdEncoding.DecodeString(*keyCtx); err != nil {
			return usagef("-context is not base64")
		}
		if len(kc) > envelope.MaxContextLen {
			return usagef("-context longer than %d bytes", envelope.MaxContextLen)
		}
	}

	src, size, closeIn, err := openInput(in, e)
	if err != nil {
		return err
	}
	defer closeIn()
	ks, err := e.keys()
	if err != nil {
		return err
	}
	dst, err := createOutput(*out, e.stdout, 0o666&^e.umask)
	if err != nil {
		return err
	}
	defer dst.Abort()

	w, err := envelope.NewWriter(ctx, dst, envelope.WriterOptions{
		KeyService: ks, Recipients: refs, Context: kc, AAD: []byte(*aad),
	})
	if err != nil {
		return err
	}
	prog := startProgress(e.stderr, size)
	// Plaintext read straight into the envelope's segments.
	_, err = w.ReadFrom(&countingReader{src, prog})
	prog.stop()
	if err != nil {
		w.Close()
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	return dst.Commit()
}

func cmdDecrypt(ctx context.Context, args []string, e *env) error {
	fs := newFlagSet("decrypt", e)
	aad := fs.String("aad", "", "associated data given to encrypt")
	out := fs.String("o", "", "output `file` (default stdout), mode 0600")
	pos, err := parse(fs, args, e)
	if err != nil {
		return err
	}
	in, err := oneInput(fs, pos)
	if err != nil {
		return err
	}

	src, size, closeIn, err := openInput(in, e)
	if err != nil {
		return err
	}
	defer closeIn()
	ks, err := e.keys()
	if err != nil {
		return err
	}
	r, err := envelope.NewReader(ctx, src, envelope.ReaderOptions{KeyService: ks, AAD: []byte(*aad)})
	if err != nil {
		return err
	}
	defer r.Close()
	dst, err := createOutput(*out, e.stdout, 0o600)
	if err != nil {
		return err
	}
	defer dst.Abort()
	prog := startProgress(e.stderr, size)
	// Each segment written from its buffer once it authenticated; an
	// error names its side (the envelope's kinds, or the output's I/O).
	_, err = r.WriteTo(&countingWriter{dst, prog})
	prog.stop()
	if err != nil {
		return err
	}
	// Reaching io.EOF means the final segment authenticated.
	return dst.Commit()
}

func cmdInspect(args []string, e *env) error {
	fs := newFlagSet("inspect", e)
	pos, err := parse(fs, args, e)
	if err != nil {
		return err
	}
	in, err := oneInput(fs, pos)
	if err != nil {
		return err
	}
	src, _, closeIn, err := openInput(in, e)
	if err != nil {
		return err
	}
	defer closeIn()
	h, err := envelope.ParseHeader(src)
	if err != nil {
		return err
	}
	b, err := json.MarshalIndent(h, "", "  ")
	if err != nil {
		return err
	}
	if _, err := e.stdout.Write(append(b, '\n')); err != nil {
		return &ioError{op: "writing stdout", err: err}
	}
	return nil
}

// countingReader and countingWriter count for the progress bar.
type countingReader struct {
	r    io.Reader
	prog *progress
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.prog.add(n)
	return n, err
}

type countingWriter struct {
	w    io.Writer
	prog *progress
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.prog.add(n)
	return n, err
}
