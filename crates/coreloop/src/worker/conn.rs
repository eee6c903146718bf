//! Starting a connection's handler: the descriptor from the supervisor (or the worker's
//! own accept) becomes a tokio stream, the handler runs as a local task counted by the
//! [`Tracker`], each poll of it is caught if it panics and marked on the loop clock, and
//! its end (error or panic) is logged. A handler's failure never takes the worker down.

use std::os::fd::OwnedFd;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use coreloop_ipc::{ConnMeta, PeerAddr};
use tracing::{Instrument, debug, error, warn};

use super::clock;
use super::tracker::Tracker;
use crate::error::BoxError;
use crate::handler::{Conn, Handler, Stream, WorkerId};
use crate::shutdown::ShutdownSignal;

/// What every connection's task is started with: the handler, the live-connection
/// tracker, the drain signal and this worker's id.
pub(super) struct Spawner<H> {
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
    pub(super) fn new(
        handler: Rc<H>,
        tracker: Rc<Tracker>,
        shutdown: ShutdownSignal,
        worker: WorkerId,
    ) -> Self {
        Self {
            handler,
            tracker,
            shutdown,
            worker,
        }
    }

    /// Wraps one connection received from the supervisor and spawns its handler.
    pub(super) fn adopt(&self, meta: ConnMeta, fd: OwnedFd) {
        match into_stream(fd, &meta.peer) {
            Ok(stream) => self.spawn(meta, stream),
            Err(err) => warn!(
                conn.id = meta.id,
                error = %err,
                event = "adopt_failed",
                "cannot adopt connection"
            ),
        }
    }

    /// Spawns the handler for one connection on this worker's `LocalSet`, counted by the
    /// tracker.
    pub(super) fn spawn(&self, meta: ConnMeta, stream: Stream) {
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
        debug!(%error, event = "connection_error", "connection ended with an error");
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
pub(super) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    causes(err)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// The text of a panic's payload, for logs.
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
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
        let clock = clock::get();
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
