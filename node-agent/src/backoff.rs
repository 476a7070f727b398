//! Exponential backoff with jitter, as a pure value: the caller supplies the
//! random number, so the schedule is testable and reproducible.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// Delay before the next attempt. "Equal jitter": half the exponential
    /// step is fixed, half is random, so a fleet reconnecting after a control
    /// plane restart spreads out without anyone retrying at once in a loop.
    /// `random` is uniform in [0, 1).
    pub fn next_delay(&mut self, random: f64) -> Duration {
        let exponent = self.attempt.min(30);
        self.attempt = self.attempt.saturating_add(1);
        let step = self.base.saturating_mul(1u32 << exponent).min(self.max);
        let half = step / 2;
        half + half.mul_f64(random.clamp(0.0, 1.0))
    }

    /// Start over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn doubles_until_the_cap_then_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<u128> = (0..6).map(|_| b.next_delay(1.0).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
    }

    proptest! {
        #[test]
        fn delay_stays_within_half_step_and_cap(attempts in 0u32..200, random in 0.0f64..1.0) {
            let base = Duration::from_millis(250);
            let max = Duration::from_secs(15);
            let mut b = Backoff::new(base, max);
            let mut delay = Duration::ZERO;
            for _ in 0..=attempts {
                delay = b.next_delay(random);
            }
            let step = base.saturating_mul(1u32 << attempts.min(30)).min(max);
            prop_assert!(delay >= step / 2);
            prop_assert!(delay <= step);
            prop_assert!(delay <= max);
        }
    }
}
