//! No descriptor leaks: 100,000 connections later, the supervisor and every worker hold
//! exactly the descriptors they held before.
//!
//! "Quiescent" is established by events, not by waiting: every worker is single-threaded
//! and closes a connection in the same poll in which it sends the FIN the client reads as
//! EOF, so once a worker answers a later request on a barrier connection, it has closed
//! every storm connection. The supervisor closes its copy of a socket before it accepts
//! the next one, so once a connection opened after the storm is answered, it holds no
//! storm socket. The barrier connections themselves stay open while descriptors are
//! counted and are left out of the counts by socket inode (`/proc/net/tcp`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::{Context as _, bail};
use coreloop_integration_tests::{
    Server, ServerConfig, connect, fd_targets, parse_whoami, read_response, server_socket_inode,
};

const WORKERS: u16 = 2;
const CONNECTIONS: usize = 100_000;
const CLIENTS: usize = 8;
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// A keep-alive connection kept open across the measurement.
struct Barrier {
    stream: TcpStream,
    inode: u64,
}

impl Barrier {
    /// Opens a connection and completes one `/whoami` on it; returns the answering pid.
    fn open(port: u16) -> anyhow::Result<(Self, u32)> {
        let stream = connect(port)?;
        let client_port = stream.local_addr()?.port();
        let mut barrier = Self { stream, inode: 0 };
        let pid = barrier.whoami()?;
        barrier.inode = server_socket_inode(port, client_port)
            .with_context(|| format!("no /proc/net/tcp entry for {port} <- {client_port}"))?;
        Ok((barrier, pid))
    }

    fn whoami(&mut self) -> anyhow::Result<u32> {
        self.stream
            .write_all(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let response = read_response(&mut self.stream)?;
        if response.status != 200 || response.closes() {
            bail!("unexpected barrier response {response:?}");
        }
        let (_, pid) = parse_whoami(&response.text()).context("bad /whoami body")?;
        Ok(pid)
    }
}

/// One keep-alive connection on every worker.
fn barriers(port: u16, workers: &BTreeSet<u32>) -> anyhow::Result<Vec<(Barrier, u32)>> {
    let mut opened = Vec::new();
    let mut covered = BTreeSet::new();
    while covered != *workers {
        if opened.len() > 4 * workers.len() {
            bail!("could not reach every worker: {covered:?} of {workers:?}");
        }
        let (barrier, pid) = Barrier::open(port)?;
        covered.insert(pid);
        opened.push((barrier, pid));
    }
    Ok(opened)
}

/// Descriptors of `pid`, leaving out sockets whose inode is in `excluded`.
fn descriptors(pid: u32, excluded: &BTreeSet<u64>) -> anyhow::Result<BTreeMap<u32, String>> {
    let mut targets = fd_targets(pid).with_context(|| format!("reading /proc/{pid}/fd"))?;
    targets.retain(|_, target| {
        target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|inode| inode.parse::<u64>().ok())
            .is_none_or(|inode| !excluded.contains(&inode))
    });
    Ok(targets)
}

fn snapshot(
    pids: &BTreeSet<u32>,
    excluded: &BTreeSet<u64>,
) -> anyhow::Result<BTreeMap<u32, BTreeMap<u32, String>>> {
    pids.iter()
        .map(|pid| Ok((*pid, descriptors(*pid, excluded)?)))
        .collect()
}

fn storm(port: u16) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let failures = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let next = Arc::clone(&next);
            let errors = Arc::clone(&errors);
            let failures = Arc::clone(&failures);
            std::thread::spawn(move || {
                let mut buf = Vec::with_capacity(512);
                while next.fetch_add(1, Ordering::Relaxed) < CONNECTIONS {
                    buf.clear();
                    let result = connect(port)
                        .and_then(|mut stream| {
                            stream.write_all(REQUEST)?;
                            stream.read_to_end(&mut buf)
                        })
                        .map_err(|err| err.to_string())
                        .and_then(|_| {
                            if buf.starts_with(b"HTTP/1.1 200 ") && buf.ends_with(b"Hello, world!")
                            {
                                Ok(())
                            } else {
                                Err(format!("bad reply {:?}", String::from_utf8_lossy(&buf)))
                            }
                        });
                    if let Err(err) = result {
                        failures.fetch_add(1, Ordering::Relaxed);
                        let mut errors = errors.lock().unwrap_or_else(PoisonError::into_inner);
                        if errors.len() < 10 {
                            errors.push(err);
                        }
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
    }
    let failures = failures.load(Ordering::Relaxed);
    if failures > 0 {
        bail!(
            "{failures} of {CONNECTIONS} connections failed, e.g. {:?}",
            errors.lock().unwrap_or_else(PoisonError::into_inner)
        );
    }
    Ok(())
}

fn diff(before: &BTreeMap<u32, String>, after: &BTreeMap<u32, String>) -> String {
    let mut out = String::new();
    for (fd, target) in after {
        if before.get(fd) != Some(target) {
            out.push_str(&format!("  + {fd} -> {target}\n"));
        }
    }
    for (fd, target) in before {
        if after.get(fd) != Some(target) {
            out.push_str(&format!("  - {fd} -> {target}\n"));
        }
    }
    out
}

#[test]
fn no_descriptor_leak_after_100k_connections() -> anyhow::Result<()> {
    let server = Server::start(ServerConfig::new(WORKERS).rust_log("info").args([
        "--idle-timeout",
        "600",
        "--header-timeout",
        "600",
    ]))?;
    let port = server.port();
    let workers: BTreeSet<u32> = server.worker_pids().values().copied().collect();
    assert_eq!(workers.len(), usize::from(WORKERS));
    let mut processes = workers.clone();
    processes.insert(server.pid());

    let mut worker_barriers = barriers(port, &workers)?;
    let mut excluded: BTreeSet<u64> = worker_barriers.iter().map(|(b, _)| b.inode).collect();
    let before = snapshot(&processes, &excluded)?;
    for (pid, fds) in &before {
        eprintln!("before: pid {pid} holds {} descriptors", fds.len());
    }

    let started = Instant::now();
    storm(port)?;
    let elapsed = started.elapsed();
    eprintln!(
        "{CONNECTIONS} connections with {CLIENTS} clients in {elapsed:.2?} ({:.0}/s)",
        CONNECTIONS as f64 / elapsed.as_secs_f64()
    );

    // Quiescence barriers: each worker answers on its barrier connection, and the
    // supervisor accepts (and so has finished with every storm socket) one more.
    for (barrier, pid) in &mut worker_barriers {
        assert_eq!(
            barrier.whoami()?,
            *pid,
            "barrier connection moved to another worker"
        );
    }
    // Same workers all along: nothing was restarted during the storm.
    let now: BTreeSet<u32> = server.worker_pids().values().copied().collect();
    assert_eq!(now, workers, "workers changed during the storm");
    let (last, _) = Barrier::open(port)?;
    excluded.insert(last.inode);
    let after = snapshot(&processes, &excluded)?;

    let mut leaks = String::new();
    for pid in &processes {
        let (b, a) = (&before[pid], &after[pid]);
        eprintln!(
            "after: pid {pid} holds {} descriptors (before: {})",
            a.len(),
            b.len()
        );
        if a.len() != b.len() {
            leaks.push_str(&format!(
                "pid {pid}: {} descriptors before, {} after:\n{}",
                b.len(),
                a.len(),
                diff(b, a)
            ));
        }
    }
    assert!(leaks.is_empty(), "descriptor counts changed:\n{leaks}");

    drop(last);
    drop(worker_barriers);
    Ok(())
}
