//! The demo's HTTP/1.1 responder: keep-alive, pipelining, bounded buffers, and the status
//! codes a client expects for bad input.
//!
//! Parsing is `httparse`'s; this module owns the connection loop around it: read into one
//! buffer, answer every complete request in it, write all the answers with one call, and
//! repeat. Every limit (header bytes, header count, body size, header and idle timeouts)
//! is a field of [`Limits`], and every violation gets its status and a close.

use std::fmt::Write as _;
use std::io;
use std::time::{Duration, Instant, SystemTime};

use coreloop::ShutdownSignal;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Upper bound for [`Limits::max_headers`] (the parser's header array lives on the stack).
pub(crate) const MAX_HEADERS_CAP: usize = 256;

/// Bounds on what one connection may make the worker hold or wait for.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Largest request head (request line and headers), bytes.
    pub(crate) max_header_bytes: usize,
    /// Most headers in one request.
    pub(crate) max_headers: usize,
    /// Largest request body accepted (and discarded), bytes.
    pub(crate) max_body_bytes: u64,
    /// Time allowed to receive a whole request head once it has started.
    pub(crate) header_timeout: Duration,
    /// Time an idle keep-alive connection is kept open.
    pub(crate) idle_timeout: Duration,
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
            max_body_bytes: 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_delay_ms: 60_000,
            drain_linger: Duration::from_millis(250),
        }
    }
}

/// Who is answering: shown by `/whoami`.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) worker: usize,
    pub(crate) pid: u32,
}

/// Serves HTTP/1.1 on `stream` until the client closes, asks to close, sends something
/// invalid, times out, or the worker drains (then at the next request boundary).
pub(crate) async fn serve<S>(
    stream: &mut S,
    who: &Identity,
    limits: &Limits,
    shutdown: &ShutdownSignal,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut served = 0u64;
    let mut request_started: Option<Instant> = None;
    loop {
        // Answer every complete request already buffered.
        let mut close = false;
        loop {
            match parse_one(&buf, limits) {
                Parsed::Partial => break,
                Parsed::Bad(status) => {
                    respond(
                        &mut out,
                        status,
                        "text/plain",
                        status_text(status).as_bytes(),
                        true,
                        false,
                    );
                    close = true;
                    break;
                }
                Parsed::Request(req) => {
                    let consumed = req.total_len;
                    if consumed > buf.len() {
                        // The body has not fully arrived yet.
                        break;
                    }
                    let keep = answer(&mut out, &req, who, limits, shutdown).await;
                    buf.drain(..consumed);
                    served += 1;
                    request_started = None;
                    if !keep {
                        close = true;
                        break;
                    }
                }
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if close {
            let _ = stream.shutdown().await;
            return Ok(());
        }
        // Read more. The head of a request must arrive within the header timeout, counted
        // from its first byte (a client trickling bytes cannot hold the connection). An
        // idle connection waits up to the idle timeout; once the worker drains, it lingers
        // only briefly for a request already on its way (answered with `Connection:
        // close`), so clients under continuous load see no reset. A connection that has
        // not had its first request yet is served: it was accepted before the drain.
        let mid_request = !buf.is_empty();
        if !mid_request {
            request_started = None;
        }
        let idle = served > 0 && !mid_request;
        let deadline = match request_started {
            Some(started) => started + limits.header_timeout,
            None if served == 0 => Instant::now() + limits.header_timeout,
            None if shutdown.is_triggered() => Instant::now() + limits.drain_linger,
            None => Instant::now() + limits.idle_timeout,
        };
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let read = tokio::time::timeout_at(deadline.into(), stream.read_buf(&mut buf));
        let result = if idle && !shutdown.is_triggered() {
            tokio::select! {
                result = read => result,
                // Re-enter the loop: the next read lingers for `drain_linger` only.
                () = shutdown.triggered() => continue,
            }
        } else {
            read.await
        };
        match result {
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(_)) => {
                request_started.get_or_insert_with(Instant::now);
            }
            Ok(Err(err)) => return Err(err),
            Err(_elapsed) if mid_request => {
                respond(&mut out, 408, "text/plain", b"Request Timeout", true, false);
                stream.write_all(&out).await?;
                return Ok(());
            }
            Err(_elapsed) => return Ok(()),
        }
    }
}

struct Request {
    method: Method,
    path: String,
    keep_alive: bool,
    /// Head plus body.
    total_len: usize,
}

#[derive(PartialEq, Eq)]
enum Method {
    Get,
    Head,
    Other,
}

enum Parsed {
    Partial,
    Bad(u16),
    Request(Request),
}

fn parse_one(buf: &[u8], limits: &Limits) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
    let mut req = httparse::Request::new(&mut storage[..limits.max_headers.min(MAX_HEADERS_CAP)]);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > limits.max_header_bytes {
                Parsed::Bad(431)
            } else {
                Parsed::Partial
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Parsed::Bad(431),
        Err(_) => return Parsed::Bad(400),
    };
    if head_len > limits.max_header_bytes {
        return Parsed::Bad(431);
    }
    let version = req.version.unwrap_or(1);
    let mut keep_alive = version == 1;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    for header in req.headers.iter() {
        if header.name.eq_ignore_ascii_case("connection") {
            for token in header.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let Some(len) = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
            else {
                return Parsed::Bad(400);
            };
            if content_length.is_some_and(|prev| prev != len) {
                return Parsed::Bad(400);
            }
            content_length = Some(len);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only a final "chunked" is a framing we can read; anything else is refused.
            let last = header
                .value
                .rsplit(|&b| b == b',')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            if !last.eq_ignore_ascii_case(b"chunked") || version == 0 {
                return Parsed::Bad(400);
            }
            chunked = true;
        }
    }
    if chunked && content_length.is_some() {
        return Parsed::Bad(400);
    }
    let body_len = if chunked {
        match chunked_len(&buf[head_len..], limits.max_body_bytes) {
            Ok(Some(len)) => len,
            Ok(None) => return Parsed::Partial,
            Err(status) => return Parsed::Bad(status),
        }
    } else {
        let len = content_length.unwrap_or(0);
        if len > limits.max_body_bytes {
            return Parsed::Bad(413);
        }
        // Bounded by max_body_bytes, which fits in memory by construction.
        len as usize
    };
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        _ => Method::Other,
    };
    Parsed::Request(Request {
        method,
        path: req.path.unwrap_or("/").to_owned(),
        keep_alive,
        total_len: head_len + body_len,
    })
}

