//! Black-box test harness for coreloop: runs the real demo binary (`examples/http`), or
//! one of the fixture binaries of this package (`src/bin/fixture-*.rs`, built on the
//! [`fixture`] module), and looks at it only from the outside, through sockets, signals,
//! its log lines on stderr and `/proc`.
//!
//! - [`http_binary`] finds `target/<profile>/examples/http` next to the running test
//!   binary and brings it up to date with `cargo build --workspace --example http` (once
//!   per test process; a no-op when nothing changed).
//! - [`Server`] starts the demo, captures its stderr line by line (echoed to the test's
//!   stderr), and lets a test block on a log line with [`Server::wait_for_log`] (a
//!   `Condvar`, no polling). TCP ports are drawn at random outside the kernel's ephemeral
//!   range; a port that turns out to be taken is detected from the server's own
//!   `cannot listen on …` error, and another one is tried. Dropping a [`Server`] kills the
//!   supervisor and every worker it was seen to start, by PID (through pidfds, so a
//!   recycled PID is never hit), never by name.
//! - Process helpers read `/proc` ([`proc_stat`], [`children_of`], [`is_alive`],
//!   [`fd_count`]) and wait for a process to exit with a pidfd and `poll`
//!   ([`wait_for_exit`]).
//! - A minimal blocking HTTP/1.1 client ([`get`], [`send_raw`], [`read_response`],
//!   [`parse_responses`]) with read and write timeouts everywhere.
//! - Supervision helpers: [`Server::wait_for_replacement`], [`Server::send_line`] (stdin
//!   of fixture-handle), [`fewest_ready_workers`] and [`assert_min_ready_workers`] (from
//!   the log), [`Server::expect_clean_drain_exit`], [`live_children`],
//!   [`zombie_children`], [`reaped`], [`timed_get`] (a request classified as answered,
//!   failed or hung) and [`Load`] (client threads in the background).
//!
//! Everything that waits takes a bounded timeout.

pub mod fixture;

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hash, Hasher};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal};

/// Read and write timeout of every client socket the helpers create.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Server::start`] waits for the `serving` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variable that, when set, names the demo binary to test and disables the
/// automatic `cargo build`.
pub const BINARY_ENV: &str = "CORELOOP_HTTP_BIN";

/// How many random ports [`Server::start`] tries before giving up.
const PORT_ATTEMPTS: usize = 16;

// ---------------------------------------------------------------------------------------
// The binary under test
// ---------------------------------------------------------------------------------------

/// Path of the demo HTTP binary, built if needed.
///
/// The test binary runs from `target/<profile>/deps/`, so the example lives at
/// `target/<profile>/examples/http`. The first call in a process runs
/// `cargo build --workspace --locked --example http` for that profile (`$CARGO` if set,
/// else `cargo`), which builds a missing binary and rebuilds a stale one, and is a no-op
/// otherwise; cargo's own lock serializes concurrent test processes. `--workspace` gives
/// the same feature unification as `cargo nextest run --workspace`, so both produce the
/// same artifact and neither rebuilds after the other. If [`BINARY_ENV`] is set, that
/// path is used as is and nothing is built.
///
/// # Errors
///
/// When the layout is not cargo's, or the build fails (cargo's output is included).
pub fn http_binary() -> Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| locate_or_build().map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|msg| anyhow!(msg))
}

fn locate_or_build() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(BINARY_ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{BINARY_ENV}={} does not name a file", path.display());
        }
        return Ok(path);
    }
    build_example("http", BINARY_ENV)
}

/// Builds example `name` for the profile the running test was built with and returns its
/// path; `override_env` is named in the error when the layout is not cargo's.
///
/// cargo sets variables for test processes (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, …) that
/// build scripts may declare `rerun-if-env-changed` on (ring's does): they are removed
/// here, so that a build started from a test is the same build as one from the shell and
/// neither undoes the other.
fn build_example(name: &str, override_env: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let deps = exe
        .parent()
        .filter(|dir| dir.file_name().is_some_and(|dir| dir == "deps"))
        .with_context(|| {
            format!(
                "{} is not in a cargo `deps` directory; set {override_env}",
                exe.display()
            )
        })?;
    let profile_dir = deps.parent().context("the deps directory has no parent")?;
    let binary = profile_dir.join("examples").join(name);
    let profile = profile_dir
        .file_name()
        .and_then(|dir| dir.to_str())
        .context("profile directory name")?;
    let parent = profile_dir
        .parent()
        .context("the profile directory has no parent")?;

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "--workspace",
        "--locked",
        "--example",
        name,
    ]);
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        let set_for_tests = key_text.starts_with("CARGO_PKG_")
            || key_text.starts_with("CARGO_BIN_EXE_")
            || matches!(
                &*key_text,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
            );
        if set_for_tests {
            command.env_remove(&key);
        }
    }
    match profile {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    // target/<profile> or, when cross-compiling, target/<triple>/<profile>.
    if parent.join("CACHEDIR.TAG").exists() {
        command.arg("--target-dir").arg(parent);
    } else if let (Some(target_dir), Some(triple)) = (parent.parent(), parent.file_name()) {
        command
            .arg("--target-dir")
            .arg(target_dir)
            .arg("--target")
            .arg(triple);
    }
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cargo:?} to build the {name} example"))?;
    if !output.status.success() {
        bail!(
            "`{cargo:?} build --workspace --locked --example {name}` failed ({}); the \
             integration tests need that binary at {}.\n{}",
            output.status,
            binary.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    if !binary.is_file() {
        bail!(
            "cargo built the {name} example but {} does not exist",
            binary.display()
        );
    }
    Ok(binary)
}

// ---------------------------------------------------------------------------------------
// Ports and unique names
// ---------------------------------------------------------------------------------------

/// A random number, different on every call (std's randomly keyed SipHash over a counter,
/// the time and the PID: no extra dependency, good enough to spread test ports).
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut hasher);
    std::process::id().hash(&mut hasher);
    std::time::SystemTime::now().hash(&mut hasher);
    hasher.finish()
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(str::parse::<u16>);
            match (parts.next(), parts.next()) {
                (Some(Ok(low)), Some(Ok(high))) => Some((low, high)),
                _ => None,
            }
        })
        .unwrap_or((32768, 60999))
}

