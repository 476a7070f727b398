//! SPEC §6 with real agents and real processes: a terminal state is the
//! truth on the nodes, idle canaries are not rolled back on noise, a node
//! out of disk space is an infrastructure failure that does not roll back a
//! good release, and a wait for `deploy promote` ends at its pause timeout.

use hotswap_tests::{
    CANARY_LOAD_PER_SECOND, Fleet, Load, SmallDisk, TestDir, can_mount, eventually,
};
use serde_json::Value;

/// `hello@version` on each node's `port` label, with `env` in its process
/// environment and the given start timeout.
fn push_hello(fleet: &Fleet, version: &str, env: &str, start_timeout: &str) {
    fleet.push_hello_per_node_starting(version, env, start_timeout);
}

fn deploy(fleet: &Fleet, target: &str, env: &str, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["-o", "json", "deploy", "create", target, "--env", env];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--wait", "--timeout", "120s"]);
    let out = fleet.cp.ctl(&args);
    let last = if out.stdout.trim().is_empty() {
        Value::Null
    } else {
        out.last_json_line()
    };
    (out.code, last)
}

/// Pids of live processes (zombies excluded) whose environment names
/// `HOTSWAP_MODULE=module` and `HOTSWAP_VERSION=version`, with a module
/// directory under `work` (this test's agents, not another test's).
fn processes_of(work: &std::path::Path, module: &str, version: &str) -> Vec<u32> {
    let want_module = format!("HOTSWAP_MODULE={module}");
    let want_version = format!("HOTSWAP_VERSION={version}");
    let want_dir = format!("HOTSWAP_MODULE_DIR={}", work.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            });
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
            alive
                && vars.contains(&want_module.as_bytes())
                && vars.contains(&want_version.as_bytes())
                && vars.iter().any(|v| v.starts_with(want_dir.as_bytes()))
        })
        .collect()
}

fn node_entry<'a>(deployment: &'a Value, node: &str) -> &'a Value {
    deployment["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["node"] == node))
        .unwrap_or(&Value::Null)
}

fn wait_all_on(fleet: &Fleet, names: &[&str], version: &str) {
    for name in names {
        eventually(&format!("{name} on hello@{version}"), || {
            match fleet.version_on(name, "hello").as_str() {
                v if v == version => Ok(()),
                other => Err(format!("{name} runs {other:?}")),
            }
        });
    }
}

#[test]
fn a_rolled_back_deployment_leaves_nothing_of_the_bad_version_serving() {
    let dir = TestDir::new();
    let (fleet, ports) = Fleet::start_many(&dir, "dev", &["a", "b"]);
    push_hello(&fleet, "1.0.0", "", "3s");
    let (code, last) = deploy(&fleet, "hello@1.0.0", "dev", &[]);
    assert_eq!(code, 0, "{last}");
    // The bad version's start timeout (30 s) outlasts the deployment's
    // health deadline (2 s): the machine gives up on it while the agents
    // are still inside its health gate.
    push_hello(&fleet, "2.0.0", "HELLO_UNHEALTHY = \"1\"", "30s");
    let loads: Vec<Load> = ports.iter().map(|p| Load::start(*p)).collect();
    // Watch for 2.0.0's processes while the deployment runs: the check
    // afterwards means something only if they existed.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (watching, work) = (watching.clone(), dir.path().to_path_buf());
        std::thread::spawn(move || {
            let mut seen = 0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                seen = seen.max(processes_of(&work, "hello", "2.0.0").len());
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            seen
        })
    };
    let (code, last) = deploy(&fleet, "hello@2.0.0", "dev", &["--health-deadline", "2s"]);
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().expect("watcher");
    assert!(seen > 0, "2.0.0 never ran: the test would prove nothing");
    assert_eq!(code, 3, "a rolled back deployment exits 3: {last}");
    assert_eq!(last["state"], "rolled_back", "{last}");
    // The moment --wait returned, no process of 2.0.0 is left on any node,
    // and every node answers from 1.0.0.
    let survivors = processes_of(dir.path(), "hello", "2.0.0");
    assert!(
        survivors.is_empty(),
        "2.0.0 still runs as {survivors:?} after the CLI said rolled_back"
    );
    for port in &ports {
        let (status, _) =
            hotswap_tests::http_get(format!("127.0.0.1:{port}").parse().expect("address"), "/");
        assert_eq!(status, 200);
    }
    for load in loads {
        let stats = load.finish();
        assert_eq!(
            stats.versions.last().map(String::as_str),
            Some("1.0.0"),
            "the last answers came from 1.0.0: {stats:?}"
        );
    }
    for name in ["a", "b"] {
        let node = fleet.cp.ctl(&["-o", "json", "nodes", "get", name]).json();
        let hello = node["modules"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == "hello"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(hello["version"], "1.0.0", "{name}: {hello}");
        assert_eq!(
            hello["settling"].as_array().map(Vec::len),
            Some(0),
            "{name}: nothing of 2.0.0 settles: {hello}"
        );
    }
}

