//! [`Channel`]: one end of a supervisor–worker socket pair, speaking [`Message`]s.
//!
//! Sending and receiving are `sendmsg`/`recvmsg` through rustix's I/O-safe wrappers, with
//! `MSG_NOSIGNAL` (a dead peer is `EPIPE`, not a process-killing `SIGPIPE`),
//! `MSG_CMSG_CLOEXEC` (received descriptors are close-on-exec atomically) and
//! `MSG_DONTWAIT`. This module adds what the system calls leave to their users: fixed
//! control buffers on the stack (no allocation per message), a check of the truncation
//! flags on every receive, a check that each message carries exactly the descriptors its
//! kind requires, and a non-blocking [`Channel::try_send`] so that a dispatcher can skip a
//! worker whose queue is full instead of waiting on it.
//!
//! # Readiness
//!
//! The socket is registered with the runtime for *read* readiness only. Registering it for
//! writes too (as `tokio-seqpacket`'s `UnixSeqpacket` does) makes the kernel wake the
//! sender every time the receiver drains a message — once per forwarded connection, for
//! nothing, since sends almost never block. Write readiness is registered on a duplicate
//! descriptor, created the first time a send finds the queue full.
//!
//! `passfd` was evaluated for this job and rejected: its tokio futures lose the wakeup once
//! a call would block, which on a busy channel hangs the connection path.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;

use crate::fd::Readiness;
use crate::message::{MAX_BATCH, MAX_MESSAGE_LEN, Message, ProtocolError};

/// Descriptors one receive has room for: more than any message carries, so that a sender
/// that attaches too many is caught by the count check rather than by `MSG_CTRUNC`.
const RECV_FDS: usize = MAX_BATCH + 4;

