package hsm

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

const (
	// maxTokenLabel is the size of CK_TOKEN_INFO.label: a longer label
	// can match no token.
	maxTokenLabel = 32
	// maxKeyLabel bounds key labels: they are stored in the token and
	// sent to it with every lookup.
	maxKeyLabel = 128
)

// CheckTokenLabel refuses a token label no token can carry: empty, longer
// than 32 bytes, not UTF-8, with control characters, or ending with a space
// (labels are blank-padded, so trailing blanks are not part of one).
func CheckTokenLabel(label string) error {
	if err := checkLabel(label, maxTokenLabel, unicode.IsControl); err != nil {
		return newError(Configuration, "check token label", fmt.Errorf("token label: %w", err))
	}
	if strings.HasSuffix(label, " ") {
		return newError(Configuration, "check token label", errors.New("token label: must not end with a space (tokens pad their labels with spaces)"))
	}
	return nil
}

// CheckKeyLabel refuses a key label that is empty, longer than 128 bytes,
// not UTF-8, or has characters that are not printable.
func CheckKeyLabel(label string) error {
	err := checkLabel(label, maxKeyLabel, notPrintable)
	if err != nil {
		return newError(Configuration, "check key label", fmt.Errorf("key label: %w", err))
	}
	return nil
}

// notPrintable is true of the runes key labels must not have.
func notPrintable(r rune) bool {
	return !unicode.IsPrint(r)
}

// checkLabel says what is wrong with label, never quoting more than its
// start: a label may be a megabyte long.
func checkLabel(label string, max int, bad func(rune) bool) error {
	if label == "" {
		return errors.New("is required")
	}
	if len(label) > max {
		return fmt.Errorf("is %d bytes long; use at most %d bytes", len(label), max)
	}
	if !utf8.ValidString(label) {
		return errors.New("is not valid UTF-8")
	}
	for i, r := range label {
		if r == 0 || bad(r) {
			return fmt.Errorf("has the character %U at byte %d; use printable characters only", r, i)
		}
	}
	return nil
}
