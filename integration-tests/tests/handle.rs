//! The library API: `Server::handle()` returns a `ServerHandle` that reloads, scales and
//! stops the server from another thread of the supervisor process. Driven through
//! fixture-handle, which reads `reload`, `add`, `remove`, `stop` and `kill` from stdin.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use coreloop_integration_tests::{
    Server, ServerConfig, assert_min_ready_workers, connect, get, live_children, log_field,
    parse_responses, read_until_close, wait_for_exit, zombie_children,
};

fn start() -> anyhow::Result<Server> {
    Server::start(
        ServerConfig::new(2)
            .binary(env!("CARGO_BIN_EXE_fixture-handle"))
            .piped_stdin(),
    )
}

/// Sends `command` and waits for the fixture to log that the handle accepted it (not for
/// `stop`/`kill`: the process may exit before that line is written).
fn command(server: &Server, command: &str) -> anyhow::Result<usize> {
    let mark = server.log_mark();
    server.send_line(command)?;
    let quoted = format!("{command:?}");
    let line = server.expect_log_since(
        mark,
        &format!("`handle command command={quoted}`"),
        |line| {
            line.contains(" handle command ") && log_field(line, "command") == Some(quoted.as_str())
        },
        Duration::from_secs(10),
    )?;
    assert_eq!(log_field(&line, "sent"), Some("true"), "{line}");
    Ok(mark)
}

/// Opens a connection whose `/sleep?ms={sleep_ms}` request a worker holds (a later
/// request was answered), then sends `command` (`stop` or `kill`), waits for the
/// supervisor's `command from the server handle` line for `Stop { graceful }` and for the
/// server to exit 0 (up to 15 s). Returns the slow connection, the log mark taken before
/// the command, and when the command was sent.
fn stop_with_request_in_flight(
    server: &mut Server,
    sleep_ms: u64,
    command: &str,
    graceful: bool,
) -> anyhow::Result<(TcpStream, usize, Instant)> {
    let port = server.port();
    let mut slow = connect(port)?;
    write!(slow, "GET /sleep?ms={sleep_ms} HTTP/1.1\r\nHost: x\r\n\r\n")?;
    // Once a later connection is answered, the slow one is with a worker.
    let (status, _) = get(port, "/whoami")?;
    assert_eq!(status, 200);

    let mark = server.log_mark();
    let sent = Instant::now();
    server.send_line(command)?;
    let stop = format!("Stop {{ graceful: {graceful} }}");
    server.expect_event(
        mark,
        "command",
        |event| event.field("command") == Some(stop.as_str()),
        Duration::from_secs(10),
    )?;
    let status = server
        .wait_exit(Duration::from_secs(15))
        .context("the server did not stop")?;
    assert!(status.success(), "exit status {status}");
    Ok((slow, mark, sent))
}

#[test]
fn handle_reload_replaces_every_worker() -> anyhow::Result<()> {
    let server = start()?;
    let before: BTreeSet<u32> = server.worker_pids().into_values().collect();
    let mark = command(&server, "reload")?;
    server.expect_reload_complete(mark, 2, Duration::from_secs(30))?;
    let after: BTreeSet<u32> = server.worker_pids().into_values().collect();
    assert_eq!(after.len(), 2);
    assert!(after.is_disjoint(&before), "{before:?} -> {after:?}");
    for pid in &before {
        assert!(
            wait_for_exit(*pid, Duration::from_secs(10)),
            "{pid} still running"
        );
    }
    let mut answered = BTreeSet::new();
    for _ in 0..10 {
        let (status, body) = get(server.port(), "/whoami")?;
        assert_eq!(status, 200);
        let (_, pid) = coreloop_integration_tests::parse_whoami(&body).context("bad body")?;
        answered.insert(pid);
        if answered.len() == 2 {
            break;
        }
    }
    assert_eq!(answered, after, "pids answering after the reload");
    assert_min_ready_workers(&server.logs(), 2)?;
    Ok(())
}

#[test]
fn handle_adds_and_removes_workers() -> anyhow::Result<()> {
    let server = start()?;
    let supervisor = server.pid();
    let before: BTreeSet<u32> = server.worker_pids().into_values().collect();

    let mark = command(&server, "add")?;
    let added = server.expect_scaled_up(mark, 3)?;
    let children: BTreeSet<u32> = live_children(supervisor).into_iter().collect();
    let mut expected = before.clone();
    expected.insert(added);
    assert_eq!(children, expected, "children after add");

    let mark = command(&server, "remove")?;
    server.expect_scaled_down(mark, 2)?;
    assert!(
        wait_for_exit(added, Duration::from_secs(10)),
        "{added} still running"
    );
    let exited =
        server.expect_worker_event(mark, "worker_exited", added, Duration::from_secs(10))?;
    assert!(exited.ends_a_drain(), "{exited}");
    assert_eq!(exited.field("status"), Some("exit code 0"), "{exited}");
    let children: BTreeSet<u32> = live_children(supervisor).into_iter().collect();
    assert_eq!(children, before, "children after remove");
    assert_eq!(zombie_children(supervisor), Vec::<u32>::new(), "zombies");

    // Down to one worker, and never below.
    let workers = server.worker_pids();
    let mark = command(&server, "remove")?;
    let exited =
        server.expect_worker_event(mark, "worker_exited", workers[&1], Duration::from_secs(10))?;
    assert!(exited.ends_a_drain(), "{exited}");
    let mark = command(&server, "remove")?;
    server.expect_event(
        mark,
        "scale_down_refused",
        |_| true,
        Duration::from_secs(10),
    )?;
    assert_eq!(live_children(supervisor), vec![workers[&0]]);
    let (status, _) = get(server.port(), "/whoami")?;
    assert_eq!(status, 200);
    Ok(())
}

#[test]
fn handle_stop_drains_and_exits_0() -> anyhow::Result<()> {
    let mut server = start()?;
    let (mut slow, mark, _) = stop_with_request_in_flight(&mut server, 1000, "stop", true)?;
    // The in-flight request was finished, not cut.
    let reply = read_until_close(&mut slow)?;
    let responses = parse_responses(&reply.bytes)?;
    assert_eq!(responses.len(), 1, "{:?}", reply.text());
    assert_eq!(responses[0].status, 200);
    server.expect_event(mark, "stopped", |_| true, Duration::from_secs(5))?;
    server.assert_no_worker_left();
    Ok(())
}

#[test]
fn handle_kill_stops_at_once() -> anyhow::Result<()> {
    let mut server = start()?;
    let (mut slow, _, sent) = stop_with_request_in_flight(&mut server, 20000, "kill", false)?;
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "stop(false) took {:?} with a 20 s request in flight (shutdown timeout 30 s)",
        sent.elapsed()
    );
    let reply = read_until_close(&mut slow)?;
    assert!(reply.bytes.is_empty(), "the request got {:?}", reply.text());
    server.assert_no_worker_left();
    Ok(())
}
