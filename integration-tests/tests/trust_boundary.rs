//! The trust boundary, attacked from inside real worker processes (`fixture-misbehave`):
//! a worker that truncates the memory it shares with the supervisor, forges it, floods or
//! corrupts its channel, attaches descriptors it should not, closes its channel, stops
//! reading while it forges heartbeats (and, in its loop clock, an idle loop that has read
//! everything), ignores a drain, or forks children that keep its descriptors. For each:
//! the supervisor stays up, the misbehaving worker is replaced (or, where the kernel
//! refused the attack, keeps serving), the log names what happened once, and requests
//! that the other worker holds never fail.

use std::io::Write as _;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use coreloop_integration_tests::{
    Server, ServerConfig, connect, get, is_alive, is_event, kill, log_field, parse_whoami,
    read_response, wait_for_exit,
};
use rustix::process::Signal;

/// Requests each bystander has answered, at least, before it stops.
const MIN_ANSWERS: usize = 3;

/// How long any single wait of these tests may take.
const WAIT: Duration = Duration::from_secs(15);

/// The fixture with 2 workers, a 1 s shutdown timeout and a 1 s heartbeat timeout (or
/// `heartbeat` seconds).
fn start_with(heartbeat: &str, extra: &[&str]) -> anyhow::Result<Server> {
    Server::start(
        ServerConfig::new(2)
            .binary(env!("CARGO_BIN_EXE_fixture-misbehave"))
            .args(["--heartbeat-timeout", heartbeat, "--shutdown-timeout", "1"])
            .args(extra.iter().copied()),
    )
}

fn start(extra: &[&str]) -> anyhow::Result<Server> {
    start_with("1", extra)
}

/// A field's value without its quotes.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    log_field(line, key).map(|value| value.trim_matches('"'))
}

fn pid_of(line: &str) -> Option<u32> {
    field(line, "worker.pid")?.parse().ok()
}

/// `GET path` on a kept-alive connection; the status and body.
fn ask(stream: &mut TcpStream, path: &str) -> anyhow::Result<(u16, String)> {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
    let response = read_response(stream)?;
    Ok((response.status, response.text()))
}

/// A kept-alive connection and the worker serving it.
struct Pinned {
    stream: TcpStream,
    pid: u32,
}

/// Opens kept-alive connections until `per_worker` are served by each of the two workers.
fn pin(server: &Server, per_worker: usize) -> anyhow::Result<Vec<Pinned>> {
    let mut pinned: Vec<Pinned> = Vec::new();
    for _ in 0..200 {
        let mut stream = connect(server.port())?;
        let (_, body) = ask(&mut stream, "/whoami")?;
        let (_, pid) = parse_whoami(&body).context("bad whoami")?;
        if pinned.iter().filter(|p| p.pid == pid).count() < per_worker {
            pinned.push(Pinned { stream, pid });
        }
        if pinned.len() == 2 * per_worker {
            return Ok(pinned);
        }
    }
    bail!("could not pin {per_worker} connections to each worker")
}

/// Threads that keep asking on pinned connections until stopped; each records the pid
/// of its worker, its answers and its failures.
struct Bystanders {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<(u32, usize, Vec<String>)>>,
}

