package hsmtransit

import (
	"context"
	"crypto/rsa"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
)

const defaultHashAlgorithm = "sha2-256"

// signFields are the fields sign and verify share.
func signFields() map[string]*framework.FieldSchema {
	return map[string]*framework.FieldSchema{
		"name":  {Type: framework.TypeString, Description: "The key to use"},
		"input": {Type: framework.TypeString, Description: "The base64-encoded input data"},
		"context": {
			Type:        framework.TypeString,
			Description: "Base64-encoded context for key derivation; required for derived (ed25519) keys.",
		},
		"signature_context": {
			Type:        framework.TypeString,
			Description: "Base64-encoded context for Ed25519ph and Ed25519ctx (Vault Enterprise only; refused).",
		},
		"hash_algorithm": {
			Type:        framework.TypeString,
			Default:     defaultHashAlgorithm,
			Description: "Hash algorithm: sha1, sha2-224, sha2-256 (default), sha2-384, sha2-512, sha3-224, sha3-256, sha3-384, sha3-512, or none (requires prehashed and pkcs1v15).",
		},
		"algorithm": {
			Type:        framework.TypeString,
			Default:     defaultHashAlgorithm,
			Description: `Deprecated: use "hash_algorithm" instead.`,
		},
		"urlalgorithm": {Type: framework.TypeString, Description: "Hash algorithm (URL parameter)"},
		"prehashed": {
			Type:        framework.TypeBool,
			Description: "Set when the input is already a hash (of hash_algorithm).",
		},
		"signature_algorithm": {
			Type:        framework.TypeString,
			Description: "RSA signature algorithm: pss (default) or pkcs1v15.",
		},
		"marshaling_algorithm": {
			Type:        framework.TypeString,
			Default:     "asn1",
			Description: "ECDSA signature encoding: asn1 (default) or jws (raw r||s, URL-safe base64).",
		},
		"salt_length": {
			Type:        framework.TypeString,
			Default:     "auto",
			Description: "RSA-PSS salt length: auto (default), hash, or a number of bytes.",
		},
		"batch_input": {
			Type:        framework.TypeSlice,
			Description: "List of items; when set, the single-item fields are ignored. Results keep the input's order.",
		},
	}
}

// pathSign signs input with an asymmetric key.
func (b *backend) pathSign() *framework.Path {
	fields := signFields()
	fields["key_version"] = &framework.FieldSchema{
		Type:        framework.TypeInt,
		Description: "Version to sign with: 0 (latest, default) or at least min_encryption_version.",
	}
	return &framework.Path{
		Pattern: "sign/" + framework.GenericNameRegex("name") + framework.OptionalParamRegex("urlalgorithm"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "sign",
			OperationSuffix: "|with-algorithm",
		},
		Fields: fields,
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathSignWrite},
		},
		HelpSynopsis:    pathSignHelpSyn,
		HelpDescription: pathSignHelpDesc,
	}
}

// pathVerify verifies a signature, or an HMAC made by hmac/.
func (b *backend) pathVerify() *framework.Path {
	fields := signFields()
	fields["signature"] = &framework.FieldSchema{Type: framework.TypeString, Description: "The signature, with its vault:v<N>: prefix"}
	fields["hmac"] = &framework.FieldSchema{Type: framework.TypeString, Description: "The HMAC, with its vault:v<N>: prefix"}
	fields["cmac"] = &framework.FieldSchema{Type: framework.TypeString, Description: "The CMAC (Vault Enterprise only; refused)"}
	fields["mac_length"] = &framework.FieldSchema{Type: framework.TypeInt, Description: "CMAC length (Vault Enterprise only)"}
	return &framework.Path{
		Pattern: "verify/" + framework.GenericNameRegex("name") + framework.OptionalParamRegex("urlalgorithm"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "verify",
			OperationSuffix: "|with-algorithm",
		},
		Fields: fields,
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathVerifyWrite},
		},
		HelpSynopsis:    pathVerifyHelpSyn,
		HelpDescription: pathVerifyHelpDesc,
	}
}

// signArgs are the request-wide sign and verify options.
type signArgs struct {
	hashAlgorithm keysutil.HashType
	marshaling    keysutil.MarshalingType
	prehashed     bool
	sigAlgorithm  string
	saltLength    int
}

