package hsmtransit

import (
	"context"
	"crypto/hmac"
	"encoding/base64"
	"fmt"
	"hash"
	"strconv"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// pathHMAC computes HMACs with a key's HMAC key.
func (b *backend) pathHMAC() *framework.Path {
	return &framework.Path{
		Pattern: "hmac/" + framework.GenericNameRegex("name") + framework.OptionalParamRegex("urlalgorithm"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "generate",
			OperationSuffix: "hmac|hmac-with-algorithm",
		},
		Fields: map[string]*framework.FieldSchema{
			"name":  {Type: framework.TypeString, Description: "The key to use for the HMAC function"},
			"input": {Type: framework.TypeString, Description: "The base64-encoded input data"},
			"algorithm": {
				Type:        framework.TypeString,
				Default:     defaultHashAlgorithm,
				Description: "Hash algorithm: sha1, sha2-224, sha2-256 (default), sha2-384, sha2-512, sha3-224, sha3-256, sha3-384 or sha3-512.",
			},
			"urlalgorithm": {Type: framework.TypeString, Description: "Hash algorithm (URL parameter)"},
			"key_version": {
				Type:        framework.TypeInt,
				Description: "Version to use: 0 (latest, default) or at least min_encryption_version.",
			},
			"batch_input": {
				Type:        framework.TypeSlice,
				Description: "List of items; when set, input is ignored. Results keep the input's order.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathHMACWrite},
		},
		HelpSynopsis:    pathHMACHelpSyn,
		HelpDescription: pathHMACHelpDesc,
	}
}

// hmacResult is one HMAC or HMAC-verify batch result, with the JSON shape of
// built-in transit (valid is always present).
type hmacResult struct {
	HMAC      string `json:"hmac,omitempty"`
	Valid     bool   `json:"valid"`
	Error     string `json:"error,omitempty"`
	Reference string `json:"reference"`
}

// hmacHash resolves an HMAC hash algorithm name; "none" has no hash to use.
func hmacHash(name string) (func() hash.Hash, error) {
	ht, ok := keysutil.HashTypeMap[name]
	if !ok || keysutil.HashFuncMap[ht] == nil {
		return nil, fmt.Errorf("unsupported algorithm %q", name)
	}
	return keysutil.HashFuncMap[ht], nil
}

// pathHMACWrite computes the HMAC of each item. A batch answers 200 with
// per-item errors, as in built-in transit.
func (b *backend) pathHMACWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	algorithm := hashAlgorithmName(d, true)
	p, unlock, err := b.readPolicy(ctx, req.Storage, d.Get("name").(string), false)
	defer unlock()
	if err != nil {
		return nil, err
	}
	if p == nil {
		return logical.ErrorResponse("encryption key not found"), logical.ErrInvalidRequest
	}
	if err := b.checkEnabled(ctx, req.Storage, p.Name); err != nil {
		return nil, err
	}
	ver := d.Get("key_version").(int)
	switch {
	case ver == 0:
		ver = p.LatestVersion
	case ver != p.LatestVersion && p.MinEncryptionVersion > 0 && ver < p.MinEncryptionVersion:
		return logical.ErrorResponse("cannot generate HMAC: version is too old (disallowed by policy)"), logical.ErrInvalidRequest
	}
	key, err := p.HMACKey(ver)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	if key == nil {
		return nil, fmt.Errorf("HMAC key value could not be computed")
	}
	newHash, err := hmacHash(algorithm)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	items, isBatch, err := stringItems(d, func() map[string]string {
		it := map[string]string{}
		if v, ok := d.GetOk("input"); ok {
			it["input"] = v.(string)
		}
		return it
	})
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}

	results := make([]hmacResult, len(items))
	for i, it := range items {
		results[i].Reference = it["reference"]
		raw, ok := it["input"]
		if !ok {
			results[i].Error = "missing input for HMAC"
			continue
		}
		input, err := base64.StdEncoding.DecodeString(raw)
		if err != nil {
			results[i].Error = fmt.Sprintf("unable to decode input as base64: %s", err)
			continue
		}
		mac := hmac.New(newHash, key)
		mac.Write(input)
		results[i].HMAC = "vault:v" + strconv.Itoa(ver) + ":" + base64.StdEncoding.EncodeToString(mac.Sum(nil))
	}
	if isBatch {
		return &logical.Response{Data: map[string]interface{}{"batch_results": results}}, nil
	}
	if results[0].Error != "" {
		return logical.ErrorResponse(results[0].Error), logical.ErrInvalidRequest
	}
	return &logical.Response{Data: map[string]interface{}{"hmac": results[0].HMAC}}, nil
}

