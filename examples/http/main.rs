//! The demo HTTP/1.1 responder: coreloop's supervisor and workers serving a small, fast
//! HTTP server.
//!
//! ```text
//! cargo run --release --example http                      # 127.0.0.1:8080, one worker per CPU
//! cargo run --release --example http -- --bind 127.0.0.1:8080 --bind unix:/tmp/demo.sock --workers 4
//! curl http://127.0.0.1:8080/whoami                       # worker=<id> pid=<pid>
//! wrk -c64 -d10s http://127.0.0.1:8080/
//! ```
//!
//! Endpoints: `GET /` (`Hello, world!`), `/whoami`, `/sleep?ms=N` (answers after N ms
//! without blocking the worker), `/burn?ms=N` (burns N ms of CPU on the worker: the
//! expensive request of skewed-load benchmarks). Logs go to stderr; `RUST_LOG` filters
//! them (default `info`).
#![deny(warnings)]

mod respond;

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use coreloop::{Conn, Dispatch, Distribution, Server};
use respond::{Identity, Limits};

#[derive(Debug, Parser)]
#[command(about = "coreloop's demo HTTP/1.1 responder", version)]
struct Args {
    /// Address to listen on: `HOST:PORT`, `[V6]:PORT`, or `unix:PATH`. Repeatable.
    #[arg(long = "bind", value_name = "ADDR", default_value = "127.0.0.1:8080")]
    binds: Vec<String>,
    /// Worker processes [default: number of CPUs].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=4096))]
    workers: Option<u16>,
    /// Seconds a draining worker may take before it is killed.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    shutdown_timeout: u64,
    /// Largest request head, bytes (larger: 431).
    #[arg(long, default_value_t = 8192)]
    max_header_bytes: usize,
    /// Most headers in a request (more: 431).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=256))]
    max_headers: u16,
    /// Largest request body, bytes (larger: 413).
    #[arg(long, default_value_t = 1024 * 1024)]
    max_body_bytes: u64,
    /// Seconds to receive a request head once it has started (then 408).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    header_timeout: u64,
    /// Seconds an idle keep-alive connection stays open.
    #[arg(long, value_name = "SECS", default_value_t = 75)]
    idle_timeout: u64,
    /// Seconds without a report from a worker's event loop before it is killed and replaced.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    heartbeat_timeout: f64,
    /// Crash-loop limit: more restarts than this within --restart-period stops the server.
    #[arg(long, default_value_t = 20)]
    max_restarts: usize,
    /// Crash-loop window, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    restart_period: u64,
    /// Most connections one worker holds at once.
    #[arg(long, default_value_t = 25_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections_per_worker: u64,
    /// Replace a worker gracefully after this many connections (0: never).
    #[arg(long, default_value_t = 0)]
    recycle_after: u64,
    /// Random extra connections (0..=N) added to --recycle-after per worker.
    #[arg(long, default_value_t = 0)]
    recycle_jitter: u64,
    /// Replace a worker gracefully when its resident memory passes this many MiB (0: never).
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    recycle_rss_mib: u64,
    /// Who accepts TCP connections: the supervisor, forwarding each to a worker, or each
    /// worker on its own SO_REUSEPORT socket.
    #[arg(long, value_enum, default_value_t = Mode::Forward)]
    mode: Mode,
    /// How the supervisor picks a worker for each connection (forward mode).
    #[arg(long, value_enum, default_value_t = DispatchArg::LeastConnections)]
    dispatch: DispatchArg,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Forward,
    Reuseport,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DispatchArg {
    LeastConnections,
    RoundRobin,
    PowerOfTwo,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }

    if !(args.heartbeat_timeout.is_finite() && args.heartbeat_timeout > 0.0) {
        anyhow::bail!("--heartbeat-timeout must be a positive number of seconds");
    }
    let mut builder = Server::builder()
        .shutdown_timeout(Duration::from_secs(args.shutdown_timeout))
        .heartbeat_timeout(Duration::from_secs_f64(args.heartbeat_timeout))
        .restart_limit(args.max_restarts, Duration::from_secs(args.restart_period))
        .distribution(match args.mode {
            Mode::Forward => Distribution::Forward,
            Mode::Reuseport => Distribution::ReusePort,
        })
        .dispatch(match args.dispatch {
            DispatchArg::LeastConnections => Dispatch::LeastConnections,
            DispatchArg::RoundRobin => Dispatch::RoundRobin,
            DispatchArg::PowerOfTwo => Dispatch::PowerOfTwoChoices,
        })
        .max_connections_per_worker(
            usize::try_from(args.max_connections_per_worker).unwrap_or(usize::MAX),
        );
    if args.recycle_after > 0 {
        builder = builder.recycle_after(args.recycle_after, args.recycle_jitter);
    }
    if args.recycle_rss_mib > 0 {
        builder = builder.recycle_above_rss(args.recycle_rss_mib * 1024 * 1024);
    }
    if let Some(workers) = args.workers {
        builder = builder.workers(usize::from(workers));
    }
    for bind in &args.binds {
        builder = match bind.strip_prefix("unix:") {
            Some(path) => builder.bind_unix(PathBuf::from(path)),
            None => builder
                .bind(bind.as_str())
                .with_context(|| format!("--bind {bind}: expected HOST:PORT or unix:PATH"))?,
        };
    }
    let limits = Rc::new(Limits {
        max_header_bytes: args.max_header_bytes,
        max_headers: usize::from(args.max_headers),
        max_body_bytes: args.max_body_bytes,
        header_timeout: Duration::from_secs(args.header_timeout),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        ..Limits::default()
    });
    builder
        .serve(move |worker| {
            // Per-worker state: `Rc`, not `Arc`: each worker is one thread.
            let who = Rc::new(Identity {
                worker: worker.get(),
                pid: std::process::id(),
            });
            let limits = Rc::clone(&limits);
            move |mut conn: Conn| {
                let who = Rc::clone(&who);
                let limits = Rc::clone(&limits);
                async move {
                    let shutdown = conn.shutdown();
                    respond::serve(conn.stream_mut(), &who, &limits, &shutdown).await
                }
            }
        })
        .run()?;
    Ok(())
}
