//! The supervisor: owns the listeners, accepts, dispatches descriptors to workers, and
//! keeps the pool of worker processes alive.
//!
//! Everything runs on one `current_thread` runtime, so the pool state is a `RefCell`
//! that is never borrowed across an `.await`. The tasks are:
//!
//! - **accept**: waits until some worker is ready and some listener is readable, then
//!   accepts in bursts with raw `accept4` and hands each socket to [`Shared::dispatch`].
//!   Accept errors from exhausted resources (`EMFILE`, …) are logged once per episode and
//!   retried after a growing pause, never in a spin.
//! - **one watcher per worker**: reads the worker's channel (`Ready`, `Failed`,
//!   `Retiring`) and reaps the process (`tokio::process`, so no zombies); when a worker
//!   exits outside a shutdown, it schedules a replacement with backoff and checks the
//!   crash-loop limit.
//! - **the main task**: boots the pool, then waits for a stop signal or a fatal error and
//!   drains.
//!
//! Dispatch is round-robin over ready workers, using a non-blocking send: a worker whose
//! queue is full is skipped rather than waited on, and when every worker is full the
//! accept loop waits (the kernel's backlog holds new clients) until one has room.
//! The supervisor's copy of a descriptor is closed as soon as the send succeeds; a
//! connection is only ever dropped undelivered when the server is stopping.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use coreloop_ipc::{Channel, Message, PeerAddr, TrySendError};
use rustix::process::{Pid, Signal};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tracing::{Instrument, debug, error, info, warn};

use crate::builder::Config;
use crate::error::Error;
use crate::listener::{self, AcceptError, Listener};

/// Most connections accepted per readiness event before yielding to other tasks.
const ACCEPT_BURST: usize = 128;
/// First and longest pause after an accept error that signals exhaustion.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Restart backoff: the first restart of a worker that had been up for `STABLE_UPTIME`
/// is immediate; consecutive failures wait `RESTART_BACKOFF_MIN · 2ⁿ` (± 50 % jitter),
/// at most `RESTART_BACKOFF_MAX`.
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
const STABLE_UPTIME: Duration = Duration::from_secs(10);
/// Extra time the supervisor gives a draining worker beyond the shutdown timeout (the
/// worker enforces the timeout itself) before it sends SIGKILL.
const KILL_MARGIN: Duration = Duration::from_millis(500);

