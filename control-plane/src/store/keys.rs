//! Where each record lives in a replicated key space: one prefix per
//! cluster (`/hotswap/` by default, SPEC §7 `--etcd-prefix`), one
//! sub-prefix per [`Collection`], and the keys of the cluster's own
//! coordination (leader election, replicas, sessions, sequence counters).
//! Pure; the replicated backend and its tests share it.
//!
//! Keys are readable text: record keys are the names and ids the embedded
//! store uses (which never contain `/`, see `hotswap_common::ids`), and
//! sequence numbers are zero-padded to 20 digits so that key order is
//! numeric order.

use super::{Collection, LogName};

/// The default cluster prefix.
pub const DEFAULT_PREFIX: &str = "/hotswap/";

/// Why a prefix cannot hold a cluster.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("etcd prefix {0:?} must start and end with '/' (for example /hotswap/)")]
    Shape(String),
    #[error("etcd prefix {0:?} may hold only letters, digits, '-', '_', '.' and '/'")]
    Characters(String),
}

/// A cluster's key space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Result<Self, PrefixError> {
        if prefix.len() < 2
            || !prefix.starts_with('/')
            || !prefix.ends_with('/')
            || prefix.contains("//")
        {
            return Err(PrefixError::Shape(prefix.to_string()));
        }
        if !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        {
            return Err(PrefixError::Characters(prefix.to_string()));
        }
        Ok(Self {
            prefix: prefix.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every key of one collection starts with this.
    pub fn collection(&self, collection: Collection) -> String {
        format!("{}{}/", self.prefix, collection.as_str())
    }

    /// A record's key; `id` is a token hash, node id, name or deployment id.
    pub fn record(&self, collection: Collection, id: &str) -> String {
        format!("{}{id}", self.collection(collection))
    }

    /// An artifact record's key: one module's versions share a prefix.
    pub fn artifact(&self, module: &str, version: &str) -> String {
        format!(
            "{}{module}/{version}",
            self.collection(Collection::Artifacts)
        )
    }

    /// Every version of one module starts with this.
    pub fn module_versions(&self, module: &str) -> String {
        format!("{}{module}/", self.collection(Collection::Artifacts))
    }

    /// Every track bucket of one deployment starts with this (outside the
    /// deployments collection, whose keys are the records' headers).
    pub fn deployment_tracks(&self, id: &str) -> String {
        format!("{}{id}/", self.all_deployment_tracks())
    }

    /// Every track bucket of every deployment starts with this.
    pub fn all_deployment_tracks(&self) -> String {
        format!("{}deployment_tracks/", self.prefix)
    }

    /// One track bucket of a deployment, as written by one generation of
    /// its record (see `store::split`).
    pub fn deployment_bucket(&self, id: &str, bucket: usize, generation: u64) -> String {
        format!("{}{bucket:06}.{generation:020}", self.deployment_tracks(id))
    }

    /// The bucket and generation of a deployment's track bucket key.
    pub fn bucket_of(&self, id: &str, key: &str) -> Option<(usize, u64)> {
        let rest = key.strip_prefix(&self.deployment_tracks(id))?;
        let (bucket, generation) = rest.split_once('.')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(bucket) || !digits(generation) {
            return None;
        }
        Some((bucket.parse().ok()?, generation.parse().ok()?))
    }

    /// A sequence log record's key.
    pub fn log_record(&self, log: LogName, seq: u64) -> String {
        format!("{}{seq:020}", self.log(log))
    }

    /// Every record of a sequence log starts with this.
    pub fn log(&self, log: LogName) -> String {
        self.collection(match log {
            LogName::Events => Collection::Events,
            LogName::Audit => Collection::Audit,
        })
    }

    /// The sequence number of a log record's key.
    pub fn seq_of(&self, log: LogName, key: &str) -> Option<u64> {
        let digits = key.strip_prefix(&self.log(log))?;
        (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse().ok())
            .flatten()
    }

    /// The last sequence number handed out in a log, advanced in the same
    /// transaction as the record it numbers: numbers stay gap-free whoever
    /// appends.
    pub fn log_head(&self, log: LogName) -> String {
        format!("{}meta/head/{}", self.prefix, log.as_str())
    }

    /// Written once by `init`: a cluster lives under this prefix.
    pub fn cluster(&self) -> String {
        format!("{}meta/cluster", self.prefix)
    }

    /// Candidates for leadership put their key under this prefix with their
    /// lease; the lowest create revision leads.
    pub fn election(&self) -> String {
        format!("{}election/", self.prefix)
    }

    /// A desired-state history record: the write of `generation` of a
    /// node's desired state (its seq is the key's mod revision).
    pub fn history(&self, node_id: &str, generation: u64) -> String {
        format!(
            "{}{node_id}/{generation:020}",
            self.collection(Collection::History)
        )
    }

    /// Where history was last trimmed.
    pub fn history_trimmed(&self) -> String {
        format!("{}meta/history_trimmed", self.prefix)
    }

    /// A replica's record (name, endpoint, start time), under its lease.
    pub fn replica(&self, name: &str) -> String {
        format!("{}{name}", self.replicas())
    }

    /// Every replica record starts with this.
    pub fn replicas(&self) -> String {
        format!("{}replicas/", self.prefix)
    }

    /// A node's live session, held by the replica that owns it, under that
    /// replica's lease: it vanishes with the replica.
    pub fn session(&self, node_id: &str) -> String {
        format!("{}{node_id}", self.sessions())
    }

    /// Every session record starts with this.
    pub fn sessions(&self) -> String {
        format!("{}sessions/", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_are_readable_and_grouped() {
        let keys = Keys::new(DEFAULT_PREFIX).expect("default");
        assert_eq!(keys.record(Collection::Nodes, "n-1"), "/hotswap/nodes/n-1");
        assert_eq!(
            keys.artifact("web", "1.2.0"),
            "/hotswap/artifacts/web/1.2.0"
        );
        assert!(
            keys.artifact("web", "1.2.0")
                .starts_with(&keys.module_versions("web"))
        );
        assert!(
            !keys
                .artifact("web-api", "1.0.0")
                .starts_with(&keys.module_versions("web"))
        );
        assert_eq!(
            keys.log_record(LogName::Events, 42),
            "/hotswap/events/00000000000000000042"
        );
        assert_eq!(keys.log_head(LogName::Audit), "/hotswap/meta/head/audit");
        assert_eq!(keys.session("n-1"), "/hotswap/sessions/n-1");
        assert!(keys.session("n-1").starts_with(&keys.sessions()));
        assert_eq!(keys.replica("cp-a"), "/hotswap/replicas/cp-a");
        assert!(keys.replica("cp-a").starts_with(&keys.replicas()));
        let bucket = keys.deployment_bucket("d-1", 7, 42);
        assert_eq!(
            bucket,
            "/hotswap/deployment_tracks/d-1/000007.00000000000000000042"
        );
        assert_eq!(keys.bucket_of("d-1", &bucket), Some((7, 42)));
        assert_eq!(keys.bucket_of("d-2", &bucket), None);
        // Track buckets are not deployment records.
        assert!(!bucket.starts_with(&keys.collection(Collection::Deployments)));
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(Keys::new("/prod/hotswap/").is_ok());
        for bad in ["", "/", "hotswap/", "/hotswap", "/a//b/", "/hot swap/"] {
            assert!(Keys::new(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn log_keys_sort_as_their_numbers(a in any::<u64>(), b in any::<u64>()) {
            let keys = Keys::new(DEFAULT_PREFIX).expect("default");
            let (ka, kb) = (keys.log_record(LogName::Events, a), keys.log_record(LogName::Events, b));
            prop_assert_eq!(a.cmp(&b), ka.cmp(&kb));
            prop_assert_eq!(keys.seq_of(LogName::Events, &ka), Some(a));
            prop_assert_eq!(keys.seq_of(LogName::Audit, &ka), None);
        }
    }
}
