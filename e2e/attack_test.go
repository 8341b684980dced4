package e2e

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hpke"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/shamir"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
)

// These tests play attackers against a real Vault running the plugin: what
// each can do, and what they must not get.

// TestAttackStorageWriterThroughSysRaw: the attacker writes (and reads) the
// mount's storage through sys/raw, as anyone with a backup to edit or a
// sys/raw token could, but has no HSM PIN. They (a) plant a recovery public
// key of their own in the plaintext seal configuration, hoping that the
// next keyring write (the security officer's root key rotation or KEK
// change) encrypts the root keyring to them, and (b) plant a plaintext key
// policy "evil" whose AES key they know, hoping that the mount adopts it
// and encrypts with it. After a plugin reload, seal/rotate and a KEK
// change, nothing they can read opens with their private key, "evil"
// neither encrypts nor decrypts under their key, seal/status names the
// planted entry, and the mount's real key still decrypts.
func TestAttackStorageWriterThroughSysRaw(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{rawStorage: true})
	v.mountPlugin("transit")
	v.mustCLI("secrets", "enable", "-path=builtin", "transit")
	c := v.client.Logical()

	// The victim's key and a ciphertext of it.
	_, err := c.Write("transit/keys/orig", nil)
	require.NoError(t, err)
	sec, err := c.Write("transit/encrypt/orig", map[string]interface{}{"plaintext": b64("the victim's data")})
	require.NoError(t, err)
	origCT := sec.Data["ciphertext"].(string)

	mounts, err := v.client.Sys().ListMounts()
	require.NoError(t, err)
	root := "sys/raw/logical/" + mounts["transit/"].UUID + "/"
	infos := attackRecoveryInfos(t, v, "transit/")

	// Positive control for the attacker's search below: on another mount,
	// real recovery shares rebuild the recovery private key, and the same
	// search finds and opens that mount's recovery copy. So a copy made
	// for the attacker's key would be found.
	v.mustCLI("secrets", "enable", "-path=control", "-plugin-version="+pluginVersion, pluginName)
	v.configureSeal("control")
	_, err = c.Write("control/keys/c", nil)
	require.NoError(t, err)
	sec, err = c.Write("control/seal/recovery/init", map[string]interface{}{"shares": 2, "threshold": 2})
	require.NoError(t, err)
	var parts [][]byte
	for _, s := range sec.Data["shares"].([]interface{}) {
		p, err := base64.StdEncoding.DecodeString(s.(string))
		require.NoError(t, err)
		parts = append(parts, p)
	}
	seed, err := shamir.Combine(parts)
	require.NoError(t, err)
	controlPriv, err := hpke.MLKEM768X25519().NewPrivateKey(seed)
	require.NoError(t, err)
	mounts, err = v.client.Sys().ListMounts()
	require.NoError(t, err)
	controlRoot := "sys/raw/logical/" + mounts["control/"].UUID + "/"
	controlInfos := attackRecoveryInfos(t, v, "control/")
	opened, _ := attackTryRecoveryOpen(t, c, controlRoot, controlPriv, controlInfos)
	require.Equal(t, []string{fmt.Sprintf("seal/config:recovery_keyring (info %q)", controlInfos[1])}, opened,
		"control: the search finds the control mount's real recovery copy, bound to its backend UUID")
	t.Logf("control: a real recovery copy is found and opened by the search: %v", opened)

	// The attacker's key pair.
	attacker, err := hpke.MLKEM768X25519().GenerateKey()
	require.NoError(t, err)

	// (a) A recovery public key in the plaintext seal configuration.
	cfgPath := root + "seal/config"
	var cfg map[string]interface{}
	dec := json.NewDecoder(bytes.NewReader(attackRawGet(t, c, cfgPath)))
	dec.UseNumber()
	require.NoError(t, dec.Decode(&cfg))
	require.NotContains(t, cfg, "recovery_keyring", "nothing was set up for recovery")
	cfg["recovery_public_key"] = base64.StdEncoding.EncodeToString(attacker.PublicKey().Bytes())
	cfg["recovery_shares"] = 2
	cfg["recovery_threshold"] = 2
	planted, err := json.Marshal(cfg)
	require.NoError(t, err)
	attackRawPut(t, c, cfgPath, planted)

	// (b) A plaintext policy for "evil" whose key the attacker knows: built
	// by built-in transit on the same server, exported, and copied from its
	// storage into the plugin mount's.
	_, err = c.Write("builtin/keys/evil", map[string]interface{}{"exportable": true})
	require.NoError(t, err)
	sec, err = c.Read("builtin/export/encryption-key/evil")
	require.NoError(t, err)
	evilKey, err := base64.StdEncoding.DecodeString(sec.Data["keys"].(map[string]interface{})["1"].(string))
	require.NoError(t, err)
	require.Len(t, evilKey, 32)
	sec, err = c.Write("builtin/encrypt/evil", map[string]interface{}{"plaintext": b64("the attacker's data")})
	require.NoError(t, err)
	evilCT := sec.Data["ciphertext"].(string)
	pt, err := attackOpenWithKey(evilKey, evilCT)
	require.NoError(t, err, "control: the known key opens built-in transit's ciphertext")
	require.Equal(t, "the attacker's data", string(pt))

	builtinRoot := "sys/raw/logical/" + mounts["builtin/"].UUID + "/"
	policy := attackRawGet(t, c, builtinRoot+"policy/evil")
	require.True(t, json.Valid(policy), "built-in transit stores its policy in plaintext: %q", policy)
	attackRawPut(t, c, root+"policy/evil", policy)
	if archive, ok := attackRawTryGet(t, c, builtinRoot+"archive/evil"); ok {
		attackRawPut(t, c, root+"archive/evil", archive)
	}

	// The plugin reads its storage afresh.
	attackReloadAndWait(t, v, "transit/", origCT)

	// The planted public key was not taken as a recovery setup.
	st, err := c.Read("transit/seal/status")
	require.NoError(t, err)
	require.Equal(t, false, st.Data["sealed"])
	require.Equal(t, false, st.Data["recovery_initialized"], "the planted recovery_public_key is not trusted: %v", st.Data)

	checkEvil := func(stage string) {
		t.Helper()
		logFrom := len(attackVaultLog(t, v))
		// encrypt/evil: refused, or at least not under the attacker's key.
		status, body := v.rawRequest("POST", "transit/encrypt/evil", map[string]interface{}{"plaintext": b64("a secret for evil")})
		if status == 200 {
			ct := body["data"].(map[string]interface{})["ciphertext"].(string)
			_, err := attackOpenWithKey(evilKey, ct)
			require.Errorf(t, err, "%s: encrypt/evil used the planted key: the attacker opens %s", stage, ct)
			t.Logf("%s: encrypt/evil answered 200 under a key that is not the planted one", stage)
		} else {
			msg := attackErrors(body)
			// The existence check passes a refused entry on to the
			// handler, which says what it is (Vault would answer a bare
			// "internal error" for the check's own error).
			require.Equalf(t, 500, status, "%s: encrypt/evil: %s", stage, msg)
			require.Containsf(t, msg, `storage entry "policy/evil" is not sealed: it was not written by this mount (planted in storage?) and is refused`,
				"%s: encrypt/evil", stage)
			require.NotContainsf(t, attackVaultLog(t, v)[logFrom:], "failed to run existence check", "%s: encrypt/evil", stage)
		}
		// decrypt/evil of the attacker's ciphertext: refused.
		status, body = v.rawRequest("POST", "transit/decrypt/evil", map[string]interface{}{"ciphertext": evilCT})
		msg := attackErrors(body)
		require.NotEqualf(t, 200, status, "%s: decrypt/evil opened a ciphertext of the planted key: %v", stage, body)
		require.Equalf(t, 500, status, "%s: decrypt/evil: %s", stage, msg)
		require.Containsf(t, msg, `storage entry "policy/evil" is not sealed: it was not written by this mount (planted in storage?) and is refused`,
			"%s: decrypt/evil", stage)
		// keys/evil: not a key of the mount.
		status, body = v.rawRequest("GET", "transit/keys/evil", nil)
		require.NotEqualf(t, 200, status, "%s: keys/evil reads the planted policy: %v", stage, body)
		require.Equalf(t, 500, status, "%s: keys/evil: %v", stage, body)
		require.Containsf(t, attackErrors(body), `storage entry "policy/evil" is not sealed`, "%s: keys/evil", stage)
		// The planted entry is still exactly what the attacker wrote: not
		// adopted (encrypted) by any pass.
		require.Equalf(t, policy, attackRawGet(t, c, root+"policy/evil"), "%s: the planted policy was rewritten", stage)
	}
	checkEvil("after reload")

	// The security officer rotates the root key.
	sec, err = c.Write("transit/seal/rotate", nil)
	require.NoError(t, err)
	require.Equal(t, "2", fmt.Sprint(sec.Data["root_key_version"]))
	st, err = c.Read("transit/seal/status")
	require.NoError(t, err)
	lastErr := fmt.Sprint(st.Data["last_error"])
	require.Contains(t, lastErr, "policy/evil", "seal/status names the planted entry")
	require.Contains(t, lastErr, "not sealed by this mount's root key")
	require.Contains(t, lastErr, "not adopted")
	require.Equal(t, false, st.Data["recovery_initialized"])
	checkEvil("after seal/rotate")

	// And changes the KEK.
	sec, err = c.Write("transit/config/seal", map[string]interface{}{"key_label": "attack-kek-2", "generate_key": true})
	require.NoError(t, err)
	require.Equal(t, "attack-kek-2", sec.Data["key_label"])
	st, err = c.Read("transit/seal/status")
	require.NoError(t, err)
	require.Equal(t, "attack-kek-2", st.Data["key_label"])
	require.Equal(t, false, st.Data["sealed"])
	t.Logf("seal/status after the KEK change: last_error=%q", st.Data["last_error"])
	checkEvil("after the KEK change")

	// Restarted once more, from what storage now holds.
	attackReloadAndWait(t, v, "transit/", origCT)
	checkEvil("after a second reload")

	// The attacker reads everything the mount stores: nothing opens with
	// their private key, whatever the binding they guess.
	opened, tried := attackTryRecoveryOpen(t, c, root, attacker, infos)
	require.Emptyf(t, opened, "the attacker's private key opens stored values: %v", opened)
	require.Greater(t, tried, 0)
	t.Logf("attacker: %d stored values tried with %d bindings, none opens", tried, len(infos))
	var after map[string]interface{}
	require.NoError(t, json.Unmarshal(attackRawGet(t, c, cfgPath), &after))
	_, hasCopy := after["recovery_keyring"]
	t.Logf("seal/config after the attack: recovery_keyring present: %t, recovery_public_key present: %t", hasCopy, after["recovery_public_key"] != nil)

	// The victim's key still decrypts.
	sec, err = c.Write("transit/decrypt/orig", map[string]interface{}{"ciphertext": origCT})
	require.NoError(t, err)
	require.Equal(t, "the victim's data", unb64(t, sec.Data["plaintext"].(string)))
}

