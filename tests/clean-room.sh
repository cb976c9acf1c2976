#!/usr/bin/env bash
# make clean-room: the README's two set-up commands, exactly as written, in a fresh Debian 12 root.
#
# What it does (as root, on a Debian machine):
#   1. builds a minimal Debian 12 root with `mmdebstrap --variant=minbase bookworm` (installs
#      mmdebstrap on first use) from this machine's apt sources, plus `make` — the one program a
#      newcomer needs before typing `make ...` (see README, Set-up);
#   2. copies this machine's network set-up in (resolv.conf, local CA certificates) and its Rust
#      toolchain: ~/.cargo/bin (the rustup proxies) is copied and
#      ~/.rustup (the toolchains, ~3 GB) is bind-mounted read-only (rustup cannot download here);
#   3. clones the committed HEAD of this repository into the root (`git clone`, like CI's clean
#      clone: uncommitted changes are not in it);
#   4. in a private mount namespace (`unshare --mount`, so every mount it makes vanishes with it):
#      binds the root onto itself (`ip netns exec` needs / to be a mount point), mounts /proc,
#      /sys, /dev and a fresh tmpfs /run (namespace names stay apart from the host's), chroots and
#      runs every command of the README's set-up block in order, printing the wall time of each;
#   5. cleans up also on failure or Ctrl-C: kills, by pid, every process whose root is the clean
#      room, then removes the root (never across a mount: it checks first).
# Exit status: 0 when every command passed. CLEAN_ROOM_DIR (default /var/tmp) holds the root;
# CLEAN_ROOM_KEEP=1 keeps it for inspection.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=tests/packages.sh
. "$here/packages.sh"

say() { printf 'clean-room: %s\n' "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, mounts, chroot)"
install_missing clean-room mmdebstrap=mmdebstrap unshare=util-linux git=git
sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || die "$sources missing: this machine's Debian apt sources are needed"
[ -d "$HOME/.rustup" ] && [ -d "$HOME/.cargo/bin" ] || die "no rustup toolchain in $HOME/.rustup and $HOME/.cargo/bin"

# The README's set-up commands: the lines of the first code block after "## Set-up", comments
# stripped. They are run exactly as written.
mapfile -t commands < <(awk '
    /^## Set-up/ { in_section = 1; next }
    in_section && /^## / { exit }
    in_section && /^```/ { if (in_block) exit; in_block = 1; next }
    in_block { sub(/[ \t]*#.*/, ""); if ($0 != "") print }
' "$repo/README.md")
[ "${#commands[@]}" -gt 0 ] || die "no commands found in README.md's Set-up code block"
say "README's set-up commands: $(printf '[%s] ' "${commands[@]}")"

base="$(mktemp -d "${CLEAN_ROOM_DIR:-/var/tmp}/kairos-clean-room.XXXXXX")"
root="$base/root"
mkdir -p "$root"

# Processes whose root directory is the clean room (by pid, nothing else is touched).
room_pids() {
    local p link
    for p in /proc/[0-9]*; do
        link="$(readlink "$p/root" 2>/dev/null)" || continue
        case "$link" in "$root" | "$root"/*) echo "${p#/proc/}" ;; esac
    done
}

cleanup() {
    local status=$? pids round
    trap - EXIT INT TERM
    for round in 1 2 3 4 5; do
        pids="$(room_pids)"
        [ -n "$pids" ] || break
        # shellcheck disable=SC2086 # one pid a word
        kill -"$([ "$round" -lt 3 ] && echo TERM || echo KILL)" $pids 2>/dev/null || true
        sleep 1
    done
    if grep -q " $base" /proc/self/mountinfo; then
        say "mounts are still left under $base (not removed; see /proc/self/mountinfo)"
    elif [ "${CLEAN_ROOM_KEEP:-0}" = 1 ]; then
        say "kept $base"
    else
        rm -rf --one-file-system "$base"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

start=$(date +%s)
say "building a Debian 12 minbase root in $root"
mmdebstrap --quiet --variant=minbase --include=make bookworm "$root" - <"$sources" \
    || die "mmdebstrap failed"
say "root built in $(($(date +%s) - start)) s"

mkdir -p "$root/root/.cargo" "$root/root/.rustup"
cp -a "$HOME/.cargo/bin" "$root/root/.cargo/bin"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The machine's own network set-up comes along like its apt sources: local CA certificates (a
# TLS-inspecting proxy's, on machines behind one) that ca-certificates adds to the bundle when
# tests/setup-host.sh installs it. Without them cargo cannot reach crates.io from such a machine.
if [ -d /usr/local/share/ca-certificates ]; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi
git clone --quiet "$repo" "$root/root/kairos-p2p"
say "cloned $(git -C "$root/root/kairos-p2p" log -1 --format='%h %s')"

# Inside the private mount namespace: mounts, chroot, the commands with their times.
inner() {
    set -euo pipefail
    mount --bind "$root" "$root"
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys"
    mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev"
    mount -t tmpfs -o mode=0755 tmpfs "$root/run"
    mount --bind "$HOME/.rustup" "$root/root/.rustup"
    mount -o remount,bind,ro "$root/root/.rustup"
    local cmd t0 rc=0 times=()
    for cmd in "${commands[@]}"; do
        say "running: $cmd"
        t0=$(date +%s)
        chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
            PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            /bin/bash -c "cd /root/kairos-p2p && $cmd" </dev/null || rc=$?
        times+=("$cmd: $(($(date +%s) - t0)) s$([ "$rc" -eq 0 ] || echo " FAILED (exit $rc)")")
        say "${times[-1]}"
        [ "$rc" -eq 0 ] || break
    done
    say "summary ($(date -u +%Y-%m-%d), commit $(git -C "$root/root/kairos-p2p" rev-parse --short HEAD)):"
    printf 'clean-room:   %s\n' "${times[@]}" >&2
    return "$rc"
}
export -f inner say
export root HOME
commands_file="$base/commands"
printf '%s\n' "${commands[@]}" >"$commands_file"
unshare --mount --propagation private /bin/bash -c \
    'mapfile -t commands <"$1"; inner' _ "$commands_file" \
    || die "a command failed in the clean room (root: $root)"
say "PASSED: every set-up command of the README in a fresh Debian 12 root, $(($(date +%s) - start)) s in all"