/// A random TCP port outside the ephemeral range, so that no client socket (this test's
/// or another's) is bound to it by `connect`. It is not reserved: the caller must cope
/// with "address in use" (see [`Server::start`]).
pub fn random_port() -> u16 {
    let (low, high) = ephemeral_port_range();
    // Prefer [10000, low) (the usual case), else above the range, else anything >= 1024.
    let (start, end) = if low > 11_000 {
        (10_000u32, u32::from(low))
    } else if high < 64_000 {
        (u32::from(high) + 1, 65_536)
    } else {
        (1024, 65_536)
    };
    let span = u64::from(end - start);
    let port = u64::from(start) + random_u64() % span;
    u16::try_from(port).unwrap_or(10_000)
}

/// A path for a unix socket that no other test uses:
/// `/tmp/coreloop-it-<tag>-<pid>-<random>.sock`.
pub fn unique_socket_path(tag: &str) -> PathBuf {
    PathBuf::from(format!(
        "/tmp/coreloop-it-{tag}-{}-{:x}.sock",
        std::process::id(),
        random_u64() & 0xffff_ffff
    ))
}

// ---------------------------------------------------------------------------------------
// Log capture
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct LogState {
    lines: Vec<String>,
    /// The stderr pipe reached EOF: the supervisor and every worker closed it.
    closed: bool,
    /// Every worker PID seen in a `worker spawned` or `worker ready` line, with a pidfd
    /// opened as soon as the line was read, so the process can be killed later without
    /// any risk of hitting a recycled PID.
    workers: BTreeMap<u32, Option<OwnedFd>>,
}

#[derive(Debug, Default)]
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The value of field `key` in a tracing `fmt` line: the last `key=value` whose key starts
/// at a word boundary (event fields come after the span fields), up to whitespace or `}`.
/// Quotes are kept (`signal="SIGTERM"`).
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("{key}=");
    line.rmatch_indices(&pattern)
        .find(|(index, _)| *index == 0 || matches!(line.as_bytes()[index - 1], b' ' | b'{'))
        .map(|(index, _)| {
            let rest = &line[index + pattern.len()..];
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '}')
                .unwrap_or(rest.len());
            &rest[..end]
        })
}

/// Whether `line` is the supervisor's event `name` (its `event` field).
pub fn is_event(line: &str, name: &str) -> bool {
    log_field(line, "event").is_some_and(|event| event.trim_matches('"') == name)
}

/// A supervisor's `worker_ready` event (`worker.id=N worker.pid=P`), parsed.
pub fn parse_worker_ready(line: &str) -> Option<(usize, u32)> {
    if !is_event(line, "worker_ready") {
        return None;
    }
    let id = log_field(line, "worker.id")?.parse().ok()?;
    let pid = log_field(line, "worker.pid")?.parse().ok()?;
    Some((id, pid))
}

/// The fewest workers ready to take connections at any point of `lines` from the
/// supervisor's `serving` line on, as the log tells it, and the line where that minimum
/// was first reached; `None` if there is no `serving` line.
///
/// A worker counts from its supervisor `worker ready` line until it is drained (named as
/// `old.pid` by `replacement ready; draining the old worker`, or its own `draining`
/// line) or exits (`worker exited…`, `worker died`).
pub fn fewest_ready_workers(lines: &[String]) -> Option<(usize, String)> {
    let pid_of =
        |line: &str, key: &str| log_field(line, key).and_then(|pid| pid.parse::<u32>().ok());
    let mut ready = BTreeSet::new();
    let mut fewest: Option<(usize, String)> = None;
    let mut serving = false;
    for line in lines {
        if let Some((_, pid)) = parse_worker_ready(line) {
            ready.insert(pid);
        } else if line.contains(" replacement ready; draining the old worker ") {
            if let Some(pid) = pid_of(line, "old.pid") {
                ready.remove(&pid);
            }
        } else if line.contains("coreloop::worker: draining ")
            || line.contains(" worker exited")
            || line.contains(" worker died ")
        {
            if let Some(pid) = pid_of(line, "worker.pid") {
                ready.remove(&pid);
            }
        }
        serving |= line.contains(" serving workers=");
        if serving && fewest.as_ref().is_none_or(|(n, _)| ready.len() < *n) {
            fewest = Some((ready.len(), line.clone()));
        }
    }
    fewest
}

fn read_log(stderr: ChildStderr, log: Arc<Log>, label: String) {
    let mut reader = BufReader::new(stderr);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&raw)
            .trim_end_matches(['\r', '\n'])
            .to_owned();
        eprintln!("[{label}] {line}");
        let worker = (line.contains(" worker spawned ") || line.contains(" worker ready "))
            .then(|| log_field(&line, "worker.pid").and_then(|pid| pid.parse::<u32>().ok()))
            .flatten();
        let mut state = log.lock();
        if let Some(pid) = worker {
            state.workers.entry(pid).or_insert_with(|| open_pidfd(pid));
        }
        state.lines.push(line);
        drop(state);
        log.changed.notify_all();
    }
    log.lock().closed = true;
    log.changed.notify_all();
}

