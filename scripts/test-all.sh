#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The whole test suite, as the README's second command and CI run it:
#   1. install the Debian packages the tests need (idempotent; needs root or sudo),
#   2. build the default guest (cached under ~/.cache/ember: seconds when nothing changed),
#   3. format and lint checks, supply-chain checks (cargo deny, cargo audit), then every
#      unit and tiny-guest test, the fuzz targets briefly, and the real-boot tests.
# Works with no tty and no stdin.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi

# Packages: guest build (kernel + busybox), network tests (iproute2), peers for bench.
# libseccomp-dev and libcap-ng-dev: to build virtiofsd (--share). curl: the API tests' client.
# crun, runc and bubblewrap: the container and sandbox rows of `ember compare` (crun refuses
# hosts with cgroup controllers on both hierarchies; compare then uses runc).
PKGS=(linux-source-6.1 busybox-static build-essential flex bison bc libelf-dev cpio
      e2fsprogs iproute2 qemu-system-x86 libseccomp-dev libcap-ng-dev curl
      crun runc bubblewrap)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust with rustup (https://rustup.rs) first" >&2
    exit 1
fi

# virtiofsd serves --share (virtio-fs). cargo install is idempotent: it does nothing when
# this version is installed already. Pinned, so CI does not change under us.
VIRTIOFSD_VERSION=1.14.0
if ! "${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd" --version 2>/dev/null | grep -q "$VIRTIOFSD_VERSION"; then
    log "installing virtiofsd $VIRTIOFSD_VERSION (cargo install)"
    cargo install --locked --quiet virtiofsd --version "$VIRTIOFSD_VERSION"
fi

# Supply-chain checks (cargo deny, cargo audit) and the fuzz targets' cargo-fuzz: pinned,
# installed once (cargo install does nothing when this version is there).
CARGO_DENY_VERSION=0.20.2
CARGO_AUDIT_VERSION=0.22.2
if ! cargo deny --version 2>/dev/null | grep -q "$CARGO_DENY_VERSION"; then
    log "installing cargo-deny $CARGO_DENY_VERSION (cargo install)"
    cargo install --locked --quiet cargo-deny --version "$CARGO_DENY_VERSION"
fi
if ! cargo audit --version 2>/dev/null | grep -q "$CARGO_AUDIT_VERSION"; then
    log "installing cargo-audit $CARGO_AUDIT_VERSION (cargo install)"
    cargo install --locked --quiet cargo-audit --version "$CARGO_AUDIT_VERSION"
fi

log "building the default guest (cached)"
bash resources/guest/build.sh

log "cargo fmt --check"
cargo fmt --check
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
log "cargo doc (intra-doc links and HTML checked)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --lib --quiet
# Licences, bans and sources need no network (deny.toml). Advisories need the RustSec
# database: fetched when the network allows; otherwise the copy from an earlier fetch is
# used (its date is printed), and with none the advisory checks are skipped, in one line.
log "cargo deny check licenses bans sources"
cargo deny --offline check --hide-inclusion-graph licenses bans sources
fetched=yes
timeout 120 cargo deny fetch db >/dev/null 2>&1 || fetched=no
db="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/advisory-dbs/advisory-db-* 2>/dev/null | head -n 1 || true)"
if [ -n "$db" ]; then
    log "advisories (cargo deny, cargo audit): database fetched: $fetched, newest entry $(git -C "$db" log -1 --format=%cs 2>/dev/null || echo '?')"
    cargo deny --offline check --hide-inclusion-graph advisories
    cargo audit --no-fetch --stale --db "$db"
else
    log "advisory database cannot be fetched (offline?) and none is cached: cargo deny advisories and cargo audit skipped"
fi

log "building tests"
cargo test --no-run --all-targets

# Unit tests, tiny guests and device tests: fast and deterministic.
log "unit and tiny-guest tests"
cargo test --lib --bins \
    --test cli --test tiny_guest --test boot_protocol --test guest_build \
    --test virtio_blk --test exec --test acpi --test bench_tiny \
    --test hostile_guest --test hostile_virtio --test snapshot_kvm --test api --test sandbox \
    --test compare --test blk_guest --test floods --test concurrency

# Firecracker's API checked against Firecracker's swagger file with schemathesis (PyPI):
# tiny guests only, under a minute on two cores (tests/firecracker-api/README.md).
log "API conformance (schemathesis)"
bash scripts/api-conformance.sh

# Fuzzing: every fuzz target for a short bounded time (default 20 s each; FUZZ_SECONDS
# changes it, 0 skips the step), failing on a crash (docs/fuzzing.md).
FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
if [ "$FUZZ_SECONDS" -gt 0 ]; then
    log "fuzz targets, $FUZZ_SECONDS s each"
    bash scripts/fuzz.sh "$FUZZ_SECONDS"
fi

# Real Linux boots: slow here (guest kernel code is emulated on PVM hosts), so each boot
# checks several things. One boot at a time: a guest that gets only a fraction of a core
# spends all of it in its own timer tick and stops making progress (docs/profile.md), and a
# CI machine has two cores. Each file gets one retry, because CI machines are shared and a
# starved guest can miss a deadline; a second failure fails the run.
failed=()
for t in boot_linux boot_disk exec_linux acpi_linux netdev virtiofs_linux api_linux bench; do
    log "real boots: $t"
    if ! cargo test --test "$t" -- --test-threads=1; then
        log "$t failed; retrying once"
        cargo test --test "$t" -- --test-threads=1 || failed+=("$t")
    fi
done
if [ "${#failed[@]}" -gt 0 ]; then
    log "FAILED: ${failed[*]}"
    exit 1
fi
log "all tests passed"
