//! The demo's HTTP/1.1 responder: keep-alive, pipelining, bounded buffers, timeouts, and
//! the status codes a client expects for bad input.
//!
//! Parsing of request heads is `httparse`'s; this module owns the connection loop around
//! it: read into one bounded buffer, answer up to [`Limits::max_pipeline`] complete requests
//! from it, write those answers with one call, and repeat. Request bodies are read and
//! discarded as they arrive (never buffered whole), with `Content-Length` or `chunked`
//! framing.
//!
//! What a client can make the worker hold or wait for, and what it gets past each limit
//! (every error answer carries `Connection: close`, and the connection is then closed
//! after a short "lingering" read that keeps the answer from being destroyed by a reset):
//!
//! | limit ([`Limits`]) | past it |
//! |---|---|
//! | `max_request_line`: request line, bytes | 414 URI Too Long (RFC 9112 §3: a request target longer than the server parses) |
//! | `max_header_bytes`: request head, bytes | 431 |
//! | `max_headers`: header fields | 431 |
//! | `header_timeout`: from a head's first byte (from the connection's start for the first request) until the head is complete | 408, or a quiet close if nothing at all arrived |
//! | `max_body_bytes`: body, bytes (`Content-Length`, or the sum of the chunk sizes) | 413 |
//! | `body_timeout`: silence while a body is expected | 408 |
//! | `idle_timeout`: silence between requests on a keep-alive connection | quiet close |
//! | `send_timeout`: a write that makes no progress (the client does not read) | close |
//! | `max_pipeline`: requests answered before their answers are written | the rest wait in the buffer: the answers to at most this many requests are buffered, and the next requests are read only once those are written (backpressure) |
//!
//! Framing errors get 400 and a close: both `Content-Length` and `Transfer-Encoding`,
//! differing `Content-Length`s, a `Content-Length` that is not a plain decimal number,
//! `Transfer-Encoding` on HTTP/1.0, `chunked` not the final coding or applied twice, an
//! invalid chunk-size line, chunk data not followed by CRLF, or a malformed trailer.
//! A transfer coding other than `chunked`, `gzip`, `deflate` or `compress` gets 501. An
//! `Expect` other than `100-continue` gets 417. `Expect: 100-continue` gets an interim
//! `100 Continue` once the head is accepted (or the final error status instead, such as 413
//! for a declared body over the limit), unless the body is already arriving.

use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use coreloop::{ShutdownSignal, TimeoutStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::debug;

/// Upper bound for [`Limits::max_headers`] (the parser's header array lives on the stack).
pub(crate) const MAX_HEADERS_CAP: usize = 256;

/// Initial capacity of a connection's input and output buffers.
const INITIAL_BUFFER: usize = 4096;
/// Most bytes one read may add to the input buffer.
const READ_CHUNK: usize = 16 * 1024;
/// A buffer that grew past this (a large head) is shrunk back once it is empty.
const SHRINK_ABOVE: usize = 64 * 1024;
/// Longest chunk-size line of a chunked body (the size and any extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Before closing a connection that may still be sending (after an error answer, or with
/// unread pipelined input), how long and how much input is read and discarded, so that
/// the close does not turn into a reset that destroys the answer in the client's buffer.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// Bounds on what one connection may make the worker hold or wait for.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Largest request head (request line and headers), bytes.
    pub(crate) max_header_bytes: usize,
    /// Most headers in one request.
    pub(crate) max_headers: usize,
    /// Longest request line (method, target and version, without the CRLF), bytes.
    pub(crate) max_request_line: usize,
    /// Largest request body accepted (and discarded), bytes.
    pub(crate) max_body_bytes: u64,
    /// Most requests answered before the answers are written (the answers buffered per
    /// connection at any time).
    pub(crate) max_pipeline: usize,
    /// Time allowed to receive a whole request head once it has started (for the first
    /// request of a connection: once the connection has been handed to the handler).
    pub(crate) header_timeout: Duration,
    /// Longest silence while a request body is expected.
    pub(crate) body_timeout: Duration,
    /// Time an idle keep-alive connection is kept open.
    pub(crate) idle_timeout: Duration,
    /// Longest a write may wait for the client to make room (a client that does not read).
    pub(crate) send_timeout: Duration,
    /// Longest `/sleep` or `/burn`, milliseconds.
    pub(crate) max_delay_ms: u64,
    /// Once the worker drains, how long an idle keep-alive connection still waits for a
    /// request that may already be on its way.
    pub(crate) drain_linger: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 8 * 1024,
            max_headers: 64,
            max_request_line: 8 * 1024,
            max_body_bytes: 1024 * 1024,
            max_pipeline: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            send_timeout: Duration::from_secs(30),
            max_delay_ms: 60_000,
            drain_linger: Duration::from_millis(250),
        }
    }
}

