//! Operating knobs of the demo (and the library options behind them): workers running as
//! an unprivileged user while the supervisor keeps root, workers pinned one per CPU, and
//! the permission bits of unix-socket listeners' files.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use coreloop_integration_tests::{Server, ServerConfig, get, get_over, unique_socket_path};

/// A `Uid:`/`Cpus_allowed_list:`… line of /proc/PID/status, without its label.
fn status_field(pid: u32, field: &str) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .map(|rest| rest.trim().to_owned())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

#[test]
fn workers_run_as_the_requested_user_and_the_supervisor_keeps_root() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        eprintln!("not run: dropping privileges needs root (CI runs as root)");
        return Ok(());
    }
    let nobody = std::fs::read_to_string("/etc/passwd")?
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"nobody"))
                .then(|| fields.get(2).and_then(|uid| uid.parse::<u32>().ok()))?
        })
        .context("no user nobody")?;
    let server = Server::start(ServerConfig::new(2).args(["--user", "nobody"]))?;
    ensure!(get(server.port(), "/")?.0 == 200);
    let supervisor_uid = status_field(server.pid(), "Uid:")?;
    ensure!(
        supervisor_uid.starts_with("0\t"),
        "supervisor: {supervisor_uid}"
    );
    let workers = server.all_worker_pids();
    ensure!(workers.len() == 2, "{workers:?}");
    for pid in workers {
        let uid = status_field(pid, "Uid:")?;
        let expected = format!("{nobody}\t{nobody}\t{nobody}\t{nobody}");
        ensure!(
            uid == expected,
            "worker {pid}: Uid {uid}, expected {expected}"
        );
        let groups = status_field(pid, "Groups:")?;
        ensure!(
            !groups.split_whitespace().any(|g| g == "0"),
            "worker {pid} kept group 0: {groups}"
        );
    }
    Ok(())
}

#[test]
fn pinned_workers_each_get_their_own_cpu() -> Result<()> {
    let allowed = status_field(std::process::id(), "Cpus_allowed_list:")?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("not run: needs 2 CPUs, this process may use {allowed}");
        return Ok(());
    }
    let server = Server::start(ServerConfig::new(2).args(["--pin-workers"]))?;
    ensure!(get(server.port(), "/")?.0 == 200);
    let mut seen = Vec::new();
    for pid in server.all_worker_pids() {
        let list = status_field(pid, "Cpus_allowed_list:")?;
        ensure!(
            list.parse::<usize>().is_ok(),
            "worker {pid} may run on {list}, not one CPU"
        );
        seen.push(list);
    }
    seen.dedup();
    ensure!(seen.len() == 2, "workers share a CPU: {seen:?}");
    // The supervisor is not pinned unless asked.
    let supervisor = status_field(server.pid(), "Cpus_allowed_list:")?;
    ensure!(
        supervisor == allowed,
        "supervisor {supervisor} vs {allowed}"
    );
    Ok(())
}

#[test]
fn unix_socket_files_are_created_with_restrictive_or_chosen_modes() -> Result<()> {
    let default_path = unique_socket_path("mode-default");
    let server = Server::start(ServerConfig::new(1).unix(&default_path))?;
    let mode = std::fs::metadata(&default_path)?.permissions().mode() & 0o7777;
    ensure!(mode == 0o600, "default mode {mode:o}");
    let mut stream = std::os::unix::net::UnixStream::connect(&default_path)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    ensure!(get_over(&mut stream, "/")?.0 == 200);
    drop(server);

    let chosen_path = unique_socket_path("mode-660");
    let _server = Server::start(
        ServerConfig::new(1)
            .unix(&chosen_path)
            .args(["--unix-mode", "660"]),
    )?;
    let mode = std::fs::metadata(&chosen_path)?.permissions().mode() & 0o7777;
    ensure!(mode == 0o660, "chosen mode {mode:o}");
    Ok(())
}
