#!/usr/bin/env bash
# Runs the libFuzzer targets of tests/fuzz (cargo-fuzz, nightly toolchain) for a set time each.
#   tests/fuzz/run.sh SECONDS [TARGET...]      (default: every target)
# make fuzz       -> SECONDS=FUZZ_SECONDS (180) per target, one after the other
# make fuzz-short -> 30 s per target, one at a time (part of `make test`, beside the cross tests)
#
# Each run starts from the committed inputs (tests/fuzz/seeds/<target>/ and the crash inputs
# kept as regressions in tests/fuzz/regressions/<target>/, replayed first) plus the local,
# git-ignored corpus tests/fuzz/corpus/<target>/ that grows from run to run. A crash, leak or
# timeout fails the run; libFuzzer leaves the input in tests/fuzz/artifacts/<target>/ and this
# script prints how to reproduce it. After fixing the bug, copy the input into
# tests/fuzz/regressions/<target>/: `cargo test --test fuzz_regressions` then replays it on stable.
# Environment: FUZZ_JOBS (targets run at once, default 1), FUZZ_SANITIZER (none|address, default
# none: the code under test is safe Rust; address also checks the C and assembly in ring).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
seconds="${1:?usage: tests/fuzz/run.sh SECONDS [TARGET...]}"
shift
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(token config wire http node)
jobs="${FUZZ_JOBS:-1}"
sanitizer="${FUZZ_SANITIZER:-none}"
cargo="${CARGO:-cargo}"
# The same flags for the build and every run, so `run` reuses the build.
fuzz_flags=(--fuzz-dir "$here" -s "$sanitizer" --codegen-units 16)

cd "$repo" || exit 1
if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    "$cargo" install cargo-fuzz --locked >/tmp/cargo-fuzz-install.log 2>&1 || {
        tail -n 30 /tmp/cargo-fuzz-install.log >&2
        exit 1
    }
fi
"$cargo" +nightly --version >/dev/null 2>&1 || {
    echo "fuzz: the nightly toolchain is missing (rustup toolchain list)" >&2
    exit 1
}

logs="$(mktemp -d /tmp/kairos-fuzz.XXXXXX)"
trap 'rm -rf "$logs"' EXIT

echo "fuzz: building ${targets[*]} (nightly, sanitizer $sanitizer)"
start=$(date +%s)
"$cargo" +nightly fuzz build "${fuzz_flags[@]}" >"$logs/build.log" 2>&1 || {
    tail -n 40 "$logs/build.log" >&2
    echo "fuzz: build failed" >&2
    exit 1
}
echo "fuzz: built in $(($(date +%s) - start)) s"

# One target: its own log; prints one summary line; exit status = libFuzzer's.
run_one() {
    local t="$1" log="$logs/$1.log" dirs=()
    mkdir -p "$here/corpus/$t" "$here/artifacts/$t"
    dirs=("$here/corpus/$t")
    for d in "$here/seeds/$t" "$here/regressions/$t"; do
        if [ -d "$d" ]; then dirs+=("$d"); fi
    done
    "$cargo" +nightly fuzz run "${fuzz_flags[@]}" "$t" "${dirs[@]}" -- \
        -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 \
        >"$log" 2>&1
    local rc=$?
    local runs corpus
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    corpus="$(ls "$here/corpus/$t" | wc -l)"
    if [ "$rc" -eq 0 ]; then
        echo "fuzz $t: OK, ${runs:-?} inputs in $seconds s, corpus $corpus, no crash"
    else
        grep -E '^(==[0-9]+==|thread .* panicked|SUMMARY|.*deadly signal|artifact_prefix|Test unit written)' "$log" | head -n 20
        tail -n 20 "$log"
        echo "fuzz $t: FAILED (exit $rc); the input is in tests/fuzz/artifacts/$t/;" \
            "reproduce: cargo +nightly fuzz run ${fuzz_flags[*]} $t <that file>"
    fi
    return "$rc"
}

failed=0
pids=()
for t in "${targets[@]}"; do
    run_one "$t" &
    pids+=("$!")
    if [ "${#pids[@]}" -ge "$jobs" ]; then
        wait "${pids[0]}" || failed=$((failed + 1))
        pids=("${pids[@]:1}")
    fi
done
for p in "${pids[@]}"; do
    wait "$p" || failed=$((failed + 1))
done

if [ "$failed" -gt 0 ]; then
    echo "fuzz: $failed target(s) failed" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} target(s), $seconds s each, no crash"
