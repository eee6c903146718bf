//! Stopping workers: one drain, a graceful stop of all within the shutdown timeout, and an
//! immediate stop.

use coreloop_ipc::Message;
use tracing::{debug, warn};

use super::Shared;
use super::spawn::kill_worker;

impl Shared {
    /// Sends `Drain` to one worker; it takes nothing more and exits when done.
    pub(super) async fn drain_worker(&self, pid: u32) {
        let Some(channel) = self.pool.mark_draining(pid) else {
            return;
        };
        self.pool.board.changed.notify_waiters();
        let drain = Message::Drain {
            timeout_ms: self.timeout_ms(),
        };
        let deadline = self.pool.drain_grace;
        match tokio::time::timeout(deadline, channel.send(&drain, &[])).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => debug!(worker.pid = pid, error = %err, "cannot send Drain"),
            Err(_) => warn!(worker.pid = pid, "worker does not read its channel"),
        }
    }

    /// Graceful stop: `Drain` to every worker, wait for all to exit, SIGKILL stragglers
    /// after the shutdown timeout.
    pub(super) async fn drain_all(&self) {
        let deadline = tokio::time::Instant::now() + self.pool.drain_grace;
        let pids: Vec<u32> = self.pool.workers.borrow().iter().map(|w| w.pid).collect();
        let drains = pids
            .into_iter()
            .map(|pid| async move { self.drain_worker(pid).await });
        let all = async {
            for drain in drains {
                // Sends are quick unless a worker's queue is full; bounded by the deadline.
                drain.await;
            }
            self.all_exited().await;
        };
        if tokio::time::timeout_at(deadline, all).await.is_err() {
            warn!(
                live = self.pool.workers.borrow().len(),
                event = "shutdown_timeout",
                "shutdown timeout passed; killing remaining workers"
            );
            self.stop_now().await;
        }
    }

    pub(super) async fn all_exited(&self) {
        loop {
            let changed = self.pool.board.changed.notified();
            if self.pool.workers.borrow().is_empty() {
                return;
            }
            changed.await;
        }
    }

    /// SIGKILL every worker and wait until all are reaped.
    pub(super) async fn stop_now(&self) {
        self.pool.board.stop();
        for worker in self.pool.workers.borrow().iter() {
            kill_worker(worker.pid);
        }
        self.all_exited().await;
    }
}
