//! Module runtimes on a real agent: process swaps under load, re-adoption
//! after `kill -9` of the agent, crash loops, bundle hooks, staging, and
//! manifests that cannot run on the node.

use hotswap_tests::{Fleet, Load, TestDir, eventually, free_port};

fn set_up(dir: &TestDir) -> (Fleet, u16) {
    let fleet = Fleet::start(dir, &["--label", "zone=a"]);
    (fleet, free_port())
}

#[test]
fn process_swaps_under_load_drop_no_request() {
    let dir = TestDir::new();
    let (fleet, port) = set_up(&dir);
    fleet.push_hello("1.0.0", port, "", "10s");
    fleet.push_hello("2.0.0", port, "", "10s");
    fleet.set("node-1", "hello@1.0.0", &[]);
    fleet.wait_running("hello", "1.0.0");

    let load = Load::start(port);
    fleet.set("node-1", "hello@2.0.0", &[]);
    let m = fleet.wait_running("hello", "2.0.0");
    assert_eq!(m["previous_version"], "1.0.0");
    fleet.set("node-1", "hello@1.0.0", &[]);
    fleet.wait_running("hello", "1.0.0");
    let stats = load.finish();
    assert!(
        stats.failures.is_empty(),
        "{} failed requests: {:?}",
        stats.failures.len(),
        &stats.failures[..stats.failures.len().min(5)]
    );
    assert!(stats.ok > 50, "load ran: {} requests", stats.ok);
    // During a start-first overlap both versions serve from the shared queue.
    assert_eq!(stats.versions.first().map(String::as_str), Some("1.0.0"));
    assert_eq!(stats.versions.last().map(String::as_str), Some("1.0.0"));
    assert!(
        stats.versions.iter().any(|v| v == "2.0.0"),
        "traffic reached 2.0.0: {:?}",
        stats.versions
    );

    // The same desired state again swaps nothing.
    let pids = fleet.agent.module_pids();
    fleet.set("node-1", "hello@1.0.0", &[]);
    fleet.wait_running("hello", "1.0.0");
    assert_eq!(
        fleet.agent.module_pids(),
        pids,
        "no restart for an unchanged desired state"
    );
}

#[test]
fn killed_agent_leaves_module_serving_and_readopts_it() {
    let dir = TestDir::new();
    let (mut fleet, port) = set_up(&dir);
    fleet.push_hello("1.0.0", port, "", "10s");
    fleet.push_hello("2.0.0", port, "", "10s");
    fleet.set("node-1", "hello@1.0.0", &[]);
    fleet.wait_running("hello", "1.0.0");
    let pids = fleet.agent.module_pids();

    let load = Load::start(port);
    fleet.agent.kill();
    let url = fleet.cp.url();
    fleet.cp.wait_status("node-1", "disconnected");
    fleet.agent.start(&url, &[]);
    fleet.cp.wait_status("node-1", "connected");
    fleet.wait_running("hello", "1.0.0");
    assert_eq!(
        fleet.agent.module_pids(),
        pids,
        "the same process was re-adopted, not restarted"
    );
    assert!(
        fleet.agent.log().contains("re-adopted running instance"),
        "{}",
        fleet.agent.log()
    );
    assert!(
        !fleet
            .agent
            .log()
            .contains("could not take the listener back"),
        "listener recovered with pidfd_getfd"
    );

    // The re-adopted listener still works for a later swap.
    fleet.set("node-1", "hello@2.0.0", &[]);
    fleet.wait_running("hello", "2.0.0");
    let stats = load.finish();
    assert!(
        stats.failures.is_empty(),
        "{} failed requests: {:?}",
        stats.failures.len(),
        &stats.failures[..stats.failures.len().min(5)]
    );
    assert_eq!(stats.versions.first().map(String::as_str), Some("1.0.0"));
    assert_eq!(stats.versions.last().map(String::as_str), Some("2.0.0"));
}

