//! Binary upgrade (SIGUSR2, `ServerHandle::upgrade`): the running supervisor starts the
//! executable now on disk as a new supervisor, hands it the listeners and leaves once the
//! new generation serves, without failing a request of a continuous load; a new
//! generation that crashes, fails to start or never becomes ready is stopped and the old
//! one serves on, again without failing a request.
//!
//! The binaries live in a directory of their own (hard links into the target directory),
//! and a new version is installed the way a deploy does it: renamed over the old path.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use coreloop_integration_tests::{
    Event, Load, NewSupervisor, Server, ServerConfig, get, http_binary, is_alive, kill, log_field,
    parse_whoami, random_u64, unique_socket_path, wait_for_exit,
};
use rustix::process::Signal;

/// How long an upgrade may take in these tests (debug builds, a shared machine).
const UPGRADE: Duration = Duration::from_secs(60);

/// A directory for one test's binaries, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Result<Self> {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "upgrade-{tag}-{}-{:x}",
            std::process::id(),
            random_u64() & 0xffff_ffff
        ));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Installs `binary` at `name` the way a deploy does: a new file (a hard link, no copy
    /// of a large debug binary) renamed over the old one.
    fn install(&self, binary: &Path, name: &str) -> Result<PathBuf> {
        let staged = self.join(&format!(".{name}.new"));
        let _ = std::fs::remove_file(&staged);
        std::fs::hard_link(binary, &staged)
            .or_else(|_| std::fs::copy(binary, &staged).map(drop))
            .with_context(|| format!("staging {}", binary.display()))?;
        let path = self.join(name);
        std::fs::rename(&staged, &path)?;
        Ok(path)
    }

    /// Installs a shell script at `name` (a "binary" that misbehaves).
    fn install_script(&self, name: &str, body: &str) -> Result<PathBuf> {
        let staged = self.join(&format!(".{name}.new"));
        std::fs::write(&staged, format!("#!/bin/sh\n{body}\n"))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755))?;
        let path = self.join(name);
        std::fs::rename(&staged, &path)?;
        Ok(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends SIGUSR2 to `supervisor` and waits until it has handed over and exited; returns
/// the new supervisor.
fn upgrade(server: &Server, supervisor: u32) -> Result<NewSupervisor> {
    let mark = server.log_mark();
    kill(supervisor, Signal::USR2)?;
    upgrade_completed(server, supervisor, mark)
}

/// Waits, from log line `mark` on, until `old` has started a new supervisor, handed over
/// to it, drained and exited; returns the new supervisor.
fn upgrade_completed(server: &Server, old: u32, mark: usize) -> Result<NewSupervisor> {
    let new = server.expect_new_supervisor(mark, old, UPGRADE)?;
    for name in ["upgrade_handed_over", "upgrade_complete"] {
        server.expect_event(
            mark,
            name,
            |event| event.supervisor_pid() == Some(old),
            UPGRADE,
        )?;
    }
    ensure!(
        wait_for_exit(old, Duration::from_secs(30)),
        "the old supervisor {old} did not exit after the upgrade"
    );
    Ok(new)
}

/// Worker pids the supervisor `supervisor` logged as ready.
fn workers_of(server: &Server, supervisor: u32) -> BTreeSet<u32> {
    server
        .events_since(0)
        .iter()
        .filter(|event| event.is("worker_ready") && event.supervisor_pid() == Some(supervisor))
        .filter_map(Event::worker_pid)
        .collect()
}

/// Waits until every pid in `pids` has answered at least `n` requests of `load`.
fn wait_served(load: &Load, pids: &BTreeSet<u32>, n: usize) -> Result<()> {
    ensure!(
        load.wait_until(
            |r| pids
                .iter()
                .all(|pid| r.pids.get(pid).is_some_and(|k| *k >= n)),
            Duration::from_secs(30)
        ),
        "workers {pids:?} did not answer {n} requests each: {:?}",
        load.report().pids
    );
    Ok(())
}

/// `GET /whoami` over the unix socket at `path`.
fn whoami_unix(path: &Path) -> Result<String> {
    let mut stream =
        UnixStream::connect(path).with_context(|| format!("connecting to {}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    ensure!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    Ok(reply)
}

fn version_of(body: &str) -> Option<&str> {
    body.split_whitespace()
        .find_map(|part| part.strip_prefix("version="))
}

#[test]
fn upgrade_to_a_new_binary_serves_the_new_version_and_fails_no_request() -> Result<()> {
    let dir = Dir::new("version")?;
    let app = dir.install(Path::new(env!("CARGO_BIN_EXE_fixture-v1")), "app")?;
    let socket = unique_socket_path("upgrade");
    let pid_file = dir.join("app.pid");
    let mut server = Server::start(
        ServerConfig::new(2)
            .binary(&app)
            .unix(&socket)
            .args(["--pid-file", &pid_file.display().to_string()])
            .rust_log("info"),
    )?;
    let old = server.pid();
    ensure!(std::fs::read_to_string(&pid_file)?.trim() == old.to_string());
    let (status, body) = get(server.port(), "/whoami")?;
    ensure!(
        status == 200 && version_of(&body) == Some("1.0.0-test"),
        "{body:?}"
    );

    // Three clients opening a connection per request (the fixture closes after each).
    let load = Load::start(server.port(), 3, 0)?;
    wait_served(&load, &workers_of(&server, old), 10)?;

    dir.install(Path::new(env!("CARGO_BIN_EXE_fixture-v2")), "app")?;
    let new = upgrade(&server, old)?;
    let status = server
        .wait_exit(Duration::from_secs(5))
        .context("old supervisor")?;
    ensure!(
        status.success(),
        "the old supervisor exited with {status:?}"
    );

    let new_workers = workers_of(&server, new.0);
    ensure!(new_workers.len() == 2, "new workers {new_workers:?}");
    wait_served(&load, &new_workers, 20)?;
    let report = load.finish();
    report.assert_all_answered("across the upgrade");

    let (status, body) = get(server.port(), "/whoami")?;
    ensure!(
        status == 200 && version_of(&body) == Some("2.0.0-test"),
        "{body:?}"
    );
    let (_, pid) = parse_whoami(&body).context("whoami")?;
    ensure!(
        new_workers.contains(&pid),
        "answered by {pid}, not a new worker"
    );
    // The unix listener was handed over too: its file is still there, and serves v2.
    let reply = whoami_unix(&socket)?;
    ensure!(reply.contains("version=2.0.0-test"), "{reply:?}");
    ensure!(
        std::fs::read_to_string(&pid_file)?.trim() == new.0.to_string(),
        "the pid file does not name the new supervisor"
    );

    // The new supervisor owns the files now: it removes both when it stops.
    new.stop()?;
    ensure!(
        !socket.exists(),
        "the socket file outlived the new supervisor"
    );
    ensure!(
        !pid_file.exists(),
        "the pid file outlived the new supervisor"
    );
    Ok(())
}

#[test]
fn two_upgrades_in_a_row_under_keep_alive_and_per_request_load_fail_no_request() -> Result<()> {
    // The demo, upgraded to the binary at its own path (as after `cargo build` in place).
    let dir = Dir::new("demo")?;
    let app = dir.install(&http_binary()?, "http")?;
    let server = Server::start(ServerConfig::new(2).binary(&app).rust_log("info"))?;
    let first = server.pid();
    let load = Load::start(server.port(), 2, 2)?;
    wait_served(&load, &workers_of(&server, first), 10)?;

    let second = upgrade(&server, first)?;
    wait_served(&load, &workers_of(&server, second.0), 20)?;
    // The new supervisor upgrades in turn (it is no longer "the new one" of anything).
    let third = upgrade(&server, second.0)?;
    drop(second);
    let last = workers_of(&server, third.0);
    ensure!(last.len() == 2, "{last:?}");
    wait_served(&load, &last, 20)?;
    let report = load.finish();
    report.assert_all_answered("across the upgrade");
    third.stop()?;
    Ok(())
}

#[test]
fn failed_upgrades_roll_back_and_fail_no_request() -> Result<()> {
    // The demo, under keep-alive and per-request load, "upgraded" to broken binaries.
    let dir = Dir::new("rollback")?;
    let demo = http_binary()?;
    let app = dir.install(&demo, "app")?;
    let server = Server::start(
        ServerConfig::new(2)
            .binary(&app)
            .args(["--upgrade-timeout", "3"])
            .rust_log("info"),
    )?;
    let old = server.pid();
    let serving = workers_of(&server, old);
    let load = Load::start(server.port(), 2, 2)?;
    wait_served(&load, &serving, 10)?;

    /// The binary installed before the next upgrade, and the reason the log must give.
    type Case<'a> = (&'a str, &'a dyn Fn() -> Result<()>, &'a str);
    let cases: [Case<'_>; 3] = [
        (
            "the new binary exits at once",
            &|| {
                dir.install_script("app", "echo 'new binary: cannot start' >&2; exit 3")
                    .map(drop)
            },
            "exit code 3",
        ),
        (
            // A server that takes the same flags and whose handler factory fails.
            "a new worker fails to start",
            &|| {
                dir.install(Path::new(env!("CARGO_BIN_EXE_fixture-failstart")), "app")
                    .map(drop)
            },
            "database unreachable",
        ),
        (
            "the new binary never becomes ready",
            &|| dir.install_script("app", "exec sleep 600").map(drop),
            "upgrade timeout",
        ),
    ];
    for (case, break_it, reason) in cases {
        break_it()?;
        let mark = server.log_mark();
        server.signal(Signal::USR2)?;
        // Should this test fail before the rollback, the attempt must not outlive it.
        let guard = server.expect_new_supervisor(mark, old, UPGRADE)?;
        let attempt = guard.0;
        if case.contains("never") {
            // One upgrade at a time.
            server.signal(Signal::USR2)?;
            server.expect_event(mark, "upgrade_refused", |_| true, UPGRADE)?;
        }
        let failed = server
            .expect_event(mark, "upgrade_failed", |_| true, UPGRADE)
            .with_context(|| format!("`upgrade_failed` ({case})"))?;
        ensure!(
            failed.reason().is_some_and(|r| r.contains(reason)),
            "{case}: expected {reason:?} in {failed:?}"
        );
        ensure!(
            wait_for_exit(attempt, Duration::from_secs(10)),
            "{case}: the new supervisor {attempt} is still running"
        );
        ensure!(is_alive(old), "{case}: the old supervisor died");
        // The same workers go on serving.
        ensure!(
            workers_of(&server, old) == serving,
            "{case}: workers changed"
        );
        let before = load.report().ok;
        ensure!(
            load.wait_until(|r| r.ok >= before + 50, Duration::from_secs(30)),
            "{case}: the old generation stopped serving"
        );
        eprintln!("{case}: rolled back: {failed}");
    }

    // And a good binary still upgrades afterwards.
    dir.install(&demo, "app")?;
    let new = upgrade(&server, old)?;
    wait_served(&load, &workers_of(&server, new.0), 20)?;
    let report = load.finish();
    report.assert_all_answered("across the upgrade");
    new.stop()?;
    Ok(())
}

#[test]
fn a_stop_during_an_upgrade_stops_the_new_generation_too() -> Result<()> {
    let dir = Dir::new("cancel")?;
    let app = dir.install(Path::new(env!("CARGO_BIN_EXE_fixture-v1")), "app")?;
    let mut server = Server::start(ServerConfig::new(2).binary(&app).rust_log("info"))?;
    // A new binary that never becomes ready keeps the upgrade in progress.
    dir.install_script("app", "exec sleep 600")?;
    let mark = server.log_mark();
    server.signal(Signal::USR2)?;
    let attempt = server.expect_new_supervisor(mark, server.pid(), UPGRADE)?;
    ensure!(is_alive(attempt.0), "the new supervisor is not running");
    server.signal(Signal::TERM)?;
    let status = server
        .wait_exit(Duration::from_secs(30))
        .context("no exit")?;
    ensure!(status.success(), "{status:?}");
    server.expect_event(mark, "upgrade_cancelled", |_| true, Duration::from_secs(5))?;
    ensure!(
        wait_for_exit(attempt.0, Duration::from_secs(5)),
        "the new supervisor {} outlived the stopped server",
        attempt.0
    );
    Ok(())
}

#[test]
fn server_handle_upgrade_hands_over() -> Result<()> {
    let dir = Dir::new("handle")?;
    let app = dir.install(Path::new(env!("CARGO_BIN_EXE_fixture-handle")), "app")?;
    let server = Server::start(
        ServerConfig::new(2)
            .binary(&app)
            .piped_stdin()
            .rust_log("info"),
    )?;
    let old = server.pid();
    let mark = server.log_mark();
    server.send_line("upgrade")?;
    let sent = server.expect_log_since(
        mark,
        "`handle command command=\"upgrade\"`",
        |line| {
            line.contains(" handle command ") && log_field(line, "command") == Some("\"upgrade\"")
        },
        Duration::from_secs(10),
    )?;
    ensure!(log_field(&sent, "sent") == Some("true"), "{sent}");
    let new = upgrade_completed(&server, old, mark)?;
    let (status, body) = get(server.port(), "/whoami")?;
    ensure!(status == 200, "{body:?}");
    let (_, pid) = parse_whoami(&body).context("whoami")?;
    ensure!(
        workers_of(&server, new.0).contains(&pid),
        "answered by {pid}"
    );
    new.stop()?;
    Ok(())
}
