package mountseal

import (
	"context"
	"encoding/binary"
	"errors"
	"math"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/hsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/hsmkey"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

// spyStorage is storage that counts its writes and fails the writes of
// chosen keys, or every write or listing, on demand.
type spyStorage struct {
	logical.Storage

	mu       sync.Mutex
	puts     int
	failPut  func(key string) bool
	failList bool
}

var errStorageDown = errors.New("storage is down")

func (s *spyStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	s.mu.Lock()
	fail := s.failPut != nil && s.failPut(e.Key)
	if !fail {
		s.puts++
	}
	s.mu.Unlock()
	if fail {
		return errStorageDown
	}
	return s.Storage.Put(ctx, e)
}

func (s *spyStorage) List(ctx context.Context, prefix string) ([]string, error) {
	s.mu.Lock()
	fail := s.failList
	s.mu.Unlock()
	if fail {
		return nil, errStorageDown
	}
	return s.Storage.List(ctx, prefix)
}

func (s *spyStorage) setFailPut(f func(key string) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failPut = f
}

func (s *spyStorage) putCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.puts
}

func failAll(string) bool { return true }

// copyStorage returns a copy of every entry of s, as a snapshot of the
// storage backend would hold it.
func copyStorage(t *testing.T, s logical.Storage) *logical.InmemStorage {
	t.Helper()
	out := &logical.InmemStorage{}
	require.NoError(t, walkEntries(context.Background(), s, "", func(key string, value []byte) {
		require.NoError(t, out.Put(context.Background(), &logical.StorageEntry{Key: key, Value: append([]byte(nil), value...)}))
	}))
	return out
}

// newToken initialises a token of its own for a test.
func newToken(t *testing.T) string {
	t.Helper()
	label := "ms-" + newMountUUID(t)[:12]
	require.NoError(t, softhsm.InitToken(softhsmConf, label, testPIN))
	return label
}

// openTokenOf opens the token cfg names, closed at the end of the test.
func openTokenOf(t *testing.T, cfg *Config) *hsm.Token {
	t.Helper()
	hc, err := cfg.HSMConfig()
	require.NoError(t, err)
	tok, err := hsm.Open(hc)
	require.NoError(t, err)
	t.Cleanup(tok.Close)
	return tok
}

// change returns a Merge that applies f to a copy of the stored
// configuration.
func change(f func(c *Config)) func(cur *Config) (*Config, error) {
	return func(cur *Config) (*Config, error) {
		c := *cur
		f(&c)
		return &c, c.Check()
	}
}

// loseToken makes the stored configuration name a token that does not
// exist, as for a mount whose HSM is gone.
func loseToken(t *testing.T, s logical.Storage) {
	t.Helper()
	cfg, err := ReadConfig(context.Background(), s)
	require.NoError(t, err)
	cfg.TokenLabel = "ms-gone-" + newMountUUID(t)[:8]
	require.NoError(t, WriteConfig(context.Background(), s, cfg))
}

func newKEK(t *testing.T) string { return "kek-" + newMountUUID(t)[:8] }

func TestConfigCheck(t *testing.T) {
	valid := func() *Config {
		return &Config{Library: softhsmLib, TokenLabel: testToken, PIN: testPIN, KeyLabel: "kek"}
	}
	require.NoError(t, valid().Check())
	require.EqualError(t, (&Config{}).Check(), "missing [library token_label (or slot) pin key_label]")

	slot := uint(0)
	bySlot := valid()
	bySlot.TokenLabel, bySlot.Slot = "", &slot
	require.NoError(t, bySlot.Check(), "a slot names the token without a label")
	noToken := valid()
	noToken.TokenLabel = ""
	require.EqualError(t, noToken.Check(), "missing [token_label (or slot)]")

	for name, tc := range map[string]struct {
		edit func(c *Config)
		want string
	}{
		"library not allowed":        {func(c *Config) { c.Library = "/nonexistent/libnothing.so" }, ""},
		"token label too long":       {func(c *Config) { c.TokenLabel = strings.Repeat("t", 33) }, "token label"},
		"KEK label among the plugin": {func(c *Config) { c.KeyLabel = hsmkey.Namespace + "kek" }, "labels the plugin keeps"},
		"KEK label not printable":    {func(c *Config) { c.KeyLabel = "kek\n" }, "key label"},
		"PIN variable not allowed":   {func(c *Config) { c.PIN = "env://NOT_AN_ALLOWED_PIN_VARIABLE" }, "is not allowed"},
	} {
		t.Run(name, func(t *testing.T) {
			c := valid()
			tc.edit(c)
			err := c.Check()
			require.Error(t, err)
			require.Contains(t, err.Error(), tc.want)
		})
	}
	require.Error(t, CheckKEKLabel(""))
	require.Error(t, CheckKEKLabel(strings.Repeat("k", 129)))
	require.NoError(t, CheckKEKLabel("kek"))
}

