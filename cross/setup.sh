#!/usr/bin/env bash
# Install what `make cross` needs on Debian 12 (bookworm), idempotently:
#   - Debian's rustc (rustc-web) + host std at a version V that also exists for arm64 and armhf,
#   - the ARM standard libraries of that same V, unpacked into /usr/lib/rustlib/<target>,
#   - the cross linkers (gcc-aarch64-linux-gnu, gcc-arm-linux-gnueabihf), qemu-user-static, file.
# A second run with everything in place returns in well under a second without touching apt.
# See cross/README.md and shared/CROSS.md for why the ARM libraries are not `apt-get install`ed.
set -euo pipefail

TARGETS_ARCHES=("aarch64-unknown-linux-gnu:arm64" "armv7-unknown-linux-gnueabihf:armhf")
# libc6-dev-*-cross (crt1.o, libc.a, ...) is only a Recommends of the gcc cross packages, which
# --no-install-recommends skips: without it the static link fails with "cannot find crt1.o".
# The programs the cross build and tests run, tool=package (tests/tool_guard.rs reads this table).
CROSS_TOOLS=(aarch64-linux-gnu-gcc=gcc-aarch64-linux-gnu arm-linux-gnueabihf-gcc=gcc-arm-linux-gnueabihf
             qemu-aarch64-static=qemu-user-static qemu-arm-static=qemu-user-static file=file)
HOST_PKGS=(libc6-dev-arm64-cross libc6-dev-armhf-cross)
for pair in "${CROSS_TOOLS[@]}"; do
    case " ${HOST_PKGS[*]} " in *" ${pair#*=} "*) ;; *) HOST_PKGS+=("${pair#*=}") ;; esac
done
RUSTLIB=/usr/lib/rustlib
STAMP=.kairos-debian-version   # inside each /usr/lib/rustlib/<target>: the Debian V it came from
export DEBIAN_FRONTEND=noninteractive

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (apt-get, dpkg and /usr/lib/rustlib need it)"
command -v apt-get >/dev/null || die "needs a Debian system with apt-get"

installed_version() { # PKG -> version if installed, else empty
    dpkg-query -W -f='${db:Status-Status} ${Version}\n' "$1" 2>/dev/null \
        | awk '$1 == "installed" { print $2 }'
}

# ---------------------------------------------------------------- fast path: already set up?
already_done() {
    local v p t a
    v="$(installed_version rustc-web)"
    [ -n "$v" ] || return 1
    [ "$(installed_version libstd-rust-web-dev)" = "$v" ] || return 1
    for p in "${HOST_PKGS[@]}"; do [ -n "$(installed_version "$p")" ] || return 1; done
    for ta in "${TARGETS_ARCHES[@]}"; do
        t="${ta%%:*}"
        [ -d "$RUSTLIB/$t/lib" ] || return 1
        [ "$(cat "$RUSTLIB/$t/$STAMP" 2>/dev/null)" = "$v" ] || return 1
    done
    /usr/bin/rustc --version 2>/dev/null | grep -q '^rustc 1\.85\.' || return 1
}

check_result() {
    local t ta out
    out="$(/usr/bin/rustc --version)" || die "/usr/bin/rustc does not run"
    case "$out" in rustc\ 1.85.*) ;; *) die "/usr/bin/rustc is '$out', expected 1.85.x" ;; esac
    for ta in "${TARGETS_ARCHES[@]}"; do
        t="${ta%%:*}"
        [ -d "$RUSTLIB/$t/lib" ] || die "$RUSTLIB/$t/lib missing"
        ls "$RUSTLIB/$t/lib"/libstd-*.rlib >/dev/null 2>&1 || die "no libstd rlib in $RUSTLIB/$t/lib"
    done
    for p in "${CROSS_TOOLS[@]}"; do
        command -v "${p%%=*}" >/dev/null || die "${p%%=*} not on PATH"
    done
    for p in /usr/aarch64-linux-gnu/lib/libc.a /usr/arm-linux-gnueabihf/lib/libc.a; do
        [ -f "$p" ] || die "$p missing (static glibc for the cross link)"
    done
    log "OK: $out (Debian $(installed_version rustc-web)); targets: $(
        for ta in "${TARGETS_ARCHES[@]}"; do printf '%s ' "${ta%%:*}"; done)"
}

if [ "${1:-}" != "--force" ] && already_done; then
    check_result
    exit 0
fi

