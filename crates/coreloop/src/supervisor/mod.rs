//! The supervisor: owns the listeners, keeps the pool of worker processes healthy, and
//! turns signals and [`ServerHandle`](crate::ServerHandle) commands into drains, reloads,
//! scaling and upgrades. Accepting is the [`accept`](crate::accept) loop's job, and getting
//! connections to workers the [`dispatch`](crate::dispatch) module's; this module starts
//! them and carries out everything else.
//!
//! Everything runs on one `current_thread` runtime. The tasks and where each lives:
//!
//! - **the main task** ([`serve`]): boots the pool, serves until a stop, an upgrade or a
//!   fatal error, then stops ([`stop`]).
//! - **one watcher per worker** ([`watch`]): reads the worker's channel through the trust
//!   boundary ([`boundary`]: a worker that breaks the protocol is killed), reaps the
//!   process after killing what it forked, takes back the connections a dead worker never
//!   read, and carries out the restart policy's decision ([`restart`], pure code). Workers
//!   are started by [`spawn`].
//! - **the health check** ([`health`]): stops dispatching to a worker whose reports are
//!   late, kills one that hangs, ignores a drain or never gets ready, and starts
//!   recycling; and systemd's watchdog.
//! - **replacements** ([`replace`]): reload, recycling and scaling.
//! - **binary upgrade** ([`upgrade`]: starting the new generation, and the new side of the
//!   handover; [`handover`]: the old side).
//! - **status** ([`report`]): `sd_notify`, `/metrics` and `/healthz`.
//!
//! # Nothing accepted is lost to a worker's death
//!
//! The supervisor keeps a duplicate of the worker's end of every channel. Descriptors
//! queued to a worker live in that socket's receive queue, which outlives the worker's
//! process as long as the supervisor holds the duplicate: when a worker dies, the
//! supervisor reads its queue out (`Channel::try_recv`) and dispatches those connections
//! to live workers. No acknowledgement per connection is needed, so this costs nothing on
//! the hot path.

pub(crate) mod boundary;
mod handover;
mod health;
mod replace;
mod report;
mod restart;
mod serve;
mod signals;
mod spawn;
mod stop;
pub(crate) mod upgrade;
mod watch;

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use coreloop_ipc::{Channel, Message};
use tracing::{Instrument, info, warn};

use crate::config::Config;
use crate::dispatch::{Pool, XorShift};
use crate::error::Error;
use crate::exit::ExitReason;
use crate::listener;
use crate::metrics::Metrics;
use boundary::LogBudget;
use restart::RestartPolicy;
use serve::{Boot, supervise};
use upgrade::Successor;

/// Extra time the supervisor gives a draining worker beyond the shutdown timeout (the
/// worker enforces the timeout itself) before it sends SIGKILL.
const KILL_MARGIN: Duration = Duration::from_millis(500);
/// How long a worker may take to become ready: a replacement (reload, recycle) that takes
/// longer is given up, and any worker still starting after this is killed as a start
/// failure.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Descriptors a worker keeps free for its own use below `RLIMIT_NOFILE`.
const FD_RESERVE: u64 = 64;

/// Entry point in the supervisor process.
pub(crate) fn run(config: Config, commands: crate::handle::Inbox) -> Result<(), Error> {
    // The path this program was started from, read before anything can replace the file:
    // a binary upgrade runs whatever is at this path then.
    let exe = std::env::current_exe();
    // A new supervisor started by a binary upgrade: its socket files belong to the
    // running server until the handover.
    let predecessor = upgrade::predecessor()?;
    if predecessor.is_some() {
        listener::own_socket_files(false);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let upgrade = match predecessor {
        Some(fd) => {
            let _entered = runtime.enter();
            Some(Channel::from_fd(fd).map_err(|err| Error::Upgrade(format!("channel: {err}")))?)
        }
        None => None,
    };
    let result = run_in(config, commands, &runtime, upgrade.as_ref(), exe);
    if let (Err(err), Some(channel)) = (&result, &upgrade) {
        // The running supervisor waits for Ready or Failed; tell it why, so that its log
        // says. (Ignored after the handover: nobody reads the channel any more.)
        let reason = err.chain().to_string();
        let msg = Message::Failed { reason };
        let _ = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), channel.send(&msg, &[])).await
        });
    }
    result
}