/// Asserts that at least `min` workers were ready to take connections at every point of
/// `lines` from the `serving` line on (see [`fewest_ready_workers`]).
///
/// # Errors
///
/// No `serving` line in `lines`.
///
/// # Panics
///
/// When fewer were ready at some point (the message names the line).
pub fn assert_min_ready_workers(lines: &[String], min: usize) -> Result<()> {
    let (fewest, at) = fewest_ready_workers(lines).context("no `serving` line")?;
    assert!(
        fewest >= min,
        "only {fewest} ready worker(s) at log line {at:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------

/// How to start the demo server with [`Server::start`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    workers: u16,
    tcp: bool,
    unix: Option<PathBuf>,
    args: Vec<String>,
    rust_log: String,
    binary: Option<PathBuf>,
    stdin: bool,
}

impl ServerConfig {
    /// `workers` worker processes, one TCP listener on a random `127.0.0.1` port,
    /// `RUST_LOG=debug`.
    pub fn new(workers: u16) -> Self {
        Self {
            workers,
            tcp: true,
            unix: None,
            args: Vec::new(),
            rust_log: "debug".into(),
            binary: None,
            stdin: false,
        }
    }

    /// Runs `binary` (e.g. a fixture, `env!("CARGO_BIN_EXE_fixture-panic")`) instead of
    /// the demo. It must take the demo's `--workers` and `--bind` flags and log like it.
    pub fn binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = Some(binary.into());
        self
    }

    /// Gives the server a pipe as stdin, written with [`Server::send_line`] (stdin is
    /// `/dev/null` otherwise).
    pub fn piped_stdin(mut self) -> Self {
        self.stdin = true;
        self
    }

    /// Also listen on a unix socket at `path` (`--bind unix:PATH`).
    pub fn unix(mut self, path: impl Into<PathBuf>) -> Self {
        self.unix = Some(path.into());
        self
    }

    /// No TCP listener (use with [`unix`](Self::unix)).
    pub fn without_tcp(mut self) -> Self {
        self.tcp = false;
        self
    }

    /// Extra command-line arguments for the demo.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The `RUST_LOG` filter (default `debug`).
    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = filter.into();
        self
    }
}

/// A running server under test (the demo or a fixture): the supervisor process this test
/// started, its captured stderr, and every worker it was seen to start.
///
/// Dropping it SIGKILLs the supervisor (our child, so its PID cannot have been reused
/// before we reap it) and every recorded worker (through pidfds opened when their log
/// lines arrived), and waits for them to exit.
#[derive(Debug)]
pub struct Server {
    child: Child,
    stdin: Mutex<Option<ChildStdin>>,
    pid: u32,
    pidfd: OwnedFd,
    exit: Option<ExitStatus>,
    port: Option<u16>,
    unix: Option<PathBuf>,
    log: Arc<Log>,
    args: Vec<String>,
}

impl Server {
    /// Starts the server as configured and waits (up to [`STARTUP_TIMEOUT`]) for the
    /// supervisor's `serving` line. A random port that is already taken is detected from
    /// the server's `cannot listen on` error and replaced by another.
    ///
    /// # Errors
    ///
    /// When the binary is unavailable, or the server exits or stays silent instead of
    /// serving (its log is in the message).
    pub fn start(config: ServerConfig) -> Result<Self> {
        Self::start_on_free_port(|| Self::launch(&config, config.tcp.then(random_port)))
    }

    /// Runs `launch` until the server it starts logs `serving`; a server that could not
    /// take its random port is replaced by another launch (another port).
    fn start_on_free_port(mut launch: impl FnMut() -> Result<Self>) -> Result<Self> {
        for _ in 0..PORT_ATTEMPTS {
            let mut server = launch()?;
            let args = server.args.clone();
            if server
                .wait_for_log(|line| line.contains(" serving workers="), STARTUP_TIMEOUT)
                .is_some()
            {
                return Ok(server);
            }
            let status = server.wait_exit(Duration::from_secs(5));
            if server.port_was_taken() {
                continue;
            }
            let text = server.log_text();
            bail!("the server did not start (args {args:?}, exit {status:?}); its log:\n{text}");
        }
        bail!("no free port found after {PORT_ATTEMPTS} attempts")
    }

    /// Starts the server as configured, listening on `127.0.0.1:port` (if given), without
    /// waiting for anything. For tests of startup failures; pair it with [`random_port`]
    /// and retry when the log says the port is in use ([`Server::port_was_taken`]).
    ///
    /// # Errors
    ///
    /// When the binary is unavailable or cannot be spawned.
    pub fn launch(config: &ServerConfig, port: Option<u16>) -> Result<Self> {
        let mut args = vec!["--workers".to_owned(), config.workers.to_string()];
        if let Some(port) = port {
            args.extend(["--bind".to_owned(), format!("127.0.0.1:{port}")]);
        }
        if let Some(path) = &config.unix {
            args.extend(["--bind".to_owned(), format!("unix:{}", path.display())]);
        }
        args.extend(config.args.iter().cloned());
        let binary = match &config.binary {
            Some(binary) => binary.clone(),
            None => http_binary()?,
        };
        let mut server = Self::spawn_binary(&binary, &args, &config.rust_log, config.stdin)?;
        server.port = port;
        server.unix.clone_from(&config.unix);
        Ok(server)
    }

    /// Whether the server's log says it could not listen on its port because the port is
    /// in use (a random port that turned out to be taken).
    pub fn port_was_taken(&self) -> bool {
        let text = self.log_text();
        self.port.is_some_and(|port| {
            text.contains(&format!("cannot listen on 127.0.0.1:{port}")) && text.contains("in use")
        })
    }

    /// Spawns the demo with exactly `args` and `RUST_LOG=rust_log`, without waiting for
    /// anything. For tests of startup failures.
    ///
    /// # Errors
    ///
    /// When the binary is unavailable or cannot be spawned.
    pub fn spawn<S: AsRef<str>>(args: &[S], rust_log: &str) -> Result<Self> {
        Self::spawn_binary(&http_binary()?, args, rust_log, false)
    }

