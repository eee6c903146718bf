//! The health check, every half heartbeat interval: stalls and hang kills, drains past
//! their timeout, workers that never get ready, recycling; and systemd's watchdog, which
//! is fed only while every ready worker reports.

use std::rc::Rc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::{Instrument, error, info, warn};

use super::READY_TIMEOUT;
use super::Shared;
use super::replace::replace;
use super::report::notify;
use super::spawn::kill_worker;
use crate::dispatch::{State, Worker};
use crate::exit::ExitReason;
use crate::handler::WorkerId;

/// systemd's watchdog (`WatchdogSec=`): `WATCHDOG=1` every half period, but only while
/// every ready worker's event loop is reporting, so that systemd sees a hung pool, not
/// just a hung supervisor. A worker that is stalled past the heartbeat timeout is killed
/// and replaced; pings resume once every worker reports again.
pub(super) async fn watchdog_loop(shared: Rc<Shared>, period: Duration) {
    let mut tick = tokio::time::interval(period / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withheld = false;
    loop {
        tick.tick().await;
        let stalled: Vec<(usize, u32)> = shared
            .pool
            .workers
            .borrow()
            .iter()
            .filter(|w| w.state() == State::Ready && w.stalled())
            .map(|w| (w.slot.get(), w.pid))
            .collect();
        let ready = shared.pool.count(|w| w.state() == State::Ready);
        if stalled.is_empty() && ready > 0 {
            if withheld {
                info!(
                    event = "watchdog_resumed",
                    "every worker reports again; resuming watchdog pings"
                );
                withheld = false;
            }
            notify(&[NotifyState::Watchdog]);
        } else if !withheld {
            warn!(
                ?stalled,
                ready,
                event = "watchdog_withheld",
                "withholding systemd watchdog pings: not every worker is answering"
            );
            withheld = true;
        }
    }
}

/// Hang detection and recycling, every half heartbeat interval.
pub(super) async fn health_loop(shared: Rc<Shared>) {
    let interval = shared.config.heartbeat_interval();
    let mut tick = tokio::time::interval(interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // Dispatch found a worker past its recycling threshold: act now, not at the
            // next tick, so that it does not serve far beyond its share.
            () = shared.pool.board.recycle_due.notified() => {}
        }
        let now = Instant::now();
        let recycling = shared.pool.count(|w| w.replacing);
        let Findings { kill, recycle } = inspect(&shared, now, interval * 3);
        for (slot, pid, reason) in kill {
            let silent = shared
                .pool
                .with_worker(pid, |w| now.duration_since(w.last_report))
                .unwrap_or_default();
            log_kill(slot, pid, reason, silent);
            kill_worker(pid);
        }
        shared.pool.board.changed.notify_waiters();
        let room = shared
            .config
            .max_concurrent_recycles
            .saturating_sub(recycling);
        for (pid, why) in recycle.into_iter().take(room) {
            if shared.reloading.get() {
                break;
            }
            start_recycle(&shared, pid, why);
        }
    }
}

