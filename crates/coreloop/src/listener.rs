//! Listening sockets: created by the supervisor before its runtime starts, accepted from
//! with a raw non-blocking `accept4`.
//!
//! Accepted sockets are never registered with the supervisor's reactor: they are only
//! passed on, so `accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)` on the listener's readiness is
//! the whole cost (no `epoll_ctl` add and delete per connection, as a tokio `TcpStream`
//! would cost). `SOCK_NONBLOCK` lives on the open file description, which the worker
//! shares, so the worker can hand the socket straight to tokio.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use coreloop_ipc::PeerAddr;
use coreloop_ipc::Readiness;
use rustix::net::SocketFlags;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, warn};

use crate::addr::ListenAddr;
use crate::config::{Config, ListenSpec, UnixPerms, first_duplicate};
use crate::dispatch::Distribution;
use crate::error::Error;

/// Whether this process may remove the unix-socket files of its listeners when they
/// close. A supervisor owns them, except around a binary upgrade: the new supervisor owns
/// them only once it has taken over (if it is rolled back, the running server still uses
/// the files), and the old one gives them up when it hands over.
static OWNS_SOCKET_FILES: AtomicBool = AtomicBool::new(true);

/// Sets whether this process removes its unix-socket files when its listeners close.
pub(crate) fn own_socket_files(owns: bool) {
    OWNS_SOCKET_FILES.store(owns, Ordering::SeqCst);
}

/// A listening socket that crosses a binary upgrade, as
/// [`Message::Listener`](coreloop_ipc::Message::Listener) describes it: what the old
/// supervisor sends and what the new one adopts.
#[derive(Debug)]
pub(crate) struct Handover {
    /// The configured listener it was bound for ([`ListenSpec`]'s display form, or
    /// `metrics:ADDR`).
    pub(crate) spec: String,
    /// systemd's name for it, or empty.
    pub(crate) name: String,
    pub(crate) fd: OwnedFd,
}

/// A bound, listening socket that the supervisor owns.
#[derive(Debug)]
pub(crate) struct Bound {
    /// What it is, for logs: the address it got (the real port when port 0 was asked
    /// for), `unix:PATH`, or `systemd:NAME(address)`.
    pub(crate) label: String,
    /// The address it is bound to, as the kernel reports it (`getsockname`): the real
    /// port of a port-0 listener. `None` for an unnamed or abstract unix socket passed by
    /// systemd.
    pub(crate) local: Option<ListenAddr>,
    /// The configured listener it serves ([`ListenSpec`]'s display form) and, for a
    /// socket from systemd, its name: what a binary upgrade hands over with it.
    pub(crate) spec: String,
    pub(crate) name: String,
    /// Index in the configuration's listener list (what `Conn::listener` reports).
    pub(crate) index: u16,
    /// Whether the supervisor accepts on it. In `ReusePort` mode a TCP address is only
    /// reserved here (bound, not listening, so the kernel gives it no connections): each
    /// worker listens on its own socket.
    pub(crate) accepts: bool,
    pub(crate) fd: OwnedFd,
    /// For unix listeners: the file to remove when the server stops, with the identity
    /// (device, inode) of the socket file we created, so we never remove someone else's.
    unix_file: Option<UnixFile>,
}

/// A unix-socket file this process created: its path and identity (device, inode).
type UnixFile = (PathBuf, u64, u64);

impl Bound {
    /// Whether it is a TCP socket (not unix).
    pub(crate) fn is_tcp(&self) -> bool {
        matches!(self.local, Some(ListenAddr::Tcp(_)))
    }

    /// Another socket listening for the same configured listener: an `SO_REUSEPORT`
    /// sibling, or a duplicate of this one. Carries no socket file.
    pub(crate) fn with_fd(&self, fd: OwnedFd, name: &str) -> Self {
        Self {
            label: self.label.clone(),
            local: self.local.clone(),
            spec: self.spec.clone(),
            name: name.to_owned(),
            index: self.index,
            accepts: self.accepts,
            fd,
            unix_file: None,
        }
    }

