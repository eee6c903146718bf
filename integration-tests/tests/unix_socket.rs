//! A unix-socket listener serves requests, and its socket file is removed on SIGTERM.

use std::os::unix::fs::FileTypeExt as _;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use coreloop_integration_tests::{IO_TIMEOUT, Server, ServerConfig, get_over, unique_socket_path};
use rustix::process::Signal;

#[test]
fn unix_listener_serves_and_socket_file_is_removed() -> anyhow::Result<()> {
    let path = unique_socket_path("unix");
    let mut server = Server::start(ServerConfig::new(2).unix(&path).without_tcp())?;
    let meta = std::fs::symlink_metadata(&path)?;
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        path.display()
    );

    for _ in 0..4 {
        let mut stream = UnixStream::connect(&path)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let (status, body) = get_over(&mut stream, "/")?;
        assert_eq!((status, body.as_str()), (200, "Hello, world!"));
    }

    server.signal(Signal::TERM)?;
    let status = server
        .wait_exit(Duration::from_secs(15))
        .ok_or_else(|| anyhow::anyhow!("the server did not exit after SIGTERM"))?;
    assert!(status.success(), "exit status {status}");
    assert!(
        std::fs::symlink_metadata(&path).is_err(),
        "{} still exists after shutdown",
        path.display()
    );
    Ok(())
}
