//! Shared code of the fixture binaries (`src/bin/fixture-*.rs`): small coreloop servers
//! whose handlers misbehave on purpose (panic, block their thread, fail at start, ignore
//! the drain) so that the tests can watch the supervisor cope.
//!
//! Every fixture takes the demo's supervision flags ([`CommonArgs`]), logs to stderr
//! through `tracing-subscriber` with `RUST_LOG` (ANSI off unless stderr is a terminal),
//! and speaks just enough HTTP/1.1 for the harness's client: one request per connection,
//! answered with `Connection: close`. `/whoami` answers `worker=<id> pid=<pid>` like the
//! demo does.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use coreloop::{Conn, Handler, Server, ServerBuilder, Stream};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Largest request head a fixture reads.
const MAX_HEAD: usize = 8 * 1024;
/// Time a fixture waits for a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The flags every fixture shares with the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Address to listen on: `HOST:PORT`, `unix:PATH`, `systemd` or `systemd:NAME`.
    /// Repeatable.
    #[arg(long = "bind", value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub binds: Vec<String>,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Seconds a draining worker may take before it is killed.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Seconds without a report from a worker's event loop before it is killed.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub heartbeat_timeout: f64,
    /// Start failures in a row of one worker that stop the server.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub max_start_failures: u32,
    /// Most worker restarts within any one second.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub max_spawns_per_second: u32,
    /// Seconds the new generation of a binary upgrade may take to serve.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub upgrade_timeout: f64,
    /// Write the serving supervisor's pid here.
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
}

impl CommonArgs {
    /// A [`ServerBuilder`] configured from the flags.
    ///
    /// # Errors
    ///
    /// A bad address or a non-positive timeout.
    pub fn builder(&self) -> anyhow::Result<ServerBuilder> {
        let secs = |name: &str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(Duration::from_secs_f64(value))
            } else {
                Err(anyhow::anyhow!(
                    "--{name} must be a positive number of seconds"
                ))
            }
        };
        let mut builder = Server::builder()
            .workers(self.workers)
            .shutdown_timeout(secs("shutdown-timeout", self.shutdown_timeout)?)
            .heartbeat_timeout(secs("heartbeat-timeout", self.heartbeat_timeout)?)
            .start_failure_limit(self.max_start_failures)
            .spawn_rate_limit(self.max_spawns_per_second)
            .upgrade_timeout(secs("upgrade-timeout", self.upgrade_timeout)?);
        if let Some(path) = &self.pid_file {
            builder = builder.pid_file(path);
        }
        for bind in &self.binds {
            builder = builder.bind(bind)?;
        }
        Ok(builder)
    }
}

/// The server most fixtures run: every connection reads one request (and closes quietly
/// when there is none), calls `before(&conn, target)`, awaits the future it returns, then
/// answers 200 with the `/whoami` body (`worker=<id> pid=<pid>`).
///
/// `before` is where a fixture misbehaves: its synchronous part runs on the worker's
/// thread (it may block it, or panic), and its future runs in the handler (it may sleep).
/// Returns the configured server, not yet running, so that a caller may take its
/// [`handle`](Server::handle) before [`run`](Server::run).
///
/// # Errors
///
/// Bad flags (see [`CommonArgs::builder`]).
pub fn serve_whoami<F, Fut>(common: &CommonArgs, before: F) -> anyhow::Result<Server<impl Handler>>
where
    F: Fn(&Conn, &str) -> Fut + Clone + 'static,
    Fut: Future<Output = ()> + 'static,
{
    Ok(common.builder()?.serve(move |worker| {
        let worker = worker.get();
        let before = before.clone();
        move |mut conn: Conn| {
            let before = before.clone();
            async move {
                let Some(target) = read_request(conn.stream_mut()).await? else {
                    return Ok::<_, std::io::Error>(());
                };
                before(&conn, &target).await;
                respond(conn.stream_mut(), 200, &whoami(worker)).await
            }
        }
    }))
}

/// Installs the stderr log subscriber: `RUST_LOG` filter (default `info`), no ANSI colours
/// unless stderr is a terminal.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Reads one request head and returns its target (`/path?query`); `None` if the client
/// closed, sent garbage or nothing within 10 s.
///
/// # Errors
///
/// Read errors.
pub async fn read_request(stream: &mut Stream) -> std::io::Result<Option<String>> {
    Ok(read_head(stream).await?.map(|head| head.target))
}

/// What a fixture needs of a request head.
#[derive(Debug)]
pub struct Head {
    /// The target (`/path?query`).
    pub target: String,
    /// The client asked to close the connection after the response.
    pub close: bool,
}

/// Reads one request head; `None` if the client closed, sent garbage or nothing within
/// 10 s.
///
/// # Errors
///
/// Read errors.
pub async fn read_head(stream: &mut Stream) -> std::io::Result<Option<Head>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read_head = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            if buf.len() > MAX_HEAD {
                return Ok(false);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(false);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(true)
    };
    match tokio::time::timeout(HEAD_TIMEOUT, read_head).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) | Err(_) => return Ok(None),
        Ok(Err(err)) => return Err(err),
    }
    let text = String::from_utf8_lossy(&buf);
    let close = text.lines().skip(1).any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("connection")
                && value.trim().eq_ignore_ascii_case("close")
        })
    });
    let mut parts = text.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(_method), Some(target)) => Ok(Some(Head {
            target: target.to_owned(),
            close,
        })),
        _ => Ok(None),
    }
}

/// Writes one response with `Connection: close` and shuts the write side down.
///
/// # Errors
///
/// Write errors.
pub async fn respond(stream: &mut Stream, status: u16, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Error",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The `/whoami` body: `worker=<id> pid=<pid>`.
pub fn whoami(worker: usize) -> String {
    format!("worker={worker} pid={}", std::process::id())
}

/// `main()` of the versioned fixtures (`fixture-v1`, `fixture-v2`): two builds of one
/// server that differ only in the version `/whoami` reports (`worker=<id> pid=<pid>
/// version=<version>`), for binary-upgrade tests. `/sleep?ms=N` answers after N ms.
///
/// # Errors
///
/// Bad flags, or the server's error.
pub fn versioned_main(version: &'static str) -> anyhow::Result<()> {
    #[derive(Debug, clap::Parser)]
    #[command(about = "coreloop test fixture: a server with a version")]
    struct Args {
        #[command(flatten)]
        common: CommonArgs,
    }
    let args = <Args as clap::Parser>::parse();
    init_logging();
    tracing::info!(version, "fixture version");
    args.common
        .builder()?
        .serve(move |worker| {
            let worker = worker.get();
            move |mut conn: coreloop::Conn| async move {
                let Some(target) = read_request(conn.stream_mut()).await? else {
                    return Ok(());
                };
                if path_of(&target) == "/sleep" {
                    let ms = query_ms(&target).unwrap_or(1000);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let body = format!("{} version={version}", whoami(worker));
                respond(conn.stream_mut(), 200, &body).await
            }
        })
        .run()?;
    Ok(())
}

/// The value of `ms=N` in a request target's query.
pub fn query_ms(target: &str) -> Option<u64> {
    let (_, query) = target.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="))
        .and_then(|value| value.parse().ok())
}

/// The path of a request target (without the query).
pub fn path_of(target: &str) -> &str {
    target.split_once('?').map_or(target, |(path, _)| path)
}
