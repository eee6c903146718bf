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
//! systemd passed by number, [`LoopClock`] maps five words of memory that a worker and its
//! supervisor share, and [`Readiness`] registers an owned descriptor
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
use rustix::mm::ProtFlags;
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

/// Five words of memory shared by a worker and its supervisor (a `memfd`, mapped by both):
/// when the worker's event loop last woke up (`CLOCK_MONOTONIC` nanoseconds), or 0 while
/// it sleeps in the reactor; when the handler poll now running started, or 0 between
/// handler polls; how many bytes of its channel the worker has read; how many of its
/// connections have closed; and how many are open now.
///
/// The worker writes the first from its runtime's park and unpark hooks (two stores per
/// wake-up, no system call), the second around every poll of a connection's handler (a
/// vDSO clock read and two stores), the third after every message it receives, the fourth
/// at every close and the fifth at every open and close; the supervisor reads them,
/// through a [`LoopClockView`], when it picks a worker or is scraped. A loop that has been
/// awake for a long time has a long batch of work; one poll that has run for long is a
/// handler that does not yield; bytes sent that the worker has not read are a queue
/// waiting for it; connections sent and not closed are its load. The supervisor learns
/// all of it before it sends the worker anything and without a system call (the third
/// replaces a `FIONREAD` per worker per dispatch, the fourth and fifth a load report per
/// burst of closes), which no message could tell it as promptly, since the worker cannot
/// send while it is busy and each message wakes the supervisor.
///
/// The worker creates the memory and seals its size (`F_SEAL_SHRINK`, `F_SEAL_GROW`,
/// `F_SEAL_SEAL`) before anyone else sees it: see [`LoopClockView::from_fd`] for why the
/// supervisor maps nothing else.
#[derive(Debug)]
pub struct LoopClock {
    words: std::ptr::NonNull<[std::sync::atomic::AtomicU64; WORDS]>,
    fd: OwnedFd,
}

// SAFETY: the only access to the mapped words is through `AtomicU64`, which is safe to
// share between threads (and processes); the mapping lives as long as the value.
unsafe impl Send for LoopClock {}
// SAFETY: as above: `&LoopClock` offers atomic loads and stores only.
unsafe impl Sync for LoopClock {}

/// Where each word of the shared memory is: the worker writes and the supervisor reads
/// by these indices alone.
mod word {
    /// When the loop woke up, or 0 while it sleeps.
    pub(super) const AWAKE: usize = 0;
    /// When the handler poll now running started, or 0.
    pub(super) const POLL: usize = 1;
    /// Bytes of the channel read.
    pub(super) const READ: usize = 2;
    /// Connections closed.
    pub(super) const CLOSED: usize = 3;
    /// Connections open.
    pub(super) const LIVE: usize = 4;
}
/// Words of the shared memory (see [`word`]).
const WORDS: usize = word::LIVE + 1;
/// Size of the shared memory: five `u64`s.
const CLOCK_LEN: usize = WORDS * std::mem::size_of::<u64>();

/// The seals a loop clock must carry before the supervisor maps it: its size can never
/// change again, so no page of the mapping can stop being backed by the file.
fn clock_seals() -> rustix::fs::SealFlags {
    use rustix::fs::SealFlags;
    SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL
}

