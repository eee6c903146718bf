//! Choosing a worker for each new connection.
//!
//! The supervisor knows each worker's load without asking it: connections sent minus the
//! closed count the worker last reported (reports come from inside the worker's event
//! loop, soon after connections close). A worker that is not ready, has stalled, or is at
//! its connection cap has no room and is never picked. Among the others, the policy
//! decides; connections accepted together are planned together, so a burst spreads over
//! the workers and each worker's share travels in one message.
//!
//! The module owns everything about getting a connection to a worker: the policy (here),
//! each worker's load picture and its thresholds ([`load`]), the load picture every
//! acceptor shares across threads ([`board`]), the pool of workers as the supervisor's main
//! thread sees them ([`pool`]), and the batching and sending, one dispatcher per accept
//! loop ([`send`]). The accept loops hand it connections; the supervisor adds, retires and
//! removes workers in it.

pub(crate) mod board;
pub(crate) mod load;
pub(crate) mod pool;
pub(crate) mod send;

pub(crate) use board::{Board, Seat};
pub(crate) use pool::{Pool, State, Worker};
pub(crate) use send::{Pending, Shard};

/// Who accepts TCP connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Distribution {
    /// The supervisor accepts on one listening socket per address and forwards each
    /// connection to a worker chosen by the [`Dispatch`] policy. Load-aware; no accepted
    /// connection is lost when a worker dies, is recycled or reloaded.
    #[default]
    Forward,
    /// Every worker listens on its own `SO_REUSEPORT` socket and the kernel spreads new
    /// connections by a hash of their addresses. No forwarding cost per connection, but
    /// load-blind: a busy or stalled worker keeps receiving its share, and the connections
    /// waiting in a worker's accept queue are reset when that worker exits. Unix-socket
    /// listeners are still forwarded. Needs fixed ports.
    ReusePort,
}

/// How the supervisor picks a worker for each new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Dispatch {
    /// The next worker with room, in turn. Blind to load: a slow worker gets its share.
    RoundRobin,
    /// The worker with the fewest open connections (ties in turn). The default: it keeps
    /// new connections away from a worker whose loop is busy or stalled, since such a
    /// worker stops reporting closes and its count only grows.
    #[default]
    LeastConnections,
    /// Two workers with room picked at random; the one with fewer open connections wins.
    PowerOfTwoChoices,
}

/// A worker as the planner sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate {
    /// Open connections, counting those planned so far.
    pub(crate) load: u64,
    /// Connections it may still take (0: not eligible).
    pub(crate) room: u64,
    /// How busy its event loop looks right now; the least busy workers with room are
    /// the only ones considered.
    pub(crate) busy: Busy,
    /// How long it has looked stuck, in µs (its handler poll now running, or how long its
    /// queue has waited unread, whichever is longer): among workers that all lag or all
    /// look stuck, only those within [`LAG_SLACK_US`] of the least are picked (a loop that
    /// was merely preempted for a few milliseconds, not one in a long handler or a stopped
    /// one).
    pub(crate) stuck_us: u64,
}

/// How busy a worker's event loop looks to the supervisor, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) enum Busy {
    /// Asleep, or awake only briefly, with nothing unread: takes a connection at once.
    #[default]
    Idle,
    /// Has not read everything sent to it yet, is in a handler poll longer than a short
    /// request's, or has been awake for a while: whatever it gets now waits behind what it
    /// is doing.
    Working,
    /// In one handler poll, or not reading its queue, for longer than a short burst of
    /// requests takes: a connection sent now waits at least that long.
    Lagging,
    /// In one handler poll, or not reading its queue, far longer than any short request
    /// takes: inside a handler that does not yield, or not running at all. Gets nothing
    /// while another worker with room is less busy.
    Stuck,
}

/// When every worker with room lags (or every one is stuck), those within this many µs of
/// the one lagging least are considered; the others are lagging a millisecond longer at
/// least (a long handler, against one merely preempted), and a connection sent to them
/// would wait that much longer.
const LAG_SLACK_US: u64 = 1_000;

impl Candidate {
    fn eligible(&self, level: Level) -> bool {
        self.room > 0
            && self.busy <= level.busy
            && (self.busy < Busy::Lagging
                || self.stuck_us <= level.stuck_us.saturating_add(LAG_SLACK_US))
    }
}

