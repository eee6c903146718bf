//! The demo's HTTP/1.1 responder: keep-alive, pipelining, bounded buffers, timeouts, and
//! the status codes a client expects for bad input. The entry point is [`serve`], whose
//! documentation lists what a client gets past each limit.

use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use coreloop::{ShutdownSignal, TimeoutStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::debug;

use crate::limits::{Identity, Limits, VERSION};
use crate::parse::{Body, Chunk, Decoder, Head, Method, Request, parse_head};

/// Initial capacity of a connection's input and output buffers.
const INITIAL_BUFFER: usize = 4096;
/// Most bytes one read may add to the input buffer.
const READ_CHUNK: usize = 16 * 1024;
/// A buffer that grew past this (a large head) is shrunk back once it is empty.
const SHRINK_ABOVE: usize = 64 * 1024;
/// Before closing a connection that may still be sending (after an error answer, or with
/// unread pipelined input), how long and how much input is read and discarded, so that
/// the close does not turn into a reset that destroys the answer in the client's buffer.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

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
/// invalid, times out, or the worker drains (then at the next request boundary): the
/// demo's responder, for one connection.
///
/// Request heads are parsed by `httparse`; around it runs the connection loop: read into
/// one bounded buffer, answer up to [`Limits::max_pipeline`] complete requests from it,
/// write those answers with one call, and repeat. Request bodies are read and discarded as
/// they arrive (never buffered whole), with `Content-Length` or `chunked` framing.
///
/// What a client can make the worker hold or wait for, and what it gets past each limit
/// (every error answer carries `Connection: close`, and the connection is then closed
/// after a short "lingering" read that keeps the answer from being destroyed by a reset):
///
/// | limit ([`Limits`]) | past it |
/// |---|---|
/// | `max_request_line`: request line, bytes | 414 URI Too Long (RFC 9112 §3: a request target longer than the server parses) |
/// | `max_header_bytes`: request head, bytes | 431 |
/// | `max_headers`: header fields | 431 |
/// | `header_timeout`: from a head's first byte (from the connection's start for the first request) until the head is complete | 408, or a quiet close if nothing at all arrived |
/// | `max_body_bytes`: body, bytes (`Content-Length`, or the sum of the chunk sizes) | 413 |
/// | `body_timeout`: silence while a body is expected | 408 |
/// | `idle_timeout`: silence between requests on a keep-alive connection | quiet close |
/// | `send_timeout`: a write that makes no progress (the client does not read) | close |
/// | `max_pipeline`: requests answered before their answers are written | the rest wait in the buffer: the answers to at most this many requests are buffered, and the next requests are read only once those are written (backpressure) |
///
/// Framing errors get 400 and a close: both `Content-Length` and `Transfer-Encoding`,
/// differing `Content-Length`s, a `Content-Length` that is not a plain decimal number,
/// `Transfer-Encoding` on HTTP/1.0, `chunked` not the final coding or applied twice, an
/// invalid chunk-size line, chunk data not followed by CRLF, or a malformed trailer.
/// A transfer coding other than `chunked`, `gzip`, `deflate` or `compress` gets 501. An
/// `Expect` other than `100-continue` gets 417. `Expect: 100-continue` gets an interim
/// `100 Continue` once the head is accepted (or the final error status instead, such as 413
/// for a declared body over the limit), unless the body is already arriving.
///
/// # Errors
///
/// I/O errors of the stream (a reset, for example). Timeouts are not errors: they end the
/// connection as described above, with `Ok`.
pub async fn serve<S>(
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
        let Some(Answered { count, end }) = answer_buffered(
            io.as_mut(),
            &mut buf,
            &mut pos,
            &mut out,
            who,
            limits,
            shutdown,
        )
        .await?
        else {
            return Ok(());
        };
        if pos > 0 {
            // A head was taken: the next one's clock starts at its first byte.
            head_started = None;
        }
        if let Err(err) = write_out(io.as_mut(), &mut out).await {
            return ended(err, "writing responses");
        }
        if let Some(end) = end {
            let linger = end == End::Linger || pos < buf.len();
            close(io.as_mut(), &mut buf, linger).await;
            return Ok(());
        }
        if count == limits.max_pipeline.max(1) {
            // More may be buffered: answer it before reading anything else.
            continue;
        }

        // Read more. Keep only the unparsed input (a partial head, at most
        // `max_header_bytes`: more would have been refused).
        buf.drain(..pos);
        pos = 0;
        let idle = buf.is_empty() && head_started.is_none();
        if idle && buf.capacity() > SHRINK_ABOVE {
            buf.shrink_to(INITIAL_BUFFER);
        }
        arm_read(io.as_mut(), idle, &mut head_started, limits, shutdown);
        let Some(result) = read_more(io.as_mut(), &mut buf, idle, shutdown).await else {
            // The worker drains: the next read lingers for `drain_linger` only.
            continue;
        };
        match result {
            // The client closed (a partial head is dropped with it).
            Ok(0) => return Ok(()),
            Ok(_) => {
                head_started.get_or_insert_with(tokio::time::Instant::now);
            }
            Err(err) if err.kind() == io::ErrorKind::TimedOut => {
                return timed_out(io.as_mut(), &mut buf, &mut out).await;
            }
            Err(err) => return Err(err),
        }
    }
}

