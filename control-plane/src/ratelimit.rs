//! Token buckets by key: per source address for the one unauthenticated
//! call (enrollment), per operator for mutating calls. Each key gets `burst`
//! attempts, refilled at `per_minute`; a full, idle bucket carries no
//! information and is dropped when the table grows, so memory stays bounded
//! by the number of recently active keys.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries kept before idle ones are pruned.
const PRUNE_ABOVE: usize = 4096;

pub struct RateLimiter<K = IpAddr> {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq> RateLimiter<K> {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_minute.max(1)) / 60.0,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Attempts allowed per minute, once the burst is spent.
    pub fn per_minute(&self) -> f64 {
        self.per_second * 60.0
    }

    /// Whether [`RateLimiter::check`] would allow an attempt for `key` at
    /// `now`, without taking it; on refusal, how long until it would.
    pub fn peek(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let refilled = buckets.get(key).map_or(self.burst, |(tokens, at)| {
            (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.per_second)
                .min(self.burst)
        });
        if refilled >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - refilled) / self.per_second))
        }
    }

    /// Take one attempt for `key` at `now`; on refusal, how long until the
    /// next attempt is allowed.
    pub fn check(&self, key: K, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = buckets.entry(key).or_insert((self.burst, now));
        let refilled = (*tokens
            + now.saturating_duration_since(*at).as_secs_f64() * self.per_second)
            .min(self.burst);
        *at = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            Ok(())
        } else {
            *tokens = refilled;
            Err(Duration::from_secs_f64((1.0 - refilled) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peeking_takes_nothing() {
        let limiter = RateLimiter::new(60, 1);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.peek(&"a", t0), Ok(()));
        }
        assert_eq!(limiter.check("a", t0), Ok(()));
        assert!(limiter.peek(&"a", t0).is_err());
        assert!(limiter.check("a", t0).is_err());
        // One second refills one attempt at 60 a minute.
        assert_eq!(limiter.peek(&"a", t0 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn burst_then_refill_per_address() {
        let limiter = RateLimiter::new(60, 3);
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limiter.check(a, t0).is_ok());
        }
        let wait = limiter.check(a, t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(
            limiter.check(b, t0).is_ok(),
            "other addresses are unaffected"
        );
        assert!(limiter.check(a, t0 + Duration::from_millis(500)).is_err());
        assert!(limiter.check(a, t0 + Duration::from_millis(1100)).is_ok());
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(limiter.check(a, later).is_ok());
        }
        assert!(limiter.check(a, later).is_err());
    }

    #[test]
    fn table_stays_bounded() {
        let limiter = RateLimiter::new(60, 2);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            let _ = limiter.check(ip, t0 + Duration::from_secs(u64::from(i) / 100));
        }
        let len = limiter.buckets.lock().unwrap().len();
        assert!(len <= PRUNE_ABOVE + 1, "{len}");
    }
}
