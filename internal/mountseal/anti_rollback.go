package mountseal

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/hsmkey"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// Anti-rollback: the manifest refuses an older copy of any entry while the
// mount is unsealed, but across a restart it trusts the manifest root it
// finds in storage, so a storage writer who puts back an older root with
// the buckets and entries of its time rolls those entries back (a policy
// before min_decryption_version went up, a deleted key). With
// anti_rollback=true the manifest's anchor, a number that grows with every
// change, is kept in a data object in the token, written after each
// manifest root is stored (by anchorWriter, off the request path), and
// unsealing refuses storage whose anchor is below it.

// AntiRollbackLabel names the mount's anchor object in the token. Its
// existence is what turns the check on: a storage writer cannot remove it.
func (m *Manager) AntiRollbackLabel() string {
	return hsmkey.Namespace + m.mountID + "/anti-rollback"
}

// anchorWriter keeps the anchor in the token from a goroutine of its own,
// so that no request waits on the token for it: a storage write only
// records the newest anchor and wakes the writer, which writes the latest
// value it has (coalescing a burst into one token write). The token may
// lag storage by the writes in flight, never lead it: unsealing accepts
// storage ahead of the token, so a lag refuses nothing legitimate, and
// leaves unanchored only the changes of the last moments before a crash.
// A clean stop (unmount, reload, emergency seal) writes the last value.
type anchorWriter struct {
	m     *Manager
	label string
	want  atomic.Uint64
	kick  chan struct{}
	stop  chan struct{}
	done  chan struct{}
	// written is the last value in the token; only run touches it.
	written uint64
}

func (m *Manager) startAnchorLocked(written uint64) {
	m.stopAnchorLocked()
	w := &anchorWriter{m: m, label: m.AntiRollbackLabel(), kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{}), written: written}
	w.want.Store(written)
	m.anchor = w
	go w.run()
}

// stopAnchorLocked stops the writer after it wrote the last anchor. m.mu
// is held.
func (m *Manager) stopAnchorLocked() {
	if w := m.anchor; w != nil {
		close(w.stop)
		<-w.done
		m.anchor = nil
	}
}

// set is the seal.AnchorFunc: it records a and returns at once.
func (w *anchorWriter) set(_ context.Context, a uint64) error {
	for cur := w.want.Load(); a > cur && !w.want.CompareAndSwap(cur, a); cur = w.want.Load() {
	}
	select {
	case w.kick <- struct{}{}:
	default:
	}
	return nil
}

func (w *anchorWriter) run() {
	defer close(w.done)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var last time.Time
	for {
		select {
		case <-w.stop:
			w.write()
			return
		case <-w.kick:
		case <-timer.C:
		}
		// At most one token write per anchorInterval: a token object
		// write costs milliseconds of the token's (SoftHSM2: the host's)
		// time, and storage may change every few milliseconds under load.
		if wait := time.Until(last.Add(anchorInterval)); wait > 0 {
			timer.Reset(wait)
			continue
		}
		if err := w.write(); err != nil {
			w.m.host.Logger().Warn("keeping the anti-rollback anchor in the HSM (retried)", "error", err)
			timer.Reset(anchorInterval)
			continue
		}
		last = time.Now()
	}
}

// anchorInterval bounds how often the anchor is written to the token, and
// so how far it may lag storage: the changes of the last second before a
// crash (not a clean stop, which writes the last anchor) may be rolled back.
const anchorInterval = time.Second

func (w *anchorWriter) write() error {
	a := w.want.Load()
	if a <= w.written {
		return nil
	}
	tok := w.m.CurrentToken()
	if tok == nil {
		return errors.New("no HSM token is open")
	}
	if err := tok.WriteData(w.label, binary.BigEndian.AppendUint64(nil, a)); err != nil {
		return err
	}
	w.written = a
	return nil
}

// checkAnchor compares the loaded manifest with the anchor in tok, when
// there is one, and keeps the anchor current from now on.
func (m *Manager) checkAnchor(tok *hsm.Token, sealer *seal.Sealer) error {
	value, found, err := tok.ReadData(m.AntiRollbackLabel())
	if err != nil || !found {
		return err
	}
	if len(value) != 8 {
		return &hsm.Error{Kind: hsm.Failed, Op: "read anti-rollback anchor", Err: fmt.Errorf("the anchor object holds %d bytes, not 8", len(value))}
	}
	kept := binary.BigEndian.Uint64(value)
	stored, _ := sealer.Anchor()
	if stored < kept {
		return fmt.Errorf("%w: the manifest in storage is older than the one anchored in the HSM (anchor %d, the HSM holds %d): storage was rolled back to an earlier snapshot, refused (anti_rollback)", ErrStorageNotSealed, stored, kept)
	}
	m.startAnchorLocked(kept)
	sealer.SetAnchor(m.anchor.set)
	return nil
}

// setAntiRollbackLocked turns the anchor on or off for an unsealed mount.
// m.mu is held.
func (m *Manager) setAntiRollbackLocked(ctx context.Context, s logical.Storage, on bool) error {
	snap := m.state.Load()
	if snap.phase != PhaseUnsealed || m.token == nil {
		return sealUnavailable(snap)
	}
	label := m.AntiRollbackLabel()
	if on {
		// The object first: until the hook is set it may lag behind
		// storage, which unsealing accepts.
		anchor, _ := snap.sealer.Anchor()
		if err := m.token.WriteData(label, binary.BigEndian.AppendUint64(nil, anchor)); err != nil {
			return err
		}
		m.startAnchorLocked(anchor)
		snap.sealer.SetAnchor(m.anchor.set)
	} else {
		snap.sealer.SetAnchor(nil)
		m.stopAnchorLocked()
		if err := m.token.DestroyData(label); err != nil {
			return err
		}
	}
	if snap.meta.AntiRollback == on {
		return nil
	}
	meta := *snap.meta
	meta.AntiRollback = on
	if err := WriteMeta(ctx, snap.sealer.Wrap(s), &meta); err != nil {
		return err
	}
	next := *m.state.Load()
	next.meta = &meta
	m.setState(&next)
	return nil
}
