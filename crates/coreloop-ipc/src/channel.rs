//! [`Channel`]: one end of a supervisor–worker socket pair, speaking [`Message`]s.
//!
//! Built on `tokio-seqpacket`, whose `sendmsg`/`recvmsg` calls use `MSG_NOSIGNAL` (a dead
//! peer is `EPIPE`, not a process-killing `SIGPIPE`) and `MSG_CMSG_CLOEXEC` (received
//! descriptors are close-on-exec atomically). This module adds what the transport leaves
//! to its users: a fixed, aligned control buffer per call (no allocation), a check of the
//! truncation flags on every receive, a check that each message carries exactly the
//! descriptors its kind requires, and a non-blocking [`Channel::try_send`] so that a
//! dispatcher can skip a worker whose queue is full instead of waiting on it.
//!
//! Sending calls `sendmsg(MSG_DONTWAIT | MSG_NOSIGNAL)` through rustix directly instead of
//! going through the runtime's cached readiness: a freshly registered socket has no
//! readiness yet, and a dispatcher must learn "full" from the kernel, not from a cache. On
//! `EAGAIN` the cached write readiness is cleared, so waiting in
//! [`Channel::poll_send_ready`] sleeps until the kernel reports room.
//!
//! `passfd` was evaluated for this job and rejected: its tokio futures lose the wakeup once
//! a call would block, which on a busy channel hangs the connection path.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::task::{Context, Poll};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;
use tokio_seqpacket::UnixSeqpacket;
use tokio_seqpacket::ancillary::OwnedAncillaryMessage;

use crate::message::{MAX_MESSAGE_LEN, Message, ProtocolError};

/// Room for the `SCM_RIGHTS` header plus up to 8 descriptors: more than any message
/// carries, so a sender that attaches too many is caught by the count check rather than
/// by `MSG_CTRUNC`.
const CONTROL_LEN: usize = 64;

/// Control-message buffer with the alignment `cmsghdr` needs.
#[repr(C, align(8))]
struct ControlBuf([u8; CONTROL_LEN]);

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
/// a.send(&Message::Ready { pid: 7 }, None).await?;
/// let (msg, fd) = b.recv().await?.expect("peer is open");
/// assert_eq!(msg, Message::Ready { pid: 7 });
/// assert!(fd.is_none());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Channel {
    sock: UnixSeqpacket,
}

