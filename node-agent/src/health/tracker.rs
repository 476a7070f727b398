//! Health threshold logic (pure): turns a stream of probe results into a
//! [`Health`] state.

use hotswap_common::status::Health;

/// Threshold logic (pure): consecutive successes/failures move the state.
///
/// From Unknown or Unhealthy, `healthy_threshold` consecutive successes make
/// the module Healthy; from Unknown or Healthy, `unhealthy_threshold`
/// consecutive failures make it Unhealthy. A success resets the failure
/// streak and vice versa, so one flaky probe never flips the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthTracker {
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    state: Health,
    successes: u32,
    failures: u32,
}

impl HealthTracker {
    /// A tracker in the Unknown state. A threshold of 0 behaves like 1: the
    /// state must never change without at least one probe result behind it.
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        HealthTracker {
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
            state: Health::Unknown,
            successes: 0,
            failures: 0,
        }
    }

    /// Record one probe result; returns `Some(new)` when the state changed.
    pub fn observe(&mut self, ok: bool) -> Option<Health> {
        let (streak, threshold, target) = if ok {
            self.failures = 0;
            (&mut self.successes, self.healthy_threshold, Health::Healthy)
        } else {
            self.successes = 0;
            (
                &mut self.failures,
                self.unhealthy_threshold,
                Health::Unhealthy,
            )
        };
        // Saturating: a module probed every second for years must not wrap
        // around to a short streak.
        *streak = streak.saturating_add(1);
        if self.state != target && *streak >= threshold {
            self.state = target;
            return Some(target);
        }
        None
    }

    pub fn health(&self) -> Health {
        self.state
    }

    /// Back to Unknown with both streaks at zero (e.g. after a restart or a
    /// swap, when earlier results say nothing about the new process).
    pub fn reset(&mut self) {
        self.state = Health::Unknown;
        self.successes = 0;
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use Health::{Healthy, Unhealthy, Unknown};

    /// Feed `results` ("S" success, "F" failure) and collect the state
    /// after each one.
    fn run(healthy: u32, unhealthy: u32, results: &str) -> Vec<Health> {
        let mut tracker = HealthTracker::new(healthy, unhealthy);
        results
            .chars()
            .map(|c| {
                let before = tracker.health();
                let change = tracker.observe(c == 'S');
                let after = tracker.health();
                assert_eq!(change.is_some(), before != after, "{results}");
                if let Some(new) = change {
                    assert_eq!(new, after);
                }
                after
            })
            .collect()
    }

    #[test]
    fn tracker_table() {
        let cases: &[(u32, u32, &str, &[Health])] = &[
            (1, 1, "", &[]),
            (1, 1, "S", &[Healthy]),
            (1, 1, "F", &[Unhealthy]),
            (1, 1, "SFS", &[Healthy, Unhealthy, Healthy]),
            (2, 3, "S", &[Unknown]),
            (2, 3, "SS", &[Unknown, Healthy]),
            (2, 3, "SFS", &[Unknown, Unknown, Unknown]),
            (2, 3, "SFSS", &[Unknown, Unknown, Unknown, Healthy]),
            (2, 3, "FF", &[Unknown, Unknown]),
            (2, 3, "FFF", &[Unknown, Unknown, Unhealthy]),
            (
                2,
                3,
                "SSFFSFFF",
                &[
                    Unknown, Healthy, Healthy, Healthy, Healthy, Healthy, Healthy, Unhealthy,
                ],
            ),
            (
                3,
                1,
                "FSSFSSS",
                &[
                    Unhealthy, Unhealthy, Unhealthy, Unhealthy, Unhealthy, Unhealthy, Healthy,
                ],
            ),
            (
                2,
                2,
                "SSSSFSFSFF",
                &[
                    Unknown, Healthy, Healthy, Healthy, Healthy, Healthy, Healthy, Healthy,
                    Healthy, Unhealthy,
                ],
            ),
            // Zero thresholds act like one.
            (0, 0, "SF", &[Healthy, Unhealthy]),
        ];
        for (healthy, unhealthy, results, want) in cases {
            assert_eq!(
                run(*healthy, *unhealthy, results),
                *want,
                "thresholds {healthy}/{unhealthy}, results {results:?}"
            );
        }
    }

    #[test]
    fn tracker_reports_changes_only() {
        let mut tracker = HealthTracker::new(2, 2);
        assert_eq!(tracker.observe(true), None);
        assert_eq!(tracker.observe(true), Some(Healthy));
        assert_eq!(tracker.observe(true), None);
        assert_eq!(tracker.observe(false), None);
        assert_eq!(tracker.observe(false), Some(Unhealthy));
        assert_eq!(tracker.observe(false), None);
    }

    #[test]
    fn tracker_reset() {
        let mut tracker = HealthTracker::new(2, 2);
        tracker.observe(true);
        tracker.observe(true);
        assert_eq!(tracker.health(), Healthy);
        tracker.observe(false);
        tracker.reset();
        assert_eq!(tracker.health(), Unknown);
        // The failure before the reset no longer counts.
        assert_eq!(tracker.observe(false), None);
        assert_eq!(tracker.observe(false), Some(Unhealthy));
        tracker.reset();
        // Neither does the success streak.
        assert_eq!(tracker.observe(true), None);
        assert_eq!(tracker.health(), Unknown);
    }

    #[test]
    fn tracker_long_streak_does_not_wrap() {
        let mut tracker = HealthTracker::new(1, 1);
        tracker.successes = u32::MAX - 1;
        tracker.state = Healthy;
        for _ in 0..3 {
            assert_eq!(tracker.observe(true), None);
        }
        assert_eq!(tracker.health(), Healthy);
    }

    #[test]
    fn health_as_str() {
        assert_eq!(Unknown.as_str(), "unknown");
        assert_eq!(Healthy.as_str(), "healthy");
        assert_eq!(Unhealthy.as_str(), "unhealthy");
        assert_eq!(Healthy.to_string(), "healthy");
    }

    proptest! {
        /// The state changes exactly when a run of identical results reaches
        /// its threshold and the state is not already the target.
        #[test]
        fn tracker_changes_only_at_threshold(
            healthy in 1u32..5,
            unhealthy in 1u32..5,
            results in proptest::collection::vec(any::<bool>(), 0..64),
        ) {
            let mut tracker = HealthTracker::new(healthy, unhealthy);
            let mut run_len = 0u32;
            let mut last: Option<bool> = None;
            for ok in results {
                run_len = if last == Some(ok) { run_len + 1 } else { 1 };
                last = Some(ok);
                let before = tracker.health();
                let change = tracker.observe(ok);
                let (threshold, target) = if ok { (healthy, Healthy) } else { (unhealthy, Unhealthy) };
                let expect = (run_len == threshold && before != target).then_some(target);
                prop_assert_eq!(change, expect);
                prop_assert_eq!(tracker.health(), expect.unwrap_or(before));
            }
        }
    }
}
