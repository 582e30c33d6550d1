//! Reconnect backoff: exponential with full jitter (base 250 ms, cap 8 s), reset once a
//! connection reaches live. Pure: the random draw is passed in.

use std::time::Duration;

pub const BASE: Duration = Duration::from_millis(250);
pub const CAP: Duration = Duration::from_secs(8);

/// The ceiling of attempt `n` (0-based): `min(cap, base · 2^n)`.
pub fn ceiling(attempt: u32) -> Duration {
    BASE.saturating_mul(1u32 << attempt.min(16)).min(CAP)
}

/// Full jitter: a delay in `[0, ceiling(attempt)]`, with `unit` a draw from `[0, 1)`.
pub fn delay(attempt: u32, unit: f64) -> Duration {
    ceiling(attempt).mul_f64(unit.clamp(0.0, 1.0))
}

/// Counts attempts and draws delays.
#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let d = delay(self.attempt, rand::random::<f64>());
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let got: Vec<u64> = (0..8).map(|n| ceiling(n).as_millis() as u64).collect();
        assert_eq!(got, vec![250, 500, 1000, 2000, 4000, 8000, 8000, 8000]);
        assert_eq!(ceiling(u32::MAX), CAP);
    }

    #[test]
    fn jitter_stays_within_the_ceiling() {
        assert_eq!(delay(3, 0.0), Duration::ZERO);
        assert_eq!(delay(3, 0.5), Duration::from_millis(1000));
        assert_eq!(delay(3, 7.0), Duration::from_millis(2000));
        let mut b = Backoff::default();
        for n in 0..10 {
            assert!(b.next_delay() <= ceiling(n));
        }
        b.reset();
        assert_eq!(b.attempts(), 0);
    }
}
