package envelope

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Format constants of version 1 (docs/ENVELOPE.md is the specification).
const (
	// Version is the format version this package writes and reads.
	Version = 1

	// DefaultSegmentSize is the plaintext size of every segment but the last.
	DefaultSegmentSize = 64 << 10
	// MinSegmentSize and MaxSegmentSize bound the segment size.
	MinSegmentSize = 4 << 10
	MaxSegmentSize = 16 << 20

	// DefaultSlotHeadroom is the room reserved in each recipient slot beyond
	// the wrapped key's length, so that rewrap can store a longer string.
	DefaultSlotHeadroom = 256

	// MaxRecipients, MaxContextLen and MaxSlotCapacity bound the header.
	MaxRecipients   = 16
	MaxContextLen   = 4096
	MaxSlotCapacity = 8192

	magic      = "HSMTENV"
	fixedLen   = 8 + 4 + 4 + saltLen // magic, version, header length, segment size, salt
	saltLen    = 32
	tagLen     = sha256.Size
	keyLen     = 32
	gcmTagLen  = 16
	nonceLen   = 12
	maxHintLen = 255

	infoPayload = "hsm-transit envelope v1 payload key"
	infoHeader  = "hsm-transit envelope v1 header key"
	wrappedPfx  = "vault:v"
)

// Header is a parsed v1 header. ParseHeader fills it without any key; nothing
// in it is authenticated until a Reader has checked its tag, and the mount and
// key names are hints only (see docs/ENVELOPE.md, "Threat model").
type Header struct {
	Version      int         `json:"format_version"`
	HeaderLength int         `json:"header_length"`
	SegmentSize  int         `json:"segment_size"`
	Salt         []byte      `json:"salt"`
	Context      []byte      `json:"context,omitempty"`
	Recipients   []Recipient `json:"recipients"`

	tag []byte
	raw []byte // the header as read, tag included
}

// Recipient is one recipient slot: which transit key wrapped the data key
// (hints) and the wrapped key as transit returned it.
type Recipient struct {
	Mount        string `json:"mount"`
	Key          string `json:"key"`
	Wrapped      string `json:"wrapped_key"`
	SlotCapacity int    `json:"slot_capacity"`

	lenOff int // offset of the wrapped-length field in the header
}

// MarshalJSON adds the wrapped key's version ("key_version") to the fields,
// for inspect.
func (r Recipient) MarshalJSON() ([]byte, error) {
	type plain Recipient
	return json.Marshal(struct {
		plain
		KeyVersion int `json:"key_version"`
	}{plain(r), r.KeyVersion()})
}

// KeyRef returns the recipient's mount and key.
func (r Recipient) KeyRef() KeyRef { return KeyRef{Mount: r.Mount, Key: r.Key} }

// KeyVersion returns N of the wrapped key's "vault:vN:" prefix, or 0 if it
// has none.
func (r Recipient) KeyVersion() int {
	rest, ok := strings.CutPrefix(r.Wrapped, wrappedPfx)
	if !ok {
		return 0
	}
	num, _, ok := strings.Cut(rest, ":")
	if !ok {
		return 0
	}
	n, err := strconv.Atoi(num)
	if err != nil || n < 0 {
		return 0
	}
	return n
}

// checkHint accepts a mount path or key name as Vault names them: a key is
// letters, digits and _ . @ - , starting and ending with a letter, digit or
// _ (transit's name pattern); a mount is one or more such names joined by
// "/". The hints choose the path of the unwrap request, made before the
// header's tag can be checked: nothing else ("..", "?", "%", an empty
// segment) may reach it, or an edited file could send the reader's token
// to another Vault endpoint.
func checkHint(what, s string) error {
	if len(s) == 0 || len(s) > maxHintLen {
		return fmt.Errorf("envelope: %s name must be 1 to %d bytes: %w", what, maxHintLen, ErrFormat)
	}
	segments := []string{s}
	if what == "mount" {
		segments = strings.Split(s, "/")
	}
	for _, seg := range segments {
		if !vaultName(seg) {
			return fmt.Errorf("envelope: %s name %q: want letters, digits and _.@- (starting and ending with a letter, digit or _)%s: %w",
				what, strconv.QuoteToASCII(s), map[bool]string{true: ", in segments joined by /"}[what == "mount"], ErrFormat)
		}
	}
	return nil
}

// vaultName reports a name transit would accept as a key name.
func vaultName(s string) bool {
	if s == "" {
		return false
	}
	word := func(c byte) bool {
		return c == '_' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !word(c) && ((c != '.' && c != '@' && c != '-') || i == 0 || i == len(s)-1) {
			return false
		}
	}
	return true
}

// checkWrapped accepts a transit ciphertext: "vault:v" then printable ASCII
// without spaces.
func checkWrapped(s string) error {
	if !strings.HasPrefix(s, wrappedPfx) {
		return errors.New("wrapped key does not start with " + wrappedPfx)
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return errors.New("wrapped key has a byte outside printable ASCII")
		}
	}
	return nil
}

