//! Exponential backoff with full jitter for retries after transient failures: a random
//! wait between zero and `min(cap, base * 2^attempt)`, so that a restarted server is not
//! hit by every retry at once.

use rand::Rng;
use std::time::Duration;

/// 250 ms base, 8 s cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base: Duration::from_millis(250), cap: Duration::from_secs(8), attempt: 0 }
    }
}

impl Backoff {
    /// The ceiling of the next wait.
    pub fn ceiling(&self) -> Duration {
        self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.cap)
    }

    /// The next wait; each call raises the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Failures since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let ceilings: Vec<u64> = (0..8)
            .map(|_| {
                let ceiling = b.ceiling();
                assert!(b.next_delay() <= ceiling);
                ceiling.as_millis() as u64
            })
            .collect();
        assert_eq!(ceilings, vec![250, 500, 1000, 2000, 4000, 8000, 8000, 8000]);
        b.reset();
        assert_eq!((b.ceiling(), b.attempts()), (Duration::from_millis(250), 0));
    }
}
