//! Graceful stop, bounded: SIGTERM closes idle keep-alive connections at once, serves
//! connections already accepted, cuts what is left at the shutdown timeout and exits 0;
//! a second SIGINT or a SIGQUIT stops at once; a stopped worker cannot hold the
//! supervisor past the timeout.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use coreloop_integration_tests::{
    Server, ServerConfig, connect, kill, parse_responses, read_response, read_until_close,
    start_with_metrics, wait_for_forwarded, wait_for_stopped,
};
use rustix::process::Signal;

/// Waits until the supervisor has handed `n` connections to the two workers: a connection
/// opened before is then with a worker, not in a listening socket's queue (with several
/// accept loops, an answer on a later connection does not say that).
fn forwarded(metrics_port: u16, n: usize) -> anyhow::Result<()> {
    wait_for_forwarded(metrics_port, 2, n, Duration::from_secs(5))
}

#[test]
fn idle_keep_alive_connection_is_closed_soon_after_sigterm() -> anyhow::Result<()> {
    let mut server = Server::start(ServerConfig::new(2).args(["--shutdown-timeout", "10"]))?;
    let mut idle = connect(server.port())?;
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let response = read_response(&mut idle)?;
    assert_eq!(response.status, 200);
    assert!(!response.closes(), "the connection must stay open");

    let sent = Instant::now();
    server.signal(Signal::TERM)?;
    let reply = read_until_close(&mut idle)?;
    let closed = sent.elapsed();
    assert!(
        reply.bytes.is_empty(),
        "unexpected bytes on the idle connection: {:?}",
        reply.text()
    );
    // The demo lingers 250 ms for a request already on its way; the shutdown timeout is
    // 10 s.
    assert!(
        closed < Duration::from_secs(2),
        "idle connection closed {closed:?} after SIGTERM"
    );
    let status = server
        .wait_exit(Duration::from_secs(5))
        .context("the supervisor did not exit")?;
    assert!(status.success(), "exit status {status}");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "exit took {:?}",
        sent.elapsed()
    );
    server.assert_no_worker_left();
    Ok(())
}

#[test]
fn accepted_connection_is_served_after_sigterm() -> anyhow::Result<()> {
    let config = ServerConfig::new(2).args(["--shutdown-timeout", "10"]);
    let (mut server, metrics_port) = start_with_metrics(&config)?;
    let port = server.port();
    // Accepted and handed to a worker before SIGTERM, but its request comes after.
    let mut early = connect(port)?;
    forwarded(metrics_port, 1)?;

    let mark = server.log_mark();
    server.signal(Signal::TERM)?;
    let (live, _) = server.wait_draining(mark, 2)?;
    assert_eq!(live, 1, "exactly the early connection is live");
    early.write_all(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let reply = read_until_close(&mut early)?;
    let responses = parse_responses(&reply.bytes)?;
    assert_eq!(responses.len(), 1, "{:?}", reply.text());
    assert_eq!(responses[0].status, 200);
    assert!(
        responses[0].closes(),
        "a response during the drain must say Connection: close"
    );
    let status = server
        .wait_exit(Duration::from_secs(5))
        .context("the supervisor did not exit")?;
    assert!(status.success(), "exit status {status}");
    server.assert_no_worker_left();
    Ok(())
}

#[test]
fn shutdown_timeout_cuts_off_a_slow_request() -> anyhow::Result<()> {
    let config = ServerConfig::new(2).args(["--shutdown-timeout", "1"]);
    let (mut server, metrics_port) = start_with_metrics(&config)?;
    let port = server.port();
    let mut slow = connect(port)?;
    slow.write_all(b"GET /sleep?ms=20000 HTTP/1.1\r\nHost: x\r\n\r\n")?;
    forwarded(metrics_port, 1)?;

    let mark = server.log_mark();
    let sent = Instant::now();
    server.signal(Signal::TERM)?;
    let status = server
        .wait_exit(Duration::from_secs(10))
        .context("the supervisor did not exit")?;
    let took = sent.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took < Duration::from_secs(3),
        "exit {took:?} after SIGTERM with a 1 s shutdown timeout"
    );
    let reply = read_until_close(&mut slow)?;
    assert!(
        reply.bytes.is_empty(),
        "the cut-off request got {:?}",
        reply.text()
    );
    let (live, _) = server.wait_draining(mark, 2)?;
    assert_eq!(live, 1, "exactly the slow request was in flight");
    server.expect_event(
        mark,
        "drain_deadline_passed",
        |_| true,
        Duration::from_secs(5),
    )?;
    server.assert_no_worker_left();
    Ok(())
}

