//! The trust boundary between a worker and its supervisor: what the supervisor accepts
//! from a worker, and how much a worker can make it log.
//!
//! A worker runs the user's code, maybe as an unprivileged user, and may be buggy or
//! compromised; the supervisor is the one process that must not fail. So everything a
//! worker sends is untrusted input. [`Screen`] checks each datagram of a worker's channel
//! against the protocol (the kind, when it may come, its descriptors, the rate) and names
//! the first [`Violation`]; the supervisor then kills that worker and replaces it, and the
//! others never notice. The checks are cheap and allocate nothing: they run for every
//! load report.
//!
//! What a worker can make the supervisor log is bounded twice: one violation line per
//! worker (it is killed), and a [`LogBudget`] over all workers for the lines their deaths
//! and violations cause, so that a pool of workers that keep breaking the rules cannot
//! fill a disk. Strings a worker sends (a start failure's reason) are logged escaped
//! (`Debug`), so they cannot forge log lines.

use std::time::{Duration, Instant};

use coreloop_ipc::{ChannelError, Message};

/// How a worker broke the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Violation {
    /// A datagram that does not decode.
    Malformed,
    /// A datagram longer than any message, or with more descriptors than any message
    /// carries (the kernel truncated it).
    Oversized,
    /// A message with the wrong number of descriptors for its kind.
    WrongDescriptors,
    /// A loop clock that is not a sealed shared-memory file of the right size.
    BadLoopClock,
    /// A kind of message a worker never sends, or one at the wrong time.
    Unexpected(&'static str),
    /// More messages than [`MESSAGE_RATE`] allows.
    Flood,
    /// It closed its end of the channel (or sent an empty datagram, which reads the
    /// same) and did not exit.
    ChannelClosed,
}

impl Violation {
    /// The `violation` field of the `protocol_violation` event.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Violation::Malformed => "malformed-message",
            Violation::Oversized => "oversized-message",
            Violation::WrongDescriptors => "wrong-descriptors",
            Violation::BadLoopClock => "bad-loop-clock",
            Violation::Unexpected(_) => "unexpected-message",
            Violation::Flood => "message-flood",
            Violation::ChannelClosed => "channel-closed",
        }
    }

    /// The violation a receive error is.
    pub(crate) fn of(err: &ChannelError) -> Violation {
        match err {
            ChannelError::Protocol(_) => Violation::Malformed,
            ChannelError::Truncated { .. } => Violation::Oversized,
            ChannelError::FdCount { .. } => Violation::WrongDescriptors,
            // recvmsg failing on a connected socket pair: the worker's end is broken.
            _ => Violation::ChannelClosed,
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Unexpected(kind) => write!(f, "unexpected message {kind}"),
            other => f.write_str(other.label()),
        }
    }
}

/// Messages a worker may send per second, sustained; twice as many in a burst. A worker
/// reports at most about 100 times a second (once per heartbeat interval, and at most once
/// per 10 ms of closes), so this is far above any honest worker and far below what would
/// cost the supervisor a noticeable share of a core.
pub(crate) const MESSAGE_RATE: u32 = 1000;

/// Checks each message from one worker against the protocol.
#[derive(Debug)]
pub(crate) struct Screen {
    /// It sent its loop clock.
    clock: bool,
    /// It said `Ready`.
    ready: bool,
    /// It asked to retire.
    retiring: bool,
    budget: Bucket,
}

