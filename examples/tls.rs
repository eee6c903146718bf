//! HTTPS: a TLS handshake with tokio-rustls on each stream a worker receives, then hyper's
//! HTTP/1 server on the decrypted stream.
//!
//! ```text
//! # a self-signed certificate for localhost and 127.0.0.1 (or use your own PEM files)
//! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
//!     -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
//!     -keyout /tmp/key.pem -out /tmp/cert.pem
//! cargo run --example tls -- --cert /tmp/cert.pem --key /tmp/key.pem --bind 127.0.0.1:8443
//! curl --cacert /tmp/cert.pem https://localhost:8443/    # Hello over TLSv1_3 from worker 0 pid=…
//! curl http://127.0.0.1:8443/                            # plaintext: the handshake fails
//! ```
//!
//! Each worker loads the certificate chain and the private key (PEM) in its handler
//! factory, not in `main()`: `main()` runs again in every worker before `run()`, and must not
//! open files there. A file that is missing or unusable makes the factory fail, so the
//! server does not start (`run()` returns the factory's error).
//!
//! The handshake is bounded by `--handshake-timeout` (a client that connects and sends
//! nothing is dropped) and abandoned when the worker starts draining. A failed handshake
//! (a plaintext client, a client that does not trust the certificate) closes that
//! connection only; it is logged at debug level (`RUST_LOG=debug` shows it). rustls uses
//! the `ring` crypto provider, which builds without cmake or clang.
//!
//! The worker's shutdown signal is wired to hyper's `graceful_shutdown`, as in
//! `hyper_http1.rs`: on SIGTERM the request in progress finishes, then the connection
//! closes (with a TLS `close_notify`), and the supervisor exits 0. Logs go to stderr;
//! `RUST_LOG` filters them (default `info`).
#![deny(warnings)]

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use coreloop::{Conn, Server};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, Parser)]
#[command(about = "HTTPS (tokio-rustls and hyper) on coreloop workers")]
struct Args {
    /// Certificate chain, PEM: the server's certificate first.
    #[arg(long, value_name = "PATH")]
    cert: PathBuf,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PATH")]
    key: PathBuf,
    /// Address to listen on: `HOST:PORT`, `[V6]:PORT`, or `unix:PATH`. Repeatable.
    #[arg(long = "bind", value_name = "ADDR", default_value = "127.0.0.1:8443")]
    binds: Vec<String>,
    /// Worker processes [default: number of CPUs].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=4096))]
    workers: Option<u16>,
    /// Seconds a draining worker may take to finish its requests before it is killed.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    shutdown_timeout: u64,
    /// Seconds a client has to complete the TLS handshake.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = positive_secs)]
    handshake_timeout: f64,
}

fn positive_secs(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs <= 3600.0 => Ok(secs),
        _ => Err(format!("{text:?} is not a number of seconds in (0, 3600]")),
    }
}

/// Reads the PEM files and builds the TLS configuration, with the `ring` provider named
/// explicitly (rather than a process-wide default) and ALPN offering HTTP/1.1.
fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("cannot read the certificates in {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a private key from {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the certificate and the private key do not make a TLS identity")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

async fn serve(
    conn: Conn,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
) -> Result<(), hyper::Error> {
    let shutdown = conn.shutdown_signal();
    let worker = conn.worker_id();
    let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(conn.into_stream()));
    let tls = tokio::select! {
        // Biased: a handshake that has completed is served, even if the drain has begun.
        biased;
        result = handshake => match result {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "TLS handshake failed");
                return Ok(());
            }
            Err(_elapsed) => {
                tracing::debug!(timeout = ?handshake_timeout, "TLS handshake timed out");
                return Ok(());
            }
        },
        // Draining: no request can be in flight on a connection still in its handshake.
        () = shutdown.triggered() => return Ok(()),
    };
    let tls_version = tls
        .get_ref()
        .1
        .protocol_version()
        .map_or_else(|| "TLS".to_owned(), |version| format!("{version:?}"));

    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let body = format!(
            "Hello over {tls_version} from worker {worker} pid={}: {}\n",
            std::process::id(),
            req.uri().path()
        );
        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        // The timer enables hyper's header read timeout (30 s by default).
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(tls), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        // Biased: a request that arrived with the end of the handshake is read (and
        // answered) before a shutdown that is already under way.
        biased;
        result = connection.as_mut() => return result,
        () = shutdown.triggered() => connection.as_mut().graceful_shutdown(),
    }
    connection.await
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();

    let handshake_timeout = Duration::from_secs_f64(args.handshake_timeout);
    let mut server = Server::builder().shutdown_timeout(Duration::from_secs(args.shutdown_timeout));
    if let Some(workers) = args.workers {
        server = server.workers(workers.into());
    }
    for bind in &args.binds {
        server = match bind.strip_prefix("unix:") {
            Some(path) => server.bind_unix(path),
            None => server.bind(bind.as_str())?,
        };
    }
    let (cert, key) = (args.cert, args.key);
    server
        .try_serve(move |_worker| {
            // In the worker: the files are read here, once per worker process. The error
            // is flattened to one line with its causes ("…: No such file or directory"):
            // coreloop reports a factory error by its `Display`, which for an
            // `anyhow::Error` is the outermost context only.
            let config = tls_config(&cert, &key).map_err(|err| format!("{err:#}"))?;
            let acceptor = TlsAcceptor::from(Arc::new(config));
            Ok::<_, String>(move |conn| serve(conn, acceptor.clone(), handshake_timeout))
        })
        .run()?;
    Ok(())
}
