//! The environment's current version (SPEC §6): nodes that were offline
//! when a deployment ran catch up when they return, through the same trust
//! checks as a deployment; `clusters get` shows the drift; a deployment of
//! an older version needs `--allow-downgrade`, which the audit log keeps.

use hotswap_tests::{Fleet, TestDir, eventually};
use serde_json::Value;

/// `deploy create MODULE@VERSION --env dev --wait`, asserting the exit code.
fn deploy(fleet: &Fleet, module: &str, extra: &[&str], code: i32) -> hotswap_tests::CtlOutput {
    let mut args = vec![
        "-o",
        "json",
        "deploy",
        "create",
        module,
        "--env",
        "dev",
        "--wait",
        "--timeout",
        "90s",
    ];
    args.extend_from_slice(extra);
    let out = fleet.cp.ctl(&args);
    assert_eq!(out.code, code, "{out:?}");
    out
}

/// `clusters get dev`'s `current` entry for hello: (version, drift).
fn current_hello(fleet: &Fleet) -> Option<(String, Vec<String>)> {
    let cluster = fleet
        .cp
        .ctl(&["-o", "json", "clusters", "get", "dev"])
        .json();
    let current = cluster["current"].as_array()?;
    let hello = current.iter().find(|c| c["module"] == "hello")?;
    let drift = hello["drift"]
        .as_array()?
        .iter()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    Some((hello["version"].as_str()?.to_string(), drift))
}

