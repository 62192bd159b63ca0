#!/usr/bin/env python3
"""Sums up fanjet-chaos runs from their result.json files.

    scripts/chaos-summary.py target/chaos-long20/seed-*/result.json

Prints the table of docs/RELIABILITY.md ("Figures"), one row per run, then
the totals, then each kind of fault's busy-cell stall split by whether a
NATS node was killed in the NODE_KILL_REACH seconds before it: a node back
on its store takes its cells' leaders back about 30 s later, and that
hand-over lands in whatever fault comes then. A fault's start is the sum
of the windows before it (each window runs to the next fault), so the
split is as exact as the windows.
"""

import json
import sys
from collections import defaultdict

ORDER = ["kill_manager", "freeze_manager", "stop_manager", "kill_worker", "kill_serve", "kill_nats"]
NODE_KILL_REACH_MS = 40_000


def quantiles(values):
    values = sorted(values)
    if not values:
        return None, None
    return values[len(values) // 2], values[-1]


def s(ms):
    return "-" if ms is None else f"{ms / 1000:.1f}"


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    print(
        "| seed | minutes | jobs | subjobs run | re-executions (after a killed worker's run) | faults "
        "| takeover after SIGKILL/SIGSTOP, p50 / max (s) | handover after SIGTERM, p50 / max (s) "
        "| a busy cell's longest stall after a fault, by kind, p50 / max (s) "
        "| after a node kill: its own cells, other cells, p50 / max (s) "
        "| last fault → all terminal (s) | announced after, p50 / max (s) | hung | violations |"
    )
    print("|" + "---|" * 14)
    totals = defaultdict(int)
    clean = defaultdict(list)
    near = defaultdict(list)
    own_all, takeovers_all, handovers_all = [], [], []
    for r in runs:
        faults = r["faults"]
        busy = r["busy_cell_stall_after_ms"]
        own = [
            max(f["cell_stall_ms"][c] for c in f["led_cells"])
            for f in r["schedule"]
            if f["kind"] == "kill_nats" and f["led_cells"]
        ]
        own_all += own
        takeovers_all += r["takeover_ms"]["all"]
        handovers_all += r["graceful_handover_ms"]
        o50, omax = quantiles(own)
        h50, hmax = quantiles(r["graceful_handover_ms"])
        other = r["other_cells_stall_ms"]
        lag = r["announce_lag_ms"]
        after_kill = r.get("re_executions_after_worker_kill")
        after_kill = "-" if after_kill is None else f"{after_kill:,}"
        kinds = ", ".join(f"{k} {faults[k]}" for k in ORDER if k in faults)
        by_kind = "; ".join(
            f"{k} {s(busy[k]['p50'])} / {s(busy[k]['max'])}" for k in ORDER if k in busy
        )
        print(
            f"| {r['seed']} | {r['minutes']:g} | {r['jobs']:,} | {r['subjobs_run']:,} "
            f"| {r['re_executions']:,} ({after_kill}) "
            f"| {sum(faults.values())}: {kinds} "
            f"| {s(r['takeover_ms']['p50'])} / {s(r['takeover_ms']['max'])} | {s(h50)} / {s(hmax)} "
            f"| {by_kind} | own {s(o50)} / {s(omax)}; other {s(other['p50'])} / {s(other['max'])} "
            f"| {r['last_fault_to_all_terminal_ms'] / 1000:.1f} | {s(lag['p50'])} / {s(lag['max'])} "
            f"| {r['hung']} | {len(r['violations'])} |"
        )
        for key in ["jobs", "subjobs_run", "re_executions", "hung"]:
            totals[key] += r[key]
        if after_kill == "-" or totals.get("after_kill") == "-":
            totals["after_kill"] = "-"
        else:
            totals["after_kill"] += r["re_executions_after_worker_kill"]
        totals["faults"] += sum(faults.values())
        totals["violations"] += len(r["violations"])
        totals["node_kills"] += faults.get("kill_nats", 0)
        start, last_kill = 0, None
        for f in r["schedule"]:
            stall = max(f["cell_stall_ms"])
            if f["kind"] != "kill_nats":
                recent = last_kill is not None and start - last_kill < NODE_KILL_REACH_MS
                (near if recent else clean)[f["kind"]].append(stall)
            else:
                last_kill = start
            start += f["window_ms"]
    print()
    print(
        f"{len(runs)} runs: {totals['faults']} faults ({totals['node_kills']} node kills), "
        f"{totals['jobs']:,} jobs, {totals['subjobs_run']:,} subjobs run, "
        f"{totals['re_executions']:,} re-executions "
        f"({totals['after_kill'] if totals['after_kill'] == '-' else format(totals['after_kill'], ',')} "
        f"after a run by a worker killed), "
        f"{totals['hung']} hung, {totals['violations']} violations; "
        f"takeovers {s(min(takeovers_all, default=None))}–{s(max(takeovers_all, default=None))} s, "
        f"graceful handovers at most {s(max(handovers_all, default=None))} s; "
        f"a killed node's own cells p50 {s(quantiles(own_all)[0])} s, max {s(quantiles(own_all)[1])} s"
    )
    print()
    print(
        f"A busy cell's longest stall after each fault, by whether a node was killed "
        f"in the {NODE_KILL_REACH_MS // 1000} s before (faults, p50 / max s, how many over 3 s):"
    )
    print()
    print("| fault | no node kill before: faults, p50 / max (s), over 3 s | a node kill before: faults, p50 / max (s), over 3 s |")
    print("|---|---|---|")
    for kind in ORDER[:-1]:
        cells = []
        for group in (clean, near):
            v = group.get(kind, [])
            p50, mx = quantiles(v)
            cells.append(f"{len(v)}, {s(p50)} / {s(mx)}, {sum(1 for x in v if x > 3000)}")
        print(f"| {kind} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