    /// Spawns `binary` with exactly `args` and `RUST_LOG=rust_log`, stdin a pipe (see
    /// [`send_line`](Self::send_line)) if `piped_stdin`, else `/dev/null`. Waits for
    /// nothing.
    ///
    /// # Errors
    ///
    /// When the binary cannot be spawned.
    pub fn spawn_binary<S: AsRef<str>>(
        binary: &Path,
        args: &[S],
        rust_log: &str,
        piped_stdin: bool,
    ) -> Result<Self> {
        let mut child = Command::new(binary)
            .args(args.iter().map(AsRef::as_ref))
            .env("RUST_LOG", rust_log)
            // Programs that colour their log by default (the README example) write plain
            // text, which the harness parses.
            .env("NO_COLOR", "1")
            .env_remove("CORELOOP_WORKER_ID")
            .stdin(if piped_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let pid = child.id();
        let Some(pidfd) = open_pidfd(pid) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("pidfd_open({pid}) failed for the server we just started");
        };
        let log = Arc::new(Log::default());
        let Some(stderr) = child.stderr.take() else {
            bail!("the child's stderr was not captured");
        };
        let reader_log = Arc::clone(&log);
        let name = binary.file_name().map_or_else(
            || "server".into(),
            |name| name.to_string_lossy().into_owned(),
        );
        let label = format!("{name} {pid}");
        std::thread::Builder::new()
            .name(format!("{name}-{pid}-stderr"))
            .spawn(move || read_log(stderr, reader_log, label))
            .context("cannot start the log reader thread")?;
        let stdin = Mutex::new(child.stdin.take());
        Ok(Self {
            child,
            stdin,
            args: args.iter().map(|arg| arg.as_ref().to_owned()).collect(),
            pid,
            pidfd,
            exit: None,
            port: None,
            unix: None,
            log,
        })
    }

