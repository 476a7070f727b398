//! Control plane configuration: flags plus an optional TOML file, parsed once
//! into typed values and validated before anything binds a port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hotswap_common::timefmt::duration_text;
use serde::{Deserialize, Serialize};

/// Tunables read from `--config FILE`. Every field has a default, so the file
/// is optional and may set any subset.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// How often agents send heartbeats; sent to each agent in its welcome.
    #[serde(with = "duration_text")]
    pub heartbeat_interval: Duration,
    /// A node whose session carries no message for this long is disconnected.
    /// Three heartbeat intervals tolerate two lost or delayed heartbeats.
    #[serde(with = "duration_text")]
    pub heartbeat_grace: Duration,
    /// Validity of node certificates issued at enrollment and renewal. Agents
    /// renew at two thirds of it.
    #[serde(with = "duration_text")]
    pub node_cert_validity: Duration,
    /// Validity of operator certificates from `users create` (default; the
    /// request may ask for less).
    #[serde(with = "duration_text")]
    pub user_cert_validity: Duration,
    /// A deployment still awaiting approval this long after creation is aborted.
    #[serde(with = "duration_text")]
    pub approval_timeout: Duration,
    /// A deployment paused, or waiting for `deploy promote`, this long fails
    /// (and rolls back unless `--no-auto-rollback`); `--pause-timeout`
    /// overrides it per deployment.
    #[serde(with = "duration_text")]
    pub pause_timeout: Duration,
    /// A pipeline waiting this long for an environment with no connected
    /// node gives up.
    #[serde(with = "duration_text")]
    pub pipeline_wait_timeout: Duration,
    /// Unary calls taking longer than this are cancelled (uploads and
    /// streams are bounded by their own limits).
    #[serde(with = "duration_text")]
    pub request_timeout: Duration,
    /// An upload (`module push`) that delivers no chunk for this long is
    /// cancelled. Uploads have no total deadline: a 512 MiB module within
    /// `request_timeout` would need about 8.5 MB/s, and a slow but steady
    /// link must still get through. Chunks are 1 MiB, so this also sets the
    /// slowest link accepted (1 MiB per `upload_idle_timeout`).
    #[serde(with = "duration_text")]
    pub upload_idle_timeout: Duration,
    /// Events kept in the event log; the oldest are trimmed beyond this.
    pub event_retention: u64,
    /// Audit records older than this are removed, oldest first, behind a
    /// signed anchor that keeps the rest of the chain verifiable.
    #[serde(with = "duration_text")]
    pub audit_retention: Duration,
    /// How long the desired-state history (`hotswapctl history`) is kept,
    /// independently of `event_retention`; the leader trims older records.
    #[serde(with = "duration_text")]
    pub history_retention: Duration,
    /// Enrollment attempts allowed per source address: a burst of
    /// `enroll_burst`, refilled at `enroll_per_minute`.
    pub enroll_per_minute: u32,
    pub enroll_burst: u32,
    /// Mutating calls allowed per operator: a burst of `operator_writes_burst`,
    /// refilled at `operator_writes_per_minute`. Reads are not limited.
    pub operator_writes_per_minute: u32,
    pub operator_writes_burst: u32,
    /// Of those, `deploy create` and `pipeline run` per operator.
    pub deployments_per_minute: u32,
    pub deployments_burst: u32,
    /// Join token lifetime when `tokens create` gives no `--ttl`.
    #[serde(with = "duration_text")]
    pub token_default_ttl: Duration,
    /// Longest join token lifetime accepted.
    #[serde(with = "duration_text")]
    pub token_max_ttl: Duration,
    /// How long a graceful shutdown may take before the process exits anyway.
    #[serde(with = "duration_text")]
    pub shutdown_timeout: Duration,
    /// sled page cache size in bytes.
    pub storage_cache_bytes: u64,
    /// After a storage failure (a full disk), the free space the data
    /// directory's file system needs before the control plane restarts
    /// itself to reopen the database.
    pub storage_min_free_bytes: u64,
    /// Largest artifact `module push` accepts, in bytes.
    pub max_artifact_bytes: u64,
    /// Environments nodes can be placed in (label `environment`), with their
    /// default strategy and whether deployments need a second person's approval.
    pub environments: BTreeMap<String, EnvironmentSettings>,
    /// Defaults for deployment options not given on the command line.
    pub deploy: DeployDefaults,
    /// The order `pipeline run` promotes through.
    pub pipeline: Vec<String>,
    /// `[blobs]`: where artifact content lives (SPEC §7).
    pub blobs: BlobsSettings,
    /// `[store]`: where the records live (SPEC §7).
    pub store: StoreSettings,
    /// TTL of the lease a replica on etcd leads under: after the leader
    /// dies, another leads within about this long.
    #[serde(with = "duration_text")]
    pub leader_lease: Duration,
    /// How long the delivery of one event to a webhook is retried (with
    /// backoff, across restarts) before it is skipped, its error kept in
    /// the webhook's `last_error` (SPEC §9).
    #[serde(with = "duration_text")]
    pub webhook_retry_for: Duration,
    /// The longest pause between two attempts at one webhook delivery.
    #[serde(with = "duration_text")]
    pub webhook_backoff_max: Duration,
    /// How long one TLS session-ticket key seals tickets (it opens them for
    /// one period more); `0s` turns session resumption off, so every
    /// connection verifies its certificate chain in a full handshake.
    #[serde(with = "duration_text")]
    pub tls_ticket_rotation: Duration,
}

