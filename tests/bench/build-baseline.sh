#!/usr/bin/env bash
# Builds the agent at an older git revision (release profile) for the VPN benchmark's baseline
# row, so "today" and "after" are measured side by side in one run on one machine.
# Usage: build-baseline.sh REV [TARGET_DIR]. Prints the binary's path on the last line.
# The sources are exported with `git archive` and built in their own target directory
# (<target>/bench-baseline): the tree's own target/release stays untouched.
set -euo pipefail

rev="${1:?usage: build-baseline.sh REV [TARGET_DIR]}"
repo="$(cd "$(dirname "$0")/../.." && pwd)"
target="${2:-${CARGO_TARGET_DIR:-$repo/target}}"
commit="$(git -C "$repo" rev-parse --verify "$rev^{commit}")"
root="$target/bench-baseline"
bin="$root/kairos-p2p-$commit"
if [ ! -x "$bin" ]; then
  src="$root/src-$commit"
  rm -rf "$src"
  mkdir -p "$src"
  git -C "$repo" archive "$commit" | tar -x -C "$src"
  echo "build-baseline: building $rev ($commit) into $root (minutes, once per revision)" >&2
  CARGO_TARGET_DIR="$root/target" cargo build --release --locked --bin kairos-p2p \
    --manifest-path "$src/Cargo.toml" >&2
  cp "$root/target/release/kairos-p2p" "$bin"
  rm -rf "$src"
fi
echo "$bin"
