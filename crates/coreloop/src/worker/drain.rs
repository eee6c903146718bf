//! The end of a worker: told to drain by the supervisor, or orphaned when the supervisor
//! is gone. Either way it stops its own accept, triggers the [`ShutdownSignal`], runs the
//! drain hooks the setup registered, and waits for them and for its live connections to
//! finish, or for the deadline; whatever is still running then is dropped with the
//! `LocalSet`.

use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::conn::panic_message;
use super::tracker::Tracker;
use crate::config::Config;
use crate::lifecycle::DrainHooks;
use crate::shutdown::ShutdownSignal;

/// How long a worker whose supervisor vanished keeps serving in-flight requests. Nobody
/// supervises it any more, so it must not linger: a supervisor killed with SIGKILL leaves
/// no worker behind for longer than this.
const ORPHAN_GRACE: Duration = Duration::from_secs(1);

/// Why the worker stops reading its channel.
pub(super) enum End {
    /// The supervisor sent `Drain` with this deadline.
    Drain(Duration),
    /// The channel closed or failed: the supervisor is gone.
    Orphaned,
}

/// Stops accepting on the worker's own listeners, triggers the shutdown signal, and waits
/// for the connections and the drain hooks, or the deadline. Returns the exit code.
pub(super) async fn drain(
    end: End,
    config: &Config,
    tracker: &Tracker,
    hooks: &DrainHooks,
    shutdown: &ShutdownSignal,
    acceptors: &[JoinHandle<()>],
) -> i32 {
    let grace = match end {
        End::Drain(timeout) => {
            info!(
                live = tracker.live(),
                ?timeout,
                event = "draining",
                "draining"
            );
            timeout
        }
        End::Orphaned => {
            warn!(
                live = tracker.live(),
                event = "orphaned",
                "supervisor gone; finishing in-flight work and exiting"
            );
            ORPHAN_GRACE.min(config.shutdown_timeout)
        }
    };
    // Stop accepting on our own listeners (ReusePort): their queued connections go to the
    // other workers' sockets from now on, or are reset by the kernel when we close.
    for acceptor in acceptors {
        acceptor.abort();
    }
    shutdown.trigger();
    let drained = async { tokio::join!(tracker.wait_idle(), run_drain_hooks(hooks)) };
    if tokio::time::timeout(grace, drained).await.is_err() {
        warn!(
            live = tracker.live(),
            event = "drain_deadline_passed",
            "drain deadline passed; closing remaining connections and drain hooks"
        );
    }
    debug!("worker exiting");
    0
}

/// Runs the drain hooks, each as its own task, and waits for them all; then for the
/// hooks they registered in turn, until none is left.
async fn run_drain_hooks(hooks: &DrainHooks) {
    loop {
        let batch = hooks.take();
        if batch.is_empty() {
            return;
        }
        debug!(hooks = batch.len(), "running drain hooks");
        let tasks: Vec<_> = batch.into_iter().map(tokio::task::spawn_local).collect();
        for task in tasks {
            if let Err(err) = task.await {
                if err.is_panic() {
                    error!(
                        panic = panic_message(&*err.into_panic()),
                        "drain hook panicked"
                    );
                }
            }
        }
    }
}
