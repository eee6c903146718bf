#!/usr/bin/env python3
"""What the best possible dispatcher could do on the skewed loads (stdlib only).

A queueing model of the two skewed loads of bench/bench.py, to read their p99 figures
against: how much a dispatcher can win at all, before the machine gets a say.

    python3 bench/skew_model.py [--workers 2] [--cheap-ms 0.067] [--seed 1]

Two servers are modelled, each a worker that runs one request at a time (a
current_thread event loop blocked by /burn), with no CPU contention, no network and no
scheduler: only the order in which requests reach workers.

- "hash": every connection goes to a worker chosen at random and waits there in FIFO
  order, as the kernel's SO_REUSEPORT hash does (it cannot know a worker is busy).
- "shared": one FIFO queue in front of all workers; the next request goes to the first
  worker that frees up. No dispatcher that cannot see inside requests does better on
  both mean and tail: it is what coreloop's "hold while every worker is busy" aims at.

Loads, as in bench.py:
- skewed (closed loop): 64 clients, each sends its next request when the last one is
  answered; 1 request in 20 burns 5 ms, the others cost --cheap-ms (default 0.067 ms,
  chosen so that the model's throughput matches the ~6,300 req/s measured at W = 2).
- skewed-open: requests arrive at 1,500/s per worker (Poisson), 1 in 200 burns 5 ms.

Prints p50/p99 per policy and the shared/hash ratio of p99. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import heapq
import random

BURN_MS = 5.0


def percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def finish(policy: str, at: float, cost: float, free_at: list[float], pool: list[float],
           rnd: random.Random) -> float:
    """When a request that arrives at `at` and costs `cost` is answered, under `policy`."""
    if policy == "hash":
        k = rnd.randrange(len(free_at))
        free_at[k] = max(at, free_at[k]) + cost
        return free_at[k]
    done = max(at, heapq.heappop(pool)) + cost
    heapq.heappush(pool, done)
    return done


def closed(policy: str, workers: int, cheap: float, rnd: random.Random,
           clients: int = 64, every: int = 20, n: int = 300_000) -> dict:
    free_at = [0.0] * workers  # hash: when each worker's FIFO empties
    pool = [0.0] * workers     # shared: when each worker frees up (a heap)
    arrivals = [(0.0, c) for c in range(clients)]
    heapq.heapify(arrivals)
    lat: list[float] = []
    end = 0.0
    while len(lat) < n:
        at, client = heapq.heappop(arrivals)
        cost = BURN_MS if rnd.random() < 1 / every else cheap
        done = finish(policy, at, cost, free_at, pool, rnd)
        lat.append(done - at)
        end = max(end, done)
        heapq.heappush(arrivals, (done, client))
    lat.sort()
    return dict(rps=len(lat) / end * 1000, p50=percentile(lat, 0.5), p99=percentile(lat, 0.99))


def open_loop(policy: str, workers: int, cheap: float, rnd: random.Random,
              rate_per_worker: float = 1500, every: int = 200, n: int = 300_000) -> dict:
    free_at = [0.0] * workers
    pool = [0.0] * workers
    at = 0.0
    lat: list[float] = []
    cheap_lat: list[float] = []
    for _ in range(n):
        at += rnd.expovariate(rate_per_worker * workers / 1000)
        burn = rnd.random() < 1 / every
        done = finish(policy, at, BURN_MS if burn else cheap, free_at, pool, rnd)
        lat.append(done - at)
        if not burn:
            cheap_lat.append(done - at)
    lat.sort()
    cheap_lat.sort()
    return dict(p50=percentile(lat, 0.5), p99=percentile(lat, 0.99),
                cheap_p99=percentile(cheap_lat, 0.99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cheap-ms", type=float, default=0.067)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    for name, fn in (("skewed (closed loop)", closed), ("skewed-open", open_loop)):
        print(f"{name}, {a.workers} workers:")
        res = {}
        for policy in ("hash", "shared"):
            res[policy] = fn(policy, a.workers, a.cheap_ms, random.Random(a.seed))
            print("  " + policy.ljust(7) + "  ".join(f"{k} {v:,.2f}" for k, v in res[policy].items()))
        ratios = {k: res["shared"][k] / res["hash"][k] for k in res["hash"] if k.endswith("p99")}
        print("  shared ÷ hash: " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
