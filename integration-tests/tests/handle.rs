//! The library API: `Server::handle()` returns a `ServerHandle` that reloads, scales and
//! stops the server from another thread of the supervisor process. Driven through
//! fixture-handle, which reads `reload`, `add`, `remove`, `stop` and `kill` from stdin.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use coreloop_integration_tests::{
    Server, ServerConfig, connect, fewest_ready_workers, get, is_alive, live_children, log_field,
    parse_responses, parse_worker_ready, read_until_close, reaped, wait_for_exit, zombie_children,
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

fn assert_no_worker_left(server: &Server) {
    for pid in server.all_worker_pids() {
        assert!(!is_alive(pid), "worker {pid} still running");
        assert!(reaped(pid, server.pid()), "worker {pid} was not reaped");
    }
}

#[test]
fn handle_reload_replaces_every_worker() -> anyhow::Result<()> {
    let server = start()?;
    let before: BTreeSet<u32> = server.worker_pids().into_values().collect();
    let mark = command(&server, "reload")?;
    let done = server.expect_log_since(
        mark,
        "`reload complete`",
        |line| line.contains(" reload complete "),
        Duration::from_secs(30),
    )?;
    assert_eq!(log_field(&done, "replaced"), Some("2"), "{done}");
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
    let (fewest, at) = fewest_ready_workers(&server.logs()).context("no `serving` line")?;
    assert!(
        fewest >= 2,
        "only {fewest} ready worker(s) at log line {at:?}"
    );
    Ok(())
}

#[test]
fn handle_adds_and_removes_workers() -> anyhow::Result<()> {
    let server = start()?;
    let supervisor = server.pid();
    let before: BTreeSet<u32> = server.worker_pids().into_values().collect();

    let mark = command(&server, "add")?;
    server.expect_log_since(
        mark,
        "`scaled up workers=3`",
        |line| line.contains(" scaled up ") && log_field(line, "workers") == Some("3"),
        Duration::from_secs(10),
    )?;
    let ready = server.expect_log_since(
        mark,
        "`worker ready` for worker 2",
        |line| parse_worker_ready(line).is_some_and(|(id, _)| id == 2),
        Duration::from_secs(15),
    )?;
    let added = parse_worker_ready(&ready).context("bad ready line")?.1;
    let children: BTreeSet<u32> = live_children(supervisor).into_iter().collect();
    let mut expected = before.clone();
    expected.insert(added);
    assert_eq!(children, expected, "children after add");

    let mark = command(&server, "remove")?;
    server.expect_log_since(
        mark,
        "`scaled down workers=2`",
        |line| line.contains(" scaled down ") && log_field(line, "workers") == Some("2"),
        Duration::from_secs(10),
    )?;
    assert!(
        wait_for_exit(added, Duration::from_secs(10)),
        "{added} still running"
    );
    let added_text = added.to_string();
    let exited = server.expect_log_since(
        mark,
        "`worker exited after draining` for the removed worker",
        |line| {
            line.contains(" worker exited after draining ")
                && log_field(line, "worker.pid") == Some(added_text.as_str())
        },
        Duration::from_secs(10),
    )?;
    assert!(exited.contains("status=exit code 0"), "{exited}");
    let children: BTreeSet<u32> = live_children(supervisor).into_iter().collect();
    assert_eq!(children, before, "children after remove");
    assert_eq!(zombie_children(supervisor), Vec::<u32>::new(), "zombies");

    // Down to one worker, and never below.
    let workers = server.worker_pids();
    let mark = command(&server, "remove")?;
    let removed = workers[&1].to_string();
    server.expect_log_since(
        mark,
        "`worker exited after draining` for worker 1",
        |line| {
            line.contains(" worker exited after draining ")
                && log_field(line, "worker.pid") == Some(removed.as_str())
        },
        Duration::from_secs(10),
    )?;
    let mark = command(&server, "remove")?;
    server.expect_log_since(
        mark,
        "`cannot remove the last worker`",
        |line| line.contains("cannot remove the last worker"),
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
    let port = server.port();
    let mut slow = connect(port)?;
    slow.write_all(b"GET /sleep?ms=1000 HTTP/1.1\r\nHost: x\r\n\r\n")?;
    // Once a later connection is answered, the slow one is with a worker.
    let (status, _) = get(port, "/whoami")?;
    assert_eq!(status, 200);

    let mark = server.log_mark();
    server.send_line("stop")?;
    server.expect_log_since(
        mark,
        "the supervisor's `command from the server handle` for stop(true)",
        |line| {
            line.contains(" command from the server handle ")
                && line.contains("Stop { graceful: true }")
        },
        Duration::from_secs(10),
    )?;
    let status = server
        .wait_exit(Duration::from_secs(15))
        .context("the server did not stop")?;
    assert!(status.success(), "exit status {status}");
    // The in-flight request was finished, not cut.
    let reply = read_until_close(&mut slow)?;
    let responses = parse_responses(&reply.bytes)?;
    assert_eq!(responses.len(), 1, "{:?}", reply.text());
    assert_eq!(responses[0].status, 200);
    server.expect_log_since(
        mark,
        "`stopped`",
        |line| line.ends_with(" stopped"),
        Duration::from_secs(5),
    )?;
    assert_no_worker_left(&server);
    Ok(())
}

#[test]
fn handle_kill_stops_at_once() -> anyhow::Result<()> {
    let mut server = start()?;
    let port = server.port();
    let mut slow = connect(port)?;
    slow.write_all(b"GET /sleep?ms=20000 HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let (status, _) = get(port, "/whoami")?;
    assert_eq!(status, 200);

    let mark = server.log_mark();
    let sent = Instant::now();
    server.send_line("kill")?;
    server.expect_log_since(
        mark,
        "the supervisor's `command from the server handle` for stop(false)",
        |line| {
            line.contains(" command from the server handle ")
                && line.contains("Stop { graceful: false }")
        },
        Duration::from_secs(10),
    )?;
    let status = server
        .wait_exit(Duration::from_secs(15))
        .context("the server did not stop")?;
    assert!(status.success(), "exit status {status}");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "stop(false) took {:?} with a 20 s request in flight (shutdown timeout 30 s)",
        sent.elapsed()
    );
    let reply = read_until_close(&mut slow)?;
    assert!(reply.bytes.is_empty(), "the request got {:?}", reply.text());
    assert_no_worker_left(&server);
    Ok(())
}
