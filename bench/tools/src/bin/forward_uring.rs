//! The io_uring forwarding trial (issue #18): what the supervisor's forwarding costs per
//! connection with epoll and plain syscalls, as coreloop does it, against io_uring.
//!
//! One process stands in for the whole path. A TCP listener on 127.0.0.1:0; client threads
//! that `connect` and close at once (`SO_LINGER` 0, so no `TIME_WAIT` uses up the ports),
//! each waiting while more than `--window` connections are neither forwarded nor received,
//! so the accept queue never overflows; a worker thread that `recvmsg`s on the far end of a
//! `SOCK_SEQPACKET` socket pair and closes the descriptors it receives; and the forwarding
//! thread, which accepts and forwards in one of two ways:
//!
//! - `epoll`: what the supervisor does. `epoll_wait` on the listener, then non-blocking
//!   `accept4` (with the peer address) in bursts of up to 128 until `EAGAIN`, one `sendmsg`
//!   with `SCM_RIGHTS` per batch of up to 32 descriptors, and a `close` of each.
//! - `uring`: one multishot `IORING_OP_ACCEPT` (re-armed if it ends), then per batch of up
//!   to 32 accepted descriptors one `IORING_OP_SENDMSG` hard-linked to an `IORING_OP_CLOSE`
//!   for each (their completions skipped on success), all queued and submitted together
//!   with the wait for the next completions (`io_uring_enter`, `SINGLE_ISSUER` and
//!   `DEFER_TASKRUN`).
//!
//! A round ends after `--conns` connections have been forwarded, or after `--max-secs`.
//! It measures the forwarding thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`, and its
//! user/system split and voluntary context switches from `getrusage(RUSAGE_THREAD)`), the
//! CPU of the process that no thread of the benchmark accounts for (io_uring's `iou-wrk`
//! workers, should it punt work to them), the syscalls the forwarding thread makes (counted
//! where it makes them), connections per second, and descriptors per message. `--mode both`
//! runs the two in alternation, `--rounds` times each, and prints the medians and the
//! ratio uring ÷ epoll.
//!
//! ```text
//! cargo run --release -p coreloop-bench --bin forward_uring -- --mode both --rounds 7 \
//!     --conns 200000 --clients 2
//! ```
//!
//! Linux only. Loopback only.
#![deny(warnings)]

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// Descriptors per message at most, as `coreloop_ipc::MAX_BATCH`.
const MAX_BATCH: usize = 32;
/// Connections accepted per readiness at most, as the supervisor's accept loop.
const ACCEPT_BURST: usize = 128;
/// Messages in flight at once on the ring (each owns its `msghdr` until its completion).
const URING_SLOTS: usize = 8;
/// Submission queue entries: every slot's message with its closes fits.
const URING_ENTRIES: u32 = 512;
/// The listener's backlog (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;
/// `user_data` of the multishot accept; a message's is its slot index.
const UD_ACCEPT: u64 = u64::MAX;
/// `user_data` of a close (reported only when it fails).
const UD_CLOSE: u64 = u64::MAX - 1;

#[derive(Debug, Parser)]
#[command(about = "accept-and-forward cost per connection: epoll + syscalls against io_uring")]
struct Args {
    /// Which forwarding to run; `both` alternates them round by round.
    #[arg(long, default_value = "both", value_parser = ["epoll", "uring", "both"])]
    mode: String,
    /// Rounds per mode.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Connections per round.
    #[arg(long, default_value_t = 200_000)]
    conns: u64,
    /// Seconds a round may last at most.
    #[arg(long, default_value_t = 30)]
    max_secs: u64,
    /// Client threads (connect, then close).
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// Connections started but not yet received by the worker, at most (below the
    /// listener's backlog and `net.core.somaxconn`).
    #[arg(long, default_value_t = 256)]
    window: u64,
    /// Connections started per second, all clients together, on a fixed schedule; 0: as
    /// fast as the clients and the window allow.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// uring: let the wait return only after this many µs once one completion is there
    /// (`IORING_ENTER` min-wait, Linux 6.13), so that more connections make one batch; 0: off.
    #[arg(long, default_value_t = 0)]
    min_wait_us: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Epoll,
    Uring,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Epoll => "epoll",
            Mode::Uring => "uring",
        }
    }
}

