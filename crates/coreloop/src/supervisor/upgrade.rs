//! Binary upgrade: the running supervisor starts the executable now on disk as a new
//! supervisor, hands it the listening sockets, and leaves once the new one serves.
//!
//! The sequence (both sides, with the supervisor module's main task driving it):
//!
//! 1. The old supervisor starts the program at the path it was started from (captured at
//!    startup, so a binary replaced on disk since is the one that runs) with the same
//!    arguments, `CORELOOP_UPGRADE=<its pid>` in the environment and one end of a new
//!    seqpacket pair on fd 0, then sends every listening socket
//!    ([`Message::Listener`], one descriptor each, tagged with the listener as configured).
//! 2. The new supervisor adopts the sockets whose configured listener it still has (and
//!    binds any new ones), starts its workers, and sends [`Message::Ready`] once every
//!    one of them serves. It does not accept yet.
//! 3. The old supervisor stops accepting (the sockets stay open in the new one, so
//!    clients queue in the kernel's backlog meanwhile), sends [`Message::Takeover`], tells
//!    systemd `MAINPID=<new>`, drains its workers and exits.
//! 4. The new supervisor starts accepting.
//!
//! Nothing is accepted by both or by neither: until `Takeover` only the old generation
//! accepts, after it only the new one. If the new generation reports
//! [`Message::Failed`], exits, or is not ready within the upgrade timeout, the old
//! supervisor kills it (its workers follow, as they do when any supervisor dies) and
//! goes on serving; the new one never accepted a connection, and never removes the
//! unix-socket files the old one still serves.
//!
//! The handshake reuses the worker channel's encoding; between builds whose
//! [`PROTOCOL_VERSION`](coreloop_ipc::PROTOCOL_VERSION) differs it fails cleanly, and the
//! old generation keeps serving.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use coreloop_ipc::{Channel, ChannelError, Message};
use tracing::{debug, info};

use super::spawn::kill;
use super::watch::describe;
use crate::error::Error;
use crate::listener::Handover;

use crate::process::{ENV_UPGRADE, Start, is_upgrading};

/// How long the new supervisor waits for the listeners once started.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the old supervisor waits for a failed new generation to exit by itself
/// before it kills it.
pub(crate) const EXIT_GRACE: Duration = Duration::from_secs(2);

/// The channel to the previous supervisor, when this process is the new supervisor of a
/// binary upgrade ([`is_upgrading`]): fd 0.
///
/// Call it once, before any runtime exists (it replaces fd 0 with `/dev/null`).
///
/// # Errors
///
/// [`Error::Upgrade`] when fd 0 is not a channel.
pub(crate) fn predecessor() -> Result<Option<OwnedFd>, Error> {
    if !is_upgrading() {
        return Ok(None);
    }
    coreloop_ipc::inherited_channel()
        .map(Some)
        .map_err(|err| Error::Upgrade(format!("{ENV_UPGRADE} is set but fd 0 is unusable: {err}")))
}

/// New supervisor: receives the listening sockets from the old one.
///
/// # Errors
///
/// [`Error::Upgrade`] when the old supervisor sends something else, goes away, or takes
/// longer than [`HANDOVER_TIMEOUT`].
pub(crate) async fn receive_listeners(channel: &Channel) -> Result<Vec<Handover>, Error> {
    let receive = async {
        let mut adopted = Vec::new();
        loop {
            match channel.recv().await {
                Ok(Some((
                    Message::Listener {
                        spec,
                        name,
                        remaining,
                    },
                    fds,
                ))) => {
                    let fd = fds.into_iter().next().ok_or_else(|| {
                        Error::Upgrade(format!("listener {spec} arrived without its socket"))
                    })?;
                    adopted.push(Handover { spec, name, fd });
                    if remaining == 0 {
                        return Ok(adopted);
                    }
                }
                Ok(Some((other, _))) => {
                    return Err(Error::Upgrade(format!(
                        "expected the listeners, got {}",
                        other.kind_name()
                    )));
                }
                Ok(None) => {
                    return Err(Error::Upgrade(
                        "the running supervisor went away during the handover".into(),
                    ));
                }
                Err(err) => return Err(Error::Upgrade(format!("handover: {err}"))),
            }
        }
    };
    tokio::time::timeout(HANDOVER_TIMEOUT, receive)
        .await
        .map_err(|_| Error::Upgrade("no listeners arrived from the running supervisor".into()))?
}

/// The new supervisor of an upgrade in progress, as the old one holds it. Dropped
/// without [`release`](Self::release) (the old server stops, or the upgrade task is
/// cancelled), it kills the new supervisor: a new generation never outlives an old one
/// that did not hand over to it.
#[derive(Debug)]
pub(crate) struct Successor {
    pub(crate) pid: u32,
    pub(crate) channel: Channel,
    child: tokio::process::Child,
    /// Reaped, or left to run on its own: not to be killed on drop.
    done: bool,
}

impl Successor {
    /// Leaves the new supervisor running on its own: it outlives this process.
    pub(crate) fn release(mut self) {
        // The `Child` was built without `kill_on_drop`: dropping it leaves the process
        // alone (tokio reaps it should it exit before this process does).
        self.done = true;
    }

