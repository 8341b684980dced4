package hsmtransit

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strconv"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// maxRandomBytes is the most random bytes one request may ask for, as in
// Vault's random API.
const maxRandomBytes = 128 * 1024

// pathRandom returns random bytes.
func (b *backend) pathRandom() *framework.Path {
	return &framework.Path{
		Pattern: "random(/" + framework.GenericNameRegex("source") + ")?" + framework.OptionalParamRegex("urlbytes"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "generate",
			OperationSuffix: "random|random-with-source|random-with-bytes|random-with-source-and-bytes",
		},
		Fields: map[string]*framework.FieldSchema{
			"urlbytes": {Type: framework.TypeString, Description: "The number of bytes to generate (URL parameter)"},
			"bytes": {
				Type:        framework.TypeInt,
				Default:     32,
				Description: "The number of bytes to generate. Defaults to 32 (256 bits).",
			},
			"format": {
				Type:        framework.TypeString,
				Default:     "base64",
				Description: `Output encoding: "base64" (default) or "hex".`,
			},
			"source": {
				Type:        framework.TypeString,
				Default:     "platform",
				Description: `Entropy source: "platform" (default), "seal" or "all".`,
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathRandomWrite},
		},
		HelpSynopsis:    pathRandomHelpSyn,
		HelpDescription: pathRandomHelpDesc,
	}
}

// randomRequest resolves source and byte count from the URL and body. The
// URL's first segment is a source when it names one, else a byte count.
func randomRequest(d *framework.FieldData) (source string, n int, err error) {
	urlSource, _ := d.Raw["source"].(string)
	urlBytes, _ := d.Raw["urlbytes"].(string)
	source, n = "platform", d.Get("bytes").(int)
	switch {
	case urlSource == "":
	case urlBytes == "" && isRandomSource(urlSource):
		source = urlSource
	case urlBytes == "":
		if n, err = strconv.Atoi(urlSource); err != nil {
			return "", 0, fmt.Errorf("error parsing url-set byte count: %s", err)
		}
	default:
		source = urlSource
		if n, err = strconv.Atoi(urlBytes); err != nil {
			return "", 0, fmt.Errorf("error parsing url-set byte count: %s", err)
		}
	}
	switch {
	case n < 1:
		return "", 0, fmt.Errorf(`"bytes" cannot be less than 1`)
	case n > maxRandomBytes:
		return "", 0, fmt.Errorf(`"bytes" should be less than %d`, maxRandomBytes)
	}
	return source, n, nil
}

func isRandomSource(s string) bool {
	switch s {
	case "", "platform", "seal", "all":
		return true
	}
	return false
}

// pathRandomWrite returns n random bytes from the requested source.
func (b *backend) pathRandomWrite(_ context.Context, _ *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	source, n, err := randomRequest(d)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	format := d.Get("format").(string)
	if format != "hex" && format != "base64" {
		return logical.ErrorResponse(fmt.Sprintf("unsupported encoding format %q; must be \"hex\" or \"base64\"", format)), logical.ErrInvalidRequest
	}
	if !isRandomSource(source) {
		return logical.ErrorResponse(fmt.Sprintf("unsupported entropy source %q; must be \"platform\" or \"seal\", or \"all\"", source)), logical.ErrInvalidRequest
	}
	buf := make([]byte, n)
	if _, err := rand.Read(buf); err != nil {
		return nil, fmt.Errorf("reading random bytes: %w", err)
	}
	resp := &logical.Response{Data: map[string]interface{}{}}
	if source == "seal" {
		// An external plugin has no access to Vault's seal entropy.
		resp.AddWarning("no seal/entropy augmentation available, using platform entropy source")
	}
	if format == "hex" {
		resp.Data["random_bytes"] = hex.EncodeToString(buf)
	} else {
		resp.Data["random_bytes"] = base64.StdEncoding.EncodeToString(buf)
	}
	return resp, nil
}

const pathRandomHelpSyn = `Generate random bytes`

const pathRandomHelpDesc = `
Returns high-entropy random bytes, base64- or hex-encoded.
`
