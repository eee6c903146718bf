#!/usr/bin/env python3
"""Soak test of coreloop's demo HTTP server (stdlib only; wrk for the keep-alive phase).

Run it through ``bench/soak`` (builds the release demo first). Direct use:

    python3 bench/soak.py [--quick] [--connections N] [--keepalive-secs S] [--threads T]
                          [--workers W] [--binary PATH] [--out DIR] [--no-doc]

One server (``--workers W``, 2 by default) on a fresh 127.0.0.1 port, then:

1. warm-up: a few thousand connections, so that allocators and caches reach their working
   size before the first reference sample;
2. connections: N connections one after another (``--connections``, 1,000,000; 100,000
   with ``--quick``), spread over T client threads (``--threads``, 8), each connection
   ``GET /`` with ``Connection: close``, read to the end, checked (200 and the body);
3. keep-alive: ``wrk -t2 -c64`` for S seconds (``--keepalive-secs``, 300; 20 with
   ``--quick``);
4. quiescence: every client gone, a final sample.

Meanwhile a sampler reads, every second, the open descriptors (``/proc/PID/fd``) and the
resident size (``VmRSS``) of the supervisor and of every worker (its children). Worker
restarts are read from the server's log. The summary (start, end and peak per process,
connections per second, errors) goes to OUT/soak-<UTC>.json and, unless ``--no-doc``, to
the Soak section of docs/benchmarks.md (between ``<!-- soak:begin -->`` and
``<!-- soak:end -->``; the rest of the file is left alone).

"Flat" means: every process ends with the descriptors it started with (after the warm-up,
and once the clients are gone), and its resident size ends within max(4 MiB, 10 %) of its
start. The exit status is 0 when everything is flat and no request failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where `cargo build --release -p coreloop-demo` puts it (cargo reads CARGO_TARGET_DIR
# relative to the directory it runs in, ROOT for bench/soak).
DEFAULT_BINARY = ROOT / os.environ.get("CARGO_TARGET_DIR", "target") / "release" / "coreloop-demo"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
HOST = "127.0.0.1"
REQUEST = b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"
BODY = b"Hello, world!"
START_TIMEOUT = 15.0
SOCKET_TIMEOUT = 10.0
QUIESCE_TIMEOUT = 30.0
RSS_SLACK_KIB = 4 * 1024
RSS_SLACK_SHARE = 0.10


# --------------------------------------------------------------------------- processes

def children_of(ppid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == ppid and fields[0] not in "ZX":
            kids.append(int(entry))
    return sorted(kids)


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Server:
    """The demo under test: its process, its log (collected by a thread) and its workers."""

    def __init__(self, binary: Path, workers: int):
        self.port = free_port()
        env = dict(os.environ, RUST_LOG="info")
        env.pop("CORELOOP_WORKER_ID", None)
        self.proc = subprocess.Popen(
            [str(binary), "--workers", str(workers), "--bind", f"{HOST}:{self.port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, text=True, errors="replace",
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read_log, daemon=True)
        self.reader.start()
        if not self.ready.wait(START_TIMEOUT):
            self.stop()
            raise SystemExit("soak: the server did not start:\n" + "\n".join(self.lines[-20:]))

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if " serving workers=" in line:
                self.ready.set()

    def worker_events(self) -> tuple[int, int]:
        """Worker deaths and `worker ready` lines after the boot."""
        died = sum(" worker died " in line for line in self.lines)
        ready = sum(" worker ready " in line for line in self.lines)
        return died, ready

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                for pid in children_of(self.proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Sampler(threading.Thread):
    """Samples descriptors and RSS of the supervisor and its workers every `interval`."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.samples: list[dict] = []
        self.phase = "boot"
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def take(self) -> dict:
        procs = {}
        for pid in [self.root] + children_of(self.root):
            fds, rss = fd_count(pid), rss_kib(pid)
            if fds is not None and rss is not None:
                procs[pid] = {"fds": fds, "rss_kib": rss}
        sample = {"t": time.monotonic(), "phase": self.phase, "procs": procs}
        with self.lock:
            self.samples.append(sample)
        return sample

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.take()


