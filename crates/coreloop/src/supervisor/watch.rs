//! One watcher per worker: reads its channel through the trust boundary, reaps it (after
//! killing what it forked), takes back the connections it never read, and carries out the
//! restart policy's decision about its slot.

use std::process::ExitStatus;
use std::rc::Rc;
use std::task::Poll;
use std::time::Instant;

use coreloop_ipc::{Channel, Message, Queue};
use rustix::process::Pid;
use tracing::{debug, error, info, warn};

use super::Shared;
use super::boundary::{CLOSED_GRACE, Screen, Violation, printable};
use super::restart::{Death, Decision, GiveUp};
use super::spawn::{kill_group, kill_worker, spawn_worker};
use crate::dispatch::{Pending, Shard, State};
use crate::error::Error;
use crate::exit::ExitReason;
use crate::handler::WorkerId;
use crate::metrics::RestartLabels;

/// Follows one worker from spawn to reaping, then carries out the restart policy's
/// decision about its slot.
pub(super) async fn watch(
    shared: Rc<Shared>,
    slot: WorkerId,
    pid: u32,
    child: tokio::process::Child,
    channel: Rc<Channel>,
    queue: std::sync::Arc<Queue>,
) {
    let mut failure: Option<String> = None;
    let status = follow(&shared, slot, pid, child, &channel, &mut failure).await;
    if failure.is_none() {
        failure = last_words(&shared, slot, pid, &channel);
    }
    let removed = {
        let mut workers = shared.pool.workers.borrow_mut();
        let index = workers.iter().position(|w| w.pid == pid);
        index.map(|index| workers.remove(index))
    };
    let Some(worker) = removed else {
        shared.pool.board.changed.notify_waiters();
        return;
    };
    // Closing its gate waits for any acceptor sending to it: after that, nothing more
    // joins its queue, and what is there can be taken back whole.
    worker.seat.set_open(false);
    shared.pool.board.remove(pid);
    shared.pool.board.changed.notify_waiters();
    // What decides on the replacement; the rest (the queue's other reference among it) is
    // released now, so the dead worker's channel closes before its replacement starts.
    let (state, exit_reason, started, was_ready) = (
        worker.state(),
        worker.exit_reason,
        worker.started,
        worker.was_ready,
    );
    drop(worker);
    recover(&shared, &queue);
    drop(queue);

    let described = describe(status);
    if shared.pool.board.is_stopping() {
        debug!(event = "worker_exited", worker.id = slot.get(), worker.pid = pid, status = %described, "worker exited");
        return;
    }
    let drained = state == State::Draining && status.is_some_and(|s| s.success());
    let (reason, death) = classify_exit(exit_reason, drained, was_ready);
    shared
        .metrics
        .restarts
        .get_or_create(&RestartLabels {
            worker: slot.get() as u32,
            reason: reason.label(),
        })
        .inc();
    let uptime_ms = started.elapsed().as_millis() as u64;
    if death == Death::Drained {
        info!(event = "worker_exited", worker.id = slot.get(), worker.pid = pid, reason = reason.label(), status = %described, "worker exited after draining");
    } else if shared.admit_log() {
        warn!(event = "worker_exited", worker.id = slot.get(), worker.pid = pid, reason = reason.label(), status = %described, uptime_ms, failure = ?failure.as_deref().unwrap_or(""), "worker died");
    }
    let failure = failure.map(|reason| printable(&reason));
    restart(&shared, slot, death, failure, described).await;
}

/// What a worker said just before it exited (a start failure), if it is still queued.
/// Nothing else is read: a worker that was stopped for breaking the protocol is not
/// listened to any more.
fn last_words(shared: &Shared, slot: WorkerId, pid: u32, channel: &Channel) -> Option<String> {
    if shared.pool.with_worker(pid, |w| w.exit_reason) == Some(Some(ExitReason::Violation)) {
        return None;
    }
    while let Ok(Some((msg, _))) = channel.try_recv() {
        if let Message::Failed { reason } = msg {
            error!(event = "worker_start_failed", worker.id = slot.get(), worker.pid = pid, reason = ?reason, "worker failed to start");
            return Some(reason);
        }
    }
    None
}

