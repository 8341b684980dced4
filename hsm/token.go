package hsm

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// DefaultMaxSessions bounds the sessions one token keeps open at once.
const DefaultMaxSessions = 16

// Config says which token to use and how to log in to it.
type Config struct {
	// Library is the absolute path of the PKCS#11 module; it must be on the
	// allowlist (AllowedLibraries).
	Library string
	// TokenLabel or Slot selects the token; exactly one is set.
	TokenLabel string
	Slot       *uint
	// PIN is the user PIN.
	PIN string
	// MaxSessions bounds concurrent sessions; DefaultMaxSessions if 0.
	MaxSessions int
	// CallTimeout bounds each operation, waiting for a session included:
	// a token that does not answer within it makes the operation fail as
	// Unavailable. DefaultCallTimeout if 0; key pair generation gets
	// slowOpFactor times as long.
	CallTimeout time.Duration
}

// DefaultCallTimeout is the deadline of an operation when the configuration
// gives none: long enough for a network HSM under load, short enough that a
// frozen one makes requests fail rather than hang.
const DefaultCallTimeout = 5 * time.Second

// slowOpFactor lengthens the deadline of operations that take seconds on
// some tokens by design (RSA key pair generation).
const slowOpFactor = 12

// validate checks what can be checked without loading anything, and
// returns the library's canonical path.
func (c Config) validate() (string, error) {
	lib, err := ResolveLibrary(c.Library)
	if err != nil {
		return "", err
	}
	if (c.TokenLabel == "") == (c.Slot == nil) {
		return "", newError(Configuration, "open token", errors.New("exactly one of token_label and slot is required"))
	}
	if c.Slot == nil {
		if err := CheckTokenLabel(c.TokenLabel); err != nil {
			return "", err
		}
	}
	if c.PIN == "" {
		return "", newError(Configuration, "open token", errors.New("a PIN is required"))
	}
	return lib, nil
}

func (c Config) tokenName() string {
	if c.Slot != nil {
		return "slot " + strconv.FormatUint(uint64(*c.Slot), 10)
	}
	return strconv.Quote(c.TokenLabel)
}

// tokenKey identifies a shared connection: the same library file, token and
// PIN.
type tokenKey struct {
	file  fileID
	token string
	pin   [32]byte
}

var tokens = struct {
	sync.Mutex
	byKey map[tokenKey]*connection
}{byKey: map[tokenKey]*connection{}}

// loginCalls counts C_Login calls in the process, for tests.
var loginCalls atomic.Int64

// Token is one user's handle on a PKCS#11 token. Handles with the same
// library, token and PIN share one connection: one login and a bounded pool
// of sessions, set up lazily and again after the token went away.
//
// A handle is admitted once: its first operation is a login attempt even
// when it joins a connection already logged in, and is refused while the
// token is over its bound of failed logins. Otherwise the shared login would
// tell a PIN guess that is right (it works at once) from the wrong ones (the
// bound refuses them) however many guesses were made.
type Token struct {
	conn     *connection
	timeout  time.Duration
	admitted atomic.Bool
	closed   atomic.Bool
}

// connection is the state shared by the handles of one tokenKey.
type connection struct {
	cfg  Config
	key  tokenKey
	mod  *module
	refs int // guarded by tokens

	// inUse bounds the sessions handed out at once.
	inUse chan struct{}
	// kwp is the key-wrap mechanism aes-kwp uses with this token, as
	// the token answered in module generation kwpGen (guarded by mu).
	kwp    uint
	kwpGen uint64
	// recentIVs are the last AES-GCM IVs the token used, to refuse one
	// used again: GCM under a repeated IV loses both confidentiality and
	// authenticity. recentIVOrder holds them as a ring once full, the
	// oldest at ivNext. ivMu guards the three (not mu: every encryption
	// takes it).
	ivMu          sync.Mutex
	recentIVs     map[[GCMNonceSize]byte]struct{}
	recentIVOrder [][GCMNonceSize]byte
	ivNext        int
	// tokenIV is set once the token refused a caller's AES-GCM IV: it
	// makes its own (FIPS mode), and is given a zeroed buffer to fill.
	tokenIV atomic.Bool

	mu sync.Mutex
	// gen is the module generation the connection below belongs to; 0
	// means not connected.
	gen          uint64
	slot         uint
	limit        loginKey
	loginSession pkcs11.SessionHandle
	idle         []pkcs11.SessionHandle
	handles      map[string]pkcs11.ObjectHandle
	// credErr is sticky: a refused PIN is never tried again, so that the
	// token does not lock itself.
	credErr error
	// verified is set once the token accepted the PIN: logging in again
	// (after the module was initialised again) is not a guess, and is not
	// held to the failed-login bound.
	verified bool
	closed   bool
	// logins counts C_Login calls, for tests of that promise.
	logins int
}

