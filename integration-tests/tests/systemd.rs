//! systemd integration, with the real protocols and without systemd as init:
//! socket activation through Debian's `systemd-socket-activate` (which binds, waits for a
//! first client, then execs the demo with `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES`), and
//! `sd_notify` through a `NOTIFY_SOCKET` datagram socket that the test binds itself.

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use coreloop_integration_tests::{
    Server, fd_targets, get, http_binary, random_port, unique_socket_path,
};
use rustix::process::Signal;

const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

/// `.ci/run` installs Debian's `systemd` package, which provides the tool.
fn require_socket_activate() -> Result<()> {
    ensure!(
        Path::new(SOCKET_ACTIVATE).exists(),
        "{SOCKET_ACTIVATE} is missing: apt-get install systemd (.ci/run does)"
    );
    Ok(())
}

/// Inode of the socket listening on 127.0.0.1:`port`, from /proc/net/tcp.
fn listening_inode(port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local = fields.get(1)?;
        let state = fields.get(3)?;
        let port_hex = local.rsplit(':').next()?;
        (u16::from_str_radix(port_hex, 16).ok()? == port && *state == "0A")
            .then(|| fields.get(9).map(|inode| (*inode).to_owned()))?
    })
}

/// Starts the demo under `systemd-socket-activate` on a random port with the socket named
/// `fdname`, passing `demo_args`; returns the wrapper (which becomes the supervisor) and
/// the port. The demo is exec'd when the first client connects.
fn activate(fdname: &str, demo_args: &[&str]) -> Result<(Server, u16)> {
    activate_with_env(fdname, &[], demo_args)
}

/// Like [`activate`], with extra `VAR=VALUE` settings for the demo's environment.
fn activate_with_env(fdname: &str, env: &[String], demo_args: &[&str]) -> Result<(Server, u16)> {
    let binary = http_binary()?;
    for _ in 0..16 {
        let port = random_port();
        let mut args = vec![
            "-l".to_owned(),
            format!("127.0.0.1:{port}"),
            format!("--fdname={fdname}"),
            "-E".to_owned(),
            "RUST_LOG".to_owned(),
        ];
        for setting in env {
            args.extend(["-E".to_owned(), setting.clone()]);
        }
        args.push(binary.display().to_string());
        args.extend(demo_args.iter().map(|arg| (*arg).to_owned()));
        let server = Server::spawn_binary(Path::new(SOCKET_ACTIVATE), &args, "info", false)?;
        if server
            .wait_for_log(
                |line| line.contains("Listening on"),
                Duration::from_secs(10),
            )
            .is_some()
        {
            return Ok((server, port));
        }
        // Most likely the port was taken: try another.
    }
    bail!("systemd-socket-activate did not start")
}

#[test]
fn socket_activation_serves_on_the_passed_socket_and_workers_do_not_inherit_it() -> Result<()> {
    require_socket_activate()?;
    let (mut server, port) = activate("web", &["--bind", "systemd:web", "--workers", "2"])?;
    // The first client triggers the exec and waits in the passed socket's backlog while
    // coreloop boots: it must be served, not dropped.
    let (status, body) = get(port, "/whoami")?;
    ensure!(
        status == 200 && body.starts_with("worker="),
        "{status} {body}"
    );
    let serving = server
        .wait_event(0, "serving", |_| true, Duration::from_secs(30))
        .context("no serving event")?;
    let serving = serving.field("listeners").unwrap_or_default();
    ensure!(
        serving.contains(&format!("systemd:web(127.0.0.1:{port})")),
        "{serving}"
    );
    let workers = server.all_worker_pids();
    ensure!(workers.len() == 2, "{workers:?}");

    // Only the supervisor holds the listening socket: the inherited descriptor was made
    // close-on-exec, so re-exec'd workers do not get it.
    let inode = listening_inode(port).context("no listening socket")?;
    let target = format!("socket:[{inode}]");
    let holds = |pid: u32| fd_targets(pid).is_ok_and(|fds| fds.values().any(|t| *t == target));
    ensure!(holds(server.pid()), "the supervisor does not hold {target}");
    for pid in &workers {
        ensure!(
            !holds(*pid),
            "worker {pid} holds the listening socket {target}"
        );
        let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
        let environ = String::from_utf8_lossy(&environ);
        ensure!(
            !environ.contains("LISTEN_FDS="),
            "worker {pid} inherited LISTEN_FDS"
        );
    }
    for _ in 0..10 {
        ensure!(get(port, "/")?.0 == 200);
    }
    server.signal(Signal::TERM)?;
    let status = server
        .wait_exit(Duration::from_secs(10))
        .context("no exit")?;
    ensure!(status.success(), "{status:?}");
    Ok(())
}