/// The demo's version, shown by `/whoami` and `--version`: `CORELOOP_DEMO_VERSION` at
/// build time, else the package version. Set it to tell two builds apart across a binary
/// upgrade: `CORELOOP_DEMO_VERSION=2 cargo build --release --example http`, then SIGUSR2.
pub(crate) const VERSION: &str = match option_env!("CORELOOP_DEMO_VERSION") {
    Some(version) => version,
    None => env!("CARGO_PKG_VERSION"),
};

/// Who is answering: shown by `/whoami`.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) worker: usize,
    pub(crate) pid: u32,
}

/// The connection's stream with its timeouts.
type Io<'a, S> = Pin<&'a mut TimeoutStream<S>>;

/// How the connection ends once the buffered answers are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client asked to close (or the worker drains): close, lingering only if input
    /// is still arriving.
    Close,
    /// An error answer: the client may be sending more; linger before the close.
    Linger,
}

/// Serves HTTP/1.1 on `stream` until the client closes, asks to close, sends something
/// invalid, times out, or the worker drains (then at the next request boundary).
///
/// # Errors
///
/// I/O errors of the stream (a reset, for example). Timeouts are not errors: they end the
/// connection as described in the module documentation, with `Ok`.
pub(crate) async fn serve<S>(
    stream: &mut S,
    who: &Identity,
    limits: &Limits,
    shutdown: &ShutdownSignal,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut io =
        std::pin::pin!(TimeoutStream::new(stream).with_write_timeout(Some(limits.send_timeout)));
    let mut buf: Vec<u8> = Vec::with_capacity(INITIAL_BUFFER);
    // Unparsed input is `buf[pos..]`.
    let mut pos = 0usize;
    let mut out: Vec<u8> = Vec::with_capacity(INITIAL_BUFFER);
    // When the head being received started; the first request's clock starts now.
    let mut head_started = Some(tokio::time::Instant::now());
    loop {
        // Answer up to `max_pipeline` complete requests already buffered.
        let mut answered = 0usize;
        let mut end = None;
        while answered < limits.max_pipeline.max(1) {
            let req = match parse_head(&buf[pos..], limits) {
                Head::Partial => break,
                Head::Bad(status) => {
                    error_response(&mut out, status);
                    end = Some(End::Linger);
                    break;
                }
                Head::Request(req) => req,
            };
            pos += req.head_len;
            head_started = None;
            if req.expect_continue && req.body != Body::Empty && pos == buf.len() {
                // The client waits for this before it sends the body; earlier answers go
                // first.
                out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            let received = match read_body(
                io.as_mut(),
                &mut buf,
                &mut pos,
                &mut out,
                req.body,
                limits,
            )
            .await
            {
                Ok(received) => received,
                Err(BodyError::Status(status)) => {
                    error_response(&mut out, status);
                    end = Some(End::Linger);
                    break;
                }
                Err(BodyError::Io(err)) => return ended(err, "reading a request body"),
            };
            answered += 1;
            if !answer(&mut out, &req, received, who, limits, shutdown).await {
                end = Some(End::Close);
                break;
            }
        }
        if !out.is_empty() {
            if let Err(err) = io.write_all(&out).await {
                return ended(err, "writing responses");
            }
            out.clear();
            if out.capacity() > SHRINK_ABOVE {
                out.shrink_to(INITIAL_BUFFER);
            }
        }
        if let Some(end) = end {
            let linger = end == End::Linger || pos < buf.len();
            close(io.as_mut(), &mut buf, linger).await;
            return Ok(());
        }
        if answered == limits.max_pipeline.max(1) {
            // More may be buffered: answer it before reading anything else.
            continue;
        }

        // Read more. Keep only the unparsed input (a partial head, at most
        // `max_header_bytes`: more would have been refused).
        buf.drain(..pos);
        pos = 0;
        let idle = buf.is_empty() && head_started.is_none();
        if idle {
            if buf.capacity() > SHRINK_ABOVE {
                buf.shrink_to(INITIAL_BUFFER);
            }
            // Between requests: the idle timeout; once the worker drains, only a short
            // linger for a request already on its way (answered with `Connection: close`),
            // so that clients under continuous load see no reset.
            let wait = if shutdown.is_triggered() {
                limits.drain_linger
            } else {
                limits.idle_timeout
            };
            io.as_mut().set_read_deadline(None);
            io.as_mut().set_read_timeout(Some(wait));
        } else {
            // Within a head: the header timeout counts from its first byte, whatever
            // arrives in between (a client trickling bytes cannot extend it).
            let started = *head_started.get_or_insert_with(tokio::time::Instant::now);
            io.as_mut().set_read_timeout(None);
            io.as_mut()
                .set_read_deadline(Some(started + limits.header_timeout));
        }
        let result = if idle && !shutdown.is_triggered() {
            tokio::select! {
                result = fill(io.as_mut(), &mut buf) => result,
                // Re-enter the loop: the next read lingers for `drain_linger` only.
                () = shutdown.triggered() => continue,
            }
        } else {
            fill(io.as_mut(), &mut buf).await
        };
        match result {
            // The client closed (a partial head is dropped with it).
            Ok(0) => return Ok(()),
            Ok(_) => {
                head_started.get_or_insert_with(tokio::time::Instant::now);
            }
            Err(err) if err.kind() == io::ErrorKind::TimedOut => {
                if buf.is_empty() {
                    // Nothing of a request arrived: an idle connection, or one that never
                    // sent anything. Close without a word.
                    debug!("idle connection timed out; closing");
                    return Ok(());
                }
                debug!(buffered = buf.len(), "request head timed out; 408");
                error_response(&mut out, 408);
                if let Err(err) = io.write_all(&out).await {
                    return ended(err, "writing a 408");
                }
                close(io.as_mut(), &mut buf, true).await;
                return Ok(());
            }
            Err(err) => return Err(err),
        }
    }
}

/// What to return when the connection failed: a timeout ends it quietly (logged at
/// debug); any other error goes to the caller (the worker logs resets at debug too).
fn ended(err: io::Error, doing: &str) -> io::Result<()> {
    if err.kind() == io::ErrorKind::TimedOut {
        debug!(
            doing,
            "the client made no progress within its timeout; closing"
        );
        Ok(())
    } else {
        Err(err)
    }
}

/// Reads once into `buf`, at most [`READ_CHUNK`] bytes more than it holds.
async fn fill<S: AsyncRead>(mut io: Io<'_, S>, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < INITIAL_BUFFER / 4 {
        buf.reserve(READ_CHUNK);
    }
    io.read_buf(buf).await
}

