#!/usr/bin/env python3
"""Benchmark coreloop's demo HTTP server against its peers (stdlib only).

Run it through ``bench/run`` (installs wrk/nginx/gnuplot, builds the demo, the peers and the
open-loop generator). Direct use:

    python3 bench/bench.py [--quick] [--rounds N] [--duration SECS] [--workers 1,2]
                           [--servers coreloop,tokio,reuseport,nginx]
                           [--loads keepalive,close,idle,skewed,stalled,open,skewed-open,blocking-open]
                           [--out DIR] [--prefix NAME] [--wrk-threads N] [--wrk-connections N]

Every run: start the server on a fresh 127.0.0.1 port, wait until it answers ``/``, run one
load with wrk, sample the server's process tree from /proc, stop it (SIGTERM, SIGKILL after
5 s) and wait until every process of its tree is gone. Rounds interleave the servers and
rotate their order. Results: OUT/results-<UTC>.json, OUT/latest.json, docs/benchmarks.svg
and the generated region of docs/benchmarks.md. See docs/benchmarks.md. bench/scale runs it
at W = 1, 2, 4, ... nproc for bench/scale_model.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# Where bench/run's `cargo build --release -p coreloop-demo` and `-p coreloop-bench` put the
# binaries (cargo reads CARGO_TARGET_DIR relative to the directory it runs in: ROOT).
BIN = ROOT / os.environ.get("CARGO_TARGET_DIR", "target") / "release"
NGINX = Path("/usr/sbin/nginx")
DOC = ROOT / "docs" / "benchmarks.md"
SVG = ROOT / "docs" / "benchmarks.svg"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = b"Hello, world!"

START_TIMEOUT = 15.0  # seconds for a server to answer "/"
TERM_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
TREE_EXIT_TIMEOUT = 10.0  # seconds for the rest of the tree to go after the root
IDLE_CONNS = 2000


# --------------------------------------------------------------------------- servers
# Each server: argv builder (port, workers, tmpdir) -> argv, and what it is.
#   family "coreloop": the rows whose ratios are reported; the others are the peers.
#   stall:  multi-process server whose workers are children of the first process: the
#           "stalled" load SIGSTOPs one of them.
#   burn:   serves /burn?ms=N by burning CPU (nginx cannot: excluded from "skewed").
#   whoami: answers /whoami with "worker=<id> pid=<pid>" (used to wait for every worker).


def _nginx_argv(port: int, workers: int, tmp: Path) -> list[str]:
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"worker_processes {workers};\n"
        "daemon off;\n"
        "master_process on;\n"
        f"pid {tmp}/nginx.pid;\n"
        "error_log stderr error;\n"
        "events { worker_connections 16384; }\n"
        "http {\n"
        "  access_log off;\n"
        "  default_type text/plain;\n"
        "  keepalive_requests 1000000;\n"
        f"  server {{\n    listen {HOST}:{port} reuseport;\n"
        '    location / { return 200 "Hello, world!"; }\n'
        '    location /burn { return 200 "Hello, world!"; }\n'
        "  }\n"
        "}\n"
    )
    return [str(NGINX), "-p", str(tmp), "-c", str(conf), "-e", "stderr"]


SERVERS: dict[str, dict] = {
    "coreloop": dict(
        argv=lambda p, w, t: [str(BIN / "coreloop-demo"), "--bind", f"{HOST}:{p}", "--workers", str(w)],
        family="coreloop", stall=True, burn=True, whoami=True, procs=lambda w: w + 1,
        what="coreloop supervisor + W worker processes (the demo, crates/coreloop-demo)",
    ),
    "coreloop-reuseport": dict(
        argv=lambda p, w, t: [str(BIN / "coreloop-demo"), "--bind", f"{HOST}:{p}", "--workers", str(w), "--mode", "reuseport"],
        family="coreloop", stall=True, burn=True, whoami=True, procs=lambda w: w + 1,
        what="coreloop, --mode reuseport: each worker accepts on its own SO_REUSEPORT socket",
    ),
    "tokio": dict(
        argv=lambda p, w, t: [str(BIN / "peer_tokio"), "--bind", f"{HOST}:{p}", "--threads", str(w)],
        family="peer", stall=False, burn=True, whoami=True, procs=lambda w: 1,
        what="one process, tokio multi-thread runtime with W threads (bench/tools/src/bin/peer_tokio.rs)",
    ),
    "reuseport": dict(
        argv=lambda p, w, t: [str(BIN / "peer_reuseport"), "--bind", f"{HOST}:{p}", "--processes", str(w)],
        family="peer", stall=True, burn=True, whoami=True, procs=lambda w: w + 1,
        what="W SO_REUSEPORT current_thread processes, children of a first one (bench/tools/src/bin/peer_reuseport.rs)",
    ),
    "nginx": dict(
        argv=_nginx_argv,
        family="peer", stall=False, burn=False, whoami=False, procs=lambda w: w + 1,
        what="nginx (nginx-light), W worker processes, listen ... reuseport, return 200",
    ),
}
REUSEPORT_PEER = "reuseport"  # the denominator of the CPU and skewed-p99 ratios

# Offered rate of the open-loop load, per worker: about half of what two workers serve
# under the closed-loop skewed load on the 2-core reference machine.
OPEN_RATE_PER_WORKER = 1500

# Loads: wrk arguments (besides -d and the URL) and which servers take part.
LOADS: dict[str, dict] = {
    "keepalive": dict(wrk=["-t2", "-c64", "--latency", "-s", str(BENCH / "report.lua")],
                      what="64 keep-alive connections, GET /"),
    "close": dict(wrk=["-t2", "-c64", "--latency", "-s", str(BENCH / "report.lua"),
                       "-H", "Connection: close"],
                  what="64 connections, one request per connection (Connection: close)"),
    "idle": dict(wrk=["-t2", "-c16", "--latency", "-s", str(BENCH / "report.lua")],
                 what=f"{IDLE_CONNS} idle keep-alive connections held open, 16 busy keep-alive ones"),
    "skewed": dict(wrk=["-t2", "-c64", "--latency", "-s", str(BENCH / "skewed.lua")],
                   what="one request per connection, 1 in 20 is /burn?ms=5 (spins 5 ms on the event loop)"),
    "stalled": dict(wrk=["-t2", "-c64", "--latency", "-s", str(BENCH / "report.lua"),
                         "-H", "Connection: close"],
                    what="the close load while one worker process is SIGSTOPped (W=2 only)"),
    # Open loop (bench/tools/src/bin/openloop.rs): requests start on a fixed schedule whatever the
    # server does, and latency counts from the scheduled start, so a request stuck behind
    # a long one shows. A closed loop at saturation (`skewed`) cannot show it: there every
    # server's mean latency is clients / throughput (Little's law), whoever picks workers.
    # The open loop with cheap requests only: the latency a server adds at a moderate
    # rate, where nobody is saturated. This is where coreloop's hop (and, once CPUs are
    # contended, its accept polling) costs latency rather than CPU.
    "open": dict(openloop=["--burn-every", "0"],
                 rate_per_worker=OPEN_RATE_PER_WORKER,
                 what=f"open loop, {OPEN_RATE_PER_WORKER:,} requests/s per worker, one "
                      "connection each, all `/`: latency at a moderate rate"),
    "skewed-open": dict(openloop=["--burn-every", "200", "--burn-ms", "5"],
                        rate_per_worker=OPEN_RATE_PER_WORKER,
                        what=f"open loop, {OPEN_RATE_PER_WORKER:,} requests/s per worker, one "
                             "connection each, 1 in 200 is /burn?ms=5; p99 of all requests, and "
                             "of the cheap ones (what waits behind a burn)"),
    # The same open loop, but the slow request blocks its worker's loop without using CPU
    # (a synchronous call): head-of-line blocking without the CPU contention a burn adds
    # on two cores shared with the load generator.
    "blocking-open": dict(openloop=["--burn-every", "200", "--burn-ms", "5",
                                    "--slow-path", "/block"],
                          rate_per_worker=OPEN_RATE_PER_WORKER,
                          what=f"open loop, {OPEN_RATE_PER_WORKER:,} requests/s per worker, one "
                               "connection each, 1 in 200 is /block?ms=5 (blocks the loop 5 ms "
                               "without CPU, like a synchronous call); p99 of all requests, and "
                               "of the cheap ones"),
}
LOAD_ORDER = list(LOADS)
# Loads whose slow requests the demo's handler serves (nginx has no /burn or /block).
SKEW_LOADS = ("skewed", "skewed-open", "blocking-open")
# Open-loop loads run at a fixed offered rate: their throughput and CPU say nothing.
OPEN_LOADS = ("open", "skewed-open", "blocking-open")


def takes_part(server: str, load: str, workers: int) -> bool:
    s = SERVERS[server]
    if load in SKEW_LOADS:
        return s["burn"]
    if load == "stalled":
        return s["stall"] and workers == 2
    return True


# --------------------------------------------------------------------------- /proc
def read_stat(pid: int) -> dict | None:
    """ppid, state, utime+stime (ticks), starttime of one process, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on
    return dict(pid=pid, state=rest[0], ppid=int(rest[1]),
                ticks=int(rest[11]) + int(rest[12]),  # fields 14 utime, 15 stime
                start=int(rest[19]),  # field 22 starttime
                comm=raw[raw.index("(") + 1:raw.rindex(")")])