func TestConfigKeysAndDeadlines(t *testing.T) {
	c := &Config{KeyLabel: "kek", HMACKeyLabel: "mac"}
	require.Equal(t, hsm.SealKeys{Mechanism: hsm.AESGCM, Label: "kek"}, c.ConfiguredKeys(), "aes-gcm when none is named, no HMAC key")
	c.Mechanism = string(hsm.AESCBCHMAC)
	require.Equal(t, hsm.SealKeys{Mechanism: hsm.AESCBCHMAC, Label: "kek", HMACLabel: "mac"}, c.ConfiguredKeys())
	c.HMACKeyLabel = ""
	require.Equal(t, hsm.SealKeys{Mechanism: hsm.AESCBCHMAC, Label: "kek", HMACLabel: "kek-hmac"}, c.ConfiguredKeys())
	c.Mechanism = string(hsm.AESKWP)
	require.Equal(t, hsm.SealKeys{Mechanism: hsm.AESKWP, Label: "kek"}, c.ConfiguredKeys())

	sealed := &Config{SealedWith: "old", SealedHMAC: "old-mac"}
	require.Equal(t, hsm.SealKeys{Mechanism: hsm.AESGCM, Label: "old", HMACLabel: "old-mac"}, sealed.SealedKeys(), "written before mechanisms: aes-gcm")
	sealed.SealedMechanism = string(hsm.AESKWP)
	require.Equal(t, hsm.AESKWP, sealed.SealedKeys().Mechanism)

	d := &Config{Library: softhsmLib, TokenLabel: testToken, PIN: testPIN, CallTimeout: 7}
	hc, err := d.HSMConfig()
	require.NoError(t, err)
	require.Equal(t, 7*time.Second, hc.CallTimeout)
	require.Equal(t, testPIN, hc.PIN)
	require.Equal(t, 7*time.Second, d.HSMTimeout())
	d.CallTimeout = 0
	require.Equal(t, hsm.DefaultCallTimeout, d.HSMTimeout())

	require.Equal(t, "env", (&Config{PIN: "env://HSM_PIN"}).PINSource())
	require.Equal(t, "file", (&Config{PIN: "file:///run/pin"}).PINSource())
	require.Equal(t, "value", (&Config{PIN: "1234"}).PINSource())
}

func TestSameTokenAs(t *testing.T) {
	one, two := uint(1), uint(2)
	otherOne := uint(1)
	base := Config{Library: "/lib/a.so", TokenLabel: "t"}
	for _, tc := range []struct {
		name string
		edit func(c *Config)
		same bool
	}{
		{"identical", func(*Config) {}, true},
		{"another library", func(c *Config) { c.Library = "/lib/b.so" }, false},
		{"another label", func(c *Config) { c.TokenLabel = "u" }, false},
		{"a slot on one side", func(c *Config) { c.Slot = &one }, false},
	} {
		b := base
		tc.edit(&b)
		require.Equal(t, tc.same, sameTokenAs(&base, &b), tc.name)
		require.Equal(t, tc.same, sameTokenAs(&b, &base), tc.name)
	}
	require.True(t, sameSlot(nil, nil))
	require.True(t, sameSlot(&one, &otherOne), "the same slot number")
	require.False(t, sameSlot(&one, &two))
	require.False(t, sameSlot(&one, nil))
	require.False(t, sameSlot(nil, &two))
}

func TestUnconfiguredMountIsNotEmergencySealed(t *testing.T) {
	m := newManager(t, newFakeHost(t), newMountUUID(t))
	_, err := m.View(context.Background(), &logical.InmemStorage{})
	requireCode(t, err, http.StatusBadRequest, "write config/seal")
	snap := m.Snapshot()
	require.Equal(t, PhaseUnconfigured, snap.Phase())
	require.False(t, snap.Configured())
	require.False(t, snap.EmergencySealed())
}

func TestTokenMechanismsAskedOncePerToken(t *testing.T) {
	m, _, _ := unsealedManager(t)
	first := m.TokenMechanisms()
	require.NotNil(t, first)
	require.Contains(t, first.Usable, hsm.AESGCM)
	kept := m.TokenMechanisms()
	require.Equal(t, *first, *kept)
	require.Same(t, kept, m.TokenMechanisms(), "the token's answer is kept, not asked again")
}

// The recovery copy follows the keyring: after a rotation the shares open
// the rotated keyring.
func TestRecoveryCopyFollowsRotation(t *testing.T) {
	ctx := context.Background()
	m, _, s := unsealedManager(t)
	put(t, m, s, "policy/a", "v")
	set, err := m.RecoveryInit(ctx, s, 3, 2)
	require.NoError(t, err)
	_, err = m.Rotate(ctx, s)
	require.NoError(t, err)
	cfg, err := ReadConfig(ctx, s)
	require.NoError(t, err)
	require.Equal(t, 2, cfg.RecoveryThreshold)
	ring, authenticated, err := seal.OpenRecovery(set.Shares[:2], m.recoveryInfo(), cfg.RecoveryKeyring)
	require.NoError(t, err)
	require.True(t, authenticated)
	require.Equal(t, []uint32{2}, ring.Versions())
}

