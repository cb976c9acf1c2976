#!/usr/bin/env bash
# make demo [HA=1]: a k3s cluster of four kairos-p2p agents on this machine, as root.
#
# Four network namespaces on one bridge, one agent in each with the SAME cloud-config (one
# network token, LAN discovery only), each with its own state directory and its own root
# (KAIROS_P2P_ROOT); k3s is tests/k3s-standin (a stand-in that records what it is asked to do)
# unless `k3s` is on PATH. Waits until every node has its role and its k3s running, prints the
# cluster, joins from a fifth namespace with `kairos-p2p bridge`, fetches the kubeconfig with
# `kairos-p2p get-kubeconfig`, pings a worker over the VPN, and removes everything (also on
# Ctrl-C and on errors: processes by pid, namespaces by name).
#
# Environment: HA=1 (master_nodes: 2 and a KubeVIP address), K3S=standin|real (default: real
# when `k3s` is on PATH), DEMO_TIMEOUT (seconds for the cluster to form; 60, 300 with real
# k3s), DEMO_BIN (a kairos-p2p binary to use instead of building), KEEP=1 (keep the logs).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HA=${HA:-0}
NODES=4
SUBNET=10.98.0
EIP=$SUBNET.200
prefix="kpdemo-$$"
short="kd$$"
t0=$(date +%s)

say() { printf '[demo %3ss] %s\n' "$(($(date +%s) - t0))" "$*"; }
die() { printf '[demo] FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "the demo needs root (network namespaces, TUN devices): sudo make demo"
case "$HA" in 0 | 1) ;; *) die "HA must be 0 or 1, not '$HA'" ;; esac

say "installing what the demo needs (make deps)"
bash "$repo/tests/setup-host.sh"
if [ -n "${DEMO_BIN:-}" ]; then
  bin=$DEMO_BIN
  say "using $bin"
else
  say "building the agent (cargo build --release --locked; a few minutes the first time)"
  (cd "$repo" && cargo build --release --locked)
  bin=${CARGO_TARGET_DIR:-$repo/target}/release/kairos-p2p
fi
[ -x "$bin" ] || die "no binary at $bin"

K3S=${K3S:-$(command -v k3s >/dev/null 2>&1 && echo real || echo standin)}
case "$K3S" in
  standin) k3s_bin=$repo/tests/k3s-standin; default_timeout=60 ;;
  real)
    k3s_bin=$(command -v k3s) || die "K3S=real but no k3s on PATH"
    default_timeout=300
    ;;
  *) die "K3S must be standin or real, not '$K3S'" ;;
esac
TIMEOUT=${DEMO_TIMEOUT:-$default_timeout}

work=$(mktemp -d "/tmp/$prefix.XXXXXX")
namespaces=()
pids=()

# Stops everything the demo started: agents and bridge by pid (SIGTERM, then SIGKILL), then
# any process left inside the demo's namespaces (the agents' k3s), then the namespaces.
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  say "cleaning up"
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.3
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  local ns
  for ns in "${namespaces[@]}"; do
    # Whatever still runs inside the demo's namespaces (the agents' k3s), by pid.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  if [ "$status" = 0 ] && [ "${KEEP:-0}" != 1 ]; then
    rm -rf "$work"
  else
    echo "[demo] logs kept in $work (agent logs: $work/n*/agent.log)" >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

say "creating namespaces $prefix-* on one bridge ($SUBNET.0/24)"
hub=$prefix-hub
ip netns add "$hub"
namespaces+=("$hub")
ip -n "$hub" link add br0 type bridge
ip -n "$hub" link set br0 up
add_host() { # name index
  local ns=$prefix-$1 veth=$short$1
  ip netns add "$ns"
  namespaces+=("$ns")
  ip link add "$veth" type veth peer name eth0 netns "$ns"
  ip link set "$veth" netns "$hub"
  ip -n "$hub" link set "$veth" master br0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$SUBNET.$2/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default dev eth0
}
for i in $(seq 1 $NODES); do add_host "n$i" "$i"; done
add_host b 100

