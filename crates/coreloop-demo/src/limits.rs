//! What the responder is configured with: its [`Limits`], and who is answering
//! ([`Identity`], [`VERSION`]).

use std::time::Duration;

/// Upper bound for [`Limits::max_headers`] (the parser's header array lives on the stack).
pub const MAX_HEADERS_CAP: usize = 256;

/// Bounds on what one connection may make the worker hold or wait for.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request head (request line and headers), bytes.
    pub max_header_bytes: usize,
    /// Most headers in one request.
    pub max_headers: usize,
    /// Longest request line (method, target and version, without the CRLF), bytes.
    pub max_request_line: usize,
    /// Largest request body accepted (and discarded), bytes.
    pub max_body_bytes: u64,
    /// Most requests answered before the answers are written (the answers buffered per
    /// connection at any time).
    pub max_pipeline: usize,
    /// Time allowed to receive a whole request head once it has started (for the first
    /// request of a connection: once the connection has been handed to the handler).
    pub header_timeout: Duration,
    /// Longest silence while a request body is expected.
    pub body_timeout: Duration,
    /// Time an idle keep-alive connection is kept open.
    pub idle_timeout: Duration,
    /// Longest a write may wait for the client to make room (a client that does not read).
    pub send_timeout: Duration,
    /// Longest `/sleep` or `/burn`, milliseconds.
    pub max_delay_ms: u64,
    /// Once the worker drains, how long an idle keep-alive connection still waits for a
    /// request that may already be on its way.
    pub drain_linger: Duration,
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
/// upgrade: `CORELOOP_DEMO_VERSION=2 cargo build --release -p coreloop-demo`, then SIGUSR2.
pub const VERSION: &str = match option_env!("CORELOOP_DEMO_VERSION") {
    Some(version) => version,
    None => env!("CARGO_PKG_VERSION"),
};

/// Who is answering: shown by `/whoami`.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The worker's slot (`coreloop::WorkerId::get`: `0..workers`).
    pub worker: usize,
    /// The process id of the worker.
    pub pid: u32,
}
