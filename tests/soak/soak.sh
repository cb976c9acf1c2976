#!/usr/bin/env bash
# make soak [DURATION=3600]: 10 kairos-p2p agents under traffic for DURATION seconds, as root.
#
# Ten network namespaces `kpsoak-<pid>-n1..n10` on one bridge (10.97.0.0/24), one agent in each
# with the same cloud-config (a new token, `disable_dht: true`) except its static VPN address
# (`p2p.vpn.env.ADDRESS: 10.1.0.<i>/24`, `DHCP: false`); each has its own state directory and
# root (`KAIROS_P2P_ROOT`) under the work dir. No k3s by default: the agents retry it every 30 s.
# While the soak runs:
#   - iperf3 bursts every IPERF_EVERY s (60): IPERF_PAIRS (2) random pairs, IPERF_SECS (5) s
#     each, over the VPN addresses; first a ring where every agent sends and receives once (and
#     a restarted agent sends to and receives from a neighbour), since an agent's first bursts
#     allocate buffers (RSS steps of ~1-1.5 MB that stay flat) that are warm-up, not growth;
#   - ledger writes every LEDGER_EVERY s (15) through a random agent's API (<state>/api.sock):
#     a PUT with a new value, and every fourth time a DELETE of a key;
#   - churn every CHURN_EVERY s (300; DURATION/3 for runs shorter than 15 min): kill -9 one
#     random agent other than n1 and restart it with the same state dir (a new incarnation);
#   - every SAMPLE_EVERY s (10), tests/soak/report.py samples each agent: VmRSS, VmHWM,
#     threads, open fds, utime+stime.
# At the end tests/soak/report.py prints the report (RSS at the end of the warm-up vs the end,
# the least-squares RSS slope after the warm-up in MB/hour, fds, CPU) with PASS/FAIL lines; the
# samples stay in <work dir>/samples.csv. Exit status: 0 whatever the PASS/FAIL lines say,
# non-zero only when the harness itself failed (set-up, the overlay never came up, ...).
# Everything is removed on exit, Ctrl-C or error: processes by pid, namespaces by name. The work
# dir (samples, events, agent logs) is kept and its path printed.
#
# Environment: DURATION (seconds, default 3600), SOAK_BIN (a kairos-p2p binary instead of
# target/release/kairos-p2p), SOAK_K3S=none|standin (default none; standin: tests/k3s-standin),
# and the *_EVERY / IPERF_* knobs above.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NODES=10
SUBNET=10.97.0
VPN=10.1.0
DURATION=${DURATION:-3600}
SAMPLE_EVERY=${SAMPLE_EVERY:-10}
IPERF_EVERY=${IPERF_EVERY:-60}
IPERF_PAIRS=${IPERF_PAIRS:-2}
IPERF_SECS=${IPERF_SECS:-5}
LEDGER_EVERY=${LEDGER_EVERY:-15}
if [ "$DURATION" -ge 900 ]; then default_churn=300; else default_churn=$((DURATION / 3)); fi
CHURN_EVERY=${CHURN_EVERY:-$default_churn}
SOAK_K3S=${SOAK_K3S:-none}
FORM_TIMEOUT=${FORM_TIMEOUT:-120}
prefix="kpsoak-$$"
short="ks$$"
t0=$(date +%s)

say() { printf '[soak %5ss] %s\n' "$(($(date +%s) - t0))" "$*"; }
die() {
  printf '[soak] FAILED: %s\n' "$*" >&2
  exit 1
}

[ "$(id -u)" = 0 ] || die "the soak needs root (network namespaces, TUN devices): sudo make soak"
if ! [[ "$DURATION" =~ ^[0-9]+$ ]] || [ "$DURATION" -lt 60 ]; then die "DURATION must be >= 60 seconds, not '$DURATION'"; fi
[ "$CHURN_EVERY" -ge 30 ] || die "CHURN_EVERY must be >= 30 seconds"
case "$SOAK_K3S" in none | standin) ;; *) die "SOAK_K3S must be none or standin, not '$SOAK_K3S'" ;; esac

# shellcheck source=tests/packages.sh
. "$repo/tests/packages.sh"
install_missing soak iperf3=iperf3 curl=curl python3=python3 ip=iproute2
bin=${SOAK_BIN:-${CARGO_TARGET_DIR:-$repo/target}/release/kairos-p2p}
[ -x "$bin" ] || die "no binary at $bin (make soak builds it: cargo build --release --locked)"

