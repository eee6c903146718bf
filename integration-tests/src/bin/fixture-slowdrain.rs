//! Fixture: a coreloop server that is slow to drain. Each request is held for
//! `--hold-ms` (default 60 s) before it is answered, and the handler ignores the worker's
//! shutdown signal, so a graceful stop waits for the shutdown timeout.

use std::time::Duration;

use clap::Parser;
use coreloop_integration_tests::fixture::{self, CommonArgs};

#[derive(Debug, Parser)]
#[command(about = "coreloop test fixture: holds every connection and ignores the drain")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// How long each request is held before its answer, milliseconds.
    #[arg(long, default_value_t = 60_000)]
    hold_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    fixture::init_logging();
    let hold = Duration::from_millis(args.hold_ms);
    fixture::serve_whoami(&args.common, move |conn, target| {
        tracing::info!(conn.id = conn.id(), %target, "holding connection");
        // Deliberately not watching `conn.shutdown_signal()`.
        tokio::time::sleep(hold)
    })?
    .run()?;
    Ok(())
}
