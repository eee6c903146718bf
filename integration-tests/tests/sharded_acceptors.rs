//! Sharded acceptors: with `--acceptors 2` the supervisor accepts on two `SO_REUSEPORT`
//! siblings of its listener, one per accept loop, and both loops forward to the workers;
//! every request is answered. (The lifecycle tests run again with two loops in `.ci/run`.)

use anyhow::ensure;
use coreloop_integration_tests::{ServerConfig, get, scrape, series, start_with_metrics};

/// Connections opened; each has its own source port, so the kernel's hash gives each
/// sibling about half of them.
const CONNECTIONS: usize = 200;

#[test]
fn two_accept_loops_share_the_connections_and_serve_every_request() -> anyhow::Result<()> {
    let config = ServerConfig::new(2).args(["--acceptors", "2"]);
    let (server, metrics_port) = start_with_metrics(&config)?;
    for i in 0..CONNECTIONS {
        let (status, body) = get(server.port(), "/")?;
        ensure!(status == 200, "request {i}: status {status}: {body}");
    }
    let text = scrape(metrics_port)?;
    let by_loop = |k: u32| {
        series(
            &text,
            &format!("coreloop_acceptor_accepted_total{{acceptor=\"{k}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let (first, second) = (by_loop(0), by_loop(1));
    ensure!(
        first > 0.0 && second > 0.0,
        "both accept loops accept: {first} and {second}"
    );
    ensure!(
        first + second >= CONNECTIONS as f64,
        "every connection accepted once: {first} + {second}"
    );
    let forwarded: f64 = (0..2)
        .filter_map(|w| {
            series(
                &text,
                &format!("coreloop_forwarded_total{{worker=\"{w}\"}}"),
            )
        })
        .sum();
    ensure!(
        forwarded >= CONNECTIONS as f64,
        "every connection forwarded: {forwarded}"
    );
    Ok(())
}
