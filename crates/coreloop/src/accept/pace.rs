//! How often the accept loop polls its listeners under load: the interval adapts to how
//! contended the CPUs are.
//!
//! When connections arrive faster than the supervisor could usefully wake for each one,
//! the accept loop polls the listeners on a timer and forwards each poll's connections as
//! one batch (see the accept loop). Every poll costs a fixed amount: the
//! supervisor's wake-up, one message per worker that gets connections and that worker's
//! wake-up. A short interval adds little latency; a long one forwards bigger batches for
//! the same fixed cost, which saves CPU per request while the CPUs are saturated and only
//! adds latency while they are not (docs/benchmarks.md has the measurements).
//!
//! So the interval is chosen by whether a CPU is to be had: [`Pace`] reads the
//! supervisor thread's scheduler statistics (`/proc/thread-self/schedstat`: time spent
//! waiting on a run queue, and the number of times it ran) over a short window. When the
//! thread, once woken, waits on average longer than [`CONTENDED`] before it runs, the
//! CPUs are rarely idle: every wake-up saved is CPU given to the work, and a connection
//! waits in run queues anyway, so the interval doubles (up to [`MAX`]). When the wait
//! falls below [`UNCONTENDED`], it halves again (down to [`MIN`]). Without the statistics
//! (a kernel without `CONFIG_SCHED_INFO`), the interval stays at [`MIN`].

use std::io::Read as _;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;

/// The shortest polling interval, used whenever CPUs are available. It is also the most a
/// connection waits in the kernel's queue because of polling while CPUs are idle.
pub(crate) const MIN: Duration = Duration::from_micros(250);
/// The longest polling interval, used while the CPUs are saturated.
pub(crate) const MAX: Duration = Duration::from_millis(1);
/// Average wait of the woken supervisor for a CPU above which the interval grows: above
/// what a wake-up waits on idle cores, below what it waits once the cores are shared with
/// the work (docs/benchmarks.md has the waits measured).
pub(crate) const CONTENDED: Duration = Duration::from_micros(12);
/// Average wait below which the interval shrinks. Between the two thresholds it stays, so
/// that it does not flap.
pub(crate) const UNCONTENDED: Duration = Duration::from_micros(8);
/// How long one sample of the scheduler statistics spans.
const WINDOW: Duration = Duration::from_millis(20);
/// Fewer wake-ups than this in a window say too little to act on.
const MIN_RUNS: u64 = 16;
/// Polling that resumes within this long after it stopped for another reason than a lull
/// (every worker full, say) keeps its interval: the next burst is the same load. After a
/// longer pause polling starts again at [`MIN`].
const RESUME: Duration = Duration::from_millis(100);
/// Sparse polls in a row end polling once they span this long. One sparse poll is not
/// enough: under a saturating closed-loop load (every client waiting for its answer) a
/// 1 ms poll finds 1 to 4 connections 13 to 24 times a second between polls that find
/// 20, and going back to readiness for each such lull cost the server 4 to 8% more CPU
/// per request (one wake-up per connection until polling starts again).
const LULL: Duration = Duration::from_millis(2);

/// The adaptive polling interval of the accept loop.
pub(crate) struct Pace {
    interval: Duration,
    /// The interval while polling, 0 while not (`coreloop_accept_poll_interval_seconds`).
    shown: Gauge<f64, AtomicU64>,
    /// Whether this kernel has the statistics (cleared when the file is missing or
    /// unreadable as such; a transient failure, such as running out of descriptors, only
    /// skips a sample).
    schedstat: bool,
    /// The start of the current window, with the statistics then.
    window: Option<(Instant, Sample)>,
    /// When polling last stopped, while it is stopped.
    stopped: Option<Instant>,
    /// How long the sparse polls since the last dense one waited, in all. Once it
    /// reaches [`LULL`] the load that set the interval is gone, so the next start is at
    /// [`MIN`] whenever it comes.
    sparse_for: Duration,
}

/// One reading of the thread's scheduler statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sample {
    /// Nanoseconds spent runnable but waiting for a CPU.
    waited_ns: u64,
    /// Times the thread was given a CPU.
    runs: u64,
}

