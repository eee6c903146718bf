//! The worker's own accept, in the `ReusePort` distribution: the worker listens on its own
//! `SO_REUSEPORT` socket for every configured TCP address, so the kernel spreads the
//! connections and the supervisor passes none of them. Its listeners are bound at
//! start-up (a failure is a start-up failure) and its accept loops are aborted at drain.

use std::time::Duration;

use coreloop_ipc::{ConnMeta, PeerAddr};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::warn;

use super::conn::Spawner;
use crate::config::{Config, ListenSpec};
use crate::dispatch::Distribution;
use crate::handler::{Handler, Stream};
use crate::listener::{self, AcceptError};

/// Pause after the first accept failure from an exhausted resource; it doubles per
/// failure in a row, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause between accepts while a resource stays exhausted.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// `ReusePort` distribution: this worker's own `SO_REUSEPORT` listeners, with their index
/// in the configuration. None in the other distributions.
pub(super) fn bind_own_listeners(config: &Config) -> Result<Vec<(u16, TcpListener)>, String> {
    if config.distribution != Distribution::ReusePort {
        return Ok(Vec::new());
    }
    let backlog = i32::try_from(config.backlog).unwrap_or(i32::MAX);
    let mut own = Vec::new();
    for (index, spec) in config.listeners.iter().enumerate() {
        if let ListenSpec::Tcp(addr) = spec {
            let bound = listener::bind_tcp(*addr, backlog, config.tcp_nodelay, Some(true))
                .map(std::net::TcpListener::from)
                .and_then(TcpListener::from_std)
                .map_err(|err| format!("cannot listen on {addr} (SO_REUSEPORT): {err}"))?;
            // The supervisor checked that the listeners fit in u16.
            own.push((index as u16, bound));
        }
    }
    Ok(own)
}

/// Starts an accept loop per listener; the handles abort them at drain.
pub(super) fn spawn_acceptors<H: Handler>(
    listeners: Vec<(u16, TcpListener)>,
    spawner: &Spawner<H>,
) -> Vec<JoinHandle<()>> {
    listeners
        .into_iter()
        .map(|(index, listener)| {
            tokio::task::spawn_local(accept_own(listener, index, spawner.clone()))
        })
        .collect()
}

/// Accept loop of one of this worker's own listeners (`ReusePort` distribution).
async fn accept_own<H: Handler>(listener: TcpListener, index: u16, spawner: Spawner<H>) {
    // Connection ids carry the pid in their high half: apart from the supervisor's
    // counter and from every other worker's.
    let mut next = u64::from(std::process::id()) << 32;
    let mut backoff = FIRST_BACKOFF;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = FIRST_BACKOFF;
                next += 1;
                let meta = ConnMeta {
                    id: next,
                    listener: index,
                    peer: PeerAddr::Inet(peer),
                };
                spawner.spawn(meta, Stream::Tcp(stream));
            }
            Err(err) => match listener::classify(&err) {
                AcceptError::Connection | AcceptError::WouldBlock => {}
                AcceptError::Resource => {
                    warn!(error = %err, event = "worker_accept_failed", "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            },
        }
    }
}
