//! SIGHUP: a rolling reload replaces every worker, each replacement ready before its
//! predecessor drains, without failing a single request of a continuous load; an old
//! worker that cannot finish draining is killed after the shutdown timeout.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use coreloop_integration_tests::{
    Load, Server, ServerConfig, assert_min_ready_workers, connect, live_children, log_field,
    read_until_close, reaped, wait_for_exit, zombie_children,
};
use rustix::process::Signal;

const RELOADS: usize = 3;

#[test]
fn rolling_reload_under_load_fails_no_request() -> anyhow::Result<()> {
    let server = Server::start(ServerConfig::new(2))?;
    let supervisor = server.pid();
    let original: BTreeSet<u32> = server.worker_pids().into_values().collect();
    // Two threads opening a connection per request, two reusing keep-alive connections.
    let load = Load::start(server.port(), 2, 2)?;
    ensure!(
        load.wait_until(
            |r| original.iter().all(|pid| r.pids.contains_key(pid)),
            Duration::from_secs(10)
        ),
        "the load never reached both workers: {:?}",
        load.report()
    );

    let mut retired = Vec::new();
    for round in 1..=RELOADS {
        let mark = server.log_mark();
        server.signal(Signal::HUP)?;
        server
            .expect_reload_complete(mark, 2, Duration::from_secs(60))
            .with_context(|| format!("reload {round}"))?;
        let swaps: Vec<(u32, u32)> = server
            .events_since(mark)
            .iter()
            .filter(|event| event.is("replacement_ready"))
            .filter_map(|event| Some((event.parsed("old.pid")?, event.parsed("new.pid")?)))
            .collect();
        assert_eq!(swaps.len(), 2, "reload {round}: {swaps:?}");
        let new: BTreeSet<u32> = swaps.iter().map(|(_, new)| *new).collect();
        retired.extend(swaps.iter().map(|(old, _)| *old));
        // The new workers take the load before the next reload.
        ensure!(
            load.wait_for_answers(&new, 10, Duration::from_secs(10)),
            "reload {round}: the new workers {new:?} did not answer 10 requests each"
        );
    }
    load.finish()
        .assert_all_answered(&format!("across {RELOADS} reloads"));

    // Every retired worker (the originals among them) drained, exited 0 and was reaped.
    let retired_set: BTreeSet<u32> = retired.iter().copied().collect();
    assert_eq!(retired.len(), 2 * RELOADS, "{retired:?}");
    assert_eq!(
        retired_set.len(),
        2 * RELOADS,
        "a worker was retired twice: {retired:?}"
    );
    assert!(
        original.is_subset(&retired_set),
        "{original:?} not all retired"
    );
    for pid in &retired {
        server.expect_clean_drain_exit(0, *pid, Duration::from_secs(15))?;
    }

    // Each replacement was ready before its predecessor drained: never fewer than two
    // workers taking connections.
    assert_min_ready_workers(&server.logs(), 2)?;

    // Exactly two workers, the supervisor's children, none of them original.
    let current: BTreeSet<u32> = server.worker_pids().into_values().collect();
    assert_eq!(current.len(), 2, "{current:?}");
    assert!(current.is_disjoint(&original));
    let children: BTreeSet<u32> = live_children(supervisor).into_iter().collect();
    assert_eq!(children, current, "children of the supervisor");
    assert_eq!(zombie_children(supervisor), Vec::<u32>::new(), "zombies");
    let (status, _) =
        coreloop_integration_tests::get(server.port(), "/").context("request after reloads")?;
    assert_eq!(status, 200);
    Ok(())
}

#[test]
fn reload_kills_an_old_worker_blocked_past_the_shutdown_timeout() -> anyhow::Result<()> {
    let server = Server::start(
        ServerConfig::new(2)
            .binary(env!("CARGO_BIN_EXE_fixture-block"))
            .args(["--shutdown-timeout", "1", "--heartbeat-timeout", "30"]),
    )?;
    let supervisor = server.pid();
    let mark = server.log_mark();
    // Block one worker's event loop for 20 s: it cannot read `Drain`, let alone finish.
    let mut blocked_conn = connect(server.port())?;
    blocked_conn.write_all(b"GET /block?ms=20000 HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let blocking = server.expect_log_since(
        mark,
        "`blocking the event loop`",
        |line| line.contains(" blocking the event loop"),
        Duration::from_secs(10),
    )?;
    let blocked: u32 = log_field(&blocking, "worker.pid")
        .and_then(|pid| pid.parse().ok())
        .with_context(|| format!("no worker.pid in {blocking:?}"))?;

    let mark = server.log_mark();
    server.signal(Signal::HUP)?;
    server.expect_reload_complete(mark, 2, Duration::from_secs(30))?;
    let drained = Instant::now();
    let killed =
        server.expect_worker_event(mark, "worker_killed", blocked, Duration::from_secs(10))?;
    assert_eq!(killed.reason(), Some("drain-timeout"), "{killed}");
    assert!(
        wait_for_exit(blocked, Duration::from_secs(5)),
        "the blocked worker {blocked} is still running"
    );
    assert!(
        drained.elapsed() < Duration::from_secs(5),
        "the blocked worker lived {:?} past its drain (shutdown timeout 1 s)",
        drained.elapsed()
    );
    let reply = read_until_close(&mut blocked_conn)?;
    assert!(!reply.text().contains("200 OK"), "{:?}", reply.text());

    // Its death is the end of a drain, not a crash: no restart, the pool is the two new
    // workers.
    let died =
        server.expect_worker_event(mark, "worker_exited", blocked, Duration::from_secs(5))?;
    assert_eq!(died.field("status"), Some("killed by signal 9"), "{died}");
    let log = server.logs_since(mark).join("\n");
    assert!(
        !server
            .events_since(mark)
            .iter()
            .any(|event| event.is("restart_scheduled")),
        "{log}"
    );
    assert!(reaped(blocked, supervisor), "{blocked} was not reaped");
    let current: BTreeSet<u32> = server.worker_pids().into_values().collect();
    assert!(!current.contains(&blocked));
    let children: BTreeSet<u32> = live_children(supervisor).into_iter().collect();
    assert_eq!(children, current, "children of the supervisor");
    assert_eq!(zombie_children(supervisor), Vec::<u32>::new(), "zombies");
    let (status, _) = coreloop_integration_tests::get(server.port(), "/whoami")?;
    assert_eq!(status, 200);
    Ok(())
}
