//! Hostile and broken clients against the demo: slow heads (slowloris), idle keep-alive,
//! oversize heads, bodies over the limit, conflicting framing, chunked bodies, clients that
//! reset, half-close or vanish, and a client that pipelines without ever reading. Each
//! violation gets its status and a close; no client can kill, wedge or bloat a worker.
//!
//! Timeouts in these tests are the server's (`--header-timeout 1`, …): a test that waits
//! for one waits for the server to act (a close, an answer, a log line) within a bound a
//! few times larger, never a fixed sleep.

use std::io::{Read as _, Write as _};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use coreloop_integration_tests::{
    Close, RawReply, Response, Server, ServerConfig, connect, get, parse_response, parse_responses,
    parse_whoami, read_response, read_until_close, send_raw, status_kib,
};

/// The only worker's PID (the tests that care run one worker).
fn only_worker(server: &Server) -> Result<u32> {
    let pids = server.worker_pids();
    ensure!(pids.len() == 1, "expected one worker, got {pids:?}");
    Ok(pids[&0])
}

/// `GET /whoami` on a new connection: the answering worker's PID.
fn whoami(port: u16) -> Result<u32> {
    let (status, body) = get(port, "/whoami")?;
    ensure!(status == 200, "/whoami answered {status} {body:?}");
    parse_whoami(&body)
        .map(|(_, pid)| pid)
        .with_context(|| format!("bad /whoami body {body:?}"))
}

/// The single response in `reply`, which must have ended with an orderly close (FIN).
fn sole_response(reply: &RawReply) -> Result<Response> {
    let mut responses = parse_responses(&reply.bytes)
        .with_context(|| format!("unparsable reply {:?}", reply.text()))?;
    ensure!(
        responses.len() == 1,
        "expected one response, got {}: {:?}",
        responses.len(),
        reply.text()
    );
    responses.pop().context("no response")
}

/// `request` on a new connection must get exactly `status` with `Connection: close`,
/// followed by an orderly close.
fn expect_refusal(port: u16, request: &[u8], status: u16) -> Result<()> {
    let reply = send_raw(port, request)?;
    let what = String::from_utf8_lossy(&request[..request.len().min(120)]).into_owned();
    let response = sole_response(&reply).with_context(|| format!("request {what:?}"))?;
    ensure!(
        response.status == status,
        "request {what:?}: expected {status}, got {} {:?}",
        response.status,
        response.text()
    );
    ensure!(
        response.closes(),
        "request {what:?}: the {status} must announce a close"
    );
    ensure!(
        reply.close == Close::Eof,
        "request {what:?}: the {status} must end with an orderly close, not {:?}",
        reply.close
    );
    Ok(())
}

