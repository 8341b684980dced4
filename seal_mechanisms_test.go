package hsmtransit

import (
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/mountseal"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/p11env"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/p11shim"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
	sealpkg "github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// These tests run config/seal's mechanisms through the backend: the four
// seal mechanisms over SoftHSM2, the choice made from what a token offers,
// the canary that keeps a broken token from sealing anything, FIPS-mode
// tokens that choose the AES-GCM IV, a hung token against hsm_timeout
// (through internal/p11shim), and openCryptoki's soft token, which has no
// AES-GCM and no key wrap.

// mechanismHMACLabel is the HMAC key label a mechanism's status shows; ""
// for the mechanisms without one.
func mechanismHMACLabel(m hsm.SealMechanism, kek string) string {
	if m == hsm.AESCBCHMAC {
		return hsm.DefaultHMACLabel(kek)
	}
	return ""
}

// requireSealShows checks config/seal and seal/status name the mechanism
// and its keys.
func requireSealShows(t *testing.T, e *testEnv, m hsm.SealMechanism, kek string) {
	t.Helper()
	cfg := e.read(t, "config/seal")
	requireStatus(t, cfg, 200, "")
	require.Equal(t, string(m), cfg.data["mechanism"], "config/seal mechanism")
	require.Equal(t, kek, cfg.data["key_label"])
	st := e.read(t, "seal/status")
	requireStatus(t, st, 200, "")
	require.Equal(t, false, st.data["sealed"], "last_error: %v", st.data["last_error"])
	require.Equal(t, string(m), st.data["mechanism"], "seal/status mechanism")
	require.Equal(t, kek, st.data["key_label"])
	if h := mechanismHMACLabel(m, kek); h != "" {
		require.Equal(t, h, cfg.data["hmac_key_label"], "config/seal hmac_key_label")
		require.Equal(t, h, st.data["hmac_key_label"], "seal/status hmac_key_label")
	} else {
		require.NotContains(t, cfg.data, "hmac_key_label")
		require.NotContains(t, st.data, "hmac_key_label")
	}
	stored := storedSealConfig(t, e)
	require.Equal(t, string(m), stored.SealedMechanism, "the stored keyring records its mechanism")
	require.Equal(t, kek, stored.SealedWith)
	require.Equal(t, mechanismHMACLabel(m, kek), stored.SealedHMAC)
}

// requireKeyringSealedBy opens the stored keyring with the token directly:
// it opens with the recorded mechanism and keys for this mount only, not
// under another mechanism with the same labels nor for another mount, and
// neither the keyring nor any root key in it is anywhere in raw storage.
func requireKeyringSealedBy(t *testing.T, e *testEnv, tc hsm.Config, m hsm.SealMechanism) {
	t.Helper()
	tok, err := hsm.Open(tc)
	require.NoError(t, err)
	defer tok.Close()
	cfg := storedSealConfig(t, e)
	keys := cfg.SealedKeys()
	require.Equal(t, m, keys.Mechanism)
	raw, err := tok.Open(keys, cfg.SealedKeyring, rootAADOf(e))
	require.NoError(t, err, "the stored keyring opens with %s", m)
	var ring struct {
		Active uint32            `json:"active"`
		Keys   map[string][]byte `json:"keys"`
	}
	require.NoError(t, json.Unmarshal(raw, &ring))
	require.NotEmpty(t, ring.Keys)
	require.Equal(t, cfg.RootKeyVersion, ring.Active)

	_, err = tok.Open(keys, cfg.SealedKeyring, []byte("hsm-transit/root-keyring\x00another-mount"))
	require.Error(t, err, "the keyring is bound to its mount")
	for _, other := range hsm.SealMechanisms {
		if other == m {
			continue
		}
		k := hsm.SealKeys{Mechanism: other, Label: keys.Label, HMACLabel: hsm.DefaultHMACLabel(keys.Label)}
		_, err := tok.Open(k, cfg.SealedKeyring, rootAADOf(e))
		require.Error(t, err, "a %s keyring opens as %s", m, other)
	}

	for _, key := range ring.Keys {
		require.Len(t, key, 32)
	}
	// The keyring the token gave back opens every sealed entry, and
	// neither it nor any root key in it is anywhere in raw storage.
	opened, err := sealpkg.UnmarshalKeyring(raw)
	require.NoError(t, err)
	check := requireAllSealed(t, e.storage, opened, secretSet{"the keyring": raw})
	require.NotEmpty(t, check.opened)
}

// TestSealMechanismsSoftHSM seals a mount with each mechanism and the keys
// generate_key makes for it, and takes it through restarts and a root key
// rotation.
func TestSealMechanismsSoftHSM(t *testing.T) {
	tc := hsm.Config{Library: softhsmLib, TokenLabel: testToken, PIN: testPIN}
	for _, m := range hsm.SealMechanisms {
		t.Run(string(m), func(t *testing.T) {
			kek := uniq(t, "kek-"+string(m))
			e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
			data := e.mustWrite(t, "config/seal", withSeal(map[string]interface{}{
				"mechanism": string(m), "key_label": kek, "generate_key": true,
			}))
			require.Equal(t, string(m), data["mechanism"])
			requireSealShows(t, e, m, kek)
			st := e.read(t, "seal/status").data
			require.Equal(t, float64(5), st["hsm_timeout"])
			require.Equal(t, []interface{}{"aes-gcm", "aes-kwp", "aes-cbc-hmac", "rsa-oaep"}, st["token_mechanisms"])
			require.Equal(t, true, st["hsm_keys_supported"])
			requireKeyringSealedBy(t, e, tc, m)

			ct := e.encrypt(t, "soft", "sealed with "+string(m), nil)
			e = e.restart(t)
			require.Equal(t, "sealed with "+string(m), e.decrypt(t, "soft", ct, nil))
			requireSealShows(t, e, m, kek)

			rot := e.mustWrite(t, "seal/rotate", nil)
			require.Equal(t, float64(2), rot["root_key_version"])
			ct2 := e.encrypt(t, "soft", "after the rotation", nil)
			e = e.restart(t)
			require.Equal(t, "sealed with "+string(m), e.decrypt(t, "soft", ct, nil))
			require.Equal(t, "after the rotation", e.decrypt(t, "soft", ct2, nil))
			require.Equal(t, float64(2), e.read(t, "seal/status").data["root_key_version"])
			requireSealShows(t, e, m, kek)
			requireKeyringSealedBy(t, e, tc, m)
		})
	}
}

// TestSealMechanismAutoSoftHSM: with no mechanism given, SoftHSM2 (which
// offers all four) gets aes-gcm.
func TestSealMechanismAutoSoftHSM(t *testing.T) {
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	kek := uniq(t, "kek-auto")
	data := e.mustWrite(t, "config/seal", withSeal(map[string]interface{}{"key_label": kek, "generate_key": true}))
	require.Equal(t, "aes-gcm", data["mechanism"])
	requireSealShows(t, e, hsm.AESGCM, kek)
	ct := e.encrypt(t, "k", "auto", nil)
	e = e.restart(t)
	require.Equal(t, "auto", e.decrypt(t, "k", ct, nil))
	requireSealShows(t, e, hsm.AESGCM, kek)
}

// TestSealMechanismChange moves a sealed aes-gcm mount to aes-cbc-hmac,
// keeping its KEK label: the keyring is sealed again, by the new mechanism
// only, and everything stored before still reads, after a restart too.
func TestSealMechanismChange(t *testing.T) {
	kek := uniq(t, "kek-change")
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	e.mustWrite(t, "config/seal", withSeal(map[string]interface{}{"key_label": kek, "generate_key": true}))
	requireSealShows(t, e, hsm.AESGCM, kek)
	ct := e.encrypt(t, "k", "sealed before the change", nil)
	before := storedSealConfig(t, e).SealedKeyring

	// Without generate_key the HMAC key the new mechanism needs is
	// missing: refused, nothing changes.
	raw := rawGet(t, e, mountseal.ConfigPath)
	r := e.write(t, "config/seal", map[string]interface{}{"mechanism": "aes-cbc-hmac"})
	requireStatus(t, r, 400, "generate_key=true")
	require.Contains(t, r.errorMessage(), hsm.DefaultHMACLabel(kek))
	require.Equal(t, raw, rawGet(t, e, mountseal.ConfigPath))

	data := e.mustWrite(t, "config/seal", map[string]interface{}{"mechanism": "aes-cbc-hmac", "generate_key": true})
	require.Equal(t, "aes-cbc-hmac", data["mechanism"])
	require.Equal(t, hsm.DefaultHMACLabel(kek), data["hmac_key_label"])
	requireSealShows(t, e, hsm.AESCBCHMAC, kek)
	require.NotEqual(t, before, storedSealConfig(t, e).SealedKeyring, "the keyring is sealed again")
	require.Equal(t, "sealed before the change", e.decrypt(t, "k", ct, nil), "no downtime")
	requireKeyringSealedBy(t, e, hsm.Config{Library: softhsmLib, TokenLabel: testToken, PIN: testPIN}, hsm.AESCBCHMAC)

	e = e.restart(t)
	require.Equal(t, "sealed before the change", e.decrypt(t, "k", ct, nil))
	requireSealShows(t, e, hsm.AESCBCHMAC, kek)
	ct2 := e.encrypt(t, "k", "after the change", nil)
	e = e.restart(t)
	require.Equal(t, "after the change", e.decrypt(t, "k", ct2, nil))
}

// TestSealMechanismRefusals: settings that cannot work are refused with a
// 400 that says what to fix, on a mount not sealed yet (nothing is stored)
// and on a sealed one (nothing changes).
func TestSealMechanismRefusals(t *testing.T) {
	hsmPrefixed := hsmNamespace + "my-hmac"
	kek := uniq(t, "kek-refusals")
	cases := []struct {
		name string
		data map[string]interface{}
		msg  []string
	}{
		{"unknown mechanism", map[string]interface{}{"mechanism": "bogus"},
			[]string{`mechanism "bogus" is not one of aes-gcm, aes-kwp, aes-cbc-hmac, rsa-oaep`}},
		{"hsm_timeout 0", map[string]interface{}{"hsm_timeout": 0},
			[]string{"hsm_timeout 0s is out of range", "from 1s to 300s"}},
		{"hsm_timeout 100000", map[string]interface{}{"hsm_timeout": 100000},
			[]string{"hsm_timeout 100000s is out of range", "from 1s to 300s"}},
		{"hmac_key_label in the HSM-resident keys' labels", map[string]interface{}{"mechanism": "aes-cbc-hmac", "hmac_key_label": hsmPrefixed},
			[]string{"hmac_key_label", hsmPrefixed, "choose a label outside it"}},
		{"hmac_key_label is the KEK", map[string]interface{}{"mechanism": "aes-cbc-hmac", "hmac_key_label": kek},
			[]string{"hmac_key_label must differ from key_label"}},
	}
	t.Run("first seal", func(t *testing.T) {
		e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
		for _, tc := range cases {
			data := withSeal(map[string]interface{}{"key_label": kek, "generate_key": true})
			for k, v := range tc.data {
				data[k] = v
			}
			r := e.write(t, "config/seal", data)
			for _, msg := range tc.msg {
				requireStatus(t, r, 400, msg)
			}
			requireStatus(t, e.read(t, "config/seal"), 404, "")
			require.Equal(t, false, e.read(t, "seal/status").data["configured"], tc.name)
		}
	})
	t.Run("sealed mount", func(t *testing.T) {
		e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
		e.mustWrite(t, "config/seal", withSeal(map[string]interface{}{"key_label": kek, "generate_key": true}))
		ct := e.encrypt(t, "k", "kept", nil)
		raw := rawGet(t, e, mountseal.ConfigPath)
		for _, tc := range cases {
			data := map[string]interface{}{"generate_key": true}
			for k, v := range tc.data {
				data[k] = v
			}
			r := e.write(t, "config/seal", data)
			for _, msg := range tc.msg {
				requireStatus(t, r, 400, msg)
			}
			require.Equal(t, raw, rawGet(t, e, mountseal.ConfigPath), tc.name)
		}
		requireSealShows(t, e, hsm.AESGCM, kek)
		e = e.restart(t)
		require.Equal(t, "kept", e.decrypt(t, "k", ct, nil))
	})
}

// newSealShim puts internal/p11shim, over a copy of SoftHSM2's library (a
// library instance of its own), in front of a fresh token, and allows both
// libraries. The test cannot be parallel.
func newSealShim(t *testing.T) (*p11shim.Shim, string) {
	t.Helper()
	copyLib := filepath.Join(t.TempDir(), "libsofthsm2-copy.so")
	src, err := os.Open(softhsmLib)
	require.NoError(t, err)
	defer src.Close()
	dst, err := os.Create(copyLib)
	require.NoError(t, err)
	_, err = io.Copy(dst, src)
	require.NoError(t, err)
	require.NoError(t, dst.Close())
	shim := p11shim.New(t, copyLib)
	t.Setenv(hsm.LibrariesEnv, shim.Library+":"+softhsmLib)
	label := uniq(t, "shim")
	require.NoError(t, softhsm.InitToken(softhsmConf, label, testPIN))
	return shim, label
}

// shimSeal is config/seal through the shim, generating the keys.
func shimSeal(shim *p11shim.Shim, token string, overrides map[string]interface{}) map[string]interface{} {
	data := map[string]interface{}{
		"library": shim.Library, "token_label": token, "pin": testPIN,
		"key_label": "kek-shim", "generate_key": true,
	}
	for k, v := range overrides {
		data[k] = v
	}
	return data
}

// startShimBackend starts a backend over new storage and makes sure the
// shim has no faults when it is cleaned up (cleanups run last-first, so
// this runs before the backend's): a hung token would hang C_Finalize.
func startShimBackend(t *testing.T, shim *p11shim.Shim) *testEnv {
	t.Helper()
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	t.Cleanup(func() { shim.Set() })
	return e
}

// TestSealMechanismWithoutGCM: a token without AES-GCM gets aes-kwp when
// no mechanism is given, refuses aes-gcm and HSM-resident keys by naming
// CKM_AES_GCM, and its mount unseals after a restart.
func TestSealMechanismWithoutGCM(t *testing.T) {
	shim, token := newSealShim(t)
	shim.Set(p11shim.NoGCM)
	e := startShimBackend(t, shim)

	r := e.write(t, "config/seal", shimSeal(shim, token, map[string]interface{}{"mechanism": "aes-gcm"}))
	requireStatus(t, r, 400, "CKM_AES_GCM")
	require.Contains(t, r.errorMessage(), "it offers: aes-kwp, aes-cbc-hmac, rsa-oaep")
	requireStatus(t, e.read(t, "config/seal"), 404, "")

	data := e.mustWrite(t, "config/seal", shimSeal(shim, token, nil))
	require.Equal(t, "aes-kwp", data["mechanism"])
	requireSealShows(t, e, hsm.AESKWP, "kek-shim")
	st := e.read(t, "seal/status").data
	require.Equal(t, []interface{}{"aes-kwp", "aes-cbc-hmac", "rsa-oaep"}, st["token_mechanisms"])
	require.Equal(t, false, st["hsm_keys_supported"])

	r = e.write(t, "keys/hk", map[string]interface{}{"hsm": true})
	requireStatus(t, r, 400, "CKM_AES_GCM")
	require.Contains(t, r.errorMessage(), "hsm=false")
	requireStatus(t, e.read(t, "keys/hk"), 404, "")

	ct := e.encrypt(t, "soft", "without GCM", nil)
	e = e.restart(t)
	require.Equal(t, "without GCM", e.decrypt(t, "soft", ct, nil))
	requireSealShows(t, e, hsm.AESKWP, "kek-shim")
}

// TestSealCanaryRefusesLostIV: a token that uses an AES-GCM IV of its own
// and does not say which cannot give back what it seals. The canary finds
// it at the first seal (nothing is stored) and at a KEK change (nothing
// changes); once the token behaves, sealing works.
func TestSealCanaryRefusesLostIV(t *testing.T) {
	shim, token := newSealShim(t)
	shim.Set(p11shim.IVHidden)
	e := startShimBackend(t, shim)

	r := e.write(t, "config/seal", shimSeal(shim, token, nil))
	requireStatus(t, r, 400, "cannot open what it sealed with aes-gcm")
	require.Contains(t, r.errorMessage(), "nothing sealed with it is kept")
	requireStatus(t, e.read(t, "config/seal"), 404, "")
	st := e.read(t, "seal/status").data
	require.Equal(t, false, st["configured"])
	require.NoError(t, walkStorage(context.Background(), e.storage, "", func(path string, _ []byte) {
		t.Errorf("the refused seal stored %s", path)
	}))
	requireStatus(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x")}), 400, "config/seal")

	shim.Set()
	e.mustWrite(t, "config/seal", shimSeal(shim, token, nil))
	requireSealShows(t, e, hsm.AESGCM, "kek-shim")
	ct := e.encrypt(t, "k", "sealed by a sound token", nil)

	// The same token breaking again: a KEK change is refused as well.
	shim.Set(p11shim.IVHidden)
	raw := rawGet(t, e, mountseal.ConfigPath)
	r = e.write(t, "config/seal", map[string]interface{}{"key_label": "kek-shim-next", "generate_key": true})
	requireStatus(t, r, 400, "cannot open what it sealed with aes-gcm")
	require.Equal(t, raw, rawGet(t, e, mountseal.ConfigPath))
	shim.Set()
	e = e.restart(t)
	require.Equal(t, "sealed by a sound token", e.decrypt(t, "k", ct, nil))
	requireSealShows(t, e, hsm.AESGCM, "kek-shim")
}

// TestSealFIPSModeIV: tokens that choose the AES-GCM IV themselves (and
// write it back) seal the mount and run HSM-resident keys, across a root
// key rotation and restarts.
func TestSealFIPSModeIV(t *testing.T) {
	for _, mode := range []string{p11shim.FIPSIV, p11shim.FIPSIVStrict} {
		t.Run(mode, func(t *testing.T) {
			shim, token := newSealShim(t)
			shim.Set(mode)
			e := startShimBackend(t, shim)
			e.mustWrite(t, "config/seal", shimSeal(shim, token, nil))
			requireSealShows(t, e, hsm.AESGCM, "kek-shim")

			data := e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})
			require.Equal(t, true, data["hsm"])
			hct := e.encrypt(t, "hk", "in the HSM", nil)
			require.Equal(t, "in the HSM", e.decrypt(t, "hk", hct, nil))
			sct := e.encrypt(t, "soft", "in software", nil)
			require.Equal(t, "in software", e.decrypt(t, "soft", sct, nil))

			e = e.restart(t)
			require.Equal(t, "in the HSM", e.decrypt(t, "hk", hct, nil))
			require.Equal(t, "in software", e.decrypt(t, "soft", sct, nil))

			e.mustWrite(t, "seal/rotate", nil)
			hct2 := e.encrypt(t, "hk", "after the rotation", nil)
			e = e.restart(t)
			require.Equal(t, "in the HSM", e.decrypt(t, "hk", hct, nil))
			require.Equal(t, "after the rotation", e.decrypt(t, "hk", hct2, nil))
			require.Equal(t, "in software", e.decrypt(t, "soft", sct, nil))
			require.Equal(t, float64(2), e.read(t, "seal/status").data["root_key_version"])
		})
	}
}

