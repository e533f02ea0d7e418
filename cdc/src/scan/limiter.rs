//! The speed limit shared by every catch-up scan: a token bucket on tokio
//! time.
//!
//! The bucket holds at most one second's worth of bytes and refills at the
//! configured rate. A scan takes the bytes a batch read *after* reading it
//! (the size is only known then) and may drive the bucket negative; it then
//! waits until the debt is repaid. So over any interval the bytes read
//! exceed `rate × interval` by at most one second's worth plus one batch,
//! and a single batch larger than the bucket never deadlocks.
//!
//! Time is tokio's, so tests drive it with `tokio::time::pause()` /
//! `advance()` instead of sleeping for real.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be read without waiting; negative is debt.
    available: f64,
    last: Instant,
}

/// A shared token bucket; a rate of 0 disables it.
#[derive(Debug)]
pub(crate) struct SpeedLimiter {
    /// Bytes per second; 0 = unlimited.
    rate: u64,
    bucket: Mutex<Bucket>,
}

impl SpeedLimiter {
    pub(crate) fn new(bytes_per_sec: u64) -> SpeedLimiter {
        SpeedLimiter {
            rate: bytes_per_sec,
            bucket: Mutex::new(Bucket {
                available: bytes_per_sec as f64,
                last: Instant::now(),
            }),
        }
    }

    /// Takes `bytes` and returns how long the caller must wait before it
    /// goes on.
    fn reserve(&self, bytes: usize) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let rate = self.rate as f64;
        // A poisoned lock only means another scan panicked while holding
        // it; the bucket's numbers are still meaningful.
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.saturating_duration_since(bucket.last).as_secs_f64() * rate;
        bucket.available = (bucket.available + refill).min(rate);
        bucket.last = now;
        bucket.available -= bytes as f64;
        if bucket.available >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.available / rate)
        }
    }

    /// Takes `bytes`, waiting as long as the limit requires.
    pub(crate) async fn consume(&self, bytes: usize) {
        let wait = self.reserve(bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reads_are_held_to_the_rate() {
        let limiter = SpeedLimiter::new(1000);
        let start = Instant::now();
        // The first second's worth is free, then 1000 bytes per second.
        for _ in 0..5 {
            limiter.consume(1000).await;
        }
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_secs(4), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        // One batch larger than the bucket waits for its own debt only.
        let start = Instant::now();
        limiter.consume(3000).await;
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_secs(3), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn zero_is_unlimited() {
        let limiter = SpeedLimiter::new(0);
        let start = Instant::now();
        for _ in 0..100 {
            limiter.consume(1 << 30).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
