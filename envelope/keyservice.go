package envelope

import (
	"context"
	"fmt"
	"strings"
)

// KeyService is what the format needs from Vault's transit API. Each method is
// one Vault request; mount and key name the transit mount and key, and
// keyContext is the derivation context of derived keys (nil otherwise).
// Implementations must not put key material in their errors.
type KeyService interface {
	// DataKey returns a new 256-bit data key, in plaintext and wrapped by
	// mount/key (transit/datakey/plaintext/KEY with bits=256).
	DataKey(ctx context.Context, mount, key string, keyContext []byte) (plaintext []byte, wrapped string, err error)
	// Wrap encrypts plaintext with mount/key (transit/encrypt/KEY). It wraps
	// the data key for the second and later recipients.
	Wrap(ctx context.Context, mount, key string, keyContext, plaintext []byte) (wrapped string, err error)
	// Unwrap decrypts a wrapped data key (transit/decrypt/KEY).
	Unwrap(ctx context.Context, mount, key string, keyContext []byte, wrapped string) (plaintext []byte, err error)
	// Rewrap re-encrypts a wrapped data key under the latest version of
	// mount/key without revealing it (transit/rewrap/KEY).
	Rewrap(ctx context.Context, mount, key string, keyContext []byte, wrapped string) (rewrapped string, err error)
}

// KeyRef names a transit key: the mount path (which may contain slashes) and
// the key name.
type KeyRef struct {
	Mount string
	Key   string
}

// String returns MOUNT/KEY.
func (k KeyRef) String() string { return k.Mount + "/" + k.Key }

// ParseKeyRef parses MOUNT/KEY, as the CLI's -k flag takes it. The key name is
// the part after the last slash, so the mount may itself contain slashes
// ("team/transit/backups").
func ParseKeyRef(s string) (KeyRef, error) {
	s = strings.Trim(s, "/")
	i := strings.LastIndexByte(s, '/')
	if i <= 0 || i == len(s)-1 {
		return KeyRef{}, fmt.Errorf("envelope: key reference %q: want MOUNT/KEY", s)
	}
	ref := KeyRef{Mount: s[:i], Key: s[i+1:]}
	if err := checkHint("mount", ref.Mount); err != nil {
		return KeyRef{}, err
	}
	if err := checkHint("key", ref.Key); err != nil {
		return KeyRef{}, err
	}
	return ref, nil
}