/// What a worker must not exceed to be considered for the next connection.
#[derive(Debug, Clone, Copy)]
struct Level {
    busy: Busy,
    /// When every worker with room lags or is stuck: the shortest time one has been so.
    stuck_us: u64,
}

/// Picks workers according to a [`Dispatch`] policy.
#[derive(Debug)]
pub(crate) struct Planner {
    policy: Dispatch,
    cursor: usize,
    rng: XorShift,
}

impl Planner {
    pub(crate) fn new(policy: Dispatch, seed: u64) -> Self {
        Self {
            policy,
            cursor: 0,
            rng: XorShift::new(seed),
        }
    }

    /// Picks a candidate for one more connection and charges it; `None` if none has room.
    pub(crate) fn pick(&mut self, candidates: &mut [Candidate]) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        // A busy worker's new connections wait behind what it is doing: consider only the
        // least busy workers that have room.
        let with_room = || candidates.iter().filter(|c| c.room > 0);
        let level = Level {
            busy: with_room().map(|c| c.busy).min().unwrap_or_default(),
            stuck_us: with_room().map(|c| c.stuck_us).min().unwrap_or_default(),
        };
        let chosen = match self.policy {
            Dispatch::RoundRobin => {
                let found = (0..n)
                    .map(|k| (self.cursor + k) % n)
                    .find(|&i| candidates[i].eligible(level));
                if let Some(i) = found {
                    self.cursor = i + 1;
                }
                found
            }
            Dispatch::LeastConnections => {
                let start = self.cursor;
                let found = (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|&i| candidates[i].eligible(level))
                    .min_by_key(|&i| candidates[i].load);
                if let Some(i) = found {
                    self.cursor = i + 1;
                }
                found
            }
            Dispatch::PowerOfTwoChoices => {
                let eligible = candidates.iter().filter(|c| c.eligible(level)).count();
                match eligible {
                    0 => None,
                    1 => candidates.iter().position(|c| c.eligible(level)),
                    _ => {
                        let a = self.nth_eligible(candidates, eligible, level);
                        let mut b = self.nth_eligible(candidates, eligible, level);
                        while b == a {
                            b = self.nth_eligible(candidates, eligible, level);
                        }
                        Some(if candidates[b].load < candidates[a].load {
                            b
                        } else {
                            a
                        })
                    }
                }
            }
        }?;
        let candidate = &mut candidates[chosen];
        candidate.load += 1;
        candidate.room -= 1;
        Some(chosen)
    }

    fn nth_eligible(&mut self, candidates: &[Candidate], eligible: usize, level: Level) -> usize {
        let k = (self.next_random() % eligible as u64) as usize;
        candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.eligible(level))
            .nth(k)
            .map_or(0, |(i, _)| i)
    }

    fn next_random(&mut self) -> u64 {
        self.rng.next()
    }
}

