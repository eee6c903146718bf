//! The main task: boots the pool (and, for the new generation of a binary upgrade, waits
//! for the handover), serves signals and handle commands until a stop, an upgrade or a
//! fatal error, and then stops the server the way that ended it.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use coreloop_ipc::{Channel, Message};
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tracing::{Instrument, debug, error, info, warn};

use super::boundary::LogBudget;
use super::handover::{hand_over, start_upgrade};
use super::health::{health_loop, watchdog_loop};
use super::replace::{scale_down, scale_up, start_reload};
use super::report::{metrics_loop, notify};
use super::restart::RestartPolicy;
use super::spawn::{seed, spawn_worker};
use super::upgrade::Successor;
use super::{FD_RESERVE, KILL_MARGIN, Shared};
use crate::accept::{Source, Switch, accept_loop};
use crate::config::Config;
use crate::dispatch::{Planner, Pool, State, XorShift};
use crate::error::Error;
use crate::handle::Command;
use crate::listener::{self, Handover, Listener};
use crate::metrics::Metrics;

/// Why the main loop ended.
pub(super) enum Outcome {
    Graceful,
    Immediate,
    Failed(Error),
    /// A binary upgrade: this supervisor handed over to a new one.
    Upgraded(Box<Successor>),
}

/// What [`run`] prepared for the main task.
pub(super) struct Boot<'a> {
    pub(super) config: Config,
    pub(super) bound: Vec<listener::Bound>,
    pub(super) metrics_listener: Option<std::net::TcpListener>,
    pub(super) nofile: u64,
    pub(super) cpus: String,
    /// The channel to the running supervisor, when this one was started by an upgrade.
    pub(super) upgrade: Option<&'a Channel>,
    pub(super) exe: std::io::Result<PathBuf>,
}

