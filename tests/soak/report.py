#!/usr/bin/env python3
"""The soak's sampler and report (tests/soak/soak.sh).

  report.py sample --work DIR --nodes N --every S --start EPOCH
      every S seconds, for each node, reads DIR/n<i>/pid ("pid incarnation") and appends a row
      to DIR/samples.csv: t (seconds since EPOCH), node, incarnation, pid, VmRSS and VmHWM (kB),
      threads, open fds, CPU ticks (utime+stime). Runs until killed.

  report.py report --work DIR --duration SECONDS [--planned SECONDS]
      the report: per node and overall, RSS at the end of the warm-up vs the end, least-squares
      RSS slope after the warm-up (MB/hour, 1 MB = 2^20 bytes), fd min/max and slope, CPU
      seconds; PASS/FAIL against the goals. Exit 0 whatever the verdict (1: no data at all).

Warm-up: the first 20 % of the run or 2 minutes, whichever is longer. Every incarnation of a node
(a restart after churn starts a new one) gets its own warm-up from its own start; a node's slope
is the one of its longest post-warm-up incarnation.
"""

import argparse
import csv
import os
import signal
import sys
import time

FIELDS = ["t", "node", "incarnation", "pid", "rss_kb", "hwm_kb", "threads", "fds", "cpu_ticks"]
GOAL_MB_PER_HOUR = 1.0
MIN_WARMUP = 120.0


def read_proc(pid):
    """(rss_kb, hwm_kb, threads, fds, cpu_ticks) or None when pid is gone or a zombie."""
    try:
        status = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                status[k] = v.strip()
        if status.get("State", "").startswith("Z") or "VmRSS" not in status:
            return None
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        rest = stat[stat.rindex(")") + 2 :].split()
        cpu = int(rest[11]) + int(rest[12])  # fields 14 and 15: utime, stime
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        kb = lambda k: int(status[k].split()[0])
        return kb("VmRSS"), kb("VmHWM"), int(status.get("Threads", 0)), fds, cpu
    except (OSError, ValueError, IndexError, KeyError):
        return None


def sample(a):
    path = os.path.join(a.work, "samples.csv")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        f.flush()
        nxt = time.time()
        while not stop:
            t = time.time()
            for i in range(1, a.nodes + 1):
                try:
                    with open(os.path.join(a.work, f"n{i}", "pid")) as p:
                        pid, inc = p.read().split()
                except (OSError, ValueError):
                    continue
                r = read_proc(pid)
                if r is not None:
                    w.writerow([f"{t - a.start:.1f}", i, inc, pid, *r])
            f.flush()
            nxt += a.every
            while not stop and time.time() < nxt:
                time.sleep(min(0.5, max(0.0, nxt - time.time())))


