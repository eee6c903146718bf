//! The library's error type.
//!
//! One `#[non_exhaustive]` enum for everything [`Server::run`](crate::Server::run) can
//! report. Each variant names the thing that failed (an address, a worker) and keeps the
//! underlying [`std::io::Error`] as its [`source`](std::error::Error::source). The
//! `Display` wording is for people and is not a stable interface: match on the variant
//! instead.
//!
//! `Display` is one sentence and never repeats the source's text: error reporters (the
//! `Debug` form below, `anyhow`, `eyre`) print the chain of sources after it, each cause
//! once. `Debug` is that report, so that `fn main() -> Result<(), coreloop::Error>`
//! shows people the sentence; `{:#?}` shows the variant and its fields instead.

use std::fmt;
use std::io;

use crate::addr::{ListenAddr, SYNTAX};
use crate::id::WorkerId;

/// Boxed error returned by handlers and factories.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the documentation explains that workers re-run `main()`.
const RERUN_DOCS: &str = "https://docs.rs/coreloop/latest/coreloop/#workers-re-run-main";

/// Everything that can stop a coreloop server.
///
/// `{}` prints one sentence; `{:?}` prints it followed by its causes (`Caused by:`), which
/// is what `fn main() -> Result<(), coreloop::Error>` shows on failure; `{:#?}` prints the
/// variant and its fields.
///
/// # Examples
///
/// ```
/// use coreloop::Server;
///
/// let err = Server::builder().bind("127.0.0.1:99999").unwrap_err();
/// assert_eq!(
///     format!("{err:?}"),
///     "invalid listen address 127.0.0.1:99999 (expected HOST:PORT, [IPV6]:PORT, \
///      unix:PATH, systemd or systemd:NAME)\n\nCaused by:\n    invalid port value",
/// );
/// ```
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An address given to [`ServerBuilder::bind`](crate::ServerBuilder::bind) is not in
    /// the listen syntax, or did not resolve.
    #[error("invalid listen address {addr} (expected {SYNTAX})")]
    Address {
        /// The address as given.
        addr: String,
        /// Why it did not parse or resolve.
        #[source]
        source: io::Error,
    },
    /// The same address was configured twice (it would shift the
    /// [`Conn::listener`](crate::Conn::listener) index of every later listener).
    #[error("{addr} is bound twice: bind each address once")]
    Duplicate {
        /// The address.
        addr: ListenAddr,
    },
    /// A listening socket could not be created (for example the port is in use).
    #[error("cannot listen on {addr}")]
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
    #[error("cannot build the tokio runtime")]
    Runtime(#[source] io::Error),
    /// `run()` was called from inside a tokio runtime; it builds its own.
    #[error(
        "Server::run() must not be called inside a tokio runtime (it builds its own): call it from a plain fn main(), not from #[tokio::main]"
    )]
    NestedRuntime,
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signal(#[source] io::Error),
    /// A worker process could not be started.
    #[error("cannot start worker {id}")]
    SpawnWorker {
        /// The worker's id.
        id: WorkerId,
        /// The spawn error.
        #[source]
        source: io::Error,
    },
    /// A worker's handler factory failed, or the worker reported another start failure,
    /// during the server's boot.
    #[error("worker {id} failed to start: {reason}")]
    WorkerStart {
        /// The worker's id.
        id: WorkerId,
        /// What the worker reported.
        reason: String,
    },
    /// A worker exited before it was ready, during the server's boot, without saying why:
    /// most often because the program failed in `main()` before reaching
    /// [`Server::run`](crate::Server::run), which workers re-run.
    #[error(
        "worker {id} exited ({status}) before it was ready. Workers re-run main() up to Server::run(): anything done before run() (a lock file, a socket, a connection) is done again in every worker, and may fail there; see {RERUN_DOCS}"
    )]
    WorkerExited {
        /// The worker's id.
        id: WorkerId,
        /// How it exited (`exit code 1`, `signal 9`).
        status: String,
    },
    /// A worker slot failed to start too many times in a row (see
    /// [`ServerBuilder::start_failure_limit`](crate::ServerBuilder::start_failure_limit)).
    #[error(
        "giving up: worker {id} failed to start {failures} times in a row; the last time: {reason}"
    )]
    StartFailures {
        /// The worker's id.
        id: WorkerId,
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
    #[error("cannot write the pid file {path}", path = path.display())]
    PidFile {
        /// The path.
        path: std::path::PathBuf,
        /// The write error.
        #[source]
        source: io::Error,
    },
    /// This process was started as a worker, but its channel to the supervisor is unusable.
    #[error("worker channel unusable")]
    WorkerChannel(#[source] io::Error),
}

impl Error {
    /// The sentence and its causes on one line (`sentence: cause: cause`), for logs and
    /// messages that carry one line.
    pub(crate) fn chain(&self) -> Chain<'_> {
        Chain(self)
    }
}

