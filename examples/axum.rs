//! An axum `Router` served by hyper on the streams coreloop's workers receive.
//!
//! ```text
//! cargo run --example axum -- --bind 127.0.0.1:3000 --workers 2
//! curl http://127.0.0.1:3000/                  # Hello from axum on worker 0
//! curl http://127.0.0.1:3000/hello/ferris      # Hello, ferris!
//! curl http://127.0.0.1:3000/count             # worker=1 pid=… count=1 (each worker counts its own)
//! curl http://127.0.0.1:3000/sleep/2000 & kill -TERM <supervisor pid>
//! ```
//!
//! Each worker builds its own `Router` in the handler factory, with its own state: the
//! worker id and a hit counter, so `/count` counts the requests of the worker that answers
//! (workers are processes: nothing is shared between them). `/sleep/{ms}` answers after
//! `ms` milliseconds (at most 60000) without blocking the worker, and logs `sleeping` when
//! it starts. Other paths get axum's 404.
//!
//! axum needs no runtime of its own here: the router is a tower service, wrapped per
//! connection with hyper-util's `TowerToHyperService` and served by hyper's HTTP/1
//! connection (for HTTP/2 as well, use `auto::Builder` with a local executor, as
//! `hyper_auto.rs` does). axum requires `Send + Sync` state and `Send` handler futures, so
//! the counter is an `Arc<AtomicU64>`; hyper's connection itself runs on the worker's
//! `LocalSet` and need not be `Send`.
//!
//! The worker's shutdown signal is wired to hyper's `graceful_shutdown`: on SIGTERM the
//! request in progress finishes, the connection closes, and the supervisor exits 0. Logs go
//! to stderr; `RUST_LOG` filters them (default `info`).
#![deny(warnings)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use clap::Parser;
use coreloop::{Conn, Server, WorkerId};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

#[derive(Debug, Parser)]
#[command(about = "an axum Router on coreloop workers")]
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

/// One worker's state, cloned into every request of that worker.
#[derive(Debug, Clone)]
struct WorkerState {
    worker: WorkerId,
    hits: Arc<AtomicU64>,
}

/// The longest `/sleep/{ms}` the server agrees to.
const MAX_SLEEP_MS: u64 = 60_000;

async fn root(State(state): State<WorkerState>) -> String {
    format!("Hello from axum on worker {}\n", state.worker)
}

async fn hello(Path(name): Path<String>) -> String {
    format!("Hello, {name}!\n")
}

async fn count(State(state): State<WorkerState>) -> String {
    let count = state.hits.fetch_add(1, Ordering::Relaxed) + 1;
    format!(
        "worker={} pid={} count={count}\n",
        state.worker,
        std::process::id()
    )
}

async fn sleep(Path(ms): Path<u64>) -> Result<String, (StatusCode, String)> {
    if ms > MAX_SLEEP_MS {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("at most {MAX_SLEEP_MS} ms\n"),
        ));
    }
    tracing::info!(ms, "sleeping");
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(format!("slept {ms}ms\n"))
}

fn router(worker: WorkerId) -> Router {
    let state = WorkerState {
        worker,
        hits: Arc::new(AtomicU64::new(0)),
    };
    Router::new()
        .route("/", get(root))
        .route("/hello/{name}", get(hello))
        .route("/count", get(count))
        .route("/sleep/{ms}", get(sleep))
        .with_state(state)
}

async fn serve(conn: Conn, router: Router) -> Result<(), hyper::Error> {
    let shutdown = conn.shutdown_signal();
    let service = TowerToHyperService::new(router);
    let connection = hyper::server::conn::http1::Builder::new()
        // The timer enables hyper's header read timeout (30 s by default).
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(conn.into_stream()), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        // Biased: a connection that arrives as the worker starts draining is polled once
        // first, so a request already sent is read (and answered) before the shutdown.
        biased;
        result = connection.as_mut() => return result,
        () = shutdown.triggered() => connection.as_mut().graceful_shutdown(),
    }
    connection.await
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
        .serve(|worker| {
            // Built inside each worker: every worker has its own router and state.
            let router = router(worker);
            move |conn| serve(conn, router.clone())
        })
        .run()?;
    Ok(())
}