fn run_in(
    mut config: Config,
    commands: crate::handle::Inbox,
    runtime: &tokio::runtime::Runtime,
    upgrade: Option<&Channel>,
    exe: std::io::Result<std::path::PathBuf>,
) -> Result<(), Error> {
    if config.workers == 0 {
        return Err(Error::Config(
            "the number of workers must be at least 1".into(),
        ));
    }
    if config.acceptors == Some(0) {
        return Err(Error::Config(
            "the number of acceptors must be at least 1".into(),
        ));
    }
    if config.listeners.len() > usize::from(u16::MAX) {
        return Err(Error::Config("too many listeners".into()));
    }
    let nofile = raise_nofile_limit();
    let cpus = place_supervisor(&config, upgrade.is_some());
    let mut adopted = match upgrade {
        Some(channel) => runtime.block_on(upgrade::receive_listeners(channel))?,
        None => Vec::new(),
    };
    let bound = listener::bind_all(&mut config, &mut adopted)?;
    let bound = crate::siblings::add(
        bound,
        config.acceptor_count(),
        &mut adopted,
        config.backlog,
        config.tcp_nodelay,
    )?;
    let metrics_listener = metrics_listener(&config, &mut adopted)?;
    for unused in adopted {
        info!(listener = %unused.spec, "no longer configured; closing the socket handed over for it");
    }
    let local = tokio::task::LocalSet::new();
    let span = tracing::info_span!("supervisor", pid = std::process::id());
    let result = local.block_on(
        runtime,
        supervise(
            Boot {
                config,
                bound,
                metrics_listener,
                nofile,
                cpus: crate::cpu::encode(&cpus),
                upgrade,
                exe,
            },
            commands,
        )
        .instrument(span),
    );
    // Dropping the LocalSet drops every `Child` still held (kill_on_drop): on an error
    // path nothing is left running.
    drop(local);
    result
}

/// The CPUs the server may use, read before the supervisor pins itself (workers inherit
/// the affinity of their parent, so they get this list instead); pins the supervisor if
/// configured. A new supervisor of a binary upgrade (`upgraded`) inherited a pinned
/// predecessor's affinity: it gets the list the same way.
fn place_supervisor(config: &Config, upgraded: bool) -> Vec<usize> {
    let inherited = upgraded
        .then(|| std::env::var(crate::cpu::ENV_CPUS).ok())
        .flatten()
        .map(|text| crate::cpu::decode(&text))
        .filter(|cpus| !cpus.is_empty());
    let cpus = match inherited {
        Some(cpus) => {
            if let Err(err) = crate::cpu::set(&cpus) {
                warn!(error = %err, "cannot restore the CPU affinity of the previous supervisor");
            }
            cpus
        }
        None => crate::cpu::allowed().unwrap_or_default(),
    };
    if let Some(index) = config.pin_supervisor {
        match crate::cpu::for_slot(&cpus, index) {
            Some(cpu) => match crate::cpu::set(&[cpu]) {
                Ok(()) => info!(cpu, "supervisor pinned"),
                Err(err) => warn!(cpu, error = %err, "cannot pin the supervisor"),
            },
            None => warn!("cannot pin the supervisor: no CPU is allowed"),
        }
    }
    cpus
}