// hashAlgorithmName resolves the hash algorithm a request names, by the two
// rules of built-in transit, which clients rely on. The URL's comes first.
// Then, for sign and for verify of a signature (mac false), the first
// non-empty of hash_algorithm and algorithm with their defaults: the
// deprecated algorithm counts only when hash_algorithm is sent empty. For
// hmac and for verify of an HMAC (mac true), the first of hash_algorithm and
// algorithm that the request sends (an empty one is sent, and refused by the
// caller). Else sha2-256.
func hashAlgorithmName(d *framework.FieldData, mac bool) string {
	if s := d.Get("urlalgorithm").(string); s != "" {
		return s
	}
	if mac {
		if v, ok := d.GetFirst("hash_algorithm", "algorithm"); ok {
			return v.(string)
		}
		return defaultHashAlgorithm
	}
	for _, f := range []string{"hash_algorithm", "algorithm"} {
		if s := d.Get(f).(string); s != "" {
			return s
		}
	}
	return defaultHashAlgorithm
}

func parseSignArgs(d *framework.FieldData) (signArgs, error) {
	name := hashAlgorithmName(d, false)
	ht, ok := keysutil.HashTypeMap[name]
	if !ok {
		return signArgs{}, fmt.Errorf("invalid hash algorithm %q", name)
	}
	marshalingName := d.Get("marshaling_algorithm").(string)
	marshaling, ok := keysutil.MarshalingTypeMap[marshalingName]
	if !ok {
		return signArgs{}, fmt.Errorf("invalid marshaling type %q", marshalingName)
	}
	salt, err := parseSaltLength(d.Get("salt_length").(string))
	if err != nil {
		return signArgs{}, err
	}
	return signArgs{
		hashAlgorithm: ht,
		marshaling:    marshaling,
		prehashed:     d.Get("prehashed").(bool),
		sigAlgorithm:  d.Get("signature_algorithm").(string),
		saltLength:    salt,
	}, nil
}

// parseSaltLength reads salt_length: auto, hash or a byte count.
func parseSaltLength(s string) (int, error) {
	switch strings.ToLower(s) {
	case "auto":
		return rsa.PSSSaltLengthAuto, nil
	case "hash":
		return rsa.PSSSaltLengthEqualsHash, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("salt length neither 'auto', 'hash', nor an int: %s", s)
	}
	if n < rsa.PSSSaltLengthEqualsHash {
		return 0, fmt.Errorf("salt length is invalid: %d", n)
	}
	return n, nil
}

// check validates the request-wide options against the key, as built-in
// transit does in Vault's community edition.
func (a signArgs) check(p *keysutil.Policy) error {
	if !p.Type.SigningSupported() {
		return fmt.Errorf("key type %v does not support signing", p.Type)
	}
	if a.hashAlgorithm == keysutil.HashTypeNone && (!a.prehashed || a.sigAlgorithm != "pkcs1v15") {
		return errors.New("hash_algorithm=none requires both prehashed=true and signature_algorithm=pkcs1v15")
	}
	if p.Type.PaddingSchemesSupported() {
		switch a.sigAlgorithm {
		case "", "pss", "pkcs1v15":
		default:
			return fmt.Errorf("unsupported rsa signature algorithm %s", a.sigAlgorithm)
		}
	}
	return nil
}

// checkItem validates one item: Ed25519 keys sign only pure Ed25519 (the
// prehashed and context variants are Vault Enterprise's).
func (a signArgs) checkItem(p *keysutil.Policy, sigContext string) error {
	if p.Type == keysutil.KeyType_ED25519 {
		switch {
		case a.prehashed:
			return errors.New("only Pure Ed25519 signatures supported, prehashed must be false")
		case a.hashAlgorithm == keysutil.HashTypeSHA2512:
			return errors.New("only Pure Ed25519 signatures supported, hash_alogithm should not be set")
		case sigContext != "":
			return errors.New("only Pure Ed25519 signatures supported, signature_context must be empty")
		}
	}
	return nil
}

// errMissingContext is keysutil's message for a derived key used without a
// context, which keysutil reports as an internal error when signing.
var errMissingContext = errutil.UserError{Err: "missing 'context' for key derivation; the key was created using a derived key, which means additional, per-request information must be included in order to perform operations with the key"}

// options turns the arguments into keysutil's signing options.
func (a signArgs) options() keysutil.SigningOptions {
	return keysutil.SigningOptions{
		HashAlgorithm: a.hashAlgorithm,
		Marshaling:    a.marshaling,
		SaltLength:    a.saltLength,
		SigAlgorithm:  a.sigAlgorithm,
	}
}

// digest prepares the input: hashed here unless the key type signs raw input
// or the caller hashed it already.
func (a signArgs) digest(p *keysutil.Policy, input []byte) []byte {
	if !p.Type.HashSignatureInput() || a.prehashed {
		return input
	}
	newHash := keysutil.HashFuncMap[a.hashAlgorithm]
	if newHash == nil {
		return input
	}
	h := newHash()
	h.Write(input)
	return h.Sum(nil)
}