token=$("$bin" generate-token)
config=$work/config.yaml
{
  echo "#cloud-config"
  echo "p2p:"
  echo "  network_token: \"$token\""
  echo "  disable_dht: true"
  if [ "$HA" = 1 ]; then
    echo "  auto:"
    echo "    ha:"
    echo "      master_nodes: 2"
    echo "kubevip:"
    echo "  eip: $EIP"
  fi
} >"$config"
chmod 600 "$config"
"$bin" validate --config "$config" >/dev/null || die "the demo's config does not validate"
if [ "$HA" = 1 ]; then
  say "one config for all nodes: a new token, LAN discovery, HA (master_nodes: 2), KubeVIP $EIP"
else
  say "one config for all nodes: a new token, LAN discovery, HA off"
fi
say "k3s: $K3S ($k3s_bin)"

# status.py: one line per node and whether the cluster has formed (exit 0).
cat >"$work/status.py" <<'EOF'
import json, os, re, socket, sys

def get(sock, target):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(3)
        s.connect(sock)
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data.partition(b"\r\n\r\n")[2].decode(errors="replace")
    except OSError:
        return ""

def standin_state(root):
    """The stand-in's state for the newest k3s process under root that is still running."""
    try:
        lines = [json.loads(l) for l in open(os.path.join(root, "var/log/k3s-standin.log"))]
    except (OSError, ValueError):
        return None
    for rec in reversed(lines):
        if rec.get("event") == "ready" and os.path.exists(f"/proc/{rec['pid']}"):
            return f"{rec['mode']} {rec.get('init') or rec.get('outcome')}"
    if lines and lines[-1].get("event") == "error":
        return f"{lines[-1]['mode']} failed"
    if lines:
        return f"{lines[-1]['mode']} starting"
    return None

formed = True
rows = [("NODE", "UUID", "VPN ADDRESS", "ROLE", "K3S")]
for arg in sys.argv[1:]:
    name, state, root = arg.split(",")
    summary = {}
    try:
        summary = json.loads(get(os.path.join(state, "api.sock"), "/api/summary") or "{}")
    except ValueError:
        pass
    metrics = get(os.path.join(state, "api.sock"), "/metrics")
    k3s = None
    for m in re.finditer(r'^kairos_p2p_k3s_state\{[^}]*state="([^"]+)"[^}]*\} 1$', metrics, re.M):
        k3s = m.group(1)
    k3s_ok = k3s in ("running", "ready", "up", "joined")
    standin = standin_state(root)
    if standin:
        k3s_ok = k3s_ok or not standin.endswith(("starting", "failed"))
        k3s = f"{k3s} ({standin})" if k3s else standin
    role = summary.get("Role") or ""
    address = summary.get("Address") or ""
    formed = formed and bool(role) and bool(address) and k3s_ok
    rows.append((name, summary.get("UUID") or "-", address or "-", role or "-", k3s or "-"))
widths = [max(len(r[i]) for r in rows) for i in range(5)]
for r in rows:
    print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
sys.exit(0 if formed else 1)
EOF

start=$(date +%s)
start_ms=$(date +%s%3N)
node_args=()
for i in $(seq 1 $NODES); do
  dir=$work/n$i
  mkdir -p "$dir/state" "$dir/root"
  ip netns exec "$prefix-n$i" env \
    UUID="demo-node-$i-$$" \
    KAIROS_P2P_STATE_DIR="$dir/state" \
    KAIROS_P2P_ROOT="$dir/root" \
    KAIROS_P2P_K3S="$k3s_bin" \
    "$bin" agent --config "$config" >"$dir/agent.log" 2>&1 &
  pids+=($!)
  node_args+=("n$i,$dir/state,$dir/root")
done
say "started $NODES agents (pids ${pids[*]}); waiting up to ${TIMEOUT}s for roles and k3s"

