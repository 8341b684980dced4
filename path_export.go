package hsmtransit

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// Export types of export/:type/:name.
const (
	exportEncryptionKey    = "encryption-key"
	exportSigningKey       = "signing-key"
	exportHMACKey          = "hmac-key"
	exportPublicKey        = "public-key"
	exportCertificateChain = "certificate-chain"
	exportCMACKey          = "cmac-key"
)

// pathExport exports key material of exportable keys, and public keys and
// certificate chains of any signing key.
func (b *backend) pathExport() *framework.Path {
	return &framework.Path{
		Pattern: "export/" + framework.GenericNameRegex("type") + "/" + framework.GenericNameRegex("name") + framework.OptionalParamRegex("version"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "export",
			OperationSuffix: "key|key-version",
		},
		Fields: map[string]*framework.FieldSchema{
			"type": {
				Type:        framework.TypeString,
				Description: "What to export: encryption-key, signing-key, hmac-key, public-key or certificate-chain",
			},
			"name":    {Type: framework.TypeString, Description: "Name of the key"},
			"version": {Type: framework.TypeString, Description: "Version of the key: a number, v<number> or latest; all when omitted"},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{Callback: b.pathExportRead},
		},
		HelpSynopsis:    pathExportHelpSyn,
		HelpDescription: pathExportHelpDesc,
	}
}

// errCallerExport marks an export error as the caller's.
type errCallerExport struct{ msg string }

func (e errCallerExport) Error() string { return e.msg }

// pathExportRead returns the requested material of every version, or one.
func (b *backend) pathExportRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	exportType := d.Get("type").(string)
	switch exportType {
	case exportEncryptionKey, exportSigningKey, exportHMACKey, exportPublicKey, exportCertificateChain:
	case exportCMACKey:
		return logical.ErrorResponse(fmt.Sprintf(errEnterpriseOnly, exportCMACKey)), logical.ErrInvalidRequest
	default:
		return logical.ErrorResponse(fmt.Sprintf("invalid export type: %s", exportType)), logical.ErrInvalidRequest
	}
	p, unlock, err := b.readPolicy(ctx, req.Storage, d.Get("name").(string), false)
	defer unlock()
	if err != nil || p == nil {
		return nil, err
	}
	if err := checkExportable(p, exportType); err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	versions, err := selectVersions(p, d.Get("version").(string))
	if err != nil {
		return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
	}
	keys := make(map[string]string, len(versions))
	for _, v := range versions {
		entry := p.Keys[v]
		out, err := exportKey(p, &entry, exportType)
		if err != nil {
			var ce errCallerExport
			if errors.As(err, &ce) {
				return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
			}
			return nil, err
		}
		keys[v] = out
	}
	return &logical.Response{Data: map[string]interface{}{
		"name": p.Name,
		"type": p.Type.String(),
		"keys": keys,
	}}, nil
}

// checkExportable refuses private material of a non-exportable key and
// material the key type does not have.
func checkExportable(p *keysutil.Policy, exportType string) error {
	if !p.Exportable && exportType != exportPublicKey && exportType != exportCertificateChain {
		return errors.New("private key material is not exportable")
	}
	switch exportType {
	case exportEncryptionKey:
		if !p.Type.EncryptionSupported() {
			return errors.New("encryption not supported for the key")
		}
	case exportSigningKey:
		if !p.Type.SigningSupported() {
			return errors.New("signing not supported for the key")
		}
	case exportCertificateChain:
		if !p.Type.SigningSupported() {
			return errors.New("certificate chain not supported for keys that do not support signing")
		}
	}
	return nil
}

// selectVersions resolves an export's version argument ("", "latest", "3",
// "v3") to version keys of p.Keys.
func selectVersions(p *keysutil.Policy, version string) ([]string, error) {
	if version == "" {
		all := make([]string, 0, len(p.Keys))
		for v := range p.Keys {
			all = append(all, v)
		}
		return all, nil
	}
	n := p.LatestVersion
	if version != "latest" {
		var err error
		if n, err = strconv.Atoi(strings.TrimPrefix(version, "v")); err != nil {
			return nil, errors.New("invalid key version")
		}
	}
	if n < p.MinDecryptionVersion {
		return nil, errors.New("version for export is below minimum decryption version")
	}
	if _, ok := p.Keys[strconv.Itoa(n)]; !ok {
		return nil, errors.New("version does not exist or cannot be found")
	}
	return []string{strconv.Itoa(n)}, nil
}

