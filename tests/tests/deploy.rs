//! Deployments end to end: every strategy against real agents and module
//! processes, failures caught by health and by canary analysis, controls,
//! approvals, and a control plane killed mid-rollout.

use hotswap_tests::{CANARY_LOAD_PER_SECOND, Fleet, Load, TestDir, eventually};
use serde_json::Value;

fn activations(fleet: &Fleet, version: &str) -> Vec<usize> {
    fleet
        .agents()
        .iter()
        .map(|a| {
            a.log()
                .matches(&format!("activating module=hello version={version}"))
                .count()
        })
        .collect()
}

#[test]
fn direct_deploy_waits_and_exits_0_with_json_lines() {
    let dir = TestDir::new();
    let (fleet, ports) = Fleet::start_many(&dir, "dev", &["a", "b"]);
    fleet.push_hello_per_node("1.0.0", "");
    let out = fleet.cp.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "hello@1.0.0",
        "--env",
        "dev",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let last = out.last_json_line();
    assert_eq!(last["state"], "succeeded", "{last}");
    assert_eq!(last["strategy"], "direct", "dev defaults to direct");
    assert_eq!(last["progress"]["healthy"], 2);
    for field in [
        "id",
        "module",
        "version",
        "environment",
        "nodes",
        "created_by",
        "created_at",
        "finished_at",
        "reason",
    ] {
        assert!(
            last.get(field).is_some(),
            "deployment JSON lacks {field}: {last}"
        );
    }
    for port in ports {
        let (code, body) = hotswap_tests::http_get(([127, 0, 0, 1], port).into(), "/");
        assert_eq!(
            (code, body.trim()),
            (200, "hello from 1.0.0"),
            "node on port {port}"
        );
    }
    let list = fleet.cp.ctl(&["-o", "json", "deploy", "list"]).json();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
}