last_print=0
until python3 "$work/status.py" "${node_args[@]}" >"$work/status.txt"; do
  now=$(date +%s)
  for i in $(seq 1 $NODES); do
    kill -0 "${pids[$((i - 1))]}" 2>/dev/null || {
      tail -n 20 "$work/n$i/agent.log" >&2
      die "the agent of n$i exited (log above)"
    }
  done
  if [ $((now - start)) -ge "$TIMEOUT" ]; then
    cat "$work/status.txt" >&2
    for i in $(seq 1 $NODES); do
      echo "--- n$i agent.log (last lines)" >&2
      grep -E ' (INFO|WARN|ERROR) |k3s' "$work/n$i/agent.log" | tail -n 8 >&2 || true
    done
    die "the cluster did not form within ${TIMEOUT}s (table above: every node needs a role and a running k3s)"
  fi
  if [ $((now - last_print)) -ge 5 ]; then
    say "forming: $(tail -n +2 "$work/status.txt" | awk '{printf "%s=%s/%s ", $1, $4, $5}')"
    last_print=$now
  fi
  sleep 0.2
done
formed_ms=$(($(date +%s%3N) - start_ms))
formed_in=$(printf '%d.%01d' $((formed_ms / 1000)) $((formed_ms % 1000 / 100)))
say "cluster formed in ${formed_in}s (agents started to every k3s running, polled every 0.2 s):"
cat "$work/status.txt"

worker=$(awk '$4 == "worker" {print $3; exit}' "$work/status.txt")
say "joining from a fifth namespace: kairos-p2p bridge --token-file <file> (kairos0, 10.1.0.254)"
bdir=$work/bridge
mkdir -p "$bdir"
# The token from a 0600 file, never on a command line (where every user could read it).
(umask 077 && printf '%s\n' "$token" >"$bdir/token")
# Its own state and root: Kairos' API socket /run/edgevpn-kairos.sock lands under $bdir/root.
bridge_env=(KAIROS_P2P_STATE_DIR="$bdir/state" KAIROS_P2P_ROOT="$bdir/root")
ip netns exec "$prefix-b" env "${bridge_env[@]}" \
  "$bin" bridge --token-file "$bdir/token" >"$bdir/bridge.log" 2>&1 &
pids+=($!)

say "kairos-p2p get-kubeconfig (as root: through the bridge's socket /run/edgevpn-kairos.sock)"
got=0
for _ in $(seq 1 60); do
  if ip netns exec "$prefix-b" env "${bridge_env[@]}" "$bin" get-kubeconfig \
    >"$bdir/kubeconfig" 2>"$bdir/kubeconfig.err"; then
    got=1
    break
  fi
  sleep 0.5
done
[ "$got" = 1 ] || { cat "$bdir/kubeconfig.err" >&2; tail -n 20 "$bdir/bridge.log" >&2; die "get-kubeconfig failed"; }
say "kubeconfig: $(wc -l <"$bdir/kubeconfig") lines, $(grep -m1 'server:' "$bdir/kubeconfig" | xargs)"

if [ -n "$worker" ]; then
  say "ping a worker over the VPN from the bridge: $worker"
  ping_ok=0
  for _ in $(seq 1 20); do
    if ip netns exec "$prefix-b" ping -c 3 -i 0.3 -W 2 -q "$worker" >"$bdir/ping.txt" 2>&1; then
      ping_ok=1
      break
    fi
    sleep 0.5
  done
  [ "$ping_ok" = 1 ] || { cat "$bdir/ping.txt" >&2; die "the bridge cannot ping $worker"; }
  sed -n 's/^rtt /  rtt /p' "$bdir/ping.txt"
else
  die "no worker in the table"
fi

if [ "$K3S" = standin ]; then
  logs=("$work"/n*/root/var/log/k3s-standin.log)
  servers=$(cat "${logs[@]}" 2>/dev/null | grep -c '"mode": "server", "event": "ready"' || true)
  agents=$(cat "${logs[@]}" 2>/dev/null | grep -c '"mode": "agent", "event": "ready"' || true)
  say "k3s stand-in: $servers server(s) and $agents agent(s) running (logs: <root>/var/log/k3s-standin.log)"
fi
say "done: $NODES nodes formed a cluster in ${formed_in}s (HA=$HA, k3s: $K3S)"
