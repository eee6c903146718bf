//! [`ServerBuilder`] and [`Server`]: configuration, consumed by value, then `run()`.
//!
//! # The re-exec contract
//!
//! Workers are started by executing the running program again (`/proc/self/exe`, with the
//! same arguments), never by `fork()`. So `main()` runs once in the supervisor and once in
//! every worker, and both must reach [`Server::run`] with the same configuration. Keep
//! everything before `run()` deterministic and free of side effects: parse arguments and
//! build the server, but open no files, sockets or connections there. Per-worker resources
//! belong in the handler factory or the setup of
//! [`ServerBuilder::serve_with`], which run inside the worker. `bind` only records
//! addresses; sockets are created by the supervisor inside `run()`.

use std::future::Future;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;

pub(crate) use crate::config::Config;
use crate::config::{ListenSpec, RestartLimits, UnixPerms, first_duplicate};
use crate::dispatch::{Dispatch, Distribution};
use crate::error::{BoxError, Error};
use crate::handle::{Control, ServerHandle};
use crate::handler::{Handler, WorkerId};
use crate::lifecycle::Worker;
use crate::resolve::ToListenAddrs;

/// Configures a [`Server`]. Create it with [`Server::builder`].
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use coreloop::{Conn, Server};
/// use tokio::io::AsyncWriteExt;
///
/// async fn hello(mut conn: Conn) -> std::io::Result<()> {
///     conn.stream_mut().write_all(b"hello\n").await
/// }
///
/// fn main() -> Result<(), coreloop::Error> {
///     Server::builder()
///         .bind("127.0.0.1:8080")?
///         .workers(4)
///         .shutdown_timeout(Duration::from_secs(10))
///         .serve(|_worker| hello)
///         .run()
/// }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a ServerBuilder does nothing until `.serve(..).run()`"]
pub struct ServerBuilder {
    config: Config,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        Self {
            config: Config {
                listeners: Vec::new(),
                default_listeners: Vec::new(),
                workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
                shutdown_timeout: Duration::from_secs(30),
                tcp_nodelay: true,
                backlog: 1024,
                restart_limits: RestartLimits {
                    start_failures: 10,
                    spawns_per_second: 20,
                },
                heartbeat_timeout: Duration::from_secs(10),
                max_connections: 25_000,
                recycle_after: None,
                recycle_rss_kib: None,
                max_concurrent_recycles: 1,
                dispatch: Dispatch::default(),
                distribution: Distribution::default(),
                acceptors: None,
                pin_workers: false,
                pin_supervisor: None,
                worker_ids: None,
                metrics: None,
                upgrade_timeout: Duration::from_secs(30),
                pid_file: None,
            },
        }
    }
}

impl ServerBuilder {
    /// Adds listeners at `addr`: `HOST:PORT` (a TCP listener for every address the host
    /// resolves to, IPv4 and IPv6 alike; an IPv6 socket is bound `IPV6_V6ONLY`),
    /// `[V6]:PORT`, `unix:PATH` (as [`bind_unix`](Self::bind_unix)), `systemd` or
    /// `systemd:NAME` (as [`bind_systemd`](Self::bind_systemd) and
    /// [`bind_systemd_named`](Self::bind_systemd_named)); or a [`SocketAddr`](std::net::SocketAddr), an
    /// `(ip, port)` pair, a [`ListenAddr`](crate::ListenAddr): anything [`ToListenAddrs`]. Call it again for
    /// more addresses.
    ///
    /// Listeners are numbered in the order they are added, from 0: that is what
    /// [`Conn::listener`](crate::Conn::listener) reports, so a handler serving several
    /// protocols can tell them apart. Port 0 asks the kernel for a free port; the
    /// supervisor's `serving` log line reports the port it got.
    ///
    /// Nothing is bound here: the supervisor binds in [`Server::run`], which reports a port
    /// in use as [`Error::Bind`]. Without any `bind`, the server listens on the sockets
    /// systemd passed, if any, else on its [`bind_default`](Self::bind_default) address.
    ///
    /// # Errors
    ///
    /// [`Error::Address`] when `addr` does not parse or resolve; [`Error::Duplicate`] when
    /// one of its addresses is already bound (`localhost:7000` after `127.0.0.1:7000`, for
    /// example), which would shift the listeners' numbers.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use coreloop::{Conn, Server};
    /// # async fn hello(_: Conn) -> std::io::Result<()> { Ok(()) }
    /// Server::builder()
    ///     .bind("127.0.0.1:8080")? // listener 0
    ///     .bind("unix:/run/app.sock")? // listener 1
    ///     .serve(|_| hello)
    ///     .run()?;
    /// # Ok::<(), coreloop::Error>(())
    /// ```
    pub fn bind<A: ToListenAddrs>(mut self, addr: A) -> Result<Self, Error> {
        for addr in addr.to_listen_addrs()? {
            let spec = ListenSpec::from(addr);
            self.config.listeners.push(spec);
            if let Some(addr) = first_duplicate(&self.config.listeners) {
                return Err(Error::Duplicate { addr });
            }
        }
        Ok(self)
    }

