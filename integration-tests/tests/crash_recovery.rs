//! A worker killed with SIGKILL is reaped and replaced, and the replacement serves.

use std::time::Duration;

use coreloop_integration_tests::{
    Server, ServerConfig, children_of, fd_targets, get, is_alive, kill, parse_whoami, proc_stat,
    wait_for_exit,
};
use rustix::process::Signal;

#[test]
fn killed_worker_is_replaced() -> anyhow::Result<()> {
    let server = Server::start(ServerConfig::new(2))?;
    let before = server.worker_pids();
    assert_eq!(before.len(), 2, "{before:?}");
    let victim_id = 0;
    let victim = before[&victim_id];
    let survivor = before[&1];

    // No traffic yet, so the supervisor holds only its own descriptors.
    let supervisor_fds = fd_targets(server.pid())?;
    let mark = server.log_mark();
    kill(victim, Signal::KILL)?;
    assert!(
        wait_for_exit(victim, Duration::from_secs(5)),
        "worker {victim} survived SIGKILL"
    );
    let replacement =
        server.wait_for_replacement(mark, victim_id, victim, Duration::from_secs(15))?;
    let died = server.expect_worker_event(mark, "worker_exited", victim, Duration::ZERO)?;
    assert!(died.is_death(), "{died}");
    assert_eq!(died.field("status"), Some("killed by signal 9"), "{died}");
    // The dead worker's channel and process handles are released when the replacement
    // is started, before it can report ready.
    let now = fd_targets(server.pid())?;
    assert_eq!(
        now.len(),
        supervisor_fds.len(),
        "supervisor descriptors before the kill {supervisor_fds:?}, after the replacement {now:?}"
    );

    // The replacement is the supervisor's child and takes requests.
    let stat = proc_stat(replacement)
        .ok_or_else(|| anyhow::anyhow!("replacement {replacement} not in /proc"))?;
    assert_eq!(
        stat.ppid,
        server.pid(),
        "replacement is not a child of the supervisor"
    );
    let mut answered = false;
    for _ in 0..20 {
        let (status, body) = get(server.port(), "/whoami")?;
        assert_eq!(status, 200, "{body}");
        let (id, pid) =
            parse_whoami(&body).ok_or_else(|| anyhow::anyhow!("bad /whoami body {body:?}"))?;
        assert_ne!(pid, victim, "the killed worker answered");
        if pid == replacement {
            assert_eq!(id, victim_id);
            answered = true;
            break;
        }
    }
    assert!(
        answered,
        "the replacement {replacement} never answered /whoami"
    );

    // The killed worker is gone (reaped by the supervisor: not even a zombie), the other
    // one untouched.
    assert_eq!(
        proc_stat(victim),
        None,
        "killed worker {victim} was not reaped"
    );
    assert!(is_alive(survivor), "the other worker {survivor} died");
    assert_eq!(server.worker_pids().get(&1), Some(&survivor));
    let children = children_of(server.pid());
    let zombies: Vec<_> = children.iter().filter(|c| c.state == 'Z').collect();
    assert!(
        zombies.is_empty(),
        "zombie children of the supervisor: {zombies:?}"
    );
    let mut pids: Vec<u32> = children.iter().map(|c| c.pid).collect();
    pids.sort_unstable();
    let mut expected = vec![replacement, survivor];
    expected.sort_unstable();
    assert_eq!(pids, expected, "children of the supervisor");
    Ok(())
}