/// What the forwarding thread counted.
#[derive(Debug, Default)]
struct Counts {
    forwarded: u64,
    messages: u64,
    syscalls: u64,
    errors: u64,
}

/// One round's measurements.
#[derive(Debug)]
struct Round {
    mode: Mode,
    conns: u64,
    secs: f64,
    /// Forwarding thread CPU, ns.
    fwd_ns: u64,
    fwd_user_us: u64,
    fwd_sys_us: u64,
    fwd_vcsw: u64,
    /// Process CPU no benchmark thread accounts for, ns.
    other_ns: u64,
    /// Worker thread CPU, ns.
    worker_ns: u64,
    counts: Counts,
}

impl Round {
    fn per_conn(&self, v: f64) -> f64 {
        v / self.conns.max(1) as f64
    }
    fn fwd_us(&self) -> f64 {
        self.per_conn(self.fwd_ns as f64 / 1e3)
    }
    fn other_us(&self) -> f64 {
        self.per_conn(self.other_ns as f64 / 1e3)
    }
    fn syscalls(&self) -> f64 {
        self.per_conn(self.counts.syscalls as f64)
    }
    fn rate(&self) -> f64 {
        self.conns as f64 / self.secs
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    report_uring_availability();
    let modes: &[Mode] = match args.mode.as_str() {
        "epoll" => &[Mode::Epoll],
        "uring" => &[Mode::Uring],
        _ => &[Mode::Epoll, Mode::Uring],
    };
    println!(
        "conns/round {}, clients {}, window {}, rate {}/s (0: unpaced), max {} s, min-wait {} µs",
        args.conns, args.clients, args.window, args.rate, args.max_secs, args.min_wait_us
    );
    println!(
        "{:>5} {:>5} {:>8} {:>7} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>7}",
        "round",
        "mode",
        "conns",
        "secs",
        "conns/s",
        "fwd µs",
        "user µs",
        "sys µs",
        "other µs",
        "wrk µs",
        "sysc/c",
        "fd/msg"
    );
    let mut rounds = Vec::new();
    for i in 0..args.rounds {
        // Alternate which mode goes first, so neither always runs on a warmer machine.
        let order: Vec<Mode> = if i % 2 == 0 {
            modes.to_vec()
        } else {
            modes.iter().rev().copied().collect()
        };
        for mode in order {
            let r = run_round(mode, &args).with_context(|| format!("{} round", mode.name()))?;
            let n = r.conns.max(1) as f64;
            println!(
                "{:>5} {:>5} {:>8} {:>7.2} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>9.3} {:>8.2} {:>8.2} {:>7.1}",
                i + 1,
                mode.name(),
                r.conns,
                r.secs,
                r.rate(),
                r.fwd_us(),
                r.fwd_user_us as f64 / n,
                r.fwd_sys_us as f64 / n,
                r.other_us(),
                r.worker_ns as f64 / 1e3 / n,
                r.syscalls(),
                r.counts.forwarded as f64 / r.counts.messages.max(1) as f64,
            );
            if r.counts.errors > 0 {
                println!("      ({} errors)", r.counts.errors);
            }
            if r.fwd_vcsw > 0 {
                println!(
                    "      voluntary context switches of the forwarding thread per conn: {:.3}",
                    r.fwd_vcsw as f64 / n
                );
            }
            rounds.push(r);
        }
    }
    println!();
    let mut medians = Vec::new();
    for &mode in modes {
        let mine: Vec<&Round> = rounds.iter().filter(|r| r.mode == mode).collect();
        let fwd = median(mine.iter().map(|r| r.fwd_us()).collect());
        let other = median(mine.iter().map(|r| r.other_us()).collect());
        let rate = median(mine.iter().map(|r| r.rate()).collect());
        let sys = median(mine.iter().map(|r| r.syscalls()).collect());
        println!(
            "median {} ({} rounds): forwarding CPU {fwd:.2} µs/conn (+{other:.3} unattributed), {rate:.0} conns/s, {sys:.2} syscalls/conn",
            mode.name(),
            mine.len()
        );
        medians.push((mode, fwd, rate, sys));
    }
    if let [(_, e_fwd, e_rate, e_sys), (_, u_fwd, u_rate, u_sys)] = medians[..] {
        // The ratio of the medians, and the median of the per-round ratios (the two modes of
        // one round ran back to back).
        let per_round: Vec<f64> = rounds
            .chunks(2)
            .filter_map(|pair| {
                let epoll = pair.iter().find(|r| r.mode == Mode::Epoll)?;
                let uring = pair.iter().find(|r| r.mode == Mode::Uring)?;
                Some(uring.fwd_us() / epoll.fwd_us())
            })
            .collect();
        println!(
            "uring ÷ epoll: forwarding CPU {:.2} (median of per-round ratios {:.2}), conns/s {:.2}, syscalls {:.2}",
            u_fwd / e_fwd,
            median(per_round),
            u_rate / e_rate,
            u_sys / e_sys
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Prints whether io_uring can be used here, and why not if it cannot.
fn report_uring_availability() {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|err| format!("unreadable ({err})"));
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Seccomp:"))
                .map(|l| l["Seccomp:".len()..].trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned());
    let ring = match IoUring::new(8) {
        Ok(_) => "a ring can be set up".to_owned(),
        Err(err) => format!("setting up a ring fails: {err}"),
    };
    println!("io_uring: kernel.io_uring_disabled = {disabled}, seccomp mode {seccomp}, {ring}");
}

/// State the client, worker and forwarding threads share.
#[derive(Debug)]
struct Shared {
    /// Connections a client has claimed (started or about to).
    started: AtomicU64,
    /// Descriptors the worker has received.
    received: AtomicU64,
    stop: AtomicBool,
}

fn run_round(mode: Mode, args: &Args) -> anyhow::Result<Round> {
    // A backlog well above the window: the accept queue never overflows (an overflow drops
    // the SYN, and the client retries only a second later).
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    let listener = TcpListener::from(socket);
    let addr = listener.local_addr()?;
    let (sup_end, worker_end) = seqpacket_pair()?;
    let shared = Arc::new(Shared {
        started: AtomicU64::new(0),
        received: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let conns = args.conns;
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);

    let worker = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || worker_loop(worker_end, &shared))
    };
    let process_before = cpu_ns(libc::CLOCK_PROCESS_CPUTIME_ID);
    let forwarder = {
        let min_wait_us = args.min_wait_us;
        std::thread::spawn(move || -> anyhow::Result<_> {
            let ru_before = rusage_thread();
            let cpu_before = cpu_ns(libc::CLOCK_THREAD_CPUTIME_ID);
            let start = Instant::now();
            let counts = match mode {
                Mode::Epoll => forward_epoll(&listener, &sup_end, conns, deadline)?,
                Mode::Uring => forward_uring(&listener, &sup_end, conns, deadline, min_wait_us)?,
            };
            let secs = start.elapsed().as_secs_f64();
            let cpu = cpu_ns(libc::CLOCK_THREAD_CPUTIME_ID) - cpu_before;
            let ru = rusage_thread();
            drop(sup_end);
            Ok((counts, secs, cpu, ru_before, ru))
        })
    };
    // Clients start once the forwarding thread runs; it is waiting on the listener by then
    // or soon after, and the window bounds what queues meanwhile.
    let start = Instant::now();
    let clients: Vec<_> = (0..args.clients)
        .map(|_| {
            let shared = Arc::clone(&shared);
            let load = Load {
                addr,
                conns,
                window: args.window,
                rate: args.rate,
                start,
                deadline,
            };
            std::thread::spawn(move || client_loop(&load, &shared))
        })
        .collect();

    let forwarded = forwarder.join().expect("forwarding thread panicked");
    shared.stop.store(true, Ordering::SeqCst);
    let mut threads_ns = 0;
    for c in clients {
        threads_ns += c.join().expect("client thread panicked");
    }
    let worker_ns = worker.join().expect("worker thread panicked")?;
    let (counts, secs, fwd_ns, ru0, ru1) = forwarded?;
    let process_ns = cpu_ns(libc::CLOCK_PROCESS_CPUTIME_ID) - process_before;
    threads_ns += worker_ns + fwd_ns;
    if counts.forwarded < conns {
        println!(
            "      {} round stopped at {} connections after {secs:.1} s",
            mode.name(),
            counts.forwarded
        );
    }
    if counts.forwarded == 0 {
        bail!("nothing forwarded");
    }
    Ok(Round {
        mode,
        conns: counts.forwarded,
        secs,
        fwd_ns,
        fwd_user_us: tv_us(ru1.ru_utime) - tv_us(ru0.ru_utime),
        fwd_sys_us: tv_us(ru1.ru_stime) - tv_us(ru0.ru_stime),
        fwd_vcsw: (ru1.ru_nvcsw - ru0.ru_nvcsw) as u64,
        // The main thread only waits meanwhile; what is left is io_uring's own threads, if
        // any (and the main thread's few µs).
        other_ns: process_ns.saturating_sub(threads_ns),
        worker_ns,
        counts,
    })
}

/// What a client thread does.
#[derive(Debug)]
struct Load {
    addr: SocketAddr,
    conns: u64,
    window: u64,
    /// Per second, all clients together (0: unpaced).
    rate: u64,
    start: Instant,
    deadline: Instant,
}

/// Connects and closes until `conns` connections have been started (by all clients) or the
/// deadline. Returns the thread's CPU time, ns.
fn client_loop(load: &Load, shared: &Shared) -> u64 {
    let &Load {
        addr,
        conns,
        window,
        rate,
        start,
        deadline,
    } = load;
    let before = cpu_ns(libc::CLOCK_THREAD_CPUTIME_ID);
    let mut checks = 0u32;
    loop {
        let n = shared.started.fetch_add(1, Ordering::Relaxed);
        if n >= conns {
            break;
        }
        while n.saturating_sub(shared.received.load(Ordering::Relaxed)) >= window {
            if shared.stop.load(Ordering::Relaxed) {
                return cpu_ns(libc::CLOCK_THREAD_CPUTIME_ID) - before;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        if let Some(offset) = (n * 1_000_000_000).checked_div(rate) {
            let due = start + Duration::from_nanos(offset);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        checks += 1;
        if checks % 256 == 0 && (shared.stop.load(Ordering::Relaxed) || Instant::now() > deadline) {
            break;
        }
        let Ok(sock) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        // An RST at close: no TIME_WAIT on either side, so the ports last any number of
        // rounds. The server side is accepted and forwarded all the same.
        let _ = sock.set_linger(Some(Duration::ZERO));
        if sock.connect(&addr.into()).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    cpu_ns(libc::CLOCK_THREAD_CPUTIME_ID) - before
}

/// Receives batches and closes what they carry, until the supervisor's end closes.
/// Returns the thread's CPU time, ns.
fn worker_loop(end: OwnedFd, shared: &Shared) -> anyhow::Result<u64> {
    let before = cpu_ns(libc::CLOCK_THREAD_CPUTIME_ID);
    let mut msg = Box::new(FdMsg::new());
    loop {
        let got = msg.recv(end.as_raw_fd()).context("worker recvmsg")?;
        let Some(fds) = got else { break };
        for &fd in fds {
            close_fd(fd);
        }
        shared
            .received
            .fetch_add(fds.len() as u64, Ordering::Relaxed);
    }
    Ok(cpu_ns(libc::CLOCK_THREAD_CPUTIME_ID) - before)
}

/// What coreloop's supervisor does, in plain syscalls.
fn forward_epoll(
    listener: &TcpListener,
    chan: &OwnedFd,
    conns: u64,
    deadline: Instant,
) -> anyhow::Result<Counts> {
    let lfd = listener.as_raw_fd();
    let mut c = Counts::default();
    // SAFETY: epoll_create1 takes no pointers.
    let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).context("epoll_create1")?;
    // SAFETY: `ep` was just returned by epoll_create1 and nothing else owns it.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 0,
    };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call; both fds are open.
    cvt(unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, lfd, &mut ev) })
        .context("epoll_ctl")?;
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
    let mut msg = Box::new(FdMsg::new());
    let mut batch: Vec<RawFd> = Vec::with_capacity(MAX_BATCH);
    while c.forwarded < conns {
        c.syscalls += 1;
        // SAFETY: `events` is valid for writes of `events.len()` entries.
        let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), 8, 100) };
        if n <= 0 {
            if Instant::now() > deadline {
                break;
            }
            continue;
        }
        for _ in 0..ACCEPT_BURST {
            let mut addr = std::mem::MaybeUninit::<libc::sockaddr_storage>::uninit();
            let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            c.syscalls += 1;
            // SAFETY: `addr` and `len` are valid for writes; the kernel writes at most `len`
            // bytes of address.
            let fd = unsafe {
                libc::accept4(
                    lfd,
                    addr.as_mut_ptr().cast(),
                    &mut len,
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::WouldBlock {
                    c.errors += 1;
                }
                break;
            }
            batch.push(fd);
            if batch.len() == MAX_BATCH {
                send_and_close(chan, &mut msg, &mut batch, &mut c)?;
            }
        }
        if !batch.is_empty() {
            send_and_close(chan, &mut msg, &mut batch, &mut c)?;
        }
    }
    Ok(c)
}

