//! `hotswapctl servers list|get` (SPEC §7) against a real control plane in
//! the embedded mode, where this process is the one replica: its name and
//! advertised endpoint from `run --name` and `--advertise`, leadership,
//! readiness and the agent sessions it holds; and `run` refusing a bad name
//! or URL before it starts.

use hotswap_tests::{Agent, ControlPlane, TestDir, eventually};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const NAME: &str = "cp-a";
const ADVERTISE: &str = "https://cp-a.example.test:7443";

fn servers(cp: &ControlPlane) -> Vec<Value> {
    match cp.ctl(&["-o", "json", "servers", "list"]).json() {
        Value::Array(servers) => servers,
        other => panic!("servers list is not an array: {other}"),
    }
}

fn time_of(value: &Value, field: &str) -> OffsetDateTime {
    let text = value[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string: {value}"));
    OffsetDateTime::parse(text, &Rfc3339)
        .unwrap_or_else(|e| panic!("{field} {text:?} is not RFC 3339: {e}"))
}

#[test]
fn servers_list_and_get_show_this_replica_with_its_sessions() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    let before_start = OffsetDateTime::now_utc();
    cp.start_with_args(&["--name", NAME, "--advertise", ADVERTISE]);

    let listed = servers(&cp);
    assert_eq!(
        listed.len(),
        1,
        "one replica in the embedded mode: {listed:?}"
    );
    let server = &listed[0];
    let mut keys: Vec<&str> = server
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "endpoint",
            "last_seen",
            "leader",
            "name",
            "ready",
            "sessions",
            "started_at"
        ],
        "{server}"
    );
    assert_eq!(server["name"], NAME);
    assert_eq!(server["endpoint"], ADVERTISE);
    assert_eq!(server["leader"], true);
    assert_eq!(server["ready"], true);
    assert_eq!(server["sessions"], 0);
    // RFC 3339 times: started when `run` began, seen now.
    let started_at = time_of(server, "started_at");
    let last_seen = time_of(server, "last_seen");
    assert!(
        started_at >= before_start - time::Duration::seconds(1) && started_at <= last_seen,
        "{server}"
    );

    // One agent connected: one session.
    let (token, fingerprint) = cp.token(&["--label", "environment=dev"]);
    let mut agent = Agent::new(dir.path(), "web-1");
    agent.enroll(&cp.url(), &token, &fingerprint, &[]);
    cp.wait_status("web-1", "connected");
    eventually(
        "the replica to count the agent's session",
        || match servers(&cp).first().map(|s| s["sessions"].clone()) {
            Some(sessions) if sessions == 1 => Ok(()),
            other => Err(format!("sessions is {other:?}")),
        },
    );

    let got = cp.ctl(&["-o", "json", "servers", "get", NAME]).json();
    assert_eq!(got["name"], NAME);
    assert_eq!(got["endpoint"], ADVERTISE);
    assert_eq!(got["leader"], true);
    assert_eq!(got["ready"], true);
    assert_eq!(got["sessions"], 1);
    assert_eq!(got["started_at"], server["started_at"]);

    // Tables for people.
    let table = cp.ctl(&["servers", "list"]);
    table.ok();
    for word in [
        "NAME", "ENDPOINT", "SESSIONS", NAME, ADVERTISE, "leader", "ready",
    ] {
        assert!(table.stdout.contains(word), "{word}: {}", table.stdout);
    }
    let one = cp.ctl(&["servers", "get", NAME]);
    one.ok();
    assert!(
        one.stdout.contains(&format!("name:       {NAME}")) && one.stdout.contains("sessions:   1"),
        "{}",
        one.stdout
    );

    // An unknown name: not found, exit 1 with one line saying so.
    let missing = cp.ctl(&["-o", "json", "servers", "get", "nope"]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(missing.stdout.is_empty(), "{missing:?}");
    assert_eq!(
        missing.stderr.trim_end(),
        "error: get server \"nope\": server \"nope\" not found; `hotswapctl servers list` shows the live replicas"
    );

    // The session ends with the agent.
    agent.stop();
    eventually(
        "the replica to drop the agent's session",
        || match servers(&cp).first().map(|s| s["sessions"].clone()) {
            Some(sessions) if sessions == 0 => Ok(()),
            other => Err(format!("sessions is {other:?}")),
        },
    );

    // Reading the replicas is a read: a viewer may.
    let viewer = cp.user_profile("vera", "viewer");
    let seen = cp.ctl_with_profile(&viewer, &["-o", "json", "servers", "list"]);
    assert_eq!(seen.json()[0]["name"], NAME);
    cp.stop();
}

#[test]
fn the_name_defaults_to_the_host_name_and_the_endpoint_to_the_bound_address() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let got = servers(&cp);
    let expected_name = hotswap_common::host::hostname().unwrap_or_else(|| "control-plane".into());
    assert_eq!(got[0]["name"], expected_name.as_str(), "{got:?}");
    // The harness listens on port 0: the endpoint names the port it got.
    assert_eq!(got[0]["endpoint"], cp.url().as_str(), "{got:?}");
    let by_name = cp
        .ctl(&["-o", "json", "servers", "get", &expected_name])
        .json();
    assert_eq!(by_name["endpoint"], got[0]["endpoint"]);
    cp.stop();
}

#[test]
fn a_bad_name_or_advertised_url_is_refused_before_start() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    for (args, expected) in [
        (
            &["--name", "bad name"][..],
            "error: --name: server name \"bad name\" is invalid: 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit",
        ),
        (
            &["--advertise", "http://cp-a:7443"][..],
            "error: --advertise \"http://cp-a:7443\" is not a URL clients can reach: ",
        ),
        (
            &["--advertise", "https://0.0.0.0:7443"][..],
            "an unspecified address is not one to connect to",
        ),
        (
            &["--name=-x", "--advertise", "cp-a:7443"][..],
            "error: --name: server name \"-x\" is invalid: 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit; --advertise \"cp-a:7443\" is not a URL clients can reach: give the whole URL, https://HOST:PORT",
        ),
    ] {
        let (status, log) = cp.start_refused(args);
        assert_eq!(status.code(), Some(1), "{args:?}: {log}");
        assert!(log.contains(expected), "{args:?}: {log}");
        // Refused before anything listens.
        assert!(!log.contains("control plane serving"), "{args:?}: {log}");
        assert!(
            !cp.data_dir.join("run/addresses.json").exists(),
            "{args:?}: addresses published"
        );
    }
    // The same data dir starts with good flags.
    cp.start_with_args(&["--name", NAME, "--advertise", ADVERTISE]);
    assert_eq!(servers(&cp)[0]["name"], NAME);
    cp.stop();
}