work=$(mktemp -d "/tmp/$prefix.XXXXXX")
namespaces=()
helpers=()          # sampler, iperf3 processes: by pid
declare -a agent    # agent pid per node (index 1..NODES)
declare -a incarn   # incarnation per node
events=$work/events.log
: >"$events"
interrupted=0

event() { # kind detail...: one line in events.log (seconds since the soak started)
  local kind=$1
  shift
  echo "$(($(date +%s) - soak_start)) $kind $*" >>"$events"
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  [ "$interrupted" = 1 ] && status=130
  say "cleaning up"
  local pid i ns
  for pid in "${helpers[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for i in "${!agent[@]}"; do kill -TERM "${agent[$i]}" 2>/dev/null || true; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    local alive=0
    for i in "${!agent[@]}"; do kill -0 "${agent[$i]}" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.3
  done
  for i in "${!agent[@]}"; do kill -KILL "${agent[$i]}" 2>/dev/null || true; done
  for pid in "${helpers[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for ns in "${namespaces[@]}"; do
    # Whatever still runs inside the soak's namespaces (k3s stand-ins, iperf3), by pid.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  echo "[soak] work dir kept: $work (samples.csv, events.log, n*/agent.log)" >&2
  exit "$status"
}
trap cleanup EXIT
trap 'interrupted=1' INT TERM

say "work dir $work; namespaces $prefix-* on one bridge ($SUBNET.0/24)"
hub=$prefix-hub
ip netns add "$hub"
namespaces+=("$hub")
ip -n "$hub" link add br0 type bridge
ip -n "$hub" link set br0 up
for i in $(seq 1 $NODES); do
  ns=$prefix-n$i
  veth=${short}n$i
  ip netns add "$ns"
  namespaces+=("$ns")
  ip link add "$veth" type veth peer name eth0 netns "$ns"
  ip link set "$veth" netns "$hub"
  ip -n "$hub" link set "$veth" master br0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default dev eth0
done

token=$("$bin" generate-token)
for i in $(seq 1 $NODES); do
  mkdir -p "$work/n$i/state" "$work/n$i/root"
  cat >"$work/n$i/config.yaml" <<EOF
#cloud-config
p2p:
  network_token: "$token"
  disable_dht: true
  vpn:
    env:
      ADDRESS: "$VPN.$i/24"
      DHCP: "false"
EOF
  chmod 600 "$work/n$i/config.yaml"
done
"$bin" validate --config "$work/n1/config.yaml" >/dev/null || die "the soak's config does not validate"

k3s_env=()
if [ "$SOAK_K3S" = standin ]; then
  k3s_env=(KAIROS_P2P_K3S="$repo/tests/k3s-standin")
elif command -v k3s >/dev/null 2>&1; then
  # A k3s on PATH would be run for real: point the agents at a path that does not exist.
  k3s_env=(KAIROS_P2P_K3S="$work/no-k3s")
fi

start_agent() { # node
  local i=$1
  incarn[i]=$((${incarn[i]:-0} + 1))
  {
    echo "=== incarnation ${incarn[$i]} $(date -Is)"
  } >>"$work/n$i/agent.log"
  ip netns exec "$prefix-n$i" env \
    UUID="soak-node-$i-$$" \
    KAIROS_P2P_STATE_DIR="$work/n$i/state" \
    KAIROS_P2P_ROOT="$work/n$i/root" \
    KAIROS_P2P_LOG=info \
    "${k3s_env[@]}" \
    "$bin" agent --config "$work/n$i/config.yaml" >>"$work/n$i/agent.log" 2>&1 </dev/null &
  agent[i]=$!
  # The sampler reads this file: "pid incarnation" (replaced atomically).
  echo "${agent[$i]} ${incarn[$i]}" >"$work/n$i/pid.tmp"
  mv "$work/n$i/pid.tmp" "$work/n$i/pid"
}

# alive PID: running and not a zombie (the agents are our children until we reap them).
alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

soak_start=$(date +%s)
for i in $(seq 1 $NODES); do start_agent "$i"; done
say "started $NODES agents (pids ${agent[*]}), k3s: $SOAK_K3S; sampling every ${SAMPLE_EVERY}s"
python3 "$repo/tests/soak/report.py" sample --work "$work" --nodes "$NODES" \
  --every "$SAMPLE_EVERY" --start "$soak_start" >"$work/sampler.log" 2>&1 &
sampler=$!
helpers+=("$sampler")

api() { # node method path: curl over the agent's unix socket; prints the body
  curl -s -f --max-time 5 --unix-socket "$work/n$1/state/api.sock" -X "$2" "http://localhost$3"
}

