//! Fixture: a coreloop server driven through its [`coreloop::ServerHandle`]. A thread of
//! the supervisor reads commands from stdin, one per line (`reload`, `add`, `remove`,
//! `upgrade`, `stop`, `kill`), and calls the handle; each call is logged as
//! `handle command command=<name> sent=<bool>` (`false`: the handle said
//! [`coreloop::ServerGone`]).
//!
//! Paths: `/whoami`, and `/sleep?ms=N` (answers after N ms without blocking the worker).

use std::io::BufRead as _;
use std::time::Duration;

use clap::Parser;
use coreloop::ServerHandle;
use coreloop_integration_tests::fixture::{self, CommonArgs};

#[derive(Debug, Parser)]
#[command(about = "coreloop test fixture: ServerHandle commands from stdin")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

/// Reads commands from stdin until EOF.
fn command_loop(handle: &ServerHandle) {
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let command = line.trim();
        let sent = match command {
            "reload" => handle.reload(),
            "add" => handle.add_worker(),
            "remove" => handle.remove_worker(),
            "upgrade" => handle.upgrade(),
            "stop" => handle.stop_gracefully(),
            "kill" => handle.stop_now(),
            "" => continue,
            other => {
                tracing::warn!(command = other, "unknown command");
                continue;
            }
        };
        tracing::info!(command, sent = sent.is_ok(), "handle command");
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    fixture::init_logging();
    let server = fixture::serve_whoami(&args.common, |_, target| {
        let sleep = (fixture::path_of(target) == "/sleep")
            .then(|| Duration::from_millis(fixture::query_ms(target).unwrap_or(1000)));
        async move {
            if let Some(sleep) = sleep {
                tokio::time::sleep(sleep).await;
            }
        }
    })?;
    // Workers, and the new supervisor of a binary upgrade, run this same `main()` with a
    // channel as stdin: only the supervisor the test started may read commands from it.
    if !coreloop::is_worker() && !coreloop::is_upgrading() {
        let handle = server.handle();
        std::thread::Builder::new()
            .name("stdin-commands".into())
            .spawn(move || command_loop(&handle))?;
    }
    server.run()?;
    Ok(())
}
