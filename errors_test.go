package hsmtransit

import (
	"errors"
	"fmt"
	"net/http"
	"testing"

	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
)

// Every error the plugin makes or meets has one of three kinds, and each
// kind one answer: the status Vault's HTTP layer sends for it, and the
// message the caller reads.
func TestErrorKindsAndTheirAnswers(t *testing.T) {
	req := &logical.Request{Operation: logical.UpdateOperation, Path: "encrypt/k"}
	status := func(resp *logical.Response, err error) int {
		if coded, ok := err.(logical.HTTPCodedError); ok {
			return coded.Code()
		}
		s, _ := logical.RespondErrorCommon(req, resp, err)
		return s
	}
	hsmErr := func(kind hsm.Kind) error {
		return fmt.Errorf("wrapped: %w", &hsm.Error{Kind: kind, Op: "encrypt", Err: errors.New("CKR_SOMETHING")})
	}
	for _, c := range []struct {
		name   string
		err    error
		kind   errKind
		status int
	}{
		{"caller", callerErr("set %s", "x"), kindCaller, http.StatusBadRequest},
		{"caller wrapped", fmt.Errorf("item 3: %w", callerErr("bad")), kindCaller, http.StatusBadRequest},
		{"unavailable", unavailableErr("the HSM is away"), kindUnavailable, http.StatusServiceUnavailable},
		{"unavailable wrapped", fmt.Errorf("rotating: %w", unavailableErr("away")), kindUnavailable, http.StatusServiceUnavailable},
		{"keysutil user error", errutil.UserError{Err: "bad input"}, kindCaller, http.StatusBadRequest},
		{"keysutil internal error", errutil.InternalError{Err: "ours"}, kindInternal, http.StatusInternalServerError},
		{"coded 404 keeps its status", logical.CodedError(404, "key not found"), kindCaller, http.StatusNotFound},
		{"coded 503", logical.CodedError(503, "sealed"), kindUnavailable, http.StatusServiceUnavailable},
		{"coded 500", logical.CodedError(500, "broken"), kindInternal, http.StatusInternalServerError},
		{"invalid request", logical.ErrInvalidRequest, kindCaller, http.StatusBadRequest},
		{"hsm unavailable", hsmErr(hsm.Unavailable), kindUnavailable, http.StatusServiceUnavailable},
		{"hsm PIN refused", hsmErr(hsm.Credentials), kindCaller, http.StatusBadRequest},
		{"hsm failed", hsmErr(hsm.Failed), kindCaller, http.StatusBadRequest},
		{"anything else", errors.New("storage write failed"), 0, http.StatusInternalServerError},
	} {
		t.Run(c.name, func(t *testing.T) {
			require.Equal(t, c.kind, kindOf(c.err))
			resp, err := errorResponse(c.err)
			require.Equal(t, c.status, status(resp, err))
			msg := fmt.Sprint(err)
			if resp != nil && resp.IsError() {
				msg = resp.Error().Error()
			}
			require.Contains(t, msg, c.err.Error(), "the caller reads the message")
		})
	}
	require.Equal(t, errKind(0), kindOf(nil))

	// A batch item's message answers a single request as a batch would.
	resp, err := errorResponse(itemError("cipher: message authentication failed", false))
	require.Equal(t, http.StatusBadRequest, status(resp, err))
	require.Equal(t, "cipher: message authentication failed", resp.Error().Error())
	resp, err = errorResponse(itemError("failed to decrypt", true))
	require.Equal(t, http.StatusInternalServerError, status(resp, err))
	require.Nil(t, resp)
}

// A kind returned by any handler becomes its answer at the boundary: the
// SDK carries only its own error types to Vault.
func TestHandlersAnswerTheirErrorKinds(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"disabled": true})
	r := e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x")})
	requireStatus(t, r, 400, `key "k" is disabled`)
	var typed *kindError
	require.False(t, errors.As(r.err, &typed), "no kindError leaves the plugin: %v", r.err)
	requireStatus(t, e.read(t, "backup/k"), 400, "exporting is disallowed on the policy; set exportable on keys/k/config")
	requireStatus(t, e.read(t, "backup/absent"), 404, `key "absent" not found`)
}
