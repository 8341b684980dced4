// Package hsm is hsm-transit's access to a PKCS#11 token: one module per
// library file per process, shared connections to tokens with a bounded
// session pool and a single login, a bound on failed logins, AES keys kept in
// the token, AES-GCM inside it, and its random generator.
//
// # Modules and their generations
//
// A PKCS#11 library is loaded once per process and file (by device and
// inode, so two paths to one file are one module) and never unloaded: some
// libraries crash when loaded again after a dlclose. C_Initialize is called
// once and shared by every Token and mount of the process. Each
// initialisation starts a new generation of the module: sessions, object
// handles and logins belong to the generation they were made in, and are void
// after the next one. The module is finalised and initialised again only when
// a token vanished or the library says its state is lost (a device removed,
// CKR_CRYPTOKI_NOT_INITIALIZED, and the like), so that its slots are listed
// anew; these rescans are spaced, doubling from minRescanInterval up to
// maxRescanInterval while no operation succeeds in between. Every PKCS#11
// call holds the module's lock shared; finalising holds it exclusively, since
// C_Finalize under another goroutine's call crashes most libraries.
//
// # Connections, sessions and the per-process login
//
// Open returns a Token handle; handles with the same library file, token and
// PIN share one connection: one login and a pool of at most
// Config.MaxSessions sessions, opened lazily and opened again in a new
// generation. PKCS#11 logs in per process and token, not per session: a
// second C_Login answers CKR_USER_ALREADY_LOGGED_IN whatever PIN it carries,
// and the login lasts until the last session to the token is closed,
// whichever handle opened it. The package therefore records, per slot, the
// hash of the PIN the process logged in with, and refuses (without asking the
// token) a connection that brings another PIN while that login lasts: it
// would otherwise ride on a login it never proved. A login made by code of
// the process that does not go through this package cannot be checked, and
// is refused the same way.
//
// # The sticky PIN error and the failed-login bound
//
// A PIN the token refused is never tried again by its connection: the error
// (Kind Credentials) is kept and returned by every later operation, since a
// retry loop would lock the token's user PIN (real HSMs do after a few
// failures). Only a connection with another PIN, that is a new
// configuration, tries again. On top of that, failed logins are counted per
// token (library file, slot and serial number) for the life of the process,
// not of a mount: after SetFailedLoginLimit's number of failures (3 in 15
// minutes by default) any new login to that token is refused without trying
// it (IsLoginLimited), so that mounts created in a loop cannot guess PINs.
// Every new handle is admitted through that bound once, even when it joins a
// connection already logged in, so that joining does not reveal which guess
// was right.
//
// # Deadlines and errors
//
// Every call has a deadline (Config.CallTimeout): a token that hangs makes
// operations fail as Unavailable instead of holding their callers, and the
// hung call is left to finish on its own goroutine. EncryptGCMBatch and
// DecryptGCMBatch run up to MaxGCMBatch (16) AES-GCM operations as one call,
// on one session within one deadline: a goroutine, a deadline, a session and
// a key-handle lookup per operation were most of a batch request's own CPU
// around the token's. Errors carry a Kind that
// says what the caller should do (KindOf): wait and retry (Unavailable), fix
// the PIN (Credentials), create or name another key (NotFound), fix the
// configuration (Configuration), or accept that the token refused these
// inputs (Failed).
package hsm

