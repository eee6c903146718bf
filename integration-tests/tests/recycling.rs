//! Recycling: a worker that has been handed its share of connections (40 plus a random
//! 0..=10) is replaced gracefully, its replacement ready before it stops taking
//! connections, without failing a request.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use coreloop_integration_tests::{
    Event, Outcome, Server, ServerConfig, assert_min_ready_workers, live_children, parse_whoami,
    timed_get, zombie_children,
};

const RECYCLE_AFTER: usize = 40;
const REQUESTS: usize = 300;
/// Requests to make at most while waiting for the second recycle to complete.
const MAX_REQUESTS: usize = 3000;

fn is_recycle_swap(event: &Event) -> bool {
    event.is("replacement_ready") && event.field("why") == Some("connection count")
}

#[test]
fn workers_are_recycled_after_their_connections() -> anyhow::Result<()> {
    let server = Server::start(ServerConfig::new(2).args([
        "--recycle-after",
        "40",
        "--recycle-jitter",
        "10",
        // Health checks (and so recycling checks) every 100 ms.
        "--heartbeat-timeout",
        "2",
    ]))?;
    let port = server.port();
    let supervisor = server.pid();
    let original: BTreeSet<u32> = server.worker_pids().into_values().collect();

    // Sequential requests, one connection each: at least 300, and on until two recycles
    // have completed.
    let mut served: BTreeMap<u32, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut made = 0;
    loop {
        match timed_get(port, "/whoami", Duration::from_secs(5)) {
            Outcome::Answered(200, body) => {
                let (_, pid) = parse_whoami(&body).context("bad /whoami body")?;
                *served.entry(pid).or_default() += 1;
            }
            other => failures.push(format!("request {made}: {other:?}")),
        }
        made += 1;
        let swaps = server
            .events_since(0)
            .iter()
            .filter(|event| is_recycle_swap(event))
            .count();
        if made >= REQUESTS && swaps >= 2 {
            break;
        }
        if made >= MAX_REQUESTS {
            bail!("{made} requests and only {swaps} recycles completed");
        }
    }
    eprintln!("{made} requests; answers per pid: {served:?}");
    assert!(failures.is_empty(), "failed requests: {failures:?}");

    // Every recycle that started completes: replacement ready, then the old one drains.
    let recycled: Vec<u32> = server
        .events_since(0)
        .iter()
        .filter(|event| event.is("recycling"))
        .filter_map(Event::worker_pid)
        .collect();
    assert!(recycled.len() >= 2, "recycled: {recycled:?}");
    for old in &recycled {
        server.expect_clean_drain_exit(0, *old, Duration::from_secs(15))?;
        // It was handed at least its threshold of connections, all of them ours.
        let count = served.get(old).copied().unwrap_or(0);
        assert!(
            count >= RECYCLE_AFTER,
            "worker {old} was recycled after serving {count} requests"
        );
    }

    // Order in the log: `recycling worker` < `replacement ready` < old worker's exit; and
    // from `serving` on, never fewer than two ready workers.
    let logs = server.logs();
    let events = server.events_since(0);
    let position = |pred: &dyn Fn(&Event) -> bool| events.iter().position(pred);
    for old in &recycled {
        let start = position(&|event| event.is("recycling") && event.worker_pid() == Some(*old));
        let ready =
            position(&|event| is_recycle_swap(event) && event.parsed("old.pid") == Some(*old));
        let exit = position(&|event| event.ends_a_drain() && event.worker_pid() == Some(*old));
        ensure!(
            start < ready && ready < exit && start.is_some(),
            "worker {old}: recycling at event {start:?}, replacement ready at {ready:?}, exit at {exit:?}"
        );
    }
    assert_min_ready_workers(&logs, 2)?;

    // The pool: two workers, not the original ones that were recycled.
    let current: BTreeSet<u32> = server.worker_pids().into_values().collect();
    assert_eq!(current.len(), 2);
    assert_ne!(current, original, "worker pids did not change");
    let children: BTreeSet<u32> = live_children(supervisor).into_iter().collect();
    assert_eq!(children, current, "children of the supervisor");
    assert_eq!(zombie_children(supervisor), Vec::<u32>::new(), "zombies");
    Ok(())
}