    /// Listens on `addr` (in [`bind`](Self::bind)'s syntax) only if nothing else is
    /// configured: no `bind…` call, and no socket passed to this process by systemd
    /// (socket activation), which it would serve instead. The rule of a command line
    /// whose `--bind` flag has a default. Default: none (a server with no listener at all
    /// fails with [`Error::Config`]).
    ///
    /// # Errors
    ///
    /// [`Error::Address`] when `addr` does not parse or resolve.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use coreloop::{Conn, Server};
    /// # async fn hello(_: Conn) -> std::io::Result<()> { Ok(()) }
    /// // `./server` listens on 127.0.0.1:8080;
    /// // `systemd-socket-activate -l 127.0.0.1:9000 ./server` on port 9000.
    /// Server::builder()
    ///     .bind_default("127.0.0.1:8080")?
    ///     .serve(|_| hello)
    ///     .run()?;
    /// # Ok::<(), coreloop::Error>(())
    /// ```
    pub fn bind_default<A: ToListenAddrs>(mut self, addr: A) -> Result<Self, Error> {
        self.config.default_listeners = addr
            .to_listen_addrs()?
            .into_iter()
            .map(ListenSpec::from)
            .collect();
        if let Some(addr) = first_duplicate(&self.config.default_listeners) {
            return Err(Error::Duplicate { addr });
        }
        Ok(self)
    }

    /// Adds a unix-socket listener at `path`, its file created with mode `0600` (only its
    /// owner, the supervisor's user, may connect; see
    /// [`bind_unix_with`](Self::bind_unix_with)). A stale socket file left by a dead server
    /// is replaced; a path where a live server listens, or that is not a socket, is an
    /// [`Error::Bind`] at `run()`, and binding the same path twice an [`Error::Duplicate`].
    /// The file is removed when the server stops. The same as `bind("unix:PATH")`.
    pub fn bind_unix(self, path: impl Into<PathBuf>) -> Self {
        self.bind_unix_with(path, 0o600, None)
    }