// exportKey encodes one version's material in built-in transit's formats.
func exportKey(p *keysutil.Policy, k *keysutil.KeyEntry, exportType string) (string, error) {
	switch exportType {
	case exportHMACKey:
		src := k.HMACKey
		if p.Type == keysutil.KeyType_HMAC {
			src = k.Key
		}
		return base64.StdEncoding.EncodeToString(src), nil
	case exportCertificateChain:
		if k.CertificateChain == nil {
			return "", errCallerExport{"selected key version does not have a certificate chain imported"}
		}
		return pemChain(k.CertificateChain), nil
	}

	switch p.Type {
	case keysutil.KeyType_AES128_GCM96, keysutil.KeyType_AES256_GCM96, keysutil.KeyType_ChaCha20_Poly1305:
		if exportType == exportEncryptionKey {
			return base64.StdEncoding.EncodeToString(k.Key), nil
		}
	case keysutil.KeyType_RSA2048, keysutil.KeyType_RSA3072, keysutil.KeyType_RSA4096:
		switch exportType {
		case exportEncryptionKey, exportSigningKey:
			return encodeRSAPrivateKey(k), nil
		case exportPublicKey:
			return encodeRSAPublicKey(k)
		}
	case keysutil.KeyType_ECDSA_P256, keysutil.KeyType_ECDSA_P384, keysutil.KeyType_ECDSA_P521:
		switch exportType {
		case exportSigningKey:
			return encodeECPrivateKey(k, curveOf(p.Type))
		case exportPublicKey:
			return encodeECPublicKey(k, curveOf(p.Type))
		}
	case keysutil.KeyType_ED25519:
		switch exportType {
		case exportSigningKey:
			if len(k.Key) == 0 {
				return "", nil
			}
			return base64.StdEncoding.EncodeToString(k.Key), nil
		case exportPublicKey:
			return strings.TrimSpace(k.FormattedPublicKey), nil
		}
	}
	return "", errCallerExport{fmt.Sprintf("unknown key type %v for export type %v", p.Type, exportType)}
}

// curveOf returns the curve of an ECDSA key type.
func curveOf(kt keysutil.KeyType) elliptic.Curve {
	switch kt {
	case keysutil.KeyType_ECDSA_P384:
		return elliptic.P384()
	case keysutil.KeyType_ECDSA_P521:
		return elliptic.P521()
	}
	return elliptic.P256()
}

// encodeRSAPrivateKey is PKCS#1 PEM, or "" for an imported public key.
func encodeRSAPrivateKey(k *keysutil.KeyEntry) string {
	if k.IsPrivateKeyMissing() {
		return ""
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k.RSAKey)}))
}

// encodeRSAPublicKey is PKIX PEM.
func encodeRSAPublicKey(k *keysutil.KeyEntry) (string, error) {
	var pub crypto.PublicKey
	switch {
	case k.RSAKey != nil:
		pub = k.RSAKey.Public()
	case k.RSAPublicKey != nil:
		pub = k.RSAPublicKey
	default:
		return "", errors.New("requested to encode an RSA public key with no RSA key present")
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("error marshaling RSA public key: %w", err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), nil
}

// ecPublic rebuilds the public key of an ECDSA version.
func ecPublic(k *keysutil.KeyEntry, curve elliptic.Curve) *ecdsa.PublicKey {
	return &ecdsa.PublicKey{Curve: curve, X: k.EC_X, Y: k.EC_Y}
}

// encodeECPrivateKey is SEC 1 PEM, or "" for an imported public key.
func encodeECPrivateKey(k *keysutil.KeyEntry, curve elliptic.Curve) (string, error) {
	if k.IsPrivateKeyMissing() {
		return "", nil
	}
	der, err := x509.MarshalECPrivateKey(&ecdsa.PrivateKey{PublicKey: *ecPublic(k, curve), D: k.EC_D})
	if err != nil {
		return "", fmt.Errorf("encoding EC private key: %w", err)
	}
	return strings.TrimSpace(string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}))), nil
}

// encodeECPublicKey is PKIX PEM.
func encodeECPublicKey(k *keysutil.KeyEntry, curve elliptic.Curve) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(ecPublic(k, curve))
	if err != nil {
		return "", fmt.Errorf("encoding EC public key: %w", err)
	}
	return strings.TrimSpace(string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))), nil
}

const pathExportHelpSyn = `Export named encryption or signing key`

const pathExportHelpDesc = `
This path exports the key material of keys created exportable, and the public
key or certificate chain of any signing key.
`
