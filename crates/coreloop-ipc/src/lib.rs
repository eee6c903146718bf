//! The channel between coreloop's supervisor and each of its worker processes.
//!
//! Every worker is connected to the supervisor by one `SOCK_SEQPACKET` unix socket pair.
//! Seqpacket keeps message boundaries and order, so each datagram is exactly one
//! [`Message`], and accepted connections' file descriptors ride in the same datagram as
//! their metadata (`SCM_RIGHTS`). A zero-length read means the other side is gone: that
//! is the worker's lifeline.
//!
//! ```text
//!   supervisor                                          worker N
//!   ──────────                                          ────────
//!   Channel ── Conns[{id, listener, peer} × k] + k fds ──▶ Channel   (1 ≤ k ≤ MAX_BATCH)
//!           ── Drain{timeout_ms} ────────────────────────▶           (always the last)
//!           ◀─ LoopClock + 1 fd (first) / Ready{pid} / Status{live, closed, rss} / Retiring / Failed{reason} ─
//! ```
//!
//! A binary upgrade uses the same channel between the old supervisor and the new one it
//! started (the new executable), with the new one's end on its fd 0:
//!
//! ```text
//!   old supervisor                                      new supervisor
//!   Channel ── Listener{spec, name, remaining} + 1 fd ─▶ Channel   (one per listener)
//!           ◀─ Ready{pid} / Failed{reason} ────────────          (its workers all serve)
//!           ── Takeover ─────────────────────────────▶           (the old one stopped accepting)
//! ```
//!
//! Ownership rules, which the types enforce:
//! - a descriptor is sent as a [`BorrowedFd`](std::os::fd::BorrowedFd) and the sender keeps
//!   (and later drops) its own [`OwnedFd`](std::os::fd::OwnedFd): the kernel duplicates it
//!   into the receiver;
//! - a received descriptor arrives as an `OwnedFd` with close-on-exec already set
//!   (`MSG_CMSG_CLOEXEC`), and any descriptor that does not belong to a well-formed message
//!   is closed, never leaked;
//! - a message whose bytes or control data were truncated (`MSG_TRUNC`, `MSG_CTRUNC`) is a
//!   [`ChannelError::Truncated`], never a panic.
//!
//! The only `unsafe` code of coreloop lives in the private `fd` module: one block that
//! registers an owned descriptor with tokio's reactor ([`Readiness`]), one that adopts
//! the sockets systemd passed by number ([`take_systemd_listeners`]), and the mapping of
//! the words a worker and its supervisor share ([`LoopClock`], [`LoopClockView`]).
//!
//! The socket pair is used through rustix's `sendmsg`/`recvmsg` and our own readiness
//! registration rather than through `tokio-seqpacket`, whose sockets register for read
//! and write readiness together: see the `channel` module for why that costs a wake-up per
//! forwarded connection. `tokio-seqpacket` stays in the tests, as an independent peer.
#![deny(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod channel;
#[allow(unsafe_code)]
mod fd;
mod message;
mod timer;

pub use channel::{Channel, ChannelError, Fds, Queue, Sender, TrySendError};
pub use fd::{
    LoopClock, LoopClockView, Readiness, inherited_channel, socketpair_cloexec,
    take_systemd_listeners,
};
pub use message::{
    ConnBatch, ConnMeta, MAX_BATCH, MAX_LISTENER_TEXT, MAX_MESSAGE_LEN, Message, PROTOCOL_VERSION,
    PeerAddr, ProtocolError,
};
pub use timer::Ticker;
