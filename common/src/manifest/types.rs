//! The manifest's types: what a parsed and validated `module.toml` says,
//! and the error a manifest that cannot be read or validated gives.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// File name of the manifest at the root of a module directory.
pub const MANIFEST_FILE: &str = "module.toml";

/// A parsed and validated module manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub version: semver::Version,
    pub runtime: Runtime,
    pub description: Option<String>,
    /// `Some` exactly when `runtime` is [`Runtime::Process`].
    pub process: Option<ProcessSpec>,
    /// `Some` exactly when `runtime` is [`Runtime::Bundle`]; an absent
    /// `[bundle]` table gives the default (no hooks).
    pub bundle: Option<BundleSpec>,
    /// `Some` exactly when `runtime` is [`Runtime::Wasm`] (SPEC §10).
    pub wasm: Option<WasmSpec>,
    pub health: Option<HealthSpec>,
    pub metrics: Option<MetricsSpec>,
}

/// How a module runs on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// A supervised long-running process.
    Process,
    /// Files only; swapping flips a symlink, optionally with hooks.
    Bundle,
    /// A WebAssembly component of the `wasi:http/proxy` world, served by the
    /// agent itself in process (SPEC §10).
    Wasm,
}

impl Runtime {
    /// The manifest spelling: `"process"`, `"bundle"` or `"wasm"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Runtime::Process => "process",
            Runtime::Bundle => "bundle",
            Runtime::Wasm => "wasm",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `[process]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Program and arguments; a relative program resolves inside the module dir.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub swap: SwapStrategy,
    pub stop_signal: StopSignal,
    pub stop_timeout: Duration,
    /// Agent-owned listeners, passed to the process as fds 3.. in this order.
    pub sockets: Vec<SocketSpec>,
}

/// Order of starting the new process and stopping the old one during a swap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapStrategy {
    /// Start the new version, wait until healthy, then stop the old one.
    StartFirst,
    /// Stop the old version first (for modules that cannot run twice).
    StopFirst,
}

impl SwapStrategy {
    /// The manifest spelling: `"start-first"` or `"stop-first"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            SwapStrategy::StartFirst => "start-first",
            SwapStrategy::StopFirst => "stop-first",
        }
    }
}

/// A signal a process may be stopped with, by canonical name and Linux number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopSignal {
    pub name: &'static str,
    pub number: i32,
}

/// Signals a manifest may name; numbers are the Linux ones, the only platform
/// agents run on.
pub(super) const SIGNALS: [StopSignal; 7] = [
    StopSignal {
        name: "SIGTERM",
        number: 15,
    },
    StopSignal {
        name: "SIGINT",
        number: 2,
    },
    StopSignal {
        name: "SIGQUIT",
        number: 3,
    },
    StopSignal {
        name: "SIGHUP",
        number: 1,
    },
    StopSignal {
        name: "SIGUSR1",
        number: 10,
    },
    StopSignal {
        name: "SIGUSR2",
        number: 12,
    },
    StopSignal {
        name: "SIGKILL",
        number: 9,
    },
];

impl StopSignal {
    /// SIGTERM, the default stop signal.
    pub const TERM: StopSignal = SIGNALS[0];

    /// Look up `SIGTERM` or `TERM` (upper case only) and friends.
    pub fn parse(text: &str) -> Option<StopSignal> {
        let bare = text.strip_prefix("SIG").unwrap_or(text);
        SIGNALS.into_iter().find(|s| s.name.get(3..) == Some(bare))
    }
}

/// One `[[process.sockets]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketSpec {
    pub name: String,
    /// `ip:port`, possibly with `${...}` variables (e.g. a port from a node
    /// label); literal addresses are checked here, templated ones on the node.
    pub listen: String,
}

impl SocketSpec {
    /// The address, when `listen` has no variables.
    pub fn literal_addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }
}

/// The `[bundle]` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BundleSpec {
    /// Runs after the flip; failure flips back.
    pub activate: Option<Vec<String>>,
    pub deactivate: Option<Vec<String>>,
}

/// The `[wasm]` section (SPEC §10).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WasmSpec {
    /// The component file, relative to the module dir (never leaving it).
    pub component: String,
    /// Linear memory one instance may grow to, in bytes.
    pub max_memory: u64,
    /// How long one request may run inside the component.
    pub request_timeout: Duration,
    /// Requests served at once; more are answered 503.
    pub max_concurrent_requests: u32,
    /// The component's whole environment (WASI `get-environment`).
    pub env: BTreeMap<String, String>,
    /// Agent-owned listeners the agent serves HTTP/1.1 on.
    pub sockets: Vec<SocketSpec>,
}

/// The `[health]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSpec {
    pub check: HealthCheck,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub start_timeout: Duration,
}

/// What a health probe does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthCheck {
    /// GET this URL; 2xx is healthy.
    Http(String),
    /// Connect to this `host:port`.
    Tcp(String),
    /// Run this command; exit status 0 is healthy.
    Exec(Vec<String>),
}

/// The `[metrics]` section: where to scrape and which series to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsSpec {
    pub prometheus: String,
    pub requests_total: String,
    pub errors_total: String,
    pub latency_seconds: String,
}

/// A manifest that cannot be read, parsed or validated.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{file}: {key}: {reason}")]
pub struct ManifestError {
    /// The manifest file, as given by the caller.
    pub file: String,
    /// Full dotted key, e.g. `process.sockets[1].listen`; `-` for the whole file.
    pub key: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_parse_bare_and_canonical_upper_case_names() {
        assert_eq!(StopSignal::parse("TERM"), Some(StopSignal::TERM));
        assert_eq!(StopSignal::parse("SIGTERM"), Some(StopSignal::TERM));
        assert_eq!(
            StopSignal::parse("SIGKILL").map(|s| (s.name, s.number)),
            Some(("SIGKILL", 9))
        );
        assert_eq!(StopSignal::parse("sigterm"), None);
        assert_eq!(StopSignal::parse("SIG"), None);
        assert_eq!(StopSignal::parse(""), None);
        assert_eq!(StopSignal::parse("SIGSEGV"), None);
    }

    #[test]
    fn spellings_are_the_manifest_words() {
        assert_eq!(Runtime::Process.to_string(), "process");
        assert_eq!(Runtime::Bundle.as_str(), "bundle");
        assert_eq!(Runtime::Wasm.as_str(), "wasm");
        assert_eq!(SwapStrategy::StartFirst.as_str(), "start-first");
        assert_eq!(SwapStrategy::StopFirst.as_str(), "stop-first");
    }
}
