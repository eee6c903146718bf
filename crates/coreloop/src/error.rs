//! The library's error type.
//!
//! One `#[non_exhaustive]` enum for everything [`Server::run`](crate::Server::run) can
//! report. Each variant names the thing that failed (an address, a worker) and keeps the
//! underlying [`std::io::Error`] as its source. The `Display` wording is for people and is
//! not a stable interface: match on the variant instead.

use std::io;

/// Boxed error returned by handlers and factories.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can stop a coreloop server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An address given to [`ServerBuilder::bind`](crate::ServerBuilder::bind) did not resolve.
    #[error("invalid listen address {addr}: {source}")]
    Address {
        /// The address as given.
        addr: String,
        /// Why it did not resolve.
        #[source]
        source: io::Error,
    },
    /// A listening socket could not be created (for example the port is in use).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address or path.
        addr: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The configuration cannot work; the message says why.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The tokio runtime could not be built.
    #[error("cannot build the tokio runtime: {0}")]
    Runtime(#[source] io::Error),
    /// `run()` was called from inside a tokio runtime; it builds its own.
    #[error("Server::run() must not be called inside a tokio runtime: it builds its own")]
    NestedRuntime,
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signal(#[source] io::Error),
    /// A worker process could not be started.
    #[error("cannot start worker {id}: {source}")]
    SpawnWorker {
        /// The worker's id.
        id: usize,
        /// The spawn error.
        #[source]
        source: io::Error,
    },
    /// A worker failed while starting (its handler factory failed, or it died before it
    /// was ready) during the server's boot.
    #[error("worker {id} failed to start: {reason}")]
    WorkerStart {
        /// The worker's id.
        id: usize,
        /// What the worker reported, or how it exited.
        reason: String,
    },
    /// A worker slot failed to start too many times in a row (see
    /// [`ServerBuilder::start_failure_limit`](crate::ServerBuilder::start_failure_limit)).
    #[error(
        "giving up: worker {id} failed to start {failures} times in a row; the last time: {reason}"
    )]
    StartFailures {
        /// The worker's id.
        id: usize,
        /// Consecutive start failures.
        failures: u32,
        /// What the worker reported the last time, or how it exited.
        reason: String,
    },
    /// This process was started as the new supervisor of a binary upgrade, and taking the
    /// listeners over from the running one failed; the running one keeps serving.
    #[error("binary upgrade: {0}")]
    Upgrade(String),
    /// The pid file could not be written.
    #[error("cannot write the pid file {path}: {source}")]
    PidFile {
        /// The path.
        path: std::path::PathBuf,
        /// The write error.
        #[source]
        source: io::Error,
    },
    /// This process was started as a worker, but its channel to the supervisor is unusable.
    #[error("worker channel unusable: {0}")]
    WorkerChannel(#[source] io::Error),
}