    /// Like [`bind_unix`](Self::bind_unix), with the socket file's permission bits and,
    /// optionally, its owner `(uid, gid)`. They are set between `bind` and `listen`, so no
    /// client can connect while the file still has other permissions.
    pub fn bind_unix_with(
        mut self,
        path: impl Into<PathBuf>,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Self {
        let perms = UnixPerms {
            mode: mode & 0o7777,
            owner,
        };
        self.config
            .listeners
            .push(ListenSpec::Unix(path.into(), perms));
        self
    }

    /// Serves Prometheus metrics (`GET /metrics`, OpenMetrics text) and a readiness probe
    /// (`GET /healthz`: 200 while a worker is ready and the server is not stopping, else
    /// 503) from the supervisor at `addr`. Per worker: connections forwarded, live
    /// connections, RSS, heartbeat lag, restarts by reason; per listener: accepts and
    /// accept errors; the dispatch latency as a histogram. Default: off.
    ///
    /// # Errors
    ///
    /// [`Error::Address`] when `addr` does not resolve. A port in use is an
    /// [`Error::Bind`] at `run()`.
    pub fn metrics<A: ToSocketAddrs + std::fmt::Debug>(mut self, addr: A) -> Result<Self, Error> {
        let resolved = addr.to_socket_addrs().ok().and_then(|mut all| all.next());
        let Some(resolved) = resolved else {
            return Err(Error::Address {
                addr: format!("{addr:?}"),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "resolved to no address",
                ),
            });
        };
        self.config.metrics = Some(resolved);
        Ok(self)
    }

    /// Pins worker `k` to the `k`-th CPU this process may run on (modulo their number), so
    /// that each event loop keeps its core and its caches. Default: off.
    pub fn pin_workers(mut self, on: bool) -> Self {
        self.config.pin_workers = on;
        self
    }

    /// Pins the supervisor (accepting and dispatching) to one CPU, by index among the CPUs
    /// this process may run on. Default: not pinned.
    pub fn pin_supervisor(mut self, cpu: Option<usize>) -> Self {
        self.config.pin_supervisor = cpu;
        self
    }

    /// Runs workers as user `uid` and group `gid` (supplementary groups dropped) while the
    /// supervisor keeps its own identity: bind port 80 as root, serve as `nobody`. A worker
    /// that finds itself still running as root when asked to drop refuses to start, which
    /// halts the server at boot ([`Error::WorkerStart`]).
    pub fn worker_user(mut self, uid: u32, gid: u32) -> Self {
        self.config.worker_ids = Some((uid, gid));
        self
    }

    /// Listens on the sockets systemd passed to the supervisor (socket activation:
    /// `LISTEN_FDS`, `LISTEN_PID`), every one of them. Each must be a listening stream
    /// socket (TCP or unix); anything else is an [`Error::Bind`] at `run()`, and so is
    /// finding none. They are forwarded to workers like any listener, and all share the
    /// [`Conn::listener`](crate::Conn::listener) index of this call. The same as
    /// `bind("systemd")`.
    ///
    /// A server configured with no listener at all does this by itself when systemd
    /// passed it sockets. A server with listeners that were all configured otherwise logs
    /// a warning naming each passed socket it leaves unused.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use coreloop::{Conn, Server};
    /// # async fn hello(_: Conn) -> std::io::Result<()> { Ok(()) }
    /// // systemd-socket-activate -l 127.0.0.1:8080 ./server
    /// Server::builder().bind_systemd().serve(|_| hello).run()?;
    /// # Ok::<(), coreloop::Error>(())
    /// ```
    pub fn bind_systemd(mut self) -> Self {
        self.config.listeners.push(ListenSpec::Systemd(None));
        self
    }

    /// Like [`bind_systemd`](Self::bind_systemd), only the sockets named `name` in
    /// `LISTEN_FDNAMES` (a socket unit's `FileDescriptorName=`). The same as
    /// `bind("systemd:NAME")`.
    pub fn bind_systemd_named(mut self, name: impl Into<String>) -> Self {
        self.config
            .listeners
            .push(ListenSpec::Systemd(Some(name.into())));
        self
    }

