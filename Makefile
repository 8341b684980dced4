# hsm-transit: a Vault secrets engine with transit's API, sealed by a PKCS#11 HSM.

PLUGIN      := vault-plugin-secrets-hsm-transit
BIN         := $(CURDIR)/bin
VAULT       := $(BIN)/vault
GOFILES     := $(shell git ls-files '*.go' 2>/dev/null)
TEST_FLAGS  ?= -race -count=1
E2E_TIMEOUT ?= 30m

.PHONY: default
default: build

.PHONY: build
build: $(BIN)/$(PLUGIN) $(BIN)/hsm-transit

.PHONY: $(BIN)/$(PLUGIN)
$(BIN)/$(PLUGIN):
	CGO_ENABLED=1 go build -trimpath -o $@ ./plugin

# The client-side envelope CLI (cmd/hsm-transit): pure Go, no cgo.
.PHONY: $(BIN)/hsm-transit
$(BIN)/hsm-transit:
	CGO_ENABLED=0 go build -trimpath -o $@ ./cmd/hsm-transit

# The pinned Vault server, built once from the Go module proxy (tools/vault)
# and reused; delete bin/vault to rebuild.
.PHONY: vault
vault: $(VAULT)

$(VAULT):
	mkdir -p $(BIN)
	cd tools/vault && CGO_ENABLED=1 go build -mod=mod -trimpath -ldflags '-s -w' -o $(VAULT) github.com/hashicorp/vault

# test is the README's test command: unit tests, then end-to-end tests
# against a real Vault and a real SoftHSM2 token.
.PHONY: test
test: test-unit test-e2e

.PHONY: test-unit
test-unit:
	go test $(TEST_FLAGS) $$(go list ./... | grep -v /e2e)

# End-to-end tests start their own Vault servers on free loopback ports.
.PHONY: test-e2e
test-e2e: build vault
	HSM_TRANSIT_VAULT=$(VAULT) HSM_TRANSIT_PLUGIN=$(BIN)/$(PLUGIN) \
		go test -count=1 -timeout $(E2E_TIMEOUT) -v ./e2e/

# fuzz runs each Go fuzz target for FUZZ_TIME, then the end-to-end
# black-box fuzz test (both mounts of one Vault) for FUZZ_DURATION; make
# test runs the targets on their seeds and the e2e test for 40 s.
FUZZ_TIME     ?= 30s
FUZZ_DURATION ?= 5m

.PHONY: fuzz
fuzz: build vault
	for t in FuzzCheckBackup FuzzStrictInt FuzzStrictBool FuzzParseCiphertext FuzzDecodeBatchInput FuzzWireItems; do \
		go test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZ_TIME) . || exit 1; done
	for t in FuzzStoredEntry FuzzManifestPieces; do \
		go test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZ_TIME) ./seal/ || exit 1; done
	for t in FuzzFastDecode FuzzAppendString; do \
		go test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZ_TIME) ./internal/boundary/ || exit 1; done
	HSM_TRANSIT_FUZZ_DURATION=$(FUZZ_DURATION) HSM_TRANSIT_VAULT=$(VAULT) HSM_TRANSIT_PLUGIN=$(BIN)/$(PLUGIN) \
		go test -count=1 -timeout 60m -v -run TestBlackBoxFuzz ./e2e/

.PHONY: fmt
fmt:
	gofmt -w $(GOFILES)

.PHONY: fmt-check
fmt-check:
	@out=$$(gofmt -l $(GOFILES)); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

.PHONY: vet
vet:
	go vet ./...

.PHONY: dev
dev:
	./scripts/dev.sh start

.PHONY: dev-stop
dev-stop:
	./scripts/dev.sh stop

.PHONY: clean
clean:
	rm -f $(BIN)/$(PLUGIN)

# bench builds the plugin, the floor plugin, the wire plugin (batches only)
# and the load tool, then runs the load against built-in transit, the floor,
# the wire plugin and the plugin on one Vault.
.PHONY: bench
bench: build vault
	go build -o $(BIN)/vault-plugin-floor ./bench/floor
	go build -o $(BIN)/vault-plugin-wire ./bench/wire
	go run ./cmd/hsm-transit-load -vault $(VAULT) -plugin $(BIN)/$(PLUGIN) -floor $(BIN)/vault-plugin-floor -wire $(BIN)/vault-plugin-wire $(BENCH_FLAGS)

# bench-envelope measures the envelope CLI against age (Debian package age)
# and against the plugin's transit/encrypt in batches, 3 interleaved rounds
# of 1 GiB through pipes, then its peak memory on 1 MiB, 1 GiB and 10 GiB
# (BENCHMARKS.md, "Envelope encryption (issue 17)"). Not part of make test.
.PHONY: bench-envelope
bench-envelope: build vault
	@command -v age >/dev/null && test -x /usr/bin/time || { echo "bench-envelope needs age and GNU time: apt-get install -y age time"; exit 1; }
	go run ./bench/envelope -vault $(VAULT) -plugin $(BIN)/$(PLUGIN) -cli $(BIN)/hsm-transit $(BENCH_ENVELOPE_FLAGS)

