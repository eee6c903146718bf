//! [`ServerHandle`]: control a running server from another thread of the supervisor
//! process, and learn when it serves and on which addresses.
//!
//! A handle and its [`Server`](crate::Server) share two things: a command queue, which the
//! supervisor reads in its main loop as it reads signals, and the server's [`Status`],
//! which the supervisor sets to serving (with the addresses it listens on) once every
//! worker is ready, and to stopped when `run()` returns. Commands tell the sender only that
//! a running server took them ([`ServerGone`] otherwise); the supervisor acts on them
//! asynchronously and logs what it does.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::handler::LocalAddr;
use crate::listener::Bound;

/// What a [`ServerHandle`] asks of the supervisor; signals map onto the same commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    /// Drain and stop (`graceful`), or kill the workers and stop at once.
    Stop { graceful: bool },
    /// Rolling replacement of every worker.
    Reload,
    /// One more worker.
    AddWorker,
    /// One worker fewer (never below one).
    RemoveWorker,
    /// Binary upgrade: start the executable on disk as a new supervisor, hand it the
    /// listeners, and stop once it serves.
    Upgrade,
}

/// Where the server is in its life, as its handles see it.
#[derive(Debug, Clone)]
enum Status {
    /// `run()` has not been called, or the server is booting.
    Starting,
    /// Every worker is ready; the listeners' addresses, in `bind` order.
    Serving(Vec<LocalAddr>),
    /// `run()` returned (or this process is a worker, where handles are inert).
    Stopped,
}

/// The status and a way to wait for it to change.
#[derive(Debug)]
struct Shared {
    status: Mutex<Status>,
    changed: Condvar,
}

impl Shared {
    fn set(&self, status: Status) {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = status;
        self.changed.notify_all();
    }
}

/// Both ends, created with the [`Server`](crate::Server): handles are cloned from
/// [`Control::handle`], and the supervisor takes the [`Inbox`].
#[derive(Debug)]
pub(crate) struct Control {
    commands: UnboundedSender<Command>,
    inbox: Inbox,
}

impl Control {
    pub(crate) fn new() -> Self {
        let (commands, receiver) = unbounded_channel();
        let shared = Arc::new(Shared {
            status: Mutex::new(Status::Starting),
            changed: Condvar::new(),
        });
        Self {
            commands,
            inbox: Inbox { receiver, shared },
        }
    }

    pub(crate) fn handle(&self) -> ServerHandle {
        ServerHandle {
            commands: self.commands.clone(),
            shared: Arc::clone(&self.inbox.shared),
        }
    }

    /// The supervisor's end. Dropping it (when `run()` returns, or at once in a worker)
    /// makes every handle report [`ServerGone`].
    pub(crate) fn into_inbox(self) -> Inbox {
        self.inbox
    }
}

/// The supervisor's end: commands to read, and where to say that it serves.
#[derive(Debug)]
pub(crate) struct Inbox {
    receiver: UnboundedReceiver<Command>,
    shared: Arc<Shared>,
}

impl Inbox {
    /// The next command from a handle. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Option<Command> {
        self.receiver.recv().await
    }

    /// Publishes that the server serves on `addrs` (see [`local_addrs`]): what
    /// [`ServerHandle::wait_ready`] returns.
    pub(crate) fn serving(&self, addrs: Vec<LocalAddr>) {
        self.shared.set(Status::Serving(addrs));
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // Commands queued but never read are dropped with the receiver; later sends fail.
        self.receiver.close();
        self.shared.set(Status::Stopped);
    }
}

/// The addresses `listeners` are bound to, in configuration order.
pub(crate) fn local_addrs<'a>(listeners: impl Iterator<Item = &'a Bound>) -> Vec<LocalAddr> {
    let mut bound: Vec<&Bound> = listeners.collect();
    bound.sort_by_key(|b| b.index);
    bound.into_iter().filter_map(local_addr).collect()
}