    /// Number of worker processes. Default: the number of CPUs this process may run on.
    /// `0` is rejected by `run()` with [`Error::Config`].
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n;
        self
    }

    /// How long a draining worker may take to finish its connections before it is killed.
    /// Default: 30 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// Set `TCP_NODELAY` on accepted TCP connections. Default: `true`.
    pub fn tcp_nodelay(mut self, on: bool) -> Self {
        self.config.tcp_nodelay = on;
        self
    }

    /// Length of each listener's accept queue. Default: 1024 (the kernel caps it at
    /// `net.core.somaxconn`).
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.config.backlog = backlog;
        self
    }

    /// When the server gives up on a worker that cannot start: after `failures` start
    /// failures in a row of one worker slot (its factory failed, or it exited or was
    /// killed before it was ready), the server stops and `run()` returns
    /// [`Error::StartFailures`]. A start failure while the server boots stops it at once
    /// ([`Error::WorkerStart`]). Default: 10 (`0` counts as 1).
    ///
    /// Only start failures count. A worker that was ready and then died, whatever killed
    /// it, is replaced at once and never stops the server. Between start failures of a
    /// slot, the restart waits 100 ms · 2ⁿ⁻¹ (at most 10 s, jittered); a worker of that
    /// slot that gets ready resets the count and the wait.
    pub fn start_failure_limit(mut self, failures: u32) -> Self {
        self.config.restart_limits.start_failures = failures;
        self
    }

    /// Most workers restarted within any one second: restarts over the ceiling wait their
    /// turn (none is dropped), so that workers dying in a storm cannot turn the
    /// supervisor into a fork bomb. Boot, reload, recycling and scaling are not counted.
    /// Default: 20 (`0` counts as 1).
    pub fn spawn_rate_limit(mut self, per_second: u32) -> Self {
        self.config.restart_limits.spawns_per_second = per_second;
        self
    }

    /// Hang detection: a worker whose event loop has not reported for this long is killed
    /// and replaced. A worker stops receiving new connections once it has been
    /// silent for three report intervals. Workers report every `timeout / 10` (between 20 ms and 1 s). Default: 10 s.
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.config.heartbeat_timeout = timeout;
        self
    }

    /// Most connections one worker holds at once. A worker at its cap gets no new
    /// connections; when every worker is at its cap the supervisor stops accepting (clients
    /// wait in the kernel's backlog) until one frees up. The cap is also kept below the
    /// worker's `RLIMIT_NOFILE`, so a worker is never sent a descriptor it cannot
    /// install. Default: 25,000.
    pub fn max_connections_per_worker(mut self, max: usize) -> Self {
        self.config.max_connections = max;
        self
    }

    /// Recycling: replace a worker gracefully after it has been handed `connections`
    /// connections, plus a random `0..=jitter` so that workers do not all recycle at once.
    /// The replacement is ready before the old worker stops taking connections. Default: off.
    pub fn recycle_after(mut self, connections: u64, jitter: u64) -> Self {
        self.config.recycle_after = Some((connections.max(1), jitter));
        self
    }

    /// Recycling: replace a worker gracefully once its resident set passes `bytes`.
    /// Default: off.
    pub fn recycle_above_rss(mut self, bytes: u64) -> Self {
        self.config.recycle_rss_kib = Some(bytes / 1024);
        self
    }

    /// How many workers may be recycling at the same time. Default: 1.
    pub fn max_concurrent_recycles(mut self, n: usize) -> Self {
        self.config.max_concurrent_recycles = n.max(1);
        self
    }

    /// How the supervisor picks a worker for each new connection. Default:
    /// [`Dispatch::LeastConnections`].
    pub fn dispatch(mut self, policy: Dispatch) -> Self {
        self.config.dispatch = policy;
        self
    }

    /// How long the new generation of a binary upgrade (SIGUSR2 or
    /// [`ServerHandle::upgrade`]) may take until all its workers serve; past it, the new
    /// generation is stopped and the running one keeps serving. Default: 30 s.
    pub fn upgrade_timeout(mut self, timeout: Duration) -> Self {
        self.config.upgrade_timeout = timeout;
        self
    }

    /// Writes the serving supervisor's process id to `path` (like nginx's `pid` and
    /// gunicorn's `--pid`): once the server serves, and again by the new supervisor after
    /// a binary upgrade, so `kill -USR2 $(cat path)` always reaches the current one. The
    /// file is replaced atomically and removed when the server stops. Not needed under
    /// systemd, which tracks the main process itself.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.pid_file = Some(path.into());
        self
    }

    /// Who accepts TCP connections: the supervisor, forwarding them
    /// ([`Distribution::Forward`], the default), or each worker on its own `SO_REUSEPORT`
    /// socket ([`Distribution::ReusePort`]).
    pub fn distribution(mut self, distribution: Distribution) -> Self {
        self.config.distribution = distribution;
        self
    }

    /// Accept loops in the supervisor: each runs on a thread of its own (the first on the
    /// supervisor's main thread), accepts on its own `SO_REUSEPORT` sibling of every TCP
    /// listener, and dispatches to every worker on the same load picture. One loop forwards
    /// for about five workers of a small HTTP responder before its core is the limit; more
    /// let connection-per-request throughput grow with the cores. Default: one per five
    /// workers (one up to five). `0` is an error at [`run`](Server::run). Ignored with
    /// [`Distribution::ReusePort`].
    ///
    /// With more than one, TCP listeners are bound with `SO_REUSEPORT`: another process of
    /// the same user could bind the same address and take a share of its connections, as
    /// with nginx's `reuseport`.
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = coreloop::ServerBuilder::default().workers(16).acceptors(4);
    /// # drop(builder);
    /// ```
    pub fn acceptors(mut self, k: usize) -> Self {
        self.config.acceptors = Some(k);
        self
    }

    /// Finishes the configuration with a handler factory, called once in each worker
    /// process to build that worker's handler.
    ///
    /// The factory runs inside the worker's runtime (so it may `spawn_local`), and what it
    /// returns need not be `Send`: per-worker `Rc` state is fine. It runs again in every
    /// replacement worker. For a setup that awaits (opening a pool), can fail, or needs a
    /// drain hook, use [`serve_with`](Self::serve_with).
    pub fn serve<F, H>(self, factory: F) -> Server<H>
    where
        F: Fn(WorkerId) -> H + 'static,
        H: Handler,
    {
        self.try_serve(move |id| Ok::<_, std::convert::Infallible>(factory(id)))
    }

    /// Like [`serve`](Self::serve), with a factory that can fail. A worker whose factory
    /// fails while the server boots stops the server: `run()` returns
    /// [`Error::WorkerStart`] with the factory's error.
    pub fn try_serve<F, H, E>(self, factory: F) -> Server<H>
    where
        F: Fn(WorkerId) -> Result<H, E> + 'static,
        H: Handler,
        E: Into<BoxError>,
    {
        self.serve_with(move |worker: Worker| {
            std::future::ready(factory(worker.id()).map_err(Into::<BoxError>::into))
        })
    }

    /// Finishes the configuration with an asynchronous per-worker setup: it opens what
    /// the worker needs (a database pool, a warm cache), may start background tasks and
    /// register drain hooks through its [`Worker`], and returns the worker's handler.
    ///
    /// The setup runs once in each worker process (again in every replacement), inside
    /// the worker's runtime, before the worker reports ready: no connection reaches a
    /// worker whose setup has not finished. An error fails the worker's start, with the
    /// error as its reason in the log; while the server boots, that stops the server and
    /// `run()` returns [`Error::WorkerStart`]. A reload's replacement that is not ready
    /// within 60 s is killed and its predecessor kept; at boot the supervisor waits as
    /// long as the setup takes (SIGTERM still stops it).
    ///
    /// Neither the setup's future nor the handler need be `Send`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::rc::Rc;
    /// use coreloop::{Conn, Server, Worker};
    /// use tokio::io::AsyncWriteExt;
    ///
    /// async fn load_greeting() -> std::io::Result<String> {
    ///     Ok("hello".to_owned()) // say, from a database
    /// }
    ///
    /// fn main() -> Result<(), coreloop::Error> {
    ///     Server::builder()
    ///         .bind("127.0.0.1:7000")?
    ///         .serve_with(|worker: Worker| async move {
    ///             let greeting: Rc<str> = load_greeting().await?.into();
    ///             worker.on_drain(async { /* flush per-worker state */ });
    ///             Ok::<_, std::io::Error>(move |mut conn: Conn| {
    ///                 let greeting = Rc::clone(&greeting);
    ///                 async move { conn.stream_mut().write_all(greeting.as_bytes()).await }
    ///             })
    ///         })
    ///         .run()
    /// }
    /// ```
    pub fn serve_with<F, Fut, H, E>(self, setup: F) -> Server<H>
    where
        F: Fn(Worker) -> Fut + 'static,
        Fut: Future<Output = Result<H, E>> + 'static,
        H: Handler,
        E: Into<BoxError>,
    {
        Server {
            config: self.config,
            factory: Box::new(move |worker| {
                let setup = setup(worker);
                Box::pin(async move { setup.await.map_err(Into::into) })
            }),
            control: Control::new(),
        }
    }
}

