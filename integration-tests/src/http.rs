//! A minimal blocking HTTP/1.1 client with read and write timeouts everywhere: one
//! response parser ([`parse_response`]) under every reader ([`read_response`],
//! [`read_response_async`], [`parse_responses`], [`get`]), raw exchanges that read until
//! the server closes ([`send_raw`], [`read_until_close`]), the demo's `/whoami` body, and
//! the supervisor's Prometheus text ([`scrape`], [`series`]).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

/// Read and write timeout of every client socket the helpers create.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One parsed HTTP/1.1 response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields in order, names as received.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the response carries `Connection: close`.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|value| value.eq_ignore_ascii_case("close"))
    }
}

/// Parses the first complete response at the start of `bytes`: `Ok(None)` if incomplete,
/// otherwise the response and the number of bytes it took.
///
/// # Errors
///
/// When the bytes are not an HTTP/1.x response with a `Content-Length`.
pub fn parse_response(bytes: &[u8]) -> Result<Option<(Response, usize)>> {
    let Some(head_end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&bytes[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x status line: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("bad header line {line:?}"))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .context("response without Content-Length")?
        .1
        .parse()
        .context("bad Content-Length")?;
    let start = head_end + 4;
    if bytes.len() < start + length {
        return Ok(None);
    }
    Ok(Some((
        Response {
            status,
            headers,
            body: bytes[start..start + length].to_vec(),
        },
        start + length,
    )))
}

/// Parses every response in `bytes`, which must end exactly after the last one.
///
/// # Errors
///
/// On malformed or truncated input.
pub fn parse_responses(mut bytes: &[u8]) -> Result<Vec<Response>> {
    let mut responses = Vec::new();
    while !bytes.is_empty() {
        let Some((response, used)) = parse_response(bytes)? else {
            bail!(
                "truncated response after {} complete ones: {:?}",
                responses.len(),
                String::from_utf8_lossy(bytes)
            );
        };
        responses.push(response);
        bytes = &bytes[used..];
    }
    Ok(responses)
}

/// Reads exactly one response from a keep-alive connection (the caller sent one request).
///
/// # Errors
///
/// On I/O errors, timeouts, EOF before a complete response, or malformed input.
pub fn read_response(stream: &mut impl Read) -> Result<Response> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(response) = sole_response(&buf)? {
            return Ok(response);
        }
        let n = stream.read(&mut chunk).context("reading a response")?;
        if n == 0 {
            return Err(closed_early(&buf));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads exactly one response from a keep-alive connection, asynchronously (the caller
/// sent one request); like [`read_response`]. No timeout of its own: wrap it in one.
///
/// # Errors
///
/// On I/O errors (a reset, for example), EOF before a complete response, or malformed
/// input.
pub async fn read_response_async(stream: &mut tokio::net::TcpStream) -> Result<Response> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::with_capacity(512);
    loop {
        if let Some(response) = sole_response(&buf)? {
            return Ok(response);
        }
        let n = stream
            .read_buf(&mut buf)
            .await
            .context("reading a response")?;
        if n == 0 {
            return Err(closed_early(&buf));
        }
    }
}

/// The one response `buf` holds, once complete (`Ok(None)` until then), for the readers
/// of one response on a keep-alive connection.
fn sole_response(buf: &[u8]) -> Result<Option<Response>> {
    match parse_response(buf)? {
        None => Ok(None),
        Some((_, used)) if used != buf.len() => bail!("unexpected bytes after the response"),
        Some((response, _)) => Ok(Some(response)),
    }
}

fn closed_early(buf: &[u8]) -> anyhow::Error {
    anyhow!(
        "connection closed before a complete response: {:?}",
        String::from_utf8_lossy(buf)
    )
}

/// The single response of a whole reply (the bytes up to the server's close).
///
/// # Errors
///
/// When `bytes` do not parse, or hold another number of responses than one.
pub fn one_response(bytes: &[u8]) -> Result<Response> {
    let mut responses = parse_responses(bytes)?;
    ensure!(
        responses.len() == 1,
        "expected one response, got {}: {:?}",
        responses.len(),
        String::from_utf8_lossy(bytes)
    );
    Ok(responses.remove(0))
}

/// How the server ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Orderly close (FIN): `read` returned 0.
    Eof,
    /// Reset (RST): the server closed with unread input.
    Reset,
}

/// Everything received on a connection until the server closed it.
#[derive(Debug, Clone)]
pub struct RawReply {
    /// The bytes received.
    pub bytes: Vec<u8>,
    /// How the connection ended.
    pub close: Close,
}

impl RawReply {
    /// The bytes as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Reads until the server closes the connection.
///
/// # Errors
///
/// On a timeout (the server did not close within the stream's read timeout) or another
/// I/O error.
pub fn read_until_close(stream: &mut impl Read) -> Result<RawReply> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Ok(RawReply {
                    bytes,
                    close: Close::Eof,
                });
            }
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset => {
                return Ok(RawReply {
                    bytes,
                    close: Close::Reset,
                });
            }
            Err(err) => {
                return Err(err).with_context(|| {
                    format!(
                        "waiting for the server to close (received so far: {:?})",
                        String::from_utf8_lossy(&bytes)
                    )
                });
            }
        }
    }
}

/// Connects to `127.0.0.1:port` with [`IO_TIMEOUT`] for connect, read and write.
///
/// # Errors
///
/// The connect error (e.g. `ConnectionRefused`).
pub fn connect(port: u16) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// A `GET` request for `path` with `Connection: close`.
pub fn get_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
}