# bench-go runs the in-process Go benchmarks.
.PHONY: bench-go
bench-go:
	go test -run '^$$' -bench . -benchtime 2s .

# test-matrix runs the end-to-end suite against another Vault: a binary you
# have (VAULT_MATRIX_BIN=/path/to/vault, e.g. a release from
# releases.hashicorp.com), or else release VAULT_MATRIX built once from the
# Go module proxy into bin/vault-$(VAULT_MATRIX) (its own module under bin/,
# as tools/vault is for the pinned one). Not part of make test. Built from
# the proxy, a release only builds when its tree's sdk/ equals a published
# github.com/hashicorp/vault/sdk version (Vault's go.mod replaces sdk and
# api by its own directories, which a dependency build ignores): of those
# tried, v1.19.0 (sdk v0.15.2) and v1.21.0 (v0.20.0) build; v1.20.0,
# v1.20.4 (sdk v0.18.0 too old, v0.19.0 too new), v1.21.2 (v0.20.0 too old)
# and v1.21.4 (v0.21.0 too new) do not. The first build takes 40 minutes on
# 2 busy cores.
VAULT_MATRIX     ?= v1.19.0
VAULT_MATRIX_BIN ?= $(BIN)/vault-$(VAULT_MATRIX)

.PHONY: test-matrix
test-matrix: build $(VAULT_MATRIX_BIN)
	$(VAULT_MATRIX_BIN) version
	HSM_TRANSIT_VAULT=$(VAULT_MATRIX_BIN) HSM_TRANSIT_PLUGIN=$(BIN)/$(PLUGIN) \
		go test -count=1 -timeout $(E2E_TIMEOUT) -v ./e2e/

$(BIN)/vault-$(VAULT_MATRIX):
	mkdir -p $(BIN)/matrix-$(VAULT_MATRIX)
	cp tools/vault/tools.go $(BIN)/matrix-$(VAULT_MATRIX)/
	# The checksum database behind this machine's module proxy does not
	# answer for some of Vault's plugin modules (404): this throwaway test
	# build skips it (GOSUMDB=off); the pinned tools/vault has its go.sum.
	cd $(BIN)/matrix-$(VAULT_MATRIX) && rm -f go.mod go.sum && \
		go mod init hsm-transit-vault-matrix && \
		GOSUMDB=off go get github.com/hashicorp/vault@$(VAULT_MATRIX) && \
		GOSUMDB=off CGO_ENABLED=1 go build -mod=mod -trimpath -ldflags '-s -w' -o $(BIN)/vault-$(VAULT_MATRIX) github.com/hashicorp/vault

# mutation runs gremlins (pinned) on seal/ and hsm/ with the thresholds of
# issue 15, then on the root package's lines changed since MUTATION_DIFF
# (gremlins --diff: git diff --merge-base; nothing to test on a clean main).
# Not part of make test: hsm/ alone takes most of an hour on 2 cores.
# Tests run with -short (GOFLAGS), where the slowest take fewer rounds.
# gremlins' --test-cpu is not used: v0.6.0 passes "-cpu N" to go test as
# one argument, which fails every run and so reports every mutant killed.
# A threshold must be exceeded, not met (gremlins compares with <=).
GREMLINS         := $(shell go env GOPATH)/bin/gremlins
GREMLINS_VERSION := v0.6.0
MUTATION_DIFF    ?= main
MUTATION_FLAGS   ?= --workers 2 --timeout-coefficient 10 --threshold-efficacy 95 --threshold-mcover 95

.PHONY: mutation
mutation:
	@go version -m $(GREMLINS) 2>/dev/null | grep -qP '^\s+mod\s+github.com/go-gremlins/gremlins\s+$(GREMLINS_VERSION)\s' || \
		go install github.com/go-gremlins/gremlins/cmd/gremlins@$(GREMLINS_VERSION)
	GOFLAGS=-short $(GREMLINS) unleash ./seal $(MUTATION_FLAGS)
	GOFLAGS=-short $(GREMLINS) unleash ./hsm $(MUTATION_FLAGS)
	GOFLAGS=-short $(GREMLINS) unleash ./internal/boundary $(MUTATION_FLAGS) -E '^boundarytest/'
	GOFLAGS=-short $(GREMLINS) unleash ./internal/hsmkey $(MUTATION_FLAGS)
	GOFLAGS=-short $(GREMLINS) unleash . --diff $(MUTATION_DIFF) $(MUTATION_FLAGS) \
		-E '^(seal|hsm|e2e|internal|cmd|bench|plugin|tools|scripts)/'

# soak runs the cluster for SOAK_DURATION at about 70% of its measured
# capacity, with root-key and key rotations every 10 s and a step-down of
# the active node every 2 minutes (e2e TestSoak; not part of make test).
SOAK_DURATION ?= 10m

.PHONY: soak
soak: build vault
	HSM_TRANSIT_SOAK_DURATION=$(SOAK_DURATION) HSM_TRANSIT_VAULT=$(VAULT) HSM_TRANSIT_PLUGIN=$(BIN)/$(PLUGIN) \
		go test -count=1 -timeout 60m -v -run TestSoak ./e2e/
