//! The worker process: one `current_thread` runtime serving the connections its channel
//! delivers.
//!
//! Life of a worker:
//! 1. adopt the channel inherited on fd 0, before any runtime or thread exists;
//! 2. build a `current_thread` runtime and a `LocalSet`, run the setup (the handler
//!    factory, awaited), and tell the supervisor `Ready` (or `Failed` with the setup's
//!    error, then exit 1);
//! 3. for every `Conn` message, wrap the descriptor in a tokio stream and `spawn_local`
//!    the handler, counting live connections with an RAII guard;
//! 4. on `Drain` (or when the channel closes because the supervisor died, or when a
//!    SIGTERM/SIGINT reaches the worker directly and the supervisor answers `Retiring`
//!    with `Drain`), trigger the [`ShutdownSignal`], run the drain hooks the setup
//!    registered ([`Worker::on_drain`]), wait for them and for the live count to reach
//!    zero, or the deadline, and exit 0.
//!
//! A worker never decides on its own to stop taking connections while the supervisor is
//! alive: it asks (`Retiring`) and keeps reading until `Drain`, which the supervisor sends
//! last. That ordering is what lets the supervisor know no descriptor is left in flight.
//!
//! This module owns the process's life: placement, start-up and its failure report, and
//! reading the channel. The capabilities it drives live apart: the loop clock
//! ([`clock`]), starting connections ([`conn`]), counting them ([`tracker`]), the load
//! report ([`report`]), the worker's own accept in the `ReusePort` distribution
//! ([`accept`]), and the end ([`drain`](mod@drain)).

mod accept;
mod clock;
mod conn;
mod drain;
mod report;
mod tracker;

use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Duration;

use coreloop_ipc::{Channel, ChannelError, LoopClock, Message};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::error::Error;
use crate::handler::{Handler, WorkerId};
use crate::lifecycle::{DrainHooks, Factory, Worker};
use crate::shutdown::ShutdownSignal;
use conn::{Spawner, chain};
use drain::{End, drain};
use tracker::Tracker;

/// Entry point in a worker process. Never returns.
pub(crate) fn run<H: Handler>(config: Config, factory: Factory<H>, id: usize) -> Result<(), Error> {
    let channel = coreloop_ipc::inherited_channel().map_err(Error::WorkerChannel)?;
    let placement = place(&config, id);
    let clock = clock::install();
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    if let Some(clock) = clock {
        builder
            .on_thread_unpark(|| clock.woke())
            .on_thread_park(|| clock.sleeping());
    }
    let runtime = builder.build().map_err(Error::Runtime)?;
    let local = tokio::task::LocalSet::new();
    let id = WorkerId(id);
    // The loop has one thread and the process one worker, so the worker's span is entered
    // once, for the thread, rather than around each poll of each task: every task polled
    // here, a connection's handler included, logs inside it.
    let span = tracing::info_span!("worker", worker.id = id.0, worker.pid = std::process::id());
    let _in_worker = span.enter();
    let code = local.block_on(&runtime, async move {
        if let Err(reason) = placement {
            return fail_start(channel, reason).await;
        }
        serve(config, factory, id, channel, clock).await
    });
    // Dropping the LocalSet cancels the handlers still running after the deadline, which
    // closes their connections.
    drop(local);
    drop(runtime);
    std::process::exit(code)
}

