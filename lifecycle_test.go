package hsmtransit

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
	"github.com/stretchr/testify/require"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/softhsm"
	sealpkg "github.com/hsm-transit/vault-plugin-secrets-hsm-transit/seal"
)

func TestDisabledKeyRefusesEveryOperation(t *testing.T) {
	for _, residency := range []string{"software", "hsm"} {
		t.Run(residency, func(t *testing.T) {
			e := getTestBackend(t)
			e.mustWrite(t, "keys/k", map[string]interface{}{"hsm": residency == "hsm"})
			e.mustWrite(t, "keys/sig", map[string]interface{}{"type": "ecdsa-p256"})
			ct := e.encrypt(t, "k", "x", nil)
			sig := e.mustWrite(t, "sign/sig", map[string]interface{}{"input": b64("m")})["signature"]

			data := e.mustWrite(t, "keys/k/config", map[string]interface{}{"disabled": true})
			require.Equal(t, true, data["disabled"])
			e.mustWrite(t, "keys/sig/config", map[string]interface{}{"disabled": true})
			ops := []struct {
				path string
				data map[string]interface{}
			}{
				{"encrypt/k", map[string]interface{}{"plaintext": b64("x")}},
				{"decrypt/k", map[string]interface{}{"ciphertext": ct}},
				{"rewrap/k", map[string]interface{}{"ciphertext": ct}},
				{"datakey/plaintext/k", nil},
				{"datakey/wrapped/k", nil},
				{"sign/sig", map[string]interface{}{"input": b64("m")}},
				{"verify/sig", map[string]interface{}{"input": b64("m"), "signature": sig}},
			}
			if residency == "software" {
				e.mustWrite(t, "keys/mac", map[string]interface{}{"type": "hmac"})
				h := e.mustWrite(t, "hmac/mac", map[string]interface{}{"input": b64("m")})["hmac"]
				e.mustWrite(t, "keys/mac/config", map[string]interface{}{"disabled": true})
				ops = append(ops,
					struct {
						path string
						data map[string]interface{}
					}{"hmac/mac", map[string]interface{}{"input": b64("m")}},
					struct {
						path string
						data map[string]interface{}
					}{"verify/mac", map[string]interface{}{"input": b64("m"), "hmac": h}},
				)
			}
			for _, op := range ops {
				requireStatus(t, e.write(t, op.path, op.data), 400, "is disabled")
			}
			// Reading and configuring still work.
			require.Equal(t, true, e.read(t, "keys/k").data["disabled"])
			e.mustWrite(t, "keys/k/rotate", nil)
			e.mustWrite(t, "keys/k/config", map[string]interface{}{"disabled": false})
			e.mustWrite(t, "keys/sig/config", map[string]interface{}{"disabled": false})
			require.Equal(t, "x", e.decrypt(t, "k", ct, nil))
			requireStatus(t, e.write(t, "verify/sig", map[string]interface{}{"input": b64("m"), "signature": sig}), 200, "")

			// Suspension survives a restart.
			e.mustWrite(t, "keys/k/config", map[string]interface{}{"disabled": true})
			e = e.restart(t)
			requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 400, "is disabled")
			check := requireMountSealed(t, e, nil)
			require.Contains(t, check.opened, lifecyclePrefix+"k", "the disabled flag is sealed")
		})
	}
}

