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

use std::cell::Cell;
use std::os::fd::OwnedFd;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use coreloop_ipc::{Channel, ChannelError, ConnMeta, Message, PeerAddr};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tracing::{Instrument, debug, error, info, warn};

use crate::config::{Config, ListenSpec};
use crate::dispatch::Distribution;
use crate::error::{BoxError, Error};
use crate::handler::{Conn, Handler, Stream, WorkerId};
use crate::lifecycle::Factory;
use crate::lifecycle::{DrainHooks, Worker};
use crate::shutdown::ShutdownSignal;

/// This worker's loop clock: one per process, set before the runtime starts. Static so
/// that every handler poll can reach it without a reference count.
static CLOCK: std::sync::OnceLock<coreloop_ipc::LoopClock> = std::sync::OnceLock::new();

/// How long a worker whose supervisor vanished keeps serving in-flight requests. Nobody
/// supervises it any more, so it must not linger: a supervisor killed with SIGKILL leaves
/// no worker behind for longer than this.
const ORPHAN_GRACE: Duration = Duration::from_secs(1);

/// Entry point in a worker process. Never returns.
pub(crate) fn run<H: Handler>(config: Config, factory: Factory<H>, id: usize) -> Result<(), Error> {
    let channel = coreloop_ipc::inherited_channel().map_err(Error::WorkerChannel)?;
    let placement = place(&config, id);
    // When the event loop last woke up and when the running handler poll started, shared
    // with the supervisor so that it sends nothing new to a loop stuck in a handler (see
    // `coreloop_ipc::LoopClock`). Without it the worker still works; the supervisor then
    // judges by the channel alone.
    let clock = match coreloop_ipc::LoopClock::create() {
        Ok(clock) => Some(CLOCK.get_or_init(|| clock)),
        Err(err) => {
            warn!(error = %err, "cannot create the loop clock");
            None
        }
    };
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

/// After a connection closes, how long the worker waits for more closes before it reports
/// its load: one report per burst of closes rather than one per connection. Under a
/// steady stream of short connections this is the report rate, and every report wakes the
/// supervisor; 10 ms keeps that to 100 per second per worker. The supervisor learns that a
/// worker is busy from its unread queue at once, so the count of closes can lag this much.
const REPORT_COALESCE: Duration = Duration::from_millis(10);

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

/// Live connections of this worker, and a way to wait until there are none.
#[derive(Default)]
struct Tracker {
    live: Cell<usize>,
    closed: Cell<u64>,
    idle: Notify,
    /// Signalled when a connection closes, for the load report.
    closing: Notify,
}

struct TrackerGuard(Rc<Tracker>);

impl Tracker {
    fn enter(self: &Rc<Self>) -> TrackerGuard {
        self.live.set(self.live.get() + 1);
        TrackerGuard(Rc::clone(self))
    }

    async fn wait_idle(&self) {
        while self.live.get() > 0 {
            self.idle.notified().await;
        }
    }
}

impl Drop for TrackerGuard {
    fn drop(&mut self) {
        let live = self.0.live.get() - 1;
        self.0.live.set(live);
        self.0.closed.set(self.0.closed.get() + 1);
        self.0.closing.notify_one();
        if live == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

enum End {
    Drain(Duration),
    Orphaned,
}

async fn serve<H: Handler>(
    config: Config,
    factory: Factory<H>,
    id: WorkerId,
    channel: OwnedFd,
    clock: Option<&'static coreloop_ipc::LoopClock>,
) -> i32 {
    let channel = match Channel::from_fd(channel) {
        Ok(channel) => channel,
        Err(err) => {
            error!(error = %err, "cannot register the channel");
            return 1;
        }
    };
    // Installed before the setup, so that a SIGTERM sent while it runs retires the worker
    // once it is ready instead of killing it.
    let (mut sigterm, mut sigint) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(err), _) | (_, Err(err)) => {
            error!(error = %err, "cannot install signal handlers");
            return 1;
        }
    };
    let shutdown = ShutdownSignal::new();
    let hooks = Rc::new(DrainHooks::default());
    let handler = match factory(Worker::new(id, shutdown.clone(), Rc::clone(&hooks))).await {
        Ok(handler) => Rc::new(handler),
        Err(err) => return report_failure(&channel, chain(&*err)).await,
    };
    // In ReusePort mode this worker listens on its own socket for every TCP address.
    let own_listeners = match bind_own_listeners(&config) {
        Ok(listeners) => listeners,
        Err(reason) => return report_failure(&channel, reason).await,
    };
    let pid = std::process::id();
    if let Some(clock) = clock {
        if let Err(err) = channel.send(&Message::LoopClock, &[clock.as_fd()]).await {
            error!(error = %err, "cannot send the loop clock");
            return 1;
        }
    }
    if let Err(err) = channel.send(&Message::Ready { pid }, &[]).await {
        error!(error = %err, "cannot report ready");
        return 1;
    }
    debug!("worker ready");

    let tracker = Rc::new(Tracker::default());
    let channel = Rc::new(channel);
    tokio::task::spawn_local(report(
        Rc::clone(&channel),
        Rc::clone(&tracker),
        config.heartbeat_interval(),
    ));
    let mut retiring = false;
    let spawner = Spawner {
        handler,
        tracker: Rc::clone(&tracker),
        shutdown: shutdown.clone(),
        worker: id,
    };
    let acceptors: Vec<_> = own_listeners
        .into_iter()
        .map(|(index, listener)| {
            tokio::task::spawn_local(accept_own(listener, index, spawner.clone()))
        })
        .collect();

    let end = loop {
        tokio::select! {
            received = channel.recv() => match received {
                Ok(Some((Message::Conns(batch), fds))) => {
                    for (meta, fd) in batch.as_slice().iter().zip(fds) {
                        spawner.adopt(*meta, fd);
                    }
                }
                Ok(Some((Message::Drain { timeout_ms }, _))) => {
                    break End::Drain(Duration::from_millis(u64::from(timeout_ms)));
                }
                Ok(Some((other, _))) => warn!(message = other.kind_name(), "unexpected message"),
                Ok(None) => break End::Orphaned,
                Err(ChannelError::Io(err)) => {
                    error!(error = %err, "channel failed");
                    break End::Orphaned;
                }
                Err(err) => error!(error = %err, "bad message from the supervisor; a connection may have been lost"),
            },
            _ = sigterm.recv(), if !retiring => {
                retiring = true;
                retire(&channel).await;
            }
            _ = sigint.recv(), if !retiring => {
                retiring = true;
                retire(&channel).await;
            }
        }
    };

    drain(end, &config, &tracker, &hooks, &shutdown, &acceptors).await
}

/// The end of a worker: stop accepting on its own listeners, trigger the shutdown signal,
/// and wait for the connections and the drain hooks, or the deadline. Returns the exit
/// code.
async fn drain(
    end: End,
    config: &Config,
    tracker: &Tracker,
    hooks: &DrainHooks,
    shutdown: &ShutdownSignal,
    acceptors: &[tokio::task::JoinHandle<()>],
) -> i32 {
    let grace = match end {
        End::Drain(timeout) => {
            info!(
                live = tracker.live.get(),
                ?timeout,
                event = "draining",
                "draining"
            );
            timeout
        }
        End::Orphaned => {
            warn!(
                live = tracker.live.get(),
                event = "orphaned",
                "supervisor gone; finishing in-flight work and exiting"
            );
            ORPHAN_GRACE.min(config.shutdown_timeout)
        }
    };
    // Stop accepting on our own listeners (ReusePort): their queued connections go to the
    // other workers' sockets from now on, or are reset by the kernel when we close.
    for acceptor in acceptors {
        acceptor.abort();
    }
    shutdown.trigger();
    let drained = async { tokio::join!(tracker.wait_idle(), run_drain_hooks(hooks)) };
    if tokio::time::timeout(grace, drained).await.is_err() {
        warn!(
            live = tracker.live.get(),
            event = "drain_deadline_passed",
            "drain deadline passed; closing remaining connections and drain hooks"
        );
    }
    debug!("worker exiting");
    0
}

/// Runs the drain hooks, each as its own task, and waits for them all; then for the
/// hooks they registered in turn, until none is left.
async fn run_drain_hooks(hooks: &DrainHooks) {
    loop {
        let batch = hooks.take();
        if batch.is_empty() {
            return;
        }
        debug!(hooks = batch.len(), "running drain hooks");
        let tasks: Vec<_> = batch.into_iter().map(tokio::task::spawn_local).collect();
        for task in tasks {
            if let Err(err) = task.await {
                if err.is_panic() {
                    error!(
                        panic = panic_message(&*err.into_panic()),
                        "drain hook panicked"
                    );
                }
            }
        }
    }
}

/// Heartbeat and load report, sent from inside the event loop: a loop blocked by a handler
/// stops reporting, which is how the supervisor detects it. Reports every `interval`, and
/// shortly after connections close so the supervisor's view of the load stays fresh.
async fn report(channel: Rc<Channel>, tracker: Rc<Tracker>, interval: Duration) {
    let mut rss_kib = resident_kib();
    let mut next_rss = tokio::time::Instant::now() + interval;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next_rss) => {
                rss_kib = resident_kib();
                next_rss = tokio::time::Instant::now() + interval;
            }
            () = tracker.closing.notified() => tokio::time::sleep(REPORT_COALESCE).await,
        }
        let status = Message::Status {
            live: u32::try_from(tracker.live.get()).unwrap_or(u32::MAX),
            closed: tracker.closed.get(),
            rss_kib,
        };
        if let Err(err) = channel.send(&status, &[]).await {
            debug!(error = %err, "cannot report status");
            return;
        }
    }
}

