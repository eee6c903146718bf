//! SIGTTIN adds a worker that serves; SIGTTOU drains and removes one, which exits cleanly
//! and is not restarted.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context as _;
use coreloop_integration_tests::{
    Event, Server, ServerConfig, get, live_children, parse_whoami, zombie_children,
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
    let added = server.expect_scaled_up(mark, 3)?;
    let three = answering_pids(port, 3, 30)?;
    let mut expected = before.clone();
    expected.insert(added);
    assert_eq!(three, expected, "pids answering with 3 workers");
    let children: BTreeSet<u32> = live_children(supervisor).into_iter().collect();
    assert_eq!(children, expected, "children of the supervisor");

    // Scale down: the highest id drains and exits 0; it is not replaced.
    let mark = server.log_mark();
    server.signal(Signal::TTOU)?;
    server.expect_scaled_down(mark, 2)?;
    server.expect_clean_drain_exit(mark, added, Duration::from_secs(15))?;

    let after = answering_pids(port, 3, 20)?;
    assert_eq!(after, before, "pids answering after scaling down");
    let children: BTreeSet<u32> = live_children(supervisor).into_iter().collect();
    assert_eq!(children, before, "children of the supervisor");
    assert_eq!(zombie_children(supervisor), Vec::<u32>::new(), "zombies");
    let respawned: Vec<Event> = server
        .events_since(mark)
        .into_iter()
        .filter(|event| event.is("worker_spawned") && event.worker_id() == Some(2))
        .collect();
    assert!(
        respawned.is_empty(),
        "the removed slot was restarted: {respawned:?}"
    );
    Ok(())
}
