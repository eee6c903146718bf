//! Which role this process plays, read once from the environment the supervisor sets.
//!
//! The supervisor starts each worker with `CORELOOP_WORKER_ID` in its environment (through
//! `Command::env`, never `set_var`) and the channel on fd 0. Any other process is a
//! supervisor.

/// Environment variable naming the worker slot of a worker process.
pub(crate) const ENV_WORKER_ID: &str = "CORELOOP_WORKER_ID";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Supervisor,
    Worker(usize),
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

pub(crate) fn current() -> Role {
    match std::env::var(ENV_WORKER_ID)
        .ok()
        .and_then(|id| id.parse().ok())
    {
        Some(id) => Role::Worker(id),
        None => Role::Supervisor,
    }
}
