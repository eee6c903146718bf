//! The heartbeat and load report a worker sends its supervisor: live and closed
//! connections and resident memory. It is sent from inside the event loop, so a loop
//! blocked by a handler stops reporting, which is how the supervisor detects it.

use std::rc::Rc;
use std::time::Duration;

use coreloop_ipc::{Channel, Message};
use tracing::debug;

use super::tracker::Tracker;

/// After a connection closes, how long the worker waits for more closes before it reports
/// its load: one report per burst of closes rather than one per connection. Under a
/// steady stream of short connections this is the report rate, and every report wakes the
/// supervisor, so it is kept coarse. The supervisor learns that a worker is busy from its
/// unread queue at once, so the count of closes can lag this much.
const REPORT_COALESCE: Duration = Duration::from_millis(10);

/// Reports every `interval`, and shortly after connections close so the supervisor's view
/// of the load stays fresh. Returns when the channel fails.
pub(super) async fn report(channel: Rc<Channel>, tracker: Rc<Tracker>, interval: Duration) {
    let mut rss_kib = resident_kib();
    let mut next_rss = tokio::time::Instant::now() + interval;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next_rss) => {
                rss_kib = resident_kib();
                next_rss = tokio::time::Instant::now() + interval;
            }
            () = tracker.closing() => tokio::time::sleep(REPORT_COALESCE).await,
        }
        let status = Message::Status {
            live: u32::try_from(tracker.live()).unwrap_or(u32::MAX),
            closed: tracker.closed(),
            rss_kib,
        };
        if let Err(err) = channel.send(&status, &[]).await {
            debug!(error = %err, "cannot report status");
            return;
        }
    }
}

/// Resident set size from `/proc/self/statm`, in KiB; 0 if unreadable.
fn resident_kib() -> u64 {
    let page_kib = rustix::param::page_size() as u64 / 1024;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|text| {
            text.split_whitespace()
                .nth(1)
                .and_then(|pages| pages.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * page_kib)
}