impl Bystanders {
    fn start(pinned: Vec<Pinned>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = pinned
            .into_iter()
            .map(|Pinned { mut stream, pid }| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let (mut ok, mut failures) = (0, Vec::new());
                    // Asks until stopped, and at least a few times: an attack can be
                    // over before a thread has asked anything.
                    while !stop.load(Ordering::Relaxed) || ok < MIN_ANSWERS {
                        match ask(&mut stream, "/whoami") {
                            Ok((200, body)) if body.contains(&format!("pid={pid}")) => ok += 1,
                            Ok(other) => {
                                failures.push(format!("{other:?}"));
                                break;
                            }
                            Err(err) => {
                                failures.push(format!("{err:#}"));
                                break;
                            }
                        }
                        // Paced, not timed: a request every few milliseconds is load
                        // enough to see a failure, and leaves the CPUs to the test.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    (pid, ok, failures)
                })
            })
            .collect();
        Self { stop, threads }
    }

    /// Stops them and checks that those served by any worker but `victim` answered every
    /// request, and answered some.
    fn assert_unharmed(self, victim: u32) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let (pid, ok, failures) = thread.join().map_err(|_| anyhow::anyhow!("panic"))?;
            if pid == victim {
                continue;
            }
            eprintln!(
                "bystander on worker {pid}: {ok} answered, {} failed",
                failures.len()
            );
            ensure!(
                failures.is_empty(),
                "requests to worker {pid} failed: {failures:?}"
            );
            ensure!(ok > 0, "no request to worker {pid} was answered");
        }
        Ok(())
    }
}

/// Asks a worker to misbehave; returns its slot, pid and the answer's body.
fn attack(server: &Server, what: &str) -> anyhow::Result<(usize, u32, String)> {
    let (status, body) = get(server.port(), &format!("/misbehave?what={what}"))?;
    ensure!(status == 200, "status {status}");
    let (slot, pid) = parse_whoami(&body).context("bad whoami")?;
    Ok((slot, pid, body))
}

/// Waits for the supervisor to log `event` for `victim` with `key` = `value` (why it
/// killed it, or which rule it broke).
fn expect_event_for(
    server: &Server,
    mark: usize,
    victim: u32,
    event: &str,
    (key, value): (&str, &str),
) -> anyhow::Result<()> {
    server.expect_log_since(
        mark,
        &format!("{event} {key}={value} for worker {victim}"),
        |line| {
            is_event(line, event) && pid_of(line) == Some(victim) && field(line, key) == Some(value)
        },
        WAIT,
    )?;
    Ok(())
}

/// Runs one attack that breaks the protocol, with bystanders on both workers: the
/// supervisor names the violation once, kills the worker, replaces it, and stays up.
fn violation_is_contained(what: &str, violation: &str) -> anyhow::Result<()> {
    // A worker whose channel is shut cannot report either: a heartbeat timeout longer
    // than the 1 s the supervisor gives a closed channel lets the violation be the cause.
    let server = start_with("5", &[])?;
    let bystanders = Bystanders::start(pin(&server, 2)?);
    let mark = server.log_mark();
    let (slot, victim, _) = attack(&server, what)?;
    let violated = ("violation", violation);
    expect_event_for(&server, mark, victim, "protocol_violation", violated)?;
    let replacement = server.wait_for_replacement(mark, slot, victim, WAIT)?;
    ensure!(
        wait_for_exit(victim, WAIT),
        "the misbehaving worker {victim} is still running"
    );
    // The replacement serves: idle workers take turns.
    let served = (0..50).any(|_| {
        get(server.port(), "/whoami")
            .ok()
            .and_then(|(_, body)| parse_whoami(&body))
            .is_some_and(|(_, pid)| pid == replacement)
    });
    ensure!(served, "the replacement {replacement} did not serve");
    bystanders.assert_unharmed(victim)?;
    ensure!(is_alive(server.pid()), "the supervisor died");
    let lines = server.logs_since(mark);
    let named = lines
        .iter()
        .filter(|line| is_event(line, "protocol_violation") && pid_of(line) == Some(victim))
        .count();
    ensure!(named == 1, "the violation was logged {named} times");
    // A flood of bad datagrams does not become a flood of log lines.
    ensure!(
        lines.len() < 100,
        "{} log lines since the attack:\n{}",
        lines.len(),
        lines.join("\n")
    );
    Ok(())
}

