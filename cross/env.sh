# Sourced by cross/build.sh and cross/test.sh: common settings for the ARM builds.
# shellcheck disable=SC2034  # variables used by the scripts that source this file
# shellcheck shell=bash
CROSS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$CROSS_DIR/.." && pwd)"
CROSS_TARGETS_DEFAULT=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
BIN_NAME=kairos-p2p

# Debian's rustc 1.85 compiles (this is the MSRV proof); the cargo is rustup's (>= 1.84 needed
# for resolver 3 / edition 2024 manifests; Debian 12's own cargo is 0.66 and cannot read them).
export RUSTC=/usr/bin/rustc
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS RUSTC_WRAPPER   # would override cross/cargo-config.toml
# CROSS_CARGO overrides (not CARGO: cargo itself exports CARGO to the processes it runs).
CARGO="${CROSS_CARGO:-}"
if [ -z "$CARGO" ]; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then CARGO="$HOME/.cargo/bin/cargo"; else CARGO="$(command -v cargo || true)"; fi
fi
[ -z "$CARGO" ] || CARGO="$(command -v "$CARGO" || echo "$CARGO")"
CARGO_CROSS=("$CARGO" --config "$CROSS_DIR/cargo-config.toml")

cross_preflight() {
    local v
    [ -x /usr/bin/rustc ] || { echo "cross: /usr/bin/rustc missing: run cross/setup.sh (make cross)" >&2; return 1; }
    if [ -z "$CARGO" ] || [ ! -x "$CARGO" ]; then echo "cross: no cargo found" >&2; return 1; fi
    v="$("$CARGO" --version | awk '{ print $2 }')"
    if ! printf '1.84.0\n%s\n' "${v%%-*}" | sort -V -C; then
        echo "cross: $CARGO is $v; need cargo >= 1.84 (resolver 3, edition 2024)" >&2; return 1
    fi
}

# Target triple -> qemu-user runner.
qemu_for() {
    case "$1" in
        aarch64-*) echo qemu-aarch64-static ;;
        armv7-*|arm-*) echo qemu-arm-static ;;
        *) echo "cross: no qemu runner known for $1" >&2; return 1 ;;
    esac
}
