//! The workers as the dispatcher sees them ([`Pool`]): each one's channel, queue, state and
//! load, the per-worker connection cap, and the notifications between the tasks that share
//! them. Everything runs on the supervisor's one thread, so the list is a `RefCell` that
//! is never borrowed across an `.await`.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use coreloop_ipc::{Channel, Queue};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

use super::Busy;
use super::Planner;
use super::load::{Reading, classify};
use crate::exit::ExitReason;
use crate::handler::WorkerId;
use crate::metrics::Metrics;

/// The pool of workers, shared by the accept loop, the dispatcher and the supervisor's
/// tasks.
///
/// Notifications, by who wakes whom:
/// - `changed`: any change a waiting task may care about (a worker spawned, ready,
///   reporting, draining or gone; a fatal error; a handover). Notified by the watchers,
///   the health check and the main task; awaited by the accept loop (a worker with room),
///   the dispatcher (room in a queue), the main task (boot, fatal errors) and the drains
///   (every worker gone).
/// - `recycle_due`: the dispatcher to the health check, when a worker passes its
///   recycling threshold.
pub(crate) struct Pool {
    pub(crate) workers: RefCell<Vec<Worker>>,
    /// Per-worker connection cap: the configured one, kept below `RLIMIT_NOFILE`.
    pub(crate) cap: u64,
    pub(crate) changed: Notify,
    pub(crate) recycle_due: Notify,
    /// The server is stopping: nothing more is dispatched, and nothing restarted.
    pub(crate) stopping: Cell<bool>,
    pub(crate) next_conn_id: Cell<u64>,
    pub(crate) planner: RefCell<Planner>,
    pub(crate) metrics: Rc<Metrics>,
    /// How long a draining worker may take before it is killed: the shutdown timeout
    /// and a margin.
    pub(crate) drain_grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Spawned; has not said `Ready`.
    Starting,
    /// Takes connections.
    Ready,
    /// Sent `Drain` (or asked to retire, or its channel failed): takes nothing more.
    Draining,
}

pub(crate) struct Worker {
    pub(crate) slot: WorkerId,
    pub(crate) pid: u32,
    pub(crate) channel: Rc<Channel>,
    /// Our duplicate of the worker's end: what it has not read yet.
    pub(crate) queue: Rc<Queue>,
    /// Whether it is reading its queue, as last looked at (see [`Worker::look`]).
    pub(crate) reading: Reading,
    /// When its event loop last woke up, shared with it (`LoopClock`, sent before `Ready`).
    pub(crate) clock: Option<coreloop_ipc::LoopClockView>,
    pub(crate) state: State,
    pub(crate) started: Instant,
    /// It said `Ready` (whatever its state is now).
    pub(crate) was_ready: bool,
    /// Connections handed to it, and the count it last reported finished.
    pub(crate) sent: u64,
    pub(crate) closed: u64,
    pub(crate) rss_kib: u64,
    pub(crate) last_report: Instant,
    /// Reports are late: no new connections until they resume.
    pub(crate) stalled: bool,
    /// A replacement is being started for it (reload or recycle).
    pub(crate) replacing: bool,
    /// Recycle once `sent` reaches this.
    pub(crate) recycle_at: Option<u64>,
    /// Once draining: when the supervisor kills it if it has not exited.
    pub(crate) kill_at: Option<Instant>,
    /// Connections it is serving, as it last reported.
    pub(crate) live: u32,
    /// Its slot's `forwarded` counter.
    pub(crate) forwarded: Counter,
    /// Why the supervisor is retiring or killing it; `None` until then, so an exit without
    /// a reason is a crash (or a start failure, before it was ready).
    pub(crate) exit_reason: Option<ExitReason>,
}

impl Worker {
    /// Connections handed to it that it has not reported closed.
    pub(crate) fn open(&self) -> u64 {
        self.sent.saturating_sub(self.closed)
    }

    /// How long something has waited in its queue while it read nothing at all: `None`
    /// when its queue is empty. One `FIONREAD`; an error (there is none for a socket) only
    /// loses the information.
    ///
    /// What it has read is what was sent less what is still queued, so a worker that reads
    /// slower than it is sent to, but reads, is not waiting: only one that has stopped
    /// reading (stopped, not scheduled, or in a handler that does not yield) is.
    pub(crate) fn look(&mut self, now: Instant) -> Option<Duration> {
        let unread = self.queue.unread_bytes().unwrap_or(0);
        self.reading.observe(now, self.channel.sent_bytes(), unread)
    }

    /// How busy its event loop looks (see [`classify`]), and for how long it has looked
    /// stuck.
    pub(crate) fn busy(&mut self, now: Instant) -> (Busy, Duration) {
        let (awake, in_poll) = self.clock.as_ref().map_or((None, None), |clock| {
            (clock.awake_for(), clock.poll_running_for())
        });
        classify(awake.unwrap_or_default(), in_poll, self.look(now))
    }

    pub(crate) fn can_take(&self, cap: u64) -> bool {
        self.state == State::Ready && !self.stalled && self.open() < cap
    }
}

impl Pool {
    pub(crate) fn count(&self, pred: impl Fn(&Worker) -> bool) -> usize {
        self.workers.borrow().iter().filter(|w| pred(w)).count()
    }

    pub(crate) fn with_worker<R>(&self, pid: u32, f: impl FnOnce(&mut Worker) -> R) -> Option<R> {
        self.workers
            .borrow_mut()
            .iter_mut()
            .find(|w| w.pid == pid)
            .map(f)
    }

    /// Whether `slot` has a worker that is starting or serving (not draining).
    pub(crate) fn slot_covered(&self, slot: WorkerId) -> bool {
        self.workers
            .borrow()
            .iter()
            .any(|w| w.slot == slot && w.state != State::Draining)
    }

    /// Marks a worker as draining (it gets no new connections) and arms its kill deadline:
    /// a draining worker that has not exited after the shutdown timeout is killed by the
    /// health check, whether it drains for a stop, a reload, a recycle or a scale-down.
    pub(crate) fn mark_draining(&self, pid: u32) -> Option<Rc<Channel>> {
        let kill_at = Instant::now() + self.drain_grace;
        self.with_worker(pid, |w| {
            w.state = State::Draining;
            w.kill_at.get_or_insert(kill_at);
            Rc::clone(&w.channel)
        })
    }
}
