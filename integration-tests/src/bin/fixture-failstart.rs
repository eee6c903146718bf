//! Fixture: a coreloop server whose handler factory fails with `database unreachable`,
//! in every worker or only in the worker given by `--fail-worker`; with
//! `--fail-if-exists PATH`, only while that file exists (so a test can let the server
//! boot, then break the workers it starts later).

use clap::Parser;
use coreloop::{BoxError, Conn};
use coreloop_integration_tests::fixture::{self, CommonArgs};

#[derive(Debug, Parser)]
#[command(about = "coreloop test fixture: the handler factory fails at start")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Only this worker id fails (default: every worker).
    #[arg(long)]
    fail_worker: Option<usize>,
    /// Fail only while this file exists.
    #[arg(long, value_name = "PATH")]
    fail_if_exists: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    fixture::init_logging();
    let fail = args.fail_worker;
    let marker = args.fail_if_exists;
    args.common
        .builder()?
        .try_serve(move |worker| {
            let worker = worker.get();
            let armed = marker.as_ref().is_none_or(|path| path.exists());
            if armed && fail.is_none_or(|id| id == worker) {
                return Err::<_, BoxError>("database unreachable".into());
            }
            Ok(move |mut conn: Conn| async move {
                if fixture::read_request(conn.stream_mut()).await?.is_none() {
                    return Ok(());
                }
                fixture::respond(conn.stream_mut(), 200, &fixture::whoami(worker)).await
            })
        })
        .run()?;
    Ok(())
}