    /// PID of the supervisor.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The TCP port the server listens on.
    ///
    /// # Panics
    ///
    /// If it was started without a TCP listener.
    pub fn port(&self) -> u16 {
        self.port
            .unwrap_or_else(|| panic!("this server has no TCP listener"))
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port()))
    }

    /// The unix socket path, if any.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_deref()
    }

    /// Every log line received so far.
    pub fn logs(&self) -> Vec<String> {
        self.log.lock().lines.clone()
    }

    /// The log so far as one string.
    pub fn log_text(&self) -> String {
        self.log.lock().lines.join("\n")
    }

    /// Number of log lines received so far: a mark for [`wait_for_log_since`].
    ///
    /// [`wait_for_log_since`]: Self::wait_for_log_since
    pub fn log_mark(&self) -> usize {
        self.log.lock().lines.len()
    }

    /// Blocks until some log line (from the start) satisfies `pred`, and returns it;
    /// `None` after `timeout`, or once stderr is closed without a match.
    pub fn wait_for_log(
        &self,
        pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        self.wait_for_log_since(0, pred, timeout)
    }

    /// Like [`wait_for_log`](Self::wait_for_log), considering only lines from index `mark`
    /// on (see [`log_mark`](Self::log_mark)).
    pub fn wait_for_log_since(
        &self,
        mark: usize,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut next = mark;
        let mut state = self.log.lock();
        loop {
            if let Some(line) = state.lines.iter().skip(next).find(|line| pred(line)) {
                return Some(line.clone());
            }
            next = state.lines.len().max(mark);
            if state.closed {
                return None;
            }
            let remaining = deadline.checked_duration_since(Instant::now())?;
            state = self
                .log
                .changed
                .wait_timeout(state, remaining)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Blocks until `n` log lines from `mark` on satisfy `pred`; returns them, or `None`
    /// after `timeout`.
    pub fn wait_for_logs_since(
        &self,
        mark: usize,
        n: usize,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Option<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut state = self.log.lock();
        loop {
            let found: Vec<String> = state
                .lines
                .iter()
                .skip(mark)
                .filter(|line| pred(line))
                .cloned()
                .collect();
            if found.len() >= n {
                return Some(found);
            }
            if state.closed {
                return None;
            }
            let remaining = deadline.checked_duration_since(Instant::now())?;
            state = self
                .log
                .changed
                .wait_timeout(state, remaining)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The current worker of each slot: `worker.id -> worker.pid` from the latest
    /// supervisor `worker ready` line of each id.
    pub fn worker_pids(&self) -> BTreeMap<usize, u32> {
        self.log
            .lock()
            .lines
            .iter()
            .filter_map(|line| parse_worker_ready(line))
            .collect()
    }

    /// Every worker PID this server's log mentioned so far (spawned or ready).
    pub fn all_worker_pids(&self) -> BTreeSet<u32> {
        self.log.lock().workers.keys().copied().collect()
    }

    /// Sends `signal` to the supervisor.
    ///
    /// # Errors
    ///
    /// When it has already been reaped, or `kill` fails.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        if self.exit.is_some() {
            bail!("the supervisor has already exited");
        }
        // Our child, not yet reaped: its PID cannot have been reused.
        rustix::process::pidfd_send_signal(&self.pidfd, signal)
            .with_context(|| format!("cannot send {signal:?} to {}", self.pid))
    }

    /// Waits up to `timeout` for the supervisor to exit and returns its status (also on
    /// later calls); `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_none() && wait_pidfd(&self.pidfd, timeout) {
            self.exit = self.child.wait().ok();
            // Its last stderr lines may still be in the pipe: let the reader take them, so
            // that `log_text` after an exit is the whole log. Bounded: workers that outlive
            // the supervisor (after a SIGKILL) keep the pipe open.
            self.wait_log_closed(Duration::from_millis(500));
        }
        self.exit
    }

    /// The log lines from index `mark` on (see [`log_mark`](Self::log_mark)).
    pub fn logs_since(&self, mark: usize) -> Vec<String> {
        self.log.lock().lines.iter().skip(mark).cloned().collect()
    }

    /// Like [`wait_for_log_since`](Self::wait_for_log_since), but an error that names
    /// `what` (and shows the end of the log) when no line matched within `timeout`.
    ///
    /// # Errors
    ///
    /// No matching line in time.
    pub fn expect_log_since(
        &self,
        mark: usize,
        what: &str,
        pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        self.wait_for_log_since(mark, pred, timeout).ok_or_else(|| {
            let lines = self.logs();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            anyhow!("no {what} in the log within {timeout:?}; its last lines:\n{tail}")
        })
    }

    /// Waits for a supervisor `worker ready` line, from `mark` on, for slot `id` with a
    /// PID other than `old`, and returns that PID.
    ///
    /// # Errors
    ///
    /// No such line within `timeout`.
    pub fn wait_for_replacement(
        &self,
        mark: usize,
        id: usize,
        old: u32,
        timeout: Duration,
    ) -> Result<u32> {
        let line = self.expect_log_since(
            mark,
            &format!("`worker ready` for a replacement of worker {id} (pid {old})"),
            |line| parse_worker_ready(line).is_some_and(|(slot, pid)| slot == id && pid != old),
            timeout,
        )?;
        parse_worker_ready(&line)
            .map(|(_, pid)| pid)
            .with_context(|| format!("cannot parse {line:?}"))
    }

    /// Waits, from log line `mark` on, for a line containing `message` (matched as given,
    /// spaces included) whose `worker.pid` field is `pid`, and returns it.
    ///
    /// # Errors
    ///
    /// No such line within `timeout` (the error names `message` and `pid`).
    pub fn expect_worker_log_since(
        &self,
        mark: usize,
        pid: u32,
        message: &str,
        timeout: Duration,
    ) -> Result<String> {
        let pid_text = pid.to_string();
        self.expect_log_since(
            mark,
            &format!("`{}` for worker {pid}", message.trim()),
            |line| {
                line.contains(message) && log_field(line, "worker.pid") == Some(pid_text.as_str())
            },
            timeout,
        )
    }

    /// Waits (up to `timeout`), from log line `mark` on, for the supervisor's
    /// `worker exited after draining` line of worker `pid`; then checks that it exited
    /// with code 0, is gone within 5 s, and was reaped by the supervisor.
    ///
    /// # Errors
    ///
    /// No such line within `timeout`.
    ///
    /// # Panics
    ///
    /// When the worker exited otherwise, is still running, or was not reaped.
    pub fn expect_clean_drain_exit(&self, mark: usize, pid: u32, timeout: Duration) -> Result<()> {
        let exited =
            self.expect_worker_log_since(mark, pid, " worker exited after draining ", timeout)?;
        assert!(exited.contains("status=exit code 0"), "{exited}");
        assert!(
            wait_for_exit(pid, Duration::from_secs(5)),
            "{pid} still running"
        );
        assert!(reaped(pid, self.pid()), "{pid} was not reaped");
        Ok(())
    }

    /// Waits, from log line `mark` on, for the supervisor's `scaled up` line to
    /// `workers` workers (up to 10 s), then for the `worker ready` line of the new slot
    /// `workers - 1` (up to 15 s), and returns the new worker's PID.
    ///
    /// # Errors
    ///
    /// A line missing in time, or unparsable.
    pub fn expect_scaled_up(&self, mark: usize, workers: usize) -> Result<u32> {
        self.expect_scaled(mark, "up", workers)?;
        let slot = workers - 1;
        let ready = self.expect_log_since(
            mark,
            &format!("`worker ready` for worker {slot}"),
            |line| parse_worker_ready(line).is_some_and(|(id, _)| id == slot),
            Duration::from_secs(15),
        )?;
        Ok(parse_worker_ready(&ready).context("bad ready line")?.1)
    }

    /// Waits (up to 10 s), from log line `mark` on, for the supervisor's `scaled down`
    /// line to `workers` workers.
    ///
    /// # Errors
    ///
    /// No such line in time.
    pub fn expect_scaled_down(&self, mark: usize, workers: usize) -> Result<()> {
        self.expect_scaled(mark, "down", workers)
    }

    /// Waits (up to 10 s), from log line `mark` on, for `scaled {way} workers={workers}`.
    fn expect_scaled(&self, mark: usize, way: &str, workers: usize) -> Result<()> {
        let (words, count) = (format!(" scaled {way} "), workers.to_string());
        self.expect_log_since(
            mark,
            &format!("`scaled {way} workers={workers}`"),
            |line| line.contains(&words) && log_field(line, "workers") == Some(count.as_str()),
            Duration::from_secs(10),
        )?;
        Ok(())
    }

    /// Asserts that every worker this server was seen to start has exited and was reaped
    /// by the supervisor.
    ///
    /// # Panics
    ///
    /// When a worker is still running or was not reaped.
    pub fn assert_no_worker_left(&self) {
        for pid in self.all_worker_pids() {
            assert!(!is_alive(pid), "worker {pid} still running");
            assert!(reaped(pid, self.pid()), "worker {pid} was not reaped");
        }
    }

    /// Waits (up to `timeout`), from log line `mark` on, for the supervisor's
    /// `reload complete` line, and checks that it says `replaced` workers were replaced.
    ///
    /// # Errors
    ///
    /// No such line in time.
    ///
    /// # Panics
    ///
    /// When the line reports another number of replaced workers.
    pub fn expect_reload_complete(
        &self,
        mark: usize,
        replaced: usize,
        timeout: Duration,
    ) -> Result<()> {
        let done = self.expect_log_since(
            mark,
            "`reload complete`",
            |line| line.contains(" reload complete "),
            timeout,
        )?;
        let count = replaced.to_string();
        assert_eq!(log_field(&done, "replaced"), Some(count.as_str()), "{done}");
        Ok(())
    }

    /// Writes `line` and a newline to the server's stdin (see
    /// [`ServerConfig::piped_stdin`]).
    ///
    /// # Errors
    ///
    /// When stdin is not a pipe, or the write fails.
    pub fn send_line(&self, line: &str) -> Result<()> {
        let mut stdin = self.stdin.lock().unwrap_or_else(PoisonError::into_inner);
        let pipe = stdin
            .as_mut()
            .context("the server's stdin is not a pipe (ServerConfig::piped_stdin)")?;
        pipe.write_all(format!("{line}\n").as_bytes())
            .and_then(|()| pipe.flush())
            .with_context(|| format!("writing {line:?} to the server's stdin"))
    }

    /// Whether the stderr pipe has been closed by every process holding it, waiting up to
    /// `timeout` for that.
    pub fn wait_log_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.log.lock();
        while !state.closed {
            let Some(remaining) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            state = self
                .log
                .changed
                .wait_timeout(state, remaining)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let workers: Vec<(u32, OwnedFd)> = std::mem::take(&mut self.log.lock().workers)
            .into_iter()
            .filter_map(|(pid, fd)| fd.map(|fd| (pid, fd)))
            .collect();
        for (_, fd) in &workers {
            // ESRCH: already reaped. A pidfd never refers to a recycled PID.
            let _ = rustix::process::pidfd_send_signal(fd, Signal::KILL);
        }
        for (pid, fd) in &workers {
            if !wait_pidfd(fd, Duration::from_secs(5)) {
                eprintln!("[harness] worker {pid} did not exit after SIGKILL");
            }
        }
        if let Some(path) = &self.unix {
            let _ = std::fs::remove_file(path);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// The fields of `/proc/<pid>/stat` the tests need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Process ID.
    pub pid: u32,
    /// State letter: `R`, `S`, `D`, `Z` (zombie), `X` (dead), …
    pub state: char,
    /// Parent's PID.
    pub ppid: u32,
}

/// Parses `/proc/<pid>/stat`; `None` if the process does not exist.
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    let after = &text[text.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(ProcStat { pid, state, ppid })
}

/// Every process whose parent is `ppid`, zombies included.
pub fn children_of(ppid: u32) -> Vec<ProcStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: Vec<ProcStat> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_stat)
        .filter(|stat| stat.ppid == ppid)
        .collect();
    children.sort_by_key(|stat| stat.pid);
    children
}

