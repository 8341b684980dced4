package envelope

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
)

// The test vectors live in docs/ENVELOPE.md, in ```vector blocks, and this
// test reads them from there: the document and the code cannot drift apart.
// go test ./envelope/ -run TestVectors -args -print-vectors prints the
// blocks as the code computes them.
var printVectors = flag.Bool("print-vectors", false, "print the test vectors computed from the inputs in docs/ENVELOPE.md")

const vectorDoc = "../docs/ENVELOPE.md"

// fixedKS returns one fixed data key, wrapped as fixed strings.
type fixedKS struct {
	dataKey []byte
	wrapped map[string]string // MOUNT/KEY -> wrapped
}

func (f *fixedKS) DataKey(_ context.Context, mount, key string, _ []byte) ([]byte, string, error) {
	return bytes.Clone(f.dataKey), f.wrapped[mount+"/"+key], nil
}

func (f *fixedKS) Wrap(_ context.Context, mount, key string, _, _ []byte) (string, error) {
	return f.wrapped[mount+"/"+key], nil
}

func (f *fixedKS) Unwrap(_ context.Context, mount, key string, _ []byte, wrapped string) ([]byte, error) {
	if f.wrapped[mount+"/"+key] != wrapped {
		return nil, errors.New("unknown wrapped key")
	}
	return bytes.Clone(f.dataKey), nil
}

func (f *fixedKS) Rewrap(context.Context, string, string, []byte, string) (string, error) {
	return "", errors.New("not supported")
}

type vector struct {
	fields map[string]string
	order  []string
}

// readVectors parses the ```vector blocks: "name: value" lines, a value
// continued on lines that start with spaces.
func readVectors(t *testing.T) []vector {
	t.Helper()
	f, err := os.Open(vectorDoc)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []vector
	var cur *vector
	last := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "```vector":
			out = append(out, vector{fields: map[string]string{}})
			cur = &out[len(out)-1]
		case cur != nil && line == "```":
			cur = nil
		case cur != nil && strings.HasPrefix(line, "  "):
			cur.fields[last] += strings.TrimSpace(line)
		case cur != nil:
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				t.Fatalf("vector line %q", line)
			}
			last = k
			cur.fields[k] = strings.TrimSpace(v)
			cur.order = append(cur.order, k)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(out) < 3 {
		t.Fatalf("%d vectors in %s, want at least 3", len(out), vectorDoc)
	}
	return out
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("hex %q: %v", s, err)
	}
	return b
}

// vectorPlaintext is the plaintext field: hex, or "pattern N" for N bytes
// of i mod 251.
func vectorPlaintext(t *testing.T, s string) []byte {
	if n, ok := strings.CutPrefix(s, "pattern "); ok {
		size, err := strconv.Atoi(n)
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, size)
		for i := range b {
			b[i] = byte(i % 251)
		}
		return b
	}
	return unhex(t, s)
}

func wrapHex(s string) string {
	var b strings.Builder
	for len(s) > 64 {
		b.WriteString(s[:64] + "\n  ")
		s = s[64:]
	}
	b.WriteString(s)
	return b.String()
}

func TestVectors(t *testing.T) {
	for _, v := range readVectors(t) {
		f := v.fields
		t.Run(f["name"], func(t *testing.T) {
			dk := unhex(t, f["data_key"])
			ks := &fixedKS{dataKey: dk, wrapped: map[string]string{}}
			var refs []KeyRef
			for _, r := range strings.Split(f["recipients"], " ") {
				name, wrapped, _ := strings.Cut(r, "=")
				ref, err := ParseKeyRef(name)
				if err != nil {
					t.Fatal(err)
				}
				refs = append(refs, ref)
				ks.wrapped[name] = wrapped
			}
			seg, _ := strconv.Atoi(f["segment_size"])
			headroom, _ := strconv.Atoi(f["slot_headroom"])
			pt := vectorPlaintext(t, f["plaintext"])
			opts := WriterOptions{
				KeyService: ks, Recipients: refs, SegmentSize: seg, SlotHeadroom: headroom,
				Context: unhex(t, f["context"]), AAD: unhex(t, f["aad"]),
				Rand: bytes.NewReader(unhex(t, f["salt"])), Concurrency: 2,
			}
			file := encrypt(t, opts, pt)
			h, err := ParseHeader(bytes.NewReader(file))
			if err != nil {
				t.Fatal(err)
			}
			keys, err := deriveKeys(dk, h.Salt)
			if err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(file)
			var tags []string
			body := file[h.HeaderLength:]
			for len(body) > 0 {
				n := min(len(body), seg+gcmTagLen)
				tags = append(tags, hex.EncodeToString(body[n-gcmTagLen:n]))
				body = body[n:]
			}
			pk, err := hkdf.Key(sha256.New, dk, h.Salt, infoPayload, keyLen)
			if err != nil {
				t.Fatal(err)
			}
			computed := map[string]string{
				"payload_key":  hex.EncodeToString(pk),
				"header_key":   hex.EncodeToString(keys.header),
				"header":       hex.EncodeToString(file[:h.HeaderLength]),
				"file_sha256":  hex.EncodeToString(sum[:]),
				"segment_tags": strings.Join(tags, " "),
				"file":         hex.EncodeToString(file),
			}
			if *printVectors {
				fmt.Println("```vector")
				for _, k := range v.order {
					if k == "segment_tags" {
						fmt.Printf("%s: %s\n", k, strings.ReplaceAll(computed[k], " ", "\n  "))
					} else if c, ok := computed[k]; ok {
						fmt.Printf("%s: %s\n", k, wrapHex(c))
					} else {
						fmt.Println(strings.TrimSpace(k + ": " + f[k]))
					}
				}
				fmt.Println("```")
			}
			checked := 0
			for k, c := range computed {
				want, ok := f[k]
				if !ok {
					continue
				}
				checked++
				if strings.ReplaceAll(want, " ", "") != strings.ReplaceAll(c, " ", "") {
					t.Errorf("%s:\n got  %s\n want %s", k, c, want)
				}
			}
			if checked < 3 {
				t.Fatalf("vector checks only %d outputs", checked)
			}
			// And the documented file decrypts to the documented plaintext.
			docFile := file
			if s, ok := f["file"]; ok {
				docFile = unhex(t, s)
			}
			got, err := decrypt(docFile, ReaderOptions{KeyService: ks, AAD: opts.AAD})
			if err != nil || !bytes.Equal(got, pt) {
				t.Fatalf("decrypting the vector: %v", err)
			}
		})
	}
}