# ---------------------------------------------------------------- apt-get update, with retries
apt_update() {
    local i log=/tmp/kairos-cross-apt-update.log
    for i in 1 2 3 4; do
        # Acquire::Retries covers single-file hiccups; the loop covers "File has unexpected size
        # ... Mirror sync in progress?", which makes the whole apt-get update exit non-zero.
        if apt-get update -o Acquire::Retries=3 >"$log" 2>&1 && ! grep -q '^E:' "$log"; then
            return 0
        fi
        grep -E '^(W|E):' "$log" | head -n 4 | sed 's/^/  /' >&2 || true
        [ "$i" -lt 4 ] || break
        log "apt-get update failed (try $i/4), retrying in $((i * 5))s"
        sleep $((i * 5))
    done
    # A foreign-architecture index (seen: bookworm-security binary-armhf) can stay out of sync for
    # hours. Only amd64 failures are fatal; a missing foreign index just narrows the choice of V.
    if grep '^E: Failed to fetch' "$log" | grep -qv -e '/binary-arm64/' -e '/binary-armhf/'; then
        die "apt-get update kept failing for the host architecture; see $log"
    fi
    log "WARNING: some arm64/armhf indexes could not be fetched (above); going on with the others"
}

for a in arm64 armhf; do
    dpkg --print-foreign-architectures | grep -qx "$a" || { log "adding architecture $a"; dpkg --add-architecture "$a"; }
done
log "apt-get update"
apt_update

# ---------------------------------------------------------------- compute V
# Versions (one a line) of PKG[:ARCH] that the archive offers.
madison() { apt-cache madison "$1" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | sort -u; }

candidates="$(madison rustc-web)"
for spec in libstd-rust-web-dev libstd-rust-web-1.85 \
            libstd-rust-web-dev:arm64 libstd-rust-web-1.85:arm64 \
            libstd-rust-web-dev:armhf libstd-rust-web-1.85:armhf; do
    candidates="$(comm -12 <(printf '%s\n' "$candidates") <(madison "$spec"))"
done
V=""
while read -r c; do
    [ -n "$c" ] || continue
    if [ -z "$V" ] || dpkg --compare-versions "$c" gt "$V"; then V="$c"; fi
done <<<"$candidates"
[ -n "$V" ] || die "no rustc-web/libstd-rust-web version exists for amd64, arm64 and armhf alike
  rustc-web: $(madison rustc-web | tr '\n' ' ')
  libstd-rust-web-dev:arm64: $(madison libstd-rust-web-dev:arm64 | tr '\n' ' ')
  libstd-rust-web-dev:armhf: $(madison libstd-rust-web-dev:armhf | tr '\n' ' ')"
log "V = $V (newest version offered for amd64, arm64 and armhf alike)"

# ---------------------------------------------------------------- host packages
log "installing rustc-web=$V and ${HOST_PKGS[*]}"
apt-get install -y --no-install-recommends --allow-downgrades \
    "rustc-web=$V" "libstd-rust-web-dev=$V" "libstd-rust-web-1.85=$V" "${HOST_PKGS[@]}" \
    >/tmp/kairos-cross-apt-install.log 2>&1 \
    || { tail -n 30 /tmp/kairos-cross-apt-install.log >&2; die "apt-get install failed"; }

# ---------------------------------------------------------------- ARM standard libraries
# Not `apt-get install pkg:arm64`: that drags in foreign-arch libraries (liblzma5, libxml2, ...)
# whose versions clash with the host's. We only need the rlibs under usr/lib/rustlib/<target>.
tmp="$(mktemp -d /tmp/kairos-cross-setup.XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"   # apt-get download drops privileges to _apt; let it write here
for ta in "${TARGETS_ARCHES[@]}"; do
    t="${ta%%:*}"; a="${ta##*:}"
    mkdir -p "$tmp/$a/deb" "$tmp/$a/root"
    chmod 777 "$tmp/$a/deb"
    log "downloading libstd-rust-web-dev:$a=$V libstd-rust-web-1.85:$a=$V"
    (cd "$tmp/$a/deb" && apt-get download -q "libstd-rust-web-dev:$a=$V" "libstd-rust-web-1.85:$a=$V") \
        >"$tmp/$a/download.log" 2>&1 || { cat "$tmp/$a/download.log" >&2; die "apt-get download ($a) failed"; }
    for deb in "$tmp/$a/deb"/*.deb; do dpkg -x "$deb" "$tmp/$a/root"; done
    [ -d "$tmp/$a/root/usr/lib/rustlib/$t/lib" ] || die "the $a packages have no usr/lib/rustlib/$t/lib"
    # The -dev package may hold symlinks into usr/lib/<triplet>/ (the dylib std); resolve them so
    # the copy in /usr/lib/rustlib is self-contained (static builds only need the .rlib files).
    rm -rf "${RUSTLIB:?}/$t.new"
    mkdir -p "$RUSTLIB/$t.new"
    (cd "$tmp/$a/root/usr/lib/rustlib/$t" && tar -chf - .) | tar -xf - -C "$RUSTLIB/$t.new"
    printf '%s\n' "$V" >"$RUSTLIB/$t.new/$STAMP"
    rm -rf "${RUSTLIB:?}/$t"
    mv "$RUSTLIB/$t.new" "$RUSTLIB/$t"
    log "installed $RUSTLIB/$t"
done

check_result
