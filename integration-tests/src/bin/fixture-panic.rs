//! Fixture: a coreloop server whose handler panics on `/panic`. Every other path answers
//! 200 with `worker=<id> pid=<pid>`. The worker must survive the panic, log it, and go on
//! serving.

use clap::Parser;
use coreloop::Conn;
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
    args.common
        .builder()?
        .serve(|worker| {
            let worker = worker.get();
            move |mut conn: Conn| async move {
                let Some(target) = fixture::read_request(conn.stream_mut()).await? else {
                    return Ok(());
                };
                if fixture::path_of(&target) == "/panic" {
                    panic!("fixture panic on request {target}");
                }
                fixture::respond(conn.stream_mut(), 200, &fixture::whoami(worker)).await
            }
        })
        .run()?;
    Ok(())
}