#[test]
fn unhealthy_new_version_is_reverted_without_dropping_requests() {
    let dir = TestDir::new();
    let (fleet, port) = set_up(&dir);
    fleet.push_hello("1.0.0", port, "", "10s");
    fleet.push_hello("2.0.0", port, "HELLO_UNHEALTHY = \"1\"", "2s");
    fleet.set("node-1", "hello@1.0.0", &[]);
    fleet.wait_running("hello", "1.0.0");

    let load = Load::start(port);
    fleet.set("node-1", "hello@2.0.0", &[]);
    let m = fleet.wait_module("hello", "the failed swap to be reported", |m| {
        m["phase"] == "failed"
    });
    assert_eq!(m["version"], "1.0.0", "the old version is the one running");
    assert!(
        m["message"]
            .as_str()
            .is_some_and(|t| t.contains("not healthy within") && t.contains("reverted to 1.0.0")),
        "{m}"
    );
    // Give the load a moment on the reverted version, then check it all.
    hotswap_tests::eventually("traffic on 1.0.0 after the revert", || {
        let m = fleet.module("hello").ok_or("no module")?;
        if m["health"] == "healthy" {
            Ok(())
        } else {
            Err(format!("{m}"))
        }
    });
    let stats = load.finish();
    assert!(
        stats.failures.is_empty(),
        "{:?}",
        &stats.failures[..stats.failures.len().min(5)]
    );
    assert_eq!(
        stats.versions.last().map(String::as_str),
        Some("1.0.0"),
        "{:?}",
        stats.versions
    );
    let pids = fleet.agent.module_pids();
    assert_eq!(pids.len(), 1, "one instance runs: {pids:?}");
}

#[test]
fn crash_loop_is_reported_unhealthy() {
    let dir = TestDir::new();
    let (fleet, port) = set_up(&dir);
    // Healthy long enough to pass its start gate, then exits again and again.
    fleet.push_hello("1.0.0", port, "HELLO_CRASH_AFTER_MS = \"700\"", "10s");
    fleet.set("node-1", "hello@1.0.0", &[]);
    let m = fleet.wait_module("hello", "a crash loop", |m| m["crash_loop"] == true);
    assert_eq!(m["health"], "unhealthy");
    assert_eq!(m["phase"], "failed");
    assert!(m["restarts"].as_u64().is_some_and(|r| r >= 3), "{m}");
    assert!(
        m["message"]
            .as_str()
            .is_some_and(|t| t.contains("exited unexpectedly")),
        "{m}"
    );
}

fn push_bundle(fleet: &Fleet, version: &str, fail: bool) {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bundle-config");
    fleet.push("greeting-config", version, |dir| {
        for sub in ["bin", "config"] {
            std::fs::create_dir_all(dir.join(sub)).expect("dir");
            for entry in std::fs::read_dir(example.join(sub))
                .expect("example")
                .flatten()
            {
                std::fs::copy(entry.path(), dir.join(sub).join(entry.file_name())).expect("copy");
            }
        }
        let manifest = std::fs::read_to_string(example.join("module.toml")).expect("manifest");
        std::fs::write(
            dir.join("module.toml"),
            manifest.replace("version = \"1.0.0\"", &format!("version = \"{version}\"")),
        )
        .expect("write");
        if fail {
            std::fs::write(dir.join("FAIL_ACTIVATE"), "").expect("marker");
        }
    });
}

#[test]
fn bundle_hook_failure_flips_back() {
    let dir = TestDir::new();
    let (fleet, _) = set_up(&dir);
    push_bundle(&fleet, "1.0.0", false);
    push_bundle(&fleet, "2.0.0", true);
    fleet.set("node-1", "greeting-config@1.0.0", &[]);
    fleet.wait_running("greeting-config", "1.0.0");
    let root = fleet
        .agent
        .data_dir
        .join("artifacts/modules/greeting-config");
    assert_eq!(
        std::fs::read_link(root.join("current"))
            .expect("current")
            .to_string_lossy(),
        "1.0.0"
    );

    fleet.set("node-1", "greeting-config@2.0.0", &[]);
    let m = fleet.wait_module("greeting-config", "the failed activation", |m| {
        m["phase"] == "failed"
    });
    assert_eq!(m["version"], "1.0.0");
    assert!(
        m["message"]
            .as_str()
            .is_some_and(|t| t.contains("flipped back to 1.0.0")),
        "{m}"
    );
    assert_eq!(
        std::fs::read_link(root.join("current"))
            .expect("current")
            .to_string_lossy(),
        "1.0.0",
        "current flipped back"
    );
    let log = std::fs::read_to_string(root.join("activations.log")).expect("hook log");
    assert!(
        log.contains("activated greeting-config 1.0.0 (previous: none) on node-1"),
        "{log}"
    );
    assert!(!log.contains("activated greeting-config 2.0.0"), "{log}");

    // Removing the module runs its deactivate hook.
    let out = fleet
        .cp
        .ctl(&["nodes", "unset-module", "node-1", "greeting-config"]);
    assert_eq!(out.code, 0, "{out:?}");
    hotswap_tests::eventually("deactivate hook run and current removed", || {
        let log = std::fs::read_to_string(root.join("activations.log")).unwrap_or_default();
        if log.contains("deactivated greeting-config 1.0.0") && !root.join("current").exists() {
            Ok(())
        } else {
            Err(log)
        }
    });
}