/// Entry point in the supervisor process.
pub(crate) fn run(config: Config) -> Result<(), Error> {
    if config.workers == 0 {
        return Err(Error::Config(
            "the number of workers must be at least 1".into(),
        ));
    }
    if config.listeners.is_empty() {
        return Err(Error::Config(
            "no listener: call bind() or bind_unix()".into(),
        ));
    }
    if config.listeners.len() > usize::from(u16::MAX) {
        return Err(Error::Config("too many listeners".into()));
    }
    raise_nofile_limit();
    let bound = listener::bind_all(&config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let local = tokio::task::LocalSet::new();
    let span = tracing::info_span!("supervisor", pid = std::process::id());
    let result = local.block_on(&runtime, supervise(config, bound).instrument(span));
    // Dropping the LocalSet drops every `Child` still held (kill_on_drop): on an error
    // path nothing is left running.
    drop(local);
    result
}

/// `RLIMIT_NOFILE` soft limit raised to the hard limit: every connection in flight costs
/// the supervisor a descriptor, and every live one costs a worker one.
fn raise_nofile_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => info!(from = ?limit.current, to = ?limit.maximum, "raised RLIMIT_NOFILE"),
            Err(err) => warn!(error = %err, "cannot raise RLIMIT_NOFILE"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Spawned; has not said `Ready`.
    Starting,
    /// Takes connections.
    Ready,
    /// Sent `Drain`, or its channel failed: takes nothing more.
    Draining,
}

struct Worker {
    pid: u32,
    channel: Rc<Channel>,
    state: State,
    started: Instant,
}

#[derive(Default)]
struct Slot {
    worker: Option<Worker>,
    /// Consecutive failed starts or short lives, for the restart backoff.
    failures: u32,
}

struct Shared {
    config: Config,
    slots: RefCell<Vec<Slot>>,
    /// Signalled on every change of any worker's state.
    changed: Notify,
    next_conn_id: Cell<u64>,
    next_worker: Cell<usize>,
    stopping: Cell<bool>,
    booted: Cell<bool>,
    /// A fatal condition (boot failure, crash loop) for the main task to act on.
    fatal: RefCell<Option<Error>>,
    restarts: RefCell<VecDeque<Instant>>,
    rng: Cell<u64>,
    /// The supervisor's span: parent of every watcher's span, whichever task spawns it.
    span: tracing::Span,
}

async fn supervise(config: Config, bound: Vec<listener::Bound>) -> Result<(), Error> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let mut sigquit = signal(SignalKind::quit()).map_err(Error::Signal)?;

    let mut listeners = Vec::with_capacity(bound.len());
    for bound in bound {
        let spec = bound.spec.to_string();
        let listener = Listener::new(bound).map_err(|source| Error::Bind { addr: spec, source })?;
        listeners.push(listener);
    }

    let shared = Rc::new(Shared {
        slots: RefCell::new((0..config.workers).map(|_| Slot::default()).collect()),
        config,
        changed: Notify::new(),
        next_conn_id: Cell::new(0),
        next_worker: Cell::new(0),
        stopping: Cell::new(false),
        booted: Cell::new(false),
        fatal: RefCell::new(None),
        restarts: RefCell::new(VecDeque::new()),
        rng: Cell::new(seed()),
        span: tracing::Span::current(),
    });

    for id in 0..shared.config.workers {
        if let Err(err) = spawn_worker(&shared, id) {
            shared.stop_now().await;
            return Err(err);
        }
    }
    // Boot: every worker ready, or the first failure.
    loop {
        let changed = shared.changed.notified();
        if let Some(err) = shared.take_fatal() {
            drop(changed);
            shared.stop_now().await;
            return Err(err);
        }
        let ready = shared.count(State::Ready);
        if ready == shared.config.workers {
            break;
        }
        tokio::select! {
            () = changed => {}
            _ = sigterm.recv() => { shared.stop_now().await; return Ok(()); }
            _ = sigint.recv() => { shared.stop_now().await; return Ok(()); }
            _ = sigquit.recv() => { shared.stop_now().await; return Ok(()); }
        }
    }
    shared.booted.set(true);
    let addrs: Vec<String> = listeners.iter().map(|l| l.bound.spec.to_string()).collect();
    info!(workers = shared.config.workers, listeners = ?addrs, "serving");

    let accept = tokio::task::spawn_local(accept_loop(Rc::clone(&shared), listeners));

    // Run until a stop signal or a fatal error.
    let outcome = loop {
        let changed = shared.changed.notified();
        if let Some(err) = shared.take_fatal() {
            break Err(err);
        }
        tokio::select! {
            () = changed => {}
            _ = sigterm.recv() => { info!(signal = "SIGTERM", "graceful shutdown"); break Ok(true); }
            _ = sigint.recv() => { info!(signal = "SIGINT", "graceful shutdown"); break Ok(true); }
            _ = sigquit.recv() => { info!(signal = "SIGQUIT", "immediate shutdown"); break Ok(false); }
        }
    };

    shared.stopping.set(true);
    shared.changed.notify_waiters();
    // Stop accepting: closing the listeners (and removing unix socket files).
    accept.abort();
    let _ = accept.await;

    match outcome {
        Ok(true) => {
            let drained = shared.drain();
            tokio::select! {
                () = drained => {}
                _ = sigint.recv() => { warn!("second SIGINT: stopping now"); shared.stop_now().await; }
                _ = sigquit.recv() => { warn!("SIGQUIT: stopping now"); shared.stop_now().await; }
            }
            info!("stopped");
            Ok(())
        }
        Ok(false) => {
            shared.stop_now().await;
            Ok(())
        }
        Err(err) => {
            error!(error = %err, "stopping");
            shared.stop_now().await;
            Err(err)
        }
    }
}

impl Shared {
    fn count(&self, state: State) -> usize {
        self.slots
            .borrow()
            .iter()
            .filter(|slot| slot.worker.as_ref().is_some_and(|w| w.state == state))
            .count()
    }