def process_tree(root: int) -> dict[tuple[int, int], dict]:
    """Every live process descending from root (root included), keyed by (pid, starttime)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st:
                stats[st["pid"]] = st
    if root not in stats:
        return {}
    kids: dict[int, list[int]] = {}
    for st in stats.values():
        kids.setdefault(st["ppid"], []).append(st["pid"])
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        st = stats.get(pid)
        if st and st["state"] != "Z":
            out[(pid, st["start"])] = st
        todo.extend(kids.get(pid, []))
    return out


def alive(key: tuple[int, int]) -> bool:
    st = read_stat(key[0])
    return bool(st) and st["start"] == key[1] and st["state"] != "Z"


def vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# Every process this script started (and its descendants), for the final leftover check.
STARTED: dict[tuple[int, int], str] = {}


def remember(tree: dict, name: str) -> None:
    for key, st in tree.items():
        STARTED.setdefault(key, f"{name}:{st['comm']}")


# --------------------------------------------------------------------------- ports, probes
def local_port_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_next_port = [0]


def fresh_port() -> int:
    """A free port below the ephemeral range (so wrk's client ports never collide with it)."""
    lo, hi = 20000, min(30000, local_port_floor())
    if not _next_port[0]:
        _next_port[0] = random.randrange(lo, hi)
    for _ in range(hi - lo):
        port = _next_port[0]
        _next_port[0] = lo if port + 1 >= hi else port + 1
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def http_get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes] | None:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(m.group(1)), body) if m else None


