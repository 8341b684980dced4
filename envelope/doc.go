// Package envelope reads and writes hsm-transit envelope files: streaming
// encryption of data of any size under a data key that a Vault transit key
// (built-in transit or hsm-transit, whose keys an HSM seals) wraps. Only the
// wrapped data key goes to Vault; the data stays on the client. The format is
// specified, with test vectors, in docs/ENVELOPE.md.
//
// A file is a header (format version, segment size, salt, derivation
// context, one or more recipients each holding the data key wrapped by one
// transit key in a slot with reserved room, and an HMAC-SHA256 tag) followed
// by segments of AES-256-GCM in the STREAM construction. HKDF-SHA256 derives
// the payload key and the header key from the data key.
//
// # Operations
//
//   - NewWriter encrypts a stream: one Vault request per recipient.
//   - NewReader decrypts a stream: one Vault request when the first
//     recipient can unwrap.
//   - NewReaderAt decrypts any range of a file, reading only its segments.
//   - ParseHeader reads the header without any key (for inspection).
//   - Rewrap moves the wrapped keys to the latest key versions in place, in
//     time independent of the file size, with rewrap rights only.
//
// The Vault access sits behind the KeyService interface; VaultKeyService
// implements it over an *api.Client.
//
// # Concurrency and memory
//
// Segments are independent, so Writer and Reader seal and open them on a
// pool of goroutines (WriterOptions.Concurrency, ReaderOptions.Concurrency,
// GOMAXPROCS by default). One goroutine feeds segments in order and one
// consumer takes the results in order; at most 2×Concurrency segments are in
// flight, so memory is bounded by the concurrency and the segment size, not
// by the size of the data. A Writer must be closed; a Reader should be closed
// if it is abandoned before the end.
//
// # Errors
//
// Errors wrap ErrFormat, ErrAuth, ErrTruncated, ErrUnwrap or ErrSlotFull (use
// errors.Is), or a key service error (for Vault, an *api.ResponseError: use
// errors.As). Messages name the part that failed ("envelope: segment 17:
// authentication failed") and never carry key material or plaintext.
//
// A Reader returns the plaintext of each segment once it has authenticated,
// and fails (never io.EOF) if the stream is truncated or has data after its
// final segment. Because plaintext is released as it is verified, a caller
// that reads to the end and gets an error must discard what it read.
//
// # Secrets in memory
//
// The package's own copies of the data key and the header key are zeroed as
// soon as they are no longer needed, and the buffers of plaintext are
// cleared before reuse. Copies it does not own cannot be: the AES key
// schedule inside Go's AES-GCM (it lives as long as the Writer or Reader),
// and, in VaultKeyService, the base64 text of the data key in the request
// and response bodies of the Vault API client.
package envelope
