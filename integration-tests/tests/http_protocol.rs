//! The demo's HTTP/1.1 handling at the edges: malformed requests, oversize heads and
//! pipelining.

use std::io::Write as _;

use coreloop_integration_tests::{
    Server, ServerConfig, connect, get, parse_response, parse_responses, parse_whoami,
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
