//! Sending connections to workers ([`Shard`]: one per accept loop, on its own thread or the
//! supervisor's): the policy plans a batch of accepted connections over the workers with
//! room, on the [`Board`]'s shared load picture, and each worker's share goes out in as few
//! `Conns` messages as [`MAX_BATCH`] allows, with a non-blocking send, so that a worker
//! whose queue is full is skipped rather than waited on. Once warm, it allocates nothing.

use std::os::fd::{AsFd, OwnedFd};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use coreloop_ipc::{ConnBatch, ConnMeta, MAX_BATCH, Message, Sender, TrySendError};
use tracing::{debug, warn};

use super::board::{Board, ROOM_RECHECK, Seat};
use super::load::Reading;
use super::{Busy, Candidate, Planner};

/// An accepted connection waiting to be queued to a worker.
pub(crate) struct Pending {
    pub(crate) fd: OwnedFd,
    pub(crate) meta: ConnMeta,
    /// When it was accepted (or recovered), for the dispatch-latency histogram.
    pub(crate) since: Instant,
}

/// A worker as one dispatcher holds it: the shared seat, this dispatcher's handle on its
/// channel, and what this dispatcher last saw of it reading its queue.
struct Local {
    seat: Arc<Seat>,
    /// `None` if the descriptor could not be duplicated: the worker is skipped.
    sender: Option<Sender>,
    reading: Reading,
}

impl Local {
    fn look(&mut self, now: Instant) -> Option<Duration> {
        self.seat.look(&mut self.reading, now)
    }

    fn busy(&mut self, now: Instant) -> (Busy, Duration) {
        self.seat.busy(&mut self.reading, now)
    }

    fn room(&self, cap: u64) -> u64 {
        if self.sender.is_some() && self.seat.takes() {
            cap.saturating_sub(self.seat.open())
        } else {
            0
        }
    }
}

/// One dispatcher: the workers as it sees them, its planner, and buffers reused by every
/// dispatch.
pub(crate) struct Shard {
    board: Arc<Board>,
    /// The board's version `locals` was read at.
    version: u64,
    locals: Vec<Local>,
    planner: Planner,
    candidates: Vec<Candidate>,
    plan: Vec<Option<usize>>,
    sent: Vec<bool>,
    /// Workers found full this dispatch (indices into `locals`).
    excluded: Vec<usize>,
}

impl Shard {
    pub(crate) fn new(board: Arc<Board>, seed: u64) -> Self {
        let planner = Planner::new(board.policy, seed);
        let mut shard = Self {
            board,
            version: u64::MAX,
            locals: Vec::new(),
            planner,
            candidates: Vec::new(),
            plan: Vec::new(),
            sent: Vec::new(),
            excluded: Vec::new(),
        };
        shard.refresh();
        shard
    }

    pub(crate) fn board(&self) -> &Arc<Board> {
        &self.board
    }

    /// Rereads the seats if the board changed, keeping what it saw of the workers still
    /// there.
    pub(crate) fn refresh(&mut self) {
        if self.board.version() == self.version {
            return;
        }
        let (version, seats) = self.board.seats();
        let mut old = std::mem::take(&mut self.locals);
        for seat in seats {
            let local = match old.iter().position(|l| Arc::ptr_eq(&l.seat, &seat)) {
                Some(i) => old.swap_remove(i),
                None => {
                    let sender = match seat.sender() {
                        Ok(sender) => Some(sender),
                        Err(err) => {
                            warn!(worker.id = seat.slot.get(), worker.pid = seat.pid, error = %err, "cannot duplicate a worker's channel; not dispatching to it from this acceptor");
                            None
                        }
                    };
                    Local {
                        seat,
                        sender,
                        reading: Reading::default(),
                    }
                }
            };
            self.locals.push(local);
        }
        self.version = version;
    }

    /// Whether some worker can take a connection now.
    pub(crate) fn has_room(&mut self) -> bool {
        self.refresh();
        let cap = self.board.cap;
        self.locals.iter().any(|l| l.room(cap) > 0)
    }

