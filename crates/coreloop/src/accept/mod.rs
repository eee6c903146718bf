//! The accept loop: waits until some worker can take a connection and some listener is
//! readable, then accepts in bursts with raw `accept4` and hands the sockets to the
//! dispatcher. Under a high connection rate it stops waking per connection and polls the
//! listeners on a timer instead ([`pace`]). Accept errors from exhausted resources
//! (`EMFILE`, …) are logged once per episode and retried after a growing pause, never in
//! a spin. The listeners are its own until a binary upgrade's handover takes them back
//! ([`Switch`]).

pub(crate) mod pace;
pub(crate) mod shards;

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use coreloop_ipc::ConnMeta;

use crate::dispatch::{Board, Pending, Shard};
use crate::listener::{self, AcceptError, Listener};
use pace::Pace;

/// Whether an accept loop accepts: turned off for a binary upgrade's handover (the loop
/// then returns its listeners) or a stop. One per accept loop, shared with the main task.
#[derive(Debug)]
pub(crate) struct Switch {
    accepting: AtomicBool,
    /// The main task to the accept loop: stop now, whether it waits for a listener or for
    /// a worker with room.
    stop_accepting: Notify,
}

impl Switch {
    pub(crate) fn new() -> Self {
        Self {
            accepting: AtomicBool::new(true),
            stop_accepting: Notify::new(),
        }
    }

    pub(crate) fn is_on(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// Tells the loop to stop, whatever it waits for (a permit is stored if it waits for
    /// nothing right now).
    pub(crate) fn turn_off(&self) {
        self.accepting.store(false, Ordering::Release);
        self.stop_accepting.notify_one();
    }

    /// Sleeps for `period` (a back-off), or less if the loop is turned off meanwhile: its
    /// caller then goes back to the top of the loop, which sees the switch off.
    async fn pause(&self, period: Duration) {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = self.stop_accepting.notified() => {}
        }
    }
}

