package hsmtransit

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
)

// errKind is what the one who gets an error should do about it, as hsm.Kind
// is for the token. Every failure the plugin answers is of one of three
// kinds, and errorResponse is where a kind becomes an answer.
type errKind int

const (
	// kindCaller: the request is wrong; a 400 whose message says what to
	// fix (or the 4xx an HTTPCodedError carries, as 404).
	kindCaller errKind = iota + 1
	// kindUnavailable: the HSM or the seal cannot serve now; a 503, and
	// the same request may succeed later.
	kindUnavailable
	// kindInternal: ours; a 500.
	kindInternal
)

// kindError is an error of a stated kind.
type kindError struct {
	kind errKind
	msg  string
}

func (e *kindError) Error() string { return e.msg }

// callerErr is the caller's mistake, with a message that says what to fix.
func callerErr(format string, a ...any) error {
	return &kindError{kind: kindCaller, msg: fmt.Sprintf(format, a...)}
}

// unavailableErr is a failure that waiting can cure.
func unavailableErr(format string, a ...any) error {
	return &kindError{kind: kindUnavailable, msg: fmt.Sprintf(format, a...)}
}

// kindOf classifies err: a kindError or a mountseal.Error by its kind; keysutil's and the SDK's
// errors as the SDK answers them (errutil.UserError and
// logical.ErrInvalidRequest the caller's, errutil.InternalError ours, an
// HTTPCodedError by its code); an hsm error by its hsm.Kind (a token that
// cannot be reached is unavailable; a PIN refused, a key not found, a
// configuration or input refused are the caller's: config/seal's caller
// sets them). Anything else is 0: errorResponse passes it on, and a batch
// counts it as its item's fault, as keysutil does.
func kindOf(err error) errKind {
	if err == nil {
		// Before the targets of errors.As below, which escape: declared
		// first, they cost four allocations for every item of a batch,
		// most of which have no error.
		return 0
	}
	var ke *kindError
	var ue errutil.UserError
	var ie errutil.InternalError
	var coded logical.HTTPCodedError
	switch {
	case errors.As(err, &ke):
		return ke.kind
	case mountseal.KindOf(err) == mountseal.KindCaller:
		return kindCaller
	case mountseal.KindOf(err) == mountseal.KindUnavailable:
		return kindUnavailable
	case errors.As(err, &ie):
		return kindInternal
	case errors.As(err, &coded):
		if coded.Code() == http.StatusServiceUnavailable {
			return kindUnavailable
		}
		if coded.Code() >= 500 {
			return kindInternal
		}
		return kindCaller
	case errors.As(err, &ue) || errors.Is(err, logical.ErrInvalidRequest):
		return kindCaller
	}
	if k := hsm.KindOf(err); k == hsm.Unavailable {
		return kindUnavailable
	} else if k != 0 {
		return kindCaller
	}
	return 0
}

// errorResponse answers a handler's error by its kind: the caller's as a 400
// with its message (an HTTPCodedError keeps its own 4xx), unavailable as a
// 503, anything else as it is (Vault answers 500).
func errorResponse(err error) (*logical.Response, error) {
	var coded logical.HTTPCodedError
	switch kindOf(err) {
	case kindCaller:
		if errors.As(err, &coded) && coded.Code() != http.StatusBadRequest {
			return nil, err
		}
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	case kindUnavailable:
		if errors.As(err, &coded) {
			return nil, err
		}
		return nil, logical.CodedError(http.StatusServiceUnavailable, err.Error())
	}
	return nil, err
}

// itemError is a batch item's error message, ours or not, as an error:
// the single-item request then answers it as a batch would have.
func itemError(msg string, internal bool) error {
	if internal {
		return errutil.InternalError{Err: msg}
	}
	return callerErr("%s", msg)
}
