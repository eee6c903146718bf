//! [`WorkerId`]: the one identity of a worker slot, used by the supervisor, the restart
//! policy, the errors and the handler factory alike. Its own module so that every other
//! module can name it without depending on another's.

/// Identifies one worker slot: `0..workers`. A replacement worker keeps its slot's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub(crate) usize);

impl WorkerId {
    /// The slot number.
    pub fn get(self) -> usize {
        self.0
    }
}

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
