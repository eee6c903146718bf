//! Restart policy: exponential backoff with jitter between restarts of a crashing worker,
//! the crash-loop limit that stops the whole server, and a handler factory that fails
//! while the server boots (fatal at once) or after it (a crash like any other).

use std::net::TcpListener;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use coreloop_integration_tests::{
    Server, ServerConfig, is_alive, kill, live_children, log_field, processes_with_arg,
    random_port, reaped, wait_for_exit, zombie_children,
};
use rustix::process::Signal;

/// `RESTART_BACKOFF_MIN` in the supervisor: the n-th consecutive short-lived failure of a
/// slot waits `100 ms · 2ⁿ`, ± 50 %.
const BACKOFF_BASE_MS: f64 = 100.0;

/// The supervisor exited with a failure `status`, and its stderr was closed by every
/// process holding it (within 5 s), so the log is complete.
fn assert_failed_and_log_closed(server: &Server, status: ExitStatus) {
    assert!(!status.success(), "exit status {status}");
    assert!(
        server.wait_log_closed(Duration::from_secs(5)),
        "stderr still open"
    );
}

#[test]
fn restart_backoff_grows_with_jitter() -> anyhow::Result<()> {
    let server = Server::start(ServerConfig::new(2).args(["--max-restarts", "1000"]))?;
    let slot = 0;
    let mut pid = server.worker_pids()[&slot];
    let other = server.worker_pids()[&1];
    let mut delays = Vec::new();
    for _ in 0..4 {
        let mark = server.log_mark();
        kill(pid, Signal::KILL)?;
        ensure!(
            wait_for_exit(pid, Duration::from_secs(5)),
            "worker {pid} survived SIGKILL"
        );
        let line = server.expect_worker_log_since(
            mark,
            pid,
            " restarting after backoff ",
            Duration::from_secs(10),
        )?;
        let delay: u64 = log_field(&line, "delay_ms")
            .and_then(|ms| ms.parse().ok())
            .with_context(|| format!("no delay_ms in {line:?}"))?;
        delays.push(delay);
        // The next kill only once the replacement is ready: the failure count of the slot
        // is what grows, not a burst of kills.
        pid = server.wait_for_replacement(mark, slot, pid, Duration::from_secs(30))?;
    }
    eprintln!("restart delays of worker {slot}: {delays:?} ms");

    // The n-th consecutive failure waits 100 ms · 2ⁿ · [0.5, 1.5).
    let ratios: Vec<f64> = delays
        .iter()
        .enumerate()
        .map(|(n, delay)| *delay as f64 / (BACKOFF_BASE_MS * f64::from(1u32 << (n + 1))))
        .collect();
    for (n, ratio) in ratios.iter().enumerate() {
        // delay_ms is truncated to whole milliseconds: allow 1 ms below the bound.
        let base = BACKOFF_BASE_MS * f64::from(1u32 << (n + 1));
        ensure!(
            (0.5 - 1.0 / base..=1.5).contains(ratio),
            "restart {} waited {} ms, outside [{}, {}] ms: {delays:?}",
            n + 1,
            delays[n],
            base * 0.5,
            base * 1.5
        );
    }
    ensure!(
        delays[3] > delays[0] && delays[3] > delays[1],
        "the backoff does not grow: {delays:?}"
    );
    // Jitter: the delays are not exact powers of two of one base.
    let (min, max) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    ensure!(
        max - min > 0.02,
        "no jitter: delays {delays:?} are {ratios:?} × 100 ms · 2ⁿ"
    );

    // The other slot was never touched, and the pool is whole again.
    assert!(is_alive(other), "worker 1 ({other}) died");
    let mut children = live_children(server.pid());
    children.sort_unstable();
    let mut expected = vec![pid, other];
    expected.sort_unstable();
    assert_eq!(children, expected, "children of the supervisor");
    assert_eq!(zombie_children(server.pid()), Vec::<u32>::new(), "zombies");
    Ok(())
}

#[test]
fn crash_loop_limit_stops_the_server() -> anyhow::Result<()> {
    let mut server = Server::start(ServerConfig::new(2).args([
        "--max-restarts",
        "3",
        "--restart-period",
        "60",
    ]))?;
    let supervisor = server.pid();
    let bind = format!("127.0.0.1:{}", server.port());
    // Kill the current worker of slot 0, then of slot 1, and so on, each once it is
    // ready: three restarts are within the limit, the fourth is one too many.
    for round in 0..4 {
        let slot = round % 2;
        let victim = server.worker_pids()[&slot];
        let mark = server.log_mark();
        kill(victim, Signal::KILL)?;
        ensure!(
            wait_for_exit(victim, Duration::from_secs(5)),
            "worker {victim} survived SIGKILL"
        );
        if round < 3 {
            server.wait_for_replacement(mark, slot, victim, Duration::from_secs(30))?;
            ensure!(
                server.wait_exit(Duration::ZERO).is_none(),
                "the server stopped after only {} restarts",
                round + 1
            );
        }
    }
    let status = server
        .wait_exit(Duration::from_secs(15))
        .context("the supervisor kept running past the crash-loop limit")?;
    // Nothing left: every worker this server started is gone, reaped by the supervisor
    // before it exited (not left as a zombie, not orphaned).
    let workers = server.all_worker_pids();
    // Two at boot, and one replacement after each of the first three kills only.
    assert_eq!(workers.len(), 5, "workers started: {workers:?}");
    for pid in &workers {
        assert!(
            !is_alive(*pid),
            "worker {pid} still running after the supervisor exited"
        );
        assert!(reaped(*pid, supervisor), "worker {pid} was not reaped");
    }
    assert_failed_and_log_closed(&server, status);
    let log = server.log_text();
    assert!(
        log.contains("giving up: 4 worker restarts within 60s"),
        "no `giving up: 4 worker restarts within 60s` in the log"
    );
    let left = processes_with_arg(&bind);
    assert!(left.is_empty(), "processes left running: {left:?}");
    Ok(())
}

