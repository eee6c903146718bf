//! The restart policy: when the supervisor replaces a worker that died, and when it gives
//! up. Pure code: it sees a worker's readiness and death and the clock, and answers
//! "restart now", "restart after a delay" or "stop"; the supervisor only carries that out.
//!
//! The rules, and why:
//!
//! - **A worker that became ready and then died is replaced at once**, whatever killed it:
//!   a crash, the OOM killer, an operator's `kill -9`, the supervisor itself (a hang, a
//!   protocol violation). It proved that workers can start, so waiting protects nothing
//!   and only costs capacity. nginx and gunicorn do the same, and never give up on such
//!   a worker.
//! - **A worker that died before it was ready is a start failure**, and only those back
//!   off: `RESTART_BACKOFF_MIN · 2ⁿ⁻¹` for the n-th consecutive failure of a slot, capped
//!   at [`RESTART_BACKOFF_MAX`], with "equal jitter" (uniform in the upper half), so that
//!   slots failing together spread out. A worker of that slot that gets ready resets it.
//! - **The server stops on its own only when a slot cannot start**: after
//!   [`Limits::start_failures`] consecutive start failures of one slot, or at the first
//!   start failure while the server boots (a bad configuration must fail fast, with the
//!   worker's reason). Killing ready workers, however often, never stops it.
//! - **A ceiling on spawns per second** ([`Limits::spawns_per_second`], over any sliding
//!   second) protects the machine from a fork storm: a restart over the ceiling waits for
//!   its turn rather than being dropped.
//!
//! Restarts of workers that exited on purpose (drained for a reload, a recycle, a
//! scale-down) go through the same gate, with no backoff. Whether a slot still needs a
//! worker at all (it is covered by a replacement, or was scaled away) is the pool's
//! knowledge, passed in as `wanted`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub(crate) use crate::config::RestartLimits as Limits;
use crate::dispatch::XorShift;
use crate::handler::WorkerId;

/// The first backoff of a slot that failed to start.
pub(crate) const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest backoff.
pub(crate) const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The window of the spawn ceiling.
const SPAWN_WINDOW: Duration = Duration::from_secs(1);

/// How a worker ended, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Death {
    /// It had said `Ready` (and served, or could have).
    AfterReady,
    /// It died, or was killed, before it said `Ready`: a start failure.
    BeforeReady,
    /// It exited after a drain the supervisor asked for (reload, recycle, retire,
    /// scale-down, stop).
    Drained,
}

/// What the supervisor does next about a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Start its worker now (counted against the spawn ceiling).
    Now,
    /// Ask again ([`RestartPolicy::due`]) after this long: a start-failure backoff, or
    /// the spawn ceiling.
    After {
        /// How long to wait.
        delay: Duration,
        /// Why: a backoff, or the spawn ceiling.
        why: Wait,
    },
    /// Nothing: the slot needs no new worker.
    Nothing,
    /// Stop the server.
    Stop(GiveUp),
}

/// Why a restart waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// The slot failed to start this many times in a row.
    Backoff {
        /// Consecutive start failures of the slot.
        failures: u32,
    },
    /// Too many spawns within the last second.
    SpawnCeiling,
}

impl Wait {
    /// The `why` field of the `restart_scheduled` event.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Wait::Backoff { .. } => "start-failure-backoff",
            Wait::SpawnCeiling => "spawn-ceiling",
        }
    }
}

/// Why the policy stops the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// A worker failed to start while the server was booting.
    Boot {
        /// The slot.
        worker: WorkerId,
    },
    /// One slot failed to start this many times in a row.
    StartFailures {
        /// The slot.
        worker: WorkerId,
        /// Consecutive failures.
        failures: u32,
    },
}

/// The restart policy's state: per-slot start failures, and the spawns of the last second.
#[derive(Debug)]
pub(crate) struct RestartPolicy {
    limits: Limits,
    /// Consecutive start failures, by slot.
    failures: Vec<u32>,
    /// When each restart of the last [`SPAWN_WINDOW`] was let through, oldest first.
    spawns: VecDeque<Instant>,
    booted: bool,
    rng: XorShift,
}

impl RestartPolicy {
    /// A policy with these limits, for a server that is booting. `seed` drives the jitter.
    pub(crate) fn new(limits: Limits, seed: u64) -> Self {
        Self {
            limits: Limits {
                start_failures: limits.start_failures.max(1),
                spawns_per_second: limits.spawns_per_second.max(1),
            },
            failures: Vec::new(),
            spawns: VecDeque::new(),
            booted: false,
            rng: XorShift::new(seed),
        }
    }

    /// Every worker of the boot is ready: start failures no longer stop the server at once.
    pub(crate) fn booted(&mut self) {
        self.booted = true;
    }

    /// A worker of `slot` said `Ready`: its slot's backoff starts over.
    pub(crate) fn ready(&mut self, slot: WorkerId) {
        if let Some(count) = self.failures.get_mut(slot.get()) {
            *count = 0;
        }
    }

