//! Server certificate and CA rotation with the real binaries: agents and
//! operators keep working through each step, agents pick up the new CA with
//! their certificate renewal, and the old CA is refused once retired.

use std::path::Path;
use std::process::Command;

use hotswap_tests::{Agent, ControlPlane, CtlOutput, TestDir, binary, eventually};

fn offline(data_dir: &Path, args: &[&str]) -> CtlOutput {
    let output = Command::new(binary("hotswap-control-plane"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run hotswap-control-plane");
    CtlOutput {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("read")
}

#[test]
fn server_certificate_and_ca_rotate_without_losing_agents_or_operators() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init_with_settings(dir.path(), "node_cert_validity = \"12s\"\n");
    cp.start();
    let (token, fp) = cp.token(&[]);
    let mut agent = Agent::new(dir.path(), "node-1");
    agent.enroll(&cp.url(), &token, &fp, &[]);
    cp.wait_status("node-1", "connected");
    let ca_path = cp.data_dir.join("ca.crt");
    let old_ca = read(&ca_path);

    // Rotation runs offline: refused while the control plane holds the data dir.
    let busy = offline(&cp.data_dir, &["rotate-server-cert"]);
    assert_eq!(busy.code, 1, "{busy:?}");
    assert!(
        busy.stderr.contains("stop the control plane first"),
        "{busy:?}"
    );

    // 1. Server certificate.
    let server_before = read(&cp.data_dir.join("server.crt"));
    cp.stop();
    let rotated = offline(&cp.data_dir, &["rotate-server-cert", "--san", "cp.example"]);
    assert_eq!(rotated.code, 0, "{rotated:?}");
    assert!(rotated.stdout.contains("cp.example") && rotated.stdout.contains("127.0.0.1"));
    assert_ne!(read(&cp.data_dir.join("server.crt")), server_before);
    assert_eq!(read(&ca_path), old_ca, "the CA is unchanged");
    cp.start();
    cp.wait_status("node-1", "connected");
    assert_eq!(cp.ctl(&["nodes", "list"]).code, 0);

    // 2. CA rotation, step one: everything issued from now on comes from a
    // new CA; holders of the old one still connect.
    cp.stop();
    let started = offline(&cp.data_dir, &["rotate-ca"]);
    assert_eq!(started.code, 0, "{started:?}");
    let new_ca = read(&ca_path);
    assert_ne!(new_ca, old_ca);
    // The certificate replicas forward calls with is issued again, by the
    // new CA (a copy of this directory on another replica forwards with it).
    let replica_cert = read(&cp.data_dir.join("replica.crt"));
    hotswap_common::pki::check_certificate(
        &replica_cert,
        &new_ca,
        hotswap_common::timefmt::now_ms(),
    )
    .expect("replica.crt is issued by the new CA");
    let again = offline(&cp.data_dir, &["rotate-ca"]);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("already in progress"), "{again:?}");
    cp.start();
    cp.wait_status("node-1", "connected");
    assert_eq!(
        cp.ctl(&["nodes", "list"]).code,
        0,
        "old-CA admin profile still works"
    );
    let ops = cp.user_profile("ops", "admin");
    let (new_token, new_fp) = cp.token(&[]);
    assert_ne!(new_fp, fp, "tokens carry the new CA's fingerprint");
    let mut fresh = Agent::new(dir.path(), "node-2");
    fresh.enroll(&cp.url(), &new_token, &new_fp, &[]);
    cp.wait_status("node-2", "connected");

    // The first agent receives the new CA with its next renewal.
    let agent_ca = agent.data_dir.join("identity/ca.crt");
    eventually("node-1 to trust the new CA", || {
        if read(&agent_ca) == new_ca {
            Ok(())
        } else {
            Err("still on the old CA".into())
        }
    });
    // Wait until its certificate is one from the new CA as well: renewed
    // after the switch, i.e. a second renewal since the rotation.
    let cert_after_switch = read(&agent.data_dir.join("identity/node.crt"));
    eventually("node-1 to renew again", || {
        if read(&agent.data_dir.join("identity/node.crt")) != cert_after_switch {
            Ok(())
        } else {
            Err("not renewed yet".into())
        }
    });

    // Step two: the old CA is retired.
    cp.stop();
    let finished = offline(&cp.data_dir, &["finish-ca-rotation"]);
    assert_eq!(finished.code, 0, "{finished:?}");
    assert!(!cp.data_dir.join("ca-previous.crt").exists());
    cp.start();
    // The first admin's profile holds the old CA: from now on only profiles
    // issued during the rotation (like ops) work.
    eventually("both nodes back with new-CA certificates", || {
        let out = cp.ctl_with_profile(&ops, &["-o", "json", "nodes", "list"]);
        let nodes: serde_json::Value =
            serde_json::from_str(&out.stdout).map_err(|e| e.to_string())?;
        let connected = nodes.as_array().map_or(0, |n| {
            n.iter().filter(|n| n["status"] == "connected").count()
        });
        if connected == 2 {
            Ok(())
        } else {
            Err(format!("{connected} connected: {}", out.stderr))
        }
    });
    let old_admin = cp.ctl(&["nodes", "list"]);
    assert_ne!(
        old_admin.code, 0,
        "old-CA credentials are refused: {old_admin:?}"
    );
    let nothing = offline(&cp.data_dir, &["finish-ca-rotation"]);
    assert_eq!(nothing.code, 1);
}
