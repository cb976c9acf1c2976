#!/usr/bin/env bash
# Installs the host packages the build and the tests need, once (a no-op when present).
# The Rust toolchain itself comes with the machine (rustup cannot download here).
set -euo pipefail

# shellcheck source=tests/packages.sh
. "$(dirname "$0")/packages.sh"

for tool in cargo rustc; do
  need_cmd "$tool" || { echo "setup-host: $tool is missing; install Rust (rustup) first" >&2; exit 1; }
done
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy

# Debian packages: tool -> package.
# openssl: tests/cli_kairosctl.rs makes a test CA and serves HTTPS with `openssl s_server`.
# chromium and chromedriver: the status page test (tests/netns_status_page.rs) runs headless
# Chromium against a real agent.
install_missing setup-host gcc=gcc python3=python3 ip=iproute2 iptables=iptables openssl=openssl \
  chromium=chromium chromedriver=chromium-driver
