package mountseal

import "github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"

// Test hooks: used only by tests (of this package and of the backend), which
// reach into the seal to hold it still or to fault it at a chosen moment.

// HoldLockForTest takes the seal's lock, as a transition under way does,
// and returns its release.
func (m *Manager) HoldLockForTest() (release func()) {
	m.mu.Lock()
	return m.mu.Unlock
}

// TokenUnderLockForTest returns the mount's token as the seal's
// transitions see it, under the lock.
func (m *Manager) TokenUnderLockForTest() *hsm.Token {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.token
}

// WaitReloadsForTest waits for the reloads that invalidations started.
func (m *Manager) WaitReloadsForTest() { m.reloads.Wait() }

// SetRotationStoredHookForTest sets f to run between storing a rotated
// keyring and resealing the entries (nil: nothing).
func (m *Manager) SetRotationStoredHookForTest(f func()) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.rotationStored = f
}