// Rotation keeps the configuration in memory in line with storage, reports
// a failed write, and reports entries planted in storage until they go.
func TestRotateStateAndProblems(t *testing.T) {
	ctx := context.Background()
	m, _, inmem := unsealedManager(t)
	s := &spyStorage{Storage: inmem}
	put(t, m, s, "policy/a", "v")

	_, err := m.Rotate(ctx, s)
	require.NoError(t, err)
	stored, err := ReadConfig(ctx, s)
	require.NoError(t, err)
	require.Equal(t, uint32(2), m.Snapshot().Config().RootKeyVersion)
	require.Equal(t, stored.SealedKeyring, m.Snapshot().Config().SealedKeyring, "the state holds the stored keyring")
	require.NoError(t, m.Snapshot().Problem())

	// An entry planted in plaintext is reported, not adopted.
	require.NoError(t, inmem.Put(ctx, &logical.StorageEntry{Key: "policy/planted", Value: []byte(`{"name":"planted"}`)}))
	_, err = m.Rotate(ctx, s)
	require.NoError(t, err)
	var planted *seal.PlaintextEntriesError
	require.ErrorAs(t, m.Snapshot().Problem(), &planted)
	require.NoError(t, inmem.Delete(ctx, "policy/planted"))
	_, err = m.Rotate(ctx, s)
	require.NoError(t, err)
	require.NoError(t, m.Snapshot().Problem(), "gone once the planted entry is")

	// The configuration cannot be stored: the rotation fails.
	before := m.Snapshot().Config()
	s.setFailPut(func(key string) bool { return key == ConfigPath })
	_, err = m.Rotate(ctx, s)
	require.ErrorIs(t, err, errStorageDown)
	s.setFailPut(nil)
	stored, err = ReadConfig(ctx, s)
	require.NoError(t, err)
	require.Equal(t, before.RootKeyVersion, stored.RootKeyVersion)
	require.Equal(t, "v", get(t, m, s, "policy/a"))
}

// An unseal at a restart with nothing interrupted writes nothing.
func TestUnsealAtRestartWritesNothing(t *testing.T) {
	m, _, inmem := unsealedManager(t)
	put(t, m, inmem, "policy/a", "v")
	m.Close()
	s := &spyStorage{Storage: inmem}
	restarted := newManager(t, newFakeHost(t), m.MountID())
	require.Equal(t, "v", get(t, restarted, s, "policy/a"))
	require.Zero(t, s.putCount())
	require.Equal(t, []uint32{1}, restarted.Snapshot().Sealer().Keyring().Versions())
}

// interruptedRotation leaves a rotation stored but not finished: the
// keyring with both versions is in storage, the entries are not resealed.
func interruptedRotation(t *testing.T) (*Manager, *spyStorage) {
	t.Helper()
	m, _, inmem := unsealedManager(t)
	s := &spyStorage{Storage: inmem}
	put(t, m, s, "policy/a", "v")
	put(t, m, s, "archive/a", "w")
	m.SetRotationStoredHookForTest(func() { s.setFailPut(failAll) })
	_, err := m.Rotate(context.Background(), s)
	require.ErrorIs(t, err, errStorageDown)
	s.setFailPut(nil)
	m.SetRotationStoredHookForTest(nil)
	cfg, err := ReadConfig(context.Background(), s)
	require.NoError(t, err)
	require.Equal(t, uint32(2), cfg.RootKeyVersion)
	require.Equal(t, []uint32{1, 2}, m.Snapshot().Sealer().Keyring().Versions())
	return m, s
}

func requireRotated(t *testing.T, m *Manager, s logical.Storage) {
	t.Helper()
	ctx := context.Background()
	require.Equal(t, []uint32{2}, m.Snapshot().Sealer().Keyring().Versions())
	for _, key := range []string{"policy/a", "archive/a"} {
		raw, err := s.Get(ctx, key)
		require.NoError(t, err)
		v, ok := seal.SealedVersion(raw.Value)
		require.True(t, ok)
		require.Equal(t, uint32(2), v, key)
	}
	restarted := newManager(t, newFakeHost(t), m.MountID())
	require.Equal(t, "v", get(t, restarted, s, "policy/a"))
	require.Equal(t, "w", get(t, restarted, s, "archive/a"))
}

func TestInterruptedRotationFinishesAtUnseal(t *testing.T) {
	m, s := interruptedRotation(t)
	m.Close()
	restarted := newManager(t, newFakeHost(t), m.MountID())
	require.Equal(t, "v", get(t, restarted, s, "policy/a"))
	requireRotated(t, restarted, s)
}