#[test]
fn rolling_deploy_of_a_bad_version_rolls_back_only_touched_nodes() {
    let dir = TestDir::new();
    let (fleet, ports) = Fleet::start_many(&dir, "qa", &["a", "b", "c"]);
    fleet.push_hello_per_node("1.0.0", "");
    fleet.push_hello_per_node("2.0.0", "HELLO_UNHEALTHY = \"1\"");
    let out = fleet.cp.ctl(&[
        "deploy",
        "create",
        "hello@1.0.0",
        "--env",
        "qa",
        "--batch-size",
        "1",
        "--min-healthy-time",
        "1s",
        "--wait",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("succeeded"),
        "plain lines end in the final state: {}",
        out.stdout
    );

    let loads: Vec<Load> = ports.iter().map(|p| Load::start(*p)).collect();
    let out = fleet.cp.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "hello@2.0.0",
        "--env",
        "qa",
        "--batch-size",
        "1",
        "--min-healthy-time",
        "1s",
        "--wait",
    ]);
    assert_eq!(out.code, 3, "a rolled back deployment exits 3: {out:?}");
    let last = out.last_json_line();
    assert_eq!(last["state"], "rolled_back", "{last}");
    assert!(
        last["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("1 release failure(s)")),
        "{last}"
    );
    let a = last["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["node"] == "a"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        a["failure_kind"], "release",
        "an unhealthy new version is the release's fault: {a}"
    );
    let states: Vec<&str> = last["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["state"].as_str())
        .collect();
    assert_eq!(
        states.iter().filter(|s| **s == "waiting").count(),
        2,
        "later waves never touched: {states:?}"
    );
    for node in ["a", "b", "c"] {
        assert_eq!(
            fleet.version_on(node, "hello"),
            "1.0.0",
            "node {node} back on (or never left) 1.0.0"
        );
    }
    for load in loads {
        let stats = load.finish();
        assert!(
            stats.failures.is_empty(),
            "{:?}",
            &stats.failures[..stats.failures.len().min(5)]
        );
    }
    // Only the first node ever tried 2.0.0.
    assert_eq!(
        activations(&fleet, "2.0.0").iter().sum::<usize>(),
        1,
        "{:?}",
        activations(&fleet, "2.0.0")
    );
}

#[test]
fn blue_green_stages_everywhere_then_switches() {
    let dir = TestDir::new();
    let (fleet, _) = Fleet::start_many(&dir, "staging", &["a", "b"]);
    fleet.push_hello_per_node("1.0.0", "");
    fleet.push_hello_per_node("2.0.0", "");
    let out = fleet.cp.ctl(&[
        "deploy",
        "create",
        "hello@1.0.0",
        "--env",
        "staging",
        "--bake-time",
        "1s",
        "--wait",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let out = fleet.cp.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "hello@2.0.0",
        "--env",
        "staging",
        "--bake-time",
        "2s",
        "--wait",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let last = out.last_json_line();
    assert_eq!(last["strategy"], "blue-green");
    assert_eq!(last["state"], "succeeded");
    // Every node staged 2.0.0 before any switched.
    let staged: Vec<bool> = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|d| {
            d["nodes"].as_array().is_some_and(|ns| {
                ns.iter().all(|n| {
                    n["state"] == "staged" || n["state"] == "updating" || n["state"] == "healthy"
                })
            })
        })
        .collect();
    assert!(staged.contains(&true), "{}", out.stdout);
    for node in ["a", "b"] {
        assert_eq!(fleet.version_on(node, "hello"), "2.0.0");
    }
}

#[test]
fn canary_with_errors_is_caught_by_analysis_and_rolled_back() {
    let dir = TestDir::new();
    let (fleet, ports) = Fleet::start_many(&dir, "dev", &["a", "b", "c", "d"]);
    fleet.push_hello_per_node("1.0.0", "");
    fleet.push_hello_per_node("2.0.0", "HELLO_ERROR_RATE = \"0.5\"");
    let out = fleet
        .cp
        .ctl(&["deploy", "create", "hello@1.0.0", "--env", "dev", "--wait"]);
    assert_eq!(out.code, 0, "{out:?}");
    let loads: Vec<Load> = ports
        .iter()
        .map(|p| Load::paced(*p, CANARY_LOAD_PER_SECOND))
        .collect();
    let out = fleet.cp.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "hello@2.0.0",
        "--env",
        "dev",
        "--strategy",
        "canary",
        "--steps",
        "25,100",
        "--step-duration",
        "30s",
        "--analysis-warmup",
        "1s",
        "--wait",
        "--timeout",
        "120s",
    ]);
    for load in loads {
        let _ = load.finish();
    }
    assert_eq!(out.code, 3, "{out:?}");
    let last = out.last_json_line();
    assert_eq!(last["state"], "rolled_back", "{last}");
    assert!(
        last["reason"]
            .as_str()
            .is_some_and(|r| r.contains("canary analysis failed") && r.contains("error rate")),
        "{last}"
    );
    // The failing verdict ends the list (an inconclusive one may come
    // first, before the canary served enough requests).
    let verdicts = last["analysis"].as_array().cloned().unwrap_or_default();
    let verdict = verdicts.last().cloned().unwrap_or_default();
    assert_eq!(verdict["passed"], false, "{last}");
    assert_eq!(verdict["outcome"], "failed", "{last}");
    assert!(
        verdict["canary_requests"].as_f64() >= Some(50.0),
        "judged on at least the minimum sample: {verdict}"
    );
    assert!(
        verdict["canary_error_rate"]
            .as_f64()
            .is_some_and(|e| e > 0.2),
        "numbers recorded: {verdict}"
    );
    assert_eq!(
        verdict["baseline_error_rate"].as_f64(),
        Some(0.0),
        "{verdict}"
    );
    for node in ["a", "b", "c", "d"] {
        assert_eq!(fleet.version_on(node, "hello"), "1.0.0");
    }
}