#[test]
fn identical_idle_canaries_succeed_three_times_in_a_row() {
    let dir = TestDir::new();
    let (fleet, _) = Fleet::start_many(&dir, "qa", &["a", "b", "c"]);
    push_hello(&fleet, "1.0.0", "", "3s");
    let (code, last) = deploy(&fleet, "hello@1.0.0", "qa", &["--strategy", "direct"]);
    assert_eq!(code, 0, "{last}");
    for version in ["1.1.0", "1.2.0", "1.3.0"] {
        // The same build under a new version, with no traffic at all.
        push_hello(&fleet, version, "", "3s");
        let target = format!("hello@{version}");
        let (code, last) = deploy(
            &fleet,
            &target,
            "qa",
            &[
                "--strategy",
                "canary",
                "--steps",
                "34,100",
                "--step-duration",
                "1s",
                "--analysis-warmup",
                "0s",
            ],
        );
        assert_eq!(
            code, 0,
            "{version}: an idle identical canary succeeds: {last}"
        );
        let verdicts = last["analysis"].as_array().cloned().unwrap_or_default();
        assert!(
            !verdicts.is_empty(),
            "{version}: no verdict recorded: {last}"
        );
        for v in &verdicts {
            assert_ne!(v["outcome"], "failed", "{version}: {v}");
            assert!(
                v["summary"]
                    .as_str()
                    .is_some_and(|s| s.contains("sample: canary")),
                "{version}: a verdict without its sample sizes: {v}"
            );
        }
        // No traffic is no evidence: each step ends judged on health alone.
        let health_only: Vec<u64> = verdicts
            .iter()
            .filter(|v| v["outcome"] == "health_only")
            .filter_map(|v| v["step"].as_u64())
            .collect();
        assert_eq!(health_only, [1, 2], "{version}: {verdicts:?}");
    }
}

#[test]
fn a_canary_with_traffic_is_judged_on_its_sample() {
    let dir = TestDir::new();
    let (fleet, ports) = Fleet::start_many(&dir, "qa", &["a", "b"]);
    push_hello(&fleet, "1.0.0", "", "3s");
    assert_eq!(
        deploy(&fleet, "hello@1.0.0", "qa", &["--strategy", "direct"]).0,
        0
    );
    push_hello(&fleet, "1.1.0", "", "3s");
    let loads: Vec<Load> = ports
        .iter()
        .map(|p| Load::paced(*p, CANARY_LOAD_PER_SECOND))
        .collect();
    let (code, last) = deploy(
        &fleet,
        "hello@1.1.0",
        "qa",
        &[
            "--strategy",
            "canary",
            "--steps",
            "50,100",
            "--step-duration",
            "6s",
            "--analysis-warmup",
            "1s",
            "--analysis-min-requests",
            "20",
        ],
    );
    for load in loads {
        let stats = load.finish();
        assert!(stats.failures.is_empty(), "{:?}", stats.failures);
    }
    assert_eq!(code, 0, "{last}");
    // The new process's first metrics arrive a report or two after it
    // started: the step may be inconclusive first, but it ends on a real
    // verdict over both samples, never on health alone.
    let step_one: Vec<&Value> = last["analysis"]
        .as_array()
        .map(|vs| vs.iter().filter(|v| v["step"] == 1).collect())
        .unwrap_or_default();
    let verdict = step_one.last().copied().unwrap_or(&Value::Null);
    assert_eq!(
        verdict["outcome"], "passed",
        "judged on traffic: {step_one:?}"
    );
    assert!(
        verdict["canary_requests"].as_f64() >= Some(20.0)
            && verdict["baseline_requests"].as_f64() >= Some(20.0),
        "sample sizes recorded: {verdict}"
    );
    assert!(
        step_one
            .iter()
            .all(|v| v["outcome"] != "health_only" && v["outcome"] != "failed"),
        "{step_one:?}"
    );
}

