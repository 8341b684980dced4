package envelope

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// memKS is an in-memory KeyService: AES-256-GCM wrapping under a key derived
// from a test master key, the mount, the key name, the version and the
// context, formatted as transit does (vault:vN:base64). Rotate bumps a key's
// latest version; Rewrap moves a wrapped key to it.
type memKS struct {
	master []byte
	refuse map[string]bool // mounts that answer permission denied

	mu     sync.Mutex
	latest map[string]int

	calls atomic.Int64
	// pad makes wrapped keys of version 2 and later longer by 1+pad
	// characters, to exercise slot capacity.
	pad int
}

var errDenied = errors.New("permission denied")

func newMemKS() *memKS {
	m := &memKS{master: make([]byte, 32), latest: map[string]int{}, refuse: map[string]bool{}}
	if _, err := rand.Read(m.master); err != nil {
		panic(err)
	}
	return m
}

func (m *memKS) version(mount, key string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if v := m.latest[mount+"/"+key]; v > 0 {
		return v
	}
	return 1
}

func (m *memKS) rotate(mount, key string, to int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.latest[mount+"/"+key] = to
}

func (m *memKS) aead(mount, key string, ver int, keyContext []byte) cipher.AEAD {
	mac := hmac.New(sha256.New, m.master)
	fmt.Fprintf(mac, "%s\x00%s\x00%d\x00", mount, key, ver)
	mac.Write(keyContext)
	b, err := aes.NewCipher(mac.Sum(nil))
	if err != nil {
		panic(err)
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		panic(err)
	}
	return g
}

func (m *memKS) check(mount string) error {
	m.calls.Add(1)
	if m.refuse[mount] {
		return errDenied
	}
	return nil
}

func (m *memKS) wrap(mount, key string, ver int, keyContext, pt []byte) string {
	nonce := make([]byte, 12)
	if _, err := rand.Read(nonce); err != nil {
		panic(err)
	}
	ct := m.aead(mount, key, ver, keyContext).Seal(nonce, nonce, pt, nil)
	s := base64.StdEncoding.EncodeToString(ct)
	if ver > 1 && m.pad > 0 {
		s += ":" + strings.Repeat("p", m.pad) // ignored by unwrap
	}
	return "vault:v" + strconv.Itoa(ver) + ":" + s
}

func (m *memKS) unwrap(mount, key string, keyContext []byte, wrapped string) ([]byte, int, error) {
	rest, ok := strings.CutPrefix(wrapped, "vault:v")
	if !ok {
		return nil, 0, errors.New("invalid ciphertext: no prefix")
	}
	vs, b64, ok := strings.Cut(rest, ":")
	ver, err := strconv.Atoi(vs)
	if !ok || err != nil || ver < 1 {
		return nil, 0, errors.New("invalid ciphertext: bad version")
	}
	b64, _, _ = strings.Cut(b64, ":")
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(raw) < 12+16 {
		return nil, 0, errors.New("invalid ciphertext: bad base64")
	}
	pt, err := m.aead(mount, key, ver, keyContext).Open(nil, raw[:12], raw[12:], nil)
	if err != nil {
		return nil, 0, errors.New("cipher: message authentication failed")
	}
	return pt, ver, nil
}

func (m *memKS) DataKey(_ context.Context, mount, key string, keyContext []byte) ([]byte, string, error) {
	if err := m.check(mount); err != nil {
		return nil, "", err
	}
	dk := make([]byte, 32)
	if _, err := rand.Read(dk); err != nil {
		return nil, "", err
	}
	return dk, m.wrap(mount, key, m.version(mount, key), keyContext, dk), nil
}

func (m *memKS) Wrap(_ context.Context, mount, key string, keyContext, pt []byte) (string, error) {
	if err := m.check(mount); err != nil {
		return "", err
	}
	return m.wrap(mount, key, m.version(mount, key), keyContext, pt), nil
}

func (m *memKS) Unwrap(_ context.Context, mount, key string, keyContext []byte, wrapped string) ([]byte, error) {
	if err := m.check(mount); err != nil {
		return nil, err
	}
	pt, _, err := m.unwrap(mount, key, keyContext, wrapped)
	return pt, err
}

func (m *memKS) Rewrap(_ context.Context, mount, key string, keyContext []byte, wrapped string) (string, error) {
	if err := m.check(mount); err != nil {
		return "", err
	}
	pt, ver, err := m.unwrap(mount, key, keyContext, wrapped)
	if err != nil {
		return "", err
	}
	if latest := m.version(mount, key); latest > ver {
		return m.wrap(mount, key, latest, keyContext, pt), nil
	}
	return wrapped, nil
}
