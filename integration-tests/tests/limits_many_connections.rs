//! 2,000 simultaneous connections on a 2-worker server: all open at once, each sends a
//! request while all the others are open, and every one is answered 200.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use coreloop_integration_tests::{
    Server, ServerConfig, fd_targets, parse_whoami, read_response_async,
};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const WORKERS: u16 = 2;
const CONNECTIONS: usize = 2000;
/// Bound of each phase (a connect whose SYN met a full backlog is retried after 1 s, 3 s…).
const PHASE_TIMEOUT: Duration = Duration::from_secs(60);
const REQUEST: &[u8] = b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n";

#[test]
fn two_thousand_simultaneous_connections_are_all_served() -> Result<()> {
    let server = Server::start(ServerConfig::new(WORKERS).rust_log("info"))?;
    let port = server.port();
    let workers: Vec<u32> = server.worker_pids().values().copied().collect();
    // Sockets only: a worker briefly opens files of its own (/proc for its RSS report), so
    // a count of every descriptor can be one off at any moment.
    let sockets = |pid: &u32| {
        fd_targets(*pid).map_or(0, |fds| {
            fds.values().filter(|t| t.starts_with("socket:")).count()
        })
    };
    let baseline: usize = workers.iter().map(sockets).sum();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let per_worker = runtime.block_on(async {
        // Open every connection first.
        let mut connecting = JoinSet::new();
        for _ in 0..CONNECTIONS {
            connecting.spawn(tokio::time::timeout(
                PHASE_TIMEOUT,
                TcpStream::connect(("127.0.0.1", port)),
            ));
        }
        let mut streams = Vec::with_capacity(CONNECTIONS);
        while let Some(joined) = connecting.join_next().await {
            let stream = joined?
                .context("connect timed out")?
                .context("connect failed")?;
            streams.push(stream);
        }

        // Then one request on each, all in flight together; every connection stays open
        // until every answer is in.
        let mut requests = JoinSet::new();
        for mut stream in streams {
            requests.spawn(tokio::time::timeout(PHASE_TIMEOUT, async move {
                stream.write_all(REQUEST).await?;
                let response = read_response_async(&mut stream).await?;
                anyhow::Ok((response, stream))
            }));
        }
        let mut open = Vec::with_capacity(CONNECTIONS);
        let mut per_worker = BTreeMap::<u32, usize>::new();
        let mut failures = Vec::new();
        while let Some(joined) = requests.join_next().await {
            match joined?.context("no answer in time") {
                Ok(Ok((response, stream))) if response.status == 200 => {
                    let (_, pid) = parse_whoami(&response.text()).context("bad body")?;
                    *per_worker.entry(pid).or_default() += 1;
                    open.push(stream);
                }
                Ok(Ok((response, _))) => failures.push(format!("status {}", response.status)),
                Ok(Err(err)) | Err(err) => failures.push(format!("{err:#}")),
            }
        }
        if !failures.is_empty() {
            bail!(
                "{} of {CONNECTIONS} connections failed, e.g. {:?}",
                failures.len(),
                &failures[..failures.len().min(5)]
            );
        }
        // All answered, all still open: the workers hold every one of them.
        let held: usize = workers.iter().map(sockets).sum();
        eprintln!(
            "{} connections answered and open; worker sockets {baseline} -> {held}; per worker {per_worker:?}",
            open.len()
        );
        ensure!(
            held >= baseline + CONNECTIONS,
            "the workers hold {held} sockets, expected at least {}",
            baseline + CONNECTIONS
        );
        drop(open);
        Ok(per_worker)
    })?;
    assert_eq!(per_worker.values().sum::<usize>(), CONNECTIONS);
    assert_eq!(
        per_worker.len(),
        usize::from(WORKERS),
        "both workers serve: {per_worker:?}"
    );
    Ok(())
}