#[test]
fn staged_version_is_ready_before_the_switch() {
    let dir = TestDir::new();
    let (fleet, port) = set_up(&dir);
    fleet.push_hello("1.0.0", port, "", "10s");
    fleet.push_hello("2.0.0", port, "", "10s");
    fleet.set("node-1", "hello@1.0.0", &[]);
    fleet.wait_running("hello", "1.0.0");

    fleet.set("node-1", "hello@1.0.0", &["--stage", "2.0.0"]);
    let m = fleet.wait_module("hello", "2.0.0 staged", |m| m["staged_version"] == "2.0.0");
    assert_eq!(m["version"], "1.0.0", "staging does not activate");
    assert!(
        fleet
            .agent
            .data_dir
            .join("artifacts/modules/hello/2.0.0/bin/hello-server")
            .exists(),
        "unpacked"
    );

    let load = Load::start(port);
    fleet.set("node-1", "hello@2.0.0", &[]);
    let m = fleet.wait_running("hello", "2.0.0");
    assert_eq!(
        m["staged_version"], "",
        "staged version became the active one"
    );
    assert_eq!(
        m["previous_version"], "1.0.0",
        "previous kept ready for an instant switch back"
    );
    let stats = load.finish();
    assert!(
        stats.failures.is_empty(),
        "{:?}",
        &stats.failures[..stats.failures.len().min(5)]
    );
}

#[test]
fn manifest_that_cannot_run_on_this_node_starts_nothing() {
    let dir = TestDir::new();
    let (fleet, port) = set_up(&dir);
    // Valid manifest, but this node has no `rack` label to expand.
    fleet.push("hello", "1.0.0", |d| {
        std::fs::create_dir_all(d.join("bin")).expect("bin");
        std::fs::copy(hotswap_tests::binary("hello-server"), d.join("bin/hello-server")).expect("copy");
        std::fs::write(
            d.join("module.toml"),
            format!("name = \"hello\"\nversion = \"1.0.0\"\nruntime = \"process\"\n[process]\ncommand = [\"bin/hello-server\", \"--version-label\", \"${{NODE_LABEL_rack}}\"]\n[[process.sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:{port}\"\n"),
        )
        .expect("manifest");
    });
    fleet.set("node-1", "hello@1.0.0", &[]);
    let m = fleet.wait_module("hello", "the failure", |m| m["phase"] == "failed");
    assert!(
        m["message"].as_str().is_some_and(|t| t.contains("rack")),
        "{m}"
    );
    assert!(fleet.agent.module_pids().is_empty(), "nothing started");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens"
    );
}

