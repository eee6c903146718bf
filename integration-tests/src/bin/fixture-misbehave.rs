//! Fixture: a coreloop server whose workers attack their own supervisor on request, from
//! inside a real worker process, the way a buggy or compromised handler could.
//!
//! Requests (HTTP/1.1, keep-alive unless asked to close; `/misbehave` closes its
//! connection):
//! - `/whoami`: `worker=<id> pid=<pid>`.
//! - `/misbehave?what=KIND`: answers `worker=<id> pid=<pid> KEY=VALUE…`, then does KIND:
//!   - `truncate-clock`: `ftruncate` the loop clock's memfd to 0 (before answering;
//!     `truncate=ok`, or `truncate=errnoN`);
//!   - `forged-clock`: send a second `LoopClock`, an unsealed memfd, then truncate it;
//!   - `garbage-flood`: send undecodable datagrams on the channel for 2 s;
//!   - `status-flood`: send valid `Status` reports as fast as the socket takes them, 2 s;
//!   - `oversized`: send one 64 KiB datagram;
//!   - `fds-wrong-kind`: send a `Status` carrying a descriptor;
//!   - `fds-too-many`: send a `Status` carrying 200 descriptors;
//!   - `close-channel`: shut down the sending side of its channel, and keep running;
//!   - `stop-reading`: block its event loop for 60 s while a thread forges a `Status`
//!     every 100 ms (a worker that reports but reads nothing);
//!   - `forge-reading`: the same, but the thread also claims, in the loop clock, a loop
//!     asleep, no handler poll, and `u64::MAX` bytes read, connections closed and
//!     connections open, and its `Status` a huge close count (a worker that looks idle
//!     and empty to dispatch, and reads nothing);
//!   - `ignore-drain`: when the worker starts draining, block its event loop for an hour;
//!   - `fork-and-die`: fork a child that sleeps forever holding every descriptor
//!     (`child=<pid>`), then exit 3.
//! - With `--forge-clock-marker PATH`: a worker that starts while PATH exists removes it,
//!   and sends an unsealed loop clock, which it then truncates, before anything else.
//!
//! The worker finds its channel as the one `SOCK_SEQPACKET` socket among its descriptors,
//! and the loop clock as the memfd named `coreloop-loop-clock`, through `/proc/self/fd`,
//! as any code in the process could.

use std::io::{IoSlice, Write as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use coreloop::Conn;
use coreloop_integration_tests::fixture::{self, CommonArgs};
use coreloop_ipc::{MAX_MESSAGE_LEN, Message};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketType};
use tokio::io::AsyncWriteExt as _;

#[derive(Debug, Parser)]
#[command(about = "coreloop test fixture: workers that attack their supervisor")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// A worker that starts while this file exists removes it and forges its loop clock.
    #[arg(long, value_name = "PATH")]
    forge_clock_marker: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    fixture::init_logging();
    if let Some(marker) = &args.forge_clock_marker {
        if coreloop::is_worker() && std::fs::remove_file(marker).is_ok() {
            // Before `run()`, fd 0 is still the channel the supervisor gave this worker.
            forge_clock(std::io::stdin().as_fd())?;
        }
    }
    args.common
        .builder()?
        .serve(|worker| {
            let worker = worker.get();
            move |conn: Conn| serve(conn, worker)
        })
        .run()?;
    Ok(())
}

async fn serve(mut conn: Conn, worker: usize) -> std::io::Result<()> {
    while let Some(head) = fixture::read_head(conn.stream_mut()).await? {
        let whoami = fixture::whoami(worker);
        let Some(what) = head.target.strip_prefix("/misbehave?what=") else {
            reply(&mut conn, &whoami, !head.close).await?;
            if head.close {
                return Ok(());
            }
            continue;
        };
        let mut body = whoami;
        if what == "truncate-clock" {
            body.push_str(&format!(" truncate={}", truncate_clock()));
        }
        let child = (what == "fork-and-die").then(fork_sleeper);
        if let Some(child) = child {
            body.push_str(&format!(" child={child}"));
        }
        reply(&mut conn, &body, false).await?;
        misbehave(&conn, what);
        return Ok(());
    }
    Ok(())
}

async fn reply(conn: &mut Conn, body: &str, keep_alive: bool) -> std::io::Result<()> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
        body.len()
    );
    let stream = conn.stream_mut();
    stream.write_all(response.as_bytes()).await?;
    if keep_alive {
        stream.flush().await
    } else {
        stream.shutdown().await
    }
}