func TestResumeRotation(t *testing.T) {
	m, s := interruptedRotation(t)
	release := m.HoldLockForTest()
	m.ResumeRotation(context.Background(), s)
	require.Equal(t, []uint32{1, 2}, m.Snapshot().Sealer().Keyring().Versions(), "nothing while another transition holds the lock")
	release()
	m.ResumeRotation(context.Background(), s)
	requireRotated(t, m, s)
}

// The first seal of a mount taken over from built-in transit encrypts what
// is stored already, and records that it did.
func TestFirstSealEncryptsEntriesStoredBefore(t *testing.T) {
	ctx := context.Background()
	s := &logical.InmemStorage{}
	require.NoError(t, s.Put(ctx, &logical.StorageEntry{Key: "policy/a", Value: []byte("policy a")}))
	require.NoError(t, s.Put(ctx, &logical.StorageEntry{Key: "archive/a", Value: []byte("archive a")}))
	m := newManager(t, newFakeHost(t), newMountUUID(t))
	done, err := m.Configure(ctx, s, ConfigureRequest{Merge: sealSettings(testToken, newKEK(t)), GenerateKey: true})
	require.NoError(t, err)
	require.Equal(t, 2, done.EntriesEncrypted)
	require.False(t, done.MigrationPending)
	require.False(t, m.Snapshot().Meta().MigrationPending)
	for _, key := range []string{"policy/a", "archive/a"} {
		raw, err := s.Get(ctx, key)
		require.NoError(t, err)
		require.True(t, seal.IsSealed(raw.Value), key)
	}
	m.Close()
	restarted := newManager(t, newFakeHost(t), m.MountID())
	require.Equal(t, "policy a", get(t, restarted, s, "policy/a"))
	require.False(t, restarted.Snapshot().Meta().MigrationPending, "recorded in the sealed state")
}

// Storage that does not check out is retried in the background after the
// back-off, with no request, and the mount unseals once it does.
func TestBackgroundRetryAfterStorageChecksOut(t *testing.T) {
	ctx := context.Background()
	m, _, s := unsealedManager(t)
	m.Close()
	meta, err := s.Get(ctx, MetaPath)
	require.NoError(t, err)
	require.NoError(t, s.Delete(ctx, MetaPath))

	h := newFakeHost(t)
	restarted := newManager(t, h, m.MountID())
	restarted.Start(s)
	require.Eventually(t, func() bool { return restarted.Snapshot().LastErr() != nil }, 5*time.Second, 10*time.Millisecond)
	snap := restarted.Snapshot()
	require.Equal(t, PhaseSealed, snap.Phase())
	require.ErrorIs(t, snap.LastErr(), ErrStorageNotSealed)
	require.False(t, snap.Permanent())

	require.NoError(t, s.Put(ctx, meta))
	require.Eventually(t, func() bool { return restarted.Snapshot().Phase() == PhaseUnsealed }, 5*time.Second, 10*time.Millisecond)
	h.waitUnsealedHook(t, 1)
}

// A first seal over storage that a seal wrote before (its configuration
// removed) is refused: it would adopt planted entries.
func TestFirstSealRefusedOverSealedStorage(t *testing.T) {
	ctx := context.Background()
	m, _, inmem := unsealedManager(t)
	put(t, m, inmem, "policy/a", "v")
	m.Close()
	require.NoError(t, inmem.Delete(ctx, ConfigPath))

	again := newManager(t, newFakeHost(t), m.MountID())
	_, err := again.Configure(ctx, inmem, ConfigureRequest{Merge: sealSettings(testToken, newKEK(t)), GenerateKey: true})
	require.Equal(t, KindCaller, KindOf(err), "%v", err)
	require.ErrorContains(t, err, "holds sealed entries (policy/a)")
	cfg, err := ReadConfig(ctx, inmem)
	require.NoError(t, err)
	require.Nil(t, cfg)
	require.NotEqual(t, PhaseUnsealed, again.Snapshot().Phase())

	// Storage that cannot be listed: nothing is sealed either.
	s := &spyStorage{Storage: &logical.InmemStorage{}, failList: true}
	_, err = again.Configure(ctx, s, ConfigureRequest{Merge: sealSettings(testToken, newKEK(t)), GenerateKey: true})
	require.ErrorIs(t, err, errStorageDown)
	cfg, err = ReadConfig(ctx, s)
	require.NoError(t, err)
	require.Nil(t, cfg)
}

