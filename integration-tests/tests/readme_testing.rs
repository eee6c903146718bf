//! Starts the echo server on a port the kernel picks, talks to it, and stops it. Its own
//! test target with `harness = false`: the server's workers run this `main()` too.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::Context;
use coreloop::{Conn, Handler, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn echo(mut conn: Conn) -> std::io::Result<()> {
    let draining = conn.shutdown_signal();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::select! {
            read = conn.stream_mut().read(&mut buf) => read?,
            () = draining.triggered() => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        conn.stream_mut().write_all(&buf[..n]).await?;
    }
}

/// The server under test: the same in the test and in its workers.
fn server() -> Result<Server<impl Handler>, coreloop::Error> {
    Ok(Server::builder()
        .bind("127.0.0.1:0")?
        .workers(2)
        .serve(|_worker| echo))
}

fn main() -> anyhow::Result<()> {
    // `cargo nextest` first asks each test binary which tests it holds.
    if std::env::args().any(|arg| arg == "--list") {
        if !std::env::args().any(|arg| arg == "--ignored") {
            println!("echo_server_answers: test");
        }
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    if coreloop::is_worker() {
        return Ok(server()?.run()?); // a worker: serves, and never returns
    }
    // The server runs on its own thread (it is not `Send`, so it is built there).
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let running = std::thread::spawn(move || {
        let server = server()?;
        let _ = handle_tx.send(server.handle());
        server.run()
    });
    let handle = handle_rx.recv().context("the server was not built")?;
    let addrs = handle.wait_ready(Duration::from_secs(30))?;
    let addr = addrs[0].inet().context("a TCP listener")?;

    let mut client = TcpStream::connect(addr)?;
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    client.write_all(b"ping")?;
    let mut reply = [0u8; 4];
    client.read_exact(&mut reply)?;
    assert_eq!(&reply, b"ping");

    handle.stop_gracefully()?;
    running.join().expect("the server thread panicked")?;
    let mut rest = Vec::new();
    client.read_to_end(&mut rest)?; // the drain closed the idle connection
    assert!(rest.is_empty());
    Ok(())
}
