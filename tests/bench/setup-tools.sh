#!/usr/bin/env bash
# Installs the tools the VPN benchmark (tests/bench/vpn.rs) compares against, once (a no-op when
# present): iperf3, ping, ss, git, wireguard-go and wireguard-tools (Debian packages) and
# boringtun-cli (crates.io, built into <target dir>/bench-tools). Usage: setup-tools.sh [TARGET_DIR]
set -euo pipefail

target="${1:-${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/target}}"
# shellcheck source=tests/packages.sh
. "$(dirname "$0")/../packages.sh"

# Debian packages (wireguard-tools: `wg`; git: build-baseline.sh exports an older revision).
install_missing setup-tools iperf3=iperf3 ping=iputils-ping ss=iproute2 wg=wireguard-tools \
  wireguard-go=wireguard-go git=git

# boringtun-cli (Cloudflare's userspace WireGuard), pinned to its lock file.
root="$target/bench-tools"
if [ ! -x "$root/bin/boringtun-cli" ]; then
  echo "setup-tools: building boringtun-cli into $root (a few minutes, once)"
  cargo install boringtun-cli --locked --root "$root"
fi