# --------------------------------------------------------------------------- one server
class Server:
    def __init__(self, name: str, workers: int, logdir: Path):
        self.name, self.workers = name, workers
        self.port = fresh_port()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=logdir))
        self.log_path = self.tmp / "server.log"
        self.proc: subprocess.Popen | None = None
        self.notes: list[str] = []
        self.known: dict[tuple[int, int], dict] = {}  # every process of the tree ever seen

    def start(self) -> None:
        argv = SERVERS[self.name]["argv"](self.port, self.workers, self.tmp)
        self.argv = argv
        if not Path(argv[0]).exists():
            hint = ("bench/run builds it" if Path(argv[0]).parent == BIN
                    else "bench/run installs it")
            raise RuntimeError(f"{argv[0]} not found ({hint})")
        env = dict(os.environ, RUST_LOG=os.environ.get("BENCH_RUST_LOG", "warn"),
                   **SERVERS[self.name].get("env", {}))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env, cwd=self.tmp, start_new_session=True)
        remember(self.tree(), self.name)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with status {self.proc.returncode} before answering")
            got = http_get(self.port, "/", timeout=0.5)
            if got and got[0] == 200 and got[1] == BODY:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no 200 {BODY!r} on / within {START_TIMEOUT:.0f} s (last: {got})")
            time.sleep(0.05)
        self._wait_for_workers(deadline)
        remember(self.tree(), self.name)

    def _wait_for_workers(self, deadline: float) -> None:
        """Wait (bounded) until every process is up and, where possible, answering."""
        spec = SERVERS[self.name]
        want_procs = spec["procs"](self.workers)
        while len(self.tree()) < want_procs and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(self.tree()) < want_procs:
            self.notes.append(f"only {len(self.tree())} of {want_procs} processes up")
        if not spec["whoami"]:
            time.sleep(0.2)
            return
        want = self.workers if spec["procs"](self.workers) > 1 else 1
        seen: set[bytes] = set()
        for _ in range(200):
            if len(seen) >= want or time.monotonic() > deadline:
                break
            got = http_get(self.port, "/whoami", timeout=0.5)
            if got and got[0] == 200:
                m = re.search(rb"pid=(\d+)", got[1])
                if m:
                    seen.add(m.group(1))
            else:
                time.sleep(0.02)
        if len(seen) < want:
            self.notes.append(f"/whoami saw {len(seen)} of {want} workers before the load")

    def tree(self) -> dict:
        tree = process_tree(self.proc.pid) if self.proc else {}
        self.known.update(tree)
        return tree

    def children(self) -> list[int]:
        return sorted(k[0] for k, st in self.tree().items() if st["ppid"] == self.proc.pid)

    def stop(self) -> None:
        """SIGTERM the root by PID, SIGKILL after 5 s, then wait for the whole tree."""
        if not self.proc:
            return
        # the tree now, plus any process seen earlier that is still alive (a child orphaned
        # by a root that died is no longer under the root in /proc)
        tree = self.tree()
        tree.update({k: st for k, st in self.known.items() if alive(k)})
        remember(tree, self.name)
        for key in tree:  # never leave a stopped process behind
            if alive(key):
                try:
                    os.kill(key[0], signal.SIGCONT)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TERM_GRACE)
            except subprocess.TimeoutExpired:
                self.notes.append(f"root ignored SIGTERM for {TERM_GRACE:.0f} s: SIGKILL")
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + TREE_EXIT_TIMEOUT
        while time.monotonic() < deadline and any(alive(k) for k in tree):
            time.sleep(0.05)
        left = [k for k in tree if alive(k)]
        for key in left:
            self.notes.append(f"pid {key[0]} outlived its root by {TREE_EXIT_TIMEOUT:.0f} s: SIGKILL")
            try:
                os.kill(key[0], signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(k) for k in left):
            time.sleep(0.05)

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


# --------------------------------------------------------------------------- loads
def open_idle(port: int, count: int, timeout: float = 20.0) -> list[socket.socket]:
    """Open `count` keep-alive connections, make one request on each, read the answer."""
    req = f"GET / HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    socks: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    try:
        for _ in range(count):
            s = socket.create_connection((HOST, port), timeout=2.0)
            socks.append(s)
            s.sendall(req)
        sel = selectors.DefaultSelector()
        pending = {}
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            pending[s] = b""
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                s = key.fileobj
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("server closed an idle connection while opening them")
                pending[s] += chunk
                if pending[s].endswith(BODY):
                    sel.unregister(s)
                    del pending[s]
        sel.close()
        if pending:
            raise RuntimeError(f"{len(pending)} of {count} idle connections got no answer")
        return socks
    except BaseException:
        close_all(socks)
        raise


def close_all(socks: list[socket.socket]) -> int:
    """Close the idle connections; return how many the server had closed meanwhile."""
    closed = 0
    for s in socks:
        try:
            s.setblocking(False)
            if s.recv(1) == b"":
                closed += 1
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            closed += 1
        s.close()
    return closed


def cont(key: tuple[int, int]) -> None:
    """SIGCONT a process we stopped, if it is still that process."""
    if alive(key):
        try:
            os.kill(key[0], signal.SIGCONT)
        except ProcessLookupError:
            pass


# The open-loop generator runs SCHED_FIFO when it may: it must send on schedule, and on
# cores it shares with the servers a worker that spins in a handler would otherwise delay
# it, and the delay counts against whichever server is measured (every request scheduled
# meanwhile is late). It sleeps between requests, so it takes a core only for what it
# sends. wrk is a closed loop that keeps its cores busy: it stays at normal priority.
REALTIME = ["chrt", "--fifo", "10"]


def realtime_allowed() -> bool:
    """Whether this process may start programs under SCHED_FIFO (root or CAP_SYS_NICE)."""
    try:
        return subprocess.run([*REALTIME, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_wrk(load: str, port: int, duration: int, workers: int = 1, realtime: bool = False) -> dict:
    spec = LOADS[load]
    if "openloop" in spec:
        rate = spec["rate_per_worker"] * workers
        argv = [*(REALTIME if realtime else []), str(BIN / "openloop"), "--addr",
                f"{HOST}:{port}", "--rate", str(rate), "--duration", str(duration),
                *spec["openloop"]]
    else:
        argv = ["wrk", *spec["wrk"], "-d", f"{duration}s", f"http://{HOST}:{port}/"]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30,
                           stdin=subprocess.DEVNULL, cwd=BENCH)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"wrk did not finish within {duration + 30} s")
    for line in p.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            out = json.loads(line[len("BENCH_JSON "):])
            break
    else:
        raise RuntimeError(f"wrk exited {p.returncode} without a result: "
                           f"{(p.stderr or p.stdout).strip()[-300:]}")
    if p.returncode != 0:
        raise RuntimeError(f"wrk exited {p.returncode}: {p.stderr.strip()[-300:]}")
    if out["requests"] <= 0:
        raise RuntimeError("wrk completed no request")
    out["wrk_argv"] = argv
    return out


