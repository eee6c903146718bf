//! `examples/axum.rs`: an axum `Router` served by hyper on coreloop workers answers its
//! routes, keeps per-worker state, and finishes a request in flight on SIGTERM.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use coreloop_integration_tests::{
    Server, ServerConfig, connect, example_binary, expect_exit_0_after_sigterm,
    expect_one_ok_response, get, get_in_flight, read_response, sigterm_and_wait_for_drain,
};

fn start(workers: u16) -> Result<Server> {
    Server::start(
        ServerConfig::new(workers)
            .binary(example_binary("axum")?)
            .args(["--shutdown-timeout", "10"]),
    )
}

/// `worker=1 pid=123 count=4` → (1, 123, 4).
fn parse_count(body: &str) -> Option<(usize, u32, u64)> {
    let mut parts = body.split_whitespace();
    let id = parts.next()?.strip_prefix("worker=")?.parse().ok()?;
    let pid = parts.next()?.strip_prefix("pid=")?.parse().ok()?;
    let count = parts.next()?.strip_prefix("count=")?.parse().ok()?;
    Some((id, pid, count))
}

#[test]
fn routes_answer_and_each_worker_counts_its_own_requests() -> Result<()> {
    let server = start(2)?;
    let ready = server.worker_pids();
    assert_eq!(ready.len(), 2, "{ready:?}");
    let port = server.port();

    let (status, body) = get(port, "/")?;
    assert_eq!(status, 200, "{body}");
    let id: usize = body
        .strip_prefix("Hello from axum on worker ")
        .and_then(|rest| rest.trim_end().parse().ok())
        .with_context(|| format!("unexpected body {body:?}"))?;
    assert!(ready.contains_key(&id), "{body:?} vs {ready:?}");
    assert_eq!(
        get(port, "/hello/ferris")?,
        (200, "Hello, ferris!\n".into())
    );
    assert_eq!(get(port, "/nope")?.0, 404, "unknown path");
    assert_eq!(
        get(port, "/sleep/abc")?.0,
        400,
        "a path parameter that is no number"
    );
    assert_eq!(get(port, "/sleep/60001")?.0, 400, "a sleep above the limit");

    // Every `/count` answer, in order, per worker PID.
    let mut counts: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut record = |body: &str| -> Result<()> {
        let (id, pid, count) =
            parse_count(body).with_context(|| format!("unexpected /count body {body:?}"))?;
        assert_eq!(ready.get(&id), Some(&pid), "{body:?} vs {ready:?}");
        counts.entry(pid).or_default().push(count);
        Ok(())
    };
    // Three requests on one keep-alive connection: one worker answers them all.
    let mut stream = connect(port)?;
    let mut keep_alive_pids = Vec::new();
    for _ in 0..3 {
        stream.write_all(b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let response = read_response(&mut stream)?;
        assert_eq!(response.status, 200, "{}", response.text());
        record(&response.text())?;
        keep_alive_pids.push(parse_count(&response.text()).map(|(_, pid, _)| pid));
    }
    drop(stream);
    keep_alive_pids.dedup();
    assert_eq!(keep_alive_pids.len(), 1, "{keep_alive_pids:?}");
    // One connection per request: both workers answer.
    for _ in 0..20 {
        let (status, body) = get(port, "/count")?;
        assert_eq!(status, 200, "{body}");
        record(&body)?;
    }
    eprintln!("/count answers per worker pid: {counts:?}");
    assert_eq!(counts.len(), 2, "both workers answered /count: {counts:?}");
    for (pid, seen) in &counts {
        let expected: Vec<u64> = (1..=seen.len() as u64).collect();
        assert_eq!(
            seen, &expected,
            "worker {pid} counts its own requests, one by one"
        );
    }
    Ok(())
}

#[test]
fn sigterm_lets_the_request_in_flight_finish() -> Result<()> {
    let mut server = start(2)?;
    let workers = server.worker_pids().len();
    let port = server.port();

    let slow = get_in_flight(port, "/sleep/1500");
    server
        .wait_for_log(
            |line| line.contains(" sleeping ms=1500"),
            Duration::from_secs(10),
        )
        .ok_or_else(|| anyhow!("the slow request did not start"))?;
    let (live, draining) = sigterm_and_wait_for_drain(&server, workers)?;
    assert_eq!(live, 1, "the slow request is in flight: {draining:?}");

    let (body, elapsed) = expect_one_ok_response(slow, "client thread")?;
    assert_eq!(body, "slept 1500ms\n");
    assert!(elapsed >= Duration::from_millis(1500), "{elapsed:?}");

    expect_exit_0_after_sigterm(&mut server)
}
