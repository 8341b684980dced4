package hsmtransit

import (
	"fmt"
	"strconv"

	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/hsmkey"
)

// HSM-resident keys are kept by internal/hsmkey; here is what the requests
// need of them: items checked, versions resolved and ciphertexts formatted
// as for a software key, and keys/:name's description.

const (
	hsmKeyPrefix = hsmkey.StoragePrefix
	hsmKeyType   = hsmkey.Type
	hsmNamespace = hsmkey.Namespace
)

// hsmCiphertextMarker starts the payload of ciphertexts of the current
// format.
var hsmCiphertextMarker = hsmkey.Marker

// hsmItemEncrypt encrypts a decoded item with version it.KeyVersion (0:
// latest) inside the HSM; k is read-locked.
func hsmItemEncrypt(s *hsmkey.Store, k *hsmkey.Key, it *batchItem) (string, int, error) {
	ver, pt, err := hsmEncryptInput(k, it)
	if err != nil {
		return "", 0, err
	}
	aead, err := s.AEAD(k, ver)
	if err != nil {
		return "", 0, err
	}
	return encryptWith(aead, ver, pt, it.aad)
}

// hsmEncryptInput checks an item for encryption with an HSM-resident key,
// and returns the version to use and the plaintext.
func hsmEncryptInput(k *hsmkey.Key, it *batchItem) (int, []byte, error) {
	if err := checkHSMItem(it, it.PaddingScheme); err != nil {
		return 0, nil, err
	}
	ver, err := encryptionVersion(it.KeyVersion, k.LatestVersion, k.MinEncryptionVersion)
	if err != nil {
		return 0, nil, err
	}
	pt, err := it.decodedPlaintext()
	if err != nil {
		return 0, nil, err
	}
	return ver, pt, nil
}

// hsmItemsEncrypt is hsmItemEncrypt of items[i] for each i in todo,
// answered through put, with one call to the token for each version's items
// (hsmkey.AEAD.EncryptBatch) instead of one per item.
func hsmItemsEncrypt(s *hsmkey.Store, k *hsmkey.Key, items []batchItem, todo []int, put func(i int, ct string, ver int, err error)) {
	hsmItems(s, k, items, todo,
		func(it *batchItem) (int, []byte, error) { return hsmEncryptInput(k, it) },
		hsmkey.AEAD.EncryptBatch,
		func(i, ver int, sealed []byte, err error) {
			if err != nil {
				put(i, "", 0, err)
				return
			}
			put(i, formatCiphertext(ver, sealed), ver, nil)
		})
}

// hsmItems runs items[i], i in todo, through the token in batches: input
// checks an item and gives its version and bytes, call is the batch
// operation of an AEAD, put gets each item's output or error.
func hsmItems(s *hsmkey.Store, k *hsmkey.Key, items []batchItem, todo []int,
	input func(it *batchItem) (int, []byte, error),
	call func(a hsmkey.AEAD, in, aad [][]byte) ([][]byte, []error, error),
	put func(i, ver int, out []byte, err error)) {
	ready := make([]hsmInput, 0, len(todo))
	for _, i := range todo {
		ver, in, err := input(&items[i])
		if err != nil {
			put(i, 0, nil, err)
			continue
		}
		ready = append(ready, hsmInput{i, ver, in})
	}
	byVersion(ready, func(ver int, batch []hsmInput) {
		aead, err := s.AEAD(k, ver)
		var out [][]byte
		var errs []error
		if err == nil {
			in, aad := inputsOf(batch, items)
			out, errs, err = call(aead, in, aad)
		}
		for j, b := range batch {
			switch {
			case err != nil:
				put(b.i, ver, nil, err)
			case errs[j] != nil:
				put(b.i, ver, nil, errs[j])
			default:
				put(b.i, ver, out[j], nil)
			}
		}
	})
}

// hsmInput is an item ready for the token: its index, the version to use
// and the bytes to encrypt or decrypt.
type hsmInput struct {
	i, ver int
	in     []byte
}

// byVersion calls f with the inputs of each version, at most
// hsm.MaxGCMBatch at a time. Items name their version; most batches use
// one. Each pass takes the first left's version, and the items of that
// version, as many as one call to the token takes.
func byVersion(ready []hsmInput, f func(ver int, batch []hsmInput)) {
	batch := make([]hsmInput, 0, hsm.MaxGCMBatch)
	for len(ready) > 0 {
		ver := ready[0].ver
		left := ready[:0]
		batch = batch[:0]
		for _, in := range ready {
			if in.ver != ver || len(batch) == hsm.MaxGCMBatch {
				left = append(left, in)
				continue
			}
			batch = append(batch, in)
		}
		ready = left
		f(ver, batch)
	}
}