    /// A duplicate descriptor of the same socket (see [`Bound::with_fd`]).
    pub(crate) fn duplicate(&self) -> io::Result<Self> {
        Ok(self.with_fd(self.fd.try_clone()?, &self.name))
    }
}

/// A socket passed by systemd, with its `LISTEN_FDNAMES` name.
type Inherited = (OwnedFd, String);

/// Environment variable telling a worker that the supervisor listens on the
/// configuration's default listeners ([`ServerBuilder::bind_default`]): the worker cannot
/// tell by itself, as it does not see the sockets systemd passed to the supervisor.
///
/// [`ServerBuilder::bind_default`]: crate::ServerBuilder::bind_default
const ENV_DEFAULT_LISTENERS: &str = "CORELOOP_DEFAULT_LISTENERS";

/// Whether systemd passed sockets to this process (`LISTEN_PID` is this process and
/// `LISTEN_FDS` is positive), without taking them.
fn systemd_passed() -> bool {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| pid == std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    ours && count > 0
}

/// Supervisor: the listeners to bind when none was configured: the sockets systemd
/// passed (or that the previous supervisor of a binary upgrade served from systemd), else
/// the default listeners. Then checks that no address is configured twice.
fn settle_listeners(config: &mut Config, adopted: &[Handover]) -> Result<(), Error> {
    if config.listeners.is_empty() {
        let systemd = ListenSpec::Systemd(None);
        let handed_over = adopted.iter().any(|a| a.spec == systemd.to_string());
        if systemd_passed() || handed_over {
            info!("no listener configured: serving the sockets systemd passed");
            config.listeners = vec![systemd];
        } else {
            config.listeners = config.default_listeners.clone();
        }
    }
    if config.listeners.is_empty() {
        return Err(Error::Config(
            "no listener: call bind(), or start the server with systemd socket activation".into(),
        ));
    }
    if let Some(addr) = first_duplicate(&config.listeners) {
        return Err(Error::Duplicate { addr });
    }
    Ok(())
}

/// Supervisor, when starting a worker: the environment telling it whether the default
/// listeners are in use (see [`worker_listeners`]).
pub(crate) fn worker_env(config: &Config) -> Option<(&'static str, &'static str)> {
    let defaulted =
        !config.default_listeners.is_empty() && config.listeners == config.default_listeners;
    defaulted.then_some((ENV_DEFAULT_LISTENERS, "1"))
}

/// Worker: its configuration with the listeners the supervisor settled on, as far as a
/// worker needs them (its own `SO_REUSEPORT` sockets are bound from them): the default
/// listeners when the supervisor uses them, else the configured ones (none, when the
/// supervisor serves systemd's sockets).
pub(crate) fn worker_listeners(mut config: Config) -> Config {
    if config.listeners.is_empty() && std::env::var_os(ENV_DEFAULT_LISTENERS).is_some() {
        config.listeners = config.default_listeners.clone();
    }
    config
}

/// Logs, and closes, the sockets systemd passed that no listener uses: a socket nobody
/// accepts on would leave its clients waiting until they time out.
fn warn_unused(unused: impl IntoIterator<Item = Inherited>) {
    for (fd, name) in unused {
        let addr = local_of(&fd).map_or_else(
            |err| format!("unknown ({err})"),
            |local| local.map_or_else(|| "unix".into(), |addr| addr.to_string()),
        );
        warn!(
            listener.name = %name,
            listener.addr = %addr,
            fd = std::os::fd::AsRawFd::as_raw_fd(&fd),
            event = "systemd_socket_unused",
            "systemd passed a socket that no listener uses; closing it (bind `systemd` or `systemd:NAME` to serve it)"
        );
    }
}