#[test]
fn dry_run_controls_and_one_deployment_per_module_and_environment() {
    let dir = TestDir::new();
    let (fleet, _) = Fleet::start_many(&dir, "dev", &["a", "b", "c"]);
    fleet.push_hello_per_node("1.0.0", "");
    let plan = fleet
        .cp
        .ctl(&[
            "-o",
            "json",
            "deploy",
            "create",
            "hello@1.0.0",
            "--env",
            "dev",
            "--strategy",
            "rolling",
            "--batch-size",
            "2",
            "--dry-run",
        ])
        .json();
    assert_eq!(plan["waves"][0]["nodes"], serde_json::json!(["a", "b"]));
    assert_eq!(plan["waves"][1]["nodes"], serde_json::json!(["c"]));
    assert_eq!(
        fleet.cp.ctl(&["-o", "json", "deploy", "list"]).json(),
        serde_json::json!([]),
        "a dry run creates nothing"
    );

    let created = fleet
        .cp
        .ctl(&[
            "-o",
            "json",
            "deploy",
            "create",
            "hello@1.0.0",
            "--env",
            "dev",
            "--strategy",
            "canary",
            "--steps",
            "34,100",
            "--step-duration",
            "1s",
            "--manual-promote",
        ])
        .json();
    let id = created["id"].as_str().expect("id").to_string();
    let again = fleet
        .cp
        .ctl(&["deploy", "create", "hello@1.0.0", "--env", "dev"]);
    assert_eq!(again.code, 1);
    assert!(
        again.stderr.contains(&id),
        "the refusal names the active deployment: {again:?}"
    );
    let resume = fleet.cp.ctl(&["deploy", "resume", &id]);
    assert_eq!(resume.code, 1);
    assert!(
        resume
            .stderr
            .contains("cannot resume a deployment that is running"),
        "{resume:?}"
    );
    eventually("the canary to wait for promotion", || {
        let d = fleet.cp.ctl(&["-o", "json", "deploy", "get", &id]).json();
        if d["waiting_for"] == "deploy promote" {
            Ok(())
        } else {
            Err(format!("{d}"))
        }
    });
    let paused = fleet.cp.ctl(&["-o", "json", "deploy", "pause", &id]).json();
    assert_eq!(paused["state"], "paused");
    let promote = fleet.cp.ctl(&["deploy", "promote", &id]);
    assert_eq!(promote.code, 1, "{promote:?}");
    fleet.cp.ctl(&["deploy", "resume", &id]).ok();
    fleet.cp.ctl(&["deploy", "promote", &id]).ok();
    let watch = fleet.cp.ctl(&["deploy", "watch", &id, "--timeout", "60s"]);
    assert_eq!(watch.code, 0, "{watch:?}");
    let timeout = fleet.cp.ctl(&["deploy", "watch", "d-missing"]);
    assert_eq!(timeout.code, 1);
    assert!(timeout.stderr.contains("not found"), "{timeout:?}");
}