    /// Stops a new generation that failed: waits up to `grace` for it to exit by itself,
    /// then kills it, and reaps it. Its workers exit when they see their supervisor gone.
    pub(crate) async fn abandon(mut self, grace: Duration) -> String {
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                kill(self.pid);
                self.child.wait().await
            }
        };
        // Reaped (or unwaitable): its pid may be reused from now on.
        self.done = true;
        match status {
            Ok(status) => describe(Some(status)),
            Err(err) => format!("cannot be waited for: {err}"),
        }
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if !self.done {
            // Not reaped yet, so the pid is still this child's.
            kill(self.pid);
        }
    }
}

/// Old supervisor: starts `exe` as the new supervisor, hands it `listeners` and waits
/// until it reports every worker serving, at most `timeout`. `cpus` is the CPU list this
/// server may use (`CORELOOP_CPUS`), which a pinned supervisor can no longer read from
/// its own affinity.
///
/// # Errors
///
/// Why the new generation is not taking over, for the log; it has been stopped and
/// reaped by then.
pub(crate) async fn start_successor(
    exe: &Path,
    listeners: &[Handover],
    timeout: Duration,
    cpus: &str,
) -> Result<Successor, String> {
    let (ours, theirs) =
        coreloop_ipc::socketpair_cloexec().map_err(|err| format!("socketpair: {err}"))?;
    let mut command = crate::process::reexec(exe, Start::Successor, cpus, theirs);
    let child = command
        .spawn()
        .map_err(|err| format!("cannot start {}: {err}", exe.display()))?;
    // `command` holds the new supervisor's end of the channel until dropped: without
    // this, its exit would not be seen as the channel closing.
    drop(command);
    let pid = child.id().unwrap_or(0);
    let channel = match Channel::from_fd(ours) {
        Ok(channel) => channel,
        Err(err) => {
            let mut child = child;
            kill(pid);
            let _ = child.wait().await;
            return Err(format!("channel: {err}"));
        }
    };
    info!(upgrade.pid = pid, exe = %exe.display(), event = "upgrade_started", "new supervisor started");
    let successor = Successor {
        pid,
        channel,
        child,
        done: false,
    };
    match handshake(&successor, listeners, timeout).await {
        Ok(()) => Ok(successor),
        Err((reason, timed_out)) => {
            // One that reported or exited is on its way out; a silent one is killed now.
            let grace = if timed_out {
                Duration::ZERO
            } else {
                EXIT_GRACE
            };
            let how = successor.abandon(grace).await;
            Err(format!("{reason} (new supervisor pid {pid}: {how})"))
        }
    }
}

/// Sends the listeners and waits for `Ready`. The error says why not, and whether it is
/// because the timeout passed.
async fn handshake(
    successor: &Successor,
    listeners: &[Handover],
    timeout: Duration,
) -> Result<(), (String, bool)> {
    let exchange = async {
        let total = listeners.len();
        for (i, listener) in listeners.iter().enumerate() {
            let msg = Message::Listener {
                spec: listener.spec.clone(),
                name: listener.name.clone(),
                remaining: u16::try_from(total - 1 - i).unwrap_or(u16::MAX),
            };
            successor
                .channel
                .send(&msg, &[listener.fd.as_fd()])
                .await
                .map_err(|err| format!("cannot hand over {}: {err}", listener.spec))?;
        }
        debug!(listeners = total, "listeners handed over");
        loop {
            match successor.channel.recv().await {
                Ok(Some((Message::Ready { .. }, _))) => return Ok(()),
                Ok(Some((Message::Failed { reason }, _))) => {
                    return Err(format!("the new generation failed to start: {reason}"));
                }
                Ok(Some((other, _))) => {
                    debug!(
                        message = other.kind_name(),
                        "unexpected message from the new supervisor"
                    );
                }
                // A peer that exits with messages unread resets the channel: also an exit.
                Ok(None) | Err(ChannelError::Io(_)) => {
                    return Err("the new supervisor exited before it was ready".into());
                }
                Err(err) => return Err(format!("channel to the new supervisor: {err}")),
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result.map_err(|reason: String| (reason, false)),
        Err(_) => Err((
            format!("the new generation was not serving within the upgrade timeout ({timeout:?})"),
            true,
        )),
    }
}

/// Writes `pid` to `path` atomically (a temporary file renamed over it).
///
/// # Errors
///
/// [`Error::PidFile`] with the write or rename error.
pub(crate) fn write_pid_file(path: &Path) -> Result<(), Error> {
    let err = |source| Error::PidFile {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string()
        .push(format!(".{}.tmp", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id())).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        err(source)
    })
}

/// Removes the pid file if it still names this process. Not called after a handover: the
/// file is the new supervisor's then (see the supervisor's shutdown).
pub(crate) fn remove_pid_file(path: &Path) {
    let ours = std::fs::read_to_string(path)
        .is_ok_and(|text| text.trim() == std::process::id().to_string());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}