fn send_and_close(
    chan: &OwnedFd,
    msg: &mut FdMsg,
    batch: &mut Vec<RawFd>,
    c: &mut Counts,
) -> anyhow::Result<()> {
    msg.fill(batch);
    c.syscalls += 1;
    c.messages += 1;
    // SAFETY: `msg.hdr` points into `msg`, which is borrowed (so stays put) for the call.
    let r = unsafe { libc::sendmsg(chan.as_raw_fd(), &msg.hdr, libc::MSG_NOSIGNAL) };
    if r < 0 {
        bail!("sendmsg: {}", io::Error::last_os_error());
    }
    c.forwarded += batch.len() as u64;
    for fd in batch.drain(..) {
        c.syscalls += 1;
        close_fd(fd);
    }
    Ok(())
}

/// The same path through one io_uring.
fn forward_uring(
    listener: &TcpListener,
    chan: &OwnedFd,
    conns: u64,
    deadline: Instant,
    min_wait_us: u32,
) -> anyhow::Result<Counts> {
    let lfd = types::Fd(listener.as_raw_fd());
    let cfd = types::Fd(chan.as_raw_fd());
    let mut c = Counts::default();
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(URING_ENTRIES)
        .context("io_uring_setup")?;
    // Each slot's msghdr must stay where it is until its SENDMSG completes: the slots are
    // boxed once and never moved.
    let mut slots: Vec<Box<FdMsg>> = (0..URING_SLOTS).map(|_| Box::new(FdMsg::new())).collect();
    let mut f = Flight {
        free: (0..URING_SLOTS).rev().collect(),
        in_flight: vec![0usize; URING_SLOTS],
        accepted: Vec::with_capacity(4 * ACCEPT_BURST),
        accept_armed: false,
        sent_total: 0,
    };
    let mut chain: Vec<squeue::Entry> = Vec::with_capacity(MAX_BATCH + 1);
    let timeout = types::Timespec::new().nsec(100_000_000);

    loop {
        if !f.accept_armed && f.sent_total + (f.accepted.len() as u64) < conns {
            let accept = opcode::AcceptMulti::new(lfd)
                .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
                .build()
                .user_data(UD_ACCEPT);
            push_all(&mut ring, std::slice::from_ref(&accept), &mut c)?;
            f.accept_armed = true;
        }
        // Forward what has been accepted: per batch a SENDMSG, hard-linked to the closes,
        // which thus run after it whether or not it succeeds.
        while !f.accepted.is_empty() {
            let Some(slot) = f.free.pop() else { break };
            let n = f.accepted.len().min(MAX_BATCH);
            let batch: Vec<RawFd> = f.accepted.drain(..n).collect();
            let msg = &mut slots[slot];
            msg.fill(&batch);
            chain.clear();
            chain.push(
                opcode::SendMsg::new(cfd, &msg.hdr)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build()
                    .flags(squeue::Flags::IO_HARDLINK)
                    .user_data(slot as u64),
            );
            for (i, &fd) in batch.iter().enumerate() {
                let mut flags = squeue::Flags::SKIP_SUCCESS;
                if i + 1 < batch.len() {
                    flags |= squeue::Flags::IO_HARDLINK;
                }
                chain.push(
                    opcode::Close::new(types::Fd(fd))
                        .build()
                        .flags(flags)
                        .user_data(UD_CLOSE),
                );
            }
            push_all(&mut ring, &chain, &mut c)?;
            f.in_flight[slot] = n;
            c.messages += 1;
        }
        if f.sent_total >= conns && f.free.len() == URING_SLOTS {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        // Submit the queue and wait for at least one completion.
        let mut args = types::SubmitArgs::new().timespec(&timeout);
        if min_wait_us > 0 {
            args = args.min_wait_usec(min_wait_us);
        }
        c.syscalls += 1;
        submit_and_wait(&ring, &args)?;
        f.reap(&mut ring, &mut c);
    }
    // Past the deadline: every SENDMSG must complete before its slot goes.
    let give_up = Instant::now() + Duration::from_secs(2);
    while f.free.len() < URING_SLOTS && Instant::now() < give_up {
        submit_and_wait(&ring, &types::SubmitArgs::new().timespec(&timeout))?;
        f.reap(&mut ring, &mut c);
    }
    if f.free.len() < URING_SLOTS {
        // A SENDMSG never completed: its msghdr must outlive the ring.
        std::mem::forget(slots);
    }
    // Whatever was accepted but not forwarded: closed here.
    for fd in f.accepted {
        close_fd(fd);
    }
    Ok(c)
}

/// Submits the queue and waits for one completion or the timeout in `args` (one
/// `io_uring_enter`); a timeout or a signal is not an error.
fn submit_and_wait(ring: &IoUring, args: &types::SubmitArgs<'_, '_>) -> anyhow::Result<()> {
    match ring.submitter().submit_with_args(1, args) {
        Ok(_) => Ok(()),
        Err(err) if matches!(err.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => Ok(()),
        Err(err) => Err(err).context("io_uring_enter"),
    }
}

/// What the io_uring loop has in flight: descriptors accepted and not yet forwarded, the
/// multishot accept, the message slots.
struct Flight {
    /// Accepted, not yet in a message.
    accepted: Vec<RawFd>,
    /// The multishot accept is queued and has not ended.
    accept_armed: bool,
    /// Descriptors in each slot's message (0: free).
    in_flight: Vec<usize>,
    free: Vec<usize>,
    /// Descriptors whose message has completed, sent or not.
    sent_total: u64,
}

impl Flight {
    /// Takes the completions: accepted descriptors into `accepted`, finished messages'
    /// slots back into `free`.
    fn reap(&mut self, ring: &mut IoUring, c: &mut Counts) {
        for cqe in ring.completion() {
            match cqe.user_data() {
                UD_ACCEPT => {
                    if cqe.result() >= 0 {
                        self.accepted.push(cqe.result());
                    } else {
                        c.errors += 1;
                    }
                    if !cqueue::more(cqe.flags()) {
                        self.accept_armed = false;
                    }
                }
                UD_CLOSE => c.errors += 1,
                slot => {
                    let slot = slot as usize;
                    if cqe.result() < 0 {
                        c.errors += 1;
                    } else {
                        c.forwarded += self.in_flight[slot] as u64;
                    }
                    self.sent_total += self.in_flight[slot] as u64;
                    self.in_flight[slot] = 0;
                    self.free.push(slot);
                }
            }
        }
    }
}

/// Queues `entries` together (a link chain must not be split), submitting first if the
/// queue lacks room.
fn push_all(ring: &mut IoUring, entries: &[squeue::Entry], c: &mut Counts) -> anyhow::Result<()> {
    let room = {
        let sq = ring.submission();
        sq.capacity() - sq.len()
    };
    if room < entries.len() {
        c.syscalls += 1;
        ring.submit().context("io_uring_enter (submit)")?;
    }
    // SAFETY: every pointer an entry carries (a SENDMSG's msghdr, which points into the same
    // boxed FdMsg) stays valid until that entry's completion: its slot is not reused or
    // freed before then, and the ring is dropped only after every SENDMSG has completed.
    unsafe { ring.submission().push_multiple(entries) }
        .map_err(|_| anyhow::anyhow!("submission queue full"))?;
    Ok(())
}

/// A `SOCK_SEQPACKET` message carrying up to `MAX_BATCH` descriptors (and a 1-byte payload),
/// for sending or receiving. Its `hdr` points into itself: keep it boxed.
struct FdMsg {
    hdr: libc::msghdr,
    iov: libc::iovec,
    byte: u8,
    cmsg: Cmsg,
}

/// A control message with room for `MAX_BATCH + 4` descriptors, laid out as `CMSG_DATA`
/// expects on Linux: the header, then the data at the header's aligned size.
#[repr(C)]
struct Cmsg {
    hdr: libc::cmsghdr,
    fds: [RawFd; MAX_BATCH + 4],
}

const CMSG_HDR: usize = size_of::<libc::cmsghdr>();

impl FdMsg {
    fn new() -> Self {
        FdMsg {
            hdr: libc::msghdr {
                msg_name: std::ptr::null_mut(),
                msg_namelen: 0,
                msg_iov: std::ptr::null_mut(),
                msg_iovlen: 0,
                msg_control: std::ptr::null_mut(),
                msg_controllen: 0,
                msg_flags: 0,
            },
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            byte: 0,
            cmsg: Cmsg {
                hdr: libc::cmsghdr {
                    cmsg_len: 0,
                    cmsg_level: 0,
                    cmsg_type: 0,
                },
                fds: [-1; MAX_BATCH + 4],
            },
        }
    }

    /// Points `hdr` at this message's own buffers, with `control` bytes of control room.
    fn point(&mut self, control: usize) {
        self.iov.iov_base = (&raw mut self.byte).cast();
        self.iov.iov_len = 1;
        self.hdr.msg_iov = &raw mut self.iov;
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_control = (&raw mut self.cmsg).cast();
        self.hdr.msg_controllen = control as _;
        self.hdr.msg_flags = 0;
    }

    /// Makes this a message carrying `fds`.
    fn fill(&mut self, fds: &[RawFd]) {
        let data = std::mem::size_of_val(fds);
        self.cmsg.hdr.cmsg_len = (CMSG_HDR + data) as _;
        self.cmsg.hdr.cmsg_level = libc::SOL_SOCKET;
        self.cmsg.hdr.cmsg_type = libc::SCM_RIGHTS;
        self.cmsg.fds[..fds.len()].copy_from_slice(fds);
        self.point(CMSG_HDR + data.next_multiple_of(size_of::<usize>()));
    }

    /// Receives one message: its descriptors, or `None` at the end of the stream.
    fn recv(&mut self, fd: RawFd) -> io::Result<Option<&[RawFd]>> {
        self.point(size_of::<Cmsg>());
        // SAFETY: `hdr` points into `self`, borrowed mutably for the call; the kernel writes
        // at most `msg_controllen` bytes of control data and 1 byte of payload.
        let r = unsafe { libc::recvmsg(fd, &mut self.hdr, libc::MSG_CMSG_CLOEXEC) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if r == 0 && self.hdr.msg_controllen == 0 {
            return Ok(None);
        }
        if self.hdr.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other("control data truncated"));
        }
        if self.hdr.msg_controllen < CMSG_HDR
            || self.cmsg.hdr.cmsg_level != libc::SOL_SOCKET
            || self.cmsg.hdr.cmsg_type != libc::SCM_RIGHTS
        {
            return Ok(Some(&[]));
        }
        let n = (self.cmsg.hdr.cmsg_len - CMSG_HDR) / size_of::<RawFd>();
        Ok(Some(&self.cmsg.fds[..n]))
    }
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is valid for writes of two ints.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair returned two new descriptors that nothing else owns.
    let a = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above, the second one.
    let b = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((a, b))
}

fn close_fd(fd: RawFd) {
    // SAFETY: the caller owns `fd` (returned by accept4, the ring or recvmsg) and closes it
    // exactly once.
    unsafe { libc::close(fd) };
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cpu_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for writes.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn rusage_thread() -> libc::rusage {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is valid for writes of a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr()) };
    // SAFETY: zero-initialised, then filled by getrusage; all-zero is a valid rusage.
    unsafe { ru.assume_init() }
}

fn tv_us(tv: libc::timeval) -> u64 {
    tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64
}