// TestAttackNeighbourMountWrongPIN: the attacker configures another mount
// (B) of the same plugin, which the same process serves (multiplexed), and
// names the token that mount A is sealed by, through the other spelling of
// the SoftHSM2 library (the symlink's target, or the symlink) and with a
// PIN that is not the token's, hoping that the process's login, made by A,
// lets B in ("already logged in") or that B's failure logs A out. B is
// refused with a 400, B has no seal, and A keeps working, its HSM-resident
// key included.
func TestAttackNeighbourMountWrongPIN(t *testing.T) {
	t.Parallel()
	link, target := attackLibrarySpellings(t)
	conf, err := softhsm.Configure(t.TempDir())
	require.NoError(t, err)
	const token = "neighbour"
	require.NoError(t, softhsm.InitToken(conf, token, hsmPIN))
	v := startVault(t, serverOptions{env: []string{"SOFTHSM2_CONF=" + conf}})
	v.registerPlugin(pluginName)
	v.mustCLI("secrets", "enable", "-path=a", "-plugin-version="+pluginVersion, pluginName)
	v.mustCLI("secrets", "enable", "-path=b", "-plugin-version="+pluginVersion, pluginName)
	c := v.client.Logical()

	// A: sealed through the symlink with the right PIN, and in use.
	v.mustCLI("write", "a/config/seal", "library="+link, "token_label="+token,
		"pin="+hsmPIN, "key_label=a-kek", "generate_key=true")
	_, err = c.Write("a/keys/soft", nil)
	require.NoError(t, err)
	_, err = c.Write("a/keys/hsm", map[string]interface{}{"hsm": true})
	require.NoError(t, err)
	cts := map[string]string{}
	for _, k := range []string{"soft", "hsm"} {
		sec, err := c.Write("a/encrypt/"+k, map[string]interface{}{"plaintext": b64("A's data under " + k)})
		require.NoError(t, err)
		cts[k] = sec.Data["ciphertext"].(string)
	}
	// B's backend exists too; one plugin process serves both mounts.
	status, body := v.rawRequest("GET", "b/seal/status", nil)
	require.Equal(t, 200, status, "%v", body)
	require.Equal(t, false, body["data"].(map[string]interface{})["configured"])
	pids := attackPluginPIDs(t, v)
	require.Len(t, pids, 1, "one multiplexed plugin process serves a/ and b/")

	wrong := "999999"
	require.NotEqual(t, hsmPIN, wrong)
	attempts := []struct {
		name string
		body map[string]interface{}
	}{
		{"A's KEK through the other spelling", map[string]interface{}{
			"library": target, "token_label": token, "pin": wrong, "key_label": "a-kek"}},
		{"a new KEK through the other spelling", map[string]interface{}{
			"library": target, "token_label": token, "pin": wrong, "key_label": "b-kek", "generate_key": true}},
		{"A's KEK through A's spelling", map[string]interface{}{
			"library": link, "token_label": token, "pin": wrong, "key_label": "a-kek"}},
		{"again, past the failed-login bound", map[string]interface{}{
			"library": target, "token_label": token, "pin": wrong, "key_label": "a-kek"}},
	}
	for i, a := range attempts {
		status, body := v.rawRequest("POST", "b/config/seal", a.body)
		msg := attackErrors(body)
		t.Logf("B, %s: %d %s", a.name, status, msg)
		require.Equalf(t, 400, status, "B, %s: a wrong PIN must be refused: %v", a.name, body)
		if i < 3 {
			require.Containsf(t, msg, "is logged in by this process with another PIN; this PIN is not tried", "B, %s", a.name)
		} else {
			require.Truef(t, strings.Contains(msg, "another PIN") || strings.Contains(msg, "failed logins"), "B, %s: %s", a.name, msg)
		}
		require.Containsf(t, msg, token, "B, %s: the message names the token", a.name)
		require.NotContainsf(t, msg, hsmPIN, "B, %s: the message shows A's PIN", a.name)

		// B has no seal and cannot encrypt.
		status, body = v.rawRequest("POST", "b/encrypt/x", map[string]interface{}{"plaintext": b64("B's data")})
		require.Equalf(t, 400, status, "B, %s: encrypt: %v", a.name, body)
		require.Containsf(t, attackErrors(body), "config/seal", "B, %s: encrypt", a.name)

		// A keeps working, the HSM-resident key (which uses A's login at
		// every operation) included.
		for k, ct := range cts {
			sec, err := c.Write("a/decrypt/"+k, map[string]interface{}{"ciphertext": ct})
			require.NoErrorf(t, err, "A after B's %s: decrypt with %s", a.name, k)
			require.Equal(t, "A's data under "+k, unb64(t, sec.Data["plaintext"].(string)))
			_, err = c.Write("a/encrypt/"+k, map[string]interface{}{"plaintext": b64("more")})
			require.NoErrorf(t, err, "A after B's %s: encrypt with %s", a.name, k)
		}
	}
	st, err := c.Read("b/seal/status")
	require.NoError(t, err)
	require.Equal(t, false, st.Data["configured"], "B: %v", st.Data)

	// A's security officer still reaches the HSM: a root key rotation draws
	// from it and seals with A's KEK.
	sec, err := c.Write("a/seal/rotate", nil)
	require.NoError(t, err)
	require.Equal(t, "2", fmt.Sprint(sec.Data["root_key_version"]))
	st, err = c.Read("a/seal/status")
	require.NoError(t, err)
	require.Equal(t, false, st.Data["sealed"])
	require.Equal(t, "", st.Data["last_error"])
	require.Equal(t, "a-kek", st.Data["key_label"])
	sec, err = c.Write("a/decrypt/hsm", map[string]interface{}{"ciphertext": cts["hsm"]})
	require.NoError(t, err)
	require.Equal(t, "A's data under hsm", unb64(t, sec.Data["plaintext"].(string)))
	require.Equal(t, pids, attackPluginPIDs(t, v), "the plugin process did not restart")
}

