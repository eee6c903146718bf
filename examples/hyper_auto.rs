//! hyper's HTTP/1 and HTTP/2 server (hyper-util's `auto` builder) on the streams
//! coreloop's workers receive.
//!
//! ```text
//! cargo run --example hyper_auto -- --bind 127.0.0.1:3000 --workers 2
//! curl http://127.0.0.1:3000/                                  # HTTP/1.1 worker=0 pid=…
//! curl --http2-prior-knowledge http://127.0.0.1:3000/          # HTTP/2.0 worker=1 pid=…
//! curl 'http://127.0.0.1:3000/sleep?ms=2000' & kill -TERM <supervisor pid>
//! ```
//!
//! Each connection is served by `auto::Builder`, which reads the first bytes to choose
//! between HTTP/1.1 and HTTP/2 over cleartext with prior knowledge (no `Upgrade: h2c`).
//! Every answer names the protocol version, the worker id and the worker's PID. `/sleep?ms=N`
//! answers after N ms (at most 60000) without blocking the worker, and logs `sleeping`
//! when it starts.
//!
//! HTTP/2 needs an executor: hyper spawns each request stream as a task. Workers run a
//! `current_thread` runtime inside a `LocalSet`, so [`LocalExec`] spawns them with
//! `tokio::task::spawn_local` and nothing has to be `Send`; the per-worker builder lives in
//! an `Rc`.
//!
//! The worker's shutdown signal is wired to the connection's `graceful_shutdown`: on SIGTERM
//! an HTTP/1 connection finishes the request in progress and closes, an HTTP/2 connection
//! sends GOAWAY and finishes its open streams, and the supervisor exits 0 once they are done
//! (or after `--shutdown-timeout`). Logs go to stderr; `RUST_LOG` filters them (default
//! `info`).
#![deny(warnings)]

use std::convert::Infallible;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use clap::Parser;
use coreloop::{BoxError, Conn, Server, WorkerId};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tracing::Instrument as _;

#[derive(Debug, Parser)]
#[command(about = "hyper (HTTP/1 and HTTP/2) on coreloop workers")]
struct Args {
    /// Address to listen on: `HOST:PORT`, `[V6]:PORT`, or `unix:PATH`. Repeatable.
    #[arg(long = "bind", value_name = "ADDR", default_value = "127.0.0.1:3000")]
    binds: Vec<String>,
    /// Worker processes [default: number of CPUs].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=4096))]
    workers: Option<u16>,
    /// Seconds a draining worker may take to finish its requests before it is killed.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    shutdown_timeout: u64,
}

/// hyper's executor for a worker: HTTP/2 streams become local tasks on the worker's
/// `LocalSet`, so they need not be `Send`.
#[derive(Debug, Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
    F::Output: 'static,
{
    fn execute(&self, future: F) {
        // Spawned tasks do not inherit the caller's span: keep the `conn` span on the
        // stream tasks, so their logs say which connection they belong to.
        tokio::task::spawn_local(future.in_current_span());
    }
}

/// The longest `/sleep` the server agrees to.
const MAX_SLEEP_MS: u64 = 60_000;

async fn respond(
    req: Request<Incoming>,
    worker: WorkerId,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let version = req.version();
    let pid = std::process::id();
    let response = match req.uri().path() {
        "/" => text(
            StatusCode::OK,
            format!("{version:?} worker={worker} pid={pid}\n"),
        ),
        "/sleep" => {
            let ms = req
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .find_map(|pair| pair.strip_prefix("ms="))
                .and_then(|ms| ms.parse::<u64>().ok())
                .filter(|ms| *ms <= MAX_SLEEP_MS);
            match ms {
                Some(ms) => {
                    tracing::info!(ms, ?version, "sleeping");
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    text(
                        StatusCode::OK,
                        format!("{version:?} worker={worker} pid={pid} slept={ms}ms\n"),
                    )
                }
                None => text(
                    StatusCode::BAD_REQUEST,
                    format!("/sleep needs ?ms=N with N <= {MAX_SLEEP_MS}\n"),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    };
    Ok(response)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

async fn serve(conn: Conn, builder: Rc<auto::Builder<LocalExec>>) -> Result<(), BoxError> {
    let shutdown = conn.shutdown_signal();
    let worker = conn.worker_id();
    let service = hyper::service::service_fn(move |req| respond(req, worker));
    let connection = builder.serve_connection(TokioIo::new(conn.into_stream()), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        // Biased: a connection that arrives as the worker starts draining is polled once
        // first, so a request already sent is read (and answered) before the shutdown.
        biased;
        result = connection.as_mut() => return result,
        () = shutdown.triggered() => connection.as_mut().graceful_shutdown(),
    }
    match connection.await {
        // A graceful shutdown before the client sent enough bytes to tell HTTP/1 from
        // HTTP/2 cancels the detection with `Interrupted`: nothing was in flight.
        Err(err)
            if err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|err| err.kind() == std::io::ErrorKind::Interrupted) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();

    let mut server = Server::builder().shutdown_timeout(Duration::from_secs(args.shutdown_timeout));
    if let Some(workers) = args.workers {
        server = server.workers(workers.into());
    }
    for bind in &args.binds {
        server = match bind.strip_prefix("unix:") {
            Some(path) => server.bind_unix(path),
            None => server.bind(bind.as_str())?,
        };
    }
    server
        .serve(|_worker| {
            // Per worker: one builder, shared by the worker's connections through an Rc.
            let mut builder = auto::Builder::new(LocalExec);
            // The timer enables hyper's HTTP/1 header read timeout (30 s by default).
            builder.http1().timer(TokioTimer::new());
            builder.http2().timer(TokioTimer::new());
            let builder = Rc::new(builder);
            move |conn| serve(conn, Rc::clone(&builder))
        })
        .run()?;
    Ok(())
}
