//! The load picture of a worker: how busy its event loop is, from the loop clock it shares
//! with the supervisor and from how long its queue of connections has waited unread, and
//! the thresholds that rank workers by it. Read at every dispatch, so it costs a few
//! atomic loads of memory the worker shares (no system call) and no message.

use std::time::{Duration, Instant};

use super::Busy;

/// What the supervisor last saw of a worker reading its queue (see [`Worker::look`](super::pool::Worker::look)).
#[derive(Debug, Default)]
pub(crate) struct Reading {
    /// Bytes it had read then.
    pub(crate) read: u64,
    /// Since when what is queued has waited with nothing read; `None` while the queue was
    /// empty.
    pub(crate) waiting_since: Option<Instant>,
}

impl Reading {
    /// Takes a look at `now`, when `sent` bytes have been sent to the worker in all and
    /// `unread` of them are still queued. Returns how long the queue has waited with
    /// nothing read, or `None` if it is empty.
    pub(crate) fn observe(&mut self, now: Instant, sent: u64, unread: u64) -> Option<Duration> {
        if unread == 0 {
            self.read = sent;
            self.waiting_since = None;
            return None;
        }
        let read = sent.saturating_sub(unread);
        if read != self.read {
            self.read = read;
            self.waiting_since = Some(now);
        }
        let since = *self.waiting_since.get_or_insert(now);
        Some(now.saturating_duration_since(since))
    }
}

/// How busy a worker is, from how long its loop has been awake, how long the handler
/// poll now running has run, and how long its queue has waited unread (`None`: empty).
/// Also returns how long it has looked stuck, for ranking workers that all do.
///
/// Stuck: one handler poll, or a queue left unread, for [`STUCK`]: a handler that does
/// not yield, or a worker that is not running at all (stopped, or not scheduled). A loop
/// merely awake that long is not stuck: on a loaded machine a healthy worker is often
/// runnable without running for milliseconds, and must still rank above a stopped one.
/// Lagging: the same for [`LAGGING`]. Busy: a poll that has run longer than a short
/// request's, anything unread, or a loop awake a while.
pub(crate) fn classify(
    awake: Duration,
    in_poll: Option<Duration>,
    waiting: Option<Duration>,
) -> (Busy, Duration) {
    let stuck_for = in_poll.unwrap_or_default().max(waiting.unwrap_or_default());
    let busy = if stuck_for >= STUCK {
        Busy::Stuck
    } else if stuck_for >= LAGGING {
        Busy::Lagging
    } else if awake >= AWAKE_BUSY
        || in_poll.is_some_and(|poll| poll >= POLL_BUSY)
        || waiting.is_some()
    {
        Busy::Working
    } else {
        Busy::Idle
    };
    (busy, stuck_for)
}