#[test]
fn an_agent_out_of_disk_space_is_an_infrastructure_failure_not_a_rollback() {
    if !can_mount() {
        eprintln!(
            "SKIPPED: needs root to mount a small tmpfs for an agent's data directory (CI runs as root)"
        );
        return;
    }
    let dir = TestDir::new();
    // Node c's data directory (`<work>/agent-c`) is a small file system of
    // its own, mounted before it enrolls.
    let disk = SmallDisk::mount(&dir.path().join("agent-c"), "96m");
    let (fleet, _) = Fleet::start_many(&dir, "dev", &["a", "b", "c"]);
    push_hello(&fleet, "1.0.0", "", "3s");
    let (code, last) = deploy(&fleet, "hello@1.0.0", "dev", &[]);
    assert_eq!(code, 0, "{last}");
    let filler = disk.fill();
    push_hello(&fleet, "1.1.0", "", "3s");
    let (code, last) = deploy(&fleet, "hello@1.1.0", "dev", &["--health-deadline", "6s"]);
    assert_eq!(
        code, 0,
        "a full disk on one node does not fail a good release: {last}"
    );
    assert_eq!(last["state"], "succeeded", "{last}");
    let c = node_entry(&last, "c");
    assert_eq!(c["failure_kind"], "infrastructure", "{c}");
    assert!(
        last["reason"].as_str().is_some_and(
            |r| r.contains("1 infrastructure failure(s) not counted against the release: c")
        ),
        "{last}"
    );
    wait_all_on(&fleet, &["a", "b"], "1.1.0");
    assert_eq!(
        fleet.version_on("c", "hello"),
        "1.0.0",
        "c still serves what it had"
    );
    // Space back: the node gets there by itself (the agent retries).
    std::fs::remove_file(&filler).expect("free the disk");
    wait_all_on(&fleet, &["c"], "1.1.0");
    drop(fleet);
    drop(disk);
}

#[test]
fn a_manual_promote_canary_ends_at_its_pause_timeout_and_rolls_back() {
    let dir = TestDir::new();
    let (fleet, _) = Fleet::start_many(&dir, "qa", &["a", "b"]);
    push_hello(&fleet, "1.0.0", "", "3s");
    assert_eq!(
        deploy(&fleet, "hello@1.0.0", "qa", &["--strategy", "direct"]).0,
        0
    );
    push_hello(&fleet, "1.1.0", "", "3s");
    let (code, last) = deploy(
        &fleet,
        "hello@1.1.0",
        "qa",
        &[
            "--strategy",
            "canary",
            "--steps",
            "50,100",
            "--step-duration",
            "1s",
            "--manual-promote",
            "--analysis-min-requests",
            "0",
            "--pause-timeout",
            "3s",
        ],
    );
    assert_eq!(code, 3, "nobody promoted: {last}");
    assert_eq!(last["state"], "rolled_back", "{last}");
    assert_eq!(
        last["reason"], "waiting for deploy promote for longer than the 3s pause timeout",
        "{last}"
    );
    wait_all_on(&fleet, &["a", "b"], "1.0.0");
}

#[test]
fn a_pipeline_gives_up_on_an_environment_without_a_connected_node() {
    let dir = TestDir::new();
    let (mut fleet, _) = Fleet::start_many(&dir, "dev", &["d"]);
    fleet.add_node("q", "qa");
    // A short pipeline_wait_timeout for this control plane.
    fleet.cp.stop();
    let settings = dir.path().join("cp.toml");
    let mut text = std::fs::read_to_string(&settings).expect("settings");
    text.push_str("pipeline_wait_timeout = \"3s\"\n");
    std::fs::write(&settings, text).expect("settings");
    fleet.cp.start();
    fleet.cp.wait_status("d", "connected");
    push_hello(&fleet, "1.0.0", "", "3s");
    // qa's only node goes away.
    let q = fleet
        .others
        .iter_mut()
        .find(|a| a.name == "q")
        .expect("agent q");
    q.stop();
    fleet.cp.wait_status("q", "disconnected");
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
        "60s",
    ]);
    assert_eq!(
        out.code, 3,
        "the pipeline ends failed, not waiting forever: {out:?}"
    );
    let last = out.last_json_line();
    assert_eq!(last["state"], "failed", "{last}");
    assert_eq!(last["stages"][0]["state"], "succeeded", "{last}");
    assert_eq!(last["stages"][1]["state"], "failed", "{last}");
    assert_eq!(
        last["reason"], "stopped at qa: no connected node there for 3s (pipeline_wait_timeout)",
        "{last}"
    );
}