func TestUsageCapRotatesAutomatically(t *testing.T) {
	for _, residency := range []string{"software", "hsm"} {
		t.Run(residency, func(t *testing.T) {
			e := getTestBackend(t)
			e.mustWrite(t, "keys/k", map[string]interface{}{"hsm": residency == "hsm"})
			require.Equal(t, float64(gcmRandomNonceLimit), e.read(t, "keys/k").data["max_encryptions"], "NIST SP 800-38D's bound by default")
			e.mustWrite(t, "keys/k/config", map[string]interface{}{"max_encryptions": 3})

			made := map[string]string{}
			for i := 0; i < 10; i++ {
				pt := fmt.Sprint("item ", i)
				made[e.encrypt(t, "k", pt, nil)] = pt
			}
			dk := e.mustWrite(t, "datakey/wrapped/k", nil)
			made[dk["ciphertext"].(string)] = ""
			key := e.read(t, "keys/k").data
			require.Equal(t, float64(4), key["latest_version"], "11 encryptions at 3 per version")
			counts := key["encryptions"].(map[string]interface{})
			for v := 1; v <= 3; v++ {
				require.Equal(t, float64(3), counts[fmt.Sprint(v)], "version %d used to its cap", v)
			}
			require.Equal(t, float64(2), counts["4"])
			for ct, pt := range made {
				if pt != "" {
					require.Equal(t, pt, e.decrypt(t, "k", ct, nil))
				}
			}

			// A batch larger than the cap cannot fit one version.
			var big []interface{}
			for i := 0; i < 4; i++ {
				big = append(big, map[string]interface{}{"plaintext": b64("x")})
			}
			requireStatus(t, e.write(t, "encrypt/k", map[string]interface{}{"batch_input": big}), 400, "split the batch")
			// An explicit version that is spent is refused, not rotated.
			requireStatus(t, e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("x"), "key_version": 1}), 400, "reached max_encryptions")
			// 0 switches the cap off.
			e.mustWrite(t, "keys/k/config", map[string]interface{}{"max_encryptions": 0})
			requireStatus(t, e.write(t, "encrypt/k", map[string]interface{}{"batch_input": big}), 200, "")
			requireStatus(t, e.write(t, "keys/k/config", map[string]interface{}{"max_encryptions": -1}), 400, "cannot be negative")
			check := requireMountSealed(t, e, nil)
			require.Contains(t, check.opened, lifecyclePrefix+"k", "the usage counts are sealed")
		})
	}
}

func TestUsageCapUnderConcurrency(t *testing.T) {
	e := getTestBackend(t)
	e.mustWrite(t, "keys/k", nil)
	e.mustWrite(t, "keys/k/config", map[string]interface{}{"max_encryptions": 50})
	var wg sync.WaitGroup
	var mu sync.Mutex
	made := map[string]string{}
	for w := 0; w < 40; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 10; i++ {
				pt := b64(fmt.Sprintf("%d/%d", w, i))
				resp, err := e.call(logical.UpdateOperation, "encrypt/k", map[string]interface{}{"plaintext": pt})
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				made[resp.Data["ciphertext"].(string)] = pt
				mu.Unlock()
			}
		}(w)
	}
	wg.Wait()
	key := e.read(t, "keys/k").data
	total := 0.0
	for v, n := range key["encryptions"].(map[string]interface{}) {
		require.LessOrEqual(t, n.(float64), float64(50), "version %s stays within its cap", v)
		total += n.(float64)
	}
	require.Equal(t, float64(400), total)
	require.GreaterOrEqual(t, key["latest_version"].(float64), float64(8))
	for ct, pt := range made {
		require.Equal(t, unb64(t, pt), e.decrypt(t, "k", ct, nil))
	}
}

// countingStorage counts writes to lifecycle entries.
type countingStorage struct {
	logical.Storage
	mu     sync.Mutex
	writes int
}

func (c *countingStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	if strings.HasPrefix(e.Key, lifecyclePrefix) {
		c.mu.Lock()
		c.writes++
		c.mu.Unlock()
	}
	return c.Storage.Put(ctx, e)
}