// A change of configuration that fails leaves the mount's token in place,
// and a KEK that is missing is named as such.
func TestFailedReconfigureKeepsTheToken(t *testing.T) {
	ctx := context.Background()
	m, _, s := unsealedManager(t)
	before := m.CurrentToken()
	stored, err := ReadConfig(ctx, s)
	require.NoError(t, err)
	_, err = m.Configure(ctx, s, ConfigureRequest{Merge: change(func(c *Config) { c.KeyLabel = "absent-" + newMountUUID(t)[:8] })})
	require.Equal(t, KindCaller, KindOf(err), "%v", err)
	require.Equal(t, hsm.NotFound, hsm.KindOf(err))
	require.ErrorContains(t, err, "generate_key=true")
	require.Same(t, before, m.CurrentToken())
	require.Equal(t, PhaseUnsealed, m.Snapshot().Phase())
	after, err := ReadConfig(ctx, s)
	require.NoError(t, err)
	require.Equal(t, stored, after)
}

// A new PIN is tried by the token itself: the old login goes first.
func TestNewPINIsTriedByTheToken(t *testing.T) {
	ctx := context.Background()
	label := newToken(t)
	s := &logical.InmemStorage{}
	m := newManager(t, newFakeHost(t), newMountUUID(t))
	_, err := m.Configure(ctx, s, ConfigureRequest{Merge: sealSettings(label, "kek"), GenerateKey: true})
	require.NoError(t, err)
	put(t, m, s, "policy/a", "v")
	_, err = m.Configure(ctx, s, ConfigureRequest{Merge: withPIN("0000")})
	require.Equal(t, hsm.Credentials, hsm.KindOf(err))
	require.ErrorContains(t, err, "PIN refused by token")
	require.Equal(t, "v", get(t, m, s, "policy/a"))
}

// Another mechanism is applied as named, and kept when none is named.
func TestReconfigureMechanism(t *testing.T) {
	ctx := context.Background()
	m, _, s := unsealedManager(t)
	put(t, m, s, "policy/a", "v")
	done, err := m.Configure(ctx, s, ConfigureRequest{Merge: change(func(c *Config) {
		c.Mechanism, c.KeyLabel = string(hsm.AESKWP), newKEK(t)
	}), GenerateKey: true})
	require.NoError(t, err)
	require.Equal(t, string(hsm.AESKWP), done.Config.SealedMechanism)

	done, err = m.Configure(ctx, s, ConfigureRequest{Merge: change(func(c *Config) { c.Mechanism = "" })})
	require.NoError(t, err)
	require.Equal(t, string(hsm.AESKWP), done.Config.Mechanism, "the keyring's mechanism")
	require.Equal(t, string(hsm.AESKWP), done.Config.SealedMechanism)
	m.Close()
	restarted := newManager(t, newFakeHost(t), m.MountID())
	require.Equal(t, "v", get(t, restarted, s, "policy/a"))
}

// A move to another token with the same KEK label seals the keyring there,
// takes the anti-rollback anchor along and retires it in the old token.
func TestMoveToAnotherToken(t *testing.T) {
	ctx := context.Background()
	m, _, s := unsealedManager(t)
	on := true
	done, err := m.Configure(ctx, s, ConfigureRequest{Merge: change(func(*Config) {}), AntiRollback: &on})
	require.NoError(t, err)
	require.True(t, done.AntiRollback)
	put(t, m, s, "policy/a", "v")
	old, err := ReadConfig(ctx, s)
	require.NoError(t, err)

	dest := newToken(t)
	done, err = m.Configure(ctx, s, ConfigureRequest{Merge: change(func(c *Config) { c.TokenLabel = dest }), GenerateKey: true})
	require.NoError(t, err)
	require.Equal(t, dest, done.Config.TokenLabel)
	require.Equal(t, old.SealedWith, done.Config.SealedWith)
	require.True(t, done.AntiRollback)
	// The new token holds the anchor as soon as the move is done, before
	// any further write.
	_, found, err := openTokenOf(t, done.Config).ReadData(m.AntiRollbackLabel())
	require.NoError(t, err)
	require.True(t, found, "the anchor is in the new token at once")
	put(t, m, s, "policy/a", "w")
	m.Close()

	v, found, err := openTokenOf(t, old).ReadData(m.AntiRollbackLabel())
	require.NoError(t, err)
	require.True(t, found)
	require.Equal(t, uint64(math.MaxUint64), binary.BigEndian.Uint64(v), "retired in the old token")
	v, found, err = openTokenOf(t, done.Config).ReadData(m.AntiRollbackLabel())
	require.NoError(t, err)
	require.True(t, found, "kept in the new token")
	require.Less(t, binary.BigEndian.Uint64(v), uint64(math.MaxUint64))

	restarted := newManager(t, newFakeHost(t), m.MountID())
	require.Equal(t, "w", get(t, restarted, s, "policy/a"), "the new token unseals it")
	restarted.Close()

	// The configuration from before the move no longer unseals.
	require.NoError(t, WriteConfig(ctx, s, old))
	replayed := newManager(t, newFakeHost(t), m.MountID())
	_, err = replayed.View(ctx, s)
	requireCode(t, err, http.StatusServiceUnavailable, "rolled back")
}