/// See [`Error::chain`].
pub(crate) struct Chain<'a>(&'a Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(self.0);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    /// `{:?}`: the sentence, then `Caused by:` and each cause on its own line (the layout
    /// of `anyhow`). `{:#?}`: the variant and its fields.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            return self.fields(f);
        }
        write!(f, "{self}")?;
        let causes: Vec<&dyn std::error::Error> =
            std::iter::successors(std::error::Error::source(self), |cause| cause.source())
                .collect();
        match causes.as_slice() {
            [] => Ok(()),
            [cause] => write!(f, "\n\nCaused by:\n    {cause}"),
            many => {
                f.write_str("\n\nCaused by:")?;
                for (i, cause) in many.iter().enumerate() {
                    write!(f, "\n    {i}: {cause}")?;
                }
                Ok(())
            }
        }
    }
}

impl Error {
    /// The structural form, as `#[derive(Debug)]` would print it.
    fn fields(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Address { addr, source } => f
                .debug_struct("Address")
                .field("addr", addr)
                .field("source", source)
                .finish(),
            Error::Duplicate { addr } => f.debug_struct("Duplicate").field("addr", addr).finish(),
            Error::Bind { addr, source } => f
                .debug_struct("Bind")
                .field("addr", addr)
                .field("source", source)
                .finish(),
            Error::Config(why) => f.debug_tuple("Config").field(why).finish(),
            Error::Runtime(source) => f.debug_tuple("Runtime").field(source).finish(),
            Error::NestedRuntime => f.write_str("NestedRuntime"),
            Error::Signal(source) => f.debug_tuple("Signal").field(source).finish(),
            Error::SpawnWorker { id, source } => f
                .debug_struct("SpawnWorker")
                .field("id", id)
                .field("source", source)
                .finish(),
            Error::WorkerStart { id, reason } => f
                .debug_struct("WorkerStart")
                .field("id", id)
                .field("reason", reason)
                .finish(),
            Error::WorkerExited { id, status } => f
                .debug_struct("WorkerExited")
                .field("id", id)
                .field("status", status)
                .finish(),
            Error::StartFailures {
                id,
                failures,
                reason,
            } => f
                .debug_struct("StartFailures")
                .field("id", id)
                .field("failures", failures)
                .field("reason", reason)
                .finish(),
            Error::Upgrade(why) => f.debug_tuple("Upgrade").field(why).finish(),
            Error::PidFile { path, source } => f
                .debug_struct("PidFile")
                .field("path", path)
                .field("source", source)
                .finish(),
            Error::WorkerChannel(source) => f.debug_tuple("WorkerChannel").field(source).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind_error() -> Error {
        Error::Bind {
            addr: "127.0.0.1:7000".into(),
            source: io::Error::from(io::ErrorKind::AddrInUse),
        }
    }

    #[test]
    fn debug_is_the_sentence_then_each_cause_once() {
        let report = format!("{:?}", bind_error());
        assert_eq!(
            report,
            "cannot listen on 127.0.0.1:7000\n\nCaused by:\n    address in use"
        );
        assert_eq!(
            format!("{:?}", Error::NestedRuntime),
            Error::NestedRuntime.to_string()
        );
    }

    #[test]
    fn alternate_debug_is_structural() {
        let fields = format!("{:#?}", bind_error());
        assert!(fields.starts_with("Bind {"), "{fields}");
        assert!(fields.contains("addr: \"127.0.0.1:7000\""), "{fields}");
    }

    #[test]
    fn no_sentence_repeats_its_source() {
        let source = || io::Error::other("the unique cause");
        let all = [
            Error::Address {
                addr: "x".into(),
                source: source(),
            },
            Error::Bind {
                addr: "127.0.0.1:7000".into(),
                source: source(),
            },
            Error::Runtime(source()),
            Error::Signal(source()),
            Error::SpawnWorker {
                id: WorkerId(1),
                source: source(),
            },
            Error::PidFile {
                path: "/run/x.pid".into(),
                source: source(),
            },
            Error::WorkerChannel(source()),
        ];
        for err in all {
            let sentence = err.to_string();
            let cause = std::error::Error::source(&err).map(ToString::to_string);
            assert!(cause.is_some(), "{err:#?} has no source");
            assert!(
                !sentence.contains(cause.as_deref().unwrap_or_default()),
                "{sentence}"
            );
            let chain = err.chain().to_string();
            assert_eq!(chain.matches("the unique cause").count(), 1, "{chain}");
        }
    }

    #[test]
    fn a_worker_that_exits_before_ready_points_at_the_rule() {
        let err = Error::WorkerExited {
            id: WorkerId(0),
            status: "exit code 1".into(),
        };
        let text = err.to_string();
        assert!(text.contains("Workers re-run main()"), "{text}");
        assert!(text.contains(RERUN_DOCS), "{text}");
    }
}