func TestUsageCountsSurviveRestartsWithoutAWritePerRequest(t *testing.T) {
	counting := &countingStorage{Storage: &logical.InmemStorage{}}
	e := startBackend(t, counting, newMountUUID(t))
	e.mustWrite(t, "config/seal", testSealConfig())
	e.mustWrite(t, "keys/k", nil)
	const n = 1500
	for i := 0; i < n/100; i++ {
		var batch []interface{}
		for j := 0; j < 100; j++ {
			batch = append(batch, map[string]interface{}{"plaintext": b64("x")})
		}
		e.mustWrite(t, "encrypt/k", map[string]interface{}{"batch_input": batch})
	}
	require.Equal(t, 1, counting.writes, "one reservation covers %d encryptions", n)
	require.Equal(t, float64(n), e.read(t, "keys/k").data["encryptions"].(map[string]interface{})["1"])

	// No shutdown hook stores the exact count: after a restart (or a
	// crash), the count is the reservation, never below the truth.
	e = e.restart(t)
	after := e.read(t, "keys/k").data["encryptions"].(map[string]interface{})["1"].(float64)
	require.GreaterOrEqual(t, after, float64(n))
	require.Less(t, after, float64(n+countBlock+1))
}

func TestScheduledDeletion(t *testing.T) {
	for _, residency := range []string{"software", "hsm"} {
		t.Run(residency, func(t *testing.T) {
			e := getTestBackend(t)
			e.mustWrite(t, "keys/k", map[string]interface{}{"hsm": residency == "hsm"})
			ct := e.encrypt(t, "k", "x", nil)
			for _, days := range []int{6, 31, 0} {
				requireStatus(t, e.write(t, "keys/k/schedule-deletion", map[string]interface{}{"pending_days": days}), 400, "from 7 to 30")
			}
			requireStatus(t, e.write(t, "keys/none/schedule-deletion", nil), 400, "no existing key")
			requireStatus(t, e.write(t, "keys/k/cancel-deletion", nil), 400, "not scheduled")

			data := e.mustWrite(t, "keys/k/schedule-deletion", map[string]interface{}{"pending_days": 7})
			when, err := time.Parse(time.RFC3339, data["deletion_time"].(string))
			require.NoError(t, err)
			require.WithinDuration(t, time.Now().Add(7*24*time.Hour), when, time.Minute)
			requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 400, "scheduled for destruction")
			requireStatus(t, e.write(t, "keys/k/config", map[string]interface{}{"disabled": false}), 400, "cancel-deletion")
			requireStatus(t, e.write(t, "keys/k/schedule-deletion", nil), 400, "already scheduled")
			require.Equal(t, data["deletion_time"], e.read(t, "keys/k").data["deletion_time"])

			// Cancel restores it.
			e.mustWrite(t, "keys/k/cancel-deletion", nil)
			require.Equal(t, "x", e.decrypt(t, "k", ct, nil))
			require.NotContains(t, e.read(t, "keys/k").data, "deletion_time")

			// Scheduled again, it is kept until its time, then destroyed.
			e.mustWrite(t, "keys/k/schedule-deletion", nil)
			check := requireMountSealed(t, e, nil)
			require.Contains(t, check.opened, deletionPrefix+"k", "the schedule is sealed")
			require.NoError(t, e.b.destroyDueKeys(context.Background(), e.sealed(t), time.Now().Add(29*24*time.Hour)))
			requireStatus(t, e.read(t, "keys/k"), 200, "")
			require.NoError(t, e.b.destroyDueKeys(context.Background(), e.sealed(t), time.Now().Add(30*24*time.Hour+time.Minute)))
			requireStatus(t, e.read(t, "keys/k"), 404, "")
			if residency == "hsm" {
				require.Empty(t, tokenLabels(t, e, testToken, "k"), "the HSM objects are destroyed")
			}
			entries, err := e.sealed(t).List(context.Background(), deletionPrefix)
			require.NoError(t, err)
			require.Empty(t, entries)
			lc, err := e.sealed(t).Get(context.Background(), lifecyclePrefix+"k")
			require.NoError(t, err)
			require.Nil(t, lc)
			requireMountSealed(t, e, nil)
		})
	}
}