/// Resident set size from `/proc/self/statm`, in KiB; 0 if unreadable.
fn resident_kib() -> u64 {
    let page_kib = rustix::param::page_size() as u64 / 1024;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|text| {
            text.split_whitespace()
                .nth(1)
                .and_then(|pages| pages.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * page_kib)
}

/// `ReusePort` distribution: this worker's own `SO_REUSEPORT` listeners, with their index
/// in the configuration.
fn bind_own_listeners(config: &Config) -> Result<Vec<(u16, tokio::net::TcpListener)>, String> {
    if config.distribution != Distribution::ReusePort {
        return Ok(Vec::new());
    }
    let backlog = i32::try_from(config.backlog).unwrap_or(i32::MAX);
    let mut own = Vec::new();
    for (index, spec) in config.listeners.iter().enumerate() {
        if let ListenSpec::Tcp(addr) = spec {
            let bound = crate::listener::bind_tcp(*addr, backlog, config.tcp_nodelay, Some(true))
                .map(std::net::TcpListener::from)
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|err| format!("cannot listen on {addr} (SO_REUSEPORT): {err}"))?;
            // The supervisor checked that the listeners fit in u16.
            own.push((index as u16, bound));
        }
    }
    Ok(own)
}

/// Accept loop of one of this worker's own listeners (`ReusePort` distribution).
async fn accept_own<H: Handler>(
    listener: tokio::net::TcpListener,
    index: u16,
    spawner: Spawner<H>,
) {
    let mut next = u64::from(std::process::id()) << 32;
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                next += 1;
                let meta = ConnMeta {
                    id: next,
                    listener: index,
                    peer: PeerAddr::Inet(peer),
                };
                spawner.spawn(meta, Stream::Tcp(stream));
            }
            Err(err) => match crate::listener::classify(&err) {
                crate::listener::AcceptError::Connection
                | crate::listener::AcceptError::WouldBlock => {}
                crate::listener::AcceptError::Resource => {
                    warn!(error = %err, "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            },
        }
    }
}

