//! Fixture: a server whose `main` has the README's shape, `fn main() -> Result<(),
//! coreloop::Error>`, so that the tests see what a user sees when it fails: the standard
//! library prints the error with `Debug`.
//!
//! Flags: `--bind ADDR` (repeatable, the library's syntax), `--workers N`, `--nested`
//! (call `run()` inside a tokio runtime), `--lock PATH` (before `run()`, create `PATH` or
//! exit with `already running`: the mistake of opening a lock file in `main()`, which
//! every worker repeats). Each connection is answered `/whoami` style, with the
//! listener's index and the client's address: `worker=<id> listener=<i> peer=<addr>`.

use coreloop::{Conn, Server};
use coreloop_integration_tests::fixture;

fn main() -> Result<(), coreloop::Error> {
    fixture::init_logging();
    let mut builder = Server::builder();
    let mut nested = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match flag.as_str() {
            "--bind" => builder = builder.bind(value())?,
            "--workers" => builder = builder.workers(value().parse().unwrap_or(1)),
            "--nested" => nested = true,
            "--lock" => {
                let path = value();
                if std::fs::File::create_new(&path).is_err() {
                    eprintln!("already running: {path} exists");
                    std::process::exit(1);
                }
            }
            other => {
                eprintln!("unknown flag {other}");
                std::process::exit(2);
            }
        }
    }
    let server = builder.serve(|worker| {
        let worker = worker.get();
        move |mut conn: Conn| async move {
            if fixture::read_request(conn.stream_mut()).await?.is_none() {
                return Ok(());
            }
            let body = format!(
                "worker={worker} listener={} peer={}",
                conn.listener(),
                conn.peer_addr()
            );
            fixture::respond(conn.stream_mut(), 200, &body).await
        }
    });
    if nested {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(coreloop::Error::Runtime)?;
        return runtime.block_on(async { server.run() });
    }
    server.run()
}
