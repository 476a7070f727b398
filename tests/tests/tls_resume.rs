//! TLS 1.3 session resumption (issue 21): agents resume their sessions after
//! a restart of the control plane with tickets sealed by keys kept in the
//! data directory, and what resumption skips (the certificate checks of a
//! full handshake) is still enforced: a removed node's resumed session is
//! refused. The control plane's `hotswap_tls_handshakes_total{kind}` tells
//! full handshakes from resumed ones.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use hotswap_common::pb;
use hotswap_common::profile::Profile;
use hotswap_common::tls::{self, ClientIdentity, ControlPlaneUrl, ServerTrust};
use hotswap_tests::{Agent, ControlPlane, TestDir, eventually, runtime};
use tonic::Code;

/// Handshakes of `kind` the running control plane completed (0 before the
/// first: the labelled series appears with it).
fn handshakes(cp: &ControlPlane, kind: &str) -> u64 {
    let (code, metrics) = cp.admin_get("/metrics");
    assert_eq!(code, 200, "{metrics}");
    let name = format!("hotswap_tls_handshakes_total{{kind=\"{kind}\"}}");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The TLS client config of a node's identity, kept by the test across
/// connections as the agent keeps its own: it holds the session tickets.
fn node_tls(agent: &Agent, cp: &ControlPlane) -> Arc<rustls::ClientConfig> {
    let profile = Profile::load(&agent.node_profile(&cp.url())).expect("node profile");
    tls::client_config(
        ServerTrust::Ca(profile.ca_cert.clone()),
        Some(ClientIdentity {
            cert_pem: &profile.client_cert,
            key_pem: &profile.client_key,
        }),
    )
    .expect("tls config")
}

/// A node call on a new connection: describing an artifact that does not
/// exist is NotFound for a node the control plane knows, and refused for
/// one it does not.
fn describe_on_new_connection(cp: &ControlPlane, config: &Arc<rustls::ClientConfig>) -> Code {
    let url = ControlPlaneUrl::parse(&cp.url()).expect("url");
    let config = config.clone();
    runtime().block_on(async move {
        let channel = tls::connect(&url, config, &Default::default())
            .await
            .expect("connect");
        let answer = pb::artifacts_client::ArtifactsClient::new(channel)
            .describe_artifact(pb::DescribeArtifactRequest {
                name: "no-such-module".into(),
                version: "1.0.0".into(),
            })
            .await;
        match answer {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        }
    })
}

fn enrolled(dir: &TestDir, settings: &str) -> (ControlPlane, Agent) {
    let mut cp = ControlPlane::init_with_settings(dir.path(), settings);
    cp.start();
    let (token, fp) = cp.token(&[]);
    let mut agent = Agent::new(dir.path(), "node-1");
    agent.enroll(&cp.url(), &token, &fp, &[]);
    cp.wait_status("node-1", "connected");
    (cp, agent)
}

fn tickets_file(dir: &Path) -> std::path::PathBuf {
    dir.join("cp").join("tls-tickets.json")
}

#[test]
fn an_agent_resumes_its_tls_session_after_a_restart_of_the_control_plane() {
    let dir = TestDir::new();
    let (mut cp, _agent) = enrolled(&dir, "");
    let tickets = tickets_file(dir.path());
    let mode = std::fs::metadata(&tickets)
        .unwrap_or_else(|e| panic!("{}: {e}", tickets.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "ticket keys are secrets");
    cp.kill();
    cp.start();
    // The agent reconnects on its own, resuming with the ticket the first
    // session received (sealed by the keys the restart kept).
    eventually("the agent's reconnect to be a resumed handshake", || {
        let resumed = handshakes(&cp, "resumed");
        (resumed >= 1)
            .then_some(())
            .ok_or(format!("{resumed} resumed handshakes"))
    });
    cp.wait_status("node-1", "connected");
}

#[test]
fn a_removed_node_cannot_resume_its_session() {
    let dir = TestDir::new();
    let (mut cp, mut agent) = enrolled(&dir, "");
    // The test speaks for the node itself from here.
    let node = node_tls(&agent, &cp);
    agent.stop();
    assert_eq!(describe_on_new_connection(&cp, &node), Code::NotFound);
    cp.kill();
    cp.start();
    assert_eq!(
        describe_on_new_connection(&cp, &node),
        Code::NotFound,
        "the node is known after the restart"
    );
    assert_eq!(
        handshakes(&cp, "resumed"),
        1,
        "that connection resumed the session of the one before the restart"
    );
    let removed = cp.ctl(&["nodes", "remove", "node-1"]);
    assert_eq!(removed.code, 0, "{removed:?}");
    assert_eq!(
        describe_on_new_connection(&cp, &node),
        Code::PermissionDenied,
        "a resumed session of a removed node is refused"
    );
    assert_eq!(
        handshakes(&cp, "resumed"),
        2,
        "the refused call came over a resumed session"
    );
}

#[test]
fn with_ticket_rotation_off_nobody_resumes() {
    let dir = TestDir::new();
    let (mut cp, mut agent) = enrolled(&dir, "tls_ticket_rotation = \"0s\"\n");
    assert!(!tickets_file(dir.path()).exists());
    let node = node_tls(&agent, &cp);
    agent.stop();
    for _ in 0..3 {
        assert_eq!(describe_on_new_connection(&cp, &node), Code::NotFound);
    }
    cp.kill();
    cp.start();
    assert_eq!(describe_on_new_connection(&cp, &node), Code::NotFound);
    assert_eq!(handshakes(&cp, "resumed"), 0);
    assert!(handshakes(&cp, "full") >= 1);
}