/// Why a worker ended, and what that is to the restart policy: the reason the supervisor
/// gave it (`given`), or else a drain it finished, a crash after it was ready, or a start
/// failure.
fn classify_exit(given: Option<ExitReason>, drained: bool, was_ready: bool) -> (ExitReason, Death) {
    let reason = match given {
        Some(reason) => reason,
        None if drained => ExitReason::Drained,
        None if was_ready => ExitReason::Crash,
        None => ExitReason::StartFailure,
    };
    let death = match reason {
        ExitReason::Drained
        | ExitReason::Reload
        | ExitReason::Recycle
        | ExitReason::Retire
        | ExitReason::ScaleDown => Death::Drained,
        _ if was_ready => Death::AfterReady,
        _ => Death::BeforeReady,
    };
    (reason, death)
}

/// Reads one worker's channel until its process has exited (it is not reaped yet), then
/// kills what it forked and reaps it. Every message is checked at the trust boundary
/// ([`Screen`]); a worker that breaks the protocol is killed.
pub(super) async fn follow(
    shared: &Rc<Shared>,
    slot: WorkerId,
    pid: u32,
    mut child: tokio::process::Child,
    channel: &Channel,
    failure: &mut Option<String>,
) -> Option<ExitStatus> {
    let mut screen = Screen::new(Instant::now());
    // A pidfd turns readable when the process exits, before it is reaped: the moment its
    // process group can still be killed safely. Without one (kernels before 5.3), the
    // group is left alone.
    let mut pidfd = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .and_then(|pid| rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok())
        .and_then(|fd| coreloop_ipc::Readiness::new(fd, tokio::io::Interest::READABLE).ok());
    let mut reading = true;
    let mut closed_at: Option<tokio::time::Instant> = None;
    loop {
        let grace = closed_at.map(|at| at + CLOSED_GRACE);
        tokio::select! {
            exited = std::future::poll_fn(|cx| match &pidfd {
                Some(pidfd) => pidfd.poll_read_ready(cx),
                None => Poll::Pending,
            }), if pidfd.is_some() => {
                if exited.is_err() {
                    pidfd = None;
                    continue;
                }
                kill_group(pid);
                break;
            }
            status = child.wait(), if pidfd.is_none() => return report_wait(status),
            received = channel.recv(), if reading => match received {
                Ok(Some((msg, fds))) => {
                    let verdict = screen.check(Instant::now(), &msg).and_then(|()| match msg {
                        Message::LoopClock => take_clock(shared, pid, fds),
                        _ => Ok(()),
                    });
                    match verdict {
                        Ok(()) if matches!(msg, Message::LoopClock) => {}
                        Ok(()) => on_message(shared, slot, pid, channel, msg, failure).await,
                        Err(violation) => {
                            broke_protocol(shared, slot, pid, violation);
                            reading = false;
                        }
                    }
                }
                Ok(None) => {
                    reading = false;
                    closed_at = Some(tokio::time::Instant::now());
                }
                Err(err) => {
                    broke_protocol(shared, slot, pid, Violation::of(&err));
                    reading = false;
                }
            },
            () = tokio::time::sleep_until(grace.unwrap_or_else(tokio::time::Instant::now)), if grace.is_some() => {
                closed_at = None;
                broke_protocol(shared, slot, pid, Violation::ChannelClosed);
            }
        }
    }
    report_wait(child.wait().await)
}

pub(super) fn report_wait(status: std::io::Result<ExitStatus>) -> Option<ExitStatus> {
    match status {
        Ok(status) => Some(status),
        Err(err) => {
            error!(error = %err, "cannot wait for worker");
            None
        }
    }
}

