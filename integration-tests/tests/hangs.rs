//! Hang detection: a worker whose event loop is blocked gets no new connections as soon
//! as its reports are late, and is killed and replaced after the heartbeat timeout.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use coreloop_integration_tests::{
    Event, Outcome, Server, ServerConfig, connect, get, live_children, log_field, parse_whoami,
    read_until_close, timed_get, wait_for_exit, zombie_children,
};
use std::io::Write as _;

/// How fast a request to the healthy worker must be answered while the other is blocked.
const PROMPT: Duration = Duration::from_millis(500);

#[test]
fn blocked_worker_is_bypassed_then_killed_and_replaced() -> anyhow::Result<()> {
    let server = Server::start(
        ServerConfig::new(2)
            .binary(env!("CARGO_BIN_EXE_fixture-block"))
            .args(["--heartbeat-timeout", "1"]),
    )?;
    let port = server.port();
    let workers = server.worker_pids();
    let mark = server.log_mark();

    // Block one worker's event loop for 5 s (far past the 1 s heartbeat timeout).
    let (mut blocked_conn, blocked) = block_a_worker(&server, mark, 5000)?;
    let (&blocked_id, _) = workers
        .iter()
        .find(|(_, pid)| **pid == blocked)
        .context("the blocked pid is not a worker")?;
    let healthy = workers[&(1 - blocked_id)];

    // Its reports stop: after 3 heartbeat intervals it gets no new connections.
    server.expect_worker_event(mark, "worker_stalled", blocked, Duration::from_secs(5))?;

    // While it is blocked, every new connection is answered promptly by the other worker.
    let killed =
        |event: &Event| event.worker_pid() == Some(blocked) && event.reason() == Some("hang");
    let mut served = 0;
    let start = Instant::now();
    while served < 5
        || server
            .wait_event(mark, "worker_killed", killed, Duration::ZERO)
            .is_none()
    {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the blocked worker was not killed"
        );
        let sent = Instant::now();
        let outcome = timed_get(port, "/whoami", Duration::from_secs(10));
        let took = sent.elapsed();
        let Outcome::Answered(200, body) = &outcome else {
            panic!("request {served} while a worker is blocked: {outcome:?}");
        };
        let (_, answered_by) = parse_whoami(body).context("bad /whoami body")?;
        assert_eq!(
            answered_by, healthy,
            "request {served} was not served by the healthy worker"
        );
        assert!(
            took < PROMPT,
            "request {served} took {took:?} while worker {blocked} was blocked"
        );
        served += 1;
    }
    eprintln!("{served} requests served by {healthy} while {blocked} was blocked");

    // Killed after the heartbeat timeout, with how long it had been silent.
    let line = server.expect_event(mark, "worker_killed", killed, Duration::ZERO)?;
    let blocked_ms: u64 = line
        .parsed("blocked_ms")
        .with_context(|| format!("no blocked_ms in {line}"))?;
    assert!(
        (1000..5000).contains(&blocked_ms),
        "blocked_ms={blocked_ms} for a 1 s heartbeat timeout and a 5 s block"
    );
    assert!(
        wait_for_exit(blocked, Duration::from_secs(5)),
        "the blocked worker {blocked} was not killed"
    );
    let replacement =
        server.wait_for_replacement(mark, blocked_id, blocked, Duration::from_secs(15))?;
    // The blocked request's connection died with its worker.
    let reply = read_until_close(&mut blocked_conn)?;
    assert!(
        !reply.text().contains("200 OK"),
        "the blocked request was answered: {:?}",
        reply.text()
    );

    // The replacement serves; the pool is the healthy worker and the replacement.
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let (status, body) = get(port, "/whoami")?;
        assert_eq!(status, 200);
        pids.insert(parse_whoami(&body).context("bad /whoami body")?.1);
        if pids.len() == 2 {
            break;
        }
    }
    assert_eq!(
        pids,
        [healthy, replacement].into_iter().collect(),
        "pids answering after the replacement"
    );
    let mut children = live_children(server.pid());
    children.sort_unstable();
    let mut expected = vec![healthy, replacement];
    expected.sort_unstable();
    assert_eq!(children, expected, "children of the supervisor");
    assert_eq!(zombie_children(server.pid()), Vec::<u32>::new(), "zombies");
    Ok(())
}

/// A worker stuck in a handler for a while (shorter than any hang detection) gets no new
/// connection while the other is free: the supervisor sees its event loop has been awake
/// too long (the shared loop clock) before it has sent it anything, even though its queue
/// is empty and its count of connections is as low as the other's.
#[test]
fn a_worker_busy_in_a_handler_gets_no_new_connection() -> anyhow::Result<()> {
    // Default heartbeat timeout (10 s): reports are judged late only after 3 s, so only
    // the loop clock can keep requests away from the blocked worker within 1.5 s.
    let server = Server::start(
        ServerConfig::new(2)
            .binary(env!("CARGO_BIN_EXE_fixture-block"))
            .rust_log("info"),
    )?;
    let port = server.port();
    let mark = server.log_mark();
    let (_blocked_conn, blocked) = block_a_worker(&server, mark, 1500)?;
    // The supervisor calls a loop stuck once it has been awake for 5 ms (shorter waits
    // are a busy worker, merely less preferred): let that much time pass. It is the
    // condition itself, not an event that could be awaited instead.
    std::thread::sleep(Duration::from_millis(20));
    let started = Instant::now();
    // Four clients, one request per connection, until the block is over.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while started.elapsed() < Duration::from_millis(1200) {
                    let sent = Instant::now();
                    let outcome = timed_get(port, "/whoami", Duration::from_secs(5));
                    seen.push((outcome, sent.elapsed()));
                }
                seen
            })
        })
        .collect();
    let mut answered = 0;
    for client in clients {
        for (outcome, took) in client
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))?
        {
            let Outcome::Answered(200, body) = &outcome else {
                anyhow::bail!("{outcome:?}");
            };
            let (_, pid) = parse_whoami(body).context("bad /whoami body")?;
            ensure!(
                pid != blocked && took < PROMPT,
                "a request went to the blocked worker {blocked} (answered by {pid} in {took:?})"
            );
            answered += 1;
        }
    }
    ensure!(answered >= 20, "only {answered} requests in 1.2 s");
    eprintln!("{answered} requests answered by the free worker while the other was blocked");
    Ok(())
}

/// Sends `/block?ms=…` to the fixture-block server and waits for the worker that took it
/// to say it blocks; returns the connection (open until the answer) and that worker's pid.
fn block_a_worker(
    server: &Server,
    mark: usize,
    ms: u64,
) -> anyhow::Result<(std::net::TcpStream, u32)> {
    let mut conn = connect(server.port())?;
    conn.write_all(format!("GET /block?ms={ms} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
    let blocking = server.expect_log_since(
        mark,
        "`blocking the event loop` from a worker",
        |line| line.contains(" blocking the event loop"),
        Duration::from_secs(10),
    )?;
    let blocked = log_field(&blocking, "worker.pid")
        .and_then(|pid| pid.parse().ok())
        .with_context(|| format!("no worker.pid in {blocking:?}"))?;
    Ok((conn, blocked))
}
