//! Descriptors that cross a process boundary: the socket pair and the worker's end after
//! re-exec, and the sockets systemd passes for socket activation.
//!
//! The supervisor creates each pair with `SOCK_CLOEXEC | SOCK_NONBLOCK`, so no other child
//! inherits either end, and starts the worker with its end as standard input: `std`'s
//! `Command` `dup2`s it onto fd 0 (which clears close-on-exec on fd 0 only) and keeps its
//! `posix_spawn` fast path, because no `pre_exec` hook is needed.
//!
//! In the worker, [`inherited_channel`] checks that fd 0 really is a seqpacket socket,
//! duplicates it to a close-on-exec descriptor that the worker owns, and points fd 0 at
//! `/dev/null`. That goes through rustix's I/O-safe calls and needs no `unsafe`.
//!
//! The `unsafe` blocks of coreloop are here: [`take_systemd_listeners`] adopts the sockets
//! systemd passed by number, and [`Readiness`] registers an owned descriptor
//! with tokio's reactor (`AsyncFd::register_with_interest`, unsafe since tokio made raw
//! registration I/O-safety-aware). The supervisor needs it to wait on listeners whose
//! connections it accepts with a raw `accept4` (without tokio's per-stream `epoll`
//! registration), and channels use it to register for exactly the readiness they need.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use rustix::fs::{Mode, OFlags};
use rustix::net::{AddressFamily, SocketFlags, SocketType};

/// Creates a connected `AF_UNIX` `SOCK_SEQPACKET` pair, both ends non-blocking and
/// close-on-exec.
///
/// # Errors
///
/// The `socketpair(2)` error, e.g. `EMFILE`.
pub fn socketpair_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?)
}

/// Takes the channel a worker inherited on fd 0.
///
/// Checks that fd 0 is a `SOCK_SEQPACKET` socket, duplicates it (close-on-exec) and
/// replaces fd 0 with `/dev/null`, so the returned descriptor is the only reference this
/// process holds. Call it once, before any runtime exists.
///
/// # Errors
///
/// `InvalidInput` when fd 0 is not a seqpacket socket (the process was not started by a
/// coreloop supervisor); otherwise the error of `fcntl`, `open` or `dup2`.
pub fn inherited_channel() -> io::Result<OwnedFd> {
    let stdin = rustix::stdio::stdin();
    match rustix::net::sockopt::socket_type(stdin) {
        Ok(SocketType::SEQPACKET) => {}
        Ok(other) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd 0 is a socket of type {other:?}, not the coreloop channel"),
            ));
        }
        Err(err) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd 0 is not the coreloop channel: {err}"),
            ));
        }
    }
    let owned = rustix::io::fcntl_dupfd_cloexec(stdin, 3)?;
    let null = rustix::fs::open("/dev/null", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    rustix::stdio::dup2_stdin(&null)?;
    Ok(owned)
}

/// Takes ownership of the sockets systemd passed to this process (socket activation), with
/// their names from `LISTEN_FDNAMES` (`"unknown"` when unnamed).
///
/// The `LISTEN_FDS` protocol hands descriptors `3 .. 3 + LISTEN_FDS` to the process whose
/// id is `LISTEN_PID`; `sd-notify` parses the variables, checks the pid and marks every
/// descriptor close-on-exec. Nothing here checks what kind of socket each is: the caller
/// validates (a listening stream socket, usually).
///
/// # Errors
///
/// `AlreadyExists` on a second call in the same process (each descriptor may be owned
/// once); `InvalidInput` for malformed variables; the `fcntl` error if a listed descriptor
/// is not open. Returns an empty list when the variables are absent or name another
/// process.
pub fn take_systemd_listeners() -> io::Result<Vec<(OwnedFd, String)>> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "systemd's sockets were already taken in this process",
        ));
    }
    let mut taken = Vec::new();
    for (raw, name) in sd_notify::listen_fds_with_names()? {
        // SAFETY: the LISTEN_FDS protocol transfers ownership of descriptors
        // 3..3+LISTEN_FDS to the process named by LISTEN_PID; `listen_fds_with_names`
        // returned them only because LISTEN_PID is this process, and it has just set
        // FD_CLOEXEC on each with fcntl (which fails on a closed descriptor), so each is
        // open. `TAKEN` makes this the only place in this process that adopts them, once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        taken.push((fd, name));
    }
    Ok(taken)
}

/// An owned descriptor registered with the current tokio reactor for readiness events.
///
/// Only shared access to the descriptor is offered, so it stays open, and stays the same
/// descriptor, for as long as it is registered.
#[derive(Debug)]
pub struct Readiness {
    inner: AsyncFd<OwnedFd>,
}

impl Readiness {
    /// Registers `fd` for the readiness events in `interest`. Must be called inside a
    /// tokio runtime.
    ///
    /// # Errors
    ///
    /// The reactor's registration error (`epoll_ctl`).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime with I/O enabled.
    pub fn new(fd: OwnedFd, interest: Interest) -> io::Result<Self> {
        // SAFETY: `AsyncFd::register_with_interest` requires the descriptor to stay open
        // and to be the same descriptor for the registration's whole life. The `OwnedFd`
        // moves into the `AsyncFd`, which keeps it until it is dropped (deregistering
        // first), and this type never hands out `&mut` access to it nor calls
        // `into_inner`, so nothing can close or replace it while it is registered.
        let inner =
            unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(io::Error::from)?;
        Ok(Self { inner })
    }

    /// Polls for read readiness. After an operation returns `EAGAIN`, call
    /// [`clear_read_ready`](Self::clear_read_ready) so the next poll waits for the kernel.
    ///
    /// # Errors
    ///
    /// An error the reactor reports for the descriptor.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_read_ready(cx).map_ok(|_guard| ())
    }

    /// Polls for write readiness; see [`poll_read_ready`](Self::poll_read_ready).
    ///
    /// # Errors
    ///
    /// An error the reactor reports for the descriptor.
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_write_ready(cx).map_ok(|_guard| ())
    }

    /// Forgets cached read readiness: the caller just saw `EAGAIN`.
    pub fn clear_read_ready(&self) {
        let _ = self.inner.try_io(Interest::READABLE, |_| {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }

    /// Forgets cached write readiness: the caller just saw `EAGAIN`.
    pub fn clear_write_ready(&self) {
        let _ = self.inner.try_io(Interest::WRITABLE, |_| {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }
}

impl AsFd for Readiness {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }
}
