//! What `run()` needs besides the handler factory: the configuration a
//! [`ServerBuilder`](crate::ServerBuilder) records, read by the supervisor, the workers and
//! the listeners alike. Plain data with no behaviour of its own, at the bottom of the
//! crate's modules, so that everything can read it and it depends on nothing that reads it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::addr::ListenAddr;
use crate::dispatch::{Dispatch, Distribution};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ListenSpec {
    Tcp(SocketAddr),
    Unix(PathBuf, UnixPerms),
    /// Sockets passed by systemd (socket activation): all of them, or those with this name
    /// in `LISTEN_FDNAMES`.
    Systemd(Option<String>),
}

impl ListenSpec {
    /// Where it listens, without the unix-socket file's permissions.
    pub(crate) fn addr(&self) -> ListenAddr {
        match self {
            ListenSpec::Tcp(addr) => ListenAddr::Tcp(*addr),
            ListenSpec::Unix(path, _) => ListenAddr::Unix(path.clone()),
            ListenSpec::Systemd(name) => ListenAddr::Systemd(name.clone()),
        }
    }
}

impl From<ListenAddr> for ListenSpec {
    fn from(addr: ListenAddr) -> Self {
        match addr {
            ListenAddr::Tcp(addr) => ListenSpec::Tcp(addr),
            ListenAddr::Unix(path) => ListenSpec::Unix(path, UnixPerms::default()),
            ListenAddr::Systemd(name) => ListenSpec::Systemd(name),
        }
    }
}

impl std::fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr().fmt(f)
    }
}

/// The first address that `specs` name twice. Port 0 is never a duplicate: each such
/// listener gets its own port.
pub(crate) fn first_duplicate(specs: &[ListenSpec]) -> Option<ListenAddr> {
    let mut seen = std::collections::HashSet::new();
    specs
        .iter()
        .map(ListenSpec::addr)
        .filter(|addr| !matches!(addr, ListenAddr::Tcp(tcp) if tcp.port() == 0))
        .find(|addr| !seen.insert(addr.clone()))
}

/// Everything `run()` needs besides the handler factory.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) listeners: Vec<ListenSpec>,
    /// Listeners used when `listeners` is empty and systemd passed no socket.
    pub(crate) default_listeners: Vec<ListenSpec>,
    pub(crate) workers: usize,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) tcp_nodelay: bool,
    pub(crate) backlog: u32,
    pub(crate) restart_limits: RestartLimits,
    pub(crate) heartbeat_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) recycle_after: Option<(u64, u64)>,
    pub(crate) recycle_rss_kib: Option<u64>,
    pub(crate) max_concurrent_recycles: usize,
    pub(crate) dispatch: Dispatch,
    pub(crate) distribution: Distribution,
    /// Accept loops in the supervisor; `None`: one per [`WORKERS_PER_ACCEPTOR`] workers.
    pub(crate) acceptors: Option<usize>,
    pub(crate) pin_workers: bool,
    pub(crate) pin_supervisor: Option<usize>,
    /// Run workers as this user and group (numeric ids).
    pub(crate) worker_ids: Option<(u32, u32)>,
    /// Where the supervisor serves `/metrics` and `/healthz`.
    pub(crate) metrics: Option<SocketAddr>,
    /// How long a new generation may take to serve in a binary upgrade.
    pub(crate) upgrade_timeout: Duration,
    /// Where the serving supervisor writes its process id.
    pub(crate) pid_file: Option<PathBuf>,
}

/// Mode and owner of a unix-socket listener's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnixPerms {
    pub(crate) mode: u32,
    pub(crate) owner: Option<(u32, u32)>,
}

impl Default for UnixPerms {
    fn default() -> Self {
        Self {
            mode: 0o600,
            owner: None,
        }
    }
}

/// Workers one accept loop keeps busy, for the automatic number of accept loops: a loop
/// spends about a fifth of what a worker running a small HTTP responder spends per
/// connection (docs/benchmarks.md, "Scaling model"), so it saturates at about five.
pub(crate) const WORKERS_PER_ACCEPTOR: usize = 5;

impl Config {
    /// The accept loops to run: as configured, or one per [`WORKERS_PER_ACCEPTOR`] workers.
    /// One when workers accept for themselves ([`Distribution::ReusePort`]): only unix
    /// listeners are forwarded then.
    pub(crate) fn acceptor_count(&self) -> usize {
        if self.distribution == Distribution::ReusePort {
            return 1;
        }
        self.acceptors
            .unwrap_or_else(|| self.workers.div_ceil(WORKERS_PER_ACCEPTOR))
            .max(1)
    }

    /// How often a worker reports from inside its event loop.
    pub(crate) fn heartbeat_interval(&self) -> Duration {
        (self.heartbeat_timeout / 10).clamp(Duration::from_millis(20), Duration::from_secs(1))
    }
}

/// The limits of the restart policy (see the supervisor's `restart` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RestartLimits {
    /// Consecutive start failures of one slot that stop the server (at least 1).
    pub(crate) start_failures: u32,
    /// Most restarts started within any one second (at least 1).
    pub(crate) spawns_per_second: u32,
}