impl Channel {
    /// Wraps a connected seqpacket socket. Must be called inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// When the descriptor cannot be registered with the runtime's reactor.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self {
            sock: UnixSeqpacket::try_from(fd)?,
        })
    }

    /// Sends `msg`, with `fd` attached when the message kind carries one, waiting while
    /// the peer's queue is full.
    ///
    /// The caller keeps ownership of `fd`; the kernel gives the peer its own duplicate.
    ///
    /// # Errors
    ///
    /// [`ChannelError::FdCount`] when `fd` does not match the kind; [`ChannelError::Io`]
    /// when the socket call fails.
    pub async fn send(
        &self,
        msg: &Message,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ChannelError> {
        loop {
            match self.try_send(msg, fd) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full) => {
                    std::future::poll_fn(|cx| self.poll_send_ready(cx)).await?
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
    pub fn try_send(&self, msg: &Message, fd: Option<BorrowedFd<'_>>) -> Result<(), TrySendError> {
        let expected = msg.fd_count();
        let got = usize::from(fd.is_some());
        if expected != got {
            return Err(ChannelError::FdCount {
                kind: msg.kind_name(),
                expected,
                got,
            }
            .into());
        }
        let mut bytes = [0u8; MAX_MESSAGE_LEN];
        let len = msg.encode(&mut bytes).map_err(ChannelError::from)?;
        let fds: [BorrowedFd<'_>; 1];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if let Some(fd) = fd {
            fds = [fd];
            // Cannot fail: the buffer is sized for exactly one descriptor.
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(ChannelError::Io(io::Error::other("control buffer too small")).into());
            }
        }
        let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL | SendFlags::EOR;
        match rustix::net::sendmsg(
            &self.sock,
            &[IoSlice::new(&bytes[..len])],
            &mut control,
            flags,
        ) {
            Ok(_) => Ok(()),
            Err(rustix::io::Errno::AGAIN) => {
                // The kernel said "full": drop the runtime's cached write readiness, so that
                // `poll_send_ready` waits for the kernel's next report instead of spinning.
                let _ = self.sock.as_async_fd().try_io(Interest::WRITABLE, |_| {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
                Err(TrySendError::Full)
            }
            Err(err) => Err(ChannelError::Io(err.into()).into()),
        }
    }

    /// Polls until the kernel reports room in the peer's queue. After a
    /// [`TrySendError::Full`], this waits for the next report.
    ///
    /// Only the most recent task to call this is woken.
    ///
    /// # Errors
    ///
    /// When the reactor reports an error for the socket.
    pub fn poll_send_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.sock
            .as_async_fd()
            .poll_write_ready(cx)
            .map_ok(|_guard| ())
    }

    /// Receives the next message and its descriptor, if its kind carries one.
    ///
    /// Returns `Ok(None)` once the peer has closed its end and every queued message has been
    /// read. Cancel-safe: a message is either returned or still queued.
    ///
    /// # Errors
    ///
    /// [`ChannelError::Truncated`], [`ChannelError::Protocol`] and [`ChannelError::FdCount`]
    /// for a bad datagram (the channel stays usable, the datagram's descriptors are closed);
    /// [`ChannelError::Io`] when the socket call fails.
    pub async fn recv(&self) -> Result<Option<(Message, Option<OwnedFd>)>, ChannelError> {
        // One spare byte so that an over-long datagram shows up as MSG_TRUNC.
        let mut bytes = [0u8; MAX_MESSAGE_LEN + 1];
        let mut control = ControlBuf([0; CONTROL_LEN]);
        let (info, ancillary) = self
            .sock
            .recv_vectored_with_ancillary(&mut [IoSliceMut::new(&mut bytes)], &mut control.0)
            .await?;
        let mut fds = Received::default();
        for message in ancillary.into_messages() {
            if let OwnedAncillaryMessage::FileDescriptors(received) = message {
                received.for_each(|fd| fds.push(fd));
            }
        }
        check_received(
            &bytes[..info.bytes_read()],
            fds,
            info.truncated(),
            info.ancillary_truncated(),
        )
    }

    /// Receives a message already queued, without waiting: `Ok(None)` when the queue is
    /// empty (or the peer closed). Used to take back what a dead worker never read.
    ///
    /// # Errors
    ///
    /// As [`Channel::recv`].
    pub fn try_recv(&self) -> Result<Option<(Message, Option<OwnedFd>)>, ChannelError> {
        let mut bytes = [0u8; MAX_MESSAGE_LEN + 1];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let flags = RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC;
        let result = rustix::net::recvmsg(
            &self.sock,
            &mut [IoSliceMut::new(&mut bytes)],
            &mut control,
            flags,
        );
        let msg = match result {
            Ok(msg) => msg,
            Err(rustix::io::Errno::AGAIN) => return Ok(None),
            Err(err) => return Err(ChannelError::Io(err.into())),
        };
        let mut fds = Received::default();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                received.for_each(|fd| fds.push(fd));
            }
        }
        check_received(
            &bytes[..msg.bytes.min(bytes.len())],
            fds,
            msg.flags.contains(ReturnFlags::TRUNC),
            msg.flags.contains(ReturnFlags::CTRUNC),
        )
    }
}

/// The descriptors of one datagram: the first is kept, any extra is closed at once, and
/// all are counted. No allocation on the per-connection path.
#[derive(Default)]
struct Received {
    first: Option<OwnedFd>,
    count: usize,
}

impl Received {
    fn push(&mut self, fd: OwnedFd) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(fd);
        }
    }
}

/// Validates one received datagram; the descriptors of a bad one are closed on return.
fn check_received(
    bytes: &[u8],
    fds: Received,
    truncated: bool,
    control_truncated: bool,
) -> Result<Option<(Message, Option<OwnedFd>)>, ChannelError> {
    if truncated || control_truncated {
        return Err(ChannelError::Truncated {
            data: truncated,
            control: control_truncated,
        });
    }
    if bytes.is_empty() && fds.count == 0 {
        return Ok(None);
    }
    let msg = Message::decode(bytes)?;
    if msg.fd_count() != fds.count {
        return Err(ChannelError::FdCount {
            kind: msg.kind_name(),
            expected: msg.fd_count(),
            got: fds.count,
        });
    }
    Ok(Some((msg, fds.first)))
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