/// The PIDs of the running (not zombie) children of `ppid`.
pub fn live_children(ppid: u32) -> Vec<u32> {
    children_of(ppid)
        .into_iter()
        .filter(|child| !matches!(child.state, 'Z' | 'X'))
        .map(|child| child.pid)
        .collect()
}

/// The PIDs of the zombie children of `ppid` (exited, not reaped).
pub fn zombie_children(ppid: u32) -> Vec<u32> {
    children_of(ppid)
        .into_iter()
        .filter(|child| child.state == 'Z')
        .map(|child| child.pid)
        .collect()
}

/// Whether `pid` is gone for good as a child of `ppid`: no such process, or a process that
/// is neither ours nor a zombie (the PID was reused).
pub fn reaped(pid: u32, ppid: u32) -> bool {
    proc_stat(pid).is_none_or(|stat| stat.ppid != ppid && stat.state != 'Z')
}

/// Waits until `pid` is stopped (state `T`, e.g. after SIGSTOP); `false` after `timeout`.
/// Polls `/proc`, yielding in between: no event tells another process's stop.
pub fn wait_for_stopped(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if proc_stat(pid).is_some_and(|stat| stat.state == 'T') {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

/// Whether `pid` exists and is not a zombie (`Z`) or dead (`X`). Orphans may never be
/// reaped in this sandbox, so a zombie counts as gone.
pub fn is_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|stat| !matches!(stat.state, 'Z' | 'X'))
}

/// Live processes (not zombies) whose command line has an argument containing `needle`.
pub fn processes_with_arg(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                cmdline
                    .split(|&b| b == 0)
                    .any(|arg| String::from_utf8_lossy(arg).contains(needle))
            })
        })
        .filter(|pid| *pid != std::process::id() && is_alive(*pid))
        .collect()
}

fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    let pid = Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok()
}

/// Waits until the process behind `pidfd` has exited (zombie or reaped): `poll` for
/// `POLLIN`, no sleeping. `false` after `timeout`.
pub fn wait_pidfd(pidfd: &impl AsFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(spec) = Timespec::try_from(remaining) else {
            return false;
        };
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&spec)) {
            Ok(0) if remaining.is_zero() => return false,
            Ok(0) => {}
            Ok(_) => return true,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
    }
}

/// A supervisor a binary upgrade started: not this test's child, so no [`Server`] stops
/// it. Dropped, it is SIGKILLed if still alive (its workers follow, as they do whenever
/// their supervisor dies) and waited for.
#[derive(Debug)]
pub struct NewSupervisor(pub u32);

impl NewSupervisor {
    /// Stops it with SIGTERM and waits (up to 30 s) for it to exit.
    ///
    /// # Errors
    ///
    /// The signal failed, or it did not exit in time.
    pub fn stop(self) -> Result<()> {
        kill(self.0, Signal::TERM)?;
        ensure!(
            wait_for_exit(self.0, Duration::from_secs(30)),
            "the new supervisor {} did not stop on SIGTERM",
            self.0
        );
        Ok(())
    }
}

impl Drop for NewSupervisor {
    fn drop(&mut self) {
        if is_alive(self.0) {
            let _ = kill(self.0, Signal::KILL);
            wait_for_exit(self.0, Duration::from_secs(10));
        }
    }
}