/// The address a listening socket is bound to (the real port of a `:0` bind).
fn local_addr(bound: &Bound) -> Option<LocalAddr> {
    let addr = socket2::SockRef::from(&bound.fd).local_addr().ok()?;
    match (addr.as_socket(), addr.as_unix()) {
        (Some(inet), _) => Some(LocalAddr::Inet(inet)),
        (None, Some(unix)) => Some(LocalAddr::Unix(unix.into())),
        (None, None) => None,
    }
}

/// Controls a running server from any thread of the supervisor process, like the signals
/// do (SIGTERM, SIGQUIT, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR2), and tells when it serves.
/// Cheap to clone. Take it with [`Server::handle`](crate::Server::handle).
///
/// Each command returns `Ok(())` once a server that is running (or about to run: commands
/// sent before `run()` wait for it) has taken it; the supervisor acts on it asynchronously
/// and logs what it does. It returns [`ServerGone`] when no server will read it: `run()`
/// has returned, the [`Server`](crate::Server) was dropped, or this process is a worker.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    commands: UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl ServerHandle {
    fn send(&self, command: Command) -> Result<(), ServerGone> {
        self.commands.send(command).map_err(|_| ServerGone)
    }

    /// Stops the server gracefully, as SIGTERM does: stop accepting, trigger every
    /// worker's [`ShutdownSignal`](crate::ShutdownSignal), wait for connections to finish
    /// within the shutdown timeout. `run()` then returns `Ok(())`.
    ///
    /// # Errors
    ///
    /// [`ServerGone`] when no server will read the command.
    pub fn stop_gracefully(&self) -> Result<(), ServerGone> {
        self.send(Command::Stop { graceful: true })
    }

    /// Stops the server at once, as SIGQUIT does: the workers are killed, their
    /// connections cut. Also ends a graceful stop in progress. `run()` then returns `Ok(())`.
    ///
    /// # Errors
    ///
    /// [`ServerGone`] when no server will read the command.
    pub fn stop_now(&self) -> Result<(), ServerGone> {
        self.send(Command::Stop { graceful: false })
    }

    /// Stops the server: gracefully ([`stop_gracefully`](Self::stop_gracefully)) if
    /// `graceful`, else at once ([`stop_now`](Self::stop_now)). Returns whether a running
    /// server took the command.
    #[deprecated(note = "use `stop_gracefully()` or `stop_now()`")]
    pub fn stop(&self, graceful: bool) -> bool {
        self.send(Command::Stop { graceful }).is_ok()
    }

    /// Replaces every worker, one at a time, each replacement ready before its
    /// predecessor stops taking connections (as SIGHUP does).
    ///
    /// # Errors
    ///
    /// [`ServerGone`] when no server will read the command.
    pub fn reload(&self) -> Result<(), ServerGone> {
        self.send(Command::Reload)
    }

    /// Adds one worker (as SIGTTIN does).
    ///
    /// # Errors
    ///
    /// [`ServerGone`] when no server will read the command.
    pub fn add_worker(&self) -> Result<(), ServerGone> {
        self.send(Command::AddWorker)
    }

    /// Drains and removes one worker, never the last (as SIGTTOU does).
    ///
    /// # Errors
    ///
    /// [`ServerGone`] when no server will read the command.
    pub fn remove_worker(&self) -> Result<(), ServerGone> {
        self.send(Command::RemoveWorker)
    }

    /// Upgrades to the executable now on disk without dropping a connection (as SIGUSR2
    /// does): the running supervisor starts it as a new supervisor and hands it the
    /// listening sockets; once every new worker serves, the old generation stops
    /// accepting, drains and exits, and `run()` returns `Ok(())` in the old process. If
    /// the new generation fails, or is not serving within the
    /// [upgrade timeout](crate::ServerBuilder::upgrade_timeout), it is stopped and the old
    /// one keeps serving. One upgrade at a time: a request during an upgrade is refused
    /// (and logged).
    ///
    /// # Errors
    ///
    /// [`ServerGone`] when no server will read the command.
    pub fn upgrade(&self) -> Result<(), ServerGone> {
        self.send(Command::Upgrade)
    }

    /// Blocks until the server serves (every worker ready, the moment its log says
    /// `serving`), and returns the addresses it listens on, in `bind` order: the real
    /// port of a `bind("127.0.0.1:0")`, the path of a unix socket. Returns at once if it
    /// already serves. Call it from another thread than the one in [`run`](crate::Server::run);
    /// it blocks, so not from inside an async task.
    ///
    /// # Errors
    ///
    /// [`WaitReadyError::TimedOut`] if the server does not serve within `timeout`;
    /// [`WaitReadyError::Stopped`] if `run()` returned first (it failed to start, or was
    /// stopped), or in a worker process.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use coreloop::{Conn, LocalAddr, Server};
    /// # use std::time::Duration;
    /// # async fn hello(_: Conn) -> std::io::Result<()> { Ok(()) }
    /// let server = Server::builder().bind("127.0.0.1:0")?.serve(|_| hello);
    /// let handle = server.handle();
    /// if !coreloop::is_worker() {
    ///     std::thread::spawn(move || {
    ///         if let Ok(addrs) = handle.wait_ready(Duration::from_secs(30)) {
    ///             println!("serving on {:?}", addrs[0].inet());
    ///         }
    ///     });
    /// }
    /// server.run()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn wait_ready(&self, timeout: Duration) -> Result<Vec<LocalAddr>, WaitReadyError> {
        let deadline = Instant::now() + timeout;
        let mut status = self
            .shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            match &*status {
                Status::Serving(addrs) => return Ok(addrs.clone()),
                Status::Stopped => return Err(WaitReadyError::Stopped),
                Status::Starting => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WaitReadyError::TimedOut(timeout));
            }
            status = self
                .shared
                .changed
                .wait_timeout(status, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// A [`ServerHandle`] command that no server will read: `run()` has returned, the
/// [`Server`](crate::Server) was dropped without running, or this process is a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the server is not running")]
pub struct ServerGone;

/// Why [`ServerHandle::wait_ready`] returned without addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WaitReadyError {
    /// The server did not serve within the time given.
    #[error("the server was not serving after {0:?}")]
    TimedOut(Duration),
    /// `run()` returned before the server served (see its error), or this process is a
    /// worker.
    #[error("the server stopped before it served")]
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_ready_times_out_while_starting() {
        let control = Control::new();
        let handle = control.handle();
        let waited = handle.wait_ready(Duration::from_millis(20));
        assert_eq!(
            waited.unwrap_err(),
            WaitReadyError::TimedOut(Duration::from_millis(20))
        );
    }

    #[test]
    fn wait_ready_wakes_when_the_server_serves() {
        let control = Control::new();
        let handle = control.handle();
        let inbox = control.into_inbox();
        let waiter = std::thread::spawn(move || handle.wait_ready(Duration::from_secs(30)));
        let addr: std::net::SocketAddr = "127.0.0.1:4321".parse().unwrap();
        inbox.serving(vec![LocalAddr::Inet(addr)]);
        let addrs = waiter.join().unwrap().unwrap();
        assert_eq!(addrs.len(), 1);
        assert_eq!(addrs[0].inet(), Some(addr));
    }

    #[test]
    fn a_stopped_server_is_gone() {
        let control = Control::new();
        let handle = control.handle();
        // Commands before `run()` wait for it.
        assert_eq!(handle.reload(), Ok(()));
        drop(control.into_inbox());
        assert_eq!(handle.reload(), Err(ServerGone));
        assert_eq!(handle.stop_gracefully(), Err(ServerGone));
        assert_eq!(
            handle.wait_ready(Duration::from_secs(30)).unwrap_err(),
            WaitReadyError::Stopped
        );
    }
}