/// Sends FIN after the answers, then (if `linger`, or if input turns out to be waiting)
/// reads and discards input for a while, so that closing with unread input does not reset
/// the connection before the client has read the answer.
async fn close<S: AsyncRead + AsyncWrite>(mut io: Io<'_, S>, buf: &mut Vec<u8>, linger: bool) {
    // A reset or a client that does not read may fail this; the close happens anyway.
    let _ = io.shutdown().await;
    let linger = linger || input_waiting(io.as_mut()).await;
    if !linger {
        return;
    }
    io.as_mut().set_read_timeout(None);
    io.as_mut()
        .set_read_deadline(Some(tokio::time::Instant::now() + LINGER_TIME));
    let mut discarded = 0usize;
    while discarded < LINGER_BYTES {
        buf.clear();
        match fill(io.as_mut(), buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => discarded += n,
        }
    }
}

/// Whether a read would return data right now (one non-blocking attempt; the data read is
/// dropped).
async fn input_waiting<S: AsyncRead>(mut io: Io<'_, S>) -> bool {
    let mut scratch = [0u8; 512];
    std::future::poll_fn(|cx| {
        let mut probe = ReadBuf::new(&mut scratch);
        Poll::Ready(match io.as_mut().poll_read(cx, &mut probe) {
            Poll::Ready(Ok(())) => !probe.filled().is_empty(),
            Poll::Ready(Err(_)) | Poll::Pending => false,
        })
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Request heads
// ---------------------------------------------------------------------------------------

struct Request {
    method: Method,
    path: String,
    /// HTTP/1.x minor version.
    version: u8,
    keep_alive: bool,
    expect_continue: bool,
    head_len: usize,
    body: Body,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
    Post,
    Other,
}

/// How the body of a request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Empty,
    Length(u64),
    Chunked,
}

enum Head {
    Partial,
    Bad(u16),
    Request(Request),
}

fn parse_head(input: &[u8], limits: &Limits) -> Head {
    if input.is_empty() {
        return Head::Partial;
    }
    // The request line (after any empty lines, which are ignored).
    let start = input
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(input.len());
    let line = &input[start..];
    let line_len = match line.iter().position(|&b| b == b'\n') {
        Some(end) => end - usize::from(end > 0 && line[end - 1] == b'\r'),
        None => line.len(),
    };
    if line_len > limits.max_request_line {
        return Head::Bad(414);
    }

    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
    let mut req =
        httparse::Request::new(&mut storage[..limits.max_headers.clamp(1, MAX_HEADERS_CAP)]);
    let head_len = match req.parse(input) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if input.len() > limits.max_header_bytes {
                Head::Bad(431)
            } else {
                Head::Partial
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Head::Bad(431),
        Err(_) => return Head::Bad(400),
    };
    if head_len > limits.max_header_bytes {
        return Head::Bad(431);
    }
    let version = req.version.unwrap_or(1);
    let mut keep_alive = version == 1;
    let mut expect_continue = false;
    let mut content_length: Option<u64> = None;
    let mut codings = Codings::default();
    for header in req.headers.iter() {
        let value = header.value.trim_ascii();
        if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        } else if header.name.eq_ignore_ascii_case("content-length") {
            // Digits only: no sign, no list, no spaces inside.
            let Some(len) = parse_decimal(value) else {
                return Head::Bad(400);
            };
            if content_length.is_some_and(|prev| prev != len) {
                return Head::Bad(400);
            }
            content_length = Some(len);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            codings.add(value);
        } else if header.name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case(b"100-continue") {
                // HTTP/1.0 clients do not wait for it (RFC 9110 §10.1.1).
                expect_continue = version == 1;
            } else {
                return Head::Bad(417);
            }
        }
    }
    let body = if codings.present {
        if version == 0 || content_length.is_some() {
            return Head::Bad(400);
        }
        if codings.chunked != 1 || !codings.last_chunked || codings.empty {
            return Head::Bad(400);
        }
        if codings.unknown {
            return Head::Bad(501);
        }
        Body::Chunked
    } else {
        match content_length {
            None | Some(0) => Body::Empty,
            Some(len) if len > limits.max_body_bytes => return Head::Bad(413),
            Some(len) => Body::Length(len),
        }
    };
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        Some("POST") => Method::Post,
        _ => Method::Other,
    };
    Head::Request(Request {
        method,
        path: req.path.unwrap_or("/").to_owned(),
        version,
        keep_alive,
        expect_continue,
        head_len,
        body,
    })
}

