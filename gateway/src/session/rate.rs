//! Token buckets for client commands and bytes, with time passed in.

use std::time::Instant;

/// Tokens and when they were counted; the rate and burst are the node's settings,
/// passed in rather than kept by every connection.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Full: `burst` tokens.
    pub fn new(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    /// Refills at `per_second` up to `burst` since the last call.
    fn refill(&mut self, now: Instant, per_second: u32, burst: u32) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * f64::from(per_second)).min(f64::from(burst.max(1)));
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant, per_second: u32, burst: u32) -> bool {
        self.refill(now, per_second, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Bytes a client sends per second: a message is always taken (it has been read), and
/// the debt says how long the connection should not read again.
#[derive(Debug)]
pub struct ByteBucket(Option<TokenBucket>);

impl ByteBucket {
    /// `per_second` 0: unbounded.
    pub fn new(per_second: u32, burst: u32, now: Instant) -> Self {
        Self((per_second > 0).then(|| TokenBucket::new(burst, now)))
    }

    /// Charges `bytes`; when the bucket is in debt, how long until it is not. Takes the
    /// same `per_second` and `burst` as it was made with.
    pub fn charge(
        &mut self,
        bytes: usize,
        now: Instant,
        per_second: u32,
        burst: u32,
    ) -> Option<std::time::Duration> {
        let b = self.0.as_mut()?;
        b.refill(now, per_second, burst);
        b.tokens -= bytes as f64;
        (b.tokens < 0.0)
            .then(|| std::time::Duration::from_secs_f64(-b.tokens / f64::from(per_second)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn allows_the_burst_then_the_rate() {
        let t = Instant::now();
        let mut b = TokenBucket::new(3, t);
        assert!((0..3).all(|_| b.take(t, 10, 3)));
        assert!(!b.take(t, 10, 3));
        assert!(b.take(t + Duration::from_millis(100), 10, 3));
        assert!(!b.take(t + Duration::from_millis(100), 10, 3));
        assert!(
            (0..3).all(|_| b.take(t + Duration::from_secs(10), 10, 3)),
            "refills up to the burst"
        );
        assert!(!b.take(t + Duration::from_secs(10), 10, 3));
    }

    #[test]
    fn bytes_over_the_burst_pause_reading_for_their_time_at_the_rate() {
        let t = Instant::now();
        let mut b = ByteBucket::new(1000, 2000, t);
        assert_eq!(b.charge(1500, t, 1000, 2000), None);
        assert_eq!(
            b.charge(1000, t, 1000, 2000),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            b.charge(0, t + Duration::from_millis(500), 1000, 2000),
            None
        );
        let mut unbounded = ByteBucket::new(0, 0, t);
        assert_eq!(unbounded.charge(usize::MAX, t, 0, 0), None);
    }
}
