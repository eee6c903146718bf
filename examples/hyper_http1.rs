//! hyper's HTTP/1 server on the streams coreloop's workers receive.
//!
//! ```text
//! cargo run --example hyper_http1 -- 127.0.0.1:3000
//! curl http://127.0.0.1:3000/
//! ```
//!
//! The worker's shutdown signal is wired to hyper's `graceful_shutdown`, so a drain lets
//! the request in progress finish and then closes the keep-alive connection.
#![deny(warnings)]

use std::convert::Infallible;
use std::rc::Rc;

use coreloop::{Conn, Server};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

async fn serve(conn: Conn, greeting: Rc<str>) -> Result<(), hyper::Error> {
    let shutdown = conn.shutdown_signal();
    let worker = conn.worker_id();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let body = format!("{greeting} from worker {worker}: {}\n", req.uri().path());
        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(conn.into_stream()), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => return result,
        () = shutdown.triggered() => connection.as_mut().graceful_shutdown(),
    }
    connection.await
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
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    Server::builder()
        .bind(addr.as_str())?
        .workers(2)
        .serve(|_worker| {
            // Per-worker state, not Send: an Rc.
            let greeting: Rc<str> = Rc::from("Hello");
            move |conn| serve(conn, Rc::clone(&greeting))
        })
        .run()?;
    Ok(())
}
