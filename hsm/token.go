package hsm

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"

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
}

// validate checks what can be checked without loading anything.
func (c Config) validate() error {
	if err := CheckLibrary(c.Library); err != nil {
		return err
	}
	if (c.TokenLabel == "") == (c.Slot == nil) {
		return newError(Configuration, "open token", errors.New("exactly one of token_label and slot is required"))
	}
	if c.PIN == "" {
		return newError(Configuration, "open token", errors.New("a PIN is required"))
	}
	return nil
}

func (c Config) tokenName() string {
	if c.Slot != nil {
		return "slot " + strconv.FormatUint(uint64(*c.Slot), 10)
	}
	return strconv.Quote(c.TokenLabel)
}

// tokenKey identifies a shared Token: the same library, token and PIN.
type tokenKey struct {
	library, token string
	pin            [32]byte
}

var tokens = struct {
	sync.Mutex
	byKey map[tokenKey]*Token
}{byKey: map[tokenKey]*Token{}}

// loggedIn records, per module and slot, a digest of the PIN this process
// logged in with: PKCS#11 login is per process, so a second login attempt
// answers "already logged in" whatever PIN it carries.
var loggedIn = struct {
	sync.Mutex
	bySlot map[*module]map[uint][32]byte
}{bySlot: map[*module]map[uint][32]byte{}}

// Token is a PKCS#11 token, logged in once and shared by every user of the
// same library, token and PIN in this process. It connects lazily, keeps a
// bounded pool of sessions, and connects again after the token went away.
type Token struct {
	cfg  Config
	key  tokenKey
	mod  *module
	refs int // guarded by tokens

	// inUse bounds the sessions handed out at once.
	inUse chan struct{}

	mu sync.Mutex
	// gen is the module generation the connection below belongs to; 0
	// means not connected.
	gen          uint64
	slot         uint
	loginSession pkcs11.SessionHandle
	idle         []pkcs11.SessionHandle
	handles      map[string]pkcs11.ObjectHandle
	// credErr is sticky: a refused PIN is never tried again, so that the
	// token does not lock itself.
	credErr error
	// logins counts C_Login calls, for tests of that promise.
	logins int
}

// Open returns the shared token for cfg. Nothing is loaded or logged in
// until the first operation. Close releases it.
func Open(cfg Config) (*Token, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if cfg.MaxSessions <= 0 {
		cfg.MaxSessions = DefaultMaxSessions
	}
	key := tokenKey{library: cfg.Library, token: cfg.tokenName(), pin: sha256.Sum256([]byte(cfg.PIN))}
	tokens.Lock()
	defer tokens.Unlock()
	if t, ok := tokens.byKey[key]; ok {
		t.refs++
		return t, nil
	}
	t := &Token{
		cfg:   cfg,
		key:   key,
		mod:   acquireModule(cfg.Library),
		refs:  1,
		inUse: make(chan struct{}, cfg.MaxSessions),
	}
	tokens.byKey[key] = t
	return t, nil
}

// Close releases the token; the last user closes its sessions, which logs
// it out.
func (t *Token) Close() {
	tokens.Lock()
	defer tokens.Unlock()
	t.refs--
	if t.refs > 0 {
		return
	}
	delete(tokens.byKey, t.key)
	t.mu.Lock()
	t.dropLocked(true)
	t.mu.Unlock()
	t.mod.release()
}

// Describe names the token for messages and status; it holds no secret.
func (t *Token) Describe() string { return t.cfg.tokenName() }

// dropLocked forgets the connection; closing the sessions (and so logging
// out) when close is set and they may still be valid.
func (t *Token) dropLocked(close bool) {
	if t.gen != 0 && close {
		ctx, gen, err := t.mod.ensure()
		if err == nil && gen == t.gen {
			for _, s := range t.idle {
				_ = ctx.CloseSession(s)
			}
			_ = ctx.CloseSession(t.loginSession)
		}
		loggedIn.Lock()
		delete(loggedIn.bySlot[t.mod], t.slot)
		loggedIn.Unlock()
	}
	t.gen = 0
	t.idle = nil
	t.handles = nil
}

// connectLocked makes sure the token is found and logged in for the
// module's current generation.
func (t *Token) connectLocked() (*pkcs11.Ctx, uint64, error) {
	if t.credErr != nil {
		return nil, 0, t.credErr
	}
	ctx, gen, err := t.mod.ensure()
	if err != nil {
		return nil, 0, err
	}
	if t.gen == gen {
		return ctx, gen, nil
	}
	// A new generation voids every session and handle of the old one.
	t.dropLocked(false)

	slot, err := t.findSlot(ctx)
	if err != nil {
		if KindOf(err) == Unavailable {
			// The token may come back: have the module list slots anew.
			t.mod.reset(gen)
		}
		return nil, 0, err
	}
	s, err := ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		if needsRescan(err) {
			t.mod.reset(gen)
		}
		return nil, 0, classify("open session", err)
	}
	if err := t.login(ctx, slot, s); err != nil {
		_ = ctx.CloseSession(s)
		if KindOf(err) == Credentials {
			t.credErr = err
		} else if needsRescan(err) {
			t.mod.reset(gen)
		}
		return nil, 0, err
	}
	t.gen, t.slot, t.loginSession = gen, slot, s
	t.handles = map[string]pkcs11.ObjectHandle{}
	return ctx, gen, nil
}