#[test]
fn stop_first_swap_queues_requests_and_metrics_reach_the_control_plane() {
    let dir = TestDir::new();
    let (fleet, port) = set_up(&dir);
    fleet.push_hello_swap("1.0.0", port, "", "10s", "stop-first");
    fleet.push_hello_swap("2.0.0", port, "", "10s", "stop-first");
    fleet.set("node-1", "hello@1.0.0", &[]);
    fleet.wait_running("hello", "1.0.0");

    // The agent holds the listener while no version runs, so connections
    // wait in the backlog for the new version instead of being refused.
    let load = Load::start(port);
    fleet.set("node-1", "hello@2.0.0", &[]);
    fleet.wait_running("hello", "2.0.0");
    // Scraped metrics (two scrapes, 5 s apart) arrive in `nodes get`.
    let m = fleet.wait_module("hello", "request metrics", |m| {
        m["metrics"]["request_rate"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
    });
    let stats = load.finish();
    assert!(
        stats.failures.is_empty(),
        "{:?}",
        &stats.failures[..stats.failures.len().min(5)]
    );
    assert_eq!(
        stats.versions,
        ["1.0.0", "2.0.0"],
        "stop-first never overlaps versions"
    );
    assert_eq!(m["metrics"]["error_rate"].as_f64(), Some(0.0), "{m}");
    assert!(
        m["metrics"]["latency_p99_seconds"]
            .as_f64()
            .is_some_and(|p| p > 0.0),
        "{m}"
    );
    let node = fleet
        .cp
        .ctl(&["-o", "json", "nodes", "get", "node-1"])
        .json();
    assert!(
        node["usage"]["memory_total_bytes"]
            .as_u64()
            .is_some_and(|b| b > 0),
        "node usage reported: {node}"
    );
}

/// `hello@version` whose exec health probe takes 300 ms, three times its
/// interval, and appends "start NANOS" and "end NANOS" to `log`.
fn push_slow_probe(fleet: &Fleet, version: &str, port: u16, log: &std::path::Path) {
    fleet.push("hello", version, |d| {
        std::fs::create_dir_all(d.join("bin")).expect("bin");
        std::fs::copy(hotswap_tests::binary("hello-server"), d.join("bin/hello-server"))
            .expect("copy");
        std::fs::write(
            d.join("probe.sh"),
            format!(
                "echo \"start $(date +%s%N)\" >> {log}\nsleep 0.3\necho \"end $(date +%s%N)\" >> {log}\n",
                log = log.display()
            ),
        )
        .expect("probe");
        std::fs::write(
            d.join("module.toml"),
            format!("name = \"hello\"\nversion = \"{version}\"\nruntime = \"process\"\n[process]\ncommand = [\"bin/hello-server\"]\n[[process.sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:{port}\"\n[health]\nexec = [\"sh\", \"probe.sh\"]\ninterval = \"100ms\"\ntimeout = \"5s\"\nhealthy_threshold = 1\nunhealthy_threshold = 2\nstart_timeout = \"20s\"\n"),
        )
        .expect("manifest");
    });
}

/// The probes recorded in `log` as (start, end) nanoseconds, in order;
/// panics when one started before the previous one ended.
fn probes_without_overlap(log: &std::path::Path) -> Vec<(u128, Option<u128>)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut probes: Vec<(u128, Option<u128>)> = Vec::new();
    for line in text.lines() {
        let (what, at) = line.split_once(' ').expect("probe log line");
        let at: u128 = at.parse().expect("nanoseconds");
        match (what, probes.last_mut()) {
            ("start", None) => probes.push((at, None)),
            ("start", Some((_, Some(end)))) if at >= *end => probes.push((at, None)),
            ("end", Some((start, end @ None))) if at >= *start => *end = Some(at),
            _ => panic!("probes overlap at {line:?}:\n{text}"),
        }
    }
    probes
}

#[test]
fn health_timeout_longer_than_interval_never_overlaps_probes() {
    let dir = TestDir::new();
    let (fleet, port) = set_up(&dir);
    let log = dir.path().join("probes.log");
    // Refused by the manifest before: timeout 5s > interval 100ms.
    push_slow_probe(&fleet, "1.0.0", port, &log);
    push_slow_probe(&fleet, "2.0.0", port, &log);
    fleet.set("node-1", "hello@1.0.0", &[]);
    fleet.wait_running("hello", "1.0.0");
    // A start-first swap probes the new version while the old one serves:
    // still one probe at a time.
    fleet.set("node-1", "hello@2.0.0", &[]);
    fleet.wait_running("hello", "2.0.0");
    let probes = eventually("ten probes of the running version", || {
        let probes = probes_without_overlap(&log);
        if probes.iter().filter(|(_, end)| end.is_some()).count() >= 10 {
            Ok(probes)
        } else {
            Err(format!("{probes:?}"))
        }
    });
    // The next probe starts when the last ended (plus at most the interval
    // and scheduling noise), not a timeout or more later.
    let longest_gap = probes
        .windows(2)
        .filter_map(|w| w[0].1.map(|end| w[1].0 - end))
        .max()
        .unwrap_or(0);
    assert!(
        longest_gap < 2_000_000_000,
        "{longest_gap} ns between two probes: {probes:?}"
    );
    let m = fleet.module("hello").expect("report");
    assert_eq!(m["health"], "healthy", "{m}");
}

