//! [`TimeoutStream`]: read and write timeouts for a handler's stream.
//!
//! A server that waits for a client without a bound can be held by a client that does
//! nothing: one that opens a connection and never sends (or trickles a request a byte at a
//! time, "slowloris"), or one that sends requests and never reads the answers. A handler
//! bounds those waits by wrapping its stream:
//!
//! - an **inactivity timeout** per direction fails a read (or write) that makes no progress
//!   for that long: the clock starts when the operation has to wait, and restarts with
//!   every operation that completes. It bounds the silence between bytes, not the total:
//!   an idle keep-alive connection, a stalled request body, a client that stopped reading.
//! - a **deadline** per direction fails any read (or write) still waiting at that instant,
//!   however many bytes came before. It bounds the total time to receive (or send)
//!   something, such as a complete request head (a client trickling bytes cannot extend it).
//!
//! A wait fails at whichever of the two comes first, with [`io::ErrorKind::TimedOut`].
//! Data that is already available always wins: a read is never failed while the stream
//! has bytes for it.
//! Timeouts and deadlines can be changed between operations (for example, a keep-alive
//! loop sets the idle timeout while it waits for the next request, then a deadline for the
//! rest of that request's head).
//!
//! The wrapper is small: two lazily created [`tokio::time::Sleep`]s stored inline, no
//! heap allocation, no `Send` requirement on the stream (a worker's handler need not be
//! `Send`), and nothing is done on a read or write that completes at once. Because it holds
//! timers inline, it must be pinned (`std::pin::pin!`, or `Box::pin`) before use. Its
//! timers belong to the tokio runtime that first polls a waiting operation.
//!
//! What the error means is left to the handler: an HTTP server answers a head that timed
//! out with `408 Request Timeout`, and closes an idle connection or a client that does not
//! read without a word.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pin_project! {
    /// A stream whose reads and writes fail with
    /// [`io::ErrorKind::TimedOut`](std::io::ErrorKind::TimedOut) when they wait too long.
    ///
    /// Each direction has two limits, both off by default (with neither set, the wrapper
    /// only passes calls through):
    ///
    /// - an **inactivity timeout**: the longest one read (or write) may wait for progress.
    ///   The clock starts when the operation has to wait and restarts with every operation
    ///   that completes, so it bounds the silence between bytes: an idle keep-alive
    ///   connection, a stalled body, a client that stopped reading its answers.
    /// - a **deadline**: an instant after which no read (or write) may still be waiting,
    ///   however many bytes came before. It bounds the total time to receive something,
    ///   such as a request head that a client trickles a byte at a time.
    ///
    /// A waiting operation fails at whichever comes first, with
    /// [`io::ErrorKind::TimedOut`](std::io::ErrorKind::TimedOut). Data that is already
    /// available always wins: a read is never failed while the stream has bytes for it.
    /// Flushes and shutdowns count as writes. A read or write that is abandoned while it
    /// waits (the losing branch of a `tokio::select!`, say) leaves its clock running: the
    /// next one continues it. Changing a timeout or a deadline restarts the clock of that
    /// direction.
    ///
    /// The timers are two [`tokio::time::Sleep`]s stored inline and created on the first
    /// wait that needs one: no heap allocation, and the stream need not be `Send`. So the
    /// wrapper must be pinned (`std::pin::pin!` or `Box::pin`) before use, and it must be
    /// polled inside a tokio runtime with the time driver enabled (coreloop's workers
    /// have one).
    ///
    /// # Examples
    ///
    /// A keep-alive loop: up to 5 s of silence between requests, then 1 s for the rest of
    /// a request once its first byte has arrived, and 10 s for a client to accept the
    /// answer.
    ///
    /// ```
    /// use std::time::Duration;
    /// use coreloop::TimeoutStream;
    /// use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    /// use tokio::time::Instant;
    ///
    /// async fn serve(stream: impl AsyncRead + AsyncWrite) -> std::io::Result<()> {
    ///     let mut io = std::pin::pin!(TimeoutStream::new(stream));
    ///     io.as_mut().set_write_timeout(Some(Duration::from_secs(10)));
    ///     let mut buf = [0u8; 1024];
    ///     loop {
    ///         // Idle: wait for the first byte of the next request.
    ///         io.as_mut().set_read_timeout(Some(Duration::from_secs(5)));
    ///         io.as_mut().set_read_deadline(None);
    ///         let n = match io.read(&mut buf).await {
    ///             Ok(0) => return Ok(()),
    ///             Ok(n) => n,
    ///             Err(err) if err.kind() == std::io::ErrorKind::TimedOut => return Ok(()),
    ///             Err(err) => return Err(err),
    ///         };
    ///         // The request has started: it must be complete within 1 s.
    ///         io.as_mut().set_read_timeout(None);
    ///         io.as_mut().set_read_deadline(Some(Instant::now() + Duration::from_secs(1)));
    ///         // ... read the rest of the request, answer it ...
    ///         io.write_all(&buf[..n]).await?;
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let (mut client, server) = tokio::io::duplex(1024);
    /// let server = tokio::spawn(serve(server));
    /// client.write_all(b"ping").await?;
    /// let mut echo = [0u8; 4];
    /// client.read_exact(&mut echo).await?;
    /// assert_eq!(&echo, b"ping");
    /// drop(client);
    /// server.await??;
    /// # Ok(())
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct TimeoutStream<S> {
        #[pin]
        inner: S,
        #[pin]
        read: Timer,
        #[pin]
        write: Timer,
    }
}

