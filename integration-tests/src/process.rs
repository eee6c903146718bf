//! The operating system's view of processes, outside any server: `/proc` readers
//! ([`proc_stat`], [`children_of`], [`is_alive`], [`fd_count`], resource usage and
//! limits), pidfds ([`wait_pidfd`], [`wait_for_exit`]), signals ([`kill`]), the guard of
//! a supervisor a binary upgrade started ([`NewSupervisor`]), and the random TCP ports
//! and socket paths tests listen on.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal};

// ---------------------------------------------------------------------------------------
// Ports and unique names
// ---------------------------------------------------------------------------------------

/// A random number, different on every call (std's randomly keyed SipHash over a counter,
/// the time and the PID: no extra dependency, good enough to spread test ports).
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut hasher);
    std::process::id().hash(&mut hasher);
    std::time::SystemTime::now().hash(&mut hasher);
    hasher.finish()
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(str::parse::<u16>);
            match (parts.next(), parts.next()) {
                (Some(Ok(low)), Some(Ok(high))) => Some((low, high)),
                _ => None,
            }
        })
        .unwrap_or((32768, 60999))
}

/// A random TCP port outside the ephemeral range, so that no client socket (this test's
/// or another's) is bound to it by `connect`. It is not reserved: the caller must cope
/// with "address in use" (see [`Server::start`](crate::Server::start)).
pub fn random_port() -> u16 {
    let (low, high) = ephemeral_port_range();
    // Prefer [10000, low) (the usual case), else above the range, else anything >= 1024.
    let (start, end) = if low > 11_000 {
        (10_000u32, u32::from(low))
    } else if high < 64_000 {
        (u32::from(high) + 1, 65_536)
    } else {
        (1024, 65_536)
    };
    let span = u64::from(end - start);
    let port = u64::from(start) + random_u64() % span;
    u16::try_from(port).unwrap_or(10_000)
}

/// A path for a unix socket that no other test uses:
/// `/tmp/coreloop-it-<tag>-<pid>-<random>.sock`.
pub fn unique_socket_path(tag: &str) -> PathBuf {
    PathBuf::from(format!(
        "/tmp/coreloop-it-{tag}-{}-{:x}.sock",
        std::process::id(),
        random_u64() & 0xffff_ffff
    ))
}

// ---------------------------------------------------------------------------------------
// /proc, pidfds and signals
// ---------------------------------------------------------------------------------------

/// The fields of `/proc/<pid>/stat` the tests need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Process ID.
    pub pid: u32,
    /// State letter: `R`, `S`, `D`, `Z` (zombie), `X` (dead), …
    pub state: char,
    /// Parent's PID.
    pub ppid: u32,
}

/// Parses `/proc/<pid>/stat`; `None` if the process does not exist.
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    let after = &text[text.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(ProcStat { pid, state, ppid })
}

/// Every process whose parent is `ppid`, zombies included.
pub fn children_of(ppid: u32) -> Vec<ProcStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: Vec<ProcStat> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_stat)
        .filter(|stat| stat.ppid == ppid)
        .collect();
    children.sort_by_key(|stat| stat.pid);
    children
}

/// The PIDs of the running (not zombie) children of `ppid`.
pub fn live_children(ppid: u32) -> Vec<u32> {
    children_of(ppid)
        .into_iter()
        .filter(|child| !matches!(child.state, 'Z' | 'X'))
        .map(|child| child.pid)
        .collect()
}

/// The PIDs of the zombie children of `ppid` (exited, not reaped).
pub fn zombie_children(ppid: u32) -> Vec<u32> {
    children_of(ppid)
        .into_iter()
        .filter(|child| child.state == 'Z')
        .map(|child| child.pid)
        .collect()
}

/// Whether `pid` is gone for good as a child of `ppid`: no such process, or a process that
/// is neither ours nor a zombie (the PID was reused).
pub fn reaped(pid: u32, ppid: u32) -> bool {
    proc_stat(pid).is_none_or(|stat| stat.ppid != ppid && stat.state != 'Z')
}

/// Waits until `pid` is stopped (state `T`, e.g. after SIGSTOP); `false` after `timeout`.
/// Polls `/proc`, yielding in between: no event tells another process's stop.
pub fn wait_for_stopped(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if proc_stat(pid).is_some_and(|stat| stat.state == 'T') {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

/// Whether `pid` exists and is not a zombie (`Z`) or dead (`X`). Orphans may never be
/// reaped in this sandbox, so a zombie counts as gone.
pub fn is_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|stat| !matches!(stat.state, 'Z' | 'X'))
}

/// Live processes (not zombies) whose command line has an argument containing `needle`.
pub fn processes_with_arg(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                cmdline
                    .split(|&b| b == 0)
                    .any(|arg| String::from_utf8_lossy(arg).contains(needle))
            })
        })
        .filter(|pid| *pid != std::process::id() && is_alive(*pid))
        .collect()
}