#[test]
fn socket_activation_with_an_unknown_name_fails_clearly() -> Result<()> {
    require_socket_activate()?;
    let (mut server, port) = activate("web", &["--bind", "systemd:api", "--workers", "2"])?;
    // Trigger the exec; this client is never served.
    let _client = TcpStream::connect(("127.0.0.1", port))?;
    let status = server
        .wait_exit(Duration::from_secs(30))
        .context("no exit")?;
    ensure!(!status.success(), "{status:?}");
    // The process has exited, but its last stderr lines may still be on their way to the
    // log reader: wait for the line rather than read the log as it stands.
    // The sentence, then its cause on a `Caused by:` line.
    server
        .wait_for_log(
            |line| line.contains("no socket named \"api\""),
            Duration::from_secs(10),
        )
        .with_context(|| format!("no clear error:\n{}", server.log_text()))?;
    let log = server.log_text();
    ensure!(log.contains("Error: cannot listen on systemd:api"), "{log}");
    ensure!(
        server.all_worker_pids().is_empty(),
        "workers started:\n{}",
        server.log_text()
    );
    Ok(())
}

#[test]
fn a_passed_socket_that_is_not_listening_is_refused() -> Result<()> {
    require_socket_activate()?;
    let binary = http_binary()?;
    let port = random_port();
    // --accept passes each *connected* socket instead of the listening one.
    let args = vec![
        "--accept".to_owned(),
        "-l".to_owned(),
        format!("127.0.0.1:{port}"),
        "-E".to_owned(),
        "RUST_LOG".to_owned(),
        binary.display().to_string(),
        "--bind".to_owned(),
        "systemd".to_owned(),
    ];
    let server = Server::spawn_binary(Path::new(SOCKET_ACTIVATE), &args, "info", false)?;
    server
        .wait_for_log(
            |line| line.contains("Listening on"),
            Duration::from_secs(10),
        )
        .context("systemd-socket-activate did not start")?;
    let mut client = TcpStream::connect(("127.0.0.1", port))?;
    client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
    // The sentence, then its cause on a `Caused by:` line.
    server
        .wait_for_log(
            |line| line.contains("not a listening socket"),
            Duration::from_secs(30),
        )
        .context("the connected socket was not refused")?;
    let log = server.log_text();
    ensure!(log.contains("Error: cannot listen on systemd"), "{log}");
    Ok(())
}

/// The test's end of `$NOTIFY_SOCKET`.
struct Notifications {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Notifications {
    fn bind() -> Result<Self> {
        let path = unique_socket_path("notify");
        let socket = UnixDatagram::bind(&path)?;
        Ok(Self { socket, path })
    }

    /// Reads datagrams until one contains `needle`; returns it.
    fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        loop {
            let remaining = deadline
                .checked_duration_since(Instant::now())
                .with_context(|| format!("no {needle:?} notification within {timeout:?}"))?;
            self.socket.set_read_timeout(Some(remaining))?;
            let n = self
                .socket
                .recv(&mut buf)
                .with_context(|| format!("waiting for {needle:?}"))?;
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if text.contains(needle) {
                return Ok(text);
            }
        }
    }

