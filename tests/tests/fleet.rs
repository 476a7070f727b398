//! End-to-end tests of enrollment, sessions and the fleet view, with the real
//! binaries on loopback.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use hotswap_tests::{Agent, ControlPlane, TestDir, binary, eventually, http_get};
use serde_json::Value;

fn started_control_plane(dir: &TestDir) -> ControlPlane {
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    cp
}

#[test]
fn agent_enrolls_and_appears_with_forced_labels() {
    let dir = TestDir::new();
    let cp = started_control_plane(&dir);
    let (token, fp) = cp.token(&["--label", "environment=dev", "--uses", "1"]);
    let mut agent = Agent::new(dir.path(), "web-1");
    // The token forces environment=dev over the agent's own claim.
    agent.enroll(
        &cp.url(),
        &token,
        &fp,
        &["--label", "zone=a", "--label", "environment=production"],
    );
    cp.wait_status("web-1", "connected");

    let node = cp.ctl(&["-o", "json", "nodes", "get", "web-1"]).json();
    assert_eq!(node["labels"]["environment"], "dev");
    assert_eq!(node["labels"]["zone"], "a");
    assert_eq!(node["id"], agent.node_id().as_str());
    assert!(node["last_seen"].is_string(), "last_seen set: {node}");
    assert_eq!(node["modules"], Value::Array(vec![]));
    // Same node by id prefix.
    let by_prefix = cp
        .ctl(&["-o", "json", "nodes", "get", &agent.node_id()[..8]])
        .json();
    assert_eq!(by_prefix["name"], "web-1");
    // Environment filter.
    let dev = cp
        .ctl(&["-o", "json", "nodes", "list", "--env", "dev"])
        .json();
    assert_eq!(dev.as_array().map(Vec::len), Some(1));
    let prod = cp
        .ctl(&["-o", "json", "nodes", "list", "--env", "production"])
        .json();
    assert_eq!(prod.as_array().map(Vec::len), Some(0));
    // Table output names the node.
    let table = cp.ctl(&["nodes", "list"]);
    assert_eq!(table.code, 0);
    assert!(
        table.stdout.contains("web-1") && table.stdout.contains("connected"),
        "{}",
        table.stdout
    );

    // Key files are private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(agent.data_dir.join("identity/node.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Admin endpoints of both daemons.
    let (code, metrics) = cp.admin_get("/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("hotswap_nodes{status=\"connected\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "hotswap_grpc_requests_total{method=\"/hotswap.v1.Enrollment/Enroll\",code=\"0\"} 1"
        ),
        "{metrics}"
    );
    assert_eq!(cp.admin_get("/healthz").0, 200);
    assert_eq!(cp.admin_get("/readyz").0, 200);
    let agent_admin = agent.admin();
    eventually("agent to be ready", || {
        match http_get(agent_admin, "/readyz").0 {
            200 => Ok(()),
            code => Err(format!("readyz {code}")),
        }
    });
    let (_, agent_metrics) = http_get(agent_admin, "/metrics");
    assert!(
        agent_metrics.contains("hotswap_agent_connected 1"),
        "{agent_metrics}"
    );
}

#[test]
fn used_up_token_cannot_enroll_a_second_node() {
    let dir = TestDir::new();
    let cp = started_control_plane(&dir);
    let (token, fp) = cp.token(&["--uses", "1"]);
    let mut first = Agent::new(dir.path(), "first");
    first.enroll(&cp.url(), &token, &fp, &[]);
    cp.wait_status("first", "connected");

    let mut second = Agent::new(dir.path(), "second");
    second.enroll(&cp.url(), &token, &fp, &[]);
    let (status, log) = second.wait_exit();
    assert!(!status.success(), "second enrollment must fail");
    assert!(
        log.contains("join token rejected: all 1 uses are used up"),
        "{log}"
    );
    assert!(
        !second.data_dir.join("identity/node.json").exists(),
        "no identity stored"
    );
    assert_eq!(cp.nodes().len(), 1);
}

#[test]
fn unknown_and_expired_tokens_are_fatal() {
    let dir = TestDir::new();
    let cp = started_control_plane(&dir);
    let (_, fp) = cp.token(&[]);

    let mut agent = Agent::new(dir.path(), "stranger");
    agent.enroll(&cp.url(), "hsj_not-a-token", &fp, &[]);
    let (status, log) = agent.wait_exit();
    assert!(!status.success());
    assert!(log.contains("join token rejected: unknown token"), "{log}");

    let token = cp
        .ctl(&["-o", "json", "tokens", "create", "--ttl", "1s"])
        .json();
    let expires_at = token["expires_at"]
        .as_str()
        .expect("expires_at")
        .to_string();
    let expires = time_of(&expires_at);
    eventually("the token to expire", || {
        if std::time::SystemTime::now() > expires {
            Ok(())
        } else {
            Err(format!("expires at {expires_at}"))
        }
    });
    let mut late = Agent::new(dir.path(), "late");
    late.enroll(&cp.url(), token["token"].as_str().expect("token"), &fp, &[]);
    let (status, log) = late.wait_exit();
    assert!(!status.success());
    assert!(log.contains("join token rejected: expired at"), "{log}");
    assert!(cp.nodes().is_empty());
}

fn time_of(rfc3339: &str) -> std::time::SystemTime {
    let parsed =
        time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("expires_at {rfc3339:?} is not RFC 3339: {e}"));
    std::time::SystemTime::from(parsed)
}

