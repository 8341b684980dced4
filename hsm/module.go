package hsm

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// minRescanInterval spaces the finalisations that make a module list its
// slots anew. Anyone who can configure a mount can ask for one (by naming a
// token that is not there), and each one stops every mount of the library
// while it runs and makes them all log in again.
var minRescanInterval = time.Second

// maxRescanInterval caps the spacing of finalisations while the token stays
// away: the spacing doubles from minRescanInterval with each finalisation
// that no successful operation followed.
var maxRescanInterval = 4 * time.Second

// rescanClock is the clock of the spacing of finalisations (tests set it).
var rescanClock = time.Now

// module is one PKCS#11 library file in use in this process. C_Initialize is
// called once and shared by every token and mount; the module is initialised
// again only when a token vanished, so that its slots are listed anew.
type module struct {
	id   fileID
	path string
	refs int // guarded by modules

	// calls is held shared across every PKCS#11 call made with ctx, and
	// exclusively to load, initialise, finalise or unload the library: a
	// C_Finalize under another goroutine's C_Encrypt crashes the process.
	// A goroutine takes the shared side once per operation (module.enter),
	// never twice, and never while holding a Token's lock.
	calls       sync.RWMutex
	ctx         *pkcs11.Ctx
	initialized bool
	released    bool
	// generation counts initialisations; handles and sessions from an
	// older generation are void.
	generation uint64
	lastReset  time.Time
	// resetDelay is the spacing required before the next finalisation.
	resetDelay time.Duration
	// succeeded is set by every successful operation, and cleared by
	// reset: a finalisation that nothing succeeded after did not bring
	// the token back, and the next one waits longer.
	succeeded atomic.Bool

	// slotMu serialises C_OpenSession, C_CloseSession and C_Login with the
	// bookkeeping in slots, so that it follows the library's own state.
	slotMu sync.Mutex
	// slots is reset with each initialisation.
	slots map[uint]*slotState
}

// slotState mirrors the library's login state for a slot. PKCS#11 logs in
// per process and token, not per session: a second C_Login answers "already
// logged in" whatever PIN it carries, and the login lasts until the last
// session of the slot is closed, whichever Token opened it.
type slotState struct {
	sessions int
	loggedIn bool
	// pin is the SHA-256 of the PIN of the login, so that a later login
	// with another PIN is refused instead of joining it.
	pin [32]byte
}

var modules = struct {
	sync.Mutex
	byFile map[fileID]*module
}{byFile: map[fileID]*module{}}

// loaded holds every PKCS#11 library this process loaded, by file. A library
// is never unloaded: some cannot be loaded again in a process that unloaded
// them (openCryptoki 3.8 crashes in C_Initialize after a dlclose once
// SoftHSM2 was loaded), and PKCS#11 allows C_Initialize again after
// C_Finalize on the library as it is.
var loaded = struct {
	sync.Mutex
	byFile map[fileID]*pkcs11.Ctx
}{byFile: map[fileID]*pkcs11.Ctx{}}

// loadLibrary returns the loaded library of file id, loading it from path
// the first time; nil when it cannot be loaded.
func loadLibrary(id fileID, path string) *pkcs11.Ctx {
	loaded.Lock()
	defer loaded.Unlock()
	if ctx, ok := loaded.byFile[id]; ok {
		return ctx
	}
	ctx := pkcs11.New(path)
	if ctx != nil {
		loaded.byFile[id] = ctx
	}
	return ctx
}

// acquireModule returns the process's module for the library file at path
// (canonical, from ResolveLibrary), counting a reference.
func acquireModule(path string) (*module, error) {
	id, err := identify(path)
	if err != nil {
		return nil, newError(Unavailable, "load library", absent(fmt.Errorf("cannot load PKCS#11 library %s: %w", path, err)))
	}
	modules.Lock()
	defer modules.Unlock()
	m, ok := modules.byFile[id]
	if !ok {
		m = &module{id: id, path: path}
		modules.byFile[id] = m
	}
	m.refs++
	return m, nil
}

