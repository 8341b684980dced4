package hsmtransit

import (
	"context"
	"crypto/rsa"
	"errors"
	"fmt"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// errNonceNotAllowed refuses a caller-chosen nonce on keys that would use it
// with a random-nonce mode (CVE-2023-4680).
var errNonceNotAllowed = errors.New("provided nonce not allowed for this key")

// encryptResult is one encrypt or rewrap batch result, with the JSON shape of
// built-in transit.
type encryptResult struct {
	Ciphertext string `json:"ciphertext,omitempty"`
	KeyVersion int    `json:"key_version,omitempty"`
	Error      string `json:"error,omitempty"`
	Reference  string `json:"reference"`
}

// pathEncrypt encrypts one plaintext or a batch.
func (b *backend) pathEncrypt() *framework.Path {
	return &framework.Path{
		Pattern: "encrypt/" + framework.GenericNameRegex("name"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "encrypt",
		},
		Fields: map[string]*framework.FieldSchema{
			"name":      {Type: framework.TypeString, Description: "Name of the key"},
			"plaintext": {Type: framework.TypeString, Description: "Base64-encoded plaintext to encrypt"},
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
				Description: "Base64-encoded 96-bit nonce; only for convergent keys created before Vault 0.6.2.",
			},
			"type": {
				Type:        framework.TypeString,
				Default:     "aes256-gcm96",
				Description: "Type of key to create when the key does not exist (upsert).",
			},
			"convergent_encryption": {
				Type:        framework.TypeBool,
				Description: "When the key is created by this request: enable convergent encryption (requires context).",
			},
			"key_version": {
				Type:        framework.TypeInt,
				Description: "Version to encrypt with: 0 (latest, default) or at least min_encryption_version.",
			},
			"partial_failure_response_code": {
				Type:        framework.TypeInt,
				Description: "Status code to return instead of 400 when some batch items fail and others succeed.",
			},
			"associated_data": {
				Type:        framework.TypeString,
				Description: "Base64-encoded associated data, authenticated but not encrypted (AEAD keys only).",
			},
			"batch_input": {
				Type:        framework.TypeSlice,
				Description: "List of items to encrypt; when set, the single-item fields are ignored. Results keep the input's order.",
			},
			"iv": {
				Type:        framework.TypeString,
				Description: "Base64-encoded IV for AES-CBC keys (Vault Enterprise key types; refused).",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.CreateOperation: &framework.PathOperation{Callback: b.pathEncryptWrite},
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathEncryptWrite},
		},
		// With an existence check, a write to a missing key is a create, so
		// that an ACL can allow encrypting without allowing key creation.
		ExistenceCheck:  b.pathEncryptExistenceCheck,
		HelpSynopsis:    pathEncryptHelpSyn,
		HelpDescription: pathEncryptHelpDesc,
	}
}

// pathEncryptExistenceCheck reports whether the named key exists.
func (b *backend) pathEncryptExistenceCheck(ctx context.Context, req *logical.Request, d *framework.FieldData) (bool, error) {
	c, _, unlock, err := b.lockedCipher(ctx, keysutil.PolicyRequest{Storage: req.Storage, Name: d.Get("name").(string)})
	defer unlock()
	if err != nil {
		return false, err
	}
	return c != nil, nil
}

// encryptItems reads the request's items: batch_input, or the single fields.
func encryptItems(d *framework.FieldData) ([]batchItem, error) {
	if raw := d.Raw["batch_input"]; raw != nil {
		items, err := decodeBatchInput(raw, "plaintext", "missing plaintext to encrypt")
		if err != nil {
			return nil, err
		}
		if len(items) == 0 {
			return nil, errors.New("missing batch input to process")
		}
		return items, nil
	}
	plaintext, ok, err := d.GetOkErr("plaintext")
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, errors.New("missing plaintext to encrypt")
	}
	return []batchItem{{
		Plaintext:      plaintext.(string),
		Context:        d.Get("context").(string),
		Nonce:          d.Get("nonce").(string),
		KeyVersion:     d.Get("key_version").(int),
		AssociatedData: d.Get("associated_data").(string),
		IV:             d.Get("iv").(string),
		PaddingScheme:  d.Get("padding_scheme").(string),
	}}, nil
}

// pathEncryptWrite encrypts the request's items, creating the key first when
// this is a create operation and config/keys allows it.
func (b *backend) pathEncryptWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	items, err := encryptItems(d)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	if err := checkContextConsistency(items); err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	results := make([]encryptResult, len(items))
	decodePlaintexts(items, func(i int, msg string) { results[i].Error = msg })
	for i := range items {
		if results[i].Error != "" {
			continue
		}
		if err := items[i].decodeCommon(); err != nil {
			results[i].Error = err.Error()
		}
	}

	polReq, err := b.encryptPolicyRequest(ctx, req, d, items[0].Context != "")
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	if polReq.Upsert {
		// Creating a key takes the name, as keys/:name does.
		lock := locksutil.LockForKey(b.hsmKeys.Locks, polReq.Name)
		lock.Lock()
		defer lock.Unlock()
	}
	c, upserted, unlock, spent, err := b.cipherForEncryption(ctx, polReq, func(latest int) map[int]uint64 {
		return encryptionsByVersion(items, func(i int) bool { return results[i].Error != "" }, latest)
	})
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
		todo := toEncrypt(buf[:0], start, end, items, spent, errs, func(i int) bool { return results[i].Error != "" })
		encryptEach(c, items, todo, func(i int, ct string, ver int, err error) {
			results[i].Ciphertext, results[i].KeyVersion = ct, ver
			errs[i] = atItem(err, i, "padding_scheme")
		})
	})
	outcome, err := errs.outcome(func(i int) bool { return results[i].Error != "" },
		func(i int, msg string) { results[i].Error = msg })
	if err != nil {
		return nil, err
	}

	resp, err := itemsResponse(d, items, results, outcome.internalErr, encryptFields)
	if err != nil {
		return resp, err
	}
	if req.Operation == logical.CreateOperation && !upserted {
		resp.AddWarning("Attempted creation of the key during the encrypt operation, but it was created beforehand")
	}
	return outcome.respond(d, req, resp)
}