// verifyHMAC checks HMACs made by hmac/; verify/ sends here items that carry
// hmac.
func (b *backend) verifyHMAC(ctx context.Context, req *logical.Request, d *framework.FieldData, items []map[string]string, isBatch bool) (*logical.Response, error) {
	algorithm := hashAlgorithmName(d, true)
	p, unlock, err := b.readPolicy(ctx, req.Storage, d.Get("name").(string), false)
	defer unlock()
	if err != nil {
		return nil, err
	}
	if p == nil {
		return logical.ErrorResponse("encryption key not found"), logical.ErrInvalidRequest
	}
	if err := b.checkEnabled(ctx, req.Storage, p.Name); err != nil {
		return nil, err
	}
	newHash, err := hmacHash(algorithm)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	results := make([]verifyResult, len(items))
	for i, it := range items {
		results[i].Reference = it["reference"]
		valid, err := verifyHMACItem(p, newHash, it)
		if err != nil {
			results[i].Error = err.Error()
			continue
		}
		results[i].Valid = valid
	}
	return verifyResponse(results, isBatch)
}

// verifyHMACItem checks one item's HMAC with p, held locked by the caller.
func verifyHMACItem(p *keysutil.Policy, newHash func() hash.Hash, it map[string]string) (bool, error) {
	raw, ok := it["input"]
	if !ok {
		return false, fmt.Errorf("missing input")
	}
	input, err := base64.StdEncoding.DecodeString(raw)
	if err != nil {
		return false, fmt.Errorf("unable to decode input as base64: %s", err)
	}
	given, ok := it["hmac"]
	if !ok {
		return false, fmt.Errorf("missing hmac")
	}
	if !strings.HasPrefix(given, "vault:v") {
		return false, fmt.Errorf("invalid HMAC to verify: no prefix")
	}
	parts := strings.SplitN(strings.TrimPrefix(given, "vault:v"), ":", 2)
	if len(parts) != 2 {
		return false, fmt.Errorf("invalid HMAC: wrong number of fields")
	}
	ver, err := strconv.Atoi(parts[0])
	if err != nil {
		return false, fmt.Errorf("invalid HMAC: version number could not be decoded")
	}
	sum, err := base64.StdEncoding.DecodeString(parts[1])
	if err != nil {
		return false, fmt.Errorf("unable to decode verification HMAC as base64: %s", err)
	}
	if ver > p.LatestVersion {
		return false, fmt.Errorf("invalid HMAC: version is too new")
	}
	if p.MinDecryptionVersion > 0 && ver < p.MinDecryptionVersion {
		return false, fmt.Errorf("cannot verify HMAC: version is too old (disallowed by policy)")
	}
	key, err := p.HMACKey(ver)
	if err != nil {
		return false, err
	}
	mac := hmac.New(newHash, key)
	mac.Write(input)
	return hmac.Equal(mac.Sum(nil), sum), nil
}

const pathHMACHelpSyn = `Generate an HMAC for input data using the named key`

const pathHMACHelpDesc = `
Computes the HMAC of the input data with the named key's HMAC key and the given
hash algorithm. Every key type has an HMAC key; hmac keys have nothing else.
`
