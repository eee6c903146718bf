//! A panicking handler costs its connection only: the worker logs the panic and goes on
//! serving, with the same pid.

use std::time::Duration;

use anyhow::Context as _;
use coreloop_integration_tests::{
    Server, ServerConfig, get, get_request, is_alive, parse_whoami, send_raw,
};

#[test]
fn panicking_handler_leaves_the_worker_serving() -> anyhow::Result<()> {
    // One worker: every request goes to it.
    let server = Server::start(ServerConfig::new(1).binary(env!("CARGO_BIN_EXE_fixture-panic")))?;
    let port = server.port();
    let (status, body) = get(port, "/whoami")?;
    assert_eq!(status, 200);
    let (_, pid) = parse_whoami(&body).context("bad /whoami body")?;

    let mark = server.log_mark();
    let reply = send_raw(port, get_request("/panic").as_bytes())?;
    assert!(
        reply.bytes.is_empty(),
        "the panicking request got an answer: {:?}",
        reply.text()
    );
    let line = server.expect_event(mark, "handler_panicked", |_| true, Duration::from_secs(10))?;
    assert!(
        line.field("panic")
            .is_some_and(|panic| panic.contains("fixture panic on request /panic")),
        "{line}"
    );
    assert_eq!(line.worker_pid(), Some(pid), "{line}");

    for _ in 0..3 {
        let (status, body) = get(port, "/whoami")?;
        assert_eq!(status, 200);
        let (_, after) = parse_whoami(&body).context("bad /whoami body")?;
        assert_eq!(after, pid, "another process answered after the panic");
    }
    assert!(is_alive(pid));
    let log = server.logs_since(mark).join("\n");
    let events = server.events_since(mark);
    assert!(
        !events.iter().any(|event| event.is("worker_exited")),
        "the worker died:\n{log}"
    );
    assert!(
        !events.iter().any(|event| event.is("worker_spawned")),
        "a worker was started:\n{log}"
    );
    Ok(())
}