pub(crate) use crate::lifecycle::Factory;

/// A configured server. [`run`](Server::run) it.
#[must_use = "a Server does nothing until `.run()`"]
pub struct Server<H> {
    pub(crate) config: Config,
    pub(crate) factory: Factory<H>,
    control: Control,
}

impl<H> std::fmt::Debug for Server<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Server<()> {
    /// Starts configuring a server.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }
}

impl<H> Server<H> {
    /// A handle to control the running server from another thread of the supervisor
    /// process: stop, reload, scale. Take it before calling [`run`](Self::run).
    ///
    /// In a worker process the handle is inert: its commands return
    /// [`ServerGone`](crate::ServerGone).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use coreloop::{Conn, Server};
    /// # async fn hello(_: Conn) -> std::io::Result<()> { Ok(()) }
    /// let server = Server::builder().bind("127.0.0.1:8080")?.serve(|_| hello);
    /// let handle = server.handle();
    /// // main() runs in the workers too: start supervisor-only threads in the supervisor.
    /// if !coreloop::is_worker() {
    ///     std::thread::spawn(move || {
    ///         // ... later, e.g. on a deploy hook:
    ///         let _ = handle.reload();
    ///     });
    /// }
    /// server.run()?;
    /// # Ok::<(), coreloop::Error>(())
    /// ```
    pub fn handle(&self) -> ServerHandle {
        self.control.handle()
    }
}