    /// The slot's consecutive start failures so far.
    #[cfg(test)]
    pub(crate) fn failures(&self, slot: WorkerId) -> u32 {
        self.failures.get(slot.get()).copied().unwrap_or(0)
    }

    /// A worker of `slot` died at `now`. `wanted`: whether the slot still needs a worker
    /// (no other worker covers it, and it was not scaled away).
    pub(crate) fn died(
        &mut self,
        slot: WorkerId,
        death: Death,
        wanted: bool,
        now: Instant,
    ) -> Decision {
        if death == Death::BeforeReady {
            if !self.booted {
                return Decision::Stop(GiveUp::Boot { worker: slot });
            }
            // A replacement that failed while the old worker still serves (a reload, a
            // recycle) is not the slot failing: the old one keeps it.
            if wanted {
                let index = slot.get();
                if self.failures.len() <= index {
                    self.failures.resize(index + 1, 0);
                }
                let count = &mut self.failures[index];
                *count = count.saturating_add(1);
                let failures = *count;
                if failures >= self.limits.start_failures {
                    return Decision::Stop(GiveUp::StartFailures {
                        worker: slot,
                        failures,
                    });
                }
                return Decision::After {
                    delay: self.backoff(failures),
                    why: Wait::Backoff { failures },
                };
            }
        }
        if !wanted {
            return Decision::Nothing;
        }
        self.due(now)
    }

    /// A restart whose wait is over asks again at `now`: [`Decision::Now`] if the spawn
    /// ceiling lets it through (the spawn is then counted), else how long until it does.
    pub(crate) fn due(&mut self, now: Instant) -> Decision {
        while self
            .spawns
            .front()
            .is_some_and(|&at| now.saturating_duration_since(at) >= SPAWN_WINDOW)
        {
            self.spawns.pop_front();
        }
        if self.spawns.len() < self.limits.spawns_per_second as usize {
            self.spawns.push_back(now);
            return Decision::Now;
        }
        let oldest = self.spawns.front().copied().unwrap_or(now);
        Decision::After {
            delay: (oldest + SPAWN_WINDOW).saturating_duration_since(now),
            why: Wait::SpawnCeiling,
        }
    }

    /// The backoff before the restart that follows the `failures`-th consecutive start
    /// failure: within `[base / 2, base]`, `base = min(MIN · 2ⁿ⁻¹, MAX)`.
    fn backoff(&mut self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        let base = RESTART_BACKOFF_MIN
            .saturating_mul(1 << doublings)
            .min(RESTART_BACKOFF_MAX);
        base.mul_f64(0.5 + 0.5 * self.rng.unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        start_failures: 3,
        spawns_per_second: 4,
    };

    fn booted() -> RestartPolicy {
        let mut policy = RestartPolicy::new(LIMITS, 7);
        policy.booted();
        policy
    }

    fn slot(n: usize) -> WorkerId {
        WorkerId(n)
    }

    #[test]
    fn a_ready_worker_that_dies_is_restarted_now_every_time() {
        let mut policy = RestartPolicy::new(
            Limits {
                start_failures: 1,
                spawns_per_second: 1000,
            },
            1,
        );
        policy.booted();
        let t0 = Instant::now();
        for k in 0..500u32 {
            let now = t0 + Duration::from_millis(u64::from(k) * 10);
            assert_eq!(
                policy.died(slot(0), Death::AfterReady, true, now),
                Decision::Now,
                "kill {k}"
            );
        }
        assert_eq!(policy.failures(slot(0)), 0);
    }

    #[test]
    fn a_death_before_boot_completes_stops_the_server() {
        let mut policy = RestartPolicy::new(LIMITS, 1);
        let now = Instant::now();
        assert_eq!(
            policy.died(slot(1), Death::BeforeReady, true, now),
            Decision::Stop(GiveUp::Boot { worker: slot(1) })
        );
    }

    #[test]
    fn a_ready_worker_that_dies_during_boot_is_restarted() {
        let mut policy = RestartPolicy::new(LIMITS, 1);
        assert_eq!(
            policy.died(slot(0), Death::AfterReady, true, Instant::now()),
            Decision::Now
        );
    }

    #[test]
    fn start_failures_back_off_exponentially_with_jitter_and_a_cap() {
        let mut policy = RestartPolicy::new(
            Limits {
                start_failures: 100,
                spawns_per_second: 100,
            },
            99,
        );
        policy.booted();
        let now = Instant::now();
        let mut delays = Vec::new();
        for n in 1..=12u32 {
            let Decision::After { delay, why } =
                policy.died(slot(0), Death::BeforeReady, true, now)
            else {
                panic!("failure {n} was not backed off");
            };
            assert_eq!(why, Wait::Backoff { failures: n });
            let base = RESTART_BACKOFF_MIN
                .saturating_mul(1 << (n - 1).min(16))
                .min(RESTART_BACKOFF_MAX);
            assert!(
                delay >= base / 2 && delay <= base,
                "failure {n}: {delay:?} not in [{:?}, {base:?}]",
                base / 2
            );
            delays.push(delay);
        }
        assert!(delays[4] > delays[0], "no growth: {delays:?}");
        assert!(delays.iter().all(|d| *d <= RESTART_BACKOFF_MAX));
        // Jitter: the capped delays are not all equal.
        assert!(delays[8..].windows(2).any(|w| w[0] != w[1]), "{delays:?}");
    }

    #[test]
    fn readiness_resets_the_backoff_of_its_slot_only() {
        let mut policy = booted();
        let now = Instant::now();
        let _ = policy.died(slot(0), Death::BeforeReady, true, now);
        let _ = policy.died(slot(0), Death::BeforeReady, true, now);
        let _ = policy.died(slot(1), Death::BeforeReady, true, now);
        assert_eq!(policy.failures(slot(0)), 2);
        policy.ready(slot(0));
        assert_eq!(policy.failures(slot(0)), 0);
        assert_eq!(policy.failures(slot(1)), 1);
        // After the reset the next failure waits the first backoff again.
        let Decision::After { delay, .. } = policy.died(slot(0), Death::BeforeReady, true, now)
        else {
            panic!("not backed off");
        };
        assert!(delay <= RESTART_BACKOFF_MIN, "{delay:?}");
    }

    #[test]
    fn consecutive_start_failures_of_one_slot_stop_the_server() {
        let mut policy = booted();
        let now = Instant::now();
        assert!(matches!(
            policy.died(slot(2), Death::BeforeReady, true, now),
            Decision::After { .. }
        ));
        assert!(matches!(
            policy.died(slot(2), Death::BeforeReady, true, now),
            Decision::After { .. }
        ));
        assert_eq!(
            policy.died(slot(2), Death::BeforeReady, true, now),
            Decision::Stop(GiveUp::StartFailures {
                worker: slot(2),
                failures: 3
            })
        );
    }

    #[test]
    fn a_failed_replacement_of_a_covered_slot_is_not_counted() {
        let mut policy = booted();
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(
                policy.died(slot(0), Death::BeforeReady, false, now),
                Decision::Nothing
            );
        }
        assert_eq!(policy.failures(slot(0)), 0);
    }

