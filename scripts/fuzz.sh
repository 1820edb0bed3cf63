#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds ember's fuzz targets (fuzz/, cargo-fuzz + libFuzzer, AddressSanitizer, debug
# assertions: an arithmetic overflow is a crash) and runs each one for a bounded time from
# its seed corpus (fuzz/corpus/TARGET). Fails when a target crashes, panics, leaks, runs out
# of memory or spends over 10 s on one input; the input is left in fuzz/artifacts/TARGET/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 20 s each, every target
#
# New inputs go to fuzz/target/corpus/TARGET (kept between runs, not committed). Reproduce a
# crash with: cargo +nightly fuzz run -a TARGET fuzz/artifacts/TARGET/crash-...
# Needs a nightly toolchain (rustup toolchain install nightly); installs cargo-fuzz.
# See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*" >&2; }

SECS="${1:-20}"
shift || true
case "$SECS" in
    '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzzing needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 1
fi

# cargo install is idempotent; pinned, so CI does not change under us.
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION (cargo install)"
    cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

log "cargo fmt --check (fuzz/)"
cargo fmt --check --manifest-path fuzz/Cargo.toml
log "building the fuzz targets (cargo +nightly fuzz build -a)"
cargo +nightly fuzz build -a

HOST="$(rustc +nightly -vV | sed -n 's/^host: //p')"
BIN="fuzz/target/$HOST/release"
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

mkdir -p fuzz/target/logs
failed=()
summary=()
for t in "${targets[@]}"; do
    work="fuzz/target/corpus/$t"
    seeds="fuzz/corpus/$t"
    mkdir -p "$work" "fuzz/artifacts/$t" "$seeds"
    logf="fuzz/target/logs/$t.log"
    log "fuzzing $t for $SECS s"
    rc=0
    # -timeout: one input over 10 s is a hang (a device loop that spins); the outer timeout
    # is a backstop.
    timeout --kill-after=10 "$((SECS + 120))" "$BIN/$t" \
        -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2560 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" "$work" "$seeds" >"$logf" 2>&1 || rc=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$logf")"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logf")"
    last="$(grep -E '^#[0-9]+.*cov: [0-9]+' "$logf" | tail -n 1 || true)"
    cov="$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")"
    ft="$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")"
    corp="$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")"
    summary+=("$(printf '%-16s %10s %8s %6s %7s %6s  %s' "$t" "${execs:-?}" "${rate:-?}" \
        "${cov:-?}" "${ft:-?}" "${corp:-?}" "$([ "$rc" -eq 0 ] && echo ok || echo "FAILED rc=$rc")")")
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        log "$t FAILED (exit $rc); the end of its log ($logf):"
        tail -n 40 "$logf" >&2
        ls -1 "fuzz/artifacts/$t" >&2 || true
        log "reproduce: cargo +nightly fuzz run -a $t fuzz/artifacts/$t/<file>"
    fi
done

printf '%-16s %10s %8s %6s %7s %6s  %s\n' target execs exec/s cov ft corpus result >&2
printf '%s\n' "${summary[@]}" >&2
if [ "${#failed[@]}" -gt 0 ]; then
    log "fuzzing FAILED: ${failed[*]}"
    exit 1
fi
log "fuzzing: no crash in ${#targets[@]} targets"
