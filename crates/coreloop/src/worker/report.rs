//! The heartbeat and load report a worker sends its supervisor: live and closed
//! connections and resident memory. It is sent from inside the event loop, so a loop
//! blocked by a handler stops reporting, which is how the supervisor detects it.

use std::rc::Rc;
use std::time::Duration;

use coreloop_ipc::{Channel, Message};
use tracing::debug;

use super::tracker::Tracker;

/// After a connection closes, how long a worker without a loop clock waits for more closes
/// before it reports its load: one report per burst of closes rather than one per
/// connection. Every report wakes the supervisor, so it is kept coarse; the supervisor
/// learns that a worker is busy from its unread queue at once, so the count of closes can
/// lag this much.
const REPORT_COALESCE: Duration = Duration::from_millis(10);

/// Reports at once, then every `interval`. A worker with a loop clock publishes every
/// close there, where dispatch reads it without being woken, so its reports are the
/// heartbeat alone (`Tracker::closing` never completes); one without reports shortly after
/// connections close as well, so that the supervisor's view of its load stays fresh.
/// Returns when the channel fails.
///
/// Both timers stay registered with the runtime's timer wheel across reports and are only
/// moved (`reset`). Arming a timer that is due earlier than the runtime's next planned
/// wake-up makes tokio wake its own driver (an `eventfd` write, then one more
/// `epoll_wait`), so a timer dropped and created again per report costs that once more
/// per report; the heartbeat's deadline, in particular, then comes back as a new earliest
/// timer after every coalesced report.
pub(super) async fn report(channel: Rc<Channel>, tracker: Rc<Tracker>, interval: Duration) {
    let mut rss_kib = resident_kib();
    let heartbeat = tokio::time::sleep(interval);
    let coalesce = tokio::time::sleep(REPORT_COALESCE);
    tokio::pin!(heartbeat, coalesce);
    // Closes counted but not yet reported: the coalescing timer runs.
    let mut unreported = false;
    // The close count of the last report. The first goes out at once, so that the
    // supervisor's gauges (memory, say) hold a value from the start.
    let mut reported = tracker.closed();
    if !send(&channel, &tracker, reported, rss_kib).await {
        return;
    }
    loop {
        tokio::select! {
            () = heartbeat.as_mut() => {
                rss_kib = resident_kib();
                heartbeat.as_mut().reset(tokio::time::Instant::now() + interval);
            }
            () = coalesce.as_mut(), if unreported => {}
            () = tracker.closing(), if !unreported => {
                // A close made during the last coalescing window left its wake-up behind
                // (`Notify` keeps one), though the report counted it.
                if tracker.closed() == reported {
                    continue;
                }
                unreported = true;
                coalesce.as_mut().reset(tokio::time::Instant::now() + REPORT_COALESCE);
                continue;
            }
        }
        // This report carries every close so far; one after it wakes the loop again
        // (`Tracker::closing` remembers a close made while nobody waited).
        unreported = false;
        reported = tracker.closed();
        if !send(&channel, &tracker, reported, rss_kib).await {
            return;
        }
    }
}

/// Sends one `Status`; `false` if the channel failed.
async fn send(channel: &Channel, tracker: &Tracker, closed: u64, rss_kib: u64) -> bool {
    let status = Message::Status {
        live: u32::try_from(tracker.live()).unwrap_or(u32::MAX),
        closed,
        rss_kib,
    };
    match channel.send(&status, &[]).await {
        Ok(()) => true,
        Err(err) => {
            debug!(error = %err, "cannot report status");
            false
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