/// Binds every configured listener; on any failure, the ones already bound are closed
/// (and their socket files removed) before the error is returned.
///
/// With no listener configured, settles on systemd's sockets or the default listeners
/// first, and records that in `config`. Sockets passed by systemd that no listener uses
/// are logged and closed.
///
/// In the new supervisor of a binary upgrade, `adopted` holds the previous supervisor's
/// sockets: a configured listener with a socket there takes it over instead of binding
/// (the address stays open throughout); one without is bound anew; adopted sockets that
/// no listener claims are closed.
pub(crate) fn bind_all(
    config: &mut Config,
    adopted: &mut Vec<Handover>,
) -> Result<Vec<Bound>, Error> {
    settle_listeners(config, adopted)?;
    let backlog = i32::try_from(config.backlog).unwrap_or(i32::MAX);
    let nodelay = config.tcp_nodelay;
    let reuseport = config.distribution == Distribution::ReusePort;
    let mut bound = Vec::with_capacity(config.listeners.len());
    let mut passed: Passed = None;
    for (index, spec) in config.listeners.iter().enumerate() {
        // run() checked that the listeners fit in u16.
        let index = index as u16;
        let reserved = reuseport && matches!(spec, ListenSpec::Tcp(_));
        let handed_over = take_handed_over(spec, adopted);
        if !handed_over.is_empty() {
            for taken in handed_over {
                bound.push(adopt(spec, index, taken, reserved)?);
            }
            continue;
        }
        let fresh = match spec {
            ListenSpec::Tcp(addr) if reserved => {
                if addr.port() == 0 {
                    return Err(Error::Config(format!(
                        "{addr}: reuseport distribution needs a fixed port (every worker binds it)"
                    )));
                }
                bind_tcp(*addr, backlog, nodelay, Some(false)).map(|fd| (fd, false, None))
            }
            ListenSpec::Tcp(addr) => {
                // Sharded acceptors bind SO_REUSEPORT siblings of it (the `siblings` module).
                let siblings = (config.acceptor_count() > 1).then_some(true);
                bind_tcp(*addr, backlog, nodelay, siblings).map(|fd| (fd, true, None))
            }
            ListenSpec::Unix(path, perms) => bind_unix(path, backlog, *perms)
                .map(|(fd, dev, ino)| (fd, true, Some((path.clone(), dev, ino)))),
            ListenSpec::Systemd(name) => {
                bound.extend(claim_passed(spec, name.as_deref(), index, &mut passed)?);
                continue;
            }
        };
        bound.push(fresh_bound(spec, index, fresh)?);
    }
    close_unused(passed);
    Ok(bound)
}

/// The sockets systemd passed: not taken yet (`None`), or taken on the first `Systemd`
/// listener (or the failure to take them), each slot emptied when a listener claims it.
type Passed = Option<io::Result<Vec<Option<Inherited>>>>;

/// Takes, out of `adopted`, the sockets the previous supervisor handed over for `spec`:
/// all of them for a `Systemd` listener, else at most one.
fn take_handed_over(spec: &ListenSpec, adopted: &mut Vec<Handover>) -> Vec<Handover> {
    let key = spec.to_string();
    if matches!(spec, ListenSpec::Systemd(_)) {
        let (taken, rest) = std::mem::take(adopted)
            .into_iter()
            .partition(|a| a.spec == key);
        *adopted = rest;
        taken
    } else {
        // One socket per address (two port-0 listeners have the same spec).
        adopted
            .iter()
            .position(|a| a.spec == key)
            .map(|i| adopted.remove(i))
            .into_iter()
            .collect()
    }
}

/// A socket bound here: the descriptor, whether the supervisor accepts on it, and the
/// identity of its unix-socket file.
type Fresh = (OwnedFd, bool, Option<UnixFile>);

