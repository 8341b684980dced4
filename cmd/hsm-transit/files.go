package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
)

// ioError is a failure reading the input or writing the output (exit code 4).
type ioError struct {
	op  string
	err error
}

func (e *ioError) Error() string { return e.op + ": " + e.err.Error() }
func (e *ioError) Unwrap() error { return e.err }

// openInput opens IN ("-" is stdin) and returns its size when it is a
// regular file (for the progress bar), else -1.
func openInput(name string, e *env) (io.Reader, int64, func(), error) {
	if name == "-" {
		size := int64(-1)
		if f, ok := e.stdin.(*os.File); ok {
			if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() {
				size = fi.Size()
			}
		}
		return &readSide{r: e.stdin, name: "stdin"}, size, func() {}, nil
	}
	f, err := os.Open(name)
	if err != nil {
		return nil, 0, nil, &ioError{op: "input", err: err}
	}
	size := int64(-1)
	if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() {
		size = fi.Size()
	}
	return &readSide{r: f, name: name}, size, func() { f.Close() }, nil
}

// readSide tags read errors as I/O errors of the input.
type readSide struct {
	r    io.Reader
	name string
}

func (r *readSide) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF {
		err = &ioError{op: "reading " + r.name, err: err}
	}
	return n, err
}

// output is where a command writes: stdout, or a temporary file beside the
// target that Commit syncs and renames over it and Abort removes, so that no
// reader of the target ever sees a partial file.
type output struct {
	w      io.Writer
	f      *os.File // nil for stdout
	target string
	done   bool
}

// createOutput opens the output: stdout when name is "" or "-", else a
// temporary file in name's directory with the given mode.
func createOutput(name string, stdout io.Writer, mode os.FileMode) (*output, error) {
	if name == "" || name == "-" {
		return &output{w: stdout}, nil
	}
	dir, base := filepath.Split(name)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return nil, &ioError{op: "output", err: err}
	}
	// CreateTemp makes the file 0600; widen it only for a mode that asks.
	if err := f.Chmod(mode); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, &ioError{op: "output", err: err}
	}
	return &output{w: f, f: f, target: name}, nil
}

func (o *output) Write(p []byte) (int, error) {
	n, err := o.w.Write(p)
	if err != nil {
		where := "stdout"
		if o.f != nil {
			where = o.target
		}
		err = &ioError{op: "writing " + where, err: err}
	}
	return n, err
}

// Commit makes the output visible: sync, close and rename the temporary
// file, then sync the directory so that the rename survives a crash.
func (o *output) Commit() error {
	if o.f == nil {
		o.done = true
		return nil
	}
	if err := o.f.Sync(); err != nil {
		return &ioError{op: "sync " + o.target, err: err}
	}
	if err := o.f.Close(); err != nil {
		return &ioError{op: "close " + o.target, err: err}
	}
	if err := os.Rename(o.f.Name(), o.target); err != nil {
		return &ioError{op: "output", err: err}
	}
	o.done = true
	if err := syncDir(filepath.Dir(o.target)); err != nil {
		return &ioError{op: "sync directory of " + o.target, err: err}
	}
	return nil
}

// Abort removes the temporary file unless Commit succeeded.
func (o *output) Abort() {
	if o.f == nil || o.done {
		return
	}
	o.f.Close()
	os.Remove(o.f.Name())
}

// syncDir makes a rename or a new file in dir durable. Windows cannot sync
// a directory (and needs not: NTFS journals the rename).
func syncDir(dir string) error {
	if runtime.GOOS == "windows" {
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, os.ErrInvalid) {
		return err
	}
	return nil
}

// writeBackup saves a file's header in a new file beside it and syncs it
// (and the directory), for rewrap: if the in-place write is torn by a crash,
// the saved header can be written back (dd conv=notrunc).
func writeBackup(path string, hdr []byte) (string, error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".header-*")
	if err != nil {
		return "", err
	}
	name := f.Name()
	_, err = f.Write(hdr)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = syncDir(dir)
	}
	if err != nil {
		os.Remove(name)
		return "", fmt.Errorf("saving the old header: %w", err)
	}
	return name, nil
}