impl Server {
    /// Waits, from log line `mark` on, for the supervisor `old` to log that it started a
    /// new supervisor (a binary upgrade), and returns that one, guarded.
    ///
    /// # Errors
    ///
    /// No such line within `timeout`, or no pid in it.
    pub fn expect_new_supervisor(
        &self,
        mark: usize,
        old: u32,
        timeout: Duration,
    ) -> Result<NewSupervisor> {
        let span = format!("supervisor{{pid={old}}}");
        let started = self.expect_log_since(
            mark,
            "`new supervisor started`",
            |line| line.contains(&span) && line.contains(" new supervisor started "),
            timeout,
        )?;
        let pid = log_field(&started, "upgrade.pid")
            .and_then(|pid| pid.parse().ok())
            .with_context(|| format!("no upgrade.pid in {started:?}"))?;
        Ok(NewSupervisor(pid))
    }
}

/// Waits up to `timeout` for process `pid` to exit, through a pidfd. `true` if it has
/// exited (or never existed, or is a zombie).
pub fn wait_for_exit(pid: u32, timeout: Duration) -> bool {
    match open_pidfd(pid) {
        // ESRCH: no such process any more.
        None => true,
        Some(fd) => wait_pidfd(&fd, timeout),
    }
}

/// Sends `signal` to `pid` (e.g. SIGKILL to a worker).
///
/// # Errors
///
/// The `kill(2)` error.
pub fn kill(pid: u32, signal: Signal) -> Result<()> {
    let raw = i32::try_from(pid).context("pid out of range")?;
    let pid = Pid::from_raw(raw).context("pid 0")?;
    rustix::process::kill_process(pid, signal).with_context(|| format!("kill({raw}, {signal:?})"))
}

/// Number of open file descriptors of `pid` (entries of `/proc/<pid>/fd`).
///
/// # Errors
///
/// When `/proc/<pid>/fd` cannot be read.
pub fn fd_count(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Open descriptors of `pid` and what they point to (`socket:[123]`, `pipe:[…]`, paths).
///
/// # Errors
///
/// When `/proc/<pid>/fd` cannot be read.
pub fn fd_targets(pid: u32) -> io::Result<BTreeMap<u32, String>> {
    let mut targets = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        // The descriptor may close between readdir and readlink.
        if let Ok(target) = std::fs::read_link(entry.path()) {
            targets.insert(fd, target.to_string_lossy().into_owned());
        }
    }
    Ok(targets)
}

/// The inode of the server side of the IPv4 TCP connection between `server_port` (local)
/// and `client_port` (remote), from `/proc/net/tcp`. Every process holding a descriptor
/// for that socket shows it as `socket:[inode]` in `/proc/<pid>/fd`.
pub fn server_socket_inode(server_port: u16, client_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port_of = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
    };
    table.lines().skip(1).find_map(|row| {
        let fields: Vec<&str> = row.split_whitespace().collect();
        let (local, remote, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
        (port_of(local)? == server_port && port_of(remote)? == client_port)
            .then(|| inode.parse().ok())
            .flatten()
            .filter(|inode| *inode != 0)
    })
}

