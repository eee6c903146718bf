//! Stopping: SIGTERM drains in-flight requests and exits cleanly; SIGKILL of the
//! supervisor takes the workers down with it.

use std::io::Write as _;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use coreloop_integration_tests::{
    Close, Server, ServerConfig, connect, get, is_alive, parse_responses, read_until_close,
    wait_for_exit,
};
use rustix::process::Signal;

#[test]
fn sigterm_finishes_slow_request_then_exits() -> anyhow::Result<()> {
    let mut server = Server::start(ServerConfig::new(2).args(["--shutdown-timeout", "10"]))?;
    let workers = server.worker_pids();
    assert_eq!(workers.len(), 2);
    let port = server.port();

    // The slow request, on its own thread.
    let (sent_tx, sent_rx) = mpsc::channel();
    let slow = std::thread::spawn(move || -> anyhow::Result<_> {
        let mut stream = connect(port)?;
        stream.write_all(b"GET /sleep?ms=1500 HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let sent = Instant::now();
        sent_tx.send(())?;
        let reply = read_until_close(&mut stream)?;
        Ok((reply, sent.elapsed()))
    });
    sent_rx.recv_timeout(Duration::from_secs(10))?;
    // The accept queue is FIFO: once a connection opened after the slow one has been
    // answered, the supervisor has accepted and dispatched the slow one too. Only then
    // can SIGTERM no longer race with its accept.
    let (status, body) = get(port, "/")?;
    assert_eq!((status, body.as_str()), (200, "Hello, world!"));

    let mark = server.log_mark();
    server.signal(Signal::TERM)?;
    server.expect_event(
        mark,
        "signal",
        |event| event.field("signal") == Some("SIGTERM"),
        Duration::from_secs(10),
    )?;
    // Workers get `Drain` only after the listeners are closed.
    let (live, draining) = server.wait_draining(mark, workers.len())?;
    assert_eq!(
        live, 1,
        "exactly the slow request is in flight: {draining:?}"
    );

    // New connections are refused while the slow request is still being served.
    match connect(port) {
        Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}"),
        Ok(_) => panic!("a new connection was accepted after SIGTERM"),
    }

    let (reply, elapsed) = slow
        .join()
        .map_err(|_| anyhow::anyhow!("the slow request thread panicked"))??;
    assert_eq!(reply.close, Close::Eof, "the connection must end with FIN");
    let responses = parse_responses(&reply.bytes)?;
    assert_eq!(responses.len(), 1, "{}", reply.text());
    assert_eq!(responses[0].status, 200);
    assert_eq!(responses[0].text(), "/sleep 1500ms");
    assert!(
        elapsed >= Duration::from_millis(1500),
        "answered after {elapsed:?}"
    );

    let status = server
        .wait_exit(Duration::from_secs(15))
        .ok_or_else(|| anyhow::anyhow!("the supervisor did not exit after SIGTERM"))?;
    assert!(status.success(), "supervisor exit status {status}");
    // The exit status can be seen before the last log lines are read from the pipe.
    assert!(
        server
            .wait_event(mark, "stopped", |_| true, Duration::from_secs(5))
            .is_some(),
        "no `stopped` line"
    );
    for pid in workers.values() {
        assert!(
            wait_for_exit(*pid, Duration::from_secs(5)),
            "worker {pid} still running"
        );
        assert!(!is_alive(*pid));
    }
    Ok(())
}

#[test]
fn sigkill_of_supervisor_takes_workers_down() -> anyhow::Result<()> {
    let mut server = Server::start(ServerConfig::new(3))?;
    let workers = server.worker_pids();
    assert_eq!(workers.len(), 3);
    for pid in workers.values() {
        assert!(is_alive(*pid), "worker {pid} not running before the kill");
    }

    let mark = server.log_mark();
    let killed = Instant::now();
    server.signal(Signal::KILL)?;
    let deadline = killed + Duration::from_secs(2);
    for pid in workers.values() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            wait_for_exit(*pid, left),
            "worker {pid} still running {:?} after the supervisor was killed",
            killed.elapsed()
        );
    }
    eprintln!("all workers gone {:?} after SIGKILL", killed.elapsed());
    let status = server
        .wait_exit(Duration::from_secs(5))
        .ok_or_else(|| anyhow::anyhow!("the supervisor survived SIGKILL"))?;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    // Each worker noticed the closed channel and exited on purpose (not by a signal).
    let gone = server
        .wait_events(
            mark,
            "orphaned",
            workers.len(),
            |_| true,
            Duration::from_secs(5),
        )
        .ok_or_else(|| anyhow::anyhow!("not every worker logged `orphaned`"))?;
    assert_eq!(gone.len(), workers.len(), "{gone:?}");
    Ok(())
}