def one_run(server: str, load: str, workers: int, rnd: int, duration: int, logdir: Path,
            settle: float, realtime: bool) -> dict:
    rec = dict(round=rnd, load=load, workers=workers, server=server, ok=False,
               started=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    srv = Server(server, workers, logdir)
    rec["port"] = srv.port
    idle: list[socket.socket] = []
    stopped_key = None
    try:
        srv.start()
        rec["argv"] = srv.argv
        if load == "idle":
            idle = open_idle(srv.port, IDLE_CONNS)
        if load == "stalled":
            kids = srv.children()
            if not kids:
                raise RuntimeError("no worker process to stop")
            stopped = next(k for k in srv.tree() if k[0] == kids[0])
            os.kill(stopped[0], signal.SIGSTOP)
            stopped_key = stopped
            rec["stopped_pid"], rec["stall_settle_s"] = stopped[0], settle
            # Let the server notice (coreloop marks a worker whose reports are 3 heartbeat
            # intervals late as stalled: 3 s by default) before the load starts.
            time.sleep(settle)
        before = srv.tree()
        wrk = run_wrk(load, srv.port, duration, workers, realtime)
        after = srv.tree()
        if stopped_key:
            rec["stopped_pid_alive_at_end"] = alive(stopped_key)
            cont(stopped_key)
            stopped_key = None
        remember(after, server)
        both = before.keys() & after.keys()
        ticks = sum(after[k]["ticks"] - before[k]["ticks"] for k in both)
        cpu_us = ticks * 1_000_000 / CLK_TCK
        # coreloop: the root process is the supervisor (all its threads: /proc/PID/stat
        # counts them), the rest are its workers. Peers: everything counts as workers.
        root = srv.proc.pid
        sup_ticks = sum(after[k]["ticks"] - before[k]["ticks"] for k in both if k[0] == root)
        coreloop = SERVERS[server]["family"] == "coreloop"
        sup_us = sup_ticks * 1_000_000 / CLK_TCK if coreloop else None
        workers_us = cpu_us - (sup_us or 0)
        # not in cpu_us (the definition counts processes alive at both samples), kept raw:
        appeared_us = sum(after[k]["ticks"] for k in after.keys() - before.keys()) * 1e6 / CLK_TCK
        hwm = [h for h in (vm_hwm_kib(k[0]) for k in after) if h is not None]
        rec.update(wrk)
        secs = wrk["duration_us"] / 1e6
        rec.update(
            ok=True,
            rps=wrk["requests"] / secs,
            cpu_us_per_req=cpu_us / wrk["requests"],
            cpu_cores=cpu_us / 1e6 / secs,  # mean cores busy in the server tree
            supervisor_cpu_us_per_req=None if sup_us is None else sup_us / wrk["requests"],
            workers_cpu_us_per_req=workers_us / wrk["requests"],
            procs=len(after),
            cpu_us_appeared_procs=appeared_us,
            procs_appeared=sorted(k[0] for k in after.keys() - before.keys()),
            procs_vanished=sorted(k[0] for k in before.keys() - after.keys()),
            rss_max_kib=max(hwm) if hwm else None,
            rss_sum_kib=sum(hwm) if hwm else None,
        )
        if rec["procs_appeared"] or rec["procs_vanished"]:
            srv.notes.append(f"processes appeared {rec['procs_appeared']} vanished "
                             f"{rec['procs_vanished']} during the load (CPU counts only "
                             "processes alive at both samples)")
        if idle:
            rec["idle_closed_by_server"] = close_all(idle)
            idle = []
    except Exception as e:  # recorded, never fatal to the whole run
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["log_tail"] = srv.log_tail()
    finally:
        if stopped_key:
            cont(stopped_key)
        if idle:
            close_all(idle)
        srv.stop()
        rec["notes"] = srv.notes
        shutil.rmtree(srv.tmp, ignore_errors=True)
    return rec


# --------------------------------------------------------------------------- aggregation
METRICS = ["rps", "p50_us", "p99_us", "p999_us", "cheap_p99_us", "cpu_us_per_req", "cpu_cores",
           "rss_max_kib", "rss_sum_kib", "errors", "stall_fraction",
           "supervisor_cpu_us_per_req", "workers_cpu_us_per_req"]


def aggregate(runs: list[dict]) -> list[dict]:
    # stalled throughput as a fraction of the same server's close figure, same round
    close = {(r["round"], r["workers"], r["server"]): r["rps"]
             for r in runs if r["load"] == "close" and r["ok"]}
    for r in runs:
        if r["load"] == "stalled" and r["ok"]:
            base = close.get((r["round"], r["workers"], r["server"]))
            r["stall_fraction"] = r["rps"] / base if base else None

    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["load"], r["workers"], r["server"]), []).append(r)
    med: list[dict] = []
    for (load, workers, server), rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        m = dict(load=load, workers=workers, server=server, runs=len(rs), ok_runs=len(ok),
                 errors_total=sum(r.get("errors", 0) for r in ok),
                 requests_total=sum(r.get("requests", 0) for r in ok),
                 failures=[r["error"] for r in rs if not r["ok"]])
        for k in METRICS:
            vals = [r[k] for r in ok if r.get(k) is not None]
            m[k] = statistics.median(vals) if vals else None
        med.append(m)

    by = {(m["load"], m["workers"], m["server"]): m for m in med}
    for m in med:
        peers = [p for p in med if p["load"] == m["load"] and p["workers"] == m["workers"]
                 and SERVERS[p["server"]]["family"] != "coreloop" and p["rps"]]
        best = max(peers, key=lambda p: p["rps"], default=None)
        m["best_peer"] = best["server"] if best else None
        m["rps_ratio"] = m["rps"] / best["rps"] if best and m["rps"] else None
        rp = by.get((m["load"], m["workers"], REUSEPORT_PEER))
        m["cpu_ratio"] = (m["cpu_us_per_req"] / rp["cpu_us_per_req"]
                          if rp and rp["cpu_us_per_req"] and m["cpu_us_per_req"] else None)
        m["p99_ratio"] = (m["p99_us"] / rp["p99_us"]
                          if rp and rp["p99_us"] and m["p99_us"] else None)
        m["cheap_p99_ratio"] = (m["cheap_p99_us"] / rp["cheap_p99_us"]
                                if rp and rp.get("cheap_p99_us") and m.get("cheap_p99_us") else None)
    med.sort(key=lambda m: (LOAD_ORDER.index(m["load"]), m["workers"], list(SERVERS).index(m["server"])))
    return med