/// The pid the agent's instance ledger records for `version` of `module`.
fn ledger_pid(agent: &hotswap_tests::Agent, module: &str, version: &str) -> Option<u32> {
    let path = agent
        .data_dir
        .join("instances")
        .join(format!("{module}.json"));
    let entries: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    entries
        .as_array()?
        .iter()
        .filter(|e| e["version"] == version)
        .find_map(|e| e["pid"].as_u64())
        .map(|pid| pid as u32)
}

/// Whether `pid` is gone (a zombie nobody reaped yet counts as gone).
fn process_gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'))
    })
}

#[test]
fn a_new_desired_state_preempts_a_candidate_inside_its_health_gate() {
    preempted_inside_the_gate("start-first");
}

#[test]
fn a_new_desired_state_preempts_a_stop_first_candidate() {
    preempted_inside_the_gate("stop-first");
}

/// Set a version that never passes its 30 s health gate, then the old one
/// again while it gates: the candidate must go at once, and the report must
/// have named it while it gated.
fn preempted_inside_the_gate(swap: &str) {
    let dir = TestDir::new();
    let (fleet, port) = set_up(&dir);
    fleet.push_hello_swap("1.0.0", port, "", "10s", swap);
    // Never healthy, and its gate would last far longer than the test waits.
    fleet.push_hello_swap("2.0.0", port, "HELLO_UNHEALTHY = \"1\"", "30s", swap);
    fleet.set("node-1", "hello@1.0.0", &[]);
    fleet.wait_running("hello", "1.0.0");
    let old_pids = fleet.agent.module_pids();

    let load = Load::start(port);
    fleet.set("node-1", "hello@2.0.0", &[]);
    // Inside the gate the report tells the truth: 1.0.0 is the active
    // version, but 2.0.0 is still starting next to it.
    let m = fleet.wait_module("hello", "2.0.0 reported settling", |m| {
        m["settling"]
            .as_array()
            .is_some_and(|s| s.iter().any(|v| v == "2.0.0"))
    });
    assert_eq!(m["version"], "1.0.0", "{m}");
    assert_ne!(
        m["phase"], "running",
        "not settled while a candidate gates: {m}"
    );
    let candidate = hotswap_tests::eventually("the candidate's pid in the ledger", || {
        ledger_pid(&fleet.agent, "hello", "2.0.0").ok_or_else(|| "not recorded yet".to_string())
    });
    assert!(!process_gone(candidate), "2.0.0 runs inside its gate");

    // Back to 1.0.0: the candidate is stopped at once, not after its 30 s.
    let asked = std::time::Instant::now();
    fleet.set("node-1", "hello@1.0.0", &[]);
    hotswap_tests::eventually("the preempted 2.0.0 process to be gone", || {
        if process_gone(candidate) {
            Ok(())
        } else {
            Err(format!("pid {candidate} still runs"))
        }
    });
    let took = asked.elapsed();
    assert!(
        took < std::time::Duration::from_secs(5),
        "the candidate was stopped {took:?} after the new desired state; its gate was 30 s"
    );
    let m = fleet.wait_running("hello", "1.0.0");
    assert_eq!(
        m["settling"],
        serde_json::json!([]),
        "nothing settles any more: {m}"
    );
    assert_eq!(
        m["failure_kind"],
        serde_json::Value::Null,
        "a preemption is no failure: {m}"
    );
    // The unhealthy 2.0.0 passes its first gate on the shared listener
    // (1.0.0 answers its probes), so the preemption usually lands in the
    // check after the cutover, and 1.0.0 is started again; either way no
    // process of 2.0.0 is left.
    let pids = fleet.agent.module_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert!(!pids.contains(&candidate), "{pids:?} {old_pids:?}");
    assert!(
        ledger_pid(&fleet.agent, "hello", "2.0.0").is_none_or(process_gone),
        "the ledger names no live 2.0.0"
    );
    let stats = load.finish();
    assert!(
        stats.failures.is_empty(),
        "{} failed requests: {:?}",
        stats.failures.len(),
        &stats.failures[..stats.failures.len().min(5)]
    );
    assert!(
        fleet.agent.log().contains("preempting the step in flight"),
        "{}",
        fleet.agent.log()
    );
}