/// What one look at the workers found to do.
#[derive(Default)]
struct Findings {
    /// Workers to kill: slot, pid, why.
    kill: Vec<(WorkerId, u32, ExitReason)>,
    /// Workers to recycle: pid, what passed its threshold.
    recycle: Vec<(u32, &'static str)>,
}

/// Looks at every worker at `now`: overdue drains and starts, hangs, late reports (a
/// worker silent for `stall_after` gets no new connections), and recycling thresholds.
fn inspect(shared: &Shared, now: Instant, stall_after: Duration) -> Findings {
    let mut found = Findings::default();
    let mut workers = shared.pool.workers.borrow_mut();
    for w in workers.iter_mut() {
        if let Some(reason) = overdue(w, now) {
            w.kill_at = None;
            w.exit_reason = Some(reason);
            found.kill.push((w.slot, w.pid, reason));
        }
    }
    for w in workers.iter_mut().filter(|w| w.state() == State::Ready) {
        if let Some(reason) = hung(w, now, shared.config.heartbeat_timeout) {
            w.set_state(State::Draining);
            w.exit_reason = Some(reason);
            found.kill.push((w.slot, w.pid, reason));
            continue;
        }
        let silent = now.duration_since(w.last_report);
        if silent > stall_after && !w.stalled() {
            warn!(
                event = "worker_stalled",
                worker.id = w.slot.get(),
                worker.pid = w.pid,
                silent_ms = silent.as_millis() as u64,
                "worker reports are late; no new connections for it"
            );
            w.set_stalled(true);
        }
        if !w.replacing && w.slot.get() < shared.target.get() {
            let by_count = w.seat.recycle_at().is_some_and(|at| w.sent() >= at);
            let by_rss = shared
                .config
                .recycle_rss_kib
                .is_some_and(|max| w.rss_kib > max);
            if by_count || by_rss {
                found
                    .recycle
                    .push((w.pid, if by_count { "connection count" } else { "rss" }));
            }
        }
    }
    found
}

/// Replaces worker `pid` in a task of its own: its replacement first, then its drain.
fn start_recycle(shared: &Rc<Shared>, pid: u32, why: &'static str) {
    shared.pool.with_worker(pid, |w| w.replacing = true);
    let shared = Rc::clone(shared);
    let span = shared.span.clone();
    tokio::task::spawn_local(
        async move {
            info!(
                worker.pid = pid,
                why,
                event = "recycling",
                "recycling worker"
            );
            replace(&shared, pid, ExitReason::Recycle, why).await;
        }
        .instrument(span),
    );
}

/// Why a worker that is not serving must be killed now, if it must: draining past the
/// shutdown timeout, or starting for longer than [`READY_TIMEOUT`].
pub(super) fn overdue(w: &Worker, now: Instant) -> Option<ExitReason> {
    if w.kill_at.is_some_and(|at| now >= at) {
        return Some(ExitReason::DrainTimeout);
    }
    (w.state() == State::Starting && now.duration_since(w.started) > READY_TIMEOUT)
        .then_some(ExitReason::StartTimeout)
}

/// Why a ready worker must be killed as hung, if it must. Its reports alone are not
/// trusted (a thread of the worker could send them while its event loop is blocked), so
/// what the supervisor sees for itself counts too: one handler poll running, or its queue
/// left unread, for the heartbeat timeout.
pub(super) fn hung(w: &mut Worker, now: Instant, timeout: Duration) -> Option<ExitReason> {
    let silent = now.duration_since(w.last_report);
    let in_poll = w
        .seat
        .clock
        .get()
        .and_then(|clock| clock.poll_running_for());
    if silent > timeout || in_poll.is_some_and(|poll| poll > timeout) {
        return Some(ExitReason::Hang);
    }
    w.look(now)
        .is_some_and(|waited| waited > timeout)
        .then_some(ExitReason::NotReading)
}

/// The log line of a worker the health check kills.
pub(super) fn log_kill(slot: WorkerId, pid: u32, reason: ExitReason, silent: Duration) {
    let message = match reason {
        ExitReason::DrainTimeout => {
            "draining worker did not exit within the shutdown timeout; killing it"
        }
        ExitReason::StartTimeout => "worker did not become ready in time; killing it",
        ExitReason::NotReading => {
            "worker left its connections unread past the heartbeat timeout; killing it"
        }
        _ => "worker event loop blocked past the heartbeat timeout; killing it",
    };
    // The level follows what it means for clients: a hang lost requests.
    let blocked_ms = silent.as_millis() as u64;
    if reason == ExitReason::DrainTimeout {
        warn!(
            event = "worker_killed",
            worker.id = slot.get(),
            worker.pid = pid,
            reason = reason.label(),
            "{message}"
        );
    } else {
        error!(
            event = "worker_killed",
            worker.id = slot.get(),
            worker.pid = pid,
            reason = reason.label(),
            blocked_ms,
            "{message}"
        );
    }
}