/// Length of a complete chunked body at the start of `body`, `None` while incomplete.
fn chunked_len(body: &[u8], max: u64) -> Result<Option<usize>, u16> {
    let mut pos = 0usize;
    let mut total = 0u64;
    loop {
        let (size_len, size) = match httparse::parse_chunk_size(&body[pos..]) {
            Ok(httparse::Status::Complete(found)) => found,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(400),
        };
        pos += size_len;
        total = total.saturating_add(size);
        if total > max {
            return Err(413);
        }
        if size == 0 {
            // Trailers: lines until an empty one.
            loop {
                let Some(end) = body[pos..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                pos += end + 2;
                if end == 0 {
                    return Ok(Some(pos));
                }
            }
        }
        // size <= max, which fits in usize.
        let need = size as usize + 2;
        if body.len() - pos < need {
            return Ok(None);
        }
        if &body[pos + size as usize..pos + need] != b"\r\n" {
            return Err(400);
        }
        pos += need;
    }
}

/// Appends the response to `req`; returns whether the connection stays open. Keep-alive is
/// decided when the response is written, after any wait, so a drain that began during a
/// slow request already shows in that request's `Connection: close`.
async fn answer(
    out: &mut Vec<u8>,
    req: &Request,
    who: &Identity,
    limits: &Limits,
    shutdown: &ShutdownSignal,
) -> bool {
    let keep = || req.keep_alive && !shutdown.is_triggered();
    let head_only = req.method == Method::Head;
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let known = matches!(path, "/" | "/whoami" | "/sleep" | "/burn");
    if known && req.method == Method::Other {
        respond(
            out,
            405,
            "text/plain",
            b"Method Not Allowed",
            !keep(),
            head_only,
        );
        return keep();
    }
    match path {
        "/" => respond(out, 200, "text/plain", b"Hello, world!", !keep(), head_only),
        "/whoami" => {
            let body = format!("worker={} pid={}", who.worker, who.pid);
            respond(out, 200, "text/plain", body.as_bytes(), !keep(), head_only);
        }
        "/sleep" | "/burn" => {
            let Some(ms) = query_ms(query).filter(|ms| *ms <= limits.max_delay_ms) else {
                let msg = format!("expected ?ms=N with N <= {}", limits.max_delay_ms);
                respond(out, 400, "text/plain", msg.as_bytes(), !keep(), head_only);
                return keep();
            };
            let wait = Duration::from_millis(ms);
            if path == "/sleep" {
                tokio::time::sleep(wait).await;
            } else {
                // Deliberately blocks this worker's event loop: the skewed-load benchmark's
                // expensive request.
                let start = Instant::now();
                while start.elapsed() < wait {
                    std::hint::spin_loop();
                }
            }
            let body = format!("{path} {ms}ms");
            respond(out, 200, "text/plain", body.as_bytes(), !keep(), head_only);
        }
        _ => respond(out, 404, "text/plain", b"Not Found", !keep(), head_only),
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
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

fn respond(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
    head_only: bool,
) {
    let mut head = String::with_capacity(160);
    // Writing into a String cannot fail.
    let _ = write!(
        head,
        "HTTP/1.1 {status} {}\r\nServer: coreloop\r\nDate: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        status_text(status),
        date(),
        body.len()
    );
    if status == 405 {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    out.extend_from_slice(head.as_bytes());
    if !head_only {
        out.extend_from_slice(body);
    }
}

/// The `Date` header value, formatted once per second per worker.
fn date() -> String {
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
        text.clone()
    })
}