impl Pace {
    /// A pace at [`MIN`] that shows the interval in `shown`. It samples the thread that
    /// calls [`on_tick`](Self::on_tick).
    pub(crate) fn new(shown: Gauge<f64, AtomicU64>) -> Self {
        Self {
            interval: MIN,
            shown,
            schedstat: true,
            window: None,
            stopped: None,
            sparse_for: Duration::ZERO,
        }
    }

    /// The interval to poll at from `now` on: the current one, or [`MIN`] if a lull
    /// ended polling ([`lull`](Self::lull)) or polling has been stopped for longer than
    /// [`RESUME`] (the load that set it is gone).
    pub(crate) fn start(&mut self, now: Instant) -> Duration {
        let paused = self
            .stopped
            .take()
            .is_some_and(|since| now.duration_since(since) > RESUME);
        if self.sparse_for >= LULL || paused {
            self.interval = MIN;
            self.window = None;
        }
        self.sparse_for = Duration::ZERO;
        self.shown.set(self.interval.as_secs_f64());
        self.interval
    }

    /// Polling stopped at `now`.
    pub(crate) fn stop(&mut self, now: Instant) {
        self.stopped = Some(now);
        self.shown.set(0.0);
    }

    /// Whether a poll that found `accepted` connections after `periods` intervals (more
    /// than 1 when the poll came late) says they come too rarely for polling to pay: at
    /// most one per [`MIN`] (a 1 ms poll that finds 3 is 0.75 per 250 µs). Polling then
    /// saves no wake-up, it only delays connections. Judged per poll alone, a long
    /// interval would keep itself going, since it gathers several connections at almost
    /// any rate.
    fn sparse(&self, accepted: usize, periods: u64) -> bool {
        let waited = self.waited(periods);
        accepted as u128 <= (waited.as_nanos() / MIN.as_nanos()).max(1)
    }

    /// How long a poll that came after `periods` intervals waited (a count of 0 is read
    /// as 1).
    fn waited(&self, periods: u64) -> Duration {
        let periods = u32::try_from(periods.max(1)).unwrap_or(u32::MAX);
        self.interval.saturating_mul(periods)
    }

    /// Whether a poll that found `accepted` connections after `periods` intervals ends a
    /// lull: it is [`sparse`](Self::sparse), and so were the polls before it for [`LULL`]
    /// in all. A dense poll starts the count again. When it returns `true` the next
    /// [`start`](Self::start) is at [`MIN`].
    pub(crate) fn lull(&mut self, accepted: usize, periods: u64) -> bool {
        if !self.sparse(accepted, periods) {
            self.busy();
            return false;
        }
        self.sparse_for = self.sparse_for.saturating_add(self.waited(periods));
        self.sparse_for >= LULL
    }

    /// A poll that must not end polling whatever it found (connections are held for a
    /// busy worker): the lull, if any, is over.
    pub(crate) fn busy(&mut self) {
        self.sparse_for = Duration::ZERO;
    }

    /// Called at every poll. Returns the new interval when it changes.
    pub(crate) fn on_tick(&mut self, now: Instant) -> Option<Duration> {
        if !self.schedstat {
            return None;
        }
        // Read the statistics only when they open or close a window.
        let due = self
            .window
            .is_none_or(|(start, _)| now.duration_since(start) >= WINDOW);
        if !due {
            return None;
        }
        let sample = self.sample()?;
        self.on_sample(now, sample)
    }

    /// The decision for a sample taken at `now`: opens a window, or closes one that has
    /// lasted [`WINDOW`] and adapts the interval to the average wait per wake-up in it.
    fn on_sample(&mut self, now: Instant, after: Sample) -> Option<Duration> {
        let Some((start, before)) = self.window else {
            self.window = Some((now, after));
            return None;
        };
        if now.duration_since(start) < WINDOW {
            return None;
        }
        self.window = Some((now, after));
        let runs = after.runs.saturating_sub(before.runs);
        if runs < MIN_RUNS {
            return None;
        }
        let waited = Duration::from_nanos(after.waited_ns.saturating_sub(before.waited_ns) / runs);
        let next = next_interval(self.interval, waited);
        (next != self.interval).then(|| {
            self.interval = next;
            self.shown.set(next.as_secs_f64());
            next
        })
    }