import (
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// Kind classifies failures by what the caller should do about them.
type Kind int

const (
	// Unavailable: the module, token or device cannot be reached now; the
	// operation may succeed later without any change.
	Unavailable Kind = iota + 1
	// Credentials: the PIN was refused or the user is locked. Retrying
	// would lock the token: nothing is retried until the PIN changes.
	// Also a login refused because the token had too many failed logins
	// lately (IsLoginLimited), which may be tried again later.
	Credentials
	// NotFound: the named key is not in the token.
	NotFound
	// Configuration: the configuration itself is wrong (library not
	// allowed, both or neither of slot and token label).
	Configuration
	// Failed: the token refused the operation on these inputs (a
	// ciphertext that does not authenticate, say).
	Failed
)

func (k Kind) String() string {
	switch k {
	case Unavailable:
		return "unavailable"
	case Credentials:
		return "credentials refused"
	case NotFound:
		return "not found"
	case Configuration:
		return "configuration"
	case Failed:
		return "operation failed"
	}
	return "unknown"
}

// Error is a failure of an HSM operation.
type Error struct {
	Kind Kind
	Op   string
	Err  error
}

func (e *Error) Error() string { return fmt.Sprintf("HSM %s: %v", e.Op, e.Err) }

func (e *Error) Unwrap() error { return e.Err }

// KindOf returns the kind of err, or 0 when it is not an *Error.
func KindOf(err error) Kind {
	var he *Error
	if errors.As(err, &he) {
		return he.Kind
	}
	return 0
}

// IsUnavailable reports a transient failure.
func IsUnavailable(err error) bool { return KindOf(err) == Unavailable }

// IsTokenNotFound reports an Unavailable failure because what the
// configuration names is not there: no token with that label, no token in
// that slot, a library that cannot be loaded. For a configuration in use it
// is transient (the token may come back); for a new configuration it most
// likely names something that does not exist.
func IsTokenNotFound(err error) bool {
	var a *absentError
	return KindOf(err) == Unavailable && errors.As(err, &a)
}

// absentError marks the failures IsTokenNotFound reports.
type absentError struct{ err error }

func absent(err error) error { return &absentError{err} }

func (e *absentError) Error() string { return e.err.Error() }

func (e *absentError) Unwrap() error { return e.err }

func newError(kind Kind, op string, err error) *Error {
	return &Error{Kind: kind, Op: op, Err: err}
}

// classify turns a PKCS#11 return value into an *Error of the right kind.
func classify(op string, err error) error {
	if err == nil {
		return nil
	}
	var he *Error
	if errors.As(err, &he) {
		return err
	}
	var rv pkcs11.Error
	if !errors.As(err, &rv) {
		return newError(Unavailable, op, err)
	}
	switch rv {
	case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_LOCKED, pkcs11.CKR_PIN_LEN_RANGE,
		pkcs11.CKR_PIN_EXPIRED, pkcs11.CKR_PIN_INVALID, pkcs11.CKR_USER_PIN_NOT_INITIALIZED:
		return newError(Credentials, op, err)
	case pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE,
		pkcs11.CKR_DATA_INVALID, pkcs11.CKR_DATA_LEN_RANGE, pkcs11.CKR_MECHANISM_PARAM_INVALID,
		pkcs11.CKR_SIGNATURE_INVALID:
		return newError(Failed, op, err)
	case pkcs11.CKR_MECHANISM_INVALID, pkcs11.CKR_KEY_TYPE_INCONSISTENT, pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED,
		pkcs11.CKR_ATTRIBUTE_VALUE_INVALID, pkcs11.CKR_TEMPLATE_INCONSISTENT, pkcs11.CKR_TEMPLATE_INCOMPLETE,
		pkcs11.CKR_FUNCTION_NOT_SUPPORTED:
		return newError(Configuration, op, err)
	}
	return newError(Unavailable, op, err)
}

// needsReconnect reports PKCS#11 failures after which the session, the login
// or the whole module must be set up again.
func needsReconnect(err error) bool {
	var rv pkcs11.Error
	if !errors.As(err, &rv) {
		return false
	}
	switch rv {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_USER_NOT_LOGGED_IN,
		pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_TOKEN_NOT_RECOGNIZED, pkcs11.CKR_DEVICE_REMOVED,
		pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_SLOT_ID_INVALID, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED,
		pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID:
		return true
	}
	return false
}

// needsRescan reports failures after which the module itself must be
// finalised and initialised again: some tokens (SoftHSM2 among them) list
// their slots only at C_Initialize. CKR_GENERAL_ERROR is not one: SoftHSM2
// answers it to a ciphertext that does not authenticate, among others, and
// anyone who can configure a mount could finalise the module at will.
func needsRescan(err error) bool {
	var rv pkcs11.Error
	if !errors.As(err, &rv) {
		return false
	}
	switch rv {
	case pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_TOKEN_NOT_RECOGNIZED, pkcs11.CKR_DEVICE_REMOVED,
		pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_SLOT_ID_INVALID, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED:
		return true
	}
	return false
}
