//! [`ShutdownSignal`]: how handlers learn that their worker is draining.
//!
//! When the supervisor drains a worker (SIGTERM, SIGINT, reload, or the supervisor's own
//! death) the worker triggers one signal shared by all its connections. Handlers check it
//! at a request boundary to end keep-alive loops, or await it next to their reads. The
//! signal does not close anything by itself: connections that ignore it are cut when the
//! shutdown timeout expires.

use tokio_util::sync::CancellationToken;

/// Triggered once, when the worker starts to drain.
///
/// Cheap to clone; every clone observes the same trigger.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(conn: coreloop::Conn) {
/// let shutdown = conn.shutdown_signal();
/// loop {
///     tokio::select! {
///         _ = shutdown.triggered() => break, // finish at a request boundary
///         // read_request(&mut stream) => ...
///     }
/// }
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct ShutdownSignal {
    token: CancellationToken,
}

impl ShutdownSignal {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether the worker is draining.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when the worker starts to drain (at once if it already has). Cancel-safe.
    pub async fn triggered(&self) {
        self.token.cancelled().await;
    }
}
