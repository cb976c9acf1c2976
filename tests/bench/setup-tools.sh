#!/usr/bin/env bash
# Installs the tools the VPN benchmark (tests/bench/vpn.rs) compares against, once (a no-op when
# present): iperf3, ping, wireguard-go and wireguard-tools (Debian packages) and boringtun-cli
# (crates.io, built into <target dir>/bench-tools). Usage: setup-tools.sh [TARGET_DIR]
set -euo pipefail

target="${1:-${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/target}}"
need_cmd() { command -v "$1" >/dev/null 2>&1; }

# Debian packages: tool -> package. --no-install-recommends: wireguard-tools otherwise pulls
# a kernel image for the (absent) kernel module.
declare -A packages=([iperf3]=iperf3 [ping]=iputils-ping [wg]=wireguard-tools [wireguard-go]=wireguard-go)
missing=()
for tool in "${!packages[@]}"; do
  need_cmd "$tool" || missing+=("${packages[$tool]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup-tools: installing ${missing[*]}"
  for attempt in 1 2 3; do apt-get update -qq && break || sleep $((attempt * 5)); done
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# boringtun-cli (Cloudflare's userspace WireGuard), pinned to its lock file.
root="$target/bench-tools"
if [ ! -x "$root/bin/boringtun-cli" ]; then
  echo "setup-tools: building boringtun-cli into $root (a few minutes, once)"
  cargo install boringtun-cli --locked --root "$root"
fi
