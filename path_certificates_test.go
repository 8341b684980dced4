package hsmtransit

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// certCA is a local test CA.
type certCA struct {
	cert *x509.Certificate
	key  crypto.Signer
	pem  string
}

func certNewCA(t *testing.T) *certCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "Test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &certCA{cert: cert, key: key, pem: certPEM(der)}
}

func certPEM(der []byte) string {
	return strings.TrimSpace(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
}

// issue signs a leaf certificate for pub.
func (ca *certCA) issue(t *testing.T, subject pkix.Name, pub crypto.PublicKey, serial int64) string {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               subject,
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(12 * time.Hour),
		BasicConstraintsValid: true,
		IsCA:                  false,
		KeyUsage:              x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	require.NoError(t, err)
	return certPEM(der)
}

// certCSR asks transit for a CSR and parses it, checking its signature.
func certCSR(t *testing.T, e *testEnv, name string, data map[string]interface{}) *x509.CertificateRequest {
	t.Helper()
	r := e.write(t, "keys/"+name+"/csr", data)
	requireStatus(t, r, 200, "")
	require.Equal(t, name, r.data["name"])
	pemText, ok := r.data["csr"].(string)
	require.True(t, ok, "%#v", r.data)
	block, _ := pem.Decode([]byte(pemText))
	require.NotNil(t, block, pemText)
	require.Equal(t, "CERTIFICATE REQUEST", block.Type)
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	require.NoError(t, err)
	require.NoError(t, csr.CheckSignature())
	return csr
}

// certPublicKey is the transit key's public key of a version: PKIX PEM, or
// for ed25519, base64 of the raw key.
func certPublicKey(t *testing.T, e *testEnv, name, version string) crypto.PublicKey {
	t.Helper()
	exported := exportKeys(t, e, "public-key/"+name+"/"+version)[version]
	if !strings.HasPrefix(exported, "-----BEGIN") {
		raw, err := base64.StdEncoding.DecodeString(exported)
		require.NoError(t, err)
		require.Len(t, raw, ed25519.PublicKeySize)
		return ed25519.PublicKey(raw)
	}
	der := exportPEM(t, exported, "PUBLIC KEY")
	pub, err := x509.ParsePKIXPublicKey(der)
	require.NoError(t, err)
	return pub
}

// certDERs parses concatenated PEM certificates to their DER bytes.
func certDERs(t *testing.T, s string) [][]byte {
	t.Helper()
	var out [][]byte
	rest := []byte(s)
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		out = append(out, block.Bytes)
	}
	require.Empty(t, strings.TrimSpace(string(rest)))
	return out
}

type certEqualer interface{ Equal(crypto.PublicKey) bool }

func TestCreateCSR(t *testing.T) {
	e := getTestBackend(t)
	templateKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	templateDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:  pkix.Name{CommonName: "app.example.com", Organization: []string{"Example Org"}, Country: []string{"NZ"}},
		DNSNames: []string{"app.example.com", "www.example.com"},
	}, templateKey)
	require.NoError(t, err)
	template := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: templateDER}))

	for _, keyType := range []string{"ecdsa-p256", "rsa-2048", "ed25519"} {
		t.Run(keyType, func(t *testing.T) {
			e.mustWrite(t, "keys/"+keyType, map[string]interface{}{"type": keyType})
			pub := certPublicKey(t, e, keyType, "1")

			t.Run("no template", func(t *testing.T) {
				csr := certCSR(t, e, keyType, nil)
				require.True(t, pub.(certEqualer).Equal(csr.PublicKey), "CSR public key is not the key's")
				require.Empty(t, csr.Subject.CommonName)
			})
			t.Run("template", func(t *testing.T) {
				csr := certCSR(t, e, keyType, map[string]interface{}{"csr": template})
				require.True(t, pub.(certEqualer).Equal(csr.PublicKey), "CSR public key is not the key's")
				require.False(t, templateKey.PublicKey.Equal(csr.PublicKey), "CSR kept the template's key")
				require.Equal(t, "app.example.com", csr.Subject.CommonName)
				require.Equal(t, []string{"Example Org"}, csr.Subject.Organization)
				require.Equal(t, []string{"NZ"}, csr.Subject.Country)
				require.Equal(t, []string{"app.example.com", "www.example.com"}, csr.DNSNames)
			})
		})
	}

	t.Run("older version", func(t *testing.T) {
		e.mustWrite(t, "keys/ecdsa-p256/rotate", nil)
		v1 := certPublicKey(t, e, "ecdsa-p256", "1")
		v2 := certPublicKey(t, e, "ecdsa-p256", "2")
		require.True(t, v2.(certEqualer).Equal(certCSR(t, e, "ecdsa-p256", nil).PublicKey))
		require.True(t, v1.(certEqualer).Equal(certCSR(t, e, "ecdsa-p256", map[string]interface{}{"version": 1}).PublicKey))
	})
}

