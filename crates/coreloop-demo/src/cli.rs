//! The command line (`Args`) and the [`Server`] built from it: the demo's `main`.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use coreloop::{Conn, Dispatch, Distribution, ListenAddr, Server, ServerBuilder, ToListenAddrs};

use crate::limits::{Identity, Limits, VERSION};

/// `--acceptors`: how many accept loops.
#[derive(Debug, Clone, Copy)]
enum Acceptors {
    Auto,
    Fixed(u16),
}

fn parse_acceptors(text: &str) -> Result<Acceptors, String> {
    if text == "auto" {
        return Ok(Acceptors::Auto);
    }
    match text.parse::<u16>() {
        Ok(k) if (1..=256).contains(&k) => Ok(Acceptors::Fixed(k)),
        _ => Err(format!(
            "expected `auto` or a number from 1 to 256, got `{text}`"
        )),
    }
}

#[derive(Debug, Parser)]
#[command(about = "coreloop's demo HTTP/1.1 responder", version = VERSION)]
struct Args {
    /// Address to listen on: `HOST:PORT`, `[V6]:PORT`, `unix:PATH`, or `systemd` /
    /// `systemd:NAME` for sockets passed by systemd (socket activation). Repeatable.
    /// [default: the sockets systemd passed, if any, else 127.0.0.1:8080]
    #[arg(long = "bind", value_name = "ADDR")]
    binds: Vec<String>,
    /// Worker processes [default: number of CPUs].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=4096))]
    workers: Option<u16>,
    /// Seconds a draining worker may take before it is killed.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    shutdown_timeout: u64,
    /// Seconds the new generation of a binary upgrade (SIGUSR2) may take to serve before
    /// it is stopped and the running one keeps serving.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    upgrade_timeout: u64,
    /// Write the serving supervisor's pid to this file (rewritten by the new supervisor
    /// after an upgrade; removed at exit).
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Largest request head, bytes (larger: 431).
    #[arg(long, default_value_t = 8192)]
    max_header_bytes: usize,
    /// Most headers in a request (more: 431).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=256))]
    max_headers: u16,
    /// Longest request line, bytes (longer: 414).
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..))]
    max_request_line: u64,
    /// Largest request body, bytes (larger: 413).
    #[arg(long, default_value_t = 1024 * 1024)]
    max_body_bytes: u64,
    /// Most pipelined requests answered before their responses are written: bounds the
    /// responses buffered per connection.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    max_pipeline: u64,
    /// Seconds to receive a request head once it has started (then 408).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    header_timeout: u64,
    /// Seconds of silence allowed while a request body is expected (then 408).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    body_timeout: u64,
    /// Seconds an idle keep-alive connection stays open.
    #[arg(long, value_name = "SECS", default_value_t = 75)]
    idle_timeout: u64,
    /// Seconds a response write may wait for a client that does not read (then the
    /// connection is closed).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    send_timeout: u64,
    /// Seconds without a report from a worker's event loop before it is killed and replaced.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    heartbeat_timeout: f64,
    /// Start failures in a row of one worker (it died before it was ready) that stop the
    /// server. Workers that were ready are always replaced at once.
    #[arg(long, value_name = "N", default_value_t = 10)]
    max_start_failures: u32,
    /// Most worker restarts within any one second; more wait their turn.
    #[arg(long, value_name = "N", default_value_t = 20)]
    max_spawns_per_second: u32,
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
    /// Accept loops in the supervisor (forward mode), each on its own thread and its own
    /// SO_REUSEPORT sibling of every TCP listener: a number, or `auto` for one per five
    /// workers.
    #[arg(long, value_name = "K|auto", default_value = "auto", value_parser = parse_acceptors)]
    acceptors: Acceptors,
    /// How the supervisor picks a worker for each connection (forward mode).
    #[arg(long, value_enum, default_value_t = DispatchArg::LeastConnections)]
    dispatch: DispatchArg,
    /// Run the workers as this user (name or uid); the supervisor keeps its identity, so
    /// it can bind privileged ports and still serve as an unprivileged user.
    #[arg(long)]
    user: Option<String>,
    /// Group for the workers (name or gid) [default: the user's primary group].
    #[arg(long)]
    group: Option<String>,
    /// Permission bits of unix-socket listeners' files, octal.
    #[arg(long, value_name = "OCTAL", default_value = "600")]
    unix_mode: String,
    /// Serve Prometheus metrics (/metrics) and a readiness probe (/healthz) from the
    /// supervisor at this address.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Pin worker k to the k-th allowed CPU.
    #[arg(long)]
    pin_workers: bool,
    /// Pin the supervisor to the N-th allowed CPU.
    #[arg(long, value_name = "N")]
    pin_supervisor: Option<usize>,
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