// marshal encodes h (recipients' Wrapped and SlotCapacity set) without its
// tag and records the recipients' slot offsets. The tag is appended by seal.
func (h *Header) marshal() ([]byte, error) {
	if len(h.Context) > MaxContextLen {
		return nil, fmt.Errorf("envelope: context longer than %d bytes: %w", MaxContextLen, ErrFormat)
	}
	if len(h.Recipients) == 0 || len(h.Recipients) > MaxRecipients {
		return nil, fmt.Errorf("envelope: 1 to %d recipients: %w", MaxRecipients, ErrFormat)
	}
	b := make([]byte, 0, 512)
	b = append(b, magic...)
	b = append(b, Version)
	b = binary.BigEndian.AppendUint32(b, 0) // header length, set below
	b = binary.BigEndian.AppendUint32(b, uint32(h.SegmentSize))
	b = append(b, h.Salt...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(h.Context)))
	b = append(b, h.Context...)
	b = append(b, byte(len(h.Recipients)))
	for i := range h.Recipients {
		r := &h.Recipients[i]
		if err := checkHint("mount", r.Mount); err != nil {
			return nil, err
		}
		if err := checkHint("key", r.Key); err != nil {
			return nil, err
		}
		if len(r.Wrapped) > r.SlotCapacity || r.SlotCapacity > MaxSlotCapacity {
			return nil, fmt.Errorf("envelope: recipient %d: %w", i, ErrSlotFull)
		}
		b = append(b, byte(len(r.Mount)))
		b = append(b, r.Mount...)
		b = append(b, byte(len(r.Key)))
		b = append(b, r.Key...)
		b = binary.BigEndian.AppendUint16(b, uint16(r.SlotCapacity))
		r.lenOff = len(b)
		b = binary.BigEndian.AppendUint16(b, uint16(len(r.Wrapped)))
		b = append(b, r.Wrapped...)
		b = append(b, make([]byte, r.SlotCapacity-len(r.Wrapped))...)
	}
	h.HeaderLength = len(b) + tagLen
	binary.BigEndian.PutUint32(b[8:12], uint32(h.HeaderLength))
	return b, nil
}

// authenticated returns what the header tag covers: the header without its
// tag, minus each recipient's wrapped-length field and slot, then the
// associated data with its length.
func (h *Header) authenticated(body []byte, aad []byte) []byte {
	out := make([]byte, 0, len(body)+8+len(aad))
	pos := 0
	for _, r := range h.Recipients {
		out = append(out, body[pos:r.lenOff]...)
		pos = r.lenOff + 2 + r.SlotCapacity
	}
	out = append(out, body[pos:]...)
	out = binary.BigEndian.AppendUint64(out, uint64(len(aad)))
	return append(out, aad...)
}

// computeTag returns HMAC-SHA256(headerKey, authenticated bytes).
func (h *Header) computeTag(headerKey, body, aad []byte) []byte {
	m := hmac.New(sha256.New, headerKey)
	m.Write(h.authenticated(body, aad))
	return m.Sum(nil)
}

// ParseHeader reads a v1 header from r and leaves r at the first body byte.
// It needs no key and checks no tag: use it to inspect a file, never to trust
// one.
func ParseHeader(r io.Reader) (*Header, error) {
	fixed := make([]byte, fixedLen)
	n, err := io.ReadFull(r, fixed)
	// A short file that does not start like an envelope is not one, rather
	// than a truncated one.
	if m := min(n, len(magic)); string(fixed[:m]) != magic[:m] || (n == 0 && err == io.EOF) {
		return nil, formatErr("not an hsm-transit envelope (bad magic)")
	}
	if err != nil {
		return nil, headerReadErr(err)
	}
	if fixed[7] != Version {
		return nil, formatErr("unsupported format version %d", fixed[7])
	}
	hlen := binary.BigEndian.Uint32(fixed[8:12])
	if hlen < fixedLen+2+1+tagLen || hlen > maxHeaderLen {
		return nil, formatErr("header length %d out of bounds", hlen)
	}
	raw := make([]byte, hlen)
	copy(raw, fixed)
	if _, err := io.ReadFull(r, raw[fixedLen:]); err != nil {
		return nil, headerReadErr(err)
	}
	return parseRaw(raw)
}

// maxHeaderLen bounds what ParseHeader allocates before anything is checked.
const maxHeaderLen = fixedLen + 2 + MaxContextLen + 1 + MaxRecipients*(1+maxHintLen+1+maxHintLen+4+MaxSlotCapacity) + tagLen

func headerReadErr(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("envelope: header: %w", ErrTruncated)
	}
	return fmt.Errorf("envelope: header: %w", err)
}

