//! Replacing workers while the server runs: a replacement started and ready before the old
//! worker drains (reload, recycling), and scaling the pool up and down.

use std::rc::Rc;

use sd_notify::NotifyState;
use tracing::{Instrument, error, info, warn};

use super::READY_TIMEOUT;
use super::Shared;
use super::report::{notify, notify_reloading};
use super::spawn::{kill_worker, spawn_worker};
use crate::dispatch::State;
use crate::exit::ExitReason;
use crate::handler::WorkerId;

/// Starts a replacement for the worker `old`, waits until it is ready, then drains `old`.
/// Returns whether the replacement became ready.
///
/// `reason` is the old worker's exit reason; `why`, what triggered the replacement, for
/// the log (`reload`, `connection count`, `rss`).
pub(super) async fn replace(
    shared: &Rc<Shared>,
    old: u32,
    reason: ExitReason,
    why: &'static str,
) -> bool {
    let Some(slot) = shared.pool.with_worker(old, |w| {
        w.replacing = true;
        w.slot
    }) else {
        return true;
    };
    let new = match spawn_worker(shared, slot) {
        Ok(pid) => pid,
        Err(err) => {
            error!(error = %err.chain(), event = "replacement_failed", "cannot start a replacement");
            shared.pool.with_worker(old, |w| w.replacing = false);
            return false;
        }
    };
    let ready = tokio::time::timeout(READY_TIMEOUT, async {
        loop {
            let changed = shared.pool.board.changed.notified();
            match shared.pool.with_worker(new, |w| w.state()) {
                Some(State::Ready) => return true,
                None | Some(State::Draining) => return false,
                Some(State::Starting) => {}
            }
            if shared.pool.board.is_stopping() {
                return false;
            }
            changed.await;
        }
    })
    .await
    .unwrap_or(false);
    if !ready {
        error!(
            worker.id = slot.get(),
            old.pid = old,
            new.pid = new,
            why,
            event = "replacement_failed",
            "replacement did not become ready; keeping the old worker"
        );
        if shared.pool.with_worker(new, |w| w.state()).is_some() {
            kill_worker(new);
        }
        shared.pool.with_worker(old, |w| w.replacing = false);
        return false;
    }
    info!(
        worker.id = slot.get(),
        old.pid = old,
        new.pid = new,
        why,
        event = "replacement_ready",
        "replacement ready; draining the old worker"
    );
    shared.set_exit_reason(old, reason);
    shared.drain_worker(old).await;
    true
}

/// SIGHUP: rolling replacement of every worker, one at a time.
pub(super) fn start_reload(shared: &Rc<Shared>) {
    if shared.reloading.replace(true) {
        warn!(
            event = "reload_refused",
            "a reload is already in progress; ignoring this one"
        );
        return;
    }
    notify_reloading("reloading");
    let shared = Rc::clone(shared);
    let span = shared.span.clone();
    tokio::task::spawn_local(
        async move {
            let old: Vec<u32> = shared
                .pool
                .workers
                .borrow()
                .iter()
                .filter(|w| w.state() != State::Draining && !w.replacing)
                .map(|w| w.pid)
                .collect();
            let mut replaced = 0usize;
            for pid in &old {
                if shared.pool.board.is_stopping() {
                    break;
                }
                if !replace(&shared, *pid, ExitReason::Reload, "reload").await {
                    error!(replaced, event = "reload_aborted", "reload aborted");
                    shared.reloading.set(false);
                    shared.notify_ready();
                    return;
                }
                replaced += 1;
            }
            info!(replaced, event = "reload_complete", "reload complete");
            shared.reloading.set(false);
            shared.notify_ready();
        }
        .instrument(span),
    );
}

/// SIGTTIN: one more slot.
pub(super) fn scale_up(shared: &Rc<Shared>) {
    let slot = shared.target.get();
    shared.target.set(slot + 1);
    match spawn_worker(shared, WorkerId(slot)) {
        Ok(_) => {
            info!(workers = slot + 1, event = "scaled_up", "scaled up");
            notify(&[NotifyState::Status(&shared.status())]);
        }
        Err(err) => {
            error!(error = %err.chain(), event = "scale_up_failed", "cannot add a worker");
            shared.target.set(slot);
        }
    }
}

/// SIGTTOU: one slot fewer; its workers drain.
pub(super) async fn scale_down(shared: &Rc<Shared>) {
    let target = shared.target.get();
    if target <= 1 {
        warn!(
            event = "scale_down_refused",
            "cannot remove the last worker"
        );
        return;
    }
    let slot = target - 1;
    shared.target.set(slot);
    let pids: Vec<u32> = shared
        .pool
        .workers
        .borrow()
        .iter()
        .filter(|w| w.slot == WorkerId(slot) && w.state() != State::Draining)
        .map(|w| w.pid)
        .collect();
    for pid in pids {
        shared.set_exit_reason(pid, ExitReason::ScaleDown);
        shared.drain_worker(pid).await;
    }
    info!(workers = slot, event = "scaled_down", "scaled down");
    notify(&[NotifyState::Status(&shared.status())]);
}
