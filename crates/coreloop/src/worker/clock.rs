//! The worker's loop clock: when the event loop last woke up and when the running handler
//! poll started, shared with the supervisor so that it sends nothing new to a loop stuck in
//! a handler (see `coreloop_ipc::LoopClock`). It is created once, before the runtime
//! starts, and kept in a static so that every handler poll reaches it without a reference
//! count. Without it the worker still works; the supervisor then judges by the channel
//! alone.

use coreloop_ipc::LoopClock;
use tracing::warn;

/// This worker's loop clock: one per process, set before the runtime starts.
static CLOCK: std::sync::OnceLock<LoopClock> = std::sync::OnceLock::new();

/// Creates the loop clock and installs it for this process; `None` (logged) if it cannot
/// be created.
pub(super) fn install() -> Option<&'static LoopClock> {
    match LoopClock::create() {
        Ok(clock) => Some(CLOCK.get_or_init(|| clock)),
        Err(err) => {
            warn!(error = %err, "cannot create the loop clock");
            None
        }
    }
}

/// The installed loop clock, if any.
pub(super) fn get() -> Option<&'static LoopClock> {
    CLOCK.get()
}
