package hsmtransit

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/hashicorp/vault/sdk/helper/keysutil"
)

// maxBackupVersions bounds the versions a restored key may span. keysutil
// allocates its archive for the whole span, so a backup that claims a
// latest_version of a billion takes the process down; the span must also be
// backed by keys the backup actually holds (checkBackup).
const maxBackupVersions = 1 << 20

// checkBackup validates a backup completely before keysutil sees it:
// keysutil trusts a backup's versions and indexes its archive with them,
// and panics or allocates without bound on one that is edited. It returns
// the backed-up key's name; the error names the field to fix.
func checkBackup(backup string) (string, error) {
	raw, err := base64.StdEncoding.DecodeString(backup)
	if err != nil {
		return "", fmt.Errorf("not base64: %w", err)
	}
	var kd keysutil.KeyData
	if err := json.Unmarshal(raw, &kd); err != nil {
		return "", fmt.Errorf("not a transit key backup: %w", err)
	}
	p := kd.Policy
	if p == nil {
		return "", errors.New("the backup holds no key policy")
	}
	if err := checkBackupVersions(p); err != nil {
		return "", err
	}
	if kd.ArchivedKeys == nil {
		return "", errors.New("archived_keys is missing: a backup holds the key's archive")
	}
	archive := kd.ArchivedKeys.Keys
	// keysutil indexes the archive from min_available_version and grows it
	// to the latest version: the span must be held by the backup.
	span := p.LatestVersion - p.MinAvailableVersion + 1
	if span > len(archive)+len(p.Keys)+1 {
		return "", fmt.Errorf("policy.latest_version %d and policy.min_available_version %d span %d versions, but the backup holds %d keys and %d archived ones",
			p.LatestVersion, p.MinAvailableVersion, span, len(p.Keys), len(archive))
	}
	if p.ArchiveMinVersion > p.MinAvailableVersion || p.MinAvailableVersion-p.ArchiveMinVersion > len(archive) {
		return "", fmt.Errorf("policy.archive_min_version %d does not fit policy.min_available_version %d and an archive of %d keys",
			p.ArchiveMinVersion, p.MinAvailableVersion, len(archive))
	}
	if p.ArchiveVersion+1 < p.MinAvailableVersion {
		return "", fmt.Errorf("policy.archive_version %d is below policy.min_available_version %d", p.ArchiveVersion, p.MinAvailableVersion)
	}
	for v, k := range p.Keys {
		if err := checkBackupKey(p, "policy.keys."+v, k); err != nil {
			return "", err
		}
	}
	return p.Name, nil
}

// checkBackupVersions checks the policy's version fields against each other
// and against the keys it holds.
func checkBackupVersions(p *keysutil.Policy) error {
	switch {
	case p.LatestVersion < 1 || p.LatestVersion > maxBackupVersions:
		return fmt.Errorf("policy.latest_version %d is out of range (1 to %d)", p.LatestVersion, maxBackupVersions)
	case p.MinDecryptionVersion < 1 || p.MinDecryptionVersion > p.LatestVersion:
		return fmt.Errorf("policy.min_decryption_version %d is out of range (1 to latest_version %d)", p.MinDecryptionVersion, p.LatestVersion)
	case p.MinEncryptionVersion != 0 && (p.MinEncryptionVersion < p.MinDecryptionVersion || p.MinEncryptionVersion > p.LatestVersion):
		return fmt.Errorf("policy.min_encryption_version %d is out of range (0, or min_decryption_version %d to latest_version %d)", p.MinEncryptionVersion, p.MinDecryptionVersion, p.LatestVersion)
	case p.MinAvailableVersion < 0 || p.MinAvailableVersion > p.MinDecryptionVersion:
		return fmt.Errorf("policy.min_available_version %d is out of range (0 to min_decryption_version %d)", p.MinAvailableVersion, p.MinDecryptionVersion)
	case p.ArchiveVersion < 0 || p.ArchiveVersion > p.LatestVersion:
		return fmt.Errorf("policy.archive_version %d is out of range (0 to latest_version %d)", p.ArchiveVersion, p.LatestVersion)
	case p.ArchiveMinVersion < 0:
		return fmt.Errorf("policy.archive_min_version %d is negative", p.ArchiveMinVersion)
	case p.Keys == nil:
		return errors.New("policy.keys is missing")
	case len(p.Keys) > p.LatestVersion:
		return fmt.Errorf("policy.keys holds %d keys, more than latest_version %d", len(p.Keys), p.LatestVersion)
	}
	if p.Type.String() == "[unknown]" {
		return fmt.Errorf("policy.type %d is not a key type", p.Type)
	}
	for v := range p.Keys {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > p.LatestVersion {
			return fmt.Errorf("policy.keys has version %q, not a version from 1 to latest_version %d", v, p.LatestVersion)
		}
	}
	// Every version from min_decryption_version on is in keys: keysutil
	// otherwise moves it from the archive, indexing it blindly.
	for v := p.MinDecryptionVersion; v <= p.LatestVersion; v++ {
		if _, ok := p.Keys[strconv.Itoa(v)]; !ok {
			return fmt.Errorf("policy.keys lacks version %d (every version from min_decryption_version %d to latest_version %d must be there)", v, p.MinDecryptionVersion, p.LatestVersion)
		}
	}
	return nil
}

// checkBackupKey checks the key material of an AES or ChaCha20 version's
// entry: the length its type needs. Other types' keys are parsed by
// keysutil when used, which refuses a malformed one with an error.
func checkBackupKey(p *keysutil.Policy, field string, k keysutil.KeyEntry) error {
	want := 0
	switch p.Type {
	case keysutil.KeyType_AES128_GCM96:
		want = 16
	case keysutil.KeyType_AES256_GCM96, keysutil.KeyType_ChaCha20_Poly1305:
		want = 32
	}
	if want != 0 && len(k.Key) != want {
		return fmt.Errorf("%s.key is %d bytes; a %s key is %d bytes", field, len(k.Key), p.Type, want)
	}
	return nil
}
