package hsmtransit

import (
	"context"
	"slices"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// pathRewrap re-encrypts ciphertexts under a newer key version without
// revealing the plaintext.
func (b *backend) pathRewrap() *framework.Path {
	return &framework.Path{
		Pattern: "rewrap/" + framework.GenericNameRegex("name"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "rewrap",
		},
		Fields: map[string]*framework.FieldSchema{
			"name":       {Type: framework.TypeString, Description: "Name of the key"},
			"ciphertext": {Type: framework.TypeString, Description: "Ciphertext to rewrap"},
			"encrypt_padding_scheme": {
				Type:        framework.TypeString,
				Description: "RSA padding scheme for the encrypt step: oaep (default) or pkcs1v15.",
			},
			"decrypt_padding_scheme": {
				Type:        framework.TypeString,
				Description: "RSA padding scheme for the decrypt step: oaep (default) or pkcs1v15.",
			},
			"context": {
				Type:        framework.TypeString,
				Description: "Base64-encoded context for key derivation; required for derived keys.",
			},
			"nonce": {Type: framework.TypeString, Description: "Nonce, for convergent keys created before Vault 0.6.2"},
			"key_version": {
				Type:        framework.TypeInt,
				Description: "Version to re-encrypt with: 0 (latest, default) or at least min_encryption_version.",
			},
			"associated_data": {
				Type:        framework.TypeString,
				Description: "Base64-encoded associated data the ciphertext was made with; kept for the new ciphertext. (Not in built-in transit.)",
			},
			"batch_input": {
				Type:        framework.TypeSlice,
				Description: "List of items to rewrap; when set, the single-item fields are ignored. Results keep the input's order.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathRewrapWrite},
		},
		HelpSynopsis:    pathRewrapHelpSyn,
		HelpDescription: pathRewrapHelpDesc,
	}
}

// pathRewrapWrite rewraps the request's items. As in built-in transit, a
// batch answers 200 with per-item errors, and only an internal failure fails
// the whole request.
func (b *backend) pathRewrapWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	items, err := ciphertextItems(d, func() batchItem {
		return batchItem{
			Ciphertext:           d.Get("ciphertext").(string),
			Context:              d.Get("context").(string),
			Nonce:                d.Get("nonce").(string),
			KeyVersion:           d.Get("key_version").(int),
			AssociatedData:       d.Get("associated_data").(string),
			DecryptPaddingScheme: d.Get("decrypt_padding_scheme").(string),
			EncryptPaddingScheme: d.Get("encrypt_padding_scheme").(string),
		}
	})
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	if err := checkContextConsistency(items); err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	results := make([]encryptResult, len(items))
	for i := range items {
		if items[i].Ciphertext == "" {
			results[i].Error = "missing ciphertext to decrypt"
		} else if err := items[i].decodeCommon(); err != nil {
			results[i].Error = err.Error()
		}
	}

	c, _, unlock, spent, err := b.cipherForEncryption(ctx, keysutil.PolicyRequest{Storage: req.Storage, Name: d.Get("name").(string)},
		func(latest int) map[int]uint64 {
			return encryptionsByVersion(items, func(i int) bool { return results[i].Error != "" }, latest)
		})
	defer unlock()
	if err != nil {
		return nil, err
	}
	if c == nil {
		return logical.ErrorResponse("encryption key not found"), logical.ErrInvalidRequest
	}

	errs := make([]error, len(items))
	forEachRun(len(items), c.parallelism(), func(start, end int) {
		var buf [itemRun]int
		todo := toEncrypt(buf[:0], start, end, items, spent, errs, func(i int) bool { return results[i].Error != "" })
		rewrapEach(c, items, todo, func(i int, ct string, ver int, err error) {
			results[i].Ciphertext, results[i].KeyVersion, errs[i] = ct, ver, err
		})
	})
	for i, err := range errs {
		switch {
		case err == nil:
		case isInternal(err) || unavailable(err):
			return nil, err
		default:
			results[i].Ciphertext, results[i].KeyVersion = "", 0
			results[i].Error = err.Error()
		}
	}

	// Internal errors failed the request above: an item's error is the
	// caller's, and a batch is a 200 whatever its items' errors.
	return itemsResponse(d, items, results, false, encryptFields)
}

// rewrapEach is rewrapItem of items[i] for each i in todo, answered
// through put; a key that decrypts and encrypts several items at once (an
// HSM-resident key) does each step for all of them at once.
func rewrapEach(c keyCipher, items []batchItem, todo []int, put func(i int, ct string, ver int, err error)) {
	_, decrypts := c.(eachDecrypter)
	_, encrypts := c.(eachEncrypter)
	if !decrypts || !encrypts {
		for _, i := range todo {
			ct, ver, err := rewrapItem(c, &items[i], i)
			put(i, ct, ver, err)
		}
		return
	}
	// Both steps work on copies, indexed from 0, whose padding scheme is
	// that of the step (as rewrapItem's).
	work := make([]batchItem, 0, len(todo))
	at := make([]int, 0, len(todo)) // the item of each of work's
	for _, i := range todo {
		if items[i].Nonce != "" && c.refusesNonce() {
			put(i, "", 0, errNonceNotAllowed)
			continue
		}
		it := items[i]
		it.PaddingScheme = it.DecryptPaddingScheme
		work = append(work, it)
		at = append(at, i)
	}
	opened := make([]int, 0, len(work))
	decryptEach(c, work, indices(len(work)), func(j int, pt string, err error) {
		if err != nil {
			put(at[j], "", 0, atItem(err, at[j], "decrypt_padding_scheme"))
			return
		}
		work[j].Plaintext = pt
		work[j].PaddingScheme = work[j].EncryptPaddingScheme
		opened = append(opened, j)
	})
	// (decryptEach answers each item once, on this goroutine.)
	slices.Sort(opened)
	encryptEach(c, work, opened, func(j int, ct string, ver int, err error) {
		put(at[j], ct, ver, atItem(err, at[j], "padding_scheme"))
	})
}

// indices is 0, 1, ..., n-1.
func indices(n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = i
	}
	return s
}

// rewrapItem decrypts and re-encrypts item index with c, held locked by
// the caller.
func rewrapItem(c keyCipher, it *batchItem, index int) (string, int, error) {
	if it.Nonce != "" && c.refusesNonce() {
		return "", 0, errNonceNotAllowed
	}
	pt, err := c.decrypt(it, it.DecryptPaddingScheme)
	if err != nil {
		return "", 0, atItem(err, index, "decrypt_padding_scheme")
	}
	fresh := *it
	fresh.Plaintext = pt
	fresh.PaddingScheme = it.EncryptPaddingScheme
	ct, v, err := c.encrypt(&fresh)
	return ct, v, atItem(err, index, "padding_scheme")
}

const pathRewrapHelpSyn = `Rewrap ciphertext`

const pathRewrapHelpDesc = `
After a key rotation, this path re-encrypts a ciphertext, or a batch of them,
with the latest version of the named key (or key_version), without returning
the plaintext. A ciphertext already at that version is re-encrypted as well.
`