/// The listener for a socket bound here, once the kernel says which address it got.
fn fresh_bound(spec: &ListenSpec, index: u16, fresh: io::Result<Fresh>) -> Result<Bound, Error> {
    match fresh.and_then(|(fd, accepts, unix_file)| {
        let local = local_of(&fd)?;
        Ok((fd, accepts, unix_file, local))
    }) {
        Ok((fd, accepts, unix_file, local)) => Ok(Bound {
            label: describe(local.as_ref()),
            local,
            spec: spec.to_string(),
            name: String::new(),
            index,
            accepts,
            fd,
            unix_file,
        }),
        Err(source) => Err(Error::Bind {
            addr: spec.to_string(),
            source,
        }),
    }
}

/// Claims, for a `Systemd` listener (`name`: the `LISTEN_FDNAMES` name it wants, or any),
/// the sockets systemd passed that no earlier listener claimed; taking them from systemd
/// on the first call. Finding none is an error.
fn claim_passed(
    spec: &ListenSpec,
    name: Option<&str>,
    index: u16,
    passed: &mut Passed,
) -> Result<Vec<Bound>, Error> {
    let passed = passed.get_or_insert_with(|| {
        coreloop_ipc::take_systemd_listeners()
            .map(|taken| taken.into_iter().map(Some).collect::<Vec<_>>())
    });
    let sockets = match passed {
        Ok(sockets) => sockets,
        Err(err) => {
            return Err(Error::Bind {
                addr: spec.to_string(),
                source: io::Error::new(err.kind(), err.to_string()),
            });
        }
    };
    let mut claimed = Vec::new();
    for slot in sockets.iter_mut() {
        let wanted = slot
            .as_ref()
            .is_some_and(|(_, n)| name.is_none_or(|want| want == n));
        if !wanted {
            continue;
        }
        let Some((fd, fd_name)) = slot.take() else {
            continue;
        };
        let local = check_inherited(&fd).map_err(|source| Error::Bind {
            addr: format!("{spec} (fd named {fd_name:?})"),
            source,
        })?;
        claimed.push(Bound {
            label: format!("systemd:{fd_name}({})", describe(local.as_ref())),
            local,
            spec: spec.to_string(),
            name: fd_name,
            index,
            accepts: true,
            fd,
            unix_file: None,
        });
    }
    if claimed.is_empty() {
        let reason = match name {
            Some(name) => format!("no socket named {name:?} was passed (LISTEN_FDNAMES)"),
            None => {
                "no socket was passed (LISTEN_FDS / LISTEN_PID unset or for another process)".into()
            }
        };
        return Err(Error::Bind {
            addr: spec.to_string(),
            source: io::Error::new(io::ErrorKind::NotFound, reason),
        });
    }
    Ok(claimed)
}

/// Logs and closes the sockets systemd passed that no listener claimed; takes them first
/// when no listener asked for systemd's sockets.
fn close_unused(passed: Passed) {
    match passed {
        Some(Ok(slots)) => warn_unused(slots.into_iter().flatten()),
        Some(Err(_)) => {}
        None if systemd_passed() => match coreloop_ipc::take_systemd_listeners() {
            Ok(passed) => warn_unused(passed),
            Err(err) => warn!(error = %err, "cannot take the sockets systemd passed"),
        },
        None => {}
    }
}

/// What a socket's local address says in logs.
fn describe(local: Option<&ListenAddr>) -> String {
    local.map_or_else(|| "unix".into(), ToString::to_string)
}

/// The local addresses of `bound` sockets as the kernel reports them (the real port of a
/// port-0 listener), in configuration order; `None` for an unnamed unix socket.
#[allow(dead_code)] // For `ServerHandle`'s report of the bound addresses.
pub(crate) fn local_addrs<'a>(
    bound: impl IntoIterator<Item = &'a Bound>,
) -> Vec<Option<ListenAddr>> {
    bound.into_iter().map(|b| b.local.clone()).collect()
}

