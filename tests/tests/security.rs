//! Security rules with the real binaries: roles against every RPC, the
//! audit log and its verification after an offline edit, certificate
//! renewal and revocation, artifact trust over time, and enrollment limits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hotswap_common::pb;
use hotswap_common::profile::Profile;
use hotswap_common::tls::{self, ControlPlaneUrl, PinnedCa, ServerTrust};
use hotswap_tests::{
    Agent, ControlPlane, TestDir, channel_for, ctl_offline, eventually, runtime, write_module,
};
use tonic::Code;
use tonic::transport::Channel;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf8")
}

/// Generate a publisher key pair; returns the `.key` path.
fn key(dir: &Path, name: &str) -> PathBuf {
    let base = dir.join(name);
    ctl_offline(&["keys", "generate", "--out", p(&base)]).ok();
    dir.join(format!("{name}.key"))
}

fn pack(dir: &Path, name: &str, version: &str, key: &Path) -> PathBuf {
    let src = dir.join(format!("src-{name}-{version}"));
    write_module(&src, name, version, version.as_bytes());
    let out = dir.join(format!("{name}-{version}.hsm"));
    ctl_offline(&["module", "pack", p(&src), "--key", p(key), "-o", p(&out)]).ok();
    out
}

/// One connected agent per environment (no modules).
fn agents_in(cp: &ControlPlane, dir: &Path, environments: &[&str]) -> Vec<Agent> {
    let uses = environments.len().to_string();
    let (token, fp) = cp.token(&["--uses", &uses]);
    environments
        .iter()
        .map(|env| {
            let name = format!("{env}-node");
            let mut agent = Agent::new(dir, &name);
            let label = format!("environment={env}");
            agent.enroll(&cp.url(), &token, &fp, &["--label", &label]);
            cp.wait_status(&name, "connected");
            agent
        })
        .collect()
}

type Reply = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>>>>;
type Call = Box<dyn Fn(Channel) -> Reply>;

/// One RPC with a fixed request, callable with any channel.
macro_rules! call {
    ($client:ident, $method:ident, $request:expr) => {{
        let call: Call = Box::new(move |channel: Channel| -> Reply {
            let request = $request;
            Box::pin(async move {
                $client::<Channel>::new(channel)
                    .$method(request)
                    .await
                    .map(|_| ())
            })
        });
        call
    }};
}

