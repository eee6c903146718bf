//! The load picture every acceptor dispatches on ([`Board`]), shared across the
//! supervisor's threads: one [`Seat`] per worker with what a dispatcher needs to choose it
//! and send to it (whether it takes connections, how many it has open, its loop clock, its
//! queue, a handle on its channel), plus the notifications and counters of the whole pool.
//!
//! The supervisor's main thread owns the workers ([`Pool`](super::Pool)) and is the only
//! writer of a seat's state; acceptors on other threads read it and add what they send.
//! The one ordering that matters is the gate: a dispatcher sends to a worker only while it
//! holds the seat's gate open for reading, so once the main thread has closed it (a worker
//! that drains, stalls or died) no acceptor sends to that worker any more. That is what
//! lets the main thread take back a dead worker's queue, or send it `Drain`, knowing that
//! nothing is queued behind.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use coreloop_ipc::{LoopClockView, Queue, Sender};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::Notify;

use super::load::{Reading, classify};
use super::{Busy, Dispatch};
use crate::handler::WorkerId;

/// How often a dispatcher that waits for room at a worker at its cap looks again: a close
/// counted in the worker's loop clock frees room that nothing announces. Only a server
/// whose every worker is at its cap pays for it.
pub(crate) const ROOM_RECHECK: Duration = Duration::from_millis(10);

/// One worker as every dispatcher sees it.
#[derive(Debug)]
pub(crate) struct Seat {
    pub(crate) slot: WorkerId,
    pub(crate) pid: u32,
    /// Whether it takes connections (ready, not stalled, not draining, its channel not
    /// failed). Dispatchers hold it for reading while they send; the main thread takes it
    /// for writing to change it, which waits for sends in progress.
    gate: RwLock<bool>,
    /// What the gate says, for the looks that only read it: a plain load, so the seats'
    /// lines stay shared between the accept loops' cores (a read lock writes its count).
    open: AtomicBool,
    /// A send to it failed: no dispatcher sends to it again.
    failed: AtomicBool,
    /// Connections handed to it by every dispatcher.
    pub(crate) sent: AtomicU64,
    /// Connections it last reported finished.
    pub(crate) closed: AtomicU64,
    /// Recycle once `sent` reaches this (`u64::MAX`: never).
    pub(crate) recycle_at: AtomicU64,
    /// When its event loop last woke up, shared with it (sent before `Ready`).
    pub(crate) clock: OnceLock<LoopClockView>,
    /// The supervisor's duplicate of its end: what it has not read yet.
    pub(crate) queue: Arc<Queue>,
    /// A handle on its channel, cloned by each dispatcher (one registration per runtime).
    sender: Sender,
    /// Its slot's `forwarded` counter.
    pub(crate) forwarded: Counter,
}

impl Seat {
    pub(crate) fn new(
        slot: WorkerId,
        pid: u32,
        queue: Arc<Queue>,
        sender: Sender,
        forwarded: Counter,
        recycle_at: Option<u64>,
    ) -> Self {
        Self {
            slot,
            pid,
            gate: RwLock::new(false),
            open: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            recycle_at: AtomicU64::new(recycle_at.unwrap_or(u64::MAX)),
            clock: OnceLock::new(),
            queue,
            sender,
            forwarded,
        }
    }

    /// Connections handed to it that it has not closed: what was sent less the higher of
    /// the close count its loop clock publishes at every close and the one of its last
    /// report (all a worker without a clock gives). Both are what the worker says, so a
    /// lie only moves connections toward or away from it, within the cap, and a count
    /// above what was sent reads as none open.
    pub(crate) fn open(&self) -> u64 {
        let reported = self.closed.load(Ordering::Relaxed);
        let published = self.clock.get().map_or(0, LoopClockView::closed);
        self.sent
            .load(Ordering::Relaxed)
            .saturating_sub(reported.max(published))
    }

    /// Whether it takes connections but has none to spare under `cap`. Its closes free
    /// room without a notification (they are published in its loop clock, which wakes
    /// nobody), so a dispatcher waiting for room looks again every [`ROOM_RECHECK`].
    pub(crate) fn at_cap(&self, cap: u64) -> bool {
        self.takes() && self.open() >= cap
    }

    /// Opens or closes the gate. Closing returns once no dispatcher is sending to it.
    pub(crate) fn set_open(&self, open: bool) {
        let open = open && !self.failed.load(Ordering::Relaxed);
        let mut gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        *gate = open;
        self.open.store(open, Ordering::Release);
    }

