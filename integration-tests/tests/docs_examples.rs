//! The examples in the documentation are the code the tests run, and they behave: the
//! README's example and the crate documentation's front page are fixture-readme, and
//! "Testing your server" is `tests/readme_testing.rs`, verbatim; the example drains an
//! idle client promptly and shows a worker's death without any logging set up by the
//! test.

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use coreloop_integration_tests::{Server, ServerConfig, connect, is_alive};
use rustix::process::Signal;

const README: &str = include_str!("../../README.md");
const LIB_RS: &str = include_str!("../../crates/coreloop/src/lib.rs");
const FIXTURE: &str = include_str!("../src/bin/fixture-readme.rs");
const TESTING: &str = include_str!("readme_testing.rs");

/// The first fenced block that opens with `fence` after the line `heading`.
fn block_after(text: &str, heading: &str, fence: &str) -> anyhow::Result<String> {
    let Some((_, after)) = text.split_once(&format!("\n{heading}\n")) else {
        bail!("no heading {heading:?}");
    };
    let Some((_, body)) = after.split_once(&format!("\n{fence}\n")) else {
        bail!("no {fence} block after {heading:?}");
    };
    let Some((code, _)) = body.split_once("\n```\n") else {
        bail!("unterminated block after {heading:?}");
    };
    Ok(format!("{code}\n"))
}

/// The README example as fixture-readme runs it: its address from the command line.
fn as_fixture(example: &str) -> String {
    example.replace(r#".bind("127.0.0.1:7000")"#, ".bind(bind_arg())")
}

#[test]
fn readme_example_is_the_front_page_and_the_fixture() -> anyhow::Result<()> {
    let readme = block_after(README, "## Example", "```rust")?;
    let front: String = LIB_RS
        .lines()
        .filter_map(|line| line.strip_prefix("//!"))
        .map(|line| line.strip_prefix(' ').unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n");
    let front = block_after(&front, "# Example", "```no_run")?;
    assert_eq!(readme, front, "README example and lib.rs front page differ");
    let Some((_, fixture)) = FIXTURE.split_once("// README example: begin\n") else {
        bail!("fixture-readme has no begin marker");
    };
    let Some((fixture, _)) = fixture.split_once("// README example: end\n") else {
        bail!("fixture-readme has no end marker");
    };
    assert_eq!(
        as_fixture(&readme),
        fixture,
        "fixture-readme is not the README example"
    );
    Ok(())
}

#[test]
fn readme_testing_section_is_the_test_ci_runs() -> anyhow::Result<()> {
    let section = block_after(README, "## Testing your server", "```rust")?;
    assert_eq!(
        section, TESTING,
        "README and tests/readme_testing.rs differ"
    );
    Ok(())
}

fn start_readme_example() -> anyhow::Result<Server> {
    Server::start(ServerConfig::new(2).binary(env!("CARGO_BIN_EXE_fixture-readme")))
}

#[test]
fn readme_example_drains_an_idle_client_promptly() -> anyhow::Result<()> {
    let mut server = start_readme_example()?;
    let mut client = connect(server.port())?;
    // An echo proves the connection is with a worker, whose handler now waits to read.
    client.write_all(b"ping")?;
    let mut echoed = [0u8; 4];
    client.read_exact(&mut echoed)?;
    assert_eq!(&echoed, b"ping");

    let sent = Instant::now();
    server.signal(Signal::TERM)?;
    // The shutdown timeout is 30 s: a handler that ignores the drain while it waits for
    // its client keeps the worker that long.
    let status = server
        .wait_exit(Duration::from_secs(40))
        .context("the server did not stop")?;
    let took = sent.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took < Duration::from_secs(10),
        "SIGTERM with one idle client took {took:?}: the example's handler waited for its client"
    );
    let mut rest = Vec::new();
    client.read_to_end(&mut rest)?;
    assert!(
        rest.is_empty(),
        "unexpected bytes after the drain: {rest:?}"
    );
    server.assert_no_worker_left();
    Ok(())
}

#[test]
fn readme_example_logs_a_worker_death() -> anyhow::Result<()> {
    // No RUST_LOG: what the example shows by itself.
    let server = Server::start(
        ServerConfig::new(2)
            .binary(env!("CARGO_BIN_EXE_fixture-readme"))
            .rust_log(""),
    )?;
    let workers = server.worker_pids();
    let Some(&pid) = workers.values().next() else {
        bail!("no worker in the log: {}", server.log_text());
    };
    let mark = server.log_mark();
    coreloop_integration_tests::kill(pid, Signal::KILL)?;
    let died = server.expect_worker_event(mark, "worker_exited", pid, Duration::from_secs(10))?;
    assert!(died.is_death(), "{died}");
    assert!(!is_alive(pid));
    Ok(())
}