// Open returns a handle on the token cfg names. Nothing is loaded or logged
// in until the first operation. Close releases it.
func Open(cfg Config) (*Token, error) {
	lib, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	cfg.Library = lib
	if cfg.MaxSessions <= 0 {
		cfg.MaxSessions = DefaultMaxSessions
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = DefaultCallTimeout
	}
	tokens.Lock()
	defer tokens.Unlock()
	mod, err := acquireModule(lib)
	if err != nil {
		return nil, err
	}
	key := tokenKey{file: mod.id, token: cfg.tokenName(), pin: sha256.Sum256([]byte(cfg.PIN))}
	if c, ok := tokens.byKey[key]; ok {
		mod.release()
		c.refs++
		return &Token{conn: c, timeout: cfg.CallTimeout}, nil
	}
	c := &connection{
		cfg:   cfg,
		key:   key,
		mod:   mod,
		refs:  1,
		inUse: make(chan struct{}, cfg.MaxSessions),
	}
	tokens.byKey[key] = c
	return &Token{conn: c, timeout: cfg.CallTimeout}, nil
}

// Close releases the handle; the last handle of a connection closes its
// sessions, which logs it out unless another connection to the token keeps
// a session open. Closing twice is harmless.
func (t *Token) Close() {
	if !t.closed.CompareAndSwap(false, true) {
		return
	}
	c := t.conn
	tokens.Lock()
	c.refs--
	if c.refs > 0 {
		tokens.Unlock()
		return
	}
	delete(tokens.byKey, c.key)
	tokens.Unlock()
	// Closing sessions is a call to the token too: one that hangs must
	// not hold the caller (a plugin shutting down) past the deadline.
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.shutdown()
	}()
	select {
	case <-done:
	case <-time.After(t.timeout):
	}
}

// shutdown closes the connection's sessions and releases its module.
func (c *connection) shutdown() {
	if ctx, gen, ok := c.mod.enterIfReady(); ok {
		c.mu.Lock()
		c.dropLocked(ctx, gen)
		c.closed = true
		c.mu.Unlock()
		c.mod.leave()
	} else {
		c.mu.Lock()
		c.gen, c.idle, c.handles = 0, nil, nil
		c.closed = true
		c.mu.Unlock()
	}
	c.mod.release()
}

// Describe names the token for messages and status; it holds no secret.
func (t *Token) Describe() string { return t.conn.cfg.tokenName() }

// dropLocked forgets the connection, closing its sessions when they belong
// to gen, the current generation (the caller is between enter and leave).
// Sessions handed out now are closed when they come back.
func (c *connection) dropLocked(ctx *pkcs11.Ctx, gen uint64) {
	if c.gen == gen && gen != 0 {
		for _, s := range c.idle {
			c.mod.closeSession(ctx, c.slot, s)
		}
		c.mod.closeSession(ctx, c.slot, c.loginSession)
	}
	c.gen = 0
	c.idle = nil
	c.handles = nil
}

// connectLocked makes sure the token is found and logged in for generation
// gen. rescan says the module should list its slots anew.
func (c *connection) connectLocked(ctx *pkcs11.Ctx, gen uint64) (rescan bool, err error) {
	if c.closed {
		return false, newError(Unavailable, "open token", errors.New("the token was closed"))
	}
	if c.credErr != nil {
		return false, c.credErr
	}
	if c.gen == gen {
		return false, nil
	}
	// A new generation voids every session and handle of the old one.
	c.dropLocked(ctx, gen)

	slot, limit, err := c.findSlot(ctx)
	if err != nil {
		// The token may come back: have the module list slots anew.
		return KindOf(err) == Unavailable, err
	}
	s, err := c.mod.openSession(ctx, slot)
	if err != nil {
		return needsRescan(err), classify("open session", err)
	}
	if err := c.login(ctx, slot, limit, s); err != nil {
		c.mod.closeSession(ctx, slot, s)
		return needsRescan(err), err
	}
	c.gen, c.slot, c.limit, c.loginSession = gen, slot, limit, s
	c.handles = map[string]pkcs11.ObjectHandle{}
	return false, nil
}