    /// Completes when a dispatcher waiting for room should look at the workers again:
    /// after [`ROOM_RECHECK`] if some worker lacks room only because of its cap (its closes
    /// announce nothing), otherwise never (every other way to get room notifies
    /// `changed`). Whether that is so is decided now.
    pub(crate) fn recheck(&self) -> impl Future<Output = ()> + use<> {
        let cap = self.board.cap;
        let capped = self
            .locals
            .iter()
            .any(|l| l.sender.is_some() && l.seat.at_cap(cap));
        async move {
            if capped {
                tokio::time::sleep(ROOM_RECHECK).await;
            } else {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Whether every worker that can take a connection has not yet read what it was sent:
    /// each is busy in a handler, and a connection sent now would wait behind it.
    ///
    /// A worker counts as busy once its queue has waited `min_wait` with nothing read: one
    /// that simply has not been scheduled yet since the last send is not.
    ///
    /// Stops at the first worker that is not busy: the dispatch that follows looks at
    /// every worker anyway.
    pub(crate) fn all_busy(&mut self, min_wait: Duration) -> bool {
        self.refresh();
        let now = Instant::now();
        let cap = self.board.cap;
        let mut takers = self
            .locals
            .iter_mut()
            .filter(|l| l.room(cap) > 0)
            .peekable();
        takers.peek().is_some() && takers.all(|l| l.look(now).is_some_and(|w| w >= min_wait))
    }

    /// Hands every pending connection to a worker, in as few messages as the plan allows.
    /// Returns once all were queued, or when the server is stopping (then the rest are
    /// closed undelivered).
    pub(crate) async fn dispatch_all(&mut self, pending: &mut Vec<Pending>) {
        self.try_dispatch_all(pending);
        if pending.is_empty() {
            return;
        }
        // No worker took them all: wait for room or a change, trying again after each.
        let board = Arc::clone(&self.board);
        loop {
            let mut changed = pin!(board.changed.notified());
            changed.as_mut().enable();
            // Tried again now that `changed` is enabled: a change since the last try would
            // otherwise be missed (the fast path above does not enable it, which would take
            // the `Notify`'s lock at every dispatch).
            self.try_dispatch_all(pending);
            if pending.is_empty() {
                return;
            }
            if board.is_stopping() {
                debug!(
                    undelivered = pending.len(),
                    "stopping; closing undelivered connections"
                );
                pending.clear();
                return;
            }
            // No worker can take them now: wait for room in a queue, a close at a worker at
            // its cap, or any change.
            let mut recheck = pin!(self.recheck());
            let cap = board.cap;
            let locals = &self.locals;
            std::future::poll_fn(|cx| {
                if changed.as_mut().poll(cx).is_ready() || recheck.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                for local in locals.iter().filter(|l| l.room(cap) > 0) {
                    if let Some(sender) = &local.sender {
                        if sender.poll_send_ready(cx).is_ready() {
                            return Poll::Ready(());
                        }
                    }
                }
                Poll::Pending
            })
            .await;
        }
    }

    /// Plans `pending` over the workers with the dispatch policy and sends each worker its
    /// share in batches, without waiting. What could not be queued stays in `pending`.
    pub(crate) fn try_dispatch_all(&mut self, pending: &mut Vec<Pending>) {
        self.refresh();
        // A worker found full or broken is left out of the next pass, so each pass either
        // queues something or leaves nobody to try.
        let passes = self.locals.len() + 1;
        for _pass in 0..passes {
            if pending.is_empty() {
                break;
            }
            self.look();
            if !self.plan(pending.len()) {
                break;
            }
            self.sent.clear();
            self.sent.resize(pending.len(), false);
            for w in 0..self.locals.len() {
                self.send_share(w, pending);
            }
            let sent = &self.sent;
            let mut index = 0;
            pending.retain(|_| {
                let keep = !sent[index];
                index += 1;
                keep
            });
        }
        self.excluded.clear();
    }

    /// The candidates of this pass: each worker's room and load picture.
    fn look(&mut self) {
        self.candidates.clear();
        let now = Instant::now();
        let cap = self.board.cap;
        for (i, local) in self.locals.iter_mut().enumerate() {
            let room = if self.excluded.contains(&i) {
                0
            } else {
                local.room(cap)
            };
            let (busy, stuck_for) = if room > 0 {
                local.busy(now)
            } else {
                (Busy::Idle, Duration::ZERO)
            };
            self.candidates.push(Candidate {
                load: local.seat.open(),
                room,
                busy,
                stuck_us: u64::try_from(stuck_for.as_micros()).unwrap_or(u64::MAX),
            });
        }
    }

    /// Picks a candidate for each of `n` connections; `false` if none has room.
    fn plan(&mut self, n: usize) -> bool {
        self.plan.clear();
        for _ in 0..n {
            self.plan.push(self.planner.pick(&mut self.candidates));
        }
        self.plan.iter().any(Option::is_some)
    }

    /// Sends worker `w` the connections planned for it (see [`Shard::send_batches`]); its
    /// queue waits from now on, if it was empty.
    fn send_share(&mut self, w: usize, pending: &[Pending]) {
        if self.send_batches(w, pending) {
            let reading = &mut self.locals[w].reading;
            reading.waiting_since.get_or_insert_with(Instant::now);
        }
    }

    /// Sends worker `w` the connections planned for it, in batches of at most
    /// [`MAX_BATCH`], until one does not fit (its queue is full: it joins `excluded`), the
    /// channel fails, or its gate closes. Returns whether it sent any.
    fn send_batches(&mut self, w: usize, pending: &[Pending]) -> bool {
        let local = &self.locals[w];
        let Some(sender) = &local.sender else {
            return false;
        };
        let mut any = false;
        let seat = &local.seat;
        let mut chosen = (0..pending.len())
            .filter(|&i| self.plan[i] == Some(w))
            .peekable();
        while chosen.peek().is_some() {
            let mut batch = ConnBatch::new();
            let mut indices = [0usize; MAX_BATCH];
            let first = pending[*chosen.peek().unwrap_or(&0)].fd.as_fd();
            let mut fds = [first; MAX_BATCH];
            for (k, i) in chosen.by_ref().take(MAX_BATCH).enumerate() {
                batch.push(pending[i].meta);
                fds[k] = pending[i].fd.as_fd();
                indices[k] = i;
            }
            let k = batch.len();
            let gate = seat.enter();
            if !*gate {
                // Closed since the look: it drains, stalled or died.
                self.excluded.push(w);
                return any;
            }
            let result = sender.try_send(&Message::Conns(batch), &fds[..k]);
            drop(gate);
            match result {
                Ok(()) => {
                    queued(&self.board, seat, &indices[..k], pending, &mut self.sent);
                    any = true;
                }
                Err(TrySendError::Full) => {
                    self.excluded.push(w);
                    return any;
                }
                Err(TrySendError::Failed(err)) => {
                    warn!(worker.id = seat.slot.get(), worker.pid = seat.pid, error = %err, event = "worker_send_failed", "cannot send to worker; skipping it");
                    seat.fail();
                    self.board.changed.notify_waiters();
                    return any;
                }
            }
        }
        any
    }
}

/// The connections at `indices` are queued to `seat`'s worker: counted, timed, and
/// checked against its recycling threshold.
fn queued(board: &Board, seat: &Seat, indices: &[usize], pending: &[Pending], sent: &mut [bool]) {
    let now = Instant::now();
    for &i in indices {
        sent[i] = true;
        let waited = now.duration_since(pending[i].since);
        board.dispatch_latency.observe(waited.as_secs_f64());
    }
    let k = indices.len() as u64;
    let before = seat.sent.fetch_add(k, Ordering::Relaxed);
    seat.forwarded.inc_by(k);
    let at = seat.recycle_at.load(Ordering::Relaxed);
    if before < at && before + k >= at {
        board.recycle_due.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use coreloop_ipc::{PeerAddr, socketpair_cloexec};
    use prometheus_client::metrics::histogram::Histogram;

    use super::*;
    use crate::dispatch::Dispatch;
    use crate::dispatch::board::TestSeat;

    fn pending(fd: OwnedFd) -> Pending {
        Pending {
            fd,
            meta: ConnMeta {
                id: 1,
                listener: 0,
                peer: PeerAddr::Unknown,
            },
            since: Instant::now(),
        }
    }

    /// A close published in a worker's loop clock wakes nobody, so a dispatcher holding a
    /// connection for a worker at its cap must look again by itself.
    #[tokio::test(flavor = "current_thread")]
    async fn a_close_published_in_the_clock_frees_room_at_the_cap() {
        let TestSeat {
            seat,
            sup: _sup,
            worker,
            clock,
        } = TestSeat::new();
        seat.set_open(true);
        // One connection sent and still open: at a cap of one.
        seat.sent.store(1, Ordering::Relaxed);
        let board = Arc::new(Board::new(
            1,
            Dispatch::LeastConnections,
            Histogram::new([1.0].into_iter()),
        ));
        board.add(Arc::clone(&seat));
        let mut shard = Shard::new(Arc::clone(&board), 1);
        assert!(!shard.has_room());

        let (client, _peer) = socketpair_cloexec().unwrap();
        let dispatcher = tokio::spawn(async move {
            let mut held = vec![pending(client)];
            shard.dispatch_all(&mut held).await;
            held.len()
        });
        // The dispatcher runs until it waits for room, and is polled again only when woken.
        tokio::task::yield_now().await;
        assert!(!dispatcher.is_finished(), "held at the cap");
        assert_eq!(seat.sent.load(Ordering::Relaxed), 1);
        // The worker closes one. Nothing notifies `changed`: only the dispatcher's own
        // second look can see it.
        clock.closed_up_to(1);
        let left = tokio::time::timeout(Duration::from_secs(10), dispatcher)
            .await
            .expect("the held connection went out once the worker closed one")
            .unwrap();
        assert_eq!(left, 0);
        assert_eq!(seat.sent.load(Ordering::Relaxed), 2);
        let (msg, fds) = worker.recv().await.unwrap().expect("the batch");
        assert!(matches!(msg, Message::Conns(_)), "{msg:?}");
        assert_eq!(fds.len(), 1);
    }
}
