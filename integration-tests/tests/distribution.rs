//! Connections are spread over every worker, and every worker is a direct child of the
//! supervisor.

use std::collections::{BTreeMap, BTreeSet};

use coreloop_integration_tests::{Server, ServerConfig, get, parse_whoami, proc_stat};

const WORKERS: u16 = 3;
const REQUESTS: usize = 60;

#[test]
fn requests_reach_every_worker() -> anyhow::Result<()> {
    let server = Server::start(ServerConfig::new(WORKERS))?;
    let ready = server.worker_pids();
    assert_eq!(
        ready.len(),
        usize::from(WORKERS),
        "one `worker ready` line per worker: {ready:?}"
    );

    let mut seen: BTreeMap<u32, usize> = BTreeMap::new();
    let mut ids: BTreeMap<u32, usize> = BTreeMap::new();
    for _ in 0..REQUESTS {
        let (status, body) = get(server.port(), "/whoami")?;
        assert_eq!(status, 200, "body: {body}");
        let (id, pid) = parse_whoami(&body)
            .ok_or_else(|| anyhow::anyhow!("unexpected /whoami body {body:?}"))?;
        *seen.entry(pid).or_default() += 1;
        ids.insert(pid, id);
    }
    eprintln!("requests per worker pid: {seen:?}");

    let served: BTreeSet<u32> = seen.keys().copied().collect();
    let expected: BTreeSet<u32> = ready.values().copied().collect();
    assert_eq!(
        served, expected,
        "pids that answered vs pids of `worker ready`"
    );
    for (id, pid) in &ready {
        assert_eq!(
            ids.get(pid),
            Some(id),
            "pid {pid} reports the wrong worker id"
        );
        let stat = proc_stat(*pid).ok_or_else(|| anyhow::anyhow!("worker {pid} not in /proc"))?;
        assert_eq!(
            stat.ppid,
            server.pid(),
            "worker {pid} is not a child of the supervisor"
        );
    }
    Ok(())
}