# The overlay must come up before the traffic means anything: every node's API answers and n1
# pings every other node over the VPN.
say "waiting up to ${FORM_TIMEOUT}s for the overlay (API sockets, n1 pings every VPN address)"
formed=0
while [ $(($(date +%s) - soak_start)) -lt "$FORM_TIMEOUT" ]; do
  [ "$interrupted" = 1 ] && exit 130
  for i in $(seq 1 $NODES); do alive "${agent[$i]}" || { tail -n 20 "$work/n$i/agent.log" >&2; die "the agent of n$i exited during start-up"; }; done
  ok=1
  for i in $(seq 1 $NODES); do api "$i" GET /api/summary >/dev/null 2>&1 || { ok=0; break; }; done
  if [ "$ok" = 1 ]; then
    for i in $(seq 2 $NODES); do
      ip netns exec "$prefix-n1" ping -c 1 -W 1 -q "$VPN.$i" >/dev/null 2>&1 || { ok=0; break; }
    done
  fi
  if [ "$ok" = 1 ]; then formed=1; break; fi
  sleep 1
done
[ "$formed" = 1 ] || die "the overlay did not come up within ${FORM_TIMEOUT}s (logs: $work/n*/agent.log)"
event formed "overlay up"
say "overlay up after $(($(date +%s) - soak_start))s; soak runs until ${DURATION}s (iperf3 every ${IPERF_EVERY}s, ledger every ${LEDGER_EVERY}s, churn every ${CHURN_EVERY}s)"

port=5400
# iperf_burst [a-b ...]: the given pairs (a sends to b) at once, else IPERF_PAIRS random ones.
iperf_burst() {
  local k a b used=" " clients=() servers=() pairs=() want=("$@")
  if [ "${#want[@]}" = 0 ]; then
    for k in $(seq 1 "$IPERF_PAIRS"); do
      # Distinct random pairs.
      for _ in $(seq 1 20); do
        a=$((RANDOM % NODES + 1))
        b=$((RANDOM % NODES + 1))
        [ "$a" != "$b" ] && [[ "$used" != *" $a-$b "* ]] && break
      done
      used+="$a-$b "
      want+=("$a-$b")
    done
  fi
  for k in "${want[@]}"; do
    a=${k%-*}
    b=${k#*-}
    port=$((port + 1))
    [ "$port" -gt 5499 ] && port=5401
    timeout $((IPERF_SECS + 30)) ip netns exec "$prefix-n$b" iperf3 -s -1 -p "$port" \
      >>"$work/iperf3-server.log" 2>&1 </dev/null &
    servers+=($!)
    helpers+=($!)
    pairs+=("$a $b $port")
  done
  sleep 0.5
  for k in "${!pairs[@]}"; do
    read -r a b p <<<"${pairs[$k]}"
    timeout $((IPERF_SECS + 20)) ip netns exec "$prefix-n$a" iperf3 -c "$VPN.$b" -p "$p" \
      -t "$IPERF_SECS" -f m >"$work/iperf3-client-$k.out" 2>&1 </dev/null &
    clients+=($!)
    helpers+=($!)
  done
  for k in "${!clients[@]}"; do
    read -r a b p <<<"${pairs[$k]}"
    if wait "${clients[$k]}"; then
      local mbps
      mbps=$(awk '/receiver/ {for (f = 1; f <= NF; f++) if ($f ~ /bits\/sec/) print $(f - 1)}' \
        "$work/iperf3-client-$k.out" | tail -n 1)
      event iperf_ok "n$a->n$b ${mbps:-?} Mbit/s"
    else
      event iperf_fail "n$a->n$b $(tail -n 1 "$work/iperf3-client-$k.out" | tr -s ' ')"
    fi
  done
  for k in "${servers[@]}"; do
    kill -TERM "$k" 2>/dev/null || true
    wait "$k" 2>/dev/null || true
  done
  helpers=("$sampler")
}

ledger_n=0
ledger_write() {
  local i=$((RANDOM % NODES + 1)) key
  ledger_n=$((ledger_n + 1))
  key=k$((RANDOM % 16))
  if api "$i" PUT "/api/ledger/soak/$key/v$ledger_n-$(date +%s)" >/dev/null 2>&1; then
    event ledger_ok "n$i PUT soak/$key"
  else
    event ledger_fail "n$i PUT soak/$key"
  fi
  if [ $((ledger_n % 4)) = 0 ]; then
    key=k$((RANDOM % 16))
    if api "$i" DELETE "/api/ledger/soak/$key" >/dev/null 2>&1; then
      event ledger_ok "n$i DELETE soak/$key"
    else
      event ledger_fail "n$i DELETE soak/$key"
    fi
  fi
  if [ $((ledger_n % 20)) = 0 ]; then
    # A whole bucket now and then, written and dropped.
    api "$i" PUT "/api/ledger/soak-tmp/x/$ledger_n" >/dev/null 2>&1 || true
    if api "$i" DELETE "/api/ledger/soak-tmp" >/dev/null 2>&1; then
      event ledger_ok "n$i DELETE soak-tmp"
    else
      event ledger_fail "n$i DELETE soak-tmp"
    fi
  fi
}

churn() {
  local i=$((RANDOM % (NODES - 1) + 2)) old
  old=${agent[$i]}
  kill -KILL "$old" 2>/dev/null || true
  wait "$old" 2>/dev/null || true
  # Orphans of that incarnation (a k3s stand-in) go too, iperf3 is not touched.
  local pid
  for pid in $(ip netns pids "$prefix-n$i" 2>/dev/null); do
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = iperf3 ] || kill -KILL "$pid" 2>/dev/null || true
  done
  sleep 2
  start_agent "$i"
  event churn "n$i killed (pid $old), restarted as pid ${agent[$i]} (incarnation ${incarn[$i]})"
  # The new incarnation sends and receives once within its own warm-up (priming, as above).
  local j=$((i % NODES + 1)) _t
  for _t in $(seq 1 30); do
    ip netns exec "$prefix-n$j" ping -c 1 -W 1 -q "$VPN.$i" >/dev/null 2>&1 && break
    sleep 1
  done
  iperf_burst "$i-$j" "$j-$i"
  say "churn: n$i kill -9 pid $old, restarted as pid ${agent[$i]} (incarnation ${incarn[$i]})"
}