/// Applies the configured placement before the runtime starts: CPU affinity, and a check
/// that a requested privilege drop took effect (the supervisor set the ids at spawn).
fn place(config: &Config, slot: usize) -> Result<(), String> {
    if let Some((uid, gid)) = config.worker_ids {
        let (now_uid, now_euid, now_gid) = (
            rustix::process::getuid().as_raw(),
            rustix::process::geteuid().as_raw(),
            rustix::process::getgid().as_raw(),
        );
        if now_uid != uid || now_euid != uid || now_gid != gid {
            return Err(format!(
                "asked to run as uid {uid} gid {gid}, but running as uid {now_uid} (effective {now_euid}) gid {now_gid}: refusing to serve"
            ));
        }
    }
    let cpus = std::env::var(crate::cpu::ENV_CPUS)
        .map(|text| crate::cpu::decode(&text))
        .unwrap_or_default();
    if config.pin_workers {
        if let Some(cpu) = crate::cpu::for_slot(&cpus, slot) {
            crate::cpu::set(&[cpu]).map_err(|err| format!("cannot pin to CPU {cpu}: {err}"))?;
        }
    } else if config.pin_supervisor.is_some() && !cpus.is_empty() {
        // Undo the affinity inherited from a pinned supervisor.
        crate::cpu::set(&cpus).map_err(|err| format!("cannot restore CPU affinity: {err}"))?;
    }
    Ok(())
}

/// Reports a start-up failure to the supervisor; returns the exit code.
async fn fail_start(channel: OwnedFd, reason: String) -> i32 {
    match Channel::from_fd(channel) {
        Ok(channel) => report_failure(&channel, reason).await,
        Err(err) => {
            error!(reason = %reason, error = %err, "worker cannot start and cannot report it");
            1
        }
    }
}

/// Logs why this worker cannot start, tells the supervisor (`Failed`, which at boot halts
/// the server with that reason) and returns the exit code.
async fn report_failure(channel: &Channel, reason: String) -> i32 {
    error!(reason = %reason, "worker cannot start");
    if let Err(err) = channel.send(&Message::Failed { reason }, &[]).await {
        debug!(error = %err, "cannot report the failure");
    }
    1
}

/// SIGTERM and SIGINT sent to the worker itself: either asks the supervisor to retire it.
struct StopSignals {
    term: Signal,
    int: Signal,
}

/// What a worker that started serves with.
struct Started<H> {
    channel: Channel,
    signals: StopSignals,
    shutdown: ShutdownSignal,
    hooks: Rc<DrainHooks>,
    handler: Rc<H>,
    /// Its own `SO_REUSEPORT` listeners (`ReusePort` distribution only).
    own_listeners: Vec<(u16, TcpListener)>,
}

/// Serves from `Ready` until the end: starts the load report and the worker's own accept,
/// reads the channel until `Drain` or the supervisor is gone, then drains. Returns the
/// exit code.
async fn serve<H: Handler>(
    config: Config,
    factory: Factory<H>,
    id: WorkerId,
    channel: OwnedFd,
    clock: Option<&'static LoopClock>,
) -> i32 {
    let Started {
        channel,
        signals,
        shutdown,
        hooks,
        handler,
        own_listeners,
    } = match start(&config, factory, id, channel, clock).await {
        Ok(started) => started,
        Err(code) => return code,
    };
    let tracker = Rc::new(Tracker::default());
    let channel = Rc::new(channel);
    tokio::task::spawn_local(report::report(
        Rc::clone(&channel),
        Rc::clone(&tracker),
        config.heartbeat_interval(),
    ));
    let spawner = Spawner::new(handler, Rc::clone(&tracker), shutdown.clone(), id);
    let acceptors = accept::spawn_acceptors(own_listeners, &spawner);
    let end = read_channel(&channel, &spawner, signals).await;
    drain(end, &config, &tracker, &hooks, &shutdown, &acceptors).await
}