#[test]
fn production_needs_a_second_person_to_approve() {
    let dir = TestDir::new();
    let (fleet, _) = Fleet::start_many(&dir, "production", &["a", "b"]);
    fleet.push_hello_per_node("1.0.0", "");
    let dave = fleet.cp.user_profile("dave", "deployer");
    let alice = fleet.cp.user_profile("alice", "approver");
    let boss = fleet.cp.user_profile("boss", "admin");
    let create = |profile: &std::path::Path| {
        fleet.cp.ctl_with_profile(
            profile,
            &[
                "-o",
                "json",
                "deploy",
                "create",
                "hello@1.0.0",
                "--env",
                "production",
                "--steps",
                "50,100",
                "--step-duration",
                "1s",
            ],
        )
    };
    let created = create(&dave).json();
    assert_eq!(created["state"], "awaiting_approval");
    assert_eq!(created["created_by"], "dave");
    let id = created["id"].as_str().expect("id").to_string();

    // A deployer cannot approve at all, not even someone else's deployment.
    let denied = fleet
        .cp
        .ctl_with_profile(&dave, &["deploy", "approve", &id, "--reason", "mine"]);
    assert_eq!(denied.code, 5, "{denied:?}");
    assert!(
        denied.stderr.contains("has role deployer") && denied.stderr.contains("approver or admin"),
        "{denied:?}"
    );
    // The reason is optional (SPEC §6), and the event reads well without one.
    let approved = fleet
        .cp
        .ctl_with_profile(&alice, &["-o", "json", "deploy", "approve", &id]);
    assert_eq!(approved.code, 0, "{approved:?}");
    let watch = fleet
        .cp
        .ctl(&["-o", "json", "deploy", "watch", &id, "--timeout", "60s"]);
    assert_eq!(watch.code, 0, "{watch:?}");
    assert_eq!(watch.last_json_line()["approved_by"], "alice");
    let events = fleet.cp.ctl(&[
        "-o",
        "json",
        "events",
        "--deployment",
        &id,
        "--kind",
        "deployment.approved",
    ]);
    assert_eq!(events.code, 0, "{events:?}");
    let approvals: Vec<String> = events
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("event line"))
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(approvals, ["approved by alice"], "{events:?}");

    // An admin holds every role but is still bound by the two-person rule.
    let own = create(&boss).json();
    let own_id = own["id"].as_str().expect("id").to_string();
    let refused = fleet.cp.ctl_with_profile(
        &boss,
        &["deploy", "approve", &own_id, "--reason", "trust me"],
    );
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("cannot approve it") && refused.stderr.contains("two-person rule"),
        "{refused:?}"
    );
    let rejected = fleet.cp.ctl_with_profile(
        &alice,
        &[
            "-o",
            "json",
            "deploy",
            "reject",
            &own_id,
            "--reason",
            "no ticket",
        ],
    );
    assert_eq!(rejected.code, 0, "{rejected:?}");
    assert_eq!(rejected.json()["state"], "aborted");
    assert_eq!(rejected.json()["reason"], "rejected by alice: no ticket");

    // Each step is in the audit log with who did it and why it was refused.
    let audit = fleet
        .cp
        .ctl(&["-o", "json", "audit", "list", "--action", "deploy."])
        .json();
    let rows: Vec<(String, String, String)> = audit
        .as_array()
        .expect("array")
        .iter()
        .map(|r| {
            (
                r["user"].as_str().unwrap_or_default().to_string(),
                r["action"].as_str().unwrap_or_default().to_string(),
                r["result"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let expect = |user: &str, action: &str, result: &str| {
        assert!(
            rows.contains(&(user.into(), action.into(), result.into())),
            "{user} {action} {result} missing from {rows:?}"
        );
    };
    expect("dave", "deploy.create", "ok");
    expect("dave", "deploy.approve", "denied");
    expect("alice", "deploy.approve", "ok");
    expect("boss", "deploy.approve", "error");
    expect("alice", "deploy.reject", "ok");
}

#[test]
fn control_plane_killed_mid_rollout_resumes_without_swapping_twice() {
    let dir = TestDir::new();
    let (mut fleet, _) = Fleet::start_many(&dir, "qa", &["a", "b", "c"]);
    fleet.push_hello_per_node("1.0.0", "");
    let created = fleet
        .cp
        .ctl(&[
            "-o",
            "json",
            "deploy",
            "create",
            "hello@1.0.0",
            "--env",
            "qa",
            "--batch-size",
            "1",
            "--min-healthy-time",
            "2s",
        ])
        .json();
    let id = created["id"].as_str().expect("id").to_string();
    eventually("the first wave to be healthy", || {
        let d = fleet.cp.ctl(&["-o", "json", "deploy", "get", &id]).json();
        if d["progress"]["healthy"].as_u64() >= Some(1) {
            Ok(())
        } else {
            Err(format!("{d}"))
        }
    });
    fleet.cp.kill();
    fleet.cp.start();
    let watch = fleet
        .cp
        .ctl(&["-o", "json", "deploy", "watch", &id, "--timeout", "90s"]);
    assert_eq!(watch.code, 0, "{watch:?}");
    assert_eq!(watch.last_json_line()["progress"]["healthy"], 3);
    assert_eq!(
        activations(&fleet, "1.0.0"),
        vec![1, 1, 1],
        "every node swapped exactly once"
    );
}

#[test]
fn pipeline_promotes_stage_by_stage_stops_at_failure_and_late_joiners_catch_up() {
    let dir = TestDir::new();
    let (mut fleet, _) = Fleet::start_many(&dir, "dev", &["dev-1"]);
    fleet.add_node("qa-1", "qa");
    fleet.push_hello_per_node("1.0.0", "");
    fleet.push_hello_per_node("2.0.0", "HELLO_UNHEALTHY = \"1\"");

    let out = fleet.cp.ctl(&[
        "-o",
        "json",
        "pipeline",
        "run",
        "hello@1.0.0",
        "--to",
        "qa",
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let last = out.last_json_line();
    assert_eq!(last["state"], "succeeded", "{last}");
    let envs: Vec<&str> = last["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .filter_map(|s| s["environment"].as_str())
        .collect();
    assert_eq!(envs, ["dev", "qa"], "--to qa stops there");
    assert_eq!(fleet.version_on("dev-1", "hello"), "1.0.0");
    assert_eq!(fleet.version_on("qa-1", "hello"), "1.0.0");

    // A bad version fails in dev and never reaches qa.
    let out = fleet.cp.ctl(&[
        "-o",
        "json",
        "pipeline",
        "run",
        "hello@2.0.0",
        "--to",
        "qa",
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert_eq!(out.code, 3, "{out:?}");
    let last = out.last_json_line();
    assert_eq!(last["stages"][0]["state"], "failed", "{last}");
    assert_eq!(last["stages"][1]["state"], "waiting", "{last}");
    assert_eq!(fleet.version_on("qa-1", "hello"), "1.0.0");
    assert_eq!(
        fleet.version_on("dev-1", "hello"),
        "1.0.0",
        "rolled back in dev"
    );

    // A node joining dev now gets dev's current version by itself.
    fleet.add_node("dev-2", "dev");
    eventually("the late joiner to run dev's version", || {
        match fleet.version_on("dev-2", "hello").as_str() {
            "1.0.0" => Ok(()),
            other => Err(format!("dev-2 runs {other:?}")),
        }
    });
}

/// Issue 18, item 12: a known-bad version can be yanked (by whoever may
/// push, here a deployer), audited and announced; from then on deployments,
/// pipelines, `nodes set-module` and catch-up refuse it naming who yanked it
/// and why, and a canary of it that is running rolls back every node it
/// changed. Before, revoking the signing key was the only lever, which
/// blocked every version that key signed.
#[test]
fn a_yanked_version_is_refused_everywhere_and_its_running_canary_rolls_back() {
    let dir = TestDir::new();
    let (mut fleet, _) = Fleet::start_many(&dir, "dev", &["a", "b"]);
    fleet.push_hello_per_node("1.0.0", "");
    fleet.push_hello_per_node("2.0.0", "");
    let out = fleet
        .cp
        .ctl(&["deploy", "create", "hello@1.0.0", "--env", "dev", "--wait"]);
    assert_eq!(out.code, 0, "{out:?}");
    let dan = fleet.cp.user_profile("dan", "deployer");

    // A canary that waits for a promotion after its first step (one node).
    let created = fleet
        .cp
        .ctl(&[
            "-o",
            "json",
            "deploy",
            "create",
            "hello@2.0.0",
            "--env",
            "dev",
            "--strategy",
            "canary",
            "--steps",
            "50,100",
            "--manual-promote",
        ])
        .json();
    let id = created["id"].as_str().expect("id").to_string();
    eventually("the first canary node on 2.0.0", || {
        let on: Vec<String> = ["a", "b"]
            .iter()
            .map(|n| fleet.version_on(n, "hello"))
            .collect();
        if on.iter().any(|v| v == "2.0.0") {
            Ok(())
        } else {
            Err(format!("versions {on:?}"))
        }
    });

    let out = fleet.cp.ctl_with_profile(
        &dan,
        &[
            "module",
            "yank",
            "hello@2.0.0",
            "--reason",
            "corrupts the cache",
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        "yanked hello@2.0.0 (dan): corrupts the cache"
    );
    let rolled_back = eventually("the canary rolled back", || {
        let d = fleet.cp.ctl(&["-o", "json", "deploy", "get", &id]).json();
        if d["state"] == "rolled_back" {
            Ok(d)
        } else {
            Err(format!("{} ({})", d["state"], d["reason"]))
        }
    });
    assert_eq!(
        rolled_back["reason"], "version yanked by dan: corrupts the cache",
        "{rolled_back}"
    );
    for node in ["a", "b"] {
        assert_eq!(fleet.version_on(node, "hello"), "1.0.0", "{node}");
    }

    // Every way onto a node refuses it, naming the yank.
    let refusal = "hello@2.0.0 cannot be deployed: it was yanked by dan at ";
    for (what, out) in [
        (
            "deploy create",
            fleet
                .cp
                .ctl(&["deploy", "create", "hello@2.0.0", "--env", "dev"]),
        ),
        (
            "pipeline run",
            fleet
                .cp
                .ctl(&["pipeline", "run", "hello@2.0.0", "--to", "dev"]),
        ),
        (
            "nodes set-module",
            fleet.cp.ctl(&["nodes", "set-module", "a", "hello@2.0.0"]),
        ),
    ] {
        assert_eq!(out.code, 1, "{what}: {out:?}");
        assert!(
            out.stderr.contains(refusal) && out.stderr.contains(": corrupts the cache"),
            "{what}: {out:?}"
        );
    }

    // Listed with its reason; yanking twice or without a reason is refused.
    let module = fleet
        .cp
        .ctl(&["-o", "json", "module", "get", "hello"])
        .json();
    let yanked: Vec<(&str, &Value)> = module["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| (v["version"].as_str().unwrap_or_default(), &v["yanked"]))
        .collect();
    assert_eq!(yanked[0].0, "2.0.0");
    assert_eq!(
        (&yanked[0].1["by"], &yanked[0].1["reason"]),
        (&Value::from("dan"), &Value::from("corrupts the cache"))
    );
    assert_eq!(yanked[1], ("1.0.0", &Value::Null));
    let listed = fleet.cp.ctl(&["module", "list"]);
    assert!(
        listed.stdout.contains("2.0.0 (by dan: corrupts the cache)"),
        "{listed:?}"
    );
    let out = fleet.cp.ctl_with_profile(
        &dan,
        &["module", "yank", "hello@2.0.0", "--reason", "again"],
    );
    assert!(
        out.code == 1 && out.stderr.contains("already yanked"),
        "{out:?}"
    );
    let out = fleet
        .cp
        .ctl_with_profile(&dan, &["module", "yank", "hello@1.0.0", "--reason", " "]);
    assert!(
        out.code == 1 && out.stderr.contains("needs a reason"),
        "{out:?}"
    );
    let viewer = fleet.cp.user_profile("vera", "viewer");
    let out = fleet.cp.ctl_with_profile(
        &viewer,
        &["module", "yank", "hello@1.0.0", "--reason", "no"],
    );
    assert_eq!(out.code, 5, "a viewer cannot yank: {out:?}");

    // Audited and announced.
    let audit = fleet
        .cp
        .ctl(&["-o", "json", "audit", "list", "--action", "module.yank"])
        .json();
    let rows: Vec<(String, String, String)> = audit
        .as_array()
        .expect("array")
        .iter()
        .map(|r| {
            let field = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (field("user"), field("target"), field("result"))
        })
        .collect();
    for row in [
        ("dan", "hello@2.0.0", "ok"),
        ("vera", "hello@1.0.0", "denied"),
    ] {
        assert!(
            rows.contains(&(row.0.into(), row.1.into(), row.2.into())),
            "{row:?} in {rows:?}"
        );
    }
    let events = fleet
        .cp
        .ctl(&["-o", "json", "events", "--kind", "module.yanked"]);
    let events: Vec<Value> = events
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["module"], "hello");
    assert_eq!(events[0]["version"], "2.0.0");
    assert_eq!(
        events[0]["message"],
        "hello@2.0.0 yanked by dan: corrupts the cache"
    );

    // The environment's current version yanked: a node that joins later is
    // not caught up to it, and the event says why.
    let out = fleet.cp.ctl_with_profile(
        &dan,
        &["module", "yank", "hello@1.0.0", "--reason", "leaks memory"],
    );
    assert_eq!(out.code, 0, "{out:?}");
    fleet.add_node("c", "dev");
    let failed = eventually("catch-up of c refused", || {
        let out = fleet.cp.ctl(&[
            "-o",
            "json",
            "events",
            "--kind",
            "node.catch_up_failed",
            "--node",
            "c",
        ]);
        match out.stdout.lines().next() {
            Some(line) => Ok(serde_json::from_str::<Value>(line).expect("json line")),
            None => Err(format!("no event yet: {out:?}")),
        }
    });
    assert!(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.contains("it was yanked by dan at ")
                && m.ends_with(": leaks memory; deploy another version")),
        "{failed}"
    );
    assert_eq!(fleet.version_on("c", "hello"), "");

    // Unyanked, the version is deployable again.
    let out = fleet
        .cp
        .ctl_with_profile(&dan, &["module", "unyank", "hello@2.0.0"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), "hello@2.0.0 is deployable again");
    let out = fleet.cp.ctl(&["nodes", "set-module", "a", "hello@2.0.0"]);
    assert_eq!(out.code, 0, "{out:?}");
}