/// Maps the loop clock a worker sent, if it is one the supervisor can trust.
pub(super) fn take_clock(
    shared: &Shared,
    pid: u32,
    fds: coreloop_ipc::Fds,
) -> Result<(), Violation> {
    let fd = fds.into_iter().next().ok_or(Violation::WrongDescriptors)?;
    let clock = coreloop_ipc::LoopClockView::from_fd(fd).map_err(|err| {
        debug!(worker.pid = pid, error = %err, "unusable loop clock");
        Violation::BadLoopClock
    })?;
    shared.pool.with_worker(pid, |w| {
        // A second clock is ignored: the first one stays mapped for the acceptors.
        let _ = w.seat.clock.set(clock);
    });
    Ok(())
}

/// A worker broke the protocol: it gets no more connections, is killed, and will be
/// replaced like any worker that died. Said once, within the log budget.
pub(super) fn broke_protocol(shared: &Shared, slot: WorkerId, pid: u32, violation: Violation) {
    shared.pool.with_worker(pid, |w| {
        w.exit_reason = Some(ExitReason::Violation);
        w.set_state(State::Draining);
    });
    if shared.admit_log() {
        error!(
            event = "protocol_violation",
            worker.id = slot.get(),
            worker.pid = pid,
            violation = violation.label(),
            detail = %violation,
            "worker broke the protocol; killing it"
        );
    }
    kill_worker(pid);
    shared.pool.board.changed.notify_waiters();
}