/// xorshift64*: the supervisor's randomness for balancing and jitter; not for security.
#[derive(Debug, Clone, Copy)]
pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(loads: &[(u64, u64)]) -> Vec<Candidate> {
        loads
            .iter()
            .map(|&(load, room)| Candidate {
                load,
                room,
                busy: Busy::Idle,
                stuck_us: 0,
            })
            .collect()
    }

    fn plan(policy: Dispatch, cands: &mut [Candidate], n: usize) -> Vec<usize> {
        let mut planner = Planner::new(policy, 42);
        (0..n).filter_map(|_| planner.pick(cands)).collect()
    }

    #[test]
    fn round_robin_takes_turns_and_skips_workers_without_room() {
        let mut cands = candidates(&[(0, 10), (0, 0), (0, 10)]);
        assert_eq!(plan(Dispatch::RoundRobin, &mut cands, 4), [0, 2, 0, 2]);
    }

    #[test]
    fn least_connections_fills_the_emptiest_first() {
        let mut cands = candidates(&[(5, 100), (1, 100), (3, 100)]);
        let picks = plan(Dispatch::LeastConnections, &mut cands, 6);
        assert_eq!(&picks[..2], [1, 1]);
        assert!(cands.iter().all(|c| c.load == 5), "{cands:?}");
    }

    #[test]
    fn least_connections_spreads_ties_in_turn() {
        let mut cands = candidates(&[(0, 100), (0, 100)]);
        assert_eq!(
            plan(Dispatch::LeastConnections, &mut cands, 4),
            [0, 1, 0, 1]
        );
    }

    #[test]
    fn a_stalled_worker_whose_count_only_grows_gets_nothing_new() {
        // Worker 0 stopped reporting closes: its load is what was sent to it.
        let mut cands = candidates(&[(40, 1000), (2, 1000)]);
        let picks = plan(Dispatch::LeastConnections, &mut cands, 30);
        assert!(picks.iter().all(|&i| i == 1));
    }

    #[test]
    fn power_of_two_prefers_the_lighter_and_respects_room() {
        let mut cands = candidates(&[(0, 1), (50, 100), (50, 0)]);
        let picks = plan(Dispatch::PowerOfTwoChoices, &mut cands, 20);
        assert_eq!(picks[0], 0);
        assert!(picks.iter().all(|&i| i != 2));
        assert_eq!(picks.len(), 20);
    }

    #[test]
    fn a_worker_that_has_not_read_its_queue_gets_nothing_while_another_has_room() {
        for policy in [
            Dispatch::RoundRobin,
            Dispatch::LeastConnections,
            Dispatch::PowerOfTwoChoices,
        ] {
            let mut cands = candidates(&[(0, 100), (10, 100), (0, 100)]);
            cands[0].busy = Busy::Working;
            let picks = plan(policy, &mut cands, 12);
            assert!(picks.iter().all(|&i| i != 0), "{policy:?}: {picks:?}");
            // Every worker busy: still dispatched, as before.
            let mut cands = candidates(&[(3, 100), (1, 100)]);
            cands.iter_mut().for_each(|c| c.busy = Busy::Working);
            assert_eq!(plan(policy, &mut cands, 4).len(), 4, "{policy:?}");
            // A busy worker with room beats an idle one without.
            let mut cands = candidates(&[(0, 100), (0, 0)]);
            cands[0].busy = Busy::Working;
            assert_eq!(plan(policy, &mut cands, 2), [0, 0], "{policy:?}");
        }
    }

    /// Two workers with room: (open connections, how busy, for how many µs).
    fn ranked(a: (u64, Busy, u64), b: (u64, Busy, u64)) -> Vec<Candidate> {
        let mut cands = candidates(&[(a.0, 100), (b.0, 100)]);
        (cands[0].busy, cands[0].stuck_us) = (a.1, a.2);
        (cands[1].busy, cands[1].stuck_us) = (b.1, b.2);
        cands
    }

    #[test]
    fn a_stuck_worker_gets_nothing_while_a_merely_busy_one_has_room() {
        use Busy::{Lagging, Stuck, Working};
        for policy in [
            Dispatch::RoundRobin,
            Dispatch::LeastConnections,
            Dispatch::PowerOfTwoChoices,
        ] {
            // Worker 1 every time, though worker 0 has fewer connections:
            let only_second = [
                // stuck against busy;
                ranked((0, Stuck, 0), (40, Working, 0)),
                // lagging against busy;
                ranked((0, Lagging, 0), (40, Working, 0)),
                // all lagging, worker 0 a millisecond longer (in a long handler);
                ranked((0, Lagging, 3_000), (40, Lagging, 1_200)),
                // all stuck: the one stuck the shortest time (preempted, not in a handler).
                ranked((0, Stuck, 1_500_000), (40, Stuck, 6_000)),
            ];
            for mut cands in only_second {
                let picks = plan(policy, &mut cands, 10);
                assert!(picks.iter().all(|&i| i == 1), "{policy:?}: {picks:?}");
            }
            // All lagging, within a millisecond of each other: by the policy.
            let mut cands = ranked((0, Lagging, 1_500), (0, Lagging, 1_200));
            let picks = plan(policy, &mut cands, 40);
            assert!(
                picks.contains(&0) && picks.contains(&1),
                "{policy:?}: {picks:?}"
            );
        }
    }

    #[test]
    fn nobody_with_room_means_no_pick() {
        for policy in [
            Dispatch::RoundRobin,
            Dispatch::LeastConnections,
            Dispatch::PowerOfTwoChoices,
        ] {
            let mut cands = candidates(&[(3, 0), (1, 0)]);
            assert!(plan(policy, &mut cands, 1).is_empty(), "{policy:?}");
        }
    }
}