#[test]
fn a_worker_cannot_truncate_the_memory_it_shares_with_the_supervisor() -> anyhow::Result<()> {
    let server = start(&[])?;
    let before = server.worker_pids();
    let mark = server.log_mark();
    let (_, victim, body) = attack(&server, "truncate-clock")?;
    // EPERM: the size is sealed.
    ensure!(
        body.contains("truncate=errno1"),
        "the truncation was not refused: {body}"
    );
    // The supervisor reads every worker's clock at each dispatch: it keeps serving, and
    // the worker keeps serving too (it only tried).
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let (status, body) = get(server.port(), "/whoami")?;
        ensure!(status == 200, "status {status}");
        seen.insert(parse_whoami(&body).context("bad whoami")?.1);
    }
    ensure!(
        seen.contains(&victim),
        "the worker {victim} no longer serves"
    );
    ensure!(is_alive(server.pid()), "the supervisor died");
    ensure!(server.worker_pids() == before, "a worker was replaced");
    let log = server.logs_since(mark).join("\n");
    ensure!(
        !server
            .events_since(mark)
            .iter()
            .any(|event| event.is("protocol_violation")),
        "{log}"
    );
    Ok(())
}

#[test]
fn a_forged_unsealed_clock_after_ready_is_a_violation() -> anyhow::Result<()> {
    violation_is_contained("forged-clock", "unexpected-message")
}

#[test]
fn a_flood_of_garbage_datagrams_is_one_violation_and_one_line() -> anyhow::Result<()> {
    violation_is_contained("garbage-flood", "malformed-message")
}

#[test]
fn a_flood_of_valid_reports_is_a_violation() -> anyhow::Result<()> {
    violation_is_contained("status-flood", "message-flood")
}

#[test]
fn an_oversized_datagram_is_a_violation() -> anyhow::Result<()> {
    violation_is_contained("oversized", "oversized-message")
}

#[test]
fn a_descriptor_where_none_belongs_is_a_violation() -> anyhow::Result<()> {
    violation_is_contained("fds-wrong-kind", "wrong-descriptors")
}

#[test]
fn too_many_descriptors_are_a_violation() -> anyhow::Result<()> {
    violation_is_contained("fds-too-many", "oversized-message")
}

#[test]
fn a_worker_that_closes_its_channel_and_runs_on_is_replaced() -> anyhow::Result<()> {
    violation_is_contained("close-channel", "channel-closed")
}

#[test]
fn an_unsealed_clock_sent_at_start_is_refused_and_the_slot_recovers() -> anyhow::Result<()> {
    let marker = std::env::temp_dir().join(format!(
        "coreloop-it-forge-{}-{:x}",
        std::process::id(),
        coreloop_integration_tests::random_u64()
    ));
    let marker_arg = marker.display().to_string();
    let server = start(&["--forge-clock-marker", &marker_arg])?;
    let bystanders = Bystanders::start(pin(&server, 2)?);
    let victim = server.worker_pids()[&0];
    // The next worker to start forges its clock (once: it removes the marker).
    std::fs::write(&marker, b"")?;
    let mark = server.log_mark();
    kill(victim, Signal::KILL)?;
    let line = server.expect_log_since(
        mark,
        "protocol_violation bad-loop-clock",
        |line| {
            is_event(line, "protocol_violation")
                && field(line, "violation") == Some("bad-loop-clock")
        },
        WAIT,
    )?;
    let forger = pid_of(&line).context("no worker.pid")?;
    // The forger is a start failure; the next worker of the slot starts cleanly.
    let replacement = server.wait_for_replacement(mark, 0, victim, WAIT)?;
    ensure!(replacement != forger, "the forger {forger} became ready");
    ensure!(
        wait_for_exit(forger, WAIT),
        "the forger {forger} still runs"
    );
    bystanders.assert_unharmed(victim)?;
    ensure!(is_alive(server.pid()), "the supervisor died");
    let _ = std::fs::remove_file(&marker);
    Ok(())
}