#[test]
fn wrong_ca_fingerprint_is_fatal_and_sends_nothing() {
    let dir = TestDir::new();
    let cp = started_control_plane(&dir);
    let (token, _) = cp.token(&[]);
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let mut agent = Agent::new(dir.path(), "pinned");
    agent.enroll(&cp.url(), &token, &wrong, &[]);
    let (status, log) = agent.wait_exit();
    assert!(!status.success());
    assert!(log.contains("CA fingerprint mismatch"), "{log}");
    // The token was never presented, so it is still usable.
    let (_, fp) = cp.token(&[]);
    let mut retry = Agent::new(dir.path(), "pinned-ok");
    retry.enroll(&cp.url(), &token, &fp, &[]);
    cp.wait_status("pinned-ok", "connected");
}

#[test]
fn certificate_is_reused_after_agent_restart() {
    let dir = TestDir::new();
    let cp = started_control_plane(&dir);
    let (token, fp) = cp.token(&[]);
    let mut agent = Agent::new(dir.path(), "steady");
    agent.enroll(&cp.url(), &token, &fp, &[]);
    cp.wait_status("steady", "connected");
    let id = agent.node_id();
    let cert = std::fs::read(agent.data_dir.join("identity/node.crt")).expect("cert");

    let status = agent.stop();
    assert!(status.success(), "agent exited with {status}");
    cp.wait_status("steady", "disconnected");

    // No token this time: the stored certificate is enough.
    agent.start(&cp.url(), &[]);
    cp.wait_status("steady", "connected");
    assert_eq!(agent.node_id(), id);
    assert_eq!(
        std::fs::read(agent.data_dir.join("identity/node.crt")).expect("cert"),
        cert
    );
    assert_eq!(cp.nodes().len(), 1);
}

#[test]
fn agent_without_identity_or_token_says_how_to_enroll() {
    let dir = TestDir::new();
    let cp = started_control_plane(&dir);
    let mut agent = Agent::new(dir.path(), "fresh");
    agent.start(&cp.url(), &[]);
    let (status, log) = agent.wait_exit();
    assert!(!status.success());
    assert!(
        log.contains("not enrolled yet: pass --join-token and --ca-fingerprint"),
        "{log}"
    );
}

