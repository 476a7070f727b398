//! The control-plane replicas serving this fleet (`servers list|get`): what
//! a replica says about itself ([`ReplicaInfo`]), where the list of them
//! comes from ([`Replicas`]), and this process's own identity from `run
//! --name` and `--advertise` ([`ReplicaIdentity`]).
//!
//! The embedded (sled) mode has exactly one replica, this process
//! ([`EmbeddedReplicas`]). A replicated store lists the records every live
//! replica keeps under its own lease (`store::keys::replica`), each written
//! from its [`ThisReplica::info`] ([`publish`]) and read from the store's
//! mirror ([`EtcdReplicas`]); the services only see the trait.
//!
//! A name is one replica's among the live ones ([`claim`]): a replica
//! starting under a name whose record another lease holds is the same
//! replica restarting in place (after `kill -9`, before its old lease ran
//! out) when it advertises the same endpoint, and takes the record over;
//! one at another endpoint is refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotswap_common::admin::Readiness;
use hotswap_common::ids::{NameKind, check_name};
use hotswap_common::timefmt::now_ms;
use hotswap_common::tls::ControlPlaneUrl;

use hotswap_etcd::{Compare, CompareOp, LeaseId, TxnOp};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::store::StoreError;
use crate::store::etcd::EtcdStore;

/// One replica as it describes itself; on etcd, the JSON of its record
/// `replicas/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// `run --name`, by default the host name; unique among live replicas.
    pub name: String,
    /// The URL agents and operators reach it at (`run --advertise`).
    pub endpoint: String,
    /// Holds the leader lease: runs the engine, pipelines, catch-up and
    /// retention.
    pub leader: bool,
    /// What its `/readyz` says.
    pub ready: bool,
    /// Agent sessions connected to it now.
    pub sessions: u64,
    pub started_at_ms: u64,
    /// When it last said it was alive (for this process: now).
    pub last_seen_ms: u64,
}

impl ReplicaInfo {
    pub fn encode(&self) -> Vec<u8> {
        crate::store::encode(self)
    }

    /// A record as published; `None` when it is not one.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// The same apart from when it was last seen: nothing worth a write
    /// before the next refresh.
    fn same_state(&self, other: &ReplicaInfo) -> bool {
        Self {
            last_seen_ms: other.last_seen_ms,
            ..self.clone()
        } == *other
    }
}

/// Where the list of replicas comes from.
pub trait Replicas: Send + Sync {
    /// Every live replica, in any order (callers sort, see [`list_sorted`]).
    /// A backend that cannot answer truthfully (cut off from etcd) fails
    /// with a [`StoreError`], which callers report as unavailable.
    fn list(&self) -> Result<Vec<ReplicaInfo>, StoreError>;
}

/// Why `servers get` found nothing to show.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("server name must not be empty")]
    EmptyName,
    #[error("server {0:?} not found; `hotswapctl servers list` shows the live replicas")]
    NotFound(String),
    #[error(transparent)]
    Storage(#[from] StoreError),
}

/// Every live replica, by name.
pub fn list_sorted(replicas: &dyn Replicas) -> Result<Vec<ReplicaInfo>, StoreError> {
    let mut all = replicas.list()?;
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(all)
}

/// The live replica named exactly `name`.
pub fn find(replicas: &dyn Replicas, name: &str) -> Result<ReplicaInfo, ReplicaError> {
    if name.is_empty() {
        return Err(ReplicaError::EmptyName);
    }
    replicas
        .list()?
        .into_iter()
        .find(|r| r.name == name)
        .ok_or_else(|| ReplicaError::NotFound(name.to_string()))
}

/// Name given when `--name` is not and the host has no readable name.
pub const FALLBACK_NAME: &str = "control-plane";

/// Who this replica says it is: `run --name` and `--advertise`, checked
/// before anything binds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaIdentity {
    pub name: String,
    /// `--advertise`, normalized (`https://host:port`); `None` advertises
    /// the address `--listen` bound (see [`ReplicaIdentity::endpoint`]).
    pub advertise: Option<String>,
}

/// Every problem with `--name` and `--advertise`, at once.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("; "))]
pub struct IdentityError {
    pub problems: Vec<String>,
}