    /// Whether any datagram containing `needle` arrives within `window`.
    fn any_within(&self, needle: &str, window: Duration) -> Result<bool> {
        match self.wait_for(needle, window) {
            Ok(_) => Ok(true),
            Err(_) => Ok(false),
        }
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts the demo through `env` (which execs in place) with extra environment.
fn start_with_env(env: &[String], demo_args: &[&str]) -> Result<(Server, u16)> {
    let binary = http_binary()?;
    for _ in 0..16 {
        let port = random_port();
        let mut args: Vec<String> = env.to_vec();
        args.push(binary.display().to_string());
        args.extend(["--bind".to_owned(), format!("127.0.0.1:{port}")]);
        args.extend(demo_args.iter().map(|arg| (*arg).to_owned()));
        let mut server = Server::spawn_binary(Path::new("/usr/bin/env"), &args, "info", false)?;
        if server
            .wait_event(0, "serving", |_| true, Duration::from_secs(30))
            .is_some()
        {
            return Ok((server, port));
        }
        let _ = server.wait_exit(Duration::from_secs(5));
        if !server.log_text().contains("in use") {
            bail!("the server did not start:\n{}", server.log_text());
        }
    }
    bail!("no free port")
}

#[test]
fn notify_reports_ready_reloading_status_and_stopping() -> Result<()> {
    let notes = Notifications::bind()?;
    let env = vec![format!("NOTIFY_SOCKET={}", notes.path.display())];
    let (mut server, port) = start_with_env(&env, &["--workers", "2"])?;
    let ready = notes.wait_for("READY=1", Duration::from_secs(10))?;
    ensure!(
        ready.contains("STATUS=serving: 2 of 2 workers ready"),
        "{ready:?}"
    );
    // READY=1 is sent once every worker serves: a request works right away.
    ensure!(get(port, "/")?.0 == 200);
    for pid in server.all_worker_pids() {
        let environ =
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ"))?).into_owned();
        ensure!(
            !environ.contains("NOTIFY_SOCKET="),
            "worker {pid} inherited NOTIFY_SOCKET"
        );
    }

    server.signal(Signal::HUP)?;
    let reloading = notes.wait_for("RELOADING=1", Duration::from_secs(10))?;
    ensure!(reloading.contains("MONOTONIC_USEC="), "{reloading:?}");
    let ready_again = notes.wait_for("READY=1", Duration::from_secs(30))?;
    ensure!(
        ready_again.contains("STATUS=serving: 2 of 2"),
        "{ready_again:?}"
    );
    ensure!(
        server
            .wait_event(0, "reload_complete", |_| true, Duration::from_secs(5))
            .is_some(),
        "READY=1 came before the reload completed"
    );

    server.signal(Signal::TTIN)?;
    let scaled = notes.wait_for("STATUS=", Duration::from_secs(10))?;
    ensure!(scaled.contains("of 3 workers"), "{scaled:?}");

    server.signal(Signal::TERM)?;
    notes.wait_for("STOPPING=1", Duration::from_secs(10))?;
    let status = server
        .wait_exit(Duration::from_secs(30))
        .context("no exit")?;
    ensure!(status.success(), "{status:?}");
    Ok(())
}

#[test]
fn watchdog_pings_only_while_every_worker_answers() -> Result<()> {
    let notes = Notifications::bind()?;
    // Pings every 200 ms; workers report every 300 ms and count as stalled after 0.9 s.
    let env = vec![
        format!("NOTIFY_SOCKET={}", notes.path.display()),
        "WATCHDOG_USEC=400000".to_owned(),
    ];
    let (server, _port) = start_with_env(&env, &["--workers", "2", "--heartbeat-timeout", "3"])?;
    notes.wait_for("READY=1", Duration::from_secs(10))?;
    notes.wait_for("WATCHDOG=1", Duration::from_secs(5))?;

    let worker = *server.worker_pids().values().next().context("no worker")?;
    let mark = server.log_mark();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(worker)?).context("pid")?,
        Signal::STOP,
    )?;
    server
        .wait_event(mark, "watchdog_withheld", |_| true, Duration::from_secs(5))
        .context("pings were not withheld for a stopped worker")?;
    // Drain pings that were already queued, then none may come while it is stopped.
    while notes.any_within("WATCHDOG=1", Duration::from_millis(50))? {}
    ensure!(
        !notes.any_within("WATCHDOG=1", Duration::from_millis(1000))?,
        "a WATCHDOG=1 was sent while a worker was stopped"
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(worker)?).context("pid")?,
        Signal::CONT,
    )?;
    notes.wait_for("WATCHDOG=1", Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn binary_upgrade_keeps_the_activated_socket_and_tells_systemd_the_new_main_pid() -> Result<()> {
    require_socket_activate()?;
    let notes = Notifications::bind()?;
    let env = [format!("NOTIFY_SOCKET={}", notes.path.display())];
    let (mut server, port) =
        activate_with_env("web", &env, &["--bind", "systemd:web", "--workers", "2"])?;
    ensure!(get(port, "/")?.0 == 200);
    notes.wait_for("READY=1", Duration::from_secs(30))?;
    let old = server.pid();
    let mark = server.log_mark();

    server.signal(Signal::USR2)?;
    // Stopped at the end whatever happens: the new supervisor is not our child.
    let guard = server.expect_new_supervisor(mark, old, Duration::from_secs(30))?;
    let new = guard.0;
    let reloading = notes.wait_for("RELOADING=1", Duration::from_secs(10))?;
    ensure!(reloading.contains("MONOTONIC_USEC="), "{reloading:?}");
    // The old supervisor names its successor as the main process, with READY=1.
    let handed = notes.wait_for("MAINPID=", Duration::from_secs(60))?;
    ensure!(handed.contains("READY=1"), "{handed:?}");
    ensure!(
        handed.lines().any(|line| line == format!("MAINPID={new}")),
        "{handed:?} does not name the new supervisor {new} (the old one is {old})"
    );
    let serving = server.expect_event(
        mark,
        "serving",
        |event| event.supervisor_pid() == Some(new),
        Duration::from_secs(30),
    )?;
    let serving = serving.field("listeners").unwrap_or_default();
    // It serves the socket systemd passed to the old one, by the same name.
    ensure!(
        serving.contains(&format!("systemd:web(127.0.0.1:{port})")),
        "{serving}"
    );
    let status = server
        .wait_exit(Duration::from_secs(30))
        .context("the old supervisor did not exit")?;
    ensure!(status.success(), "{status:?}");
    // The old one said nothing that would make systemd think the service stops.
    ensure!(
        !notes.any_within("STOPPING=1", Duration::from_millis(300))?,
        "STOPPING=1 sent during the upgrade"
    );
    for _ in 0..10 {
        ensure!(get(port, "/")?.0 == 200);
    }
    // The new supervisor is the one systemd stops.
    guard.stop()?;
    notes.wait_for("STOPPING=1", Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn socket_activation_without_bind_serves_the_passed_socket() -> Result<()> {
    require_socket_activate()?;
    // No --bind: the demo must serve what systemd passed, not its default 127.0.0.1:8080.
    let (mut server, port) = activate("web", &["--workers", "1"])?;
    let (status, body) = get(port, "/whoami")?;
    ensure!(
        status == 200 && body.starts_with("worker="),
        "{status} {body}"
    );
    let serving = server
        .wait_event(0, "serving", |_| true, Duration::from_secs(30))
        .context("no serving event")?;
    let serving = serving.field("listeners").unwrap_or_default();
    ensure!(
        serving.contains(&format!("systemd:web(127.0.0.1:{port})")) && !serving.contains(":8080"),
        "{serving}"
    );
    server.signal(Signal::TERM)?;
    let status = server
        .wait_exit(Duration::from_secs(10))
        .context("no exit")?;
    ensure!(status.success(), "{status:?}");
    Ok(())
}

#[test]
fn socket_activation_with_other_binds_warns_about_the_unused_socket() -> Result<()> {
    require_socket_activate()?;
    let path = unique_socket_path("unused");
    let bind = format!("unix:{}", path.display());
    let (mut server, port) = activate("web", &["--bind", &bind, "--workers", "1"])?;
    // Trigger the exec; the socket this client waits on is not served.
    let _client = TcpStream::connect(("127.0.0.1", port))?;
    let warning = server
        .wait_event(
            0,
            "systemd_socket_unused",
            |_| true,
            Duration::from_secs(30),
        )
        .with_context(|| format!("no warning:\n{}", server.log_text()))?;
    let addr = format!("127.0.0.1:{port}");
    ensure!(
        warning.level() == "WARN"
            && warning.field("listener.name") == Some("web")
            && warning.field("listener.addr") == Some(addr.as_str()),
        "{warning}"
    );
    server
        .wait_event(0, "serving", |_| true, Duration::from_secs(30))
        .context("no serving event")?;
    server.signal(Signal::TERM)?;
    let status = server
        .wait_exit(Duration::from_secs(10))
        .context("no exit")?;
    ensure!(status.success(), "{status:?}");
    Ok(())
}