// TestAttackPINSourceRestricted: the attacker can write config/seal of a
// mount (a new one, or one in use) and names as PIN sources files and
// environment variables of the plugin process: /etc/passwd, an endless
// device, the process's environment, a file that does not exist, PATH,
// SOFTHSM2_CONF. Each is refused at once with a 400 whose message has one
// shape per scheme (nothing tells which files exist or what they hold),
// and the plugin process neither hangs nor dies: the mount in use keeps
// working.
func TestAttackPINSourceRestricted(t *testing.T) {
	t.Parallel()
	v := startVault(t, serverOptions{})
	v.mountPlugin("a")
	v.mustCLI("secrets", "enable", "-path=b", "-plugin-version="+pluginVersion, pluginName)
	c := v.client.Logical()
	_, err := c.Write("a/keys/k", nil)
	require.NoError(t, err)
	sec, err := c.Write("a/encrypt/k", map[string]interface{}{"plaintext": b64("A's data")})
	require.NoError(t, err)
	ct := sec.Data["ciphertext"].(string)
	status, body := v.rawRequest("GET", "b/seal/status", nil)
	require.Equal(t, 200, status, "%v", body)
	pids := attackPluginPIDs(t, v)
	require.Len(t, pids, 1)

	refs := []string{
		"file:///etc/passwd",
		"file:///dev/zero",
		"file:///proc/self/environ",
		"file:///nonexistent/hsm-pin",
		"env://PATH",
		"env://SOFTHSM2_CONF",
	}
	passwd, _ := os.ReadFile("/etc/passwd")
	shapes := map[string]map[string]bool{}
	for _, mount := range []string{"a", "b"} {
		for _, ref := range refs {
			start := time.Now()
			status, body := v.rawRequest("POST", mount+"/config/seal", map[string]interface{}{
				"library": softhsmLib, "token_label": hsmToken, "pin": ref, "key_label": hsmKEK,
			})
			took := time.Since(start)
			msg := attackErrors(body)
			t.Logf("%s/config/seal pin=%s: %d in %s: %s", mount, ref, status, took.Round(time.Millisecond), msg)
			require.Equalf(t, 400, status, "%s pin=%s: %v", mount, ref, body)
			require.Lessf(t, took, 5*time.Second, "%s pin=%s is answered at once", mount, ref)
			require.Containsf(t, msg, "the PIN source "+ref+" is not allowed", "%s pin=%s", mount, ref)
			scheme := ref[:strings.Index(ref, "://")]
			if scheme == "file" {
				require.Containsf(t, msg, "HSM_TRANSIT_PIN_FILES", "%s pin=%s", mount, ref)
			} else {
				require.Containsf(t, msg, "HSM_TRANSIT_PIN_ENV", "%s pin=%s", mount, ref)
			}
			// Nothing of what the source holds.
			if line, _, _ := strings.Cut(string(passwd), "\n"); line != "" {
				require.NotContainsf(t, msg, line, "%s pin=%s shows /etc/passwd", mount, ref)
			}
			if p := os.Getenv("PATH"); p != "" {
				require.NotContainsf(t, msg, p, "%s pin=%s shows PATH", mount, ref)
			}
			require.NotContainsf(t, msg, "softhsm2.conf", "%s pin=%s shows SOFTHSM2_CONF", mount, ref)
			if shapes[scheme] == nil {
				shapes[scheme] = map[string]bool{}
			}
			shapes[scheme][strings.ReplaceAll(msg, ref, "<ref>")] = true
		}
	}
	for scheme, s := range shapes {
		require.Lenf(t, s, 1, "%s:// sources answer with one message shape, whatever the source: %v", scheme, s)
	}

	// A is unchanged and working; B is still not sealed.
	sec, err = c.Write("a/decrypt/k", map[string]interface{}{"ciphertext": ct})
	require.NoError(t, err)
	require.Equal(t, "A's data", unb64(t, sec.Data["plaintext"].(string)))
	_, err = c.Write("a/encrypt/k", map[string]interface{}{"plaintext": b64("more")})
	require.NoError(t, err)
	sec, err = c.Read("a/config/seal")
	require.NoError(t, err)
	require.Equal(t, "value", sec.Data["pin_source"])
	st, err := c.Read("a/seal/status")
	require.NoError(t, err)
	require.Equal(t, false, st.Data["sealed"])
	require.Equal(t, "", st.Data["last_error"])
	status, body = v.rawRequest("POST", "b/encrypt/x", map[string]interface{}{"plaintext": b64("x")})
	require.Equal(t, 400, status, "%v", body)
	require.Contains(t, attackErrors(body), "config/seal")
	require.Equal(t, pids, attackPluginPIDs(t, v), "the plugin process is the same one: it did not die or hang")
}

