//! Request metrics for `/` and their Prometheus text exposition.
//!
//! The names match the defaults the agent scrapes (`http_requests_total`,
//! `http_errors_total`, `http_request_duration_seconds`), so the module
//! manifest needs no metric overrides.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Histogram bucket upper bounds, spelled as they appear in `le` labels.
const BUCKETS: [(f64, &str); 10] = [
    (0.005, "0.005"),
    (0.01, "0.01"),
    (0.025, "0.025"),
    (0.05, "0.05"),
    (0.1, "0.1"),
    (0.25, "0.25"),
    (0.5, "0.5"),
    (1.0, "1"),
    (2.5, "2.5"),
    (5.0, "5"),
];

#[derive(Debug, Default)]
struct Counts {
    requests: u64,
    errors: u64,
    /// Per-bucket (non-cumulative) observation counts; the last slot is
    /// for observations above the largest bound.
    buckets: [u64; BUCKETS.len() + 1],
    sum_seconds: f64,
}

/// Metrics shared by all connections. A mutex is plenty: one short critical
/// section per request, and it keeps the counters mutually consistent in a
/// scrape (`_count` always equals `http_requests_total`).
#[derive(Debug, Default)]
pub struct Metrics {
    counts: Mutex<Counts>,
}

impl Metrics {
    /// Record one answered request on `/`.
    pub fn observe(&self, status: u16, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|(bound, _)| seconds <= *bound)
            .unwrap_or(BUCKETS.len());
        let mut c = self.lock();
        c.requests += 1;
        if status >= 500 {
            c.errors += 1;
        }
        c.buckets[slot] += 1;
        c.sum_seconds += seconds;
    }

    /// Requests recorded so far.
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    /// The Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let c = self.lock();
        let mut out = String::new();
        // Writing to a String cannot fail; the results are ignored.
        let _ = writeln!(out, "# HELP http_requests_total Requests answered on /.");
        let _ = writeln!(out, "# TYPE http_requests_total counter");
        let _ = writeln!(out, "http_requests_total {}", c.requests);
        let _ = writeln!(
            out,
            "# HELP http_errors_total Requests on / answered with a 5xx status."
        );
        let _ = writeln!(out, "# TYPE http_errors_total counter");
        let _ = writeln!(out, "http_errors_total {}", c.errors);
        let _ = writeln!(
            out,
            "# HELP http_request_duration_seconds Time to answer requests on /."
        );
        let _ = writeln!(out, "# TYPE http_request_duration_seconds histogram");
        let mut cumulative = 0;
        for ((_, label), n) in BUCKETS.iter().zip(c.buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "http_request_duration_seconds_bucket{{le=\"{label}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "http_request_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            c.requests
        );
        let _ = writeln!(out, "http_request_duration_seconds_sum {}", c.sum_seconds);
        let _ = writeln!(out, "http_request_duration_seconds_count {}", c.requests);
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // A panic while holding the lock cannot leave the plain counters
        // invalid, so a poisoned lock is still usable.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cumulative_buckets() {
        let m = Metrics::default();
        m.observe(200, Duration::from_millis(1));
        m.observe(200, Duration::from_millis(30));
        m.observe(500, Duration::from_secs(7));
        let text = m.render();
        for line in [
            "http_requests_total 3",
            "http_errors_total 1",
            "http_request_duration_seconds_bucket{le=\"0.005\"} 1",
            "http_request_duration_seconds_bucket{le=\"0.025\"} 1",
            "http_request_duration_seconds_bucket{le=\"0.05\"} 2",
            "http_request_duration_seconds_bucket{le=\"5\"} 2",
            "http_request_duration_seconds_bucket{le=\"+Inf\"} 3",
            "http_request_duration_seconds_count 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(m.requests(), 3);
    }
}
