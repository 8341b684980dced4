package mountseal

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
)

const (
	// Prefix holds what is stored as it is: the seal configuration with
	// the HSM-sealed root keyring.
	Prefix = "seal/"
	// ConfigPath holds Config.
	ConfigPath = Prefix + "config"

	// MaxCallTimeout bounds hsm_timeout, in seconds.
	MaxCallTimeout = 300
)

// IsPlainPath reports the storage paths the root key does not encrypt.
func IsPlainPath(path string) bool { return strings.HasPrefix(path, Prefix) }

// Config is the stored seal configuration, kept in plaintext: it is
// what unsealing needs before the root key is known. A storage writer can
// edit it, so nothing in it is trusted beyond that: the sealed keyring is
// authenticated by the KEK (the mount bound in its AAD), a changed library,
// token, PIN or label at worst fails to unseal, and everything that the
// unsealed mount acts on (the recovery public key, the emergency seal) lives
// in Meta, sealed under the root key.
type Config struct {
	Library    string `json:"library"`
	TokenLabel string `json:"token_label,omitempty"`
	Slot       *uint  `json:"slot,omitempty"`
	PIN        string `json:"pin"`
	KeyLabel   string `json:"key_label"`
	// Mechanism is how the keyring is to be sealed (hsm.SealMechanism;
	// empty, as written by versions before mechanisms, is aes-gcm), and
	// HMACKeyLabel the HMAC key of aes-cbc-hmac (empty: the KEK's label
	// with -hmac appended).
	Mechanism    string `json:"mechanism,omitempty"`
	HMACKeyLabel string `json:"hmac_key_label,omitempty"`
	// CallTimeout bounds each HSM operation, in seconds (0: the default).
	CallTimeout int `json:"hsm_timeout,omitempty"`

	// SealedKeyring is the root keyring sealed inside the HSM with
	// SealedMechanism under the KEK labelled SealedWith (and for
	// aes-cbc-hmac the HMAC key SealedHMAC), the mount bound in the AAD.
	SealedKeyring   []byte `json:"sealed_keyring"`
	SealedWith      string `json:"sealed_with"`
	SealedMechanism string `json:"sealed_mechanism,omitempty"`
	SealedHMAC      string `json:"sealed_hmac,omitempty"`
	// RootKeyVersion is the active root key version, for status while
	// sealed.
	RootKeyVersion uint32 `json:"root_key_version"`

	// RecoveryKeyring is the recovery copy: the keyring encrypted to the
	// recovery public key, opened only by M of N shares. It stays here,
	// not in Meta, because it is what recovers a mount whose HSM is
	// lost, when nothing sealed can be read; it changes with the keyring in
	// one write. RecoveryThreshold is a hint for restore's message; the
	// shares themselves decide.
	RecoveryKeyring   []byte `json:"recovery_keyring,omitempty"`
	RecoveryThreshold int    `json:"recovery_threshold,omitempty"`

	// EmergencySealed keeps the mount sealed across restarts without
	// touching the HSM. Clearing it here changes nothing: Meta holds
	// the flag too, checked at every unseal.
	EmergencySealed bool `json:"emergency_sealed,omitempty"`

	// Written by versions that kept the recovery public key in plaintext;
	// moved into Meta once, when such a mount is first unsealed.
	LegacyRecoveryPublicKey []byte `json:"recovery_public_key,omitempty"`
	LegacyRecoveryShares    int    `json:"recovery_shares,omitempty"`
}

// MetaPath holds Meta, sealed under the root key (and so in the
// manifest, which refuses an older copy).
const MetaPath = "config/seal-state"

// Meta is the seal's state that only the unsealed mount reads.
type Meta struct {
	// RecoveryPublicKey receives every new recovery copy; a storage writer
	// who could change it would get the next root keyring.
	RecoveryPublicKey []byte `json:"recovery_public_key,omitempty"`
	RecoveryShares    int    `json:"recovery_shares,omitempty"`
	RecoveryThreshold int    `json:"recovery_threshold,omitempty"`
	// RecoveryMACKey authenticates every recovery copy, so that restore
	// can tell the mount's copy from one a storage writer made for the
	// public key. Copies of a recovery set made before it existed are not
	// authenticated (restore then checks them against every sealed entry).
	RecoveryMACKey  []byte `json:"recovery_mac_key,omitempty"`
	EmergencySealed bool   `json:"emergency_sealed,omitempty"`
	// AntiRollback records that the manifest's anchor is kept in the
	// token (for status and for a new HSM after recovery; the object in
	// the token is what turns the check on).
	AntiRollback bool `json:"anti_rollback,omitempty"`
	// MigrationPending is set at the first seal until every entry written
	// before it (a mount taken over from built-in transit) is encrypted:
	// the one time plaintext entries are adopted.
	MigrationPending bool `json:"migration_pending,omitempty"`
}

