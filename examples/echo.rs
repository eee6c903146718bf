//! An echo server: every byte a client sends comes back.
//!
//! ```text
//! cargo run --example echo -- 127.0.0.1:7000
//! printf 'hello\n' | socat - TCP:127.0.0.1:7000     # or: nc 127.0.0.1 7000
//! ```
//!
//! Each connection ends when the client closes its side, or when the worker drains
//! (SIGTERM or Ctrl-C on the supervisor): the loop checks the shutdown signal between
//! reads, so a drain ends idle connections at once.
#![deny(warnings)]

use coreloop::{Conn, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn echo(mut conn: Conn) -> std::io::Result<()> {
    let shutdown = conn.shutdown_signal();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = conn.stream_mut().read(&mut buf) => read?,
            () = shutdown.triggered() => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        conn.stream_mut().write_all(&buf[..n]).await?;
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    Server::builder()
        .bind(addr.as_str())?
        .workers(2)
        .serve(|_worker| echo)
        .run()?;
    Ok(())
}
