//! Fixture: a coreloop server with an asynchronous per-worker setup
//! (`ServerBuilder::serve_with`) and a drain hook.
//!
//! The setup awaits a timer (`--setup-ms`), then either fails with `--fail-setup REASON`
//! or builds the worker's state: a greeting every response carries (`set up by worker=<id>
//! after=<ms>ms`), and a background task that ticks until the worker's shutdown signal.
//! The drain hook waits for that task to stop, sleeps `--hook-ms` (so that a worker that
//! did not wait for it would exit first), then writes `<marker-dir>/worker-<id>` with
//! `drained worker=<id> pid=<pid> background=stopped`.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use clap::Parser;
use coreloop::{BoxError, Conn, Worker};
use coreloop_integration_tests::fixture::{self, CommonArgs};

#[derive(Debug, Parser)]
#[command(about = "coreloop test fixture: async worker setup and a drain hook")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// How long the setup awaits before it is done.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    setup_ms: u64,
    /// Fail every worker's setup with this reason, after the wait.
    #[arg(long, value_name = "REASON")]
    fail_setup: Option<String>,
    /// Directory where each worker's drain hook writes `worker-<id>`.
    #[arg(long, value_name = "DIR")]
    marker_dir: Option<PathBuf>,
    /// How long the drain hook sleeps before it writes its marker.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    hook_ms: u64,
}

/// The setup: what a worker awaits before it is ready.
async fn setup(worker: Worker, args: Rc<Args>) -> Result<Rc<str>, BoxError> {
    tokio::time::sleep(Duration::from_millis(args.setup_ms)).await;
    if let Some(reason) = &args.fail_setup {
        return Err(reason.clone().into());
    }
    let id = worker.id().get();
    // A background task stopped by the shutdown signal, outside any connection.
    let draining = worker.shutdown_signal();
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::task::spawn_local(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                () = draining.triggered() => break,
            }
        }
        let _ = stopped_tx.send(());
    });
    if let Some(dir) = args.marker_dir.clone() {
        let hook_ms = args.hook_ms;
        worker.on_drain(async move {
            let background = match stopped_rx.await {
                Ok(()) => "stopped",
                Err(_) => "lost",
            };
            tokio::time::sleep(Duration::from_millis(hook_ms)).await;
            let text = format!(
                "drained worker={id} pid={} background={background}",
                std::process::id()
            );
            if let Err(err) = std::fs::write(dir.join(format!("worker-{id}")), text) {
                tracing::error!(error = %err, "cannot write the drain marker");
            }
        });
    }
    Ok(format!("set up by worker={id} after={}ms", args.setup_ms).into())
}

fn main() -> anyhow::Result<()> {
    let args = Rc::new(Args::parse());
    fixture::init_logging();
    let builder = args.common.builder()?;
    builder
        .serve_with(move |worker: Worker| {
            let args = Rc::clone(&args);
            async move {
                let greeting = setup(worker, args).await?;
                Ok::<_, BoxError>(move |mut conn: Conn| {
                    let greeting = Rc::clone(&greeting);
                    async move {
                        if fixture::read_request(conn.stream_mut()).await?.is_none() {
                            return Ok(());
                        }
                        fixture::respond(conn.stream_mut(), 200, &greeting).await
                    }
                })
            }
        })
        .run()?;
    Ok(())
}
