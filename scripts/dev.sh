#!/usr/bin/env bash
# Development Vault for hsm-transit: a dev server on 127.0.0.1:8200 with the
# plugin registered, enabled at transit/ and sealed by a SoftHSM2 token.
#
#   scripts/dev.sh start   start (or refresh) the dev server; safe to run twice
#   scripts/dev.sh stop    stop it
#
# Everything lives in .dev/ at the repository root.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dev="$root/.dev"
plugin_name=vault-plugin-secrets-hsm-transit
addr=${HSM_TRANSIT_DEV_ADDR:-127.0.0.1:8200}
export VAULT_ADDR="http://$addr"
export VAULT_TOKEN=root

log() { printf '==> %s\n' "$*" >&2; }

token_label=hsm-transit-dev
kek_label=hsm-transit-kek
export SOFTHSM2_CONF="$dev/softhsm/softhsm2.conf"

# ensure_softhsm installs SoftHSM2 and opensc when missing and makes the dev
# token in .dev/softhsm, with its PIN in .dev/softhsm/pin.
ensure_softhsm() {
	if ! command -v softhsm2-util >/dev/null 2>&1 || ! command -v pkcs11-tool >/dev/null 2>&1; then
		log "installing softhsm2 and opensc"
		local sudo=""
		[ "$(id -u)" -eq 0 ] || sudo=sudo
		$sudo apt-get update -qq >&2
		DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq softhsm2 opensc >&2
	fi
	mkdir -p "$dev/softhsm/tokens"
	chmod 700 "$dev/softhsm"
	if [ ! -f "$SOFTHSM2_CONF" ]; then
		printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
			"$dev/softhsm/tokens" >"$SOFTHSM2_CONF"
	fi
	if [ ! -f "$dev/softhsm/pin" ]; then
		(umask 077 && head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dev/softhsm/pin")
	fi
	if ! softhsm2-util --show-slots 2>/dev/null | grep -q "Label:.*$token_label"; then
		log "creating the SoftHSM2 token $token_label in $dev/softhsm"
		softhsm2-util --init-token --free --label "$token_label" \
			--pin "$(cat "$dev/softhsm/pin")" --so-pin "$(cat "$dev/softhsm/pin")-so" >/dev/null
	fi
}

softhsm_library() {
	for p in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
		/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so; do
		if [ -f "$p" ]; then
			echo "$p"
			return
		fi
	done
	log "SoftHSM2's library is not installed"
	exit 1
}

# pick_vault prints a vault binary: one on the PATH if it is 1.21 or newer,
# else the pinned build in bin/ (built once).
pick_vault() {
	if command -v vault >/dev/null 2>&1; then
		local v
		v=$(vault version 2>/dev/null | sed -n 's/^Vault v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
		if [ -n "$v" ]; then
			set -- $v
			if [ "$1" -gt 1 ] || { [ "$1" -eq 1 ] && [ "$2" -ge 21 ]; }; then
				command -v vault
				return
			fi
		fi
	fi
	if [ ! -x "$root/bin/vault" ]; then
		log "building the pinned Vault v1.21.0 into bin/vault (once; several minutes)"
		make -C "$root" vault >&2
	fi
	echo "$root/bin/vault"
}

plugin_version() {
	sed -n 's/^var Version = "\(.*\)"/\1/p' "$root/version.go"
}

running() {
	[ -f "$dev/vault.pid" ] && kill -0 "$(cat "$dev/vault.pid")" 2>/dev/null
}

start() {
	mkdir -p "$dev/plugins"
	ensure_softhsm
	local vault version sum
	vault=$(pick_vault)
	version=$(plugin_version)
	log "building the plugin ($version)"
	make -C "$root" build >&2
	cp "$root/bin/$plugin_name" "$dev/plugins/$plugin_name.new"
	mv -f "$dev/plugins/$plugin_name.new" "$dev/plugins/$plugin_name"
	sum=$(sha256sum "$dev/plugins/$plugin_name" | cut -d' ' -f1)

	if running; then
		log "dev Vault already running (pid $(cat "$dev/vault.pid")); refreshing the plugin"
	else
		cat >"$dev/vault.hcl" <<EOF
plugin_directory = "$dev/plugins"
disable_mlock    = true
EOF
		log "starting $("$vault" version) on $addr"
		nohup "$vault" server -dev -dev-root-token-id=root -dev-listen-address="$addr" \
			-config="$dev/vault.hcl" >"$dev/vault.log" 2>&1 &
		echo $! >"$dev/vault.pid"
		for _ in $(seq 1 100); do
			if "$vault" status >/dev/null 2>&1; then break; fi
			if ! running; then
				log "Vault exited; see $dev/vault.log"
				tail -20 "$dev/vault.log" >&2
				exit 1
			fi
			sleep 0.2
		done
	fi

	# The PIN file is the one PIN source this registration allows.
	"$vault" plugin register -sha256="$sum" -version="$version" -command="$plugin_name" \
		-env="HSM_TRANSIT_PIN_FILES=$dev/softhsm/pin" secret "$plugin_name" >/dev/null
	if "$vault" read sys/mounts/transit >/dev/null 2>&1; then
		"$vault" secrets tune -plugin-version="$version" transit/ >/dev/null
		"$vault" write sys/plugins/reload/backend mounts=transit/ >/dev/null
	else
		"$vault" secrets enable -path=transit -plugin-version="$version" "$plugin_name" >/dev/null
	fi
	log "hsm-transit $version enabled at transit/"
	if ! "$vault" read transit/config/seal >/dev/null 2>&1; then
		"$vault" write transit/config/seal library="$(softhsm_library)" token_label="$token_label" \
			pin="file://$dev/softhsm/pin" key_label="$kek_label" generate_key=true >/dev/null
		log "sealed by SoftHSM2 token $token_label, KEK $kek_label"
	fi
	"$vault" read transit/seal/status >&2

	cat <<EOF

Dev Vault is up. In your shell:

  export VAULT_ADDR=$VAULT_ADDR VAULT_TOKEN=root
  export PATH="$(dirname "$vault"):\$PATH"

Try it:

  vault write -f transit/keys/orders
  vault write transit/encrypt/orders plaintext=\$(echo -n "card 4111" | base64)
  vault write transit/decrypt/orders ciphertext=vault:v1:...   # the ciphertext from above
  vault write -f transit/datakey/plaintext/orders
  vault write -f transit/keys/orders/rotate

  vault read transit/seal/status                            # sealed by SoftHSM2
  pkcs11-tool --module $(softhsm_library) --token-label $token_label \\
      --login --pin \$(cat $dev/softhsm/pin) --list-objects --type secrkey

Logs: $dev/vault.log    Stop: make dev-stop
EOF
}

stop() {
	if running; then
		kill "$(cat "$dev/vault.pid")"
		for _ in $(seq 1 50); do running || break; sleep 0.2; done
		log "dev Vault stopped"
	else
		log "no dev Vault running"
	fi
	rm -f "$dev/vault.pid"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*)
	echo "usage: $0 start|stop" >&2
	exit 2
	;;
esac