// findSlot returns the slot of the configured token.
func (t *Token) findSlot(ctx *pkcs11.Ctx) (uint, error) {
	if t.cfg.Slot != nil {
		if _, err := ctx.GetTokenInfo(*t.cfg.Slot); err != nil {
			return 0, newError(Unavailable, "find token", fmt.Errorf("no token in slot %d: %w", *t.cfg.Slot, err))
		}
		return *t.cfg.Slot, nil
	}
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		return 0, classify("list slots", err)
	}
	for _, slot := range slots {
		info, err := ctx.GetTokenInfo(slot)
		if err != nil {
			continue
		}
		if strings.TrimRight(info.Label, " \x00") == t.cfg.TokenLabel {
			return slot, nil
		}
	}
	return 0, newError(Unavailable, "find token", fmt.Errorf("no token labelled %q (is it plugged in, and SOFTHSM2_CONF set for SoftHSM2?)", t.cfg.TokenLabel))
}

// login logs the user in, or accepts an existing login made with the same
// PIN by this process.
func (t *Token) login(ctx *pkcs11.Ctx, slot uint, s pkcs11.SessionHandle) error {
	t.logins++
	err := ctx.Login(s, pkcs11.CKU_USER, t.cfg.PIN)
	var rv pkcs11.Error
	switch {
	case err == nil:
		loggedIn.Lock()
		defer loggedIn.Unlock()
		if loggedIn.bySlot[t.mod] == nil {
			loggedIn.bySlot[t.mod] = map[uint][32]byte{}
		}
		loggedIn.bySlot[t.mod][slot] = t.key.pin
		return nil
	case errors.As(err, &rv) && rv == pkcs11.CKR_USER_ALREADY_LOGGED_IN:
		loggedIn.Lock()
		defer loggedIn.Unlock()
		if digest, ok := loggedIn.bySlot[t.mod][slot]; ok && digest != t.key.pin {
			return newError(Credentials, "login", errors.New("the token is in use by this process with another PIN"))
		}
		return nil
	case KindOf(classify("login", err)) == Credentials:
		return newError(Credentials, "login", fmt.Errorf("PIN refused by token %s (%v); it is not retried", t.Describe(), err))
	}
	return classify("login", err)
}

// loginAttempts returns how many times C_Login was called.
func (t *Token) loginAttempts() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.logins
}

// session hands out a logged-in session of the current generation.
func (t *Token) session() (*pkcs11.Ctx, pkcs11.SessionHandle, uint64, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	ctx, gen, err := t.connectLocked()
	if err != nil {
		return nil, 0, 0, err
	}
	if n := len(t.idle); n > 0 {
		s := t.idle[n-1]
		t.idle = t.idle[:n-1]
		return ctx, s, gen, nil
	}
	s, err := ctx.OpenSession(t.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.dropLocked(false)
		if needsRescan(err) {
			t.mod.reset(gen)
		}
		return nil, 0, 0, classify("open session", err)
	}
	return ctx, s, gen, nil
}

// putSession returns a healthy session to the pool.
func (t *Token) putSession(ctx *pkcs11.Ctx, gen uint64, s pkcs11.SessionHandle) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.gen != gen {
		return // void: the token reconnected meanwhile
	}
	t.idle = append(t.idle, s)
}

// broken forgets a connection after a failure that voids it.
func (t *Token) broken(gen uint64, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.gen == gen {
		t.dropLocked(false)
	}
	if needsRescan(err) {
		t.mod.reset(gen)
	}
}

// do runs f on a pooled session. A failure that voids the connection drops
// it; when retry is set, f runs once more on a fresh connection.
func (t *Token) do(op string, retry bool, f func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64) error) error {
	t.inUse <- struct{}{}
	defer func() { <-t.inUse }()
	for attempt := 0; ; attempt++ {
		ctx, s, gen, err := t.session()
		if err != nil {
			return err
		}
		err = f(ctx, s, gen)
		if err == nil || !needsReconnect(err) {
			t.putSession(ctx, gen, s)
			return classify(op, err)
		}
		t.broken(gen, err)
		if !retry || attempt > 0 {
			return classify(op, err)
		}
	}
}

// objectHandle finds the secret key labelled label, caching the handle for
// the connection's lifetime.
func (t *Token) objectHandle(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, gen uint64, label string) (pkcs11.ObjectHandle, error) {
	t.mu.Lock()
	if t.gen == gen {
		if h, ok := t.handles[label]; ok {
			t.mu.Unlock()
			return h, nil
		}
	}
	t.mu.Unlock()

	found, err := findSecretKeys(ctx, s, label)
	if err != nil {
		return 0, err
	}
	switch len(found) {
	case 0:
		return 0, newError(NotFound, "find key", fmt.Errorf("no AES key labelled %q in token %s", label, t.Describe()))
	case 1:
	default:
		return 0, newError(Configuration, "find key", fmt.Errorf("%d keys labelled %q in token %s; labels must be unique", len(found), label, t.Describe()))
	}
	t.mu.Lock()
	if t.gen == gen {
		t.handles[label] = found[0]
	}
	t.mu.Unlock()
	return found[0], nil
}

// forget drops a cached handle (after the key is destroyed).
func (t *Token) forget(label string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.handles, label)
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
