//! Living in a worker: `ServerBuilder::serve_with` runs an asynchronous setup in each
//! worker before it is ready, and the drain hooks it registers run, and are awaited, when
//! the worker drains. Driven through fixture-lifecycle.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use coreloop_integration_tests::{Server, ServerConfig, get, random_port};
use rustix::process::Signal;

/// A fresh directory under /tmp, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let path = PathBuf::from(format!(
            "/tmp/coreloop-it-{tag}-{}-{:x}",
            std::process::id(),
            coreloop_integration_tests::random_u64() & 0xffff_ffff
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(workers: u16) -> ServerConfig {
    ServerConfig::new(workers).binary(env!("CARGO_BIN_EXE_fixture-lifecycle"))
}

#[test]
fn async_setup_state_reaches_the_handler() -> anyhow::Result<()> {
    let server = Server::start(config(2).args(["--setup-ms", "300"]))?;
    let workers = server.worker_pids();
    assert_eq!(workers.len(), 2, "both workers ready: {workers:?}");
    for _ in 0..4 {
        let (status, body) = get(server.port(), "/")?;
        assert_eq!(status, 200);
        assert!(
            body.starts_with("set up by worker=") && body.ends_with(" after=300ms"),
            "the handler does not answer with the state its setup built: {body:?}"
        );
    }
    Ok(())
}

#[test]
fn drain_hooks_run_and_are_awaited_before_the_worker_exits() -> anyhow::Result<()> {
    let dir = TempDir::new("drainhook")?;
    let marker_dir = dir.0.display().to_string();
    let mut server =
        Server::start(config(2).args(["--marker-dir", marker_dir.as_str(), "--hook-ms", "500"]))?;
    let workers = server.worker_pids();
    assert_eq!(workers.len(), 2);
    let (status, _) = get(server.port(), "/")?;
    assert_eq!(status, 200);
    server.signal(Signal::TERM)?;
    let status = server
        .wait_exit(Duration::from_secs(20))
        .context("the server did not stop after SIGTERM")?;
    assert!(status.success(), "exit status {status}");
    server.assert_no_worker_left();
    for (id, pid) in workers {
        let path = dir.0.join(format!("worker-{id}"));
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "worker {id} exited without its drain hook's marker {}; log:\n{}",
                path.display(),
                server.log_text()
            )
        })?;
        // The hook saw the background task stop: the shutdown signal reached it outside
        // any connection.
        assert_eq!(
            text,
            format!("drained worker={id} pid={pid} background=stopped")
        );
    }
    Ok(())
}

#[test]
fn failing_async_setup_is_a_start_failure() -> anyhow::Result<()> {
    let config = config(2).args(["--fail-setup", "database unreachable after the wait"]);
    let mut attempt = 0;
    let (server, status) = loop {
        attempt += 1;
        let mut server = Server::launch(&config, Some(random_port()))?;
        let status = server
            .wait_exit(Duration::from_secs(15))
            .context("the server kept running although no worker can start")?;
        if server.port_was_taken() && attempt < 16 {
            continue;
        }
        break (server, status);
    };
    assert!(!status.success(), "exit status {status}");
    let log = server.log_text();
    assert!(
        log.contains("failed to start: database unreachable after the wait"),
        "the setup's error is not the reason in the log:\n{log}"
    );
    assert!(
        !server
            .events_since(0)
            .iter()
            .any(|event| event.is("serving")),
        "the server started serving"
    );
    server.assert_no_worker_left();
    Ok(())
}