// TestRecoveryWithShares loses the whole token: M shares and a new token
// bring the mount back; M-1 or a wrong share change nothing.
func TestRecoveryWithShares(t *testing.T) {
	require.NoError(t, softhsm.InitToken(softhsmConf, "doomed", testPIN))
	e := startBackend(t, &logical.InmemStorage{}, newMountUUID(t))
	e.mustWrite(t, "config/seal", withSeal(map[string]interface{}{"token_label": "doomed", "key_label": "doomed-kek", "generate_key": true}))
	ct1 := e.encrypt(t, "soft", "before recovery init", nil)
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})

	requireStatus(t, e.write(t, "seal/recovery/init", map[string]interface{}{"shares": 3, "threshold": 4}), 400, "cannot be fewer than threshold")
	requireStatus(t, e.write(t, "seal/recovery/init", map[string]interface{}{"shares": 3, "threshold": 1}), 400, "at least 2")
	r := e.write(t, "seal/recovery/init", map[string]interface{}{"shares": 5, "threshold": 3})
	requireStatus(t, r, 200, "")
	require.Contains(t, strings.Join(r.resp.Warnings, " "), "hk")
	var shares []string
	for _, s := range r.data["shares"].([]interface{}) {
		shares = append(shares, s.(string))
	}
	require.Len(t, shares, 5)
	st := e.read(t, "seal/status").data
	require.Equal(t, true, st["recovery_initialized"])
	require.Equal(t, float64(3), st["recovery_threshold"])

	// The copy follows root key rotations without the shares.
	e.mustWrite(t, "seal/rotate", nil)
	ct2 := e.encrypt(t, "soft", "after rotation", nil)

	// The HSM is lost: its token directory is gone for good, and a new,
	// empty token takes its place.
	dir, err := softhsm.TokenDir(softhsmConf, "doomed")
	require.NoError(t, err)
	require.NoError(t, os.RemoveAll(dir))
	require.NoError(t, softhsm.InitToken(softhsmConf, "replacement", testPIN))
	e = e.restart(t)
	requireStatus(t, e.write(t, "decrypt/soft", map[string]interface{}{"ciphertext": ct1}), 503, `no token labelled "doomed"`)
	before := e.read(t, "config/seal").data

	restore := func(given []string) result {
		return e.write(t, "seal/recovery/restore", withSeal(map[string]interface{}{
			"shares": given, "token_label": "replacement", "key_label": "new-kek", "generate_key": true,
		}))
	}
	requireStatus(t, restore(shares[:2]), 400, "3 are needed")
	// A share with one bit changed (in its bytes: a changed base64
	// character may not be base64 at all).
	raw, err := base64.StdEncoding.DecodeString(shares[2])
	require.NoError(t, err)
	raw[5] ^= 1
	wrong := base64.StdEncoding.EncodeToString(raw)
	requireStatus(t, restore([]string{shares[0], shares[1], wrong}), 400, "the shares do not open the recovery copy (too few, a wrong share, or shares of another recovery set)")
	_, other, err := sealpkg.NewRecovery(5, 3)
	require.NoError(t, err)
	requireStatus(t, restore([]string{shares[0], shares[1], other[2]}), 400, "do not open the recovery copy")
	require.Equal(t, before, e.read(t, "config/seal").data, "failed attempts change nothing")
	require.Equal(t, true, e.read(t, "seal/status").data["sealed"])

	r = restore([]string{shares[4], shares[1], shares[3]})
	requireStatus(t, r, 200, "")
	require.Equal(t, []interface{}{"hk"}, r.data["hsm_keys_lost"])
	require.Equal(t, "new-kek", r.data["key_label"])
	require.Equal(t, "before recovery init", e.decrypt(t, "soft", ct1, nil))
	require.Equal(t, "after rotation", e.decrypt(t, "soft", ct2, nil))
	requireStatus(t, e.write(t, "encrypt/hk", map[string]interface{}{"plaintext": b64("x")}), 400, "no longer in the HSM")

	// And it stays recovered across restarts, on the new token.
	e = e.restart(t)
	require.Equal(t, "after rotation", e.decrypt(t, "soft", ct2, nil))
	require.Equal(t, "replacement", e.read(t, "seal/status").data["token_label"])
	// Its storage is sealed under the recovered keyring, now sealed by the
	// new token; no share and no plaintext is in it.
	secrets := secretSet{}
	for i, share := range shares {
		secrets.AddString(t, fmt.Sprint("recovery share ", i), share)
	}
	secrets.Add(t, "plaintext 1", []byte("before recovery init"))
	secrets.Add(t, "plaintext 2", []byte("after rotation"))
	requireMountSealed(t, e, secrets)
}

