//! Fixture: a coreloop server whose `/block?ms=N` blocks the worker's thread (and so its
//! whole event loop) with `std::thread::sleep`. Every other path answers 200 with
//! `worker=<id> pid=<pid>`.

use std::time::Duration;

use clap::Parser;
use coreloop_integration_tests::fixture::{self, CommonArgs};

#[derive(Debug, Parser)]
#[command(about = "coreloop test fixture: /block?ms=N blocks the worker's event loop")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    fixture::init_logging();
    fixture::serve_whoami(&args.common, |_, target| {
        if fixture::path_of(target) == "/block" {
            let ms = fixture::query_ms(target).unwrap_or(1000);
            tracing::info!(ms, "blocking the event loop");
            std::thread::sleep(Duration::from_millis(ms));
        }
        std::future::ready(())
    })?
    .run()?;
    Ok(())
}
