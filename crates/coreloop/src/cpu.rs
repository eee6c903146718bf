//! CPU placement: pinning the supervisor to one CPU and each worker to its own.
//!
//! Affinity is inherited across `exec`, so a worker started by a pinned supervisor would
//! be pinned to the supervisor's CPU. The supervisor therefore reads the set of CPUs the
//! process may run on *before* it pins itself, and passes it to every worker in
//! `CORELOOP_CPUS`; a worker pins itself to its slot's CPU from that list, or restores the
//! whole list.

use std::io;

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

/// Environment variable carrying the CPUs the server may use, e.g. `0,1,2,3`.
pub(crate) const ENV_CPUS: &str = "CORELOOP_CPUS";

/// The CPUs the calling thread may run on, in order.
pub(crate) fn allowed() -> io::Result<Vec<usize>> {
    let set = sched_getaffinity(None)?;
    Ok((0..CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect())
}

/// Restricts the calling thread (and what it later spawns) to `cpus`.
pub(crate) fn set(cpus: &[usize]) -> io::Result<()> {
    let mut set = CpuSet::new();
    for &cpu in cpus.iter().filter(|&&cpu| cpu < CpuSet::MAX_CPU) {
        set.set(cpu);
    }
    Ok(sched_setaffinity(None, &set)?)
}

pub(crate) fn encode(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) fn decode(text: &str) -> Vec<usize> {
    text.split(',')
        .filter_map(|cpu| cpu.trim().parse().ok())
        .collect()
}

/// The CPU for slot `k` among `cpus`: they are used in turn.
pub(crate) fn for_slot(cpus: &[usize], k: usize) -> Option<usize> {
    (!cpus.is_empty()).then(|| cpus[k % cpus.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_spreads_slots() {
        let cpus = decode(&encode(&[0, 2, 5]));
        assert_eq!(cpus, [0, 2, 5]);
        assert_eq!(for_slot(&cpus, 4), Some(2));
        assert_eq!(for_slot(&[], 1), None);
    }

    #[test]
    fn this_thread_can_be_pinned_and_restored() {
        let all = allowed().unwrap();
        assert!(!all.is_empty());
        set(&all[..1]).unwrap();
        assert_eq!(allowed().unwrap(), all[..1]);
        set(&all).unwrap();
        assert_eq!(allowed().unwrap(), all);
    }
}
