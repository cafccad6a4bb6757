#!/usr/bin/env bash
# A short run of every fuzz target: fails (exit 1) on any crash, panic, leak or hang.
#
#   fuzz/smoke.sh                      # every target, FUZZ_SECONDS each
#   FUZZ_SECONDS=60 fuzz/smoke.sh      # longer
#   FUZZ_TARGETS="log_replay" fuzz/smoke.sh
#
# Environment:
#   FUZZ_SECONDS   libFuzzer -max_total_time per target (default 25)
#   FUZZ_RUNS      libFuzzer -runs per target, whichever ends first (default 10000000)
#   FUZZ_TIMEOUT   seconds one input may take before it counts as a hang (default 10)
#   FUZZ_TARGETS   space-separated targets (default: every target of `cargo fuzz list`)
#   CARGO_TARGET_DIR  where the fuzz build goes (default ~/.cache/rangekv/fuzz-target)
#   CARGO_BUILD_JOBS  cargo's build jobs (default 1: the machine is shared)
#
# Each target starts from a throwaway copy of seeds/<target>/ plus regressions/<target>/
# (so every saved crash is replayed first); what the run grows is deleted afterwards.
# A crash is saved by libFuzzer under artifacts/<target>/ and this script prints how to
# replay it. Needs the nightly toolchain and cargo-fuzz; without either it prints a
# loud SKIPPED notice and exits 0.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

seconds="${FUZZ_SECONDS:-25}"
runs="${FUZZ_RUNS:-10000000}"
timeout="${FUZZ_TIMEOUT:-10}"
target_dir="${CARGO_TARGET_DIR:-$HOME/.cache/rangekv/fuzz-target}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"

skip() {
    echo "################################################################" >&2
    echo "## fuzz smoke SKIPPED: nightly/cargo-fuzz missing ($1)" >&2
    echo "## Nothing was fuzzed. Install with:" >&2
    echo "##   rustup toolchain install nightly" >&2
    echo "##   cargo install cargo-fuzz --locked" >&2
    echo "################################################################" >&2
    echo "skipped: nightly/cargo-fuzz missing"
    exit 0
}

if ! cargo +nightly --version >/dev/null 2>&1; then
    skip "no nightly toolchain"
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    skip "no cargo-fuzz"
fi

# The same build options for `build` and every `run`, so the runs rebuild nothing.
build_opts=(--target-dir "$target_dir")

if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
if [ "${#targets[@]}" -eq 0 ]; then
    echo "fuzz smoke: no targets found" >&2
    exit 1
fi

echo "fuzz smoke: building the fuzz targets (target dir $target_dir)"
start=$SECONDS
if ! cargo +nightly fuzz build "${build_opts[@]}"; then
    echo "fuzz smoke: FAILED to build the fuzz targets" >&2
    exit 1
fi
echo "fuzz smoke: built in $((SECONDS - start)) s"

work="$(mktemp -d "${TMPDIR:-/tmp}/rangekv-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

failed=()
for target in "${targets[@]}"; do
    corpus="$work/$target"
    mkdir -p "$corpus"
    inputs=("$corpus")
    for dir in "seeds/$target" "regressions/$target"; do
        [ -d "$dir" ] && inputs+=("$dir")
    done
    echo "fuzz smoke: $target for ${seconds}s (at most $runs runs)"
    start=$SECONDS
    # The first corpus directory (the throwaway one) receives what the run finds.
    cargo +nightly fuzz run "${build_opts[@]}" "$target" "${inputs[@]}" -- \
        -runs="$runs" -max_total_time="$seconds" -timeout="$timeout" \
        -rss_limit_mb=2048 -print_final_stats=1 >"$work/$target.log" 2>&1
    status=$?
    tail -n 15 "$work/$target.log"
    if [ "$status" -ne 0 ]; then
        grep -E "panicked at|ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)|Test unit written to" \
            "$work/$target.log" | head -n 20 >&2
        echo "fuzz smoke: $target FAILED (exit $status). Replay the saved input with:" >&2
        echo "  cd fuzz && cargo +nightly fuzz run --target-dir $target_dir $target artifacts/$target/<file>" >&2
        cp "$work/$target.log" "$here/artifacts/$target.smoke.log" 2>/dev/null || true
        failed+=("$target")
    else
        echo "fuzz smoke: $target ok ($((SECONDS - start)) s)"
    fi
done

passed=$((${#targets[@]} - ${#failed[@]}))
echo "smoke: $passed passed, ${#failed[@]} failed"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz smoke: FAILED: ${failed[*]}" >&2
    exit 1
fi
