// Package boundary is hsm-transit's side of the plugin boundary: the gRPC
// server Vault talks to, and the JSON that crosses it in both directions.
//
// Vault hands each request to an external plugin as a protobuf message whose
// body is a JSON string, and takes the response's data back as a JSON
// string. The SDK decodes the body into a map with encoding/json (twice for a
// write: once for the existence check, once for the request) and encodes the
// response's data with encoding/json, by reflection. For a batch of 1000
// items both were most of the plugin's CPU outside the cryptography (pprof,
// see BENCHMARKS.md). UnaryInterceptor, installed on the plugin's gRPC
// server by Serve, makes both cheaper without changing what a handler sees
// or what Vault and its audit log receive:
//
//   - Requests: a body of 1 KiB or more, nested no deeper than a batch is,
//     is decoded by a faster decoder that gives the same map as encoding/json
//     (TestFastDecodeMatchesStdlib, FuzzFastDecode) and handed to the backend
//     in the context (DecodedBody); the SDK then decodes only "{}". A
//     batch_input that is an array of objects is handed over undecoded, as a
//     RawBatch of RawObjects pointing into the body: the backend reads its
//     items into its own type without a map per item, and the framework's
//     validation does not copy the list item by item (RawBatch says why).
//     Every object has been checked to be valid JSON, and RawObject.Map
//     gives the map encoding/json would have.
//
//   - Responses: a handler that can write its response's data as JSON itself
//     (PreEncode) gives the bytes to the interceptor, which puts them in the
//     reply in place of the small stand-in the SDK encoded. The bytes must be
//     exactly what encoding/json gives for the same data (AppendString
//     writes strings as encoding/json does; the callers' tests compare).
//     They are written in a pooled buffer; the interceptor then returns a
//     pooledReply, and the codec, once the message holds a copy, clears the
//     buffer and puts it back.
//
//   - Existence checks: Vault sends a write's body twice, and the existence
//     check only validates its fields and reads the key's name; it gets
//     batch_input's array empty (existenceDecode).
//
//   - Buffers: gRPC's default buffer pool clears a buffer's whole capacity
//     at each use (a 1 MiB buffer for a 150 KB batch, each way); the server
//     gets a pool by power-of-two class that does not (bufferPool), and a
//     protobuf codec that uses it (codec), since gRPC's own takes the
//     default pool whatever the server is given.
//
//   - Transport: flow-control windows that take a whole batch request, so
//     Vault sends it without waiting for window updates; larger read and
//     write buffers; and calls served by long-lived goroutines
//     (grpc.NumStreamWorkers, 32 of them: Vault sends as many calls at once
//     as it has requests), whose stacks have grown already. Together
//     with the pooled answers, about 7% less plugin CPU per item on
//     batches of 1000 (load tool, three runs against the previous build).
//
// Serve does what the SDK's plugin.ServeMultiplex does, plus the
// interceptor, the buffer pool, the codec and the transport's options,
// which ServeMultiplex has no option for.
//
// # When the SDK is upgraded
//
// TestServeMatchesTheSDK fails when github.com/hashicorp/vault/sdk in go.mod
// is not the version Serve was checked against (sdkChecked) or its
// plugin/serve.go changed. Then re-check, against the new SDK:
//   - plugin/serve.go, ServeMultiplex: protocol versions and plugin sets,
//     multiplexing, logger, mlock, handshake, message size limits, TLS;
//     Serve must do the same;
//   - plugin/grpc_backend_server.go: HandleRequest and HandleExistenceCheck
//     still decode the body with pb.ProtoRequestToLogicalRequest, keep the
//     context's values (pbMetadataCtxToLogicalCtx), and encode the
//     response's data with pb.LogicalResponseToProtoResponse into
//     Response.Data; the method names the interceptor matches
//     (pb.Backend_HandleRequest_FullMethodName and
//     pb.Backend_HandleExistenceCheck_FullMethodName) are unchanged;
//   - plugin/pb/translation.go: the data is still encoded with encoding/json
//     (whose output PreEncode's bytes must equal) and decoded into
//     map[string]interface{};
//   - framework/field_data.go: FieldData.Validate still converts a TypeSlice
//     field with mapstructure's weak decoding, which lifts a value that is
//     not a list (RawBatch) into a list of one; if it refused it, every
//     batch would be refused (the root package's boundary tests would fail);
//   - framework/backend.go, Backend.HandleRequest: the replication state it
//     reads is still used only to forward operations marked
//     ForwardPerformanceStandby or ForwardPerformanceSecondary; the root
//     package caches it for a second (replication.go), which is harmless
//     only while that holds and no operation is marked so
//     (TestNoOperationForwardsByReplicationState checks the marks);
//   - plugin/grpc_system.go: the system view Setup gets
//     (newGRPCSystemViewFromSetupArgs) still has no method beyond
//     logical.SystemView that the framework looks for by a type assertion
//     on Backend.System() (today only GetRandomReader does, for
//     entropy.Sourcer, which the gRPC client lacks): replicationCache
//     embeds logical.SystemView only, so it would hide such a method and
//     the feature behind it would stop without a word;
//
// then update sdkChecked and serveSHA256. When google.golang.org/grpc is
// upgraded, re-check that its proto codec still marshals and unmarshals as
// codec does (TestCodecIsProtobufs compares with proto.Marshal), that
// experimental.BufferPool, ForceServerCodecV2 and NumStreamWorkers still
// exist, and that a unary handler's reply still reaches the codec as the
// interceptor returned it (server.go, processUnaryRPC and sendResponse): a
// pooledReply embeds the reply, so it is a protobuf message too (its
// methods are promoted), but only codec releases its buffer: a reply that
// reached another codec would go out unchanged and its buffer, uncleared,
// be left to the garbage collector, which no test would show (a binary
// log or a stats handler given it after the send sees its Data emptied).
package boundary