// release drops a reference; the last one finalises the library.
//
// Finalising waits for the calls in flight, which a hung token may hold for
// long: the process-wide lock of modules is not held meanwhile, so that
// opening other tokens goes on. The module stays in modules until it is
// finalised, and an Open meanwhile takes it back instead.
func (m *module) release() {
	modules.Lock()
	m.refs--
	last := m.refs == 0
	modules.Unlock()
	if !last {
		return
	}
	m.calls.Lock()
	defer m.calls.Unlock()
	modules.Lock()
	defer modules.Unlock()
	if m.refs > 0 || m.released {
		return // taken back meanwhile
	}
	delete(modules.byFile, m.id)
	m.released = true
	if m.ctx != nil {
		if m.initialized {
			_ = m.ctx.Finalize()
		}
		// The library stays loaded (see loadLibrary).
		m.ctx = nil
		m.initialized = false
		m.slots = nil
	}
}

// enter loads and initialises the library if needed and holds it
// initialised, for PKCS#11 calls, until leave. It returns the generation
// the calls belong to.
func (m *module) enter() (*pkcs11.Ctx, uint64, error) {
	for {
		m.calls.RLock()
		if m.initialized {
			return m.ctx, m.generation, nil
		}
		m.calls.RUnlock()
		if err := m.initialize(); err != nil {
			return nil, 0, err
		}
		// Initialised; a reset may come first, hence the loop.
	}
}

// enterIfReady is enter without initialising: ok is false (and nothing is
// held) when the module is not initialised.
func (m *module) enterIfReady() (ctx *pkcs11.Ctx, gen uint64, ok bool) {
	m.calls.RLock()
	if m.initialized {
		return m.ctx, m.generation, true
	}
	m.calls.RUnlock()
	return nil, 0, false
}

// leave ends what enter began.
func (m *module) leave() { m.calls.RUnlock() }

func (m *module) initialize() error {
	m.calls.Lock()
	defer m.calls.Unlock()
	if m.released {
		return newError(Unavailable, "load library", errors.New("the token was closed"))
	}
	if m.initialized {
		return nil
	}
	if m.ctx == nil {
		ctx := loadLibrary(m.id, m.path)
		if ctx == nil {
			return newError(Unavailable, "load library", absent(fmt.Errorf("cannot load PKCS#11 library %s", m.path)))
		}
		m.ctx = ctx
	}
	err := m.ctx.Initialize()
	var rv pkcs11.Error
	if err != nil && !(errors.As(err, &rv) && rv == pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		return newError(Unavailable, "initialize", err)
	}
	m.initialized = true
	m.generation++
	m.slots = map[uint]*slotState{}
	return nil
}

// reset finalises the module so that the next enter initialises it again,
// unless it was initialised again since generation gen or was finalised
// less than minRescanInterval ago. It reports whether the slots will be
// listed anew. The caller must not be between enter and leave: reset waits
// for every call in flight.
func (m *module) reset(gen uint64) bool {
	m.calls.Lock()
	defer m.calls.Unlock()
	if m.released {
		return false
	}
	if m.generation != gen || !m.initialized {
		return true // someone else did
	}
	now := rescanClock()
	if m.succeeded.Swap(false) {
		m.resetDelay = minRescanInterval
	}
	m.resetDelay = max(m.resetDelay, minRescanInterval)
	if now.Sub(m.lastReset) < m.resetDelay {
		return false
	}
	m.resetDelay = min(2*m.resetDelay, max(maxRescanInterval, minRescanInterval))
	_ = m.ctx.Finalize()
	m.initialized = false
	m.slots = nil
	m.lastReset = now
	return true
}

// slotLocked returns the state of slot; slotMu is held.
func (m *module) slotLocked(slot uint) *slotState {
	st, ok := m.slots[slot]
	if !ok {
		st = &slotState{}
		m.slots[slot] = st
	}
	return st
}

// openSession opens a read-write session on slot, between enter and leave.
func (m *module) openSession(ctx *pkcs11.Ctx, slot uint) (pkcs11.SessionHandle, error) {
	m.slotMu.Lock()
	defer m.slotMu.Unlock()
	s, err := ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return 0, err
	}
	m.slotLocked(slot).sessions++
	return s, nil
}

// closeSession closes a session openSession opened in the current
// generation, between enter and leave. Closing the slot's last session logs
// the process out of the token.
func (m *module) closeSession(ctx *pkcs11.Ctx, slot uint, s pkcs11.SessionHandle) {
	m.slotMu.Lock()
	defer m.slotMu.Unlock()
	// A session the library already voided is counted as closed too.
	_ = ctx.CloseSession(s)
	st := m.slotLocked(slot)
	if st.sessions--; st.sessions <= 0 {
		delete(m.slots, slot)
	}
}
