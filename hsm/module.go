package hsm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/miekg/pkcs11"
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

// AllowedLibraries returns the libraries this process may load.
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

// CheckLibrary refuses a library that is not on the allowlist. Paths are
// compared exactly after cleaning, so that no relative path or symlink trick
// turns the API into a way to load other code.
func CheckLibrary(path string) error {
	if path == "" {
		return newError(Configuration, "load library", errors.New("library is required"))
	}
	if !filepath.IsAbs(path) {
		return newError(Configuration, "load library", fmt.Errorf("library %q must be an absolute path", path))
	}
	clean := filepath.Clean(path)
	for _, allowed := range AllowedLibraries() {
		if clean == allowed {
			return nil
		}
	}
	return newError(Configuration, "load library", fmt.Errorf(
		"library %q is not allowed; the operator allows libraries when registering the plugin with -env %s=/path/one.so:/path/two.so (allowed now: %s)",
		path, LibrariesEnv, strings.Join(AllowedLibraries(), ":")))
}

// module is one PKCS#11 library loaded in this process. C_Initialize is
// called once and shared by every token and mount; the module is initialised
// again only when a token vanished, so that its slots are listed anew.
type module struct {
	path string

	mu          sync.Mutex
	ctx         *pkcs11.Ctx
	initialized bool
	// generation counts initialisations; handles and sessions from an
	// older generation are void.
	generation uint64
	refs       int
}

var modules = struct {
	sync.Mutex
	byPath map[string]*module
}{byPath: map[string]*module{}}

// acquireModule returns the process's module for path, counting a reference.
func acquireModule(path string) *module {
	modules.Lock()
	defer modules.Unlock()
	m, ok := modules.byPath[path]
	if !ok {
		m = &module{path: path}
		modules.byPath[path] = m
	}
	m.refs++
	return m
}

// release drops a reference; the last one finalises and unloads the library.
func (m *module) release() {
	modules.Lock()
	defer modules.Unlock()
	m.refs--
	if m.refs > 0 {
		return
	}
	delete(modules.byPath, m.path)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ctx != nil {
		if m.initialized {
			_ = m.ctx.Finalize()
		}
		m.ctx.Destroy()
		m.ctx = nil
		m.initialized = false
	}
}

// ensure loads and initialises the library if needed, and returns it with
// its generation.
func (m *module) ensure() (*pkcs11.Ctx, uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ctx == nil {
		ctx := pkcs11.New(m.path)
		if ctx == nil {
			return nil, 0, newError(Unavailable, "load library", fmt.Errorf("cannot load PKCS#11 library %s", m.path))
		}
		m.ctx = ctx
	}
	if !m.initialized {
		err := m.ctx.Initialize()
		var rv pkcs11.Error
		if err != nil && !(errors.As(err, &rv) && rv == pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
			return nil, 0, newError(Unavailable, "initialize", err)
		}
		m.initialized = true
		m.generation++
	}
	return m.ctx, m.generation, nil
}

// reset finalises the module so that the next ensure initialises it again,
// unless another caller already did since generation gen.
func (m *module) reset(gen uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.generation != gen || !m.initialized {
		return
	}
	_ = m.ctx.Finalize()
	m.initialized = false
}
