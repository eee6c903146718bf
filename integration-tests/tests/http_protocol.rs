//! The demo's HTTP/1.1 handling at the edges: malformed requests, oversize heads and
//! pipelining.

use std::io::Write as _;

use anyhow::Context as _;
use coreloop_integration_tests::{
    Server, ServerConfig, connect, cpu_ticks, get, parse_response, parse_responses, parse_whoami,
    read_until_close, send_raw,
};

#[test]
fn malformed_request_gets_400_and_close() -> anyhow::Result<()> {
    let server = Server::start(ServerConfig::new(1))?;
    let reply = send_raw(server.port(), b"GARBAGE\r\n\r\n")?;
    // read_until_close returned: the server closed the connection (FIN or RST).
    assert!(
        reply.text().starts_with("HTTP/1.1 400 "),
        "expected a 400, got {:?}",
        reply.text()
    );
    let (response, _) = parse_response(&reply.bytes)?
        .ok_or_else(|| anyhow::anyhow!("incomplete 400 response: {:?}", reply.text()))?;
    assert!(response.closes(), "the 400 must announce Connection: close");

    // The worker is fine: a valid request on a new connection succeeds.
    let (status, body) = get(server.port(), "/")?;
    assert_eq!((status, body.as_str()), (200, "Hello, world!"));
    Ok(())
}

#[test]
fn oversize_header_gets_431_and_close() -> anyhow::Result<()> {
    let server = Server::start(ServerConfig::new(1))?;
    let big = "a".repeat(20 * 1024);
    let request = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let reply = send_raw(server.port(), request.as_bytes())?;
    assert!(
        reply.text().starts_with("HTTP/1.1 431 "),
        "expected a 431, got {:?} ({:?})",
        reply.text(),
        reply.close
    );
    let (response, _) = parse_response(&reply.bytes)?
        .ok_or_else(|| anyhow::anyhow!("incomplete 431 response: {:?}", reply.text()))?;
    assert!(response.closes(), "the 431 must announce Connection: close");

    let (status, body) = get(server.port(), "/")?;
    assert_eq!((status, body.as_str()), (200, "Hello, world!"));
    Ok(())
}

#[test]
fn unknown_path_gets_404_and_keeps_alive() -> anyhow::Result<()> {
    let server = Server::start(ServerConfig::new(1))?;
    let mut stream = connect(server.port())?;
    stream.write_all(
        concat!(
            "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .as_bytes(),
    )?;
    let reply = read_until_close(&mut stream)?;
    let responses = parse_responses(&reply.bytes)?;
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [404, 200], "{}", reply.text());
    assert!(
        !responses[0].closes(),
        "a 404 does not close the connection"
    );
    Ok(())
}

#[test]
fn pipelined_requests_answered_in_order() -> anyhow::Result<()> {
    let server = Server::start(ServerConfig::new(1))?;
    let mut stream = connect(server.port())?;
    // Both requests in one write; the second asks to close.
    stream.write_all(
        concat!(
            "GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .as_bytes(),
    )?;
    // Returns only when the server closes: the second request's `Connection: close` is
    // honoured (a keep-alive connection would time out here instead).
    let reply = read_until_close(&mut stream)?;
    let responses = parse_responses(&reply.bytes)?;
    assert_eq!(responses.len(), 2, "{}", reply.text());

    assert_eq!(responses[0].status, 200);
    let (id, pid) = parse_whoami(&responses[0].text())
        .ok_or_else(|| anyhow::anyhow!("first response is not /whoami: {:?}", responses[0]))?;
    assert_eq!(server.worker_pids().get(&id), Some(&pid));
    assert!(
        !responses[0].closes(),
        "the first response keeps the connection alive"
    );

    assert_eq!(responses[1].status, 200);
    assert_eq!(responses[1].text(), "Hello, world!");
    assert!(
        responses[1].closes(),
        "the second response announces Connection: close"
    );
    Ok(())
}

/// The demo's `/block?ms=N`, the slow request of the `blocking-open` benchmark, holds its
/// worker's event loop for N ms without using CPU: the answer comes after N ms, the worker
/// spends almost no CPU meanwhile (a `/burn` would spend the whole time), and new
/// connections go to the other worker and are answered at once.
#[test]
fn block_holds_one_loop_without_cpu_while_the_other_worker_serves() -> anyhow::Result<()> {
    use std::time::{Duration, Instant};

    const BLOCK_MS: u64 = 1500;
    let server = Server::start(ServerConfig::new(2))?;
    let workers: Vec<u32> = server.worker_pids().into_values().collect();
    anyhow::ensure!(workers.len() == 2, "workers: {workers:?}");
    let mut slow = connect(server.port())?;
    write!(
        slow,
        "GET /block?ms={BLOCK_MS} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let started = Instant::now();
    // The worker that took it sleeps in the kernel's nanosleep; an idle one waits in epoll.
    let blocked = loop {
        let sleeping = workers.iter().copied().find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/wchan"))
                .is_ok_and(|wchan| wchan.contains("nanosleep"))
        });
        if let Some(pid) = sleeping {
            break pid;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_millis(BLOCK_MS),
            "no worker went to sleep in /block"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let cpu_before = cpu_ticks(blocked).context("blocked worker's CPU time")?;
    // In its first millisecond a blocked handler poll only ranks busy, and a busy worker
    // may still get a connection; past 1 ms it lags, past 5 ms it is stuck, and either
    // way it gets none while the other worker is less busy. That elapsed time is the
    // condition itself, not an event that could be awaited.
    std::thread::sleep(Duration::from_millis(20));

    for i in 0..10 {
        let asked = Instant::now();
        let (status, body) = get(server.port(), "/whoami")?;
        let (_, pid) = parse_whoami(&body).context("a /whoami body")?;
        assert_eq!(status, 200);
        assert_ne!(pid, blocked, "connection {i} went to the blocked worker");
        assert!(
            asked.elapsed() < Duration::from_millis(BLOCK_MS / 2),
            "connection {i} answered in {:?}",
            asked.elapsed()
        );
    }

    let reply = read_until_close(&mut slow)?;
    let waited = started.elapsed();
    let (answer, _) = parse_response(&reply.bytes)?.context("no /block answer")?;
    assert_eq!(
        (
            answer.status,
            String::from_utf8_lossy(&answer.body).as_ref()
        ),
        (200, "/block 1500ms")
    );
    assert!(
        waited >= Duration::from_millis(BLOCK_MS),
        "answered after {waited:?}"
    );
    let spent = cpu_ticks(blocked).context("blocked worker's CPU time")? - cpu_before;
    // USER_HZ is 100: a spin for the whole block would be about 150 ticks.
    assert!(
        spent < 30,
        "the blocked worker used {spent} ticks of CPU in {waited:?}"
    );
    Ok(())
}
