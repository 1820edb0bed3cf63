#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Conformance check of ember's Firecracker-compatible API against Firecracker's own swagger
# file (tests/firecracker-api/README.md says which one, and where it comes from), with
# schemathesis (PyPI). scripts/test-all.sh runs it; it works with no tty and no stdin.
#
#   1. schemathesis, pinned, in a virtual environment under ~/.cache/ember (installed once;
#      python3 and python3-venv from apt if missing: needs root or sudo then);
#   2. the swagger file, pinned by commit and SHA-256 (downloaded once into the cache);
#   3. pre-boot phase: `ember run --api-sock`, configured (a drive, a NIC, vsock, entropy)
#      but not started;
#   4. post-boot phase: a fresh ember configured and started with a tiny guest (a kernel that
#      halts in a loop) through the API, then the same checks against the running VM
#      (skipped, with a note, where /dev/kvm is missing);
#   each phase: every operation of the swagger file, generated valid and invalid requests,
#   checked for server errors (no 5xx), status codes, Content-Type and response bodies
#   against the schema, and for schema-violating requests that are accepted. Any failure
#   fails the script. Then ember must still answer GET / and must not have panicked.
#
# Settings (environment): EMBER_BIN (default: cargo build, target/debug/ember),
# EMBER_CONFORM_EXAMPLES (test cases per operation and mode, default 25),
# EMBER_CONFORM_SEED (default 1: CI runs are reproducible; give another to explore),
# EMBER_FIRECRACKER_SWAGGER (a local copy of the pinned file, checked by its SHA-256).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
HERE=$ROOT/tests/firecracker-api

log() { printf '==> api-conformance: %s\n' "$*" >&2; }
die() { printf 'api-conformance: error: %s\n' "$*" >&2; exit 1; }

SCHEMATHESIS_VERSION=4.32.5
# Firecracker v1.17.0-dev, the commit ../shared/peers/firecracker was built from.
FC_COMMIT=81b38b9dad6056d7a48073e95ac5a9aed51cb2ab
FC_SWAGGER_SHA256=47cd2801deb84b4fc38b9dcc85fce494b1f93074caf377dfc59cb7d410fb00f9
FC_SWAGGER_URL=https://raw.githubusercontent.com/firecracker-microvm/firecracker/$FC_COMMIT/src/firecracker/swagger/firecracker.yaml
EXAMPLES=${EMBER_CONFORM_EXAMPLES:-25}
SEED=${EMBER_CONFORM_SEED:-1}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/ember
VENV=$CACHE/venv-schemathesis

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi

# 1. schemathesis.
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q " $SCHEMATHESIS_VERSION\$"; then
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        log "installing python3 and python3-venv (apt)"
        $SUDO apt-get update -q
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
            python3 python3-venv
    fi
    log "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
PY=$VENV/bin/python3

# 2. The swagger file.
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$FC_SWAGGER_SHA256" ]; }
SPEC=$CACHE/firecracker-api/firecracker-$FC_COMMIT.yaml
for candidate in "${EMBER_FIRECRACKER_SWAGGER:-}" "$HERE/firecracker.yaml"; do
    if [ -n "$candidate" ] && [ -f "$candidate" ]; then
        sha_ok "$candidate" || die "$candidate is not Firecracker's firecracker.yaml at $FC_COMMIT (SHA-256 $FC_SWAGGER_SHA256)"
        SPEC=$candidate
        break
    fi
done
if ! sha_ok "$SPEC"; then
    log "downloading Firecracker's swagger file ($FC_COMMIT)"
    mkdir -p "$(dirname "$SPEC")"
    if ! "$PY" "$HERE/conform_util.py" fetch "$FC_SWAGGER_URL" "$SPEC" "$FC_SWAGGER_SHA256"; then
        # The file is Firecracker's and is not kept in this repository: without it (no
        # access to GitHub) there is nothing to check against. EMBER_CONFORM_REQUIRED=1 makes
        # that an error.
        msg="cannot download $FC_SWAGGER_URL: put that file at $SPEC, or name a copy with EMBER_FIRECRACKER_SWAGGER"
        [ "${EMBER_CONFORM_REQUIRED:-0}" = 1 ] && die "$msg"
        log "SKIPPED: $msg"
        exit 0
    fi
fi

# ember.
if [ -z "${EMBER_BIN:-}" ]; then
    log "building ember"
    cargo build --quiet --bin ember
    EMBER_BIN=$ROOT/target/debug/ember
fi
[ -x "$EMBER_BIN" ] || die "EMBER_BIN $EMBER_BIN is not an executable"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ember-conformance.XXXXXX")
PIDS=()
PASSED=0
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "$PASSED" -eq 1 ]; then rm -rf "$WORK"; else log "kept for inspection: $WORK"; fi
}
trap cleanup EXIT

util() { "$PY" "$HERE/conform_util.py" "$@"; }