impl<S> TimeoutStream<S> {
    /// Wraps `inner`, with no timeout and no deadline in either direction.
    ///
    /// Needs no runtime; timers are created by the first operation that has to wait.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            read: Timer::default(),
            write: Timer::default(),
        }
    }

    /// Sets the read inactivity timeout before the stream is pinned (see
    /// [`set_read_timeout`](Self::set_read_timeout)).
    #[must_use]
    pub fn with_read_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.read.timeout = timeout;
        self
    }

    /// Sets the write inactivity timeout before the stream is pinned (see
    /// [`set_write_timeout`](Self::set_write_timeout)).
    #[must_use]
    pub fn with_write_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.write.timeout = timeout;
        self
    }

    /// The read inactivity timeout.
    pub fn read_timeout(&self) -> Option<Duration> {
        self.read.timeout
    }

    /// The read deadline.
    pub fn read_deadline(&self) -> Option<Instant> {
        self.read.deadline
    }

    /// The write inactivity timeout.
    pub fn write_timeout(&self) -> Option<Duration> {
        self.write.timeout
    }

    /// The write deadline.
    pub fn write_deadline(&self) -> Option<Instant> {
        self.write.deadline
    }

    /// Sets the longest a read may wait for data (`None`: no limit). Restarts the read
    /// clock.
    pub fn set_read_timeout(self: Pin<&mut Self>, timeout: Option<Duration>) {
        self.project().read.set_timeout(timeout);
    }

    /// Sets the instant after which no read may still be waiting (`None`: no deadline).
    /// A deadline already past fails the next read that would wait, at once.
    pub fn set_read_deadline(self: Pin<&mut Self>, deadline: Option<Instant>) {
        self.project().read.set_deadline(deadline);
    }

    /// Sets the longest a write, flush or shutdown may wait for the peer to make room
    /// (`None`: no limit). Restarts the write clock.
    pub fn set_write_timeout(self: Pin<&mut Self>, timeout: Option<Duration>) {
        self.project().write.set_timeout(timeout);
    }

    /// Sets the instant after which no write, flush or shutdown may still be waiting
    /// (`None`: no deadline).
    pub fn set_write_deadline(self: Pin<&mut Self>, deadline: Option<Instant>) {
        self.project().write.set_deadline(deadline);
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream, mutably. Reading or writing through it bypasses the timeouts.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut S> {
        self.project().inner
    }

    /// Unwraps the stream (only possible while it is not pinned, or if it is `Box`ed).
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead> AsyncRead for TimeoutStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        match this.inner.poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.read.done();
                Poll::Ready(result)
            }
            Poll::Pending => this.read.poll_expired(cx).map(Err),
        }
    }
}

