#!/usr/bin/env bash
# Installs the host packages the build and the tests need, once (a no-op when present).
# The Rust toolchain itself comes with the machine (rustup cannot download here).
set -euo pipefail

need_cmd() { command -v "$1" >/dev/null 2>&1; }

for tool in cargo rustc; do
  need_cmd "$tool" || { echo "setup-host: $tool is missing; install Rust (rustup) first" >&2; exit 1; }
done
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy

# Debian packages: tool -> package.
# chromium and chromedriver: the status page test (tests/netns_status_page.rs) runs headless
# Chromium against a real agent.
declare -A packages=([gcc]=gcc [python3]=python3 [ip]=iproute2 [iptables]=iptables
  [chromium]=chromium [chromedriver]=chromium-driver)
missing=()
for tool in "${!packages[@]}"; do
  need_cmd "$tool" || missing+=("${packages[$tool]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup-host: installing ${missing[*]}"
  for attempt in 1 2 3; do apt-get update -qq && break || sleep $((attempt * 5)); done
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
