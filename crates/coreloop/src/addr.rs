//! Addresses: where a server listens ([`ListenAddr`], one syntax for code and command
//! lines) and who connected ([`PeerAddr`]).
//!
//! The listen syntax is `HOST:PORT` (a name is resolved, to every address it has),
//! `[V6]:PORT`, `unix:PATH`, and `systemd` or `systemd:NAME` for sockets passed by systemd
//! (socket activation). [`ServerBuilder::bind`](crate::ServerBuilder::bind) accepts it,
//! and so does anything else implementing
//! [`ToListenAddrs`](crate::ToListenAddrs), such as a [`SocketAddr`] or an `(IpAddr, u16)`
//! pair; the `resolve` module reads them.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// What the syntax accepts, for error messages.
pub(crate) const SYNTAX: &str = "HOST:PORT, [IPV6]:PORT, unix:PATH, systemd or systemd:NAME";

/// One place to listen.
///
/// Its [`Display`](fmt::Display) form is the syntax [`ToListenAddrs`](crate::ToListenAddrs) parses, so it
/// round-trips through a command line.
///
/// # Examples
///
/// ```
/// use coreloop::{ListenAddr, ToListenAddrs};
///
/// let addrs = "unix:/run/app.sock".to_listen_addrs()?;
/// assert_eq!(addrs, [ListenAddr::Unix("/run/app.sock".into())]);
/// assert_eq!(addrs[0].to_string(), "unix:/run/app.sock");
/// # Ok::<(), coreloop::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ListenAddr {
    /// A TCP address (`HOST:PORT`, `[V6]:PORT`).
    Tcp(SocketAddr),
    /// A unix-socket path (`unix:PATH`).
    Unix(PathBuf),
    /// Sockets passed by systemd: all of them (`systemd`), or those with this name in
    /// `LISTEN_FDNAMES` (`systemd:NAME`, a socket unit's `FileDescriptorName=`).
    Systemd(Option<String>),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => addr.fmt(f),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenAddr::Systemd(None) => f.write_str("systemd"),
            ListenAddr::Systemd(Some(name)) => write!(f, "systemd:{name}"),
        }
    }
}

/// The address of the client of a connection, as the acceptor's `accept` reported it.
///
/// # Examples
///
/// ```
/// use coreloop::PeerAddr;
///
/// let peer = PeerAddr::Tcp("192.0.2.7:40000".parse().unwrap());
/// assert_eq!(peer.to_string(), "192.0.2.7:40000");
/// assert_eq!(peer.tcp().map(|addr| addr.port()), Some(40000));
/// assert_eq!(PeerAddr::Unix.to_string(), "unix");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PeerAddr {
    /// A TCP client.
    Tcp(SocketAddr),
    /// A client of a unix-socket listener (such clients are almost always unnamed, so no
    /// path is kept).
    Unix,
    /// The kernel did not report an address.
    Unknown,
}

impl PeerAddr {
    /// The client's TCP address, if it is a TCP client.
    pub fn tcp(self) -> Option<SocketAddr> {
        match self {
            PeerAddr::Tcp(addr) => Some(addr),
            _ => None,
        }
    }
}

impl fmt::Display for PeerAddr {
    /// The TCP address (`192.0.2.7:40000`, `[2001:db8::1]:443`), `unix` or `unknown`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Tcp(addr) => addr.fmt(f),
            PeerAddr::Unix => f.write_str("unix"),
            PeerAddr::Unknown => f.write_str("unknown"),
        }
    }
}

impl PeerAddr {
    /// The wire's peer address as coreloop's own. Not a `From` impl: a trait impl would put
    /// the internal crate's type in coreloop's public API.
    pub(crate) fn from_wire(peer: coreloop_ipc::PeerAddr) -> Self {
        match peer {
            coreloop_ipc::PeerAddr::Inet(addr) => PeerAddr::Tcp(addr),
            coreloop_ipc::PeerAddr::Unix => PeerAddr::Unix,
            coreloop_ipc::PeerAddr::Unknown => PeerAddr::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_display_as_users_expect() {
        let v6 = PeerAddr::from_wire(coreloop_ipc::PeerAddr::Inet(
            "[2001:db8::1]:443".parse().unwrap(),
        ));
        assert_eq!(v6.to_string(), "[2001:db8::1]:443");
        assert_eq!(
            PeerAddr::from_wire(coreloop_ipc::PeerAddr::Unix),
            PeerAddr::Unix
        );
        assert_eq!(PeerAddr::Unknown.to_string(), "unknown");
    }
}