/// Takes over a socket the previous supervisor handed over for `spec`.
fn adopt(spec: &ListenSpec, index: u16, taken: Handover, reserved: bool) -> Result<Bound, Error> {
    let bind_err = |source| Error::Bind {
        addr: format!("{spec} (handed over)"),
        source,
    };
    let local = if reserved {
        // A reuseport reservation is bound, not listening: nothing to accept from.
        rustix::io::ioctl_fionbio(&taken.fd, true).map_err(|err| bind_err(err.into()))?;
        local_of(&taken.fd).map_err(bind_err)?
    } else {
        check_inherited(&taken.fd).map_err(bind_err)?
    };
    let label = match spec {
        ListenSpec::Systemd(_) => format!("systemd:{}({})", taken.name, describe(local.as_ref())),
        _ => describe(local.as_ref()),
    };
    // The socket file of a unix listener stays where it is; remember its identity so
    // that the file is removed when this server stops (once it owns the files).
    let unix_file = match spec {
        ListenSpec::Unix(path, _) => std::fs::symlink_metadata(path)
            .ok()
            .filter(|meta| meta.file_type().is_socket())
            .map(|meta| (path.clone(), meta.dev(), meta.ino())),
        _ => None,
    };
    debug!(listener = %label, "listener taken over from the previous supervisor");
    Ok(Bound {
        label,
        local,
        spec: taken.spec,
        name: taken.name,
        index,
        accepts: !reserved,
        fd: taken.fd,
        unix_file,
    })
}

/// Checks that a socket passed by systemd, or handed over by the previous supervisor, is
/// a listening stream socket (TCP or unix) and makes it non-blocking; returns its
/// address.
fn check_inherited(fd: &OwnedFd) -> io::Result<Option<ListenAddr>> {
    use rustix::net::{SocketType, sockopt};
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    if sockopt::socket_type(fd)? != SocketType::STREAM {
        return Err(invalid("not a stream socket".into()));
    }
    if !sockopt::socket_acceptconn(fd)? {
        return Err(invalid(
            "not a listening socket (listen() was not called)".into(),
        ));
    }
    let local = local_of(fd)?;
    rustix::io::ioctl_fionbio(fd, true)?;
    Ok(local)
}

/// A socket's local address (`getsockname`): TCP, or the path of a unix socket (`None`
/// when it has none: unnamed or abstract).
fn local_of(fd: &impl AsFd) -> io::Result<Option<ListenAddr>> {
    let local = rustix::net::getsockname(fd)?;
    if let Ok(inet) = SocketAddr::try_from(local.clone()) {
        return Ok(Some(ListenAddr::Tcp(inet)));
    }
    match rustix::net::SocketAddrUnix::try_from(local.clone()) {
        Ok(unix) => Ok(unix
            .path_bytes()
            .map(|bytes| ListenAddr::Unix(PathBuf::from(std::ffi::OsStr::from_bytes(bytes))))),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unsupported address family {:?}", local.address_family()),
        )),
    }
}

/// Creates a TCP listener. `reuseport`: `None` for an ordinary listener; `Some(listen)` for
/// a `SO_REUSEPORT` socket, listening (a worker's) or only bound (the supervisor's
/// reservation of the address).
pub(crate) fn bind_tcp(
    addr: SocketAddr,
    backlog: i32,
    nodelay: bool,
    reuseport: Option<bool>,
) -> io::Result<OwnedFd> {
    // socket2 creates the socket with SOCK_CLOEXEC.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener (Linux copies the listening
    // socket's state): one setsockopt here instead of one per connection in the workers.
    socket.set_tcp_nodelay(nodelay)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if reuseport.is_some() {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    if reuseport != Some(false) {
        socket.listen(backlog)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn bind_unix(path: &Path, backlog: i32, perms: UnixPerms) -> io::Result<(OwnedFd, u64, u64)> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another server is listening on this socket",
                ));
            }
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                debug!(path = %path.display(), "removing stale socket file");
                std::fs::remove_file(path)?;
            }
            Err(err) => return Err(err),
        }
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    // Permissions before listen(): until then nobody can connect, whatever the umask gave.
    let prepared = std::fs::set_permissions(
        path,
        std::os::unix::fs::PermissionsExt::from_mode(perms.mode),
    )
    .and_then(|()| match perms.owner {
        Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
        None => Ok(()),
    })
    .and_then(|()| socket.listen(backlog));
    if let Err(err) = prepared {
        let _ = std::fs::remove_file(path);
        return Err(err);
    }
    socket.set_nonblocking(true)?;
    let meta = std::fs::metadata(path)?;
    Ok((socket.into(), meta.dev(), meta.ino()))
}

