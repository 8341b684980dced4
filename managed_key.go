package hsmtransit

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/hsmkey"
)

// managedKey is one key of the mount as the paths that manage keys see it
// (keys/:name, rotate, trim, config, and the rotations the plugin makes by
// itself), whether its material is a keysutil policy in storage
// (softwareKey) or objects in the HSM (hsmResidentKey). lockKey hands it out
// locked; its methods run under that lock and return errors of the kinds of
// errors.go. Encrypting and decrypting go through keyCipher (key_cipher.go).
type managedKey interface {
	// describe is keys/:name's answer, with the key's lifecycle.
	describe(ctx context.Context, s logical.Storage, keyContext []byte) (*logical.Response, error)
	// latest is the latest version.
	latest() int
	// rotate adds a version, unless the key cannot be rotated (an
	// imported key that does not allow it: refuseRotation says why).
	rotate(ctx context.Context, s logical.Storage) error
	// refuseRotation is why the key cannot be rotated within Vault, or "".
	refuseRotation() string
	// rotationDue reports whether auto_rotate_period has passed since the
	// latest version was made.
	rotationDue(now time.Time) bool
	// trim raises min_available_version by built-in transit's rules; an
	// HSM-resident key also destroys the objects of the versions below.
	trim(ctx context.Context, s logical.Storage, minAvailable int) error
	// configure applies a configuration change and returns a warning for
	// the caller; a refused change leaves the key as it was.
	configure(ctx context.Context, s logical.Storage, change keyConfigChange, lc lifecycleChange) (string, error)
	// residency names where the key lives, for logs.
	residency() string
}

// lockKey finds the key named name, of either residency, locked shared or
// exclusive; it is nil when there is none. unlock must be called once,
// whatever is returned.
func (b *backend) lockKey(ctx context.Context, s logical.Storage, name string, exclusive bool) (managedKey, func(), error) {
	if k, unlock, err := b.hsmKeyFor(ctx, s, name, exclusive); err != nil || k != nil {
		if err != nil {
			return nil, unlock, err
		}
		return hsmResidentKey{b: b, k: k}, unlock, nil
	}
	p, unlock, err := b.readPolicy(ctx, s, name, exclusive)
	if err != nil || p == nil {
		return nil, unlock, err
	}
	return softwareKey{b: b, p: p}, unlock, nil
}

// softwareKey is a keysutil policy.
type softwareKey struct {
	b *backend
	p *keysutil.Policy
}

func (k softwareKey) describe(ctx context.Context, s logical.Storage, keyContext []byte) (*logical.Response, error) {
	return k.b.describeKey(ctx, s, k.p, keyContext)
}

func (k softwareKey) latest() int { return k.p.LatestVersion }

func (k softwareKey) residency() string { return "software" }

func (k softwareKey) refuseRotation() string {
	if k.p.Imported && !k.p.AllowImportedKeyRotation {
		return fmt.Sprintf("imported key %s does not allow rotation within Vault", k.p.Name)
	}
	return ""
}

func (k softwareKey) rotate(ctx context.Context, s logical.Storage) error {
	if why := k.refuseRotation(); why != "" {
		// keysutil refuses this with a plain error; it is the caller's.
		return callerErr("%s", why)
	}
	if err := k.p.Rotate(ctx, s, k.b.GetRandomReader()); err != nil {
		return fmt.Errorf("rotating key %q: %w", k.p.Name, err)
	}
	return nil
}

func (k softwareKey) rotationDue(now time.Time) bool {
	if k.p.AutoRotatePeriod == 0 || k.refuseRotation() != "" {
		return false
	}
	latest, ok := k.p.Keys[strconv.Itoa(k.p.LatestVersion)]
	return ok && !now.Before(latest.CreationTime.Add(k.p.AutoRotatePeriod))
}

func (k softwareKey) trim(ctx context.Context, s logical.Storage, minAvailable int) error {
	p := k.p
	if err := checkTrim(p.MinAvailableVersion, p.MinEncryptionVersion, p.MinDecryptionVersion, minAvailable); err != nil {
		return callerErr("%s", err)
	}
	prev := p.MinAvailableVersion
	p.MinAvailableVersion = minAvailable
	if err := p.Persist(ctx, s); err != nil {
		p.MinAvailableVersion = prev
		return fmt.Errorf("persisting trimmed key: %w", err)
	}
	return nil
}

func (k softwareKey) configure(ctx context.Context, s logical.Storage, change keyConfigChange, lc lifecycleChange) (string, error) {
	p := k.p
	// Work on a copy of the settings so that a refused change leaves the
	// cached policy untouched.
	next := keySettingsOf(p)
	warning, err := next.apply(p.LatestVersion, p.MinAvailableVersion, change)
	if err != nil {
		return "", callerErr("%s", err)
	}
	if err := k.b.checkLifecycleChange(ctx, s, p.Name, lc); err != nil {
		return "", err
	}
	if prev := keySettingsOf(p); next != prev {
		next.storeIn(p)
		if err := p.Persist(ctx, s); err != nil {
			prev.storeIn(p)
			return "", fmt.Errorf("persisting key configuration: %w", err)
		}
	}
	return warning, k.b.applyLifecycleChange(ctx, s, p.Name, lc)
}

// hsmResidentKey is a key whose versions are AES keys inside the HSM.
type hsmResidentKey struct {
	b *backend
	k *hsmkey.Key
}

func (k hsmResidentKey) describe(ctx context.Context, s logical.Storage, _ []byte) (*logical.Response, error) {
	return k.b.describeHSMKey(ctx, s, k.k)
}

func (k hsmResidentKey) latest() int { return k.k.LatestVersion }

func (k hsmResidentKey) residency() string { return "HSM-resident" }

func (k hsmResidentKey) refuseRotation() string { return "" }

func (k hsmResidentKey) rotate(ctx context.Context, s logical.Storage) error {
	return k.b.hsmKeys.Rotate(ctx, s, k.k)
}

func (k hsmResidentKey) rotationDue(now time.Time) bool {
	return k.k.AutoRotatePeriod != 0 && !now.Before(k.k.Versions[k.k.LatestVersion].Created.Add(k.k.AutoRotatePeriod))
}

func (k hsmResidentKey) trim(ctx context.Context, s logical.Storage, minAvailable int) error {
	if err := checkTrim(k.k.MinAvailableVersion, k.k.MinEncryptionVersion, k.k.MinDecryptionVersion, minAvailable); err != nil {
		return callerErr("%s", err)
	}
	k.k.MinAvailableVersion = minAvailable
	return k.b.hsmKeys.DestroyBelow(ctx, s, k.k, minAvailable)
}

func (k hsmResidentKey) configure(ctx context.Context, s logical.Storage, change keyConfigChange, lc lifecycleChange) (string, error) {
	return k.b.configureHSMKey(ctx, s, k.k, change, lc)
}
