package mountseal

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
)

// Kind is what the caller of a Manager method should do about its error.
// An error of no Kind (not an *Error) is internal, or a storage failure, and
// is passed on as it is.
type Kind int

const (
	// KindCaller: the request was wrong (a PIN refused, a key not found,
	// too few shares); the message says what to fix. The API answers 400.
	KindCaller Kind = iota + 1
	// KindUnavailable: the HSM or the seal cannot serve now, and the same
	// request may succeed later. The API answers 503.
	KindUnavailable
)

// Error is an error of a stated Kind.
type Error struct {
	Kind Kind
	Err  error
}

func (e *Error) Error() string { return e.Err.Error() }

func (e *Error) Unwrap() error { return e.Err }

// KindOf returns err's Kind, 0 when it has none.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return 0
}

// callerErr is the caller's mistake.
func callerErr(format string, a ...any) error {
	return &Error{Kind: KindCaller, Err: fmt.Errorf(format, a...)}
}

// asCaller makes err the caller's mistake, its message unchanged.
func asCaller(err error) error { return &Error{Kind: KindCaller, Err: err} }

// unavailableErr is a failure that waiting can cure.
func unavailableErr(format string, a ...any) error {
	return &Error{Kind: KindUnavailable, Err: fmt.Errorf(format, a...)}
}

// classify gives an HSM error the Kind its hsm.Kind means for whoever
// configures the seal: a token that cannot be reached is unavailable; a PIN
// refused, a key not found, a configuration or input refused are the
// caller's to fix. An error that has a Kind, or an HTTP code (the seal's own
// 503), or neither, is returned as it is.
func classify(err error) error {
	var coded logical.HTTPCodedError
	switch {
	case err == nil || KindOf(err) != 0 || errors.As(err, &coded):
		return err
	case hsm.KindOf(err) == hsm.Unavailable:
		return &Error{Kind: KindUnavailable, Err: err}
	case hsm.KindOf(err) != 0:
		return &Error{Kind: KindCaller, Err: err}
	}
	return err
}

// ErrNotConfigured answers key and crypto paths before config/seal.
var ErrNotConfigured = errors.New("this mount is not sealed by an HSM yet: write config/seal (library, token_label or slot, pin, key_label) first")

// ErrEmergencySealed is why an emergency-sealed mount answers 503.
var ErrEmergencySealed = errors.New("the mount was sealed by seal/seal (emergency seal); seal/unseal resumes it")

// ErrStorageNotSealed is what storage that the keyring does not vouch for
// is: edited, replayed or planted outside the plugin.
var ErrStorageNotSealed = errors.New("the mount's storage does not check out against its root keyring")

// sealUnavailable is the 503 of a mount that cannot unseal now.
func sealUnavailable(snap *Snapshot) error {
	if errors.Is(snap.lastErr, ErrEmergencySealed) {
		return logical.CodedError(http.StatusServiceUnavailable, snap.lastErr.Error())
	}
	msg := "the mount's root key is sealed and the HSM cannot unseal it now"
	if snap.lastErr != nil {
		msg += ": " + snap.lastErr.Error()
	}
	switch {
	case errors.Is(snap.lastErr, ErrStorageNotSealed):
		msg += "; the mount's storage was changed outside the plugin (see seal/status), and the mount stays sealed while it does not check out"
	case snap.permanent:
		msg += "; fix config/seal to unseal"
	default:
		msg += "; the mount unseals by itself when the HSM is back"
	}
	return logical.CodedError(http.StatusServiceUnavailable, msg)
}