// The anchor refuses storage rolled back past it, and an anchor object
// that is not one is a permanent fault.
func TestAntiRollbackAnchor(t *testing.T) {
	ctx := context.Background()
	m, _, s := unsealedManager(t)
	on := true
	_, err := m.Configure(ctx, s, ConfigureRequest{Merge: change(func(*Config) {}), AntiRollback: &on})
	require.NoError(t, err)
	put(t, m, s, "policy/a", "old")
	snapshot := copyStorage(t, s)
	put(t, m, s, "policy/a", "new")
	// The writer keeps the token current without waiting for a stop.
	cfg, err := ReadConfig(ctx, s)
	require.NoError(t, err)
	tok := openTokenOf(t, cfg)
	want, _ := m.Snapshot().Sealer().Anchor()
	require.Eventually(t, func() bool {
		v, found, err := tok.ReadData(m.AntiRollbackLabel())
		return err == nil && found && binary.BigEndian.Uint64(v) == want
	}, 5*time.Second, 10*time.Millisecond)
	m.Close()

	restarted := newManager(t, newFakeHost(t), m.MountID())
	require.Equal(t, "new", get(t, restarted, s, "policy/a"))
	require.True(t, restarted.Snapshot().Meta().AntiRollback)
	restarted.Close()

	rolledBack := newManager(t, newFakeHost(t), m.MountID())
	_, err = rolledBack.View(ctx, snapshot)
	requireCode(t, err, http.StatusServiceUnavailable, "rolled back")
	require.ErrorIs(t, rolledBack.Snapshot().LastErr(), ErrStorageNotSealed)
	rolledBack.Close()

	require.NoError(t, tok.WriteData(m.AntiRollbackLabel(), []byte{1, 2, 3}))
	broken := newManager(t, newFakeHost(t), m.MountID())
	_, err = broken.View(ctx, s)
	requireCode(t, err, http.StatusServiceUnavailable, "holds 3 bytes")
	require.True(t, broken.Snapshot().Permanent())
	require.Equal(t, hsm.Failed, hsm.KindOf(broken.Snapshot().LastErr()))
}

// The sealed state is the authority on an emergency seal: clearing the
// plaintext flag neither unseals the mount nor lets config/seal in.
func TestEmergencySealRecordedInSealedState(t *testing.T) {
	ctx := context.Background()
	m, _, s := unsealedManager(t)
	m.Close()

	// A restarted mount (not unsealed yet) records it in the sealed state.
	restarted := newManager(t, newFakeHost(t), m.MountID())
	recorded, err := restarted.EmergencySeal(ctx, s)
	require.NoError(t, err)
	require.True(t, recorded)
	restarted.Close()
	// So does one that finds it recorded there already.
	again := newManager(t, newFakeHost(t), m.MountID())
	recorded, err = again.EmergencySeal(ctx, s)
	require.NoError(t, err)
	require.True(t, recorded)
	again.Close()

	cfg, err := ReadConfig(ctx, s)
	require.NoError(t, err)
	require.True(t, cfg.EmergencySealed)
	cfg.EmergencySealed = false
	require.NoError(t, WriteConfig(ctx, s, cfg))
	cleared := newManager(t, newFakeHost(t), m.MountID())
	_, err = cleared.Configure(ctx, s, ConfigureRequest{Merge: withPIN(testPIN)})
	require.Equal(t, KindCaller, KindOf(err), "%v", err)
	require.ErrorContains(t, err, "write seal/unseal first")
	require.NotEqual(t, PhaseUnsealed, cleared.Snapshot().Phase())
	_, err = cleared.View(ctx, s)
	requireCode(t, err, http.StatusServiceUnavailable, ErrEmergencySealed.Error())
	require.True(t, cleared.Snapshot().EmergencySealed())
}

// With the HSM out of reach, an emergency seal is recorded in plaintext
// only, and says so each time.
func TestEmergencySealWithoutTheHSM(t *testing.T) {
	ctx := context.Background()
	m, _, s := unsealedManager(t)
	m.Close()
	loseToken(t, s)
	lost := newManager(t, newFakeHost(t), m.MountID())
	for range 2 {
		recorded, err := lost.EmergencySeal(ctx, s)
		require.NoError(t, err)
		require.False(t, recorded)
		require.True(t, lost.Snapshot().EmergencySealed())
	}
}

