#!/usr/bin/env bash
# Build static release binaries of kairos-p2p for ARM with Debian's rustc 1.85.
#   cross/build.sh                                   # both targets
#   cross/build.sh aarch64-unknown-linux-gnu         # one
# Needs cross/setup.sh to have run. Output: target/<triple>/release/kairos-p2p.
# Because /usr/bin/rustc is 1.85.0, a successful build also proves the crate's rust-version (MSRV).
set -euo pipefail
# shellcheck source=cross/env.sh
. "$(dirname "$0")/env.sh"
cd "$ROOT_DIR"
cross_preflight

targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${CROSS_TARGETS_DEFAULT[@]}")

echo "cross: rustc  $($RUSTC --version)  (MSRV check: Cargo.toml rust-version = $(
    sed -n 's/^rust-version *= *"\(.*\)"/\1/p' Cargo.toml))"
echo "cross: cargo  $("$CARGO" --version)"

status=0
for t in "${targets[@]}"; do
    [ -d "/usr/lib/rustlib/$t/lib" ] || { echo "FAIL build $t: /usr/lib/rustlib/$t missing (run cross/setup.sh)"; status=1; continue; }
    start=$(date +%s)
    if ! "${CARGO_CROSS[@]}" build --release --locked --target "$t" --bin "$BIN_NAME"; then
        echo "FAIL build $t"; status=1; continue
    fi
    secs=$(( $(date +%s) - start ))
    bin="$ROOT_DIR/target/$t/release/$BIN_NAME"
    desc="$(file -b "$bin")"
    case "$desc" in
        *"statically linked"*|*"static-pie linked"*) ;;
        *) echo "FAIL build $t: not statically linked: $desc"; status=1; continue ;;
    esac
    case "$desc" in
        *", stripped"*) ;;
        *) echo "cross: WARNING $t: binary not stripped: $desc" ;;
    esac
    bytes=$(stat -c %s "$bin")
    echo "cross: $bin"
    echo "cross:   file: $desc"
    awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "cross:   size: %d bytes (%.2f MiB), built in %ds\n", b, b / 1048576, s }'
    echo "PASS build $t"
done
exit "$status"
