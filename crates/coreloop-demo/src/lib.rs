//! coreloop's demo: an HTTP/1.1 server on coreloop's supervisor and workers, small and fast
//! enough to benchmark, strict enough to face hostile clients. Not published; the code a
//! user copies is in the repository's `examples/`.
//!
//! ```text
//! cargo run --release -p coreloop-demo                    # 127.0.0.1:8080, one worker per CPU
//! systemd-socket-activate -l 127.0.0.1:9000 target/release/coreloop-demo   # serves port 9000
//! cargo run --release -p coreloop-demo -- --bind 127.0.0.1:8080 --bind unix:/tmp/demo.sock --workers 4
//! curl http://127.0.0.1:8080/whoami                       # worker=<id> pid=<pid> version=<v>
//! wrk -c64 -d10s http://127.0.0.1:8080/
//! ```
//!
//! Endpoints: `GET /` (`Hello, world!`), `/whoami`, `/sleep?ms=N` (answers after N ms
//! without blocking the worker), `/burn?ms=N` (burns N ms of CPU on the worker: the
//! expensive request of skewed-load benchmarks), `/block?ms=N` (blocks the worker's event
//! loop for N ms without using CPU, like a synchronous database call), `POST /discard`
//! (reads and discards the request body, `Content-Length` or chunked, and answers
//! `discarded N bytes`). Logs go to stderr; `RUST_LOG` filters them (default `info`).
//!
//! Every limit on what a client may make a worker hold or wait for is a flag
//! (`--max-request-line`, `--max-header-bytes`, `--max-headers`, `--max-body-bytes`,
//! `--max-pipeline`, `--header-timeout`, `--body-timeout`, `--idle-timeout`,
//! `--send-timeout`); [`serve`] lists what each violation gets.
//!
//! The package is a library and the `coreloop-demo` binary (`src/main.rs`, which calls
//! [`main`]):
//!
//! - [`serve`] is the responder, one connection's HTTP/1.1 loop over any
//!   `AsyncRead + AsyncWrite` stream, configured by [`Limits`] and answering `/whoami` with
//!   an [`Identity`]. The benchmark peers (`bench/tools`, package `coreloop-bench`) serve it
//!   in other process models, and the fuzz crate (`fuzz/`) drives it over in-memory
//!   streams; both depend on this package with `default-features = false`.
//! - [`main`] (feature `cli`, on by default) is the demo's command line and the coreloop
//!   [`Server`](coreloop::Server) built from it. The integration tests' `demo` binary calls
//!   it too, so that their harness gets the demo through `CARGO_BIN_EXE_demo` instead of a
//!   cargo build of another package.
//!
//! Source map: `respond.rs` (the connection loop and the answers), `parse.rs` (request
//! heads and body framing, no I/O), `limits.rs` ([`Limits`], [`Identity`], [`VERSION`]),
//! `cli.rs` (the command line).

#[cfg(feature = "cli")]
mod cli;
mod limits;
mod parse;
mod respond;

#[cfg(feature = "cli")]
pub use cli::main;
pub use limits::{Identity, Limits, MAX_HEADERS_CAP, VERSION};
pub use respond::serve;
