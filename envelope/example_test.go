package envelope_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"

	"github.com/hashicorp/vault/api"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/envelope"
)

// Encrypt a stream to two transit keys, then decrypt it. With a real Vault,
// the key service is envelope.NewVaultKeyService(client).
func Example() {
	ctx := context.Background()
	client, err := api.NewClient(api.DefaultConfig()) // VAULT_ADDR, VAULT_TOKEN
	if err != nil {
		log.Fatal(err)
	}
	ks := envelope.NewVaultKeyService(client)

	var file bytes.Buffer
	w, err := envelope.NewWriter(ctx, &file, envelope.WriterOptions{
		KeyService: ks,
		Recipients: []envelope.KeyRef{{Mount: "transit", Key: "backups"}, {Mount: "dr/transit", Key: "backups"}},
		AAD:        []byte("backup 2026-11-30"),
	})
	if err != nil {
		log.Fatal(err)
	}
	if _, err := io.WriteString(w, "a large backup"); err != nil {
		log.Fatal(err)
	}
	if err := w.Close(); err != nil { // writes the final segment
		log.Fatal(err)
	}

	r, err := envelope.NewReader(ctx, &file, envelope.ReaderOptions{KeyService: ks, AAD: []byte("backup 2026-11-30")})
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()
	plaintext, err := io.ReadAll(r) // any error: discard what was read
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(plaintext))
}
