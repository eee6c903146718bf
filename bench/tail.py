#!/usr/bin/env python3
"""Where the tail of an open-loop run comes from: reads the file that ``openloop --dump
FILE`` (package coreloop-bench, bench/tools) writes (one line per answered request:
scheduled start µs, how late its task started µs, connect-to-last-byte µs, latency µs, 1
if slow, worker pid)
and prints, for the slowest 1% of the cheap requests, how late the load generator itself
started them, how long the server took, how long after a slow request they were
scheduled and which workers answered them; then the cheap requests around a few slow ones.

    cargo run --release -p coreloop-bench --bin openloop -- --addr 127.0.0.1:8080 --rate 3000 \\
        --duration 6 --burn-every 200 --cheap-path /whoami --dump /tmp/dump.txt
    python3 bench/tail.py /tmp/dump.txt

Stdlib only.
"""

from __future__ import annotations

import bisect
import collections
import sys


def pct(sorted_values: list[int], p: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    rows = []
    with open(sys.argv[1]) as f:
        for line in f:
            sched, late, served, latency, slow, pid = map(int, line.split())
            rows.append((sched, late, served, latency, slow == 1, pid))
    slow_starts = sorted(r[0] for r in rows if r[4])
    cheap = [r for r in rows if not r[4]]
    if not cheap:
        print("no cheap requests in the dump")
        return 1
    threshold = pct(sorted(r[3] for r in cheap), 0.99)
    tail = [r for r in cheap if r[3] >= threshold]
    print(f"{len(cheap)} cheap requests; p99 {threshold} µs; the {len(tail)} at or above it:")
    late = sorted(r[1] for r in tail)
    served = sorted(r[2] for r in tail)
    print(f"  generator late to start them: median {pct(late, 0.5)} µs, p90 {pct(late, 0.9)} µs")
    print(f"  connect to last byte:         median {pct(served, 0.5)} µs, p90 {pct(served, 0.9)} µs")
    if slow_starts:
        after = []
        for r in tail:
            i = bisect.bisect_right(slow_starts, r[0])
            if i > 0:
                after.append(r[0] - slow_starts[i - 1])
        after.sort()
        print(f"  scheduled after the last slow request by: median {pct(after, 0.5)} µs, "
              f"p10 {pct(after, 0.1)}, p90 {pct(after, 0.9)}")
    by_pid = collections.Counter(r[5] for r in tail)
    print(f"  answered by (pid: count): {dict(by_pid)}; all cheap: "
          f"{dict(collections.Counter(r[5] for r in cheap))}")
    print("cheap requests in the 6 ms after some slow ones (offset ms: pid: latency ms):")
    for start in slow_starts[len(slow_starts) // 3:len(slow_starts) // 3 + 6]:
        window = [r for r in cheap if start <= r[0] < start + 6000]
        print(f"  slow at {start / 1000:.1f} ms: " + "  ".join(
            f"+{(r[0] - start) / 1000:.1f}:{r[5]}:{r[3] / 1000:.1f}" for r in window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
