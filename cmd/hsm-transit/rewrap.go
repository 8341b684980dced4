package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/envelope"
)

// cmdRewrap rewraps each file in place and reports one line per file.
func cmdRewrap(ctx context.Context, args []string, e *env) error {
	fs := newFlagSet("rewrap", e)
	files, err := parse(fs, args, e)
	if err != nil {
		return err
	}
	if len(files) == 0 {
		return usagef("rewrap needs at least one FILE (see hsm-transit rewrap -h)")
	}
	ks, err := e.keys()
	if err != nil {
		return err
	}
	first := exitOK
	for _, name := range files {
		msg, err := rewrapFile(ctx, name, ks)
		if err != nil {
			code := exitCode(err)
			fmt.Fprintf(e.stderr, "hsm-transit: rewrap: %s: %s\n", name, oneLine(err.Error()))
			if first == exitOK {
				first = code
			}
			if code == exitSignal {
				break
			}
			continue
		}
		fmt.Fprintf(e.stdout, "%s: %s\n", name, msg)
	}
	if first != exitOK {
		return &reported{code: first}
	}
	return nil
}

// rewrapFile rewraps one file. The old header is saved beside the file and
// synced before the in-place write (docs/ENVELOPE.md, section 5: a torn
// header write loses the recipients it touched), written back if the write
// or its sync fails, and removed once the new header is on disk.
func rewrapFile(ctx context.Context, name string, ks envelope.KeyService) (string, error) {
	f, err := os.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		return "", &ioError{op: "open", err: err}
	}
	defer f.Close()
	before, err := envelope.ParseHeader(io.NewSectionReader(f, 0, 1<<30))
	if err != nil {
		return "", err
	}
	old := make([]byte, before.HeaderLength)
	if _, err := f.ReadAt(old, 0); err != nil {
		return "", &ioError{op: "reading the header", err: err}
	}
	backup, err := writeBackup(name, old)
	if err != nil {
		return "", &ioError{op: "rewrap", err: err}
	}
	// From here the backup goes only once the file holds a whole header.
	sf := &syncedFile{f: f}
	changed, err := envelope.Rewrap(ctx, sf, ks)
	if err == nil && changed {
		if serr := f.Sync(); serr != nil {
			err = &ioError{op: "sync", err: serr}
		}
	}
	if err != nil {
		if sf.wrote {
			if rerr := restore(f, old); rerr != nil {
				return "", fmt.Errorf("%w; restoring the old header failed too (%v): it is saved in %s", err, rerr, backup)
			}
		}
		os.Remove(backup)
		if sf.wrote && !errors.As(err, new(*ioError)) {
			err = &ioError{op: "rewrap", err: err}
		}
		return "", err
	}
	os.Remove(backup)
	if !changed {
		return "unchanged (" + versions(before) + ")", nil
	}
	after, err := envelope.ParseHeader(io.NewSectionReader(f, 0, 1<<30))
	if err != nil {
		return "", err
	}
	return "rewrapped (" + versions(before) + " -> " + versions(after) + ")", nil
}

// syncedFile records whether the header write was attempted.
type syncedFile struct {
	f     *os.File
	wrote bool
}

func (s *syncedFile) ReadAt(p []byte, off int64) (int, error) { return s.f.ReadAt(p, off) }

func (s *syncedFile) WriteAt(p []byte, off int64) (int, error) {
	s.wrote = true
	n, err := s.f.WriteAt(p, off)
	if err != nil {
		err = &ioError{op: "writing the header", err: err}
	}
	return n, err
}

func restore(f *os.File, old []byte) error {
	if _, err := f.WriteAt(old, 0); err != nil {
		return err
	}
	return f.Sync()
}

// versions lists each recipient as MOUNT/KEY vN.
func versions(h *envelope.Header) string {
	var s []string
	for _, r := range h.Recipients {
		s = append(s, fmt.Sprintf("%s/%s v%d", r.Mount, r.Key, r.KeyVersion()))
	}
	return strings.Join(s, ", ")
}