#[test]
fn every_role_against_every_operator_rpc() {
    use pb::{
        agent_session_client::AgentSessionClient as S, artifacts_client::ArtifactsClient as A,
        audit_client::AuditClient as Au, deployments_client::DeploymentsClient as D,
        fleet_client::FleetClient as F, freezes_client::FreezesClient as Fz,
        history_client::HistoryClient as H, pipelines_client::PipelinesClient as P,
        servers_client::ServersClient as Sv, users_client::UsersClient as U,
    };
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let _agents = agents_in(&cp, dir.path(), &["production"]);
    // A production deployment awaiting approval, for the protected-control rows.
    let k = key(dir.path(), "k");
    cp.ctl(&["keys", "trust", p(&dir.path().join("k.pub")), "--name", "k"])
        .ok();
    cp.ctl(&["module", "push", p(&pack(dir.path(), "app", "1.0.0", &k))])
        .ok();
    let prod = cp
        .ctl(&[
            "-o",
            "json",
            "deploy",
            "create",
            "app@1.0.0",
            "--env",
            "production",
        ])
        .json();
    assert_eq!(prod["state"], "awaiting_approval");
    let prod_id = prod["id"].as_str().expect("id").to_string();

    let profiles = [
        ("viewer", cp.user_profile("vera", "viewer")),
        ("deployer", cp.user_profile("dan", "deployer")),
        ("approver", cp.user_profile("ann", "approver")),
        ("admin", cp.admin_profile()),
    ];
    let pause_prod = call!(
        D,
        control_deployment,
        pb::ControlDeploymentRequest {
            id: prod_id.clone(),
            action: "pause".into(),
            reason: String::new(),
        }
    );
    let all: &[&str] = &["viewer", "deployer", "approver", "admin"];
    let table: Vec<(&str, Call, &[&str])> = vec![
        (
            "Fleet.CreateToken",
            call!(F, create_token, pb::CreateTokenRequest::default()),
            &["admin"],
        ),
        (
            "Fleet.ListNodes",
            call!(F, list_nodes, pb::ListNodesRequest::default()),
            all,
        ),
        (
            "Fleet.GetNode",
            call!(F, get_node, pb::GetNodeRequest { node: "x".into() }),
            all,
        ),
        (
            "Fleet.WatchNodes",
            call!(F, watch_nodes, pb::WatchNodesRequest {}),
            all,
        ),
        (
            "Fleet.RemoveNode",
            call!(F, remove_node, pb::RemoveNodeRequest { node: "x".into() }),
            &["admin"],
        ),
        (
            "Fleet.SetNodeModule",
            call!(
                F,
                set_node_module,
                pb::SetNodeModuleRequest {
                    node: "x".into(),
                    ..Default::default()
                }
            ),
            &["admin"],
        ),
        (
            "Fleet.UnsetNodeModule",
            call!(
                F,
                unset_node_module,
                pb::UnsetNodeModuleRequest {
                    node: "x".into(),
                    module: "m".into()
                }
            ),
            &["admin"],
        ),
        (
            "Artifacts.PushArtifact",
            call!(
                A,
                push_artifact,
                tokio_stream::iter(vec![pb::PushArtifactChunk {
                    data: b"not an artifact".to_vec()
                }])
            ),
            &["deployer", "admin"],
        ),
        (
            "Artifacts.ListModules",
            call!(A, list_modules, pb::ListModulesRequest::default()),
            all,
        ),
        (
            "Artifacts.GetModule",
            call!(A, get_module, pb::GetModuleRequest { name: "x".into() }),
            all,
        ),
        (
            "Artifacts.YankVersion",
            call!(
                A,
                yank_version,
                pb::YankVersionRequest {
                    name: "nope".into(),
                    version: "1.0.0".into(),
                    reason: "r".into()
                }
            ),
            &["deployer", "admin"],
        ),
        (
            "Artifacts.UnyankVersion",
            call!(
                A,
                unyank_version,
                pb::UnyankVersionRequest {
                    name: "nope".into(),
                    version: "1.0.0".into()
                }
            ),
            &["deployer", "admin"],
        ),
        (
            "Artifacts.TrustKey",
            call!(
                A,
                trust_key,
                pb::TrustKeyRequest {
                    name: "x".into(),
                    public_key_pem: "bad".into()
                }
            ),
            &["admin"],
        ),
        (
            "Artifacts.ListKeys",
            call!(A, list_keys, pb::ListKeysRequest::default()),
            all,
        ),
        (
            "Artifacts.RevokeKey",
            call!(A, revoke_key, pb::RevokeKeyRequest { name: "x".into() }),
            &["admin"],
        ),
        (
            "Artifacts.DescribeArtifact",
            call!(
                A,
                describe_artifact,
                pb::DescribeArtifactRequest {
                    name: "app".into(),
                    version: "1.0.0".into()
                }
            ),
            all,
        ),
        (
            "Artifacts.FetchArtifact",
            call!(
                A,
                fetch_artifact,
                pb::FetchArtifactRequest {
                    digest: "bad".into(),
                    offset: 0
                }
            ),
            all,
        ),
        (
            "Deployments.CreateDeployment",
            call!(
                D,
                create_deployment,
                pb::CreateDeploymentRequest {
                    module: "nope".into(),
                    version: "1.0.0".into(),
                    environment: "dev".into(),
                    ..Default::default()
                }
            ),
            &["deployer", "admin"],
        ),
        (
            "Deployments.ListDeployments",
            call!(D, list_deployments, pb::ListDeploymentsRequest::default()),
            all,
        ),
        (
            "Deployments.GetDeployment",
            call!(
                D,
                get_deployment,
                pb::GetDeploymentRequest { id: "x".into() }
            ),
            all,
        ),
        (
            "Deployments.WatchDeployment",
            call!(
                D,
                watch_deployment,
                pb::GetDeploymentRequest { id: "x".into() }
            ),
            all,
        ),
        (
            "Deployments.ControlDeployment pause (dev)",
            call!(
                D,
                control_deployment,
                pb::ControlDeploymentRequest {
                    id: "x".into(),
                    action: "pause".into(),
                    reason: String::new()
                }
            ),
            &["deployer", "approver", "admin"],
        ),
        (
            "Deployments.ControlDeployment pause (production)",
            pause_prod,
            &["approver", "admin"],
        ),
        (
            "Deployments.ControlDeployment approve",
            call!(
                D,
                control_deployment,
                pb::ControlDeploymentRequest {
                    id: "x".into(),
                    action: "approve".into(),
                    reason: "r".into()
                }
            ),
            &["approver", "admin"],
        ),
        (
            "Deployments.ControlDeployment reject",
            call!(
                D,
                control_deployment,
                pb::ControlDeploymentRequest {
                    id: "x".into(),
                    action: "reject".into(),
                    reason: "r".into()
                }
            ),
            &["approver", "admin"],
        ),
        (
            "Pipelines.RunPipeline",
            call!(
                P,
                run_pipeline,
                pb::RunPipelineRequest {
                    module: "nope".into(),
                    version: "1.0.0".into(),
                    to: String::new(),
                    allow_downgrade: false,
                    override_freeze: false,
                }
            ),
            &["deployer", "admin"],
        ),
        (
            "Pipelines.GetPipeline",
            call!(P, get_pipeline, pb::GetPipelineRequest { id: "x".into() }),
            all,
        ),
        (
            "Pipelines.ListPipelines",
            call!(P, list_pipelines, pb::ListPipelinesRequest::default()),
            all,
        ),
        (
            "Pipelines.AbortPipeline",
            call!(
                P,
                abort_pipeline,
                pb::AbortPipelineRequest {
                    id: "x".into(),
                    reason: String::new(),
                }
            ),
            &["deployer", "approver", "admin"],
        ),
        (
            "History.GetHistoryState",
            call!(
                H,
                get_history_state,
                pb::GetHistoryStateRequest {
                    environment: "production".into(),
                    at: None,
                }
            ),
            all,
        ),
        (
            "History.DiffHistory",
            call!(H, diff_history, pb::DiffHistoryRequest::default()),
            all,
        ),
        (
            "Users.CreateUser",
            call!(
                U,
                create_user,
                pb::CreateUserRequest {
                    name: "probe".into(),
                    role: "viewer".into(),
                    csr_pem: "bad".into(),
                    validity_seconds: 0
                }
            ),
            &["admin"],
        ),
        (
            "Users.ListUsers",
            call!(U, list_users, pb::ListUsersRequest {}),
            all,
        ),
        (
            "Users.SetUserRole",
            call!(
                U,
                set_user_role,
                pb::SetUserRoleRequest {
                    name: "nobody".into(),
                    role: "viewer".into()
                }
            ),
            &["admin"],
        ),
        (
            "Users.RevokeUser",
            call!(
                U,
                revoke_user,
                pb::RevokeUserRequest {
                    name: "nobody".into()
                }
            ),
            &["admin"],
        ),
        (
            "Servers.ListServers",
            call!(Sv, list_servers, pb::ListServersRequest {}),
            all,
        ),
        (
            "Servers.GetServer",
            call!(
                Sv,
                get_server,
                pb::GetServerRequest {
                    name: "nope".into()
                }
            ),
            all,
        ),
        (
            "Audit.ListAudit",
            call!(Au, list_audit, pb::ListAuditRequest::default()),
            all,
        ),
        (
            "Audit.VerifyAudit",
            call!(Au, verify_audit, pb::VerifyAuditRequest {}),
            all,
        ),
        // Freezes (SPEC §9): deployers and admins make and lift them. The
        // requests are invalid (an unknown environment, no such freeze), so
        // an allowed call changes nothing.
        (
            "Freezes.CreateFreeze",
            call!(
                Fz,
                create_freeze,
                pb::CreateFreezeRequest {
                    environment: "nope".into(),
                    for_ms: 60_000,
                    reason: "x".into(),
                    ..Default::default()
                }
            ),
            &["deployer", "admin"],
        ),
        (
            "Freezes.ListFreezes",
            call!(Fz, list_freezes, pb::ListFreezesRequest::default()),
            all,
        ),
        (
            "Freezes.DeleteFreeze",
            call!(
                Fz,
                delete_freeze,
                pb::DeleteFreezeRequest { id: "x".into() }
            ),
            &["deployer", "admin"],
        ),
        (
            "AgentSession.RenewCertificate",
            call!(
                S,
                renew_certificate,
                pb::RenewCertificateRequest {
                    csr_pem: "x".into()
                }
            ),
            &[],
        ),
    ];

    let rt = runtime();
    let _entered = rt.enter();
    let mut failures = Vec::new();
    for (role, profile) in &profiles {
        let channel = channel_for(profile, &cp.url());
        for (rpc, call, allowed) in &table {
            let result = rt.block_on(call(channel.clone()));
            let code = result.as_ref().err().map(|s| s.code());
            let denied = matches!(code, Some(Code::PermissionDenied | Code::Unauthenticated));
            if allowed.contains(role) == denied {
                failures.push(format!(
                    "{role} {rpc}: expected {}, got {:?}",
                    if denied { "allowed" } else { "denied" },
                    result.as_ref().err()
                ));
            }
            if denied && !allowed.is_empty() {
                let message = result
                    .err()
                    .map(|s| s.message().to_string())
                    .unwrap_or_default();
                if !message.contains("needs role") {
                    failures.push(format!(
                        "{role} {rpc}: denial does not name the role: {message}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // From the CLI: exit 5 and the role that is needed.
    let viewer = &profiles[0].1;
    let out = cp.ctl_with_profile(viewer, &["tokens", "create"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(
        out.stderr.contains("has role viewer") && out.stderr.contains("needs role admin"),
        "{out:?}"
    );

    // Roles change on the server, without new credentials.
    assert_eq!(cp.ctl(&["users", "set-role", "vera", "admin"]).code, 0);
    let out = cp.ctl_with_profile(viewer, &["tokens", "create"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(cp.ctl(&["users", "revoke", "vera"]).code, 0);
    let out = cp.ctl_with_profile(viewer, &["nodes", "list"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("revoked"), "{out:?}");
    // Issuing the name again does not revive the old certificate.
    let fresh = dir.path().join("vera2.profile.toml");
    assert_eq!(
        cp.ctl(&[
            "users",
            "create",
            "vera",
            "--role",
            "viewer",
            "--out",
            p(&fresh)
        ])
        .code,
        0
    );
    assert_eq!(cp.ctl_with_profile(viewer, &["nodes", "list"]).code, 5);
    assert_eq!(cp.ctl_with_profile(&fresh, &["nodes", "list"]).code, 0);
    // A certificate from the CA that was never registered is refused.
    let minted = cp.unregistered_profile("mallory");
    let out = cp.ctl_with_profile(&minted, &["nodes", "list"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("not known"), "{out:?}");
    // An existing profile file is never overwritten.
    let out = cp.ctl(&[
        "users",
        "create",
        "zed",
        "--role",
        "viewer",
        "--out",
        p(&fresh),
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("refusing to overwrite"), "{out:?}");
    let users = cp.ctl(&["-o", "json", "users", "list"]).json();
    assert!(
        !users
            .as_array()
            .expect("array")
            .iter()
            .any(|u| u["name"] == "zed"),
        "nothing was created: {users}"
    );
}

#[test]
fn audit_log_records_calls_and_verify_catches_an_offline_edit() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let viewer = cp.user_profile("vic", "viewer");
    cp.ctl(&["tokens", "create", "--label", "environment=dev"])
        .ok();
    assert_eq!(cp.ctl_with_profile(&viewer, &["tokens", "create"]).code, 5);
    let records = cp.ctl(&["-o", "json", "audit", "list"]).json();
    let records = records.as_array().expect("array").clone();
    let summary: Vec<String> = records
        .iter()
        .map(|r| format!("{} {} {} {}", r["seq"], r["user"], r["action"], r["result"]))
        .collect();
    assert_eq!(
        summary,
        [
            "1 \"admin\" \"users.create\" \"ok\"",
            "2 \"admin\" \"tokens.create\" \"ok\"",
            "3 \"vic\" \"tokens.create\" \"denied\"",
        ],
        "{records:?}"
    );
    let denied = &records[2];
    assert!(
        denied["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("needs role admin")
    );
    assert!(
        denied["peer"]
            .as_str()
            .unwrap_or_default()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(denied["trace_id"].as_str().unwrap_or_default().len(), 32);
    assert_eq!(records[1]["prev_hash"], records[0]["hash"]);
    let filtered = cp
        .ctl(&[
            "-o", "json", "audit", "list", "--user", "vic", "--result", "denied",
        ])
        .json();
    assert_eq!(filtered.as_array().map(Vec::len), Some(1));

    let verified = cp.ctl(&["-o", "json", "audit", "verify"]);
    assert_eq!(verified.code, 0, "{verified:?}");
    assert_eq!(verified.json()["intact"], true);
    assert_eq!(verified.json()["records"], 3);
    // The secret token never reaches a log.
    assert!(!cp.log().contains("hsj_"), "token in the control plane log");

    // Offline, rewrite who created the token.
    cp.stop();
    {
        let db = sled::open(cp.data_dir.join("state")).expect("open sled");
        let tree = db.open_tree("audit").expect("tree");
        let key = 2u64.to_be_bytes();
        let mut record: serde_json::Value =
            serde_json::from_slice(&tree.get(key).expect("get").expect("record 2")).expect("json");
        record["user"] = "vic".into();
        tree.insert(key, serde_json::to_vec(&record).expect("encode"))
            .expect("insert");
        db.flush().expect("flush");
    }
    cp.start();
    let broken = cp.ctl(&["audit", "verify"]);
    assert_eq!(broken.code, 1, "{broken:?}");
    assert!(
        broken.stderr.contains("audit log broken at record 2")
            && broken.stderr.contains("modified"),
        "{broken:?}"
    );
    let json = cp.ctl(&["-o", "json", "audit", "verify"]);
    assert_eq!(json.code, 1);
    let json: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(
        (json["intact"].as_bool(), json["broken_seq"].as_u64()),
        (Some(false), Some(2))
    );
}

/// SPEC §9: `audit_retention` removes old records, oldest first, behind an
/// anchor the CA signed: what is left is exactly the newer records, and the
/// chain still verifies from the anchor, also after a restart.
#[test]
fn audit_retention_trims_behind_a_signed_anchor_and_the_chain_still_verifies() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init_with_settings(dir.path(), "audit_retention = \"3s\"\n");
    cp.start();
    let (_, fingerprint) = cp.token(&["--label", "environment=dev"]);
    let old = cp.ctl(&["-o", "json", "audit", "list"]).json();
    let old_last = old
        .as_array()
        .and_then(|records| records.last())
        .and_then(|r| r["seq"].as_u64())
        .expect("records");
    let verified = eventually("the old records to be trimmed", || {
        let out = cp.ctl(&["-o", "json", "audit", "verify"]);
        let view = out.json();
        (out.code == 0 && view["first_seq"].as_u64() > Some(old_last))
            .then_some(view)
            .ok_or(out.stdout)
    });
    assert_eq!(verified["intact"], true, "{verified}");
    assert_eq!(
        verified["anchor_signer"],
        fingerprint.as_str(),
        "{verified}"
    );
    let listed = cp.ctl(&["-o", "json", "audit", "list"]).json();
    let listed = listed.as_array().cloned().unwrap_or_default();
    let first = listed.first().cloned().unwrap_or_default();
    assert_eq!(first["seq"], verified["first_seq"], "{listed:?}");
    assert!(
        listed.iter().any(|r| r["action"] == "audit.anchor"),
        "the anchor is in the chain: {listed:?}"
    );
    // New records chain on; the chain verifies after a restart too.
    cp.ctl(&["tokens", "create"]).ok();
    cp.stop();
    cp.start();
    let again = cp.ctl(&["-o", "json", "audit", "verify"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(again.json()["intact"], true, "{again:?}");
    let table = cp.ctl(&["audit", "verify"]);
    assert!(
        table
            .stdout
            .contains("older ones removed by audit_retention"),
        "{table:?}"
    );
}

#[test]
fn agents_renew_short_lived_certificates_without_dropping_the_session() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init_with_settings(dir.path(), "node_cert_validity = \"12s\"\n");
    cp.start();
    let (token, fp) = cp.token(&[]);
    let mut agent = Agent::new(dir.path(), "node-1");
    agent.enroll(&cp.url(), &token, &fp, &[]);
    cp.wait_status("node-1", "connected");
    let cert_path = agent.data_dir.join("identity/node.crt");
    let first = std::fs::read_to_string(&cert_path).expect("cert");
    let old_profile = agent.node_profile(&cp.url());

    // Due at 8 s; wait for two renewals so the second uses a renewed cert.
    let renewals = || {
        cp.ctl(&[
            "-o",
            "json",
            "audit",
            "list",
            "--action",
            "nodes.renew_certificate",
            "--result",
            "ok",
        ])
        .json()
        .as_array()
        .map_or(0, Vec::len)
    };
    eventually("two certificate renewals", || {
        let n = renewals();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} renewals"))
        }
    });
    // The agent stores the new pair after the control plane recorded it.
    eventually("the renewed certificate on disk", || {
        let current = std::fs::read_to_string(&cert_path).map_err(|e| e.to_string())?;
        let journal = agent.data_dir.join("identity/renewal.json").exists();
        if current != first && !journal {
            Ok(())
        } else {
            Err(format!(
                "replaced: {}, journal: {journal}",
                current != first
            ))
        }
    });
    // Each renewal moved the session to a connection made with the new
    // certificate, opened before the old one closed: the control plane
    // replaced sessions and never saw the node leave.
    let log = eventually("the session on the second renewed certificate", || {
        let log = cp.log();
        if log.matches("agent session opened").count() >= 3 {
            Ok(log)
        } else {
            Err("fewer than 3 sessions".into())
        }
    });
    let opened = log.matches("agent session opened").count();
    let replaced = log.matches("new session replaces the previous one").count();
    assert_eq!(replaced, opened - 1, "{log}");
    let (_, metrics) = hotswap_tests::http_get(agent.admin(), "/metrics");
    let reconnects = metrics
        .lines()
        .find(|l| l.starts_with("hotswap_agent_reconnects_total"))
        .unwrap_or_default()
        .to_string();
    assert!(reconnects.ends_with(" 0"), "{reconnects}");
    assert_eq!(cp.node_status("node-1").as_deref(), Some("connected"));

    // The enrollment certificate has expired by now: a client using it is
    // refused, while the agent reconnects with its current one.
    let out = cp.ctl_with_profile(&old_profile, &["nodes", "list"]);
    assert_ne!(out.code, 0, "{out:?}");
    cp.kill();
    cp.start();
    cp.wait_status("node-1", "connected");
}

#[test]
fn removed_node_is_cut_off_and_cannot_return_with_its_token() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let (token, fp) = cp.token(&["--uses", "3"]);
    let mut agent = Agent::new(dir.path(), "node-1");
    agent.enroll(&cp.url(), &token, &fp, &[]);
    cp.wait_status("node-1", "connected");
    let node_profile = agent.node_profile(&cp.url());
    assert_eq!(cp.ctl(&["nodes", "remove", "node-1"]).code, 0);
    let (status, log) = agent.wait_exit();
    assert!(!status.success(), "agent must stop: {log}");
    // Its certificate is refused at once, for every call.
    let out = cp.ctl_with_profile(&node_profile, &["nodes", "list"]);
    assert_eq!(out.code, 5, "{out:?}");
    // The token had two uses left; they were spent with the removal.
    let mut again = Agent::new(dir.path(), "node-1b");
    again.enroll(&cp.url(), &token, &fp, &[]);
    let (status, log) = again.wait_exit();
    assert!(!status.success());
    assert!(log.contains("used up"), "{log}");
    assert!(
        !log.contains(&token) && !cp.log().contains(&token),
        "token leaked into a log"
    );
}

#[test]
fn a_node_can_only_speak_for_itself() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let (token, fp) = cp.token(&["--uses", "2"]);
    let mut a = Agent::new(dir.path(), "a");
    a.enroll(&cp.url(), &token, &fp, &[]);
    let mut b = Agent::new(dir.path(), "b");
    b.enroll(&cp.url(), &token, &fp, &[]);
    cp.wait_status("a", "connected");
    cp.wait_status("b", "connected");
    let b_id = b.node_id();
    let rt = runtime();
    let _entered = rt.enter();
    let channel = channel_for(&a.node_profile(&cp.url()), &cp.url());
    let status = rt.block_on(async move {
        let hello = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                node_id: b_id,
                name: "b".into(),
                ..Default::default()
            })),
        };
        pb::agent_session_client::AgentSessionClient::new(channel)
            .session(tokio_stream::iter(vec![hello]))
            .await
            .map(|_| ())
            .expect_err("must be refused")
    });
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("belongs to node"), "{status:?}");
    assert_eq!(cp.node_status("b").as_deref(), Some("connected"));
}

#[test]
fn signatures_are_rechecked_at_deploy_time() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init_with_settings(
        dir.path(),
        concat!(
            "[environments.dev]\nstrategy = \"direct\"\n",
            "[environments.qa]\nstrategy = \"rolling\"\n",
            "[environments.staging]\nstrategy = \"blue-green\"\n",
            "[environments.production]\nstrategy = \"canary\"\nrequire_approval = true\nmin_signatures = 2\n",
        ),
    );
    cp.start();
    let _agents = agents_in(&cp, dir.path(), &["dev", "production"]);
    let (k1, k2) = (key(dir.path(), "k1"), key(dir.path(), "k2"));
    for name in ["k1", "k2"] {
        let public = dir.path().join(format!("{name}.pub"));
        cp.ctl(&["keys", "trust", p(&public), "--name", name]).ok();
    }
    let artifact = pack(dir.path(), "app", "1.0.0", &k1);
    cp.ctl(&["module", "push", p(&artifact)]).ok();
    let plan = |env: &str| cp.ctl(&["deploy", "create", "app@1.0.0", "--env", env, "--dry-run"]);
    assert_eq!(plan("dev").code, 0);
    let out = plan("production");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("needs signatures from 2 distinct trusted key(s) and has 1"),
        "{out:?}"
    );
    let piped = cp.ctl(&["pipeline", "run", "app@1.0.0"]);
    assert_eq!(piped.code, 1, "refused before any stage: {piped:?}");
    assert!(piped.stderr.contains("environment production"), "{piped:?}");
    assert!(
        cp.ctl(&["-o", "json", "deploy", "list"])
            .json()
            .as_array()
            .is_some_and(Vec::is_empty)
    );

    // A second publisher signs; pushing again merges the signature.
    ctl_offline(&["module", "sign", p(&artifact), "--key", p(&k2)]).ok();
    cp.ctl(&["module", "push", p(&artifact)]).ok();
    assert_eq!(plan("production").code, 0);

    // Revoking a key: its signatures stop counting, history stays.
    cp.ctl(&["keys", "revoke", "k1"]).ok();
    let out = plan("production");
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("key \"k1\" was revoked"), "{out:?}");
    assert_eq!(plan("dev").code, 0, "k2 alone is enough for dev");
    cp.ctl(&["keys", "revoke", "k2"]).ok();
    let out = plan("dev");
    assert_eq!(out.code, 1, "{out:?}");
    let module = cp.ctl(&["-o", "json", "module", "get", "app"]).json();
    assert_eq!(module["versions"][0]["version"], "1.0.0", "history is kept");

    // An expiring signature: valid when pushed, not after it expires. The
    // artifact is packed by k4 (revoked below) and signed by k3 for 2 s.
    for name in ["k3", "k4"] {
        key(dir.path(), name);
        let public = dir.path().join(format!("{name}.pub"));
        cp.ctl(&["keys", "trust", p(&public), "--name", name]).ok();
    }
    let expiring = pack(dir.path(), "exp", "1.0.0", &dir.path().join("k4.key"));
    let k3 = dir.path().join("k3.key");
    ctl_offline(&[
        "module",
        "sign",
        p(&expiring),
        "--key",
        p(&k3),
        "--expires-in",
        "2s",
    ])
    .ok();
    cp.ctl(&["module", "push", p(&expiring)]).ok();
    cp.ctl(&["keys", "revoke", "k4"]).ok();
    let plan_e = || cp.ctl(&["deploy", "create", "exp@1.0.0", "--env", "dev", "--dry-run"]);
    assert_eq!(plan_e().code, 0, "k3's signature is still valid");
    std::thread::sleep(Duration::from_millis(2500));
    let out = plan_e();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("the signature by \"k3\" expired"),
        "{out:?}"
    );
}

#[test]
fn enrollment_attempts_are_rate_limited_per_address() {
    let dir = TestDir::new();
    let mut cp =
        ControlPlane::init_with_settings(dir.path(), "enroll_burst = 3\nenroll_per_minute = 1\n");
    cp.start();
    let (_, fp) = cp.token(&[]);
    let pin = PinnedCa::new(hotswap_common::pki::parse_fingerprint(&fp).expect("fingerprint"));
    let url = ControlPlaneUrl::parse(&cp.url()).expect("url");
    let codes: Vec<Code> = runtime().block_on(async move {
        let config = tls::client_config(ServerTrust::Pinned(pin), None).expect("config");
        let channel = tls::connect(&url, config, &Default::default())
            .await
            .expect("connect");
        let mut client = pb::enrollment_client::EnrollmentClient::new(channel);
        let mut codes = Vec::new();
        let (csr_pem, _) = hotswap_common::pki::generate_csr("x").expect("csr");
        for _ in 0..5 {
            let status = client
                .enroll(pb::EnrollRequest {
                    join_token: "hsj_guess".into(),
                    csr_pem: csr_pem.clone(),
                    name: "x".into(),
                    ..Default::default()
                })
                .await
                .expect_err("bad token");
            codes.push(status.code());
        }
        codes
    });
    assert_eq!(
        codes,
        [
            Code::Unauthenticated,
            Code::Unauthenticated,
            Code::Unauthenticated,
            Code::ResourceExhausted,
            Code::ResourceExhausted
        ]
    );
    let denied = cp
        .ctl(&["-o", "json", "audit", "list", "--action", "nodes.enroll"])
        .json();
    assert_eq!(
        denied.as_array().map(Vec::len),
        Some(3),
        "attempts that got through are audited"
    );
}

/// Connections that hold sockets open without completing a TLS handshake:
/// some send nothing, some drip one byte of a ClientHello per second. Each
/// is renewed as soon as the control plane closes it, as an attacker would.
struct HandshakeFlood {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl HandshakeFlood {
    fn start(target: std::net::SocketAddr, idle: usize, drip: usize) -> Self {
        use std::io::{Read, Write};
        use std::net::TcpStream;
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            // A TLS record header announcing a 512-byte handshake message,
            // then filler: a ClientHello that never completes.
            let drip_bytes: Vec<u8> = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]
                .into_iter()
                .chain(std::iter::repeat(0x03))
                .take(600)
                .collect();
            let open = || {
                let s = TcpStream::connect(target).ok()?;
                s.set_nonblocking(true).ok()?;
                Some(s)
            };
            let mut sockets: Vec<(Option<TcpStream>, bool, usize)> =
                (0..idle + drip).map(|i| (open(), i >= idle, 0)).collect();
            let mut renewed = 0u64;
            // Bounded: the test stops it, and it gives up by itself after a minute.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !stopping.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                for (socket, drips, sent) in &mut sockets {
                    let alive = socket.as_mut().is_some_and(|s| {
                        let mut buf = [0u8; 64];
                        let readable = match s.read(&mut buf) {
                            Ok(0) => false,
                            Ok(_) => true,
                            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                        };
                        readable
                            && (!*drips || {
                                let byte = drip_bytes[*sent % drip_bytes.len()];
                                *sent += 1;
                                s.write(&[byte]).is_ok()
                            })
                    });
                    if !alive {
                        *socket = open();
                        *sent = 0;
                        renewed += 1;
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            renewed
        });
        HandshakeFlood {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop the flood; returns how many of its sockets the server closed.
    fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for HandshakeFlood {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn idle_and_slow_drip_connections_cannot_lock_out_agents_or_operators() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let mut agents = agents_in(&cp, dir.path(), &["dev"]);
    let grpc = cp.grpc.expect("grpc address");
    // Four times the handshake turns of this machine, of each kind: before
    // the ClientHello was read under its own timeout, eight idle sockets
    // were enough to make every call wait past its deadline.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let flood = HandshakeFlood::start(grpc, 16 * cores, 16 * cores);
    std::thread::sleep(Duration::from_millis(500));

    // Operators: every call succeeds within the CLI's own deadline.
    for round in 0..6 {
        let listed = cp.ctl(&["-o", "json", "nodes", "list"]);
        assert_eq!(
            listed.code, 0,
            "nodes list #{round} during the flood: {listed:?}"
        );
        std::thread::sleep(Duration::from_millis(700));
    }
    // An agent reconnecting with its certificate gets through as well.
    let agent = &mut agents[0];
    agent.stop();
    cp.wait_status("dev-node", "disconnected");
    agent.start(&cp.url(), &[]);
    cp.wait_status("dev-node", "connected");
    let listed = cp.ctl(&["nodes", "get", "dev-node"]);
    assert_eq!(listed.code, 0, "nodes get after the reconnect: {listed:?}");

    let renewed = flood.finish();
    assert!(renewed > 0, "the server closed none of the flood's sockets");
    let timed_out =
        cp.metric("hotswap_tls_connections_dropped_total{reason=\"client_hello_timeout\"}");
    assert!(
        timed_out >= (16 * cores) as f64,
        "the flood's sockets were not closed for want of a ClientHello ({timed_out})"
    );
}

/// The report of `module` on `node` (`nodes get -o json`).
fn module_on(cp: &ControlPlane, node: &str, module: &str) -> Option<serde_json::Value> {
    let node = cp.ctl(&["-o", "json", "nodes", "get", node]).json();
    node["modules"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == module)
        .cloned()
}

#[test]
fn agents_enforce_their_environment_s_min_signatures() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init_with_settings(
        dir.path(),
        concat!(
            "pipeline = [\"dev\", \"production\"]\n",
            "[environments.dev]\nstrategy = \"direct\"\n",
            "[environments.production]\nstrategy = \"direct\"\nmin_signatures = 2\n",
        ),
    );
    cp.start();
    let (k1, k2) = (key(dir.path(), "k1"), key(dir.path(), "k2"));
    for name in ["k1", "k2"] {
        let public = dir.path().join(format!("{name}.pub"));
        cp.ctl(&["keys", "trust", p(&public), "--name", name]).ok();
    }
    let agents = agents_in(&cp, dir.path(), &["dev", "production"]);
    // A production agent that trusts only k1, whatever the control plane says.
    let (token, fp) = cp.token(&[]);
    let mut pinned = Agent::new(dir.path(), "pinned-node");
    let k1_public = dir.path().join("k1.pub");
    pinned.enroll(
        &cp.url(),
        &token,
        &fp,
        &[
            "--label",
            "environment=production",
            "--trusted-key",
            p(&k1_public),
        ],
    );
    cp.wait_status("pinned-node", "connected");

    // Signed by k1 only. `nodes set-module` checks one signature, not the
    // environment's two; the agent is the last line.
    let single = pack(dir.path(), "app", "1.0.0", &k1);
    cp.ctl(&["module", "push", p(&single)]).ok();
    for node in ["dev-node", "production-node"] {
        let out = cp.ctl(&["nodes", "set-module", node, "app@1.0.0"]);
        assert_eq!(out.code, 0, "{node}: {out:?}");
    }
    eventually("app@1.0.0 active on the dev node", || {
        match module_on(&cp, "dev-node", "app") {
            Some(m) if m["version"] == "1.0.0" && m["phase"] == "running" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let refused = eventually(
        "app@1.0.0 refused on the production node",
        || match module_on(&cp, "production-node", "app") {
            Some(m) if m["phase"] == "failed" => Ok(m),
            other => Err(format!("{other:?}")),
        },
    );
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(
            "this node's environment requires valid signatures by 2 distinct trusted keys (min_signatures) and it has 1"
        ) && message.contains("\"k1\""),
        "{refused}"
    );
    assert_eq!(refused["failure_kind"], "release", "{refused}");
    assert_eq!(refused["version"], "", "nothing is active: {refused}");
    let production = &agents[1];
    assert!(
        !production
            .data_dir
            .join("artifacts/modules/app/1.0.0")
            .exists(),
        "nothing was unpacked"
    );

    // Signed by both: the production agent runs it; the agent pinned to k1
    // alone still counts one trusted signer and refuses.
    let double = pack(dir.path(), "app", "1.1.0", &k1);
    ctl_offline(&["module", "sign", p(&double), "--key", p(&k2)]).ok();
    cp.ctl(&["module", "push", p(&double)]).ok();
    for node in ["production-node", "pinned-node"] {
        cp.ctl(&["nodes", "set-module", node, "app@1.1.0"]).ok();
    }
    eventually(
        "app@1.1.0 active on the production node",
        || match module_on(&cp, "production-node", "app") {
            Some(m) if m["version"] == "1.1.0" && m["phase"] == "running" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let refused = eventually("app@1.1.0 refused on the pinned node", || {
        match module_on(&cp, "pinned-node", "app") {
            Some(m) if m["phase"] == "failed" => Ok(m),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(
        refused["message"].as_str().is_some_and(|m| m
            .contains("requires valid signatures by 2 distinct trusted keys")
            && m.contains("it has 1")),
        "{refused}"
    );
}

#[test]
fn operators_are_rate_limited_per_identity_with_a_retry_hint_and_an_audit_record() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init_with_settings(
        dir.path(),
        "deployments_per_minute = 1\ndeployments_burst = 2\n",
    );
    cp.start();
    // Deployments of a module nobody pushed: each call is refused by the
    // handler (exit 1, not found), but each is a deployment started.
    let deploy = |profile: &Path| {
        cp.ctl_with_profile(
            profile,
            &["deploy", "create", "ghost@1.0.0", "--env", "dev"],
        )
    };
    let admin = cp.admin_profile();
    for _ in 0..2 {
        let out = deploy(&admin);
        assert_eq!(out.code, 1, "{out:?}");
        assert!(out.stderr.contains("not found"), "{out:?}");
    }
    let limited = deploy(&admin);
    assert_eq!(limited.code, 1, "{limited:?}");
    assert!(
        limited.stderr.contains(
            "rate limited: admin made more than 1 deployments per minute (deployments_per_minute); retry in "
        ),
        "{limited:?}"
    );
    // Another operator has a budget of its own.
    let bob = cp.user_profile("bob", "deployer");
    let out = deploy(&bob);
    assert!(
        out.stderr.contains("not found"),
        "bob is not limited by admin's calls: {out:?}"
    );
    // Reads are not limited.
    assert_eq!(cp.ctl(&["deploy", "list"]).code, 0);
    let audit = cp.ctl(&["-o", "json", "audit", "list", "--result", "rate_limited"]);
    assert_eq!(audit.code, 0, "{audit:?}");
    let limited_records = audit.json().as_array().cloned().unwrap_or_default();
    assert_eq!(limited_records.len(), 1, "{}", audit.stdout);
    assert_eq!(limited_records[0]["action"], "deploy.create");
    assert_eq!(limited_records[0]["user"], "admin");
}

/// A profile holding `cert_pem`/`key_pem` with `ca_pem` as its CA, written
/// under `dir` as `name`.
fn profile_with(
    dir: &Path,
    name: &str,
    endpoint: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> PathBuf {
    let profile = Profile {
        endpoint: endpoint.to_string(),
        ca_cert: ca_pem.to_string(),
        client_cert: cert_pem.to_string(),
        client_key: key_pem.to_string(),
    };
    let path = dir.join(name);
    profile.save(&path).expect("save profile");
    path
}

/// Expired, not yet valid and foreign-CA client certificates: exit 5 with a
/// message naming the profile and what to do, not exit 1 with "broken
/// pipe" or "DecryptError" from the TLS handshake.
#[test]
fn unusable_client_certificates_exit_5_naming_the_profile() {
    use hotswap_common::pki::{CertificateAuthority, Principal};
    use std::time::SystemTime;
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let read = |f: &str| std::fs::read_to_string(cp.data_dir.join(f)).expect("ca file");
    let ca = CertificateAuthority::from_pem(&read("ca.crt"), &read("ca.key")).expect("ca");
    let admin = Principal::User("admin".into());
    let day = Duration::from_secs(86_400);

    let expired = ca
        .issue_client_valid_between(
            &admin,
            SystemTime::now() - 30 * day,
            SystemTime::now() - day,
        )
        .expect("issue");
    let expired = profile_with(
        dir.path(),
        "expired.toml",
        &cp.url(),
        &read("ca.crt"),
        &expired.cert_pem,
        &expired.key_pem,
    );
    let out = cp.ctl_with_profile(&expired, &["nodes", "list"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(
        out.stderr.contains("your certificate expired at 20")
            && out.stderr.contains(p(&expired))
            && out.stderr.contains("users create"),
        "{out:?}"
    );

    let early = ca
        .issue_client_valid_between(
            &admin,
            SystemTime::now() + day,
            SystemTime::now() + 30 * day,
        )
        .expect("issue");
    let early = profile_with(
        dir.path(),
        "early.toml",
        &cp.url(),
        &read("ca.crt"),
        &early.cert_pem,
        &early.key_pem,
    );
    let out = cp.ctl_with_profile(&early, &["nodes", "list"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(
        out.stderr.contains("is not valid before") && out.stderr.contains(p(&early)),
        "{out:?}"
    );

    // Another control plane's admin certificate, with this one's CA.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).expect("dir");
    let other = ControlPlane::init(&other_dir);
    let other_admin = Profile::load(&other.admin_profile()).expect("profile");
    let foreign = profile_with(
        dir.path(),
        "foreign.toml",
        &cp.url(),
        &read("ca.crt"),
        &other_admin.client_cert,
        &other_admin.client_key,
    );
    let out = cp.ctl_with_profile(&foreign, &["nodes", "list"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(
        out.stderr.contains("not issued by") && out.stderr.contains(p(&foreign)),
        "{out:?}"
    );

    // The whole profile of another control plane: its CA does not vouch for
    // this server.
    let out = cp.ctl_with_profile(&other.admin_profile(), &["nodes", "list"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(
        out.stderr.contains(p(&other.admin_profile()))
            && out.stderr.contains("another control plane"),
        "{out:?}"
    );
    // The real admin profile still works.
    cp.ctl(&["nodes", "list"]).ok();
    cp.stop();
}

/// `users create --out` to a place that cannot be written created the user
/// and lost its only key. Now the key is on disk first, and nothing is
/// created when it cannot be.
#[test]
fn users_create_to_an_unwritable_destination_creates_no_user() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let out = cp.ctl(&[
        "users",
        "create",
        "bob",
        "--role",
        "viewer",
        "--out",
        "/nonexistent/bob.toml",
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("/nonexistent/bob.toml") && out.stderr.contains("no user was created"),
        "{out:?}"
    );
    let users = cp.ctl(&["-o", "json", "users", "list"]).json();
    assert!(
        users
            .as_array()
            .is_some_and(|u| u.iter().all(|user| user["name"] != "bob")),
        "bob was created: {users}"
    );
    // The same user into a writable place: created, the profile works,
    // and no temporary file is left beside it.
    let profiles = dir.path().join("profiles");
    std::fs::create_dir_all(&profiles).expect("dir");
    let path = profiles.join("bob.toml");
    cp.ctl(&[
        "users",
        "create",
        "bob",
        "--role",
        "viewer",
        "--out",
        p(&path),
    ])
    .ok();
    cp.ctl_with_profile(&path, &["nodes", "list"]).ok();
    let names: Vec<_> = std::fs::read_dir(&profiles)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, [std::ffi::OsString::from("bob.toml")]);
    cp.stop();
}

/// The forwarding headers replicas use (SPEC §7) make nobody else anyone
/// else: a viewer naming the admin in them is still a viewer. And a data
/// dir made before replicas had a certificate of their own (no
/// `replica.crt`) starts in the embedded mode as before.
#[test]
fn forwarding_headers_from_an_operator_are_ignored_and_old_data_dirs_start() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    for file in ["replica.crt", "replica.key"] {
        std::fs::remove_file(cp.data_dir.join(file)).expect("remove the replica certificate");
    }
    cp.start();
    let listed = cp.ctl(&["-o", "json", "deploy", "list"]);
    assert_eq!(listed.code, 0, "{listed:?}");
    assert!(
        !cp.log().contains("replica certificate"),
        "the embedded mode needs no replica certificate:\n{}",
        cp.log()
    );

    let viewer = cp.user_profile("vera", "viewer");
    let admin = Profile::load(&cp.admin_profile()).expect("admin profile");
    let admin_fingerprint =
        hotswap_common::pki::pem_fingerprint(&admin.client_cert).expect("fingerprint");
    let rt = runtime();
    let status = rt.block_on(async {
        let mut request = tonic::Request::new(pb::ControlDeploymentRequest {
            id: "d-none".into(),
            action: "approve".into(),
            reason: String::new(),
        });
        for (name, value) in [
            ("x-hotswap-on-behalf-of", "admin".to_string()),
            ("x-hotswap-on-behalf-of-cert", admin_fingerprint),
            ("x-hotswap-forwarded-by", "cp-x".to_string()),
        ] {
            request
                .metadata_mut()
                .insert(name, value.parse().expect("header value"));
        }
        pb::deployments_client::DeploymentsClient::new(channel_for(&viewer, &cp.url()))
            .control_deployment(request)
            .await
            .expect_err("a viewer cannot approve")
    });
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("user \"vera\" has role viewer"),
        "{status:?}"
    );
    let audit = cp
        .ctl(&["-o", "json", "audit", "list", "--action", "deploy.approve"])
        .json();
    assert_eq!(audit[0]["user"], "vera", "{audit}");
    assert_eq!(audit[0]["result"], "denied", "{audit}");
}

/// An agent whose enrollment committed but whose answer was lost sends the
/// same request again (same name, token and key): it gets the same node,
/// not "already enrolled", although the token's one use is spent, and the
/// certificate of that answer is the one the node connects with. Another
/// key under the name is refused, and so is the same request once the
/// node has connected.
#[test]
fn a_retried_enrollment_is_answered_with_the_node_it_created() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let (token, fp) = cp.token(&["--uses", "1"]);
    let pin = PinnedCa::new(hotswap_common::pki::parse_fingerprint(&fp).expect("fingerprint"));
    let url = ControlPlaneUrl::parse(&cp.url()).expect("url");
    let (csr_pem, key_pem) = hotswap_common::pki::generate_csr("retry").expect("csr");
    let (other_csr, _) = hotswap_common::pki::generate_csr("retry").expect("csr");
    let request = |csr_pem: &str| pb::EnrollRequest {
        join_token: token.clone(),
        csr_pem: csr_pem.to_string(),
        name: "retry".into(),
        labels: [("environment".to_string(), "dev".to_string())].into(),
        agent_version: "test".into(),
    };
    let enroll = |request: pb::EnrollRequest| {
        let (url, pin) = (url.clone(), pin.clone());
        runtime().block_on(async move {
            let config = tls::client_config(ServerTrust::Pinned(pin), None).expect("config");
            let channel = tls::connect(&url, config, &Default::default())
                .await
                .expect("connect");
            pb::enrollment_client::EnrollmentClient::new(channel)
                .enroll(request)
                .await
                .map(tonic::Response::into_inner)
        })
    };
    let first = enroll(request(&csr_pem)).expect("first attempt");
    let second = enroll(request(&csr_pem)).expect("the retry is answered");
    assert_eq!(second.node_id, first.node_id, "the node the first created");
    assert_eq!(second.labels, first.labels);
    let other = enroll(request(&other_csr)).expect_err("another key");
    assert_eq!(other.code(), Code::Unauthenticated, "{other:?}");
    assert!(other.message().contains("used up"), "{other:?}");
    assert_eq!(cp.nodes().len(), 1, "one node");

    let mut agent = Agent::new(dir.path(), "retry");
    hotswap_agent::identity::Identity {
        info: hotswap_agent::identity::NodeInfo {
            node_id: second.node_id.clone(),
            name: "retry".into(),
            labels: second.labels.clone().into_iter().collect(),
            control_plane: cp.url(),
        },
        cert_pem: second.certificate_pem.clone(),
        key_pem,
        ca_pem: second.ca_certificate_pem.clone(),
    }
    .save(&agent.data_dir)
    .expect("save identity");
    agent.start(&cp.url(), &[]);
    eventually(
        "the node connects with the retry's certificate",
        || match cp.node_status("retry").as_deref() {
            Some("connected") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let after = enroll(request(&csr_pem)).expect_err("no retry once connected");
    assert_eq!(after.code(), Code::Unauthenticated, "{after:?}");
    agent.stop();
}