impl<H: Handler> Server<H> {
    /// Runs the server until it is stopped; blocks the calling thread.
    ///
    /// In the supervisor (the process you started), this binds the listeners, starts the
    /// workers, accepts and dispatches connections, restarts workers that die, and on
    /// SIGTERM or SIGINT drains the workers within the shutdown timeout and returns
    /// `Ok(())`. In a worker process (the same program, re-executed by the supervisor), it
    /// serves connections and **never returns**: the process exits when the worker is
    /// done, with status 0, or 1 if the worker could not start.
    ///
    /// # Errors
    ///
    /// In the supervisor: [`Error::Config`], [`Error::Duplicate`], [`Error::Bind`],
    /// [`Error::Runtime`], [`Error::NestedRuntime`], [`Error::Signal`],
    /// [`Error::SpawnWorker`], [`Error::WorkerStart`], [`Error::WorkerExited`] and
    /// [`Error::StartFailures`]. Nothing is left running when it returns an error.
    pub fn run(self) -> Result<(), Error> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::NestedRuntime);
        }
        match crate::process::current() {
            crate::process::Role::Worker(id) => {
                // Commands are the supervisor's: in a worker, handles report `ServerGone`.
                let Server {
                    config,
                    factory,
                    control,
                } = self;
                drop(control.into_inbox());
                let config = crate::listener::worker_listeners(config);
                crate::worker::run(config, factory, id)
            }
            crate::process::Role::Supervisor | crate::process::Role::Successor => {
                crate::supervisor::run(self.config, self.control.into_inbox())
            }
        }
    }
}
