package envelope

import (
	"errors"
	"fmt"
)

// Sentinel errors, to be matched with errors.Is. Every error this package
// returns about a file wraps exactly one of ErrFormat, ErrAuth, ErrTruncated,
// ErrUnwrap or ErrSlotFull, so a command-line tool can map it to an exit code;
// the context's errors (cancellation) and those of the underlying reader or
// writer come as they are.
// The message around the sentinel names what failed ("envelope: segment 17:
// authentication failed"); it never contains key material or plaintext.
var (
	// ErrFormat: the bytes are not a v1 envelope file (bad magic, unknown
	// version, a field out of its bounds, non-zero slot padding, data after the
	// final segment).
	ErrFormat = errors.New("malformed envelope")
	// ErrAuth: a header tag or a segment failed authentication: the file was
	// modified, the associated data is not the one used to encrypt, or the
	// wrapped data key unwrapped to a key other than the file's.
	ErrAuth = errors.New("authentication failed")
	// ErrTruncated: the file ends before its final segment (or inside its header).
	ErrTruncated = errors.New("truncated")
	// ErrUnwrap: no recipient's wrapped data key could be unwrapped (each
	// key service error is joined in the returned error).
	ErrUnwrap = errors.New("no recipient could unwrap the data key")
	// ErrSlotFull: rewrap produced a wrapped key longer than its reserved slot.
	ErrSlotFull = errors.New("wrapped key does not fit its reserved slot")
)

func formatErr(format string, args ...any) error {
	return fmt.Errorf("envelope: header: "+format+": %w", append(args, ErrFormat)...)
}

func segmentErr(idx uint64, kind error, what string) error {
	if what == "" {
		return fmt.Errorf("envelope: segment %d: %w", idx, kind)
	}
	return fmt.Errorf("envelope: segment %d: %s: %w", idx, what, kind)
}
