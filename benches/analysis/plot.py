#!/usr/bin/env python3
"""Draws BENCHMARKS.md's plots from the upgrade bench's JSON, as SVG (standard library only).

    cargo bench --bench upgrade_under_load -- --json target/uul.json
    python3 benches/analysis/plot.py target/uul.json --out docs/plots --name upgrade

writes:
- `<name>-summary.svg`: per server, the in-window and steady p99.9 as bars, with its failed
  connections and pings and its upgrades done (a JSON of quoted figures with only these fields,
  such as docs/plots/data/quoted-2026-12-01-68a8cb9.json, gives only this plot);
- `<name>-latency.svg`: latency around an upgrade, one panel per server (ringflip and each peer
  of the run), on one log scale: per bucket of offset from the trigger (1 ms from 10 ms before
  it to 50 ms after, 10 ms elsewhere; the x axis is zoomed on the first 50 ms), over all the
  row's upgrades, the median (grey), the p99 (blue) and the slowest connection (orange dots);
  red bars along the bottom mark every bucket with failed connections, with the row's total in
  the title; the dashed line is the median handover (trigger -> the new process's pid file);
- `<name>-sweep.svg` for an `--overload` run: the load generator's lag (p50, p90, p99) and the
  server's CPU per connection against the offered rate, the saturation rate marked.

From the scaling bench's JSON (`cargo bench --bench handover_scale -- --json PATH`, issue 16 §2)
it draws instead one `curve-<curve>.svg` per curve (`--name` is not used):

    python3 benches/analysis/plot.py target/bench/scale.json --out docs/plots

each with, against the curve's axis (its points evenly spaced), on one log scale in ms: trigger
-> READY (median line, max dots), READY -> the old process stopped accepting, the drain, and the
old process's CPU for the drain; the rss curve adds a plain fork of a process as big; the interval
curve shows upgrades done, refused (busy) and failed per interval, and the control request's
time to `ok`. The curve's targets, "met" or "not met" as the bench computed them, and any cap
of its axis are written under the title.

Files from a quick run (`-- --test`) are marked "quick mode: not a measurement" in the title.
"""

import argparse
import html
import json
import math
import os

# Colours: median, p99, max, failures, guides.
C50, C99, CMAX, CFAIL, CGUIDE = "#888888", "#1f5fbf", "#e8870e", "#d62728", "#bbbbbb"


class Svg:
    def __init__(self, width, height):
        self.w, self.h = width, height
        self.parts = []

    def add(self, s):
        self.parts.append(s)

    def text(self, x, y, s, size=11, anchor="start", weight="normal", fill="#222"):
        self.add(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}">{html.escape(str(s))}</text>'
        )

    def line(self, x1, y1, x2, y2, stroke=CGUIDE, width=1, dash=None):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke="{stroke}" stroke-width="{width}"{d}/>'
        )

    def polyline(self, pts, stroke, width=1.2):
        if len(pts) < 2:
            return
        p = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        self.add(
            f'<polyline points="{p}" fill="none" stroke="{stroke}" stroke-width="{width}"/>'
        )

    def dots(self, pts, fill, r=1.3):
        for x, y in pts:
            self.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{fill}"/>')

    def rect(self, x, y, w, h, fill, opacity=1.0):
        self.add(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{fill}" '
            f'fill-opacity="{opacity}"/>'
        )

    def save(self, path):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(
                f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.w}" height="{self.h}" '
                f'viewBox="0 0 {self.w} {self.h}" font-family="sans-serif">\n'
                f'<rect width="100%" height="100%" fill="white"/>\n'
            )
            fh.write("\n".join(self.parts))
            fh.write("\n</svg>\n")
        print(f"wrote {path}")


def log_ticks(lo, hi):
    """Decades and their 2x and 5x between lo and hi (ms)."""
    out = []
    e = math.floor(math.log10(lo))
    while 10**e <= hi:
        for m in (1, 2, 5):
            v = m * 10**e
            if lo <= v <= hi:
                out.append(v)
        e += 1
    return out


def label_ms(v):
    return f"{v:g}" if v >= 1 else f"{v:.2g}"


def provenance(d):
    m, c = d["meta"], d["config"]
    quick = " · quick mode: not a measurement" if c.get("quick") else ""
    rate = f"{c['rate']:,} conn/s"
    if d.get("overload"):
        rates = d["overload"]["rates"]
        rate = f"{min(rates):,}–{max(rates):,} conn/s (overload)"
    load = f"{rate}, burst {c['burst']}, {c['long_lived']} long-lived"
    if d.get("bench") == "http_upgrade":
        load = (f"{c['rate']:,} req/s, {c['http1_clients']} HTTP/1.1 + {c['http2_clients']} "
                "HTTP/2 keep-alive clients")
    return (
        f"{m.get('date')} · {m.get('commit')} · {(m.get('machine') or {}).get('cpus')} × "
        f"{(m.get('machine') or {}).get('cpu')} · {load}{quick}"
    )


