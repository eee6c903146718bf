//! Addresses: where a server listens ([`ListenAddr`], one syntax for code and command
//! lines) and who connected ([`PeerAddr`]).
//!
//! The listen syntax is `HOST:PORT` (a name is resolved, to every address it has),
//! `[V6]:PORT`, `unix:PATH`, and `systemd` or `systemd:NAME` for sockets passed by systemd
//! (socket activation). [`ServerBuilder::bind`](crate::ServerBuilder::bind) accepts it,
//! and so does anything else implementing [`ToListenAddrs`], such as a
//! [`SocketAddr`] or an `(IpAddr, u16)` pair.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, ToSocketAddrs};
use std::path::PathBuf;

use crate::error::Error;

/// What the syntax accepts, for error messages.
pub(crate) const SYNTAX: &str = "HOST:PORT, [IPV6]:PORT, unix:PATH, systemd or systemd:NAME";

/// One place to listen.
///
/// Its [`Display`](fmt::Display) form is the syntax [`ToListenAddrs`] parses, so it
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

/// Values that name listen addresses: strings in the listen syntax (`HOST:PORT`,
/// `[V6]:PORT`, `unix:PATH`, `systemd`, `systemd:NAME`), socket addresses, `(ip, port)`
/// and `(host, port)` pairs, and [`ListenAddr`] itself. What
/// [`ServerBuilder::bind`](crate::ServerBuilder::bind) takes.
pub trait ToListenAddrs {
    /// The addresses, a host name resolved to every address it has.
    ///
    /// # Errors
    ///
    /// [`Error::Address`] when the text is not in the listen syntax or a name does not
    /// resolve (to any address).
    fn to_listen_addrs(&self) -> Result<Vec<ListenAddr>, Error>;
}

/// `text` did not parse or resolve, because of `source`.
fn invalid(text: &str, source: io::Error) -> Error {
    Error::Address {
        addr: text.to_owned(),
        source,
    }
}

/// Resolves `addr` to TCP addresses; `text` names it in errors.
fn resolve(text: &str, addr: impl ToSocketAddrs) -> Result<Vec<ListenAddr>, Error> {
    let resolved: Vec<ListenAddr> = addr
        .to_socket_addrs()
        .map_err(|source| invalid(text, source))?
        .map(ListenAddr::Tcp)
        .collect();
    if resolved.is_empty() {
        return Err(invalid(
            text,
            io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address"),
        ));
    }
    Ok(resolved)
}

impl ToListenAddrs for str {
    fn to_listen_addrs(&self) -> Result<Vec<ListenAddr>, Error> {
        let empty = |what: &str| invalid(self, io::Error::new(io::ErrorKind::InvalidInput, what));
        if let Some(path) = self.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(empty("the path after `unix:` is empty"));
            }
            return Ok(vec![ListenAddr::Unix(PathBuf::from(path))]);
        }
        if self == "systemd" {
            return Ok(vec![ListenAddr::Systemd(None)]);
        }
        if let Some(name) = self.strip_prefix("systemd:") {
            if name.is_empty() {
                return Err(empty("the name after `systemd:` is empty"));
            }
            return Ok(vec![ListenAddr::Systemd(Some(name.to_owned()))]);
        }
        resolve(self, self)
    }
}

impl ToListenAddrs for String {
    fn to_listen_addrs(&self) -> Result<Vec<ListenAddr>, Error> {
        self.as_str().to_listen_addrs()
    }
}

impl<T: ToListenAddrs + ?Sized> ToListenAddrs for &T {
    fn to_listen_addrs(&self) -> Result<Vec<ListenAddr>, Error> {
        (**self).to_listen_addrs()
    }
}

impl ToListenAddrs for ListenAddr {
    fn to_listen_addrs(&self) -> Result<Vec<ListenAddr>, Error> {
        Ok(vec![self.clone()])
    }
}

impl ToListenAddrs for [ListenAddr] {
    fn to_listen_addrs(&self) -> Result<Vec<ListenAddr>, Error> {
        Ok(self.to_vec())
    }
}

macro_rules! socket_addrs {
    ($($ty:ty),*) => {$(
        impl ToListenAddrs for $ty {
            fn to_listen_addrs(&self) -> Result<Vec<ListenAddr>, Error> {
                resolve(&format!("{self:?}"), *self)
            }
        }
    )*};
}

socket_addrs!(
    SocketAddr,
    SocketAddrV4,
    SocketAddrV6,
    (IpAddr, u16),
    (Ipv4Addr, u16),
    (Ipv6Addr, u16)
);

impl ToListenAddrs for (&str, u16) {
    fn to_listen_addrs(&self) -> Result<Vec<ListenAddr>, Error> {
        resolve(&format!("{}:{}", self.0, self.1), *self)
    }
}

impl ToListenAddrs for (String, u16) {
    fn to_listen_addrs(&self) -> Result<Vec<ListenAddr>, Error> {
        (self.0.as_str(), self.1).to_listen_addrs()
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
    fn one_syntax_for_every_kind_of_listener() {
        let parse = |text: &str| text.to_listen_addrs().expect(text);
        assert_eq!(
            parse("127.0.0.1:7000"),
            [ListenAddr::Tcp("127.0.0.1:7000".parse().unwrap())]
        );
        assert_eq!(
            parse("[::1]:0"),
            [ListenAddr::Tcp("[::1]:0".parse().unwrap())]
        );
        assert_eq!(
            parse("unix:/tmp/x.sock"),
            [ListenAddr::Unix("/tmp/x.sock".into())]
        );
        assert_eq!(parse("systemd"), [ListenAddr::Systemd(None)]);
        assert_eq!(
            parse("systemd:web"),
            [ListenAddr::Systemd(Some("web".into()))]
        );
        for text in [
            "127.0.0.1:7000",
            "[::1]:0",
            "unix:/tmp/x.sock",
            "systemd",
            "systemd:web",
        ] {
            assert_eq!(parse(text)[0].to_string(), text, "round trip");
        }
    }

    #[test]
    fn bad_addresses_name_the_text_as_given() {
        for text in ["127.0.0.1:99999", "unix:", "systemd:", "no-port"] {
            let err = text.to_listen_addrs().expect_err(text);
            assert!(
                matches!(&err, Error::Address { addr, .. } if addr == text),
                "{err:#?}"
            );
            assert!(err.to_string().contains(&format!("{text} ")), "{err}");
        }
    }

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