/// The transfer codings of a request, over all its `Transfer-Encoding` fields in order.
#[derive(Default)]
struct Codings {
    present: bool,
    chunked: usize,
    last_chunked: bool,
    unknown: bool,
    /// A field with no coding at all.
    empty: bool,
}

impl Codings {
    fn add(&mut self, value: &[u8]) {
        self.present = true;
        let mut any = false;
        for coding in value.split(|&b| b == b',') {
            let coding = coding.trim_ascii();
            if coding.is_empty() {
                continue;
            }
            any = true;
            let chunked = coding.eq_ignore_ascii_case(b"chunked");
            self.chunked += usize::from(chunked);
            self.last_chunked = chunked;
            let known = [
                &b"gzip"[..],
                b"x-gzip",
                b"deflate",
                b"compress",
                b"x-compress",
            ]
            .iter()
            .any(|name| coding.eq_ignore_ascii_case(name));
            self.unknown |= !chunked && !known;
        }
        self.empty |= !any;
    }
}

/// A non-empty string of ASCII digits that fits in a `u64`.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

// ---------------------------------------------------------------------------------------
// Request bodies
// ---------------------------------------------------------------------------------------

enum BodyError {
    /// The body is refused with this status.
    Status(u16),
    /// The stream failed or timed out, or the client closed mid-body.
    Io(io::Error),
}