// findSlot returns the slot of the configured token.
func (c *connection) findSlot(ctx *pkcs11.Ctx) (uint, loginKey, error) {
	if c.cfg.Slot != nil {
		slot := *c.cfg.Slot
		info, err := ctx.GetTokenInfo(slot)
		if err != nil {
			var rv pkcs11.Error
			if errors.As(err, &rv) && (rv == pkcs11.CKR_SLOT_ID_INVALID || rv == pkcs11.CKR_TOKEN_NOT_PRESENT ||
				rv == pkcs11.CKR_TOKEN_NOT_RECOGNIZED) {
				return 0, loginKey{}, newError(Unavailable, "find token", absent(fmt.Errorf("no token in slot %d: %w", slot, err)))
			}
			return 0, loginKey{}, newError(Unavailable, "find token", fmt.Errorf("reading the token in slot %d: %w", slot, err))
		}
		return slot, loginKey{file: c.mod.id, slot: slot, serial: info.SerialNumber}, nil
	}
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		return 0, loginKey{}, classify("list slots", err)
	}
	for _, slot := range slots {
		info, err := ctx.GetTokenInfo(slot)
		if err != nil {
			continue
		}
		if strings.TrimRight(info.Label, " \x00") == c.cfg.TokenLabel {
			return slot, loginKey{file: c.mod.id, slot: slot, serial: info.SerialNumber}, nil
		}
	}
	return 0, loginKey{}, newError(Unavailable, "find token", absent(fmt.Errorf(
		"no token labelled %q (is it plugged in, and SOFTHSM2_CONF set for SoftHSM2?)", c.cfg.TokenLabel)))
}

// login logs the user in on session s, or joins the process's login to the
// token when it was made with the same PIN. c.mu is held.
func (c *connection) login(ctx *pkcs11.Ctx, slot uint, limit loginKey, s pkcs11.SessionHandle) error {
	m := c.mod
	// Serialised with every session opened and closed in the module, so
	// that the slot's state is the library's, and with other logins, so
	// that the bound is checked and counted as one step.
	m.slotMu.Lock()
	defer m.slotMu.Unlock()
	if !c.verified {
		if err := checkLogin(limit, c.cfg.tokenName()); err != nil {
			return err
		}
	}
	st := m.slotLocked(slot)
	if st.loggedIn && st.pin != c.key.pin {
		// The token would answer "already logged in" to any PIN.
		failedLogin(limit)
		c.credErr = newError(Credentials, "login", fmt.Errorf(
			"token %s is logged in by this process with another PIN; this PIN is not tried", c.cfg.tokenName()))
		return c.credErr
	}
	c.logins++
	loginCalls.Add(1)
	err := ctx.Login(s, pkcs11.CKU_USER, c.cfg.PIN)
	var rv pkcs11.Error
	if err == nil {
		st.loggedIn, st.pin = true, c.key.pin
		c.verified = true
		return nil
	}
	if errors.As(err, &rv) && rv == pkcs11.CKR_USER_ALREADY_LOGGED_IN {
		if st.loggedIn {
			c.verified = true
			return nil // with this PIN: checked above
		}
		// Logged in by code of this process that does not go through
		// this package: no PIN can be checked against that login. Not
		// sticky: the login may end, and this costs the token nothing.
		return newError(Credentials, "login", fmt.Errorf(
			"token %s is logged in by this process with a PIN it cannot verify; refused", c.cfg.tokenName()))
	}
	if KindOf(classify("login", err)) == Credentials {
		failedLogin(limit)
		c.verified = false
		c.credErr = newError(Credentials, "login", fmt.Errorf("PIN refused by token %s (%v); it is not retried", c.cfg.tokenName(), err))
		return c.credErr
	}
	return classify("login", err)
}

// loginAttempts returns how many times C_Login was called.
func (c *connection) loginAttempts() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.logins
}

// lease is a session handed out for one operation.
type lease struct {
	s     pkcs11.SessionHandle
	slot  uint
	limit loginKey
}

// session hands out a logged-in session of generation gen; the caller is
// between enter and leave.
func (c *connection) session(ctx *pkcs11.Ctx, gen uint64) (lease, bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if rescan, err := c.connectLocked(ctx, gen); err != nil {
		return lease{}, rescan, err
	}
	l := lease{slot: c.slot, limit: c.limit}
	if n := len(c.idle); n > 0 {
		l.s = c.idle[n-1]
		c.idle = c.idle[:n-1]
		return l, false, nil
	}
	s, err := c.mod.openSession(ctx, c.slot)
	if err != nil {
		c.dropLocked(ctx, gen)
		return lease{}, needsRescan(err), classify("open session", err)
	}
	l.s = s
	return l, false, nil
}