/// Starts fixture-slowdrain (each request held 60 s, the drain ignored) with a 30 s
/// shutdown timeout, and one request held by a worker.
fn slowdrain_holding_a_request() -> anyhow::Result<(Server, std::net::TcpStream)> {
    let server = Server::start(
        ServerConfig::new(2)
            .binary(env!("CARGO_BIN_EXE_fixture-slowdrain"))
            .args(["--shutdown-timeout", "30"]),
    )?;
    let mark = server.log_mark();
    let mut held = connect(server.port())?;
    held.write_all(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")?;
    server.expect_log_since(
        mark,
        "`holding connection`",
        |line| line.contains(" holding connection "),
        Duration::from_secs(10),
    )?;
    Ok((server, held))
}

/// The supervisor exits 0 within 3 s of `since`, the held request is cut, no worker is
/// left.
fn assert_stopped_at_once(
    server: &mut Server,
    held: &mut std::net::TcpStream,
    since: Instant,
) -> anyhow::Result<()> {
    let status = server
        .wait_exit(Duration::from_secs(10))
        .context("the supervisor did not exit")?;
    let took = since.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took < Duration::from_secs(3),
        "stopped {took:?} after the signal (shutdown timeout 30 s)"
    );
    let reply = read_until_close(held)?;
    assert!(
        reply.bytes.is_empty(),
        "the held request got {:?}",
        reply.text()
    );
    server.assert_no_worker_left();
    Ok(())
}

/// With the drain (begun at log line `mark`) stuck on the held request — both workers
/// logged `draining`, one connection live, the supervisor still running — sends `signal`,
/// checks that the supervisor stops at once, and waits for its `stop_now` event.
fn stop_stuck_drain(
    server: &mut Server,
    held: &mut std::net::TcpStream,
    mark: usize,
    signal: Signal,
) -> anyhow::Result<()> {
    let (live, _) = server.wait_draining(mark, 2)?;
    assert_eq!(live, 1, "the held request is in flight");
    // The drain is stuck on the held request for up to 30 s.
    assert!(server.wait_exit(Duration::ZERO).is_none());
    let sent = Instant::now();
    server.signal(signal)?;
    assert_stopped_at_once(server, held, sent)?;
    server.expect_event(mark, "stop_now", |_| true, Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn second_sigint_stops_at_once() -> anyhow::Result<()> {
    let (mut server, mut held) = slowdrain_holding_a_request()?;
    let mark = server.log_mark();
    server.signal(Signal::INT)?;
    server.expect_event(
        mark,
        "signal",
        |event| event.field("signal") == Some("SIGINT"),
        Duration::from_secs(10),
    )?;
    stop_stuck_drain(&mut server, &mut held, mark, Signal::INT)
}

#[test]
fn sigquit_stops_at_once() -> anyhow::Result<()> {
    let (mut server, mut held) = slowdrain_holding_a_request()?;
    let mark = server.log_mark();
    let sent = Instant::now();
    server.signal(Signal::QUIT)?;
    assert_stopped_at_once(&mut server, &mut held, sent)?;
    server.expect_event(
        mark,
        "signal",
        |event| event.field("signal") == Some("SIGQUIT"),
        Duration::from_secs(5),
    )?;
    Ok(())
}

#[test]
fn sigquit_during_a_graceful_stop_stops_at_once() -> anyhow::Result<()> {
    let (mut server, mut held) = slowdrain_holding_a_request()?;
    let mark = server.log_mark();
    server.signal(Signal::TERM)?;
    stop_stuck_drain(&mut server, &mut held, mark, Signal::QUIT)
}

#[test]
fn stopped_worker_does_not_hold_the_supervisor() -> anyhow::Result<()> {
    let mut server = Server::start(ServerConfig::new(2).args(["--shutdown-timeout", "1"]))?;
    let stopped = server.worker_pids()[&0];
    kill(stopped, Signal::STOP)?;
    ensure!(
        wait_for_stopped(stopped, Duration::from_secs(2)),
        "worker {stopped} did not stop"
    );

    let mark = server.log_mark();
    let sent = Instant::now();
    server.signal(Signal::TERM)?;
    let status = server
        .wait_exit(Duration::from_secs(10))
        .context("the supervisor did not exit")?;
    let took = sent.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took < Duration::from_secs(3),
        "exit {took:?} after SIGTERM with a stopped worker and a 1 s shutdown timeout"
    );
    server.expect_event(mark, "shutdown_timeout", |_| true, Duration::from_secs(5))?;
    // Nothing left, and nobody continued the stopped worker but the kill.
    server.assert_no_worker_left();
    Ok(())
}
