package mountseal

import (
	"context"
	"errors"
	"fmt"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// Rotated is what Rotate did.
type Rotated struct {
	// RootKeyVersion is the root key version now active.
	RootKeyVersion uint32
	// EntriesResealed counts the entries re-encrypted under it.
	EntriesResealed int
}

// Rotate rotates the root key: a new version from the HSM, then every entry
// re-encrypted under it, then the old versions dropped. A crash at any point
// leaves every entry readable; the re-encryption completes at the next
// unseal.
func (m *Manager) Rotate(ctx context.Context, s logical.Storage) (*Rotated, error) {
	if _, err := m.View(ctx, s); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	snap := m.state.Load()
	if snap.phase != PhaseUnsealed {
		return nil, sealUnavailable(snap)
	}
	if m.token == nil {
		return nil, unavailableErr("no HSM token is open for this mount; check seal/status")
	}
	newKey, err := m.token.Random(seal.RootKeySize)
	if err != nil {
		return nil, classify(err)
	}
	ring, err := snap.sealer.Keyring().Rotated(newKey)
	clear(newKey)
	if err != nil {
		return nil, err
	}
	// Store the keyring with both versions before any entry moves: a crash
	// from here on leaves every entry readable.
	if err := m.storeKeyringLocked(ctx, s, snap, ring); err != nil {
		return nil, classify(err)
	}
	snap = m.state.Load()
	snap.sealer.SetKeyring(ring)
	if m.rotationStored != nil {
		m.rotationStored()
	}
	n, err := m.finishRotationLocked(ctx, s, snap)
	if err != nil {
		if hsm.IsUnavailable(err) {
			// The new keyring is stored; the entries not yet resealed
			// stay readable, and the rotation completes at the next
			// seal/rotate or unseal.
			return nil, unavailableErr("the root key rotation was interrupted (%v); every entry stays readable, and writing seal/rotate again once the HSM answers completes it", err)
		}
		return nil, err
	}
	return &Rotated{RootKeyVersion: ring.Active(), EntriesResealed: n}, nil
}

// storeKeyringLocked seals ring under the configured KEK and stores it with
// the configuration, in one write. m.mu is held.
func (m *Manager) storeKeyringLocked(ctx context.Context, s logical.Storage, snap *Snapshot, ring *seal.Keyring) error {
	if m.token == nil {
		return unavailableErr("no HSM token is open for this mount; check config/seal")
	}
	cfg := *snap.cfg
	if err := m.setKeyring(&cfg, m.token, cfg.SealedKeys(), ring, snap.meta); err != nil {
		return err
	}
	if err := WriteConfig(ctx, s, &cfg); err != nil {
		return err
	}
	next := *snap
	next.cfg = &cfg
	m.setState(&next)
	return nil
}

// ResumeRotation completes a root key rotation that a storage failure
// interrupted in this process; it does nothing while another transition is
// under way.
func (m *Manager) ResumeRotation(ctx context.Context, s logical.Storage) {
	if !m.mu.TryLock() {
		return
	}
	defer m.mu.Unlock()
	snap := m.state.Load()
	if snap.phase != PhaseUnsealed || len(snap.sealer.Keyring().Versions()) < 2 {
		return
	}
	if _, err := m.finishRotationLocked(ctx, s, snap); err != nil {
		m.host.Logger().Warn("resuming the root key rotation", "error", err)
	}
}

// finishRotationLocked re-encrypts every entry under the active version and
// drops the others, returning how many entries changed. It is also how an
// interrupted rotation completes after a restart. m.mu is held.
func (m *Manager) finishRotationLocked(ctx context.Context, s logical.Storage, snap *Snapshot) (int, error) {
	n, err := snap.sealer.ResealAll(ctx, s)
	var planted *seal.PlaintextEntriesError
	var unreadable *seal.UnreadableEntriesError
	var problem error
	if errors.As(err, &planted) || errors.As(err, &unreadable) {
		// Entries that the plugin did not write (planted in plaintext,
		// edited, or older copies put back): never adopted, and
		// reported until a rotation finds them gone. They do not hold
		// the rotation up: nothing of the mount can be read from them,
		// before or after the old root key versions go.
		m.host.Logger().Error("storage holds entries this mount did not seal, or older copies of its entries; they are refused", "error", err)
		problem, err = err, nil
	}
	if cur := m.state.Load(); cur.problem != problem {
		next := *cur
		next.problem = problem
		m.setState(&next)
	}
	if err != nil {
		return n, fmt.Errorf("re-encrypting entries under the new root key (the rotation completes at the next rotation or restart): %w", err)
	}
	pruned := snap.sealer.Keyring().ActiveOnly()
	if err := m.storeKeyringLocked(ctx, s, m.state.Load(), pruned); err != nil {
		return n, err
	}
	// The manifest keeps its tombstones: a copy of seal/config from before
	// this rotation still opens the old versions (the KEK opens any copy),
	// and a deleted entry's old copy put back with it must stay refused.
	snap.sealer.SetKeyring(pruned)
	m.host.Logger().Info("root key rotated", "root_key_version", pruned.Active(), "entries_resealed", n)
	return n, nil
}