func TestEmergencySeal(t *testing.T) {
	e := getTestBackend(t)
	ct := e.encrypt(t, "k", "guarded", nil)
	e.mustWrite(t, "keys/hk", map[string]interface{}{"hsm": true})
	hct := e.encrypt(t, "hk", "guarded too", nil)

	e.mustWrite(t, "seal/seal", nil)
	require.Nil(t, e.b.seal.Snapshot().Sealer(), "the root key is out of memory")
	for _, p := range []struct {
		path string
		data map[string]interface{}
	}{
		{"decrypt/k", map[string]interface{}{"ciphertext": ct}},
		{"decrypt/hk", map[string]interface{}{"ciphertext": hct}},
		{"encrypt/k", map[string]interface{}{"plaintext": b64("x")}},
		{"datakey/plaintext/k", nil},
	} {
		requireStatus(t, e.write(t, p.path, p.data), 503, "seal/unseal")
	}
	requireStatus(t, e.read(t, "keys/k"), 503, "the mount was sealed by seal/seal (emergency seal); seal/unseal resumes it")
	st := e.read(t, "seal/status").data
	require.Equal(t, true, st["sealed"])
	require.Equal(t, true, st["emergency_sealed"])
	requireStatus(t, e.write(t, "config/seal", map[string]interface{}{"pin": testPIN}), 400, "seal/unseal first")

	// A restart does not undo it.
	e = e.restart(t)
	time.Sleep(100 * time.Millisecond)
	requireStatus(t, e.write(t, "decrypt/k", map[string]interface{}{"ciphertext": ct}), 503, "seal/unseal")

	e.mustWrite(t, "seal/unseal", nil)
	require.Equal(t, "guarded", e.decrypt(t, "k", ct, nil))
	require.Equal(t, "guarded too", e.decrypt(t, "hk", hct, nil))
	require.Equal(t, false, e.read(t, "seal/status").data["emergency_sealed"])
}

// reservationStorage fails or watches the writes of lifecycle entries: the
// usage-count reservations.
type reservationStorage struct {
	logical.Storage
	fail  atomic.Bool
	mu    sync.Mutex
	onPut func(key string)
}

var errReservationRefused = errors.New("storage refuses the reservation")

func (r *reservationStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	if strings.HasPrefix(e.Key, lifecyclePrefix) {
		r.mu.Lock()
		hook := r.onPut
		r.mu.Unlock()
		if hook != nil {
			hook(e.Key)
		}
		if r.fail.Load() {
			return errReservationRefused
		}
	}
	return r.Storage.Put(ctx, e)
}