/// A worker whose event loop has been awake this long without going back to sleep is
/// busy: connections go to others while any is free (see [`Shard::try_dispatch_all`](super::send::Shard::try_dispatch_all)).
/// Short requests keep a loop awake for tens of microseconds.
pub(crate) const AWAKE_BUSY: Duration = Duration::from_micros(500);
/// A worker inside one handler poll, or with a queue left unread, for this long lags: it
/// gets nothing while another is merely busy. A burst of short requests takes less.
pub(crate) const LAGGING: Duration = Duration::from_millis(1);
/// A worker inside one handler poll, or with a queue left unread, for this long is stuck:
/// it gets nothing while a less busy worker has room (see [`classify`]).
pub(crate) const STUCK: Duration = Duration::from_millis(5);
/// A worker inside one handler poll that has run this long is busy: a connection sent now
/// would wait for a poll of unknown length. A short request's poll (read, parse, answer)
/// takes a few microseconds.
pub(crate) const POLL_BUSY: Duration = Duration::from_micros(100);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Busy;

    const US: Duration = Duration::from_micros(1);

    fn busy(awake: Duration, in_poll: Option<Duration>, waiting: Option<Duration>) -> Busy {
        classify(awake, in_poll, waiting).0
    }

    #[test]
    fn a_long_handler_poll_is_busy_before_the_loop_has_been_awake_long() {
        // 150 µs into a handler that does not yield: the loop has not been awake long
        // enough to look busy, but the poll has run far longer than a short request's.
        assert_eq!(busy(150 * US, Some(150 * US), None), Busy::Working);
        assert_eq!(busy(150 * US, Some(POLL_BUSY), None), Busy::Working);
        // The same loop between polls, or in a short one, takes connections.
        assert_eq!(busy(150 * US, None, None), Busy::Idle);
        assert_eq!(busy(150 * US, Some(20 * US), None), Busy::Idle);
        // One poll that long is stuck, and stuck for as long as it has run.
        assert_eq!(classify(STUCK, Some(STUCK), None), (Busy::Stuck, STUCK));
    }

    #[test]
    fn a_worker_preempted_for_long_ranks_above_one_that_reads_nothing() {
        // A stopped worker: asleep as far as its clock knows, its queue unread for 40 ms.
        let (stopped, stopped_for) = classify(Duration::ZERO, None, Some(40_000 * US));
        assert_eq!(stopped, Busy::Stuck);
        // A healthy one, runnable but not scheduled for 8 ms in the middle of a short poll.
        let preempted = classify(8_000 * US, Some(8_000 * US), None);
        assert!(
            preempted < (stopped, stopped_for),
            "{preempted:?} vs {stopped:?}"
        );
        // Awake that long between polls, with nothing waiting, is only busy.
        assert_eq!(busy(8_000 * US, None, None), Busy::Working);
    }

    #[test]
    fn a_queue_unread_for_a_millisecond_lags_behind_one_being_read() {
        // Both have something unread; one has read nothing for 3 ms (stopped a moment
        // ago, or in a long handler), the other is reading.
        let waiting = busy(Duration::ZERO, None, Some(3_000 * US));
        let reading = busy(200 * US, None, Some(Duration::ZERO));
        assert_eq!((reading, waiting), (Busy::Working, Busy::Lagging));
        assert_eq!(busy(Duration::ZERO, Some(LAGGING), None), Busy::Lagging);
        assert_eq!(
            busy(Duration::ZERO, None, Some(LAGGING - US)),
            Busy::Working
        );
    }

    #[test]
    fn the_loop_clock_and_the_queue_rank_the_rest() {
        assert_eq!(busy(AWAKE_BUSY, None, None), Busy::Working);
        assert_eq!(
            busy(Duration::ZERO, None, Some(Duration::ZERO)),
            Busy::Working
        );
        assert_eq!(busy(Duration::ZERO, None, None), Busy::Idle);
        assert_eq!(
            classify(Duration::ZERO, Some(US), Some(STUCK)),
            (Busy::Stuck, STUCK)
        );
    }

    #[test]
    fn a_queue_waits_only_while_nothing_in_it_is_read() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut reading = Reading::default();
        // Empty: nothing waits.
        assert_eq!(reading.observe(t0, 0, 0), None);
        // 300 bytes sent and none read: waiting since first seen.
        assert_eq!(reading.observe(ms(1), 300, 300), Some(Duration::ZERO));
        assert_eq!(
            reading.observe(ms(7), 300, 300),
            Some(Duration::from_millis(6))
        );
        // 100 read, 200 more sent: reading, so the wait starts again.
        assert_eq!(reading.observe(ms(8), 500, 400), Some(Duration::ZERO));
        assert_eq!(
            reading.observe(ms(9), 500, 400),
            Some(Duration::from_millis(1))
        );
        // A steady reader that never empties its queue never waits long.
        for n in 0..20 {
            let sent = 600 + 100 * n;
            let waited = reading.observe(ms(10 + n), sent, 300);
            assert_eq!(waited, Some(Duration::ZERO), "look {n}");
        }
        // Everything read: nothing waits, and the next send starts a new wait.
        assert_eq!(reading.observe(ms(40), 2_500, 0), None);
        assert_eq!(reading.observe(ms(41), 2_600, 100), Some(Duration::ZERO));
    }
}
