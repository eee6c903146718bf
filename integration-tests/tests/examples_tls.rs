//! `examples/tls.rs`: HTTPS with tokio-rustls on coreloop workers. A client that trusts the
//! test's certificate (generated here with rcgen) gets answers; a plaintext client and a
//! silent one fail their handshake without disturbing the server; SIGTERM closes a
//! keep-alive TLS connection cleanly and the server exits 0; a missing certificate stops
//! the server at startup.

use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, ensure};
use coreloop_integration_tests::{
    IO_TIMEOUT, Server, ServerConfig, connect, example_binary, expect_exit_0_after_sigterm,
    get_request, parse_responses, random_u64, send_raw, unique_socket_path,
};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustix::process::Signal;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, RootCertStore};

/// `--handshake-timeout` given to the server, in seconds.
const HANDSHAKE_TIMEOUT_SECS: f64 = 1.0;

/// A self-signed certificate for `localhost` and `127.0.0.1`, and its key, as PEM files in
/// a directory of their own (removed on drop).
struct CertFiles {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

impl CertFiles {
    fn new() -> Result<Self> {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
        let dir = std::env::temp_dir().join(format!(
            "coreloop-it-tls-{}-{:x}",
            std::process::id(),
            random_u64() & 0xffff_ffff
        ));
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let files = Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            dir,
            der: cert.der().clone(),
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, signing_key.serialize_pem())?;
        Ok(files)
    }
}

impl Drop for CertFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(files: &CertFiles) -> Result<Server> {
    Server::start(
        ServerConfig::new(2)
            .binary(example_binary("tls")?)
            .args(["--shutdown-timeout", "10", "--cert"])
            .args([files.cert.display().to_string()])
            .args(["--key".to_owned(), files.key.display().to_string()])
            .args([
                "--handshake-timeout".to_owned(),
                HANDSHAKE_TIMEOUT_SECS.to_string(),
            ]),
    )
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A TLS client that trusts `root` only.
fn connector(root: &CertificateDer<'static>) -> Result<TlsConnector> {
    let mut roots = RootCertStore::empty();
    roots.add(root.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `GET path` with `Connection: close` over TLS, read until the server ends the TLS
/// session: returns the status and the body. A server that closes without `close_notify`
/// fails the read (`UnexpectedEof`).
fn https_get(
    port: u16,
    connector: &TlsConnector,
    name: ServerName<'static>,
    path: &str,
) -> Result<(u16, String)> {
    let bytes = runtime()?.block_on(async {
        tokio::time::timeout(IO_TIMEOUT, async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let mut tls = connector.connect(name, tcp).await?;
            tls.write_all(get_request(path).as_bytes()).await?;
            let mut bytes = Vec::new();
            tls.read_to_end(&mut bytes).await?;
            anyhow::Ok(bytes)
        })
        .await
        .context("HTTPS request timed out")?
    })?;
    let mut responses = parse_responses(&bytes)?;
    ensure!(
        responses.len() == 1,
        "{:?}",
        String::from_utf8_lossy(&bytes)
    );
    let response = responses.remove(0);
    Ok((response.status, response.text()))
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("a valid DNS name")
}

#[test]
fn https_answers_while_plaintext_and_silent_clients_fail_the_handshake() -> Result<()> {
    let files = CertFiles::new()?;
    let server = start(&files)?;
    let ready = server.worker_pids();
    assert_eq!(ready.len(), 2, "{ready:?}");
    let port = server.port();
    let connector = connector(&files.der)?;

    let (status, body) = https_get(port, &connector, localhost(), "/by-name")?;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("Hello over TLSv1_3 from worker ") && body.ends_with(": /by-name\n"),
        "{body:?}"
    );
    // The certificate's IP address SAN.
    let by_ip = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let (status, body) = https_get(port, &connector, by_ip, "/by-ip")?;
    assert_eq!(status, 200, "{body}");

    // Plaintext HTTP: rustls answers with a TLS alert record (content type 21), never
    // with HTTP, and closes.
    let mark = server.log_mark();
    // Waits up to 10 s for a log line, from `mark` on, that contains `what`.
    let expect_line = |what: &str| {
        server.expect_log_since(
            mark,
            &format!("`{what}` line"),
            |line| line.contains(what),
            Duration::from_secs(10),
        )
    };
    let reply = send_raw(port, get_request("/").as_bytes())?;
    assert_eq!(
        reply.bytes.first(),
        Some(&0x15),
        "expected a TLS alert, got {:?}",
        reply.text()
    );
    expect_line("TLS handshake failed")?;

    // A client that connects and sends nothing is dropped after the handshake timeout.
    let mut silent = connect(port)?;
    let connected = Instant::now();
    let mut byte = [0u8; 1];
    let read = silent.read(&mut byte);
    let waited = connected.elapsed();
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|err| err.kind() == std::io::ErrorKind::ConnectionReset),
        "expected the server to close, got {read:?}"
    );
    assert!(
        waited >= Duration::from_secs_f64(HANDSHAKE_TIMEOUT_SECS * 0.9),
        "closed after {waited:?}"
    );
    expect_line("TLS handshake timed out")?;

    // The server keeps serving, with the same workers.
    let (status, body) = https_get(port, &connector, localhost(), "/again")?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.worker_pids(), ready, "no worker was replaced");
    let text = server.log_text();
    assert!(
        !server
            .events_since(0)
            .iter()
            .any(|event| event.is("handler_failed") || event.is("handler_panicked"))
            && !text.contains("panicked"),
        "failed handshakes are not handler failures"
    );
    Ok(())
}

