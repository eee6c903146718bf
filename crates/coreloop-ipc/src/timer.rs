//! [`Ticker`]: a periodic timer with sub-millisecond resolution (a `timerfd` registered with
//! the tokio reactor), for the supervisor's accept loop.
//!
//! tokio's timers have a resolution of 1 ms, which is too coarse for polling listeners under
//! load: every connection would wait up to 2 ms. A `CLOCK_MONOTONIC` `timerfd` expires on
//! time (no timer slack applies to it) and wakes the runtime through the same `epoll` as
//! any socket. It goes through rustix's safe wrappers and [`Readiness`]; it needs no
//! `unsafe` of its own.

use std::future::poll_fn;
use std::io;
use std::time::Duration;

use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
    timerfd_settime,
};
use tokio::io::Interest;

use crate::fd::Readiness;

/// A periodic timer that can be started and stopped, waited on with [`Ticker::tick`].
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use coreloop_ipc::Ticker;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let ticker = Ticker::new()?;
/// ticker.start(Duration::from_micros(200))?;
/// let expirations = ticker.tick().await?;
/// assert!(expirations >= 1);
/// ticker.stop()?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Ticker {
    fd: Readiness,
}

impl Ticker {
    /// Creates a stopped timer. Must be called inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// The `timerfd_create` error, or the reactor's registration error.
    pub fn new() -> io::Result<Self> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        Ok(Self {
            fd: Readiness::new(fd, Interest::READABLE)?,
        })
    }

    /// Starts ticking every `period`, the first tick one `period` from now. Expirations
    /// not yet waited for are forgotten.
    ///
    /// # Errors
    ///
    /// The `timerfd_settime` error.
    pub fn start(&self, period: Duration) -> io::Result<()> {
        // A zero period would disarm the timer: tick at least every nanosecond.
        let period = timespec(period.max(Duration::from_nanos(1)));
        self.set(period, period)
    }

    /// Stops the timer; [`tick`](Self::tick) then waits until the next [`start`](Self::start).
    ///
    /// # Errors
    ///
    /// The `timerfd_settime` error.
    pub fn stop(&self) -> io::Result<()> {
        let zero = timespec(Duration::ZERO);
        self.set(zero, zero)
    }

    fn set(&self, first: Timespec, period: Timespec) -> io::Result<()> {
        let spec = Itimerspec {
            it_interval: period,
            it_value: first,
        };
        timerfd_settime(&self.fd, TimerfdTimerFlags::empty(), &spec)?;
        Ok(())
    }

    /// Waits for the next expiration; returns how many periods passed since the last wait
    /// (more than 1 when the caller was late).
    ///
    /// # Errors
    ///
    /// The `read` error, or an error the reactor reports for the descriptor.
    pub async fn tick(&self) -> io::Result<u64> {
        loop {
            poll_fn(|cx| self.fd.poll_read_ready(cx)).await?;
            let mut count = [0u8; 8];
            match rustix::io::read(&self.fd, &mut count) {
                Ok(8) => return Ok(u64::from_ne_bytes(count)),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "timerfd read returned {n} bytes, expected 8"
                    )));
                }
                Err(rustix::io::Errno::AGAIN) => self.fd.clear_read_ready(),
                Err(err) => return Err(err.into()),
            }
        }
    }
}

fn timespec(d: Duration) -> Timespec {
    Timespec {
        tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(d.subsec_nanos()),
    }
}
