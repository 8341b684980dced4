package hsm

import (
	"errors"
	"fmt"
	"sync"
	"time"
)

// Default bound of failed logins per token: a real HSM locks its user PIN
// after a few failures, and anyone who can configure a mount of this plugin
// can make it try a PIN.
const (
	defaultFailedLoginLimit  = 3
	defaultFailedLoginWindow = 15 * time.Minute
)

// loginKey names one token for the bound: the library file, the slot and
// the token's serial number (so that another token put in the slot is
// counted apart).
type loginKey struct {
	file   fileID
	slot   uint
	serial string
}

// failedLogins counts, per token, the login attempts refused in the window:
// by the token (a C_Login that failed) or by this process (a PIN that is not
// the one the token is logged in with). The count lives as long as the
// process, not the module, so that closing every mount does not reset it.
var failedLogins = struct {
	sync.Mutex
	limit  int
	window time.Duration
	at     map[loginKey][]time.Time
}{limit: defaultFailedLoginLimit, window: defaultFailedLoginWindow, at: map[loginKey][]time.Time{}}

// loginClock is time.Now; tests put a clock they move by hand.
var loginClock = time.Now

// SetFailedLoginLimit sets how many failed logins to one token are allowed
// within window before any new login to it is refused without trying the
// token; n <= 0 removes the bound. It forgets the failures counted so far,
// and so does restore, which puts back the previous bound. It is meant for
// tests that write wrong PINs on purpose.
func SetFailedLoginLimit(n int, window time.Duration) (restore func()) {
	failedLogins.Lock()
	defer failedLogins.Unlock()
	prevN, prevW := failedLogins.limit, failedLogins.window
	failedLogins.limit, failedLogins.window = n, window
	failedLogins.at = map[loginKey][]time.Time{}
	return func() {
		failedLogins.Lock()
		defer failedLogins.Unlock()
		failedLogins.limit, failedLogins.window = prevN, prevW
		failedLogins.at = map[loginKey][]time.Time{}
	}
}

// errLoginLimited marks the refusals of checkLogin.
var errLoginLimited = errors.New("login refused by the failed-login bound")

// IsLoginLimited reports a login refused because the token had too many
// failed logins recently: unlike a PIN the token refused, it is worth trying
// again once the time the message gives has passed.
func IsLoginLimited(err error) bool { return errors.Is(err, errLoginLimited) }

type limitedError struct{ msg string }

func (e *limitedError) Error() string        { return e.msg }
func (e *limitedError) Is(target error) bool { return target == errLoginLimited }

// checkLogin refuses a login attempt to the token when it already had the
// allowed number of failures within the window.
func checkLogin(key loginKey, token string) error {
	failedLogins.Lock()
	defer failedLogins.Unlock()
	if failedLogins.limit <= 0 {
		return nil
	}
	now := loginClock()
	recent := failedLogins.at[key][:0]
	for _, t := range failedLogins.at[key] {
		if now.Sub(t) < failedLogins.window {
			recent = append(recent, t)
		}
	}
	if len(recent) == 0 {
		delete(failedLogins.at, key)
	} else {
		failedLogins.at[key] = recent
	}
	if len(recent) < failedLogins.limit {
		return nil
	}
	// Allowed again once enough of the failures left the window.
	until := recent[len(recent)-failedLogins.limit].Add(failedLogins.window)
	return newError(Credentials, "login", &limitedError{fmt.Sprintf(
		"%d failed logins to token %s in the last %s; refused without trying the token until %s UTC, to keep it from locking",
		len(recent), token, formatWindow(failedLogins.window), until.UTC().Format("15:04:05"))})
}

// failedLogin counts a refused login attempt.
func failedLogin(key loginKey) {
	failedLogins.Lock()
	defer failedLogins.Unlock()
	if failedLogins.limit <= 0 {
		return
	}
	failedLogins.at[key] = append(failedLogins.at[key], loginClock())
}

// formatWindow writes whole minutes as "15m" rather than "15m0s".
func formatWindow(d time.Duration) string {
	if d >= time.Minute && d%time.Minute == 0 {
		if d%time.Hour == 0 {
			return fmt.Sprintf("%dh", d/time.Hour)
		}
		return fmt.Sprintf("%dm", d/time.Minute)
	}
	return d.String()
}