/// Reads and discards a request body, starting with what is buffered at `buf[*pos..]` and
/// reading more as needed; returns its length (the payload, without chunk framing). Any
/// answers waiting in `out` are written before the first read that has to wait.
async fn read_body<S: AsyncRead + AsyncWrite>(
    mut io: Io<'_, S>,
    buf: &mut Vec<u8>,
    pos: &mut usize,
    out: &mut Vec<u8>,
    body: Body,
    limits: &Limits,
) -> Result<u64, BodyError> {
    let mut decoder = match body {
        Body::Empty => return Ok(0),
        Body::Length(len) => Decoder::Length(len),
        Body::Chunked => Decoder::Chunked(Chunk::Size),
    };
    let mut received = 0u64;
    loop {
        let (used, done) = decoder
            .feed(&buf[*pos..], &mut received, limits)
            .map_err(BodyError::Status)?;
        *pos += used;
        if done {
            return Ok(received);
        }
        // Everything buffered is consumed but a partial chunk line: make room and read.
        buf.drain(..*pos);
        *pos = 0;
        if !out.is_empty() {
            io.write_all(out).await.map_err(BodyError::Io)?;
            out.clear();
        }
        io.as_mut().set_read_deadline(None);
        io.as_mut().set_read_timeout(Some(limits.body_timeout));
        match fill(io.as_mut(), buf).await {
            Ok(0) => {
                return Err(BodyError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed in the middle of a request body",
                )));
            }
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::TimedOut => {
                debug!(received, "request body timed out; 408");
                return Err(BodyError::Status(408));
            }
            Err(err) => return Err(BodyError::Io(err)),
        }
    }
}

/// Body framing state.
enum Decoder {
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunk),
}

enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data: bytes still to come.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line; bytes of trailers so far.
    Trailers(usize),
}

impl Decoder {
    /// Consumes what belongs to the body at the start of `input`. Returns the bytes used
    /// and whether the body is complete, or the status that refuses it.
    fn feed(
        &mut self,
        input: &[u8],
        received: &mut u64,
        limits: &Limits,
    ) -> Result<(usize, bool), u16> {
        let chunk = match self {
            Decoder::Length(remaining) => {
                let take = (*remaining).min(input.len() as u64);
                *remaining -= take;
                *received += take;
                // take <= input.len()
                return Ok((take as usize, *remaining == 0));
            }
            Decoder::Chunked(chunk) => chunk,
        };
        let mut at = 0usize;
        loop {
            let rest = &input[at..];
            match chunk {
                Chunk::Size => {
                    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                        return if rest.len() > MAX_CHUNK_LINE {
                            Err(400)
                        } else {
                            Ok((at, false))
                        };
                    };
                    if end > MAX_CHUNK_LINE {
                        return Err(400);
                    }
                    let size = parse_chunk_size(&rest[..end]).ok_or(400u16)?;
                    at += end + 1;
                    *received = received.checked_add(size).ok_or(413u16)?;
                    if *received > limits.max_body_bytes {
                        return Err(413);
                    }
                    *chunk = if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    let take = (*left).min(rest.len() as u64);
                    *left -= take;
                    at += take as usize;
                    if *left > 0 {
                        return Ok((at, false));
                    }
                    *chunk = Chunk::DataEnd;
                }
                Chunk::DataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        at += 2;
                        *chunk = Chunk::Size;
                    }
                    [] | [b'\r'] => return Ok((at, false)),
                    _ => return Err(400),
                },
                Chunk::Trailers(total) => {
                    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                        return if *total + rest.len() > limits.max_header_bytes {
                            Err(431)
                        } else {
                            Ok((at, false))
                        };
                    };
                    let line = rest[..end].strip_suffix(b"\r").ok_or(400u16)?;
                    at += end + 1;
                    if line.is_empty() {
                        return Ok((at, true));
                    }
                    *total += end + 1;
                    if *total > limits.max_header_bytes {
                        return Err(431);
                    }
                    if !is_field_line(line) {
                        return Err(400);
                    }
                }
            }
        }
    }
}

/// `chunk-size [ BWS ";" chunk-ext ] CR` (the LF is cut off): 1 to 16 hex digits, then
/// optionally extensions, which are ignored but may not hold control characters.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r")?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let size = line[..digits].iter().fold(0u64, |acc, &d| {
        // At most 16 hex digits: no overflow.
        (acc << 4) | u64::from((d as char).to_digit(16).unwrap_or(0))
    });
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    match rest.first() {
        None => Some(size),
        Some(b';') if !rest.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) => Some(size),
        Some(_) => None,
    }
}