fn no_worker_restarted(server: &Server, mark: usize) -> Result<()> {
    for event in server.events_since(mark) {
        ensure!(
            !event.is("worker_exited") && !event.is("worker_spawned"),
            "unexpected event: {event}"
        );
    }
    for line in server.logs_since(mark) {
        ensure!(
            !line.contains(" WARN ") && !line.contains(" ERROR "),
            "unexpected log line: {line}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Timeouts
// ---------------------------------------------------------------------------------------

#[test]
fn slowloris_gets_408_within_the_header_timeout() -> Result<()> {
    let server = Server::start(ServerConfig::new(1).args(["--header-timeout", "1"]))?;
    let port = server.port();
    let mut stream = connect(port)?;
    stream.set_nodelay(true)?;
    let started = Instant::now();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")?;
    // One byte every 100 ms, for ever: an inactivity timeout alone would never fire.
    let mut trickle = stream.try_clone()?;
    let trickler = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(15);
        for byte in b"X-Slow: ".iter().chain([b'a'; 200].iter()).cycle() {
            if Instant::now() > deadline || trickle.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    // Meanwhile the worker serves others.
    let (status, _) = get(port, "/")?;
    assert_eq!(
        status, 200,
        "another client must be served during the trickle"
    );

    let reply = read_until_close(&mut stream)?;
    let elapsed = started.elapsed();
    let response = sole_response(&reply)?;
    assert_eq!(response.status, 408, "{:?}", reply.text());
    assert!(response.closes(), "the 408 must announce a close");
    assert_eq!(
        reply.close,
        Close::Eof,
        "the 408 ends with an orderly close"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "408 after {elapsed:?}, expected about 1 s (the header timeout)"
    );
    drop(stream);
    let _ = trickler.join();
    Ok(())
}

#[test]
fn a_silent_connection_is_closed_quietly_after_the_header_timeout() -> Result<()> {
    let server = Server::start(ServerConfig::new(1).args(["--header-timeout", "1"]))?;
    let mut stream = connect(server.port())?;
    let started = Instant::now();
    let reply = read_until_close(&mut stream)?;
    let elapsed = started.elapsed();
    assert!(
        reply.bytes.is_empty(),
        "nothing was asked, nothing is answered: {:?}",
        reply.text()
    );
    assert_eq!(reply.close, Close::Eof);
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "closed after {elapsed:?}, expected about 1 s"
    );
    Ok(())
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() -> Result<()> {
    let server = Server::start(ServerConfig::new(1).args([
        "--idle-timeout",
        "1",
        "--header-timeout",
        "30",
    ]))?;
    let mut stream = connect(server.port())?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let response = read_response(&mut stream)?;
    assert_eq!(response.status, 200);
    assert!(!response.closes(), "a keep-alive answer");
    let idle_since = Instant::now();
    let reply = read_until_close(&mut stream)?;
    let idle = idle_since.elapsed();
    assert!(
        reply.bytes.is_empty(),
        "no answer to silence: {:?}",
        reply.text()
    );
    assert_eq!(reply.close, Close::Eof);
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(4),
        "closed after {idle:?} idle, expected about 1 s (the idle timeout)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Oversize heads and bodies
// ---------------------------------------------------------------------------------------

#[test]
fn too_many_headers_get_431() -> Result<()> {
    let server = Server::start(ServerConfig::new(1).args(["--max-headers", "8"]))?;
    let port = server.port();
    let headers = |n: usize| -> String { (0..n).map(|i| format!("X-H{i}: v\r\n")).collect() };
    let request = |n: usize| format!("GET / HTTP/1.1\r\nHost: x\r\n{}\r\n", headers(n));
    expect_refusal(port, request(20).as_bytes(), 431)?;
    // Within the limit (Host and 7 more): served.
    let mut stream = connect(port)?;
    stream.write_all(request(7).as_bytes())?;
    assert_eq!(read_response(&mut stream)?.status, 200);
    Ok(())
}

#[test]
fn an_oversized_request_line_gets_414() -> Result<()> {
    let server = Server::start(ServerConfig::new(1).args(["--max-request-line", "1024"]))?;
    let port = server.port();
    // Well within --max-header-bytes (8192): only the request-line limit can refuse it.
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(2000));
    expect_refusal(port, long.as_bytes(), 414)?;
    // A line that is not even complete yet is refused as soon as it is too long.
    expect_refusal(port, format!("GET /{}", "b".repeat(3000)).as_bytes(), 414)?;
    // Under the limit: an ordinary 404.
    let short = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(900));
    let mut stream = connect(port)?;
    stream.write_all(short.as_bytes())?;
    assert_eq!(read_response(&mut stream)?.status, 404);
    Ok(())
}

#[test]
fn a_body_over_the_limit_gets_413() -> Result<()> {
    let server = Server::start(ServerConfig::new(1).args(["--max-body-bytes", "1000"]))?;
    let port = server.port();
    // Declared too large, and sent anyway: refused (the lingering close absorbs the body).
    let mut request = b"POST /discard HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".to_vec();
    request.extend_from_slice(&[b'x'; 5000]);
    expect_refusal(port, &request, 413)?;
    // Chunked: refused once the chunk sizes add up past the limit.
    let chunk = format!("1f4\r\n{}\r\n", "y".repeat(500));
    let chunked = format!(
        "POST /discard HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}{chunk}0\r\n\r\n"
    );
    expect_refusal(port, chunked.as_bytes(), 413)?;
    // With `Expect: 100-continue` the refusal comes instead of the 100, before any body.
    let expect = b"POST /discard HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n";
    expect_refusal(port, expect, 413)?;
    // At the limit: read and discarded.
    let mut stream = connect(port)?;
    stream.write_all(b"POST /discard HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")?;
    stream.write_all(&[b'z'; 1000])?;
    let response = read_response(&mut stream)?;
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, "discarded 1000 bytes")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------

#[test]
fn conflicting_or_invalid_framing_gets_400() -> Result<()> {
    let server = Server::start(ServerConfig::new(1))?;
    let port = server.port();
    let post = "POST /discard HTTP/1.1\r\nHost: x\r\n";
    let cases: &[(&str, String)] = &[
        (
            "Content-Length and Transfer-Encoding",
            format!("{post}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "two different Content-Lengths",
            format!("{post}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ),
        (
            "a Content-Length list",
            format!("{post}Content-Length: 1, 2\r\n\r\nab"),
        ),
        (
            "a signed Content-Length",
            format!("{post}Content-Length: +5\r\n\r\nhello"),
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            "POST /discard HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_owned(),
        ),
        (
            "chunked not the final coding",
            format!("{post}Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"),
        ),
        (
            "chunked twice",
            format!(
                "{post}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
        ),
        (
            "an invalid chunk size",
            format!("{post}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "an empty chunk-size line",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "a chunk size of 17 hex digits",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n00000000000000001\r\na\r\n0\r\n\r\n"),
        ),
        (
            "chunk data not followed by CRLF",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n"),
        ),
        (
            "a malformed trailer",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n0\r\nno colon here\r\n\r\n"),
        ),
        ("garbage", "GARBAGE\r\n\r\n".to_owned()),
    ];
    for (what, request) in cases {
        expect_refusal(port, request.as_bytes(), 400).with_context(|| what.to_string())?;
    }
    // An unknown transfer coding is not implemented; an unknown expectation fails.
    expect_refusal(
        port,
        format!("{post}Transfer-Encoding: frobnicate, chunked\r\n\r\n0\r\n\r\n").as_bytes(),
        501,
    )?;
    expect_refusal(
        port,
        format!("{post}Expect: something-else\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        417,
    )?;
    // The worker is unharmed.
    let (status, _) = get(port, "/")?;
    assert_eq!(status, 200);
    Ok(())
}

#[test]
fn a_chunked_body_is_read_and_the_next_pipelined_request_answered() -> Result<()> {
    let server = Server::start(ServerConfig::new(1))?;
    let port = server.port();
    let request = concat!(
        "POST /discard HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        "5;name=value;flag\r\nhello\r\n",
        "6 ; spaced=\"quoted\"\r\n world\r\n",
        // Data that looks like a request must stay data.
        "18\r\nGET /nope HTTP/1.1\r\n\r\n\r\n\r\n",
        "0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n",
        "GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    // All in one write, then the same again one byte per write (every parsing state sees
    // its input cut at every possible point).
    for bytewise in [false, true] {
        let mut stream = connect(port)?;
        stream.set_nodelay(true)?;
        if bytewise {
            for byte in request.as_bytes() {
                stream.write_all(&[*byte])?;
            }
        } else {
            stream.write_all(request.as_bytes())?;
        }
        let reply = read_until_close(&mut stream)?;
        let responses = parse_responses(&reply.bytes)?;
        let summary: Vec<(u16, String)> = responses.iter().map(|r| (r.status, r.text())).collect();
        assert_eq!(summary.len(), 2, "bytewise={bytewise}: {summary:?}");
        assert_eq!(
            summary[0],
            (200, "discarded 35 bytes".to_owned()),
            "bytewise={bytewise}"
        );
        assert_eq!(summary[1].0, 200, "bytewise={bytewise}: {summary:?}");
        assert!(parse_whoami(&summary[1].1).is_some(), "{summary:?}");
        assert!(!responses[0].closes() && responses[1].closes());
        assert_eq!(reply.close, Close::Eof);
    }
    Ok(())
}

#[test]
fn a_content_length_body_in_many_pieces_is_skipped() -> Result<()> {
    let server = Server::start(ServerConfig::new(1))?;
    let port = server.port();
    // 600 KiB of request-shaped bytes: read as a request, they would draw answers.
    let bait = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let body: Vec<u8> = bait.iter().copied().cycle().take(600 * 1024).collect();
    let mut stream = connect(port)?;
    stream.set_nodelay(true)?;
    stream.write_all(
        format!(
            "POST /discard HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )?;
    for piece in body.chunks(1000) {
        stream.write_all(piece)?;
    }
    stream.write_all(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let reply = read_until_close(&mut stream)?;
    let responses = parse_responses(&reply.bytes)?;
    let statuses: Vec<(u16, String)> = responses.iter().map(|r| (r.status, r.text())).collect();
    assert_eq!(statuses.len(), 2, "{statuses:?}");
    assert_eq!(
        statuses[0],
        (200, format!("discarded {} bytes", body.len()))
    );
    assert!(parse_whoami(&statuses[1].1).is_some(), "{statuses:?}");
    Ok(())
}

#[test]
fn expect_100_continue_gets_an_interim_answer_before_the_body() -> Result<()> {
    let server = Server::start(ServerConfig::new(1))?;
    let mut stream = connect(server.port())?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(
        b"POST /discard HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )?;
    // The client waits for the interim answer before it sends the body.
    let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
    let mut got = vec![0u8; interim.len()];
    stream
        .read_exact(&mut got)
        .context("no 100 Continue for a request that expects it")?;
    assert_eq!(got, interim, "{:?}", String::from_utf8_lossy(&got));
    stream.write_all(b"hello")?;
    let response = read_response(&mut stream)?;
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, "discarded 5 bytes")
    );
    Ok(())
}

#[test]
fn a_pipelined_burst_is_answered_in_order_in_bounded_batches() -> Result<()> {
    let server = Server::start(ServerConfig::new(1).args(["--max-pipeline", "4"]))?;
    let mut stream = connect(server.port())?;
    let mut burst = String::new();
    for i in 0..999 {
        burst.push_str(&format!(
            "GET /sleep?ms=0&i={i} HTTP/1.1\r\nHost: x\r\n\r\n"
        ));
    }
    burst.push_str("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(burst.as_bytes())?;
    let reply = read_until_close(&mut stream)?;
    let responses = parse_responses(&reply.bytes)?;
    assert_eq!(responses.len(), 1000);
    assert!(
        responses[..999]
            .iter()
            .all(|r| r.status == 200 && r.text() == "/sleep 0ms")
    );
    assert_eq!(responses[999].text(), "Hello, world!");
    assert!(responses[999].closes());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Clients that reset, half-close, vanish or never read
// ---------------------------------------------------------------------------------------

#[test]
fn a_client_that_resets_mid_response_leaves_the_worker_serving() -> Result<()> {
    let server = Server::start(ServerConfig::new(1))?;
    let port = server.port();
    let pid = only_worker(&server)?;
    let mark = server.log_mark();
    for _ in 0..5 {
        let mut stream = connect(port)?;
        let burst = b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n".repeat(5000);
        stream.write_all(&burst)?;
        // Answers are flowing; close with them unread: the kernel resets the connection.
        let mut first = [0u8; 1];
        stream.read_exact(&mut first)?;
        drop(stream);
    }
    // The resets reached the handler as errors, logged as routine (debug), and the same
    // worker goes on serving.
    server
        .wait_events(
            mark,
            "connection_error",
            5,
            |event| event.level() == "DEBUG",
            Duration::from_secs(10),
        )
        .context("each reset must end its connection with a debug-level error")?;
    assert_eq!(
        whoami(port)?,
        pid,
        "the same worker must answer after the resets"
    );
    no_worker_restarted(&server, mark)
}

#[test]
fn a_half_closed_client_gets_every_answer_then_a_close() -> Result<()> {
    let server = Server::start(ServerConfig::new(1))?;
    let port = server.port();
    let pid = only_worker(&server)?;
    let mark = server.log_mark();
    let mut stream = connect(port)?;
    stream.write_all(&b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n".repeat(3))?;
    stream.shutdown(Shutdown::Write)?;
    let reply = read_until_close(&mut stream)?;
    let responses = parse_responses(&reply.bytes)?;
    assert_eq!(responses.len(), 3, "{:?}", reply.text());
    for response in &responses {
        assert_eq!(parse_whoami(&response.text()).map(|(_, p)| p), Some(pid));
    }
    assert_eq!(reply.close, Close::Eof);
    // Half a request, then the client's FIN: dropped without harm.
    let mut stream = connect(port)?;
    stream.write_all(b"GET / HTTP/1.1\r\nHo")?;
    stream.shutdown(Shutdown::Write)?;
    let reply = read_until_close(&mut stream)?;
    assert!(reply.bytes.is_empty(), "{:?}", reply.text());
    assert_eq!(whoami(port)?, pid);
    no_worker_restarted(&server, mark)
}

#[test]
fn a_client_that_never_reads_is_held_to_bounded_memory_then_cut() -> Result<()> {
    const CAP: usize = 256 * 1024 * 1024;
    let server = Server::start(ServerConfig::new(1).args(["--send-timeout", "5"]))?;
    let port = server.port();
    let pid = whoami(port)?;
    let mark = server.log_mark();
    let peak_before = status_kib(pid, "VmHWM").context("VmHWM")?;

    // Pipeline requests without ever reading an answer, until the writes stall (the
    // server stopped reading because its answers cannot be written), or CAP bytes.
    let mut stream = connect(port)?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let block = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2400);
    let mut sent = 0usize;
    while sent < CAP {
        match stream.write(&block) {
            Ok(n) => sent += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let peak_after = status_kib(pid, "VmHWM").context("VmHWM")?;
    eprintln!(
        "sent {} MiB before the writes stalled; worker peak RSS {} -> {} KiB",
        sent >> 20,
        peak_before,
        peak_after
    );
    assert!(
        sent < CAP,
        "the server kept reading {CAP} bytes of requests whose answers nobody reads"
    );
    assert!(
        peak_after.saturating_sub(peak_before) < 32 * 1024,
        "the worker's peak RSS grew from {peak_before} to {peak_after} KiB"
    );
    // The stalled connection does not block the worker.
    assert_eq!(
        whoami(port)?,
        pid,
        "another client must be served meanwhile"
    );
    // The send timeout cuts the connection (the client may have vanished).
    server
        .wait_for_log_since(
            mark,
            |line| line.contains("no progress within its timeout") && line.contains("writing"),
            Duration::from_secs(15),
        )
        .context("the send timeout must close a connection whose client does not read")?;
    drop(stream);
    assert_eq!(whoami(port)?, pid);
    no_worker_restarted(&server, mark)
}

#[test]
fn a_client_that_vanishes_mid_request_is_cut_by_the_header_timeout() -> Result<()> {
    let server = Server::start(ServerConfig::new(1).args(["--header-timeout", "1"]))?;
    let port = server.port();
    let pid = only_worker(&server)?;
    let mark = server.log_mark();
    // Half a head, then nothing: no FIN, no reset, no more bytes.
    let mut stream = connect(port)?;
    stream.write_all(b"POST /discard HTTP/1.1\r\nContent-")?;
    // Half a body, then nothing.
    let mut body = connect(port)?;
    body.write_all(b"POST /discard HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")?;
    assert_eq!(whoami(port)?, pid, "the worker serves others meanwhile");
    let reply = read_until_close(&mut stream)?;
    let response = parse_response(&reply.bytes)?.context("no answer")?.0;
    assert_eq!(response.status, 408);
    // The body's own silence limit (--body-timeout, 10 s by default) has not passed yet.
    body.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut byte = [0u8; 1];
    let err = body
        .read(&mut byte)
        .expect_err("a body within its timeout is still awaited");
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    no_worker_restarted(&server, mark)?;
    if reply.close != Close::Eof {
        bail!(
            "expected an orderly close after the 408, got {:?}",
            reply.close
        );
    }
    Ok(())
}
