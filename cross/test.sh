#!/usr/bin/env bash
# Run the static ARM binaries under qemu-user, then the library's unit tests for aarch64.
#   cross/test.sh                                   # both targets (binaries built by cross/build.sh)
#   cross/test.sh armv7-unknown-linux-gnueabihf     # one
# CROSS_UNIT_TARGETS (default: aarch64-unknown-linux-gnu) chooses where `cargo test --lib` runs;
# set it empty to skip the unit tests. CROSS_UNIT_ARGS goes after `--` (e.g. "--skip discovery::kad"
# to leave out the slow simulations, which take ~10x longer under qemu than natively).
# Prints PASS/FAIL lines, closes with "cross-test: N passed, N failed", exits 1 on any failure.
set -uo pipefail
# shellcheck source=cross/env.sh
. "$(dirname "$0")/env.sh"
cd "$ROOT_DIR" || exit 1
cross_preflight || exit 1

targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${CROSS_TARGETS_DEFAULT[@]}")
unit_targets="${CROSS_UNIT_TARGETS-aarch64-unknown-linux-gnu}"
version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)"

passed=0 failed=0
pass() { echo "PASS $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }

work="$(mktemp -d /tmp/kairos-cross-test.XXXXXX)"
trap 'rm -rf "$work"' EXIT

for t in "${targets[@]}"; do
    bin="$ROOT_DIR/target/$t/release/$BIN_NAME"
    qemu="$(qemu_for "$t")" || { fail "$t: unknown target"; continue; }
    case "$t" in aarch64-*) arch=aarch64 ;; *) arch=arm ;; esac
    if [ ! -x "$bin" ]; then fail "$t: $bin missing (run cross/build.sh or make cross)"; continue; fi
    command -v "$qemu" >/dev/null || { fail "$t: $qemu missing (run cross/setup.sh)"; continue; }
    d="$work/$t"; mkdir -p "$d"

    # 1. version: runs at all, is this version, and really is the ARM build.
    if out="$("$qemu" "$bin" version 2>&1)" && [[ "$out" == *"$version"* && "$out" == *"($arch-linux)"* ]]; then
        pass "$t version: $out"
    else
        fail "$t version: expected 'kairos-p2p $version ($arch-linux)', got: $out"
    fi

    # 2. kairosctl: the same binary under its second name.
    ln -sf "$bin" "$d/kairosctl"
    if out="$("$qemu" "$d/kairosctl" version 2>&1)" && [[ "$out" == *"$version"* ]]; then
        pass "$t kairosctl version"
    else
        fail "$t kairosctl version: $out"
    fi

    # 3. generate-token -> cloud-config -> validate exits 0.
    if token="$("$qemu" "$bin" generate-token 2>"$d/gen.err")" && [ -n "$token" ] && [[ "$token" != *$'\n'* ]]; then
        pass "$t generate-token (${#token} chars)"
        printf '#cloud-config\np2p:\n  network_token: "%s"\n' "$token" >"$d/config.yaml"
        if "$qemu" "$bin" validate --config "$d/config.yaml" >"$d/validate.out" 2>"$d/validate.err"; then
            pass "$t validate --config (exit 0, $(wc -l <"$d/validate.out") lines of effective config)"
        else
            fail "$t validate --config: exit $?: $(head -c 2000 "$d/validate.err")"
        fi
    else
        fail "$t generate-token: $(head -c 2000 "$d/gen.err")"
    fi

    # 4. generate-token --interval, and a broken token is rejected with exit 2.
    if "$qemu" "$bin" generate-token --interval 3600 >/dev/null 2>"$d/gen2.err"; then
        pass "$t generate-token --interval 3600"
    else
        fail "$t generate-token --interval 3600: $(head -c 2000 "$d/gen2.err")"
    fi
    printf '#cloud-config\np2p:\n  network_token: "not-a-token"\n' >"$d/bad.yaml"
    "$qemu" "$bin" validate --config "$d/bad.yaml" >/dev/null 2>&1; rc=$?
    if [ "$rc" -eq 2 ]; then pass "$t validate rejects a bad token (exit 2)"; else fail "$t validate of a bad token: exit $rc, expected 2"; fi
done

# 5. The library's unit tests, compiled by Debian's rustc 1.85 and run under qemu (the runner
#    comes from cross/cargo-config.toml).
for t in $unit_targets; do
    log="$work/unit-$t.log"
    # shellcheck disable=SC2086  # CROSS_UNIT_ARGS is a word list on purpose
    if "${CARGO_CROSS[@]}" test --locked --lib --target "$t" -- ${CROSS_UNIT_ARGS:-} >"$log" 2>&1; then
        pass "$t cargo test --lib under $(qemu_for "$t"): $(grep -E '^test result:' "$log" | tail -n 1)"
    else
        tail -n 60 "$log"
        fail "$t cargo test --lib under $(qemu_for "$t")"
    fi
done

echo "cross-test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
