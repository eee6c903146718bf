//! Requests with a deadline and background load: [`timed_get`] classifies one request as
//! answered, failed or hung ([`Outcome`]); [`Load`] runs client threads (one connection
//! per request, or keep-alive) until stopped and tallies a [`LoadReport`] per worker.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::http::{Response, connect, get_request, one_response, parse_whoami, read_response};

/// How one request with a deadline ended (see [`timed_get`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A complete response: status and body.
    Answered(u16, String),
    /// The connection failed (refused, reset, closed early, malformed reply).
    Failed(String),
    /// Nothing within the deadline.
    Hung,
}

/// `GET path` on a new connection with `Connection: close`, all within `timeout`
/// (connect, write and every read), classified as answered, failed or hung.
pub fn timed_get(port: u16, path: &str, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let timed_out = |err: &io::Error| {
        matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        )
    };
    let mut stream =
        match TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), timeout) {
            Ok(stream) => stream,
            Err(err) if timed_out(&err) => return Outcome::Hung,
            Err(err) => return Outcome::Failed(format!("connect: {err}")),
        };
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
    };
    let Some(left) = remaining() else {
        return Outcome::Hung;
    };
    if let Err(err) = stream
        .set_write_timeout(Some(left))
        .and_then(|()| stream.write_all(get_request(path).as_bytes()))
    {
        return if timed_out(&err) {
            Outcome::Hung
        } else {
            Outcome::Failed(format!("write: {err}"))
        };
    }
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(left) = remaining() else {
            return Outcome::Hung;
        };
        if let Err(err) = stream.set_read_timeout(Some(left)) {
            return Outcome::Failed(format!("set_read_timeout: {err}"));
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if timed_out(&err) => return Outcome::Hung,
            Err(err) => {
                return Outcome::Failed(format!(
                    "read: {err} after {:?}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
        }
    }
    match one_response(&bytes) {
        Ok(response) => Outcome::Answered(response.status, response.text()),
        Err(err) => Outcome::Failed(format!("{err:#}")),
    }
}

// ---------------------------------------------------------------------------------------
// Background load
// ---------------------------------------------------------------------------------------

/// What a [`Load`] has seen so far.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Requests answered `200`.
    pub ok: usize,
    /// Requests that failed (error, early close, non-200 status), with why.
    pub failed: Vec<String>,
    /// Requests without an answer within their deadline.
    pub hung: usize,
    /// Answers per worker PID (from `/whoami` bodies).
    pub pids: BTreeMap<u32, usize>,
}

impl LoadReport {
    /// Prints the counts (`what` says what the load went through) and asserts that every
    /// request was answered `200`: none failed, none hung, at least one answered.
    ///
    /// # Panics
    ///
    /// When a request failed or hung, or none was answered.
    pub fn assert_all_answered(&self, what: &str) {
        eprintln!(
            "{} requests ok {what}, {} failed, {} hung; answers per pid {:?}",
            self.ok,
            self.failed.len(),
            self.hung,
            self.pids
        );
        assert!(self.failed.is_empty(), "failed requests: {:?}", self.failed);
        assert_eq!(self.hung, 0, "hung requests");
        assert!(self.ok > 0, "no request answered");
    }

    fn record(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Answered(200, body) => {
                self.ok += 1;
                if let Some((_, pid)) = parse_whoami(&body) {
                    *self.pids.entry(pid).or_default() += 1;
                }
            }
            Outcome::Answered(status, body) => self.failed.push(format!("{status} {body:?}")),
            Outcome::Failed(why) => self.failed.push(why),
            Outcome::Hung => self.hung += 1,
        }
    }
}

/// Client threads sending `GET /whoami` in a loop until stopped: one connection per
/// request, or keep-alive connections that are reused until the server answers
/// `Connection: close` (then the client reconnects, as a client should).
#[derive(Debug)]
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    shared: Arc<(Mutex<LoadReport>, Condvar)>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Deadline of each request of a [`Load`].
pub const LOAD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl Load {
    /// Starts `per_request` threads that open one connection per request and
    /// `keep_alive` threads that reuse connections.
    ///
    /// # Errors
    ///
    /// When a thread cannot be started.
    pub fn start(port: u16, per_request: usize, keep_alive: usize) -> Result<Self> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shared = Arc::new((Mutex::new(LoadReport::default()), Condvar::new()));
        let mut threads = Vec::new();
        for index in 0..per_request + keep_alive {
            let stop = Arc::clone(&stop);
            let shared = Arc::clone(&shared);
            let reuse = index >= per_request;
            let thread = std::thread::Builder::new()
                .name(format!("load-{index}"))
                .spawn(move || {
                    let mut conn: Option<TcpStream> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let outcome = if reuse {
                            keep_alive_get(port, &mut conn)
                        } else {
                            timed_get(port, "/whoami", LOAD_REQUEST_TIMEOUT)
                        };
                        let (lock, changed) = &*shared;
                        lock.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .record(outcome);
                        changed.notify_all();
                    }
                })
                .context("cannot start a load thread")?;
            threads.push(thread);
        }
        Ok(Self {
            stop,
            shared,
            threads,
        })
    }

    /// A copy of the report so far.
    pub fn report(&self) -> LoadReport {
        self.shared
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Blocks until the report satisfies `pred` (checked after every request); `false`
    /// after `timeout`.
    pub fn wait_until(&self, mut pred: impl FnMut(&LoadReport) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, changed) = &*self.shared;
        let mut report = lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if pred(&report) {
                return true;
            }
            let Some(remaining) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            report = changed
                .wait_timeout(report, remaining)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Blocks until every PID of `pids` has answered at least `answers` requests;
    /// `false` after `timeout`.
    pub fn wait_for_answers<'a>(
        &self,
        pids: impl IntoIterator<Item = &'a u32> + Clone,
        answers: usize,
        timeout: Duration,
    ) -> bool {
        self.wait_until(
            |r| {
                pids.clone()
                    .into_iter()
                    .all(|pid| r.pids.get(pid).is_some_and(|n| *n >= answers))
            },
            timeout,
        )
    }

    /// Stops the threads (each finishes its current request) and returns the report.
    pub fn finish(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.report()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One `GET /whoami` on the keep-alive connection in `conn` (opened if `None`), within
/// [`LOAD_REQUEST_TIMEOUT`]. The connection is dropped after an error or a `Connection:
/// close` answer.
fn keep_alive_get(port: u16, conn: &mut Option<TcpStream>) -> Outcome {
    let timed_out = |err: &anyhow::Error| {
        err.chain().any(|cause| {
            cause.downcast_ref::<io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                )
            })
        })
    };
    let result = (|| -> Result<Response> {
        if conn.is_none() {
            let stream = connect(port)?;
            stream.set_read_timeout(Some(LOAD_REQUEST_TIMEOUT))?;
            stream.set_write_timeout(Some(LOAD_REQUEST_TIMEOUT))?;
            *conn = Some(stream);
        }
        let stream = conn.as_mut().context("no connection")?;
        stream.write_all(b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
        read_response(stream)
    })();
    match result {
        Ok(response) => {
            if response.closes() {
                *conn = None;
            }
            Outcome::Answered(response.status, response.text())
        }
        Err(err) => {
            *conn = None;
            if timed_out(&err) {
                Outcome::Hung
            } else {
                Outcome::Failed(format!("keep-alive: {err:#}"))
            }
        }
    }
}
