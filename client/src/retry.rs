//! Bounded retries with exponential backoff.
//!
//! Every retry loop in the client is bounded by a [`Backoff`]: a fixed number
//! of attempts, each wait doubling up to a cap, so a server that keeps
//! answering "try again" turns into an error the user sees instead of a
//! hang. Waiting uses tokio's timer, so tests can run with paused time.

use std::time::Duration;

/// A retry budget: how many attempts, and how long to wait between them.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Attempts made so far (the first try counts).
    attempts: u32,
    max_attempts: u32,
    next_delay: Duration,
    max_delay: Duration,
}

impl Backoff {
    /// Region errors: leaders move and layouts change quickly, so start
    /// small; ten attempts wait about 3 s in total.
    pub fn region() -> Backoff {
        Backoff::new(10, Duration::from_millis(10), Duration::from_millis(1_000))
    }

    /// Transaction restarts after a write conflict: few, a little apart.
    pub fn conflict() -> Backoff {
        Backoff::new(4, Duration::from_millis(20), Duration::from_millis(200))
    }

    /// Lock resolution and commit-ts renewals: a lock that is still alive is
    /// reported at once, so few rounds are ever needed.
    pub fn lock() -> Backoff {
        Backoff::new(5, Duration::from_millis(10), Duration::from_millis(100))
    }

    /// A budget of `max_attempts` attempts in all (the first try counts; 0
    /// is taken as 1), waiting `first_delay` before the second and doubling
    /// each wait up to `max_delay`.
    pub fn new(max_attempts: u32, first_delay: Duration, max_delay: Duration) -> Backoff {
        Backoff {
            attempts: 1,
            max_attempts: max_attempts.max(1),
            next_delay: first_delay,
            max_delay,
        }
    }

    /// Attempts made so far, counting the first.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Accounts for one more attempt. Returns the delay to wait before it,
    /// or `None` when the budget is spent.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.attempts >= self.max_attempts {
            return None;
        }
        self.attempts += 1;
        let delay = self.next_delay;
        self.next_delay = (delay * 2).min(self.max_delay);
        Some(delay)
    }

    /// Like [`Backoff::next_delay`], and waits out the delay unless
    /// `at_once`. Returns `false` when the budget is spent.
    pub async fn wait(&mut self, at_once: bool) -> bool {
        match self.next_delay() {
            Some(delay) => {
                if !at_once {
                    tokio::time::sleep(delay).await;
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stop() {
        let mut b = Backoff::new(5, Duration::from_millis(10), Duration::from_millis(30));
        let delays: Vec<_> = std::iter::from_fn(|| b.next_delay()).collect();
        assert_eq!(
            delays,
            [10, 20, 30, 30].map(Duration::from_millis).to_vec(),
            "four retries after the first attempt"
        );
        assert_eq!(b.attempts(), 5);
        assert_eq!(b.next_delay(), None);
    }

    #[test]
    fn a_budget_of_one_never_retries() {
        let mut b = Backoff::new(0, Duration::from_millis(1), Duration::from_millis(1));
        assert_eq!(b.next_delay(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_sleeps_only_when_asked() {
        let mut b = Backoff::new(3, Duration::from_secs(5), Duration::from_secs(5));
        let start = tokio::time::Instant::now();
        assert!(b.wait(true).await);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(b.wait(false).await);
        assert!(start.elapsed() >= Duration::from_secs(5));
        assert!(!b.wait(false).await);
    }
}
