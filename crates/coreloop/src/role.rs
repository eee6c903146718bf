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

pub(crate) fn current() -> Role {
    match std::env::var(ENV_WORKER_ID)
        .ok()
        .and_then(|id| id.parse().ok())
    {
        Some(id) => Role::Worker(id),
        None => Role::Supervisor,
    }
}