impl Screen {
    /// The screen of a worker just started.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            clock: false,
            ready: false,
            retiring: false,
            budget: Bucket::new(MESSAGE_RATE, 2 * MESSAGE_RATE, now),
        }
    }

    /// Checks one message received at `now`, and records what it changes (a clock
    /// received, readiness). Descriptors were already checked against the kind by the
    /// channel.
    ///
    /// The order of a worker's life: `LoopClock` (optional, at most once), then `Ready`
    /// or `Failed`; after `Ready`, `Status`, and `Retiring` once.
    pub(crate) fn check(&mut self, now: Instant, msg: &Message) -> Result<(), Violation> {
        if !self.budget.take(now) {
            return Err(Violation::Flood);
        }
        let allowed = match msg {
            Message::LoopClock => !self.ready && !std::mem::replace(&mut self.clock, true),
            Message::Ready { .. } => !std::mem::replace(&mut self.ready, true),
            Message::Failed { .. } => !self.ready,
            Message::Status { .. } => self.ready,
            Message::Retiring => self.ready && !std::mem::replace(&mut self.retiring, true),
            // The supervisor's messages, and the upgrade protocol's.
            _ => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(Violation::Unexpected(msg.kind_name()))
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Takes one token if there is one.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Lines about workers' deaths and violations the supervisor logs per second, sustained,
/// across all workers; twice as many in a burst.
const LOG_RATE: u32 = 20;

/// How many worker-caused log lines may be written now, across all workers. Lines over
/// the budget are counted, and the count is logged (`event = "log_suppressed"`) with the
/// next line the budget allows.
#[derive(Debug)]
pub(crate) struct LogBudget {
    bucket: Bucket,
    suppressed: u64,
}

impl LogBudget {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            bucket: Bucket::new(LOG_RATE, 2 * LOG_RATE, now),
            suppressed: 0,
        }
    }

    /// Whether a line may be written at `now`. `Some(n)`: yes, and `n` lines were
    /// suppressed since the last one written (say so first); `None`: no, it is counted.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.bucket.take(now) {
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// Text a worker sent, made safe to print: control characters (a newline that would forge
/// a log line, a terminal escape) are escaped.
pub(crate) fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// How long a worker whose channel reads as closed may take to exit before it is killed:
/// a worker that exits closes its channel a moment before the supervisor reaps it.
pub(crate) const CLOSED_GRACE: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    /// The `STATUS=` line for systemd.
    fn status() -> Message {
        Message::Status {
            live: 0,
            closed: 0,
            rss_kib: 0,
        }
    }

    #[test]
    fn an_honest_life_passes() {
        let now = Instant::now();
        let mut screen = Screen::new(now);
        assert_eq!(screen.check(now, &Message::LoopClock), Ok(()));
        assert_eq!(screen.check(now, &Message::Ready { pid: 1 }), Ok(()));
        for _ in 0..100 {
            assert_eq!(screen.check(now, &status()), Ok(()));
        }
        assert_eq!(screen.check(now, &Message::Retiring), Ok(()));
        assert_eq!(
            screen.check(now, &status()),
            Ok(()),
            "reports while draining"
        );
        assert_eq!(
            screen.check(now, &Message::Retiring),
            Err(Violation::Unexpected("Retiring"))
        );
    }

    #[test]
    fn a_failure_report_before_ready_passes() {
        let now = Instant::now();
        let mut screen = Screen::new(now);
        let failed = Message::Failed {
            reason: "database unreachable".into(),
        };
        assert_eq!(screen.check(now, &failed), Ok(()));
    }

    #[test]
    fn messages_out_of_order_are_violations() {
        let now = Instant::now();
        let mut screen = Screen::new(now);
        assert_eq!(
            screen.check(now, &status()),
            Err(Violation::Unexpected("Status"))
        );
        let mut screen = Screen::new(now);
        assert_eq!(screen.check(now, &Message::LoopClock), Ok(()));
        assert_eq!(
            screen.check(now, &Message::LoopClock),
            Err(Violation::Unexpected("LoopClock"))
        );
        assert_eq!(screen.check(now, &Message::Ready { pid: 1 }), Ok(()));
        assert_eq!(
            screen.check(now, &Message::Ready { pid: 1 }),
            Err(Violation::Unexpected("Ready"))
        );
        assert!(screen.check(now, &Message::LoopClock).is_err());
        let failed = Message::Failed { reason: "x".into() };
        assert!(screen.check(now, &failed).is_err());
    }

    #[test]
    fn the_supervisors_messages_are_violations_from_a_worker() {
        let now = Instant::now();
        for msg in [
            Message::Drain { timeout_ms: 1 },
            Message::Takeover,
            Message::Conns(coreloop_ipc::ConnBatch::new()),
        ] {
            let mut screen = Screen::new(now);
            let _ = screen.check(now, &Message::Ready { pid: 1 });
            assert!(
                matches!(screen.check(now, &msg), Err(Violation::Unexpected(_))),
                "{msg:?}"
            );
        }
    }

    #[test]
    fn a_flood_is_a_violation_and_an_honest_rate_is_not() {
        let t0 = Instant::now();
        let mut screen = Screen::new(t0);
        assert_eq!(screen.check(t0, &Message::Ready { pid: 1 }), Ok(()));
        // 200 reports a second for a minute: twice the most an honest worker sends.
        for k in 1..12_000u64 {
            let now = t0 + Duration::from_millis(k * 5);
            assert_eq!(screen.check(now, &status()), Ok(()), "report {k}");
        }
        // The same burst in one instant runs out.
        let now = t0 + Duration::from_secs(61);
        let flooded = (0..3 * MESSAGE_RATE).find(|_| screen.check(now, &status()).is_err());
        assert!(flooded.is_some(), "no flood detected");
        assert!(flooded >= Some(MESSAGE_RATE), "{flooded:?}");
    }

    #[test]
    fn receive_errors_name_their_violation() {
        let err = ChannelError::Truncated {
            data: true,
            control: false,
        };
        assert_eq!(Violation::of(&err), Violation::Oversized);
        let err = ChannelError::FdCount {
            kind: "Ready",
            expected: 0,
            got: 3,
        };
        assert_eq!(Violation::of(&err), Violation::WrongDescriptors);
    }

    #[test]
    fn printable_text_has_no_control_characters() {
        assert_eq!(
            printable("db down\n2026 INFO worker ready\u{1b}[2J é"),
            "db down\\n2026 INFO worker ready\\u{1b}[2J é"
        );
    }

    #[test]
    fn the_log_budget_suppresses_and_then_counts() {
        let t0 = Instant::now();
        let mut budget = LogBudget::new(t0);
        let admitted = (0..1000).filter(|_| budget.admit(t0).is_some()).count();
        assert_eq!(admitted, 2 * LOG_RATE as usize);
        let later = t0 + Duration::from_secs(1);
        assert_eq!(budget.admit(later), Some(1000 - 2 * u64::from(LOG_RATE)));
        assert_eq!(budget.admit(later), Some(0));
    }
}
