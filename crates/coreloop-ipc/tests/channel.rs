//! Channel behaviour over a real socket pair: descriptors travel and stay close-on-exec,
//! a closed peer reads as `None`, a full queue is `Full` rather than a hang, and bad
//! datagrams are errors that leave the channel usable.

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use coreloop_ipc::{
    Channel, ChannelError, ConnBatch, ConnMeta, MAX_BATCH, Message, PeerAddr, Queue, TrySendError,
    socketpair_cloexec,
};
use tokio_seqpacket::UnixSeqpacket;
use tokio_seqpacket::ancillary::AncillaryMessageWriter;

fn pair() -> (Channel, Channel) {
    let (a, b) = socketpair_cloexec().unwrap();
    (Channel::from_fd(a).unwrap(), Channel::from_fd(b).unwrap())
}

fn raw_pair() -> (UnixSeqpacket, Channel) {
    let (a, b) = socketpair_cloexec().unwrap();
    (
        UnixSeqpacket::try_from(a).unwrap(),
        Channel::from_fd(b).unwrap(),
    )
}

fn is_cloexec(fd: &OwnedFd) -> bool {
    rustix::io::fcntl_getfd(fd)
        .unwrap()
        .contains(rustix::io::FdFlags::CLOEXEC)
}

#[tokio::test(flavor = "current_thread")]
async fn a_connection_and_its_descriptor_arrive_together() {
    let (sup, worker) = pair();
    let (reader, writer) = rustix::pipe::pipe().unwrap();
    let peer = PeerAddr::Inet("[::1]:4242".parse().unwrap());
    let msg = Message::Conns(ConnBatch::one(ConnMeta {
        id: 9,
        listener: 3,
        peer,
    }));
    sup.send(&msg, &[writer.as_fd()]).await.unwrap();
    drop(writer); // the supervisor closes its copy once sent

    let (got, fds) = worker.recv().await.unwrap().unwrap();
    assert_eq!(got, msg);
    assert_eq!(fds.len(), 1);
    let fd = fds.into_iter().next().expect("Conns carries a descriptor");
    assert!(
        is_cloexec(&fd),
        "received descriptors must be close-on-exec"
    );
    let mut sent = std::fs::File::from(fd);
    sent.write_all(b"through the channel").unwrap();
    drop(sent);
    let mut text = String::new();
    std::fs::File::from(reader)
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "through the channel");
}

