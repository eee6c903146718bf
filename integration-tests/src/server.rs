//! The server under test: [`ServerConfig`] and [`Server`] start the demo or a fixture
//! binary, keep its supervisor as a child (pidfd, signals, stdin), capture its log
//! ([`Log`]) and wait on its lifecycle events; dropping a [`Server`] kills what it
//! started, by pidfd, never by name.
//!
//! TCP ports are drawn at random outside the kernel's ephemeral range; a port that turns
//! out to be taken is detected from the server's own `cannot listen on …` error, and
//! another one is tried.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use rustix::process::Signal;

use crate::binary::http_binary;
use crate::events::{Event, Log};
use crate::process::{
    NewSupervisor, is_alive, open_pidfd, random_port, reaped, wait_for_exit, wait_pidfd,
};

/// How long [`Server::start`] waits for the `serving` event.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How many random ports [`Server::start`] tries before giving up.
const PORT_ATTEMPTS: usize = 16;

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
    /// supervisor's `serving` event. A random port that is already taken is detected from
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
                .wait_event(0, "serving", |_| true, STARTUP_TIMEOUT)
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
    /// With [`ACCEPTORS_ENV`] set, the demo runs with that many accept loops.
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
            None => {
                // The suite's sharded-acceptor pass runs the demo with K accept loops,
                // unless the test chose its own.
                let chosen = config.args.iter().any(|a| a == "--acceptors");
                if let (Ok(k), false) = (std::env::var(ACCEPTORS_ENV), chosen) {
                    args.extend(["--acceptors".to_owned(), k]);
                }
                http_binary()?
            }
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
            .spawn(move || reader_log.capture(stderr, &label))
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

    /// The captured log, for what the methods below do not cover.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Every log line received so far.
    pub fn logs(&self) -> Vec<String> {
        self.log.lines_since(0)
    }

    /// The log lines from index `mark` on (see [`log_mark`](Self::log_mark)).
    pub fn logs_since(&self, mark: usize) -> Vec<String> {
        self.log.lines_since(mark)
    }

    /// The log so far as one string.
    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// Number of log lines received so far: a mark for the waits (`…_since`, `…event…`).
    pub fn log_mark(&self) -> usize {
        self.log.mark()
    }

    /// The lifecycle events from log line `mark` on.
    pub fn events_since(&self, mark: usize) -> Vec<Event> {
        self.log.events_since(mark)
    }

    /// Blocks until an event `name` from log line `mark` on satisfies `pred`, and
    /// returns it; `None` after `timeout`, or once stderr is closed without one.
    pub fn wait_event(
        &self,
        mark: usize,
        name: &str,
        pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Option<Event> {
        self.log.wait_event(mark, name, pred, timeout)
    }

    /// Blocks until `n` events `name` from log line `mark` on satisfy `pred`, and
    /// returns them; `None` after `timeout`.
    pub fn wait_events(
        &self,
        mark: usize,
        name: &str,
        n: usize,
        pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Option<Vec<Event>> {
        self.log.wait_events(mark, name, n, pred, timeout)
    }

    /// Like [`wait_event`](Self::wait_event), with an error that names the event and
    /// shows the end of the log.
    ///
    /// # Errors
    ///
    /// No such event within `timeout`.
    pub fn expect_event(
        &self,
        mark: usize,
        name: &str,
        pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event> {
        self.log.expect_event(mark, name, pred, timeout)
    }

    /// Waits for the event `name` of worker `pid` (its `worker.pid`), from log line
    /// `mark` on.
    ///
    /// # Errors
    ///
    /// No such event within `timeout`.
    pub fn expect_worker_event(
        &self,
        mark: usize,
        name: &str,
        pid: u32,
        timeout: Duration,
    ) -> Result<Event> {
        self.log
            .wait_event(mark, name, |event| event.worker_pid() == Some(pid), timeout)
            .ok_or_else(|| {
                self.log
                    .missing(&format!("`{name}` event of worker {pid}"), timeout)
            })
    }

    /// Blocks until some log line (from the start) satisfies `pred`, and returns it;
    /// `None` after `timeout`, or once stderr is closed without a match. For lines that
    /// are not lifecycle events (see [`wait_event`](Self::wait_event)).
    pub fn wait_for_log(
        &self,
        pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        self.log.wait_line(0, pred, timeout)
    }

    /// Like [`wait_for_log`](Self::wait_for_log), considering only lines from index `mark`
    /// on (see [`log_mark`](Self::log_mark)).
    pub fn wait_for_log_since(
        &self,
        mark: usize,
        pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        self.log.wait_line(mark, pred, timeout)
    }

    /// Blocks until `n` log lines from `mark` on satisfy `pred`; returns them, or `None`
    /// after `timeout`.
    pub fn wait_for_logs_since(
        &self,
        mark: usize,
        n: usize,
        pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Option<Vec<String>> {
        self.log.wait_lines(mark, n, pred, timeout)
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
        self.log
            .wait_line(mark, pred, timeout)
            .ok_or_else(|| self.log.missing(what, timeout))
    }

    /// Whether the stderr pipe has been closed by every process holding it, waiting up to
    /// `timeout` for that.
    pub fn wait_log_closed(&self, timeout: Duration) -> bool {
        self.log.wait_closed(timeout)
    }

    /// The current worker of each slot: `worker.id -> worker.pid` from the latest
    /// `worker_ready` event of each id.
    pub fn worker_pids(&self) -> BTreeMap<usize, u32> {
        self.log.worker_pids()
    }

    /// Every worker PID this server's events named so far (spawned or ready).
    pub fn all_worker_pids(&self) -> BTreeSet<u32> {
        self.log.all_worker_pids()
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

    /// Waits for a `worker_ready` event, from `mark` on, for slot `id` with a PID other
    /// than `old`, and returns that PID.
    ///
    /// # Errors
    ///
    /// No such event within `timeout`.
    pub fn wait_for_replacement(
        &self,
        mark: usize,
        id: usize,
        old: u32,
        timeout: Duration,
    ) -> Result<u32> {
        let ready = self
            .log
            .wait_event(
                mark,
                "worker_ready",
                |event| event.worker_id() == Some(id) && event.worker_pid() != Some(old),
                timeout,
            )
            .ok_or_else(|| {
                let what = format!("`worker_ready` for a replacement of worker {id} (pid {old})");
                self.log.missing(&what, timeout)
            })?;
        ready
            .worker_pid()
            .with_context(|| format!("no worker.pid in {ready}"))
    }

    /// Waits (up to `timeout`), from log line `mark` on, for the `worker_exited` event of
    /// worker `pid`; then checks that it ended a drain (`reason` drained, reload,
    /// recycle, retire or scale-down) with exit code 0, that the worker is gone within
    /// 5 s, and that the supervisor reaped it.
    ///
    /// # Errors
    ///
    /// No such event within `timeout`.
    ///
    /// # Panics
    ///
    /// When the worker exited otherwise, is still running, or was not reaped.
    pub fn expect_clean_drain_exit(&self, mark: usize, pid: u32, timeout: Duration) -> Result<()> {
        let exited = self.expect_worker_event(mark, "worker_exited", pid, timeout)?;
        assert!(exited.ends_a_drain(), "{exited}");
        assert_eq!(exited.field("status"), Some("exit code 0"), "{exited}");
        assert!(
            wait_for_exit(pid, Duration::from_secs(5)),
            "{pid} still running"
        );
        assert!(reaped(pid, self.pid()), "{pid} was not reaped");
        Ok(())
    }

    /// Waits, from log line `mark` on, for the `scaled_up` event to `workers` workers
    /// (up to 10 s), then for the `worker_ready` event of the new slot `workers - 1` (up
    /// to 15 s), and returns the new worker's PID.
    ///
    /// # Errors
    ///
    /// An event missing in time, or without a PID.
    pub fn expect_scaled_up(&self, mark: usize, workers: usize) -> Result<u32> {
        self.expect_scaled(mark, "scaled_up", workers)?;
        let slot = workers - 1;
        let ready = self.expect_event(
            mark,
            "worker_ready",
            |event| event.worker_id() == Some(slot),
            Duration::from_secs(15),
        )?;
        ready.worker_pid().context("no worker.pid")
    }

    /// Waits (up to 10 s), from log line `mark` on, for the `scaled_down` event to
    /// `workers` workers.
    ///
    /// # Errors
    ///
    /// No such event in time.
    pub fn expect_scaled_down(&self, mark: usize, workers: usize) -> Result<()> {
        self.expect_scaled(mark, "scaled_down", workers)
    }

    /// Waits (up to 10 s), from log line `mark` on, for event `name` with
    /// `workers={workers}`.
    fn expect_scaled(&self, mark: usize, name: &str, workers: usize) -> Result<()> {
        let timeout = Duration::from_secs(10);
        self.log
            .wait_event(
                mark,
                name,
                |event| event.parsed("workers") == Some(workers),
                timeout,
            )
            .ok_or_else(|| {
                self.log
                    .missing(&format!("`{name}` to {workers} workers"), timeout)
            })?;
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

    /// Waits (up to `timeout`), from log line `mark` on, for the `reload_complete`
    /// event, and checks that it says `replaced` workers were replaced.
    ///
    /// # Errors
    ///
    /// No such line in time.
    ///
    /// # Panics
    ///
    /// When the event reports another number of replaced workers.
    pub fn expect_reload_complete(
        &self,
        mark: usize,
        replaced: usize,
        timeout: Duration,
    ) -> Result<()> {
        let done = self.expect_event(mark, "reload_complete", |_| true, timeout)?;
        assert_eq!(done.parsed("replaced"), Some(replaced), "{done}");
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

    /// Waits, from log line `mark` on, for the supervisor `old` to log that it started a
    /// new supervisor (the `upgrade_started` event of a binary upgrade), and returns that
    /// one, guarded.
    ///
    /// # Errors
    ///
    /// No such event within `timeout`, or no pid in it.
    pub fn expect_new_supervisor(
        &self,
        mark: usize,
        old: u32,
        timeout: Duration,
    ) -> Result<NewSupervisor> {
        let started = self.expect_event(
            mark,
            "upgrade_started",
            |event| event.supervisor_pid() == Some(old),
            timeout,
        )?;
        let pid = started
            .parsed("upgrade.pid")
            .with_context(|| format!("no upgrade.pid in {started}"))?;
        Ok(NewSupervisor(pid))
    }

    /// Waits up to 10 s, from log line `mark` on, for `workers` workers' `draining`
    /// events (they got `Drain`); returns the sum of their `live` counts (the
    /// connections in flight when the drain began) and the events.
    ///
    /// # Errors
    ///
    /// Not every worker logged `draining` in time.
    pub fn wait_draining(&self, mark: usize, workers: usize) -> Result<(usize, Vec<Event>)> {
        let draining = self
            .wait_events(mark, "draining", workers, |_| true, Duration::from_secs(10))
            .ok_or_else(|| anyhow!("not every worker logged `draining`"))?;
        let live = draining
            .iter()
            .filter_map(|event| event.parsed::<usize>("live"))
            .sum();
        Ok((live, draining))
    }
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

impl Drop for Server {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let workers: Vec<(u32, OwnedFd)> = self.log.take_workers();
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

/// Sends SIGTERM to `server` and waits up to 10 s for the `draining` event of each of its
/// `workers`; returns the sum of their `live` counts (the connections in flight when the
/// drain began) and the events.
///
/// # Errors
///
/// The signal cannot be sent, or not every worker logged `draining` in time.
pub fn sigterm_and_wait_for_drain(server: &Server, workers: usize) -> Result<(usize, Vec<Event>)> {
    let mark = server.log_mark();
    server.signal(Signal::TERM)?;
    server.wait_draining(mark, workers)
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

/// Environment variable: when set, every demo server the harness starts gets
/// `--acceptors` with its value, unless the test gives `--acceptors` itself (`.ci/run`
/// runs the lifecycle tests once more with 2).
pub const ACCEPTORS_ENV: &str = "CORELOOP_TEST_ACCEPTORS";
