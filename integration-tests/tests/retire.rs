//! A stop signal sent to one worker (not to the supervisor): the worker asks to retire,
//! the supervisor drains it and starts its replacement at once, as a planned exit (no
//! backoff, no crash counted), and requests keep succeeding.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::ensure;
use coreloop_integration_tests::{
    Event, Load, Server, ServerConfig, kill, live_children, zombie_children,
};
use rustix::process::Signal;

#[test]
fn sigterm_to_a_worker_retires_and_replaces_it() -> anyhow::Result<()> {
    // A start-failure limit of 1: a retirement counted as a start failure would stop it.
    let server = Server::start(ServerConfig::new(2).args(["--max-start-failures", "1"]))?;
    let supervisor = server.pid();
    let workers = server.worker_pids();
    let (retiree, other) = (workers[&0], workers[&1]);
    let load = Load::start(server.port(), 2, 1)?;
    ensure!(
        load.wait_until(|r| r.pids.contains_key(&retiree), Duration::from_secs(10)),
        "the load never reached worker {retiree}"
    );

    let mark = server.log_mark();
    kill(retiree, Signal::TERM)?;
    server.expect_worker_event(mark, "worker_retiring", retiree, Duration::from_secs(10))?;
    let replacement = server.wait_for_replacement(mark, 0, retiree, Duration::from_secs(15))?;
    server.expect_clean_drain_exit(mark, retiree, Duration::from_secs(15))?;
    // The replacement takes requests.
    ensure!(
        load.wait_for_answers([&replacement], 10, Duration::from_secs(10)),
        "the replacement {replacement} did not serve"
    );
    load.finish().assert_all_answered("across the retirement");

    // A planned exit: no crash, no backoff; the server runs on.
    let log = server.logs_since(mark).join("\n");
    let events = server.events_since(mark);
    assert!(
        !events.iter().any(Event::is_death),
        "counted as a crash:\n{log}"
    );
    assert!(
        !events.iter().any(|event| event.is("restart_scheduled")),
        "backoff:\n{log}"
    );
    // Giving up stops the server: its `stopping` event (with the `giving up` error).
    assert!(
        !events.iter().any(|event| event.is("stopping")),
        "crash loop:\n{log}"
    );
    let children: BTreeSet<u32> = live_children(supervisor).into_iter().collect();
    assert_eq!(children, BTreeSet::from([other, replacement]));
    assert_eq!(zombie_children(supervisor), Vec::<u32>::new(), "zombies");
    Ok(())
}