impl Drop for Bound {
    fn drop(&mut self) {
        if !OWNS_SOCKET_FILES.load(Ordering::SeqCst) {
            return;
        }
        if let Some((path, dev, ino)) = &self.unix_file {
            let ours = std::fs::symlink_metadata(path)
                .is_ok_and(|meta| meta.dev() == *dev && meta.ino() == *ino);
            if ours {
                if let Err(err) = std::fs::remove_file(path) {
                    warn!(path = %path.display(), error = %err, "cannot remove socket file");
                }
            }
        }
    }
}

/// A listener registered with the supervisor's reactor for readiness only.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) bound: Bound,
    pub(crate) ready: Readiness,
}

impl Listener {
    pub(crate) fn new(bound: Bound) -> io::Result<Self> {
        let fd = bound.fd.try_clone()?;
        Ok(Self {
            ready: Readiness::new(fd, tokio::io::Interest::READABLE)?,
            bound,
        })
    }
}

/// One `accept4` with `SOCK_NONBLOCK | SOCK_CLOEXEC`.
pub(crate) fn accept(listener: &impl AsFd) -> io::Result<(OwnedFd, PeerAddr)> {
    let (fd, addr) =
        rustix::net::acceptfrom_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
    let peer = match addr {
        Some(addr) => match SocketAddr::try_from(addr) {
            Ok(inet) => PeerAddr::Inet(inet),
            Err(_) => PeerAddr::Unix,
        },
        None => PeerAddr::Unknown,
    };
    Ok((fd, peer))
}

/// How to react to an `accept` error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AcceptError {
    /// Nothing more to accept now.
    WouldBlock,
    /// That one connection failed (reset or aborted before we took it); go on.
    Connection,
    /// A resource is exhausted (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`) or the error is
    /// unknown: back off before trying again, or the readiness loop would spin.
    Resource,
}

pub(crate) fn classify(err: &io::Error) -> AcceptError {
    use rustix::io::Errno;
    if err.kind() == io::ErrorKind::WouldBlock {
        return AcceptError::WouldBlock;
    }
    match err.raw_os_error().map(Errno::from_raw_os_error) {
        Some(
            Errno::CONNABORTED
            | Errno::CONNRESET
            | Errno::PROTO
            | Errno::PERM
            | Errno::INTR
            | Errno::TIMEDOUT
            | Errno::NETDOWN
            | Errno::NETUNREACH
            | Errno::HOSTDOWN
            | Errno::HOSTUNREACH
            | Errno::NOPROTOOPT
            | Errno::OPNOTSUPP,
        ) => AcceptError::Connection,
        _ => AcceptError::Resource,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_backs_off_and_resets_do_not() {
        for (errno, expected) in [
            (rustix::io::Errno::MFILE, AcceptError::Resource),
            (rustix::io::Errno::NFILE, AcceptError::Resource),
            (rustix::io::Errno::NOBUFS, AcceptError::Resource),
            (rustix::io::Errno::NOMEM, AcceptError::Resource),
            (rustix::io::Errno::CONNABORTED, AcceptError::Connection),
            (rustix::io::Errno::AGAIN, AcceptError::WouldBlock),
        ] {
            assert_eq!(classify(&io::Error::from(errno)), expected, "{errno:?}");
        }
    }
}