# --------------------------------------------------------------------------- reporting
def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def cmd(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=ROOT)
            return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else ""
        except (OSError, subprocess.TimeoutExpired):
            return ""

    dirty = cmd(["git", "status", "--porcelain", "--untracked-files=no"])
    return dict(
        nproc=os.cpu_count(), kernel=platform.release(), cpu=cpu,
        mem_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        loadavg=Path("/proc/loadavg").read_text().split()[:3],
        git=cmd(["git", "rev-parse", "--short", "HEAD"]) + ("+dirty" if dirty else ""),
        wrk=cmd(["wrk", "--version"]), nginx=cmd([str(NGINX), "-v"]),
        hostname=platform.node(),
    )


def fmt_num(v, digits=0, scale=1.0, dash="–") -> str:
    if v is None:
        return dash
    return f"{v / scale:,.{digits}f}"


def fmt_ms(us) -> str:
    if us is None:
        return "–"
    ms = us / 1000
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(v) -> str:
    return "–" if v is None else f"{v:.2f}×"


def markdown(results: dict) -> str:
    meta, cfg, med = results["machine"], results["config"], results["medians"]
    out = [
        f"Generated {results['date']} by `{results['command']}`.",
        "",
        f"Machine: {meta['cpu']}, `nproc` = {meta['nproc']}, {meta['mem_gib']} GiB, "
        f"kernel {meta['kernel']}; load average at start {' '.join(meta['loadavg'])}. "
        f"Commit {meta['git']}. {meta['wrk'].split(' Copyright')[0]}; {meta['nginx']}.",
        "",
        f"{cfg['rounds']} round(s) × {cfg['duration']} s per run, workers {cfg['workers']}, "
        f"servers {', '.join(cfg['servers'])}, loads {', '.join(cfg['loads'])}. Figures are "
        "medians over rounds; errors are totals over rounds. Raw runs: "
        f"`{Path(results['raw_file']).with_name(results.get('latest_name', 'latest.json'))}` (a copy of "
        f"`{Path(results['raw_file']).name}`, which stays out of git).",
        "",
        "![median req/s and CPU µs/req per server, workers=2](benchmarks.svg)",
        "",
    ]
    if cfg["rounds"] < 3 or cfg["duration"] < 5:
        out[:0] = ["**Smoke test, not a result:** fewer than 3 rounds or shorter than 5 s per "
                   "run. Run `bench/run` with its defaults before quoting these numbers.", ""]
    if results.get("interrupted"):
        out[:0] = [f"**Interrupted** ({results['interrupted']}): partial results.", ""]
    keys = sorted({(m["load"], m["workers"]) for m in med},
                  key=lambda k: (LOAD_ORDER.index(k[0]), k[1]))
    for load, workers in keys:
        rows = [m for m in med if m["load"] == load and m["workers"] == workers]
        out.append(f"#### {load}, workers = {workers}")
        out.append("")
        out.append(f"{LOADS[load]['what']}.")
        out.append("")
        stalled = load == "stalled"
        ratio_head = "of unstalled close" if stalled else "req/s ÷ best peer"
        out.append(f"| server | req/s | {ratio_head} | p50 ms | p99 ms | p99.9 ms | CPU µs/req | "
                   "CPU µs/req ÷ reuseport | peak RSS max / sum MiB | errors | runs ok |")
        out.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for m in rows:
            ratio = m["stall_fraction"] if stalled else m["rps_ratio"]
            rss = ("–" if m["rss_max_kib"] is None else
                   f"{m['rss_max_kib'] / 1024:.1f} / {m['rss_sum_kib'] / 1024:.1f}")
            err = f"{m['errors_total']:,}"
            if m["errors_total"] and m["requests_total"]:
                err += f" ({100 * m['errors_total'] / (m['requests_total'] + m['errors_total']):.2g}%)"
            name = f"**{m['server']}**" if SERVERS[m["server"]]["family"] == "coreloop" else m["server"]
            out.append(
                f"| {name} | {fmt_num(m['rps'])} | {fmt_ratio(ratio)} | {fmt_ms(m['p50_us'])} | "
                f"{fmt_ms(m['p99_us'])} | {fmt_ms(m['p999_us'])} | {fmt_num(m['cpu_us_per_req'], 1)} | "
                f"{fmt_ratio(m['cpu_ratio'])} | {rss} | {err} | {m['ok_runs']}/{m['runs']} |")
        core = [m for m in rows if SERVERS[m["server"]]["family"] == "coreloop" and m["rps"]]
        for c in core:
            bits = []
            if not stalled and c["rps_ratio"] is not None:
                bits.append(f"throughput {c['rps_ratio']:.2f}× the best peer ({c['best_peer']})")
            if c["cpu_ratio"] is not None:
                bits.append(f"CPU per request {c['cpu_ratio']:.2f}× reuseport's")
            if (load in SKEW_LOADS or load in OPEN_LOADS) and c["p99_ratio"] is not None:
                bits.append(f"p99 {c['p99_ratio']:.2f}× reuseport's")
            if load in SKEW_LOADS and c.get("cheap_p99_ratio") is not None:
                bits.append(f"p99 of the cheap requests {fmt_ms(c['cheap_p99_us'])} ms, "
                            f"{c['cheap_p99_ratio']:.2f}× reuseport's")
            if stalled and c["stall_fraction"] is not None:
                bits.append(f"keeps {100 * c['stall_fraction']:.0f}% of its close throughput")
            if bits:
                out.append("")
                out.append(f"{c['server']}: " + "; ".join(bits) + ".")
        fails = [(m["server"], f) for m in rows for f in m["failures"]]
        if fails:
            out.append("")
            out.append("Failed runs: " + "; ".join(f"{s}: {f}" for s, f in fails))
        out.append("")
    if any(l in OPEN_LOADS for l in cfg["loads"]):
        out.append("The open-loop generator (`open`, `skewed-open`, `blocking-open`) ran "
                   + ("under SCHED_FIFO (`chrt --fifo 10`), so that a spinning worker cannot "
                      "delay its schedule." if cfg.get("openloop_realtime") else
                      "at normal priority: a spinning worker can delay its schedule, and "
                      "that delay counts as latency for every server."))
        out.append("")
    if any(l in cfg["loads"] for l in SKEW_LOADS) and "nginx" in cfg["servers"]:
        out.append("nginx takes no part in `skewed`, `skewed-open` and `blocking-open`: it "
                   "cannot burn CPU or block per request, so its `/burn` would be as cheap as `/`.")
        out.append("")
    notes = sorted({f"{r['server']} ({r['load']}, W={r['workers']}, round {r['round']}): {n}"
                    for r in results["runs"] for n in r.get("notes", [])})
    if notes:
        out.append("Notes from the runs:")
        out.append("")
        out.extend(f"- {n}" for n in notes[:40])
        if len(notes) > 40:
            out.append(f"- … {len(notes) - 40} more in the raw results")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def update_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in doc or END not in doc:
        doc = doc.rstrip() + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def gp_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def chart(results: dict, workdir: Path) -> str | None:
    """docs/benchmarks.svg: grouped bars (req/s, then CPU µs/req) per load at workers=2."""
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        return "gnuplot not found: chart not drawn"
    med = [m for m in results["medians"] if m["workers"] == 2 and m["rps"]]
    if not med:
        return "no successful run with workers=2: chart not drawn"
    servers = [s for s in SERVERS if any(m["server"] == s for m in med)]
    colors = {"coreloop": "#d62728", "coreloop-reuseport": "#ff7f0e", "tokio": "#1f77b4",
              "reuseport": "#2ca02c", "nginx": "#7f7f7f"}
    width = 0.8 / len(servers)

    def panel(key: str, loads: list[str], label) -> tuple[list[str], dict[str, Path]]:
        """One data file per server: x, value, label (x = load index + the server's slot)."""
        files = {}
        for j, s in enumerate(servers):
            rows = []
            for i, load in enumerate(loads):
                m = next((m for m in med if m["load"] == load and m["server"] == s), None)
                if m and m[key] is not None:
                    x = i + (j - (len(servers) - 1) / 2) * width
                    rows.append(f"{x:.4f} {m[key]:.3f} {label(m[key])}")
            files[s] = workdir / f"{s}.{key}.dat"
            files[s].write_text("\n".join(rows) + "\n")
        return loads, files

    all_loads = [l for l in LOAD_ORDER if l not in OPEN_LOADS and any(m["load"] == l for m in med)]
    rps = panel("rps", all_loads, lambda v: f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}")
    cpu = panel("cpu_us_per_req", [l for l in all_loads if l not in ("skewed", "stalled")],
                lambda v: f"{v:.1f}" if v < 10 else f"{v:.0f}")
    meta, cfg = results["machine"], results["config"]
    title = (f"coreloop vs peers, workers = 2 — {results['date'][:16].replace('T', ' ')} UTC — "
             f"{meta['cpu']}, {meta['nproc']} CPUs, Linux {meta['kernel']}")
    subtitle = (f"medians of {cfg['rounds']} interleaved round(s) × {cfg['duration']} s; wrk shares "
                "the same cores. nginx takes no part in skewed; stalled: coreloop and reuseport only")

    def plot(pan, top: float, bottom: float, ylabel: str, fmt: str, key: bool, xlabel: str = "") -> str:
        loads, files = pan
        tics = ", ".join(f"{gp_str(l)} {i}" for i, l in enumerate(loads))
        parts = []
        for s in servers:
            f = gp_str(str(files[s]))
            t = f"title {gp_str(s)}" if key else "notitle"
            parts.append(f"{f} using 1:2:({width * 0.92}) with boxes lc rgb "
                         f"{gp_str(colors.get(s, '#9467bd'))} {t}")
            parts.append(f"{f} using 1:2:3 with labels offset 0,0.7 font ',9' notitle")
        return (f"set tmargin at screen {top}\nset bmargin at screen {bottom}\n"
                f"set xrange [-0.6:{len(loads) - 0.4}]\nset xtics ({tics})\n"
                f"set format y {gp_str(fmt)}\nset ylabel {gp_str(ylabel)}\n"
                f"set xlabel {gp_str(xlabel)}\n"
                + ("set key\n" if key else "unset key\n")
                + "plot " + ", \\\n  ".join(parts) + "\n")

    script = f"""
set terminal svg size 1100,860 dynamic noenhanced font 'Sans,12' background rgb 'white'
set output {gp_str(str(SVG))}
set encoding utf8
set multiplot title {gp_str(title)} font ',14'
set label 1 {gp_str(subtitle)} at screen 0.5, screen 0.935 center font ',11'
set style fill solid 0.85 border lc rgb '#333333'
set grid ytics lc rgb '#dddddd'
set xtics nomirror scale 0
set ytics nomirror
set border 3
set lmargin at screen 0.09
set rmargin at screen 0.86
set key at screen 0.995, screen 0.89 right top vertical box opaque samplen 2
set yrange [0:*]
set offsets 0,0,graph 0.10,0
{plot(rps, 0.89, 0.53, 'requests per second (median, higher is better)', '%.0s%c', True)}
unset label 1
{plot(cpu, 0.42, 0.09, 'server CPU µs per request (median, lower is better)', '%g', False,
      'skewed (≈250 µs/req, mostly the 5 ms burn), stalled and the open loops are in the tables only')}
unset multiplot
"""
    gp = workdir / "chart.gp"
    gp.write_text(script)
    p = subprocess.run([gnuplot, str(gp)], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        return f"gnuplot failed: {p.stderr.strip()[-400:]}"
    return None


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 round, 2 s per run, workers 2 only (explicit options still win)")
    ap.add_argument("--rounds", type=int, help="rounds (default 5)")
    ap.add_argument("--duration", type=int, help="seconds per run (default 8)")
    ap.add_argument("--workers", help="comma list (default 1,2 plus nproc if different)")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help=f"comma list from {','.join(SERVERS)}")
    ap.add_argument("--loads", default=",".join(LOADS), help=f"comma list from {','.join(LOADS)}")
    ap.add_argument("--stall-settle", type=float, default=4.0, metavar="SECS",
                    help="stalled load: seconds between SIGSTOP and the start of wrk (default 4)")
    ap.add_argument("--baseline", metavar="BIN",
                    help="also run server 'coreloop-base': this build of the demo (e.g. a "
                         "copy built from main), interleaved with the others, for A/B runs")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="also run server NAME: the current demo build with extra "
                         "space-separated ARGS (e.g. 'pinned=--pin-workers'); words of the "
                         "form VAR=VALUE go to its environment instead; repeatable")
    ap.add_argument("--out", default=str(BENCH / "results"), help="results directory")
    ap.add_argument("--prefix", default="results", metavar="NAME",
                    help="results file names: OUT/NAME-<UTC>.json and OUT/NAME-latest.json "
                         "(default: OUT/results-<UTC>.json and OUT/latest.json)")
    ap.add_argument("--wrk-threads", type=int, metavar="N",
                    help="wrk threads of the closed-loop loads (default 2)")
    ap.add_argument("--wrk-connections", type=int, metavar="N",
                    help="wrk connections of the loads that use 64 (default 64)")
    ap.add_argument("--no-realtime", action="store_true",
                    help="run the open-loop generator at normal priority rather than "
                         "SCHED_FIFO (which needs root or CAP_SYS_NICE)")
    ap.add_argument("--no-doc", action="store_true",
                    help="do not rewrite docs/benchmarks.md and docs/benchmarks.svg")
    a = ap.parse_args(argv)
    extra = []
    if a.baseline:
        base = Path(a.baseline).resolve()
        if not os.access(base, os.X_OK):
            ap.error(f"--baseline {base}: not an executable")
        SERVERS["coreloop-base"] = dict(
            SERVERS["coreloop"],
            argv=lambda p, w, t: [str(base), "--bind", f"{HOST}:{p}", "--workers", str(w)],
            what=f"coreloop baseline build ({base})",
        )
        extra.append("coreloop-base")
    for spec in a.variant:
        name, sep, args = spec.partition("=")
        if not sep or not name or name in SERVERS:
            ap.error(f"--variant {spec!r}: want a new NAME=ARGS")
        words = args.split()
        env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w))
        more = [w for w in words if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w)]
        SERVERS[name] = dict(
            SERVERS["coreloop"],
            argv=lambda p, w, t, more=more: [
                str(BIN / "coreloop-demo"), "--bind", f"{HOST}:{p}", "--workers", str(w), *more],
            env=env,
            what=f"coreloop with {args}",
        )
        extra.append(name)
    if extra and a.servers == ",".join(s for s in SERVERS if s not in extra):
        a.servers = ",".join(SERVERS)
    elif extra:
        a.servers = ",".join([a.servers, *extra])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", a.prefix):
        ap.error(f"--prefix {a.prefix!r}: want a plain file-name prefix")
    for flag, value, old_word, what in (("--wrk-threads", a.wrk_threads, "-t2", None),
                                        ("--wrk-connections", a.wrk_connections, "-c64", "64 ")):
        if value is None:
            continue
        if value < 1:
            ap.error(f"{flag} must be positive")
        new_word = old_word[:2] + str(value)
        for spec in LOADS.values():
            if old_word in spec.get("wrk", []):
                spec["wrk"] = [new_word if w == old_word else w for w in spec["wrk"]]
                if what and spec["what"].startswith(what):
                    spec["what"] = f"{value} " + spec["what"][len(what):]
    a.rounds = a.rounds if a.rounds is not None else (1 if a.quick else 5)
    a.duration = a.duration if a.duration is not None else (2 if a.quick else 8)
    if a.workers is None:
        ws = [2] if a.quick else [1, 2] + ([os.cpu_count()] if os.cpu_count() not in (1, 2) else [])
    else:
        ws = [int(w) for w in a.workers.split(",") if w.strip()]
    a.workers = sorted(set(ws))
    a.servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    a.loads = [l.strip() for l in a.loads.split(",") if l.strip()]
    for s in a.servers:
        if s not in SERVERS:
            ap.error(f"unknown server {s!r}; known: {', '.join(SERVERS)}")
    for l in a.loads:
        if l not in LOADS:
            ap.error(f"unknown load {l!r}; known: {', '.join(LOADS)}")
    if a.rounds < 1 or a.duration < 1 or not a.workers or min(a.workers) < 1:
        ap.error("--rounds, --duration and --workers must be positive")
    if "stalled" in a.loads and "close" not in a.loads:
        print("note: 'stalled' is reported against 'close': adding the close load", file=sys.stderr)
        a.loads.append("close")
    a.loads = [l for l in LOAD_ORDER if l in a.loads]
    return a