// The emergency seal takes effect in memory even when storage refuses to
// record it in the configuration, and says that it was not recorded.
func TestEmergencySealConfigWriteFails(t *testing.T) {
	ctx := context.Background()
	m, h, inmem := unsealedManager(t)
	s := &spyStorage{Storage: inmem}
	s.setFailPut(func(key string) bool { return key == ConfigPath })
	_, err := m.EmergencySeal(ctx, s)
	require.ErrorIs(t, err, errStorageDown)
	require.ErrorContains(t, err, "recording the emergency seal failed")
	require.Equal(t, PhaseSealed, m.Snapshot().Phase())
	require.Nil(t, m.CurrentToken())
	_, dropped := h.counts()
	require.Positive(t, dropped)
}

// Recovery is refused while the configured HSM still opens the keyring,
// even for a mount that is sealed.
func TestRestoreRefusedWhileTheHSMWorks(t *testing.T) {
	ctx := context.Background()
	m, _, s := unsealedManager(t)
	set, err := m.RecoveryInit(ctx, s, 3, 2)
	require.NoError(t, err)
	_, err = m.EmergencySeal(ctx, s)
	require.NoError(t, err)
	before, err := ReadConfig(ctx, s)
	require.NoError(t, err)
	_, err = m.Restore(ctx, s, RestoreRequest{Shares: set.Shares[:2], Merge: sealSettings(testToken, newKEK(t)), GenerateKey: true})
	require.Equal(t, KindCaller, KindOf(err), "%v", err)
	require.ErrorContains(t, err, "still opens its root keyring")
	after, err := ReadConfig(ctx, s)
	require.NoError(t, err)
	require.Equal(t, before, after, "nothing was changed")
}

// Restore seals with the mechanism named, or the lost keyring's when none
// is named.
func TestRestoreMechanism(t *testing.T) {
	ctx := context.Background()
	s := &logical.InmemStorage{}
	m := newManager(t, newFakeHost(t), newMountUUID(t))
	first := func(cur *Config) (*Config, error) {
		next, err := sealSettings(testToken, newKEK(t))(cur)
		next.Mechanism = string(hsm.AESKWP)
		return next, err
	}
	_, err := m.Configure(ctx, s, ConfigureRequest{Merge: first, GenerateKey: true})
	require.NoError(t, err)
	put(t, m, s, "policy/a", "v")
	set, err := m.RecoveryInit(ctx, s, 3, 2)
	require.NoError(t, err)

	restore := func(mechanism hsm.SealMechanism) *Config {
		m.Close()
		loseToken(t, s)
		m = newManager(t, newFakeHost(t), m.MountID())
		restored, err := m.Restore(ctx, s, RestoreRequest{Shares: set.Shares[:2], Merge: change(func(c *Config) {
			c.TokenLabel, c.KeyLabel, c.Mechanism = testToken, newKEK(t), string(mechanism)
		}), GenerateKey: true})
		require.NoError(t, err)
		require.Equal(t, "v", get(t, m, s, "policy/a"))
		return restored.Config
	}
	require.Equal(t, string(hsm.AESKWP), restore("").SealedMechanism, "the lost keyring's")
	require.Equal(t, string(hsm.AESGCM), restore(hsm.AESGCM).SealedMechanism, "as named")
}

// A recovery copy that is not authenticated (an older version's) is used
// only when asked for, and only if the keyring it holds opens every sealed
// entry of the mount.
func TestRestoreLegacyCopy(t *testing.T) {
	ctx := context.Background()
	m, _, s := unsealedManager(t)
	put(t, m, s, "policy/a", "v")
	put(t, m, s, "policy/nested/b", "w")
	public, shares, err := seal.NewRecovery(3, 2)
	require.NoError(t, err)
	legacy, err := seal.SealForRecovery(public, m.recoveryInfo(), m.Snapshot().Sealer().Keyring())
	require.NoError(t, err)
	foreignKey := make([]byte, seal.RootKeySize)
	foreignKey[0] = 1
	foreignRing, err := seal.NewKeyring(foreignKey)
	require.NoError(t, err)
	planted, err := seal.SealForRecovery(public, m.recoveryInfo(), foreignRing)
	require.NoError(t, err)
	m.Close()
	loseToken(t, s)
	withCopy := func(copy []byte) {
		cfg, err := ReadConfig(ctx, s)
		require.NoError(t, err)
		cfg.RecoveryKeyring, cfg.RecoveryThreshold = copy, 2
		require.NoError(t, WriteConfig(ctx, s, cfg))
	}
	req := RestoreRequest{Shares: shares[:2], Merge: change(func(c *Config) { c.TokenLabel, c.KeyLabel = testToken, newKEK(t) }), GenerateKey: true}
	lost := newManager(t, newFakeHost(t), m.MountID())

	withCopy(planted)
	req.LegacyCopy = true
	_, err = lost.Restore(ctx, s, req)
	require.Equal(t, KindCaller, KindOf(err), "%v", err)
	require.ErrorContains(t, err, "does not open this mount's sealed storage")

	withCopy(legacy)
	req.LegacyCopy = false
	_, err = lost.Restore(ctx, s, req)
	require.Equal(t, KindCaller, KindOf(err), "%v", err)
	require.ErrorContains(t, err, "not authenticated")

	req.LegacyCopy = true
	_, err = lost.Restore(ctx, s, req)
	require.NoError(t, err)
	require.Equal(t, "v", get(t, lost, s, "policy/a"))
	require.Equal(t, "w", get(t, lost, s, "policy/nested/b"))
}