/// A pidfd for `pid`; `None` if there is no such process (or the call failed).
pub(crate) fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    let pid = Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok()
}

/// Waits until the process behind `pidfd` has exited (zombie or reaped): `poll` for
/// `POLLIN`, no sleeping. `false` after `timeout`.
pub fn wait_pidfd(pidfd: &impl AsFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(spec) = Timespec::try_from(remaining) else {
            return false;
        };
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&spec)) {
            Ok(0) if remaining.is_zero() => return false,
            Ok(0) => {}
            Ok(_) => return true,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
    }
}

/// A supervisor a binary upgrade started: not this test's child, so no [`Server`](crate::Server) stops
/// it. Dropped, it is SIGKILLed if still alive (its workers follow, as they do whenever
/// their supervisor dies) and waited for.
#[derive(Debug)]
pub struct NewSupervisor(pub u32);

impl NewSupervisor {
    /// Stops it with SIGTERM and waits (up to 30 s) for it to exit.
    ///
    /// # Errors
    ///
    /// The signal failed, or it did not exit in time.
    pub fn stop(self) -> Result<()> {
        kill(self.0, Signal::TERM)?;
        ensure!(
            wait_for_exit(self.0, Duration::from_secs(30)),
            "the new supervisor {} did not stop on SIGTERM",
            self.0
        );
        Ok(())
    }
}

impl Drop for NewSupervisor {
    fn drop(&mut self) {
        if is_alive(self.0) {
            let _ = kill(self.0, Signal::KILL);
            wait_for_exit(self.0, Duration::from_secs(10));
        }
    }
}

/// Waits up to `timeout` for process `pid` to exit, through a pidfd. `true` if it has
/// exited (or never existed, or is a zombie).
pub fn wait_for_exit(pid: u32, timeout: Duration) -> bool {
    match open_pidfd(pid) {
        // ESRCH: no such process any more.
        None => true,
        Some(fd) => wait_pidfd(&fd, timeout),
    }
}

/// Sends `signal` to `pid` (e.g. SIGKILL to a worker).
///
/// # Errors
///
/// The `kill(2)` error.
pub fn kill(pid: u32, signal: Signal) -> Result<()> {
    let raw = i32::try_from(pid).context("pid out of range")?;
    let pid = Pid::from_raw(raw).context("pid 0")?;
    rustix::process::kill_process(pid, signal).with_context(|| format!("kill({raw}, {signal:?})"))
}

/// Number of open file descriptors of `pid` (entries of `/proc/<pid>/fd`).
///
/// # Errors
///
/// When `/proc/<pid>/fd` cannot be read.
pub fn fd_count(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Open descriptors of `pid` and what they point to (`socket:[123]`, `pipe:[…]`, paths).
///
/// # Errors
///
/// When `/proc/<pid>/fd` cannot be read.
pub fn fd_targets(pid: u32) -> io::Result<BTreeMap<u32, String>> {
    let mut targets = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        // The descriptor may close between readdir and readlink.
        if let Ok(target) = std::fs::read_link(entry.path()) {
            targets.insert(fd, target.to_string_lossy().into_owned());
        }
    }
    Ok(targets)
}

/// The inode of the server side of the IPv4 TCP connection between `server_port` (local)
/// and `client_port` (remote), from `/proc/net/tcp`. Every process holding a descriptor
/// for that socket shows it as `socket:[inode]` in `/proc/<pid>/fd`.
pub fn server_socket_inode(server_port: u16, client_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port_of = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
    };
    table.lines().skip(1).find_map(|row| {
        let fields: Vec<&str> = row.split_whitespace().collect();
        let (local, remote, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
        (port_of(local)? == server_port && port_of(remote)? == client_port)
            .then(|| inode.parse().ok())
            .flatten()
            .filter(|inode| *inode != 0)
    })
}

// ---------------------------------------------------------------------------------------
// Resource usage and limits
// ---------------------------------------------------------------------------------------

/// Clock ticks per second of the CPU times in `/proc/<pid>/stat` (`USER_HZ`, which Linux
/// fixes at 100 for user space whatever the kernel's own tick rate).
pub const USER_HZ: u64 = 100;

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`: resident now, `VmHWM`: the peak so far),
/// in KiB; `None` if the process or the field does not exist.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// CPU time used so far by `pid` (all its threads, user plus system), in [`USER_HZ`]
/// ticks, from fields 14 and 15 of `/proc/<pid>/stat`.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    let mut fields = text[text.rfind(')')? + 1..].split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The `Max open files` soft and hard limits of `pid`, from `/proc/<pid>/limits`
/// (`None` for "unlimited" or when unreadable).
pub fn nofile_limits(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    let mut values = line["Max open files".len()..].split_whitespace();
    Some((values.next()?.parse().ok()?, values.next()?.parse().ok()?))
}