/// An error on the channel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The socket call failed (for example `EPIPE` once the peer is gone).
    #[error("channel i/o: {0}")]
    Io(#[from] io::Error),
    /// The datagram did not decode.
    #[error("malformed message: {0}")]
    Protocol(#[from] ProtocolError),
    /// The kernel cut the datagram (`MSG_TRUNC`) or its descriptors (`MSG_CTRUNC`); any
    /// descriptor that did arrive has been closed.
    #[error("message truncated by the kernel (data: {data}, descriptors: {control})")]
    Truncated {
        /// `MSG_TRUNC` was set.
        data: bool,
        /// `MSG_CTRUNC` was set.
        control: bool,
    },
    /// The message carried a different number of descriptors than its kind requires; the
    /// descriptors that arrived have been closed.
    #[error("{kind} carried {got} descriptors, expected {expected}")]
    FdCount {
        /// The message kind.
        kind: &'static str,
        /// Descriptors the kind requires.
        expected: usize,
        /// Descriptors that arrived.
        got: usize,
    },
}

/// Why [`Channel::try_send`] did not send.
#[derive(Debug, thiserror::Error)]
pub enum TrySendError {
    /// The peer's queue is full; nothing was sent.
    #[error("channel full")]
    Full,
    /// The send failed.
    #[error(transparent)]
    Failed(#[from] ChannelError),
}

/// The descriptors that arrived with one message, in order; no allocation.
#[derive(Debug, Default)]
pub struct Fds {
    fds: [Option<OwnedFd>; MAX_BATCH],
    len: usize,
    /// Descriptors that arrived beyond the first `MAX_BATCH` (closed at once).
    extra: usize,
}

impl Fds {
    fn push(&mut self, fd: OwnedFd) {
        match self.fds.get_mut(self.len) {
            Some(slot) => {
                *slot = Some(fd);
                self.len += 1;
            }
            None => self.extra += 1,
        }
    }

    /// How many descriptors arrived.
    pub fn len(&self) -> usize {
        self.len + self.extra
    }

    /// Whether none arrived.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl IntoIterator for Fds {
    type Item = OwnedFd;
    type IntoIter = std::iter::Flatten<std::array::IntoIter<Option<OwnedFd>, MAX_BATCH>>;

    fn into_iter(self) -> Self::IntoIter {
        self.fds.into_iter().flatten()
    }
}

/// What one non-blocking receive found.
#[allow(clippy::large_enum_variant)] // returned by value once per receive, never stored
enum Recv {
    Message(Message, Fds),
    Empty,
    Closed,
}

/// One end of a supervisor–worker channel.
///
/// # Examples
///
/// ```
/// use coreloop_ipc::{Channel, Message, socketpair_cloexec};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (a, b) = socketpair_cloexec()?;
/// let (a, b) = (Channel::from_fd(a)?, Channel::from_fd(b)?);
/// a.send(&Message::Ready { pid: 7 }, &[]).await?;
/// let (msg, fds) = b.recv().await?.expect("peer is open");
/// assert_eq!(msg, Message::Ready { pid: 7 });
/// assert!(fds.is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Channel {
    read: Readiness,
    /// Write readiness, on a duplicate descriptor, registered on first need.
    write: OnceLock<Readiness>,
    /// Bytes of every message sent so far, through this channel and its [`Sender`]s (see
    /// [`Channel::sent_bytes`]).
    sent: Arc<AtomicU64>,
    /// Bytes of every message received so far (see [`Channel::received_bytes`]).
    received: AtomicU64,
}

impl Channel {
    /// Wraps a connected, non-blocking seqpacket socket. Must be called inside a tokio
    /// runtime.
    ///
    /// # Errors
    ///
    /// When the descriptor cannot be registered with the runtime's reactor.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self {
            read: Readiness::new(fd, Interest::READABLE)?,
            write: OnceLock::new(),
            sent: Arc::new(AtomicU64::new(0)),
            received: AtomicU64::new(0),
        })
    }

    /// A send-only handle on this channel's socket, for a dispatcher on another thread:
    /// what it sends counts in this channel's [`sent_bytes`](Channel::sent_bytes).
    ///
    /// # Errors
    ///
    /// When the descriptor cannot be duplicated.
    pub fn sender(&self) -> io::Result<Sender> {
        Ok(Sender {
            fd: rustix::io::fcntl_dupfd_cloexec(&self.read, 3)?,
            write: OnceLock::new(),
            sent: Arc::clone(&self.sent),
        })
    }

    /// Sends `msg` with `fds` attached (one per connection of a [`Message::Conns`], none
    /// for other kinds), waiting while the peer's queue is full.
    ///
    /// The caller keeps ownership of the descriptors; the kernel gives the peer its own
    /// duplicates.
    ///
    /// # Errors
    ///
    /// [`ChannelError::FdCount`] when `fds` does not match the kind; [`ChannelError::Io`]
    /// when the socket call fails.
    pub async fn send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        loop {
            match self.try_send(msg, fds) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full) => {
                    std::future::poll_fn(|cx| self.poll_send_ready(cx)).await?;
                }
                Err(TrySendError::Failed(err)) => return Err(err),
            }
        }
    }

    /// Sends `msg` if the peer's queue has room, without waiting.
    ///
    /// # Errors
    ///
    /// [`TrySendError::Full`] when the kernel has no room (`EAGAIN`); otherwise as
    /// [`Channel::send`].
    pub fn try_send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), TrySendError> {
        try_send_on(self.read.as_fd(), self.write.get(), &self.sent, msg, fds)
    }

    /// Bytes of all the messages this end has sent. Less what the peer's queue still holds
    /// ([`Queue::unread_bytes`]), it is what the peer has read: the two together tell
    /// whether a peer with a non-empty queue is reading at all.
    pub fn sent_bytes(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes of every datagram this end has taken off its queue, whether it decoded or
    /// not: the peer's [`sent_bytes`](Channel::sent_bytes) less this is what is still
    /// queued here, which a worker publishes for its supervisor
    /// ([`LoopClock::read_up_to`](crate::LoopClock::read_up_to)) so that the supervisor
    /// needs no `FIONREAD` to know it.
    pub fn received_bytes(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Polls until the kernel reports room in the peer's queue. After a
    /// [`TrySendError::Full`], this waits for the next report.
    ///
    /// Only the most recent task to call this is woken.
    ///
    /// # Errors
    ///
    /// When the descriptor cannot be duplicated or registered, or the reactor reports an
    /// error for it.
    pub fn poll_send_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_write(self.read.as_fd(), &self.write, cx)
    }

    /// Receives the next message and the descriptors it carries.
    ///
    /// Returns `Ok(None)` once the peer has closed its end and every queued message has been
    /// read. Cancel-safe: a message is either returned or still queued.
    ///
    /// # Errors
    ///
    /// [`ChannelError::Truncated`], [`ChannelError::Protocol`] and [`ChannelError::FdCount`]
    /// for a bad datagram (the channel stays usable, the datagram's descriptors are closed);
    /// [`ChannelError::Io`] when the socket call fails.
    pub async fn recv(&self) -> Result<Option<(Message, Fds)>, ChannelError> {
        loop {
            std::future::poll_fn(|cx| self.read.poll_read_ready(cx)).await?;
            match self.recv_once()? {
                Recv::Message(msg, fds) => return Ok(Some((msg, fds))),
                Recv::Closed => return Ok(None),
                Recv::Empty => self.read.clear_read_ready(),
            }
        }
    }

    /// Receives a message already queued, without waiting: `Ok(None)` when the queue is
    /// empty or the peer closed. Used to take back what a dead worker never read.
    ///
    /// # Errors
    ///
    /// As [`Channel::recv`].
    pub fn try_recv(&self) -> Result<Option<(Message, Fds)>, ChannelError> {
        match self.recv_once()? {
            Recv::Message(msg, fds) => Ok(Some((msg, fds))),
            Recv::Empty => {
                self.read.clear_read_ready();
                Ok(None)
            }
            Recv::Closed => Ok(None),
        }
    }

    fn recv_once(&self) -> Result<Recv, ChannelError> {
        recv_once(self.read.as_fd(), Some(&self.received))
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

/// A send-only handle on a [`Channel`]'s socket ([`Channel::sender`]), for a dispatcher
/// running on another thread, with its own runtime: write readiness is registered, on a
/// duplicate descriptor, with the reactor of the runtime that first waits on it (see
/// [`try_clone`](Sender::try_clone) for one per runtime). A seqpacket send is atomic, so
/// several senders never interleave within a message.
#[derive(Debug)]
pub struct Sender {
    fd: OwnedFd,
    write: OnceLock<Readiness>,
    /// The channel's count of bytes sent, shared.
    sent: Arc<AtomicU64>,
}

impl Sender {
    /// Another handle on the same socket, not yet registered with any reactor: one for each
    /// thread that sends.
    ///
    /// # Errors
    ///
    /// When the descriptor cannot be duplicated.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: rustix::io::fcntl_dupfd_cloexec(&self.fd, 3)?,
            write: OnceLock::new(),
            sent: Arc::clone(&self.sent),
        })
    }

    /// As [`Channel::sent_bytes`]: the channel's count, all handles included.
    pub fn sent_bytes(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// As [`Channel::try_send`].
    ///
    /// # Errors
    ///
    /// As [`Channel::try_send`].
    pub fn try_send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), TrySendError> {
        try_send_on(self.fd.as_fd(), self.write.get(), &self.sent, msg, fds)
    }

    /// As [`Channel::poll_send_ready`]; registers with the current runtime's reactor the
    /// first time.
    ///
    /// # Errors
    ///
    /// As [`Channel::poll_send_ready`].
    pub fn poll_send_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_write(self.fd.as_fd(), &self.write, cx)
    }
}