/// Writes the answers in `out`, if any, and empties it.
async fn write_out<S: AsyncWrite>(mut io: Io<'_, S>, out: &mut Vec<u8>) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    io.write_all(out).await?;
    out.clear();
    if out.capacity() > SHRINK_ABOVE {
        out.shrink_to(INITIAL_BUFFER);
    }
    Ok(())
}

/// Reads more input into `buf` ([`fill`]); `None` if the worker started draining while
/// the connection was `idle`, so that the read is set up again with the drain's linger.
async fn read_more<S: AsyncRead>(
    mut io: Io<'_, S>,
    buf: &mut Vec<u8>,
    idle: bool,
    shutdown: &ShutdownSignal,
) -> Option<io::Result<usize>> {
    if idle && !shutdown.is_triggered() {
        tokio::select! {
            result = fill(io.as_mut(), buf) => Some(result),
            () = shutdown.triggered() => None,
        }
    } else {
        Some(fill(io, buf).await)
    }
}

/// What answering the buffered requests came to.
struct Answered {
    /// Requests answered.
    count: usize,
    /// How the connection ends once the answers are written, if it does.
    end: Option<End>,
}

/// Answers up to `max_pipeline` complete requests buffered in `buf[*pos..]`, reading their
/// bodies, into `out`; `*pos` moves past what was taken. `None`: reading a body timed
/// out, and the connection ends without another word.
///
/// # Errors
///
/// As [`serve`]: an I/O error reading a body, other than a timeout.
async fn answer_buffered<S: AsyncRead + AsyncWrite>(
    mut io: Io<'_, S>,
    buf: &mut Vec<u8>,
    pos: &mut usize,
    out: &mut Vec<u8>,
    who: &Identity,
    limits: &Limits,
    shutdown: &ShutdownSignal,
) -> io::Result<Option<Answered>> {
    let mut count = 0usize;
    while count < limits.max_pipeline.max(1) {
        let req = match parse_head(&buf[*pos..], limits) {
            Head::Partial => break,
            Head::Bad(status) => {
                error_response(out, status);
                return Ok(Some(Answered {
                    count,
                    end: Some(End::Linger),
                }));
            }
            Head::Request(req) => req,
        };
        *pos += req.head_len;
        if req.expect_continue && req.body != Body::Empty && *pos == buf.len() {
            // The client waits for this before it sends the body; earlier answers go
            // first.
            out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let received = match read_body(io.as_mut(), buf, pos, out, req.body, limits).await {
            Ok(received) => received,
            Err(BodyError::Status(status)) => {
                error_response(out, status);
                return Ok(Some(Answered {
                    count,
                    end: Some(End::Linger),
                }));
            }
            Err(BodyError::Io(err)) => return ended(err, "reading a request body").map(|()| None),
        };
        count += 1;
        if !answer(out, &req, received, who, limits, shutdown).await {
            return Ok(Some(Answered {
                count,
                end: Some(End::Close),
            }));
        }
    }
    Ok(Some(Answered { count, end: None }))
}

/// Sets the read timeout for the next read: between requests (`idle`), the idle timeout,
/// or once the worker drains only a short linger for a request already on its way
/// (answered with `Connection: close`), so that clients under continuous load see no
/// reset; within a head, the header timeout from its first byte, whatever arrives in
/// between (a client trickling bytes cannot extend it).
fn arm_read<S>(
    mut io: Io<'_, S>,
    idle: bool,
    head_started: &mut Option<tokio::time::Instant>,
    limits: &Limits,
    shutdown: &ShutdownSignal,
) {
    if idle {
        let wait = if shutdown.is_triggered() {
            limits.drain_linger
        } else {
            limits.idle_timeout
        };
        io.as_mut().set_read_deadline(None);
        io.as_mut().set_read_timeout(Some(wait));
    } else {
        let started = *head_started.get_or_insert_with(tokio::time::Instant::now);
        io.as_mut().set_read_timeout(None);
        io.as_mut()
            .set_read_deadline(Some(started + limits.header_timeout));
    }
}

/// A read timed out: a connection that sent nothing of a request closes without a word;
/// one with part of a head gets 408.
async fn timed_out<S: AsyncRead + AsyncWrite>(
    mut io: Io<'_, S>,
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    if buf.is_empty() {
        debug!("idle connection timed out; closing");
        return Ok(());
    }
    debug!(buffered = buf.len(), "request head timed out; 408");
    error_response(out, 408);
    if let Err(err) = io.write_all(out).await {
        return ended(err, "writing a 408");
    }
    close(io, buf, true).await;
    Ok(())
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