/// `[store]`: `backend = "sled"` (the default: one process, the database
/// in the data directory) or `"etcd"` (replicas sharing an etcd cluster).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    pub backend: StoreBackend,
    /// etcd client URLs, `http://` or `https://`.
    pub endpoints: Vec<String>,
    /// Key prefix the cluster's records live under.
    pub prefix: String,
    /// Client TLS for the etcd endpoints: the CA that signed etcd's
    /// certificates, and this replica's client certificate and key.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Sled,
            endpoints: Vec::new(),
            prefix: crate::store::keys::DEFAULT_PREFIX.to_string(),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    #[default]
    Sled,
    Etcd,
}

impl StoreSettings {
    /// Switch to etcd for `--etcd-endpoints LIST [--etcd-prefix P]`
    /// (comma-separated or repeated URLs), keeping the file's TLS settings.
    pub fn with_flags(&self, endpoints: &[String], prefix: Option<&str>) -> Result<Self, String> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .flat_map(|list| list.split(','))
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_string)
            .collect();
        if endpoints.is_empty() {
            return Err("--etcd-endpoints: give at least one etcd client URL".into());
        }
        let settings = Self {
            backend: StoreBackend::Etcd,
            endpoints,
            prefix: prefix.map_or_else(|| self.prefix.clone(), str::to_string),
            ..self.clone()
        };
        match settings.problems().first() {
            Some(problem) => Err(problem.clone()),
            None => Ok(settings),
        }
    }

    /// The etcd key layout under the prefix.
    pub fn keys(&self) -> Result<crate::store::keys::Keys, String> {
        crate::store::keys::Keys::new(&self.prefix).map_err(|e| e.to_string())
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.backend != StoreBackend::Etcd {
            return problems;
        }
        if self.endpoints.is_empty() {
            problems.push(
                "store.endpoints must list etcd client URLs when store.backend is \"etcd\"".into(),
            );
        }
        if let Err(e) = hotswap_etcd::parse_endpoints(&self.endpoints.join(",")) {
            problems.push(format!("store.endpoints: {e}"));
        }
        if let Err(e) = self.keys() {
            problems.push(format!("store.prefix: {e}"));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.push("store.cert_file and store.key_file go together".into());
        }
        if self.cert_file.is_some() && self.ca_file.is_none() {
            problems.push(
                "store.cert_file needs store.ca_file (the CA that signed etcd's certificates)"
                    .into(),
            );
        }
        problems
    }
}

/// `[blobs]`: `backend = "local"` (the default: files in the data directory)
/// or `"s3"` (a bucket of an S3-compatible store; credentials from
/// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BlobsSettings {
    pub backend: BlobsBackend,
    pub bucket: String,
    pub prefix: String,
    /// Endpoint of a store other than AWS, e.g. `http://127.0.0.1:8333`.
    pub endpoint: Option<String>,
    /// Default `us-east-1`.
    pub region: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BlobsBackend {
    #[default]
    Local,
    S3,
}