/// Start-up: registers the channel, installs the stop signals, runs the setup, binds the
/// worker's own listeners and tells the supervisor it is ready. A failure is logged (and
/// reported as `Failed` once the channel works); its exit code is the error.
async fn start<H: Handler>(
    config: &Config,
    factory: Factory<H>,
    id: WorkerId,
    channel: OwnedFd,
    clock: Option<&'static LoopClock>,
) -> Result<Started<H>, i32> {
    let channel = Channel::from_fd(channel).map_err(|err| {
        error!(error = %err, "cannot register the channel");
        1
    })?;
    // Installed before the setup, so that a SIGTERM sent while it runs retires the worker
    // once it is ready instead of killing it.
    let signals = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => StopSignals { term, int },
        (Err(err), _) | (_, Err(err)) => {
            error!(error = %err, "cannot install signal handlers");
            return Err(1);
        }
    };
    let shutdown = ShutdownSignal::new();
    let hooks = Rc::new(DrainHooks::default());
    let handler = match factory(Worker::new(id, shutdown.clone(), Rc::clone(&hooks))).await {
        Ok(handler) => Rc::new(handler),
        Err(err) => return Err(report_failure(&channel, chain(&*err)).await),
    };
    let own_listeners = match accept::bind_own_listeners(config) {
        Ok(listeners) => listeners,
        Err(reason) => return Err(report_failure(&channel, reason).await),
    };
    announce(&channel, clock).await?;
    Ok(Started {
        channel,
        signals,
        shutdown,
        hooks,
        handler,
        own_listeners,
    })
}

/// Shares the loop clock, if there is one, then reports `Ready`. The clock must come
/// first: the supervisor accepts it only from a worker that is not ready yet.
async fn announce(channel: &Channel, clock: Option<&'static LoopClock>) -> Result<(), i32> {
    let pid = std::process::id();
    if let Some(clock) = clock {
        if let Err(err) = channel.send(&Message::LoopClock, &[clock.as_fd()]).await {
            error!(error = %err, "cannot send the loop clock");
            return Err(1);
        }
    }
    if let Err(err) = channel.send(&Message::Ready { pid }, &[]).await {
        error!(error = %err, "cannot report ready");
        return Err(1);
    }
    debug!("worker ready");
    Ok(())
}

/// Reads the channel until `Drain` or until the supervisor is gone, adopting the
/// connections it delivers; a stop signal asks the supervisor, once, to retire the worker.
async fn read_channel<H: Handler>(
    channel: &Channel,
    spawner: &Spawner<H>,
    mut signals: StopSignals,
) -> End {
    let mut retiring = false;
    let clock = clock::get();
    loop {
        tokio::select! {
            received = channel.recv() => {
                // Whatever it was, it left the queue: the supervisor sees that at once.
                if let Some(clock) = clock {
                    clock.read_up_to(channel.received_bytes());
                }
                if let Some(end) = take(received, spawner) {
                    return end;
                }
            }
            _ = signals.term.recv(), if !retiring => {
                retiring = true;
                retire(channel).await;
            }
            _ = signals.int.recv(), if !retiring => {
                retiring = true;
                retire(channel).await;
            }
        }
    }
}

/// Acts on what the channel delivered: adopts connections, or says how the worker ends.
fn take<H: Handler>(
    received: Result<Option<(Message, coreloop_ipc::Fds)>, ChannelError>,
    spawner: &Spawner<H>,
) -> Option<End> {
    match received {
        Ok(Some((Message::Conns(batch), fds))) => {
            for (meta, fd) in batch.as_slice().iter().zip(fds) {
                spawner.adopt(*meta, fd);
            }
        }
        Ok(Some((Message::Drain { timeout_ms }, _))) => {
            return Some(End::Drain(Duration::from_millis(u64::from(timeout_ms))));
        }
        Ok(Some((other, _))) => warn!(message = other.kind_name(), "unexpected message"),
        Ok(None) => return Some(End::Orphaned),
        Err(ChannelError::Io(err)) => {
            error!(error = %err, "channel failed");
            return Some(End::Orphaned);
        }
        Err(err) => error!(
            error = %err,
            "bad message from the supervisor; a connection may have been lost"
        ),
    }
    None
}

/// Asks the supervisor to drain this worker (`Retiring`); it answers with `Drain` once no
/// connection for this worker is left in flight.
async fn retire(channel: &Channel) {
    info!(
        event = "retire_requested",
        "stop signal received; asking the supervisor to drain this worker"
    );
    if let Err(err) = channel.send(&Message::Retiring, &[]).await {
        debug!(error = %err, "cannot send Retiring");
    }
}