// inputsOf returns the bytes and the associated data of a batch's items.
func inputsOf(batch []hsmInput, items []batchItem) (in, aad [][]byte) {
	in, aad = make([][]byte, len(batch)), make([][]byte, len(batch))
	for j, b := range batch {
		in[j], aad[j] = b.in, items[b.i].aad
	}
	return in, aad
}

// hsmItemDecrypt decrypts a decoded item inside the HSM; k is read-locked.
// The errors are those of a software key.
func hsmItemDecrypt(s *hsmkey.Store, k *hsmkey.Key, it *batchItem, paddingScheme string) (string, error) {
	ver, sealed, err := hsmDecryptInput(k, it, paddingScheme)
	if err != nil {
		return "", err
	}
	aead, err := s.AEAD(k, ver)
	if err != nil {
		return "", err
	}
	return decryptWith(aead, sealed, it.aad)
}

// hsmDecryptInput checks an item for decryption with an HSM-resident key,
// and returns its version and payload.
func hsmDecryptInput(k *hsmkey.Key, it *batchItem, paddingScheme string) (int, []byte, error) {
	if err := checkHSMItem(it, paddingScheme); err != nil {
		return 0, nil, err
	}
	ver, sealed, err := parseCiphertext(it.Ciphertext, k.LatestVersion, k.MinDecryptionVersion)
	if err != nil {
		return 0, nil, err
	}
	if len(sealed) < hsmkey.MinCiphertext {
		return 0, nil, errutil.UserError{Err: "invalid ciphertext length"}
	}
	return ver, sealed, nil
}

// hsmItemsDecrypt is hsmItemDecrypt of items[i] (with its own padding
// scheme) for each i in todo, answered through put, as hsmItemsEncrypt.
func hsmItemsDecrypt(s *hsmkey.Store, k *hsmkey.Key, items []batchItem, todo []int, put func(i int, pt string, err error)) {
	hsmItems(s, k, items, todo,
		func(it *batchItem) (int, []byte, error) { return hsmDecryptInput(k, it, it.PaddingScheme) },
		hsmkey.AEAD.DecryptBatch,
		func(i, _ int, opened []byte, err error) {
			if err != nil {
				put(i, "", err)
				return
			}
			put(i, encodeBase64(opened), nil)
		})
}

// checkHSMItem refuses what an HSM-resident key does not do.
func checkHSMItem(it *batchItem, paddingScheme string) error {
	switch {
	case it.Context != "":
		return errutil.UserError{Err: "HSM-resident keys are not derived: context is not supported"}
	case it.Nonce != "":
		return errNonceNotAllowed
	case paddingScheme != "":
		return errutil.UserError{Err: fmt.Sprintf("unsupported key type %s for padding scheme", hsmKeyType)}
	}
	return nil
}

// hsmKeySettings returns the configurable fields, as for a software key.
func hsmKeySettings(k *hsmkey.Key) keySettings {
	return keySettings{
		minDecryption:   k.MinDecryptionVersion,
		minEncryption:   k.MinEncryptionVersion,
		deletionAllowed: k.DeletionAllowed,
		// An HSM key is never exportable nor backed up in plaintext.
		autoRotatePeriod: k.AutoRotatePeriod,
	}
}

// describeHSMKeyFields is keys/:name's read of an HSM-resident key:
// built-in transit's fields, plus hsm and the labels of the versions.
func describeHSMKeyFields(k *hsmkey.Key, label func(name string, version int) string) *logical.Response {
	versions := make(map[string]int64, len(k.Versions))
	labels := make(map[string]string, len(k.Versions))
	for v, ver := range k.Versions {
		versions[strconv.Itoa(v)] = ver.Created.Unix()
		labels[strconv.Itoa(v)] = label(k.Name, v)
	}
	return &logical.Response{Data: map[string]interface{}{
		"name":                   k.Name,
		"type":                   k.Type,
		"derived":                false,
		"deletion_allowed":       k.DeletionAllowed,
		"min_available_version":  k.MinAvailableVersion,
		"min_decryption_version": k.MinDecryptionVersion,
		"min_encryption_version": k.MinEncryptionVersion,
		"latest_version":         k.LatestVersion,
		"exportable":             false,
		"allow_plaintext_backup": false,
		"supports_encryption":    true,
		"supports_decryption":    true,
		"supports_signing":       false,
		"supports_derivation":    false,
		"auto_rotate_period":     int64(k.AutoRotatePeriod.Seconds()),
		"imported_key":           false,
		"keys":                   versions,
		"hsm":                    true,
		"hsm_labels":             labels,
	}}
}

// errHSMKeyUnsupported refuses an operation an HSM-resident key lacks.
func errHSMKeyUnsupported(name, what string) error {
	return callerErr("key %q is HSM-resident: %s is not supported for it; HSM-resident keys support keys/:name (read, config, rotate, trim, delete), encrypt, decrypt, rewrap and datakey, and their material never leaves the HSM", name, what)
}