// attackErrors joins the errors of a raw answer's body.
func attackErrors(body map[string]interface{}) string {
	errs, _ := body["errors"].([]interface{})
	out := make([]string, 0, len(errs))
	for _, e := range errs {
		out = append(out, fmt.Sprint(e))
	}
	return strings.Join(out, "; ")
}

// attackRawTryGet reads a raw storage entry's exact bytes.
func attackRawTryGet(t *testing.T, c *api.Logical, path string) ([]byte, bool) {
	t.Helper()
	sec, err := c.ReadWithData(path, map[string][]string{"encoding": {"base64"}})
	require.NoError(t, err)
	if sec == nil {
		return nil, false
	}
	value, err := base64.StdEncoding.DecodeString(sec.Data["value"].(string))
	require.NoError(t, err)
	return value, true
}

func attackRawGet(t *testing.T, c *api.Logical, path string) []byte {
	t.Helper()
	value, ok := attackRawTryGet(t, c, path)
	require.Truef(t, ok, "no raw entry %s", path)
	return value
}

// attackRawPut writes a raw storage entry's exact bytes.
func attackRawPut(t *testing.T, c *api.Logical, path string, value []byte) {
	t.Helper()
	_, err := c.Write(path, map[string]interface{}{
		"value":    base64.StdEncoding.EncodeToString(value),
		"encoding": "base64",
	})
	require.NoError(t, err)
	require.Equal(t, value, attackRawGet(t, c, path), "sys/raw stores the bytes as given")
}

