//! The supervisor: owns the listeners, accepts, dispatches descriptors to workers, and
//! keeps the pool of worker processes healthy.
//!
//! Everything runs on one `current_thread` runtime, so the pool is a `RefCell` that is
//! never borrowed across an `.await`. The tasks are:
//!
//! - **accept** ([`accept_loop`]): waits until some worker can take a connection and some
//!   listener is readable, then accepts in bursts with raw `accept4` and hands the sockets
//!   to [`Shared::dispatch_all`]. Under a high connection rate it stops waking per
//!   connection and polls the listeners on a timer instead, so that each wake-up forwards
//!   a batch; the interval grows while the CPUs are saturated ([`crate::pace`]). Accept
//!   errors from exhausted resources (`EMFILE`, …) are logged once per episode and
//!   retried after a growing pause, never in a spin.
//! - **one watcher per worker** ([`watch`]): reads the worker's channel (`Ready`, `Failed`,
//!   `Retiring`, `Status`) through the trust boundary ([`crate::boundary`]: a worker that
//!   breaks the protocol is killed), reaps the process (`tokio::process`: no zombies) after
//!   killing what it forked, takes back the connections a dead worker never read, and
//!   carries out the restart policy's decision ([`crate::restart`]).
//! - **the health check** ([`health_loop`]): stops dispatching to a worker whose reports
//!   are late, kills one whose event loop has been blocked past the heartbeat timeout, and
//!   starts recycling workers that have served their share or grown too large.
//! - **the main task** ([`supervise`]): boots the pool, then turns signals and
//!   [`ServerHandle`](crate::ServerHandle) commands into drains, reloads and scaling.
//!
//! # Nothing accepted is lost to a worker's death
//!
//! The supervisor keeps a duplicate of the worker's end of every channel. Descriptors
//! queued to a worker live in that socket's receive queue, which outlives the worker's
//! process as long as the supervisor holds the duplicate: when a worker dies, the
//! supervisor reads its queue out (`Channel::try_recv`) and dispatches those connections
//! to live workers. No acknowledgement per connection is needed, so this costs nothing on
//! the hot path.
//!
//! # Dispatch
//!
//! The [`Dispatch`](crate::Dispatch) policy over workers that are ready, not stalled, and
//! below their connection cap, preferring those that have read everything sent to them
//! (a worker whose event loop is busy in a handler does not read its channel; `FIONREAD`
//! on the supervisor's duplicate of its end tells), using a non-blocking send: a worker
//! whose queue is full is skipped rather than waited on. When no worker can take a connection the accept loop waits and the kernel's backlog
//! holds new clients. The supervisor's copy of a descriptor is closed once it is queued.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use coreloop_ipc::{Channel, ConnBatch, ConnMeta, MAX_BATCH, Message, Queue, TrySendError};
use rustix::process::{Pid, Signal};
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tracing::{Instrument, debug, error, info, warn};

use crate::boundary::{CLOSED_GRACE, LogBudget, Screen, Violation};
use crate::config::Config;
use crate::dispatch::{Busy, Candidate, Planner, XorShift};
use crate::error::Error;
use crate::exit::ExitReason;
use crate::handle::Command;
use crate::handler::WorkerId;
use crate::listener::{self, AcceptError, Handover, Listener};
use crate::metrics::{ListenerLabels, Metrics, Reply, RestartLabels, WorkerLabels};
use crate::pace::{self, Pace};
use crate::restart::{Death, Decision, GiveUp, RestartPolicy};
use crate::upgrade::Successor;
use prometheus_client::metrics::counter::Counter;

/// Most connections accepted per readiness event before yielding to other tasks.
const ACCEPT_BURST: usize = 128;
/// First and longest pause after an accept error that signals exhaustion.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Extra time the supervisor gives a draining worker beyond the shutdown timeout (the
/// worker enforces the timeout itself) before it sends SIGKILL.
const KILL_MARGIN: Duration = Duration::from_millis(500);
/// How long a worker may take to become ready: a replacement (reload, recycle) that takes
/// longer is given up, and any worker still starting after this is killed as a start
/// failure.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Descriptors a worker keeps free for its own use below `RLIMIT_NOFILE`.
const FD_RESERVE: u64 = 64;

/// Entry point in the supervisor process.
pub(crate) fn run(config: Config, commands: crate::handle::Inbox) -> Result<(), Error> {
    // The path this program was started from, read before anything can replace the file:
    // a binary upgrade runs whatever is at this path then.
    let exe = std::env::current_exe();
    // A new supervisor started by a binary upgrade: its socket files belong to the
    // running server until the handover.
    let predecessor = crate::upgrade::predecessor()?;
    if predecessor.is_some() {
        listener::own_socket_files(false);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let upgrade = match predecessor {
        Some(fd) => {
            let _entered = runtime.enter();
            Some(Channel::from_fd(fd).map_err(|err| Error::Upgrade(format!("channel: {err}")))?)
        }
        None => None,
    };
    let result = run_in(config, commands, &runtime, upgrade.as_ref(), exe);
    if let (Err(err), Some(channel)) = (&result, &upgrade) {
        // The running supervisor waits for Ready or Failed; tell it why, so that its log
        // says. (Ignored after the handover: nobody reads the channel any more.)
        let reason = err.chain().to_string();
        let msg = Message::Failed { reason };
        let _ = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), channel.send(&msg, &[])).await
        });
    }
    result
}

fn run_in(
    mut config: Config,
    commands: crate::handle::Inbox,
    runtime: &tokio::runtime::Runtime,
    upgrade: Option<&Channel>,
    exe: std::io::Result<std::path::PathBuf>,
) -> Result<(), Error> {
    if config.workers == 0 {
        return Err(Error::Config(
            "the number of workers must be at least 1".into(),
        ));
    }
    if config.listeners.len() > usize::from(u16::MAX) {
        return Err(Error::Config("too many listeners".into()));
    }
    let nofile = raise_nofile_limit();
    // The CPUs the server may use, read before the supervisor pins itself (workers
    // inherit the affinity of their parent, so they get this list instead). A new
    // supervisor of a binary upgrade inherited a pinned predecessor's affinity: it gets
    // the list the same way.
    let inherited = upgrade
        .and_then(|_| std::env::var(crate::cpu::ENV_CPUS).ok())
        .map(|text| crate::cpu::decode(&text))
        .filter(|cpus| !cpus.is_empty());
    let cpus = match inherited {
        Some(cpus) => {
            if let Err(err) = crate::cpu::set(&cpus) {
                warn!(error = %err, "cannot restore the CPU affinity of the previous supervisor");
            }
            cpus
        }
        None => crate::cpu::allowed().unwrap_or_default(),
    };
    if let Some(index) = config.pin_supervisor {
        match crate::cpu::for_slot(&cpus, index) {
            Some(cpu) => match crate::cpu::set(&[cpu]) {
                Ok(()) => info!(cpu, "supervisor pinned"),
                Err(err) => warn!(cpu, error = %err, "cannot pin the supervisor"),
            },
            None => warn!("cannot pin the supervisor: no CPU is allowed"),
        }
    }
    let mut adopted = match upgrade {
        Some(channel) => runtime.block_on(crate::upgrade::receive_listeners(channel))?,
        None => Vec::new(),
    };
    let bound = listener::bind_all(&mut config, &mut adopted)?;
    let metrics_listener = match config.metrics {
        Some(addr) => {
            let spec = format!("metrics:{addr}");
            let listener = match adopted.iter().position(|a| a.spec == spec) {
                Some(i) => Ok(std::net::TcpListener::from(adopted.swap_remove(i).fd)),
                None => std::net::TcpListener::bind(addr),
            };
            Some(
                listener
                    .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
                    .map_err(|source| Error::Bind {
                        addr: format!("metrics {addr}"),
                        source,
                    })?,
            )
        }
        None => None,
    };
    for unused in adopted {
        info!(listener = %unused.spec, "no longer configured; closing the socket handed over for it");
    }
    let local = tokio::task::LocalSet::new();
    let span = tracing::info_span!("supervisor", pid = std::process::id());
    let result = local.block_on(
        runtime,
        supervise(
            Boot {
                config,
                bound,
                metrics_listener,
                nofile,
                cpus: crate::cpu::encode(&cpus),
                upgrade,
                exe,
            },
            commands,
        )
        .instrument(span),
    );
    // Dropping the LocalSet drops every `Child` still held (kill_on_drop): on an error
    // path nothing is left running.
    drop(local);
    result
}

/// Raises the `RLIMIT_NOFILE` soft limit to the hard limit (workers inherit it) and
/// returns the limit in force.
fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                info!(from = ?limit.current, to = ?limit.maximum, "raised RLIMIT_NOFILE");
                return limit.maximum.unwrap_or(u64::MAX);
            }
            Err(err) => warn!(error = %err, "cannot raise RLIMIT_NOFILE"),
        }
    }
    limit.current.unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Spawned; has not said `Ready`.
    Starting,
    /// Takes connections.
    Ready,
    /// Sent `Drain` (or asked to retire, or its channel failed): takes nothing more.
    Draining,
}

