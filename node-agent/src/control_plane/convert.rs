//! Wire ↔ domain conversions of the agent: every `pb` message the agent
//! sends is built here, and every one it receives is turned into a domain
//! type here, so a change of the wire format touches this file only.

use hotswap_common::artifact::Digest;
use hotswap_common::pb;
use hotswap_common::pb::agent_message::Msg as AgentMsg;

use super::Hello;
use crate::artifacts::{ArtifactDescriptor, SourceError, TrustedKey};
use crate::report::AgentReport;
use hotswap_common::convert::{FieldError, check_version, module_name_from_pb};

use crate::state::{Desired, DesiredModule};

pub fn hello_to_pb(hello: &Hello) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(AgentMsg::Hello(pb::Hello {
            node_id: hello.node_id.clone(),
            name: hello.name.clone(),
            labels: hello.labels.clone().into_iter().collect(),
            agent_version: hello.agent_version.clone(),
        })),
    }
}

/// A desired state as the control plane sends it. Refused whole, naming
/// the field, when a module name breaks the module name rule (names become
/// paths on this node), a name repeats, or a version is not semver: acting
/// on part of a malformed state could stop modules the control plane still
/// wants.
pub fn desired_from_pb(desired: pb::DesiredState) -> Result<Desired, FieldError> {
    let mut modules = std::collections::BTreeMap::new();
    for (index, m) in desired.modules.into_iter().enumerate() {
        let entry = format!("modules[{index}]");
        let name = module_name_from_pb("name", &m.name).map_err(|e| e.within(&entry))?;
        check_version("version", &m.version).map_err(|e| e.within(&entry))?;
        check_version("staged_version", &m.staged_version).map_err(|e| e.within(&entry))?;
        let module = DesiredModule {
            version: m.version,
            staged_version: m.staged_version,
            traceparent: m.traceparent,
        };
        if modules.insert(name.into_string(), module).is_some() {
            return Err(
                FieldError::new("name", format!("module {:?} is listed twice", m.name))
                    .within(&entry),
            );
        }
    }
    Ok(Desired {
        generation: desired.generation,
        modules,
        min_signatures: desired.min_signatures,
    })
}

pub fn report_to_pb(report: &AgentReport) -> pb::AgentMessage {
    let modules = report
        .modules
        .iter()
        .map(|m| pb::ModuleStatus {
            pid: m.pid,
            ..pb::ModuleStatus::from(&m.status)
        })
        .collect();
    pb::AgentMessage {
        msg: Some(AgentMsg::Status(pb::StatusReport {
            modules,
            observed_generation: report.observed_generation,
            desired_generation: report.desired_generation,
            usage: report.usage.map(|u| pb::NodeUsage {
                cpu_percent: u.cpu_percent,
                memory_used_bytes: u.memory_used_bytes,
                memory_total_bytes: u.memory_total_bytes,
            }),
        })),
    }
}

/// `what` names the artifact in errors (`artifact NAME@VERSION`).
pub fn descriptor_from_pb(
    descriptor: pb::ArtifactDescriptor,
    what: &str,
) -> Result<ArtifactDescriptor, SourceError> {
    let digest = Digest::parse(&descriptor.digest)
        .map_err(|e| SourceError::Invalid(format!("{what}: {e}")))?;
    let trusted_keys = descriptor
        .trusted_keys_included
        .then(|| trusted_keys_from_pb(descriptor.trusted_keys));
    Ok(ArtifactDescriptor {
        digest,
        size: descriptor.size,
        signatures: hotswap_common::convert::signatures_from_pb(&descriptor.signatures, what),
        trusted_keys,
    })
}

