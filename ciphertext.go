package hsmtransit

import (
	"encoding/base64"
	"strconv"
	"strings"

	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
)

// The ciphertext format and version rules of transit, for the paths that
// encrypt outside keysutil (the cached AEAD of software keys, and
// HSM-resident keys): vault:v<N>:<base64>, with keysutil's messages.

const ciphertextPrefix = "vault:v"

// encryptionVersion resolves the version an encryption uses: requested, or
// the latest for 0, within [minEncryption, latest].
func encryptionVersion(requested, latest, minEncryption int) (int, error) {
	switch {
	case requested == 0:
		return latest, nil
	case requested < 0:
		return 0, errutil.UserError{Err: "requested version for encryption is negative"}
	case requested > latest:
		return 0, errutil.UserError{Err: "requested version for encryption is higher than the latest key version"}
	case requested < minEncryption:
		return 0, errutil.UserError{Err: "requested version for encryption is less than the minimum encryption key version"}
	}
	return requested, nil
}

// decodePlaintext decodes an item's base64 plaintext.
func decodePlaintext(b64 string) ([]byte, error) {
	pt, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, errutil.UserError{Err: err.Error()}
	}
	return pt, nil
}

// formatCiphertext is vault:v<ver>:<base64 of raw>.
func formatCiphertext(ver int, raw []byte) string {
	return ciphertextPrefix + strconv.Itoa(ver) + ":" + base64.StdEncoding.EncodeToString(raw)
}

// parseCiphertext reads vault:v<N>:<base64> and checks N against the key's
// window [minDecryption, latest], in keysutil's order.
func parseCiphertext(ct string, latest, minDecryption int) (int, []byte, error) {
	if !strings.HasPrefix(ct, ciphertextPrefix) {
		return 0, nil, errutil.UserError{Err: "invalid ciphertext: no prefix"}
	}
	parts := strings.SplitN(ct[len(ciphertextPrefix):], ":", 2)
	if len(parts) != 2 {
		return 0, nil, errutil.UserError{Err: "invalid ciphertext: wrong number of fields"}
	}
	ver, err := strconv.Atoi(parts[0])
	if err != nil {
		return 0, nil, errutil.UserError{Err: "invalid ciphertext: version number could not be decoded"}
	}
	if ver == 0 {
		ver = 1 // keys from before versions started at 1
	}
	if ver > latest {
		return 0, nil, errutil.UserError{Err: "invalid ciphertext: version is too new"}
	}
	if minDecryption > 0 && ver < minDecryption {
		return 0, nil, errutil.UserError{Err: keysutil.ErrTooOld}
	}
	raw, err := base64.StdEncoding.DecodeString(parts[1])
	if err != nil {
		return 0, nil, errutil.UserError{Err: "invalid ciphertext: could not decode base64"}
	}
	return ver, raw, nil
}