// signResult is one sign batch result.
type signResult struct {
	Signature  string `json:"signature,omitempty"`
	KeyVersion int    `json:"key_version"`
	PublicKey  []byte `json:"publickey,omitempty"`
	Error      string `json:"error,omitempty"`
	Reference  string `json:"reference"`
	internal   bool
}

// stringItems reads batch_input as a list of objects with string values, or
// the single item made by single.
func stringItems(d *framework.FieldData, single func() map[string]string) ([]map[string]string, bool, error) {
	raw, ok := d.Raw["batch_input"]
	if !ok || raw == nil {
		return []map[string]string{single()}, false, nil
	}
	list, ok := batchList(raw)
	if !ok {
		return nil, true, fmt.Errorf("batch_input must be a list of objects, got %T", raw)
	}
	if len(list) == 0 {
		return nil, true, errors.New("missing batch input to process")
	}
	items := make([]map[string]string, len(list))
	for i, el := range list {
		m, ok := batchObject(el)
		if !ok {
			return nil, true, fmt.Errorf("[%d] expected a map, got '%T'", i, el)
		}
		items[i] = make(map[string]string, len(m))
		for k, v := range m {
			if v == nil {
				continue
			}
			s, ok := v.(string)
			if !ok {
				return nil, true, fmt.Errorf("'[%d].%s' expected type 'string', got unconvertible type '%T'", i, k, v)
			}
			items[i][k] = s
		}
	}
	return items, true, nil
}

// pathSignWrite signs the request's items.
func (b *backend) pathSignWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	args, err := parseSignArgs(d)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	items, isBatch, err := stringItems(d, func() map[string]string {
		return map[string]string{
			"input":             d.Get("input").(string),
			"context":           d.Get("context").(string),
			"signature_context": d.Get("signature_context").(string),
		}
	})
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	p, unlock, err := b.readPolicy(ctx, req.Storage, d.Get("name").(string), false)
	defer unlock()
	if err != nil {
		return nil, err
	}
	if p == nil {
		return logical.ErrorResponse("signing key not found"), logical.ErrInvalidRequest
	}
	if err := b.checkEnabled(ctx, req.Storage, p.Name); err != nil {
		return nil, err
	}
	if err := args.check(p); err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}

	keyVersion := d.Get("key_version").(int)
	results := make([]signResult, len(items))
	for i, it := range items {
		results[i] = signItem(p, args, keyVersion, it)
		results[i].Reference = it["reference"]
	}
	if isBatch {
		return &logical.Response{Data: map[string]interface{}{"batch_results": results}}, nil
	}
	if r := results[0]; r.Error != "" {
		return errorResponse(itemError(r.Error, r.internal))
	}
	data := map[string]interface{}{
		"signature":   results[0].Signature,
		"key_version": results[0].KeyVersion,
	}
	if len(results[0].PublicKey) > 0 {
		data["public_key"] = results[0].PublicKey
	}
	return &logical.Response{Data: data}, nil
}

// signItem signs one item with p, held locked by the caller.
func signItem(p *keysutil.Policy, args signArgs, keyVersion int, it map[string]string) signResult {
	raw, ok := it["input"]
	if !ok {
		return signResult{Error: "missing input"}
	}
	input, err := base64.StdEncoding.DecodeString(raw)
	if err != nil {
		return signResult{Error: fmt.Sprintf("unable to decode input: %s", err)}
	}
	keyContext, err := base64.StdEncoding.DecodeString(it["context"])
	if err != nil {
		return signResult{Error: "failed to base64-decode context"}
	}
	if err := args.checkItem(p, it["signature_context"]); err != nil {
		return signResult{Error: fmt.Sprintf("failed to parse batch item: %s", err)}
	}
	if p.Derived && len(keyContext) == 0 {
		return signResult{Error: errMissingContext.Error()}
	}
	opts := args.options()
	sig, err := p.SignWithOptions(keyVersion, keyContext, args.digest(p, input), &opts)
	if err != nil {
		return signResult{Error: err.Error(), internal: isInternal(err)}
	}
	if keyVersion == 0 {
		keyVersion = p.LatestVersion
	}
	return signResult{Signature: sig.Signature, PublicKey: sig.PublicKey, KeyVersion: keyVersion}
}

// verifyResult is one verify batch result.
type verifyResult struct {
	Valid     bool   `json:"valid"`
	Error     string `json:"error,omitempty"`
	Reference string `json:"reference"`
	internal  bool
}