    #[test]
    fn an_unwanted_slot_is_not_restarted() {
        let mut policy = booted();
        let now = Instant::now();
        assert_eq!(
            policy.died(slot(0), Death::AfterReady, false, now),
            Decision::Nothing
        );
        assert_eq!(
            policy.died(slot(0), Death::Drained, false, now),
            Decision::Nothing
        );
    }

    #[test]
    fn a_drained_worker_whose_slot_is_wanted_is_restarted_now() {
        let mut policy = booted();
        assert_eq!(
            policy.died(slot(0), Death::Drained, true, Instant::now()),
            Decision::Now
        );
    }

    #[test]
    fn the_spawn_ceiling_delays_restarts_without_dropping_them() {
        let mut policy = booted();
        let t0 = Instant::now();
        for k in 0..4 {
            let now = t0 + Duration::from_millis(k * 100);
            assert_eq!(
                policy.died(slot(0), Death::AfterReady, true, now),
                Decision::Now
            );
        }
        // The fifth within the same second waits until the first leaves the window.
        let now = t0 + Duration::from_millis(400);
        assert_eq!(
            policy.died(slot(1), Death::AfterReady, true, now),
            Decision::After {
                delay: Duration::from_millis(600),
                why: Wait::SpawnCeiling
            }
        );
        // Asking again too early waits again; at its turn it goes.
        assert!(matches!(
            policy.due(t0 + Duration::from_millis(900)),
            Decision::After { .. }
        ));
        assert_eq!(policy.due(t0 + Duration::from_millis(1000)), Decision::Now);
        // The window slides: the next turn is when the second spawn (at 100 ms) expires.
        assert_eq!(
            policy.due(t0 + Duration::from_millis(1050)),
            Decision::After {
                delay: Duration::from_millis(50),
                why: Wait::SpawnCeiling
            }
        );
    }

    #[test]
    fn limits_below_one_mean_one() {
        let mut policy = RestartPolicy::new(
            Limits {
                start_failures: 0,
                spawns_per_second: 0,
            },
            3,
        );
        policy.booted();
        let now = Instant::now();
        assert_eq!(policy.due(now), Decision::Now);
        assert!(matches!(
            policy.due(now),
            Decision::After {
                why: Wait::SpawnCeiling,
                ..
            }
        ));
        assert_eq!(
            policy.died(slot(0), Death::BeforeReady, true, now),
            Decision::Stop(GiveUp::StartFailures {
                worker: slot(0),
                failures: 1
            })
        );
    }
}