# --------------------------------------------------------------------------- loads

def one_connection(addr: tuple[str, int]) -> str | None:
    """One `GET /` with `Connection: close`; None on success, else what went wrong."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(SOCKET_TIMEOUT)
        s.connect(addr)
        s.sendall(REQUEST)
        chunks = []
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        if not data.startswith(b"HTTP/1.1 200 ") or not data.endswith(BODY):
            return "bad reply"
        return None
    except socket.timeout:
        return "timeout"
    except OSError as err:
        return type(err).__name__
    finally:
        s.close()


def connections(port: int, total: int, threads: int, label: str) -> dict:
    """`total` connections one after another on `threads` client threads."""
    addr = (HOST, port)
    lock = threading.Lock()
    state = {"next": 0, "done": 0}
    errors: dict[str, int] = {}
    progress_every = max(total // 10, 1)

    def client() -> None:
        local: dict[str, int] = {}
        while True:
            with lock:
                index = state["next"]
                state["next"] += 1
            if index >= total:
                break
            failure = one_connection(addr)
            if failure is not None:
                local[failure] = local.get(failure, 0) + 1
            if (index + 1) % progress_every == 0:
                print(f"soak: {label}: {index + 1} / {total}", file=sys.stderr, flush=True)
        with lock:
            for key, count in local.items():
                errors[key] = errors.get(key, 0) + count

    started = time.monotonic()
    pool = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.monotonic() - started
    return {
        "connections": total,
        "threads": threads,
        "seconds": round(elapsed, 2),
        "per_second": round(total / elapsed, 1) if elapsed > 0 else None,
        "errors": errors,
        "failed": sum(errors.values()),
    }


def keepalive(port: int, seconds: int, connections_: int) -> dict:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("soak: wrk is not installed (bench/soak installs it)")
    argv = [wrk, "-t2", f"-c{connections_}", f"-d{seconds}s", "--latency",
            f"http://{HOST}:{port}/"]
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    elapsed = time.monotonic() - started
    text = out.stdout
    result = {"command": " ".join(argv[1:]), "seconds": round(elapsed, 2), "exit": out.returncode}
    m = re.search(r"(\d+) requests in", text)
    result["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    result["per_second"] = float(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    kinds = ("connect", "read", "write", "timeout")
    result["socket_error_kinds"] = (
        {k: int(v) for k, v in zip(kinds, m.groups()) if int(v)} if m else {})
    result["socket_errors"] = sum(result["socket_error_kinds"].values())
    m = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", text)
    result["latency_max"] = m.group(1) if m else None
    m = re.search(r"99%\s+(\S+)", text)
    result["latency_p99"] = m.group(1) if m else None
    # wrk counts a request that takes longer than its timeout (2 s) as a "timeout" error.
    result["output"] = text[-3000:]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    result["non_2xx"] = int(m.group(1)) if m else 0
    result["failed"] = result["socket_errors"] + result["non_2xx"]
    if out.returncode != 0 or result["requests"] is None:
        result["failed"] += 1
        result["output"] = (text + out.stderr)[-3000:]
    return result


def wait_quiet(sampler: Sampler, baseline: dict[int, int], timeout: float) -> dict:
    """Samples until every process holds no more descriptors than at `baseline` (the
    clients' sockets are closed once the server has seen their FIN), or `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        sample = sampler.take()
        settled = all(
            sample["procs"].get(pid, {}).get("fds", 0) <= fds for pid, fds in baseline.items()
        )
        if settled or time.monotonic() > deadline:
            return sample
        time.sleep(0.2)


# --------------------------------------------------------------------------- summary

def summarise(samples: list[dict], start: dict, end: dict, root: int) -> list[dict]:
    rows = []
    pids = sorted(set(start["procs"]) | set(end["procs"]), key=lambda p: (p != root, p))
    for pid in pids:
        seen = [s["procs"][pid] for s in samples if pid in s["procs"] and s["t"] >= start["t"]]
        first = start["procs"].get(pid)
        last = end["procs"].get(pid)
        row = {
            "pid": pid,
            "role": "supervisor" if pid == root else "worker",
            "fds_start": first and first["fds"],
            "fds_end": last and last["fds"],
            "fds_max": max((p["fds"] for p in seen), default=None),
            "rss_kib_start": first and first["rss_kib"],
            "rss_kib_end": last and last["rss_kib"],
            "rss_kib_max": max((p["rss_kib"] for p in seen), default=None),
        }
        flat_fds = first is not None and last is not None and last["fds"] == first["fds"]
        slack = max(RSS_SLACK_KIB, int((first or {"rss_kib": 0})["rss_kib"] * RSS_SLACK_SHARE))
        flat_rss = (first is not None and last is not None
                    and last["rss_kib"] - first["rss_kib"] <= slack)
        row["flat"] = flat_fds and flat_rss
        rows.append(row)
    return rows


def kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in counts.items()) or "0"