class Interrupted(BaseException):
    """Raised by the signal handler; not an Exception, so one_run does not swallow it."""


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = IDLE_CONNS + 4096
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(max(want, soft), hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    for tool in ("wrk",):
        if not shutil.which(tool):
            print(f"{tool} not found: run bench/run, which installs it", file=sys.stderr)
            return 2

    def on_signal(signum, frame):
        # The first SIGINT/SIGTERM unwinds (the current server is stopped, the results so far
        # are written); later ones are ignored so that the clean-up itself is not cut short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    plan = []
    for rnd in range(args.rounds):
        for load in args.loads:
            for w in args.workers:
                order = [s for s in args.servers if takes_part(s, load, w)]
                k = rnd % len(order) if order else 0
                for s in order[k:] + order[:k]:
                    plan.append((rnd, load, w, s))
    if not plan:
        print("nothing to run for these options", file=sys.stderr)
        return 2
    est = len(plan) * (args.duration + 2.5) + sum(p[1] == "stalled" for p in plan) * args.stall_settle
    print(f"{len(plan)} runs, about {est / 60:.1f} min "
          f"(rounds {args.rounds}, {args.duration} s each, workers {args.workers})", flush=True)

    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    machine = machine_info()
    open_loop = any(l in OPEN_LOADS for l in args.loads)
    realtime = not args.no_realtime and open_loop and realtime_allowed()
    if open_loop:
        print("open-loop generator: " + ("SCHED_FIFO (chrt --fifo 10)" if realtime else
              "normal priority (--no-realtime, or not permitted)"), flush=True)
    runs: list[dict] = []
    interrupted = None
    with tempfile.TemporaryDirectory(prefix="coreloop-bench-") as tmp:
        tmp = Path(tmp)
        try:
            for i, (rnd, load, w, s) in enumerate(plan, 1):
                rec = one_run(s, load, w, rnd, args.duration, tmp, args.stall_settle, realtime)
                runs.append(rec)
                if rec["ok"]:
                    msg = (f"{rec['rps']:>10,.0f} req/s  p99 {fmt_ms(rec['p99_us']):>6} ms  "
                           f"{rec['cpu_us_per_req']:6.1f} µs/req  err {rec['errors']}")
                    if rec["supervisor_cpu_us_per_req"] is not None:
                        msg += (f"  (supervisor {rec['supervisor_cpu_us_per_req']:.1f} + "
                                f"workers {rec['workers_cpu_us_per_req']:.1f})")
                else:
                    msg = f"FAILED: {rec['error']}"
                print(f"[{i}/{len(plan)}] round {rnd + 1} {load:<9} W={w} {s:<10} {msg}", flush=True)
        except Interrupted as e:
            interrupted = str(e) or "interrupted"
            print(f"interrupted ({interrupted}): writing what was measured", file=sys.stderr)

        medians = aggregate(runs)
        rel_raw = None
        raw_path = out_dir / f"{args.prefix}-{stamp}.json"
        latest_path = out_dir / ("latest.json" if args.prefix == "results"
                                 else f"{args.prefix}-latest.json")
        try:
            rel_raw = raw_path.relative_to(ROOT)
        except ValueError:
            rel_raw = raw_path
        results = dict(
            date=started.isoformat(timespec="seconds"),
            finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            command="bench/run " + " ".join(shlex.quote(a) for a in argv),
            raw_file=str(rel_raw),
            latest_name=latest_path.name,
            interrupted=interrupted,
            config=dict(rounds=args.rounds, duration=args.duration, workers=args.workers,
                        servers=args.servers, loads=args.loads, idle_connections=IDLE_CONNS,
                        stall_settle_s=args.stall_settle, openloop_realtime=realtime,
                        loads_wrk={l: LOADS[l].get("wrk") or ["openloop", *LOADS[l]["openloop"]]
                                   for l in args.loads},
                        servers_what={s: SERVERS[s]["what"] for s in args.servers},
                        clk_tck=CLK_TCK),
            machine=machine,
            medians=medians,
            runs=runs,
        )
        leftovers = [f"{pid} ({what})" for (pid, start), what in STARTED.items() if alive((pid, start))]
        results["started_pids"] = sorted(k[0] for k in STARTED)
        results["leftover_pids"] = leftovers
        text = json.dumps(results, indent=1, default=str)
        raw_path.write_text(text)
        latest_path.write_text(text)
        print(f"wrote {raw_path} and {latest_path}")
        if not args.no_doc:
            problem = chart(results, tmp)
            print(problem or f"wrote {SVG}")
            update_doc(markdown(results))
            print(f"updated {DOC}")
    print()
    print(markdown(results))
    print(f"started {len(STARTED)} processes; still alive: {', '.join(leftovers) or 'none'}")
    return 1 if leftovers or interrupted else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
