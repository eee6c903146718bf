//! What user code sees: the [`Handler`] trait, the [`Conn`] it receives, and the
//! [`Stream`] inside it.
//!
//! A handler is built once per worker process by the factory given to
//! [`ServerBuilder::serve`](crate::ServerBuilder::serve), then called once per connection
//! on that worker's single-threaded runtime. Nothing here requires `Send`: per-worker state
//! may live in `Rc` and `RefCell`, exactly as in a `LocalSet`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::error::BoxError;
pub use crate::id::WorkerId;
use crate::shutdown::ShutdownSignal;

use crate::addr::PeerAddr;

/// Serves one connection. Implemented for every `Fn(Conn) -> impl Future<Output =
/// Result<(), E>>`, so an `async fn handle(conn: Conn) -> io::Result<()>` is a handler.
///
/// An error returned by a handler is logged with the connection's span and closes that
/// connection only; a panicking handler is logged the same way. The worker keeps serving.
/// The log goes through `tracing`: a program that installs no subscriber sees none of it
/// (see "Logging" on the [crate page](crate)).
///
/// # Examples
///
/// ```
/// use coreloop::{Conn, Handler};
/// use tokio::io::AsyncWriteExt;
///
/// async fn hello(mut conn: Conn) -> std::io::Result<()> {
///     conn.stream_mut().write_all(b"hello\n").await
/// }
///
/// fn assert_handler(_: impl Handler) {}
/// assert_handler(hello);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a coreloop handler",
    note = "a handler is `async fn(Conn) -> Result<(), E>`, or a closure returning such a future, where `E` converts into `Box<dyn Error + Send + Sync>`"
)]
pub trait Handler: 'static {
    /// The error a connection may end with.
    type Error: Into<BoxError>;
    /// The future that serves one connection; it need not be `Send`.
    type Future: Future<Output = Result<(), Self::Error>> + 'static;

    /// Starts serving `conn`.
    fn call(&self, conn: Conn) -> Self::Future;
}

impl<F, Fut, E> Handler for F
where
    F: Fn(Conn) -> Fut + 'static,
    Fut: Future<Output = Result<(), E>> + 'static,
    E: Into<BoxError>,
{
    type Error = E;
    type Future = Fut;

    fn call(&self, conn: Conn) -> Fut {
        self(conn)
    }
}

/// An accepted connection as a worker receives it.
#[derive(Debug)]
pub struct Conn {
    pub(crate) stream: Stream,
    pub(crate) peer: coreloop_ipc::PeerAddr,
    pub(crate) id: u64,
    pub(crate) listener: usize,
    pub(crate) worker: WorkerId,
    pub(crate) shutdown: ShutdownSignal,
}

impl Conn {
    /// The connection's stream.
    pub fn stream_mut(&mut self) -> &mut Stream {
        &mut self.stream
    }

    /// Takes the stream, e.g. to hand it to hyper. Take the
    /// [`shutdown_signal`](Conn::shutdown_signal) first if the handler needs it.
    pub fn into_stream(self) -> Stream {
        self.stream
    }

    /// The client's address, as the acceptor's `accept` reported it (no system call).
    pub fn peer_addr(&self) -> PeerAddr {
        PeerAddr::from_wire(self.peer)
    }

    /// The local address the client connected to.
    ///
    /// # Errors
    ///
    /// The `getsockname(2)` error.
    pub fn local_addr(&self) -> io::Result<LocalAddr> {
        match &self.stream {
            Stream::Tcp(tcp) => tcp.local_addr().map(LocalAddr::Inet),
            Stream::Unix(unix) => unix.local_addr().map(LocalAddr::Unix),
        }
    }

    /// Index of the listener, in `bind` order, that accepted the connection.
    pub fn listener(&self) -> usize {
        self.listener
    }

    /// The connection's id, unique for the life of the supervisor (it appears in logs).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The id of the worker serving this connection.
    pub fn worker_id(&self) -> WorkerId {
        self.worker
    }

    /// The worker's shutdown signal: triggered when the worker starts draining. It closes
    /// nothing by itself; a handler awaits it next to its reads (or checks it between
    /// requests) and returns, or the connection is cut when the shutdown timeout expires.
    ///
    /// # Examples
    ///
    /// ```
    /// use coreloop::Conn;
    /// use tokio::io::AsyncReadExt;
    ///
    /// async fn handle(mut conn: Conn) -> std::io::Result<()> {
    ///     let draining = conn.shutdown_signal();
    ///     let mut buf = [0u8; 1024];
    ///     loop {
    ///         tokio::select! {
    ///             read = conn.stream_mut().read(&mut buf) => if read? == 0 { return Ok(()) },
    ///             () = draining.triggered() => return Ok(()),
    ///         }
    ///     }
    /// }
    /// # fn assert_handler(_: impl coreloop::Handler) {}
    /// # assert_handler(handle);
    /// ```
    pub fn shutdown_signal(&self) -> ShutdownSignal {
        self.shutdown.clone()
    }

    /// The worker's shutdown signal. Renamed: it does not shut the connection down.
    #[deprecated(note = "renamed to `shutdown_signal`")]
    pub fn shutdown(&self) -> ShutdownSignal {
        self.shutdown_signal()
    }
}

/// The local end of a connection, or the address a listener is bound to
/// ([`ServerHandle::wait_ready`](crate::ServerHandle::wait_ready)).
#[derive(Debug, Clone)]
pub enum LocalAddr {
    /// A TCP listener's address.
    Inet(std::net::SocketAddr),
    /// A unix-socket listener's address.
    Unix(tokio::net::unix::SocketAddr),
}

impl LocalAddr {
    /// The TCP address, if this is one.
    ///
    /// # Examples
    ///
    /// ```
    /// use coreloop::LocalAddr;
    ///
    /// let addr = LocalAddr::Inet("127.0.0.1:8080".parse().unwrap());
    /// assert_eq!(addr.inet(), Some("127.0.0.1:8080".parse().unwrap()));
    /// ```
    pub fn inet(&self) -> Option<std::net::SocketAddr> {
        match self {
            LocalAddr::Inet(addr) => Some(*addr),
            LocalAddr::Unix(_) => None,
        }
    }
}

/// A connection's stream: TCP or unix. Implements [`AsyncRead`] and [`AsyncWrite`], so a
/// handler can serve both kinds without caring which it got.
#[derive(Debug)]
pub enum Stream {
    /// From a TCP listener.
    Tcp(TcpStream),
    /// From a unix-socket listener.
    Unix(UnixStream),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}