    fn live_workers(&self) -> usize {
        self.slots
            .borrow()
            .iter()
            .filter(|slot| slot.worker.is_some())
            .count()
    }

    fn set_state(&self, id: usize, state: State) {
        if let Some(worker) = self.slots.borrow_mut()[id].worker.as_mut() {
            worker.state = state;
        }
        self.changed.notify_waiters();
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
        // xorshift64*: jitter only, not security.
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Hands `fd` to a ready worker. Returns once a worker's queue took it, or when the
    /// server is stopping (then the connection is closed undelivered).
    async fn dispatch(&self, fd: OwnedFd, listener: u16, peer: PeerAddr) {
        let id = self.next_conn_id.get();
        self.next_conn_id.set(id + 1);
        let msg = Message::Conn { id, listener, peer };
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            if self.try_dispatch(&msg, &fd) {
                return;
            }
            if self.stopping.get() {
                debug!(conn.id = id, "stopping; closing undelivered connection");
                return;
            }
            // Every ready worker is full (or none is ready): wait for room or a change.
            std::future::poll_fn(|cx| {
                if changed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                let slots = self.slots.borrow();
                for slot in slots.iter() {
                    if let Some(worker) = slot.worker.as_ref().filter(|w| w.state == State::Ready) {
                        if worker.channel.poll_send_ready(cx).is_ready() {
                            return Poll::Ready(());
                        }
                    }
                }
                Poll::Pending
            })
            .await;
        }
    }

    /// One round-robin pass over the ready workers with non-blocking sends.
    fn try_dispatch(&self, msg: &Message, fd: &OwnedFd) -> bool {
        let n = self.config.workers;
        let start = self.next_worker.get();
        for k in 0..n {
            let idx = (start + k) % n;
            let channel = match self.slots.borrow()[idx].worker.as_ref() {
                Some(worker) if worker.state == State::Ready => Rc::clone(&worker.channel),
                _ => continue,
            };
            match channel.try_send(msg, Some(fd.as_fd())) {
                Ok(()) => {
                    self.next_worker.set(idx + 1);
                    return true;
                }
                Err(TrySendError::Full) => {}
                Err(TrySendError::Failed(err)) => {
                    warn!(worker.id = idx, error = %err, "cannot send to worker; skipping it");
                    self.set_state(idx, State::Draining);
                }
            }
        }
        false
    }

    /// Graceful drain: `Drain` to every worker, wait for all to exit, SIGKILL stragglers
    /// after the shutdown timeout.
    async fn drain(&self) {
        let timeout = self.config.shutdown_timeout;
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let channels: Vec<(usize, Rc<Channel>)> = self
            .slots
            .borrow()
            .iter()
            .enumerate()
            .filter_map(|(id, slot)| slot.worker.as_ref().map(|w| (id, Rc::clone(&w.channel))))
            .collect();
        let deadline = tokio::time::Instant::now() + timeout + KILL_MARGIN;
        for (id, channel) in channels {
            self.set_state(id, State::Draining);
            let drain = Message::Drain { timeout_ms };
            match tokio::time::timeout_at(deadline, channel.send(&drain, None)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => debug!(worker.id = id, error = %err, "cannot send Drain"),
                Err(_) => warn!(worker.id = id, "worker does not read its channel"),
            }
        }
        if tokio::time::timeout_at(deadline, self.all_exited())
            .await
            .is_err()
        {
            warn!(
                live = self.live_workers(),
                "shutdown timeout passed; killing remaining workers"
            );
            self.stop_now().await;
        }
    }

    async fn all_exited(&self) {
        loop {
            let changed = self.changed.notified();
            if self.live_workers() == 0 {
                return;
            }
            changed.await;
        }
    }

    /// SIGKILL every worker and wait until all are reaped.
    async fn stop_now(&self) {
        self.stopping.set(true);
        for slot in self.slots.borrow().iter() {
            if let Some(worker) = &slot.worker {
                // The watcher reaps only after removing the worker from its slot, so this
                // pid cannot have been reused.
                if let Some(pid) = Pid::from_raw(worker.pid as i32) {
                    let _ = rustix::process::kill_process(pid, Signal::KILL);
                }
            }
        }
        self.all_exited().await;
    }
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ u64::from(std::process::id()).rotate_left(32)) | 1
}

