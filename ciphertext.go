package hsmtransit

import (
	"encoding/base64"
	"strconv"
	"strings"
	"unsafe"

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

// formatCiphertext is vault:v<ver>:<base64 of raw>, built in one
// allocation.
func formatCiphertext(ver int, raw []byte) string {
	var digits [20]byte
	v := strconv.AppendInt(digits[:0], int64(ver), 10)
	out := make([]byte, 0, len(ciphertextPrefix)+len(v)+1+base64.StdEncoding.EncodedLen(len(raw)))
	out = append(append(append(out, ciphertextPrefix...), v...), ':')
	out = base64.StdEncoding.AppendEncode(out, raw)
	// out is not written again: the string may share it.
	return unsafe.String(unsafe.SliceData(out), len(out))
}

// encodeBase64 is base64.StdEncoding.EncodeToString in one allocation
// (EncodeToString makes the bytes, then copies them into the string).
func encodeBase64(src []byte) string {
	out := base64.StdEncoding.AppendEncode(make([]byte, 0, base64.StdEncoding.EncodedLen(len(src))), src)
	return unsafe.String(unsafe.SliceData(out), len(out))
}

// parseCiphertext reads vault:v<N>:<base64> and checks N against the key's
// window [minDecryption, latest], in keysutil's order.
func parseCiphertext(ct string, latest, minDecryption int) (int, []byte, error) {
	return parseCiphertextInto(ct, latest, minDecryption, nil)
}

// parseCiphertextInto is parseCiphertext decoding into *scratch when one is
// given (grown as needed and left there for the caller to reuse).
func parseCiphertextInto(ct string, latest, minDecryption int, scratch *[]byte) (int, []byte, error) {
	if !strings.HasPrefix(ct, ciphertextPrefix) {
		return 0, nil, errutil.UserError{Err: "invalid ciphertext: no prefix"}
	}
	version, payload, ok := strings.Cut(ct[len(ciphertextPrefix):], ":")
	if !ok {
		return 0, nil, errutil.UserError{Err: "invalid ciphertext: wrong number of fields"}
	}
	ver, err := strconv.Atoi(version)
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
	var raw []byte
	if scratch == nil {
		raw, err = base64.StdEncoding.DecodeString(payload)
	} else {
		need := base64.StdEncoding.DecodedLen(len(payload))
		if cap(*scratch) < need {
			*scratch = make([]byte, need)
		}
		*scratch = (*scratch)[:need] // its length is what the caller clears
		var n int
		n, err = base64.StdEncoding.Decode(*scratch, unsafe.Slice(unsafe.StringData(payload), len(payload)))
		raw = (*scratch)[:n]
	}
	if err != nil {
		return 0, nil, errutil.UserError{Err: "invalid ciphertext: could not decode base64"}
	}
	return ver, raw, nil
}