impl ReplicaIdentity {
    /// Check `--name` (default: `hostname`, else [`FALLBACK_NAME`]) and
    /// `--advertise`.
    pub fn from_flags(
        name: Option<&str>,
        advertise: Option<&str>,
        hostname: Option<String>,
    ) -> Result<Self, IdentityError> {
        let mut problems = Vec::new();
        let name = match name {
            Some(name) => {
                if let Err(e) = check_name(NameKind::Server, name) {
                    problems.push(format!("--name: {e}"));
                }
                name.to_string()
            }
            None => {
                let name = hostname.unwrap_or_else(|| FALLBACK_NAME.to_string());
                if let Err(e) = check_name(NameKind::Server, &name) {
                    problems.push(format!(
                        "the host name is not usable as this server's name ({e}); give one with --name"
                    ));
                }
                name
            }
        };
        let advertise = match advertise.map(check_advertise).transpose() {
            Ok(url) => url,
            Err(reason) => {
                problems.push(reason);
                None
            }
        };
        if problems.is_empty() {
            Ok(Self { name, advertise })
        } else {
            Err(IdentityError { problems })
        }
    }

    /// The URL this replica advertises, given the address `--listen` bound.
    pub fn endpoint(&self, bound: SocketAddr, hostname: Option<&str>) -> String {
        match &self.advertise {
            Some(url) => url.clone(),
            None => default_endpoint(bound, hostname),
        }
    }
}

/// `--advertise` as a URL agents and operators can dial, normalized.
fn check_advertise(url: &str) -> Result<String, String> {
    let bad =
        |reason: &str| format!("--advertise {url:?} is not a URL clients can reach: {reason}");
    let parsed = ControlPlaneUrl::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !url.starts_with("https://") {
        return Err(bad("give the whole URL, https://HOST:PORT"));
    }
    if parsed.port == 0 {
        return Err(bad("port 0 is not a port"));
    }
    if parsed
        .host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
    {
        return Err(bad("an unspecified address is not one to connect to"));
    }
    Ok(parsed.to_string())
}

/// `https://` and the bound address, or the host name with the bound port
/// when the address is unspecified (`0.0.0.0`, `::`): nobody can dial that.
pub fn default_endpoint(bound: SocketAddr, hostname: Option<&str>) -> String {
    match hostname {
        Some(host) if bound.ip().is_unspecified() => format!("https://{host}:{}", bound.port()),
        _ => format!("https://{bound}"),
    }
}

/// This process as a replica: what it publishes about itself.
#[derive(Clone)]
pub struct ThisReplica {
    pub name: String,
    pub endpoint: String,
    pub started_at_ms: u64,
    /// The same flag `/readyz` answers from.
    pub readiness: Readiness,
    pub registry: Arc<Registry>,
}

impl ThisReplica {
    /// Its description now; `leader` from whoever knows (the embedded mode
    /// always leads; a replicated store asks its election).
    pub fn info(&self, leader: bool, now_ms: u64) -> ReplicaInfo {
        ReplicaInfo {
            name: self.name.clone(),
            endpoint: self.endpoint.clone(),
            leader,
            ready: self.readiness.is_ready(),
            sessions: self.registry.session_count() as u64,
            started_at_ms: self.started_at_ms,
            last_seen_ms: now_ms,
        }
    }
}

/// The embedded mode: one replica, this process, always the leader.
pub struct EmbeddedReplicas {
    pub this: ThisReplica,
}

impl Replicas for EmbeddedReplicas {
    fn list(&self) -> Result<Vec<ReplicaInfo>, StoreError> {
        Ok(vec![self.this.info(true, now_ms())])
    }
}

/// The etcd backend: every live replica's record, from the store's mirror
/// (no round trip per call). This replica's own entry is its state now,
/// and who leads is what the election in the mirror says, for every entry
/// alike (a record's own `leader` may trail it by a refresh).
pub struct EtcdReplicas {
    pub this: ThisReplica,
    pub etcd: EtcdStore,
}

impl Replicas for EtcdReplicas {
    fn list(&self) -> Result<Vec<ReplicaInfo>, StoreError> {
        if !self.etcd.is_connected() {
            return Err(StoreError::Backend(
                "this replica is cut off from etcd: it cannot tell which replicas are live; ask another".into(),
            ));
        }
        if !self.this.readiness.is_ready() {
            return Err(StoreError::Backend(
                "this replica is not ready: it cannot tell which replicas are live; ask another"
                    .into(),
            ));
        }
        let leader = self.etcd.leader().map(|l| l.name);
        let mut all: Vec<ReplicaInfo> = self
            .etcd
            .replica_records()
            .iter()
            .filter_map(|bytes| ReplicaInfo::decode(bytes))
            .filter(|r| r.name != self.this.name)
            .collect();
        all.push(self.this.info(false, now_ms()));
        for replica in &mut all {
            replica.leader = leader.as_deref() == Some(replica.name.as_str());
        }
        Ok(all)
    }
}