func TestCreateCSRErrors(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/aes", nil)
	e.mustWrite(t, "keys/derived", map[string]interface{}{"type": "ed25519", "derived": true})
	e.mustWrite(t, "keys/ec", map[string]interface{}{"type": "ecdsa-p256"})
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	e.mustWrite(t, "keys/pubonly/import", map[string]interface{}{"type": "ecdsa-p256", "public_key": importPublicPEM(t, ecKey.Public())})

	cases := []struct {
		name string
		key  string
		data map[string]interface{}
		msg  string
	}{
		{"aes key", "aes", nil, "does not support signing"},
		{"derived ed25519", "derived", nil, "derivation"},
		{"missing key", "nope", nil, "not found"},
		{"bad template", "ec", map[string]interface{}{"csr": "not a csr"}, "could not decode PEM"},
		{"template not a CSR", "ec", map[string]interface{}{"csr": string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: []byte("junk")}))}, "asn1: structure error"},
		{"missing version", "ec", map[string]interface{}{"version": 9}, "no such key version"},
		{"public key only", "pubonly", nil, "private key not imported"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := e.write(t, "keys/"+tc.key+"/csr", tc.data)
			t.Logf("%d %s", r.status, r.errorMessage())
			requireStatus(t, r, 400, tc.msg)
			require.Nil(t, r.data["csr"])
		})
	}
}

func TestSetCertificate(t *testing.T) {
	ca := certNewCA(t)
	for _, keyType := range []string{"ecdsa-p256", "rsa-2048", "ed25519"} {
		t.Run(keyType, func(t *testing.T) {
			e := getTestBackend(t)
			e.mustWrite(t, "keys/k", map[string]interface{}{"type": keyType})
			csr := certCSR(t, e, "k", map[string]interface{}{"csr": ""})
			leaf := ca.issue(t, pkix.Name{CommonName: "leaf " + keyType}, csr.PublicKey, 2)
			chain := leaf + "\n" + ca.pem

			r := e.write(t, "keys/k/set-certificate", map[string]interface{}{"certificate_chain": chain})
			requireStatus(t, r, 200, "")
			require.Equal(t, chain, r.data["certificate-chain"])

			want := certDERs(t, chain)
			require.Len(t, want, 2)

			key := e.read(t, "keys/k")
			requireStatus(t, key, 200, "")
			versions, ok := key.data["keys"].(map[string]interface{})
			require.True(t, ok)
			v1, ok := versions["1"].(map[string]interface{})
			require.True(t, ok)
			require.Equal(t, want, certDERs(t, v1["certificate_chain"].(string)))

			exported := exportKeys(t, e, "certificate-chain/k")
			require.Equal(t, want, certDERs(t, exported["1"]))
			exported = exportKeys(t, e, "certificate-chain/k/latest")
			require.Equal(t, want, certDERs(t, exported["1"]))

			// A new version has no chain of its own.
			e.mustWrite(t, "keys/k/rotate", nil)
			r = e.read(t, "export/certificate-chain/k/2")
			requireStatus(t, r, 400, "does not have a certificate chain")
			r = e.read(t, "export/certificate-chain/k/1")
			requireStatus(t, r, 200, "")

			// And takes one for itself with version.
			csr2 := certCSR(t, e, "k", map[string]interface{}{"version": 2})
			leaf2 := ca.issue(t, pkix.Name{CommonName: "leaf 2"}, csr2.PublicKey, 3)
			r = e.write(t, "keys/k/set-certificate", map[string]interface{}{"certificate_chain": leaf2, "version": 2})
			requireStatus(t, r, 200, "")
			require.Equal(t, certDERs(t, leaf2), certDERs(t, exportKeys(t, e, "certificate-chain/k/2")["2"]))
			require.Equal(t, want, certDERs(t, exportKeys(t, e, "certificate-chain/k/1")["1"]))
		})
	}
}

