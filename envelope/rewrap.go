package envelope

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
)

// ReadWriterAt is a file that can be rewritten in place, such as *os.File.
type ReadWriterAt interface {
	io.ReaderAt
	io.WriterAt
}

// Rewrap rewraps every recipient's data key under the latest version of its
// transit key (one transit/rewrap call per recipient) and writes the new
// wrapped keys into their reserved slots with a single WriteAt of the header.
// The body is never read nor written, so the cost does not depend on the file
// size. It returns whether anything changed.
//
// Rewrap never sees the data key and so cannot check the header tag; it does
// not need to, because the tag does not cover the slots: a correct rewrap
// keeps the file valid, and a wrong one is caught by the next reader. If any
// new key does not fit its slot, nothing is written and the error wraps
// ErrSlotFull; re-encrypt the file to get bigger slots.
func Rewrap(ctx context.Context, f ReadWriterAt, ks KeyService) (changed bool, err error) {
	h, err := ParseHeader(io.NewSectionReader(f, 0, maxHeaderLen))
	if err != nil {
		return false, err
	}
	raw := bytes.Clone(h.raw)
	for i, r := range h.Recipients {
		nw, err := ks.Rewrap(ctx, r.Mount, r.Key, h.Context, r.Wrapped)
		if err != nil {
			return false, fmt.Errorf("envelope: rewrap recipient %d (%s/%s): %w", i, r.Mount, r.Key, err)
		}
		if err := checkWrapped(nw); err != nil {
			return false, fmt.Errorf("envelope: rewrap recipient %d (%s/%s): %v: %w", i, r.Mount, r.Key, err, ErrFormat)
		}
		if nw == r.Wrapped {
			continue
		}
		if len(nw) > r.SlotCapacity {
			return false, fmt.Errorf("envelope: rewrap recipient %d (%s/%s): new wrapped key is %d bytes, slot holds %d: %w",
				i, r.Mount, r.Key, len(nw), r.SlotCapacity, ErrSlotFull)
		}
		binary.BigEndian.PutUint16(raw[r.lenOff:], uint16(len(nw)))
		slot := raw[r.lenOff+2 : r.lenOff+2+r.SlotCapacity]
		clear(slot)
		copy(slot, nw)
		changed = true
	}
	if !changed {
		return false, nil
	}
	if _, err := f.WriteAt(raw, 0); err != nil {
		return false, fmt.Errorf("envelope: writing the rewrapped header: %w", err)
	}
	return true, nil
}
