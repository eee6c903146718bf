//! Fixture: a coreloop server whose handler panics on `/panic`. Every other path answers
//! 200 with `worker=<id> pid=<pid>`. The worker must survive the panic, log it, and go on
//! serving.

use clap::Parser;
use coreloop_integration_tests::fixture::{self, CommonArgs};

#[derive(Debug, Parser)]
#[command(about = "coreloop test fixture: a handler that panics on /panic")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    fixture::init_logging();
    fixture::serve_whoami(&args.common, |_, target| {
        if fixture::path_of(target) == "/panic" {
            panic!("fixture panic on request {target}");
        }
        std::future::ready(())
    })?
    .run()?;
    Ok(())
}