def slope(xs, ys):
    """Least-squares slope dy/dx, or None with fewer than 3 points."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def fmt(v, spec="+.2f", none="-"):
    return none if v is None else format(v, spec)


def report(a):
    path = os.path.join(a.work, "samples.csv")
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            rows.append(
                {k: (float(v) if k == "t" else int(v)) for k, v in r.items() if k in FIELDS}
            )
    if not rows:
        print("[soak] no samples", file=sys.stderr)
        return 1
    tick = os.sysconf("SC_CLK_TCK")
    warm = max(0.2 * a.duration, MIN_WARMUP)
    events = []
    try:
        with open(os.path.join(a.work, "events.log")) as f:
            events = [l.rstrip("\n").split(" ", 2) for l in f if l.strip()]
    except OSError:
        pass
    count = lambda kind: sum(1 for e in events if len(e) > 1 and e[1] == kind)

    nodes = sorted({r["node"] for r in rows})
    print()
    print(f"=== soak report: {len(nodes)} agents, {a.duration:.0f} s"
          + (f" (planned {a.planned:.0f} s)" if a.planned and a.planned != a.duration else "")
          + f", warm-up {warm:.0f} s per incarnation, {len(rows)} samples")
    print(f"traffic: iperf3 bursts {count('iperf_ok')} ok / {count('iperf_fail')} failed; "
          f"ledger requests {count('ledger_ok')} ok / {count('ledger_fail')} failed; "
          f"churn {count('churn')} kill -9 + restart; "
          f"unexpected agent exits {count('unexpected_exit')}")
    mbps = [float(e[2].split()[1]) for e in events
            if len(e) > 2 and e[1] == "iperf_ok" and e[2].split()[1].replace(".", "", 1).isdigit()]
    if mbps:
        print(f"iperf3 over the VPN: min {min(mbps):.0f}, mean {sum(mbps) / len(mbps):.0f}, "
              f"max {max(mbps):.0f} Mbit/s")
    print()
    hdr = ("node", "inc", "window s", "RSS@warm MB", "RSS@end MB", "slope MB/h", "HWM MB",
           "thr", "fds min-max", "fd slope/h", "CPU s")
    table = [hdr]
    results = []
    for n in nodes:
        mine = [r for r in rows if r["node"] == n]
        incs = sorted({r["incarnation"] for r in mine})
        cpu = 0.0
        best = None  # (span, inc, window rows)
        for inc in incs:
            rs = sorted((r for r in mine if r["incarnation"] == inc), key=lambda r: r["t"])
            cpu += rs[-1]["cpu_ticks"] / tick
            start = 0.0 if inc == 1 else rs[0]["t"]
            win = [r for r in rs if r["t"] >= start + warm]
            span = win[-1]["t"] - win[0]["t"] if len(win) >= 2 else -1
            if best is None or span > best[0]:
                best = (span, inc, win)
        span, inc, win = best
        res = {"node": n, "incarnations": len(incs), "cpu": cpu, "inc": inc, "ok": len(win) >= 3}
        if res["ok"]:
            hours = [r["t"] / 3600 for r in win]
            res["rss0"] = win[0]["rss_kb"] / 1024
            res["rss1"] = win[-1]["rss_kb"] / 1024
            res["slope"] = slope(hours, [r["rss_kb"] / 1024 for r in win])
            res["hwm"] = max(r["hwm_kb"] for r in win) / 1024
            res["thr"] = f"{min(r['threads'] for r in win)}-{max(r['threads'] for r in win)}"
            fds = [r["fds"] for r in win]
            res["fdmin"], res["fdmax"] = min(fds), max(fds)
            res["fdslope"] = slope(hours, fds)
            half = len(win) // 2
            # No fd growth: the second half of the window never has more fds than the first.
            res["fdgrow"] = max(fds[half:]) - max(fds[: max(half, 1)])
            res["span"] = span
            table.append((f"n{n}", f"{inc}/{len(incs)}", f"{span:.0f}", f"{res['rss0']:.2f}",
                          f"{res['rss1']:.2f}", fmt(res["slope"]), f"{res['hwm']:.2f}",
                          res["thr"], f"{res['fdmin']}-{res['fdmax']}",
                          fmt(res["fdslope"], "+.1f"), f"{cpu:.1f}"))
        else:
            table.append((f"n{n}", f"{inc}/{len(incs)}", "-", "-", "-", "-", "-", "-", "-", "-",
                          f"{cpu:.1f}"))
        results.append(res)
    ok = [r for r in results if r["ok"]]
    if ok:
        slopes = [r["slope"] for r in ok if r["slope"] is not None]
        table.append(("all", "", "", f"{sum(r['rss0'] for r in ok):.2f}",
                      f"{sum(r['rss1'] for r in ok):.2f}",
                      fmt(sum(slopes) if slopes else None), f"{max(r['hwm'] for r in ok):.2f}",
                      "", f"{min(r['fdmin'] for r in ok)}-{max(r['fdmax'] for r in ok)}",
                      fmt(sum(r["fdslope"] or 0 for r in ok), "+.1f"),
                      f"{sum(r['cpu'] for r in results):.1f}"))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(hdr))]
    for k, row in enumerate(table):
        if k == len(table) - 1 and ok:
            print("  " + "  ".join("-" * w for w in widths))
        print("  " + "  ".join(str(c).rjust(w) if j else str(c).ljust(w)
                               for j, (c, w) in enumerate(zip(row, widths))))
    print()
    print("inc = the incarnation measured / incarnations seen; window = its post-warm-up span; "
          "RSS@warm/@end = VmRSS at the window's first/last sample; slope = least squares over "
          "the window; 'all' = sums (HWM: max); CPU s = utime+stime over all incarnations.")
    if a.duration < 3600:
        print(f"note: a {a.duration:.0f}-s run extrapolates its slopes to an hour; "
              "allocator noise of a few hundred kB then reads as several MB/h.")
    print()
    if not ok:
        print("FAIL memory: no node has 3 samples after its warm-up (run longer)")
        print("FAIL fds: no data after the warm-up")
        return 0
    bad = [r for r in ok if r["slope"] is None or r["slope"] >= GOAL_MB_PER_HOUR]
    worst = max(ok, key=lambda r: r["slope"] if r["slope"] is not None else 1e9)
    verdict = "PASS" if not bad else "FAIL"
    print(f"{verdict} memory: RSS slope after warm-up < {GOAL_MB_PER_HOUR:g} MB/hour on every "
          f"node (worst n{worst['node']}: {fmt(worst['slope'])} MB/h"
          + ("; over: " + ", ".join("n%d" % r["node"] for r in bad) if bad else "")
          + ("; not judged, no incarnation outlived its warm-up: "
             + ", ".join("n%d" % r["node"] for r in results if not r["ok"])
             if len(ok) < len(results) else "")
          + ")")
    grew = [r for r in ok if r["fdgrow"] > 0]
    verdict = "PASS" if not grew else "FAIL"
    print(f"{verdict} fds: no fd growth (max fds in the second half of each window <= first half"
          + ("; grew: " + ", ".join("n%d +%d" % (r["node"], r["fdgrow"]) for r in grew) if grew else "")
          + ")")
    exits = count("unexpected_exit")
    print(f"{'PASS' if exits == 0 else 'FAIL'} stability: {exits} unexpected agent exit(s)")
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--work", required=True)
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--every", type=float, default=10)
    s.add_argument("--start", type=float, required=True)
    r = sub.add_parser("report")
    r.add_argument("--work", required=True)
    r.add_argument("--duration", type=float, required=True)
    r.add_argument("--planned", type=float)
    a = p.parse_args()
    return sample(a) if a.cmd == "sample" else report(a)


if __name__ == "__main__":
    sys.exit(main() or 0)