/// The keys the control plane trusts now (a `ListKeys` reply's, or those
/// sent with a descriptor): revoked ones are left out.
pub fn trusted_keys_from_pb(keys: Vec<pb::PublisherKey>) -> Vec<TrustedKey> {
    keys.into_iter()
        .filter(|k| k.revoked_at.is_none())
        .map(|k| TrustedKey {
            name: k.name,
            public_key_pem: k.public_key_pem,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_state_keeps_every_field() {
        let desired = desired_from_pb(pb::DesiredState {
            generation: 7,
            modules: vec![pb::DesiredModule {
                name: "web".into(),
                version: "1.0.0".into(),
                staged_version: "1.1.0".into(),
                traceparent: "00-aa-bb-01".into(),
            }],
            min_signatures: 2,
        })
        .expect("valid");
        assert_eq!(desired.generation, 7);
        assert_eq!(desired.min_signatures, 2);
        assert_eq!(
            desired.modules["web"],
            DesiredModule {
                version: "1.0.0".into(),
                staged_version: "1.1.0".into(),
                traceparent: "00-aa-bb-01".into(),
            }
        );
    }

    #[test]
    fn reports_leave_unknown_latency_unset() {
        use crate::report::ModuleReport;
        use crate::scrape::Window;
        use hotswap_common::status::{FailureKind, Health, Phase};
        let module = |latency, failure_kind| ModuleReport {
            status: hotswap_common::status::ModuleStatus {
                name: "web".into(),
                version: "1.0.0".into(),
                phase: Phase::Failed,
                health: Health::Unhealthy,
                metrics: Some(Window {
                    request_rate: 2.0,
                    error_rate: 0.5,
                    latency_p99_seconds: latency,
                }),
                failure_kind,
                ..Default::default()
            },
            pid: 7,
        };
        let report = AgentReport {
            modules: vec![
                module(None, None),
                module(Some(0.25), Some(FailureKind::Infrastructure)),
            ],
            observed_generation: 3,
            desired_generation: 4,
            usage: None,
        };
        let Some(AgentMsg::Status(status)) = report_to_pb(&report).msg else {
            panic!("a report is a status message");
        };
        assert_eq!(
            (status.observed_generation, status.desired_generation),
            (3, 4)
        );
        let [quiet, failed] = status.modules.as_slice() else {
            panic!("two modules");
        };
        assert_eq!(
            (quiet.phase.as_str(), quiet.health.as_str()),
            ("failed", "unhealthy")
        );
        assert_eq!(
            quiet.metrics.as_ref().map(|m| m.latency_p99_seconds),
            Some(None)
        );
        assert_eq!(quiet.failure_kind, "");
        assert_eq!(
            failed.metrics.as_ref().map(|m| m.latency_p99_seconds),
            Some(Some(0.25))
        );
        assert_eq!(failed.failure_kind, "infrastructure");
        assert_eq!(
            (quiet.pid, failed.pid),
            (7, 7),
            "the agent's process id rides along"
        );
    }

    #[test]
    fn revoked_keys_are_not_trusted() {
        let key = |name: &str, revoked: bool| pb::PublisherKey {
            name: name.into(),
            public_key_pem: format!("pem of {name}"),
            revoked_at: revoked.then(Default::default),
            ..Default::default()
        };
        let keys = trusted_keys_from_pb(vec![key("ci", false), key("old", true)]);
        assert_eq!(
            keys,
            [TrustedKey {
                name: "ci".into(),
                public_key_pem: "pem of ci".into(),
            }]
        );
    }

    /// Keys sent with a descriptor are the trust set to verify with; a
    /// descriptor from a control plane that sends none (the flag unset)
    /// leaves the agent to ask `ListKeys`, even when it trusts no key.
    #[test]
    fn keys_sent_with_a_descriptor_are_used_only_when_flagged() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let key = |name: &str, revoked: bool| pb::PublisherKey {
            name: name.into(),
            public_key_pem: format!("pem of {name}"),
            revoked_at: revoked.then(Default::default),
            ..Default::default()
        };
        let sent = descriptor_from_pb(
            pb::ArtifactDescriptor {
                digest: digest.clone(),
                trusted_keys: vec![key("ci", false), key("old", true)],
                trusted_keys_included: true,
                ..Default::default()
            },
            "artifact web@1.0.0",
        )
        .expect("descriptor");
        assert_eq!(
            sent.trusted_keys,
            Some(vec![TrustedKey {
                name: "ci".into(),
                public_key_pem: "pem of ci".into(),
            }])
        );
        let none_trusted = descriptor_from_pb(
            pb::ArtifactDescriptor {
                digest: digest.clone(),
                trusted_keys_included: true,
                ..Default::default()
            },
            "artifact web@1.0.0",
        )
        .expect("descriptor");
        assert_eq!(none_trusted.trusted_keys, Some(Vec::new()));
        let older = descriptor_from_pb(
            pb::ArtifactDescriptor {
                digest,
                trusted_keys: vec![key("ci", false)],
                ..Default::default()
            },
            "artifact web@1.0.0",
        )
        .expect("descriptor");
        assert_eq!(older.trusted_keys, None);
    }

    #[test]
    fn a_bad_digest_names_the_artifact() {
        let err = descriptor_from_pb(
            pb::ArtifactDescriptor {
                digest: "nope".into(),
                ..Default::default()
            },
            "artifact web@1.0.0",
        )
        .expect_err("bad digest");
        assert!(!err.is_transient());
        assert!(err.to_string().starts_with("artifact web@1.0.0: "), "{err}");
    }

    fn module(name: &str, version: &str, staged_version: &str) -> pb::DesiredModule {
        pb::DesiredModule {
            name: name.into(),
            version: version.into(),
            staged_version: staged_version.into(),
            traceparent: String::new(),
        }
    }

    fn desired(modules: Vec<pb::DesiredModule>) -> Result<Desired, String> {
        desired_from_pb(pb::DesiredState {
            generation: 3,
            modules,
            min_signatures: 2,
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_desired_state_converts_or_names_the_bad_field() {
        let ok = desired(vec![
            module("web", "1.0.0", ""),
            module("db", "", "2.0.0-rc.1"),
        ])
        .expect("valid");
        assert_eq!((ok.generation, ok.min_signatures), (3, 2));
        assert_eq!(ok.modules["db"].staged_version, "2.0.0-rc.1");

        let err = desired(vec![
            module("web", "1.0.0", ""),
            module("../etc", "1.0.0", ""),
        ])
        .expect_err("bad name");
        assert!(
            err.starts_with("modules[1].name: module name \"../etc\" is invalid"),
            "{err}"
        );
        let err = desired(vec![module("web", "latest", "")]).expect_err("bad version");
        assert!(
            err.starts_with("modules[0].version: \"latest\" is not semver"),
            "{err}"
        );
        let err = desired(vec![module("web", "", "x")]).expect_err("bad staged");
        assert!(err.starts_with("modules[0].staged_version: "), "{err}");
        let err = desired(vec![module("web", "1.0.0", ""), module("web", "2.0.0", "")])
            .expect_err("repeated");
        assert_eq!(err, "modules[1].name: module \"web\" is listed twice");
    }
}
