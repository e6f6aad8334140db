//! The one way this process reads time. Monotonic instants come from tokio's clock, so
//! tests that pause tokio's time move every TTL, timer and rate limit with it; wall-clock
//! milliseconds (publication timestamps, token expiry, presence scores) come from the
//! system clock, or from a manual clock in unit tests.
//!
//! Plain state machines (the delivery tracker, the subscription table, a channel's log)
//! never read a clock: callers pass `now` in, and read it here.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// A handle to the clock; cheap to clone.
#[derive(Clone, Default)]
pub struct Clock {
    /// `None`: the system clock. `Some`: a wall clock that moves only when a test says so.
    manual_unix_ms: Option<Arc<AtomicI64>>,
}

impl Clock {
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock whose wall time starts at `unix_ms` and moves only with [`Clock::advance`].
    /// Its instants still come from tokio (pause tokio's time to control them too).
    pub fn manual(unix_ms: i64) -> Self {
        Self {
            manual_unix_ms: Some(Arc::new(AtomicI64::new(unix_ms))),
        }
    }

    /// Moves a manual clock's wall time forward; no effect on the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(ms) = &self.manual_unix_ms {
            ms.fetch_add(by.as_millis() as i64, Ordering::Relaxed);
        }
    }

    /// Monotonic now, for durations and deadlines.
    pub fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_ms(&self) -> i64 {
        match &self.manual_unix_ms {
            Some(ms) => ms.load(Ordering::Relaxed),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        }
    }

    /// Seconds since the Unix epoch (token `exp`/`nbf` are in seconds).
    pub fn unix_secs(&self) -> u64 {
        (self.unix_ms().max(0) / 1000) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let c = Clock::manual(1_000);
        assert_eq!((c.unix_ms(), c.unix_secs()), (1_000, 1));
        c.advance(Duration::from_millis(2_500));
        assert_eq!(c.unix_ms(), 3_500);
        assert!(Clock::system().unix_ms() > 1_600_000_000_000);
    }
}
