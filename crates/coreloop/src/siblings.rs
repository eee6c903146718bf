//! `SO_REUSEPORT` siblings of the TCP listeners, one per extra accept loop (see the
//! sharded accept loops, `accept/shards.rs`): sockets bound to the same address, each with
//! its own accept queue, among which the kernel spreads new connections.
//!
//! In the new supervisor of a binary upgrade the previous generation's siblings are taken
//! over first: closing one would reset the connections waiting in its queue. Siblings are
//! bound only to a listener that has `SO_REUSEPORT` itself (one this server bound for
//! sharded acceptors); a listener without it (bound with one accept loop, or passed by
//! systemd) is shared by the loops instead.

use std::io;
use std::net::SocketAddr;

use tracing::{info, warn};

use crate::addr::ListenAddr;
use crate::error::Error;
use crate::listener::{self, Bound, Handover};

/// The name a sibling is handed over with in a binary upgrade (a TCP listener's own name
/// is empty).
pub(crate) const SIBLING: &str = "reuseport-sibling";

/// Adds, after each accepting TCP listener in `bound`, its siblings: those handed over for
/// it (taken out of `adopted`), then new ones until it has `k` sockets.
///
/// # Errors
///
/// When a sibling cannot be bound: the address is shared with a socket of another
/// server, or descriptors ran out.
pub(crate) fn add(
    bound: Vec<Bound>,
    k: usize,
    adopted: &mut Vec<Handover>,
    backlog: u32,
    nodelay: bool,
) -> Result<Vec<Bound>, Error> {
    let mut out = Vec::with_capacity(bound.len() * k.max(1));
    for primary in bound {
        let addr = match &primary.local {
            Some(ListenAddr::Tcp(addr)) if primary.accepts => *addr,
            _ => {
                out.push(primary);
                continue;
            }
        };
        let mut primary = primary;
        // A handed-over sibling may have been taken as the listener itself: it is one now
        // (a TCP listener has no name of its own).
        if primary.name == SIBLING {
            primary.name.clear();
        }
        let mut group = vec![primary];
        take_adopted(&mut group, addr, adopted);
        if group.len() < k && reuseport(&group[0]) {
            let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
            for _ in group.len()..k {
                let fd =
                    listener::bind_tcp(addr, backlog, nodelay, Some(true)).map_err(|source| {
                        Error::Bind {
                            addr: format!(
                                "{addr} (an SO_REUSEPORT sibling for another accept loop)"
                            ),
                            source,
                        }
                    })?;
                let sibling = group[0].with_fd(fd, SIBLING);
                group.push(sibling);
            }
        } else if group.len() < k {
            info!(listener = %group[0].label, sockets = group.len(), acceptors = k, "listener without SO_REUSEPORT: accept loops share its socket");
        }
        out.extend(group);
    }
    Ok(out)
}

/// Moves the siblings handed over for `group`'s listener (same configured listener, same
/// address) from `adopted` into `group`.
fn take_adopted(group: &mut Vec<Bound>, addr: SocketAddr, adopted: &mut Vec<Handover>) {
    let spec = group[0].spec.clone();
    let mut i = 0;
    while i < adopted.len() {
        let same = adopted[i].spec == spec
            && rustix::net::getsockname(&adopted[i].fd)
                .ok()
                .and_then(|local| SocketAddr::try_from(local).ok())
                == Some(addr);
        if !same {
            i += 1;
            continue;
        }
        let taken = adopted.remove(i);
        match listening(&taken) {
            Ok(()) => group.push(group[0].with_fd(taken.fd, SIBLING)),
            Err(err) => {
                warn!(listener = %group[0].label, error = %err, "a sibling handed over is unusable; closing it");
            }
        }
    }
}

/// Checks that a handed-over sibling is a listening socket, and makes it non-blocking.
fn listening(taken: &Handover) -> io::Result<()> {
    if !rustix::net::sockopt::socket_acceptconn(&taken.fd)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening socket",
        ));
    }
    rustix::io::ioctl_fionbio(&taken.fd, true)?;
    Ok(())
}

/// Whether the socket has `SO_REUSEPORT`, so that siblings can join it.
fn reuseport(bound: &Bound) -> bool {
    rustix::net::sockopt::socket_reuseport(&bound.fd).unwrap_or(false)
}