/// Starts the worker for slot `id` and its watcher task.
fn spawn_worker(shared: &Rc<Shared>, id: usize) -> Result<(), Error> {
    let spawn_err = |source| Error::SpawnWorker { id, source };
    let (ours, theirs) = coreloop_ipc::socketpair_cloexec().map_err(spawn_err)?;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "coreloop-worker".into());
    let mut command = tokio::process::Command::new("/proc/self/exe");
    command
        .arg0(arg0)
        .args(args)
        .env(crate::role::ENV_WORKER_ID, id.to_string())
        .stdin(Stdio::from(theirs))
        .kill_on_drop(true);
    let child = command.spawn().map_err(spawn_err)?;
    // `command` holds the worker's end until dropped; the worker must be its only owner
    // so that the supervisor sees EOF when the worker dies.
    drop(command);
    let pid = child.id().unwrap_or(0);
    let channel = Rc::new(Channel::from_fd(ours).map_err(spawn_err)?);
    shared.slots.borrow_mut()[id].worker = Some(Worker {
        pid,
        channel: Rc::clone(&channel),
        state: State::Starting,
        started: Instant::now(),
    });
    debug!(worker.id = id, worker.pid = pid, "worker spawned");
    let span = tracing::info_span!(parent: &shared.span, "watch", worker.id = id, worker.pid = pid);
    tokio::task::spawn_local(watch(Rc::clone(shared), id, pid, child, channel).instrument(span));
    Ok(())
}

/// Follows one worker from spawn to reaping, then decides on its replacement.
async fn watch(
    shared: Rc<Shared>,
    id: usize,
    pid: u32,
    mut child: tokio::process::Child,
    channel: Rc<Channel>,
) {
    let mut channel_open = true;
    let mut failure: Option<String> = None;
    let mut retired = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            received = channel.recv(), if channel_open => match received {
                Ok(Some((Message::Ready { .. }, _))) => {
                    info!(worker.id = id, worker.pid = pid, "worker ready");
                    shared.set_state(id, State::Ready);
                }
                Ok(Some((Message::Failed { reason }, _))) => {
                    error!(worker.id = id, worker.pid = pid, reason = %reason, "worker failed to start");
                    failure = Some(reason);
                }
                Ok(Some((Message::Retiring, _))) => {
                    info!(worker.id = id, worker.pid = pid, "worker asks to retire; draining it");
                    retired = true;
                    shared.set_state(id, State::Draining);
                    let timeout_ms = u32::try_from(shared.config.shutdown_timeout.as_millis()).unwrap_or(u32::MAX);
                    if let Err(err) = channel.send(&Message::Drain { timeout_ms }, None).await {
                        debug!(error = %err, "cannot send Drain");
                    }
                }
                Ok(Some((other, _))) => warn!(message = other.kind_name(), "unexpected message from worker"),
                Ok(None) => {
                    channel_open = false;
                    shared.set_state(id, State::Draining);
                }
                Err(err) => {
                    warn!(error = %err, "bad message from worker");
                    if matches!(err, coreloop_ipc::ChannelError::Io(_)) {
                        channel_open = false;
                        shared.set_state(id, State::Draining);
                    }
                }
            },
        }
    };
    let status = match status {
        Ok(status) => Some(status),
        Err(err) => {
            error!(error = %err, "cannot wait for worker");
            None
        }
    };
    let (started, was_ready) = {
        let mut slots = shared.slots.borrow_mut();
        let worker = slots[id].worker.take();
        (
            worker.as_ref().map_or_else(Instant::now, |w| w.started),
            worker.is_some_and(|w| w.state != State::Starting),
        )
    };
    shared.changed.notify_waiters();
    let described = describe(status);

    if shared.stopping.get() {
        debug!(status = %described, "worker exited");
        return;
    }
    if !shared.booted.get() {
        let reason = failure.unwrap_or_else(|| format!("exited ({described}) before it was ready"));
        shared.fail(Error::WorkerStart { id, reason });
        return;
    }
    let uptime = started.elapsed();
    let clean = retired && status.is_some_and(|s| s.success());
    if clean {
        info!(status = %described, "retired worker exited; replacing it");
    } else {
        warn!(status = %described, uptime_ms = uptime.as_millis() as u64, was_ready, "worker died; replacing it");
    }
    let delay = {
        let mut slots = shared.slots.borrow_mut();
        let slot = &mut slots[id];
        if clean || uptime >= STABLE_UPTIME {
            slot.failures = 0;
            Duration::ZERO
        } else {
            slot.failures = slot.failures.saturating_add(1);
            let exp = RESTART_BACKOFF_MIN.saturating_mul(1 << slot.failures.min(16));
            let capped = exp.min(RESTART_BACKOFF_MAX);
            capped.mul_f64(0.5 + shared.random_unit())
        }
    };
    if !clean {
        let now = Instant::now();
        let mut restarts = shared.restarts.borrow_mut();
        restarts.push_back(now);
        while restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > shared.config.restart_period)
        {
            restarts.pop_front();
        }
        if restarts.len() > shared.config.max_restarts {
            let count = restarts.len();
            drop(restarts);
            shared.fail(Error::CrashLoop {
                restarts: count,
                period: shared.config.restart_period,
            });
            return;
        }
    }
    if !delay.is_zero() {
        debug!(delay_ms = delay.as_millis() as u64, "restart backoff");
        tokio::time::sleep(delay).await;
    }
    if shared.stopping.get() {
        return;
    }
    if let Err(err) = spawn_worker(&shared, id) {
        error!(error = %err, "cannot start replacement worker");
        shared.fail(err);
    }
}