# Priming: every agent sends and receives once (a ring) during the warm-up, so that the buffers
# a first burst allocates (a step of ~1-1.5 MB that then stays flat) are not counted as growth.
ring=()
for i in $(seq 1 $NODES); do ring+=("$i-$((i % NODES + 1))"); done
say "priming: iperf3 ring over the VPN (every agent sends and receives once)"
iperf_burst "${ring[@]}"
next_iperf=$(($(date +%s) - soak_start + 5))
next_ledger=$(($(date +%s) - soak_start))
next_churn=$CHURN_EVERY
next_status=60
while :; do
  [ "$interrupted" = 1 ] && break
  now=$(($(date +%s) - soak_start))
  [ "$now" -ge "$DURATION" ] && break
  kill -0 "$sampler" 2>/dev/null || die "the sampler exited ($(tail -n 3 "$work/sampler.log"))"
  for i in $(seq 1 $NODES); do
    if ! alive "${agent[$i]}"; then
      rc=0
      wait "${agent[$i]}" 2>/dev/null || rc=$?
      event unexpected_exit "n$i pid ${agent[$i]} exit $rc"
      say "n$i (pid ${agent[$i]}) exited on its own (status $rc); restarting it"
      tail -n 5 "$work/n$i/agent.log" >&2
      start_agent "$i"
    fi
  done
  if [ "$now" -ge "$next_churn" ] && [ $((now + 30)) -lt "$DURATION" ]; then
    churn
    next_churn=$((next_churn + CHURN_EVERY))
  fi
  if [ "$now" -ge "$next_ledger" ]; then
    ledger_write
    next_ledger=$((next_ledger + LEDGER_EVERY))
  fi
  if [ "$now" -ge "$next_iperf" ] && [ $((now + IPERF_SECS + 5)) -lt "$DURATION" ]; then
    iperf_burst
    next_iperf=$((next_iperf + IPERF_EVERY))
  fi
  if [ "$now" -ge "$next_status" ]; then
    say "$(grep -c ' iperf_ok ' "$events" || true) iperf3 ok / $(grep -c ' iperf_fail ' "$events" || true) failed, $(grep -c ' ledger_ok ' "$events" || true) ledger ok / $(grep -c ' ledger_fail ' "$events" || true) failed, $(grep -c ' churn ' "$events" || true) churns, $(($(wc -l <"$work/samples.csv") - 1)) samples"
    next_status=$((next_status + 60))
  fi
  sleep 1
done
end=$(($(date +%s) - soak_start))
[ "$interrupted" = 1 ] && say "interrupted at ${end}s: reporting on the samples so far"
kill -TERM "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
event end "soak ended"

python3 "$repo/tests/soak/report.py" report --work "$work" --duration "$end" \
  --planned "$DURATION" || die "the report failed"
echo "samples: $work/samples.csv"
