//! Counting the worker's live connections: an RAII guard per connection, a way to wait
//! until none is left (the drain), and how the supervisor learns of them: the counts of
//! open and closed connections published in the loop clock at every open and close (its
//! load picture and gauges), or, for a worker without a loop clock, a signal at every close
//! for the load report. The worker is single-threaded, so plain `Cell`s hold the counts.

use std::cell::Cell;
use std::rc::Rc;

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use super::clock;

/// Live connections of this worker, and a way to wait until there are none.
#[derive(Default)]
pub(super) struct Tracker {
    live: Cell<usize>,
    closed: Cell<u64>,
    idle: Notify,
    /// Signalled when a connection closes, for the load report; only without a loop clock,
    /// since with one the close is published there and the report is the heartbeat alone.
    closing: Notify,
}

/// Counts one live connection until dropped.
pub(super) struct TrackerGuard(Rc<Tracker>);

impl Tracker {
    /// Counts a new connection; it stays live until the guard drops.
    pub(super) fn enter(self: &Rc<Self>) -> TrackerGuard {
        let live = self.live.get() + 1;
        self.live.set(live);
        if let Some(clock) = clock::get() {
            clock.live_now(live as u64);
        }
        TrackerGuard(Rc::clone(self))
    }

    /// Connections open now.
    pub(super) fn live(&self) -> usize {
        self.live.get()
    }

    /// Connections closed since the worker started.
    pub(super) fn closed(&self) -> u64 {
        self.closed.get()
    }

    /// Completes after a connection closes, if the worker has no loop clock (never
    /// otherwise). A close with nobody waiting is remembered for the next waiter
    /// (`Notify::notify_one`), so none goes unreported.
    pub(super) fn closing(&self) -> Notified<'_> {
        self.closing.notified()
    }

    /// Completes once no connection is live.
    pub(super) async fn wait_idle(&self) {
        while self.live.get() > 0 {
            self.idle.notified().await;
        }
    }
}

impl Drop for TrackerGuard {
    fn drop(&mut self) {
        let live = self.0.live.get() - 1;
        self.0.live.set(live);
        let closed = self.0.closed.get() + 1;
        self.0.closed.set(closed);
        if let Some(clock) = clock::get() {
            clock.closed_up_to(closed);
            clock.live_now(live as u64);
        } else {
            self.0.closing.notify_one();
        }
        if live == 0 {
            self.0.idle.notify_waiters();
        }
    }
}
