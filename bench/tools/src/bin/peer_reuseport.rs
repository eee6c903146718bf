//! Benchmark peer: N processes, each with its own `SO_REUSEPORT` listening socket and a
//! `current_thread` runtime, so the kernel spreads connections by hash. It serves the
//! demo's exact HTTP responder (`coreloop_demo::serve`).
//!
//! ```text
//! cargo run --release -p coreloop-bench --bin peer_reuseport -- --bind 127.0.0.1:8082 --processes 2
//! ```
//!
//! The first process starts the others (by re-executing itself, never `fork()`) and kills
//! them when it receives SIGTERM or SIGINT, or when any of them exits.
#![deny(warnings)]

use std::net::SocketAddr;
use std::rc::Rc;

use clap::Parser;
use coreloop::ShutdownSignal;
use coreloop_demo::{Identity, Limits};
use socket2::{Domain, Socket, Type};

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8082")]
    bind: SocketAddr,
    /// Processes [default: number of CPUs].
    #[arg(long)]
    processes: Option<usize>,
}

const CHILD_ENV: &str = "PEER_REUSEPORT_CHILD";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Ok(index) = std::env::var(CHILD_ENV) {
        return serve(args.bind, index.parse()?);
    }
    let n = args
        .processes
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let mut children = Vec::with_capacity(n);
    for index in 0..n {
        children.push(
            std::process::Command::new("/proc/self/exe")
                .args(std::env::args_os().skip(1))
                .env(CHILD_ENV, index.to_string())
                .spawn()?,
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        anyhow::Ok(())
    })?;
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok(())
}

fn serve(addr: SocketAddr, index: usize) -> anyhow::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    let std_listener: std::net::TcpListener = socket.into();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let who = Rc::new(Identity {
            worker: index,
            pid: std::process::id(),
        });
        let limits = Rc::new(Limits::default());
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
            let (who, limits, shutdown) = (Rc::clone(&who), Rc::clone(&limits), shutdown.clone());
            tokio::task::spawn_local(async move {
                let _ = coreloop_demo::serve(&mut stream, &who, &limits, &shutdown).await;
            });
        }
    })
}
