package hsmtransit

import (
	"context"
	"crypto/sha256"
	"crypto/sha3"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"hash"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// pathHash hashes input data; it uses no key.
func (b *backend) pathHash() *framework.Path {
	return &framework.Path{
		Pattern: "hash" + framework.OptionalParamRegex("urlalgorithm"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "hash",
			OperationSuffix: "|with-algorithm",
		},
		Fields: map[string]*framework.FieldSchema{
			"input": {Type: framework.TypeString, Description: "The base64-encoded input data"},
			"algorithm": {
				Type:        framework.TypeString,
				Default:     defaultHashAlgorithm,
				Description: "Hash algorithm: sha2-224, sha2-256 (default), sha2-384, sha2-512, sha3-224, sha3-256, sha3-384 or sha3-512.",
			},
			"urlalgorithm": {Type: framework.TypeString, Description: "Hash algorithm (URL parameter)"},
			"format": {
				Type:        framework.TypeString,
				Default:     "hex",
				Description: `Output encoding: "hex" (default) or "base64".`,
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathHashWrite},
		},
		HelpSynopsis:    pathHashHelpSyn,
		HelpDescription: pathHashHelpDesc,
	}
}

// hashFuncs are the algorithms of the hash path (sha1 is not one).
var hashFuncs = map[string]func() hash.Hash{
	"sha2-224": sha256.New224,
	"sha2-256": sha256.New,
	"sha2-384": sha512.New384,
	"sha2-512": sha512.New,
	"sha3-224": func() hash.Hash { return sha3.New224() },
	"sha3-256": func() hash.Hash { return sha3.New256() },
	"sha3-384": func() hash.Hash { return sha3.New384() },
	"sha3-512": func() hash.Hash { return sha3.New512() },
}

// pathHashWrite returns the hash sum of the input.
func (b *backend) pathHashWrite(_ context.Context, _ *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	raw, ok, err := d.GetOkErr("input")
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	if !ok {
		return logical.ErrorResponse("input missing"), logical.ErrInvalidRequest
	}
	input, err := base64.StdEncoding.DecodeString(raw.(string))
	if err != nil {
		return logical.ErrorResponse(fmt.Sprintf("unable to decode input as base64: %s", err)), logical.ErrInvalidRequest
	}
	format := d.Get("format").(string)
	if format != "hex" && format != "base64" {
		return logical.ErrorResponse(fmt.Sprintf("unsupported encoding format %s; must be \"hex\" or \"base64\"", format)), logical.ErrInvalidRequest
	}
	algorithm := d.Get("urlalgorithm").(string)
	if algorithm == "" {
		algorithm = d.Get("algorithm").(string)
	}
	newHash, ok := hashFuncs[algorithm]
	if !ok {
		return logical.ErrorResponse(fmt.Sprintf("unsupported algorithm %s", algorithm)), logical.ErrInvalidRequest
	}
	h := newHash()
	h.Write(input)
	sum := h.Sum(nil)
	out := hex.EncodeToString(sum)
	if format == "base64" {
		out = base64.StdEncoding.EncodeToString(sum)
	}
	return &logical.Response{Data: map[string]interface{}{"sum": out}}, nil
}

const pathHashHelpSyn = `Generate a hash sum for input data`

const pathHashHelpDesc = `
Returns the hash sum of the input data with the given algorithm, in hex or
base64. No key is involved.
`
