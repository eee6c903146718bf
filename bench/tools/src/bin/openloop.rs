//! An open-loop HTTP/1.1 load generator for `bench/`: requests start on a fixed schedule
//! (`--rate` per second), one connection each, whether or not earlier ones have been
//! answered, and each latency is measured from the request's *scheduled* start. A server
//! that stalls therefore shows its stall in the latencies of every request scheduled
//! meanwhile (no coordinated omission, unlike a closed loop such as `wrk -c N`, whose
//! clients simply wait and send less).
//!
//! ```text
//! cargo run --release -p coreloop-bench --bin openloop -- --addr 127.0.0.1:8080 --rate 3000 --duration 10 \
//!     --burn-every 20 --burn-ms 5
//! ```
//!
//! Every `--burn-every`-th request asks for `/burn?ms=N` (the demo spins N ms on its event
//! loop) or, with `--slow-path /block`, `/block?ms=N` (the demo blocks its event loop for
//! N ms without using CPU), the others for `/` (or `/whoami`, `--cheap-path`). `--dump FILE`
//! writes every request's timings, which `bench/tail.py` reads to show where a tail comes
//! from. Prints one line for `bench/bench.py`, in the format of
//! `bench/report.lua`: `BENCH_JSON {"requests":…,"p50_us":…,"p99_us":…,…}`. Only
//! 127.0.0.1 / ::1 addresses are accepted: this tool is for local benchmarks.
#![deny(warnings)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use clap::Parser;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

