//! The signals the supervisor answers, as one stream, with the
//! [`ServerHandle`](crate::ServerHandle)'s commands beside them: each step of the main task
//! (boot, serve, the drain of a graceful stop) asks only for what it acts on, and the rest
//! stay queued for the next step.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

use crate::error::Error;
use crate::handle::{Command, Inbox};

/// Every signal stream of the supervisor, registered once.
#[derive(Debug)]
pub(super) struct Signals {
    term: Signal,
    int: Signal,
    quit: Signal,
    hup: Signal,
    ttin: Signal,
    ttou: Signal,
    usr2: Signal,
}

impl Signals {
    /// Registers the handlers. Before this, those signals have their default action.
    pub(super) fn new() -> Result<Self, Error> {
        let raw = |signal: rustix::process::Signal| SignalKind::from_raw(signal.as_raw());
        let register = |kind| signal(kind).map_err(Error::Signal);
        Ok(Self {
            term: register(SignalKind::terminate())?,
            int: register(SignalKind::interrupt())?,
            quit: register(SignalKind::quit())?,
            hup: register(SignalKind::hangup())?,
            ttin: register(raw(rustix::process::Signal::TTIN))?,
            ttou: register(raw(rustix::process::Signal::TTOU))?,
            usr2: register(SignalKind::user_defined2())?,
        })
    }

    /// While the server boots: resolves on any stop signal (SIGTERM, SIGINT, SIGQUIT).
    /// Other signals wait until it serves. Cancel-safe.
    pub(super) async fn stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
            _ = self.quit.recv() => {}
        }
    }

    /// While the server serves: the next signal or handle command, as the command it asks
    /// for, logged. Cancel-safe.
    pub(super) async fn command(&mut self, inbox: &mut Inbox) -> Command {
        let (signal, command) = tokio::select! {
            _ = self.term.recv() => ("SIGTERM", Command::Stop { graceful: true }),
            _ = self.int.recv() => ("SIGINT", Command::Stop { graceful: true }),
            _ = self.quit.recv() => ("SIGQUIT", Command::Stop { graceful: false }),
            _ = self.hup.recv() => ("SIGHUP", Command::Reload),
            _ = self.ttin.recv() => ("SIGTTIN", Command::AddWorker),
            _ = self.ttou.recv() => ("SIGTTOU", Command::RemoveWorker),
            _ = self.usr2.recv() => ("SIGUSR2", Command::Upgrade),
            Some(command) = inbox.recv() => {
                info!(?command, event = "command", "command from the server handle");
                return command;
            }
        };
        let what = match command {
            Command::Stop { graceful: true } => "graceful shutdown",
            Command::Stop { graceful: false } => "immediate shutdown",
            Command::Reload => "reload",
            Command::AddWorker => "add a worker",
            Command::RemoveWorker => "remove a worker",
            Command::Upgrade => "binary upgrade",
        };
        info!(signal, event = "signal", "{what}");
        command
    }

    /// During a graceful drain: resolves when asked to stop now instead (a second SIGINT,
    /// SIGQUIT, or an immediate stop from a handle). Other commands are dropped: the
    /// server is stopping. Cancel-safe.
    pub(super) async fn stop_now(&mut self, inbox: &mut Inbox) {
        loop {
            tokio::select! {
                _ = self.int.recv() => {
                    warn!(signal = "SIGINT", event = "stop_now", "second SIGINT: stopping now");
                    return;
                }
                _ = self.quit.recv() => {
                    warn!(signal = "SIGQUIT", event = "stop_now", "SIGQUIT: stopping now");
                    return;
                }
                Some(command) = inbox.recv() => {
                    if matches!(command, Command::Stop { graceful: false }) {
                        return;
                    }
                }
            }
        }
    }
}
