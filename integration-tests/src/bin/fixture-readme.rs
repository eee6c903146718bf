//! Fixture: the README's example (and the crate documentation's front page), verbatim
//! but for its address, which comes from `--bind ADDR` so that the harness can pick a
//! free port. `tests/docs_examples.rs` checks that the three stay the same; `--workers`
//! is accepted and ignored (the example runs two).

// README example: begin
use coreloop::{Conn, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn echo(mut conn: Conn) -> std::io::Result<()> {
    let draining = conn.shutdown_signal();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::select! {
            read = conn.stream_mut().read(&mut buf) => read?,
            () = draining.triggered() => return Ok(()), // the worker is draining
        };
        if n == 0 {
            return Ok(()); // the client closed
        }
        conn.stream_mut().write_all(&buf[..n]).await?;
    }
}

fn main() -> Result<(), coreloop::Error> {
    // Without a subscriber, handler errors and worker deaths are logged nowhere.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    Server::builder()
        .bind(bind_arg())?
        .workers(2)
        .serve(|_worker| echo)
        .run()
}
// README example: end

/// The value of `--bind`; `127.0.0.1:7000`, the README's address, without one.
fn bind_arg() -> String {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .find(|pair| pair[0] == "--bind")
        .map_or_else(|| "127.0.0.1:7000".to_owned(), |pair| pair[1].clone())
}
