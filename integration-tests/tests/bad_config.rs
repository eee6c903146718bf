//! Configurations that cannot work fail fast, say why, and leave no process behind.

use std::net::TcpListener;
use std::time::Duration;

use coreloop_integration_tests::{Server, processes_with_arg, unique_socket_path};

#[test]
fn port_in_use_fails_without_leaving_workers() -> anyhow::Result<()> {
    let holder = TcpListener::bind("127.0.0.1:0")?;
    let port = holder.local_addr()?.port();
    let bind = format!("127.0.0.1:{port}");
    let mut server = Server::spawn(&["--workers", "2", "--bind", &bind], "debug")?;
    let status = server
        .wait_exit(Duration::from_secs(15))
        .ok_or_else(|| anyhow::anyhow!("the server kept running on a port in use"))?;
    assert!(!status.success(), "exit status {status}");
    assert!(
        server.wait_log_closed(Duration::from_secs(5)),
        "stderr still open"
    );
    let log = server.log_text();
    assert!(
        log.contains(&format!("cannot listen on {bind}")),
        "no `cannot listen on {bind}` in:\n{log}"
    );
    assert!(
        !server
            .events_since(0)
            .iter()
            .any(|event| event.is("worker_spawned")),
        "workers were started:\n{log}"
    );
    assert!(server.all_worker_pids().is_empty());
    let left = processes_with_arg(&bind);
    assert!(left.is_empty(), "processes left running: {left:?}");
    // The port's owner still gets the connections.
    let client = std::net::TcpStream::connect(("127.0.0.1", port))?;
    let (_, peer) = holder.accept()?;
    assert_eq!(peer, client.local_addr()?);
    Ok(())
}

#[test]
fn zero_workers_is_rejected() -> anyhow::Result<()> {
    let path = unique_socket_path("zero");
    let bind = format!("unix:{}", path.display());
    let mut server = Server::spawn(&["--workers", "0", "--bind", &bind], "debug")?;
    let status = server
        .wait_exit(Duration::from_secs(15))
        .ok_or_else(|| anyhow::anyhow!("the server started with zero workers"))?;
    assert!(!status.success(), "exit status {status}");
    assert!(
        server.wait_log_closed(Duration::from_secs(5)),
        "stderr still open"
    );
    let log = server.log_text();
    assert!(
        log.contains("--workers") && log.contains("'0'"),
        "the error does not name --workers and the bad value:\n{log}"
    );
    assert!(
        !server
            .events_since(0)
            .iter()
            .any(|event| event.is("worker_spawned")),
        "workers were started:\n{log}"
    );
    assert!(!path.exists(), "the listener was created");
    let left = processes_with_arg(&bind);
    assert!(left.is_empty(), "processes left running: {left:?}");
    Ok(())
}