// attackReloadAndWait reloads the mount's plugin backend and waits until
// it decrypts ct again.
func attackReloadAndWait(t *testing.T, v *vaultServer, mount, ct string) {
	t.Helper()
	c := v.client.Logical()
	_, err := c.Write("sys/plugins/reload/backend", map[string]interface{}{"mounts": []string{mount}})
	require.NoError(t, err)
	var last error
	require.Eventuallyf(t, func() bool {
		_, last = c.Write(mount+"decrypt/orig", map[string]interface{}{"ciphertext": ct})
		return last == nil
	}, 60*time.Second, 250*time.Millisecond, "the mount does not unseal after the reload: %v", &last)
}

// attackRecoveryInfos returns the bindings ("info") a recovery copy of the
// mount could be made with: the plugin binds its BackendUUID (Vault's
// backend-aware UUID of the mount, read from the mount table through
// sys/raw); the mount's UUID, its accessor and none are tried as well.
func attackRecoveryInfos(t *testing.T, v *vaultServer, mount string) [][]byte {
	t.Helper()
	mounts, err := v.client.Sys().ListMounts()
	require.NoError(t, err)
	m := mounts[mount]
	require.NotNil(t, m, mount)
	ids := []string{m.UUID, m.Accessor}
	table := attackRawGet(t, v.client.Logical(), "sys/raw/core/mounts")
	var decoded interface{}
	require.NoError(t, json.Unmarshal(table, &decoded), "the mount table: %q", table)
	backendUUID := attackFindBackendUUID(decoded, m.UUID)
	require.NotEmpty(t, backendUUID, "backend_aware_uuid of %s in the mount table", mount)
	ids = append([]string{backendUUID}, ids...)
	infos := [][]byte{nil}
	for _, id := range ids {
		infos = append(infos, []byte("hsm-transit/recovery\x00"+id))
	}
	return infos
}

