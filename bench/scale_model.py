#!/usr/bin/env python3
"""How many connections per second each server could reach on N cores (stdlib only).

A projection from the CPU each configuration spends per connection under the `close`
load (one request per connection), as measured by bench/scale or bench/run:

    python3 bench/scale_model.py [RESULTS.json] [--cores 2,4,8,16,32,64]
                                 [--workers-per-acceptor 5] [--from-workers W]
                                 [--svg docs/scaling.svg | --no-svg]

RESULTS.json defaults to bench/results/scale-latest.json (bench/scale's), else
bench/results/latest.json. The results must hold `supervisor_cpu_us_per_req` and
`workers_cpu_us_per_req` (bench.py records them since the scaling work of issue #18).

Configurations, on N cores:

- coreloop, K = 1 acceptor: the supervisor accepts and forwards every connection on one
  core; the workers serve them on the other N - 1 cores.
      conns/s = min(1e6 / S, (N - 1) * 1e6 / C)
  S: supervisor CPU µs per connection, C: workers' CPU µs per connection (both measured
  with one acceptor).
- coreloop, automatic K: K acceptor threads, each costing S per connection it accepts,
  and W = N - K workers, with the rule K = ceil(W / R) (R = --workers-per-acceptor,
  default 5). The model takes the smallest K with R * K >= N - K, i.e. K = ceil(N / (R + 1)),
  which satisfies the rule exactly for every N of the default list.
      conns/s = min(K * 1e6 / S, (N - K) * 1e6 / C)
- reuseport (the SO_REUSEPORT peer) and nginx: every core serves, nothing forwards.
      conns/s = N * 1e6 / T      (T: the whole server's CPU µs per connection)

Prints the measured costs and the projection as Markdown, with the assumptions, and draws
the projection as an SVG line chart (log-log), written directly (no gnuplot needed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SVG = ROOT / "docs" / "scaling.svg"
LOAD = "close"

K1_SERVERS = ("coreloop-k1", "coreloop")  # first present gives the K = 1 costs
AUTO_SERVER = "coreloop"                    # the demo's default: automatic K
PEERS = ("reuseport", "nginx")

COLORS = {"k1": "#ff7f0e", "auto": "#d62728", "reuseport": "#2ca02c", "nginx": "#7f7f7f"}


def auto_k(n: int, per_acceptor: int) -> int:
    """Acceptors for n cores: the smallest K with per_acceptor * K >= n - K (at least 1)."""
    return max(1, math.ceil(n / (per_acceptor + 1)))


def medians_for(results: dict, server: str) -> dict[int, dict]:
    return {m["workers"]: m for m in results["medians"]
            if m["load"] == LOAD and m["server"] == server and m.get("ok_runs")}


def pick_costs(results: dict, from_workers: int | None) -> dict:
    """The per-connection costs the projection uses, and where each comes from."""
    k1_server = next((s for s in K1_SERVERS if medians_for(results, s)), None)
    if k1_server is None:
        raise SystemExit(f"no successful coreloop run under the {LOAD} load in these results")
    k1 = {w: m for w, m in medians_for(results, k1_server).items()
          if m.get("supervisor_cpu_us_per_req") is not None
          and m.get("workers_cpu_us_per_req") is not None}
    if not k1:
        raise SystemExit("these results have no supervisor_cpu_us_per_req: they predate the "
                         "per-process split; run bench/scale (or bench/run) again")
    w = from_workers if from_workers is not None else max(k1)
    if w not in k1:
        raise SystemExit(f"no {k1_server} {LOAD} figures at W = {w} (have {sorted(k1)})")
    costs = dict(workers=w, k1_server=k1_server,
                 S=k1[w]["supervisor_cpu_us_per_req"], C=k1[w]["workers_cpu_us_per_req"])
    for peer in PEERS:
        m = medians_for(results, peer).get(w)
        costs[peer] = m["cpu_us_per_req"] if m and m.get("cpu_us_per_req") else None
    return costs


def project(costs: dict, cores: list[int], per_acceptor: int) -> list[dict]:
    rows = []
    S, C = costs["S"], costs["C"]
    for n in cores:
        row = dict(cores=n)
        for name, k in (("k1", 1), ("auto", auto_k(n, per_acceptor))):
            if n - k < 1:
                row[name] = dict(k=k, w=0, rate=None, bound="no core left for a worker")
                continue
            acc, wrk = k * 1e6 / S if S > 0 else math.inf, (n - k) * 1e6 / C
            row[name] = dict(k=k, w=n - k, rate=min(acc, wrk),
                             bound="acceptors" if acc < wrk else "workers")
        for peer in PEERS:
            row[peer] = n * 1e6 / costs[peer] if costs.get(peer) else None
        rows.append(row)
    return rows


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "–"
    if v >= 1e6:
        return f"{v / 1e6:.2f} M"
    return f"{v / 1e3:,.0f} k"


def fmt_us(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def assumptions(per_acceptor: int) -> list[str]:
    return [
        "Each configuration's CPU cost per connection stays what it was when measured, "
        "whatever N: no cross-core contention (shared listen queue, accept locks, cache "
        "lines, memory bandwidth) and no NUMA effects. The supervisor's cost depends on "
        "its batching: it falls as the rate of connections per wake-up rises and grows "
        "when the machine is contended (see the spread between rounds in the raw runs), "
        "so S measured at a low rate makes the K = 1 bound pessimistic.",
        "Every core runs the server at 100 %: the load generator runs on other machines and "
        "the network is never the limit. The measured costs come from a machine where wrk "
        "shared the cores with the server.",
        "coreloop's acceptors and workers get dedicated cores: K acceptor cores and N − K "
        "worker cores, none shared. K acceptor threads scale perfectly, each with the K = 1 "
        "supervisor cost per connection. (If the supervisor shared its core with workers, "
        "the bound would be min(K × 10⁶ / S, N × 10⁶ / (S + C)) instead.)",
        f"Automatic K: K = ceil(W / {per_acceptor}) acceptors for W workers "
        f"(`--workers-per-acceptor {per_acceptor}`); on N cores the model takes the smallest "
        f"K with {per_acceptor}·K ≥ N − K, i.e. K = ceil(N / {per_acceptor + 1}), W = N − K.",
        "reuseport and nginx: N × 10⁶ / their whole CPU cost per connection (every process "
        "of the tree), with the kernel's SO_REUSEPORT hash spreading connections evenly.",
        "The load is the close load: one short request per connection, the figure that "
        "the supervisor's hop costs most on. Keep-alive requests never reach the supervisor.",
    ]


def markdown(results: dict, costs: dict, rows: list[dict], per_acceptor: int, src: str) -> str:
    meta, cfg = results["machine"], results["config"]
    out = [
        f"Input: `{src}` ({results['date'][:16].replace('T', ' ')} UTC, `{results['command']}`): "
        f"{meta['cpu']}, `nproc` = {meta['nproc']}, kernel {meta['kernel']}, commit {meta['git']}; "
        f"{cfg['rounds']} round(s) × {cfg['duration']} s, medians over rounds; "
        f"load generator on the same cores (`wrk {' '.join(cfg['loads_wrk'].get(LOAD, [])[:2])}`).",
        "",
        f"Measured CPU per connection under `{LOAD}` (µs; supervisor = the root process, all its "
        "threads; workers = the rest of the tree; peers: the whole tree):",
        "",
        "| server | W | req/s | supervisor µs/conn | workers µs/conn | total µs/conn |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    servers = [s for s in (*dict.fromkeys((costs["k1_server"], AUTO_SERVER)), *PEERS)]
    for s in servers:
        for w, m in sorted(medians_for(results, s).items()):
            out.append(f"| {s} | {w} | {m['rps']:,.0f} | {fmt_us(m.get('supervisor_cpu_us_per_req'))} | "
                       f"{fmt_us(m.get('workers_cpu_us_per_req'))} | {fmt_us(m['cpu_us_per_req'])} |")
    out += [
        "",
        f"Costs used (W = {costs['workers']}): coreloop K = 1 ({costs['k1_server']}) S = "
        f"{costs['S']:.1f} µs supervisor + C = {costs['C']:.1f} µs workers per connection; "
        f"reuseport {fmt_us(costs['reuseport'])} µs; nginx {fmt_us(costs['nginx'])} µs. "
        f"One acceptor keeps C / S = {costs['C'] / costs['S']:.1f} workers busy "
        f"(the automatic rule assumes {per_acceptor}); the best split of N cores would give "
        f"the acceptors N × S / (S + C) = {100 * costs['S'] / (costs['S'] + costs['C']):.0f}% of them.",
        "",
        f"**Projected** connections/s under `{LOAD}` on N cores (only N = {meta['nproc']} is the "
        "size of the machine measured, and even there these are projections, not measurements):",
        "",
        "| cores N | coreloop K = 1 | bound | coreloop auto: K + W | coreloop auto | bound | "
        "reuseport | nginx |",
        "|--:|--:|---|--:|--:|---|--:|--:|",
    ]
    for r in rows:
        k1, au = r["k1"], r["auto"]
        out.append(f"| {r['cores']} | {fmt_rate(k1['rate'])} | {k1['bound']} | "
                   f"{au['k']} + {au['w']} | {fmt_rate(au['rate'])} | {au['bound']} | "
                   f"{fmt_rate(r['reuseport'])} | {fmt_rate(r['nginx'])} |")
    out += ["", "Assumptions:", ""]
    out += [f"- {a}" for a in assumptions(per_acceptor)]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- SVG
def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def svg_chart(rows: list[dict], costs: dict, results: dict, per_acceptor: int) -> str:
    W, H = 900, 560
    left, right, top, bottom = 90, 200, 80, 70
    pw, ph = W - left - right, H - top - bottom
    cores = [r["cores"] for r in rows]
    series = [
        ("k1", "coreloop, K = 1", [r["k1"]["rate"] for r in rows]),
        ("auto", f"coreloop, auto K (W/{per_acceptor})", [r["auto"]["rate"] for r in rows]),
        ("reuseport", "reuseport (SO_REUSEPORT)", [r["reuseport"] for r in rows]),
        ("nginx", "nginx", [r["nginx"] for r in rows]),
    ]
    vals = [v for _, _, vs in series for v in vs if v]
    steps = [m * 10 ** e for e in range(0, 12) for m in (1, 2, 5)]
    ylo = max(v for v in steps if v <= min(vals))
    yhi = min(v for v in steps if v >= max(vals) * 1.05)
    xlo, xhi = math.log2(min(cores)), math.log2(max(cores))

    def x(n: float) -> float:
        return left + (math.log2(n) - xlo) / ((xhi - xlo) or 1) * pw

    def y(v: float) -> float:
        return top + ph - (math.log10(v) - math.log10(ylo)) / (math.log10(yhi) - math.log10(ylo)) * ph

    def label(v: float) -> str:
        return f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k" if v >= 1e3 else f"{v:g}"

    meta = results["machine"]
    sub = (f"from CPU µs per connection measured at W = {costs['workers']} on {meta['cpu']}, "
           f"{meta['nproc']} CPUs, {results['date'][:10]}")
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
         f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="26" text-anchor="middle" font-size="16">'
         f'{esc("Projected connections/s on N cores (close load) — a model, not a measurement")}</text>',
         f'<text x="{W / 2}" y="48" text-anchor="middle" font-size="11" fill="#444">'
         f'{esc(sub)}</text>',
         f'<text x="{W / 2}" y="64" text-anchor="middle" font-size="11" fill="#444">'
         f'{esc("assumes dedicated cores, costs constant with N, no contention, load generator elsewhere (docs/benchmarks.md)")}</text>']
    # grid and axes
    for v in steps:
        if ylo <= v <= yhi:
            yy = y(v)
            major = str(v).startswith("1")
            o.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{left + pw}" y2="{yy:.1f}" '
                     f'stroke="{"#cccccc" if major else "#eeeeee"}"/>')
            o.append(f'<text x="{left - 8}" y="{yy + 4:.1f}" text-anchor="end">{label(v)}</text>')
    for n in cores:
        xx = x(n)
        o.append(f'<line x1="{xx:.1f}" y1="{top}" x2="{xx:.1f}" y2="{top + ph}" stroke="#eeeeee"/>')
        o.append(f'<text x="{xx:.1f}" y="{top + ph + 18}" text-anchor="middle">{n}</text>')
    o.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    o.append(f'<text x="{left + pw / 2}" y="{H - 25}" text-anchor="middle">cores N (log scale)</text>')
    o.append(f'<text x="22" y="{top + ph / 2}" text-anchor="middle" '
             f'transform="rotate(-90 22 {top + ph / 2})">connections per second (log scale)</text>')
    # series
    for i, (key, name, vs) in enumerate(series):
        pts = [(x(n), y(v)) for n, v in zip(cores, vs) if v]
        if not pts:
            continue
        c = COLORS[key]
        dash = ' stroke-dasharray="6 4"' if key == "k1" else ""
        o.append(f'<polyline fill="none" stroke="{c}" stroke-width="2.5"{dash} points="'
                 + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        for a, b in pts:
            o.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{c}"/>')
        ly = top + 10 + i * 22
        o.append(f'<line x1="{left + pw + 15}" y1="{ly}" x2="{left + pw + 45}" y2="{ly}" '
                 f'stroke="{c}" stroke-width="2.5"{dash}/>')
        o.append(f'<text x="{left + pw + 50}" y="{ly + 4}">{esc(name)}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", help="results JSON (default: bench/results/"
                    "scale-latest.json, else bench/results/latest.json)")
    ap.add_argument("--cores", default="2,4,8,16,32,64", help="comma list of N")
    ap.add_argument("--workers-per-acceptor", type=int, default=5, metavar="R",
                    help="automatic K: K = ceil(W / R) (default 5)")
    ap.add_argument("--from-workers", type=int, metavar="W",
                    help="take the costs measured at this worker count (default: the largest)")
    ap.add_argument("--svg", default=str(SVG), help=f"chart path (default {SVG.relative_to(ROOT)})")
    ap.add_argument("--no-svg", action="store_true", help="do not draw the chart")
    a = ap.parse_args(argv)
    if a.results:
        src = Path(a.results)
    else:
        src = next((p for p in (RESULTS / "scale-latest.json", RESULTS / "latest.json")
                    if p.exists()), RESULTS / "scale-latest.json")
    try:
        results = json.loads(src.read_text())
    except (OSError, ValueError) as e:
        print(f"cannot read {src}: {e}", file=sys.stderr)
        return 2
    cores = sorted({int(c) for c in a.cores.split(",") if c.strip()})
    if not cores or min(cores) < 2 or a.workers_per_acceptor < 1:
        ap.error("--cores must be at least 2 and --workers-per-acceptor positive")
    costs = pick_costs(results, a.from_workers)
    rows = project(costs, cores, a.workers_per_acceptor)
    try:
        shown = src.resolve().relative_to(ROOT)
    except ValueError:
        shown = src
    print(markdown(results, costs, rows, a.workers_per_acceptor, str(shown)), end="")
    if not a.no_svg:
        Path(a.svg).write_text(svg_chart(rows, costs, results, a.workers_per_acceptor))
        print(f"\nwrote {a.svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