#[test]
fn sigterm_closes_a_keep_alive_tls_connection_and_exits_0() -> Result<()> {
    let files = CertFiles::new()?;
    let mut server = start(&files)?;
    let port = server.port();
    let connector = connector(&files.der)?;
    let rt = runtime()?;

    // A keep-alive HTTP/1.1 connection over TLS (hyper's client), left open after one
    // answer.
    let connection = rt.block_on(async {
        tokio::time::timeout(IO_TIMEOUT, async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let tls = connector.connect(localhost(), tcp).await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            let connection = tokio::spawn(connection);
            let request = hyper::Request::get("/keep-alive")
                .header(hyper::header::HOST, "localhost")
                .body(Empty::<Bytes>::new())?;
            let response = sender.send_request(request).await?;
            ensure!(response.status() == 200, "{response:?}");
            ensure!(
                !response.headers().contains_key(hyper::header::CONNECTION),
                "the server keeps the connection alive: {response:?}"
            );
            let body = response.into_body().collect().await?.to_bytes();
            ensure!(body.ends_with(b": /keep-alive\n"), "{body:?}");
            anyhow::Ok((sender, connection))
        })
        .await
        .context("HTTPS request timed out")?
    })?;
    let (sender, connection) = connection;

    server.signal(Signal::TERM)?;
    // The worker closes the idle connection: the client's connection task ends without
    // an error (rustls saw `close_notify`, not a bare EOF).
    let closed = rt.block_on(async { tokio::time::timeout(IO_TIMEOUT, connection).await });
    drop(sender);
    closed
        .context("the server did not close the keep-alive connection")?
        .context("the client's connection task failed")?
        .context("the connection did not end cleanly")?;

    expect_exit_0_after_sigterm(&mut server)
}

#[test]
fn a_missing_certificate_stops_the_server_at_startup() -> Result<()> {
    let files = CertFiles::new()?;
    let missing = files.dir.join("missing.pem");
    let socket = unique_socket_path("tls-missing-cert");
    let config = ServerConfig::new(1)
        .binary(example_binary("tls")?)
        .without_tcp()
        .unix(&socket)
        .args(["--cert".to_owned(), missing.display().to_string()])
        .args(["--key".to_owned(), files.key.display().to_string()]);
    let mut server = Server::launch(&config, None)?;
    let status = server
        .wait_exit(Duration::from_secs(30))
        .ok_or_else(|| anyhow!("the server did not stop"))?;
    assert!(!status.success(), "exit status {status}");
    let text = server.log_text();
    assert!(
        text.contains(&format!(
            "cannot read the certificates in {}: I/O error: No such file or directory",
            missing.display()
        )),
        "the error names the file and the cause:\n{text}"
    );
    assert!(
        !server
            .events_since(0)
            .iter()
            .any(|event| event.is("serving")),
        "it never served:\n{text}"
    );
    Ok(())
}