/// What every connection's task is started with: the handler, the live-connection
/// tracker, the drain signal and this worker's id.
struct Spawner<H> {
    handler: Rc<H>,
    tracker: Rc<Tracker>,
    shutdown: ShutdownSignal,
    worker: WorkerId,
}

impl<H> Clone for Spawner<H> {
    fn clone(&self) -> Self {
        Self {
            handler: Rc::clone(&self.handler),
            tracker: Rc::clone(&self.tracker),
            shutdown: self.shutdown.clone(),
            worker: self.worker,
        }
    }
}

impl<H: Handler> Spawner<H> {
    /// Wraps one connection received from the supervisor and spawns its handler.
    fn adopt(&self, meta: ConnMeta, fd: OwnedFd) {
        match into_stream(fd, &meta.peer) {
            Ok(stream) => self.spawn(meta, stream),
            Err(err) => warn!(conn.id = meta.id, error = %err, "cannot adopt connection"),
        }
    }

    /// Spawns the handler for one connection on this worker's `LocalSet`, counted by the
    /// tracker.
    fn spawn(&self, meta: ConnMeta, stream: Stream) {
        let conn = Conn {
            stream,
            peer: meta.peer,
            id: meta.id,
            listener: usize::from(meta.listener),
            worker: self.worker,
            shutdown: self.shutdown.clone(),
        };
        let guard = self.tracker.enter();
        let fut = self.handler.call(conn);
        let task = async move {
            match (HandlerPoll { inner: fut }).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => log_handler_error(err.into()),
                Err(panic) => error!(
                    panic = panic_message(&*panic),
                    event = "handler_panicked",
                    "handler panicked"
                ),
            }
            drop(guard);
        };
        // The connection span is debug-level. When it is off, nothing is entered per poll:
        // the handler runs inside the worker's span, which `run` entered for the thread, so
        // its logs still say which worker they come from.
        let span = conn_span(meta.id, &meta.peer);
        if span.is_disabled() {
            tokio::task::spawn_local(task);
        } else {
            tokio::task::spawn_local(task.instrument(span));
        }
    }
}

