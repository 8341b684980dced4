package hsmtransit

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// Anti-rollback: the manifest refuses an older copy of any entry while the
// mount is unsealed, but across a restart it trusts the manifest root it
// finds in storage, so a storage writer who puts back an older root with
// the buckets and entries of its time rolls those entries back (a policy
// before min_decryption_version went up, a deleted key). With
// anti_rollback=true the manifest's anchor, a number that grows with every
// change, is kept in a data object in the token, written after each
// manifest root is stored, and unsealing refuses storage whose anchor is
// below it. It costs one token write per storage write of the mount; the
// encrypt and decrypt paths write storage only to reserve usage counts,
// once per 4096 encryptions of a key version.

// antiRollbackLabel names the mount's anchor object in the token. Its
// existence is what turns the check on: a storage writer cannot remove it.
func (m *sealManager) antiRollbackLabel() string {
	return hsmNamespace + m.mountID + "/anti-rollback"
}

// anchorFunc writes the anchor to the mount's current token.
func (m *sealManager) anchorFunc() seal.AnchorFunc {
	label := m.antiRollbackLabel()
	return func(_ context.Context, anchor uint64) error {
		tok := m.currentToken()
		if tok == nil {
			return errors.New("no HSM token is open to keep the anti-rollback anchor")
		}
		return tok.WriteData(label, binary.BigEndian.AppendUint64(nil, anchor))
	}
}

// checkAnchor compares the loaded manifest with the anchor in tok, when
// there is one, and keeps the anchor current from now on.
func (m *sealManager) checkAnchor(tok *hsm.Token, sealer *seal.Sealer) error {
	value, found, err := tok.ReadData(m.antiRollbackLabel())
	if err != nil || !found {
		return err
	}
	if len(value) != 8 {
		return &hsm.Error{Kind: hsm.Failed, Op: "read anti-rollback anchor", Err: fmt.Errorf("the anchor object holds %d bytes, not 8", len(value))}
	}
	kept := binary.BigEndian.Uint64(value)
	stored, _ := sealer.Anchor()
	if stored < kept {
		return fmt.Errorf("%w: the manifest in storage is older than the one anchored in the HSM (anchor %d, the HSM holds %d): storage was rolled back to an earlier snapshot, refused (anti_rollback)", errStorageNotSealed, stored, kept)
	}
	sealer.SetAnchor(m.anchorFunc())
	return nil
}

// setAntiRollbackLocked turns the anchor on or off for an unsealed mount.
// m.mu is held.
func (m *sealManager) setAntiRollbackLocked(ctx context.Context, s logical.Storage, on bool) error {
	snap := m.state.Load()
	if snap.phase != phaseUnsealed || m.token == nil {
		return sealUnavailable(snap)
	}
	label := m.antiRollbackLabel()
	if on {
		// The object first: until the hook is set it may lag behind
		// storage, which unsealing accepts.
		anchor, _ := snap.sealer.Anchor()
		if err := m.token.WriteData(label, binary.BigEndian.AppendUint64(nil, anchor)); err != nil {
			return err
		}
		snap.sealer.SetAnchor(m.anchorFunc())
	} else {
		snap.sealer.SetAnchor(nil)
		if err := m.token.DestroyData(label); err != nil {
			return err
		}
	}
	if snap.meta.AntiRollback == on {
		return nil
	}
	meta := *snap.meta
	meta.AntiRollback = on
	if err := writeSealMeta(ctx, snap.sealer.Wrap(s), &meta); err != nil {
		return err
	}
	next := *m.state.Load()
	next.meta = &meta
	m.state.Store(&next)
	return nil
}