pub(super) async fn supervise(
    boot: Boot<'_>,
    mut commands: crate::handle::Inbox,
) -> Result<(), Error> {
    let Boot {
        config,
        bound,
        metrics_listener,
        nofile,
        cpus,
        upgrade,
        exe,
    } = boot;
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let mut sigquit = signal(SignalKind::quit()).map_err(Error::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(Error::Signal)?;
    let mut sigttin = signal(SignalKind::from_raw(rustix::process::Signal::TTIN.as_raw()))
        .map_err(Error::Signal)?;
    let mut sigttou = signal(SignalKind::from_raw(rustix::process::Signal::TTOU.as_raw()))
        .map_err(Error::Signal)?;
    let mut sigusr2 = signal(SignalKind::user_defined2()).map_err(Error::Signal)?;

    // What a binary upgrade hands over: a duplicate of every listening socket (the
    // reuseport reservations and the metrics socket included), in configuration order.
    let mut handover = Vec::with_capacity(bound.len() + 1);
    for b in &bound {
        let fd = b.fd.try_clone().map_err(|source| Error::Bind {
            addr: b.label.clone(),
            source,
        })?;
        handover.push(Handover {
            spec: b.spec.clone(),
            name: b.name.clone(),
            fd,
        });
    }
    if let (Some(listener), Some(addr)) = (&metrics_listener, config.metrics) {
        let fd = listener
            .try_clone()
            .map_err(|source| Error::Bind {
                addr: format!("metrics {addr}"),
                source,
            })?
            .into();
        handover.push(Handover {
            spec: format!("metrics:{addr}"),
            name: String::new(),
            fd,
        });
    }
    let handover = Rc::new(handover);

    let mut listeners = Vec::with_capacity(bound.len());
    // Reserved (bound, not listening) sockets stay open as long as the supervisor runs.
    let mut reserved = Vec::new();
    for bound in bound {
        if !bound.accepts {
            reserved.push(bound);
            continue;
        }
        let spec = bound.label.clone();
        let listener = Listener::new(bound).map_err(|source| Error::Bind { addr: spec, source })?;
        listeners.push(listener);
    }

    let cap = (config.max_connections as u64)
        .min(nofile.saturating_sub(FD_RESERVE))
        .max(1);
    let planner = Planner::new(config.dispatch, seed());
    let metrics = Rc::new(Metrics::new());
    let pool = Rc::new(Pool {
        workers: RefCell::new(Vec::new()),
        cap,
        changed: Notify::new(),
        recycle_due: Notify::new(),
        stopping: Cell::new(false),
        next_conn_id: Cell::new(0),
        planner: RefCell::new(planner),
        metrics: Rc::clone(&metrics),
        drain_grace: config.shutdown_timeout + KILL_MARGIN,
    });
    let shared = Rc::new(Shared {
        target: Cell::new(config.workers),
        policy: RefCell::new(RestartPolicy::new(config.restart_limits, seed())),
        log_budget: RefCell::new(LogBudget::new(Instant::now())),
        config,
        pool,
        switch: Rc::new(Switch::new()),
        metrics,
        booted: Cell::new(false),
        reloading: Cell::new(false),
        fatal: RefCell::new(None),
        rng: Cell::new(XorShift::new(seed())),
        span: tracing::Span::current(),
        cpus,
        successor: RefCell::new(None),
        exe: exe.map_err(|err| err.to_string()),
    });

    for slot in 0..shared.config.workers {
        if let Err(err) = spawn_worker(&shared, slot) {
            shared.stop_now().await;
            return Err(err);
        }
    }
    // Boot: every worker ready, or the first failure halts the server.
    loop {
        let changed = shared.pool.changed.notified();
        if let Some(err) = shared.take_fatal() {
            drop(changed);
            shared.stop_now().await;
            return Err(err);
        }
        if shared.pool.count(|w| w.state == State::Ready) == shared.config.workers {
            break;
        }
        tokio::select! {
            () = changed => {}
            _ = sigterm.recv() => { shared.stop_now().await; return Ok(()); }
            _ = sigint.recv() => { shared.stop_now().await; return Ok(()); }
            _ = sigquit.recv() => { shared.stop_now().await; return Ok(()); }
        }
    }
    if let Some(channel) = upgrade {
        // Every new worker serves: tell the running supervisor, and accept nothing until
        // it has stopped accepting and says so.
        let ready = Message::Ready {
            pid: std::process::id(),
        };
        let mut gone = channel.send(&ready, &[]).await.is_err();
        if !gone {
            info!(
                event = "upgrade_waiting",
                "every worker serves; waiting for the running supervisor to hand over"
            );
        }
        while !gone {
            let changed = shared.pool.changed.notified();
            if let Some(err) = shared.take_fatal() {
                drop(changed);
                shared.stop_now().await;
                return Err(err);
            }
            tokio::select! {
                msg = channel.recv() => match msg {
                    Ok(Some((Message::Takeover, _))) => break,
                    Ok(Some((other, _))) => debug!(message = other.kind_name(), "unexpected message from the running supervisor"),
                    Ok(None) | Err(_) => gone = true,
                },
                () = changed => {}
                _ = sigterm.recv() => { shared.stop_now().await; return Ok(()); }
                _ = sigint.recv() => { shared.stop_now().await; return Ok(()); }
                _ = sigquit.recv() => { shared.stop_now().await; return Ok(()); }
            }
        }
        listener::own_socket_files(true);
        if gone {
            warn!(
                event = "upgrade_taking_over",
                "the running supervisor went away before handing over; taking over"
            );
            // systemd: the old supervisor could not say `MAINPID=` (accepted from this
            // process with NotifyAccess=all); otherwise it says so itself.
            notify(&[NotifyState::MainPid(std::process::id())]);
        }
    }
    // The pid file exists by the time the log says `serving`.
    if let Some(path) = &shared.config.pid_file {
        if let Err(err) = super::upgrade::write_pid_file(path) {
            if upgrade.is_none() {
                shared.stop_now().await;
                return Err(err);
            }
            error!(error = %err.chain(), "cannot write the pid file");
        }
    }
    shared.booted.set(true);
    shared.policy.borrow_mut().booted();
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| &l.bound)
        .chain(&reserved)
        .map(|b| b.label.clone())
        .collect();
    let local_addrs =
        crate::handle::local_addrs(listeners.iter().map(|l| &l.bound).chain(&reserved));
    // Built now, so that its descriptors exist before the server says it is serving.
    let accept_task = accept_loop(
        Rc::clone(&shared.pool),
        Rc::clone(&shared.switch),
        Source::registered(listeners),
    );
    info!(workers = shared.config.workers, listeners = ?addrs, max_connections_per_worker = cap, upgraded = upgrade.is_some(), event = "serving", "serving");
    commands.serving(local_addrs);
    shared.notify_ready();

    let mut accept = Some(tokio::task::spawn_local(accept_task));
    let health =
        tokio::task::spawn_local(health_loop(Rc::clone(&shared)).instrument(shared.span.clone()));
    let metrics = match metrics_listener.map(tokio::net::TcpListener::from_std) {
        Some(Ok(listener)) => {
            let span = shared.span.clone();
            Some(tokio::task::spawn_local(
                metrics_loop(Rc::clone(&shared), listener).instrument(span),
            ))
        }
        Some(Err(err)) => {
            warn!(error = %err, "cannot serve metrics");
            None
        }
        None => None,
    };
    let mut upgrade_task = None;
    let watchdog = sd_notify::watchdog_enabled().map(|period| {
        tokio::task::spawn_local(
            watchdog_loop(Rc::clone(&shared), period).instrument(shared.span.clone()),
        )
    });

    let outcome = loop {
        let changed = shared.pool.changed.notified();
        if let Some(err) = shared.take_fatal() {
            break Outcome::Failed(err);
        }
        let successor = shared.successor.borrow_mut().take();
        if let Some(successor) = successor {
            match hand_over(&shared, successor, accept.take()).await {
                Ok(successor) => break Outcome::Upgraded(Box::new(successor)),
                Err(listeners) => {
                    let sources = Source::unregistered(listeners);
                    let task = tokio::task::spawn_local(accept_loop(
                        Rc::clone(&shared.pool),
                        Rc::clone(&shared.switch),
                        sources,
                    ));
                    accept = Some(task);
                    continue;
                }
            }
        }
        let command = tokio::select! {
            () = changed => continue,
            _ = sigterm.recv() => { info!(signal = "SIGTERM", event = "signal", "graceful shutdown"); Command::Stop { graceful: true } }
            _ = sigint.recv() => { info!(signal = "SIGINT", event = "signal", "graceful shutdown"); Command::Stop { graceful: true } }
            _ = sigquit.recv() => { info!(signal = "SIGQUIT", event = "signal", "immediate shutdown"); Command::Stop { graceful: false } }
            _ = sighup.recv() => { info!(signal = "SIGHUP", event = "signal", "reload"); Command::Reload }
            _ = sigttin.recv() => { info!(signal = "SIGTTIN", event = "signal", "add a worker"); Command::AddWorker }
            _ = sigttou.recv() => { info!(signal = "SIGTTOU", event = "signal", "remove a worker"); Command::RemoveWorker }
            _ = sigusr2.recv() => { info!(signal = "SIGUSR2", event = "signal", "binary upgrade"); Command::Upgrade }
            Some(command) = commands.recv() => { info!(?command, event = "command", "command from the server handle"); command }
        };
        match command {
            Command::Stop { graceful: true } => break Outcome::Graceful,
            Command::Stop { graceful: false } => break Outcome::Immediate,
            Command::Reload => start_reload(&shared),
            Command::AddWorker => scale_up(&shared),
            Command::RemoveWorker => scale_down(&shared).await,
            Command::Upgrade => {
                upgrade_task = start_upgrade(&shared, &handover, upgrade_task.take())
            }
        }
    };

    // An upgrade still in progress ends with this server: dropping the task kills the
    // new supervisor, which never accepted anything.
    if let Some(task) = upgrade_task {
        if !task.is_finished() && !matches!(outcome, Outcome::Upgraded(_)) {
            info!(
                event = "upgrade_cancelled",
                "stopping: the upgrade in progress is cancelled and its new supervisor killed"
            );
        }
        task.abort();
        let _ = task.await;
    }
    // The duplicates kept for a handover would keep the sockets open (and clients
    // queueing) after the listeners close.
    drop(handover);
    // After a handover the new supervisor answers `/metrics` and `/healthz` on the same
    // socket; otherwise they go on answering (`/healthz`: not ready) during the drain.
    if let (Some(metrics), Outcome::Upgraded(_)) = (metrics, &outcome) {
        metrics.abort();
    }
    shared.pool.stopping.set(true);
    if !matches!(outcome, Outcome::Upgraded(_)) {
        notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    shared.pool.changed.notify_waiters();
    health.abort();
    // Stop accepting: the accept task owns the listeners; aborting it closes them (and
    // removes unix socket files). After a handover it has already returned them.
    if let Some(accept) = accept {
        accept.abort();
        let _ = accept.await;
    }
    // An upgrade that completed in the meantime is cancelled (the new supervisor killed).
    drop(shared.successor.borrow_mut().take());
    // After a handover the pid file belongs to the new supervisor, which rewrites it once
    // it serves: reading it here and removing it if it still named us would race that
    // write and could remove the new supervisor's file.
    if let Some(path) = shared.config.pid_file.as_ref() {
        if !matches!(outcome, Outcome::Upgraded(_)) {
            super::upgrade::remove_pid_file(path);
        }
    }

    match outcome {
        Outcome::Graceful | Outcome::Upgraded(_) => {
            let upgraded_to = match outcome {
                Outcome::Upgraded(successor) => {
                    let pid = successor.pid;
                    successor.release();
                    Some(pid)
                }
                _ => None,
            };
            let drained = shared.drain_all();
            tokio::select! {
                () = drained => {}
                _ = sigint.recv() => { warn!(event = "stop_now", "second SIGINT: stopping now"); shared.stop_now().await; }
                _ = sigquit.recv() => { warn!(event = "stop_now", "SIGQUIT: stopping now"); shared.stop_now().await; }
                Some(Command::Stop { graceful: false }) = commands.recv() => { shared.stop_now().await; }
            }
            match upgraded_to {
                Some(pid) => info!(
                    upgrade.pid = pid,
                    event = "upgrade_complete",
                    "upgrade complete; this generation has stopped"
                ),
                None => info!(event = "stopped", "stopped"),
            }
            Ok(())
        }
        Outcome::Immediate => {
            shared.stop_now().await;
            info!(event = "stopped", "stopped");
            Ok(())
        }
        Outcome::Failed(err) => {
            error!(error = %err.chain(), event = "stopping", "stopping");
            shared.stop_now().await;
            Err(err)
        }
    }
}
