//! [`ToListenAddrs`]: what [`ServerBuilder::bind`](crate::ServerBuilder::bind) takes, read
//! into [`ListenAddr`]s: text in the listen syntax (`HOST:PORT` resolved to every address
//! of the name, `[V6]:PORT`, `unix:PATH`, `systemd`, `systemd:NAME`), socket addresses and
//! `(ip, port)` or `(host, port)` pairs. Apart from the address types, so that the error
//! type can name an address without the address types depending on it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, ToSocketAddrs};
use std::path::PathBuf;

use crate::addr::ListenAddr;
use crate::error::Error;

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
}