// timedWriteStatus is a write and how long it took.
func timedWriteStatus(t *testing.T, e *testEnv, path string, data map[string]interface{}) (result, time.Duration) {
	t.Helper()
	start := time.Now()
	r := e.write(t, path, data)
	return r, time.Since(start)
}

// TestSealHSMTimeout: with hsm_timeout=1 and a token that stops answering,
// requests that need the token fail with a 503 within about a second,
// software keys keep working, and once the token answers again so does
// everything.
func TestSealHSMTimeout(t *testing.T) {
	shim, token := newSealShim(t)
	e := startShimBackend(t, shim)
	data := e.mustWrite(t, "config/seal", shimSeal(shim, token, map[string]interface{}{"hsm_timeout": 1}))
	require.Equal(t, float64(1), data["hsm_timeout"])
	require.Equal(t, float64(1), e.read(t, "seal/status").data["hsm_timeout"])
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})
	hct := e.encrypt(t, "hk", "in the HSM", nil)
	sct := e.encrypt(t, "soft", "in software", nil)

	shim.Set(p11shim.Hang)
	const limit = 3 * time.Second
	for _, req := range []struct {
		path string
		data map[string]interface{}
	}{
		{"seal/rotate", nil},
		{"encrypt/hk", map[string]interface{}{"plaintext": b64("x")}},
		{"decrypt/hk", map[string]interface{}{"ciphertext": hct}},
	} {
		r, took := timedWriteStatus(t, e, req.path, req.data)
		t.Logf("%s with the token hung: %d after %s: %s", req.path, r.status, took.Round(time.Millisecond), r.errorMessage())
		requireStatus(t, r, 503, "did not answer within 1s; try again later")
		require.Less(t, took, limit, "%s waited past hsm_timeout", req.path)
		require.GreaterOrEqual(t, took, 900*time.Millisecond, "%s gave up before hsm_timeout", req.path)

		// Software keys do not need the token.
		r, took = timedWriteStatus(t, e, "encrypt/soft", map[string]interface{}{"plaintext": b64("meanwhile")})
		requireStatus(t, r, 200, "")
		require.Less(t, took, limit)
		require.Equal(t, "meanwhile", e.decrypt(t, "soft", r.data["ciphertext"].(string), nil))
		require.Equal(t, "in software", e.decrypt(t, "soft", sct, nil))
	}

	shim.Set()
	require.Eventually(t, func() bool {
		r := e.write(t, "decrypt/hk", map[string]interface{}{"ciphertext": hct})
		return r.status == 200 && unb64(t, r.data["plaintext"].(string)) == "in the HSM"
	}, 10*time.Second, 50*time.Millisecond, "HSM-resident keys work again")
	require.Equal(t, "again", e.decrypt(t, "hk", e.encrypt(t, "hk", "again", nil), nil))
	rot := e.mustWrite(t, "seal/rotate", nil)
	require.Equal(t, float64(2), rot["root_key_version"], "the refused rotations changed nothing")
	e = e.restart(t)
	require.Equal(t, "in the HSM", e.decrypt(t, "hk", hct, nil))
	require.Equal(t, "in software", e.decrypt(t, "soft", sct, nil))
	require.Equal(t, float64(1), e.read(t, "config/seal").data["hsm_timeout"])
}