// ---------------------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------------------

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
        if let Some((response, used)) = parse_response(&buf)? {
            if used != buf.len() {
                bail!("unexpected bytes after the response");
            }
            return Ok(response);
        }
        let n = stream.read(&mut chunk).context("reading a response")?;
        if n == 0 {
            bail!(
                "connection closed before a complete response: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    }
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
    let mut responses = parse_responses(&reply.bytes)?;
    if responses.len() != 1 {
        bail!(
            "expected one response, got {}: {:?}",
            responses.len(),
            reply.text()
        );
    }
    let response = responses.remove(0);
    Ok((response.status, response.text()))
}

/// Starts `config` with the supervisor's Prometheus endpoint (`--metrics`) on a random
/// `127.0.0.1` port, retrying a port that turns out to be taken; returns the server and
/// that port.
///
/// # Errors
///
/// As [`Server::start`], or when no free port is found.
pub fn start_with_metrics(config: &ServerConfig) -> Result<(Server, u16)> {
    for _ in 0..PORT_ATTEMPTS {
        let metrics_port = random_port();
        let metrics = format!("127.0.0.1:{metrics_port}");
        match Server::start(config.clone().args(["--metrics", metrics.as_str()])) {
            Ok(server) => return Ok((server, metrics_port)),
            Err(err) if err.to_string().contains("metrics") => continue,
            Err(err) => return Err(err),
        }
    }
    bail!("no free port for metrics")
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

/// The value of one series in an OpenMetrics text, named exactly as it is written there
/// (`coreloop_forwarded_total{worker="0"}`); `None` if the text has no such series.
pub fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(series, _)| *series == name)
        .and_then(|(_, value)| value.parse().ok())
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
    match parse_responses(&bytes) {
        Ok(mut responses) if responses.len() == 1 => {
            let response = responses.remove(0);
            let body = response.text();
            Outcome::Answered(response.status, body)
        }
        Ok(responses) => Outcome::Failed(format!(
            "{} responses in {:?}",
            responses.len(),
            String::from_utf8_lossy(&bytes)
        )),
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

// ---------------------------------------------------------------------------------------
// Resource limits and hostile clients
// ---------------------------------------------------------------------------------------

/// Clock ticks per second of the CPU times in `/proc/<pid>/stat` (`USER_HZ`, which Linux
/// fixes at 100 for user space whatever the kernel's own tick rate).
pub const USER_HZ: u64 = 100;

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`: resident now, `VmHWM`: the peak so far),
/// in KiB; `None` if the process or the field does not exist.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// CPU time used so far by `pid` (all its threads, user plus system), in [`USER_HZ`]
/// ticks, from fields 14 and 15 of `/proc/<pid>/stat`.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    let mut fields = text[text.rfind(')')? + 1..].split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The `Max open files` soft and hard limits of `pid`, from `/proc/<pid>/limits`
/// (`None` for "unlimited" or when unreadable).
pub fn nofile_limits(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    let mut values = line["Max open files".len()..].split_whitespace();
    Some((values.next()?.parse().ok()?, values.next()?.parse().ok()?))
}

impl Server {
    /// Like [`Server::start`], with `RLIMIT_NOFILE` (soft and hard) set to `nofile` for
    /// the server before it runs: it is started as `/bin/sh -c 'ulimit -n N && exec
    /// "$0" "$@"' <binary> <args>`, so the limit is in force from the first instruction
    /// of the supervisor (same PID as the shell, after `exec`), and its workers inherit
    /// it. TCP only: a unix listener in `config` is ignored.
    ///
    /// # Errors
    ///
    /// As for [`Server::start`].
    pub fn start_with_nofile_limit(config: ServerConfig, nofile: u64) -> Result<Self> {
        let binary = match &config.binary {
            Some(binary) => binary.clone(),
            None => http_binary()?,
        };
        Self::start_on_free_port(|| {
            let port = random_port();
            let mut args = vec![
                "-c".to_owned(),
                format!("ulimit -n {nofile} && exec \"$0\" \"$@\""),
                binary.display().to_string(),
                "--workers".to_owned(),
                config.workers.to_string(),
                "--bind".to_owned(),
                format!("127.0.0.1:{port}"),
            ];
            args.extend(config.args.iter().cloned());
            let mut server =
                Self::spawn_binary(Path::new("/bin/sh"), &args, &config.rust_log, config.stdin)?;
            server.port = Some(port);
            Ok(server)
        })
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
        if let Some((response, used)) = parse_response(&buf)? {
            if used != buf.len() {
                bail!("unexpected bytes after the response");
            }
            return Ok(response);
        }
        if stream
            .read_buf(&mut buf)
            .await
            .context("reading a response")?
            == 0
        {
            bail!(
                "connection closed before a complete response: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The other examples
// ---------------------------------------------------------------------------------------

/// Environment variable that, when set, names a directory holding the example binaries
/// (`<dir>/<name>`) for [`example_binary`], and disables its `cargo build`.
pub const EXAMPLES_DIR_ENV: &str = "CORELOOP_EXAMPLES_DIR";

/// Path of the example `name` of the `coreloop-examples` package (`"hyper_auto"`,
/// `"axum"`, `"tls"`, …), built if needed exactly as [`http_binary`] builds the demo.
///
/// The first call for a name in a process runs `cargo build --workspace --locked
/// --example <name>` for the running test's profile and target directory: it builds a
/// missing binary, rebuilds a stale one, and is a no-op (well under a second) when nothing
/// changed, as after CI's `cargo build --workspace --all-targets`. `--workspace` gives the
/// feature unification of `cargo nextest run --workspace`, so neither rebuilds after the
/// other. If [`EXAMPLES_DIR_ENV`] is set, `<dir>/<name>` is used as is.
///
/// # Errors
///
/// When the layout is not cargo's, or the build fails (cargo's output is included).
pub fn example_binary(name: &str) -> Result<PathBuf> {
    static BUILT: Mutex<BTreeMap<String, Result<PathBuf, String>>> = Mutex::new(BTreeMap::new());
    // Held during the build: a second test thread asking for the same example waits for
    // the first one's result instead of starting cargo again.
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    built
        .entry(name.to_owned())
        .or_insert_with(|| locate_or_build_example(name).map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|msg| anyhow!(msg))
}

fn locate_or_build_example(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(EXAMPLES_DIR_ENV) {
        let path = PathBuf::from(dir).join(name);
        if !path.is_file() {
            bail!("{EXAMPLES_DIR_ENV}: {} is not a file", path.display());
        }
        return Ok(path);
    }
    build_example(name, EXAMPLES_DIR_ENV)
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

/// Sends SIGTERM to `server` and waits up to 10 s for each of its `workers` to log
/// `coreloop::worker: draining`; returns the sum of those lines' `live=` counts (the
/// connections in flight when the drain began) and the lines.
///
/// # Errors
///
/// The signal cannot be sent, or not every worker logged `draining` in time.
pub fn sigterm_and_wait_for_drain(server: &Server, workers: usize) -> Result<(usize, Vec<String>)> {
    let mark = server.log_mark();
    server.signal(Signal::TERM)?;
    server.wait_draining(mark, workers)
}

impl Server {
    /// Waits up to 10 s, from log line `mark` on, for `workers` workers to log
    /// `coreloop::worker: draining` (they got `Drain`); returns the sum of those lines'
    /// `live=` counts (the connections in flight when the drain began) and the lines.
    ///
    /// # Errors
    ///
    /// Not every worker logged `draining` in time.
    pub fn wait_draining(&self, mark: usize, workers: usize) -> Result<(usize, Vec<String>)> {
        let draining = self
            .wait_for_logs_since(
                mark,
                workers,
                |line| line.contains("coreloop::worker: draining "),
                Duration::from_secs(10),
            )
            .ok_or_else(|| anyhow!("not every worker logged `draining`"))?;
        let live = draining
            .iter()
            .filter_map(|line| log_field(line, "live").and_then(|n| n.parse::<usize>().ok()))
            .sum();
        Ok((live, draining))
    }
}

/// Waits up to 15 s for the supervisor of `server` to exit after a SIGTERM and asserts
/// that it exited 0.
///
/// # Errors
///
/// It did not exit in time.
pub fn expect_exit_0_after_sigterm(server: &mut Server) -> Result<()> {
    let status = server
        .wait_exit(Duration::from_secs(15))
        .ok_or_else(|| anyhow!("the supervisor did not exit after SIGTERM"))?;
    assert!(status.success(), "supervisor exit status {status}");
    Ok(())
}