// encryptFields is the answer to a single encrypt or rewrap.
func encryptFields(r *encryptResult) map[string]interface{} {
	return map[string]interface{}{"ciphertext": r.Ciphertext, "key_version": r.KeyVersion}
}

// encryptPolicyRequest is the key lookup for an encrypt: on a create
// operation, an upsert of the requested type unless config/keys forbids it.
func (b *backend) encryptPolicyRequest(ctx context.Context, req *logical.Request, d *framework.FieldData, contextSet bool) (keysutil.PolicyRequest, error) {
	polReq := keysutil.PolicyRequest{Storage: req.Storage, Name: d.Get("name").(string)}
	if req.Operation != logical.CreateOperation {
		return polReq, nil
	}
	convergent := d.Get("convergent_encryption").(bool)
	if convergent && !contextSet {
		return polReq, errors.New("convergent encryption requires derivation to be enabled, so context is required")
	}
	cfg, err := readKeysConfig(ctx, req.Storage)
	if err != nil {
		return polReq, err
	}
	typeName := d.Get("type").(string)
	kt, err := parseKeyType(typeName)
	if err != nil {
		return polReq, err
	}
	if !kt.EncryptionSupported() {
		return polReq, fmt.Errorf("key type %v not supported for this operation", typeName)
	}
	if err := checkDerivation(kt, contextSet, convergent); err != nil {
		return polReq, err
	}
	polReq.Upsert = !cfg.DisableUpsert
	polReq.KeyType = kt
	polReq.Derived = contextSet
	polReq.Convergent = convergent
	return polReq, nil
}

// encryptItem encrypts one decoded item with p, which the caller holds
// locked. It returns the ciphertext and the version used.
func encryptItem(p *keysutil.Policy, it *batchItem) (string, int, error) {
	if it.Nonce != "" && !nonceAllowed(p) {
		return "", 0, errNonceNotAllowed
	}
	factories, err := cryptoFactories(p, it.PaddingScheme, it.aad)
	if err != nil {
		return "", 0, err
	}
	ct, err := p.EncryptWithOptions(keysutil.EncryptionOptions{
		KeyVersion: it.KeyVersion,
		Context:    it.context,
		Nonce:      it.nonce,
		IV:         it.iv,
	}, it.Plaintext, factories...)
	if err != nil && strings.Contains(err.Error(), rsa.ErrMessageTooLong.Error()) {
		// keysutil reports it as an internal error; the plaintext is the
		// caller's to shorten.
		return "", 0, errutil.UserError{Err: fmt.Sprintf("the plaintext is too long for the %s key: RSA-OAEP encrypts at most the key size less 66 bytes (SHA-256); use envelope encryption (datakey) for longer data", p.Type)}
	}
	if err != nil {
		return "", 0, err
	}
	if ct == "" {
		return "", 0, errEmptyCiphertext
	}
	ver := it.KeyVersion
	if ver == 0 {
		ver = p.LatestVersion
	}
	return ct, ver, nil
}

// cryptoFactories builds keysutil's per-call options for an item: the RSA
// padding scheme and the associated data, refused where the key type has none.
func cryptoFactories(p *keysutil.Policy, paddingScheme string, aad []byte) ([]any, error) {
	var factories []any
	if paddingScheme != "" {
		ps, err := parsePaddingScheme(p.Type, paddingScheme)
		if err != nil {
			return nil, &fieldError{msg: fmt.Sprintf("invalid: %s", err)}
		}
		factories = append(factories, ps)
	}
	if aad != nil {
		if !p.Type.AssociatedDataSupported() {
			return nil, &fieldError{field: "associated_data", msg: fmt.Sprintf("provided for non-AEAD cipher suite %v", p.Type)}
		}
		factories = append(factories, staticAAD(aad))
	}
	return factories, nil
}

// parsePaddingScheme validates an RSA padding scheme for the key type.
func parsePaddingScheme(kt keysutil.KeyType, s string) (keysutil.PaddingScheme, error) {
	ps, err := keysutil.ParsePaddingScheme(s)
	if err != nil {
		return "", err
	}
	if !kt.PaddingSchemesSupported() {
		return "", fmt.Errorf("unsupported key type %s for padding scheme", kt)
	}
	return ps, nil
}

// nonceAllowed reports whether a caller's nonce would be used as-is: only by
// version 1 convergent keys, whose nonce the caller must supply.
func nonceAllowed(p *keysutil.Policy) bool {
	switch p.Type {
	case keysutil.KeyType_AES128_GCM96, keysutil.KeyType_AES256_GCM96, keysutil.KeyType_ChaCha20_Poly1305:
		return p.ConvergentEncryption && p.ConvergentVersion == 1
	}
	return false
}

const pathEncryptHelpSyn = `Encrypt a plaintext value or a batch of plaintext blocks using a named key`

const pathEncryptHelpDesc = `
This path encrypts a base64-encoded plaintext, or a batch of them, with the
named key. A write to a key that does not exist creates it (of the given type)
unless config/keys sets disable_upsert.
`
