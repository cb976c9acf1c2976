# Shared by tests/setup-host.sh and tests/bench/setup-tools.sh (sourced, not run).

# need_cmd TOOL: TOOL is on PATH, or, when it is a path (a file a package ships, e.g. a header), exists.
need_cmd() {
  case "$1" in
    */*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

# install_missing WHO TOOL=PACKAGE...: installs, with Debian's apt, the package of every tool
# not on PATH (--no-install-recommends: wireguard-tools would otherwise pull a kernel image);
# WHO names the caller in the progress line.
install_missing() {
  local who=$1 pair
  shift
  local missing=()
  for pair in "$@"; do
    need_cmd "${pair%%=*}" || missing+=("${pair#*=}")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  echo "$who: installing ${missing[*]}"
  local attempt
  for attempt in 1 2 3; do apt-get update -qq && break || sleep $((attempt * 5)); done
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}