# The x axis of the latency panels is in three linear pieces, so the handover shows: (from, to,
# share of the width). The JSON's 1 ms buckets cover the middle piece.
PIECES = ((-100, -10, 0.12), (-10, 50, 0.50), (50, 500, 0.38))
XTICKS = (-100, -10, 0, 10, 20, 30, 40, 50, 200, 350, 500)


def latency_panels(d, path):
    servers = [s for s in d["servers"] if (s.get("series") or {}).get("rows")]
    if not servers:
        return
    cols = 2 if len(servers) > 1 else 1
    rows = math.ceil(len(servers) / cols)
    pw, ph = 440, 250  # panel size
    ml, mr, mt, mb = 52, 14, 44, 34  # panel margins
    top = 46
    svg = Svg(cols * pw, top + rows * ph + 24)
    svg.text(8, 18, "Latency around an upgrade, over all upgrades of each row "
             "(the first 50 ms zoomed)", size=14, weight="bold")
    svg.text(8, 36, provenance(d), size=10, fill="#555")
    # One y scale for every panel, so the servers compare at a glance.
    vals = [r[6] for s in servers for r in s["series"]["rows"] if r[6] > 0]
    vals += [r[4] for s in servers for r in s["series"]["rows"] if r[4] > 0]
    lo = 10 ** math.floor(math.log10(max(min(vals), 1e-3))) if vals else 0.01
    hi = 10 ** math.ceil(math.log10(max(vals))) if vals else 10
    for i, s in enumerate(servers):
        ser = s["series"]
        x0 = (i % cols) * pw + ml
        y0 = top + (i // cols) * ph + mt
        w, h = pw - ml - mr, ph - mt - mb

        def X(t):
            left = x0
            for a, b, share in PIECES:
                if t <= b or (a, b, share) == PIECES[-1]:
                    return left + (min(max(t, a), b) - a) / (b - a) * share * w
                left += share * w
            return left

        def Y(v):
            v = min(max(v, lo), hi)
            return y0 + h - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * h

        # Frame, ticks, the pieces' joints.
        svg.rect(x0, y0, w, h, "#fafafa")
        for v in log_ticks(lo, hi):
            svg.line(x0, Y(v), x0 + w, Y(v), stroke="#e6e6e6")
            svg.text(x0 - 4, Y(v) + 3, label_ms(v), size=9, anchor="end", fill="#666")
        for t in XTICKS:
            svg.line(X(t), y0 + h, X(t), y0 + h + 3, stroke="#666")
            svg.text(X(t), y0 + h + 13, t, size=9, anchor="middle", fill="#666")
        for a, _, _ in PIECES[1:]:
            svg.line(X(a), y0, X(a), y0 + h, stroke="#cccccc", dash="1,2")
        svg.text(x0 + w / 2, y0 + h + 26, "ms from the trigger (scheduled start)", size=9,
                 anchor="middle", fill="#666")
        svg.text(x0 - 44, y0 + h / 2, "ms", size=9, fill="#666")
        svg.line(X(0), y0, X(0), y0 + h, stroke="#444")
        if s.get("handover_median"):
            svg.line(X(s["handover_median"]), y0, X(s["handover_median"]), y0 + h,
                     stroke="#444", dash="3,3")
        rows_ = ser["rows"]
        ok = [r for r in rows_ if r[2] > r[3]]
        mid = [(r, X(r[0] + r[1] / 2)) for r in ok]
        svg.dots([(x, Y(r[6])) for r, x in mid], CMAX)
        # Lines only between adjacent buckets: a gap (no successful connection) stays a gap.
        runs, prev = [], None
        for r, x in mid:
            if prev is None or prev[0] + prev[1] != r[0]:
                runs.append([])
            runs[-1].append((r, x))
            prev = r
        for run in runs:
            svg.polyline([(x, Y(r[5])) for r, x in run], C99)
            svg.polyline([(x, Y(r[4])) for r, x in run], C50)
        fails = [r for r in rows_ if r[3] > 0]
        for r in fails:
            svg.rect(X(r[0]), y0 + h - 8, max(X(r[0] + r[1]) - X(r[0]), 1.5), 8, CFAIL)
        # Title: name; failures, window vs steady.
        ratio = s.get("window_p999_over_steady")
        bad = s["failed"] or s["pings_failed"]
        svg.text(x0, y0 - 24, s["name"], size=12, weight="bold", fill=CFAIL if bad else "#222")
        svg.text(
            x0, y0 - 9,
            f"{s['failed']:,} failed"
            + f", {s['pings_failed']} pings failed · win p99.9 {s['window']['p999']:g} ms"
            + (f" = {ratio:.2f}× steady" if ratio is not None else ""),
            size=10, fill=CFAIL if bad else "#444",
        )
    # Legend.
    ly = top + rows * ph + 14
    x = 8
    for colour, name in ((C50, "median"), (C99, "p99"), (CMAX, "slowest"), (CFAIL, "failed"),
                         ("#444", "trigger; dashed: median handover")):
        svg.rect(x, ly - 8, 10, 8, colour)
        svg.text(x + 14, ly, name, size=10)
        x += 14 + 7 * len(name) + 16
    svg.save(path)


def summary_plot(d, path):
    """One row per server: in-window and steady p99.9 as bars on a log scale, failures and
    upgrades done written beside them."""
    servers = [s for s in d["servers"] if (s.get("window") or {}).get("p999")]
    if not servers:
        return
    row_h, top, ml, bar_w = 26, 80, 160, 360
    W = ml + bar_w + 250
    H = top + row_h * len(servers) + 44
    svg = Svg(W, H)
    svg.text(8, 18, "Upgrade under load: p99.9 in the 500 ms after each trigger, and steady",
             size=14, weight="bold")
    svg.text(8, 36, provenance(d), size=10, fill="#555")
    if d["meta"].get("source"):
        svg.text(8, 50, d["meta"]["source"], size=10, fill="#555")
    vals = [s["window"]["p999"] for s in servers] + [s["steady"]["p999"] for s in servers]
    lo = 10 ** math.floor(math.log10(min(vals)))
    hi = 10 ** math.ceil(math.log10(max(vals)))

    def X(v):
        return ml + (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * bar_w

    for v in log_ticks(lo, hi):
        svg.line(X(v), top - 4, X(v), top + row_h * len(servers), stroke="#e6e6e6")
        svg.text(X(v), top + row_h * len(servers) + 12, label_ms(v), size=9, anchor="middle",
                 fill="#666")
    svg.text(ml + bar_w / 2, top + row_h * len(servers) + 26, "ms (log scale)", size=9,
             anchor="middle", fill="#666")
    svg.text(ml + bar_w + 10, top - 8, "failed conns / pings, upgrades done", size=9,
             fill="#666")
    for i, s in enumerate(servers):
        y = top + i * row_h
        bad = s.get("failed") or s.get("pings_failed")
        svg.text(ml - 8, y + 14, s["name"], size=11, anchor="end",
                 weight="bold" if s["name"].startswith("ringflip") else "normal")
        svg.rect(ml, y + 3, X(s["window"]["p999"]) - ml, 9, C99)
        svg.rect(ml, y + 13, X(s["steady"]["p999"]) - ml, 6, C50)
        # The value right of its bar, or inside it (white) where it would run into the
        # failures column.
        label, end = f"{s['window']['p999']:g}", X(s["window"]["p999"])
        if end + 4 + 6 * len(label) > ml + bar_w:
            svg.text(end - 4, y + 11, label, size=9, anchor="end", fill="#fff")
        else:
            svg.text(end + 4, y + 12, label, size=9, fill=C99)
        failed = f"{s.get('failed', 0):,} / {s.get('pings_failed', 0):,}"
        svg.text(ml + bar_w + 10, y + 14, failed, size=11, fill=CFAIL if bad else "#222",
                 weight="bold" if bad else "normal")
        if s.get("upgrades_done") is not None:
            short = s["upgrades_done"] < s["upgrades_requested"]
            svg.text(ml + bar_w + 10 + 7 * len(failed) + 14, y + 14,
                     f"{s['upgrades_done']} of {s['upgrades_requested']}", size=11,
                     fill=CMAX if short else "#222", weight="bold" if short else "normal")
    ly = H - 6
    x = 8
    for colour, name in ((C99, "in-window p99.9"), (C50, "steady p99.9"),
                         (CFAIL, "failures")):
        svg.rect(x, ly - 8, 10, 8, colour)
        svg.text(x + 14, ly, name, size=10)
        x += 14 + 7 * len(name) + 16
    svg.save(path)


def sweep_plot(d, path):
    o = d.get("overload")
    if not o or not o["sweep"]:
        return
    sw = o["sweep"]
    W, H, ml, mr, mt, mb = 780, 320, 64, 80, 60, 40
    w, h = W - ml - mr, H - mt - mb
    svg = Svg(W, H)
    svg.text(8, 18, "Overload sweep: the load generator's lag against the offered rate",
             size=14, weight="bold")
    svg.text(8, 36, provenance(d), size=10, fill="#555")
    rates = [s["rate"] for s in sw]
    r0, r1 = min(rates) * 0.9, max(rates) * 1.1
    lags = [s["client_lag"][k] for s in sw for k in ("p50", "p90", "p99") if s["client_lag"].get(k)]
    lo = 10 ** math.floor(math.log10(max(min([v for v in lags if v > 0] or [0.001]), 1e-3)))
    hi = 10 ** math.ceil(math.log10(max(lags + [o["lag_bound_ms"] * 2])))
    cpu_hi = max(s["cpu_us_per_conn"] for s in sw) * 1.2

    def X(r):
        return ml + (r - r0) / (r1 - r0) * w

    def Y(v):
        v = min(max(v, lo), hi)
        return mt + h - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * h

    def Yc(v):
        return mt + h - v / cpu_hi * h

    svg.rect(ml, mt, w, h, "#fafafa")
    for v in log_ticks(lo, hi):
        svg.line(ml, Y(v), ml + w, Y(v), stroke="#e6e6e6")
        svg.text(ml - 4, Y(v) + 3, label_ms(v), size=9, anchor="end", fill="#666")
    for r in rates:
        svg.text(X(r), mt + h + 13, f"{r:,}", size=9, anchor="middle", fill="#666")
    svg.text(ml + w / 2, mt + h + 28, "conn/s offered (no upgrade)", size=9, anchor="middle",
             fill="#666")
    svg.text(4, mt + h / 2, "lag, ms", size=9, fill="#666")
    svg.line(ml, Y(o["lag_bound_ms"]), ml + w, Y(o["lag_bound_ms"]), stroke=CFAIL, dash="4,3")
    svg.text(ml + 4, Y(o["lag_bound_ms"]) - 3, "saturation bound", size=9, fill=CFAIL)
    for k, colour in (("p50", C50), ("p90", CMAX), ("p99", C99)):
        pts = [(X(s["rate"]), Y(s["client_lag"][k])) for s in sw if s["client_lag"].get(k)]
        svg.polyline(pts, colour, 1.6)
        svg.dots(pts, colour, 2.5)
    pts = [(X(s["rate"]), Yc(s["cpu_us_per_conn"])) for s in sw]
    svg.polyline(pts, "#2ca02c", 1.6)
    svg.dots(pts, "#2ca02c", 2.5)
    for v in (0, cpu_hi / 2, cpu_hi):
        svg.text(ml + w + 4, Yc(v) + 3, f"{v:.0f}", size=9, fill="#2ca02c")
    svg.text(ml + w + 4, mt - 6, "µs CPU/conn", size=9, fill="#2ca02c")
    sat = o["saturation_rate"]
    svg.line(X(sat), mt, X(sat), mt + h, stroke="#444", dash="3,3")
    svg.text(X(sat), mt - 4, f"saturation {sat:,}" + ("" if o["saturated"] else " (not reached)"),
             size=9, anchor="middle")
    x = ml
    for colour, name in ((C50, "lag p50"), (CMAX, "lag p90"), (C99, "lag p99"),
                         ("#2ca02c", "server CPU per connection")):
        svg.rect(x, H - 10, 10, 8, colour)
        svg.text(x + 14, H - 2, name, size=10)
        x += 14 + 7 * len(name) + 16
    svg.save(path)


# The scaling curves (handover_scale): series drawn per point, (JSON key, label, colour).
CURVE_SERIES = (
    ("trigger_to_ready", "trigger -> READY", C99),
    ("new_cpu_to_ready", "new process CPU to READY", "#8c564b"),
    ("ready_to_stopped_accepting", "READY -> old stopped accepting", C50),
    ("drain", "drain", "#2ca02c"),
    ("old_cpu_drain", "old process CPU, drain", "#9467bd"),
    ("fork", "plain fork() as big", CFAIL),
    ("request_to_ok", "control request -> ok", C99),
)


def scale_provenance(d):
    m, c = d["meta"], d["config"]
    quick = " · quick mode: not a measurement" if c.get("quick") else ""
    return (
        f"{m.get('date')} · {m.get('commit')} · {(m.get('machine') or {}).get('cpus')} × "
        f"{(m.get('machine') or {}).get('cpu')} · handover_scale{quick}"
    )


def curve_plot(d, curve, path):
    pts = curve["points"]
    if not pts:
        return
    W, ml, mr, mb = 780, 64, 30, 46
    notes = [f"capped: {curve['capped']}"] if curve.get("capped") else []
    notes += [
        f"target: {t['what']}: {'met' if t['met'] else 'NOT MET'} ({t['reason']})"
        for t in curve.get("targets", [])
    ]
    # Wrapped at ~125 characters a line.
    lines = []
    for n in notes:
        words, cur, bad = n.split(" "), "", "NOT MET" in n
        for wd in words:
            if len(cur) + len(wd) + 1 > 125 and cur:
                lines.append((cur, bad))
                cur = "    " + wd
            else:
                cur = f"{cur} {wd}" if cur else wd
        lines.append((cur, bad))
    notes = lines
    mt = 56 + 14 * len(notes)
    H = mt + 260 + mb + 44
    w, h = W - ml - mr, 260
    svg = Svg(W, H)
    svg.text(8, 18, f"How the cost grows: {curve['name']}", size=14, weight="bold")
    svg.text(8, 34, scale_provenance(d), size=10, fill="#555")
    for i, (n, bad) in enumerate(notes):
        svg.text(8, 50 + 14 * i, n, size=10, fill=CFAIL if bad else "#333")
    series = [s for s in CURVE_SERIES if any(isinstance(p.get(s[0]), dict) for p in pts)]
    vals = [p[k][f] for k, _, _ in series for p in pts for f in ("median", "max")
            if isinstance(p.get(k), dict) and (p[k].get(f) or 0) > 0]
    lo = 10 ** math.floor(math.log10(min(vals))) if vals else 0.01
    hi = 10 ** math.ceil(math.log10(max(vals))) if vals else 10
    if hi <= lo:
        hi = lo * 10

    def X(i):
        return ml + (i + 0.5) / len(pts) * w

    def Y(v):
        v = min(max(v, lo), hi)
        return mt + h - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * h

    svg.rect(ml, mt, w, h, "#fafafa")
    for v in log_ticks(lo, hi):
        svg.line(ml, Y(v), ml + w, Y(v), stroke="#e6e6e6")
        svg.text(ml - 4, Y(v) + 3, label_ms(v), size=9, anchor="end", fill="#666")
    svg.text(4, mt + h / 2, "ms", size=9, fill="#666")
    axis = curve["axis"]
    for i, p in enumerate(pts):
        svg.text(X(i), mt + h + 13, p["label"], size=9, anchor="middle", fill="#666")
        if curve["name"] == "interval":
            bad = p.get("failed", 0) + p.get("connections_failed", 0) + p.get("held_failed", 0)
            svg.text(X(i), mt + h + 26,
                     f"{p.get('done')} done, {p.get('busy')} busy, {bad} failed", size=9,
                     anchor="middle", fill=CFAIL if bad else "#444")
    svg.text(ml + w / 2, mt + h + 40, f"{axis['name']} ({axis['unit']})", size=9,
             anchor="middle", fill="#666")
    for key, _, colour in series:
        line = [(X(i), Y(p[key]["median"])) for i, p in enumerate(pts)
                if isinstance(p.get(key), dict) and (p[key].get("median") or 0) > 0]
        svg.polyline(line, colour, 1.6)
        svg.dots(line, colour, 2.5)
        if key == "trigger_to_ready":
            svg.dots([(X(i), Y(p[key]["max"])) for i, p in enumerate(pts)
                      if (p[key].get("max") or 0) > 0], CMAX, 2.0)
    x, y = ml, H - 24
    legend = [(c, f"{n} (median)") for k, n, c in series]
    if any(k == "trigger_to_ready" for k, _, _ in series):
        legend.append((CMAX, "trigger -> READY (max)"))
    for colour, name in legend:
        width = 14 + 6 * len(name) + 14
        if x + width > W:
            x, y = ml, y + 16
        svg.rect(x, y - 8, 10, 8, colour)
        svg.text(x + 14, y, name, size=10)
        x += width
    svg.save(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json")
    ap.add_argument("--out", default="docs/plots")
    ap.add_argument("--name", default="upgrade")
    a = ap.parse_args()
    with open(a.json, encoding="utf-8") as fh:
        d = json.load(fh)
    os.makedirs(a.out, exist_ok=True)
    if d.get("bench") == "handover_scale":
        for curve in d["curves"]:
            curve_plot(d, curve, os.path.join(a.out, f"curve-{curve['name']}.svg"))
        return
    summary_plot(d, os.path.join(a.out, f"{a.name}-summary.svg"))
    latency_panels(d, os.path.join(a.out, f"{a.name}-latency.svg"))
    sweep_plot(d, os.path.join(a.out, f"{a.name}-sweep.svg"))


if __name__ == "__main__":
    main()