// TestSealOpenCryptoki runs the backend over openCryptoki's soft token,
// which has AES-CBC-PAD, HMAC-SHA256 and RSA-OAEP but no AES-GCM and no key
// wrap: aes-cbc-hmac is chosen, survives restarts, a root key rotation and
// a recovery onto new keys; rsa-oaep works; aes-gcm, aes-kwp and
// HSM-resident keys are refused by name.
func TestSealOpenCryptoki(t *testing.T) {
	ock := p11env.OpenCryptoki(t, "hst-ock-root", "24681357")
	t.Setenv(hsm.LibrariesEnv, ock.Library+":"+softhsmLib)
	ockSeal := func(overrides map[string]interface{}) map[string]interface{} {
		data := map[string]interface{}{"library": ock.Library, "token_label": ock.Label, "pin": ock.PIN}
		for k, v := range overrides {
			data[k] = v
		}
		return data
	}
	// Cleanups registered after OpenCryptoki run before its daemon stops.
	openOCK := func(t *testing.T) *hsm.Token {
		tok, err := hsm.Open(hsm.Config{Library: ock.Library, TokenLabel: ock.Label, PIN: ock.PIN})
		require.NoError(t, err)
		t.Cleanup(tok.Close)
		return tok
	}

	t.Run("refusals", func(t *testing.T) {
		e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
		for m, missing := range map[string]string{"aes-gcm": "CKM_AES_GCM", "aes-kwp": "CKM_AES_KEY_WRAP_PAD"} {
			r := e.write(t, "config/seal", ockSeal(map[string]interface{}{"key_label": "kek-" + m, "mechanism": m, "generate_key": true}))
			requireStatus(t, r, 400, missing)
			require.Contains(t, r.errorMessage(), "it offers: aes-cbc-hmac, rsa-oaep")
			requireStatus(t, e.read(t, "config/seal"), 404, "")
		}
	})

	t.Run("aes-cbc-hmac", func(t *testing.T) {
		e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
		data := e.mustWrite(t, "config/seal", ockSeal(map[string]interface{}{"key_label": "kek-cbc", "generate_key": true}))
		require.Equal(t, "aes-cbc-hmac", data["mechanism"], "chosen from what the token offers")
		requireSealShows(t, e, hsm.AESCBCHMAC, "kek-cbc")
		st := e.read(t, "seal/status").data
		require.Equal(t, []interface{}{"aes-cbc-hmac", "rsa-oaep"}, st["token_mechanisms"])
		require.Equal(t, false, st["hsm_keys_supported"])
		requireKeyringSealedBy(t, e, hsm.Config{Library: ock.Library, TokenLabel: ock.Label, PIN: ock.PIN}, hsm.AESCBCHMAC)

		r := e.write(t, "keys/hk", map[string]interface{}{"hsm": true})
		requireStatus(t, r, 400, "CKM_AES_GCM")
		raw := rawGet(t, e, mountseal.ConfigPath)
		r = e.write(t, "config/seal", map[string]interface{}{"mechanism": "aes-gcm"})
		requireStatus(t, r, 400, "CKM_AES_GCM")
		require.Equal(t, raw, rawGet(t, e, mountseal.ConfigPath), "the refused change changed nothing")

		ct := e.encrypt(t, "k", "on openCryptoki", nil)
		e = e.restart(t)
		require.Equal(t, "on openCryptoki", e.decrypt(t, "k", ct, nil))
		requireSealShows(t, e, hsm.AESCBCHMAC, "kek-cbc")
		require.Equal(t, float64(2), e.mustWrite(t, "seal/rotate", nil)["root_key_version"])
		ct2 := e.encrypt(t, "k", "after the rotation", nil)
		e = e.restart(t)
		require.Equal(t, "on openCryptoki", e.decrypt(t, "k", ct, nil))
		require.Equal(t, "after the rotation", e.decrypt(t, "k", ct2, nil))

		// Recovery: the KEK is lost from the token; the shares restore the
		// keyring under new keys, sealed with the mount's mechanism.
		out := e.mustWrite(t, "seal/recovery/init", map[string]interface{}{"shares": 3, "threshold": 2})
		var shares []string
		for _, s := range out["shares"].([]interface{}) {
			shares = append(shares, s.(string))
		}
		require.NoError(t, openOCK(t).DestroyKey("kek-cbc"))
		e = e.restart(t)
		requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 503, `no AES key labelled "kek-cbc"`)
		restored := e.mustWrite(t, "seal/recovery/restore", map[string]interface{}{
			"shares": shares[1:], "key_label": "kek-cbc-2", "generate_key": true,
		})
		require.Equal(t, "aes-cbc-hmac", restored["mechanism"])
		require.Equal(t, "kek-cbc-2", restored["key_label"])
		require.Equal(t, "kek-cbc-2-hmac", restored["hmac_key_label"])
		require.Equal(t, "on openCryptoki", e.decrypt(t, "k", ct, nil))
		require.Equal(t, "after the rotation", e.decrypt(t, "k", ct2, nil))
		e = e.restart(t)
		require.Equal(t, "on openCryptoki", e.decrypt(t, "k", ct, nil))
		requireSealShows(t, e, hsm.AESCBCHMAC, "kek-cbc-2")
	})

	t.Run("rsa-oaep", func(t *testing.T) {
		e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
		data := e.mustWrite(t, "config/seal", ockSeal(map[string]interface{}{"key_label": "kek-rsa", "mechanism": "rsa-oaep", "generate_key": true}))
		require.Equal(t, "rsa-oaep", data["mechanism"])
		requireSealShows(t, e, hsm.RSAOAEP, "kek-rsa")
		ct := e.encrypt(t, "k", "under RSA-OAEP", nil)
		e = e.restart(t)
		require.Equal(t, "under RSA-OAEP", e.decrypt(t, "k", ct, nil))
		requireSealShows(t, e, hsm.RSAOAEP, "kek-rsa")
		e.mustWrite(t, "seal/rotate", nil)
		e = e.restart(t)
		require.Equal(t, "under RSA-OAEP", e.decrypt(t, "k", ct, nil))
		requireKeyringSealedBy(t, e, hsm.Config{Library: ock.Library, TokenLabel: ock.Label, PIN: ock.PIN}, hsm.RSAOAEP)
	})
}

