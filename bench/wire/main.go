// Command vault-plugin-wire is the benchmarks' measure of the plugin
// boundary itself: an external Vault plugin that, for an encrypt or decrypt
// batch, only moves the bytes. It receives the request twice as every
// plugin does (Vault's existence check, then the request, each over gRPC
// and TLS), decodes neither body, and answers with a batch answer of the
// load's size and shape written once at start: 1000 items, whatever was
// asked. It serves over hsm-transit's own transport (internal/boundary:
// the same gRPC windows, buffers and codec), so what it costs is the least
// any plugin on that transport can cost for a batch of 1000; make bench
// prints its share of the bound beside the plugin's (cmd/hsm-transit-load).
//
// It is for benchmarks only: its answers are not encryptions of anything.
package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"os"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin/pb"
	"google.golang.org/grpc"

	"github.com/hsm-transit/vault-plugin-secrets-hsm-transit/internal/boundary"
)

// batchItems is the size of every answer: the load tool's batch of 1000.
const batchItems = 1000

// minBody is the size from which a body is a batch (the load's batches of
// 1000 are about 180 KB; a single item is under 300 bytes).
const minBody = 4096

func main() {
	meta := &api.PluginAPIClientMeta{}
	if err := meta.FlagSet().Parse(os.Args[1:]); err != nil {
		fatal(err)
	}
	answers, err := cannedAnswers()
	if err != nil {
		fatal(err)
	}
	logger := hclog.New(&hclog.LoggerOptions{Output: os.Stderr, JSONFormat: true})
	tls := api.VaultPluginTLSProvider(meta.GetTLSConfig())
	if err := boundary.Serve(factory, logger, tls, bytesOnly(answers)); err != nil {
		fatal(err)
	}
}

func fatal(err error) {
	hclog.New(&hclog.LoggerOptions{}).Error("wire plugin", "error", err)
	os.Exit(1)
}

// cannedAnswers are the JSON answers to a batch of batchItems, by
// operation, as transit writes them: 128-byte plaintexts and their
// AES-256-GCM ciphertexts' length (a 12-byte nonce and a 16-byte tag).
func cannedAnswers() (map[string]string, error) {
	random := func(n int) (string, error) {
		b := make([]byte, n)
		if _, err := rand.Read(b); err != nil {
			return "", err
		}
		return base64.StdEncoding.EncodeToString(b), nil
	}
	enc := make([]map[string]interface{}, batchItems)
	dec := make([]map[string]interface{}, batchItems)
	for i := range enc {
		ct, err := random(12 + 128 + 16)
		if err != nil {
			return nil, err
		}
		pt, err := random(128)
		if err != nil {
			return nil, err
		}
		enc[i] = map[string]interface{}{"ciphertext": "vault:v1:" + ct, "key_version": 1}
		dec[i] = map[string]interface{}{"plaintext": pt}
	}
	out := map[string]string{}
	for op, items := range map[string]interface{}{"encrypt/": enc, "decrypt/": dec} {
		b, err := json.Marshal(map[string]interface{}{"batch_results": items})
		if err != nil {
			return nil, err
		}
		out[op] = string(b)
	}
	return out, nil
}

// bytesOnly empties a batch's body before anything decodes it, in the
// existence check and in the request, and puts the canned answer of the
// request's operation in the reply: what is left is gRPC's transport of the
// bytes Vault sends and receives.
func bytesOnly(answers map[string]string) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req interface{}, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (interface{}, error) {
		switch args := req.(type) {
		case *pb.HandleExistenceCheckArgs:
			if args.Request != nil && len(args.Request.Data) >= minBody {
				args.Request.Data = "{}"
			}
		case *pb.HandleRequestArgs:
			r := args.Request
			if r == nil || len(r.Data) < minBody {
				break
			}
			answer, ok := answers[r.Path[:min(len(r.Path), len("encrypt/"))]]
			if !ok {
				break
			}
			r.Data = `{"batch":true}`
			out, err := handler(ctx, req)
			if reply, ok := out.(*pb.HandleRequestReply); ok && err == nil && reply.Err == nil && reply.Response != nil {
				reply.Response.Data = answer
			}
			return out, err
		}
		return handler(ctx, req)
	}
}

func factory(ctx context.Context, conf *logical.BackendConfig) (logical.Backend, error) {
	name := framework.GenericNameRegex("name")
	exists := func(context.Context, *logical.Request, *framework.FieldData) (bool, error) { return true, nil }
	op := func(field string) *framework.Path {
		p := &framework.Path{
			Pattern: field + "/" + name,
			Fields: map[string]*framework.FieldSchema{
				"name":  {Type: framework.TypeString},
				"batch": {Type: framework.TypeBool},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: answer},
			},
		}
		if field == "encrypt" {
			// Like transit's encrypt: Vault asks whether the key exists.
			p.ExistenceCheck = exists
			p.Operations[logical.CreateOperation] = p.Operations[logical.UpdateOperation]
		}
		return p
	}
	b := &framework.Backend{
		BackendType: logical.TypeLogical,
		Paths:       []*framework.Path{op("encrypt"), op("decrypt")},
	}
	if err := b.Setup(ctx, conf); err != nil {
		return nil, err
	}
	return b, nil
}

// answer stands in for the canned answer, which bytesOnly puts in the
// reply; a body that is not a batch is refused.
func answer(_ context.Context, _ *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	if !d.Get("batch").(bool) {
		return logical.ErrorResponse("the wire plugin answers only batches of at least %d bytes", minBody), logical.ErrInvalidRequest
	}
	return &logical.Response{Data: map[string]interface{}{"batch_results": nil}}, nil
}