// TestEncryptionsAreCountedBeforeTheyHappen: a reservation that cannot be
// stored fails the request with no ciphertext handed out and nothing
// counted, so that no ciphertext ever exists that the stored count does not
// cover (NIST SP 800-38D's bound on random nonces). Encrypt, datakey and
// rewrap, for software and HSM-resident keys.
func TestEncryptionsAreCountedBeforeTheyHappen(t *testing.T) {
	for _, residency := range []string{"software", "hsm"} {
		t.Run(residency, func(t *testing.T) {
			s := &reservationStorage{Storage: &logical.InmemStorage{}}
			e := startBackend(t, s, newMountUUID(t))
			e.mustWrite(t, "config/seal", testSealConfig())
			ops := []struct {
				name string
				run  func() result
				// produced lists the fields that would carry output.
				produced []string
			}{
				{"encrypt", func() result {
					return e.write(t, "encrypt/k", map[string]interface{}{"plaintext": b64("secret")})
				}, []string{"ciphertext"}},
				{"batch encrypt", func() result {
					return e.write(t, "encrypt/k", map[string]interface{}{"batch_input": []interface{}{
						map[string]interface{}{"plaintext": b64("one")}, map[string]interface{}{"plaintext": b64("two")},
					}})
				}, []string{"batch_results"}},
				{"datakey", func() result { return e.write(t, "datakey/plaintext/k", nil) }, []string{"ciphertext", "plaintext"}},
			}
			for _, op := range ops {
				// A fresh version: its first encryption must store a
				// reservation.
				if e.read(t, "keys/k").status == 404 {
					e.mustWrite(t, "keys/k", map[string]interface{}{"hsm": residency == "hsm"})
				} else {
					e.mustWrite(t, "keys/k/rotate", nil)
				}
				latest := fmt.Sprint(e.read(t, "keys/k").data["latest_version"])
				s.fail.Store(true)
				r := op.run()
				s.fail.Store(false)
				requireStatus(t, r, 500, "recording encryption counts")
				require.Contains(t, r.errorMessage(), errReservationRefused.Error(), op.name)
				for _, f := range op.produced {
					require.Nil(t, r.data[f], "%s: no %s is handed out", op.name, f)
				}
				counts := e.read(t, "keys/k").data["encryptions"].(map[string]interface{})
				require.Nil(t, counts[latest], "%s: nothing counted for version %s", op.name, latest)
				// The same request once storage takes the write.
				r = op.run()
				requireStatus(t, r, 200, "")
				counts = e.read(t, "keys/k").data["encryptions"].(map[string]interface{})
				require.Positive(t, counts[latest], "%s: counted once stored", op.name)
			}

			// Rewrap: the ciphertext of version 1 moves to a fresh version.
			e.mustWrite(t, "keys/k/config", map[string]interface{}{"min_decryption_version": 1})
			ct := e.encrypt(t, "k", "rewrapped", nil)
			e.mustWrite(t, "keys/k/rotate", nil)
			latest := fmt.Sprint(e.read(t, "keys/k").data["latest_version"])
			s.fail.Store(true)
			r := e.write(t, "rewrap/k", map[string]interface{}{"ciphertext": ct})
			s.fail.Store(false)
			requireStatus(t, r, 500, "recording encryption counts")
			require.Nil(t, r.data["ciphertext"])
			require.Nil(t, e.read(t, "keys/k").data["encryptions"].(map[string]interface{})[latest])
			r = e.write(t, "rewrap/k", map[string]interface{}{"ciphertext": ct})
			requireStatus(t, r, 200, "")
			require.Equal(t, "rewrapped", e.decrypt(t, "k", r.data["ciphertext"].(string), nil))
		})
	}
}

// TestReservationIsStoredBeforeEncrypting watches the order: when the
// reservation of a fresh software key version is written, no AES-GCM of that
// version has been built yet (the first encryption builds it).
func TestReservationIsStoredBeforeEncrypting(t *testing.T) {
	s := &reservationStorage{Storage: &logical.InmemStorage{}}
	e := startBackend(t, s, newMountUUID(t))
	e.mustWrite(t, "config/seal", testSealConfig())
	e.mustWrite(t, "keys/k", nil)
	var puts, encryptedFirst atomic.Int32
	s.mu.Lock()
	s.onPut = func(key string) {
		if key != lifecyclePrefix+"k" {
			return
		}
		puts.Add(1)
		for _, name := range e.b.aeads.c.c.Keys() {
			if strings.HasPrefix(name, "k\x00") {
				encryptedFirst.Add(1)
			}
		}
	}
	s.mu.Unlock()
	ct := e.encrypt(t, "k", "counted first", nil)
	require.Equal(t, int32(1), puts.Load(), "the first encryption stores a reservation")
	require.Positive(t, lruLen(e.b.aeads.c), "the encryption built the version's AES-GCM (the positive control)")
	require.Zero(t, encryptedFirst.Load(), "the reservation was stored before the encryption")
	require.Equal(t, "counted first", e.decrypt(t, "k", ct, nil))
}
