//! `examples/hyper_auto.rs`: hyper-util's `auto` server answers HTTP/1.1 and HTTP/2
//! (prior knowledge) on one port, and SIGTERM lets requests in flight on both protocols
//! finish before the server exits 0.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use coreloop_integration_tests::{
    IO_TIMEOUT, Server, ServerConfig, example_binary, expect_exit_0_after_sigterm,
    expect_one_ok_response, get, get_in_flight, sigterm_and_wait_for_drain,
};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};

const SLEEP_MS: u64 = 1500;

fn start(workers: u16) -> Result<Server> {
    Server::start(
        ServerConfig::new(workers)
            .binary(example_binary("hyper_auto")?)
            .args(["--shutdown-timeout", "10"]),
    )
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `HTTP/2.0 worker=1 pid=123 …` → (`"HTTP/2.0"`, 1, 123).
fn parse_identity(body: &str) -> Option<(&str, usize, u32)> {
    let mut parts = body.split_whitespace();
    let version = parts.next()?;
    let id = parts.next()?.strip_prefix("worker=")?.parse().ok()?;
    let pid = parts.next()?.strip_prefix("pid=")?.parse().ok()?;
    Some((version, id, pid))
}

/// Checks that `body` names `version` and one of the `ready` workers; returns its PID.
fn check_identity(body: &str, version: &str, ready: &BTreeMap<usize, u32>) -> Result<u32> {
    let (got, id, pid) =
        parse_identity(body).with_context(|| format!("unexpected body {body:?}"))?;
    ensure!(got == version, "expected {version}, the body says {body:?}");
    ensure!(
        ready.get(&id) == Some(&pid),
        "worker {id} pid {pid} is not a ready worker {ready:?}"
    );
    Ok(pid)
}

/// An HTTP/2 connection with prior knowledge: the request sender and the connection's task.
async fn h2_connect(
    port: u16,
) -> Result<(
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    Ok((sender, tokio::spawn(connection)))
}

/// `GET path` on an HTTP/2 connection: the version, status and body of the response.
async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    port: u16,
    path: &str,
) -> Result<(Version, StatusCode, String)> {
    let request = Request::get(format!("http://127.0.0.1:{port}{path}")).body(Empty::new())?;
    let response = sender.send_request(request).await?;
    let (version, status) = (response.version(), response.status());
    let body = response.into_body().collect().await?.to_bytes();
    Ok((version, status, String::from_utf8_lossy(&body).into_owned()))
}

#[test]
fn http1_and_http2_prior_knowledge_on_one_port() -> Result<()> {
    let server = start(2)?;
    let ready = server.worker_pids();
    assert_eq!(ready.len(), 2, "{ready:?}");
    let port = server.port();

    let (status, body) = get(port, "/")?;
    assert_eq!(status, 200, "{body}");
    check_identity(&body, "HTTP/1.1", &ready)?;
    let (status, body) = get(port, "/nope")?;
    assert_eq!(status, 404, "{body}");

    // Three streams at once on one HTTP/2 connection: the worker's executor runs them as
    // local tasks, and all three are answered by the worker that owns the connection.
    let (answers, closed) = runtime()?.block_on(async {
        tokio::time::timeout(IO_TIMEOUT, async {
            let (sender, connection) = h2_connect(port).await?;
            let streams: Vec<_> = (0..3)
                .map(|_| {
                    let mut sender = sender.clone();
                    tokio::spawn(async move { h2_get(&mut sender, port, "/").await })
                })
                .collect();
            let mut answers = Vec::new();
            for stream in streams {
                answers.push(stream.await??);
            }
            // Dropping the last sender closes the connection from the client side.
            drop(sender);
            let closed = connection.await?;
            anyhow::Ok((answers, closed))
        })
        .await
        .context("HTTP/2 exchange timed out")?
    })?;
    closed.context("the HTTP/2 connection ended with an error")?;
    let mut pids = Vec::new();
    for (version, status, body) in &answers {
        assert_eq!(*version, Version::HTTP_2, "{body}");
        assert_eq!(*status, StatusCode::OK, "{body}");
        pids.push(check_identity(body, "HTTP/2.0", &ready)?);
    }
    pids.dedup();
    assert_eq!(pids.len(), 1, "one connection, one worker: {answers:?}");
    Ok(())
}

#[test]
fn sigterm_lets_http1_and_http2_requests_in_flight_finish() -> Result<()> {
    let mut server = start(2)?;
    let ready = server.worker_pids();
    let port = server.port();
    let path = format!("/sleep?ms={SLEEP_MS}");

    // HTTP/1.1, keep-alive: the server must answer, then close the connection itself.
    let h1 = get_in_flight(port, &path);
    // HTTP/2: the stream must be answered, then the connection must end cleanly (GOAWAY).
    let h2 = std::thread::spawn(move || -> Result<_> {
        runtime()?.block_on(async {
            tokio::time::timeout(IO_TIMEOUT + Duration::from_secs(10), async {
                let (mut sender, connection) = h2_connect(port).await?;
                let sent = Instant::now();
                let answer = h2_get(&mut sender, port, &path).await?;
                let elapsed = sent.elapsed();
                let closed = connection.await?;
                anyhow::Ok((answer, elapsed, closed))
            })
            .await
            .context("HTTP/2 exchange timed out")?
        })
    });

    // Both handlers have started sleeping: both requests are in flight.
    server
        .wait_for_logs_since(
            0,
            2,
            |line| line.contains(" sleeping ms="),
            Duration::from_secs(10),
        )
        .ok_or_else(|| anyhow!("the two slow requests did not both start"))?;
    let (live, draining) = sigterm_and_wait_for_drain(&server, ready.len())?;
    assert_eq!(live, 2, "both slow requests are in flight: {draining:?}");

    let (body, elapsed) = expect_one_ok_response(h1, "HTTP/1 client")?;
    check_identity(&body, "HTTP/1.1", &ready)?;
    assert!(body.contains(&format!("slept={SLEEP_MS}ms")), "{body}");
    assert!(elapsed >= Duration::from_millis(SLEEP_MS), "{elapsed:?}");

    let ((version, status, body), elapsed, closed) = h2
        .join()
        .map_err(|_| anyhow!("the HTTP/2 client panicked"))??;
    assert_eq!(
        (version, status),
        (Version::HTTP_2, StatusCode::OK),
        "{body}"
    );
    check_identity(&body, "HTTP/2.0", &ready)?;
    assert!(body.contains(&format!("slept={SLEEP_MS}ms")), "{body}");
    assert!(elapsed >= Duration::from_millis(SLEEP_MS), "{elapsed:?}");
    if let Err(err) = closed {
        bail!("the HTTP/2 connection did not end cleanly: {err:?}");
    }

    expect_exit_0_after_sigterm(&mut server)
}
