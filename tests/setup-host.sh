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

# Debian packages: tool -> package. Every program the demo and the tests run that a Debian 12
# minbase root lacks is here (tests/tool_guard.rs checks it against what the repo runs):
# - gcc: the linker cargo calls (cc), with the C library's start files and headers (libc6-dev,
#   only a Recommends of gcc, which --no-install-recommends skips);
# - c++ (g++): libFuzzer's C++ sources, built by the fuzz targets' libfuzzer-sys (make fuzz-short);
# - python3: the k3s stand-in and the demo's status poller;
# - ip, iptables: the namespace labs; ping: VPN reachability;
# - kill, ps, sysctl (procps): stopping agents by pid, a bridge's command line
#   (tests/netns_trust.rs), router namespaces' forwarding;
# - setpriv (util-linux, also in minbase): API clients run as the user nobody;
# - chromium, chromedriver: the status page test runs headless Chromium against a real agent;
# - iperf3, curl: the soak (tests/soak) and the VPN benchmark;
# - openssl: tests/cli_kairosctl.rs makes a test CA and serves HTTPS (`openssl s_server`);
# - dig: tests/netns_dns.rs resolves through the agents' DNS service;
# - update-ca-certificates stands for ca-certificates, the CA bundle cargo's HTTPS needs.
install_missing setup-host gcc=gcc cc=gcc /usr/include/stdio.h=libc6-dev c++=g++ python3=python3 \
  ip=iproute2 iptables=iptables ping=iputils-ping kill=procps ps=procps sysctl=procps \
  setpriv=util-linux chromium=chromium chromedriver=chromium-driver iperf3=iperf3 curl=curl \
  openssl=openssl dig=bind9-dnsutils update-ca-certificates=ca-certificates
