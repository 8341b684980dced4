package hsmtransit

import (
	"context"
	"errors"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// decryptResult is one decrypt batch result, with the JSON shape of built-in
// transit (plaintext is always present).
type decryptResult struct {
	Plaintext string `json:"plaintext"`
	Error     string `json:"error,omitempty"`
	Reference string `json:"reference"`
}

// pathDecrypt decrypts one ciphertext or a batch.
func (b *backend) pathDecrypt() *framework.Path {
	return &framework.Path{
		Pattern: "decrypt/" + framework.GenericNameRegex("name"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "decrypt",
		},
		Fields: map[string]*framework.FieldSchema{
			"name":       {Type: framework.TypeString, Description: "Name of the key"},
			"ciphertext": {Type: framework.TypeString, Description: "Ciphertext to decrypt, as returned by encrypt"},
			"padding_scheme": {
				Type:        framework.TypeString,
				Description: "RSA padding scheme: oaep (default) or pkcs1v15. RSA keys only.",
			},
			"context": {
				Type:        framework.TypeString,
				Description: "Base64-encoded context for key derivation; required for derived keys.",
			},
			"nonce": {
				Type:        framework.TypeString,
				Description: "Base64-encoded nonce used at encryption; only for convergent keys created before Vault 0.6.2.",
			},
			"partial_failure_response_code": {
				Type:        framework.TypeInt,
				Description: "Status code to return instead of 400 when some batch items fail and others succeed.",
			},
			"associated_data": {
				Type:        framework.TypeString,
				Description: "Base64-encoded associated data given at encryption (AEAD keys only).",
			},
			"batch_input": {
				Type:        framework.TypeSlice,
				Description: "List of items to decrypt; when set, the single-item fields are ignored. Results keep the input's order.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathDecryptWrite},
		},
		HelpSynopsis:    pathDecryptHelpSyn,
		HelpDescription: pathDecryptHelpDesc,
	}
}

// ciphertextItems reads the items of a decrypt or rewrap: batch_input, or the
// single fields.
func ciphertextItems(d *framework.FieldData, single func() batchItem) ([]batchItem, error) {
	if raw := d.Raw["batch_input"]; raw != nil {
		items, err := decodeBatchInput(raw, "ciphertext", "missing ciphertext to decrypt")
		if err != nil {
			return nil, err
		}
		if len(items) == 0 {
			return nil, errors.New("missing batch input to process")
		}
		return items, nil
	}
	it := single()
	if it.Ciphertext == "" {
		return nil, errors.New("missing ciphertext to decrypt")
	}
	return []batchItem{it}, nil
}

// pathDecryptWrite decrypts the request's items.
func (b *backend) pathDecryptWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	items, err := ciphertextItems(d, func() batchItem {
		return batchItem{
			Ciphertext:     d.Get("ciphertext").(string),
			Context:        d.Get("context").(string),
			Nonce:          d.Get("nonce").(string),
			AssociatedData: d.Get("associated_data").(string),
			PaddingScheme:  d.Get("padding_scheme").(string),
		}
	})
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	if err := checkContextConsistency(items); err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	results := make([]decryptResult, len(items))
	for i := range items {
		if items[i].Ciphertext == "" {
			results[i].Error = "missing ciphertext to decrypt"
		} else if err := items[i].decodeCommon(); err != nil {
			results[i].Error = err.Error()
		}
	}

	c, _, unlock, err := b.usableCipher(ctx, keysutil.PolicyRequest{Storage: req.Storage, Name: d.Get("name").(string)})
	defer unlock()
	if err != nil {
		return nil, err
	}
	if c == nil {
		return logical.ErrorResponse("encryption key not found"), logical.ErrInvalidRequest
	}

	errs := make(itemErrors, len(items))
	forEachRun(len(items), c.parallelism(), func(start, end int) {
		var buf [itemRun]int
		todo := buf[:0]
		for i := start; i < end; i++ {
			if results[i].Error == "" {
				todo = append(todo, i)
			}
		}
		decryptEach(c, items, todo, func(i int, pt string, err error) {
			results[i].Plaintext, errs[i] = pt, atItem(err, i, "padding_scheme")
		})
	})
	outcome, err := errs.outcome(func(i int) bool { return results[i].Error != "" },
		func(i int, msg string) { results[i].Error = msg })
	if err != nil {
		return nil, err
	}

	resp, err := itemsResponse(d, items, results, outcome.internalErr, func(r *decryptResult) map[string]interface{} {
		return map[string]interface{}{"plaintext": r.Plaintext}
	})
	if err != nil {
		return resp, err
	}
	return outcome.respond(d, req, resp)
}

// decryptItem decrypts one decoded item with p, which the caller holds
// locked, and returns the base64 plaintext. As in built-in transit, a nonce
// is only read by version 1 convergent keys and otherwise ignored.
func decryptItem(p *keysutil.Policy, it *batchItem, paddingScheme string) (string, error) {
	factories, err := cryptoFactories(p, paddingScheme, it.aad)
	if err != nil {
		return "", err
	}
	pt, err := p.DecryptWithOptions(keysutil.EncryptionOptions{
		Context: it.context,
		Nonce:   it.nonce,
	}, it.Ciphertext, factories...)
	if err != nil && p.Type.PaddingSchemesSupported() && isInternal(err) &&
		strings.HasPrefix(err.Error(), rsaDecryptFailure) {
		// keysutil calls a failed RSA decryption internal; it means a
		// tampered ciphertext or the wrong padding scheme: the caller's.
		return "", errutil.UserError{Err: err.Error()}
	}
	return pt, err
}

// rsaDecryptFailure begins keysutil's message for an RSA ciphertext that does
// not decrypt.
const rsaDecryptFailure = "failed to RSA decrypt the ciphertext"

const pathDecryptHelpSyn = `Decrypt a ciphertext value using a named key`

const pathDecryptHelpDesc = `
This path decrypts a ciphertext, or a batch of them, with the named key. The
plaintext is returned base64-encoded.
`
