#!/usr/bin/env python3
"""Prints BENCHMARKS.md's comparison table from the upgrade bench's JSON (standard library only).

    cargo bench --bench upgrade_under_load -- --json target/uul.json
    python3 benches/analysis/table.py target/uul.json            # the table, Markdown
    python3 benches/analysis/table.py target/uul.json --check BENCHMARKS.md

The HTTP bench's JSON (`cargo bench --bench http_upgrade -- --json target/http.json`) gives its
own table: failed requests by kind, in-window p99.9 (steady, ratio), how long the old processes
lived after each trigger (median, max, and how many were still alive when the load stopped),
handover, server CPU per request, upgrades done.

Each JSON file gives a line saying when, where and how it was measured, then one table row per
server (for an `--overload` run, one per server and rate, after the sweep). `--check FILE` prints
nothing but the rows that are not in FILE verbatim, and exits 1 if there are any: a way to see
that the page's table is the one the JSON gives.

Columns (see examples/support/json.rs for the fields):
- failed: short connections that failed (by kind), and long-lived pings that failed;
- in-window p99.9 (steady): the p99.9 of the connections started in the 500 ms after each
  trigger, and of all the others, with their ratio;
- server CPU per connection: user+system time of every server process (all generations) over the
  row, divided by the short connections started; with the share of one core;
- handover: median trigger -> the new process's pid file;
- let go: median (max) from READY sent by the new process to the old one's last accept (ringflip
  only: the peers do not log it);
- back-to-back: upgrades done of those asked for, one a second, while long-lived connections keep
  every older generation draining.
"""

import json
import sys


def f(x, digits=3):
    """A figure in ms with 3 significant digits (as the page writes them)."""
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def failed(s):
    kinds = [(k, v) for k, v in s["failures"].items() if v]
    text = f"{s['failed']:,}"
    if kinds:
        text += " (" + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in kinds) + ")"
    text = f"{text} / {s['pings_failed']:,}"
    # Connection requests the kernel dropped at a full listen queue (the client retries them:
    # failures only once its timeout ends them).
    if s.get("listen_drops"):
        text += f"; {s['listen_drops']:,} listen drops"
    return text


def row(s):
    name = s["name"]
    if name.startswith("ringflip") and "@" not in name:
        name = f"**{name}**"
    w, st = s["window"]["p999"], s["steady"]["p999"]
    ratio = s.get("window_p999_over_steady")
    window = f"{f(w)} ms ({f(st)} ms"
    window += f", {ratio:.2f}×)" if ratio is not None else ")"
    cpu = "-"
    if s.get("cpu_us_per_conn") is not None:
        cpu = f"{s['cpu_us_per_conn']:.1f} µs ({100 * s['cpu_share']:.1f} %)"
    handover = f"{f(s['handover_median'])} ms" if s.get("handover_median") else "-"
    let_go = "-"
    if s.get("let_go_us"):
        lg = s["let_go_us"]
        let_go = f"{lg['median']:,} µs ({lg['max']:,} µs)"
    b2b = "-"
    if s.get("upgrades_done") is not None:
        b2b = f"{s['upgrades_done']} of {s['upgrades_requested']}"
    return f"| {name} | {failed(s)} | {window} | {cpu} | {handover} | {let_go} | {b2b} |"


HEADER = (
    "| server | failed connections / pings | in-window p99.9 (steady, ratio) "
    "| server CPU per connection (share of a core) | handover, median "
    "| old side lets go after READY, median (max) | back-to-back upgrades done |\n"
    "|---|---|---|---|---|---|---|"
)


HTTP_HEADER = (
    "| server | failed requests | in-window p99.9 (steady, ratio) "
    "| old process lives after the trigger, median (max) | handover, median "
    "| server CPU per request (share of a core) | upgrades done |\n"
    "|---|---|---|---|---|---|---|"
)

HTTP_LABELS = {
    "ringflip": "**ringflip** (examples/http.rs, SIGHUP)",
    "nginx": "nginx binary upgrade (USR2, QUIT)",
    "haproxy": "HAProxy seamless reload",
    "axum-reuseport": "axum, SO_REUSEPORT restart + graceful shutdown",
}


def http_row(s):
    """A row of the HTTP bench (benches/http_upgrade.rs)."""
    name = HTTP_LABELS.get(s["name"], s["name"])
    kinds = [(k, v) for k, v in s["failures"].items() if v]
    failed_text = f"{s['failed']:,} of {s['requests']:,}"
    if kinds:
        failed_text += " (" + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in kinds) + ")"
    w, st = s["window"]["p999"], s["steady"]["p999"]
    ratio = s.get("window_p999_over_steady")
    window = f"{f(w)} ms ({f(st)} ms" + (f", {ratio:.2f}×)" if ratio is not None else ")")
    lived = s.get("old_lived_ms") or {}
    old = "-"
    if lived.get("median") is not None:
        old = f"{f(lived['median'])} ms ({f(lived['max'])} ms)"
    if lived.get("alive_when_load_stopped"):
        old += f", {lived['alive_when_load_stopped']} still alive at the end"
    handover = f"{f(s['handover_median'])} ms" if s.get("handover_median") else "-"
    cpu = "-"
    if s.get("cpu_us_per_conn") is not None:
        cpu = f"{s['cpu_us_per_conn']:.1f} µs ({100 * s['cpu_share']:.1f} %)"
    done = f"{s['upgrades_done']} of {s['upgrades_requested']}"
    return f"| {name} | {failed_text} | {window} | {old} | {handover} | {cpu} | {done} |"