/// The metrics one accept loop updates, made on the main thread (the registry lives there).
pub(crate) struct Counters {
    /// Per listener, by the listener's position in the loop's sources: accepted, failed.
    pub(crate) listeners: Vec<(Counter, Counter)>,
    /// Accepted by this loop.
    pub(crate) acceptor: Counter,
    /// The polling interval ([`pace`]).
    pub(crate) poll_interval: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// Most connections accepted per readiness event before yielding to other tasks.
const ACCEPT_BURST: usize = 128;
/// First and longest pause after an accept error that signals exhaustion.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest the accept loop holds accepted connections while every worker is busy in a
/// handler (see [`accept_loop`]); after that they are queued to the least busy anyway.
const HOLD_MAX: Duration = Duration::from_millis(20);

/// Connection ids a loop takes from the board at once: the loops share the count, and one
/// write to it per connection from every loop's core would make its cache line travel
/// between them at every accept.
const CONN_ID_BLOCK: u64 = 1024;

/// Accept errors of one kind of exhaustion, handled once per episode; the loop's counters
/// and its block of connection ids.
struct AcceptState {
    backoff: Duration,
    /// An exhaustion episode: when it began, errors so far, the latest error.
    failing_since: Option<(Instant, u64, Instant)>,
    counters: Counters,
    /// Ids taken from the board and not given out yet.
    ids: std::ops::Range<u64>,
}

impl AcceptState {
    /// Accepts from `listener` until the queue is empty, `ACCEPT_BURST` connections or an
    /// exhaustion error; returns how many were accepted, and whether resources ran out.
    fn burst(
        &mut self,
        board: &Board,
        index: usize,
        source: &Source,
        pending: &mut Vec<Pending>,
    ) -> (usize, bool) {
        let mut count = 0;
        let mut exhausted = false;
        let listener = &source.bound;
        for _ in 0..ACCEPT_BURST {
            match listener::accept(&listener.fd) {
                Ok((fd, peer)) => {
                    // An exhaustion episode ends once accepts have succeeded for a while,
                    // not at the first success: under sustained pressure one error
                    // message (and a growing backoff) rather than one per burst.
                    let ended = self
                        .failing_since
                        .as_ref()
                        .is_some_and(|(_, _, last)| last.elapsed() >= ACCEPT_BACKOFF_MAX);
                    if ended {
                        if let Some((since, errors, _)) = self.failing_since.take() {
                            info!(
                                errors,
                                failing_ms = since.elapsed().as_millis() as u64,
                                "accepting again"
                            );
                        }
                        self.backoff = ACCEPT_BACKOFF_MIN;
                    }
                    if self.ids.is_empty() {
                        self.ids = board.conn_ids(CONN_ID_BLOCK);
                    }
                    let meta = ConnMeta {
                        id: self.ids.next().unwrap_or_default(),
                        listener: listener.index,
                        peer,
                    };
                    count += 1;
                    pending.push(Pending {
                        fd,
                        meta,
                        since: Instant::now(),
                    });
                }
                Err(err) => match listener::classify(&err) {
                    AcceptError::WouldBlock => {
                        if let Some(ready) = &source.ready {
                            ready.clear_read_ready();
                        }
                        break;
                    }
                    AcceptError::Connection => {
                        debug!(error = %err, "accept: connection failed before it was taken")
                    }
                    AcceptError::Resource => {
                        self.counters.listeners[index].1.inc();
                        match &mut self.failing_since {
                            Some((_, errors, last)) => {
                                *errors += 1;
                                *last = Instant::now();
                            }
                            None => {
                                error!(error = %err, listener = %listener.label, event = "accept_failed", "accept failed; backing off until resources free up");
                                self.failing_since = Some((Instant::now(), 1, Instant::now()));
                            }
                        }
                        exhausted = true;
                        break;
                    }
                },
            }
        }
        // Counted once per burst: the counters are shared with the other loops.
        self.counters.listeners[index].0.inc_by(count as u64);
        self.counters.acceptor.inc_by(count as u64);
        (count, exhausted)
    }
}

/// Accepts from every listener while some worker can take a connection.
///
/// # Interrupt mitigation
///
/// At a low rate the loop wakes on listener readiness and forwards each connection at
/// once. When connections come faster than the supervisor wakes (a wake-up finds
/// several), waking for each one costs more than the connection itself: the supervisor
/// and then a worker are scheduled once per connection, on cores that the workers need.
/// The loop then takes the listeners out of the reactor (a registered listener wakes the
/// thread on every new connection, whether or not a task waits for it) and polls them once
/// per interval instead (a `timerfd`, since tokio's timers are too coarse), so that each
/// wake-up forwards a batch, one message per worker. Once polls have found at most one
/// connection per [`pace::MIN`] for 2 ms in a row ([`Pace::lull`]), the loop registers the
/// listeners again and returns to readiness: at such rates polling saves no wake-up and
/// only delays connections (and it starts again at [`pace::MIN`]). One sparse poll is not
/// enough: a saturated closed-loop load has such lulls many times a second. Polling
/// delays a connection by at most one interval: [`pace::MIN`] (250 µs) while CPUs are
/// available, up to [`pace::MAX`] (1 ms) while they are saturated, when fewer wake-ups
/// leave more CPU to the work ([`Pace`]).
///
/// Returns the listeners when `switch` is turned off (a binary upgrade's handover), once
/// every connection it accepted is queued to a worker.
pub(crate) fn accept_loop(
    shard: Shard,
    switch: Arc<Switch>,
    counters: Counters,
    sources: Vec<Source>,
) -> impl std::future::Future<Output = Vec<listener::Bound>> {
    let ticker = match coreloop_ipc::Ticker::new() {
        Ok(ticker) => Some(ticker),
        Err(err) => {
            warn!(error = %err, "cannot create a timerfd; accepting on readiness only");
            None
        }
    };
    let pace = Pace::new(counters.poll_interval.clone());
    Acceptor {
        board: Arc::clone(shard.board()),
        shard,
        switch,
        sources,
        ticker,
        pending: Vec::with_capacity(ACCEPT_BURST),
        state: AcceptState {
            backoff: ACCEPT_BACKOFF_MIN,
            failing_since: None,
            ids: 0..0,
            counters,
        },
        polling: false,
        pace,
    }
    .run()
}

/// The accept loop's state.
struct Acceptor {
    /// Its dispatcher, on the shared load picture.
    shard: Shard,
    /// The shard's board, for the notifications this loop waits on.
    board: Arc<Board>,
    switch: Arc<Switch>,
    sources: Vec<Source>,
    /// The polling timer; `None` if it could not be created (readiness only).
    ticker: Option<coreloop_ipc::Ticker>,
    /// Accepted, not yet queued to a worker.
    pending: Vec<Pending>,
    state: AcceptState,
    /// Polling on the ticker (listeners out of the reactor) rather than on readiness.
    polling: bool,
    pace: Pace,
}

/// What one wait of the loop gave.
enum Step {
    /// Connections were accepted (perhaps none); `exhausted`: resources ran out;
    /// `drained`: the listener's queue was found empty (its readiness cleared).
    Accepted { exhausted: bool, drained: bool },
    /// Nothing to do this time round: look at the switch and the workers again.
    Again,
}

impl Acceptor {
    async fn run(mut self) -> Vec<listener::Bound> {
        loop {
            if !self.switch.is_on() {
                return self.hand_back().await;
            }
            self.wait_for_room().await;
            let step = if !self.switch.is_on() {
                Step::Again
            } else if self.polling && self.ticker.is_some() {
                self.poll().await
            } else {
                self.on_readiness().await
            };
            let Step::Accepted { exhausted, drained } = step else {
                continue;
            };
            self.hold_or_dispatch(exhausted).await;
            if exhausted {
                self.switch.pause(self.state.backoff).await;
                self.state.backoff = (self.state.backoff * 2).min(ACCEPT_BACKOFF_MAX);
            } else if !self.polling && !drained {
                // A full burst: let the other tasks run before the next. After a burst
                // that emptied the queue the next wait for readiness yields anyway, and a
                // yield here would cost one more `epoll_wait` per wake-up.
                tokio::task::yield_now().await;
            }
        }
    }

