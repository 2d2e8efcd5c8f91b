#!/usr/bin/env python3
"""Plots the soak harness's time series (tests/soak.rs) as one SVG.

    python3 examples/soak/plot.py target/soak/timeseries.csv [target/soak/soak.svg]

Top panel: successful requests per second of every traffic kind (lines),
failed requests per second (red bars, outlined in the kind's colour), and
the chaos actions as dashed vertical lines at their exact times. Bottom panel: RSS (MiB,
solid) and open file descriptors (dashed, right axis) of n1 and n2.

Standard library only. The CSV's columns are `t`, `<kind>_ok`,
`<kind>_failed` for each kind, `n1_rss_kib`, `n1_fds`, `n2_rss_kib`,
`n2_fds`, `action`; kinds are found from the header, so a new traffic kind
shows up without changes here.
"""

import csv
import math
import os
import sys
from xml.sax.saxutils import escape

WIDTH = 1100
PANEL_H = 300
LEFT, RIGHT, TOP, GAP, BOTTOM = 70, 70, 40, 90, 50
COLOURS = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
FAIL = "#d62728"


def nice_max(v):
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= v:
            return m * exp
    return 10 * exp


def ticks(vmax, n=5):
    return [vmax * i / n for i in range(n + 1)]


def fmt(v):
    return f"{v:.0f}" if v >= 10 or v == 0 else f"{v:.1f}"


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    src = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(src) or ".", "soak.svg")
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"{src}: no rows")
    header = list(rows[0].keys())
    kinds = [c[: -len("_ok")] for c in header if c.endswith("_ok")]
    ts = [float(r["t"]) for r in rows]
    bucket = ts[1] - ts[0] if len(ts) > 1 else 5.0
    tmax = ts[-1] + bucket

    def num(r, c):
        try:
            return float(r[c])
        except (KeyError, ValueError):
            return 0.0

    rate = {k: [num(r, k + "_ok") / bucket for r in rows] for k in kinds}
    fail = {k: [num(r, k + "_failed") / bucket for r in rows] for k in kinds}
    rss = {n: [num(r, n + "_rss_kib") / 1024 for r in rows] for n in ("n1", "n2")}
    fds = {n: [num(r, n + "_fds") for r in rows] for n in ("n1", "n2")}
    # "12.3s kill -9 n4; 14.0s restart n4": each event at its own time.
    actions = []
    for r in rows:
        for part in filter(None, (p.strip() for p in (r.get("action") or "").split(";"))):
            when, _, label = part.partition("s ")
            try:
                actions.append((float(when), label))
            except ValueError:
                actions.append((float(r["t"]), part))

    plot_w = WIDTH - LEFT - RIGHT
    height = TOP + 2 * PANEL_H + GAP + BOTTOM
    p1_top, p2_top = TOP, TOP + PANEL_H + GAP

    def x(t):
        return LEFT + plot_w * t / tmax

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
    ]

    def axes(top, ymax, label, right_max=None, right_label=None):
        bottom = top + PANEL_H
        svg.append(f'<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="#999"/>')
        for v in ticks(ymax):
            y = bottom - PANEL_H * v / ymax
            svg.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#eee"/>')
            svg.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt(v)}</text>')
        if right_max:
            for v in ticks(right_max):
                y = bottom - PANEL_H * v / right_max
                svg.append(f'<text x="{LEFT + plot_w + 6}" y="{y + 4:.1f}">{fmt(v)}</text>')
            svg.append(
                f'<text transform="translate({WIDTH - 15},{top + PANEL_H / 2}) rotate(90)" '
                f'text-anchor="middle">{escape(right_label)}</text>'
            )
        step = nice_max(tmax / 10)
        t = 0.0
        while t <= tmax:
            svg.append(f'<text x="{x(t):.1f}" y="{bottom + 15}" text-anchor="middle">{t:.0f}</text>')
            t += step
        svg.append(f'<text x="{LEFT + plot_w / 2}" y="{bottom + 32}" text-anchor="middle">seconds</text>')
        svg.append(
            f'<text transform="translate(18,{top + PANEL_H / 2}) rotate(-90)" text-anchor="middle">{escape(label)}</text>'
        )

    def line(top, ymax, values, colour, dash=False, width=1.5):
        pts = " ".join(
            f"{x(t + bucket / 2):.1f},{top + PANEL_H - PANEL_H * min(v, ymax) / ymax:.1f}" for t, v in zip(ts, values)
        )
        d = ' stroke-dasharray="5,3"' if dash else ""
        svg.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="{width}"{d}/>')

    def legend(top, items):
        lx = LEFT + 8
        for text, colour, dash in items:
            d = ' stroke-dasharray="5,3"' if dash else ""
            svg.append(f'<line x1="{lx}" y1="{top + 12}" x2="{lx + 18}" y2="{top + 12}" stroke="{colour}" stroke-width="2"{d}/>')
            svg.append(f'<text x="{lx + 22}" y="{top + 16}">{escape(text)}</text>')
            lx += 30 + 7 * len(text)

    # Panel 1: requests per second, failures, chaos.
    ymax1 = nice_max(max([max(v) for v in rate.values()] + [max(v) for v in fail.values()] + [1]) * 1.1)
    axes(p1_top, ymax1, "requests / s")
    for t, label in actions:
        svg.append(f'<line x1="{x(t):.1f}" y1="{p1_top}" x2="{x(t):.1f}" y2="{p1_top + PANEL_H}" stroke="#f0a000" stroke-dasharray="3,3"/>')
        svg.append(
            f'<text transform="translate({x(t) + 3:.1f},{p1_top + PANEL_H - 4}) rotate(-90)" fill="#b07000" font-size="9">'
            f"{escape(label[:70])}</text>"
        )
    bar_w = max(plot_w * bucket / tmax / (len(kinds) + 1), 1.0)
    for i, k in enumerate(kinds):
        for t, v in zip(ts, fail[k]):
            if v > 0:
                h = max(PANEL_H * min(v, ymax1) / ymax1, 2.0)
                svg.append(
                    f'<rect x="{x(t) + i * bar_w:.1f}" y="{p1_top + PANEL_H - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                    f'fill="{FAIL}" stroke="{COLOURS[i % len(COLOURS)]}"><title>{k}: {v * bucket:.0f} failed at {t:.0f}s</title></rect>'
                )
        line(p1_top, ymax1, rate[k], COLOURS[i % len(COLOURS)])
    legend(p1_top - 28, [(f"{k} ok/s", COLOURS[i % len(COLOURS)], False) for i, k in enumerate(kinds)]
           + [("failed/s (bars)", FAIL, False), ("chaos action", "#f0a000", True)])

    # Panel 2: RSS and fds of n1, n2.
    ymax2 = nice_max(max(max(v) for v in rss.values()) * 1.15)
    fmax = nice_max(max(max(v) for v in fds.values()) * 1.15)
    axes(p2_top, ymax2, "RSS MiB", fmax, "open fds")
    for i, n in enumerate(("n1", "n2")):
        colour = COLOURS[(i + 3) % len(COLOURS)]
        line(p2_top, ymax2, rss[n], colour)
        line(p2_top, fmax, fds[n], colour, dash=True, width=1.0)
    legend(p2_top - 28, [("n1 RSS", COLOURS[3], False), ("n1 fds", COLOURS[3], True),
                         ("n2 RSS", COLOURS[4], False), ("n2 fds", COLOURS[4], True)])

    svg.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(svg) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