    /// Whether it takes connections now (a send still checks the gate itself).
    pub(crate) fn takes(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Recycle once it has been sent this many connections.
    pub(crate) fn recycle_at(&self) -> Option<u64> {
        Some(self.recycle_at.load(Ordering::Relaxed)).filter(|&at| at != u64::MAX)
    }

    /// How long something has waited in its queue while it read nothing at all, as
    /// `reading` (one observer's record) sees it: `None` when its queue is empty. What is
    /// queued is what was sent less what the worker says, in its loop clock, it has read:
    /// no system call. A worker can write any count there, which only steers connections
    /// toward or away from it (bounded by what was sent); the health check, which kills,
    /// asks the kernel instead ([`Seat::look_queue`]). A worker without a loop clock is
    /// looked at as the health check does.
    ///
    /// What it has read is what was sent less what is still queued, so a worker that reads
    /// slower than it is sent to, but reads, is not waiting: only one that has stopped
    /// reading (stopped, not scheduled, or in a handler that does not yield) is.
    pub(crate) fn look(&self, reading: &mut Reading, now: Instant) -> Option<Duration> {
        let Some(clock) = self.clock.get() else {
            return self.look_queue(reading, now);
        };
        // The count of sent bytes rises after the send returns, so a worker quick enough
        // may have read more than it shows: nothing is queued then.
        let sent = self.sender.sent_bytes();
        let unread = sent.saturating_sub(clock.read_bytes());
        reading.observe(now, sent, unread)
    }

    /// As [`Seat::look`], but with what the kernel says is queued (one `FIONREAD`; an
    /// error, which a socket does not return, only loses the information): what the
    /// health check judges by, since nothing the worker writes can change it.
    pub(crate) fn look_queue(&self, reading: &mut Reading, now: Instant) -> Option<Duration> {
        let unread = self.queue.unread_bytes().unwrap_or(0);
        reading.observe(now, self.sender.sent_bytes(), unread)
    }

    /// How busy its event loop looks (see [`classify`]), and for how long it has looked
    /// stuck.
    pub(crate) fn busy(&self, reading: &mut Reading, now: Instant) -> (Busy, Duration) {
        let (awake, in_poll) = self.clock.get().map_or((None, None), |clock| {
            (clock.awake_for(), clock.poll_running_for())
        });
        classify(awake.unwrap_or_default(), in_poll, self.look(reading, now))
    }

    /// The gate, held for reading: while the guard lives and says `true`, a send to this
    /// worker is allowed.
    pub(crate) fn enter(&self) -> RwLockReadGuard<'_, bool> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// A send to it failed; called with the gate not held.
    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
        self.set_open(false);
    }

    pub(crate) fn sender(&self) -> std::io::Result<Sender> {
        self.sender.try_clone()
    }
}

/// The pool as every acceptor sees it: the seats, the notifications, and what the
/// dispatchers share.
///
/// Notifications, by who wakes whom:
/// - `changed`: any change a waiting task may care about (a worker spawned, ready,
///   reporting, draining or gone; a fatal error; a handover). Notified by the watchers,
///   the health check and the main task; awaited by the accept loops (a worker with room),
///   the dispatchers (room in a queue), the main task (boot, fatal errors) and the drains
///   (every worker gone). A `Notify` wakes tasks of any runtime, so acceptors on other
///   threads wait on it as the main thread's tasks do.
/// - `recycle_due`: a dispatcher to the health check, when a worker passes its recycling
///   threshold.
/// - `seats_changed`: a seat joined the board (a worker spawned) or left it (its worker
///   died): the accept loops take a handle on the new worker's channel, or let go of the
///   dead one's channel and queue, at once rather than at their next dispatch.
#[derive(Debug)]
pub(crate) struct Board {
    seats: Mutex<Vec<Arc<Seat>>>,
    /// Bumped at every change of `seats`, so that a dispatcher rereads them only then.
    version: AtomicU64,
    pub(crate) changed: Notify,
    pub(crate) recycle_due: Notify,
    pub(crate) seats_changed: Notify,
    /// The server is stopping: nothing more is dispatched.
    stopping: AtomicBool,
    /// The first connection id no accept loop has taken yet (see [`Board::conn_ids`]).
    next_conn_id: AtomicU64,
    /// Per-worker connection cap: the configured one, kept below `RLIMIT_NOFILE`.
    pub(crate) cap: u64,
    pub(crate) policy: Dispatch,
    pub(crate) dispatch_latency: Histogram,
}

impl Board {
    pub(crate) fn new(cap: u64, policy: Dispatch, dispatch_latency: Histogram) -> Self {
        Self {
            seats: Mutex::new(Vec::new()),
            version: AtomicU64::new(0),
            changed: Notify::new(),
            recycle_due: Notify::new(),
            seats_changed: Notify::new(),
            stopping: AtomicBool::new(false),
            next_conn_id: AtomicU64::new(0),
            cap,
            policy,
            dispatch_latency,
        }
    }

    pub(crate) fn add(&self, seat: Arc<Seat>) {
        let mut seats = self.seats.lock().unwrap_or_else(PoisonError::into_inner);
        seats.push(seat);
        self.version.fetch_add(1, Ordering::Release);
        drop(seats);
        self.seats_changed.notify_waiters();
    }

