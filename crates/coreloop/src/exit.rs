//! Why a worker's process ended, as the supervisor tells it: the `reason` of the
//! `worker_exited` event and the `reason` label of `coreloop_worker_restarts_total`.
//!
//! The supervisor sets a reason when it retires or kills a worker; a worker that ends
//! without one crashed (after it was ready) or failed to start (before).

/// Why a worker's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ExitReason {
    /// It died on its own after it was ready (a panic that aborted, a signal, an exit).
    Crash,
    /// It died on its own before it was ready (its factory failed, or it exited early).
    StartFailure,
    /// It exited after a drain for a graceful stop.
    Drained,
    /// Replaced by a reload (SIGHUP).
    Reload,
    /// Replaced after its share of connections or above the RSS limit.
    Recycle,
    /// It asked to retire (`Retiring`) and was drained.
    Retire,
    /// Its slot was removed (SIGTTOU).
    ScaleDown,
    /// Killed: its event loop stopped reporting, or one handler poll ran past the
    /// heartbeat timeout.
    Hang,
    /// Killed: it left its queue of connections unread past the heartbeat timeout.
    NotReading,
    /// Killed: it broke the protocol (the supervisor's trust boundary).
    Violation,
    /// Killed: it did not finish draining within the shutdown timeout.
    DrainTimeout,
    /// Killed: it did not become ready within the start timeout.
    StartTimeout,
}

impl ExitReason {
    /// The label used in logs and metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            ExitReason::Crash => "crash",
            ExitReason::StartFailure => "start-failure",
            ExitReason::Drained => "drained",
            ExitReason::Reload => "reload",
            ExitReason::Recycle => "recycle",
            ExitReason::Retire => "retire",
            ExitReason::ScaleDown => "scale-down",
            ExitReason::Hang => "hang",
            ExitReason::NotReading => "not-reading",
            ExitReason::Violation => "protocol-violation",
            ExitReason::DrainTimeout => "drain-timeout",
            ExitReason::StartTimeout => "start-timeout",
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}
