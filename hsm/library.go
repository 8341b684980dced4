package hsm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// LibrariesEnv names the environment variable with the colon-separated
// PKCS#11 libraries the plugin may load. The operator sets it when
// registering the plugin (vault plugin register -env ...); the API can never
// widen it.
const LibrariesEnv = "HSM_TRANSIT_PKCS11_LIBRARIES"

// defaultLibraries are SoftHSM2's paths on Debian and Ubuntu, allowed when
// LibrariesEnv is not set.
var defaultLibraries = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
}

// AllowedLibraries returns the libraries this process may load, as the
// operator spelled them.
func AllowedLibraries() []string {
	env := os.Getenv(LibrariesEnv)
	if env == "" {
		return defaultLibraries
	}
	var out []string
	for _, p := range strings.Split(env, ":") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, filepath.Clean(p))
		}
	}
	return out
}

// CheckLibrary refuses a library that is not on the allowlist or not
// installed; see ResolveLibrary.
func CheckLibrary(path string) error {
	_, err := ResolveLibrary(path)
	return err
}

// ResolveLibrary returns the canonical path (symlinks resolved) of the
// library at path, if that is the file of an allowlisted library.
//
// Paths are compared by the files they resolve to, not by spelling: every
// spelling of an allowed library (through a symlink, "..", "//") loads the
// same allowed code, and the process must see it as one library, since the
// dynamic loader does (two spellings would otherwise be two modules over one
// C_Initialize and one login state). A symlink the caller made to an allowed
// library is therefore accepted too; it cannot load anything else. A path
// whose file is not an allowed one is refused with the same message whether
// or not it exists, so that the API does not probe the filesystem.
func ResolveLibrary(path string) (string, error) {
	const op = "load library"
	if path == "" {
		return "", newError(Configuration, op, errors.New("library is required"))
	}
	if !filepath.IsAbs(path) {
		return "", newError(Configuration, op, fmt.Errorf("library %q must be an absolute path", path))
	}
	if strings.HasSuffix(path, "/") {
		return "", newError(Configuration, op, fmt.Errorf("library %q names a directory; give the path of the library file", path))
	}
	clean := filepath.Clean(path)
	allowed := AllowedLibraries()
	real, err := canonicalFile(clean)
	if err == nil {
		for _, a := range allowed {
			if ra, err := canonicalFile(a); err == nil && ra == real {
				return real, nil
			}
		}
	}
	for _, a := range allowed {
		if clean == a {
			// The operator named this path: saying it is missing tells
			// nothing the allowlist does not.
			return "", newError(Configuration, op, fmt.Errorf(
				"the allowed library %s is not installed (or is not a regular file)", path))
		}
	}
	return "", newError(Configuration, op, fmt.Errorf(
		"library %q is not allowed or not present; the operator allows libraries when registering the plugin with -env %s=/path/one.so:/path/two.so (allowed now: %s)",
		path, LibrariesEnv, strings.Join(allowed, ":")))
}

// canonicalFile resolves path to the regular file it names.
func canonicalFile(path string) (string, error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return "", err
	}
	fi, err := os.Stat(real)
	if err != nil {
		return "", err
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("%s is not a regular file", real)
	}
	return real, nil
}

// fileID identifies a file whatever the path it is reached by: the dynamic
// loader shares one copy of a library between every path of one file.
type fileID struct{ dev, ino uint64 }

func identify(path string) (fileID, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileID{}, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fileID{}, fmt.Errorf("cannot identify %s on this platform", path)
	}
	return fileID{dev: uint64(st.Dev), ino: uint64(st.Ino)}, nil
}