// putSession returns a healthy session to the pool, or closes it when the
// connection was dropped meanwhile. The caller is between the enter and
// leave that gave gen.
func (c *connection) putSession(ctx *pkcs11.Ctx, gen uint64, l lease) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen == gen && !c.closed {
		c.idle = append(c.idle, l.s)
		return
	}
	c.mod.closeSession(ctx, l.slot, l.s)
}

// discard closes a session that outlived its operation's deadline. The
// caller is between enter and leave.
func (c *connection) discard(ctx *pkcs11.Ctx, l lease) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.mod.closeSession(ctx, l.slot, l.s)
}

// broken closes a session after a failure that voids the connection, and
// drops the connection.
func (c *connection) broken(ctx *pkcs11.Ctx, gen uint64, l lease) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.mod.closeSession(ctx, l.slot, l.s)
	if c.gen == gen {
		c.dropLocked(ctx, gen)
	}
}

// admit lets the handle's first operation through unless the token is over
// its bound of failed logins.
func (t *Token) admit(limit loginKey) error {
	if t.admitted.Load() {
		return nil
	}
	if err := checkLogin(limit, t.Describe()); err != nil {
		return err
	}
	t.admitted.Store(true)
	return nil
}

// do runs f on a pooled session within the token's deadline. A failure that
// voids the connection drops it; when retry is set, f runs once more on a
// fresh connection. A token not found is looked for once more after the
// module listed its slots anew: f has not run.
//
// f may run on past the deadline (a PKCS#11 call cannot be interrupted):
// do then returns an Unavailable error at the deadline, and the session is
// closed, not pooled, when f returns. f must therefore keep its results to
// itself until it returns nil, and callers read them only when do returns
// nil. The operations in flight are bounded by the session pool: waiting for
// a session counts against the deadline too.
func (t *Token) do(op string, retry bool, f func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error) error {
	return t.doWithin(op, retry, t.timeout, f)
}

// doSlow is do for operations that take long by design.
func (t *Token) doSlow(op string, retry bool, f func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error) error {
	return t.doWithin(op, retry, slowOpFactor*t.timeout, f)
}

func (t *Token) doWithin(op string, retry bool, timeout time.Duration, f func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error) error {
	c := t.conn
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	select {
	case c.inUse <- struct{}{}:
	case <-deadline.C:
		return newError(Unavailable, op, &timeoutError{fmt.Sprintf(
			"token %s: all %d sessions busy for %s (the HSM is slow or not answering); try again later", t.Describe(), cap(c.inUse), timeout)})
	}
	var abandoned atomic.Bool
	done := make(chan error, 1)
	go func() {
		defer func() { <-c.inUse }()
		done <- t.run(op, retry, &abandoned, f)
	}()
	select {
	case err := <-done:
		return err
	case <-deadline.C:
	}
	abandoned.Store(true)
	select {
	case err := <-done: // finished as the deadline passed
		return err
	default:
	}
	timeouts.Add(1)
	return newError(Unavailable, op, &timeoutError{fmt.Sprintf(
		"token %s did not answer within %s; try again later", t.Describe(), timeout)})
}

// timeouts counts operations abandoned at their deadline, for tests.
var timeouts atomic.Int64

// timeoutError marks an operation abandoned at its deadline.
type timeoutError struct{ msg string }

func (e *timeoutError) Error() string { return e.msg }

// IsTimeout reports an operation abandoned because the token did not
// answer within the deadline.
func IsTimeout(err error) bool {
	var te *timeoutError
	return errors.As(err, &te)
}

// run makes the attempts of do.
func (t *Token) run(op string, retry bool, abandoned *atomic.Bool, f func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error) error {
	for attempt := 0; ; attempt++ {
		next, err := t.attempt(op, abandoned, f)
		if attempt > 0 || next == stop || (next == rerun && !retry) || abandoned.Load() {
			return err
		}
	}
}

// outcome says whether an attempt may be made again.
type outcome int

const (
	stop outcome = iota
	// reconnect: f did not run; the module listed its slots anew.
	reconnect
	// rerun: f failed in a way that voids the connection.
	rerun
)