func TestSetCertificateErrors(t *testing.T) {
	ca := certNewCA(t)
	e := getTestBackend(t)
	e.mustWrite(t, "keys/ec", map[string]interface{}{"type": "ecdsa-p256"})
	e.mustWrite(t, "keys/aes", nil)
	e.mustWrite(t, "keys/derived", map[string]interface{}{"type": "ed25519", "derived": true})
	csr := certCSR(t, e, "ec", nil)
	good := ca.issue(t, pkix.Name{CommonName: "good"}, csr.PublicKey, 10)

	otherEC, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	otherRSA, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	wrongKey := ca.issue(t, pkix.Name{CommonName: "wrong key"}, otherEC.Public(), 11)
	wrongAlg := ca.issue(t, pkix.Name{CommonName: "wrong algorithm"}, otherRSA.Public(), 12)

	cases := []struct {
		name  string
		key   string
		chain string
		msg   string
	}{
		{"leaf key does not match", "ec", wrongKey + "\n" + ca.pem, "leaf certificate public key"},
		{"leaf of another algorithm", "ec", wrongAlg + "\n" + ca.pem, "does not match the transit key type"},
		{"garbage", "ec", "garbage", "could not decode PEM block"},
		{"garbage certificate", "ec", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("junk")})), "failed to parse certificate"},
		{"no certificate", "ec", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("junk")})), "did not contain any valid PEM certificate"},
		{"CA first", "ec", ca.pem + "\n" + good, "not a leaf certificate"},
		{"two leaves", "ec", good + "\n" + wrongKey, "more than one leaf"},
		{"aes key", "aes", good, "does not support signing"},
		{"derived key", "derived", good, "derivation"},
		{"missing key", "nope", good, "not found"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := e.write(t, "keys/"+tc.key+"/set-certificate", map[string]interface{}{"certificate_chain": tc.chain})
			t.Logf("%d %s", r.status, r.errorMessage())
			requireStatus(t, r, 400, tc.msg)
		})
	}
	t.Run("nothing was stored", func(t *testing.T) {
		r := e.read(t, "export/certificate-chain/ec")
		requireStatus(t, r, 400, "does not have a certificate chain")
	})
	t.Run("missing version", func(t *testing.T) {
		r := e.write(t, "keys/ec/set-certificate", map[string]interface{}{"certificate_chain": good, "version": 5})
		requireStatus(t, r, 400, "could not validate key match between leaf certificate key and key version in transit: no such key version")
	})
	t.Run("the good chain is accepted", func(t *testing.T) {
		r := e.write(t, "keys/ec/set-certificate", map[string]interface{}{"certificate_chain": good + "\n" + ca.pem})
		requireStatus(t, r, 200, "")
	})
}

// A key imported as a public key only can still carry its certificate: the
// leaf matches the public key, which is all set-certificate checks.
func TestSetCertificatePublicKeyOnly(t *testing.T) {
	ca := certNewCA(t)
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	e := getTestBackend(t)
	cases := []struct {
		keyType string
		pub     crypto.PublicKey
	}{
		{"ecdsa-p256", ecKey.Public()},
		{"rsa-2048", rsaKey.Public()},
	}
	for i, tc := range cases {
		t.Run(tc.keyType, func(t *testing.T) {
			name := "pub-" + tc.keyType
			e.mustWrite(t, "keys/"+name+"/import", map[string]interface{}{"type": tc.keyType, "public_key": importPublicPEM(t, tc.pub)})
			chain := ca.issue(t, pkix.Name{CommonName: name}, tc.pub, int64(20+i)) + "\n" + ca.pem

			var r result
			var panicked interface{}
			func() {
				defer func() { panicked = recover() }()
				r = e.write(t, "keys/"+name+"/set-certificate", map[string]interface{}{"certificate_chain": chain})
			}()
			require.Nil(t, panicked, "set-certificate panicked: %v", panicked)
			if tc.keyType == "rsa-2048" {
				// keysutil needs the RSA private key to match the leaf; a
				// public-only RSA version is refused instead of crashing.
				requireStatus(t, r, 400, "has no private key")
				return
			}
			requireStatus(t, r, 200, "")
			require.Equal(t, certDERs(t, chain), certDERs(t, exportKeys(t, e, "certificate-chain/"+name)["1"]))
		})
	}
}