struct Worker {
    slot: usize,
    pid: u32,
    channel: Rc<Channel>,
    /// Our duplicate of the worker's end: what it has not read yet.
    queue: Rc<Queue>,
    /// Whether it is reading its queue, as last looked at (see [`Worker::look`]).
    reading: Reading,
    /// When its event loop last woke up, shared with it (`LoopClock`, sent before `Ready`).
    clock: Option<coreloop_ipc::LoopClockView>,
    state: State,
    started: Instant,
    /// It said `Ready` (whatever its state is now).
    was_ready: bool,
    /// Connections handed to it, and the count it last reported finished.
    sent: u64,
    closed: u64,
    rss_kib: u64,
    last_report: Instant,
    /// Reports are late: no new connections until they resume.
    stalled: bool,
    /// A replacement is being started for it (reload or recycle).
    replacing: bool,
    /// Recycle once `sent` reaches this.
    recycle_at: Option<u64>,
    /// Once draining: when the supervisor kills it if it has not exited.
    kill_at: Option<Instant>,
    /// Connections it is serving, as it last reported.
    live: u32,
    /// Its slot's `forwarded` counter.
    forwarded: Counter,
    /// Why the supervisor is retiring or killing it; `None` until then, so an exit without
    /// a reason is a crash (or a start failure, before it was ready).
    exit_reason: Option<ExitReason>,
}

impl Worker {
    /// Connections handed to it that it has not reported closed.
    fn open(&self) -> u64 {
        self.sent.saturating_sub(self.closed)
    }

    /// How long something has waited in its queue while it read nothing at all: `None`
    /// when its queue is empty. One `FIONREAD`; an error (there is none for a socket) only
    /// loses the information.
    ///
    /// What it has read is what was sent less what is still queued, so a worker that reads
    /// slower than it is sent to, but reads, is not waiting: only one that has stopped
    /// reading (stopped, not scheduled, or in a handler that does not yield) is.
    fn look(&mut self, now: Instant) -> Option<Duration> {
        let unread = self.queue.unread_bytes().unwrap_or(0);
        self.reading.observe(now, self.channel.sent_bytes(), unread)
    }

    /// How busy its event loop looks (see [`classify`]), and for how long it has looked
    /// stuck.
    fn busy(&mut self, now: Instant) -> (Busy, Duration) {
        let (awake, in_poll) = self.clock.as_ref().map_or((None, None), |clock| {
            (clock.awake_for(), clock.poll_running_for())
        });
        classify(awake.unwrap_or_default(), in_poll, self.look(now))
    }

    fn can_take(&self, cap: u64) -> bool {
        self.state == State::Ready && !self.stalled && self.open() < cap
    }
}

/// What the supervisor last saw of a worker reading its queue (see [`Worker::look`]).
#[derive(Debug, Default)]
struct Reading {
    /// Bytes it had read then.
    read: u64,
    /// Since when what is queued has waited with nothing read; `None` while the queue was
    /// empty.
    waiting_since: Option<Instant>,
}

impl Reading {
    /// Takes a look at `now`, when `sent` bytes have been sent to the worker in all and
    /// `unread` of them are still queued. Returns how long the queue has waited with
    /// nothing read, or `None` if it is empty.
    fn observe(&mut self, now: Instant, sent: u64, unread: u64) -> Option<Duration> {
        if unread == 0 {
            self.read = sent;
            self.waiting_since = None;
            return None;
        }
        let read = sent.saturating_sub(unread);
        if read != self.read {
            self.read = read;
            self.waiting_since = Some(now);
        }
        let since = *self.waiting_since.get_or_insert(now);
        Some(now.saturating_duration_since(since))
    }
}

/// How busy a worker is, from how long its loop has been awake, how long the handler
/// poll now running has run, and how long its queue has waited unread (`None`: empty).
/// Also returns how long it has looked stuck, for ranking workers that all do.
///
/// Stuck: one handler poll, or a queue left unread, for [`STUCK`]: a handler that does
/// not yield, or a worker that is not running at all (stopped, or not scheduled). A loop
/// merely awake that long is not stuck: on a loaded machine a healthy worker is often
/// runnable without running for milliseconds, and must still rank above a stopped one.
/// Lagging: the same for [`LAGGING`]. Busy: a poll that has run longer than a short
/// request's, anything unread, or a loop awake a while.
fn classify(
    awake: Duration,
    in_poll: Option<Duration>,
    waiting: Option<Duration>,
) -> (Busy, Duration) {
    let stuck_for = in_poll.unwrap_or_default().max(waiting.unwrap_or_default());
    let busy = if stuck_for >= STUCK {
        Busy::Stuck
    } else if stuck_for >= LAGGING {
        Busy::Lagging
    } else if awake >= AWAKE_BUSY
        || in_poll.is_some_and(|poll| poll >= POLL_BUSY)
        || waiting.is_some()
    {
        Busy::Working
    } else {
        Busy::Idle
    };
    (busy, stuck_for)
}

/// An accepted connection waiting to be queued to a worker.
struct Pending {
    fd: OwnedFd,
    meta: ConnMeta,
    /// When it was accepted (or recovered), for the dispatch-latency histogram.
    since: Instant,
}

/// Buffers reused by every dispatch, so that dispatching allocates nothing once warm.
#[derive(Default)]
struct Scratch {
    candidates: Vec<Candidate>,
    channels: Vec<(Rc<Channel>, u32, usize)>,
    plan: Vec<Option<usize>>,
    sent: Vec<bool>,
    excluded: Vec<u32>,
}

/// A condition that ends the server with an error.
type Fatal = RefCell<Option<Error>>;

struct Shared {
    config: Config,
    workers: RefCell<Vec<Worker>>,
    /// Number of worker slots wanted (changed by scaling).
    target: Cell<usize>,
    /// When a worker that died is replaced, and when the server gives up.
    policy: RefCell<RestartPolicy>,
    /// What workers can make the supervisor log (see [`crate::boundary`]).
    log_budget: RefCell<LogBudget>,
    /// Per-worker connection cap: the configured one, kept below `RLIMIT_NOFILE`.
    cap: u64,
    /// Signalled on every change that may matter to a waiting task.
    changed: Notify,
    next_conn_id: Cell<u64>,
    planner: RefCell<Planner>,
    metrics: Metrics,
    /// Signalled when a worker passes its recycling threshold.
    recycle_due: Notify,
    stopping: Cell<bool>,
    booted: Cell<bool>,
    reloading: Cell<bool>,
    fatal: Fatal,
    rng: Cell<XorShift>,
    /// The supervisor's span: parent of every watcher's span, whichever task spawns it.
    span: tracing::Span,
    /// The CPUs the server may use (`CORELOOP_CPUS`), for the workers' placement.
    cpus: String,
    /// Cleared (and `stop_accepting` notified) to make the accept task return its
    /// listeners: a binary upgrade's handover.
    accepting: Cell<bool>,
    stop_accepting: Notify,
    /// The new supervisor of a binary upgrade once it serves, for the main task to hand
    /// over to.
    successor: RefCell<Option<Successor>>,
    /// The executable a binary upgrade starts, or why it is unknown.
    exe: Result<PathBuf, String>,
}

/// Why the main loop ended.
enum Outcome {
    Graceful,
    Immediate,
    Failed(Error),
    /// A binary upgrade: this supervisor handed over to a new one.
    Upgraded(Box<Successor>),
}

/// What [`run`] prepared for the main task.
struct Boot<'a> {
    config: Config,
    bound: Vec<listener::Bound>,
    metrics_listener: Option<std::net::TcpListener>,
    nofile: u64,
    cpus: String,
    /// The channel to the running supervisor, when this one was started by an upgrade.
    upgrade: Option<&'a Channel>,
    exe: std::io::Result<PathBuf>,
}