/// Takes back what a dead worker never read and gives it to live workers.
pub(super) fn recover(shared: &Rc<Shared>, queue: &Queue) {
    let mut recovered = Vec::new();
    loop {
        match queue.try_recv() {
            Ok(Some((Message::Conns(batch), fds))) => {
                for (meta, fd) in batch.as_slice().iter().zip(fds) {
                    recovered.push(Pending {
                        fd,
                        meta: *meta,
                        since: Instant::now(),
                    });
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            // Only the supervisor writes into this queue; an error here is its own bug,
            // and what is after it is still taken.
            Err(err) => warn!(error = %err, "bad message in a dead worker's queue"),
        }
    }
    if recovered.is_empty() {
        return;
    }
    shared.metrics.recovered.inc_by(recovered.len() as u64);
    info!(
        recovered = recovered.len(),
        event = "connections_recovered",
        "re-dispatched connections the worker never took"
    );
    let shared = Rc::clone(shared);
    tokio::task::spawn_local(async move {
        let board = std::sync::Arc::clone(&shared.pool.board);
        let mut shard = Shard::new(board, super::spawn::seed());
        shard.dispatch_all(&mut recovered).await;
    });
}

/// Carries out the restart policy's decision about `slot`, whose worker ended (`death`).
/// `failure`: what the worker said, and `status`, how it exited, for the error if the
/// server gives up.
pub(super) async fn restart(
    shared: &Rc<Shared>,
    slot: WorkerId,
    death: Death,
    mut failure: Option<String>,
    status: String,
) {
    let wanted = |shared: &Shared| {
        !shared.pool.board.is_stopping()
            && slot.get() < shared.target.get()
            && !shared.pool.slot_covered(slot)
    };
    let mut decision = shared
        .policy
        .borrow_mut()
        .died(slot, death, wanted(shared), Instant::now());
    loop {
        match decision {
            Decision::Nothing => return,
            Decision::Stop(give_up) => {
                let err = match give_up {
                    GiveUp::Boot { .. } => match failure {
                        Some(reason) => Error::WorkerStart { id: slot, reason },
                        None => Error::WorkerExited { id: slot, status },
                    },
                    GiveUp::StartFailures { failures, .. } => Error::StartFailures {
                        id: slot,
                        failures,
                        reason: failure
                            .unwrap_or_else(|| format!("exited ({status}) before it was ready")),
                    },
                };
                shared.fail(err);
                return;
            }
            Decision::Now => {
                if !wanted(shared) {
                    return;
                }
                let Err(err) = spawn_worker(shared, slot) else {
                    return;
                };
                error!(worker.id = slot.get(), error = %err.chain(), event = "replacement_spawn_failed", "cannot start replacement worker");
                // A worker that cannot even be started (descriptors or processes ran
                // out, the executable is gone) is a start failure like one that dies
                // before it is ready: it backs off, and only the start-failure limit
                // stops the server.
                failure = Some(err.chain().to_string());
                decision = shared.policy.borrow_mut().died(
                    slot,
                    Death::BeforeReady,
                    wanted(shared),
                    Instant::now(),
                );
            }
            Decision::After { delay, why } => {
                info!(
                    event = "restart_scheduled",
                    worker.id = slot.get(),
                    delay_ms = delay.as_millis() as u64,
                    why = why.label(),
                    "restarting after backoff"
                );
                tokio::time::sleep(delay).await;
                if !wanted(shared) {
                    return;
                }
                decision = shared.policy.borrow_mut().due(Instant::now());
            }
        }
    }
}

pub(super) async fn on_message(
    shared: &Rc<Shared>,
    slot: WorkerId,
    pid: u32,
    channel: &Channel,
    msg: Message,
    failure: &mut Option<String>,
) {
    match msg {
        Message::Ready { .. } => {
            info!(
                event = "worker_ready",
                worker.id = slot.get(),
                worker.pid = pid,
                "worker ready"
            );
            shared.pool.with_worker(pid, |w| {
                w.was_ready = true;
                if w.state() == State::Starting {
                    w.set_state(State::Ready);
                    w.last_report = Instant::now();
                }
            });
            shared.policy.borrow_mut().ready(slot);
            shared.pool.board.changed.notify_waiters();
        }
        Message::Status {
            live,
            closed,
            rss_kib,
        } => {
            let resumed = shared
                .pool
                .with_worker(pid, |w| {
                    w.seat
                        .closed
                        .store(closed, std::sync::atomic::Ordering::Relaxed);
                    w.rss_kib = rss_kib;
                    w.live = live;
                    w.last_report = Instant::now();
                    let was = w.stalled();
                    if was {
                        w.set_stalled(false);
                    }
                    was
                })
                .unwrap_or(false);
            if resumed {
                info!(
                    event = "worker_resumed",
                    worker.id = slot.get(),
                    worker.pid = pid,
                    live,
                    "worker reports again; dispatching to it"
                );
            }
            shared.pool.board.changed.notify_waiters();
        }
        Message::Failed { reason } => {
            error!(event = "worker_start_failed", worker.id = slot.get(), worker.pid = pid, reason = ?reason, "worker failed to start");
            *failure = Some(reason);
        }
        Message::Retiring => retire(shared, slot, pid, channel).await,
        // The screen lets nothing else through.
        other => debug!(
            message = other.kind_name(),
            "unexpected message from worker"
        ),
    }
}

pub(crate) fn describe(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "unknown status".into(),
        Some(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => status.to_string(),
        },
    }
}

/// The worker asks to retire (a stop signal reached it directly): it is drained, and its
/// slot gets a replacement at once (a planned exit: no backoff).
async fn retire(shared: &Rc<Shared>, slot: WorkerId, pid: u32, channel: &Channel) {
    info!(
        event = "worker_retiring",
        worker.id = slot.get(),
        worker.pid = pid,
        "worker asks to retire; draining it"
    );
    let timeout_ms = shared.timeout_ms();
    shared.pool.mark_draining(pid);
    shared.set_exit_reason(pid, ExitReason::Retire);
    shared.pool.board.changed.notify_waiters();
    if let Err(err) = channel.send(&Message::Drain { timeout_ms }, &[]).await {
        debug!(error = %err, "cannot send Drain");
    }
    if !shared.pool.board.is_stopping()
        && slot.get() < shared.target.get()
        && !shared.pool.slot_covered(slot)
    {
        if let Err(err) = spawn_worker(shared, slot) {
            error!(error = %err.chain(), event = "replacement_spawn_failed", "cannot start replacement worker");
        }
    }
}