// parseRaw decodes a complete header (tag included).
func parseRaw(raw []byte) (*Header, error) {
	h := &Header{
		Version:      int(raw[7]),
		HeaderLength: len(raw),
		SegmentSize:  int(binary.BigEndian.Uint32(raw[12:16])),
		Salt:         raw[16:fixedLen],
		raw:          raw,
	}
	if h.SegmentSize < MinSegmentSize || h.SegmentSize > MaxSegmentSize {
		return nil, formatErr("segment size %d out of bounds", h.SegmentSize)
	}
	body := raw[:len(raw)-tagLen]
	h.tag = raw[len(raw)-tagLen:]
	d := decoder{b: body, pos: fixedLen}
	ctxLen := int(d.u16())
	if ctxLen > MaxContextLen {
		return nil, formatErr("context length %d out of bounds", ctxLen)
	}
	if c := d.bytes(ctxLen); len(c) > 0 {
		h.Context = c
	}
	n := int(d.u8())
	if d.err == nil && (n == 0 || n > MaxRecipients) {
		return nil, formatErr("recipient count %d out of bounds", n)
	}
	for i := 0; i < n && d.err == nil; i++ {
		var r Recipient
		r.Mount = string(d.bytes(int(d.u8())))
		r.Key = string(d.bytes(int(d.u8())))
		r.SlotCapacity = int(d.u16())
		r.lenOff = d.pos
		wl := int(d.u16())
		slot := d.bytes(r.SlotCapacity)
		if d.err != nil {
			break
		}
		if err := checkHint("mount", r.Mount); err != nil {
			return nil, fmt.Errorf("envelope: header: recipient %d: %w", i, err)
		}
		if err := checkHint("key", r.Key); err != nil {
			return nil, fmt.Errorf("envelope: header: recipient %d: %w", i, err)
		}
		if r.SlotCapacity > MaxSlotCapacity || wl == 0 || wl > r.SlotCapacity {
			return nil, formatErr("recipient %d: wrapped length %d, slot capacity %d", i, wl, r.SlotCapacity)
		}
		// The padding is not authenticated; requiring zeros makes any change to
		// it (or to the length field) a format error instead of a silent no-op.
		for _, c := range slot[wl:] {
			if c != 0 {
				return nil, formatErr("recipient %d: non-zero slot padding", i)
			}
		}
		r.Wrapped = string(slot[:wl])
		if err := checkWrapped(r.Wrapped); err != nil {
			return nil, formatErr("recipient %d: %v", i, err)
		}
		h.Recipients = append(h.Recipients, r)
	}
	if d.err != nil {
		return nil, formatErr("fields overrun the header length")
	}
	if d.pos != len(body) {
		return nil, formatErr("%d bytes after the last recipient", len(body)-d.pos)
	}
	return h, nil
}

// decoder reads big-endian fields; after the first overrun every read
// returns zeros and err is set.
type decoder struct {
	b   []byte
	pos int
	err error
}

func (d *decoder) bytes(n int) []byte {
	if d.err != nil || n > len(d.b)-d.pos {
		d.err = io.ErrUnexpectedEOF
		return nil
	}
	out := d.b[d.pos : d.pos+n : d.pos+n]
	d.pos += n
	return out
}

func (d *decoder) u8() uint8 {
	if b := d.bytes(1); b != nil {
		return b[0]
	}
	return 0
}

func (d *decoder) u16() uint16 {
	if b := d.bytes(2); b != nil {
		return binary.BigEndian.Uint16(b)
	}
	return 0
}

// fileKeys are the keys derived from one data key.
type fileKeys struct {
	payload cipher.AEAD
	header  []byte
}

// deriveKeys derives the payload AEAD and the header MAC key from the data
// key and the header's salt. The caller zeroes dataKey and, when done,
// keys.header. Go's AES key schedule inside the AEAD cannot be zeroed.
func deriveKeys(dataKey, salt []byte) (*fileKeys, error) {
	if len(dataKey) != keyLen {
		return nil, fmt.Errorf("envelope: data key is %d bytes, want %d", len(dataKey), keyLen)
	}
	pk, err := hkdf.Key(sha256.New, dataKey, salt, infoPayload, keyLen)
	if err != nil {
		return nil, err
	}
	defer clear(pk)
	hk, err := hkdf.Key(sha256.New, dataKey, salt, infoHeader, keyLen)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(pk)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &fileKeys{payload: aead, header: hk}, nil
}

// verify checks the header tag with the header key.
func (h *Header) verify(k *fileKeys, aad []byte) error {
	want := h.computeTag(k.header, h.raw[:len(h.raw)-tagLen], aad)
	if !hmac.Equal(want, h.tag) {
		return fmt.Errorf("envelope: header: %w (wrong associated data, modified header, or a wrapped key that is not this file's)", ErrAuth)
	}
	return nil
}

// segmentNonce is the 11-byte big-endian counter then the last-segment flag.
func segmentNonce(nonce *[nonceLen]byte, idx uint64, final bool) {
	clear(nonce[:3])
	binary.BigEndian.PutUint64(nonce[3:11], idx)
	nonce[11] = 0
	if final {
		nonce[11] = 1
	}
}

// clone returns a copy of the header safe to hand out.
func (h *Header) clone() *Header {
	c := *h
	c.raw = bytes.Clone(h.raw)
	c.Salt = bytes.Clone(h.Salt)
	c.Context = bytes.Clone(h.Context)
	c.tag = bytes.Clone(h.tag)
	c.Recipients = append([]Recipient(nil), h.Recipients...)
	return &c
}
