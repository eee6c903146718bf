//! What a user sees when a server cannot start, through a `main` of the README's shape
//! (`fn main() -> Result<(), coreloop::Error>`, which the standard library reports with
//! `Debug`) and through the demo (anyhow): one sentence naming the problem, each cause
//! once, a non-zero exit, nothing left running. And the address syntax the library and
//! the demo share: `unix:PATH`, port 0, duplicates.

use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use coreloop_integration_tests::{
    IO_TIMEOUT, Server, get, get_over, processes_with_arg, random_port, unique_socket_path,
};
use rustix::process::Signal;

const README_MAIN: &str = env!("CARGO_BIN_EXE_fixture-readme-main");

/// Runs the README-shaped fixture with `args`, expecting it to fail; returns its stderr
/// once every process holding it has exited. `marker` (an argument) finds leftovers.
fn fails(args: &[&str], marker: &str) -> Result<String> {
    let mut server = Server::spawn_binary(Path::new(README_MAIN), args, "info", false)?;
    let status = server
        .wait_exit(Duration::from_secs(30))
        .context("the server kept running")?;
    ensure!(!status.success(), "exit status {status}");
    ensure!(
        server.wait_log_closed(Duration::from_secs(10)),
        "stderr still open"
    );
    let left = processes_with_arg(marker);
    ensure!(left.is_empty(), "processes left running: {left:?}");
    Ok(server.log_text())
}

/// `log` has the `Error: …` line with `sentence` and none of the `Debug` forms of the
/// error's variants.
fn shows_sentence(log: &str, sentence: &str) -> Result<()> {
    ensure!(
        log.lines()
            .any(|line| line.starts_with("Error: ") && line.contains(sentence)),
        "no `Error: …{sentence}…` line in:\n{log}"
    );
    for noise in [
        "Config(",
        "Address {",
        "Bind {",
        "Duplicate {",
        "NestedRuntime",
        "Os {",
    ] {
        ensure!(!log.contains(noise), "`{noise}` in:\n{log}");
    }
    Ok(())
}

#[test]
fn readme_main_shows_sentences_for_bad_configuration() -> Result<()> {
    let bind = format!("127.0.0.1:{}", random_port());
    let log = fails(&["--workers", "0", "--bind", &bind], &bind)?;
    shows_sentence(
        &log,
        "invalid configuration: the number of workers must be at least 1",
    )?;

    let log = fails(&["--bind", "127.0.0.1:99999"], "127.0.0.1:99999")?;
    shows_sentence(
        &log,
        "invalid listen address 127.0.0.1:99999 (expected HOST:PORT",
    )?;
    ensure!(log.contains("Caused by:\n    invalid port value"), "{log}");

    let bind = format!("127.0.0.1:{}", random_port());
    let log = fails(&["--bind", &bind, "--nested"], &bind)?;
    shows_sentence(
        &log,
        "Server::run() must not be called inside a tokio runtime",
    )?;
    Ok(())
}

#[test]
fn readme_main_shows_a_port_in_use_once() -> Result<()> {
    let holder = TcpListener::bind("127.0.0.1:0")?;
    let bind = holder.local_addr()?.to_string();
    let log = fails(&["--workers", "2", "--bind", &bind], &bind)?;
    shows_sentence(&log, &format!("cannot listen on {bind}"))?;
    ensure!(log.matches("Address already in use").count() == 1, "{log}");
    ensure!(
        log.contains("Caused by:\n    Address already in use (os error 98)"),
        "{log}"
    );
    Ok(())
}

#[test]
fn the_same_address_twice_is_refused() -> Result<()> {
    let port = random_port();
    let bind = format!("127.0.0.1:{port}");
    // `localhost` resolves to 127.0.0.1 (and maybe ::1): the same socket address.
    let log = fails(
        &["--bind", &bind, "--bind", &format!("localhost:{port}")],
        &bind,
    )?;
    shows_sentence(&log, &format!("{bind} is bound twice"))?;
    let log = fails(&["--bind", &bind, "--bind", &bind], &bind)?;
    shows_sentence(&log, &format!("{bind} is bound twice"))?;
    Ok(())
}

#[test]
fn a_worker_failing_in_main_points_at_the_rerun_rule() -> Result<()> {
    let lock = unique_socket_path("lock");
    let lock_arg = lock.display().to_string();
    let bind = format!("127.0.0.1:{}", random_port());
    let log = fails(
        &["--lock", &lock_arg, "--workers", "2", "--bind", &bind],
        &bind,
    );
    let _ = std::fs::remove_file(&lock);
    let log = log?;
    // The worker's own message, then the supervisor's, which names the rule.
    ensure!(log.contains("already running"), "{log}");
    shows_sentence(&log, "exited (exit code 1) before it was ready")?;
    ensure!(
        log.contains("Workers re-run main() up to Server::run()"),
        "{log}"
    );
    ensure!(
        log.contains("https://docs.rs/coreloop/latest/coreloop/#workers-re-run-main"),
        "{log}"
    );
    Ok(())
}

#[test]
fn demo_shows_a_port_in_use_once() -> Result<()> {
    let holder = TcpListener::bind("127.0.0.1:0")?;
    let bind = holder.local_addr()?.to_string();
    let mut server = Server::spawn(&["--workers", "1", "--bind", &bind], "info")?;
    let status = server
        .wait_exit(Duration::from_secs(30))
        .context("the demo kept running on a port in use")?;
    ensure!(!status.success(), "exit status {status}");
    ensure!(
        server.wait_log_closed(Duration::from_secs(10)),
        "stderr still open"
    );
    let log = server.log_text();
    ensure!(
        log.contains(&format!("Error: cannot listen on {bind}\n")),
        "{log}"
    );
    ensure!(log.matches("Address already in use").count() == 1, "{log}");
    Ok(())
}

#[test]
fn library_binds_unix_paths_and_reports_the_real_port_of_port_zero() -> Result<()> {
    let path = unique_socket_path("readme");
    let unix = format!("unix:{}", path.display());
    let mut server = Server::spawn_binary(
        Path::new(README_MAIN),
        &["--workers", "1", "--bind", "127.0.0.1:0", "--bind", &unix],
        "info",
        false,
    )?;
    let serving = server
        .wait_event(0, "serving", |_| true, Duration::from_secs(30))
        .with_context(|| format!("not serving:\n{}", server.log_text()))?;
    let serving = serving.line();
    // listeners=["127.0.0.1:PORT", "unix:PATH"]
    let port: u16 = serving
        .split("\"127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|port| port.parse().ok())
        .with_context(|| format!("no 127.0.0.1 listener in {serving}"))?;
    ensure!(port != 0, "{serving}");
    ensure!(serving.contains(&format!("\"{unix}\"")), "{serving}");

    let (status, body) = get(port, "/")?;
    ensure!(
        status == 200 && body.contains("listener=0 peer=127.0.0.1:"),
        "{status} {body}"
    );
    let mut stream = UnixStream::connect(&path)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let (status, body) = get_over(&mut stream, "/")?;
    ensure!(
        status == 200 && body.contains("listener=1 peer=unix"),
        "{status} {body}"
    );

    server.signal(Signal::TERM)?;
    let status = server
        .wait_exit(Duration::from_secs(15))
        .context("no exit")?;
    ensure!(status.success(), "{status}");
    Ok(())
}
