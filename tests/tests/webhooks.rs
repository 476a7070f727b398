//! Webhooks end to end (SPEC §9): a real HTTP receiver (Python's
//! `http.server`) checks each delivery's HMAC and records it; deliveries
//! survive the receiver going away during a deployment and a control-plane
//! restart, arrive in sequence order, and a dead receiver delays nobody.
//! Bad input and a URL at the control plane's own ports are refused with
//! nothing changed.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use hotswap_tests::{
    ControlPlane, Fleet, TestDir, WEBHOOK_SECRET as SECRET, WebhookReceiver as Receiver,
    eventually, free_port,
};
use serde_json::Value;

/// `events -o json` prints JSON Lines: one event per line.
fn events(cp: &ControlPlane, args: &[&str]) -> Vec<Value> {
    let mut full = vec!["-o", "json", "events"];
    full.extend_from_slice(args);
    let out = cp.ctl(&full);
    out.ok();
    out.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The seqs of stored events whose kind is under `deployment.`, after `since`.
fn deployment_seqs(cp: &ControlPlane, since: u64) -> Vec<u64> {
    events(
        cp,
        &["--kind", "deployment.", "--since", &(since + 1).to_string()],
    )
    .iter()
    .filter_map(|e| e["seq"].as_u64())
    .collect()
}

fn newest_seq(cp: &ControlPlane) -> u64 {
    events(cp, &["--limit", "1"])
        .last()
        .and_then(|e| e["seq"].as_u64())
        .unwrap_or(0)
}

fn webhook(cp: &ControlPlane, id: &str) -> Value {
    let list = cp.ctl(&["-o", "json", "webhooks", "list"]).json();
    list.as_array()
        .expect("webhooks")
        .iter()
        .find(|w| w["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("webhook {id} not listed: {list}"))
}

/// `deduped` without consecutive repeats (at least once may repeat the
/// event whose acceptance a stop cut off).
fn deduped(seqs: &[u64]) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for s in seqs {
        if out.last() != Some(s) {
            out.push(*s);
        }
    }
    out
}

#[test]
fn deliveries_are_signed_in_order_and_survive_an_outage_and_a_restart() {
    let dir = TestDir::new();
    let (mut fleet, _) =
        Fleet::start_many_with_settings(&dir, "dev", &["a"], "webhook_backoff_max = \"1s\"\n");
    let mut receiver = Receiver::new(dir.path());
    receiver.start();
    let secret_file = dir.path().join("hook.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).expect("secret");
    let created = fleet
        .cp
        .ctl(&[
            "-o",
            "json",
            "webhooks",
            "create",
            "--url",
            &receiver.url(),
            "--kind",
            "deployment",
            "--secret-file",
            secret_file.to_str().expect("utf8"),
        ])
        .json();
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(created["kinds"], serde_json::json!(["deployment"]));
    assert_eq!(created["format"], "json");
    assert_eq!(created["signed"], true);
    assert!(created.get("secret").is_none(), "the secret is never shown");
    // A receiver that accepts connections and never answers.
    let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("http://{}/hook", dead.local_addr().expect("addr"));
    let dead_hook = fleet
        .cp
        .ctl(&["-o", "json", "webhooks", "create", "--url", &dead_url])
        .json();
    let dead_id = dead_hook["id"].as_str().expect("id").to_string();
    let start = newest_seq(&fleet.cp);

    // `webhooks test` is one signed delivery, answered at once.
    let tested = fleet
        .cp
        .ctl(&["-o", "json", "webhooks", "test", &id])
        .json();
    assert_eq!(tested["delivered"], true, "{tested}");
    assert_eq!(tested["status"], 200);
    let test_delivery = receiver.deliveries();
    assert_eq!(test_delivery.len(), 1, "{test_delivery:?}");
    assert_eq!(test_delivery[0]["kind"], "webhook.test");
    assert_eq!(test_delivery[0]["signature_ok"], true);
    let refused = fleet.cp.ctl(&["webhooks", "test", &dead_id]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("timed out"), "{refused:?}");

    // A first deployment: every deployment event arrives, signed, in
    // order, while the dead receiver's task is stuck on its first event.
    fleet.push_hello_per_node("1.0.0", "");
    fleet
        .cp
        .ctl(&["deploy", "create", "hello@1.0.0", "--env", "dev", "--wait"])
        .ok();
    let finished = Instant::now();
    let first = deployment_seqs(&fleet.cp, start);
    assert!(first.len() >= 3, "{first:?}");
    eventually("the first deployment's events at the receiver", || {
        let got = receiver.seqs();
        (got == first)
            .then_some(())
            .ok_or(format!("{got:?} != {first:?}"))
    });
    assert!(
        finished.elapsed() < Duration::from_secs(8),
        "the live receiver waited for the dead one ({:?}; an attempt there times out after 10s)",
        finished.elapsed()
    );
    for delivery in receiver.deliveries().iter().skip(1) {
        assert_eq!(delivery["signature_ok"], true, "{delivery}");
        assert_eq!(delivery["body"]["seq"], delivery["seq"], "{delivery}");
        assert_eq!(delivery["body"]["kind"], delivery["kind"], "{delivery}");
        assert!(
            delivery["body"]["kind"]
                .as_str()
                .is_some_and(|k| k.starts_with("deployment.")),
            "{delivery}"
        );
    }
    // The body is exactly the event as `events -o json` shows it.
    let shown = events(
        &fleet.cp,
        &["--since", &first[0].to_string(), "--limit", "1"],
    );
    assert_eq!(receiver.deliveries()[1]["body"], shown[0]);

    // The receiver goes away during the second deployment; the control
    // plane restarts; the receiver comes back.
    receiver.stop();
    fleet.push_hello_per_node("2.0.0", "");
    fleet
        .cp
        .ctl(&["deploy", "create", "hello@2.0.0", "--env", "dev", "--wait"])
        .ok();
    let pending = eventually("the outage to show in webhooks list", || {
        let hook = webhook(&fleet.cp, &id);
        (hook["backlog"].as_u64() > Some(0) && hook["last_error"].is_string())
            .then(|| hook.clone())
            .ok_or(hook.to_string())
    });
    assert_eq!(
        pending["last_delivered_seq"].as_u64(),
        first.last().copied(),
        "{pending}"
    );
    fleet.cp.stop();
    fleet.cp.start();
    receiver.start();
    let all = deployment_seqs(&fleet.cp, start);
    assert!(all.len() > first.len(), "{all:?}");
    eventually(
        "every deployment event at the receiver after the restart",
        || {
            let got = deduped(&receiver.seqs());
            (got == all)
                .then_some(())
                .ok_or(format!("{got:?} != {all:?}"))
        },
    );
    let seqs = receiver.seqs();
    assert!(
        seqs.windows(2).all(|w| w[0] <= w[1]),
        "out of order: {seqs:?}"
    );
    assert!(
        receiver
            .deliveries()
            .iter()
            .all(|d| d["signature_ok"] == true)
    );

    // `webhooks list`: last delivered seq, last error and backlog.
    let hook = eventually("the receiver's backlog to empty", || {
        let hook = webhook(&fleet.cp, &id);
        (hook["backlog"] == 0)
            .then(|| hook.clone())
            .ok_or(hook.to_string())
    });
    assert_eq!(hook["last_delivered_seq"].as_u64(), all.last().copied());
    assert!(
        hook["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot connect") || e.contains("refused")),
        "{hook}"
    );
    // Its attempts time out after 10s each.
    let dead_hook = eventually("the dead receiver's timeout in webhooks list", || {
        let hook = webhook(&fleet.cp, &dead_id);
        hook["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out"))
            .then(|| hook.clone())
            .ok_or(hook.to_string())
    });
    assert!(dead_hook["last_delivered_seq"].is_null(), "{dead_hook}");
    assert!(dead_hook["backlog"].as_u64() > Some(0), "{dead_hook}");
    let table = fleet.cp.ctl(&["webhooks", "list"]).ok().stdout.clone();
    assert!(
        table.contains("BACKLOG") && table.contains("LAST ERROR") && table.contains("timed"),
        "{table}"
    );

    // Metrics: deliveries since the restart, and the dead one's lag.
    let delivered = fleet.cp.metric(&format!(
        "hotswap_webhook_deliveries_total{{webhook=\"{id}\"}}"
    ));
    assert!(delivered >= 1.0, "{delivered}");
    let lag = fleet.cp.metric(&format!(
        "hotswap_webhook_lag_events{{webhook=\"{dead_id}\"}}"
    ));
    assert!(lag >= 1.0, "{lag}");

    // Deleted: gone from the list, nothing more delivered.
    fleet.cp.ctl(&["webhooks", "delete", &dead_id]).ok();
    let list = fleet.cp.ctl(&["-o", "json", "webhooks", "list"]).json();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    drop(dead);
}

#[test]
fn bad_input_and_the_control_plane_s_own_ports_are_refused_with_nothing_changed() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let grpc = cp.grpc.expect("grpc");
    let admin = cp.admin.expect("admin");
    let refusals: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--url".into(), "not a url".into()],
            "url \"not a url\"",
        ),
        (
            vec!["--url".into(), "ftp://example.com/".into()],
            "the scheme must be http or https",
        ),
        (
            vec![
                "--url".into(),
                "http://example.com/".into(),
                "--format".into(),
                "xml".into(),
            ],
            "format \"xml\" is not json or slack",
        ),
        (
            vec![
                "--url".into(),
                "http://example.com/".into(),
                "--secret-file".into(),
                dir.path().join("missing.secret").display().to_string(),
            ],
            "cannot read secret file",
        ),
        (
            vec![
                "--url".into(),
                "http://example.com/".into(),
                "--kind".into(),
                "Not A Kind".into(),
            ],
            "kind \"Not A Kind\"",
        ),
        (
            vec![
                "--url".into(),
                format!("https://127.0.0.1:{}/", grpc.port()),
            ],
            "own gRPC port",
        ),
        (
            vec![
                "--url".into(),
                format!("http://localhost:{}/metrics", admin.port()),
            ],
            "own admin port",
        ),
    ];
    for (args, expected) in refusals {
        let mut full: Vec<&str> = vec!["webhooks", "create"];
        full.extend(args.iter().map(String::as_str));
        let out = cp.ctl(&full);
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(out.stderr.contains(expected), "{args:?}: {}", out.stderr);
    }
    let list = cp.ctl(&["-o", "json", "webhooks", "list"]).json();
    assert_eq!(list, serde_json::json!([]), "nothing was created");
    assert_eq!(
        cp.ctl(&["webhooks", "delete", "wh-nope"]).code,
        1,
        "an unknown id"
    );
    // Admin only: a viewer cannot list (URLs can be credentials) or create.
    let viewer = cp.user_profile("vera", "viewer");
    assert_eq!(cp.ctl_with_profile(&viewer, &["webhooks", "list"]).code, 5);
    let out = cp.ctl_with_profile(
        &viewer,
        &["webhooks", "create", "--url", "http://example.com/"],
    );
    assert_eq!(out.code, 5, "{out:?}");
    let audit = cp
        .ctl(&["-o", "json", "audit", "list", "--action", "webhooks."])
        .json();
    let results: Vec<&str> = audit
        .as_array()
        .expect("audit")
        .iter()
        .filter_map(|r| r["result"].as_str())
        .collect();
    assert!(results.contains(&"denied"), "{audit}");
    assert!(results.contains(&"error"), "{audit}");
    cp.stop();
}