impl BlobsSettings {
    /// The settings `run --blobs URL [--s3-endpoint URL] [--s3-region R]`
    /// give (SPEC §7): `s3://BUCKET[/PREFIX]` for a bucket, `local` for the
    /// data directory.
    pub fn from_flags(
        blobs: &str,
        endpoint: Option<&str>,
        region: Option<&str>,
    ) -> Result<Self, String> {
        if blobs == "local" {
            if endpoint.is_some() || region.is_some() {
                return Err("--s3-endpoint and --s3-region need --blobs s3://BUCKET".into());
            }
            return Ok(Self::default());
        }
        let Some(rest) = blobs.strip_prefix("s3://") else {
            return Err(format!(
                "--blobs {blobs:?}: expected s3://BUCKET[/PREFIX] or local"
            ));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'));
        if !valid_bucket {
            return Err(format!(
                "--blobs {blobs:?}: bucket {bucket:?} must be 3-63 lowercase letters, digits, '-' or '.'"
            ));
        }
        if let Some(endpoint) = endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(format!(
                "--s3-endpoint {endpoint:?}: expected http:// or https:// and a host"
            ));
        }
        Ok(Self {
            backend: BlobsBackend::S3,
            bucket: bucket.to_string(),
            prefix: prefix.trim_end_matches('/').to_string(),
            endpoint: endpoint.map(str::to_string),
            region: region.map(str::to_string),
        })
    }

