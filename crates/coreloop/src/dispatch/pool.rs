//! The workers as the supervisor's main thread sees them ([`Pool`]): each one's process,
//! channel, state and reports, its [`Seat`] on the shared [`Board`] (what every acceptor
//! dispatches on), and the notifications between the tasks. The main thread's tasks share
//! the list as a `RefCell` that is never borrowed across an `.await`; a change of a worker's
//! state goes through [`Worker::set_state`] and [`Worker::set_stalled`], which keep its
//! seat's gate in step.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coreloop_ipc::Channel;

use super::board::{Board, Seat};
use super::load::Reading;
use crate::exit::ExitReason;
use crate::handler::WorkerId;

/// The pool of workers, shared by the supervisor's tasks; the acceptors see it through
/// `board`.
pub(crate) struct Pool {
    pub(crate) workers: RefCell<Vec<Worker>>,
    /// What every acceptor dispatches on, and the pool's notifications (see [`Board`]).
    pub(crate) board: Arc<Board>,
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
    /// What the acceptors see of it: its gate, counts, loop clock and queue.
    pub(crate) seat: Arc<Seat>,
    /// Whether it is reading its queue, as the health check last looked at it.
    pub(crate) reading: Reading,
    state: State,
    pub(crate) started: Instant,
    /// It said `Ready` (whatever its state is now).
    pub(crate) was_ready: bool,
    pub(crate) rss_kib: u64,
    pub(crate) last_report: Instant,
    /// Reports are late: no new connections until they resume.
    stalled: bool,
    /// A replacement is being started for it (reload or recycle).
    pub(crate) replacing: bool,
    /// Once draining: when the supervisor kills it if it has not exited.
    pub(crate) kill_at: Option<Instant>,
    /// Connections it is serving, as it last reported.
    pub(crate) live: u32,
    /// Why the supervisor is retiring or killing it; `None` until then, so an exit without
    /// a reason is a crash (or a start failure, before it was ready).
    pub(crate) exit_reason: Option<ExitReason>,
}

impl Worker {
    /// A worker just spawned: starting, its gate closed.
    pub(crate) fn new(slot: WorkerId, pid: u32, channel: Rc<Channel>, seat: Arc<Seat>) -> Self {
        let now = Instant::now();
        Self {
            slot,
            pid,
            channel,
            seat,
            reading: Reading::default(),
            state: State::Starting,
            started: now,
            was_ready: false,
            rss_kib: 0,
            last_report: now,
            stalled: false,
            replacing: false,
            kill_at: None,
            live: 0,
            exit_reason: None,
        }
    }

    pub(crate) fn state(&self) -> State {
        self.state
    }

    pub(crate) fn stalled(&self) -> bool {
        self.stalled
    }

    /// Changes its state; the acceptors see it at once. Leaving `Ready` returns once no
    /// acceptor is sending to it.
    pub(crate) fn set_state(&mut self, state: State) {
        self.state = state;
        self.publish();
    }

    /// Marks it stalled or not; as [`Worker::set_state`].
    pub(crate) fn set_stalled(&mut self, stalled: bool) {
        self.stalled = stalled;
        self.publish();
    }

    fn publish(&self) {
        self.seat
            .set_open(self.state == State::Ready && !self.stalled);
    }

    /// Connections handed to it so far.
    pub(crate) fn sent(&self) -> u64 {
        self.seat.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// As [`Seat::look_queue`] (the kernel's count, not the worker's), with the health
    /// check's record of its reading.
    pub(crate) fn look(&mut self, now: Instant) -> Option<Duration> {
        self.seat.look_queue(&mut self.reading, now)
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
            .any(|w| w.slot == slot && w.state() != State::Draining)
    }

    /// Marks a worker as draining (it gets no new connections) and arms its kill deadline:
    /// a draining worker that has not exited after the shutdown timeout is killed by the
    /// health check, whether it drains for a stop, a reload, a recycle or a scale-down.
    pub(crate) fn mark_draining(&self, pid: u32) -> Option<Rc<Channel>> {
        let kill_at = Instant::now() + self.drain_grace;
        self.with_worker(pid, |w| {
            w.set_state(State::Draining);
            w.kill_at.get_or_insert(kill_at);
            Rc::clone(&w.channel)
        })
    }
}