#[test]
fn factory_error_at_boot_halts_the_server() -> anyhow::Result<()> {
    let config = ServerConfig::new(2)
        .binary(env!("CARGO_BIN_EXE_fixture-failstart"))
        .args(["--fail-worker", "1"]);
    let mut attempt = 0;
    let (server, port, status) = loop {
        attempt += 1;
        let port = random_port();
        let mut server = Server::launch(&config, Some(port))?;
        let status = server
            .wait_exit(Duration::from_secs(15))
            .context("the server kept running although worker 1 cannot start")?;
        if server.port_was_taken() && attempt < 16 {
            continue;
        }
        break (server, port, status);
    };
    assert_failed_and_log_closed(&server, status);
    let log = server.log_text();
    assert!(
        log.contains("worker 1 failed to start: database unreachable"),
        "the factory's error is not on stderr"
    );
    assert!(
        !log.contains(" serving workers="),
        "the server started serving"
    );
    // Worker 0 started fine and must have been stopped with the rest.
    let workers = server.all_worker_pids();
    if workers.is_empty() {
        bail!("no worker was started");
    }
    server.assert_no_worker_left();
    // The port is free again.
    let listener = TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("port {port} is still taken after the failed start"))?;
    drop(listener);
    Ok(())
}

/// Removes a file when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn factory_error_after_boot_is_a_crash_with_backoff() -> anyhow::Result<()> {
    let marker = RemoveOnDrop(std::path::PathBuf::from(format!(
        "/tmp/coreloop-it-failmarker-{}-{:x}",
        std::process::id(),
        coreloop_integration_tests::random_u64() & 0xffff_ffff
    )));
    let marker_arg = marker.0.display().to_string();
    let mut server = Server::start(
        ServerConfig::new(2)
            .binary(env!("CARGO_BIN_EXE_fixture-failstart"))
            .args([
                "--fail-worker",
                "0",
                "--fail-if-exists",
                marker_arg.as_str(),
            ])
            .args(["--max-restarts", "3", "--restart-period", "60"]),
    )?;
    let workers = server.worker_pids();
    // From now on, worker 0 cannot start: its replacements fail in their factory.
    std::fs::write(&marker.0, b"")?;
    let mark = server.log_mark();
    kill(workers[&0], Signal::KILL)?;
    // Worker 1 serves meanwhile.
    for _ in 0..3 {
        let (status, body) = coreloop_integration_tests::get(server.port(), "/whoami")?;
        assert_eq!(status, 200);
        let (_, pid) = coreloop_integration_tests::parse_whoami(&body).context("bad body")?;
        assert_eq!(pid, workers[&1]);
    }
    // The failures are restarted with growing delays and counted toward the crash-loop
    // limit.
    let failed = server
        .wait_for_logs_since(
            mark,
            3,
            |line| {
                line.contains(" worker failed to start ")
                    && line.contains("reason=database unreachable")
            },
            Duration::from_secs(30),
        )
        .context("the replacements of worker 0 did not report their factory's error")?;
    assert_eq!(failed.len(), 3, "{failed:?}");
    let status = server
        .wait_exit(Duration::from_secs(15))
        .context("the supervisor kept restarting a worker that cannot start")?;
    assert_failed_and_log_closed(&server, status);
    let logs = server.logs_since(mark);
    let delays: Vec<u64> = logs
        .iter()
        .filter(|line| line.contains(" restarting after backoff "))
        .filter_map(|line| log_field(line, "delay_ms")?.parse().ok())
        .collect();
    assert_eq!(delays.len(), 3, "restart delays {delays:?}");
    assert!(
        delays[2] > delays[0],
        "the backoff does not grow: {delays:?}"
    );
    let log = logs.join("\n");
    assert!(
        log.contains("giving up: 4 worker restarts within 60s"),
        "no `giving up: 4 worker restarts within 60s`"
    );
    assert_eq!(
        server.worker_pids().get(&1),
        Some(&workers[&1]),
        "worker 1 was restarted"
    );
    server.assert_no_worker_left();
    Ok(())
}