/// Push `name@version`: the example HTTP server with its agent-owned socket
/// and health check on `port`.
fn push_server(fleet: &Fleet, name: &str, version: &str, port: u16) {
    fleet.push(name, version, |dir| {
        std::fs::create_dir_all(dir.join("bin")).expect("bin");
        std::fs::copy(hotswap_tests::binary("hello-server"), dir.join("bin/hello-server"))
            .expect("copy hello-server");
        std::fs::write(
            dir.join("module.toml"),
            format!(
                "name = \"{name}\"\nversion = \"{version}\"\nruntime = \"process\"\n\n[process]\ncommand = [\"bin/hello-server\"]\nstop_timeout = \"5s\"\n[[process.sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:{port}\"\n\n[health]\nhttp = \"http://127.0.0.1:{port}/healthz\"\ninterval = \"100ms\"\ntimeout = \"500ms\"\nstart_timeout = \"10s\"\n"
            ),
        )
        .expect("manifest");
    });
}

/// What answers on `port` for a while: the versions seen, every request ok.
fn served_versions(port: u16) -> Vec<String> {
    let load = Load::start(port);
    std::thread::sleep(std::time::Duration::from_millis(800));
    let stats = load.finish();
    assert!(
        stats.failures.is_empty() && stats.ok > 5,
        "{} ok, failures {:?}",
        stats.ok,
        &stats.failures[..stats.failures.len().min(5)]
    );
    stats.versions
}

/// Issue 18, item 4: listeners carry SO_REUSEPORT (a restarted agent needs
/// it between versions of one module), so module `b` on module `a`'s port
/// "succeeded", split `a`'s traffic and had its health probe answered by
/// `a`. Now the second module's start is a release failure naming both, `a`
/// keeps every request, and the port serves another module only once `a`
/// gave it up.
#[test]
fn two_modules_cannot_share_a_listen_address() {
    let dir = TestDir::new();
    let (fleet, port) = set_up(&dir);
    let other_port = free_port();
    push_server(&fleet, "web-a", "1.0.0", port);
    push_server(&fleet, "web-b", "2.0.0", port);
    push_server(&fleet, "web-b", "2.0.1", other_port);
    push_server(&fleet, "web-b", "2.0.2", port);
    fleet.set("node-1", "web-a@1.0.0", &[]);
    fleet.wait_running("web-a", "1.0.0");

    fleet.set("node-1", "web-b@2.0.0", &[]);
    let b = fleet.wait_module("web-b", "web-b refused", |m| m["phase"] == "failed");
    let expected = format!(
        "module \"web-b\": socket \"http\" listens on 127.0.0.1:{port}, which module \"web-a\" already \
         listens on on this node; two modules cannot share a listen address"
    );
    assert!(
        b["message"].as_str().is_some_and(|m| m.contains(&expected)),
        "expected {expected:?} in {b}"
    );
    assert_eq!(b["failure_kind"], "release", "{b}");
    assert_eq!(
        b["health"], "unknown",
        "b's probe was not answered by a: {b}"
    );
    assert_eq!(fleet.agent.module_pids().len(), 1, "only a runs");
    assert_eq!(
        served_versions(port),
        ["1.0.0"],
        "a keeps all of its traffic"
    );

    // b on a port of its own runs beside a.
    fleet.set("node-1", "web-b@2.0.1", &[]);
    fleet.wait_running("web-b", "2.0.1");
    assert_eq!(served_versions(other_port), ["2.0.1"]);
    assert_eq!(served_versions(port), ["1.0.0"]);

    // Once a is removed, its address is free for b.
    let out = fleet.cp.ctl(&["nodes", "unset-module", "node-1", "web-a"]);
    assert_eq!(out.code, 0, "{out:?}");
    eventually("a removed", || match fleet.module("web-a") {
        None => Ok(()),
        Some(m) => Err(format!("a still reported: {m}")),
    });
    fleet.set("node-1", "web-b@2.0.2", &[]);
    fleet.wait_running("web-b", "2.0.2");
    assert_eq!(served_versions(port), ["2.0.2"]);
}