/// `name ":" value`, with a non-empty token for a name.
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    colon > 0
        && line[..colon]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        && !line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

// ---------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------

/// Appends the response to `req`; returns whether the connection stays open. Keep-alive is
/// decided when the response is written, after any wait, so a drain that began during a
/// slow request already shows in that request's `Connection: close`.
async fn answer(
    out: &mut Vec<u8>,
    req: &Request,
    received: u64,
    who: &Identity,
    limits: &Limits,
    shutdown: &ShutdownSignal,
) -> bool {
    let keep = || req.keep_alive && !shutdown.is_triggered();
    let reply = |out: &mut Vec<u8>, status: u16, body: &[u8], allow: Option<&str>| {
        let reply = Reply {
            status,
            body,
            keep: keep(),
            version: req.version,
            head_only: req.method == Method::Head,
            allow,
        };
        reply.append_to(out);
    };
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let allowed = match path {
        "/" | "/whoami" | "/sleep" | "/burn" | "/block" => {
            matches!(req.method, Method::Get | Method::Head).then_some("GET, HEAD")
        }
        "/discard" => (req.method == Method::Post).then_some("POST"),
        _ => {
            reply(out, 404, b"Not Found", None);
            return keep();
        }
    };
    if allowed.is_none() {
        let allow = if path == "/discard" {
            "POST"
        } else {
            "GET, HEAD"
        };
        reply(out, 405, b"Method Not Allowed", Some(allow));
        return keep();
    }
    match path {
        "/" => reply(out, 200, b"Hello, world!", None),
        "/whoami" => {
            let body = format!("worker={} pid={} version={VERSION}", who.worker, who.pid);
            reply(out, 200, body.as_bytes(), None);
        }
        "/discard" => {
            let body = format!("discarded {received} bytes");
            reply(out, 200, body.as_bytes(), None);
        }
        _ => {
            let Some(ms) = query_ms(query).filter(|ms| *ms <= limits.max_delay_ms) else {
                let msg = format!("expected ?ms=N with N <= {}", limits.max_delay_ms);
                reply(out, 400, msg.as_bytes(), None);
                return keep();
            };
            let wait = Duration::from_millis(ms);
            if path == "/sleep" {
                tokio::time::sleep(wait).await;
            } else if path == "/block" {
                // Deliberately blocks this worker's event loop without using CPU, as a
                // synchronous database call or file read would: the slow request of the
                // blocking-open benchmark.
                std::thread::sleep(wait);
            } else {
                // Deliberately blocks this worker's event loop: the skewed-load benchmark's
                // expensive request.
                let start = Instant::now();
                while start.elapsed() < wait {
                    std::hint::spin_loop();
                }
            }
            let body = format!("{path} {ms}ms");
            reply(out, 200, body.as_bytes(), None);
        }
    }
    keep()
}

fn query_ms(query: &str) -> Option<u64> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="))
        .and_then(|value| value.parse().ok())
}

fn status_text(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        _ => "Error",
    }
}

/// An error answer: its reason phrase as the body, and `Connection: close`.
fn error_response(out: &mut Vec<u8>, status: u16) {
    Reply {
        status,
        body: status_text(status).as_bytes(),
        keep: false,
        version: 1,
        head_only: false,
        allow: None,
    }
    .append_to(out);
}

struct Reply<'a> {
    status: u16,
    body: &'a [u8],
    keep: bool,
    /// The request's minor version: an HTTP/1.0 keep-alive is announced.
    version: u8,
    head_only: bool,
    allow: Option<&'a str>,
}

impl Reply<'_> {
    fn append_to(&self, out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nServer: coreloop\r\nDate: ",
            self.status,
            status_text(self.status)
        );
        push_date(out);
        let _ = write!(
            out,
            "\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n",
            self.body.len()
        );
        if let Some(allow) = self.allow {
            let _ = write!(out, "Allow: {allow}\r\n");
        }
        if !self.keep {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if self.version == 0 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !self.head_only {
            out.extend_from_slice(self.body);
        }
    }
}

/// Appends the `Date` header value, formatted once per second per thread.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with_borrow_mut(|(cached_secs, text)| {
        if *cached_secs != secs || text.is_empty() {
            *cached_secs = secs;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(text.as_bytes());
    });
}