    /// The S3 backend's settings, when that is the backend.
    pub fn s3(&self) -> Option<crate::blobs::S3Config> {
        (self.backend == BlobsBackend::S3).then(|| crate::blobs::S3Config {
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
            endpoint: self.endpoint.clone(),
            region: self
                .region
                .clone()
                .unwrap_or_else(|| "us-east-1".to_string()),
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentSettings {
    /// direct, rolling, blue-green or canary.
    pub strategy: String,
    #[serde(default)]
    pub require_approval: bool,
    /// Controlling deployments here (pause, abort, rollback...) needs the
    /// approver or admin role. Defaults to `require_approval`.
    #[serde(default)]
    pub protected: Option<bool>,
    /// Signatures from this many distinct trusted keys are required to deploy.
    #[serde(default = "one")]
    pub min_signatures: u32,
    /// Config freezes (SPEC §9): no new deployment or pipeline starts here
    /// while one covers the wall clock, e.g. `"Fri 16:00 - Mon 08:00
    /// Europe/Berlin"`. Grammar in [`crate::schedule`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze: Vec<String>,
    /// Deployment windows (SPEC §9): when set, deployments start and waves
    /// begin only inside one, e.g. `"Mon-Thu 09:00-16:00 UTC"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<String>,
}

impl EnvironmentSettings {
    /// The parsed `windows` and `freeze`; `Settings::problems` has refused
    /// bad entries before anything runs, so this only fails on settings
    /// built in code without that check.
    pub fn schedule(&self) -> Result<crate::schedule::Schedule, Vec<String>> {
        crate::schedule::Schedule::parse(&self.windows, &self.freeze)
    }
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeployDefaults {
    #[serde(with = "duration_text")]
    pub health_deadline: Duration,
    #[serde(with = "duration_text")]
    pub progress_deadline: Duration,
    #[serde(with = "duration_text")]
    pub min_healthy_time: Duration,
    #[serde(with = "duration_text")]
    pub bake_time: Duration,
    #[serde(with = "duration_text")]
    pub step_duration: Duration,
    pub batch_size: String,
    pub max_failures: u32,
    pub steps: Vec<u32>,
    /// Absolute ceiling for a canary's error rate (0..1).
    pub max_error_rate: f64,
    /// Canary error rate may exceed the baseline's by this fraction.
    pub error_rate_increase: f64,
    /// Canary p99 latency may be at most this multiple of the baseline's.
    pub latency_increase: f64,
    pub cpu_increase: f64,
    pub memory_increase: f64,
    /// `--analysis-min-requests`: requests canary and baseline each need in
    /// a step's analysis window before error rate and latency are judged.
    pub analysis_min_requests: u64,
    /// `--analysis-warmup`: the start of each step's hold left out of its
    /// analysis.
    #[serde(with = "duration_text")]
    pub analysis_warmup: Duration,
}

impl Default for DeployDefaults {
    fn default() -> Self {
        Self {
            health_deadline: Duration::from_secs(300),
            progress_deadline: Duration::from_secs(900),
            min_healthy_time: Duration::from_secs(10),
            bake_time: Duration::from_secs(60),
            step_duration: Duration::from_secs(60),
            batch_size: "25%".to_string(),
            max_failures: 0,
            steps: vec![10, 30, 50, 100],
            // The original system's production defaults: errors +50 %, latency
            // +100 %, CPU and memory +30 % over the baseline.
            max_error_rate: 0.05,
            error_rate_increase: 0.5,
            latency_increase: 2.0,
            cpu_increase: 0.3,
            memory_increase: 0.3,
            analysis_min_requests: 50,
            analysis_warmup: Duration::from_secs(10),
        }
    }
}

fn default_environments() -> BTreeMap<String, EnvironmentSettings> {
    [
        ("dev", "direct", false),
        ("qa", "rolling", false),
        ("staging", "blue-green", false),
        ("production", "canary", true),
    ]
    .into_iter()
    .map(|(name, strategy, require_approval)| {
        (
            name.to_string(),
            EnvironmentSettings {
                strategy: strategy.to_string(),
                require_approval,
                protected: None,
                min_signatures: 1,
                freeze: Vec::new(),
                windows: Vec::new(),
            },
        )
    })
    .collect()
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_grace: Duration::from_secs(15),
            node_cert_validity: Duration::from_secs(86_400),
            user_cert_validity: Duration::from_secs(90 * 86_400),
            approval_timeout: Duration::from_secs(86_400),
            pause_timeout: Duration::from_secs(86_400),
            pipeline_wait_timeout: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(60),
            upload_idle_timeout: Duration::from_secs(30),
            event_retention: 100_000,
            audit_retention: Duration::from_secs(90 * 86_400),
            history_retention: Duration::from_secs(90 * 24 * 3600),
            enroll_per_minute: 600,
            enroll_burst: 200,
            operator_writes_per_minute: 1000,
            operator_writes_burst: 200,
            deployments_per_minute: 10,
            // A CI job that deploys a few dozen modules at once gets through.
            deployments_burst: 30,
            token_default_ttl: Duration::from_secs(3600),
            token_max_ttl: Duration::from_secs(30 * 86_400),
            shutdown_timeout: Duration::from_secs(10),
            storage_cache_bytes: 64 * 1024 * 1024,
            storage_min_free_bytes: 16 * 1024 * 1024,
            max_artifact_bytes: 512 * 1024 * 1024,
            environments: default_environments(),
            deploy: DeployDefaults::default(),
            pipeline: ["dev", "qa", "staging", "production"]
                .map(String::from)
                .to_vec(),
            blobs: BlobsSettings::default(),
            store: StoreSettings::default(),
            leader_lease: Duration::from_secs(5),
            webhook_retry_for: Duration::from_secs(24 * 3600),
            webhook_backoff_max: Duration::from_secs(60),
            tls_ticket_rotation: Duration::from_secs(12 * 3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("config file {path} is invalid: {}", problems.join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl Settings {
    /// How many distinct trusted keys must sign what is deployed to
    /// `environment` (1 for an environment the config does not name).
    pub fn min_signatures(&self, environment: &str) -> u32 {
        self.environments
            .get(environment)
            .map_or(1, |e| e.min_signatures)
    }

    /// Read and validate a config file, reporting every problem at once.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let settings: Settings = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string().trim().replace('\n', " "),
        })?;
        let problems = settings.problems();
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// Everything wrong with these settings, empty when valid.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = self.store.problems();
        if self.store.backend == StoreBackend::Etcd && self.blobs.backend != BlobsBackend::S3 {
            problems.push(
                "store.backend \"etcd\" needs blobs.backend \"s3\": every replica must read the same artifacts".into(),
            );
        }
        if self.leader_lease < Duration::from_secs(2) {
            problems.push("leader_lease must be at least 2s".to_string());
        }
        if self.blobs.backend == BlobsBackend::S3 && self.blobs.bucket.is_empty() {
            problems.push("blobs.bucket must be set when blobs.backend is \"s3\"".to_string());
        }
        if self.heartbeat_interval < Duration::from_millis(100) {
            problems.push("heartbeat_interval must be at least 100ms".to_string());
        }
        if self.heartbeat_grace <= self.heartbeat_interval {
            problems.push("heartbeat_grace must be longer than heartbeat_interval".to_string());
        }
        if self.node_cert_validity < Duration::from_secs(10) {
            problems.push("node_cert_validity must be at least 10s".to_string());
        }
        if self.token_default_ttl > self.token_max_ttl {
            problems.push("token_default_ttl must not exceed token_max_ttl".to_string());
        }
        if self.max_artifact_bytes < 1024 {
            problems.push("max_artifact_bytes must be at least 1024".to_string());
        }
        for (name, env) in &self.environments {
            if !["direct", "rolling", "blue-green", "canary"].contains(&env.strategy.as_str()) {
                problems.push(format!("environments.{name}.strategy {:?} is not direct, rolling, blue-green or canary", env.strategy));
            }
            if !(1..=16).contains(&env.min_signatures) {
                problems.push(format!(
                    "environments.{name}.min_signatures must be between 1 and 16"
                ));
            }
            if let Err(bad) = env.schedule() {
                problems.extend(bad.into_iter().map(|p| format!("environments.{name}.{p}")));
            }
        }
        if self.user_cert_validity < Duration::from_secs(60) {
            problems.push("user_cert_validity must be at least 1m".to_string());
        }
        if self.request_timeout < Duration::from_secs(1) {
            problems.push("request_timeout must be at least 1s".to_string());
        }
        if self.upload_idle_timeout < Duration::from_secs(1) {
            problems.push("upload_idle_timeout must be at least 1s".to_string());
        }
        if self.pause_timeout < Duration::from_secs(1) {
            problems.push("pause_timeout must be at least 1s".to_string());
        }
        if self.pipeline_wait_timeout < Duration::from_secs(1) {
            problems.push("pipeline_wait_timeout must be at least 1s".to_string());
        }
        if self.history_retention < Duration::from_secs(60) {
            problems.push("history_retention must be at least 1m".to_string());
        }
        if self.event_retention < 100 {
            problems.push("event_retention must be at least 100".to_string());
        }
        if self.audit_retention < Duration::from_secs(1) {
            problems.push("audit_retention must be at least 1s".to_string());
        }
        if self.enroll_per_minute == 0 || self.enroll_burst == 0 {
            problems.push("enroll_per_minute and enroll_burst must be at least 1".to_string());
        }
        if self.operator_writes_per_minute == 0
            || self.operator_writes_burst == 0
            || self.deployments_per_minute == 0
            || self.deployments_burst == 0
        {
            problems.push(
                "operator_writes_per_minute, operator_writes_burst, deployments_per_minute and deployments_burst must be at least 1"
                    .to_string(),
            );
        }
        for env in &self.pipeline {
            if !self.environments.contains_key(env) {
                problems.push(format!(
                    "pipeline names environment {env:?}, which is not configured"
                ));
            }
        }
        if self.deploy.steps.is_empty() || self.deploy.steps.iter().any(|s| *s == 0 || *s > 100) {
            problems.push("deploy.steps must be percentages between 1 and 100".to_string());
        }
        if self.webhook_retry_for < Duration::from_secs(1) {
            problems.push("webhook_retry_for must be at least 1s".to_string());
        }
        if self.webhook_backoff_max < Duration::from_millis(100)
            || self.webhook_backoff_max > Duration::from_secs(3600)
        {
            problems.push("webhook_backoff_max must be between 100ms and 1h".to_string());
        }
        if !self.tls_ticket_rotation.is_zero()
            && (self.tls_ticket_rotation < crate::tickets::MIN_PERIOD
                || self.tls_ticket_rotation > crate::tickets::MAX_PERIOD)
        {
            problems.push(
                "tls_ticket_rotation must be 0s (no session resumption) or between 1m and 7d (the longest a TLS 1.3 ticket may live)".to_string(),
            );
        }
        if self.storage_cache_bytes < 1024 * 1024 {
            problems.push("storage_cache_bytes must be at least 1048576".to_string());
        }
        problems
    }
}

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub settings: Settings,
    /// `--recover-empty-db`: start on a missing or empty database next to an
    /// existing CA, re-creating the admin user from the data dir's admin
    /// profile. Without it such a start is refused (see `server::run`).
    pub recover_empty_db: bool,
    /// `--name` and `--advertise`: who this replica says it is in
    /// `servers list`.
    pub replica: crate::replicas::ReplicaIdentity,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cp.toml");
        std::fs::write(&path, text).expect("write");
        Settings::load(&path)
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(load_text("").expect("empty"), Settings::default());
    }

    #[test]
    fn durations_and_errors() {
        let s =
            load_text("heartbeat_interval = \"1s\"\nheartbeat_grace = \"3s\"\n").expect("valid");
        assert_eq!(s.heartbeat_interval, Duration::from_secs(1));
        let err = load_text("heartbeat_interval = \"soon\"\n")
            .expect_err("bad")
            .to_string();
        assert!(err.contains("invalid duration \"soon\""), "{err}");
        let err = load_text("heartbeat_intervl = \"1s\"\n")
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
        let err = load_text(
            "heartbeat_interval = \"10s\"\nheartbeat_grace = \"5s\"\nstorage_cache_bytes = 1\n",
        )
        .expect_err("two problems")
        .to_string();
        assert!(
            err.contains("heartbeat_grace must be longer") && err.contains("storage_cache_bytes"),
            "{err}"
        );
    }

    #[test]
    fn windows_and_freezes_parse_and_bad_entries_name_the_environment() {
        let s = load_text(
            "pipeline = [\"production\"]\n[environments.production]\nstrategy = \"canary\"\nwindows = [\"Mon-Thu 09:00-16:00 UTC\"]\nfreeze = [\"Fri 16:00 - Mon 08:00 Europe/Berlin\"]\n",
        )
        .expect("valid");
        let schedule = s.environments["production"].schedule().expect("schedule");
        assert_eq!((schedule.windows.len(), schedule.freezes.len()), (1, 1));
        let err = load_text(
            "pipeline = [\"production\"]\n[environments.production]\nstrategy = \"canary\"\nwindows = [\"Mon-Thu 09:00-16:00 Mars/Base\"]\nfreeze = [\"Fri 16:00 - Mon 08:00 UTC\", \"Fri 25:00-26:00 UTC\"]\n",
        )
        .expect_err("bad entries")
        .to_string();
        assert!(
            err.contains("environments.production.windows[0] \"Mon-Thu 09:00-16:00 Mars/Base\": unknown time zone \"Mars/Base\"")
                && err.contains("environments.production.freeze[1] \"Fri 25:00-26:00 UTC\": \"25:00\" is out of range"),
            "{err}"
        );
    }

    #[test]
    fn blobs_flags_name_a_bucket_and_prefix() {
        let s3 = BlobsSettings::from_flags(
            "s3://artifacts/prod/eu/",
            Some("http://127.0.0.1:8333"),
            Some("eu-west-1"),
        )
        .expect("s3 url");
        assert_eq!(
            (s3.backend, s3.bucket.as_str(), s3.prefix.as_str()),
            (BlobsBackend::S3, "artifacts", "prod/eu")
        );
        assert_eq!(s3.region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            BlobsSettings::from_flags("s3://artifacts", None, None)
                .expect("no prefix")
                .prefix,
            ""
        );
        assert_eq!(
            BlobsSettings::from_flags("local", None, None),
            Ok(BlobsSettings::default())
        );
        for (bad, why) in [
            ("https://artifacts", "expected s3://"),
            ("s3://", "bucket \"\""),
            ("s3://Art_ifacts", "lowercase"),
        ] {
            let err = BlobsSettings::from_flags(bad, None, None).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert!(BlobsSettings::from_flags("local", Some("http://x"), None).is_err());
        assert!(BlobsSettings::from_flags("s3://abc", Some("ftp://x"), None).is_err());
    }

    #[test]
    fn blobs_default_to_local_and_s3_needs_a_bucket() {
        assert_eq!(load_text("").expect("empty").blobs.s3(), None);
        let s = load_text(
            "[blobs]\nbackend = \"s3\"\nbucket = \"artifacts\"\nprefix = \"prod\"\nendpoint = \"http://127.0.0.1:8333\"\n",
        )
        .expect("s3");
        let s3 = s.blobs.s3().expect("s3 backend");
        assert_eq!(
            (s3.bucket.as_str(), s3.prefix.as_str(), s3.region.as_str()),
            ("artifacts", "prod", "us-east-1")
        );
        let err = load_text("[blobs]\nbackend = \"s3\"\n")
            .expect_err("no bucket")
            .to_string();
        assert!(err.contains("blobs.bucket must be set"), "{err}");
        let err = load_text("[blobs]\nbackend = \"ftp\"\n")
            .expect_err("unknown backend")
            .to_string();
        assert!(err.contains("unknown variant"), "{err}");
    }

    #[test]
    fn the_store_defaults_to_sled_and_etcd_is_checked_whole() {
        let default = load_text("").expect("empty");
        assert_eq!(default.store.backend, StoreBackend::Sled);
        assert_eq!(default.leader_lease, Duration::from_secs(5));
        assert_eq!(default.tls_ticket_rotation, Duration::from_secs(12 * 3600));
        assert!(
            load_text("tls_ticket_rotation = \"0s\"\n")
                .expect("0s turns resumption off")
                .tls_ticket_rotation
                .is_zero()
        );
        let etcd = load_text(
            "leader_lease = \"3s\"\n[store]\nbackend = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\", \"http://127.0.0.1:22379\"]\nprefix = \"/prod/\"\n[blobs]\nbackend = \"s3\"\nbucket = \"artifacts\"\n",
        )
        .expect("etcd");
        assert_eq!(
            (
                etcd.store.backend,
                etcd.store.endpoints.len(),
                etcd.store.prefix.as_str()
            ),
            (StoreBackend::Etcd, 2, "/prod/")
        );
        assert_eq!(etcd.leader_lease, Duration::from_secs(3));
        for (text, says) in [
            (
                "[store]\nbackend = \"etcd\"\n[blobs]\nbackend = \"s3\"\nbucket = \"a-b\"\n",
                "store.endpoints must list",
            ),
            (
                "[store]\nbackend = \"etcd\"\nendpoints = [\"http://e:2379\"]\n",
                "needs blobs.backend \"s3\"",
            ),
            (
                "[store]\nbackend = \"etcd\"\nendpoints = [\"ftp://e\"]\n[blobs]\nbackend = \"s3\"\nbucket = \"a-b\"\n",
                "store.endpoints:",
            ),
            (
                "[store]\nbackend = \"etcd\"\nendpoints = [\"http://e:2379\"]\nprefix = \"nope\"\n[blobs]\nbackend = \"s3\"\nbucket = \"a-b\"\n",
                "store.prefix:",
            ),
            (
                "[store]\nbackend = \"etcd\"\nendpoints = [\"https://e:2379\"]\ncert_file = \"/c.pem\"\n[blobs]\nbackend = \"s3\"\nbucket = \"a-b\"\n",
                "go together",
            ),
            (
                "leader_lease = \"1s\"\n",
                "leader_lease must be at least 2s",
            ),
            (
                "tls_ticket_rotation = \"30s\"\n",
                "tls_ticket_rotation must be 0s",
            ),
            ("tls_ticket_rotation = \"8d\"\n", "between 1m and 7d"),
        ] {
            let err = load_text(text).expect_err(text).to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn etcd_flags_switch_the_store_and_keep_the_file_tls() {
        let file = StoreSettings {
            ca_file: Some(PathBuf::from("/etc/etcd/ca.pem")),
            ..StoreSettings::default()
        };
        let flags = file
            .with_flags(
                &["http://a:2379,http://b:2379".into(), "http://c:2379".into()],
                None,
            )
            .expect("flags");
        assert_eq!(flags.backend, StoreBackend::Etcd);
        assert_eq!(
            flags.endpoints,
            ["http://a:2379", "http://b:2379", "http://c:2379"]
        );
        assert_eq!(flags.prefix, "/hotswap/");
        assert_eq!(flags.ca_file, file.ca_file);
        assert!(
            file.with_flags(&[], None)
                .expect_err("none")
                .contains("at least one")
        );
        let bad = file
            .with_flags(&["http://a:2379".into()], Some("/bad prefix/"))
            .expect_err("prefix");
        assert!(bad.contains("store.prefix"), "{bad}");
    }
}