#[tokio::test(flavor = "current_thread")]
async fn closed_peer_reads_as_none() {
    let (sup, worker) = pair();
    sup.send(&Message::Drain { timeout_ms: 5 }, &[])
        .await
        .unwrap();
    drop(sup);
    assert_eq!(
        worker.recv().await.unwrap().unwrap().0,
        Message::Drain { timeout_ms: 5 }
    );
    assert!(worker.recv().await.unwrap().is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_queue_is_reported_not_waited_on() {
    let (sup, worker) = pair();
    let mut sent = 0usize;
    loop {
        match sup.try_send(&Message::Ready { pid: 1 }, &[]) {
            Ok(()) => sent += 1,
            Err(TrySendError::Full) => break,
            Err(err) => panic!("unexpected error {err}"),
        }
        assert!(sent < 1_000_000, "queue never filled");
    }
    assert!(sent > 0);
    // Once the peer reads, the sender is woken and may send again (the kernel reports a
    // unix socket writable only once most of its buffer is free, so read them all).
    for _ in 0..sent {
        worker.recv().await.unwrap().unwrap();
    }
    std::future::poll_fn(|cx| sup.poll_send_ready(cx))
        .await
        .unwrap();
    sup.try_send(&Message::Ready { pid: 2 }, &[]).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_message_without_its_descriptor_is_refused() {
    let (sup, _worker) = pair();
    let msg = Message::Conns(ConnBatch::one(ConnMeta {
        id: 1,
        listener: 0,
        peer: PeerAddr::Unknown,
    }));
    let err = sup.send(&msg, &[]).await.unwrap_err();
    assert!(
        matches!(
            err,
            ChannelError::FdCount {
                expected: 1,
                got: 0,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_oversized_datagram_is_truncated_and_the_channel_survives() {
    let (raw, worker) = raw_pair();
    raw.send(&[1u8; 4096]).await.unwrap();
    let mut buf = [0u8; 64];
    let len = Message::Ready { pid: 5 }.encode(&mut buf).unwrap();
    raw.send(&buf[..len]).await.unwrap();

    let err = worker.recv().await.unwrap_err();
    assert!(
        matches!(err, ChannelError::Truncated { data: true, .. }),
        "{err}"
    );
    assert_eq!(
        worker.recv().await.unwrap().unwrap().0,
        Message::Ready { pid: 5 }
    );
}

#[tokio::test(flavor = "current_thread")]
async fn garbage_is_a_protocol_error() {
    let (raw, worker) = raw_pair();
    raw.send(&[7, 1, 2, 3]).await.unwrap();
    let err = worker.recv().await.unwrap_err();
    assert!(matches!(err, ChannelError::Protocol(_)), "{err}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_stray_descriptor_is_an_error() {
    let (raw, worker) = raw_pair();
    let (_reader, writer) = rustix::pipe::pipe().unwrap();
    let mut buf = [0u8; 64];
    let len = Message::Ready { pid: 5 }.encode(&mut buf).unwrap();
    let mut control = [0u8; 64];
    let mut anc = AncillaryMessageWriter::new(&mut control);
    anc.add_fds([writer.as_fd()])
        .map_err(|_| "add_fds")
        .unwrap();
    raw.send_vectored_with_ancillary(&[IoSlice::new(&buf[..len])], &mut anc)
        .await
        .unwrap();
    let err = worker.recv().await.unwrap_err();
    assert!(
        matches!(
            err,
            ChannelError::FdCount {
                expected: 0,
                got: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_batch_travels_in_order_in_one_message() {
    let (sup, worker) = pair();
    let mut batch = ConnBatch::new();
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for id in 0..MAX_BATCH as u64 {
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        readers.push(reader);
        writers.push(writer);
        assert!(batch.push(ConnMeta {
            id,
            listener: 0,
            peer: PeerAddr::Unix
        }));
    }
    let borrowed: Vec<_> = writers.iter().map(|w| w.as_fd()).collect();
    sup.send(&Message::Conns(batch), &borrowed).await.unwrap();
    drop(borrowed);
    drop(writers);
    let (got, fds) = worker.recv().await.unwrap().unwrap();
    assert_eq!(got, Message::Conns(batch));
    // The i-th descriptor is the i-th connection's: write its id, read it back in order.
    for (id, fd) in fds.into_iter().enumerate() {
        std::fs::File::from(fd)
            .write_all(format!("{id}").as_bytes())
            .unwrap();
    }
    for (id, reader) in readers.into_iter().enumerate() {
        let mut text = String::new();
        std::fs::File::from(reader)
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, id.to_string());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn what_a_dead_reader_left_queued_can_be_taken_back() {
    let (sup_end, worker_end) = socketpair_cloexec().unwrap();
    let kept = worker_end.try_clone().unwrap();
    let sup = Channel::from_fd(sup_end).unwrap();
    let (reader, writer) = rustix::pipe::pipe().unwrap();
    let msg = Message::Conns(ConnBatch::one(ConnMeta {
        id: 4,
        listener: 0,
        peer: PeerAddr::Unknown,
    }));
    sup.send(&msg, &[writer.as_fd()]).await.unwrap();
    drop(writer);
    drop(worker_end); // the worker dies without reading
    let queue = Queue::new(kept);
    assert!(queue.unread_bytes().unwrap() > 0);
    let (got, fds) = queue
        .try_recv()
        .unwrap()
        .expect("the message is still queued");
    assert_eq!(got, msg);
    let fd = fds.into_iter().next().unwrap();
    std::fs::File::from(fd).write_all(b"rescued").unwrap();
    let mut text = String::new();
    std::fs::File::from(reader)
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "rescued");
    assert!(queue.try_recv().unwrap().is_none());
    assert_eq!(queue.unread_bytes().unwrap(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn the_queue_tells_whether_the_reader_has_read_everything() {
    let (sup_end, worker_end) = socketpair_cloexec().unwrap();
    let queue = Queue::new(worker_end.try_clone().unwrap());
    let (sup, worker) = (
        Channel::from_fd(sup_end).unwrap(),
        Channel::from_fd(worker_end).unwrap(),
    );
    assert_eq!(queue.unread_bytes().unwrap(), 0);
    sup.send(&Message::Drain { timeout_ms: 1 }, &[])
        .await
        .unwrap();
    sup.send(&Message::Drain { timeout_ms: 2 }, &[])
        .await
        .unwrap();
    let two = queue.unread_bytes().unwrap();
    assert!(two > 0);
    assert_eq!(sup.sent_bytes(), two, "sent so far is all unread");
    assert_eq!(worker.received_bytes(), 0);
    worker.recv().await.unwrap().expect("first message");
    let one = queue.unread_bytes().unwrap();
    assert!(one > 0 && one < two, "{one} of {two}");
    assert_eq!(
        worker.received_bytes(),
        two - one,
        "what the reader counts is what left its queue"
    );
    assert_eq!(
        sup.sent_bytes(),
        two,
        "reading does not change what was sent"
    );
    worker.recv().await.unwrap().expect("second message");
    assert_eq!(queue.unread_bytes().unwrap(), 0);
    assert_eq!(worker.received_bytes(), sup.sent_bytes());
    // Sends that fail count nothing: one refused before the call (a descriptor too many),
    // then the kernel's "full" once the queue is filled. What was sent is then exactly
    // what was read (`two`) plus what is queued.
    assert!(matches!(
        sup.try_send(&Message::Drain { timeout_ms: 3 }, &[worker.as_fd()]),
        Err(TrySendError::Failed(_))
    ));
    assert_eq!(sup.sent_bytes(), two);
    let mut refused = 0;
    while refused < 3 {
        match sup.try_send(&Message::Drain { timeout_ms: 4 }, &[]) {
            Ok(()) => refused = 0,
            Err(TrySendError::Full) => refused += 1,
            Err(err) => panic!("{err:?}"),
        }
    }
    let queued = queue.unread_bytes().unwrap();
    assert!(queued > 0);
    assert_eq!(sup.sent_bytes(), two + queued);
}

#[tokio::test(flavor = "current_thread")]
async fn a_ticker_ticks_until_stopped_and_again_once_restarted() {
    let ticker = coreloop_ipc::Ticker::new().unwrap();
    ticker.start(std::time::Duration::from_micros(100)).unwrap();
    assert!(ticker.tick().await.unwrap() >= 1);
    assert!(ticker.tick().await.unwrap() >= 1);
    ticker.stop().unwrap();
    ticker.start(std::time::Duration::from_micros(100)).unwrap();
    assert!(ticker.tick().await.unwrap() >= 1);
}
