//! A descriptor attached to a message that does not carry one is closed by the receiver,
//! not leaked. In its own test binary: it counts this process's open descriptors, which
//! other tests running in parallel threads would disturb.

use std::io::IoSlice;
use std::os::fd::AsFd;

use coreloop_ipc::{Channel, Message, socketpair_cloexec};
use tokio_seqpacket::UnixSeqpacket;
use tokio_seqpacket::ancillary::AncillaryMessageWriter;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "current_thread")]
async fn stray_and_extra_descriptors_are_closed() {
    let (a, b) = socketpair_cloexec().unwrap();
    let raw = UnixSeqpacket::try_from(a).unwrap();
    let worker = Channel::from_fd(b).unwrap();
    let before = open_fds();
    for _ in 0..100 {
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        let mut buf = [0u8; 64];
        let len = Message::Retiring.encode(&mut buf).unwrap();
        let mut control = [0u8; 64];
        let mut anc = AncillaryMessageWriter::new(&mut control);
        anc.add_fds([writer.as_fd(), reader.as_fd()])
            .map_err(|_| "add_fds")
            .unwrap();
        raw.send_vectored_with_ancillary(&[IoSlice::new(&buf[..len])], &mut anc)
            .await
            .unwrap();
        drop((reader, writer));
        assert!(worker.recv().await.is_err());
    }
    assert_eq!(open_fds(), before, "descriptors leaked");
}