#[derive(Debug, Parser)]
#[command(about = "open-loop HTTP/1.1 load: a fixed request rate, one connection per request")]
struct Args {
    /// Server address (loopback only).
    #[arg(long)]
    addr: SocketAddr,
    /// Requests started per second.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    rate: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Every N-th request is `SLOW_PATH?ms=--burn-ms` (0: never).
    #[arg(long, default_value_t = 0)]
    burn_every: u64,
    /// Milliseconds each slow request takes on the server.
    #[arg(long, default_value_t = 5)]
    burn_ms: u64,
    /// The slow request: `/burn` spins on the worker's event loop (CPU), `/block` blocks
    /// it without using CPU (a synchronous call).
    #[arg(long, default_value = "/burn", value_parser = ["/burn", "/block"])]
    slow_path: String,
    /// The cheap request's path: `/whoami` answers with the worker's pid, which `--dump`
    /// then records.
    #[arg(long, default_value = "/", value_parser = ["/", "/whoami"])]
    cheap_path: String,
    /// Write one line per answered request to this file, in schedule order: scheduled
    /// start (µs from the first), how late its task started (µs), connect to last byte
    /// (µs), latency (µs), 1 for a slow request, and the answering worker's pid (from a
    /// `pid=` in the body, else 0). For finding out where a tail comes from.
    #[arg(long)]
    dump: Option<std::path::PathBuf>,
    /// A request not answered within this many seconds counts as a timeout error.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Client threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// What the requests found, shared by their tasks.
#[derive(Debug, Default)]
struct Tally {
    latencies_us: Vec<u64>,
    /// The same, for the cheap requests only (not `/burn`): how long a short request waits
    /// behind long ones is what the choice of worker decides.
    cheap_us: Vec<u64>,
    errors_connect: u64,
    errors_read: u64,
    errors_status: u64,
    errors_timeout: u64,
    bytes: u64,
    /// One entry per answered request when `--dump` is given.
    dump: Vec<Dumped>,
}

/// One answered request, for `--dump`.
#[derive(Debug)]
struct Dumped {
    scheduled_us: u64,
    late_us: u64,
    served_us: u64,
    latency_us: u64,
    slow: bool,
    pid: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.addr.ip().is_loopback(),
        "--addr {}: only loopback addresses",
        args.addr
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("runtime")?;
    run(&runtime, &args);
    Ok(())
}

/// Starts the requests on schedule from this thread (`std::thread::sleep` is precise to
/// tens of microseconds; tokio's timer has a 1 ms grain, which would bunch the arrivals
/// and add up to 1 ms to every latency), runs them on `runtime`, and prints the summary.
fn run(runtime: &tokio::runtime::Runtime, args: &Args) {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let total = u64::from(args.rate) * args.duration;
    let interval = Duration::from_secs(1) / args.rate;
    let timeout = Duration::from_secs(args.timeout);
    let cheap: &'static [u8] = format!(
        "GET {} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
        args.cheap_path
    )
    .leak()
    .as_bytes();
    let dump = args.dump.is_some();
    let burn: &'static [u8] = format!(
        "GET {}?ms={} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
        args.slow_path, args.burn_ms
    )
    .leak()
    .as_bytes();
    let start = std::time::Instant::now();
    let first = Instant::from_std(start);
    let mut tasks = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for i in 0..total {
        let scheduled = start + interval * u32::try_from(i).unwrap_or(u32::MAX);
        if let Some(wait) = scheduled.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        let scheduled = Instant::from_std(scheduled);
        let is_burn = args.burn_every > 0 && (i + 1) % args.burn_every == 0;
        let request = if is_burn { burn } else { cheap };
        let tally = Arc::clone(&tally);
        let addr = args.addr;
        tasks.push(runtime.spawn(async move {
            // Read only for --dump: no clock read per request otherwise.
            let began = dump.then(Instant::now);
            let outcome = tokio::time::timeout(timeout, one(addr, request, dump)).await;
            // Before the lock: waiting for it is not the server's latency.
            let done = Instant::now();
            let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
            match outcome {
                Ok(Ok((bytes, pid))) => {
                    let us = (done - scheduled).as_micros() as u64;
                    t.latencies_us.push(us);
                    if !is_burn {
                        t.cheap_us.push(us);
                    }
                    t.bytes += bytes;
                    if let Some(began) = began {
                        t.dump.push(Dumped {
                            scheduled_us: (scheduled - first).as_micros() as u64,
                            late_us: (began - scheduled).as_micros() as u64,
                            served_us: (done - began).as_micros() as u64,
                            latency_us: us,
                            slow: is_burn,
                            pid: pid.unwrap_or(0),
                        });
                    }
                }
                Ok(Err(Failure::Connect)) => t.errors_connect += 1,
                Ok(Err(Failure::Read)) => t.errors_read += 1,
                Ok(Err(Failure::Status)) => t.errors_status += 1,
                Err(_) => t.errors_timeout += 1,
            }
        }));
    }
    runtime.block_on(async {
        for task in tasks {
            let _ = task.await;
        }
    });
    let elapsed = start.elapsed();
    let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(path) = &args.dump {
        t.dump.sort_unstable_by_key(|d| d.scheduled_us);
        let lines: String = t
            .dump
            .iter()
            .map(|d| {
                format!(
                    "{} {} {} {} {} {}\n",
                    d.scheduled_us,
                    d.late_us,
                    d.served_us,
                    d.latency_us,
                    u8::from(d.slow),
                    d.pid
                )
            })
            .collect();
        if let Err(err) = std::fs::write(path, lines) {
            eprintln!("cannot write {}: {err}", path.display());
        }
    }
    t.latencies_us.sort_unstable();
    t.cheap_us.sort_unstable();
    let pct = |sorted: &[u64], p: f64| -> u64 {
        let n = sorted.len();
        if n == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        sorted[rank.clamp(1, n) - 1]
    };
    let all = &t.latencies_us;
    let cheap = &t.cheap_us;
    let answered = t.latencies_us.len() as u64;
    let errors = t.errors_connect + t.errors_read + t.errors_status + t.errors_timeout;
    let mean = if answered == 0 {
        0.0
    } else {
        t.latencies_us.iter().sum::<u64>() as f64 / answered as f64
    };
    println!(
        "BENCH_JSON {{\"requests\":{answered},\"duration_us\":{},\"bytes\":{},\"errors\":{errors},\
         \"errors_connect\":{},\"errors_read\":{},\"errors_write\":0,\"errors_status\":{},\
         \"errors_timeout\":{},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\
         \"mean_us\":{mean:.1},\"offered_rate\":{},\"cheap_p50_us\":{},\"cheap_p99_us\":{},\
         \"cheap_p999_us\":{}}}",
        elapsed.as_micros(),
        t.bytes,
        t.errors_connect,
        t.errors_read,
        t.errors_status,
        t.errors_timeout,
        pct(all, 50.0),
        pct(all, 99.0),
        pct(all, 99.9),
        all.last().copied().unwrap_or(0),
        args.rate,
        pct(cheap, 50.0),
        pct(cheap, 99.0),
        pct(cheap, 99.9),
    );
}

enum Failure {
    Connect,
    Read,
    Status,
}

/// One request on a new connection, read to the server's close; the bytes read, and, if
/// `want_pid`, the pid the body names (`pid=N`, as `/whoami` answers).
async fn one(
    addr: SocketAddr,
    request: &[u8],
    want_pid: bool,
) -> Result<(u64, Option<u32>), Failure> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|_| Failure::Connect)?;
    let _ = stream.set_nodelay(true);
    stream.write_all(request).await.map_err(|_| Failure::Read)?;
    let mut reply = Vec::with_capacity(256);
    stream
        .read_to_end(&mut reply)
        .await
        .map_err(|_| Failure::Read)?;
    if !reply.starts_with(b"HTTP/1.1 200") {
        return Err(Failure::Status);
    }
    let pid = want_pid
        .then(|| {
            String::from_utf8_lossy(&reply)
                .split("pid=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|pid| pid.parse().ok())
        })
        .flatten();
    Ok((reply.len() as u64, pid))
}
