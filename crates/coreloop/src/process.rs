//! The process model: which role this process plays, detected once, and how the
//! supervisor starts the other processes. There are three roles, all the same program:
//!
//! - the **supervisor**: the process the user started;
//! - a **worker**: started by the supervisor with `CORELOOP_WORKER_ID` in its environment
//!   and its end of the channel on fd 0;
//! - a **successor**: the new supervisor of a binary upgrade, started by the running one
//!   with `CORELOOP_UPGRADE=<pid of the running one>` and the channel to it on fd 0.
//!
//! Both are started by re-executing a program ([`reexec`]), never by `fork()` of a process
//! that has a runtime, with one environment policy, in one place:
//!
//! | variable | worker | successor |
//! |---|---|---|
//! | `CORELOOP_WORKER_ID` | its slot | removed |
//! | `CORELOOP_UPGRADE` | removed | the running supervisor's pid |
//! | `CORELOOP_CPUS` | the CPUs the server may use | the same |
//! | `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES` | removed: systemd's sockets are the supervisor's | removed: they arrive over the channel |
//! | `NOTIFY_SOCKET`, `WATCHDOG_USEC` | removed: only the supervisor speaks to systemd | kept: it becomes the main process |
//! | `WATCHDOG_PID` | removed | removed, so that sd-notify takes the watchdog as its own |
//!
//! A worker also gets its own process group (a terminal's Ctrl-C reaches the supervisor
//! alone, which drains the workers in order) and is killed if the supervisor drops it.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;
use std::sync::OnceLock;

/// Environment variable naming the worker slot of a worker process.
pub(crate) const ENV_WORKER_ID: &str = "CORELOOP_WORKER_ID";
/// Environment variable that makes a process the successor of the supervisor whose pid
/// it names.
pub(crate) const ENV_UPGRADE: &str = "CORELOOP_UPGRADE";

/// The role of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Supervisor,
    /// The new supervisor of a binary upgrade.
    Successor,
    /// A worker of this slot.
    Worker(usize),
}

/// The role of this process, read from its environment the first time and the same ever
/// after.
pub(crate) fn current() -> Role {
    static ROLE: OnceLock<Role> = OnceLock::new();
    *ROLE.get_or_init(|| {
        if let Some(id) = std::env::var(ENV_WORKER_ID)
            .ok()
            .and_then(|id| id.parse().ok())
        {
            return Role::Worker(id);
        }
        let parent = rustix::process::getppid().map_or(0, |pid| pid.as_raw_nonzero().get());
        // The variable counts only when it names the parent, like `LISTEN_PID`: a program
        // that a supervisor started later may have inherited it.
        let named = std::env::var(ENV_UPGRADE)
            .ok()
            .and_then(|v| v.parse::<i32>().ok());
        if named == Some(parent) {
            Role::Successor
        } else {
            Role::Supervisor
        }
    })
}

/// Whether this process is a coreloop worker (started by a supervisor), as opposed to the
/// supervisor or any other program.
///
/// `main()` runs in every worker too, up to [`Server::run`](crate::Server::run): use this to
/// keep supervisor-only work (a control thread that drives a
/// [`ServerHandle`](crate::ServerHandle), reading standard input, …) out of the workers.
/// A worker's standard input is its channel to the supervisor until `run()` takes it.
pub fn is_worker() -> bool {
    matches!(current(), Role::Worker(_))
}

/// Whether this process is the new supervisor of a binary upgrade, started by the running
/// one (on SIGUSR2 or [`ServerHandle::upgrade`](crate::ServerHandle::upgrade)).
///
/// Like a worker's, its standard input is a channel (to the running supervisor) until
/// [`Server::run`](crate::Server::run) takes it: code before `run()` that reads standard
/// input must not when this is `true`, or the upgrade fails (and is rolled back).
pub fn is_upgrading() -> bool {
    current() == Role::Successor
}

/// What [`reexec`] starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start {
    /// A worker for this slot.
    Worker(usize),
    /// The successor of this supervisor.
    Successor,
}

/// A command that starts `exe` again, with this process's arguments (`argv[0]` kept), as
/// `start`, with `channel` as its standard input and the environment policy of the table
/// above. `cpus` is the CPU list for `CORELOOP_CPUS`.
pub(crate) fn reexec(
    exe: &Path,
    start: Start,
    cpus: &str,
    channel: OwnedFd,
) -> tokio::process::Command {
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| OsString::from(exe));
    let mut command = tokio::process::Command::new(exe);
    command
        .arg0(arg0)
        .args(args)
        .env(crate::cpu::ENV_CPUS, cpus)
        .stdin(Stdio::from(channel))
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("WATCHDOG_PID");
    match start {
        Start::Worker(slot) => {
            command
                .env(ENV_WORKER_ID, slot.to_string())
                .env_remove(ENV_UPGRADE)
                .env_remove("NOTIFY_SOCKET")
                .env_remove("WATCHDOG_USEC")
                .process_group(0)
                .kill_on_drop(true);
        }
        Start::Successor => {
            command
                .env(ENV_UPGRADE, std::process::id().to_string())
                .env_remove(ENV_WORKER_ID);
        }
    }
    command
}