/// `curl` with the admin profile's CA, certificate and key against the
/// control plane's HTTP API; returns the status and the body as JSON.
fn api(cp: &ControlPlane, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let profile = hotswap_common::profile::Profile::load(&cp.admin_profile()).expect("profile");
    let dir = cp.data_dir.parent().expect("work dir").to_path_buf();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write credential");
        path
    };
    let ca = write("api-ca.pem", &profile.ca_cert);
    let cert = write("api-cert.pem", &profile.client_cert);
    let key = write("api-key.pem", &profile.client_key);
    let mut command = Command::new("curl");
    command
        .args(["--silent", "--show-error", "-X", method, "--cacert"])
        .arg(&ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key);
    if let Some(body) = body {
        command.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let out = command
        .args(["--write-out", "\n%{http_code}"])
        .arg(format!("{}/api/v1{path}", cp.url()))
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let status: u16 = status
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no status: {stdout}"));
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, json)
}

#[test]
fn the_http_api_creates_lists_tests_and_deletes_webhooks_through_the_same_service() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let grpc = cp.grpc.expect("grpc");
    let (status, error) = api(&cp, "POST", "/webhooks", Some(r#"{"url": "not a url"}"#));
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["code"], "invalid_argument", "{error}");
    let own = format!(r#"{{"url": "https://127.0.0.1:{}/"}}"#, grpc.port());
    let (status, error) = api(&cp, "POST", "/webhooks", Some(&own));
    assert_eq!(status, 400, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("own gRPC port")),
        "{error}"
    );
    let (status, error) = api(
        &cp,
        "POST",
        "/webhooks",
        Some(r#"{"url": "http://x/", "colour": 1}"#),
    );
    assert_eq!(status, 400, "{error}");
    let (_, list) = api(&cp, "GET", "/webhooks", None);
    assert_eq!(list, serde_json::json!([]), "nothing was created");

    // Nothing listens there: `test` answers 200 with what went wrong.
    let closed = free_port();
    let body = format!(
        r#"{{"url": "http://127.0.0.1:{closed}/hook", "kinds": ["deployment"], "secret": "s", "format": "slack"}}"#
    );
    let (status, created) = api(&cp, "POST", "/webhooks", Some(&body));
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["signed"], true);
    assert_eq!(created["format"], "slack");
    assert!(created.get("secret").is_none(), "{created}");
    let id = created["id"].as_str().expect("id").to_string();
    let (status, list) = api(&cp, "GET", "/webhooks", None);
    assert_eq!(status, 200);
    assert_eq!(list[0]["id"], id.as_str(), "{list}");
    assert_eq!(list[0]["backlog"], 0, "{list}");
    let (status, tested) = api(&cp, "POST", &format!("/webhooks/{id}/test"), None);
    assert_eq!(status, 200, "{tested}");
    assert_eq!(tested["delivered"], false, "{tested}");
    assert!(
        tested["error"]
            .as_str()
            .is_some_and(|e| e.contains("connect")),
        "{tested}"
    );
    let (status, _) = api(&cp, "DELETE", &format!("/webhooks/{id}"), None);
    assert_eq!(status, 200);
    let (status, _) = api(&cp, "DELETE", &format!("/webhooks/{id}"), None);
    assert_eq!(status, 404);
    let audit = cp
        .ctl(&["-o", "json", "audit", "list", "--action", "webhooks."])
        .json();
    let actions: Vec<&str> = audit
        .as_array()
        .expect("audit")
        .iter()
        .filter_map(|r| r["action"].as_str())
        .collect();
    for action in ["webhooks.create", "webhooks.test", "webhooks.delete"] {
        assert!(actions.contains(&action), "{action}: {actions:?}");
    }
    cp.stop();
}