// TestSealRotateInterruptedByTheHSM: the HSM going away in the middle of a
// root key rotation (after the rotated keyring is stored, before the
// entries are resealed and the old version dropped) answers 503, not 500;
// every entry stays readable, seal/status shows the rotation pending, and
// writing seal/rotate again once the HSM is back completes it.
func TestSealRotateInterruptedByTheHSM(t *testing.T) {
	shim, token := newSealShim(t)
	e := startShimBackend(t, shim)
	e.mustWrite(t, "config/seal", shimSeal(shim, token, map[string]interface{}{"hsm_timeout": 1}))
	ct := e.encrypt(t, "soft", "before the rotation", nil)

	for _, fault := range []string{p11shim.DeviceError, p11shim.Hang} {
		e.b.seal.SetRotationStoredHookForTest(func() { shim.Set(fault) })
		r := e.write(t, "seal/rotate", nil)
		requireStatus(t, r, 503, "rotation was interrupted")
		e.b.seal.SetRotationStoredHookForTest(nil)
		shim.Set()
		require.Equal(t, "before the rotation", e.decrypt(t, "soft", ct, nil), fault)
		require.Eventually(t, func() bool {
			st := e.read(t, "seal/status")
			return st.status == 200 && st.data["rotation_pending"] == true
		}, 10*time.Second, 100*time.Millisecond, fault)
		require.Eventually(t, func() bool { return e.write(t, "seal/rotate", nil).status == 200 }, 10*time.Second, 200*time.Millisecond, fault)
		require.Equal(t, false, e.read(t, "seal/status").data["rotation_pending"], fault)
		require.Equal(t, "before the rotation", e.decrypt(t, "soft", ct, nil), fault)
	}
}
