//! The main task: boots the pool (and, for the new generation of a binary upgrade, waits
//! for the handover), serves signals and handle commands until a stop, an upgrade or a
//! fatal error, and then stops the server the way that ended it.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use coreloop_ipc::{Channel, Message};
use sd_notify::NotifyState;
use tracing::{Instrument, debug, error, info, warn};

use super::boundary::LogBudget;
use super::handover::{hand_over, start_upgrade};
use super::health::{health_loop, watchdog_loop};
use super::replace::{scale_down, scale_up, start_reload};
use super::report::{metrics_loop, notify};
use super::restart::RestartPolicy;
use super::signals::Signals;
use super::spawn::{seed, spawn_worker};
use super::upgrade::Successor;
use super::{FD_RESERVE, KILL_MARGIN, Shared};
use crate::accept::shards::{self, Acceptors, Assignment};
use crate::config::Config;
use crate::dispatch::{Board, Pool, State, XorShift};
use crate::error::Error;
use crate::handle::{Command, Inbox};
use crate::handler::WorkerId;
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

/// What [`run`](super::run) prepared for the main task.
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

/// What the boot built for the rest of the main task.
struct Prepared {
    shared: Rc<Shared>,
    /// The main accept loop's listeners, registered with this runtime.
    listeners: Vec<Listener>,
    /// The other accept loops' sockets (see [`shards::assign`]); the first set is empty.
    sets: Assignment,
    /// Every listener's address once (siblings left out), for the log and the handles.
    labels: Vec<String>,
    local_addrs: Vec<crate::handler::LocalAddr>,
    /// Reserved (bound, not listening) sockets: open as long as the supervisor runs.
    reserved: Vec<listener::Bound>,
    /// What a binary upgrade hands over.
    handover: Rc<Vec<Handover>>,
    metrics_listener: Option<std::net::TcpListener>,
}

/// The tasks that run while the server serves.
struct Tasks {
    /// The accept loops; `None` once they returned the listeners for a handover.
    accept: Option<Acceptors>,
    health: tokio::task::JoinHandle<()>,
    metrics: Option<tokio::task::JoinHandle<()>>,
    watchdog: Option<tokio::task::JoinHandle<()>>,
    /// The binary upgrade in progress, if any.
    upgrade: Option<tokio::task::JoinHandle<()>>,
    /// Reserved (bound, not listening) sockets: open until the server has stopped.
    reserved: Vec<listener::Bound>,
}

/// The main task: boot, serve, stop.
pub(super) async fn supervise(boot: Boot<'_>, mut commands: Inbox) -> Result<(), Error> {
    let mut signals = Signals::new()?;
    let upgrade = boot.upgrade;
    let prepared = prepare(boot)?;
    let shared = Rc::clone(&prepared.shared);
    let stopped = tokio::select! {
        started = start(&shared, upgrade) => {
            started?;
            false
        }
        () = signals.stop() => true,
    };
    if stopped {
        shared.stop_now().await;
        return Ok(());
    }
    let handover = Rc::clone(&prepared.handover);
    let mut tasks = match serving(prepared, &commands, upgrade.is_some()) {
        Ok(tasks) => tasks,
        Err(err) => {
            shared.stop_now().await;
            return Err(err);
        }
    };
    let outcome = serve(&shared, &mut signals, &mut commands, &handover, &mut tasks).await;
    // The duplicates kept for a handover would keep the sockets open (and clients
    // queueing) after the listeners close.
    drop(handover);
    stop(&shared, outcome, tasks, &mut signals, &mut commands).await
}

