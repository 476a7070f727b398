//! The control plane's clock for everything deployments time: wall-clock
//! milliseconds that advance with the monotonic clock, so a step of the
//! system clock (an NTP correction, a VM restored from a snapshot, an
//! operator's `date -s`) neither expires a deployment's deadlines at once
//! nor holds it for as long as the clock went back.
//!
//! It starts at the wall clock, then follows the monotonic clock; forward
//! corrections of up to [`FOLLOW_MS`] are taken at once (ordinary NTP
//! adjustments), larger steps are not, and it never goes backwards. After a
//! restart it starts at the wall clock again, but never before the latest
//! time the persisted deployments hold ([`raise_floor`]).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hotswap_common::timefmt;

/// Forward steps of the wall clock up to this size are followed.
pub const FOLLOW_MS: u64 = 1000;

/// The monotonic reference, taken at the first reading.
static BASE_INSTANT: OnceLock<Instant> = OnceLock::new();
/// Wall time that [`BASE_INSTANT`] stands for; only ever raised.
static BASE_WALL_MS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since the Unix epoch on the steady timeline: the clock of
/// deployment timing. Not `timefmt::now_ms`, the wall clock that
/// certificates, tokens and records' timestamps read.
pub fn steady_now_ms() -> u64 {
    let base = *BASE_INSTANT.get_or_init(|| {
        BASE_WALL_MS.fetch_max(timefmt::now_ms(), Ordering::SeqCst);
        Instant::now()
    });
    let elapsed = base.elapsed().as_millis() as u64;
    let steady = BASE_WALL_MS.load(Ordering::SeqCst) + elapsed;
    let wall = timefmt::now_ms();
    let ahead = wall.saturating_sub(steady);
    if ahead > 0 && ahead <= FOLLOW_MS {
        BASE_WALL_MS.fetch_add(ahead, Ordering::SeqCst);
        return steady + ahead;
    }
    steady
}

/// Make sure the clock reads at least `floor_ms` from now on: times already
/// persisted must never lie in its future.
pub fn raise_floor(floor_ms: u64) {
    let now = steady_now_ms();
    if floor_ms > now {
        BASE_WALL_MS.fetch_add(floor_ms - now, Ordering::SeqCst);
        tracing::warn!(
            behind_ms = floor_ms - now,
            "the wall clock is behind times already recorded; deployment timing continues from the recorded ones"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_backwards_and_respects_a_floor() {
        let a = steady_now_ms();
        let b = steady_now_ms();
        assert!(b >= a);
        let wall = timefmt::now_ms();
        assert!(a.abs_diff(wall) < 5_000, "starts at the wall clock");
        raise_floor(steady_now_ms() + 60_000);
        let c = steady_now_ms();
        assert!(c >= wall + 60_000, "{c} after raising the floor");
        // Lower floors change nothing.
        raise_floor(0);
        assert!(steady_now_ms() >= c);
    }
}
