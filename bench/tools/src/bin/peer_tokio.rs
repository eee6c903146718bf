//! Benchmark peer: one process, tokio's multi-thread runtime, a plain accept loop. It
//! serves the demo's exact HTTP responder (`coreloop_demo::serve`), so a comparison with the
//! demo measures the process model and nothing else.
//!
//! ```text
//! cargo run --release -p coreloop-bench --bin peer_tokio -- --bind 127.0.0.1:8081 --threads 2
//! ```
#![deny(warnings)]

use std::sync::Arc;

use clap::Parser;
use coreloop::ShutdownSignal;
use coreloop_demo::{Identity, Limits};

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    bind: String,
    /// Runtime worker threads [default: number of CPUs].
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    runtime.enable_all().build()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.bind).await?;
        let who = Arc::new(Identity {
            worker: 0,
            pid: std::process::id(),
        });
        let limits = Arc::new(Limits::default());
        let shutdown = ShutdownSignal::default();
        loop {
            let (mut stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    eprintln!("accept: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            stream.set_nodelay(true)?;
            let (who, limits, shutdown) = (Arc::clone(&who), Arc::clone(&limits), shutdown.clone());
            tokio::spawn(async move {
                let _ = coreloop_demo::serve(&mut stream, &who, &limits, &shutdown).await;
            });
        }
    })
}
