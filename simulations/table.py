#!/usr/bin/env python3
"""Markdown tables from a sweep directory (see simulations/sweep.sh).

    python3 simulations/table.py target/sim-sweep

Reads every <dir>/n<N>-<scenario>/summary.json and <dir>/costs.txt and
prints the tables docs/simulations.md is made of. Standard library only.
"""

import json
import math
import pathlib
import re
import sys


def load(root):
    runs = {}
    for summary in sorted(root.glob("n*-*/summary.json")):
        m = re.fullmatch(r"n(\d+)-(\w+)", summary.parent.name)
        if not m:
            continue
        runs[(int(m.group(1)), m.group(2))] = json.loads(summary.read_text())
    costs = {}
    cost_file = root / "costs.txt"
    if cost_file.exists():
        for line in cost_file.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                costs[(int(parts[0]), parts[1])] = (float(parts[2]), int(parts[3]))
    return runs, costs


def fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def first_run(summary):
    return summary["runs"][0]


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/sim-sweep")
    runs, costs = load(root)
    sizes = sorted({n for n, _ in runs})

    print("### Formation and dissemination (`join`)\n")
    rows = []
    for n in sizes:
        s = runs.get((n, "join"))
        if not s:
            continue
        r = first_run(s)
        f, d = r["formation"], r["dissemination_summary"] or {}
        notice = d.get("notice_mean_s") or [None] * 4
        rows.append([
            n,
            f["nodes_right_99_s"],
            r["joined_s"],
            notice[0],
            notice[1],
            notice[2],
            notice[3],
            d.get("notice_p999_rounds"),
            math.log2(n),
        ])
    print(table(["N", "99 % of views right (s)", "all views right (s)",
                 "notice 50 % (s)", "99 %", "99.9 %", "100 %",
                 "99.9 % in gossip rounds", "log2 N"], rows))

    print("\n### Failure detection (`crash`, `loss`, `slow`)\n")
    rows = []
    for n in sizes:
        c = runs.get((n, "crash"))
        if c:
            r = first_run(c)
            det = r["detection_summary"] or {}
            rows.append([n, "crash", det.get("first_suspicion_mean_s"),
                         det.get("first_suspicion_probe_periods"),
                         (det.get("down_mean_s") or [None] * 3)[1],
                         (det.get("down_mean_s") or [None] * 3)[2],
                         r["failures"]["false_downs"],
                         r["failures"]["false_suspicions"]])
        for name in ("loss", "slow"):
            s = runs.get((n, name))
            if not s:
                continue
            for r in s["runs"]:
                label = f"{name} {r['loss'] * 100:g} %" if name == "loss" else name
                rows.append([n, label, None, None, None, None,
                             r["failures"]["false_downs"],
                             r["failures"]["false_suspicions"]])
    print(table(["N", "run", "first suspicion (s)", "in probe periods",
                 "down at 99 % (s)", "down at 100 % (s)", "false downs",
                 "false suspicions"], rows))

    print("\n### Partition and churn: agreement afterwards\n")
    rows = []
    for n in sizes:
        for name in ("partition", "churn", "crash"):
            s = runs.get((n, name))
            if not s:
                continue
            r = first_run(s)
            conv = r["convergence"]
            rows.append([n, name, conv["reference"], conv["membership_after_s"],
                         conv["full_after_s"], "yes" if conv["agreed_at_end"] else "no",
                         r["traffic_phase"]["datagrams_per_node_s"],
                         r["traffic_phase"]["bytes_per_node_s"],
                         r["traffic_phase"]["sync_bytes_per_node_s"]])
    print(table(["N", "scenario", "measured from", "membership agrees after (s)",
                 "membership and catalog (s)", "agreed at end",
                 "datagrams/node/s", "SWIM B/node/s", "sync B/node/s"], rows))

    if costs:
        print("\n### Cost of each run\n")
        rows = [[n, s, w, rss / 1024] for (n, s), (w, rss) in sorted(costs.items())]
        print(table(["N", "scenario", "wall (s)", "peak RSS (MiB)"], rows))


if __name__ == "__main__":
    main()