# Starts ember (cwd: the phase's scratch directory) and the TCP bridge; sets SOCK, PORT,
# EMBER_PID, EMBER_LOG.
start_ember() {
    local phase=$1
    mkdir -p "$WORK/$phase/scratch"
    SOCK=$WORK/$phase/api.sock
    EMBER_LOG=$WORK/$phase/ember.log
    (cd "$WORK/$phase/scratch" && exec "$EMBER_BIN" run --api-sock "$SOCK" --id conformance) \
        </dev/null >"$EMBER_LOG" 2>&1 &
    EMBER_PID=$!
    PIDS+=("$EMBER_PID")
    "$PY" "$HERE/bridge.py" "$SOCK" "$WORK/$phase/port" 2>"$WORK/$phase/bridge.log" &
    PIDS+=("$!")
    for _ in $(seq 300); do
        [ -S "$SOCK" ] && [ -s "$WORK/$phase/port" ] && break
        kill -0 "$EMBER_PID" 2>/dev/null || { cat "$EMBER_LOG" >&2; die "ember exited at start"; }
        sleep 0.1
    done
    [ -S "$SOCK" ] && [ -s "$WORK/$phase/port" ] || die "ember's socket or the bridge did not come up"
    PORT=$(cat "$WORK/$phase/port")
}

# Runs schemathesis against the running ember; then ember must still be up and answering.
check() {
    local phase=$1
    log "$phase: schemathesis, $EXAMPLES cases per operation and mode, seed $SEED"
    local rc=0
    (cd "$WORK/$phase" && EMBER_CONFORM_SCRATCH=$WORK/$phase/scratch SCHEMATHESIS_HOOKS=hooks \
        PYTHONPATH=$HERE "$VENV/bin/schemathesis" run "$SPEC" \
        --url "http://127.0.0.1:$PORT" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection \
        --phases examples,coverage,fuzzing --mode all \
        --max-examples "$EXAMPLES" --seed "$SEED" --workers 1 --request-timeout 60 \
        --no-color --output-truncate true --suppress-health-check all) || rc=$?
    kill -0 "$EMBER_PID" 2>/dev/null || { cat "$EMBER_LOG" >&2; die "$phase: ember exited"; }
    util call "$SOCK" GET / - 200 >&2 || die "$phase: ember does not answer GET / any more"
    if grep -n "panicked" "$EMBER_LOG" >&2; then die "$phase: ember panicked"; fi
    [ "$rc" -eq 0 ] || die "$phase: schemathesis found non-conformances (above); ember's log: $EMBER_LOG"
}

# Configures one of each device (so that GET /vm/config answers carry drives, rate limiters,
# vsock and entropy for the schema check), with KERNEL as the boot source.
configure() {
    local phase=$1 kernel=$2 d=$WORK/$1
    log "$phase: configuring a microVM through the API"
    truncate -s 1M "$d/disk.img"
    util call "$SOCK" PUT /boot-source "{\"kernel_image_path\": \"$kernel\", \"boot_args\": \"console=ttyS0\"}" 204 >&2
    util call "$SOCK" PUT /machine-config '{"vcpu_count": 1, "mem_size_mib": 16}' 204 >&2
    util call "$SOCK" PUT /drives/rootfs "{\"drive_id\": \"rootfs\", \"path_on_host\": \"$d/disk.img\", \"is_root_device\": true, \"is_read_only\": false, \"rate_limiter\": {\"bandwidth\": {\"size\": 1048576, \"refill_time\": 100}, \"ops\": {\"size\": 100, \"one_time_burst\": 10, \"refill_time\": 1000}}}" 204 >&2
    util call "$SOCK" PUT /vsock "{\"guest_cid\": 3, \"uds_path\": \"$d/vsock.sock\"}" 204 >&2
    util call "$SOCK" PUT /entropy '{"rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100}}}' 204 >&2
}

# Pre-boot: the boot source is not a kernel, so that a generated InstanceStart fails (400)
# and the phase stays before the start. A NIC too (its TAP is opened only at the start).
start_ember pre-boot
echo "not a kernel" >"$WORK/pre-boot/not-a-kernel"
configure pre-boot "$WORK/pre-boot/not-a-kernel"
util call "$SOCK" PUT /network-interfaces/eth0 '{"iface_id": "eth0", "host_dev_name": "tapconform0", "guest_mac": "06:00:AC:10:00:02", "rx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 10}}}' 204 >&2
util call "$SOCK" GET /vm/config - 200 >&2
check pre-boot

if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    start_ember post-boot
    util idle-guest "$WORK/post-boot/idle.elf"
    configure post-boot "$WORK/post-boot/idle.elf"
    log "post-boot: starting the tiny guest"
    util call "$SOCK" PUT /actions '{"action_type": "InstanceStart"}' 204 >&2
    util call "$SOCK" GET / - 200 >&2
    check post-boot
else
    log "post-boot phase skipped: /dev/kvm is not usable here (no VM can start)"
fi
PASSED=1
log "passed"