/// The socket of `/metrics` and `/healthz`, if configured: the one a binary upgrade
/// handed over for it, or a new one.
fn metrics_listener(
    config: &Config,
    adopted: &mut Vec<listener::Handover>,
) -> Result<Option<std::net::TcpListener>, Error> {
    Ok(match config.metrics {
        Some(addr) => {
            let spec = format!("metrics:{addr}");
            let listener = match adopted.iter().position(|a| a.spec == spec) {
                Some(i) => Ok(std::net::TcpListener::from(adopted.swap_remove(i).fd)),
                None => std::net::TcpListener::bind(addr),
            };
            Some(
                listener
                    .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
                    .map_err(|source| Error::Bind {
                        addr: format!("metrics {addr}"),
                        source,
                    })?,
            )
        }
        None => None,
    })
}

/// Raises the `RLIMIT_NOFILE` soft limit to the hard limit (workers inherit it) and
/// returns the limit in force.
fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                info!(from = ?limit.current, to = ?limit.maximum, "raised RLIMIT_NOFILE");
                return limit.maximum.unwrap_or(u64::MAX);
            }
            Err(err) => warn!(error = %err, "cannot raise RLIMIT_NOFILE"),
        }
    }
    limit.current.unwrap_or(u64::MAX)
}

/// A condition that ends the server with an error.
type Fatal = RefCell<Option<Error>>;

/// What the supervisor's tasks share, by holder: the pool of workers (with the load
/// picture the accept loops dispatch on), the restart policy, the run state, and the state
/// of a binary upgrade.
struct Shared {
    config: Config,
    /// The workers; the accept loops see them through its board.
    pool: Rc<Pool>,
    metrics: Rc<Metrics>,
    /// Number of worker slots wanted (changed by scaling).
    target: Cell<usize>,
    /// When a worker that died is replaced, and when the server gives up.
    policy: RefCell<RestartPolicy>,
    /// What workers can make the supervisor log (see [`boundary`]).
    log_budget: RefCell<LogBudget>,
    // Run state.
    booted: Cell<bool>,
    reloading: Cell<bool>,
    fatal: Fatal,
    rng: Cell<XorShift>,
    /// The supervisor's span: parent of every watcher's span, whichever task spawns it.
    span: tracing::Span,
    /// The CPUs the server may use (`CORELOOP_CPUS`), for the workers' placement.
    cpus: String,
    // Upgrade state.
    /// The new supervisor of a binary upgrade once it serves, for the main task to hand
    /// over to.
    successor: RefCell<Option<Successor>>,
    /// The executable a binary upgrade starts, or why it is unknown.
    exe: Result<PathBuf, String>,
}

impl Shared {
    fn set_exit_reason(&self, pid: u32, reason: ExitReason) {
        self.pool.with_worker(pid, |w| {
            w.exit_reason.get_or_insert(reason);
        });
    }

    /// Whether a line a worker caused may be logged now; first says how many were not
    /// (`event = "log_suppressed"`), if any.
    fn admit_log(&self) -> bool {
        let Some(suppressed) = self.log_budget.borrow_mut().admit(Instant::now()) else {
            return false;
        };
        if suppressed > 0 {
            warn!(
                event = "log_suppressed",
                suppressed, "lines about workers were suppressed: over the log budget"
            );
        }
        true
    }

    fn take_fatal(&self) -> Option<Error> {
        self.fatal.borrow_mut().take()
    }

    fn fail(&self, err: Error) {
        let mut fatal = self.fatal.borrow_mut();
        if fatal.is_none() {
            *fatal = Some(err);
        }
        drop(fatal);
        self.pool.board.changed.notify_waiters();
    }

    fn random_unit(&self) -> f64 {
        let mut rng = self.rng.get();
        let unit = rng.unit();
        self.rng.set(rng);
        unit
    }

    fn recycle_threshold(&self) -> Option<u64> {
        self.config.recycle_after.map(|(base, jitter)| {
            let extra = (self.random_unit() * (jitter as f64 + 1.0)) as u64;
            base + extra.min(jitter)
        })
    }

    fn timeout_ms(&self) -> u32 {
        u32::try_from(self.config.shutdown_timeout.as_millis()).unwrap_or(u32::MAX)
    }
}
