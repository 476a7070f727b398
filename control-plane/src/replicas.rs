//! The control-plane replicas serving this fleet (`servers list|get`): what
//! a replica says about itself ([`ReplicaInfo`]), where the list of them
//! comes from ([`Replicas`]), and this process's own identity from `run
//! --name` and `--advertise` ([`ReplicaIdentity`]).
//!
//! The embedded (sled) mode has exactly one replica, this process
//! ([`EmbeddedReplicas`]). A replicated store lists the records every live
//! replica keeps under its own lease (`store::keys::replica`), each written
//! from its [`ThisReplica::info`]; the services only see the trait.

use std::net::SocketAddr;
use std::sync::Arc;

use hotswap_common::admin::Readiness;
use hotswap_common::ids::{NameKind, check_name};
use hotswap_common::timefmt::now_ms;
use hotswap_common::tls::ControlPlaneUrl;

use crate::registry::Registry;
use crate::store::StoreError;

/// One replica as it describes itself.
#[derive(Clone, Debug, PartialEq, Eq)]
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
