package hsmtransit

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// pathCreateCSR makes a certificate signing request signed by a key.
func (b *backend) pathCreateCSR() *framework.Path {
	return &framework.Path{
		Pattern: "keys/" + framework.GenericNameRegex("name") + "/csr",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "generate-csr-for-key",
		},
		Fields: map[string]*framework.FieldSchema{
			"name":    {Type: framework.TypeString, Required: true, Description: "Name of the key"},
			"version": {Type: framework.TypeInt, Description: "Version of the key; the latest when omitted"},
			"csr": {
				Type:        framework.TypeString,
				Description: "PEM CSR template whose subject and attributes the CSR takes; an empty CSR when omitted.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathCreateCSRWrite},
		},
		HelpSynopsis:    pathCreateCSRHelpSyn,
		HelpDescription: pathCreateCSRHelpDesc,
	}
}

// pathSetCertificate stores a certificate chain for a key version.
func (b *backend) pathSetCertificate() *framework.Path {
	return &framework.Path{
		Pattern: "keys/" + framework.GenericNameRegex("name") + "/set-certificate",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "set-certificate-for-key",
		},
		Fields: map[string]*framework.FieldSchema{
			"name":    {Type: framework.TypeString, Required: true, Description: "Name of the key"},
			"version": {Type: framework.TypeInt, Description: "Version of the key; the latest when omitted"},
			"certificate_chain": {
				Type:        framework.TypeString,
				Required:    true,
				Description: "PEM certificate chain, leaf first; the leaf's key must be this key version's.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathSetCertificateWrite},
		},
		HelpSynopsis:    pathSetCertificateHelpSyn,
		HelpDescription: pathSetCertificateHelpDesc,
	}
}

// certificateKey loads a signing key for the certificate paths, locked, and
// the version to use.
func (b *backend) certificateKey(ctx context.Context, req *logical.Request, d *framework.FieldData, exclusive bool) (*keysutil.Policy, int, func(), error) {
	name := d.Get("name").(string)
	p, unlock, err := b.readPolicy(ctx, req.Storage, name, exclusive)
	if err != nil {
		return nil, 0, unlock, err
	}
	switch {
	case p == nil:
		return nil, 0, unlock, fmt.Errorf("key with provided name '%s' not found", name)
	case !p.Type.SigningSupported():
		return nil, 0, unlock, fmt.Errorf("key type '%s' does not support signing", p.Type)
	case p.Derived:
		return nil, 0, unlock, errors.New("operation not supported on keys with derivation enabled")
	}
	version := p.LatestVersion
	if v, ok := d.GetOk("version"); ok {
		version = v.(int)
	}
	return p, version, unlock, nil
}

// pathCreateCSRWrite returns the PEM CSR.
func (b *backend) pathCreateCSRWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	template := &x509.CertificateRequest{}
	if s := d.Get("csr").(string); s != "" {
		block, _ := pem.Decode([]byte(s))
		if block == nil {
			return logical.ErrorResponse("could not decode PEM certificate request"), logical.ErrInvalidRequest
		}
		var err error
		if template, err = x509.ParseCertificateRequest(block.Bytes); err != nil {
			return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
		}
	}
	p, version, unlock, err := b.certificateKey(ctx, req, d, false)
	defer unlock()
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	csr, err := p.CreateCsr(version, template)
	if err != nil {
		return logical.ErrorResponse(fmt.Sprintf("could not create the csr: %s", err)), logical.ErrInvalidRequest
	}
	return &logical.Response{Data: map[string]interface{}{
		"name": p.Name,
		"type": p.Type.String(),
		"csr":  string(csr),
	}}, nil
}

// pathSetCertificateWrite validates and stores the chain.
func (b *backend) pathSetCertificateWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	chainPEM := d.Get("certificate_chain").(string)
	chain, err := parseCertificateChain(chainPEM)
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	p, version, unlock, err := b.certificateKey(ctx, req, d, true)
	defer unlock()
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	if entry, ok := p.Keys[strconv.Itoa(version)]; ok && p.Type.PaddingSchemesSupported() && entry.RSAKey == nil {
		// keysutil compares the leaf with the private key and would
		// dereference nil for an RSA version imported as a public key.
		return logical.ErrorResponse("version %d of key %s has no private key; import it with import_version first", version, p.Name), logical.ErrInvalidRequest
	}
	if err := p.ValidateAndPersistCertificateChain(ctx, version, chain, req.Storage); err != nil {
		if isInternal(err) {
			return nil, fmt.Errorf("failed to persist certificate chain: %w", err)
		}
		return logical.ErrorResponse(fmt.Sprintf("failed to persist certificate chain: %s", err)), logical.ErrInvalidRequest
	}
	return &logical.Response{Data: map[string]interface{}{
		"name":              p.Name,
		"type":              p.Type.String(),
		"certificate-chain": chainPEM,
	}}, nil
}

// parseCertificateChain reads concatenated PEM certificates, ignoring other
// blocks.
func parseCertificateChain(s string) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest := []byte(strings.TrimSpace(s))
	for len(rest) > 0 {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return nil, errors.New("could not decode PEM block in certificate chain")
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("failed to parse certificate in certificate chain: %w", err)
		}
		certs = append(certs, cert)
	}
	if len(certs) == 0 {
		return nil, errors.New("provided certificate chain did not contain any valid PEM certificate")
	}
	return certs, nil
}

const pathCreateCSRHelpSyn = `Create a CSR from a key in transit`

const pathCreateCSRHelpDesc = `
This path returns a certificate signing request signed by a version of the
named signing key, taking subject and attributes from an optional template.
`

const pathSetCertificateHelpSyn = `Imports an externally-signed certificate chain into an existing key version`

const pathSetCertificateHelpDesc = `
This path stores a certificate chain for a version of the named signing key;
the leaf certificate's public key must match that version.
`
