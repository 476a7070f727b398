//! The desired-state history and time travel (SPEC §9 "History"):
//! `history --env E --at TIME|--seq N`, `history diff`, and `deploy create
//! --from-history`, against real agents, across a control-plane restart.

use hotswap_common::timefmt::{now_ms, rfc3339_from_ms};
use hotswap_tests::{Fleet, TestDir};
use serde_json::{Value, json};

fn deploy(fleet: &Fleet, version: &str) -> String {
    let out = fleet.cp.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        &format!("hello@{version}"),
        "--env",
        "dev",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let last = out.last_json_line();
    assert_eq!(last["state"], "succeeded", "{last}");
    last["id"].as_str().expect("id").to_string()
}

/// A moment strictly between two things the control plane timestamps.
fn pause_and_mark() -> String {
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let mark = rfc3339_from_ms(now_ms());
    std::thread::sleep(std::time::Duration::from_millis(1100));
    mark
}

fn hello_everywhere(version: &str) -> Value {
    json!([
        {"node": "a", "modules": [{"name": "hello", "version": version}]},
        {"node": "b", "modules": [{"name": "hello", "version": version}]},
    ])
}

fn check_history(fleet: &Fleet, between: &str, first: &str, second: &str) {
    let at = fleet
        .cp
        .ctl(&["-o", "json", "history", "--env", "dev", "--at", between]);
    assert_eq!(at.code, 0, "{at:?}");
    assert_eq!(
        at.json(),
        hello_everywhere("1.0.0"),
        "--at between shows the first"
    );

    let diff = fleet.cp.ctl(&[
        "-o", "json", "history", "diff", "--from", between, "--env", "dev",
    ]);
    assert_eq!(diff.code, 0, "{diff:?}");
    let rows = diff.json();
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 2, "one change per node: {rows:?}");
    for (row, node) in rows.iter().zip(["a", "b"]) {
        assert_eq!(row["node"], node, "{row}");
        assert_eq!(row["module"], "hello", "{row}");
        assert_eq!(row["from"], "1.0.0", "{row}");
        assert_eq!(row["to"], "2.0.0", "{row}");
        assert_eq!(row["deployment_id"], second, "{row}");
        assert_eq!(row["by"], "admin", "{row}");
        assert!(row["time"].is_string(), "{row}");
    }
    // Before the first deployment: its changes, with its id.
    let all = fleet
        .cp
        .ctl(&[
            "-o", "json", "history", "diff", "--from", "0", "--env", "dev",
        ])
        .json();
    let firsts: Vec<&Value> = all
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["deployment_id"] == first)
        .collect();
    assert_eq!(firsts.len(), 2, "{all}");
    assert!(
        firsts
            .iter()
            .all(|r| r["from"].is_null() && r["to"] == "1.0.0"),
        "{all}"
    );

    // A seq answers the same: just before the second deployment's first
    // change, everything ran 1.0.0; at its last, 2.0.0.
    let seqs: Vec<u64> = rows.iter().filter_map(|r| r["seq"].as_u64()).collect();
    let before = (seqs[0] - 1).to_string();
    let at_seq = fleet
        .cp
        .ctl(&["-o", "json", "history", "--env", "dev", "--seq", &before]);
    assert_eq!(at_seq.json(), hello_everywhere("1.0.0"), "{at_seq:?}");
    let last = seqs[1].to_string();
    let at_last = fleet
        .cp
        .ctl(&["-o", "json", "history", "--env", "dev", "--seq", &last]);
    assert_eq!(at_last.json(), hello_everywhere("2.0.0"), "{at_last:?}");
}

