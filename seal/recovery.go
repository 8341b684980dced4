package seal

import (
	"bytes"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/hpke"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

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
	return newRecovery(shares, threshold, nil)
}

// newRecovery is NewRecovery; withSeed, when set, sees the seed before it is
// forgotten.
func newRecovery(shares, threshold int, withSeed func(seed []byte) error) (public []byte, parts []string, err error) {
	if threshold < 2 {
		return nil, nil, errors.New("threshold must be at least 2: one share alone would be the whole key")
	}
	if shares < threshold {
		return nil, nil, fmt.Errorf("shares (%d) cannot be fewer than threshold (%d)", shares, threshold)
	}
	if shares > 255 {
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
	if withSeed != nil {
		if err := withSeed(seed); err != nil {
			return nil, nil, err
		}
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

// The recovery copy is public-key encrypted, so anyone who can read the
// public key can make a copy of a keyring of their own, and a storage writer
// could plant it for the custodians to "recover". An authenticated copy
// carries an HMAC under a key derived from the recovery seed, kept sealed
// under the root key for the plugin's later copies: only the plugin (or the
// shares) can make one. Format: magic, tag, HPKE ciphertext. A copy without
// the magic is one made before copies were authenticated.
var recoveryCopyMagic = []byte("hsr\x02")

const recoveryTagSize = sha256.Size

// recoveryMACKey derives the key that authenticates recovery copies.
func recoveryMACKey(seed []byte) ([]byte, error) {
	return hkdf.Key(sha256.New, seed, nil, "hsm-transit/recovery-copy-mac", 32)
}

func recoveryTag(macKey, info, ct []byte) []byte {
	mac := hmac.New(sha256.New, macKey)
	mac.Write([]byte("hsm-transit/recovery-copy\x00"))
	mac.Write(binary.BigEndian.AppendUint32(nil, uint32(len(info))))
	mac.Write(info)
	mac.Write(ct)
	return mac.Sum(nil)
}

// NewAuthenticatedRecovery is NewRecovery that also returns the key which
// authenticates recovery copies (SealForRecoveryWithMAC); keep it sealed.
func NewAuthenticatedRecovery(shares, threshold int) (public, macKey []byte, parts []string, err error) {
	public, parts, err = newRecovery(shares, threshold, func(seed []byte) error {
		var derr error
		macKey, derr = recoveryMACKey(seed)
		return derr
	})
	return public, macKey, parts, err
}

// SealForRecovery encrypts the keyring to the recovery public key; info
// binds the copy to its mount. The copy is not authenticated: see
// SealForRecoveryWithMAC.
func SealForRecovery(public, info []byte, ring *Keyring) ([]byte, error) {
	return SealForRecoveryWithMAC(public, nil, info, ring)
}

// SealForRecoveryWithMAC encrypts the keyring to the recovery public key and,
// with macKey, authenticates the copy.
func SealForRecoveryWithMAC(public, macKey, info []byte, ring *Keyring) ([]byte, error) {
	pk, err := recoveryKEM().NewPublicKey(public)
	if err != nil {
		return nil, fmt.Errorf("reading the recovery public key: %w", err)
	}
	raw, err := ring.Marshal()
	if err != nil {
		return nil, err
	}
	defer clear(raw)
	ct, err := hpke.Seal(pk, hpke.HKDFSHA256(), hpke.AES256GCM(), info, raw)
	if err != nil || macKey == nil {
		return ct, err
	}
	return slices.Concat(recoveryCopyMagic, recoveryTag(macKey, info, ct), ct), nil
}

// ErrSharesDoNotOpen means the shares given do not rebuild the recovery key:
// too few, a wrong one, or shares of another recovery set.
var ErrSharesDoNotOpen = errors.New("the shares do not open the recovery copy (too few, a wrong share, or shares of another recovery set)")

// ErrRecoveryCopyForged means the shares are right but the copy's tag is
// not: the copy was not made by this mount.
var ErrRecoveryCopyForged = errors.New("the recovery copy is not authenticated by this recovery set: it was not made by this mount (replaced in storage?)")

// OpenWithShares rebuilds the recovery key from shares and opens the copy.
func OpenWithShares(parts []string, info, sealed []byte) (*Keyring, error) {
	ring, _, err := OpenRecovery(parts, info, sealed)
	return ring, err
}

// distinctShares refuses what shamir.Combine would refuse as a "duplicate
// part": two shares with the same x-coordinate (a share's last byte). The
// same share given twice is the caller's slip, said as such; two different
// shares with the same coordinate cannot come from one recovery set (a
// set's shares have distinct coordinates), so they do not open it, whose
// error is the one every other share of another set gets.
func distinctShares(decoded [][]byte) error {
	for i := range decoded {
		for j := i + 1; j < len(decoded); j++ {
			if decoded[i][len(decoded[i])-1] != decoded[j][len(decoded[j])-1] {
				continue
			}
			if bytes.Equal(decoded[i], decoded[j]) {
				return fmt.Errorf("share %d and share %d are the same share; give shares that are all different", i+1, j+1)
			}
			return ErrSharesDoNotOpen
		}
	}
	return nil
}

// OpenRecovery rebuilds the recovery key from shares and opens the copy. An
// authenticated copy whose tag does not verify is refused; authenticated
// reports whether the copy carried a tag (copies made before they were
// authenticated do not, and need another check).
func OpenRecovery(parts []string, info, sealed []byte) (ring *Keyring, authenticated bool, err error) {
	decoded := make([][]byte, 0, len(parts))
	defer func() {
		for _, d := range decoded {
			clear(d)
		}
	}()
	for i, p := range parts {
		d, err := base64.StdEncoding.DecodeString(p)
		if err != nil || len(d) != recoverySeedSize+1 {
			return nil, false, fmt.Errorf("share %d is not a recovery share", i+1)
		}
		decoded = append(decoded, d)
	}
	if len(decoded) < 2 {
		return nil, false, ErrSharesDoNotOpen
	}
	if err := distinctShares(decoded); err != nil {
		return nil, false, err
	}
	seed, err := shamir.Combine(decoded)
	if err != nil {
		return nil, false, fmt.Errorf("combining the shares: %w", err)
	}
	defer clear(seed)
	priv, err := recoveryKEM().NewPrivateKey(seed)
	if err != nil {
		return nil, false, ErrSharesDoNotOpen
	}
	ct := sealed
	if rest, ok := bytes.CutPrefix(sealed, recoveryCopyMagic); ok {
		if len(rest) <= recoveryTagSize {
			// A tag and no ciphertext, or less: nothing this set made.
			return nil, false, ErrRecoveryCopyForged
		}
		authenticated, ct = true, rest[recoveryTagSize:]
		macKey, err := recoveryMACKey(seed)
		if err != nil {
			return nil, false, err
		}
		defer clear(macKey)
		if !hmac.Equal(rest[:recoveryTagSize], recoveryTag(macKey, info, ct)) {
			// The shares may simply be the wrong ones: HPKE tells.
			if _, err := hpke.Open(priv, hpke.HKDFSHA256(), hpke.AES256GCM(), info, ct); err != nil {
				return nil, false, ErrSharesDoNotOpen
			}
			return nil, false, ErrRecoveryCopyForged
		}
	}
	raw, err := hpke.Open(priv, hpke.HKDFSHA256(), hpke.AES256GCM(), info, ct)
	if err != nil {
		return nil, false, ErrSharesDoNotOpen
	}
	defer clear(raw)
	ring, err = UnmarshalKeyring(raw)
	return ring, authenticated, err
}
