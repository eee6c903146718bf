//! Starting a worker (re-executing this program, see [`crate::process`]) and its watcher,
//! and killing one: the worker and its process group.

use std::rc::Rc;
use std::sync::Arc;

use coreloop_ipc::{Channel, Queue};
use rustix::process::{Pid, Signal};
use tracing::{Instrument, debug};

use super::Shared;
use super::watch::watch;
use crate::dispatch::{Seat, Worker};
use crate::error::Error;
use crate::handler::WorkerId;
use crate::metrics::WorkerLabels;
use crate::process::Start;

/// SIGKILL to a process the supervisor has not reaped yet (a watcher removes a worker from
/// the pool before it reaps it, and nobody else reaps our children, so the pid cannot
/// have been reused).
pub(crate) fn kill(pid: u32) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, Signal::KILL);
    }
}

/// SIGKILL to a worker the supervisor has not reaped yet, and to its process group: what
/// it forked goes with it. (Each worker leads its own group, whose id is its pid; while
/// the worker is not reaped, that id cannot name anything else. The worker itself is
/// signalled by pid too, in case it left its group.)
pub(super) fn kill_worker(pid: u32) {
    kill(pid);
    kill_group(pid);
}

/// SIGKILL to the process group `pid` of a worker not reaped yet (see [`kill_worker`]).
pub(super) fn kill_group(pid: u32) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    }
}

pub(super) fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ u64::from(std::process::id()).rotate_left(32)) | 1
}

/// Starts a worker for `slot` and its watcher task; returns its pid.
pub(super) fn spawn_worker(shared: &Rc<Shared>, slot: WorkerId) -> Result<u32, Error> {
    let spawn_err = |source| Error::SpawnWorker { id: slot, source };
    let (ours, theirs) = coreloop_ipc::socketpair_cloexec().map_err(spawn_err)?;
    // Our duplicate of the worker's end keeps its receive queue alive after the worker
    // dies, so that the connections it never read can be taken back.
    let queue = theirs.try_clone().map_err(spawn_err)?;
    let mut command = crate::process::reexec(
        std::path::Path::new("/proc/self/exe"),
        Start::Worker(slot.get()),
        &shared.cpus,
        theirs,
    );
    command.envs(crate::listener::worker_env(&shared.config));
    if let Some((uid, gid)) = shared.config.worker_ids {
        // std calls setgroups(0) (when we are root), setgid and setuid in the child
        // before exec; a failure there fails the spawn.
        command.uid(uid).gid(gid);
    }
    let child = command.spawn().map_err(spawn_err)?;
    // `command` holds the worker's end (as stdin) until dropped.
    drop(command);
    let pid = child.id().unwrap_or(0);
    let channel = Rc::new(Channel::from_fd(ours).map_err(spawn_err)?);
    let queue = Arc::new(Queue::new(queue));
    let recycle_at = shared.recycle_threshold();
    let forwarded = shared.metrics.forwarded.get_or_create_owned(&WorkerLabels {
        worker: slot.get() as u32,
    });
    let sender = channel.sender().map_err(spawn_err)?;
    let seat = Arc::new(Seat::new(
        slot,
        pid,
        Arc::clone(&queue),
        sender,
        forwarded,
        recycle_at,
    ));
    shared.pool.board.add(Arc::clone(&seat));
    shared
        .pool
        .workers
        .borrow_mut()
        .push(Worker::new(slot, pid, Rc::clone(&channel), seat));
    shared.pool.board.changed.notify_waiters();
    debug!(
        event = "worker_spawned",
        worker.id = slot.get(),
        worker.pid = pid,
        "worker spawned"
    );
    let span = tracing::info_span!(parent: &shared.span, "watch", worker.id = slot.get(), worker.pid = pid);
    tokio::task::spawn_local(
        watch(Rc::clone(shared), slot, pid, child, channel, queue).instrument(span),
    );
    Ok(pid)
}