/// Resolves `--user` / `--group` (names or numeric ids) through the system's user database.
fn worker_identity(user: Option<&str>, group: Option<&str>) -> anyhow::Result<Option<(u32, u32)>> {
    let Some(user) = user else {
        anyhow::ensure!(group.is_none(), "--group needs --user");
        return Ok(None);
    };
    let (uid, primary_gid) = match uzers::get_user_by_name(user) {
        Some(found) => (found.uid(), found.primary_group_id()),
        None => {
            let uid: u32 = user
                .parse()
                .ok()
                .with_context(|| format!("--user {user}: no such user"))?;
            let gid = uzers::get_user_by_uid(uid).map_or(uid, |found| found.primary_group_id());
            (uid, gid)
        }
    };
    let gid = match group {
        None => primary_gid,
        Some(group) => match uzers::get_group_by_name(group) {
            Some(found) => found.gid(),
            None => group
                .parse()
                .ok()
                .with_context(|| format!("--group {group}: no such group"))?,
        },
    };
    Ok(Some((uid, gid)))
}

/// The demo's `main`: parses the command line, installs the log subscriber, builds the
/// [`Server`] and runs it until it stops. The supervisor and every worker run it (workers
/// are this same binary, started again by coreloop), so a binary whose `main` only calls
/// this one is the demo, whatever its name (the integration tests have one).
///
/// # Errors
///
/// A bad command line that clap does not reject itself (`--unix-mode`, `--user`, …), an
/// address that cannot be bound, or a server that stops with an error.
pub fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args.log_format);
    let builder = configure(&args)?;
    let limits = Rc::new(limits(&args));
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
                    let shutdown = conn.shutdown_signal();
                    crate::serve(conn.stream_mut(), &who, &limits, &shutdown).await
                }
            }
        })
        .run()?;
    Ok(())
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default `info`).
fn init_logging(format: &LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

/// The server the flags describe, before its handler.
fn configure(args: &Args) -> anyhow::Result<ServerBuilder> {
    if !(args.heartbeat_timeout.is_finite() && args.heartbeat_timeout > 0.0) {
        anyhow::bail!("--heartbeat-timeout must be a positive number of seconds");
    }
    let unix_mode = u32::from_str_radix(&args.unix_mode, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
        .with_context(|| {
            format!(
                "--unix-mode {}: expected octal permission bits such as 660",
                args.unix_mode
            )
        })?;
    let mut builder = Server::builder()
        .pin_workers(args.pin_workers)
        .pin_supervisor(args.pin_supervisor)
        .shutdown_timeout(Duration::from_secs(args.shutdown_timeout))
        .upgrade_timeout(Duration::from_secs(args.upgrade_timeout))
        .heartbeat_timeout(Duration::from_secs_f64(args.heartbeat_timeout))
        .start_failure_limit(args.max_start_failures)
        .spawn_rate_limit(args.max_spawns_per_second)
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
    if let Some(path) = &args.pid_file {
        builder = builder.pid_file(path);
    }
    if let Some(workers) = args.workers {
        builder = builder.workers(usize::from(workers));
    }
    if let Acceptors::Fixed(k) = args.acceptors {
        builder = builder.acceptors(usize::from(k));
    }
    if let Some(addr) = &args.metrics {
        builder = builder
            .metrics(addr.as_str())
            .with_context(|| format!("--metrics {addr}: expected HOST:PORT"))?;
    }
    if let Some((uid, gid)) = worker_identity(args.user.as_deref(), args.group.as_deref())? {
        builder = builder.worker_user(uid, gid);
    }
    // The library's address syntax; unix sockets get --unix-mode. Without --bind, the
    // sockets systemd passed are served, else the default address.
    for bind in &args.binds {
        for addr in bind.to_listen_addrs()? {
            builder = match addr {
                ListenAddr::Unix(path) => builder.bind_unix_with(path, unix_mode, None),
                addr => builder.bind(addr)?,
            };
        }
    }
    Ok(builder.bind_default("127.0.0.1:8080")?)
}

/// The responder's limits the flags set.
fn limits(args: &Args) -> Limits {
    Limits {
        max_header_bytes: args.max_header_bytes,
        max_headers: usize::from(args.max_headers),
        max_request_line: usize::try_from(args.max_request_line).unwrap_or(usize::MAX),
        max_body_bytes: args.max_body_bytes,
        max_pipeline: usize::try_from(args.max_pipeline).unwrap_or(usize::MAX),
        header_timeout: Duration::from_secs(args.header_timeout),
        body_timeout: Duration::from_secs(args.body_timeout),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        send_timeout: Duration::from_secs(args.send_timeout),
        ..Limits::default()
    }
}