// attackFindBackendUUID finds the mount table entry with the UUID and
// returns its backend_aware_uuid.
func attackFindBackendUUID(v interface{}, uuid string) string {
	switch x := v.(type) {
	case map[string]interface{}:
		if x["uuid"] == uuid {
			if s, ok := x["backend_aware_uuid"].(string); ok {
				return s
			}
		}
		for _, e := range x {
			if s := attackFindBackendUUID(e, uuid); s != "" {
				return s
			}
		}
	case []interface{}:
		for _, e := range x {
			if s := attackFindBackendUUID(e, uuid); s != "" {
				return s
			}
		}
	}
	return ""
}

// attackTryRecoveryOpen walks every raw entry below root and tries to open,
// with priv under each binding, the whole value and every byte field that
// a JSON value holds (base64 strings). It returns what opened, as
// "path:field", and how many values it tried.
func attackTryRecoveryOpen(t *testing.T, c *api.Logical, root string, priv hpke.PrivateKey, infos [][]byte) (opened []string, tried int) {
	t.Helper()
	try := func(where string, b []byte) {
		tried++
		// An authenticated recovery copy is magic "hsr\x02", a 32-byte
		// tag, then the HPKE ciphertext: try that ciphertext too.
		candidates := [][]byte{b}
		if rest, ok := bytes.CutPrefix(b, []byte("hsr\x02")); ok && len(rest) > 32 {
			candidates = append(candidates, rest[32:])
		}
		for _, info := range infos {
			for _, c := range candidates {
				if _, err := hpke.Open(priv, hpke.HKDFSHA256(), hpke.AES256GCM(), info, c); err == nil {
					opened = append(opened, fmt.Sprintf("%s (info %q)", where, info))
				}
			}
		}
	}
	rawWalk(t, c, root, func(path string, value []byte) {
		rel := strings.TrimPrefix(path, root)
		try(rel, value)
		var decoded interface{}
		if json.Unmarshal(value, &decoded) == nil {
			attackByteFields(rel, decoded, func(where string, b []byte) { try(where, b) })
		}
	})
	sort.Strings(opened)
	return opened, tried
}

