//! What the supervisor tells the outside: systemd's `sd_notify` states, and the
//! `/metrics` and `/healthz` endpoint.

use std::rc::Rc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::{debug, info};

use super::Shared;

/// Pause after the metrics listener fails to accept.
const METRICS_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
use crate::dispatch::State;
use crate::metrics::{Reply, WorkerLabels};

impl Shared {
    /// `READY=1` with the current `STATUS=`: after boot and after a reload.
    pub(super) fn notify_ready(&self) {
        notify(&[NotifyState::Ready, NotifyState::Status(&self.status())]);
    }

    /// The `STATUS=` line for systemd.
    pub(super) fn status(&self) -> String {
        let ready = self.pool.count(|w| w.state() == State::Ready);
        format!("serving: {ready} of {} workers ready", self.target.get())
    }

    /// Brings the per-worker gauges up to date, then encodes the registry.
    pub(super) fn scrape(&self) -> String {
        let now = Instant::now();
        let workers = self.pool.workers.borrow();
        for w in workers.iter().filter(|w| w.state() != State::Starting) {
            let labels = WorkerLabels {
                worker: w.slot.get() as u32,
            };
            // What the worker publishes at every open and close, or its last report.
            let live = w.seat.clock.get().map_or(i64::from(w.live), |clock| {
                i64::try_from(clock.live()).unwrap_or(i64::MAX)
            });
            self.metrics.live.get_or_create(&labels).set(live);
            self.metrics
                .rss
                .get_or_create(&labels)
                .set(i64::try_from(w.rss_kib.saturating_mul(1024)).unwrap_or(i64::MAX));
            self.metrics
                .heartbeat_lag
                .get_or_create(&labels)
                .set(now.duration_since(w.last_report).as_secs_f64());
        }
        let ready = workers.iter().filter(|w| w.state() == State::Ready).count();
        drop(workers);
        self.metrics.workers_ready.set(ready as i64);
        self.metrics.encode()
    }
}

/// Serves `/metrics` and `/healthz`, one short connection at a time per task.
pub(super) async fn metrics_loop(shared: Rc<Shared>, listener: tokio::net::TcpListener) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, event = "metrics_serving", "serving metrics on /metrics and readiness on /healthz");
    }
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                debug!(error = %err, "metrics accept failed");
                tokio::time::sleep(METRICS_ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let shared = Rc::clone(&shared);
        tokio::task::spawn_local(async move {
            let reply = match crate::metrics::read_path(&mut stream).await.as_deref() {
                Some("/metrics") => Reply::Metrics(shared.scrape()),
                Some("/healthz") => Reply::Healthy(
                    !shared.pool.board.is_stopping()
                        && shared.pool.count(|w| w.state() == State::Ready) > 0,
                ),
                _ => Reply::NotFound,
            };
            crate::metrics::write_reply(&mut stream, reply).await;
        });
    }
}

/// Tells systemd (through `$NOTIFY_SOCKET`, when set) about a state change. Failures are
/// logged at debug level: the server works the same without a service manager.
pub(super) fn notify(state: &[NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(state) {
        debug!(error = %err, "sd_notify failed");
    }
}

/// `RELOADING=1` for systemd (which wants the monotonic time with it), then `READY=1`
/// when done.
pub(super) fn notify_reloading(status: &str) {
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        notify(&[NotifyState::Reloading, now, NotifyState::Status(status)]);
    }
}