/// Builds what the main task needs from what [`run`](super::run) prepared: the sockets
/// to hand over in a binary upgrade, the listeners, the pool and the shared state.
fn prepare(boot: Boot<'_>) -> Result<Prepared, Error> {
    let Boot {
        config,
        bound,
        metrics_listener,
        nofile,
        cpus,
        upgrade: _,
        exe,
    } = boot;
    let handover = Rc::new(handover_sockets(
        &bound,
        metrics_listener.as_ref(),
        config.metrics,
    )?);

    // Reserved (bound, not listening) sockets stay open as long as the supervisor runs.
    let (accepting, reserved): (Vec<_>, Vec<_>) = bound.into_iter().partition(|b| b.accepts);
    let shown = || {
        accepting
            .iter()
            .chain(&reserved)
            .filter(|b| b.name != crate::siblings::SIBLING)
    };
    let labels = shown().map(|b| b.label.clone()).collect();
    let local_addrs = crate::handle::local_addrs(shown());
    let mut sets = shards::assign(accepting, config.acceptor_count());
    let mut listeners = Vec::new();
    for bound in std::mem::take(&mut sets[0]) {
        let spec = bound.label.clone();
        let listener = Listener::new(bound).map_err(|source| Error::Bind { addr: spec, source })?;
        listeners.push(listener);
    }

    let cap = (config.max_connections as u64)
        .min(nofile.saturating_sub(FD_RESERVE))
        .max(1);
    let metrics = Rc::new(Metrics::new());
    let board = Arc::new(Board::new(
        cap,
        config.dispatch,
        metrics.dispatch_latency.clone(),
    ));
    let pool = Rc::new(Pool {
        workers: RefCell::new(Vec::new()),
        board,
        drain_grace: config.shutdown_timeout + KILL_MARGIN,
    });
    let shared = Rc::new(Shared {
        target: Cell::new(config.workers),
        policy: RefCell::new(RestartPolicy::new(config.restart_limits, seed())),
        log_budget: RefCell::new(LogBudget::new(Instant::now())),
        config,
        pool,
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

    Ok(Prepared {
        shared,
        listeners,
        sets,
        labels,
        local_addrs,
        reserved,
        handover,
        metrics_listener,
    })
}

/// What a binary upgrade hands over: a duplicate of every listening socket (the reuseport
/// reservations and the metrics socket included), in configuration order.
fn handover_sockets(
    bound: &[listener::Bound],
    metrics_listener: Option<&std::net::TcpListener>,
    metrics_addr: Option<std::net::SocketAddr>,
) -> Result<Vec<Handover>, Error> {
    let mut handover = Vec::with_capacity(bound.len() + 1);
    for b in bound {
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
    if let (Some(listener), Some(addr)) = (metrics_listener, metrics_addr) {
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
    Ok(handover)
}

/// Boots the pool: every worker ready (the first failure halts the server), and for the
/// new supervisor of a binary upgrade, the handover; then the pid file. On an error,
/// the caller stops the workers.
async fn start(shared: &Rc<Shared>, upgrade: Option<&Channel>) -> Result<(), Error> {
    let failed = |err: Error| async move {
        shared.stop_now().await;
        Err(err)
    };
    for slot in 0..shared.config.workers {
        if let Err(err) = spawn_worker(shared, WorkerId(slot)) {
            return failed(err).await;
        }
    }
    loop {
        let changed = shared.pool.board.changed.notified();
        if let Some(err) = shared.take_fatal() {
            drop(changed);
            return failed(err).await;
        }
        if shared.pool.count(|w| w.state() == State::Ready) == shared.config.workers {
            break;
        }
        changed.await;
    }
    if let Some(channel) = upgrade {
        if let Err(err) = take_over(shared, channel).await {
            return failed(err).await;
        }
    }
    // The pid file exists by the time the log says `serving`.
    if let Some(path) = &shared.config.pid_file {
        if let Err(err) = super::upgrade::write_pid_file(path) {
            if upgrade.is_none() {
                return failed(err).await;
            }
            error!(error = %err.chain(), "cannot write the pid file");
        }
    }
    shared.booted.set(true);
    shared.policy.borrow_mut().booted();
    Ok(())
}

/// The new supervisor of a binary upgrade, once every worker serves: tells the running
/// supervisor, and accepts nothing until it has stopped accepting and says so (or is
/// gone).
async fn take_over(shared: &Shared, channel: &Channel) -> Result<(), Error> {
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
        let changed = shared.pool.board.changed.notified();
        if let Some(err) = shared.take_fatal() {
            return Err(err);
        }
        tokio::select! {
            msg = channel.recv() => match msg {
                Ok(Some((Message::Takeover, _))) => break,
                Ok(Some((other, _))) => debug!(message = other.kind_name(), "unexpected message from the running supervisor"),
                Ok(None) | Err(_) => gone = true,
            },
            () = changed => {}
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
    Ok(())
}

/// The server serves: starts the accept loops, the health check, `/metrics` and the
/// watchdog, says `serving` (log, handles, systemd).
///
/// # Errors
///
/// When an accept loop's thread cannot be started.
fn serving(prepared: Prepared, commands: &Inbox, upgraded: bool) -> Result<Tasks, Error> {
    let Prepared {
        shared,
        listeners,
        sets,
        labels: addrs,
        local_addrs,
        reserved,
        metrics_listener,
        ..
    } = prepared;
    // Started now, so that their descriptors exist before the server says it is serving.
    let acceptors = start_acceptors(&shared, sets, Some(listeners))?;
    info!(workers = shared.config.workers, listeners = ?addrs, max_connections_per_worker = shared.pool.board.cap, upgraded, event = "serving", "serving");
    commands.serving(local_addrs);
    shared.notify_ready();
    let span = || shared.span.clone();
    let metrics = match metrics_listener.map(tokio::net::TcpListener::from_std) {
        Some(Ok(listener)) => Some(tokio::task::spawn_local(
            metrics_loop(Rc::clone(&shared), listener).instrument(span()),
        )),
        Some(Err(err)) => {
            warn!(error = %err, "cannot serve metrics");
            None
        }
        None => None,
    };
    Ok(Tasks {
        accept: Some(acceptors),
        health: tokio::task::spawn_local(health_loop(Rc::clone(&shared)).instrument(span())),
        metrics,
        watchdog: sd_notify::watchdog_enabled().map(|period| {
            tokio::task::spawn_local(watchdog_loop(Rc::clone(&shared), period).instrument(span()))
        }),
        upgrade: None,
        reserved,
    })
}

/// Starts the accept loops on `sets` (the first loop on `main` if registered already).
fn start_acceptors(
    shared: &Shared,
    sets: Assignment,
    main: Option<Vec<Listener>>,
) -> Result<Acceptors, Error> {
    let start = shards::Start {
        board: &shared.pool.board,
        metrics: &shared.metrics,
        span: &shared.span,
        seed: seed(),
    };
    Acceptors::start(start, sets, main)
}

/// Serves signals and handle commands until a stop, a completed upgrade or a fatal error.
async fn serve(
    shared: &Rc<Shared>,
    signals: &mut Signals,
    commands: &mut Inbox,
    handover: &Rc<Vec<Handover>>,
    tasks: &mut Tasks,
) -> Outcome {
    loop {
        let changed = shared.pool.board.changed.notified();
        if let Some(err) = shared.take_fatal() {
            return Outcome::Failed(err);
        }
        let successor = shared.successor.borrow_mut().take();
        if let Some(successor) = successor {
            match hand_over(shared, successor, tasks.accept.take()).await {
                Ok(successor) => return Outcome::Upgraded(Box::new(successor)),
                Err(sets) => match start_acceptors(shared, sets, None) {
                    Ok(acceptors) => {
                        tasks.accept = Some(acceptors);
                        continue;
                    }
                    Err(err) => return Outcome::Failed(err),
                },
            }
        }
        let command = tokio::select! {
            () = changed => continue,
            command = signals.command(commands) => command,
        };
        match command {
            Command::Stop { graceful: true } => return Outcome::Graceful,
            Command::Stop { graceful: false } => return Outcome::Immediate,
            Command::Reload => start_reload(shared),
            Command::AddWorker => scale_up(shared),
            Command::RemoveWorker => scale_down(shared).await,
            Command::Upgrade => {
                tasks.upgrade = start_upgrade(shared, handover, tasks.upgrade.take());
            }
        }
    }
}

/// Stops the server the way `outcome` says: the tasks first (accepting ends), then the
/// workers, drained within the shutdown timeout or killed at once.
async fn stop(
    shared: &Rc<Shared>,
    outcome: Outcome,
    tasks: Tasks,
    signals: &mut Signals,
    commands: &mut Inbox,
) -> Result<(), Error> {
    let upgraded = matches!(outcome, Outcome::Upgraded(_));
    let _reserved = stop_tasks(shared, tasks, upgraded).await;
    // After a handover the pid file belongs to the new supervisor, which rewrites it once
    // it serves: reading it here and removing it if it still named us would race that
    // write and could remove the new supervisor's file.
    if let Some(path) = shared.config.pid_file.as_ref() {
        if !upgraded {
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
            tokio::select! {
                () = shared.drain_all() => {}
                () = signals.stop_now(commands) => shared.stop_now().await,
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

/// Ends the tasks of a serving server; accepting ends with them. Returns the reserved
/// sockets, which stay open until the workers are gone.
async fn stop_tasks(shared: &Shared, tasks: Tasks, upgraded: bool) -> Vec<listener::Bound> {
    let Tasks {
        accept,
        health,
        metrics,
        watchdog,
        upgrade,
        reserved,
    } = tasks;
    // An upgrade still in progress ends with this server: dropping the task kills the
    // new supervisor, which never accepted anything.
    if let Some(task) = upgrade {
        if !task.is_finished() && !upgraded {
            info!(
                event = "upgrade_cancelled",
                "stopping: the upgrade in progress is cancelled and its new supervisor killed"
            );
        }
        task.abort();
        let _ = task.await;
    }
    // After a handover the new supervisor answers `/metrics` and `/healthz` on the same
    // socket; otherwise they go on answering (`/healthz`: not ready) during the drain.
    if let (Some(metrics), true) = (metrics, upgraded) {
        metrics.abort();
    }
    shared.pool.board.stop();
    if !upgraded {
        notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    shared.pool.board.changed.notify_waiters();
    health.abort();
    // Stop accepting: the accept loops own the listeners; stopping them closes them (and
    // removes unix socket files). After a handover they have already returned them.
    if let Some(accept) = accept {
        accept.stop().await;
    }
    // An upgrade that completed in the meantime is cancelled (the new supervisor killed).
    drop(shared.successor.borrow_mut().take());
    reserved
}
