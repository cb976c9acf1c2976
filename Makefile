# kairos-p2p — the two commands a newcomer runs are `make demo` and `make test` (see README.md).
# Every target installs what it needs itself (Debian packages, cross toolchains).

SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build release test lint fmt-check clippy unit-test sim-properties demo deps help bench fuzz fuzz-short soak clean-room

all: build

help:
	@echo "make test        fmt check, clippy -D warnings, all tests, ARM cross tests"
	@echo "make demo        four agents in namespaces form a k3s cluster (as root; HA=1 for HA)"
	@echo "make release     optimised host binary in target/release/kairos-p2p"
	@echo "make bench       benchmarks (simulator, real agents in namespaces; needs root)"
	@echo "make fuzz        libFuzzer on every parser (FUZZ_SECONDS each, default 180; nightly)"
	@echo "make fuzz-short  30 s of each fuzz target (part of make test)"
	@echo "make clean-room  the README's two commands in a fresh Debian 12 root (root; ~40 min)"
	@echo "make soak        10 agents under traffic and churn for DURATION s (3600); memory/fd report (root)"
	@echo "make cross       static ARM binaries (aarch64, armv7)"
	@echo "make cross-test  run the ARM binaries and the aarch64 unit tests under qemu"
	@echo "make install     install the binary, kairosctl link and service units (DESTDIR, PREFIX)"
	@echo "make vendor      vendor every crate for offline builds"

# Host packages the build and tests use (idempotent; a no-op when present).
deps:
	@bash tests/setup-host.sh

build:
	$(CARGO) build --locked

release:
	$(CARGO) build --locked --release

fmt-check:
	$(CARGO) fmt --check

clippy:
	$(CARGO) clippy --locked --all-targets -- -D warnings

unit-test:
	$(CARGO) test --locked

# The simulator's role and election properties and the late-sites scenarios over 1,000 seeds per
# scenario, and the fault scenarios over 50, optimised (the debug pass of unit-test runs 20, 3
# and 5 seeds of each); the 200-node scale scenario once (50 nodes in the debug pass).
sim-properties:
	$(CARGO) test --locked --profile sim --test sim_roles --test sim_faults --test sim_late_sites --test sim_scale

lint: fmt-check clippy

# The simulator's properties, the short fuzz runs and the ARM cross tests run side by side: the
# cross builds spend minutes on one core (fat LTO) and in apt, the fuzzer runs one target at a
# time, and the simulator (virtual clock, seeded) fills what is left; none of them measures wall
# time, so sharing the cores changes no result. Each keeps its output together (-Otarget) and
# each step prints its wall time ("[make test] STEP: N s").
STEP = bash tests/timed.sh
test:
	@$(STEP) deps $(MAKE) --no-print-directory deps
	@$(STEP) lint $(MAKE) --no-print-directory lint
	@$(STEP) unit-test $(MAKE) --no-print-directory unit-test
	@$(STEP) "sim-properties + fuzz-short + cross-test" \
	  $(MAKE) --no-print-directory -j3 -Otarget sim-properties fuzz-short cross-test
	@echo "make test: all steps passed"

# Benchmarks print numbers and ratios; they assert nothing. The VPN bench compares against
# iperf3 over the raw link, boringtun-cli and wireguard-go: setup-tools.sh installs them.
# VPN_BASELINE=<git rev> (e.g. the branch point) adds the agent built at that revision as the
# VPN bench's baseline row: "CPU per Gbit/s, ours / baseline" and the like then come from one run.
VPN_BASELINE ?=
bench: deps
	@bash tests/bench/setup-tools.sh
	@if [ -n "$(VPN_BASELINE)" ]; then \
	  KAIROS_BENCH_BASELINE="$$(bash tests/bench/build-baseline.sh $(VPN_BASELINE) | tail -1)" \
	    $(CARGO) bench --locked; \
	else $(CARGO) bench --locked; fi

# The one-machine cluster demo (as root): four agents in network namespaces form a k3s cluster
# (k3s stand-in unless k3s is on PATH), then a bridge fetches the kubeconfig. HA=1: HA + KubeVIP.
HA ?= 0

# Fuzzing with libFuzzer (cargo-fuzz on the nightly toolchain, installed on first use): every
# target in tests/fuzz for FUZZ_SECONDS each, from the committed seeds and regression inputs; a
# crash stops with its input in tests/fuzz/artifacts/<target>/ (see tests/fuzz/run.sh).
# `make fuzz FUZZ_TARGETS=wire FUZZ_SECONDS=600` narrows it. `make test` runs fuzz-short: 30 s of
# each target, one at a time.
FUZZ_SECONDS ?= 180
FUZZ_TARGETS ?= token config wire http node
fuzz:
	@bash tests/fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

fuzz-short:
	@bash tests/fuzz/run.sh 30 $(FUZZ_TARGETS)

demo:
	@HA="$(HA)" bash tests/demo.sh

# The soak (as root): 10 agents in network namespaces with iperf3 bursts, ledger writes and
# churn for DURATION seconds, sampling RSS, fds and CPU; prints the slopes and PASS/FAIL lines
# (< 1 MB/hour RSS growth after warm-up, no fd growth). See tests/soak/soak.sh.
DURATION ?= 3600
soak: deps
	$(CARGO) build --release --locked
	@DURATION="$(DURATION)" bash tests/soak/soak.sh

include cross/Makefile.inc

# The README's two set-up commands, exactly as written, in a fresh Debian 12 minbase root (as
# root; ~40 min): mmdebstrap root + this machine's Rust toolchain + a clone of the committed tree.
# Not part of `make test`. Prints each command's wall time; removes the root also on failure.
clean-room:
	@bash tests/clean-room.sh