def http_provenance(d):
    m, c = d["meta"], d["config"]
    mach = m.get("machine") or {}
    args = " ".join(a for a in m.get("command") or [] if a != "--bench")
    cmd = f"`cargo bench --bench http_upgrade{' -- ' + args if args else ''}`"
    return (
        f"Measured {m.get('date')} at {m.get('commit')} on {mach.get('cpus')} × "
        f"{mach.get('cpu')}, {mach.get('mem_gib')} GiB, Linux {mach.get('kernel')}, "
        f"{m.get('rustc')}: {cmd}. {c['rate']:,} requests/s open loop over "
        f"{c['http1_clients']} keep-alive HTTP/1.1 and {c['http2_clients']} HTTP/2 clients, an "
        f"upgrade every {c['interval_ms']} ms, {c['upgrades']} upgrades per server"
        + ("" if c.get("pinned_server", True) else ", servers not pinned")
        + (" (quick mode: not a measurement)" if c.get("quick") else "")
        + "."
    )


def provenance(d):
    m, c = d["meta"], d["config"]
    mach = m.get("machine") or {}
    args = " ".join(a for a in m.get("command") or [] if a != "--bench")
    bench = "cargo bench --bench upgrade_under_load" if d.get("bench") != "demo" else \
        "cargo run --release --example demo"
    cmd = f"`{bench}{' -- ' + args if args else ''}`"
    return (
        f"Measured {m.get('date')} at {m.get('commit')} on {mach.get('cpus')} × "
        f"{mach.get('cpu')}, {mach.get('mem_gib')} GiB, Linux {mach.get('kernel')}, "
        f"{m.get('rustc')}: {cmd}. "
        + ("The rates below" if d.get("overload") else f"{c['rate']:,} conn/s")
        + f" open loop, {c['long_lived']} long-lived "
        f"connections, an upgrade every {c['interval_ms']} ms with a {c['burst']}-connection "
        f"burst, {c['upgrades']} upgrades per server"
        + ("" if c.get("pinned_server", True) else ", servers not pinned")
        + (f", every server held to {100 * c['server_cpu_share']:.0f} % of a core (a cgroup quota)"
           if c.get("server_cpu_share") else "")
        + (" (quick mode: not a measurement)" if c.get("quick") else "")
        + "."
    )


def sweep(d):
    o = d["overload"]
    out = [
        f"Saturation: **{o['saturation_rate']:,} conn/s**"
        + ("" if o["saturated"] else " (not reached: the sweep's last rate)")
        + (f" (the highest rate that kept up: {o['kept_up_rate']:,})"
           if o["saturated"] and o.get("kept_up_rate") else "")
        + f"; the rows ran at {', '.join(f'{r:,}' for r in o['rates'])} conn/s, "
        f"{o['upgrades_per_row']} upgrades each.",
        "",
        "| rate | client lag p50 / p90 / p99 | lag growth over the step | latency p99 "
        "| server CPU per connection (share) | failed | saturated by |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in o["sweep"]:
        lag = s["client_lag"]
        out.append(
            f"| {s['rate']:,} | {f(lag['p50'])} / {f(lag.get('p90'))} / {f(lag['p99'])} ms "
            f"| {f(lag.get('growth'))} ms | {f(s['latency']['p99'])} ms "
            f"| {s['cpu_us_per_conn']:.1f} µs ({100 * s['cpu_share']:.1f} %) | {s['failed']:,} "
            f"| {s.get('saturated') or '-'} |"
        )
    return out


def lines(d):
    if d.get("bench") == "http_upgrade":
        return [http_provenance(d), "", HTTP_HEADER] + [http_row(s) for s in d["servers"]]
    out = [provenance(d), ""]
    servers = d["servers"]
    if d.get("overload"):
        out += sweep(d) + [""]
    out += [HEADER] + [row(s) for s in servers]
    return out


def main(argv):
    check = None
    if "--check" in argv:
        i = argv.index("--check")
        check = open(argv[i + 1], encoding="utf-8").read()
        argv = argv[:i] + argv[i + 2:]
    if not argv:
        print(__doc__)
        return 2
    missing = []
    for path in argv:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
        for line in lines(d):
            if check is None:
                print(line)
            elif line.startswith("| ") and not line.startswith("|---") and line not in check:
                missing.append(line)
        if check is None:
            print()
    for line in missing:
        print(line)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
