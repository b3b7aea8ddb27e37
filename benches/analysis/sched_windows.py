#!/usr/bin/env python3
"""Each upgrade window's slowest connection, against a scheduler trace of the same run.

For every upgrade of a ringflip row of `benches/upgrade_under_load.rs`, it takes the slowest
connection started in the 500 ms after the trigger. Over that connection's life it reports:
- how long the guest kept a server thread waiting on CPU 0 between its wake-up and its run,
  at most, and what ran on CPU 0 meanwhile;
- what CPU 0 ran in all, idle (swapper) included.

A slow connection during which the server never waited long, and CPU 0 was often idle, was
not slowed by anything the guest's scheduler did on the server's CPU. Time the host takes
from a vCPU is invisible to the guest: it shows as "running" or "idle".

Usage (nothing else running; see docs/BENCHMARKS-LAB.md §1, "a scheduler trace"):

    RINGFLIP_DUMP_SAMPLES=/tmp/s_ cargo bench --bench upgrade_under_load -- --burst 0 --only ringflip &
    taskset -c 1 perf record -e sched:sched_waking,sched:sched_switch -a -k CLOCK_MONOTONIC \\
        -o /tmp/sched.data -- sleep 35
    perf script -i /tmp/sched.data -F cpu,time,event,trace > /tmp/sched.txt
    python3 benches/analysis/sched_windows.py /tmp/s_Signal--serveringflip /tmp/sched.txt

The first argument is the prefix of the row's `.csv` (samples) and `.log` (server log, whose
`trigger_mono_us` gives each upgrade's trigger on the trace's clock, CLOCK_MONOTONIC).
"""
import bisect
import csv
import re
import sys


def main(prefix, trace):
    triggers = [int(x) for x in re.findall(r"trigger_mono_us=(\d+)", open(prefix + ".log").read())]
    switches = []  # CPU 0: (time µs, next pid, next comm)
    wakings = []  # (time µs, pid) of wake-ups aimed at CPU 0
    comm = {}
    for line in open(trace):
        m = re.match(r"\[(\d+)\]\s+([\d.]+): sched:(\w+): (.*)", line)
        if not m:
            continue
        cpu, t, event, rest = int(m[1]), float(m[2]) * 1e6, m[3], m[4]
        if event == "sched_switch" and cpu == 0:
            pid = int(re.search(r"next_pid=(\d+)", rest)[1])
            name = re.search(r"next_comm=(\S+)", rest)[1]
            switches.append((t, pid, name))
            comm[pid] = name
        elif event == "sched_waking" and "target_cpu=000" in rest:
            wakings.append((t, int(re.search(r" pid=(\d+)", rest)[1])))
    times = [s[0] for s in switches]
    runs = {}
    for t, pid, _ in switches:
        runs.setdefault(pid, []).append(t)
    # The servers are this bench binary re-executed (comm "upgrade_under_l") and its threads.
    server = [(t, p) for t, p in wakings if comm.get(p, "").startswith(("upgrade_under", "ringflip"))]

    def wait(t, pid):
        later = runs.get(pid, [])
        i = bisect.bisect_left(later, t)
        return later[i] - t if i < len(later) else 0

    def on_cpu0(a, b):
        spent = {}
        i = max(bisect.bisect_right(times, a) - 1, 0)
        for k in range(i, bisect.bisect_right(times, b)):
            lo = max(switches[k][0], a)
            hi = min(switches[k + 1][0] if k + 1 < len(switches) else b, b)
            if hi > lo:
                spent[switches[k][2]] = spent.get(switches[k][2], 0) + hi - lo
        return spent

    def show(spent):
        top = sorted(spent.items(), key=lambda x: -x[1])[:3]
        return ", ".join(f"{name} {us / 1e3:.2f}" for name, us in top)

    worst = {}
    for r in csv.DictReader(open(prefix + ".csv")):
        u, off, lat = int(r["upgrade"]), int(r["offset_us"]), int(r["latency_us"])
        if 0 <= u < len(triggers) and off < 500_000 and lat >= 0 and lat > worst.get(u, (0, -1))[1]:
            worst[u] = (off, lat, int(r["client_lag_us"]))
    print(f"{'upgrade':>7} {'slowest':>8} {'client late':>11} {'server waited':>13}  "
          "what ran meanwhile (ms)  |  CPU 0 over the connection (ms)")
    for u in sorted(worst):
        off, lat, lag = worst[u]
        start = triggers[u] + off
        end = start + lat
        inside = server[bisect.bisect_left(server, (start, 0)):bisect.bisect_right(server, (end, 1 << 62))]
        longest = max(inside, key=lambda x: wait(*x), default=None)
        waited = wait(*longest) if longest else 0
        meanwhile = on_cpu0(longest[0], longest[0] + waited) if waited else {}
        print(f"{u:>7} {lat / 1e3:>6.2f}ms {lag / 1e3:>9.2f}ms {waited / 1e3:>11.2f}ms  "
              f"{show(meanwhile) or '-'}  |  {show(on_cpu0(start, end))}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