#[test]
fn https_receivers_are_verified_against_the_system_roots_or_the_ca_file() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let (ca, ca_pems) =
        hotswap_common::pki::CertificateAuthority::generate("webhook receivers").expect("ca");
    let server = ca
        .issue_server(
            &["127.0.0.1".to_string(), "localhost".to_string()],
            Duration::from_secs(86_400),
        )
        .expect("server certificate");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let ca_file = write("receivers-ca.pem", &ca_pems.cert_pem);
    let mut receiver = Receiver::new(dir.path()).with_tls(
        write("receiver.crt", &server.cert_pem),
        write("receiver.key", &server.key_pem),
    );
    receiver.start();
    let secret = write("hook.secret", SECRET);
    let create = |extra: &[&str]| {
        let mut args = vec![
            "-o",
            "json",
            "webhooks",
            "create",
            "--secret-file",
            secret.to_str().expect("utf8"),
        ];
        args.extend_from_slice(extra);
        cp.ctl(&args)
    };
    let url = receiver.url();
    let pinned = create(&["--url", &url, "--ca-file", ca_file.to_str().expect("utf8")]).json();
    assert_eq!(pinned["custom_ca"], true, "{pinned}");
    let pinned_id = pinned["id"].as_str().expect("id");
    let tested = cp
        .ctl(&["-o", "json", "webhooks", "test", pinned_id])
        .json();
    assert_eq!(tested["delivered"], true, "{tested}");
    let delivered = receiver.deliveries();
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(delivered[0]["signature_ok"], true);

    // The same receiver against the system roots, which do not know its CA.
    let system = create(&["--url", &url]).json();
    let refused = cp.ctl(&["webhooks", "test", system["id"].as_str().expect("id")]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("certificate"), "{refused:?}");
    assert_eq!(receiver.deliveries().len(), 1, "nothing reached it");

    // A CA for plain HTTP, or a file that is no CA, is refused.
    let plain = create(&[
        "--url",
        "http://example.com/",
        "--ca-file",
        ca_file.to_str().expect("utf8"),
    ]);
    assert_eq!(plain.code, 1, "{plain:?}");
    assert!(
        plain.stderr.contains("only applies to an https"),
        "{plain:?}"
    );
    let junk = write("junk.pem", "not a certificate");
    let bad = create(&["--url", &url, "--ca-file", junk.to_str().expect("utf8")]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("ca file"), "{bad:?}");
    let list = cp.ctl(&["-o", "json", "webhooks", "list"]).json();
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    cp.stop();
}
