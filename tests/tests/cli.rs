//! `hotswapctl` and daemon command-line behaviour: usage errors, missing
//! profiles, unreachable endpoints, init refusing to overwrite.

use std::process::Command;

use hotswap_tests::{ControlPlane, TestDir, binary};

fn ctl(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(binary("hotswapctl"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, stderr) = ctl(&["tokens", "create", "--ttl", "soon"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("invalid duration"), "{stderr}");
    let (code, _, stderr) = ctl(&["tokens", "create", "--label", "novalue"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not of the form key=value"), "{stderr}");
    let (code, _, _) = ctl(&["nodes", "frobnicate"]);
    assert_eq!(code, 2);
    let (code, _, _) = ctl(&["-o", "yaml", "nodes", "list"]);
    assert_eq!(code, 2);
}

#[test]
fn timeout_without_wait_is_a_usage_error() {
    for args in [
        &[
            "deploy",
            "create",
            "hello@1.0.0",
            "--env",
            "dev",
            "--timeout",
            "1m",
        ][..],
        &["pipeline", "run", "hello@1.0.0", "--timeout", "1m"][..],
    ] {
        let (code, _, stderr) = ctl(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(
            stderr.contains("the following required arguments were not provided")
                && stderr.contains("--wait"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn missing_profile_and_unreachable_endpoint_exit_1_with_one_line() {
    let dir = TestDir::new();
    let missing = dir.path().join("nope.toml");
    let (code, stdout, stderr) = ctl(&[
        "--profile",
        missing.to_str().expect("utf8"),
        "nodes",
        "list",
    ]);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(
        stderr.starts_with("error: cannot read profile") && stderr.trim_end().lines().count() == 1,
        "{stderr}"
    );

    let cp = ControlPlane::init(dir.path());
    // Nothing listens on the profile's port in this test (the control plane is not started).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let endpoint = format!("https://127.0.0.1:{port}");
    let profile = cp.admin_profile();
    let (code, _, stderr) = ctl(&[
        "--profile",
        profile.to_str().expect("utf8"),
        "--endpoint",
        &endpoint,
        "nodes",
        "list",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("cannot reach the control plane") && stderr.contains(&endpoint),
        "{stderr}"
    );
}

#[test]
fn control_plane_init_refuses_to_overwrite_and_run_needs_init() {
    let dir = TestDir::new();
    let cp = ControlPlane::init(dir.path());
    let output = Command::new(binary("hotswap-control-plane"))
        .args(["init", "--data-dir"])
        .arg(&cp.data_dir)
        .output()
        .expect("init again");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("refusing to overwrite"));

    let output = Command::new(binary("hotswap-control-plane"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("empty"))
        .output()
        .expect("run without init");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not initialized"));

    let bad_config = dir.path().join("bad.toml");
    std::fs::write(&bad_config, "heartbeat_interval = \"never\"\n").expect("write");
    let output = Command::new(binary("hotswap-control-plane"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&cp.data_dir)
        .arg("--config")
        .arg(&bad_config)
        .output()
        .expect("run with bad config");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("invalid duration"),
        "{stderr}"
    );
}

#[test]
fn agent_flag_problems_are_reported_together_before_anything_starts() {
    let dir = TestDir::new();
    let output = Command::new(binary("hotswap-agent"))
        .args(["run", "--data-dir"])
        .arg(dir.path().join("a"))
        .args([
            "--control-plane",
            "http://insecure:1",
            "--label",
            "bad",
            "--join-token",
            "t",
        ])
        .output()
        .expect("run agent");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not supported; use https://"), "{stderr}");
    assert!(stderr.contains("--label"), "{stderr}");
    assert!(
        stderr.contains("--join-token needs --ca-fingerprint"),
        "{stderr}"
    );
    assert!(!dir.path().join("a").exists(), "nothing created");
}