/// How often a replica's record is rewritten when nothing changed, so its
/// `last_seen` stays within this of now.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// How often the publisher looks for a change (leader, ready, sessions).
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Whether `now` is worth a write, given the record last written and how
/// long ago.
pub fn needs_write(last: Option<&ReplicaInfo>, now: &ReplicaInfo, since: Duration) -> bool {
    match last {
        None => true,
        Some(last) => since >= REFRESH_EVERY || !last.same_state(now),
    }
}

/// Keep this replica's record current under `lease` until `stop`: at once
/// when its leadership, readiness or session count changes, and at least
/// every [`REFRESH_EVERY`]. Written straight to etcd, like session records:
/// not through the pending batch and not fenced by the leader's lease
/// (followers write theirs too). Nothing is deleted here: see [`unpublish`].
pub async fn publish(this: ThisReplica, etcd: EtcdStore, lease: LeaseId, stop: CancellationToken) {
    let key = etcd.keys().replica(&this.name);
    let mut last: Option<(ReplicaInfo, Instant)> = None;
    loop {
        let leader = etcd.leader().is_some_and(|l| l.name == this.name);
        let info = this.info(leader, now_ms());
        let since = last.as_ref().map_or(Duration::MAX, |(_, at)| at.elapsed());
        if needs_write(last.as_ref().map(|(r, _)| r), &info, since) {
            match etcd
                .client()
                .put_with_lease(key.clone(), info.encode(), lease)
                .await
            {
                Ok(_) => last = Some((info, Instant::now())),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot publish this replica's record; trying again")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Delete this replica's record at a graceful stop, if it still holds it.
pub async fn unpublish(etcd: &EtcdStore, name: &str, lease: LeaseId) {
    let key = etcd.keys().replica(name);
    let held = match etcd.client().get(key.clone()).await {
        Ok(Some(kv)) => kv.lease == Some(lease),
        Ok(None) => false,
        Err(e) => {
            tracing::warn!(error = %e, "cannot remove this replica's record; it vanishes with its lease");
            return;
        }
    };
    if held && let Err(e) = etcd.client().delete(key).await {
        tracing::warn!(error = %e, "cannot remove this replica's record; it vanishes with its lease");
    }
}

/// The record a starting replica found under its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The record, when it reads as one.
    pub record: Option<ReplicaInfo>,
    /// Held by a lease (every record a replica writes is): a record
    /// without one belongs to no live replica.
    pub leased: bool,
}

/// What a starting replica does about the record under its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Nobody holds the name.
    Free,
    /// The same name at the same endpoint: this replica restarting in
    /// place (killed before its lease ran out); it takes the record over
    /// at once, as a restarted Nomad allocation or pod keeps its identity.
    Restart,
    /// Another live replica, serving at `endpoint`.
    Taken { endpoint: String },
}

/// The rule: a live record at another endpoint is another replica.
pub fn claim(found: Option<&Found>, endpoint: &str) -> Claim {
    match found {
        None | Some(Found { leased: false, .. }) => Claim::Free,
        Some(Found {
            record: Some(record),
            ..
        }) if record.endpoint == endpoint => Claim::Restart,
        Some(Found {
            record: Some(record),
            ..
        }) => Claim::Taken {
            endpoint: record.endpoint.clone(),
        },
        Some(Found { record: None, .. }) => Claim::Taken {
            endpoint: "an unknown endpoint (its record does not read)".into(),
        },
    }
}

/// Why a replica may not start under its name.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "another live replica is named {name:?}: it serves at {endpoint}. Start this one with another --name; if it is this replica restarted after it was killed, give it the same --advertise ({endpoint}), or start it again once that replica's etcd lease has expired (leader_lease, {ttl:?})"
    )]
    Taken {
        name: String,
        endpoint: String,
        ttl: Duration,
    },
    #[error("cannot publish this replica's record: {0}")]
    Etcd(String),
}