/// `GET path` over any stream with `Connection: close`, read until the server closes;
/// returns the status and the body.
///
/// # Errors
///
/// On I/O errors, or a reply that is not exactly one response.
pub fn get_over<S: Read + Write>(stream: &mut S, path: &str) -> Result<(u16, String)> {
    stream.write_all(get_request(path).as_bytes())?;
    let reply = read_until_close(stream)?;
    let response = one_response(&reply.bytes)?;
    Ok((response.status, response.text()))
}

/// `GET path` on a new connection to `127.0.0.1:port` with `Connection: close`; returns
/// the status and the body.
///
/// # Errors
///
/// On connect or I/O errors, or a malformed reply.
pub fn get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut stream = connect(port).with_context(|| format!("connect to 127.0.0.1:{port}"))?;
    get_over(&mut stream, path)
}

/// Sends `request` as one write on a new connection and reads until the server closes.
///
/// # Errors
///
/// On connect or I/O errors, or when the server does not close within [`IO_TIMEOUT`].
pub fn send_raw(port: u16, request: &[u8]) -> Result<RawReply> {
    let mut stream = connect(port).with_context(|| format!("connect to 127.0.0.1:{port}"))?;
    stream.write_all(request).context("sending the request")?;
    read_until_close(&mut stream)
}

/// Parses a `/whoami` body, `worker=<id> pid=<pid>`.
pub fn parse_whoami(body: &str) -> Option<(usize, u32)> {
    let mut parts = body.split_whitespace();
    let id = parts.next()?.strip_prefix("worker=")?.parse().ok()?;
    let pid = parts.next()?.strip_prefix("pid=")?.parse().ok()?;
    Some((id, pid))
}

/// Scrapes `/metrics` on `127.0.0.1:port`: the OpenMetrics text.
///
/// # Errors
///
/// On I/O errors, a status other than 200, or a text without the OpenMetrics end mark.
pub fn scrape(port: u16) -> Result<String> {
    let (status, body) = get(port, "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    ensure!(body.ends_with("# EOF\n"), "not OpenMetrics text: {body}");
    Ok(body)
}

/// Scrapes the metrics endpoint on `metrics_port` until `done` holds for the text, for up
/// to `timeout`. Polled: the figures change with nothing signalled to the outside.
///
/// # Errors
///
/// A failed scrape, or `done` still false when `timeout` has passed (the error names
/// `what`, with the last text).
pub fn wait_for_metrics(
    metrics_port: u16,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&str) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = scrape(metrics_port)?;
        if done(&text) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "not {what} after {timeout:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits up to `timeout` until the supervisor whose metrics endpoint is on `metrics_port`
/// has forwarded at least `n` connections in all to its workers `0..workers`: then each
/// was accepted and handed to a worker, which no answer on another connection can tell
/// once several accept loops each have their own queue.
///
/// # Errors
///
/// As [`wait_for_metrics`].
pub fn wait_for_forwarded(
    metrics_port: u16,
    workers: usize,
    n: usize,
    timeout: Duration,
) -> Result<()> {
    let what = format!("{n} connections forwarded");
    wait_for_metrics(metrics_port, &what, timeout, |text| {
        let forwarded: f64 = (0..workers)
            .filter_map(|w| series(text, &format!("coreloop_forwarded_total{{worker=\"{w}\"}}")))
            .sum();
        forwarded >= n as f64
    })
}

/// The value of one series in an OpenMetrics text, named exactly as it is written there
/// (`coreloop_forwarded_total{worker="0"}`); `None` if the text has no such series.
pub fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(series, _)| *series == name)
        .and_then(|(_, value)| value.parse().ok())
}

// ---------------------------------------------------------------------------------------
// A request in flight across a SIGTERM (the example tests)
// ---------------------------------------------------------------------------------------

/// Sends `GET path` (HTTP/1.1, keep-alive) on a new connection to `port` from a thread,
/// which reads until the server closes and returns what it got and the time from sending
/// the request to the close: a request to keep in flight across a SIGTERM. See
/// [`expect_one_ok_response`].
pub fn get_in_flight(
    port: u16,
    path: &str,
) -> std::thread::JoinHandle<Result<(RawReply, Duration)>> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    std::thread::spawn(move || {
        let mut stream = connect(port)?;
        let sent = Instant::now();
        stream.write_all(request.as_bytes())?;
        let reply = read_until_close(&mut stream)?;
        Ok((reply, sent.elapsed()))
    })
}

/// Joins a [`get_in_flight`] thread (`client` names it in the error if it panicked) and
/// asserts that the server answered exactly one response, with status 200, then closed
/// with FIN; returns that response's body and the elapsed time.
///
/// # Errors
///
/// The thread panicked or failed, or the reply does not parse.
pub fn expect_one_ok_response(
    thread: std::thread::JoinHandle<Result<(RawReply, Duration)>>,
    client: &str,
) -> Result<(String, Duration)> {
    let (reply, elapsed) = thread
        .join()
        .map_err(|_| anyhow!("the {client} panicked"))??;
    assert_eq!(reply.close, Close::Eof, "the server must close with FIN");
    let responses = parse_responses(&reply.bytes)?;
    assert_eq!(responses.len(), 1, "{}", reply.text());
    assert_eq!(responses[0].status, 200, "{}", reply.text());
    Ok((responses[0].text(), elapsed))
}