impl LoopClock {
    /// Creates the shared words (a new close-on-exec `memfd` of 40 bytes, its size sealed),
    /// marked asleep, nothing read, nothing closed or open.
    ///
    /// # Errors
    ///
    /// The error of `memfd_create`, `ftruncate`, `fcntl(F_ADD_SEALS)` or `mmap`.
    pub fn create() -> io::Result<Self> {
        use rustix::fs::MemfdFlags;
        let fd = rustix::fs::memfd_create(
            "coreloop-loop-clock",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::ftruncate(&fd, CLOCK_LEN as u64)?;
        rustix::fs::fcntl_add_seals(&fd, clock_seals())?;
        let words = map(&fd, ProtFlags::READ | ProtFlags::WRITE)?;
        Ok(Self { words, fd })
    }

    fn words(&self) -> &[std::sync::atomic::AtomicU64; WORDS] {
        // SAFETY: `words` points at the start of a live mapping of `CLOCK_LEN` bytes, page
        // aligned (so aligned for `AtomicU64`), of a file whose size is sealed at
        // `CLOCK_LEN`, unmapped only in `drop`; the memory is only ever accessed
        // atomically, by this process and the peer alike.
        unsafe { self.words.as_ref() }
    }

    /// The descriptor, to send to the peer.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The worker's loop woke up now.
    pub fn woke(&self) {
        self.words()[word::AWAKE].store(monotonic_ns(), Ordering::Release);
    }

    /// The worker's loop is about to sleep.
    pub fn sleeping(&self) {
        self.words()[word::AWAKE].store(0, Ordering::Release);
    }

    /// The worker starts polling a connection's handler.
    pub fn poll_started(&self) {
        self.words()[word::POLL].store(monotonic_ns(), Ordering::Release);
    }

    /// The handler poll has returned.
    pub fn poll_ended(&self) {
        self.words()[word::POLL].store(0, Ordering::Release);
    }

    /// The worker has read `bytes` of its channel in all ([`Channel::received_bytes`](crate::Channel::received_bytes)).
    pub fn read_up_to(&self, bytes: u64) {
        self.words()[word::READ].store(bytes, Ordering::Release);
    }

    /// The worker has closed `count` connections in all.
    pub fn closed_up_to(&self, count: u64) {
        self.words()[word::CLOSED].store(count, Ordering::Release);
    }

    /// The worker has `count` connections open now.
    pub fn live_now(&self, count: u64) {
        self.words()[word::LIVE].store(count, Ordering::Release);
    }
}

impl Drop for LoopClock {
    fn drop(&mut self) {
        // SAFETY: the mapping of `CLOCK_LEN` bytes made in `create`; no reference into it
        // outlives `self` (`words()` borrows `self`).
        let _ = unsafe { rustix::mm::munmap(self.words.as_ptr().cast(), CLOCK_LEN) };
    }
}

/// The supervisor's read-only view of a worker's [`LoopClock`].
#[derive(Debug)]
pub struct LoopClockView {
    words: std::ptr::NonNull<[std::sync::atomic::AtomicU64; WORDS]>,
    _fd: OwnedFd,
}

// SAFETY: as for `LoopClock`: the mapped words are only loaded atomically, and the mapping
// lives as long as the value.
unsafe impl Send for LoopClockView {}
// SAFETY: as above: `&LoopClockView` offers atomic loads only.
unsafe impl Sync for LoopClockView {}

impl LoopClockView {
    /// Maps, read-only, the loop clock a worker created (its descriptor, received over the
    /// channel).
    ///
    /// The worker is not trusted: it holds the same file and could truncate it, and a
    /// mapped page whose file no longer backs it raises `SIGBUS` in every process that
    /// reads it, the supervisor included. So the descriptor is mapped only if it is a
    /// `memfd` whose size is sealed (`F_SEAL_SHRINK`, `F_SEAL_GROW`, `F_SEAL_SEAL`: seals
    /// can be added, never removed) and is at least 40 bytes, checked in that order, so
    /// that the size read is final. What the worker can still do is write any value into
    /// the five words; they only steer connections toward or away from that worker, or
    /// change its own gauge.
    ///
    /// # Errors
    ///
    /// `InvalidInput` when the descriptor is not a memfd with those seals, or is shorter
    /// than 40 bytes; the `mmap` error.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_owned());
        // Files that cannot be sealed (sockets, pipes, regular files) fail with EINVAL.
        let seals = rustix::fs::fcntl_get_seals(&fd)
            .map_err(|_| invalid("the loop clock is not a sealable memfd"))?;
        if !seals.contains(clock_seals()) {
            return Err(invalid("the loop clock's size is not sealed"));
        }
        let stat = rustix::fs::fstat(&fd)?;
        if (stat.st_mode & 0o170_000) != 0o100_000 || (stat.st_size as u64) < CLOCK_LEN as u64 {
            return Err(invalid(&format!(
                "the loop clock is not a file of {CLOCK_LEN} bytes"
            )));
        }
        let words = map(&fd, ProtFlags::READ)?;
        Ok(Self { words, _fd: fd })
    }