#[test]
fn operator_api_refuses_node_certificates_with_exit_5() {
    let dir = TestDir::new();
    let cp = started_control_plane(&dir);
    let (token, fp) = cp.token(&[]);
    let mut agent = Agent::new(dir.path(), "sneaky");
    agent.enroll(&cp.url(), &token, &fp, &[]);
    cp.wait_status("sneaky", "connected");

    let profile = agent.node_profile(&cp.url());
    let out = cp.ctl_with_profile(&profile, &["nodes", "list"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(
        out.stderr.contains("permission denied") && out.stderr.contains("only call agent RPCs"),
        "{out:?}"
    );
    let out = cp.ctl_with_profile(&profile, &["tokens", "create"]);
    assert_eq!(out.code, 5, "{out:?}");
}

#[test]
fn operator_api_refuses_clients_without_a_certificate() {
    let dir = TestDir::new();
    let cp = started_control_plane(&dir);
    hotswap_common::install_crypto_provider();
    let ca = std::fs::read_to_string(cp.data_dir.join("ca.crt")).expect("ca");
    let url = hotswap_common::tls::ControlPlaneUrl::parse(&cp.url()).expect("url");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let status = runtime.block_on(async {
        let config =
            hotswap_common::tls::client_config(hotswap_common::tls::ServerTrust::Ca(ca), None)
                .expect("config");
        let channel = hotswap_common::tls::connect(&url, config, &Default::default())
            .await
            .expect("connect");
        let mut client = hotswap_common::pb::fleet_client::FleetClient::new(channel);
        client
            .list_nodes(hotswap_common::pb::ListNodesRequest::default())
            .await
            .expect_err("must be refused")
    });
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("requires a client certificate"),
        "{status:?}"
    );
}

#[test]
fn agents_reconnect_after_control_plane_kill_and_restart() {
    let dir = TestDir::new();
    let mut cp = started_control_plane(&dir);
    let (token, fp) = cp.token(&["--uses", "3"]);
    let mut agents: Vec<Agent> = ["a", "b", "c"]
        .iter()
        .map(|n| Agent::new(dir.path(), n))
        .collect();
    for agent in &mut agents {
        agent.enroll(&cp.url(), &token, &fp, &["--label", "environment=qa"]);
    }
    for agent in &agents {
        cp.wait_status(&agent.name, "connected");
    }

    cp.kill();
    cp.start();
    // Nodes, labels and the used token survive; every agent comes back by itself.
    for agent in &agents {
        cp.wait_status(&agent.name, "connected");
    }
    let nodes = cp.nodes();
    assert_eq!(nodes.len(), 3);
    assert!(
        nodes.iter().all(|n| n["labels"]["environment"] == "qa"),
        "{nodes:?}"
    );
    let mut extra = Agent::new(dir.path(), "d");
    extra.enroll(&cp.url(), &token, &fp, &[]);
    let (status, log) = extra.wait_exit();
    assert!(
        !status.success() && log.contains("used up"),
        "token use count survived the kill: {log}"
    );

    // A graceful stop ends sessions and exits cleanly; agents keep retrying.
    cp.stop();
    cp.start();
    for agent in &agents {
        cp.wait_status(&agent.name, "connected");
    }
    for agent in &mut agents {
        assert!(agent.is_running(), "agent {} gave up", agent.name);
    }
}

#[test]
fn disconnect_is_detected_on_stream_end_and_on_silence() {
    let dir = TestDir::new();
    let cp = started_control_plane(&dir);
    let (token, fp) = cp.token(&["--uses", "2"]);
    let mut killed = Agent::new(dir.path(), "killed");
    let mut frozen = Agent::new(dir.path(), "frozen");
    killed.enroll(&cp.url(), &token, &fp, &[]);
    frozen.enroll(&cp.url(), &token, &fp, &[]);
    cp.wait_status("killed", "connected");
    cp.wait_status("frozen", "connected");

    killed.kill();
    cp.wait_status("killed", "disconnected");

    // A stopped process keeps its TCP connection open but sends nothing:
    // the heartbeat grace period (2s in tests) must catch it.
    frozen.signal(libc::SIGSTOP);
    cp.wait_status("frozen", "disconnected");
    assert!(cp.log().contains("no heartbeat within"), "{}", cp.log());
    frozen.signal(libc::SIGCONT);
    cp.wait_status("frozen", "connected");
    assert_eq!(cp.node_status("killed").as_deref(), Some("disconnected"));
}

#[test]
fn nodes_watch_streams_snapshot_and_changes_as_json_lines() {
    let dir = TestDir::new();
    let cp = started_control_plane(&dir);
    let (token, fp) = cp.token(&["--uses", "2"]);
    let mut early = Agent::new(dir.path(), "early");
    early.enroll(&cp.url(), &token, &fp, &[]);
    cp.wait_status("early", "connected");

    let mut watch = Command::new(binary("hotswapctl"))
        .arg("--profile")
        .arg(cp.admin_profile())
        .args(["--endpoint", &cp.url(), "-o", "json", "nodes", "watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn watch");
    let stdout = watch.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(value) = serde_json::from_str(&line) {
                let _ = tx.send(value);
            }
        }
    });
    let mut seen = Vec::new();
    let mut expect = |what: &str, matches: &dyn Fn(&Value) -> bool| {
        eventually(what, || {
            while let Ok(update) = rx.try_recv() {
                seen.push(update);
            }
            match seen.iter().position(matches) {
                Some(i) => {
                    seen.drain(..=i);
                    Ok(())
                }
                None => Err(format!("updates so far: {seen:?}")),
            }
        })
    };
    expect("snapshot of early", &|u| {
        u["kind"] == "snapshot" && u["node"]["name"] == "early"
    });
    let mut late = Agent::new(dir.path(), "late");
    late.enroll(&cp.url(), &token, &fp, &[]);
    expect("late connected", &|u| {
        u["kind"] == "changed" && u["node"]["name"] == "late" && u["node"]["status"] == "connected"
    });
    late.stop();
    expect("late disconnected", &|u| {
        u["node"]["name"] == "late" && u["node"]["status"] == "disconnected"
    });
    let removed = cp.ctl(&["nodes", "remove", "late"]);
    assert_eq!(removed.code, 0, "{removed:?}");
    expect("late removed", &|u| {
        u["kind"] == "removed" && u["node"]["name"] == "late"
    });
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn removed_node_is_cut_off_and_cannot_come_back() {
    let dir = TestDir::new();
    let cp = started_control_plane(&dir);
    let (token, fp) = cp.token(&[]);
    let mut agent = Agent::new(dir.path(), "doomed");
    agent.enroll(&cp.url(), &token, &fp, &[]);
    cp.wait_status("doomed", "connected");

    let out = cp.ctl(&["nodes", "remove", "doomed"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("removed node doomed"), "{out:?}");
    let (status, log) = agent.wait_exit();
    assert!(!status.success());
    assert!(
        log.contains("refused this node") && log.contains("was removed"),
        "{log}"
    );
    assert!(cp.node_status("doomed").is_none());

    agent.start(&cp.url(), &[]);
    let (status, log) = agent.wait_exit();
    assert!(!status.success());
    assert!(log.contains("not enrolled (removed or unknown)"), "{log}");

    let missing = cp.ctl(&["nodes", "get", "doomed"]);
    assert_eq!(missing.code, 1);
    assert!(missing.stderr.contains("not found"), "{missing:?}");
}

#[test]
fn agent_sigterm_exits_cleanly_and_disconnects_at_once() {
    let dir = TestDir::new();
    let mut cp = started_control_plane(&dir);
    let (token, fp) = cp.token(&[]);
    let mut agent = Agent::new(dir.path(), "polite");
    agent.enroll(&cp.url(), &token, &fp, &[]);
    cp.wait_status("polite", "connected");
    let status = agent.stop();
    assert!(status.success(), "agent exited with {status}");
    cp.wait_status("polite", "disconnected");
    assert!(cp.log().contains("agent closed the stream"), "{}", cp.log());
    cp.stop();
}

/// Replicas (SPEC §7): an agent given several control plane addresses, as
/// a comma list or repeated flags, reaches the one that answers whichever
/// it tries first; so does `hotswapctl` with an `--endpoint` list or a
/// profile whose `endpoint` is a TOML array.
#[test]
fn agents_and_the_cli_fail_over_to_the_control_plane_that_answers() {
    let dir = TestDir::new();
    let cp = started_control_plane(&dir);
    let live = cp.url();
    // Nothing listens here: a replica that went away.
    let dead = format!("https://127.0.0.1:{}", hotswap_tests::free_port());
    let (token, fp) = cp.token(&["--label", "environment=dev", "--uses", "2"]);

    let mut listed = Agent::new(dir.path(), "web-1");
    listed.enroll(&format!("{dead},{live}"), &token, &fp, &[]);
    let mut repeated = Agent::new(dir.path(), "web-2");
    repeated.enroll(&dead, &token, &fp, &["--control-plane", &live]);
    cp.wait_status("web-1", "connected");
    cp.wait_status("web-2", "connected");

    // The CLI starts from a random endpoint: several calls try both orders.
    for _ in 0..6 {
        let output = cp
            .ctl_command(
                &cp.admin_profile(),
                &format!("{dead},{live}"),
                &["-o", "json", "nodes", "list"],
            )
            .output()
            .expect("run hotswapctl");
        let out = hotswap_tests::CtlOutput::of(output);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(out.json().as_array().map(Vec::len), Some(2));
    }

    let admin = std::fs::read_to_string(cp.admin_profile()).expect("admin profile");
    let listed_profile = dir.path().join("replicas.profile.toml");
    let endpoint_line = admin
        .lines()
        .find(|l| l.starts_with("endpoint"))
        .expect("endpoint line")
        .to_string();
    std::fs::write(
        &listed_profile,
        admin.replace(
            &endpoint_line,
            &format!("endpoint = [\"{dead}\", \"{live}\"]"),
        ),
    )
    .expect("write profile");
    for _ in 0..4 {
        let mut command = Command::new(binary("hotswapctl"));
        command
            .arg("--profile")
            .arg(&listed_profile)
            .args(["-o", "json", "nodes", "list"])
            .env("NO_COLOR", "1")
            .env_remove("HOTSWAP_ENDPOINT");
        let out = hotswap_tests::CtlOutput::of(command.output().expect("run hotswapctl"));
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(out.json().as_array().map(Vec::len), Some(2));
    }
}

/// `tokens create` without `--ttl` gets the control plane's
/// `token_default_ttl`; with it, what it asks for.
#[test]
fn tokens_live_for_the_configured_default_unless_asked_otherwise() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init_with_settings(dir.path(), "token_default_ttl = \"2h\"\n");
    cp.start();
    let around = |hours: u64| {
        let now = hotswap_common::timefmt::now_ms();
        let at = now + hours * 3_600_000;
        (
            hotswap_common::timefmt::rfc3339_from_ms(at - 60_000),
            hotswap_common::timefmt::rfc3339_from_ms(at + 60_000),
        )
    };
    let expires = |args: &[&str]| {
        let mut all = vec!["-o", "json", "tokens", "create"];
        all.extend_from_slice(args);
        cp.ctl(&all).json()["expires_at"]
            .as_str()
            .expect("expires_at")
            .to_string()
    };
    let (low, high) = around(2);
    let default = expires(&[]);
    assert!(
        low <= default && default <= high,
        "{default} not within {low}..{high}"
    );
    let (low, high) = around(5);
    let asked = expires(&["--ttl", "5h"]);
    assert!(
        low <= asked && asked <= high,
        "{asked} not within {low}..{high}"
    );
}