    /// Takes a worker's seat off the board; its gate must be closed first.
    pub(crate) fn remove(&self, pid: u32) {
        let mut seats = self.seats.lock().unwrap_or_else(PoisonError::into_inner);
        seats.retain(|s| s.pid != pid);
        self.version.fetch_add(1, Ordering::Release);
        drop(seats);
        self.seats_changed.notify_waiters();
    }

    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The seats now, with the version they were read at.
    pub(crate) fn seats(&self) -> (u64, Vec<Arc<Seat>>) {
        let seats = self.seats.lock().unwrap_or_else(PoisonError::into_inner);
        (self.version(), seats.clone())
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// `n` connection ids no other caller gets: an accept loop takes them a block at a
    /// time.
    pub(crate) fn conn_ids(&self, n: u64) -> std::ops::Range<u64> {
        let first = self.next_conn_id.fetch_add(n, Ordering::Relaxed);
        first..first + n
    }
}

/// A seat for unit tests: on a channel pair, with its worker's end and a loop clock.
#[cfg(test)]
pub(crate) struct TestSeat {
    pub(crate) seat: Arc<Seat>,
    /// The supervisor's end (its sender is the seat's).
    pub(crate) sup: coreloop_ipc::Channel,
    pub(crate) worker: coreloop_ipc::Channel,
    pub(crate) clock: coreloop_ipc::LoopClock,
}

#[cfg(test)]
impl TestSeat {
    /// Needs a tokio runtime (the channels register with its reactor).
    pub(crate) fn new() -> Self {
        use coreloop_ipc::{Channel, LoopClock, socketpair_cloexec};
        let (sup_end, worker_end) = socketpair_cloexec().unwrap();
        let queue = Arc::new(Queue::new(worker_end.try_clone().unwrap()));
        let sup = Channel::from_fd(sup_end).unwrap();
        let worker = Channel::from_fd(worker_end).unwrap();
        let sender = sup.sender().unwrap();
        let seat = Seat::new(WorkerId(0), 1, queue, sender, Counter::default(), None);
        let clock = LoopClock::create().unwrap();
        let view = LoopClockView::from_fd(clock.as_fd().try_clone_to_owned().unwrap()).unwrap();
        seat.clock.set(view).unwrap();
        Self {
            seat: Arc::new(seat),
            sup,
            worker,
            clock,
        }
    }
}

#[cfg(test)]
mod tests {
    use coreloop_ipc::{Channel, LoopClock, Message, socketpair_cloexec};

    use super::*;

    /// Dispatchers see a worker's queue through the count it publishes; the health check
    /// through the kernel's, which a worker cannot change.
    #[tokio::test(flavor = "current_thread")]
    async fn dispatch_trusts_the_published_read_count_only_to_steer() {
        let TestSeat {
            seat,
            sup,
            worker,
            clock,
        } = TestSeat::new();
        let (mut dispatch, mut health) = (Reading::default(), Reading::default());
        let now = Instant::now();
        let drain = Message::Drain { timeout_ms: 1 };

        assert_eq!(seat.look(&mut dispatch, now), None, "nothing sent yet");
        sup.send(&drain, &[]).await.unwrap();
        assert!(seat.look(&mut dispatch, now).is_some(), "sent, not read");
        assert!(seat.look_queue(&mut health, now).is_some());

        worker.recv().await.unwrap().expect("the message");
        assert!(
            seat.look(&mut dispatch, now).is_some(),
            "read, but not published yet: dispatch goes by what the worker says"
        );
        assert_eq!(seat.look_queue(&mut health, now), None);
        clock.read_up_to(worker.received_bytes());
        assert_eq!(seat.look(&mut dispatch, now), None, "published");

        // A worker that claims more than it was sent: nothing queued (no wrap-around) as
        // far as dispatch goes, while the health check still sees the unread message.
        clock.read_up_to(u64::MAX);
        sup.send(&drain, &[]).await.unwrap();
        assert_eq!(seat.look(&mut dispatch, now), None);
        assert!(seat.look_queue(&mut health, now).is_some());
    }

    /// A worker's load is what it was sent less what it closed, by the later of its loop
    /// clock and its last report, and never below nothing.
    #[tokio::test(flavor = "current_thread")]
    async fn the_open_count_takes_the_later_of_the_published_and_reported_closes() {
        let (sup_end, worker_end) = socketpair_cloexec().unwrap();
        let queue = Arc::new(Queue::new(worker_end));
        let sender = Channel::from_fd(sup_end).unwrap().sender().unwrap();
        let seat = Seat::new(WorkerId(0), 1, queue, sender, Counter::default(), None);
        seat.sent.store(10, Ordering::Relaxed);
        seat.closed.store(2, Ordering::Relaxed);
        assert_eq!(seat.open(), 8, "no loop clock: the report alone");

        let clock = LoopClock::create().unwrap();
        let view = LoopClockView::from_fd(clock.as_fd().try_clone_to_owned().unwrap()).unwrap();
        seat.clock.set(view).unwrap();
        assert_eq!(
            seat.open(),
            8,
            "a clock with no close yet leaves the report"
        );
        clock.closed_up_to(7);
        assert_eq!(seat.open(), 3, "a close published, not reported yet");
        seat.set_open(true);
        assert!(!seat.at_cap(4));
        assert!(seat.at_cap(3));
        seat.closed.store(9, Ordering::Relaxed);
        assert_eq!(seat.open(), 1, "a report later than the clock");

        // A worker that claims more closes than it was sent looks empty, nothing more.
        clock.closed_up_to(u64::MAX);
        assert_eq!(seat.open(), 0);
        assert!(!seat.at_cap(1));
    }
}