/// Does `what`, after the answer is out.
fn misbehave(conn: &Conn, what: &str) {
    let channel = channel();
    let status = encode(&Message::Status {
        live: 0,
        closed: 0,
        rss_kib: 0,
    });
    match what {
        "truncate-clock" => {}
        "forged-clock" => {
            let _ = forge_clock(channel);
        }
        "garbage-flood" => flood(channel, &[0xEE; 64], Duration::from_secs(2)),
        "status-flood" => flood(channel, &status, Duration::from_secs(2)),
        "oversized" => {
            let _ = send(channel, &vec![0u8; 64 * 1024], &[]);
        }
        "fds-wrong-kind" => {
            let null = std::fs::File::open("/dev/null").expect("/dev/null");
            let _ = send(channel, &status, &[null.as_fd()]);
        }
        "fds-too-many" => {
            let null = std::fs::File::open("/dev/null").expect("/dev/null");
            let fds = vec![null.as_fd(); 200];
            let _ = send(channel, &status, &fds);
        }
        "close-channel" => {
            let _ = rustix::net::shutdown(channel, rustix::net::Shutdown::Write);
        }
        "stop-reading" => {
            let forged = channel.try_clone_to_owned().expect("dup of the channel");
            std::thread::spawn(move || {
                for _ in 0..600 {
                    let _ = send(forged.as_fd(), &status, &[]);
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            // Blocks the event loop: this handler's poll never returns.
            std::thread::sleep(Duration::from_secs(60));
        }
        "forge-reading" => {
            let forged = channel.try_clone_to_owned().expect("dup of the channel");
            let clock = loop_clock()
                .expect("a loop clock")
                .expect("the loop clock opens for writing");
            let idle = encode(&Message::Status {
                live: 0,
                closed: 1 << 40,
                rss_kib: 0,
            });
            std::thread::spawn(move || forge_reading(&forged, &clock, &idle));
            // Blocks the event loop: this handler's poll never returns.
            std::thread::sleep(Duration::from_secs(60));
        }
        "ignore-drain" => {
            let draining = conn.shutdown_signal();
            tokio::task::spawn_local(async move {
                draining.triggered().await;
                std::thread::sleep(Duration::from_secs(3600));
            });
        }
        "fork-and-die" => std::process::exit(3),
        other => eprintln!("fixture-misbehave: unknown misbehaviour {other:?}"),
    }
}

/// The worker's end of its channel: the one `SOCK_SEQPACKET` socket it holds.
fn channel() -> BorrowedFd<'static> {
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let Some(raw) = entry
            .ok()
            .and_then(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only inspected and used while the worker runs; the
        // worker's channel (the one it matches) stays open for the whole life of the
        // process, and this fixture is the process's own code.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        if rustix::net::sockopt::socket_type(fd) == Ok(SocketType::SEQPACKET) {
            return fd;
        }
    }
    panic!("no seqpacket socket: not a coreloop worker");
}

fn encode(msg: &Message) -> Vec<u8> {
    let mut buf = [0u8; MAX_MESSAGE_LEN];
    let len = msg.encode(&mut buf).expect("encode");
    buf[..len].to_vec()
}

fn send(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> rustix::io::Result<usize> {
    let mut space = vec![
        std::mem::MaybeUninit::<u8>::uninit();
        rustix::cmsg_space!(ScmRights(fds.len().max(1)))
    ];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    rustix::net::sendmsg(
        fd,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
}

/// Sends `bytes` again and again for `time`, or until the supervisor closes the channel.
fn flood(fd: BorrowedFd<'_>, bytes: &[u8], time: Duration) {
    let end = Instant::now() + time;
    while Instant::now() < end {
        match send(fd, bytes, &[]) {
            Ok(_) => {}
            Err(rustix::io::Errno::AGAIN) => std::thread::yield_now(),
            Err(_) => return,
        }
    }
}

/// Sends the supervisor a loop clock it must not trust (a memfd that is not sealed), then
/// truncates it: a supervisor that mapped it would die of SIGBUS at its next read.
fn forge_clock(channel: BorrowedFd<'_>) -> std::io::Result<()> {
    let fd: OwnedFd = rustix::fs::memfd_create("forged-clock", rustix::fs::MemfdFlags::CLOEXEC)?;
    rustix::fs::ftruncate(&fd, 16)?;
    send(channel, &encode(&Message::LoopClock), &[fd.as_fd()])?;
    // Let the supervisor take it before the mapping's backing goes away.
    std::thread::sleep(Duration::from_millis(100));
    rustix::fs::ftruncate(&fd, 0)?;
    Ok(())
}

/// Truncates this worker's own loop clock; says what the kernel answered.
fn truncate_clock() -> String {
    match loop_clock() {
        Some(Ok(file)) => match file.set_len(0) {
            Ok(()) => "ok".into(),
            Err(err) => format!("errno{}", err.raw_os_error().unwrap_or(0)),
        },
        Some(Err(err)) => format!("errno{}", err.raw_os_error().unwrap_or(0)),
        None => "no-clock".into(),
    }
}

/// This worker's loop clock, opened anew for reading and writing through `/proc/self/fd`,
/// as any code in the process could; `None` if it has none.
fn loop_clock() -> Option<std::io::Result<std::fs::File>> {
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let Ok(entry) = entry else { continue };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target
            .to_string_lossy()
            .starts_with("/memfd:coreloop-loop-clock")
        {
            return Some(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(entry.path()),
            );
        }
    }
    None
}

/// For 60 s: every millisecond, writes into the loop clock a loop asleep (0), no handler
/// poll (0), and `u64::MAX` bytes read, connections closed and connections open (the
/// largest lies, which the supervisor must bound); every 100 ms, sends `status`.
fn forge_reading(channel: &OwnedFd, clock: &std::fs::File, status: &[u8]) {
    use std::os::unix::fs::FileExt as _;
    let mut words = [0u8; 40];
    for word in words[16..].chunks_mut(8) {
        word.copy_from_slice(&u64::MAX.to_ne_bytes());
    }
    for tick in 0..60_000 {
        let _ = clock.write_at(&words, 0);
        if tick % 100 == 0 {
            let _ = send(channel.as_fd(), status, &[]);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Forks a child that holds every descriptor of this worker and sleeps until killed;
/// returns its pid.
fn fork_sleeper() -> i32 {
    let _ = std::io::stderr().flush();
    // SAFETY: the child only calls `pause`, which is async-signal-safe, in a loop, and
    // never returns into Rust code that could touch state copied from other threads.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        loop {
            // SAFETY: `pause` has no preconditions.
            unsafe { libc::pause() };
        }
    }
    pid
}
