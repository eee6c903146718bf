//! Microbenchmark of the descriptor-forwarding path: nanoseconds per forwarded descriptor
//! at batch sizes 1, 8 and 32, for the `Channel` (encode, `sendmsg`, `recvmsg`, decode,
//! checks) against bare rustix `sendmsg`/`recvmsg` carrying the same descriptors with a
//! one-byte payload.
//!
//! ```text
//! cargo bench -p coreloop-ipc --bench fdpass
//! ```
//!
//! One thread sends and then receives on a socket pair, so the figures are the system
//! calls' and the kernel's cost without scheduler noise. Each figure is the median of 7
//! repetitions of 20,000 descriptors.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use coreloop_ipc::{
    Channel, ConnBatch, ConnMeta, MAX_BATCH, Message, PeerAddr, socketpair_cloexec,
};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

const FDS_PER_REP: usize = 20_000;
const REPS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn raw(batch: usize, payload: &[OwnedFd]) -> f64 {
    let (a, b) = socketpair_cloexec().expect("socketpair");
    let fds: Vec<BorrowedFd<'_>> = payload[..batch].iter().map(AsFd::as_fd).collect();
    let mut samples = Vec::new();
    for _ in 0..REPS {
        let start = Instant::now();
        for _ in 0..FDS_PER_REP / batch {
            let mut space =
                [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_BATCH))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
            rustix::net::sendmsg(&a, &[IoSlice::new(&[1])], &mut control, SendFlags::NOSIGNAL)
                .expect("sendmsg");
            let mut byte = [0u8; 1];
            let mut space =
                [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_BATCH))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            rustix::net::recvmsg(
                &b,
                &mut [IoSliceMut::new(&mut byte)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
            .expect("recvmsg");
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = message {
                    received.for_each(drop);
                }
            }
        }
        samples.push(start.elapsed().as_nanos() as f64 / FDS_PER_REP as f64);
    }
    median(samples)
}

fn channel(batch: usize, payload: &[OwnedFd], runtime: &tokio::runtime::Runtime) -> f64 {
    let _guard = runtime.enter();
    let (a, b) = socketpair_cloexec().expect("socketpair");
    let (a, b) = (
        Channel::from_fd(a).expect("channel"),
        Channel::from_fd(b).expect("channel"),
    );
    let fds: Vec<BorrowedFd<'_>> = payload[..batch].iter().map(AsFd::as_fd).collect();
    let mut conns = ConnBatch::new();
    for id in 0..batch as u64 {
        let peer = PeerAddr::Inet("127.0.0.1:40000".parse().expect("addr"));
        conns.push(ConnMeta {
            id,
            listener: 0,
            peer,
        });
    }
    let msg = Message::Conns(conns);
    let mut samples = Vec::new();
    for _ in 0..REPS {
        let start = Instant::now();
        for _ in 0..FDS_PER_REP / batch {
            a.try_send(&msg, &fds).expect("send");
            let (_, received) = b.try_recv().expect("recv").expect("a message");
            drop(received);
        }
        samples.push(start.elapsed().as_nanos() as f64 / FDS_PER_REP as f64);
    }
    median(samples)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let payload: Vec<OwnedFd> = (0..MAX_BATCH)
        .map(|_| rustix::pipe::pipe().expect("pipe").0)
        .collect();
    println!(
        "| fds per message | raw sendmsg/recvmsg, ns per fd | Channel, ns per fd | Channel / raw |"
    );
    println!("|---:|---:|---:|---:|");
    for batch in [1, 8, 32] {
        let raw = raw(batch, &payload);
        let chan = channel(batch, &payload, &runtime);
        println!("| {batch} | {raw:.0} | {chan:.0} | {:.2} |", chan / raw);
    }
}