#[test]
fn a_worker_that_reports_but_never_reads_is_killed_as_hung() -> anyhow::Result<()> {
    let server = start(&[])?;
    let bystanders = Bystanders::start(pin(&server, 2)?);
    let mark = server.log_mark();
    let (slot, victim, _) = attack(&server, "stop-reading")?;
    // Its reports keep coming (a thread forges them); its blocked handler poll, read from
    // the loop clock, gives it away.
    expect_event_for(&server, mark, victim, "worker_killed", ("reason", "hang"))?;
    server.wait_for_replacement(mark, slot, victim, WAIT)?;
    bystanders.assert_unharmed(victim)?;
    ensure!(is_alive(server.pid()), "the supervisor died");
    Ok(())
}

#[test]
fn a_worker_that_claims_to_read_but_does_not_is_killed_and_loses_no_connection()
-> anyhow::Result<()> {
    let server = start(&[])?;
    let bystanders = Bystanders::start(pin(&server, 2)?);
    let port = server.port();
    let mark = server.log_mark();
    let (slot, victim, _) = attack(&server, "forge-reading")?;
    // New connections, one after another, until the liar is gone: it looks asleep, empty
    // and with nothing open, so dispatch sends them to it. Only the kernel's count of what
    // it left unread, which the health check reads, gives it away; once it is killed, what
    // it never read goes to another worker, and every request is answered.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<JoinHandle<anyhow::Result<()>>> = (0..2)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (status, body) = get(port, "/whoami")?;
                    ensure!(status == 200, "status {status}: {body}");
                }
                Ok(())
            })
        })
        .collect();
    expect_event_for(
        &server,
        mark,
        victim,
        "worker_killed",
        ("reason", "not-reading"),
    )?;
    server.wait_for_replacement(mark, slot, victim, WAIT)?;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().map_err(|_| anyhow::anyhow!("panic"))??;
    }
    bystanders.assert_unharmed(victim)?;
    ensure!(is_alive(server.pid()), "the supervisor died");
    Ok(())
}

#[test]
fn a_worker_that_ignores_drain_is_killed_after_the_shutdown_timeout() -> anyhow::Result<()> {
    let server = start(&[])?;
    let bystanders = Bystanders::start(pin(&server, 2)?);
    let (slot, victim, _) = attack(&server, "ignore-drain")?;
    let mark = server.log_mark();
    // SIGTERM to the worker: it asks to retire, is sent `Drain`, and then blocks.
    kill(victim, Signal::TERM)?;
    expect_event_for(
        &server,
        mark,
        victim,
        "worker_killed",
        ("reason", "drain-timeout"),
    )?;
    server.wait_for_replacement(mark, slot, victim, WAIT)?;
    ensure!(wait_for_exit(victim, WAIT), "worker {victim} still runs");
    bystanders.assert_unharmed(victim)?;
    ensure!(is_alive(server.pid()), "the supervisor died");
    Ok(())
}

/// Kills a process this test caused to exist, if it is still there, when dropped.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if is_alive(self.0) {
            let _ = kill(self.0, Signal::KILL);
        }
    }
}

#[test]
fn what_a_dead_worker_forked_goes_with_it() -> anyhow::Result<()> {
    let server = start(&[])?;
    let bystanders = Bystanders::start(pin(&server, 2)?);
    let mark = server.log_mark();
    let (slot, victim, body) = attack(&server, "fork-and-die")?;
    let child: u32 = body
        .split_whitespace()
        .find_map(|word| word.strip_prefix("child=")?.parse().ok())
        .with_context(|| format!("no child= in {body:?}"))?;
    let _cleanup = KillOnDrop(child);
    server.wait_for_replacement(mark, slot, victim, WAIT)?;
    ensure!(
        wait_for_exit(child, WAIT),
        "the child {child} of the dead worker still holds its descriptors"
    );
    bystanders.assert_unharmed(victim)?;
    ensure!(is_alive(server.pid()), "the supervisor died");
    let exited = server.logs_since(mark);
    ensure!(
        exited
            .iter()
            .any(|line| is_event(line, "worker_exited") && pid_of(line) == Some(victim)),
        "no worker_exited event for {victim}"
    );
    Ok(())
}
