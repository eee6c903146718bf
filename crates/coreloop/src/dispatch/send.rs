//! Sending connections to workers: the policy plans a batch of accepted connections over
//! the workers with room, and each worker's share goes out in as few `Conns` messages as
//! [`MAX_BATCH`] allows, with a non-blocking send, so that a worker whose queue is full is
//! skipped rather than waited on. Once warm, it allocates nothing.

use std::os::fd::{AsFd, OwnedFd};
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use coreloop_ipc::{Channel, ConnBatch, ConnMeta, MAX_BATCH, Message, TrySendError};
use tracing::{debug, warn};

use super::pool::{Pool, State};
use super::{Busy, Candidate};
use crate::handler::WorkerId;

/// An accepted connection waiting to be queued to a worker.
pub(crate) struct Pending {
    pub(crate) fd: OwnedFd,
    pub(crate) meta: ConnMeta,
    /// When it was accepted (or recovered), for the dispatch-latency histogram.
    pub(crate) since: Instant,
}

/// Buffers reused by every dispatch, so that dispatching allocates nothing once warm.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) candidates: Vec<Candidate>,
    pub(crate) channels: Vec<(Rc<Channel>, u32, WorkerId)>,
    pub(crate) plan: Vec<Option<usize>>,
    pub(crate) sent: Vec<bool>,
    pub(crate) excluded: Vec<u32>,
}

impl Pool {
    /// Hands every pending connection to a worker, in as few messages as the plan allows.
    /// Returns once all were queued, or when the server is stopping (then the rest are
    /// closed undelivered).
    pub(crate) async fn dispatch_all(&self, pending: &mut Vec<Pending>, scratch: &mut Scratch) {
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            self.try_dispatch_all(pending, scratch);
            if pending.is_empty() {
                return;
            }
            if self.stopping.get() {
                debug!(
                    undelivered = pending.len(),
                    "stopping; closing undelivered connections"
                );
                pending.clear();
                return;
            }
            // No worker can take them now: wait for room in a queue or any change.
            std::future::poll_fn(|cx| {
                if changed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                let workers = self.workers.borrow();
                for worker in workers.iter().filter(|w| w.can_take(self.cap)) {
                    if worker.channel.poll_send_ready(cx).is_ready() {
                        return Poll::Ready(());
                    }
                }
                Poll::Pending
            })
            .await;
        }
    }

    /// Plans `pending` over the workers with the dispatch policy and sends each worker its
    /// share in batches, without waiting. What could not be queued stays in `pending`.
    pub(crate) fn try_dispatch_all(&self, pending: &mut Vec<Pending>, scratch: &mut Scratch) {
        // A worker found full or broken is left out of the next pass, so each pass either
        // queues something or leaves nobody to try.
        let passes = self.workers.borrow().len() + 1;
        for _pass in 0..passes {
            if pending.is_empty() {
                return;
            }
            self.look(scratch);
            if !self.plan(pending.len(), scratch) {
                break;
            }
            scratch.sent.clear();
            scratch.sent.resize(pending.len(), false);
            let Scratch {
                channels,
                plan,
                sent,
                excluded,
                ..
            } = &mut *scratch;
            for (w, target) in channels.iter().enumerate() {
                let planned = (0..pending.len()).filter(|&i| plan[i] == Some(w));
                self.send_share(target, planned, pending, sent, excluded);
            }
            let mut index = 0;
            pending.retain(|_| {
                let keep = !scratch.sent[index];
                index += 1;
                keep
            });
        }
        scratch.excluded.clear();
    }

    /// The candidates of this pass: each worker's room and load picture, and its channel.
    fn look(&self, scratch: &mut Scratch) {
        scratch.candidates.clear();
        scratch.channels.clear();
        let now = Instant::now();
        for w in self.workers.borrow_mut().iter_mut() {
            let room =
                if w.state == State::Ready && !w.stalled && !scratch.excluded.contains(&w.pid) {
                    self.cap.saturating_sub(w.open())
                } else {
                    0
                };
            let (busy, stuck_for) = if room > 0 {
                w.busy(now)
            } else {
                (Busy::Idle, Duration::ZERO)
            };
            scratch.candidates.push(Candidate {
                load: w.open(),
                room,
                busy,
                stuck_us: u64::try_from(stuck_for.as_micros()).unwrap_or(u64::MAX),
            });
            scratch
                .channels
                .push((Rc::clone(&w.channel), w.pid, w.slot));
        }
    }

    /// Picks a candidate for each of `n` connections; `false` if none has room.
    fn plan(&self, n: usize, scratch: &mut Scratch) -> bool {
        scratch.plan.clear();
        let mut planner = self.planner.borrow_mut();
        for _ in 0..n {
            scratch.plan.push(planner.pick(&mut scratch.candidates));
        }
        scratch.plan.iter().any(Option::is_some)
    }

    /// Sends a worker the connections planned for it (`planned`, indices into `pending`),
    /// in batches of at most [`MAX_BATCH`], until one does not fit (its queue is full: it
    /// joins `excluded`) or the channel fails.
    fn send_share(
        &self,
        (channel, pid, slot): &(Rc<Channel>, u32, WorkerId),
        planned: impl Iterator<Item = usize>,
        pending: &[Pending],
        sent: &mut [bool],
        excluded: &mut Vec<u32>,
    ) {
        let (pid, slot) = (*pid, *slot);
        let mut chosen = planned.peekable();
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
            match channel.try_send(&Message::Conns(batch), &fds[..k]) {
                Ok(()) => self.queued(pid, &indices[..k], pending, sent),
                Err(TrySendError::Full) => {
                    excluded.push(pid);
                    return;
                }
                Err(TrySendError::Failed(err)) => {
                    warn!(worker.id = slot.get(), worker.pid = pid, error = %err, event = "worker_send_failed", "cannot send to worker; skipping it");
                    self.mark_draining(pid);
                    self.changed.notify_waiters();
                    return;
                }
            }
        }
    }

    /// The connections at `indices` are queued to worker `pid`: counted, timed, and
    /// checked against its recycling threshold.
    fn queued(&self, pid: u32, indices: &[usize], pending: &[Pending], sent: &mut [bool]) {
        let now = Instant::now();
        for &i in indices {
            sent[i] = true;
            let waited = now.duration_since(pending[i].since);
            self.metrics.dispatch_latency.observe(waited.as_secs_f64());
        }
        let k = indices.len() as u64;
        let due = self
            .with_worker(pid, |w| {
                // Queued from now on, if its queue was empty.
                w.reading.waiting_since.get_or_insert(now);
                let before = w.sent;
                w.sent += k;
                w.forwarded.inc_by(k);
                w.recycle_at.is_some_and(|at| before < at && w.sent >= at)
            })
            .unwrap_or(false);
        if due {
            self.recycle_due.notify_one();
        }
    }
}