// attempt runs f once, with the module held initialised throughout, and
// finalises it afterwards when a failure asks for a rescan.
func (t *Token) attempt(op string, abandoned *atomic.Bool, f func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error) (next outcome, err error) {
	c := t.conn
	ctx, gen, err := c.mod.enter()
	if err != nil {
		return stop, err
	}
	rescan, connected := false, false
	defer func() {
		c.mod.leave()
		if rescan && c.mod.reset(gen) && !connected {
			next = reconnect
		}
	}()
	l, rescan, err := c.session(ctx, gen)
	if err != nil {
		return stop, err
	}
	connected = true
	if err := t.admit(l.limit); err != nil {
		c.putSession(ctx, gen, l)
		return stop, err
	}
	err = f(ctx, l.s, gen)
	if abandoned.Load() {
		// Whatever state the session is in (an operation begun, a
		// find not finished), nobody waits for it any more.
		c.discard(ctx, l)
		return stop, classify(op, err)
	}
	if err == nil {
		c.mod.succeeded.Store(true)
	}
	if err == nil || !needsReconnect(err) {
		c.putSession(ctx, gen, l)
		return stop, classify(op, err)
	}
	c.broken(ctx, gen, l)
	rescan = needsRescan(err)
	return rerun, classify(op, err)
}

// objectHandle finds the secret key labelled label, caching the handle for
// the connection's lifetime.
func (c *connection) objectHandle(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64, label string) (pkcs11.ObjectHandle, error) {
	c.mu.Lock()
	if c.gen == gen {
		if h, ok := c.handles[label]; ok {
			c.mu.Unlock()
			return h, nil
		}
	}
	c.mu.Unlock()

	found, err := findSecretKeys(ctx, s, label)
	if err != nil {
		return 0, err
	}
	switch len(found) {
	case 0:
		return 0, newError(NotFound, "find key", fmt.Errorf("no AES key labelled %q in token %s", label, c.cfg.tokenName()))
	case 1:
	default:
		return 0, newError(Configuration, "find key", fmt.Errorf("%d keys labelled %q in token %s; labels must be unique", len(found), label, c.cfg.tokenName()))
	}
	c.remember(gen, label, found[0])
	return found[0], nil
}

// keyHandle finds the key of class class labelled label (a secret key, or
// one half of a key pair), caching the handle like objectHandle.
func (c *connection) keyHandle(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64, class uint, label string) (pkcs11.ObjectHandle, error) {
	if class == pkcs11.CKO_SECRET_KEY {
		return c.objectHandle(ctx, s, gen, label)
	}
	// Labels have no NUL (CheckKeyLabel), so these never meet a secret
	// key's entry.
	cacheKey := fmt.Sprintf("\x00%d\x00%s", class, label)
	c.mu.Lock()
	if c.gen == gen {
		if h, ok := c.handles[cacheKey]; ok {
			c.mu.Unlock()
			return h, nil
		}
	}
	c.mu.Unlock()
	found, err := findObjects(ctx, s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	})
	if err != nil {
		return 0, err
	}
	kind := map[uint]string{pkcs11.CKO_PUBLIC_KEY: "public key", pkcs11.CKO_PRIVATE_KEY: "private key"}[class]
	switch len(found) {
	case 0:
		return 0, newError(NotFound, "find key", fmt.Errorf("no %s labelled %q in token %s", kind, label, c.cfg.tokenName()))
	case 1:
	default:
		return 0, newError(Configuration, "find key", fmt.Errorf("%d %ss labelled %q in token %s; labels must be unique", len(found), kind, label, c.cfg.tokenName()))
	}
	c.remember(gen, cacheKey, found[0])
	return found[0], nil
}

// remember caches a key handle for generation gen.
func (c *connection) remember(gen uint64, label string, h pkcs11.ObjectHandle) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen == gen && c.handles != nil {
		c.handles[label] = h
	}
}

// forget drops a cached handle (after the key is destroyed).
func (c *connection) forget(label string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.handles, label)
}

// findSecretKeys returns the token's secret keys with the label, or every
// secret key when label is empty.
func findSecretKeys(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, label string) ([]pkcs11.ObjectHandle, error) {
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
	}
	if label != "" {
		tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_LABEL, label))
	}
	return findObjects(ctx, s, tmpl)
}

// findObjects returns the objects matching tmpl.
func findObjects(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := ctx.FindObjectsInit(s, tmpl); err != nil {
		return nil, err
	}
	var all []pkcs11.ObjectHandle
	for {
		batch, _, err := ctx.FindObjects(s, 100)
		if err != nil {
			_ = ctx.FindObjectsFinal(s)
			return nil, err
		}
		all = append(all, batch...)
		if len(batch) < 100 {
			break
		}
	}
	return all, ctx.FindObjectsFinal(s)
}