/// Write this replica's first record under `lease`, unless another live
/// replica holds its name (see [`claim`]). A guarded transaction: of two
/// replicas starting under one name at once, one wins.
pub async fn claim_name(
    etcd: &EtcdStore,
    info: &ReplicaInfo,
    lease: LeaseId,
    ttl: Duration,
) -> Result<Claim, ClaimError> {
    let key = etcd.keys().replica(&info.name);
    let failed = |e: hotswap_etcd::Error| ClaimError::Etcd(e.to_string());
    // Another start racing this one moves the record between the read and
    // the write; a few rounds settle it.
    for _ in 0..5 {
        let existing = etcd.client().get(key.clone()).await.map_err(failed)?;
        let found = existing.as_ref().map(|kv| Found {
            record: ReplicaInfo::decode(&kv.value),
            leased: kv.lease.is_some_and(|held| held != lease),
        });
        let decision = claim(found.as_ref(), &info.endpoint);
        if let Claim::Taken { endpoint } = decision {
            return Err(ClaimError::Taken {
                name: info.name.clone(),
                endpoint,
                ttl,
            });
        }
        let unchanged = match &existing {
            None => Compare::absent(key.clone()),
            Some(kv) => Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision),
        };
        let written = etcd
            .client()
            .txn(
                &[unchanged],
                &[TxnOp::put_with_lease(key.clone(), info.encode(), lease)],
                &[],
            )
            .await
            .map_err(failed)?;
        if written.succeeded {
            return Ok(decision);
        }
    }
    Err(ClaimError::Etcd(format!(
        "the record {key} kept changing while this replica started; is another starting under the same name?"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(name: Option<&str>, advertise: Option<&str>) -> Result<ReplicaIdentity, String> {
        ReplicaIdentity::from_flags(name, advertise, Some("host-1".into()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn name_defaults_to_the_host_name_and_follows_the_rule() {
        assert_eq!(identity(None, None).map(|i| i.name), Ok("host-1".into()));
        assert_eq!(
            ReplicaIdentity::from_flags(None, None, None).map(|i| i.name),
            Ok(FALLBACK_NAME.into())
        );
        assert_eq!(
            identity(Some("cp-a"), None).map(|i| i.name),
            Ok("cp-a".into())
        );
        let refused = identity(Some("bad name"), None).expect_err("space");
        assert_eq!(
            refused,
            "--name: server name \"bad name\" is invalid: 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        );
        let long_host = ReplicaIdentity::from_flags(None, None, Some("h".repeat(64)))
            .expect_err("too long")
            .to_string();
        assert!(
            long_host.starts_with("the host name is not usable")
                && long_host.ends_with("give one with --name"),
            "{long_host}"
        );
    }

    #[test]
    fn advertise_is_a_reachable_https_url() {
        let check = |url: &str| identity(None, Some(url)).map(|i| i.advertise);
        assert_eq!(
            check("https://cp-a.example:7443"),
            Ok(Some("https://cp-a.example:7443".into()))
        );
        assert_eq!(
            check("https://cp-a.example"),
            Ok(Some("https://cp-a.example:7443".into()))
        );
        assert_eq!(
            check("https://[::1]:8443"),
            Ok(Some("https://[::1]:8443".into()))
        );
        for (bad, why) in [
            ("http://cp-a:7443", "scheme \"http\" is not supported"),
            ("cp-a:7443", "give the whole URL"),
            ("https://cp-a:7443/api", "a path is not allowed"),
            ("https://cp-a:0", "port 0"),
            ("https://0.0.0.0:7443", "unspecified address"),
            (
                "https://",
                "--advertise \"https://\" is not a URL clients can reach",
            ),
            ("not a url", "is not a URL clients can reach"),
        ] {
            let refused = check(bad).expect_err(bad);
            assert!(
                refused.starts_with(&format!(
                    "--advertise {bad:?} is not a URL clients can reach: "
                )) && refused.contains(why),
                "{bad}: {refused}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let refused = identity(Some("-x"), Some("ftp://x")).expect_err("both bad");
        assert!(
            refused.starts_with("--name: ") && refused.contains("; --advertise \"ftp://x\""),
            "{refused}"
        );
    }

    #[test]
    fn default_endpoint_is_the_bound_address() {
        let bound: SocketAddr = "127.0.0.1:40123".parse().expect("addr");
        assert_eq!(
            default_endpoint(bound, Some("h")),
            "https://127.0.0.1:40123"
        );
        let v6: SocketAddr = "[::1]:7443".parse().expect("addr");
        assert_eq!(default_endpoint(v6, None), "https://[::1]:7443");
        let any: SocketAddr = "0.0.0.0:7443".parse().expect("addr");
        assert_eq!(default_endpoint(any, Some("cp-a")), "https://cp-a:7443");
        assert_eq!(default_endpoint(any, None), "https://0.0.0.0:7443");
        let given = ReplicaIdentity {
            name: "a".into(),
            advertise: Some("https://a:1".into()),
        };
        assert_eq!(given.endpoint(bound, None), "https://a:1");
    }

    struct Fixed(Vec<ReplicaInfo>);

    impl Replicas for Fixed {
        fn list(&self) -> Result<Vec<ReplicaInfo>, StoreError> {
            Ok(self.0.clone())
        }
    }

    fn replica(name: &str, leader: bool) -> ReplicaInfo {
        ReplicaInfo {
            name: name.into(),
            endpoint: format!("https://{name}:7443"),
            leader,
            ready: true,
            sessions: 0,
            started_at_ms: 1,
            last_seen_ms: 2,
        }
    }

    #[test]
    fn list_is_by_name_and_get_is_exact() {
        let replicas = Fixed(vec![replica("cp-b", false), replica("cp-a", true)]);
        let names: Vec<String> = list_sorted(&replicas)
            .expect("list")
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["cp-a", "cp-b"]);
        assert_eq!(find(&replicas, "cp-b").map(|r| r.leader).ok(), Some(false));
        assert!(matches!(find(&replicas, "cp"), Err(ReplicaError::NotFound(n)) if n == "cp"));
        assert!(matches!(find(&replicas, ""), Err(ReplicaError::EmptyName)));
        assert_eq!(
            ReplicaError::NotFound("nope".into()).to_string(),
            "server \"nope\" not found; `hotswapctl servers list` shows the live replicas"
        );
    }

    #[test]
    fn records_are_the_json_servers_list_shows_and_round_trip() {
        let record = replica("cp-a", true);
        assert_eq!(
            String::from_utf8(record.encode()).expect("utf-8"),
            r#"{"name":"cp-a","endpoint":"https://cp-a:7443","leader":true,"ready":true,"sessions":0,"started_at_ms":1,"last_seen_ms":2}"#
        );
        assert_eq!(ReplicaInfo::decode(&record.encode()), Some(record));
        assert_eq!(ReplicaInfo::decode(b"cp-a"), None);
        assert_eq!(ReplicaInfo::decode(br#"{"name":"cp-a"}"#), None);
    }

    #[test]
    fn a_record_is_rewritten_on_a_change_and_every_refresh() {
        let last = replica("cp-a", false);
        let seen_later = ReplicaInfo {
            last_seen_ms: 9,
            ..last.clone()
        };
        let soon = Duration::from_millis(300);
        assert!(needs_write(None, &last, Duration::ZERO), "first write");
        assert!(!needs_write(Some(&last), &seen_later, soon));
        assert!(needs_write(Some(&last), &seen_later, REFRESH_EVERY));
        for changed in [
            ReplicaInfo {
                leader: true,
                ..seen_later.clone()
            },
            ReplicaInfo {
                ready: false,
                ..seen_later.clone()
            },
            ReplicaInfo {
                sessions: 3,
                ..seen_later.clone()
            },
        ] {
            assert!(needs_write(Some(&last), &changed, soon), "{changed:?}");
        }
    }

    #[test]
    fn a_live_name_at_another_endpoint_is_taken_and_at_the_same_one_restarts() {
        let live = |record: Option<ReplicaInfo>| Found {
            record,
            leased: true,
        };
        let b = replica("cp-b", false);
        assert_eq!(claim(None, "https://cp-b:7443"), Claim::Free);
        assert_eq!(
            claim(Some(&live(Some(b.clone()))), "https://cp-b:7443"),
            Claim::Restart
        );
        assert_eq!(
            claim(Some(&live(Some(b.clone()))), "https://elsewhere:7443"),
            Claim::Taken {
                endpoint: "https://cp-b:7443".into()
            }
        );
        assert!(matches!(
            claim(Some(&live(None)), "https://cp-b:7443"),
            Claim::Taken { .. }
        ));
        // A record no lease holds belongs to no live replica.
        let orphan = Found {
            record: Some(b),
            leased: false,
        };
        assert_eq!(claim(Some(&orphan), "https://elsewhere:7443"), Claim::Free);
        let refused = ClaimError::Taken {
            name: "cp-b".into(),
            endpoint: "https://cp-b:7443".into(),
            ttl: Duration::from_secs(5),
        }
        .to_string();
        assert!(
            refused.starts_with(
                "another live replica is named \"cp-b\": it serves at https://cp-b:7443. Start this one with another --name"
            ) && refused.contains("(leader_lease, 5s)"),
            "{refused}"
        );
    }

    struct Failing;

    impl Replicas for Failing {
        fn list(&self) -> Result<Vec<ReplicaInfo>, StoreError> {
            Err(StoreError::Backend("etcd unreachable".into()))
        }
    }

    #[test]
    fn a_store_that_cannot_answer_fails_both() {
        assert!(list_sorted(&Failing).is_err());
        assert!(matches!(find(&Failing, "a"), Err(ReplicaError::Storage(_))));
    }
}
