//! The chaos suites' trials and randomness (tests/tests/chaos.rs,
//! tests/tests/chaos_ha.rs): how many trials a scenario runs, its seed,
//! and the `CHAOS {json}` line it reports.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Trials and randomness of one scenario.
///
/// `HOTSWAP_CHAOS_TRIALS` sets the trials per scenario (`make chaos` sets
/// it, 25 by default; without it a scenario runs its short default, the run
/// inside `make test`) and `HOTSWAP_CHAOS_SEED` the random seed (printed,
/// so a failure can be replayed).
pub struct Chaos {
    pub scenario: &'static str,
    pub seed: u64,
    pub trials: usize,
    pub rng: StdRng,
}

impl Chaos {
    /// A scenario of the chaos suite: 2 trials unless told otherwise.
    pub fn new(scenario: &'static str) -> Self {
        Self::with_default_trials(scenario, 2)
    }

    /// A scenario whose trials are long (a whole cluster, a lease to wait
    /// out): `default_trials` inside `make test`.
    pub fn with_default_trials(scenario: &'static str, default_trials: usize) -> Self {
        let trials = std::env::var("HOTSWAP_CHAOS_TRIALS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_trials);
        let seed = std::env::var("HOTSWAP_CHAOS_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("chaos {scenario}: {trials} trial(s), HOTSWAP_CHAOS_SEED={seed}");
        Self {
            scenario,
            seed,
            trials,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// A random duration within `range` (milliseconds).
    pub fn millis(&mut self, range: std::ops::Range<u64>) -> Duration {
        Duration::from_millis(self.rng.random_range(range))
    }

    /// Print the scenario's result line.
    pub fn report(&self, outcomes: Value) {
        let line = json!({
            "scenario": self.scenario,
            "seed": self.seed,
            "trials": self.trials,
            "outcomes": outcomes,
        });
        println!("CHAOS {line}");
    }
}

/// SIGKILL `pid`, a child the test spawned, without reaping it.
pub fn send_kill(pid: u32) {
    // SAFETY: kill(2) on the pid of a child this test spawned.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}