    fn words(&self) -> &[std::sync::atomic::AtomicU64; WORDS] {
        // SAFETY: `words` points at the start of a live read-only mapping of `CLOCK_LEN`
        // bytes, page aligned, of a file sealed against shrinking at no less than
        // `CLOCK_LEN` bytes (checked in `from_fd`), so every byte stays backed; unmapped
        // only in `drop`; only ever loaded atomically here.
        unsafe { self.words.as_ref() }
    }

    /// How long the handler poll now running has run, or `None` between handler polls.
    pub fn poll_running_for(&self) -> Option<std::time::Duration> {
        since(self.words()[word::POLL].load(Ordering::Acquire))
    }

    /// How long the worker's loop has been awake without sleeping, or `None` if it sleeps.
    pub fn awake_for(&self) -> Option<std::time::Duration> {
        since(self.words()[word::AWAKE].load(Ordering::Acquire))
    }

    /// How many bytes of its channel the worker says it has read. Any value a worker
    /// writes: the caller bounds it by what it has sent.
    pub fn read_bytes(&self) -> u64 {
        self.words()[word::READ].load(Ordering::Acquire)
    }

    /// How many connections the worker says it has closed. Any value a worker writes: the
    /// caller bounds it by what it has sent.
    pub fn closed(&self) -> u64 {
        self.words()[word::CLOSED].load(Ordering::Acquire)
    }

    /// How many connections the worker says it has open: any value it writes, for the
    /// metrics alone.
    pub fn live(&self) -> u64 {
        self.words()[word::LIVE].load(Ordering::Acquire)
    }
}

impl Drop for LoopClockView {
    fn drop(&mut self) {
        // SAFETY: the mapping of `CLOCK_LEN` bytes made in `from_fd`; no reference into it
        // outlives `self` (`words()` borrows `self`).
        let _ = unsafe { rustix::mm::munmap(self.words.as_ptr().cast(), CLOCK_LEN) };
    }
}

/// Maps the first `CLOCK_LEN` bytes of `fd`, shared, with `prot`.
///
/// The caller guarantees that `fd` is a file whose size is sealed at `CLOCK_LEN` bytes or
/// more, so the mapping stays backed for as long as it exists.
fn map(
    fd: &OwnedFd,
    prot: ProtFlags,
) -> io::Result<std::ptr::NonNull<[std::sync::atomic::AtomicU64; WORDS]>> {
    // SAFETY: a new shared mapping chosen by the kernel (null hint), so it overlaps no
    // memory Rust knows about; `fd` is a file of at least `CLOCK_LEN` bytes whose size is
    // sealed (created so in `LoopClock::create`, or checked by `LoopClockView::from_fd`),
    // so the whole length is backed for the mapping's life.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            CLOCK_LEN,
            prot,
            rustix::mm::MapFlags::SHARED,
            fd,
            0,
        )
    }?;
    std::ptr::NonNull::new(ptr.cast::<[std::sync::atomic::AtomicU64; WORDS]>())
        .ok_or_else(|| io::Error::other("mmap returned null"))
}

/// Time elapsed since a stored instant; `None` for 0 (not running).
fn since(stored_ns: u64) -> Option<std::time::Duration> {
    (stored_ns != 0)
        .then(|| std::time::Duration::from_nanos(monotonic_ns().saturating_sub(stored_ns)))
}

