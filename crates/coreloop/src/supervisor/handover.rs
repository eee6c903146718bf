//! A binary upgrade, as the running supervisor sees it: start the new generation, and once
//! it serves, stop accepting and hand the listeners over (or take them back if it is gone).

use std::rc::Rc;

use coreloop_ipc::Message;
use sd_notify::NotifyState;
use tracing::{Instrument, error, info, warn};

use super::Shared;
use super::report::{notify, notify_reloading};
use super::upgrade::Successor;
use crate::accept::shards::{Acceptors, Assignment};
use crate::listener;
use crate::listener::Handover;

/// SIGUSR2: binary upgrade. Starts the new generation in a task; when it serves, the task
/// leaves it in `shared.successor` for the main task to [`hand_over`] to. `running` is the
/// task of the previous upgrade, if any: while it runs (or its successor waits for the
/// handover) the request is refused. Returns the task of this upgrade, or `running` back.
pub(super) fn start_upgrade(
    shared: &Rc<Shared>,
    handover: &Rc<Vec<Handover>>,
    running: Option<tokio::task::JoinHandle<()>>,
) -> Option<tokio::task::JoinHandle<()>> {
    if running.as_ref().is_some_and(|task| !task.is_finished())
        || shared.successor.borrow().is_some()
    {
        warn!(
            event = "upgrade_refused",
            "an upgrade is already in progress; ignoring this request"
        );
        return running;
    }
    let exe = match &shared.exe {
        Ok(exe) => exe.clone(),
        Err(err) => {
            error!(error = %err, event = "upgrade_failed", "cannot upgrade: the path of this executable is unknown");
            return None;
        }
    };
    notify_reloading("upgrading");
    let shared = Rc::clone(shared);
    let handover = Rc::clone(handover);
    let span = shared.span.clone();
    Some(tokio::task::spawn_local(
        async move {
            let timeout = shared.config.upgrade_timeout;
            match super::upgrade::start_successor(&exe, &handover, timeout, &shared.cpus).await {
                Ok(successor) => {
                    info!(upgrade.pid = successor.pid, event = "upgrade_successor_serving", "the new generation serves");
                    *shared.successor.borrow_mut() = Some(successor);
                    shared.pool.board.changed.notify_waiters();
                }
                Err(reason) => {
                    error!(%reason, event = "upgrade_failed", "upgrade failed; this generation keeps serving");
                    shared.notify_ready();
                }
            }
        }
        .instrument(span),
    ))
}

/// Binary upgrade, old side, once the new generation serves: stops accepting (the accept
/// loops return the listeners once what they took is queued to workers), tells the new
/// supervisor to take over, and tells systemd which process is the main one now.
///
/// If the new supervisor is gone by then, returns the listeners to accept on again.
pub(super) async fn hand_over(
    shared: &Rc<Shared>,
    successor: Successor,
    accept: Option<Acceptors>,
) -> Result<Successor, Assignment> {
    // The accept loops (there are some until a handover succeeds) do not panic; were they
    // gone, there would be nothing to resume.
    let listeners = match accept {
        Some(acceptors) => acceptors.hand_back().await,
        None => Vec::new(),
    };
    match successor.channel.send(&Message::Takeover, &[]).await {
        Ok(()) => {
            // The socket files are the new supervisor's now.
            listener::own_socket_files(false);
            drop(listeners);
            let status = format!("upgraded: pid {} serves; draining", successor.pid);
            notify(&[
                NotifyState::MainPid(successor.pid),
                NotifyState::Ready,
                NotifyState::Status(&status),
            ]);
            info!(
                upgrade.pid = successor.pid,
                event = "upgrade_handed_over",
                "handed over to the new generation; draining this one"
            );
            Ok(successor)
        }
        Err(err) => {
            error!(upgrade.pid = successor.pid, error = %err, event = "upgrade_handover_failed", "the new supervisor went away at the handover; this generation keeps serving");
            tokio::task::spawn_local(successor.abandon(super::upgrade::EXIT_GRACE));
            shared.notify_ready();
            Err(listeners)
        }
    }
}
