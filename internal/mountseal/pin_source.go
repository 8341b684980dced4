package mountseal

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Where a PIN may come from. config/seal's writer names the source; the
// operator, at registration, says which sources exist at all, as for
// libraries: the API is never a way to read arbitrary files or variables of
// the plugin process (the system's password hashes, the process's own
// environment under procfs, PATH) and try them on the token.
const (
	// PINEnvAllowEnv lists the environment variables env:// may name,
	// separated by colons; defaultPINEnv when unset.
	PINEnvAllowEnv = "HSM_TRANSIT_PIN_ENV"
	// PINFilesAllowEnv lists the files (or directories whose files) file://
	// may name, separated by colons; none when unset.
	PINFilesAllowEnv = "HSM_TRANSIT_PIN_FILES"
	defaultPINEnv    = "HSM_PIN"
	// maxPINFileSize bounds a PIN file: a PIN is a few dozen bytes, and an
	// endless device must not be read without limit.
	maxPINFileSize = 256
)

// errPINSourceRefused is the one answer for a PIN source that is not
// allowed, does not exist or cannot be read, so that config/seal tells its
// writer nothing about the plugin's files or environment.
func errPINSourceRefused(ref string) error {
	switch {
	case strings.HasPrefix(ref, "env://"):
		return fmt.Errorf("the PIN source %s is not allowed or not set: the operator allows environment variables with vault plugin register -env %s=NAME (default %s) and sets them with -env NAME=<pin>",
			ref, PINEnvAllowEnv, defaultPINEnv)
	default:
		return fmt.Errorf("the PIN source %s is not allowed or cannot be read: the operator allows PIN files with vault plugin register -env %s=/path/to/pin (a regular file of at most %d bytes)",
			ref, PINFilesAllowEnv, maxPINFileSize)
	}
}

// allowedList splits a colon-separated allowlist from the environment.
func allowedList(env, fallback string) []string {
	v := os.Getenv(env)
	if v == "" {
		v = fallback
	}
	var out []string
	for _, p := range strings.Split(v, ":") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// resolvePIN returns the PIN a configuration names: the value itself,
// env://NAME or file:///path, the latter two only as the operator allows.
func resolvePIN(ref string) (string, error) {
	switch {
	case strings.HasPrefix(ref, "env://"):
		return pinFromEnv(ref)
	case strings.HasPrefix(ref, "file://"):
		return pinFromFile(ref)
	}
	return ref, nil
}

func pinFromEnv(ref string) (string, error) {
	name := strings.TrimPrefix(ref, "env://")
	for _, allowed := range allowedList(PINEnvAllowEnv, defaultPINEnv) {
		if name == allowed {
			if pin := os.Getenv(name); pin != "" {
				return pin, nil
			}
			break
		}
	}
	return "", errPINSourceRefused(ref)
}

func pinFromFile(ref string) (string, error) {
	path := strings.TrimPrefix(ref, "file://")
	real, err := allowedPINFile(path)
	if err != nil {
		return "", errPINSourceRefused(ref)
	}
	pin, err := readPINFile(real)
	if err != nil {
		return "", errPINSourceRefused(ref)
	}
	return pin, nil
}

// allowedPINFile resolves path and returns it when it is an allowed file or
// a file directly in an allowed directory. Both sides are resolved, so that
// no spelling or link reaches another file.
func allowedPINFile(path string) (string, error) {
	if !filepath.IsAbs(path) {
		return "", errors.New("not absolute")
	}
	real, err := filepath.EvalSymlinks(filepath.Clean(path))
	if err != nil {
		return "", err
	}
	for _, a := range allowedList(PINFilesAllowEnv, "") {
		if !filepath.IsAbs(a) {
			continue
		}
		ra, err := filepath.EvalSymlinks(filepath.Clean(a))
		if err != nil {
			continue
		}
		if real == ra {
			return real, nil
		}
		if fi, err := os.Stat(ra); err == nil && fi.IsDir() && filepath.Dir(real) == ra {
			return real, nil
		}
	}
	return "", errors.New("not allowed")
}

// readPINFile reads a regular file of at most maxPINFileSize bytes.
func readPINFile(path string) (string, error) {
	// O_NONBLOCK: opening a FIFO must not wait for a writer; it is then
	// refused as not a regular file.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", err
	}
	if !fi.Mode().IsRegular() || fi.Size() > maxPINFileSize {
		return "", errors.New("not a regular file of PIN size")
	}
	b, err := io.ReadAll(io.LimitReader(f, maxPINFileSize+1))
	if err != nil {
		return "", err
	}
	if len(b) > maxPINFileSize {
		return "", errors.New("too large")
	}
	pin := strings.TrimRight(string(b), "\r\n")
	if pin == "" {
		return "", errors.New("empty")
	}
	return pin, nil
}