impl<S: AsyncWrite> AsyncWrite for TimeoutStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        match this.inner.poll_write(cx, buf) {
            Poll::Ready(result) => {
                this.write.done();
                Poll::Ready(result)
            }
            Poll::Pending => this.write.poll_expired(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        match this.inner.poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => {
                this.write.done();
                Poll::Ready(result)
            }
            Poll::Pending => this.write.poll_expired(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        match this.inner.poll_flush(cx) {
            Poll::Ready(result) => {
                this.write.done();
                Poll::Ready(result)
            }
            Poll::Pending => this.write.poll_expired(cx).map(Err),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        match this.inner.poll_shutdown(cx) {
            Poll::Ready(result) => {
                this.write.done();
                Poll::Ready(result)
            }
            Poll::Pending => this.write.poll_expired(cx).map(Err),
        }
    }
}

pin_project! {
    /// The clock of one direction.
    #[derive(Debug, Default)]
    struct Timer {
        // Created on the first wait that has a limit, then reset: no allocation, and no
        // runtime needed to build the stream.
        #[pin]
        sleep: Option<Sleep>,
        timeout: Option<Duration>,
        deadline: Option<Instant>,
        // The current wait's expiry is set in `sleep`.
        armed: bool,
    }
}

impl Timer {
    fn set_timeout(self: Pin<&mut Self>, timeout: Option<Duration>) {
        let this = self.project();
        *this.timeout = timeout;
        *this.armed = false;
    }

    fn set_deadline(self: Pin<&mut Self>, deadline: Option<Instant>) {
        let this = self.project();
        *this.deadline = deadline;
        *this.armed = false;
    }

    /// The operation completed: the next one that waits starts a new clock.
    fn done(self: Pin<&mut Self>) {
        *self.project().armed = false;
    }

    /// Called when the operation has to wait. `Ready` with a `TimedOut` error once it has
    /// waited too long; otherwise `Pending`, with the timer registered to wake `cx`.
    fn poll_expired(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Error> {
        let mut this = self.project();
        if !*this.armed {
            // A timeout too large to represent is no timeout.
            let idle = this.timeout.and_then(|t| Instant::now().checked_add(t));
            let expiry = match (idle, *this.deadline) {
                (Some(idle), Some(deadline)) => Some(idle.min(deadline)),
                (idle, deadline) => idle.or(deadline),
            };
            let Some(expiry) = expiry else {
                return Poll::Pending;
            };
            match this.sleep.as_mut().as_pin_mut() {
                Some(sleep) => sleep.reset(expiry),
                None => this.sleep.set(Some(tokio::time::sleep_until(expiry))),
            }
            *this.armed = true;
        }
        match this.sleep.as_pin_mut() {
            Some(sleep) => match sleep.poll(cx) {
                Poll::Ready(()) => {
                    *this.armed = false;
                    // A simple error kind: no allocation.
                    Poll::Ready(io::ErrorKind::TimedOut.into())
                }
                Poll::Pending => Poll::Pending,
            },
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    //! These run on real time (the crate's tokio has no `test-util`, so no paused clock):
    //! every timeout is short, every "does not time out" margin is several times the
    //! expected scheduling delay, and every test is bounded by an outer timeout.

    use std::pin::pin;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    const BOUND: Duration = Duration::from_secs(10);

    fn timed_out<T: std::fmt::Debug>(result: io::Result<T>) -> bool {
        matches!(result, Err(ref err) if err.kind() == io::ErrorKind::TimedOut)
    }

    #[tokio::test]
    async fn a_silent_peer_times_a_read_out() {
        let (_client, server) = duplex(64);
        let mut io = pin!(TimeoutStream::new(server).with_read_timeout(Some(ms(50))));
        let started = Instant::now();
        let mut buf = [0u8; 8];
        let result = tokio::time::timeout(BOUND, io.read(&mut buf)).await;
        assert!(
            timed_out(result.expect("bounded")),
            "the read must time out"
        );
        assert!(started.elapsed() >= ms(50));
    }

    #[tokio::test]
    async fn every_byte_restarts_the_inactivity_clock() {
        // 8 bytes, 100 ms apart: 800 ms in all, with a 500 ms inactivity timeout.
        let (mut client, server) = duplex(64);
        let mut io = pin!(TimeoutStream::new(server).with_read_timeout(Some(ms(500))));
        let writer = async {
            for _ in 0..8 {
                tokio::time::sleep(ms(100)).await;
                client.write_all(b"x").await.expect("write");
            }
            client
        };
        let reader = async {
            let mut got = 0;
            let mut buf = [0u8; 8];
            while got < 8 {
                got += io.read(&mut buf).await.expect("no timeout between bytes");
            }
            got
        };
        let (_, got) = tokio::time::timeout(BOUND, async { tokio::join!(writer, reader) })
            .await
            .expect("bounded");
        assert_eq!(got, 8);
    }

    #[tokio::test]
    async fn a_deadline_bounds_the_total_however_many_bytes_arrive() {
        let (mut client, server) = duplex(64);
        let mut io = pin!(TimeoutStream::new(server).with_read_timeout(Some(ms(5_000))));
        let started = Instant::now();
        io.as_mut().set_read_deadline(Some(started + ms(300)));
        let trickle = async {
            loop {
                tokio::time::sleep(ms(20)).await;
                if client.write_all(b"x").await.is_err() {
                    return;
                }
            }
        };
        let reader = async {
            let mut buf = [0u8; 8];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) => panic!("unexpected end of stream"),
                    Ok(_) => {}
                    Err(err) => return err,
                }
            }
        };
        let err = tokio::time::timeout(BOUND, async {
            tokio::select! {
                () = trickle => unreachable!("the trickle never ends on its own"),
                err = reader => err,
            }
        })
        .await
        .expect("the deadline must end the trickle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= ms(300));
    }

    #[tokio::test]
    async fn available_data_wins_over_a_past_deadline() {
        let (mut client, server) = duplex(64);
        let mut io = pin!(TimeoutStream::new(server));
        client.write_all(b"hello").await.expect("write");
        io.as_mut().set_read_deadline(Some(Instant::now()));
        // Well past the deadline, also for the timer driver's millisecond clock.
        tokio::time::sleep(ms(20)).await;
        let mut buf = [0u8; 8];
        let n = io.read(&mut buf).await.expect("data is there");
        assert_eq!(&buf[..n], b"hello");
        // Nothing more: the past deadline fails the next wait at once.
        let result = tokio::time::timeout(BOUND, io.read(&mut buf)).await;
        assert!(timed_out(result.expect("bounded")));
    }

    #[tokio::test]
    async fn without_limits_nothing_times_out() {
        let (mut client, server) = duplex(64);
        let mut io = pin!(TimeoutStream::new(server));
        let mut buf = [0u8; 8];
        tokio::select! {
            result = io.read(&mut buf) => panic!("the read must wait, got {result:?}"),
            () = tokio::time::sleep(ms(200)) => {}
        }
        client.write_all(b"late").await.expect("write");
        let n = tokio::time::timeout(BOUND, io.read(&mut buf))
            .await
            .expect("bounded")
            .expect("read");
        assert_eq!(&buf[..n], b"late");
    }

    #[tokio::test]
    async fn changing_a_limit_restarts_the_clock() {
        let (mut client, server) = duplex(64);
        let mut io = pin!(TimeoutStream::new(server).with_read_timeout(Some(ms(30))));
        let mut buf = [0u8; 8];
        let result = tokio::time::timeout(BOUND, io.read(&mut buf)).await;
        assert!(timed_out(result.expect("bounded")));
        // Lifted: the next read waits as long as it takes.
        io.as_mut().set_read_timeout(None);
        assert_eq!(io.read_timeout(), None);
        tokio::select! {
            result = io.read(&mut buf) => panic!("the read must wait, got {result:?}"),
            () = tokio::time::sleep(ms(150)) => {}
        }
        client.write_all(b"ok").await.expect("write");
        let n = io.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"ok");
    }

    #[tokio::test]
    async fn changing_a_limit_during_an_abandoned_wait_restarts_the_clock() {
        let (mut client, server) = duplex(64);
        let mut io = pin!(TimeoutStream::new(server).with_read_timeout(Some(ms(100))));
        let mut buf = [0u8; 8];
        // Abandoned after 50 ms: the clock (100 ms) keeps running...
        tokio::select! {
            result = io.read(&mut buf) => panic!("the read must wait, got {result:?}"),
            () = tokio::time::sleep(ms(50)) => {}
        }
        // ...until a limit changes: the next wait has the full new second, not the 50 ms
        // left of the old clock.
        io.as_mut().set_read_timeout(Some(ms(1_000)));
        tokio::select! {
            result = io.read(&mut buf) => panic!("the clock must restart, got {result:?}"),
            () = tokio::time::sleep(ms(300)) => {}
        }
        client.write_all(b"x").await.expect("write");
        assert_eq!(io.read(&mut buf).await.expect("read"), 1);
    }

    #[tokio::test]
    async fn end_of_stream_passes_through() {
        let (client, server) = duplex(64);
        let mut io = pin!(TimeoutStream::new(server).with_read_timeout(Some(ms(5_000))));
        drop(client);
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.expect("eof"), 0);
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_times_a_write_out() {
        // The pipe holds 64 bytes; nobody reads the rest.
        let (_client, server) = duplex(64);
        let mut io = pin!(TimeoutStream::new(server).with_write_timeout(Some(ms(50))));
        let result = tokio::time::timeout(BOUND, io.write_all(&[0u8; 4096])).await;
        assert!(
            timed_out(result.expect("bounded")),
            "the write must time out"
        );
        // A write deadline works the same way, flush and shutdown included.
        io.as_mut().set_write_timeout(None);
        io.as_mut()
            .set_write_deadline(Some(Instant::now() + ms(50)));
        let result = tokio::time::timeout(BOUND, io.write_all(&[0u8; 16])).await;
        assert!(timed_out(result.expect("bounded")));
        assert!(io.write_deadline().is_some());
    }

    #[tokio::test]
    async fn a_reading_peer_keeps_writes_going() {
        // 64 KiB through a 64-byte pipe, drained by a reader: progress, no timeout.
        let (mut client, server) = duplex(64);
        let mut io = pin!(TimeoutStream::new(server).with_write_timeout(Some(ms(2_000))));
        let data = vec![7u8; 64 * 1024];
        let writer = async {
            io.write_all(&data)
                .await
                .expect("no timeout while the peer reads");
            io.shutdown().await.expect("shutdown");
        };
        let reader = async {
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.expect("read");
            all.len()
        };
        let ((), len) = tokio::time::timeout(BOUND, async { tokio::join!(writer, reader) })
            .await
            .expect("bounded");
        assert_eq!(len, data.len());
    }

    #[tokio::test]
    async fn a_huge_timeout_is_no_timeout() {
        let (mut client, server) = duplex(64);
        let mut io = pin!(TimeoutStream::new(server).with_read_timeout(Some(Duration::MAX)));
        let mut buf = [0u8; 8];
        tokio::select! {
            result = io.read(&mut buf) => panic!("the read must wait, got {result:?}"),
            () = tokio::time::sleep(ms(50)) => {}
        }
        client.write_all(b"x").await.expect("write");
        assert_eq!(io.read(&mut buf).await.expect("read"), 1);
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
}