/// `CLOCK_MONOTONIC` in nanoseconds (never 0: the clock starts at boot, long before).
fn monotonic_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_mappings_see_one_word() {
        let (worker, supervisor) = both_ends();
        assert_eq!(supervisor.awake_for(), None);
        worker.woke();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let awake = supervisor.awake_for().expect("awake");
        assert!(awake >= std::time::Duration::from_millis(2), "{awake:?}");
        worker.sleeping();
        assert_eq!(supervisor.awake_for(), None);
    }

    /// A clock as the worker creates it, and the same memory as the supervisor maps it.
    fn both_ends() -> (LoopClock, LoopClockView) {
        let worker = LoopClock::create().unwrap();
        let supervisor =
            LoopClockView::from_fd(worker.as_fd().try_clone_to_owned().unwrap()).unwrap();
        (worker, supervisor)
    }

    #[test]
    fn the_poll_word_is_separate_from_the_loop_word() {
        let (worker, supervisor) = both_ends();
        assert_eq!(supervisor.poll_running_for(), None);
        worker.poll_started();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let running = supervisor.poll_running_for().expect("in a poll");
        assert!(
            running >= std::time::Duration::from_millis(2),
            "{running:?}"
        );
        assert_eq!(supervisor.awake_for(), None, "the loop word is untouched");
        worker.poll_ended();
        assert_eq!(supervisor.poll_running_for(), None);
    }

    #[test]
    fn the_read_count_is_shared_and_separate_from_the_clocks() {
        let (worker, supervisor) = both_ends();
        assert_eq!(supervisor.read_bytes(), 0);
        worker.read_up_to(4_096);
        assert_eq!(supervisor.read_bytes(), 4_096);
        assert_eq!(supervisor.awake_for(), None);
        assert_eq!(supervisor.poll_running_for(), None);
        worker.woke();
        worker.poll_started();
        assert_eq!(supervisor.read_bytes(), 4_096);
    }

    #[test]
    fn the_close_and_open_counts_are_shared_and_separate_from_the_read_count() {
        let (worker, supervisor) = both_ends();
        assert_eq!(supervisor.closed(), 0);
        worker.read_up_to(4_096);
        worker.closed_up_to(7);
        assert_eq!(supervisor.closed(), 7);
        assert_eq!(supervisor.read_bytes(), 4_096);
        worker.read_up_to(8_192);
        assert_eq!(supervisor.closed(), 7);
        worker.live_now(3);
        assert_eq!(supervisor.live(), 3);
        assert_eq!(supervisor.closed(), 7);
    }

    #[test]
    fn a_file_too_short_for_every_word_is_refused() {
        // Four words: what a loop clock held before the open count joined it.
        let fd = sealable(32);
        rustix::fs::fcntl_add_seals(&fd, clock_seals()).unwrap();
        assert!(LoopClockView::from_fd(fd).is_err());
    }

    #[test]
    fn a_descriptor_that_is_not_a_clock_is_refused() {
        let (a, _b) = socketpair_cloexec().unwrap();
        assert!(LoopClockView::from_fd(a).is_err());
    }

    fn sealable(len: u64) -> OwnedFd {
        let flags = rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING;
        let fd = rustix::fs::memfd_create("test", flags).unwrap();
        rustix::fs::ftruncate(&fd, len).unwrap();
        fd
    }

    #[test]
    fn an_unsealed_memfd_is_refused() {
        // What a hostile worker would send: memory it can truncate under the mapping.
        let fd = sealable(CLOCK_LEN as u64);
        let err = LoopClockView::from_fd(fd.try_clone().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        // Sealed against shrinking only: it could still be grown and the seals changed.
        rustix::fs::fcntl_add_seals(&fd, rustix::fs::SealFlags::SHRINK).unwrap();
        assert!(LoopClockView::from_fd(fd).is_err());
        // A memfd created without sealing allowed carries F_SEAL_SEAL alone.
        let fd = rustix::fs::memfd_create("nosealing", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, CLOCK_LEN as u64).unwrap();
        assert!(LoopClockView::from_fd(fd).is_err());
    }

    #[test]
    fn the_worker_cannot_truncate_its_clock_under_the_supervisor() {
        let (worker, supervisor) = both_ends();
        // The worker's own descriptor, as a hostile handler would find it.
        let err = rustix::fs::ftruncate(worker.as_fd(), 0).unwrap_err();
        assert_eq!(err, rustix::io::Errno::PERM);
        let err = rustix::fs::ftruncate(worker.as_fd(), 1 << 20).unwrap_err();
        assert_eq!(err, rustix::io::Errno::PERM);
        worker.woke();
        assert!(supervisor.awake_for().is_some(), "the mapping still reads");
    }
}