/// Polls `fd`'s write readiness, registered in `write` on a duplicate descriptor, with the
/// current runtime's reactor, the first time.
fn poll_write(
    fd: BorrowedFd<'_>,
    write: &OnceLock<Readiness>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let write = match write.get() {
        Some(write) => write,
        None => {
            let dup = rustix::io::fcntl_dupfd_cloexec(fd, 3)?;
            let registered = Readiness::new(dup, Interest::WRITABLE)?;
            write.get_or_init(|| registered)
        }
    };
    write.poll_write_ready(cx)
}

/// One non-blocking send of `msg` with `fds` on `fd`, counted in `sent`; `write` is the
/// write readiness to clear when the kernel says the queue is full.
fn try_send_on(
    fd: BorrowedFd<'_>,
    write: Option<&Readiness>,
    sent: &AtomicU64,
    msg: &Message,
    fds: &[BorrowedFd<'_>],
) -> Result<(), TrySendError> {
    if msg.fd_count() != fds.len() {
        return Err(ChannelError::FdCount {
            kind: msg.kind_name(),
            expected: msg.fd_count(),
            got: fds.len(),
        }
        .into());
    }
    let mut bytes = [0u8; MAX_MESSAGE_LEN];
    let len = msg.encode(&mut bytes).map_err(ChannelError::from)?;
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_BATCH))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    // Cannot fail: fds.len() <= MAX_BATCH, which the buffer is sized for.
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(ChannelError::Io(io::Error::other("control buffer too small")).into());
    }
    let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL | SendFlags::EOR;
    match rustix::net::sendmsg(fd, &[IoSlice::new(&bytes[..len])], &mut control, flags) {
        Ok(_) => {
            // A seqpacket send is all or nothing.
            sent.fetch_add(len as u64, Ordering::Relaxed);
            Ok(())
        }
        Err(rustix::io::Errno::AGAIN) => {
            // The kernel said "full": clear any cached write readiness, so that
            // `poll_send_ready` waits for the kernel's next report instead of spinning.
            if let Some(write) = write {
                write.clear_write_ready();
            }
            Err(TrySendError::Full)
        }
        Err(err) => Err(ChannelError::Io(err.into()).into()),
    }
}

