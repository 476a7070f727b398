//! `hotswapctl servers list|get` (SPEC §7) against a real control plane in
//! the embedded mode, where this process is the one replica: its name and
//! advertised endpoint from `run --name` and `--advertise`, leadership,
//! readiness and the agent sessions it holds; and `run` refusing a bad name
//! or URL before it starts. On a real 3-member etcd: three replicas, each
//! listing all three; a replica killed drops out once its lease expires and
//! comes back with its restart; a second replica under a live one's name is
//! refused.

use hotswap_tests::{Agent, ControlPlane, EtcdCluster, SeaweedS3, TestDir, eventually};
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

/// What `servers list -o json` on `cp` shows, by name, once it shows
/// exactly `expected` (name, endpoint, sessions), all ready, `leader`
/// leading and nobody else.
fn shows(
    cp: &ControlPlane,
    expected: &[(&str, String, u64)],
    leader: &str,
) -> Result<Vec<Value>, String> {
    let out = cp.ctl(&["-o", "json", "servers", "list"]);
    if out.code != 0 {
        return Err(out.stderr);
    }
    let Value::Array(listed) = out.json() else {
        return Err(format!("not an array: {}", out.stdout));
    };
    let got: Vec<(String, String, u64)> = listed
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                s["endpoint"].as_str().unwrap_or_default().to_string(),
                s["sessions"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    let want: Vec<(String, String, u64)> = expected
        .iter()
        .map(|(n, e, s)| (n.to_string(), e.clone(), *s))
        .collect();
    if got != want {
        return Err(format!("listed {got:?}, expected {want:?}"));
    }
    let leaders: Vec<&str> = listed
        .iter()
        .filter(|s| s["leader"] == true)
        .filter_map(|s| s["name"].as_str())
        .collect();
    if leaders != [leader] {
        return Err(format!("leaders {leaders:?}, expected {leader}"));
    }
    if let Some(unready) = listed.iter().find(|s| s["ready"] != true) {
        return Err(format!("not ready: {unready}"));
    }
    Ok(listed)
}

#[test]
fn on_etcd_every_replica_lists_every_live_replica() {
    let dir = TestDir::new();
    let etcd = EtcdCluster::start(3);
    let s3 = SeaweedS3::start("hotswap-servers");
    let mut a = ControlPlane::init_on_etcd(dir.path(), "cp-a", &etcd.endpoints(), &s3);
    let mut b = a.replica("cp-b");
    let mut c = a.replica("cp-c");
    a.start_replica();
    a.wait_serving();
    eventually("cp-a to lead", || {
        a.leads().then_some(()).ok_or_else(|| "not yet".to_string())
    });
    b.start_replica();
    c.start_replica();
    b.wait_serving();
    c.wait_serving();

    // One agent, connected to cp-b.
    let (token, fingerprint) = a.token(&[]);
    let mut agent = Agent::new(dir.path(), "n1");
    agent.enroll(&b.url(), &token, &fingerprint, &[]);
    a.wait_status("n1", "connected");

    let (ua, ub, uc) = (a.url(), b.url(), c.url());
    let all = [
        ("cp-a", ua.clone(), 0),
        ("cp-b", ub.clone(), 1),
        ("cp-c", uc.clone(), 0),
    ];
    let mut started_b = Value::Null;
    for cp in [&a, &b, &c] {
        let listed = eventually("every replica listed with its sessions", || {
            shows(cp, &all, "cp-a")
        });
        started_b = listed[1]["started_at"].clone();
    }

    // A peer by name, from another replica; an unknown name is not found.
    let got = a.ctl(&["-o", "json", "servers", "get", "cp-b"]).json();
    assert_eq!(got["endpoint"], ub.as_str(), "{got}");
    assert_eq!(got["leader"], false, "{got}");
    assert_eq!(got["sessions"], 1, "{got}");
    assert_eq!(got["started_at"], started_b, "{got}");
    let missing = c.ctl(&["-o", "json", "servers", "get", "nope"]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert_eq!(
        missing.stderr.trim_end(),
        "error: get server \"nope\": server \"nope\" not found; `hotswapctl servers list` shows the live replicas"
    );

    // A second replica under cp-b's name, elsewhere: refused, naming where
    // cp-b serves; the list is as it was.
    let mut twin = a.replica("cp-b-twin");
    twin.set_run_arg("--name", "cp-b");
    twin.set_run_arg("--advertise", "https://cp-b-twin.example.test:7443");
    let (status, log) = twin.start_replica_refused();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "another live replica is named \"cp-b\": it serves at {ub}. Start this one with another --name"
        )),
        "{log}"
    );
    assert!(!log.contains("control plane serving"), "{log}");
    shows(&a, &all, "cp-a").expect("unchanged by the refused start");

    // kill -9 of cp-c: it drops out once its lease expires.
    c.kill();
    let two = [("cp-a", ua.clone(), 0), ("cp-b", ub.clone(), 1)];
    for cp in [&a, &b] {
        eventually("cp-c gone from the list", || shows(cp, &two, "cp-a"));
    }
    // kill -9 of cp-b and a restart in place before its lease expired: it
    // takes its record over (same name and endpoint) and the agent comes
    // back to it.
    b.kill();
    b.start_replica();
    b.wait_serving();
    assert!(
        b.log().contains("took over this replica's record"),
        "{}",
        b.log()
    );
    // cp-c restarts too: all three again.
    c.start_replica();
    c.wait_serving();
    for cp in [&a, &b, &c] {
        let listed = eventually("every replica listed again", || shows(cp, &all, "cp-a"));
        assert_ne!(listed[1]["started_at"], started_b, "cp-b restarted");
    }

    // A graceful stop removes the record at once; another replica leads.
    a.stop();
    let rest = [("cp-b", ub.clone(), 1), ("cp-c", uc.clone(), 0)];
    let after = eventually("cp-a gone and a new leader listed", || {
        let listed = shows(&b, &rest, "cp-b").or_else(|_| shows(&b, &rest, "cp-c"))?;
        shows(
            &c,
            &rest,
            listed
                .iter()
                .find(|s| s["leader"] == true)
                .and_then(|s| s["name"].as_str())
                .unwrap_or_default(),
        )?;
        Ok(listed)
    });
    assert_eq!(after.len(), 2);
    agent.stop();
    b.stop();
    c.stop();
}