    /// A handover or a stop: what was accepted (held, say) goes to this generation's
    /// workers (at a stop, to those with room, without waiting); clients not yet accepted
    /// are the next generation's, or reset. Returns the listeners.
    async fn hand_back(mut self) -> Vec<listener::Bound> {
        if !self.pending.is_empty() {
            self.shard.dispatch_all(&mut self.pending).await;
        }
        self.sources
            .into_iter()
            .map(|source| source.bound)
            .collect()
    }

    /// Accepts only while some worker can take connections; otherwise clients stay in
    /// the kernel's backlog. Returns when some worker can, or accepting stops.
    async fn wait_for_room(&mut self) {
        loop {
            let changed = self.board.changed.notified();
            if !self.switch.is_on() || self.shard.has_room() {
                return;
            }
            // The ticker would wake us for nothing meanwhile.
            if self.polling {
                if let Some(ticker) = &self.ticker {
                    stop_polling(ticker, &mut self.sources, &mut self.polling, &mut self.pace);
                }
            }
            tokio::select! {
                () = changed => {}
                () = self.shard.recheck() => {}
            }
        }
    }

    /// Polling: waits for the next tick and accepts from every listener, then judges
    /// whether polling still pays and sets the next interval.
    async fn poll(&mut self) -> Step {
        let Some(ticker) = &self.ticker else {
            return Step::Again;
        };
        let tick = tokio::select! {
            tick = ticker.tick() => tick,
            () = self.switch.stop_accepting.notified() => return Step::Again,
        };
        // Workers that came or left are seen at each tick, not only at the next dispatch.
        self.shard.refresh();
        let periods = match tick {
            Ok(periods) => periods,
            Err(err) => {
                warn!(error = %err, "timerfd failed; accepting on readiness");
                self.pace.stop(Instant::now());
                self.polling = false;
                if !register(&mut self.sources) {
                    self.switch.pause(ACCEPT_BACKOFF_MAX).await;
                }
                return Step::Again;
            }
        };
        let (mut accepted, mut exhausted) = (0, false);
        for (index, source) in self.sources.iter().enumerate() {
            if self.pending.len() >= ACCEPT_BURST {
                break;
            }
            let (count, out) = self
                .state
                .burst(&self.board, index, source, &mut self.pending);
            accepted += count;
            exhausted |= out;
            if out {
                break;
            }
        }
        // Back to readiness when polling no longer gathers connections, unless a listener
        // cannot be registered: it would never be waited for, so keep polling it. Judged
        // at the interval this poll waited, before the pace changes it.
        if polled_enough(&mut self.pace, self.pending.len(), accepted, periods) || exhausted {
            stop_polling(ticker, &mut self.sources, &mut self.polling, &mut self.pace);
        }
        if self.polling {
            if let Some(interval) = self.pace.on_tick(Instant::now()) {
                debug!(
                    interval_us = interval.as_micros() as u64,
                    "accept polling interval"
                );
                if let Err(err) = ticker.start(interval) {
                    warn!(error = %err, "cannot restart the timerfd");
                }
            }
        }
        Step::Accepted {
            exhausted,
            drained: false,
        }
    }

