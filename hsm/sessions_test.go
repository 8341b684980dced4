package hsm

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/stretchr/testify/require"
)

// slotSessions returns how many sessions the module has open on tok's slot
// (the connection's login session included), as counted by openSession and
// closeSession around C_OpenSession and C_CloseSession.
func slotSessions(t *testing.T, tok *Token) int {
	t.Helper()
	tok.conn.mu.Lock()
	slot := tok.conn.slot
	tok.conn.mu.Unlock()
	m := tok.conn.mod
	m.calls.RLock()
	defer m.calls.RUnlock()
	m.slotMu.Lock()
	defer m.slotMu.Unlock()
	if st, ok := m.slots[slot]; ok {
		return st.sessions
	}
	return 0
}

// sessionBoundResult is what requireSessionBound observed.
type sessionBoundResult struct {
	// maxInFlight is the largest number of operations that were running
	// on the token at once; entered how many ran at all.
	maxInFlight, entered int
	// distinct is how many session handles were in use at once when the
	// bound was reached.
	distinct int
	// busy counts the callers that gave up waiting for a session; the
	// others' errors are in errs.
	busy int
	errs []error
	// sessions is how many sessions the module had open on the slot
	// (the login session included) while the operations held theirs.
	sessions int
}

// holdSessions runs callers operations at once on the handles (round
// robin), each of which keeps its session until every caller has returned
// (each at its deadline) and bound operations are running, or until more
// than bound run at once. Every caller's operation must therefore either
// hold a session past its deadline or give up waiting for one.
func holdSessions(t *testing.T, handles []*Token, callers, bound int) sessionBoundResult {
	t.Helper()
	var (
		mu       sync.Mutex
		inFlight int
		res      sessionBoundResult
		held     = map[pkcs11.SessionHandle]bool{}
		over     = make(chan struct{})
		overOnce sync.Once
		release  = make(chan struct{})
		running  atomic.Int64 // operations entered and not yet returned
	)
	var wg sync.WaitGroup
	errs := make([]error, callers)
	for i := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = handles[i%len(handles)].do("hold", false, func(_ *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
				running.Add(1)
				defer running.Add(-1)
				mu.Lock()
				inFlight++
				res.entered++
				res.maxInFlight = max(res.maxInFlight, inFlight)
				if held[s] {
					mu.Unlock()
					overOnce.Do(func() { close(over) })
					return fmt.Errorf("session %d handed out twice at once", s)
				}
				held[s] = true
				res.distinct = max(res.distinct, len(held))
				if inFlight > bound {
					overOnce.Do(func() { close(over) })
				}
				mu.Unlock()
				select {
				case <-release:
				case <-over:
				}
				mu.Lock()
				inFlight--
				delete(held, s)
				mu.Unlock()
				return nil
			})
		}()
	}
	// Every caller returns at its deadline: those holding a session as
	// abandoned, the others having waited for one in vain.
	wg.Wait()
	// Those that got a session keep it until the bound is reached (they
	// run on after their deadline), unless more than the bound got in.
	require.Eventually(t, func() bool {
		select {
		case <-over:
			return true
		default:
		}
		mu.Lock()
		defer mu.Unlock()
		return inFlight >= bound
	}, 60*time.Second, 10*time.Millisecond, "the operations that got a session never all ran")
	res.sessions = slotSessions(t, handles[0])
	close(release)
	// Let the abandoned operations finish, their sessions given back,
	// before anything is counted or the token closed.
	c := handles[0].conn
	require.Eventually(t, func() bool { return running.Load() == 0 && len(c.inUse) == 0 }, 60*time.Second, 10*time.Millisecond)
	for _, err := range errs {
		if strings.Contains(fmt.Sprint(err), "sessions busy") {
			res.busy++
		} else {
			res.errs = append(res.errs, err)
		}
	}
	return res
}

// requireSessionBound asserts that no more than bound operations, and
// sessions, are in use at once on the handles (which share a connection),
// and that the callers over the bound wait for a session and give up at
// their deadline.
func requireSessionBound(t *testing.T, handles []*Token, bound int) {
	t.Helper()
	const extra = 6
	before := timeouts.Load()
	res := holdSessions(t, handles, bound+extra, bound)
	require.LessOrEqual(t, res.maxInFlight, bound, "operations running on the token at once")
	require.Equal(t, bound, res.entered, "only the operations that got one of the %d sessions ran", bound)
	require.Equal(t, bound, res.distinct, "each running operation had a session of its own")
	require.Equal(t, bound+1, res.sessions, "sessions open while they ran: theirs and the login session")
	require.Equal(t, extra, res.busy, "callers over the bound gave up waiting for a session")
	require.Len(t, res.errs, bound)
	for _, err := range res.errs {
		require.Equal(t, Unavailable, KindOf(err), "%v", err)
		require.True(t, IsTimeout(err), "%v", err)
		require.Contains(t, err.Error(), "did not answer within")
	}
	require.Equal(t, int64(bound), timeouts.Load()-before, "the operations holding a session were abandoned at their deadline")
	// The sessions of the abandoned operations were closed when they
	// returned; only the login session is left.
	require.Equal(t, 1, slotSessions(t, handles[0]))
}

// TestSessionBound: however many operations are asked for at once, a
// token runs no more than MaxSessions of them, each on a session of its
// own, and the module never has more than MaxSessions sessions open for
// them (plus the login session); the others wait for a session and give up
// at their deadline.
func TestSessionBound(t *testing.T) {
	const bound = 4
	label := newTestToken(t)
	tok, err := Open(Config{Library: softhsmLib, TokenLabel: label, PIN: testPIN, MaxSessions: bound, CallTimeout: 2 * time.Second})
	require.NoError(t, err)
	t.Cleanup(tok.Close)
	_, err = tok.Random(1)
	require.NoError(t, err)
	require.Equal(t, 2, slotSessions(t, tok), "the login session and one pooled session")

	// bound operations at once each have a session of their own, which
	// the pool keeps afterwards.
	var wg sync.WaitGroup
	all := make(chan struct{})
	var entered atomic.Int64
	for range bound {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := tok.do("meet", false, func(*pkcs11.Ctx, pkcs11.SessionHandle, uint64) error {
				if entered.Add(1) == bound {
					close(all)
				}
				<-all
				return nil
			})
			if err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	require.Equal(t, bound+1, slotSessions(t, tok), "bound pooled sessions and the login session")

	requireSessionBound(t, []*Token{tok}, bound)

	// The token works as before, on the pool.
	_, err = tok.Random(1)
	require.NoError(t, err)
}