async fn supervise(boot: Boot<'_>, mut commands: crate::handle::Inbox) -> Result<(), Error> {
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
    let shared = Rc::new(Shared {
        target: Cell::new(config.workers),
        policy: RefCell::new(RestartPolicy::new(config.restart_limits, seed())),
        log_budget: RefCell::new(LogBudget::new(Instant::now())),
        config,
        workers: RefCell::new(Vec::new()),
        cap,
        changed: Notify::new(),
        next_conn_id: Cell::new(0),
        planner: RefCell::new(planner),
        metrics: Metrics::new(),
        recycle_due: Notify::new(),
        stopping: Cell::new(false),
        booted: Cell::new(false),
        reloading: Cell::new(false),
        fatal: RefCell::new(None),
        rng: Cell::new(XorShift::new(seed())),
        span: tracing::Span::current(),
        cpus,
        accepting: Cell::new(true),
        stop_accepting: Notify::new(),
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
        let changed = shared.changed.notified();
        if let Some(err) = shared.take_fatal() {
            drop(changed);
            shared.stop_now().await;
            return Err(err);
        }
        if shared.count(|w| w.state == State::Ready) == shared.config.workers {
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
            let changed = shared.changed.notified();
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
        if let Err(err) = crate::upgrade::write_pid_file(path) {
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
    let accept_task = accept_loop(Rc::clone(&shared), Source::registered(listeners));
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
        let changed = shared.changed.notified();
        if let Some(err) = shared.take_fatal() {
            break Outcome::Failed(err);
        }
        let successor = shared.successor.borrow_mut().take();
        if let Some(successor) = successor {
            match hand_over(&shared, successor, accept.take()).await {
                Ok(successor) => break Outcome::Upgraded(Box::new(successor)),
                Err(listeners) => {
                    let sources = Source::unregistered(listeners);
                    let task = tokio::task::spawn_local(accept_loop(Rc::clone(&shared), sources));
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
    shared.stopping.set(true);
    if !matches!(outcome, Outcome::Upgraded(_)) {
        notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    shared.changed.notify_waiters();
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
            crate::upgrade::remove_pid_file(path);
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

impl Shared {
    fn count(&self, pred: impl Fn(&Worker) -> bool) -> usize {
        self.workers.borrow().iter().filter(|w| pred(w)).count()
    }

    fn with_worker<R>(&self, pid: u32, f: impl FnOnce(&mut Worker) -> R) -> Option<R> {
        self.workers
            .borrow_mut()
            .iter_mut()
            .find(|w| w.pid == pid)
            .map(f)
    }

    /// Whether `slot` has a worker that is starting or serving (not draining).
    fn slot_covered(&self, slot: usize) -> bool {
        self.workers
            .borrow()
            .iter()
            .any(|w| w.slot == slot && w.state != State::Draining)
    }

    /// Marks a worker as draining (it gets no new connections) and arms its kill deadline:
    /// a draining worker that has not exited after the shutdown timeout is killed by the
    /// health check, whether it drains for a stop, a reload, a recycle or a scale-down.
    fn mark_draining(&self, pid: u32) -> Option<Rc<Channel>> {
        let kill_at = Instant::now() + self.config.shutdown_timeout + KILL_MARGIN;
        self.with_worker(pid, |w| {
            w.state = State::Draining;
            w.kill_at.get_or_insert(kill_at);
            Rc::clone(&w.channel)
        })
    }

    /// `READY=1` with the current `STATUS=`: after boot and after a reload.
    fn notify_ready(&self) {
        notify(&[NotifyState::Ready, NotifyState::Status(&self.status())]);
    }

    /// The `STATUS=` line for systemd.
    fn status(&self) -> String {
        let ready = self.count(|w| w.state == State::Ready);
        format!("serving: {ready} of {} workers ready", self.target.get())
    }

    fn set_exit_reason(&self, pid: u32, reason: ExitReason) {
        self.with_worker(pid, |w| {
            w.exit_reason.get_or_insert(reason);
        });
    }

    /// Brings the per-worker gauges up to date, then encodes the registry.
    fn scrape(&self) -> String {
        let now = Instant::now();
        let workers = self.workers.borrow();
        for w in workers.iter().filter(|w| w.state != State::Starting) {
            let labels = WorkerLabels {
                worker: w.slot as u32,
            };
            self.metrics
                .live
                .get_or_create(&labels)
                .set(i64::from(w.live));
            self.metrics
                .rss
                .get_or_create(&labels)
                .set(i64::try_from(w.rss_kib.saturating_mul(1024)).unwrap_or(i64::MAX));
            self.metrics
                .heartbeat_lag
                .get_or_create(&labels)
                .set(now.duration_since(w.last_report).as_secs_f64());
        }
        let ready = workers.iter().filter(|w| w.state == State::Ready).count();
        drop(workers);
        self.metrics.workers_ready.set(ready as i64);
        self.metrics.encode()
    }

    /// Whether a line a worker caused may be logged now (see [`LogBudget::admit`]).
    fn admit_log(&self) -> Option<u64> {
        self.log_budget.borrow_mut().admit(Instant::now())
    }

    fn take_fatal(&self) -> Option<Error> {
        self.fatal.borrow_mut().take()
    }

    fn fail(&self, err: Error) {
        let mut fatal = self.fatal.borrow_mut();
        if fatal.is_none() {
            *fatal = Some(err);
        }
        drop(fatal);
        self.changed.notify_waiters();
    }

    fn random_unit(&self) -> f64 {
        let mut rng = self.rng.get();
        let unit = rng.unit();
        self.rng.set(rng);
        unit
    }

    fn recycle_threshold(&self) -> Option<u64> {
        self.config.recycle_after.map(|(base, jitter)| {
            let extra = (self.random_unit() * (jitter as f64 + 1.0)) as u64;
            base + extra.min(jitter)
        })
    }

    /// Whether every worker that can take a connection has not yet read what it was sent:
    /// each is busy in a handler, and a connection sent now would wait behind it.
    ///
    /// A worker counts as busy once its queue has waited a poll interval with nothing
    /// read: one that simply has not been scheduled yet since the last send is not.
    ///
    /// Stops at the first worker that is not busy: the dispatch that follows looks at
    /// every worker anyway, so a `FIONREAD` here for the rest would be done twice.
    fn all_busy(&self) -> bool {
        let now = Instant::now();
        let mut workers = self.workers.borrow_mut();
        let mut takers = workers
            .iter_mut()
            .filter(|w| w.can_take(self.cap))
            .peekable();
        takers.peek().is_some()
            && takers.all(|w| w.look(now).is_some_and(|waited| waited >= pace::MIN))
    }

    fn timeout_ms(&self) -> u32 {
        u32::try_from(self.config.shutdown_timeout.as_millis()).unwrap_or(u32::MAX)
    }

    /// Hands every pending connection to a worker, in as few messages as the plan allows.
    /// Returns once all were queued, or when the server is stopping (then the rest are
    /// closed undelivered).
    async fn dispatch_all(&self, pending: &mut Vec<Pending>, scratch: &mut Scratch) {
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
    fn try_dispatch_all(&self, pending: &mut Vec<Pending>, scratch: &mut Scratch) {
        // A worker found full or broken is left out of the next pass, so each pass either
        // queues something or leaves nobody to try.
        let passes = self.workers.borrow().len() + 1;
        for _pass in 0..passes {
            if pending.is_empty() {
                return;
            }
            scratch.candidates.clear();
            scratch.channels.clear();
            let now = Instant::now();
            for w in self.workers.borrow_mut().iter_mut() {
                let room = if w.state == State::Ready
                    && !w.stalled
                    && !scratch.excluded.contains(&w.pid)
                {
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
            scratch.plan.clear();
            {
                let mut planner = self.planner.borrow_mut();
                for _ in 0..pending.len() {
                    scratch.plan.push(planner.pick(&mut scratch.candidates));
                }
            }
            if scratch.plan.iter().all(Option::is_none) {
                break;
            }
            scratch.sent.clear();
            scratch.sent.resize(pending.len(), false);
            for (w, (channel, pid, slot)) in scratch.channels.iter().enumerate() {
                let mut chosen = (0..pending.len())
                    .filter(|&i| scratch.plan[i] == Some(w))
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
                    match channel.try_send(&Message::Conns(batch), &fds[..k]) {
                        Ok(()) => {
                            let now = Instant::now();
                            for &i in &indices[..k] {
                                scratch.sent[i] = true;
                                let waited = now.duration_since(pending[i].since);
                                self.metrics.dispatch_latency.observe(waited.as_secs_f64());
                            }
                            let due = self
                                .with_worker(*pid, |w| {
                                    // Queued from now on, if its queue was empty.
                                    w.reading.waiting_since.get_or_insert(now);
                                    let before = w.sent;
                                    w.sent += k as u64;
                                    w.forwarded.inc_by(k as u64);
                                    w.recycle_at.is_some_and(|at| before < at && w.sent >= at)
                                })
                                .unwrap_or(false);
                            if due {
                                self.recycle_due.notify_one();
                            }
                        }
                        Err(TrySendError::Full) => {
                            scratch.excluded.push(*pid);
                            break;
                        }
                        Err(TrySendError::Failed(err)) => {
                            warn!(worker.id = slot, worker.pid = pid, error = %err, event = "worker_send_failed", "cannot send to worker; skipping it");
                            self.mark_draining(*pid);
                            self.changed.notify_waiters();
                            break;
                        }
                    }
                }
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

    /// Sends `Drain` to one worker; it takes nothing more and exits when done.
    async fn drain_worker(&self, pid: u32) {
        let Some(channel) = self.mark_draining(pid) else {
            return;
        };
        self.changed.notify_waiters();
        let drain = Message::Drain {
            timeout_ms: self.timeout_ms(),
        };
        let deadline = self.config.shutdown_timeout + KILL_MARGIN;
        match tokio::time::timeout(deadline, channel.send(&drain, &[])).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => debug!(worker.pid = pid, error = %err, "cannot send Drain"),
            Err(_) => warn!(worker.pid = pid, "worker does not read its channel"),
        }
    }

    /// Graceful stop: `Drain` to every worker, wait for all to exit, SIGKILL stragglers
    /// after the shutdown timeout.
    async fn drain_all(&self) {
        let deadline = tokio::time::Instant::now() + self.config.shutdown_timeout + KILL_MARGIN;
        let pids: Vec<u32> = self.workers.borrow().iter().map(|w| w.pid).collect();
        let drains = pids
            .into_iter()
            .map(|pid| async move { self.drain_worker(pid).await });
        let all = async {
            for drain in drains {
                // Sends are quick unless a worker's queue is full; bounded by the deadline.
                drain.await;
            }
            self.all_exited().await;
        };
        if tokio::time::timeout_at(deadline, all).await.is_err() {
            warn!(
                live = self.workers.borrow().len(),
                event = "shutdown_timeout",
                "shutdown timeout passed; killing remaining workers"
            );
            self.stop_now().await;
        }
    }

    async fn all_exited(&self) {
        loop {
            let changed = self.changed.notified();
            if self.workers.borrow().is_empty() {
                return;
            }
            changed.await;
        }
    }

    /// SIGKILL every worker and wait until all are reaped.
    async fn stop_now(&self) {
        self.stopping.set(true);
        for worker in self.workers.borrow().iter() {
            kill_worker(worker.pid);
        }
        self.all_exited().await;
    }
}

/// SIGKILL to a process the supervisor has not reaped yet (a watcher removes a worker from
/// the pool before it reaps it, and nobody else reaps our children, so the pid cannot
/// have been reused).
pub(crate) fn kill(pid: u32) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, Signal::KILL);
    }
}

/// SIGKILL to a worker the supervisor has not reaped yet, and to its process group: what
/// it forked goes with it. (Each worker leads its own group, whose id is its pid; while
/// the worker is not reaped, that id cannot name anything else. The worker itself is
/// signalled by pid too, in case it left its group.)
fn kill_worker(pid: u32) {
    kill(pid);
    kill_group(pid);
}

/// SIGKILL to the process group `pid` of a worker not reaped yet (see [`kill_worker`]).
fn kill_group(pid: u32) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    }
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ u64::from(std::process::id()).rotate_left(32)) | 1
}

/// Starts a worker for `slot` and its watcher task; returns its pid.
fn spawn_worker(shared: &Rc<Shared>, slot: usize) -> Result<u32, Error> {
    let spawn_err = |source| Error::SpawnWorker { id: slot, source };
    let (ours, theirs) = coreloop_ipc::socketpair_cloexec().map_err(spawn_err)?;
    // Our duplicate of the worker's end keeps its receive queue alive after the worker
    // dies, so that the connections it never read can be taken back.
    let queue = theirs.try_clone().map_err(spawn_err)?;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "coreloop-worker".into());
    let mut command = tokio::process::Command::new("/proc/self/exe");
    command
        .arg0(arg0)
        .args(args)
        .env(crate::role::ENV_WORKER_ID, slot.to_string())
        .env(crate::cpu::ENV_CPUS, &shared.cpus)
        .envs(crate::listener::worker_env(&shared.config))
        .stdin(Stdio::from(theirs))
        // Its own process group: a terminal's Ctrl-C (SIGINT to the foreground group)
        // reaches the supervisor alone, which then drains the workers in order, instead
        // of every worker also asking to retire at once.
        .process_group(0)
        // The service manager's variables are the supervisor's: a worker must not take
        // systemd's sockets, nor speak to its notify socket or watchdog.
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove(crate::upgrade::ENV_UPGRADE)
        .kill_on_drop(true);
    if let Some((uid, gid)) = shared.config.worker_ids {
        // std calls setgroups(0) (when we are root), setgid and setuid in the child
        // before exec; a failure there fails the spawn.
        command.uid(uid).gid(gid);
    }
    let child = command.spawn().map_err(spawn_err)?;
    // `command` holds the worker's end (as stdin) until dropped.
    drop(command);
    let pid = child.id().unwrap_or(0);
    let channel = Rc::new(Channel::from_fd(ours).map_err(spawn_err)?);
    let queue = Rc::new(Queue::new(queue));
    let recycle_at = shared.recycle_threshold();
    shared.workers.borrow_mut().push(Worker {
        slot,
        pid,
        channel: Rc::clone(&channel),
        queue: Rc::clone(&queue),
        reading: Reading::default(),
        clock: None,
        state: State::Starting,
        started: Instant::now(),
        was_ready: false,
        sent: 0,
        closed: 0,
        rss_kib: 0,
        live: 0,
        forwarded: shared.metrics.forwarded.get_or_create_owned(&WorkerLabels {
            worker: slot as u32,
        }),
        exit_reason: None,
        last_report: Instant::now(),
        stalled: false,
        replacing: false,
        recycle_at,
        kill_at: None,
    });
    shared.changed.notify_waiters();
    debug!(
        event = "worker_spawned",
        worker.id = slot,
        worker.pid = pid,
        "worker spawned"
    );
    let span =
        tracing::info_span!(parent: &shared.span, "watch", worker.id = slot, worker.pid = pid);
    tokio::task::spawn_local(
        watch(Rc::clone(shared), slot, pid, child, channel, queue).instrument(span),
    );
    Ok(pid)
}

/// Follows one worker from spawn to reaping, then carries out the restart policy's
/// decision about its slot.
async fn watch(
    shared: Rc<Shared>,
    slot: usize,
    pid: u32,
    child: tokio::process::Child,
    channel: Rc<Channel>,
    queue: Rc<Queue>,
) {
    let mut failure: Option<String> = None;
    let status = follow(&shared, slot, pid, child, &channel, &mut failure).await;
    // What the worker said just before it exited (a start failure) may still be queued.
    // Nothing else is read: a worker that was stopped for breaking the protocol is not
    // listened to any more.
    if failure.is_none()
        && shared.with_worker(pid, |w| w.exit_reason) != Some(Some(ExitReason::Violation))
    {
        while let Ok(Some((msg, _))) = channel.try_recv() {
            if let Message::Failed { reason } = msg {
                error!(event = "worker_start_failed", worker.id = slot, worker.pid = pid, reason = ?reason, "worker failed to start");
                failure = Some(reason);
                break;
            }
        }
    }
    let removed = {
        let mut workers = shared.workers.borrow_mut();
        let index = workers.iter().position(|w| w.pid == pid);
        index.map(|index| workers.remove(index))
    };
    shared.changed.notify_waiters();
    let Some(worker) = removed else { return };
    // What decides on the replacement; the rest (the queue's other reference among it) is
    // released now, so the dead worker's channel closes before its replacement starts.
    let (state, exit_reason, started, was_ready) = (
        worker.state,
        worker.exit_reason,
        worker.started,
        worker.was_ready,
    );
    drop(worker);
    recover(&shared, &queue);
    drop(queue);

    let described = describe(status);
    if shared.stopping.get() {
        debug!(event = "worker_exited", worker.id = slot, worker.pid = pid, status = %described, "worker exited");
        return;
    }
    let drained = state == State::Draining && status.is_some_and(|s| s.success());
    let reason = match exit_reason {
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
    shared
        .metrics
        .restarts
        .get_or_create(&RestartLabels {
            worker: slot as u32,
            reason: reason.label(),
        })
        .inc();
    let uptime_ms = started.elapsed().as_millis() as u64;
    if death == Death::Drained {
        info!(event = "worker_exited", worker.id = slot, worker.pid = pid, reason = reason.label(), status = %described, "worker exited after draining");
    } else if let Some(suppressed) = shared.admit_log() {
        if suppressed > 0 {
            warn!(
                event = "log_suppressed",
                suppressed, "lines about workers were suppressed: over the log budget"
            );
        }
        warn!(event = "worker_exited", worker.id = slot, worker.pid = pid, reason = reason.label(), status = %described, uptime_ms, failure = ?failure.as_deref().unwrap_or(""), "worker died");
    }
    let failure = failure.map(|reason| crate::boundary::printable(&reason));
    restart(&shared, slot, death, failure, described).await;
}

/// Reads one worker's channel until its process has exited (it is not reaped yet), then
/// kills what it forked and reaps it. Every message is checked at the trust boundary
/// ([`Screen`]); a worker that breaks the protocol is killed.
async fn follow(
    shared: &Rc<Shared>,
    slot: usize,
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

fn report_wait(status: std::io::Result<ExitStatus>) -> Option<ExitStatus> {
    match status {
        Ok(status) => Some(status),
        Err(err) => {
            error!(error = %err, "cannot wait for worker");
            None
        }
    }
}

/// Maps the loop clock a worker sent, if it is one the supervisor can trust.
fn take_clock(shared: &Shared, pid: u32, fds: coreloop_ipc::Fds) -> Result<(), Violation> {
    let fd = fds.into_iter().next().ok_or(Violation::WrongDescriptors)?;
    let clock = coreloop_ipc::LoopClockView::from_fd(fd).map_err(|err| {
        debug!(worker.pid = pid, error = %err, "unusable loop clock");
        Violation::BadLoopClock
    })?;
    shared.with_worker(pid, |w| w.clock = Some(clock));
    Ok(())
}

/// A worker broke the protocol: it gets no more connections, is killed, and will be
/// replaced like any worker that died. Said once, within the log budget.
fn broke_protocol(shared: &Shared, slot: usize, pid: u32, violation: Violation) {
    shared.with_worker(pid, |w| {
        w.exit_reason = Some(ExitReason::Violation);
        w.state = State::Draining;
    });
    if let Some(suppressed) = shared.admit_log() {
        if suppressed > 0 {
            warn!(
                event = "log_suppressed",
                suppressed, "lines about workers were suppressed: over the log budget"
            );
        }
        error!(
            event = "protocol_violation",
            worker.id = slot,
            worker.pid = pid,
            violation = violation.label(),
            detail = %violation,
            "worker broke the protocol; killing it"
        );
    }
    kill_worker(pid);
    shared.changed.notify_waiters();
}

/// Takes back what a dead worker never read and gives it to live workers.
fn recover(shared: &Rc<Shared>, queue: &Queue) {
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
        let mut scratch = Scratch::default();
        shared.dispatch_all(&mut recovered, &mut scratch).await;
    });
}

/// Carries out the restart policy's decision about `slot`, whose worker ended (`death`).
/// `failure`: what the worker said, and `status`, how it exited, for the error if the
/// server gives up.
async fn restart(
    shared: &Rc<Shared>,
    slot: usize,
    death: Death,
    failure: Option<String>,
    status: String,
) {
    let wanted = |shared: &Shared| {
        !shared.stopping.get() && slot < shared.target.get() && !shared.slot_covered(slot)
    };
    let id = WorkerId(slot);
    let mut decision = shared
        .policy
        .borrow_mut()
        .died(id, death, wanted(shared), Instant::now());
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
                if wanted(shared) {
                    if let Err(err) = spawn_worker(shared, slot) {
                        error!(error = %err.chain(), "cannot start replacement worker");
                        shared.fail(err);
                    }
                }
                return;
            }
            Decision::After { delay, why } => {
                info!(
                    event = "restart_scheduled",
                    worker.id = slot,
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

async fn on_message(
    shared: &Rc<Shared>,
    slot: usize,
    pid: u32,
    channel: &Channel,
    msg: Message,
    failure: &mut Option<String>,
) {
    match msg {
        Message::Ready { .. } => {
            info!(
                event = "worker_ready",
                worker.id = slot,
                worker.pid = pid,
                "worker ready"
            );
            shared.with_worker(pid, |w| {
                w.was_ready = true;
                if w.state == State::Starting {
                    w.state = State::Ready;
                    w.last_report = Instant::now();
                }
            });
            shared.policy.borrow_mut().ready(WorkerId(slot));
            shared.changed.notify_waiters();
        }
        Message::Status {
            live,
            closed,
            rss_kib,
        } => {
            let resumed = shared
                .with_worker(pid, |w| {
                    w.closed = closed;
                    w.rss_kib = rss_kib;
                    w.live = live;
                    w.last_report = Instant::now();
                    std::mem::replace(&mut w.stalled, false)
                })
                .unwrap_or(false);
            if resumed {
                info!(
                    event = "worker_resumed",
                    worker.id = slot,
                    worker.pid = pid,
                    live,
                    "worker reports again; dispatching to it"
                );
            }
            shared.changed.notify_waiters();
        }
        Message::Failed { reason } => {
            error!(event = "worker_start_failed", worker.id = slot, worker.pid = pid, reason = ?reason, "worker failed to start");
            *failure = Some(reason);
        }
        Message::Retiring => {
            info!(
                event = "worker_retiring",
                worker.id = slot,
                worker.pid = pid,
                "worker asks to retire; draining it"
            );
            let timeout_ms = shared.timeout_ms();
            shared.mark_draining(pid);
            shared.set_exit_reason(pid, ExitReason::Retire);
            shared.changed.notify_waiters();
            if let Err(err) = channel.send(&Message::Drain { timeout_ms }, &[]).await {
                debug!(error = %err, "cannot send Drain");
            }
            if !shared.stopping.get() && slot < shared.target.get() && !shared.slot_covered(slot) {
                if let Err(err) = spawn_worker(shared, slot) {
                    error!(error = %err.chain(), "cannot start replacement worker");
                }
            }
        }
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

/// Starts a replacement for the worker `old`, waits until it is ready, then drains `old`.
/// Returns whether the replacement became ready.
///
/// `reason` is the old worker's exit reason; `why`, what triggered the replacement, for
/// the log (`reload`, `connection count`, `rss`).
async fn replace(shared: &Rc<Shared>, old: u32, reason: ExitReason, why: &'static str) -> bool {
    let Some(slot) = shared.with_worker(old, |w| {
        w.replacing = true;
        w.slot
    }) else {
        return true;
    };
    let new = match spawn_worker(shared, slot) {
        Ok(pid) => pid,
        Err(err) => {
            error!(error = %err.chain(), event = "replacement_failed", "cannot start a replacement");
            shared.with_worker(old, |w| w.replacing = false);
            return false;
        }
    };
    let ready = tokio::time::timeout(READY_TIMEOUT, async {
        loop {
            let changed = shared.changed.notified();
            match shared.with_worker(new, |w| w.state) {
                Some(State::Ready) => return true,
                None | Some(State::Draining) => return false,
                Some(State::Starting) => {}
            }
            if shared.stopping.get() {
                return false;
            }
            changed.await;
        }
    })
    .await
    .unwrap_or(false);
    if !ready {
        error!(
            worker.id = slot,
            old.pid = old,
            new.pid = new,
            why,
            event = "replacement_failed",
            "replacement did not become ready; keeping the old worker"
        );
        if shared.with_worker(new, |w| w.state).is_some() {
            kill_worker(new);
        }
        shared.with_worker(old, |w| w.replacing = false);
        return false;
    }
    info!(
        worker.id = slot,
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

/// `RELOADING=1` for systemd (which wants the monotonic time with it), then `READY=1`
/// when done.
fn notify_reloading(status: &str) {
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        notify(&[NotifyState::Reloading, now, NotifyState::Status(status)]);
    }
}

/// SIGUSR2: binary upgrade. Starts the new generation in a task; when it serves, the task
/// leaves it in `shared.successor` for the main task to [`hand_over`] to. `running` is the
/// task of the previous upgrade, if any: while it runs (or its successor waits for the
/// handover) the request is refused. Returns the task of this upgrade, or `running` back.
fn start_upgrade(
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
            match crate::upgrade::start_successor(&exe, &handover, timeout, &shared.cpus).await {
                Ok(successor) => {
                    info!(upgrade.pid = successor.pid, event = "upgrade_successor_serving", "the new generation serves");
                    *shared.successor.borrow_mut() = Some(successor);
                    shared.changed.notify_waiters();
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
/// task returns the listeners once what it took is queued to workers), tells the new
/// supervisor to take over, and tells systemd which process is the main one now.
///
/// If the new supervisor is gone by then, returns the listeners to accept on again.
async fn hand_over(
    shared: &Rc<Shared>,
    successor: Successor,
    accept: Option<tokio::task::JoinHandle<Vec<listener::Bound>>>,
) -> Result<Successor, Vec<listener::Bound>> {
    shared.accepting.set(false);
    // Whether it waits for a listener or for a worker with room.
    shared.stop_accepting.notify_one();
    shared.changed.notify_waiters();
    // The accept task (there is one until a handover succeeds) does not panic; were it
    // gone, there would be nothing to resume.
    let listeners = match accept {
        Some(task) => task.await.unwrap_or_default(),
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
            tokio::task::spawn_local(successor.abandon(crate::upgrade::EXIT_GRACE));
            shared.accepting.set(true);
            shared.notify_ready();
            Err(listeners)
        }
    }
}

/// SIGHUP: rolling replacement of every worker, one at a time.
fn start_reload(shared: &Rc<Shared>) {
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
                .workers
                .borrow()
                .iter()
                .filter(|w| w.state != State::Draining && !w.replacing)
                .map(|w| w.pid)
                .collect();
            let mut replaced = 0usize;
            for pid in &old {
                if shared.stopping.get() {
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
fn scale_up(shared: &Rc<Shared>) {
    let slot = shared.target.get();
    shared.target.set(slot + 1);
    match spawn_worker(shared, slot) {
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
async fn scale_down(shared: &Rc<Shared>) {
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
        .workers
        .borrow()
        .iter()
        .filter(|w| w.slot == slot && w.state != State::Draining)
        .map(|w| w.pid)
        .collect();
    for pid in pids {
        shared.set_exit_reason(pid, ExitReason::ScaleDown);
        shared.drain_worker(pid).await;
    }
    info!(workers = slot, event = "scaled_down", "scaled down");
    notify(&[NotifyState::Status(&shared.status())]);
}

/// Serves `/metrics` and `/healthz`, one short connection at a time per task.
async fn metrics_loop(shared: Rc<Shared>, listener: tokio::net::TcpListener) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, event = "metrics_serving", "serving metrics on /metrics and readiness on /healthz");
    }
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                debug!(error = %err, "metrics accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF_MAX).await;
                continue;
            }
        };
        let shared = Rc::clone(&shared);
        tokio::task::spawn_local(async move {
            let reply = match crate::metrics::read_path(&mut stream).await.as_deref() {
                Some("/metrics") => Reply::Metrics(shared.scrape()),
                Some("/healthz") => Reply::Healthy(
                    !shared.stopping.get() && shared.count(|w| w.state == State::Ready) > 0,
                ),
                _ => Reply::NotFound,
            };
            crate::metrics::write_reply(&mut stream, reply).await;
        });
    }
}

/// Tells systemd (through `$NOTIFY_SOCKET`, when set) about a state change. Failures are
/// logged at debug level: the server works the same without a service manager.
fn notify(state: &[NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(state) {
        debug!(error = %err, "sd_notify failed");
    }
}

/// systemd's watchdog (`WatchdogSec=`): `WATCHDOG=1` every half period, but only while
/// every ready worker's event loop is reporting, so that systemd sees a hung pool, not
/// just a hung supervisor. A worker that is stalled past the heartbeat timeout is killed
/// and replaced; pings resume once every worker reports again.
async fn watchdog_loop(shared: Rc<Shared>, period: Duration) {
    let mut tick = tokio::time::interval(period / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withheld = false;
    loop {
        tick.tick().await;
        let stalled: Vec<(usize, u32)> = shared
            .workers
            .borrow()
            .iter()
            .filter(|w| w.state == State::Ready && w.stalled)
            .map(|w| (w.slot, w.pid))
            .collect();
        let ready = shared.count(|w| w.state == State::Ready);
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
async fn health_loop(shared: Rc<Shared>) {
    let interval = shared.config.heartbeat_interval();
    let stall_after = interval * 3;
    let mut tick = tokio::time::interval(interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // Dispatch found a worker past its recycling threshold: act now, not at the
            // next tick, so that it does not serve far beyond its share.
            () = shared.recycle_due.notified() => {}
        }
        let now = Instant::now();
        let mut to_kill = Vec::new();
        let mut to_recycle = Vec::new();
        let recycling = shared.count(|w| w.replacing);
        {
            let mut workers = shared.workers.borrow_mut();
            for w in workers.iter_mut() {
                if let Some(reason) = overdue(w, now) {
                    w.kill_at = None;
                    w.exit_reason = Some(reason);
                    to_kill.push((w.slot, w.pid, reason));
                }
            }
            for w in workers.iter_mut().filter(|w| w.state == State::Ready) {
                if let Some(reason) = hung(w, now, shared.config.heartbeat_timeout) {
                    w.state = State::Draining;
                    w.exit_reason = Some(reason);
                    to_kill.push((w.slot, w.pid, reason));
                    continue;
                }
                let silent = now.duration_since(w.last_report);
                if silent > stall_after && !w.stalled {
                    warn!(
                        event = "worker_stalled",
                        worker.id = w.slot,
                        worker.pid = w.pid,
                        silent_ms = silent.as_millis() as u64,
                        "worker reports are late; no new connections for it"
                    );
                    w.stalled = true;
                }
                if !w.replacing && w.slot < shared.target.get() {
                    let by_count = w.recycle_at.is_some_and(|at| w.sent >= at);
                    let by_rss = shared
                        .config
                        .recycle_rss_kib
                        .is_some_and(|max| w.rss_kib > max);
                    if by_count || by_rss {
                        to_recycle.push((w.pid, if by_count { "connection count" } else { "rss" }));
                    }
                }
            }
        }
        for (slot, pid, reason) in to_kill {
            let silent = shared
                .with_worker(pid, |w| now.duration_since(w.last_report))
                .unwrap_or_default();
            log_kill(slot, pid, reason, silent);
            kill_worker(pid);
        }
        shared.changed.notify_waiters();
        let room = shared
            .config
            .max_concurrent_recycles
            .saturating_sub(recycling);
        for (pid, why) in to_recycle.into_iter().take(room) {
            if shared.reloading.get() {
                break;
            }
            shared.with_worker(pid, |w| w.replacing = true);
            let shared = Rc::clone(&shared);
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
    }
}

/// Why a worker that is not serving must be killed now, if it must: draining past the
/// shutdown timeout, or starting for longer than [`READY_TIMEOUT`].
fn overdue(w: &Worker, now: Instant) -> Option<ExitReason> {
    if w.kill_at.is_some_and(|at| now >= at) {
        return Some(ExitReason::DrainTimeout);
    }
    (w.state == State::Starting && now.duration_since(w.started) > READY_TIMEOUT)
        .then_some(ExitReason::StartTimeout)
}

/// Why a ready worker must be killed as hung, if it must. Its reports alone are not
/// trusted (a thread of the worker could send them while its event loop is blocked), so
/// what the supervisor sees for itself counts too: one handler poll running, or its queue
/// left unread, for the heartbeat timeout.
fn hung(w: &mut Worker, now: Instant, timeout: Duration) -> Option<ExitReason> {
    let silent = now.duration_since(w.last_report);
    let in_poll = w.clock.as_ref().and_then(|clock| clock.poll_running_for());
    if silent > timeout || in_poll.is_some_and(|poll| poll > timeout) {
        return Some(ExitReason::Hang);
    }
    w.look(now)
        .is_some_and(|waited| waited > timeout)
        .then_some(ExitReason::NotReading)
}

/// The log line of a worker the health check kills.
fn log_kill(slot: usize, pid: u32, reason: ExitReason, silent: Duration) {
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
            worker.id = slot,
            worker.pid = pid,
            reason = reason.label(),
            "{message}"
        );
    } else {
        error!(
            event = "worker_killed",
            worker.id = slot,
            worker.pid = pid,
            reason = reason.label(),
            blocked_ms,
            "{message}"
        );
    }
}

/// A worker whose event loop has been awake this long without going back to sleep is
/// busy: connections go to others while any is free (see [`Shared::try_dispatch_all`]).
/// Short requests keep a loop awake for tens of microseconds.
const AWAKE_BUSY: Duration = Duration::from_micros(500);
/// A worker inside one handler poll, or with a queue left unread, for this long lags: it
/// gets nothing while another is merely busy. A burst of short requests takes less.
const LAGGING: Duration = Duration::from_millis(1);
/// A worker inside one handler poll, or with a queue left unread, for this long is stuck:
/// it gets nothing while a less busy worker has room (see [`classify`]).
const STUCK: Duration = Duration::from_millis(5);
/// A worker inside one handler poll that has run this long is busy: a connection sent now
/// would wait for a poll of unknown length. A short request's poll (read, parse, answer)
/// takes a few microseconds.
const POLL_BUSY: Duration = Duration::from_micros(100);
/// Longest the accept loop holds accepted connections while every worker is busy in a
/// handler (see [`accept_loop`]); after that they are queued to the least busy anyway.
const HOLD_MAX: Duration = Duration::from_millis(20);

/// Accept errors of one kind of exhaustion, handled once per episode.
struct AcceptState {
    backoff: Duration,
    /// An exhaustion episode: when it began, errors so far, the latest error.
    failing_since: Option<(Instant, u64, Instant)>,
    counters: Vec<(Counter, Counter)>,
}

impl AcceptState {
    /// Accepts from `listener` until the queue is empty, `ACCEPT_BURST` connections or an
    /// exhaustion error; returns how many were accepted, and whether resources ran out.
    fn burst(
        &mut self,
        shared: &Shared,
        index: usize,
        source: &Source,
        pending: &mut Vec<Pending>,
    ) -> (usize, bool) {
        let (accepted, accept_errors) = &self.counters[index];
        let mut count = 0;
        let listener = &source.bound;
        for _ in 0..ACCEPT_BURST {
            match listener::accept(&listener.fd) {
                Ok((fd, peer)) => {
                    // An exhaustion episode ends once accepts have succeeded for a while,
                    // not at the first success: under sustained pressure one error
                    // message (and a growing backoff) rather than one per burst.
                    let ended = self
                        .failing_since
                        .as_ref()
                        .is_some_and(|(_, _, last)| last.elapsed() >= ACCEPT_BACKOFF_MAX);
                    if ended {
                        if let Some((since, errors, _)) = self.failing_since.take() {
                            info!(
                                errors,
                                failing_ms = since.elapsed().as_millis() as u64,
                                "accepting again"
                            );
                        }
                        self.backoff = ACCEPT_BACKOFF_MIN;
                    }
                    let id = shared.next_conn_id.get();
                    shared.next_conn_id.set(id + 1);
                    let meta = ConnMeta {
                        id,
                        listener: listener.index,
                        peer,
                    };
                    accepted.inc();
                    count += 1;
                    pending.push(Pending {
                        fd,
                        meta,
                        since: Instant::now(),
                    });
                }
                Err(err) => match listener::classify(&err) {
                    AcceptError::WouldBlock => {
                        if let Some(ready) = &source.ready {
                            ready.clear_read_ready();
                        }
                        break;
                    }
                    AcceptError::Connection => {
                        debug!(error = %err, "accept: connection failed before it was taken")
                    }
                    AcceptError::Resource => {
                        accept_errors.inc();
                        match &mut self.failing_since {
                            Some((_, errors, last)) => {
                                *errors += 1;
                                *last = Instant::now();
                            }
                            None => {
                                error!(error = %err, listener = %listener.label, event = "accept_failed", "accept failed; backing off until resources free up");
                                self.failing_since = Some((Instant::now(), 1, Instant::now()));
                            }
                        }
                        return (count, true);
                    }
                },
            }
        }
        (count, false)
    }
}

/// Accepts from every listener while some worker can take a connection.
///
/// # Interrupt mitigation
///
/// At a low rate the loop wakes on listener readiness and forwards each connection at
/// once. When connections come faster than the supervisor wakes (a wake-up finds
/// several), waking for each one costs more than the connection itself: the supervisor
/// and then a worker are scheduled once per connection, on cores that the workers need.
/// The loop then takes the listeners out of the reactor (a registered listener wakes the
/// thread on every new connection, whether or not a task waits for it) and polls them once
/// per interval instead (a `timerfd`, since tokio's timers are too coarse), so that each
/// wake-up forwards a batch, one message per worker. Once polls have found at most one
/// connection per [`pace::MIN`] for 2 ms in a row ([`Pace::lull`]), the loop registers the
/// listeners again and returns to readiness: at such rates polling saves no wake-up and
/// only delays connections (and it starts again at [`pace::MIN`]). One sparse poll is not
/// enough: a saturated closed-loop load has such lulls many times a second. Polling
/// delays a connection by at most one interval: [`pace::MIN`] (250 µs) while CPUs are
/// available, up to [`pace::MAX`] (1 ms) while they are saturated, when fewer wake-ups
/// leave more CPU to the work ([`Pace`]).
///
/// Returns the listeners when `shared.accepting` is cleared (a binary upgrade's
/// handover), once every connection it accepted is queued to a worker.
fn accept_loop(
    shared: Rc<Shared>,
    sources: Vec<Source>,
) -> impl std::future::Future<Output = Vec<listener::Bound>> {
    let ticker = match coreloop_ipc::Ticker::new() {
        Ok(ticker) => Some(ticker),
        Err(err) => {
            warn!(error = %err, "cannot create a timerfd; accepting on readiness only");
            None
        }
    };
    accept_with(shared, sources, ticker)
}

/// The body of [`accept_loop`].
async fn accept_with(
    shared: Rc<Shared>,
    mut sources: Vec<Source>,
    ticker: Option<coreloop_ipc::Ticker>,
) -> Vec<listener::Bound> {
    let mut pending: Vec<Pending> = Vec::with_capacity(ACCEPT_BURST);
    let mut scratch = Scratch::default();
    let counters: Vec<(Counter, Counter)> = sources
        .iter()
        .map(|s| {
            let labels = ListenerLabels {
                listener: s.bound.label.clone(),
            };
            (
                shared.metrics.accepted.get_or_create_owned(&labels),
                shared.metrics.accept_errors.get_or_create_owned(&labels),
            )
        })
        .collect();
    let mut state = AcceptState {
        backoff: ACCEPT_BACKOFF_MIN,
        failing_since: None,
        counters,
    };
    let mut polling = false;
    let mut pace = Pace::new(shared.metrics.accept_poll_interval.clone());
    loop {
        if !shared.accepting.get() {
            // A handover: what was accepted (held, say) goes to this generation's
            // workers; clients not yet accepted are the next generation's.
            if !pending.is_empty() {
                shared.dispatch_all(&mut pending, &mut scratch).await;
            }
            return sources.into_iter().map(|source| source.bound).collect();
        }
        // Accept only while some worker can take connections; otherwise leave clients in
        // the kernel's backlog.
        loop {
            let changed = shared.changed.notified();
            if !shared.accepting.get() {
                break;
            }
            if shared.count(|w| w.can_take(shared.cap)) > 0 {
                break;
            }
            // The ticker would wake us for nothing meanwhile.
            if polling {
                if let Some(ticker) = &ticker {
                    stop_polling(ticker, &mut sources, &mut polling, &mut pace);
                }
            }
            changed.await;
        }
        let mut accepted = 0;
        let mut exhausted = false;
        match (&ticker, polling) {
            _ if !shared.accepting.get() => continue,
            (Some(ticker), true) => {
                let tick = tokio::select! {
                    tick = ticker.tick() => tick,
                    () = shared.stop_accepting.notified() => continue,
                };
                let periods = match tick {
                    Ok(periods) => periods,
                    Err(err) => {
                        warn!(error = %err, "timerfd failed; accepting on readiness");
                        pace.stop(Instant::now());
                        polling = false;
                        if !register(&mut sources) {
                            tokio::time::sleep(ACCEPT_BACKOFF_MAX).await;
                        }
                        continue;
                    }
                };
                for (index, source) in sources.iter().enumerate() {
                    if pending.len() >= ACCEPT_BURST {
                        break;
                    }
                    let (count, out) = state.burst(&shared, index, source, &mut pending);
                    accepted += count;
                    exhausted |= out;
                    if out {
                        break;
                    }
                }
                // Back to readiness when polling no longer gathers connections, unless
                // a listener cannot be registered: it would never be waited for, so keep
                // polling it.
                // Judged at the interval this poll waited, before the pace changes it.
                if polled_enough(&mut pace, pending.len(), accepted, periods) || exhausted {
                    stop_polling(ticker, &mut sources, &mut polling, &mut pace);
                }
                if polling {
                    if let Some(interval) = pace.on_tick(Instant::now()) {
                        debug!(
                            interval_us = interval.as_micros() as u64,
                            "accept polling interval"
                        );
                        if let Err(err) = ticker.start(interval) {
                            warn!(error = %err, "cannot restart the timerfd");
                        }
                    }
                }
            }
            _ => {
                if sources.iter().any(|s| s.ready.is_none()) && !register(&mut sources) {
                    // Out of descriptors: try again shortly rather than never wait for
                    // that listener.
                    tokio::time::sleep(ACCEPT_BACKOFF_MIN).await;
                }
                // Wait for any listener to be readable, or to be told to stop.
                let mut stop = pin!(shared.stop_accepting.notified());
                let ready = std::future::poll_fn(|cx| {
                    if stop.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    for (index, source) in sources.iter().enumerate() {
                        let Some(ready) = &source.ready else { continue };
                        if let Poll::Ready(result) = ready.poll_read_ready(cx) {
                            return Poll::Ready(Some(result.map(|()| index)));
                        }
                    }
                    Poll::Pending
                })
                .await;
                let index = match ready {
                    None => continue,
                    Some(Ok(ready)) => ready,
                    Some(Err(err)) => {
                        error!(error = %err, "listener readiness failed; backing off");
                        tokio::time::sleep(ACCEPT_BACKOFF_MAX).await;
                        continue;
                    }
                };
                (accepted, exhausted) = state.burst(&shared, index, &sources[index], &mut pending);
                // Several connections queued while this wake-up was on its way: they come
                // faster than the supervisor can usefully wake for each.
                if let Some(ticker) = &ticker {
                    if !exhausted && accepted > 1 {
                        start_polling(ticker, &mut sources, &mut polling, &mut pace);
                    }
                }
            }
        }
        // Every worker busy in a handler: hold the connections (and leave new ones in the
        // kernel's queue) for the first worker that gets back to its channel, checked at
        // every tick, rather than queue them behind a handler of unknown length. One
        // shared queue instead of one per worker: a short request is not stuck behind a
        // long one while another worker is free. Bounded by HOLD_MAX.
        let hold = !exhausted
            && !pending.is_empty()
            && pending[0].since.elapsed() < HOLD_MAX
            && shared.all_busy();
        let hold = hold
            && match &ticker {
                Some(ticker) if !polling => {
                    start_polling(ticker, &mut sources, &mut polling, &mut pace)
                }
                Some(_) => true,
                None => false,
            };
        if !pending.is_empty() && !hold {
            shared.dispatch_all(&mut pending, &mut scratch).await;
        }
        if exhausted {
            tokio::time::sleep(state.backoff).await;
            state.backoff = (state.backoff * 2).min(ACCEPT_BACKOFF_MAX);
        } else if !polling {
            tokio::task::yield_now().await;
        }
    }
}

/// Whether a poll that found `accepted` connections over `periods` intervals says polling
/// no longer pays ([`Pace::lull`]: sparse polls for a while), `pending` being every
/// connection not yet queued to a worker, this poll's included. Connections held from
/// earlier polls (every worker busy) keep it polling: the hold is checked at every tick.
fn polled_enough(pace: &mut Pace, pending: usize, accepted: usize, periods: u64) -> bool {
    let held = pending.saturating_sub(accepted);
    if held > 0 {
        pace.busy();
        return false;
    }
    pace.lull(accepted, periods)
}

/// Enters polling mode at the pace's interval: starts the ticker and takes the listeners
/// out of the reactor (registered, they would wake the thread for every connection).
/// Returns whether it did; without the ticker the loop stays on readiness.
fn start_polling(
    ticker: &coreloop_ipc::Ticker,
    sources: &mut [Source],
    polling: &mut bool,
    pace: &mut Pace,
) -> bool {
    if let Err(err) = ticker.start(pace.start(Instant::now())) {
        warn!(error = %err, "cannot start the timerfd");
        return false;
    }
    *polling = true;
    for source in sources {
        source.ready = None;
    }
    true
}

/// Leaves polling mode: registers the listeners again and stops the ticker. Keeps polling
/// if a listener cannot be registered, since it would never be waited for.
fn stop_polling(
    ticker: &coreloop_ipc::Ticker,
    sources: &mut [Source],
    polling: &mut bool,
    pace: &mut Pace,
) {
    if !register(sources) {
        return;
    }
    *polling = false;
    pace.stop(Instant::now());
    if let Err(err) = ticker.stop() {
        warn!(error = %err, "cannot stop the timerfd");
    }
}

/// A listener as the accept loop holds it: registered with the reactor only while the
/// loop waits for readiness (see [`accept_loop`]).
struct Source {
    bound: listener::Bound,
    ready: Option<coreloop_ipc::Readiness>,
}

impl Source {
    fn registered(listeners: Vec<Listener>) -> Vec<Source> {
        listeners
            .into_iter()
            .map(|Listener { bound, ready }| Source {
                bound,
                ready: Some(ready),
            })
            .collect()
    }

    /// Sockets given back by a handover that did not happen: the accept loop registers
    /// them before it waits.
    fn unregistered(bound: Vec<listener::Bound>) -> Vec<Source> {
        bound
            .into_iter()
            .map(|bound| Source { bound, ready: None })
            .collect()
    }
}

/// Registers every listener that is not registered with the reactor; `false` if one could
/// not be (out of descriptors): the caller keeps polling it and tries again later.
fn register(sources: &mut [Source]) -> bool {
    let mut all = true;
    for source in sources.iter_mut().filter(|s| s.ready.is_none()) {
        match source
            .bound
            .fd
            .try_clone()
            .and_then(|fd| coreloop_ipc::Readiness::new(fd, tokio::io::Interest::READABLE))
        {
            Ok(ready) => source.ready = Some(ready),
            Err(err) => {
                warn!(listener = %source.bound.label, error = %err, "cannot register listener");
                all = false;
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    fn busy(awake: Duration, in_poll: Option<Duration>, waiting: Option<Duration>) -> Busy {
        classify(awake, in_poll, waiting).0
    }

    #[test]
    fn a_long_handler_poll_is_busy_before_the_loop_has_been_awake_long() {
        // 150 µs into a handler that does not yield: the loop has not been awake long
        // enough to look busy, but the poll has run far longer than a short request's.
        assert_eq!(busy(150 * US, Some(150 * US), None), Busy::Working);
        assert_eq!(busy(150 * US, Some(POLL_BUSY), None), Busy::Working);
        // The same loop between polls, or in a short one, takes connections.
        assert_eq!(busy(150 * US, None, None), Busy::Idle);
        assert_eq!(busy(150 * US, Some(20 * US), None), Busy::Idle);
        // One poll that long is stuck, and stuck for as long as it has run.
        assert_eq!(classify(STUCK, Some(STUCK), None), (Busy::Stuck, STUCK));
    }

    #[test]
    fn a_worker_preempted_for_long_ranks_above_one_that_reads_nothing() {
        // A stopped worker: asleep as far as its clock knows, its queue unread for 40 ms.
        let (stopped, stopped_for) = classify(Duration::ZERO, None, Some(40_000 * US));
        assert_eq!(stopped, Busy::Stuck);
        // A healthy one, runnable but not scheduled for 8 ms in the middle of a short poll.
        let preempted = classify(8_000 * US, Some(8_000 * US), None);
        assert!(
            preempted < (stopped, stopped_for),
            "{preempted:?} vs {stopped:?}"
        );
        // Awake that long between polls, with nothing waiting, is only busy.
        assert_eq!(busy(8_000 * US, None, None), Busy::Working);
    }

    #[test]
    fn a_queue_unread_for_a_millisecond_lags_behind_one_being_read() {
        // Both have something unread; one has read nothing for 3 ms (stopped a moment
        // ago, or in a long handler), the other is reading.
        let waiting = busy(Duration::ZERO, None, Some(3_000 * US));
        let reading = busy(200 * US, None, Some(Duration::ZERO));
        assert_eq!((reading, waiting), (Busy::Working, Busy::Lagging));
        assert_eq!(busy(Duration::ZERO, Some(LAGGING), None), Busy::Lagging);
        assert_eq!(
            busy(Duration::ZERO, None, Some(LAGGING - US)),
            Busy::Working
        );
    }

    #[test]
    fn the_loop_clock_and_the_queue_rank_the_rest() {
        assert_eq!(busy(AWAKE_BUSY, None, None), Busy::Working);
        assert_eq!(
            busy(Duration::ZERO, None, Some(Duration::ZERO)),
            Busy::Working
        );
        assert_eq!(busy(Duration::ZERO, None, None), Busy::Idle);
        assert_eq!(
            classify(Duration::ZERO, Some(US), Some(STUCK)),
            (Busy::Stuck, STUCK)
        );
    }

    #[test]
    fn sparse_polls_stop_polling_unless_earlier_connections_are_held() {
        let mut pace = Pace::new(prometheus_client::metrics::gauge::Gauge::default());
        // One connection per 250 µs poll, and it is all that is pending (its connection is
        // pending until the dispatch that follows): after a lull of 8 such polls, back to
        // readiness.
        for _ in 0..7 {
            assert!(!polled_enough(&mut pace, 1, 1, 1));
        }
        assert!(polled_enough(&mut pace, 1, 1, 1));
        pace.stop(Instant::now());
        pace.start(Instant::now());
        // Two in one poll pay for polling.
        assert!(!polled_enough(&mut pace, 2, 2, 1));
        // Connections held from earlier polls keep the ticker, whatever this one found.
        assert!(!polled_enough(&mut pace, 3, 1, 8));
        assert!(!polled_enough(&mut pace, 2, 0, 8));
        assert!(polled_enough(&mut pace, 0, 0, 8), "2 ms in one late poll");
    }

    #[test]
    fn a_queue_waits_only_while_nothing_in_it_is_read() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut reading = Reading::default();
        // Empty: nothing waits.
        assert_eq!(reading.observe(t0, 0, 0), None);
        // 300 bytes sent and none read: waiting since first seen.
        assert_eq!(reading.observe(ms(1), 300, 300), Some(Duration::ZERO));
        assert_eq!(
            reading.observe(ms(7), 300, 300),
            Some(Duration::from_millis(6))
        );
        // 100 read, 200 more sent: reading, so the wait starts again.
        assert_eq!(reading.observe(ms(8), 500, 400), Some(Duration::ZERO));
        assert_eq!(
            reading.observe(ms(9), 500, 400),
            Some(Duration::from_millis(1))
        );
        // A steady reader that never empties its queue never waits long.
        for n in 0..20 {
            let sent = 600 + 100 * n;
            let waited = reading.observe(ms(10 + n), sent, 300);
            assert_eq!(waited, Some(Duration::ZERO), "look {n}");
        }
        // Everything read: nothing waits, and the next send starts a new wait.
        assert_eq!(reading.observe(ms(40), 2_500, 0), None);
        assert_eq!(reading.observe(ms(41), 2_600, 100), Some(Duration::ZERO));
    }
}
