//! The messages that travel over a [`Channel`](crate::Channel), and their byte encoding.
//!
//! The encoding is deliberately tiny and fixed: a version byte, a kind byte, then
//! little-endian fields. Accepted connections travel in batches ([`ConnBatch`], up to
//! [`MAX_BATCH`] per datagram, their descriptors in one `SCM_RIGHTS` message): when
//! connections arrive faster than one message at a time, one `sendmsg`/`recvmsg` pair and
//! one worker wake-up carry several of them. Every decode checks the length of every field and rejects trailing
//! bytes, so a truncated or corrupted datagram is a [`ProtocolError`], never a panic and
//! never a misread connection. Encoding writes into a caller's stack buffer: the
//! per-connection path allocates nothing.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Version of the wire format; the first byte of every message.
///
/// Supervisor and workers are always the same executable image (workers are started from
/// `/proc/self/exe`), so a mismatch means corruption or a foreign peer, and is an error.
/// The one exchange between different builds is a binary upgrade (`Listener`, `Ready`,
/// `Failed`, `Takeover`): an upgrade to a build with another version fails its handshake
/// cleanly and the old generation keeps serving. Change the encoding of those four only
/// together with this number.
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest encoded message, in bytes. Receivers use a buffer one byte larger, so that an
/// oversized datagram is reported as truncated.
pub const MAX_MESSAGE_LEN: usize = 2048;

/// Most connections (and descriptors) in one [`Message::Conns`].
pub const MAX_BATCH: usize = 32;

/// Longest reason carried by [`Message::Failed`]; longer text is cut at a char boundary.
const MAX_REASON_LEN: usize = 500;

/// Longest `spec` or `name` of a [`Message::Listener`], in bytes. Unlike a reason, these
/// are never cut: a cut spec would match no listener.
pub const MAX_LISTENER_TEXT: usize = 900;

const KIND_CONNS: u8 = 1;
const KIND_DRAIN: u8 = 2;
const KIND_LISTENER: u8 = 3;
const KIND_TAKEOVER: u8 = 4;
const KIND_READY: u8 = 16;
const KIND_FAILED: u8 = 17;
const KIND_RETIRING: u8 = 18;
const KIND_STATUS: u8 = 19;
const KIND_LOOP_CLOCK: u8 = 20;

const PEER_UNKNOWN: u8 = 0;
const PEER_UNIX: u8 = 1;
const PEER_V4: u8 = 4;
const PEER_V6: u8 = 6;

/// The address of the client of an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerAddr {
    /// A TCP client.
    Inet(SocketAddr),
    /// A client of a unix-socket listener (such clients are almost always unnamed).
    Unix,
    /// The kernel did not report an address.
    Unknown,
}

/// What a worker needs to know about one accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnMeta {
    /// Connection id, unique within one supervisor's lifetime; used in logs.
    pub id: u64,
    /// Index of the listener (in `bind` order) that accepted it.
    pub listener: u16,
    /// The client's address, as `accept` reported it.
    pub peer: PeerAddr,
}

const EMPTY_META: ConnMeta = ConnMeta {
    id: 0,
    listener: 0,
    peer: PeerAddr::Unknown,
};

/// One to [`MAX_BATCH`] connections, in a fixed array: building and decoding a batch
/// allocates nothing.
#[derive(Clone, Copy)]
pub struct ConnBatch {
    len: usize,
    items: [ConnMeta; MAX_BATCH],
}

impl ConnBatch {
    /// An empty batch.
    pub const fn new() -> Self {
        Self {
            len: 0,
            items: [EMPTY_META; MAX_BATCH],
        }
    }

    /// A batch of one.
    pub fn one(meta: ConnMeta) -> Self {
        let mut batch = Self::new();
        batch.items[0] = meta;
        batch.len = 1;
        batch
    }