def mib(kib: int | None) -> str:
    return "–" if kib is None else f"{kib / 1024:.1f}"


def markdown(result: dict) -> str:
    c, k = result["connections"], result["keepalive"]
    lines = [
        "## Soak",
        "",
        "`bench/soak` runs the demo (release build, "
        f"`--workers {result['workers']}`) through a long load and samples, every "
        f"{result['sample_interval']:g} s, the open descriptors (`/proc/PID/fd`) and the "
        "resident size (`VmRSS`) of the supervisor and of each worker. Phases: a warm-up, "
        "N connections one after another (`GET /` with `Connection: close`, spread over "
        "client threads, every answer checked), then `wrk` keep-alive load for a fixed time, "
        "then a final sample once every client is gone. `bench/soak --quick` is the short "
        "version (100,000 connections, 20 s keep-alive); `bench/soak` runs 1,000,000 "
        "connections and 300 s. \"Flat\" means a process ends with the descriptors it had "
        "after the warm-up, and its resident size ends within max(4 MiB, 10 %) of its "
        "start. This section is rewritten by each run.",
        "",
        f"Latest run: {result['mode']}, {result['date']}, `{result['host']}` "
        f"({result['cpus']} CPUs), {result['duration_s']:.0f} s in all. Verdict: "
        f"**{'flat, no failed request' if result['ok'] else 'NOT flat or requests failed'}**.",
        "",
        "| phase | what | duration | rate | failed |",
        "|---|---|---|---|---|",
        f"| connections | {c['connections']:,} connections, {c['threads']} client threads | "
        f"{c['seconds']:.1f} s | {c['per_second']:,.0f} connections/s | "
        f"{c['failed']}{' ' + json.dumps(c['errors']) if c['errors'] else ''} |",
        f"| keep-alive | `wrk {k['command']}`: {k['requests'] or 0:,} requests | "
        f"{k['seconds']:.1f} s | {k['per_second'] or 0:,.0f} requests/s | "
        f"{k['failed']} (socket errors {kinds(k['socket_error_kinds'])}, "
        f"non-2xx {k['non_2xx']}); latency p99 {k['latency_p99']}, max {k['latency_max']} |",
        "",
        "| process | pid | fds start | fds end | fds max | RSS start (MiB) | RSS end (MiB) "
        "| RSS max (MiB) | flat |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["processes"]:
        lines.append(
            f"| {row['role']} | {row['pid']} | {row['fds_start']} | {row['fds_end']} | "
            f"{row['fds_max']} | {mib(row['rss_kib_start'])} | {mib(row['rss_kib_end'])} | "
            f"{mib(row['rss_kib_max'])} | {'yes' if row['flat'] else '**no**'} |"
        )
    lines += [
        "",
        f"Worker deaths during the run: {result['worker_deaths']}; workers started after "
        f"boot: {result['workers_started_after_boot']}. Samples: {result['samples']}. "
        "Peaks (\"max\") include the sockets in flight during the load; start and end are "
        "taken with no client connected. The machine runs client and server on the same "
        "cores, so the rates are a by-product, not a benchmark.",
        "",
    ]
    return "\n".join(lines)


def update_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if BEGIN not in doc or END not in doc:
        doc = doc.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


# --------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="100,000 connections and 20 s of keep-alive load")
    parser.add_argument("--connections", type=int, help="connections one after another")
    parser.add_argument("--keepalive-secs", type=int, help="seconds of wrk keep-alive load")
    parser.add_argument("--wrk-connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=8, help="client threads")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sample-interval", type=float, default=1.0)
    parser.add_argument("--binary", type=Path, default=DEFAULT_BINARY,
                        help="the demo binary (default: target/release/coreloop-demo)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-doc", action="store_true",
                        help="do not rewrite the Soak section of docs/benchmarks.md")
    args = parser.parse_args()
    total = args.connections or (100_000 if args.quick else 1_000_000)
    seconds = args.keepalive_secs or (20 if args.quick else 300)
    if total < 1 or seconds < 1 or args.threads < 1:
        parser.error("--connections, --keepalive-secs and --threads must be positive")
    if not args.binary.is_file():
        parser.error(f"{args.binary} does not exist (bench/soak builds it)")

    began = time.monotonic()
    server = Server(args.binary, args.workers)
    root = server.proc.pid
    sampler = Sampler(root, args.sample_interval)
    sampler.start()
    try:
        sampler.phase = "warm-up"
        warm = connections(server.port, max(2_000, total // 50), args.threads, "warm-up")
        booted_ready = server.worker_events()[1]
        start = wait_quiet(sampler, {}, 0)
        baseline = {pid: p["fds"] for pid, p in start["procs"].items()}
        start = wait_quiet(sampler, baseline, QUIESCE_TIMEOUT)
        print(f"soak: start sample {start['procs']}", file=sys.stderr)

        sampler.phase = "connections"
        conn = connections(server.port, total, args.threads, "connections")
        print(f"soak: connections {conn}", file=sys.stderr)

        sampler.phase = "keep-alive"
        ka = keepalive(server.port, seconds, args.wrk_connections)
        print(f"soak: keep-alive { {k: v for k, v in ka.items() if k != 'output'} }",
              file=sys.stderr)

        sampler.phase = "quiescence"
        end = wait_quiet(sampler, baseline, QUIESCE_TIMEOUT)
        print(f"soak: end sample {end['procs']}", file=sys.stderr)
    finally:
        sampler.halt.set()
        sampler.join()
        server.stop()
    died, ready = server.worker_events()
    rows = summarise(sampler.samples, start, end, root)
    ok = (all(row["flat"] for row in rows) and conn["failed"] == 0 and ka["failed"] == 0
          and warm["failed"] == 0 and died == 0)
    result = {
        "mode": "quick" if args.quick else "full",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "sample_interval": args.sample_interval,
        "duration_s": round(time.monotonic() - began, 1),
        "warm_up": warm,
        "connections": conn,
        "keepalive": ka,
        "processes": rows,
        "worker_deaths": died,
        "workers_started_after_boot": ready - booted_ready,
        "samples": len(sampler.samples),
        "ok": ok,
    }
    if args.connections or args.keepalive_secs:
        result["mode"] = "custom"
    result["mode"] += f" ({total:,} connections, {seconds} s keep-alive)"
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"soak-{stamp}.json"
    path.write_text(json.dumps({**result, "series": sampler.samples}, indent=1))
    text = markdown(result)
    print(text)
    print(f"soak: wrote {path}", file=sys.stderr)
    if not args.no_doc:
        update_doc(text)
        print(f"soak: updated {DOC}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