#[test]
fn history_answers_what_ran_when_and_who_changed_it_across_a_restart() {
    let dir = TestDir::new();
    let (mut fleet, _) = Fleet::start_many(&dir, "dev", &["a", "b"]);
    fleet.push_hello_per_node("1.0.0", "");
    fleet.push_hello_per_node("2.0.0", "");

    let first = deploy(&fleet, "1.0.0");
    let between = pause_and_mark();
    let second = deploy(&fleet, "2.0.0");

    check_history(&fleet, &between, &first, &second);
    fleet.cp.stop();
    fleet.cp.start();
    check_history(&fleet, &between, &first, &second);
    // The plan below needs the nodes' sessions back, not only the records.
    for node in ["a", "b"] {
        fleet.cp.wait_status(node, "connected");
    }

    // Bad input: a clear message, and SPEC §4's exit codes.
    let not_a_time = fleet
        .cp
        .ctl(&["history", "--env", "dev", "--at", "yesterday"]);
    assert_eq!(not_a_time.code, 2, "{not_a_time:?}");
    assert!(
        not_a_time.stderr.contains("invalid time \"yesterday\""),
        "{not_a_time:?}"
    );
    let both = fleet
        .cp
        .ctl(&["history", "--env", "dev", "--at", &between, "--seq", "3"]);
    assert_eq!(both.code, 2, "{both:?}");
    assert!(both.stderr.contains("cannot be used with"), "{both:?}");
    let neither = fleet.cp.ctl(&["history", "--env", "dev"]);
    assert_eq!(neither.code, 2, "{neither:?}");
    let unknown = fleet
        .cp
        .ctl(&["history", "--env", "moon", "--at", &between]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(
        unknown.stderr.contains("unknown environment \"moon\""),
        "{unknown:?}"
    );
    let bad_from = fleet.cp.ctl(&["history", "diff", "--from", "soon"]);
    assert_eq!(bad_from.code, 2, "{bad_from:?}");

    // Back to what ran then: a plan first, nothing changed ...
    let plan = fleet.cp.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "--from-history",
        &between,
        "--env",
        "dev",
    ]);
    assert_eq!(plan.code, 0, "{plan:?}");
    let plan = plan.json();
    assert_eq!(plan["executed"], false, "{plan}");
    assert_eq!(plan["steps"][0]["module"], "hello", "{plan}");
    assert_eq!(plan["steps"][0]["action"], "deploy", "{plan}");
    assert_eq!(plan["steps"][0]["version"], "1.0.0", "{plan}");
    assert_eq!(
        plan["steps"][0]["nodes"].as_array().map(Vec::len),
        Some(2),
        "{plan}"
    );
    assert!(plan["steps"][0]["plan"]["waves"].is_array(), "{plan}");
    let listed = fleet.cp.ctl(&["-o", "json", "deploy", "list"]).json();
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(2),
        "a plan creates nothing"
    );
    assert_eq!(fleet.version_on("a", "hello"), "2.0.0");

    // ... and with --yes the deployment that does it.
    let done = fleet.cp.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "--from-history",
        &between,
        "--env",
        "dev",
        "--yes",
    ]);
    assert_eq!(done.code, 0, "{done:?}");
    let done = done.json();
    assert_eq!(done["executed"], true, "{done}");
    let id = done["steps"][0]["deployment_id"]
        .as_str()
        .expect("a deployment id")
        .to_string();
    let watch = fleet
        .cp
        .ctl(&["-o", "json", "deploy", "watch", &id, "--timeout", "60s"]);
    assert_eq!(watch.code, 0, "{watch:?}");
    assert_eq!(fleet.version_on("a", "hello"), "1.0.0");
    assert_eq!(fleet.version_on("b", "hello"), "1.0.0");
}

/// The leader trims the history older than `history_retention`: a point
/// before the trim is refused with the reason, the present still answers.
#[test]
fn history_older_than_its_retention_is_trimmed_and_refused() {
    let dir = TestDir::new();
    let (fleet, _) =
        Fleet::start_many_with_settings(&dir, "dev", &["a", "b"], "history_retention = \"1m\"\n");
    fleet.push_hello_per_node("1.0.0", "");
    let before = rfc3339_from_ms(now_ms());
    deploy(&fleet, "1.0.0");
    let kept = fleet
        .cp
        .ctl(&["-o", "json", "history", "diff", "--from", &before]);
    assert_eq!(kept.json().as_array().map(Vec::len), Some(2), "{kept:?}");
    // The retention is a minute, the shortest the config takes: nothing can
    // be trimmed before it has passed. Then the next quarter-minute trim.
    let recorded = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_secs(60).saturating_sub(recorded.elapsed()));
    hotswap_tests::eventually("the history to be trimmed", || {
        let out = fleet.cp.ctl(&["history", "--env", "dev", "--at", &before]);
        match out.code {
            1 if out.stderr.contains("is no longer kept (history_retention)") => Ok(()),
            _ => Err(format!("{out:?}")),
        }
    });
    let now = fleet
        .cp
        .ctl(&["-o", "json", "history", "diff", "--from", "0"]);
    assert_eq!(now.code, 1, "seq 0 is before the trim too: {now:?}");
    let present = fleet.cp.ctl(&[
        "-o",
        "json",
        "history",
        "--env",
        "dev",
        "--at",
        &rfc3339_from_ms(now_ms()),
    ]);
    assert_eq!(present.code, 0, "{present:?}");
    assert_eq!(present.json(), hello_everywhere("1.0.0"));
}