// ReadMeta returns the sealed seal state s holds (s is the sealed view),
// nil when none.
func ReadMeta(ctx context.Context, s logical.Storage) (*Meta, error) {
	e, err := s.Get(ctx, MetaPath)
	if err != nil {
		return nil, fmt.Errorf("reading the seal state: %w", err)
	}
	if e == nil {
		return nil, nil
	}
	var meta Meta
	if err := json.Unmarshal(e.Value, &meta); err != nil {
		return nil, fmt.Errorf("decoding the seal state: %w", err)
	}
	return &meta, nil
}

// WriteMeta stores meta in s (the sealed view).
func WriteMeta(ctx context.Context, s logical.Storage, meta *Meta) error {
	b, err := json.Marshal(meta)
	if err != nil {
		return err
	}
	return s.Put(ctx, &logical.StorageEntry{Key: MetaPath, Value: b, SealWrap: true})
}

// PINSource tells how the PIN is given (env, file or value), for status
// without the PIN.
func (c *Config) PINSource() string {
	switch {
	case strings.HasPrefix(c.PIN, "env://"):
		return "env"
	case strings.HasPrefix(c.PIN, "file://"):
		return "file"
	}
	return "value"
}

// Check refuses a configuration that cannot name a token and a KEK: a
// missing field, a library the operator did not allow, a label the token
// cannot hold or a KEK label among the plugin's own, a PIN source that is
// not allowed. The library is stored as resolved, so that every spelling of
// one library is one configuration and one module.
func (c *Config) Check() error {
	var missing []string
	if c.Library == "" {
		missing = append(missing, "library")
	}
	if c.TokenLabel == "" && c.Slot == nil {
		missing = append(missing, "token_label (or slot)")
	}
	if c.PIN == "" {
		missing = append(missing, "pin")
	}
	if c.KeyLabel == "" {
		missing = append(missing, "key_label")
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing %v", missing)
	}
	lib, err := hsm.ResolveLibrary(c.Library)
	if err != nil {
		return errors.Unwrap(err)
	}
	c.Library = lib
	if c.TokenLabel != "" {
		if err := hsm.CheckTokenLabel(c.TokenLabel); err != nil {
			return errors.Unwrap(err)
		}
	}
	if err := CheckKEKLabel(c.KeyLabel); err != nil {
		return err
	}
	if _, err := resolvePIN(c.PIN); err != nil {
		return err
	}
	return nil
}

// HSMConfig is the token configuration of a seal configuration.
func (c *Config) HSMConfig() (hsm.Config, error) {
	pin, err := resolvePIN(c.PIN)
	if err != nil {
		return hsm.Config{}, err
	}
	return hsm.Config{Library: c.Library, TokenLabel: c.TokenLabel, Slot: c.Slot, PIN: pin,
		CallTimeout: time.Duration(c.CallTimeout) * time.Second}, nil
}

// HSMTimeout is the deadline of the configuration's HSM operations.
func (c *Config) HSMTimeout() time.Duration {
	if c.CallTimeout > 0 {
		return time.Duration(c.CallTimeout) * time.Second
	}
	return hsm.DefaultCallTimeout
}

// ConfiguredKeys are the keys the configuration names, to seal with.
func (c *Config) ConfiguredKeys() hsm.SealKeys {
	k := hsm.SealKeys{Mechanism: hsm.SealMechanism(c.Mechanism), Label: c.KeyLabel}
	if k.Mechanism == "" {
		k.Mechanism = hsm.AESGCM
	}
	if k.Mechanism == hsm.AESCBCHMAC {
		k.HMACLabel = c.HMACKeyLabel
		if k.HMACLabel == "" {
			k.HMACLabel = hsm.DefaultHMACLabel(c.KeyLabel)
		}
	}
	return k
}

// SealedKeys are the keys the stored keyring is sealed with.
func (c *Config) SealedKeys() hsm.SealKeys {
	k := hsm.SealKeys{Mechanism: hsm.SealMechanism(c.SealedMechanism), Label: c.SealedWith, HMACLabel: c.SealedHMAC}
	if k.Mechanism == "" {
		k.Mechanism = hsm.AESGCM
	}
	return k
}

// ReadConfig returns the stored seal configuration, nil when none.
func ReadConfig(ctx context.Context, s logical.Storage) (*Config, error) {
	e, err := s.Get(ctx, ConfigPath)
	if err != nil {
		return nil, fmt.Errorf("reading the seal configuration: %w", err)
	}
	if e == nil {
		return nil, nil
	}
	var cfg Config
	if err := json.Unmarshal(e.Value, &cfg); err != nil {
		return nil, fmt.Errorf("decoding the seal configuration: %w", err)
	}
	return &cfg, nil
}

// WriteConfig stores the configuration in one Put, so that the sealed
// keyring and the label that sealed it change together.
func WriteConfig(ctx context.Context, s logical.Storage, cfg *Config) error {
	b, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	return s.Put(ctx, &logical.StorageEntry{Key: ConfigPath, Value: b, SealWrap: true})
}