// Turning anti-rollback off removes the anchor from the token.
func TestAntiRollbackOff(t *testing.T) {
	ctx := context.Background()
	m, _, s := unsealedManager(t)
	on, off := true, false
	_, err := m.Configure(ctx, s, ConfigureRequest{Merge: change(func(*Config) {}), AntiRollback: &on})
	require.NoError(t, err)
	put(t, m, s, "policy/a", "v")
	done, err := m.Configure(ctx, s, ConfigureRequest{Merge: change(func(*Config) {}), AntiRollback: &off})
	require.NoError(t, err)
	require.False(t, done.AntiRollback)
	require.False(t, m.Snapshot().Meta().AntiRollback)
	_, found, err := openTokenOf(t, done.Config).ReadData(m.AntiRollbackLabel())
	require.NoError(t, err)
	require.False(t, found)
	put(t, m, s, "policy/a", "w")
	m.Close()
	restarted := newManager(t, newFakeHost(t), m.MountID())
	require.Equal(t, "w", get(t, restarted, s, "policy/a"))
	require.False(t, restarted.Snapshot().Meta().AntiRollback, "recorded in the sealed state")
}

// A standby follows what the active node changes, as invalidations tell
// it: a change of the sealed state only is read without unsealing again;
// a new keyring is unsealed again; a configuration removed is forgotten.
func TestStandbyFollowsTheActiveNode(t *testing.T) {
	ctx := context.Background()
	active, _, s := unsealedManager(t)
	put(t, active, s, "policy/a", "v")
	h := newFakeHost(t)
	h.readOnly = true
	standby := newManager(t, h, active.MountID())
	standby.Invalidate(ctx, ConfigPath) // before Start: nothing to read
	standby.WaitReloadsForTest()
	require.Equal(t, PhaseUnknown, standby.Snapshot().Phase())
	standby.Start(s)
	require.Eventually(t, func() bool { return standby.Snapshot().Phase() == PhaseUnsealed }, 5*time.Second, 10*time.Millisecond)
	tok := standby.CurrentToken()

	// Only the sealed state changes.
	on := true
	_, err := active.Configure(ctx, s, ConfigureRequest{Merge: change(func(*Config) {}), AntiRollback: &on})
	require.NoError(t, err)
	standby.Invalidate(ctx, MetaPath)
	standby.WaitReloadsForTest()
	require.True(t, standby.Snapshot().Meta().AntiRollback)
	require.Same(t, tok, standby.CurrentToken(), "not unsealed again")
	h.requireUnsealedHook(t, 1)

	// A new keyring.
	_, err = active.Rotate(ctx, s)
	require.NoError(t, err)
	put(t, active, s, "policy/b", "w")
	standby.Invalidate(ctx, ConfigPath)
	standby.WaitReloadsForTest()
	require.Equal(t, PhaseUnsealed, standby.Snapshot().Phase())
	require.Equal(t, uint32(2), standby.Snapshot().Config().RootKeyVersion)
	require.Equal(t, "w", get(t, standby, s, "policy/b"))
	h.requireUnsealedHook(t, 2)

	// The configuration removed (by a storage writer): forgotten.
	require.NoError(t, s.Delete(ctx, ConfigPath))
	_, droppedBefore := h.counts()
	standby.Invalidate(ctx, ConfigPath)
	standby.WaitReloadsForTest()
	require.Equal(t, PhaseUnknown, standby.Snapshot().Phase())
	require.Nil(t, standby.CurrentToken())
	_, dropped := h.counts()
	require.Greater(t, dropped, droppedBefore)
	standby.Invalidate(ctx, ConfigPath) // again, with nothing in memory
	standby.WaitReloadsForTest()
	require.Equal(t, PhaseUnknown, standby.Snapshot().Phase())

	// After Close, invalidations are ignored.
	standby.Close()
	standby.Invalidate(ctx, ConfigPath)
	standby.WaitReloadsForTest()
	require.Equal(t, PhaseUnknown, standby.Snapshot().Phase())
}

func TestSameSealedKeyring(t *testing.T) {
	a := &Config{Library: "/lib/a.so", SealedKeyring: []byte{1}, SealedWith: "kek"}
	b := *a
	require.True(t, sameSealedKeyring(a, &b))
	b.SealedKeyring = []byte{2}
	require.False(t, sameSealedKeyring(a, &b))
	require.False(t, sameSealedKeyring(nil, a))
	require.False(t, sameSealedKeyring(a, nil))
}
