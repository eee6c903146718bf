//! Restart policy: a worker that was ready is replaced at once however often it is
//! killed; a worker that cannot start backs off exponentially with jitter, and stops the
//! server after the start-failure limit; a handler factory that fails while the server
//! boots stops it at once.

use std::net::TcpListener;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use coreloop_integration_tests::{
    Server, ServerConfig, is_alive, kill, live_children, processes_with_arg, random_port, reaped,
    wait_for_exit, zombie_children,
};
use rustix::process::Signal;

/// `RESTART_BACKOFF_MIN` in the supervisor: the n-th consecutive start failure of a slot
/// waits within `[base / 2, base]`, `base = 100 ms · 2ⁿ⁻¹`.
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

/// Ten kills in a row of one slot's ready worker: each is replaced at once (no delay
/// scheduled), each replacement serves, and the server never gives up, although the
/// start-failure limit is 1.
#[test]
fn ready_workers_killed_in_a_row_are_replaced_at_once() -> anyhow::Result<()> {
    let server = Server::start(ServerConfig::new(2).args(["--max-start-failures", "1"]))?;
    let slot = 0;
    let mut pid = server.worker_pids()[&slot];
    let other = server.worker_pids()[&1];
    let first = server.log_mark();
    let mut waits = Vec::new();
    for kill_no in 0..10 {
        let mark = server.log_mark();
        kill(pid, Signal::KILL)?;
        let killed = std::time::Instant::now();
        ensure!(
            wait_for_exit(pid, Duration::from_secs(5)),
            "worker {pid} survived SIGKILL"
        );
        let old = pid;
        pid = server.wait_for_replacement(mark, slot, old, Duration::from_secs(30))?;
        // Serving: a request reaches the replacement (idle workers take turns).
        let served = (0..50).any(|_| {
            coreloop_integration_tests::get(server.port(), "/whoami")
                .ok()
                .and_then(|(status, body)| {
                    let (_, by) = coreloop_integration_tests::parse_whoami(&body)?;
                    Some(status == 200 && by == pid)
                })
                .unwrap_or(false)
        });
        ensure!(served, "replacement {kill_no} ({pid}) did not serve");
        waits.push(killed.elapsed());
    }
    eprintln!("kill to replacement serving, 10 kills in a row: {waits:?}");
    let log = server.logs_since(first).join("\n");
    let events = server.events_since(first);
    assert!(
        !events.iter().any(|event| event.is("restart_scheduled")),
        "a restart of a ready worker was delayed:\n{log}"
    );
    // Giving up stops the server: its `stopping` event (with the `giving up` error).
    assert!(!events.iter().any(|event| event.is("stopping")), "{log}");
    // A bound far above what a replacement takes, not a benchmark: the old backoff grew
    // past it by the fifth kill.
    let slowest = waits.iter().max().copied().unwrap_or_default();
    assert!(slowest < Duration::from_secs(3), "{waits:?}");
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
        !server
            .events_since(0)
            .iter()
            .any(|event| event.is("serving")),
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

/// A worker slot that cannot start after the boot (its factory fails): its restarts back
/// off exponentially with jitter, and after `--max-start-failures` failures in a row the
/// server stops with a clear message, a non-zero exit and nothing left running. The other
/// worker serves meanwhile.
#[test]
fn start_failures_after_boot_back_off_then_stop_the_server() -> anyhow::Result<()> {
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
            .args(["--max-start-failures", "4"]),
    )?;
    let supervisor = server.pid();
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
    let status = server
        .wait_exit(Duration::from_secs(30))
        .context("the supervisor kept restarting a worker that cannot start")?;
    assert_failed_and_log_closed(&server, status);
    let logs = server.logs_since(mark);
    let events = server.events_since(mark);
    let failed = events
        .iter()
        .filter(|event| {
            event.is("worker_start_failed")
                && event
                    .reason()
                    .is_some_and(|r| r.contains("database unreachable"))
        })
        .count();
    assert_eq!(failed, 4, "start failures reported");
    // The kill of the ready worker was restarted at once; each of the first three start
    // failures waited a growing, jittered backoff; the fourth stopped the server.
    let delays: Vec<u64> = events
        .iter()
        .filter(|event| event.is("restart_scheduled"))
        .filter_map(|event| event.parsed("delay_ms"))
        .collect();
    assert_eq!(delays.len(), 3, "restart delays {delays:?}");
    for (n, delay) in delays.iter().enumerate() {
        let base = BACKOFF_BASE_MS * f64::from(1u32 << n);
        // delay_ms is truncated to whole milliseconds: allow 1 ms below the bound.
        ensure!(
            (base / 2.0 - 1.0..=base).contains(&(*delay as f64)),
            "backoff {} was {delay} ms, outside [{}, {base}] ms: {delays:?}",
            n + 1,
            base / 2.0
        );
    }
    ensure!(
        delays[2] > delays[0],
        "the backoff does not grow: {delays:?}"
    );
    let log = logs.join("\n");
    assert!(
        log.contains("giving up: worker 0 failed to start 4 times in a row"),
        "no `giving up: worker 0 failed to start 4 times in a row` in the log"
    );
    assert_eq!(
        server.worker_pids().get(&1),
        Some(&workers[&1]),
        "worker 1 was restarted"
    );
    server.assert_no_worker_left();
    for pid in server.all_worker_pids() {
        assert!(reaped(pid, supervisor), "worker {pid} was not reaped");
    }
    let left = processes_with_arg(&format!("127.0.0.1:{}", server.port()));
    assert!(left.is_empty(), "processes left running: {left:?}");
    Ok(())
}