fn describe(status: Option<ExitStatus>) -> String {
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

/// Accepts from every listener while a worker is ready and hands the sockets out.
async fn accept_loop(shared: Rc<Shared>, listeners: Vec<Listener>) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut failing_since: Option<(Instant, u64)> = None;
    loop {
        // Accept only while some worker can take connections; otherwise leave clients in
        // the kernel's backlog.
        loop {
            let changed = shared.changed.notified();
            if shared.count(State::Ready) > 0 {
                break;
            }
            changed.await;
        }
        // Wait for any listener to be readable.
        let (index, mut guard) = std::future::poll_fn(|cx| {
            for (index, listener) in listeners.iter().enumerate() {
                if let Poll::Ready(result) = listener.ready.poll_read_ready(cx) {
                    return Poll::Ready(result.map(|guard| (index, guard)));
                }
            }
            Poll::Pending
        })
        .await
        .unwrap_or_else(|err| {
            // The reactor failed for this descriptor; nothing better to do than report.
            error!(error = %err, "listener readiness failed");
            std::process::abort()
        });
        let listener = &listeners[index];
        let mut exhausted = false;
        for _ in 0..ACCEPT_BURST {
            match listener::accept(&listener.ready) {
                Ok((fd, peer)) => {
                    if let Some((since, errors)) = failing_since.take() {
                        info!(
                            errors,
                            failing_ms = since.elapsed().as_millis() as u64,
                            "accepting again"
                        );
                    }
                    backoff = ACCEPT_BACKOFF_MIN;
                    // `index` < u16::MAX, checked in run().
                    shared.dispatch(fd, index as u16, peer).await;
                }
                Err(err) => match listener::classify(&err) {
                    AcceptError::WouldBlock => {
                        guard.clear_ready();
                        break;
                    }
                    AcceptError::Connection => {
                        debug!(error = %err, "accept: connection failed before it was taken")
                    }
                    AcceptError::Resource => {
                        match &mut failing_since {
                            Some((_, errors)) => *errors += 1,
                            None => {
                                error!(error = %err, listener = %listener.bound.spec, "accept failed; backing off until resources free up");
                                failing_since = Some((Instant::now(), 1));
                            }
                        }
                        exhausted = true;
                        break;
                    }
                },
            }
        }
        drop(guard);
        if exhausted {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
        } else {
            tokio::task::yield_now().await;
        }
    }
}
