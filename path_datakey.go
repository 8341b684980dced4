package hsmtransit

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// pathDatakey generates a data key for envelope encryption, returned wrapped
// by the named key (and in plaintext on the plaintext path).
func (b *backend) pathDatakey() *framework.Path {
	return &framework.Path{
		Pattern: "datakey/" + framework.GenericNameRegex("plaintext") + "/" + framework.GenericNameRegex("name"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "generate",
			OperationSuffix: "data-key",
		},
		Fields: map[string]*framework.FieldSchema{
			"name": {Type: framework.TypeString, Description: "The key that wraps the data key"},
			"plaintext": {
				Type:        framework.TypeString,
				Description: `"plaintext" returns the data key in plaintext and wrapped; "wrapped" returns it wrapped only.`,
			},
			"padding_scheme": {
				Type:        framework.TypeString,
				Description: "RSA padding scheme: oaep (default) or pkcs1v15. RSA keys only.",
			},
			"context": {Type: framework.TypeString, Description: "Base64-encoded context for key derivation; required for derived keys."},
			"nonce":   {Type: framework.TypeString, Description: "Nonce, for convergent keys created before Vault 0.6.2"},
			"bits": {
				Type:        framework.TypeInt,
				Default:     256,
				Description: "Size of the data key in bits: 128, 256 (default) or 512.",
			},
			"key_version": {
				Type:        framework.TypeInt,
				Description: "Version that wraps the data key: 0 (latest, default) or at least min_encryption_version.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathDatakeyWrite},
		},
		HelpSynopsis:    pathDatakeyHelpSyn,
		HelpDescription: pathDatakeyHelpDesc,
	}
}

// datakeyRequest is a parsed datakey request.
type datakeyRequest struct {
	returnPlaintext bool
	bits            int
	item            batchItem
}

func parseDatakeyRequest(d *framework.FieldData) (datakeyRequest, error) {
	r := datakeyRequest{
		bits: d.Get("bits").(int),
		item: batchItem{
			KeyVersion:    d.Get("key_version").(int),
			Context:       d.Get("context").(string),
			Nonce:         d.Get("nonce").(string),
			PaddingScheme: d.Get("padding_scheme").(string),
		},
	}
	var err error
	if r.item.Context != "" {
		if r.item.context, err = base64.StdEncoding.DecodeString(r.item.Context); err != nil {
			return r, errors.New("failed to base64-decode context")
		}
	}
	if r.item.Nonce != "" {
		if r.item.nonce, err = base64.StdEncoding.DecodeString(r.item.Nonce); err != nil {
			return r, errors.New("failed to base64-decode nonce")
		}
	}
	if r.bits != 128 && r.bits != 256 && r.bits != 512 {
		return r, errors.New("invalid bit length")
	}
	switch d.Get("plaintext").(string) {
	case "plaintext":
		r.returnPlaintext = true
	case "wrapped":
	default:
		//lint:ignore ST1005 built-in transit's exact message, which clients may match
		return r, errors.New("Invalid path, must be 'plaintext' or 'wrapped'")
	}
	return r, nil
}

// pathDatakeyWrite generates a random data key and wraps it.
func (b *backend) pathDatakeyWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	r, err := parseDatakeyRequest(d)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	c, _, unlock, spent, err := b.cipherForEncryption(ctx, keysutil.PolicyRequest{Storage: req.Storage, Name: d.Get("name").(string)},
		func(latest int) map[int]uint64 { return encryptionsByVersion([]batchItem{r.item}, nil, latest) })
	defer unlock()
	if err != nil {
		return nil, err
	}
	if c == nil {
		return logical.ErrorResponse("encryption key not found"), logical.ErrInvalidRequest
	}
	if err := spent[r.item.KeyVersion]; err != nil {
		return nil, err
	}
	if r.item.PaddingScheme != "" {
		if _, err := parsePaddingScheme(c.keyType(), r.item.PaddingScheme); err != nil {
			return logical.ErrorResponse(fmt.Sprintf("padding_scheme argument invalid: %s", err)), logical.ErrInvalidRequest
		}
	}

	dataKey, err := c.random(r.bits / 8)
	if unavailable(err) {
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("generating data key: %w", err)
	}
	r.item.Plaintext = base64.StdEncoding.EncodeToString(dataKey)
	clear(dataKey)
	ct, ver, err := c.encrypt(&r.item)
	err = atItem(err, 0, "padding_scheme")
	if err != nil {
		if isInternal(err) || unavailable(err) {
			return nil, err
		}
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	resp := &logical.Response{Data: map[string]interface{}{
		"key_version": ver,
		"ciphertext":  ct,
	}}
	if r.returnPlaintext {
		resp.Data["plaintext"] = r.item.Plaintext
	}
	return resp, nil
}

const pathDatakeyHelpSyn = `Generate a data key`

const pathDatakeyHelpDesc = `
This path generates a data key: a random key of 128, 256 (default) or 512 bits
for encrypting data locally, returned encrypted by the named key. The
"plaintext" path also returns the data key itself (base64-encoded); the
"wrapped" path returns only the ciphertext, to be decrypted when needed.
`