    /// Appends `meta`; returns `false` (and appends nothing) when the batch is full.
    pub fn push(&mut self, meta: ConnMeta) -> bool {
        match self.items.get_mut(self.len) {
            Some(slot) => {
                *slot = meta;
                self.len += 1;
                true
            }
            None => false,
        }
    }

    /// The connections in the batch.
    pub fn as_slice(&self) -> &[ConnMeta] {
        &self.items[..self.len]
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for ConnBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl PartialEq for ConnBatch {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for ConnBatch {}

impl std::fmt::Debug for ConnBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// One datagram on the channel.
// A batch lives inline on purpose: boxing it would allocate for every message on the
// connection path, and moving ~800 bytes costs less than that.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Supervisor → worker: accepted connections. Carries exactly one descriptor per
    /// connection, in the same order.
    Conns(ConnBatch),
    /// Supervisor → worker: take no more connections, finish the ones in hand, exit.
    /// Nothing follows this message on the channel.
    Drain {
        /// How long the supervisor waits before it kills the worker.
        timeout_ms: u32,
    },
    /// Worker → supervisor: the handler factory ran; the worker takes connections now.
    /// Also new supervisor → old supervisor in a binary upgrade: every new worker serves.
    Ready {
        /// The sender's process id.
        pid: u32,
    },
    /// Worker → supervisor: the worker could not start; it exits after sending this.
    /// Also new supervisor → old supervisor in a binary upgrade.
    Failed {
        /// Human-readable cause (cut to fit one message).
        reason: String,
    },
    /// Worker → supervisor, before `Ready`: the descriptor of the worker's
    /// [`LoopClock`](crate::LoopClock). Carries exactly one descriptor.
    LoopClock,
    /// Old supervisor → new supervisor (binary upgrade): one listening socket, with the
    /// configured address it was bound for. Carries exactly one descriptor.
    Listener {
        /// The listener as configured (`127.0.0.1:8080`, `unix:/run/app.sock`,
        /// `systemd:web`, `metrics:127.0.0.1:9100`): what the new supervisor matches its
        /// own configuration against.
        spec: String,
        /// systemd's name for the socket (`LISTEN_FDNAMES`), or empty.
        name: String,
        /// How many `Listener` messages follow this one.
        remaining: u16,
    },
    /// Old supervisor → new supervisor (binary upgrade): the old one has stopped
    /// accepting; the new one serves from now on.
    Takeover,
    /// Worker → supervisor: the worker was asked to stop (a signal reached it directly)
    /// and wants a [`Message::Drain`].
    Retiring,
    /// Worker → supervisor: sent from inside the worker's event loop, periodically (the
    /// heartbeat) and soon after connections close (the load report).
    Status {
        /// Connections the worker is serving now.
        live: u32,
        /// Connections the worker has finished since it started.
        closed: u64,
        /// Resident set size of the worker, in KiB (0 when unknown).
        rss_kib: u64,
    },
}

/// A message that could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The datagram was empty.
    #[error("empty message")]
    Empty,
    /// The version byte was not [`PROTOCOL_VERSION`].
    #[error("protocol version {found}, expected {PROTOCOL_VERSION}")]
    Version {
        /// The version byte received.
        found: u8,
    },
    /// The kind byte names no message.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// A field ran past the end of the datagram.
    #[error("message truncated: {kind} needs more than {len} bytes")]
    Short {
        /// Which message was being decoded.
        kind: &'static str,
        /// How many bytes the datagram had.
        len: usize,
    },
    /// Bytes were left over after the last field.
    #[error("{extra} trailing bytes after {kind}")]
    Trailing {
        /// Which message was decoded.
        kind: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// The peer address tag is unknown.
    #[error("unknown peer address tag {0}")]
    PeerTag(u8),
    /// A batch of connections was empty or larger than [`MAX_BATCH`].
    #[error("batch of {0} connections (1 to {MAX_BATCH} allowed)")]
    BatchSize(usize),
    /// A text field is longer than [`MAX_LISTENER_TEXT`] (when encoding) or the length a
    /// datagram announces is (when decoding).
    #[error("{field} of {len} bytes is longer than {MAX_LISTENER_TEXT}")]
    TextTooLong {
        /// Which field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A text field is not UTF-8.
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
    /// The output buffer is smaller than the encoded message.
    #[error("buffer of {0} bytes is too small for the message")]
    BufferTooSmall(usize),
}

impl Message {
    /// How many descriptors must accompany this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Message::Conns(batch) => batch.len(),
            Message::Listener { .. } | Message::LoopClock => 1,
            _ => 0,
        }
    }

    /// Short name of the message kind, for logs and errors.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Message::Conns(_) => "Conns",
            Message::Drain { .. } => "Drain",
            Message::Listener { .. } => "Listener",
            Message::Takeover => "Takeover",
            Message::LoopClock => "LoopClock",
            Message::Ready { .. } => "Ready",
            Message::Failed { .. } => "Failed",
            Message::Retiring => "Retiring",
            Message::Status { .. } => "Status",
        }
    }

    /// Encodes the message into `buf` and returns the number of bytes written.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::BufferTooSmall`] if `buf` cannot hold the message; a buffer of
    /// [`MAX_MESSAGE_LEN`] bytes always can.
    ///
    /// # Examples
    ///
    /// ```
    /// use coreloop_ipc::{Message, MAX_MESSAGE_LEN};
    ///
    /// let mut buf = [0u8; MAX_MESSAGE_LEN];
    /// let len = Message::Ready { pid: 42 }.encode(&mut buf)?;
    /// assert_eq!(Message::decode(&buf[..len])?, Message::Ready { pid: 42 });
    /// # Ok::<(), coreloop_ipc::ProtocolError>(())
    /// ```
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        let mut w = Writer { buf, pos: 0 };
        w.put(&[PROTOCOL_VERSION])?;
        match self {
            Message::Conns(batch) => {
                w.put(&[KIND_CONNS])?;
                // len <= MAX_BATCH < 256.
                w.put(&[batch.len() as u8])?;
                for meta in batch.as_slice() {
                    w.put_meta(meta)?;
                }
            }
            Message::Drain { timeout_ms } => {
                w.put(&[KIND_DRAIN])?;
                w.put(&timeout_ms.to_le_bytes())?;
            }
            Message::Listener {
                spec,
                name,
                remaining,
            } => {
                w.put(&[KIND_LISTENER])?;
                w.put_text("spec", spec)?;
                w.put_text("name", name)?;
                w.put(&remaining.to_le_bytes())?;
            }
            Message::Takeover => w.put(&[KIND_TAKEOVER])?,
            Message::LoopClock => w.put(&[KIND_LOOP_CLOCK])?,
            Message::Ready { pid } => {
                w.put(&[KIND_READY])?;
                w.put(&pid.to_le_bytes())?;
            }
            Message::Failed { reason } => {
                let mut cut = reason.len().min(MAX_REASON_LEN);
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                w.put(&[KIND_FAILED])?;
                // `cut` <= MAX_REASON_LEN < u16::MAX.
                w.put(&(cut as u16).to_le_bytes())?;
                w.put(&reason.as_bytes()[..cut])?;
            }
            Message::Retiring => w.put(&[KIND_RETIRING])?,
            Message::Status {
                live,
                closed,
                rss_kib,
            } => {
                w.put(&[KIND_STATUS])?;
                w.put(&live.to_le_bytes())?;
                w.put(&closed.to_le_bytes())?;
                w.put(&rss_kib.to_le_bytes())?;
            }
        }
        Ok(w.pos)
    }

    /// Decodes one message from the exact bytes of one datagram.
    ///
    /// # Errors
    ///
    /// A [`ProtocolError`] for an empty, foreign-version, unknown, short or over-long message.
    pub fn decode(bytes: &[u8]) -> Result<Message, ProtocolError> {
        let (&version, rest) = bytes.split_first().ok_or(ProtocolError::Empty)?;
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version { found: version });
        }
        let (&kind, body) = rest.split_first().ok_or(ProtocolError::Short {
            kind: "header",
            len: bytes.len(),
        })?;
        let name = match kind {
            KIND_CONNS => "Conns",
            KIND_DRAIN => "Drain",
            KIND_LISTENER => "Listener",
            KIND_TAKEOVER => "Takeover",
            KIND_LOOP_CLOCK => "LoopClock",
            KIND_READY => "Ready",
            KIND_FAILED => "Failed",
            KIND_RETIRING => "Retiring",
            KIND_STATUS => "Status",
            other => return Err(ProtocolError::UnknownKind(other)),
        };
        let mut r = Reader {
            bytes: body,
            kind: name,
            len: bytes.len(),
        };
        let msg = match kind {
            KIND_CONNS => {
                let [count] = r.take()?;
                let count = usize::from(count);
                if count == 0 || count > MAX_BATCH {
                    return Err(ProtocolError::BatchSize(count));
                }
                let mut batch = ConnBatch::new();
                for _ in 0..count {
                    batch.push(r.take_meta()?);
                }
                Message::Conns(batch)
            }
            KIND_DRAIN => Message::Drain {
                timeout_ms: u32::from_le_bytes(r.take()?),
            },
            KIND_LISTENER => Message::Listener {
                spec: r.take_text("spec")?,
                name: r.take_text("name")?,
                remaining: u16::from_le_bytes(r.take()?),
            },
            KIND_TAKEOVER => Message::Takeover,
            KIND_LOOP_CLOCK => Message::LoopClock,
            KIND_READY => Message::Ready {
                pid: u32::from_le_bytes(r.take()?),
            },
            KIND_FAILED => {
                let len = usize::from(u16::from_le_bytes(r.take()?));
                let text = r.take_slice(len)?;
                Message::Failed {
                    reason: String::from_utf8_lossy(text).into_owned(),
                }
            }
            KIND_STATUS => Message::Status {
                live: u32::from_le_bytes(r.take()?),
                closed: u64::from_le_bytes(r.take()?),
                rss_kib: u64::from_le_bytes(r.take()?),
            },
            _ => Message::Retiring,
        };
        if !r.bytes.is_empty() {
            return Err(ProtocolError::Trailing {
                kind: name,
                extra: r.bytes.len(),
            });
        }
        Ok(msg)
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    /// A text field: u16 length, then the bytes. Never cut.
    fn put_text(&mut self, field: &'static str, text: &str) -> Result<(), ProtocolError> {
        let len = text.len();
        if len > MAX_LISTENER_TEXT {
            return Err(ProtocolError::TextTooLong { field, len });
        }
        // len <= MAX_LISTENER_TEXT < u16::MAX.
        self.put(&(len as u16).to_le_bytes())?;
        self.put(text.as_bytes())
    }

    fn put_meta(&mut self, meta: &ConnMeta) -> Result<(), ProtocolError> {
        self.put(&meta.id.to_le_bytes())?;
        self.put(&meta.listener.to_le_bytes())?;
        match meta.peer {
            PeerAddr::Unknown => self.put(&[PEER_UNKNOWN]),
            PeerAddr::Unix => self.put(&[PEER_UNIX]),
            PeerAddr::Inet(SocketAddr::V4(v4)) => {
                self.put(&[PEER_V4])?;
                self.put(&v4.ip().octets())?;
                self.put(&v4.port().to_le_bytes())
            }
            PeerAddr::Inet(SocketAddr::V6(v6)) => {
                self.put(&[PEER_V6])?;
                self.put(&v6.ip().octets())?;
                self.put(&v6.port().to_le_bytes())?;
                self.put(&v6.flowinfo().to_le_bytes())?;
                self.put(&v6.scope_id().to_le_bytes())
            }
        }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        let end = self.pos + bytes.len();
        let dst = self
            .buf
            .get_mut(self.pos..end)
            .ok_or(ProtocolError::BufferTooSmall(end))?;
        dst.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    kind: &'static str,
    len: usize,
}