/// The supervisor's duplicate of a worker's end of its channel: not registered with the
/// reactor, so the supervisor's sends into it wake nothing on the supervisor's side.
///
/// It serves two purposes. While the worker lives, [`Queue::unread_bytes`] tells how much
/// the worker has not read yet (a worker busy in a handler does not read its channel, so
/// its queue stays non-empty); after the worker died, [`Queue::try_recv`] takes back what it
/// never read.
#[derive(Debug)]
pub struct Queue {
    fd: OwnedFd,
}

impl Queue {
    /// Wraps a duplicate of the worker's end of a channel.
    pub fn new(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Bytes queued to the worker that it has not read yet (`FIONREAD`, which for a
    /// seqpacket socket sums every queued datagram); 0 means it has read everything.
    ///
    /// # Errors
    ///
    /// The `ioctl` error.
    pub fn unread_bytes(&self) -> io::Result<u64> {
        Ok(rustix::io::ioctl_fionread(&self.fd)?)
    }

    /// Receives a message still queued, without waiting: `Ok(None)` when the queue is
    /// empty. Used to take back what a dead worker never read.
    ///
    /// # Errors
    ///
    /// As [`Channel::recv`].
    pub fn try_recv(&self) -> Result<Option<(Message, Fds)>, ChannelError> {
        match recv_once(self.fd.as_fd(), None)? {
            Recv::Message(msg, fds) => Ok(Some((msg, fds))),
            Recv::Empty | Recv::Closed => Ok(None),
        }
    }
}

/// One non-blocking receive on `fd`, with every check of the receive path; the bytes of
/// the datagram taken off the queue are added to `count`, if given (one longer than any
/// message counts only the bytes copied).
fn recv_once(fd: BorrowedFd<'_>, count: Option<&AtomicU64>) -> Result<Recv, ChannelError> {
    // One spare byte so that an over-long datagram shows up as MSG_TRUNC.
    let mut bytes = [0u8; MAX_MESSAGE_LEN + 1];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(RECV_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let flags = RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC;
    let result = rustix::net::recvmsg(fd, &mut [IoSliceMut::new(&mut bytes)], &mut control, flags);
    let received = match result {
        Ok(received) => received,
        Err(rustix::io::Errno::AGAIN) => return Ok(Recv::Empty),
        Err(err) => return Err(ChannelError::Io(err.into())),
    };
    if let Some(count) = count {
        count.fetch_add(received.bytes as u64, Ordering::Relaxed);
    }
    let mut fds = Fds::default();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(arrived) = message {
            arrived.for_each(|fd| fds.push(fd));
        }
    }
    let truncated = received.flags.contains(ReturnFlags::TRUNC);
    let control_truncated = received.flags.contains(ReturnFlags::CTRUNC);
    if truncated || control_truncated {
        return Err(ChannelError::Truncated {
            data: truncated,
            control: control_truncated,
        });
    }
    let data = &bytes[..received.bytes.min(bytes.len())];
    if data.is_empty() && fds.is_empty() {
        return Ok(Recv::Closed);
    }
    let msg = Message::decode(data)?;
    if msg.fd_count() != fds.len() {
        return Err(ChannelError::FdCount {
            kind: msg.kind_name(),
            expected: msg.fd_count(),
            got: fds.len(),
        });
    }
    Ok(Recv::Message(msg, fds))
}