async fn retire(channel: &Channel) {
    info!(
        event = "retire_requested",
        "stop signal received; asking the supervisor to drain this worker"
    );
    if let Err(err) = channel.send(&Message::Retiring, &[]).await {
        debug!(error = %err, "cannot send Retiring");
    }
}

fn conn_span(conn_id: u64, peer: &PeerAddr) -> tracing::Span {
    match peer {
        PeerAddr::Inet(addr) => tracing::debug_span!("conn", conn.id = conn_id, peer.addr = %addr),
        PeerAddr::Unix => tracing::debug_span!("conn", conn.id = conn_id, peer.addr = "unix"),
        PeerAddr::Unknown => tracing::debug_span!("conn", conn.id = conn_id),
    }
}

/// The peer's address family tells a unix connection from a TCP one (the listener may
/// be a socket systemd passed, whose kind the configuration does not say); without an
/// address, the socket itself is asked.
fn into_stream(fd: OwnedFd, peer: &PeerAddr) -> std::io::Result<Stream> {
    let is_unix = match peer {
        PeerAddr::Inet(_) => false,
        PeerAddr::Unix => true,
        PeerAddr::Unknown => {
            rustix::net::getsockname(&fd)?.address_family() == rustix::net::AddressFamily::UNIX
        }
    };
    // The acceptor accepted with SOCK_NONBLOCK, and O_NONBLOCK belongs to the open file
    // description that SCM_RIGHTS shared with us, as tokio's `from_std` requires.
    if is_unix {
        let std = std::os::unix::net::UnixStream::from(fd);
        Ok(Stream::Unix(tokio::net::UnixStream::from_std(std)?))
    } else {
        // TCP_NODELAY, when configured, was inherited from the listener.
        let std = std::net::TcpStream::from(fd);
        Ok(Stream::Tcp(tokio::net::TcpStream::from_std(std)?))
    }
}

/// Client I/O failures (resets, early EOF) are routine on a public server: debug level.
/// The causes are walked: a protocol library's error that wraps a reset is routine too.
fn log_handler_error(err: BoxError) {
    let routine = causes(&*err).any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::TimedOut
            )
        })
    });
    let error = chain(&*err);
    if routine {
        debug!(%error, "connection ended with an error");
    } else {
        warn!(%error, event = "handler_failed", "handler failed");
    }
}

/// An error and its sources, outermost first.
fn causes<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |err| err.source())
}

/// `outer: cause: root cause`, for logs and start-up failures.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    causes(err)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "non-string panic payload"
    }
}

pin_project_lite::pin_project! {
    /// Polls a future inside `catch_unwind`, so that a panicking handler is logged and its
    /// connection closed without taking the worker down; and marks each poll on the loop
    /// clock, so that the supervisor sees a handler that does not yield while it runs.
    struct HandlerPoll<F> {
        #[pin]
        inner: F,
    }
}

impl<F: std::future::Future> std::future::Future for HandlerPoll<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        let clock = CLOCK.get();
        if let Some(clock) = clock {
            clock.poll_started();
        }
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx)));
        if let Some(clock) = clock {
            clock.poll_ended();
        }
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}