impl<'a> Reader<'a> {
    fn take_slice(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.bytes.len() < n {
            return Err(ProtocolError::Short {
                kind: self.kind,
                len: self.len,
            });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take_slice(N)?);
        Ok(out)
    }

    fn take_text(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        let len = usize::from(u16::from_le_bytes(self.take()?));
        if len > MAX_LISTENER_TEXT {
            return Err(ProtocolError::TextTooLong { field, len });
        }
        let bytes = self.take_slice(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| ProtocolError::Utf8(field))
    }

    fn take_meta(&mut self) -> Result<ConnMeta, ProtocolError> {
        let id = u64::from_le_bytes(self.take()?);
        let listener = u16::from_le_bytes(self.take()?);
        let [tag] = self.take()?;
        let peer = match tag {
            PEER_UNKNOWN => PeerAddr::Unknown,
            PEER_UNIX => PeerAddr::Unix,
            PEER_V4 => {
                let ip = Ipv4Addr::from(self.take::<4>()?);
                let port = u16::from_le_bytes(self.take()?);
                PeerAddr::Inet(SocketAddr::V4(SocketAddrV4::new(ip, port)))
            }
            PEER_V6 => {
                let ip = Ipv6Addr::from(self.take::<16>()?);
                let port = u16::from_le_bytes(self.take()?);
                let flow = u32::from_le_bytes(self.take()?);
                let scope = u32::from_le_bytes(self.take()?);
                PeerAddr::Inet(SocketAddr::V6(SocketAddrV6::new(ip, port, flow, scope)))
            }
            other => return Err(ProtocolError::PeerTag(other)),
        };
        Ok(ConnMeta { id, listener, peer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer() -> impl Strategy<Value = PeerAddr> {
        prop_oneof![
            Just(PeerAddr::Unknown),
            Just(PeerAddr::Unix),
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| PeerAddr::Inet(SocketAddr::V4(
                SocketAddrV4::new(ip.into(), port)
            ))),
            (any::<[u8; 16]>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
                |(ip, port, flow, scope)| PeerAddr::Inet(SocketAddr::V6(SocketAddrV6::new(
                    ip.into(),
                    port,
                    flow,
                    scope
                )))
            ),
        ]
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            proptest::collection::vec((any::<u64>(), any::<u16>(), peer()), 1..=MAX_BATCH)
                .prop_map(|metas| {
                    let mut batch = ConnBatch::new();
                    for (id, listener, peer) in metas {
                        assert!(batch.push(ConnMeta { id, listener, peer }));
                    }
                    Message::Conns(batch)
                }),
            (any::<u64>(), any::<u16>(), peer()).prop_map(|(id, listener, peer)| Message::Conns(
                ConnBatch::one(ConnMeta { id, listener, peer })
            )),
            any::<u32>().prop_map(|timeout_ms| Message::Drain { timeout_ms }),
            any::<u32>().prop_map(|pid| Message::Ready { pid }),
            ".{0,100}".prop_map(|reason| Message::Failed { reason }),
            Just(Message::Retiring),
            Just(Message::Takeover),
            Just(Message::LoopClock),
            (".{0,100}", ".{0,40}", any::<u16>()).prop_map(|(spec, name, remaining)| {
                Message::Listener {
                    spec,
                    name,
                    remaining,
                }
            }),
            (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(live, closed, rss_kib)| {
                Message::Status {
                    live,
                    closed,
                    rss_kib,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(msg in message()) {
            let mut buf = [0u8; MAX_MESSAGE_LEN];
            let len = msg.encode(&mut buf).unwrap();
            prop_assert_eq!(Message::decode(&buf[..len]).unwrap(), msg);
        }

        #[test]
        fn every_truncation_is_an_error(msg in message()) {
            let mut buf = [0u8; MAX_MESSAGE_LEN];
            let len = msg.encode(&mut buf).unwrap();
            for cut in 0..len {
                prop_assert!(Message::decode(&buf[..cut]).is_err(), "cut at {cut} of {len} decoded");
            }
        }

        #[test]
        fn trailing_bytes_are_an_error(msg in message(), extra in 1usize..8) {
            let mut buf = [0u8; MAX_MESSAGE_LEN];
            let len = msg.encode(&mut buf).unwrap();
            let is_trailing = matches!(
                Message::decode(&buf[..len + extra]),
                Err(ProtocolError::Trailing { .. })
            );
            prop_assert!(is_trailing);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Message::decode(&bytes);
        }
    }

    #[test]
    fn long_reason_is_cut_at_a_char_boundary() {
        let reason = "é".repeat(MAX_MESSAGE_LEN);
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        let len = Message::Failed { reason }.encode(&mut buf).unwrap();
        let Message::Failed { reason } = Message::decode(&buf[..len]).unwrap() else {
            panic!("wrong kind");
        };
        assert!(!reason.is_empty() && reason.len() <= MAX_REASON_LEN);
        assert!(reason.chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_full_batch_fits_in_one_message() {
        let mut batch = ConnBatch::new();
        let v6 = PeerAddr::Inet("[2001:db8::1]:65535".parse().unwrap());
        while batch.push(ConnMeta {
            id: u64::MAX,
            listener: u16::MAX,
            peer: v6,
        }) {}
        assert_eq!(batch.len(), MAX_BATCH);
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        let len = Message::Conns(batch).encode(&mut buf).unwrap();
        assert_eq!(Message::decode(&buf[..len]).unwrap(), Message::Conns(batch));
    }

    #[test]
    fn empty_and_oversized_batches_are_rejected() {
        assert_eq!(
            Message::decode(&[PROTOCOL_VERSION, KIND_CONNS, 0]),
            Err(ProtocolError::BatchSize(0))
        );
        let over = MAX_BATCH as u8 + 1;
        assert_eq!(
            Message::decode(&[PROTOCOL_VERSION, KIND_CONNS, over]),
            Err(ProtocolError::BatchSize(usize::from(over)))
        );
    }

    #[test]
    fn listener_text_is_never_cut() {
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        let long = Message::Listener {
            spec: "x".repeat(MAX_LISTENER_TEXT + 1),
            name: String::new(),
            remaining: 0,
        };
        assert_eq!(
            long.encode(&mut buf),
            Err(ProtocolError::TextTooLong {
                field: "spec",
                len: MAX_LISTENER_TEXT + 1
            })
        );
        // Both fields at their longest still fit in one message.
        let longest = Message::Listener {
            spec: "s".repeat(MAX_LISTENER_TEXT),
            name: "n".repeat(MAX_LISTENER_TEXT),
            remaining: u16::MAX,
        };
        let len = longest.encode(&mut buf).unwrap();
        assert_eq!(Message::decode(&buf[..len]).unwrap(), longest);
        assert_eq!(longest.fd_count(), 1);
    }

    #[test]
    fn listener_text_must_be_utf8() {
        let bytes = [PROTOCOL_VERSION, KIND_LISTENER, 1, 0, 0xff, 0, 0, 0, 0];
        assert_eq!(Message::decode(&bytes), Err(ProtocolError::Utf8("spec")));
    }

    #[test]
    fn foreign_version_is_rejected() {
        assert_eq!(
            Message::decode(&[9, KIND_READY, 0, 0, 0, 0]),
            Err(ProtocolError::Version { found: 9 })
        );
    }
}
