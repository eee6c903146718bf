//! coreloop: serve TCP and unix-socket traffic from many single-threaded worker processes.
//!
//! One supervisor process owns the listening sockets, accepts connections, and passes each
//! accepted socket (`SCM_RIGHTS` over a `SOCK_SEQPACKET` pair) to one of N worker
//! processes. Each worker runs its own `current_thread` tokio runtime, so every core gets
//! an independent event loop, handlers need not be `Send`, and a crash stays inside one
//! process: the supervisor reaps and replaces it.
//!
//! ```text
//!                 ┌──────────── supervisor ────────────┐
//!   clients ──▶   │ listeners ─▶ accept4 ─▶ dispatch   │
//!                 └──────┬──────────┬──────────┬───────┘
//!             seqpacket  │ fd+meta  │          │
//!                 ┌──────▼───┐ ┌────▼─────┐ ┌──▼───────┐
//!                 │ worker 0 │ │ worker 1 │ │ worker N │  current_thread + LocalSet
//!                 └──────────┘ └──────────┘ └──────────┘
//! ```
//!
//! # Example
//!
//! ```no_run
//! use coreloop::{Conn, Server};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! async fn echo(mut conn: Conn) -> std::io::Result<()> {
//!     let draining = conn.shutdown_signal();
//!     let mut buf = [0u8; 4096];
//!     loop {
//!         let n = tokio::select! {
//!             read = conn.stream_mut().read(&mut buf) => read?,
//!             () = draining.triggered() => return Ok(()), // the worker is draining
//!         };
//!         if n == 0 {
//!             return Ok(()); // the client closed
//!         }
//!         conn.stream_mut().write_all(&buf[..n]).await?;
//!     }
//! }
//!
//! fn main() -> Result<(), coreloop::Error> {
//!     // Without a subscriber, handler errors and worker deaths are logged nowhere.
//!     tracing_subscriber::fmt()
//!         .with_writer(std::io::stderr)
//!         .init();
//!     Server::builder()
//!         .bind("127.0.0.1:7000")?
//!         .workers(2)
//!         .serve(|_worker| echo)
//!         .run()
//! }
//! ```
//!
//! The handler awaits the shutdown signal next to its read: a drain (SIGTERM) ends an
//! idle connection at once. A handler that checked the signal only after a read returned
//! would keep the worker, and the stop, waiting for the client, up to the shutdown
//! timeout (30 s by default).
//!
//! # Per-worker state and drain hooks
//!
//! [`ServerBuilder::serve_with`] runs an asynchronous setup in each worker before it takes
//! connections (open a pool, warm a cache); its [`Worker`] gives the worker's id, its
//! [`ShutdownSignal`] (for background tasks) and [`Worker::on_drain`], hooks the worker
//! awaits when it drains.
//!
//! # Testing your server
//!
//! Bind `127.0.0.1:0`, run the server on a thread, and [`ServerHandle::wait_ready`]
//! returns the real address; [`ServerHandle::stop_gracefully`] stops it. Workers re-run
//! the test binary, so such a test is its own test target with `harness = false`: see
//! "Testing your server" in the README for the whole pattern.
//!
//! # Workers re-run `main()`
//!
//! Workers are the same executable started again by the supervisor (never `fork()`ed from a
//! process that has a runtime). So `main()` runs in every worker up to [`Server::run`]:
//! keep everything before `run()` free of side effects. See [`ServerBuilder`]. A binary
//! upgrade starts the program once more, as the new supervisor ([`is_upgrading`]).
//!
//! Work that must happen once, in the supervisor only, goes behind [`is_worker`]:
//!
//! ```no_run
//! if !coreloop::is_worker() {
//!     std::fs::File::create_new("/run/app.lock")?; // a worker would find it and fail
//! }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! A worker whose `main()` fails before it reaches `run()` exits before it is ready; during
//! the start, `run()` then returns [`Error::WorkerExited`], which points here.
//!
//! # Signals
//!
//! Sent to the supervisor:
//!
//! | signal | effect |
//! |---|---|
//! | SIGTERM, SIGINT | drain: stop accepting, trigger every connection's [`ShutdownSignal`], wait up to the shutdown timeout, kill what is left, return `Ok` |
//! | second SIGINT, SIGQUIT | stop at once |
//! | SIGHUP | rolling restart of every worker, each replacement ready first |
//! | SIGTTIN / SIGTTOU | one worker more / fewer |
//! | SIGUSR2 | binary upgrade: start the executable now on disk as a new supervisor, hand it the listeners, drain and exit once it serves; roll back if it fails |
//!
//! [`ServerHandle`] offers the same from code. Workers run in their own process group, so
//! a terminal's Ctrl-C reaches the supervisor only. See `docs/operating.md`.
//!
//! # Logging
//!
//! The library logs through [`tracing`] with spans `supervisor`, `worker{worker.id,
//! worker.pid}` and `conn{conn.id, peer.addr}`; it never installs a subscriber. A program
//! that installs none sees nothing: not a handler's error (`warn`), not a worker's death
//! (`warn`), not a failed start (`error`). Install one before [`Server::run`], in the code
//! every worker runs too (`main()`), as the example does; `tracing_subscriber::fmt()`
//! prints `INFO` and above, and its `EnvFilter` lets `RUST_LOG` choose.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod accept;
mod addr;
mod builder;
mod config;
mod cpu;
mod dispatch;
mod error;
mod exit;
mod handle;
mod handler;
mod id;
mod lifecycle;
mod listener;
mod metrics;
mod process;
mod resolve;
mod shutdown;
mod siblings;
mod supervisor;
mod timeout;
mod worker;

pub use addr::{ListenAddr, PeerAddr};
pub use builder::{Server, ServerBuilder};
pub use dispatch::{Dispatch, Distribution};
pub use error::{BoxError, Error};
pub use handle::{ServerGone, ServerHandle, WaitReadyError};
pub use handler::{Conn, Handler, LocalAddr, Stream, WorkerId};
pub use lifecycle::Worker;
pub use process::{is_upgrading, is_worker};
pub use resolve::ToListenAddrs;
pub use shutdown::ShutdownSignal;
pub use timeout::TimeoutStream;