// verifyKind tells which of signature, hmac and cmac the items carry; all
// items must carry the same one.
func verifyKind(items []map[string]string, isBatch bool) (string, error) {
	found := map[string]bool{}
	missing := false
	for _, it := range items {
		switch {
		case has(it, "signature"):
			found["signature"] = true
		case has(it, "hmac"):
			found["hmac"] = true
		case has(it, "cmac"):
			found["cmac"] = true
		default:
			missing = true
		}
	}
	switch {
	case len(found) > 1 && !isBatch:
		return "", errors.New("provide one of 'signature', 'hmac' or 'cmac'")
	case len(found) == 0 && !isBatch:
		return "", errors.New("missing one of 'signature', 'hmac' or 'cmac' arguments to verify")
	case len(found) > 1:
		return "", errors.New("elements of batch_input must all provide either 'signature', 'hmac' or 'cmac'")
	case len(found) == 0:
		return "", errors.New("no batch_input elements have 'signature', 'hmac' or 'cmac'")
	}
	for kind := range found {
		if missing {
			return "", fmt.Errorf("some elements of batch_input are missing '%s'", kind)
		}
		return kind, nil
	}
	return "", nil
}

func has(m map[string]string, k string) bool {
	_, ok := m[k]
	return ok
}

// pathVerifyWrite verifies signatures, or HMACs when the items carry hmac.
func (b *backend) pathVerifyWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	items, isBatch, err := stringItems(d, func() map[string]string {
		it := map[string]string{
			"input":             d.Get("input").(string),
			"context":           d.Get("context").(string),
			"signature_context": d.Get("signature_context").(string),
		}
		for _, k := range []string{"signature", "hmac", "cmac"} {
			if v, ok := d.GetOk(k); ok {
				it[k] = v.(string)
			}
		}
		return it
	})
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	kind, err := verifyKind(items, isBatch)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	switch kind {
	case "hmac":
		return b.verifyHMAC(ctx, req, d, items, isBatch)
	case "cmac":
		return logical.ErrorResponse(fmt.Sprintf(errEnterpriseOnly, "cmac")), logical.ErrInvalidRequest
	}

	args, err := parseSignArgs(d)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	p, unlock, err := b.readPolicy(ctx, req.Storage, d.Get("name").(string), false)
	defer unlock()
	if err != nil {
		return nil, err
	}
	if p == nil {
		return logical.ErrorResponse("signature verification key not found"), logical.ErrInvalidRequest
	}
	if err := b.checkEnabled(ctx, req.Storage, p.Name); err != nil {
		return nil, err
	}
	if err := args.check(p); err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	results := make([]verifyResult, len(items))
	for i, it := range items {
		results[i] = verifyItem(p, args, it)
		results[i].Reference = it["reference"]
	}
	return verifyResponse(results, isBatch)
}

// verifyItem verifies one signature with p, held locked by the caller.
func verifyItem(p *keysutil.Policy, args signArgs, it map[string]string) verifyResult {
	input, err := base64.StdEncoding.DecodeString(it["input"])
	if err != nil {
		return verifyResult{Error: fmt.Sprintf("failed to parse item: failed to parse input: %s", err)}
	}
	keyContext, err := base64.StdEncoding.DecodeString(it["context"])
	if err != nil {
		return verifyResult{Error: fmt.Sprintf("failed to parse item: failed to parse context: %s", err)}
	}
	if err := args.checkItem(p, it["signature_context"]); err != nil {
		return verifyResult{Error: fmt.Sprintf("failed to parse item: failed to parse batch item: %s", err)}
	}
	if p.Derived && len(keyContext) == 0 {
		return verifyResult{Error: errMissingContext.Error()}
	}
	opts := args.options()
	valid, err := p.VerifySignatureWithOptions(keyContext, args.digest(p, input), it["signature"], &opts)
	if err != nil {
		var ue errutil.UserError
		return verifyResult{Error: err.Error(), internal: !errors.As(err, &ue)}
	}
	return verifyResult{Valid: valid}
}

// verifyResponse answers a verify or HMAC verify.
func verifyResponse(results []verifyResult, isBatch bool) (*logical.Response, error) {
	if isBatch {
		return &logical.Response{Data: map[string]interface{}{"batch_results": results}}, nil
	}
	if r := results[0]; r.Error != "" {
		return errorResponse(itemError(r.Error, r.internal))
	}
	return &logical.Response{Data: map[string]interface{}{"valid": results[0].Valid}}, nil
}

const pathSignHelpSyn = `Generate a signature for input data using the named key`

const pathSignHelpDesc = `
Signs the input data with the named asymmetric key (ecdsa-*, ed25519, rsa-*)
and the given hash algorithm. The signature carries a vault:v<N>: prefix.
`

const pathVerifyHelpSyn = `Verify a signature or HMAC for input data created using the named key`

const pathVerifyHelpDesc = `
Verifies a signature made by sign/, or an HMAC made by hmac/, over the input
data with the named key and the given hash algorithm.
`