    /// Readiness: waits for any listener to be readable (or to be told to stop) and
    /// accepts a burst from it; several connections in one wake-up start polling.
    async fn on_readiness(&mut self) -> Step {
        if self.sources.iter().any(|s| s.ready.is_none()) && !register(&mut self.sources) {
            // Out of descriptors: try again shortly rather than never wait for that
            // listener.
            self.switch.pause(ACCEPT_BACKOFF_MIN).await;
            if !self.switch.is_on() {
                return Step::Again;
            }
        }
        let mut stop = pin!(self.switch.stop_accepting.notified());
        let mut reseated = pin!(self.board.seats_changed.notified());
        let sources = &self.sources;
        let ready = std::future::poll_fn(|cx| {
            if stop.as_mut().poll(cx).is_ready() || reseated.as_mut().poll(cx).is_ready() {
                // Stop; or a worker came or left: the next round rereads the board.
                return Poll::Ready(None);
            }
            for (index, source) in sources.iter().enumerate() {
                let Some(ready) = &source.ready else { continue };
                if let Poll::Ready(result) = ready.poll_read_ready(cx) {
                    return Poll::Ready(Some(result.map(|()| index)));
                }
            }
            Poll::Pending
        })
        .await;
        let index = match ready {
            None => return Step::Again,
            Some(Ok(ready)) => ready,
            Some(Err(err)) => {
                error!(error = %err, "listener readiness failed; backing off");
                self.switch.pause(ACCEPT_BACKOFF_MAX).await;
                return Step::Again;
            }
        };
        let (accepted, exhausted) =
            self.state
                .burst(&self.board, index, &self.sources[index], &mut self.pending);
        // Several connections queued while this wake-up was on its way: they come faster
        // than the supervisor can usefully wake for each.
        if let Some(ticker) = &self.ticker {
            if !exhausted && accepted > 1 {
                start_polling(ticker, &mut self.sources, &mut self.polling, &mut self.pace);
            }
        }
        Step::Accepted {
            exhausted,
            drained: !exhausted && accepted < ACCEPT_BURST,
        }
    }

