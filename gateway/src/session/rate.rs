//! Token buckets for client commands and bytes, with time passed in.

use std::time::Instant;

#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(per_second),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
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
        Self((per_second > 0).then(|| TokenBucket::new(per_second, burst, now)))
    }

    /// Charges `bytes`; when the bucket is in debt, how long until it is not.
    pub fn charge(&mut self, bytes: usize, now: Instant) -> Option<std::time::Duration> {
        let b = self.0.as_mut()?;
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.last = now;
        b.tokens = (b.tokens + elapsed * b.rate).min(b.burst) - bytes as f64;
        (b.tokens < 0.0).then(|| std::time::Duration::from_secs_f64(-b.tokens / b.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn allows_the_burst_then_the_rate() {
        let t = Instant::now();
        let mut b = TokenBucket::new(10, 3, t);
        assert!((0..3).all(|_| b.take(t)));
        assert!(!b.take(t));
        assert!(b.take(t + Duration::from_millis(100)));
        assert!(!b.take(t + Duration::from_millis(100)));
        assert!(
            (0..3).all(|_| b.take(t + Duration::from_secs(10))),
            "refills up to the burst"
        );
        assert!(!b.take(t + Duration::from_secs(10)));
    }

    #[test]
    fn bytes_over_the_burst_pause_reading_for_their_time_at_the_rate() {
        let t = Instant::now();
        let mut b = ByteBucket::new(1000, 2000, t);
        assert_eq!(b.charge(1500, t), None);
        assert_eq!(b.charge(1000, t), Some(Duration::from_millis(500)));
        assert_eq!(b.charge(0, t + Duration::from_millis(500)), None);
        let mut unbounded = ByteBucket::new(0, 0, t);
        assert_eq!(unbounded.charge(usize::MAX, t), None);
    }
}