    /// Reads the statistics. The file is opened for each sample (50 times a second at
    /// most, only while polling) rather than kept: the supervisor holds no descriptor for
    /// it.
    fn sample(&mut self) -> Option<Sample> {
        match read() {
            Ok(sample) => Some(sample),
            Err(err) => {
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidData
                ) {
                    self.schedstat = false;
                }
                None
            }
        }
    }
}

/// The interval after a window in which a wake-up waited `waited` on average for a CPU.
fn next_interval(current: Duration, waited: Duration) -> Duration {
    if waited > CONTENDED {
        (current * 2).min(MAX)
    } else if waited < UNCONTENDED {
        (current / 2).max(MIN)
    } else {
        current
    }
}

/// Reads `/proc/thread-self/schedstat`: "on-CPU ns, waiting ns, runs".
fn read() -> std::io::Result<Sample> {
    let mut file = std::fs::File::open("/proc/thread-self/schedstat")?;
    let mut buf = [0u8; 96];
    let len = file.read(&mut buf)?;
    std::str::from_utf8(&buf[..len])
        .ok()
        .and_then(parse)
        .ok_or_else(|| std::io::ErrorKind::InvalidData.into())
}

fn parse(text: &str) -> Option<Sample> {
    let mut fields = text.split_ascii_whitespace().skip(1);
    let waited_ns = fields.next()?.parse().ok()?;
    let runs = fields.next()?.parse().ok()?;
    Some(Sample { waited_ns, runs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contention_doubles_the_interval_up_to_max() {
        let waited = CONTENDED + Duration::from_micros(1);
        let mut interval = MIN;
        let mut seen = vec![interval];
        for _ in 0..5 {
            interval = next_interval(interval, waited);
            seen.push(interval);
        }
        assert_eq!(
            seen,
            [MIN, MIN * 2, MAX, MAX, MAX, MAX],
            "250 µs → 500 µs → 1 ms, and no further"
        );
    }

    #[test]
    fn idle_cpus_halve_it_down_to_min_and_the_band_between_keeps_it() {
        let between = (CONTENDED + UNCONTENDED) / 2;
        assert_eq!(next_interval(MAX, between), MAX);
        assert_eq!(next_interval(MIN * 2, between), MIN * 2);
        let idle = UNCONTENDED - Duration::from_micros(1);
        assert_eq!(next_interval(MAX, idle), MIN * 2);
        assert_eq!(next_interval(MIN * 2, idle), MIN);
        assert_eq!(next_interval(MIN, idle), MIN);
    }

    #[test]
    fn a_poll_is_sparse_at_one_connection_per_min_whatever_the_interval() {
        let mut pace = Pace::new(Gauge::default());
        assert!(pace.sparse(0, 1) && pace.sparse(1, 1));
        assert!(!pace.sparse(2, 1), "2 per 250 µs pay for polling");
        assert!(pace.sparse(2, 2), "a poll late by one period waited 500 µs");
        pace.interval = MAX;
        assert!(pace.sparse(4, 1), "4 per ms is 1 per 250 µs");
        assert!(!pace.sparse(5, 1));
        pace.interval = MIN * 2;
        assert!(pace.sparse(2, 1) && !pace.sparse(3, 1));
        assert!(pace.sparse(2, 0), "a count of 0 periods is read as 1");
    }

    #[test]
    fn sparse_polls_end_polling_once_they_span_a_lull_and_the_next_start_is_at_min() {
        let mut pace = Pace::new(Gauge::default());
        let t0 = Instant::now();
        pace.interval = MAX;
        assert_eq!(pace.start(t0), MAX);
        // A saturated closed loop's lull: one sparse poll between dense ones.
        assert!(!pace.lull(3, 1), "1 ms of sparse polls is not a lull yet");
        assert!(!pace.lull(20, 1), "a dense poll starts the count again");
        assert!(!pace.lull(3, 1));
        pace.busy();
        assert!(
            !pace.lull(3, 1),
            "held connections start the count again too"
        );
        // A moderate rate: every 1 ms poll finds 3.
        assert!(pace.lull(3, 1), "2 ms of sparse polls");
        pace.stop(t0);
        assert_eq!(
            pace.start(t0 + MIN),
            MIN,
            "the interval came from a load now gone"
        );
        // At MIN a lull takes 8 sparse polls, or fewer late ones.
        for _ in 0..7 {
            assert!(!pace.lull(1, 1));
        }
        assert!(pace.lull(0, 1));
        pace.stop(t0);
        assert_eq!(pace.start(t0 + MIN), MIN);
        assert!(!pace.lull(1, 4) && pace.lull(0, 4), "two polls 1 ms late");
        // A lull that did not end polling (a listener could not be registered again) is
        // forgotten at the next dense poll: a later stop keeps the interval.
        pace.interval = MAX;
        assert!(pace.lull(3, 1) && !pace.lull(20, 1));
        pace.stop(t0);
        assert_eq!(pace.start(t0 + MIN), MAX);
    }

    #[test]
    fn parses_schedstat_and_rejects_garbage() {
        assert_eq!(
            parse("123456 7890 42\n"),
            Some(Sample {
                waited_ns: 7890,
                runs: 42
            })
        );
        assert_eq!(parse("123456 7890\n"), None);
        assert_eq!(parse("a b c"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn this_kernel_reports_the_statistics_and_they_advance() {
        // The pace is only adaptive where the file exists; CI's kernel must have it, or
        // the benchmarks' figures would not be what users get.
        let before = read().expect("a sample");
        // Give up the CPU a few times: each return from sleep is a run.
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let after = read().expect("a second sample");
        assert!(
            after.runs >= before.runs + 3,
            "{before:?} → {after:?}: each wake-up counts as a run"
        );
    }

    fn at(waited_ns: u64, runs: u64) -> Sample {
        Sample { waited_ns, runs }
    }

    #[test]
    fn a_window_of_contended_wake_ups_doubles_the_interval_and_idle_ones_halve_it() {
        let shown = Gauge::<f64, AtomicU64>::default();
        let mut pace = Pace::new(shown.clone());
        let t0 = Instant::now();
        assert_eq!(pace.start(t0), MIN);
        assert_eq!(pace.on_sample(t0, at(0, 0)), None, "opens a window");
        // 100 wake-ups that waited 20 µs each on average, but the window is not over.
        assert_eq!(pace.on_sample(t0 + WINDOW / 2, at(2_000_000, 100)), None);
        assert_eq!(
            pace.on_sample(t0 + WINDOW, at(2_000_000, 100)),
            Some(MIN * 2)
        );
        assert_eq!(shown.get(), (MIN * 2).as_secs_f64(), "the gauge follows");
        // The next window: 100 more wake-ups waiting 2 µs each.
        let t1 = t0 + WINDOW * 2;
        assert_eq!(pace.on_sample(t1, at(2_200_000, 200)), Some(MIN));
    }

    #[test]
    fn a_window_without_enough_wake_ups_changes_nothing() {
        let mut pace = Pace::new(Gauge::default());
        let t0 = Instant::now();
        assert_eq!(pace.on_sample(t0, at(0, 0)), None, "opens a window");
        // Fifteen wake-ups that each waited a whole millisecond: too few to act on.
        let few = at(15_000_000, MIN_RUNS - 1);
        assert_eq!(pace.on_sample(t0 + WINDOW, few), None);
        assert_eq!(pace.start(t0 + WINDOW), MIN);
        // The real statistics of this thread open a window too.
        let mut real = Pace::new(Gauge::default());
        assert_eq!(real.on_tick(t0), None, "first tick opens a window");
        assert!(real.window.is_some(), "this kernel has the statistics");
    }

    #[test]
    fn a_short_pause_keeps_the_interval_and_a_long_one_resets_it() {
        // (A pause for another reason than a lull: every worker full, say.)
        let shown = Gauge::<f64, AtomicU64>::default();
        let mut pace = Pace::new(shown.clone());
        pace.interval = MAX;
        let t0 = Instant::now();
        pace.stop(t0);
        assert_eq!(shown.get(), 0.0, "not polling");
        assert_eq!(pace.start(t0 + RESUME / 2), MAX, "the same load resumes");
        assert_eq!(shown.get(), MAX.as_secs_f64());
        pace.stop(t0 + RESUME);
        assert_eq!(pace.start(t0 + RESUME * 3), MIN, "a new burst starts low");
        assert_eq!(shown.get(), MIN.as_secs_f64());
    }
}