    /// Every worker busy in a handler: holds the connections (and leaves new ones in the
    /// kernel's queue) for the first worker that gets back to its channel, checked at
    /// every tick, rather than queue them behind a handler of unknown length. One shared
    /// queue instead of one per worker: a short request is not stuck behind a long one
    /// while another worker is free. Bounded by [`HOLD_MAX`]. Otherwise dispatches them.
    async fn hold_or_dispatch(&mut self, exhausted: bool) {
        let hold = !exhausted
            && !self.pending.is_empty()
            && self.pending[0].since.elapsed() < HOLD_MAX
            && self.shard.all_busy(pace::MIN);
        let hold = hold
            && match &self.ticker {
                Some(ticker) if !self.polling => {
                    start_polling(ticker, &mut self.sources, &mut self.polling, &mut self.pace)
                }
                Some(_) => true,
                None => false,
            };
        if !self.pending.is_empty() && !hold {
            self.shard.dispatch_all(&mut self.pending).await;
        }
    }
}

/// Whether a poll that found `accepted` connections over `periods` intervals says polling
/// no longer pays ([`Pace::lull`]: sparse polls for a while), `pending` being every
/// connection not yet queued to a worker, this poll's included. Connections held from
/// earlier polls (every worker busy) keep it polling: the hold is checked at every tick.
fn polled_enough(pace: &mut Pace, pending: usize, accepted: usize, periods: u64) -> bool {
    let held = pending.saturating_sub(accepted);
    if held > 0 {
        pace.busy();
        return false;
    }
    pace.lull(accepted, periods)
}

/// Enters polling mode at the pace's interval: starts the ticker and takes the listeners
/// out of the reactor (registered, they would wake the thread for every connection).
/// Returns whether it did; without the ticker the loop stays on readiness.
fn start_polling(
    ticker: &coreloop_ipc::Ticker,
    sources: &mut [Source],
    polling: &mut bool,
    pace: &mut Pace,
) -> bool {
    if let Err(err) = ticker.start(pace.start(Instant::now())) {
        warn!(error = %err, "cannot start the timerfd");
        return false;
    }
    *polling = true;
    for source in sources {
        source.ready = None;
    }
    true
}

/// Leaves polling mode: registers the listeners again and stops the ticker. Keeps polling
/// if a listener cannot be registered, since it would never be waited for.
fn stop_polling(
    ticker: &coreloop_ipc::Ticker,
    sources: &mut [Source],
    polling: &mut bool,
    pace: &mut Pace,
) {
    if !register(sources) {
        return;
    }
    *polling = false;
    pace.stop(Instant::now());
    if let Err(err) = ticker.stop() {
        warn!(error = %err, "cannot stop the timerfd");
    }
}

/// A listener as the accept loop holds it: registered with the reactor only while the
/// loop waits for readiness (see [`accept_loop`]).
pub(crate) struct Source {
    bound: listener::Bound,
    ready: Option<coreloop_ipc::Readiness>,
}

impl Source {
    pub(crate) fn registered(listeners: Vec<Listener>) -> Vec<Source> {
        listeners
            .into_iter()
            .map(|Listener { bound, ready }| Source {
                bound,
                ready: Some(ready),
            })
            .collect()
    }

    /// Sockets given back by a handover that did not happen: the accept loop registers
    /// them before it waits.
    pub(crate) fn unregistered(bound: Vec<listener::Bound>) -> Vec<Source> {
        bound
            .into_iter()
            .map(|bound| Source { bound, ready: None })
            .collect()
    }
}

/// Registers every listener that is not registered with the reactor; `false` if one could
/// not be (out of descriptors): the caller keeps polling it and tries again later.
fn register(sources: &mut [Source]) -> bool {
    let mut all = true;
    for source in sources.iter_mut().filter(|s| s.ready.is_none()) {
        match source
            .bound
            .fd
            .try_clone()
            .and_then(|fd| coreloop_ipc::Readiness::new(fd, tokio::io::Interest::READABLE))
        {
            Ok(ready) => source.ready = Some(ready),
            Err(err) => {
                warn!(listener = %source.bound.label, error = %err, "cannot register listener");
                all = false;
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_polls_stop_polling_unless_earlier_connections_are_held() {
        let mut pace = Pace::new(prometheus_client::metrics::gauge::Gauge::default());
        // One connection per 250 µs poll, and it is all that is pending (its connection is
        // pending until the dispatch that follows): after a lull of 8 such polls, back to
        // readiness.
        for _ in 0..7 {
            assert!(!polled_enough(&mut pace, 1, 1, 1));
        }
        assert!(polled_enough(&mut pace, 1, 1, 1));
        pace.stop(Instant::now());
        pace.start(Instant::now());
        // Two in one poll pay for polling.
        assert!(!polled_enough(&mut pace, 2, 2, 1));
        // Connections held from earlier polls keep the ticker, whatever this one found.
        assert!(!polled_enough(&mut pace, 3, 1, 8));
        assert!(!polled_enough(&mut pace, 2, 0, 8));
        assert!(polled_enough(&mut pace, 0, 0, 8), "2 ms in one late poll");
    }
}
