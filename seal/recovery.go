package seal

import (
	"crypto/hpke"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"

	"github.com/hashicorp/vault/shamir"
)

// Recovery keeps a copy of the root keyring that M of N shares can open when
// the HSM is lost. The copy is encrypted to a public key (HPKE with the
// hybrid post-quantum KEM X-Wing, MLKEM768-X25519, HKDF-SHA256 and
// AES-256-GCM), so that it stays current through root key rotations without
// the shares; the private key's 32-byte seed is what Shamir's scheme splits.

const recoverySeedSize = 32

func recoveryKEM() hpke.KEM { return hpke.MLKEM768X25519() }

// NewRecovery makes a recovery key pair and splits its seed into shares, of
// which threshold open the copy. It returns the public key and the shares,
// base64-encoded; the seed is forgotten.
func NewRecovery(shares, threshold int) (public []byte, parts []string, err error) {
	switch {
	case threshold < 2:
		return nil, nil, errors.New("threshold must be at least 2: one share alone would be the whole key")
	case shares < threshold:
		return nil, nil, fmt.Errorf("shares (%d) cannot be fewer than threshold (%d)", shares, threshold)
	case shares > 255:
		return nil, nil, errors.New("shares cannot exceed 255")
	}
	seed := make([]byte, recoverySeedSize)
	if _, err := rand.Read(seed); err != nil {
		return nil, nil, err
	}
	defer clear(seed)
	priv, err := recoveryKEM().NewPrivateKey(seed)
	if err != nil {
		return nil, nil, fmt.Errorf("deriving the recovery key: %w", err)
	}
	split, err := shamir.Split(seed, shares, threshold)
	if err != nil {
		return nil, nil, fmt.Errorf("splitting the recovery key: %w", err)
	}
	for _, s := range split {
		parts = append(parts, base64.StdEncoding.EncodeToString(s))
		clear(s)
	}
	return priv.PublicKey().Bytes(), parts, nil
}

// SealForRecovery encrypts the keyring to the recovery public key; info
// binds the copy to its mount.
func SealForRecovery(public, info []byte, ring *Keyring) ([]byte, error) {
	pk, err := recoveryKEM().NewPublicKey(public)
	if err != nil {
		return nil, fmt.Errorf("reading the recovery public key: %w", err)
	}
	raw, err := ring.Marshal()
	if err != nil {
		return nil, err
	}
	defer clear(raw)
	return hpke.Seal(pk, hpke.HKDFSHA256(), hpke.AES256GCM(), info, raw)
}

// ErrSharesDoNotOpen means the shares given do not rebuild the recovery key:
// too few, a wrong one, or shares of another recovery set.
var ErrSharesDoNotOpen = errors.New("the shares do not open the recovery copy (too few, a wrong share, or shares of another recovery set)")

// OpenWithShares rebuilds the recovery key from shares and opens the copy.
func OpenWithShares(parts []string, info, sealed []byte) (*Keyring, error) {
	decoded := make([][]byte, 0, len(parts))
	defer func() {
		for _, d := range decoded {
			clear(d)
		}
	}()
	for i, p := range parts {
		d, err := base64.StdEncoding.DecodeString(p)
		if err != nil || len(d) != recoverySeedSize+1 {
			return nil, fmt.Errorf("share %d is not a recovery share", i+1)
		}
		decoded = append(decoded, d)
	}
	if len(decoded) < 2 {
		return nil, ErrSharesDoNotOpen
	}
	seed, err := shamir.Combine(decoded)
	if err != nil {
		return nil, fmt.Errorf("combining the shares: %w", err)
	}
	defer clear(seed)
	priv, err := recoveryKEM().NewPrivateKey(seed)
	if err != nil {
		return nil, ErrSharesDoNotOpen
	}
	raw, err := hpke.Open(priv, hpke.HKDFSHA256(), hpke.AES256GCM(), info, sealed)
	if err != nil {
		return nil, ErrSharesDoNotOpen
	}
	defer clear(raw)
	return UnmarshalKeyring(raw)
}