/// Events of `kind` about `node`.
fn events_about(fleet: &Fleet, kind: &str, node: &str) -> Vec<Value> {
    let out = fleet
        .cp
        .ctl(&["-o", "json", "events", "--kind", kind, "--node", node]);
    assert_eq!(out.code, 0, "{out:?}");
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A fleet of nodes a and b in dev on hello@1.0.0, with 1.1.0 pushed, and
/// b stopped; then 1.1.0 deployed to a alone.
fn fleet_with_b_away(dir: &TestDir) -> Fleet {
    let (mut fleet, _) = Fleet::start_many(dir, "dev", &["a", "b"]);
    fleet.push_hello_per_node("1.0.0", "");
    fleet.push_hello_per_node("1.1.0", "");
    deploy(&fleet, "hello@1.0.0", &[], 0);
    assert_eq!(
        current_hello(&fleet),
        Some(("1.0.0".to_string(), Vec::new())),
        "both nodes on the environment's current version"
    );

    let status = fleet.others[0].stop();
    assert!(status.success(), "agent b exited with {status}");
    fleet.cp.wait_status("b", "disconnected");
    let out = deploy(&fleet, "hello@1.1.0", &[], 0);
    let last = out.last_json_line();
    let nodes: Vec<&str> = last["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["node"].as_str())
        .collect();
    assert_eq!(nodes, ["a"], "only the connected node is a target: {last}");
    assert_eq!(
        current_hello(&fleet),
        Some(("1.1.0".to_string(), vec!["b".to_string()])),
        "b, away, drifts from the new current version"
    );
    fleet
}

#[test]
fn a_node_back_from_an_outage_catches_up_to_the_current_version() {
    let dir = TestDir::new();
    let mut fleet = fleet_with_b_away(&dir);
    // Nothing of it lives in memory: the current version is derived from
    // the stored deployments after a restart.
    fleet.cp.kill();
    fleet.cp.start();
    fleet.cp.wait_status("a", "connected");
    assert_eq!(
        current_hello(&fleet),
        Some(("1.1.0".to_string(), vec!["b".to_string()])),
        "the same current version and drift after a restart"
    );

    let url = fleet.cp.url();
    fleet.others[0].start(&url, &[]);
    fleet.cp.wait_status("b", "connected");
    eventually("b to catch up to 1.1.0", || {
        match fleet.version_on("b", "hello").as_str() {
            "1.1.0" => Ok(()),
            other => Err(format!("b runs {other:?}")),
        }
    });
    let caught_up = eventually("a node.caught_up event for b", || {
        match events_about(&fleet, "node.caught_up", "b").pop() {
            Some(e) => Ok(e),
            None => Err("no node.caught_up event yet".into()),
        }
    });
    assert_eq!(caught_up["module"], "hello", "{caught_up}");
    assert_eq!(caught_up["version"], "1.1.0", "{caught_up}");
    eventually("no drift once b runs it", || match current_hello(&fleet) {
        Some((version, drift)) if version == "1.1.0" && drift.is_empty() => Ok(()),
        other => Err(format!("current: {other:?}")),
    });
    assert!(
        events_about(&fleet, "node.catch_up_failed", "b").is_empty(),
        "nothing failed"
    );
    // The table shows the current version too.
    let table = fleet.cp.ctl(&["clusters", "get", "dev"]);
    assert_eq!(table.code, 0, "{table:?}");
    assert!(
        table.stdout.contains("CURRENT") && table.stdout.contains("1.1.0"),
        "{}",
        table.stdout
    );
}

#[test]
fn a_catch_up_to_a_version_no_longer_deployable_is_refused_and_the_node_left_alone() {
    let dir = TestDir::new();
    let mut fleet = fleet_with_b_away(&dir);
    fleet.cp.ctl(&["keys", "revoke", "publisher"]).ok();

    let url = fleet.cp.url();
    fleet.others[0].start(&url, &[]);
    fleet.cp.wait_status("b", "connected");
    let failed = eventually("a node.catch_up_failed event for b", || match events_about(
        &fleet,
        "node.catch_up_failed",
        "b",
    )
    .pop()
    {
        Some(e) => Ok(e),
        None => Err("no node.catch_up_failed event yet".into()),
    });
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("hello@1.1.0") && message.contains("revoked"),
        "the event says what and why: {failed}"
    );
    let node = fleet.cp.ctl(&["-o", "json", "nodes", "get", "b"]).json();
    let hello = node["modules"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == "hello"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (&hello["version"], &hello["desired_version"]),
        (&Value::from("1.0.0"), &Value::from("1.0.0")),
        "b is left on what it ran: {node}"
    );
    assert!(events_about(&fleet, "node.caught_up", "b").is_empty());
    assert_eq!(
        current_hello(&fleet),
        Some(("1.1.0".to_string(), vec!["b".to_string()])),
        "b still drifts"
    );
}

#[test]
fn a_downgrade_needs_allow_downgrade_and_is_audited() {
    let dir = TestDir::new();
    let (fleet, _) = Fleet::start_many(&dir, "dev", &["a"]);
    fleet.push_hello_per_node("1.0.0", "");
    fleet.push_hello_per_node("1.1.0", "");
    deploy(&fleet, "hello@1.1.0", &[], 0);

    let refused = deploy(&fleet, "hello@1.0.0", &[], 1);
    for needed in ["hello@1.0.0", "1.1.0", "--allow-downgrade"] {
        assert!(
            refused.stderr.contains(needed),
            "the refusal names {needed}: {refused:?}"
        );
    }
    let pipeline = fleet
        .cp
        .ctl(&["pipeline", "run", "hello@1.0.0", "--to", "dev"]);
    assert_eq!(pipeline.code, 1, "{pipeline:?}");
    assert!(
        pipeline.stderr.contains("1.1.0") && pipeline.stderr.contains("--allow-downgrade"),
        "{pipeline:?}"
    );
    assert_eq!(fleet.version_on("a", "hello"), "1.1.0", "nothing changed");

    deploy(&fleet, "hello@1.0.0", &["--allow-downgrade"], 0);
    assert_eq!(fleet.version_on("a", "hello"), "1.0.0");
    assert_eq!(
        current_hello(&fleet).map(|(v, _)| v).as_deref(),
        Some("1.0.0"),
        "the older version is the current one now"
    );

    let audit = fleet
        .cp
        .ctl(&["-o", "json", "audit", "list", "--action", "deploy.create"])
        .json();
    let rows: Vec<(String, String)> = audit
        .as_array()
        .expect("audit records")
        .iter()
        .map(|r| {
            (
                r["target"].as_str().unwrap_or_default().to_string(),
                r["result"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert!(
        rows.iter()
            .any(|(target, result)| target.contains("hello@1.0.0")
                && target.contains("--allow-downgrade")
                && result == "ok"),
        "the allowed downgrade is audited as such: {rows:?}"
    );
    assert!(
        rows.iter()
            .any(|(target, result)| target.contains("hello@1.0.0")
                && !target.contains("--allow-downgrade")
                && result == "error"),
        "the refused one too: {rows:?}"
    );
}
