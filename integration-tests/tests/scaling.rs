//! SIGTTIN adds a worker that serves; SIGTTOU drains and removes one, which exits cleanly
//! and is not restarted.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context as _;
use coreloop_integration_tests::{
    Server, ServerConfig, get, live_children, log_field, parse_whoami, parse_worker_ready, reaped,
    wait_for_exit, zombie_children,
};
use rustix::process::Signal;

/// The pids answering `/whoami` on new connections, until `want` distinct ones answered
/// or `tries` requests were made.
fn answering_pids(port: u16, want: usize, tries: usize) -> anyhow::Result<BTreeSet<u32>> {
    let mut pids = BTreeSet::new();
    for _ in 0..tries {
        let (status, body) = get(port, "/whoami")?;
        anyhow::ensure!(status == 200, "{status} {body}");
        pids.insert(parse_whoami(&body).context("bad /whoami body")?.1);
        if pids.len() >= want {
            break;
        }
    }
    Ok(pids)
}

#[test]
fn sigttin_adds_a_worker_and_sigttou_removes_it() -> anyhow::Result<()> {
    let server = Server::start(ServerConfig::new(2))?;
    let port = server.port();
    let supervisor = server.pid();
    let before: BTreeSet<u32> = server.worker_pids().into_values().collect();

    // Scale up: a third worker, id 2, serving next to the others.
    let mark = server.log_mark();
    server.signal(Signal::TTIN)?;
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
    let three = answering_pids(port, 3, 30)?;
    let mut expected = before.clone();
    expected.insert(added);
    assert_eq!(three, expected, "pids answering with 3 workers");
    let children: BTreeSet<u32> = live_children(supervisor).into_iter().collect();
    assert_eq!(children, expected, "children of the supervisor");

    // Scale down: the highest id drains and exits 0; it is not replaced.
    let mark = server.log_mark();
    server.signal(Signal::TTOU)?;
    server.expect_log_since(
        mark,
        "`scaled down workers=2`",
        |line| line.contains(" scaled down ") && log_field(line, "workers") == Some("2"),
        Duration::from_secs(10),
    )?;
    let added_text = added.to_string();
    let exited = server.expect_log_since(
        mark,
        "`worker exited after draining` for the removed worker",
        |line| {
            line.contains(" worker exited after draining ")
                && log_field(line, "worker.pid") == Some(added_text.as_str())
        },
        Duration::from_secs(15),
    )?;
    assert!(exited.contains("status=exit code 0"), "{exited}");
    assert!(wait_for_exit(added, Duration::from_secs(5)));
    assert!(reaped(added, supervisor), "{added} was not reaped");

    let after = answering_pids(port, 3, 20)?;
    assert_eq!(after, before, "pids answering after scaling down");
    let children: BTreeSet<u32> = live_children(supervisor).into_iter().collect();
    assert_eq!(children, before, "children of the supervisor");
    assert_eq!(zombie_children(supervisor), Vec::<u32>::new(), "zombies");
    let respawned: Vec<String> = server
        .logs_since(mark)
        .into_iter()
        .filter(|line| {
            line.contains(" worker spawned ") && log_field(line, "worker.id") == Some("2")
        })
        .collect();
    assert!(
        respawned.is_empty(),
        "the removed slot was restarted: {respawned:?}"
    );
    Ok(())
}