// attackByteFields calls f with every string of a JSON value that decodes
// as base64.
func attackByteFields(where string, v interface{}, f func(where string, b []byte)) {
	switch x := v.(type) {
	case map[string]interface{}:
		for k, e := range x {
			sep := "."
			if !strings.Contains(where, ":") {
				sep = ":"
			}
			attackByteFields(where+sep+k, e, f)
		}
	case []interface{}:
		for i, e := range x {
			attackByteFields(where+"["+strconv.Itoa(i)+"]", e, f)
		}
	case string:
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
			if b, err := enc.DecodeString(x); err == nil && len(b) > 0 {
				f(where, b)
				return
			}
		}
	}
}

// attackOpenWithKey decrypts a transit ciphertext of an aes256-gcm96 key
// with the key's bytes, as the attacker who knows them would.
func attackOpenWithKey(key []byte, ct string) ([]byte, error) {
	parts := strings.SplitN(ct, ":", 3)
	if len(parts) != 3 || parts[0] != "vault" {
		return nil, fmt.Errorf("not a transit ciphertext: %q", ct)
	}
	raw, err := base64.StdEncoding.DecodeString(parts[2])
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	if len(raw) < gcm.NonceSize() {
		return nil, errors.New("ciphertext too short")
	}
	return gcm.Open(nil, raw[:gcm.NonceSize()], raw[gcm.NonceSize():], nil)
}

// attackLibrarySpellings returns two allowlisted paths of the one SoftHSM2
// file: a symlink and its target.
func attackLibrarySpellings(t *testing.T) (link, target string) {
	t.Helper()
	for _, p := range softhsm.Libraries {
		fi, err := os.Lstat(p)
		if err != nil || fi.Mode()&os.ModeSymlink == 0 {
			continue
		}
		real, err := filepath.EvalSymlinks(p)
		if err != nil {
			continue
		}
		for _, q := range softhsm.Libraries {
			if q == real {
				return p, real
			}
		}
	}
	t.Skip("no SoftHSM2 path here is a symlink to another allowlisted path")
	return "", ""
}

// attackPluginPIDs lists the plugin processes Vault started.
func attackPluginPIDs(t *testing.T, v *vaultServer) []int {
	t.Helper()
	pids := childPluginPIDs(v.pid())
	sort.Ints(pids)
	return pids
}

// attackVaultLog reads the server's whole log.
func attackVaultLog(t *testing.T, v *vaultServer) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(v.dir, "vault.log"))
	require.NoError(t, err)
	return string(b)
}
