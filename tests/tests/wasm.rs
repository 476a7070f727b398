//! The `wasm` runtime (SPEC §10) end to end: a WebAssembly component of the
//! `wasi:http/proxy` world, built by componentize-py from
//! `tests/fixtures/wasm/handler/app.py`, deployed through every strategy
//! and served by the real agent; swaps under load, bad and hostile
//! components, and canary analysis on the agent's own request metrics.
//!
//! One component serves every version here (its behaviour is chosen by the
//! manifest's `env`), so it is compiled once per agent and then loaded from
//! the agent's cache.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hotswap_agent::runtime::wasm::engine::{Budget, Engines};
use serde_json::Value;

use hotswap_tests::{
    CANARY_LOAD_PER_SECOND, Fleet, Load, TestDir, eventually, http_get, shared_wasm_cache,
    try_http_get,
};

/// Fixtures: the handler from componentize-py, and bad components from WAT.
mod wasm {
    use std::path::PathBuf;

    /// Build `tests/fixtures/wasm/handler/app.py` with componentize-py
    /// (installed by `scripts/ci-deps.sh`), once per checkout: cached under
    /// `target/wasm-fixtures/` by the hash of what goes into it.
    pub fn handler_component() -> PathBuf {
        hotswap_tests::wasm_fixtures::handler_component()
    }

    /// A valid core module: WebAssembly, but not a component.
    pub fn not_a_component() -> Vec<u8> {
        wat::parse_str("(module (func (export \"handle\") (param i32 i32)))").expect("wat")
    }

    /// A valid component of another world: it exports no HTTP handler.
    pub fn other_world_component() -> Vec<u8> {
        wat::parse_str(
            r#"(component
                 (core module $m (func (export "run") (result i32) i32.const 0))
                 (core instance $i (instantiate $m))
                 (func $run (result u32) (canon lift (core func $i "run")))
                 (export "run" (func $run)))"#,
        )
        .expect("wat")
    }

    /// A `wasi:http/proxy` component whose start function traps: it links,
    /// and fails as soon as it is instantiated.
    pub fn traps_at_instantiation() -> Vec<u8> {
        wat::parse_str(
            r#"(component
                 (import "wasi:http/types@0.2.12" (instance $types
                   (export "incoming-request" (type (sub resource)))
                   (export "response-outparam" (type (sub resource)))))
                 (alias export $types "incoming-request" (type $request))
                 (alias export $types "response-outparam" (type $out))
                 (core module $m
                   (func $start unreachable)
                   (start $start)
                   (func (export "handle") (param i32 i32)))
                 (core instance $i (instantiate $m))
                 (func $handle (param "request" (own $request)) (param "response-out" (own $out))
                   (canon lift (core func $i "handle")))
                 (instance $handler (export "handle" (func $handle)))
                 (export "wasi:http/incoming-handler@0.2.12" (instance $handler)))"#,
        )
        .expect("wat")
    }
}

/// The handler component, compiled into the test agents' shared cache for
/// the manifests' budget below: compiling a whole Python takes seconds of
/// CPU, once per machine rather than once per test agent. (A cold cache is
/// compiled by the agent itself: the engine's own tests cover that path.)
fn handler() -> PathBuf {
    static WARM: OnceLock<PathBuf> = OnceLock::new();
    WARM.get_or_init(|| {
        let component = wasm::handler_component();
        let bytes = std::fs::read(&component).expect("read the component");
        let engines = Engines::new(shared_wasm_cache());
        let engine = engines
            .engine(Budget {
                max_memory: 128 << 20,
                max_concurrent_requests: 200,
            })
            .expect("engine");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime
            .block_on(engines.compile(&engine, bytes))
            .expect("the handler component compiles");
        component
    })
    .clone()
}

/// Push `edge@version`: the handler component on each node's `port`
/// label, with `env` (TOML inline-table entries) for the component and
/// `extra` appended to the manifest.
fn push_edge(fleet: &Fleet, version: &str, env: &str, extra: &str) {
    push_edge_with(fleet, version, &handler(), env, extra);
}

fn push_edge_with(fleet: &Fleet, version: &str, component: &Path, env: &str, extra: &str) {
    push_edge_limited(fleet, version, component, env, DEFAULT_LIMITS, extra);
}

const DEFAULT_LIMITS: &str =
    "max_memory = \"128MiB\"\nrequest_timeout = \"2s\"\nmax_concurrent_requests = 200";

/// As [`push_edge_with`], with `limits` as the `[wasm]` limit keys.
fn push_edge_limited(
    fleet: &Fleet,
    version: &str,
    component: &Path,
    env: &str,
    limits: &str,
    extra: &str,
) {
    fleet.push("edge", version, |dir| {
        std::fs::copy(component, dir.join("handler.wasm")).expect("copy the component");
        let addr = "127.0.0.1:${NODE_LABEL_port}";
        let env = if env.is_empty() {
            String::new()
        } else {
            format!(", {env}")
        };
        std::fs::write(
            dir.join("module.toml"),
            format!(
                "name = \"edge\"\nversion = \"{version}\"\nruntime = \"wasm\"\n\n[wasm]\ncomponent = \"handler.wasm\"\n{limits}\nenv = {{ HANDLER_VERSION = \"{version}\"{env} }}\n[[wasm.sockets]]\nname = \"http\"\nlisten = \"{addr}\"\n\n[health]\nhttp = \"http://{addr}/healthz\"\ninterval = \"200ms\"\ntimeout = \"2s\"\nunhealthy_threshold = 2\nstart_timeout = \"6s\"\n{extra}"
            ),
        )
        .expect("manifest");
    });
}

fn greeting(port: u16) -> (u16, String) {
    let (code, body) = http_get(([127, 0, 0, 1], port).into(), "/");
    (code, body.trim().to_string())
}

fn deploy(fleet: &Fleet, version: &str, env: &str, strategy: &[&str]) -> Value {
    let module = format!("edge@{version}");
    let mut args = vec![
        "-o",
        "json",
        "deploy",
        "create",
        &module,
        "--env",
        env,
        "--wait",
        "--timeout",
        "180s",
    ];
    args.extend_from_slice(strategy);
    let out = fleet.cp.ctl(&args);
    assert_eq!(out.code, 0, "{out:?}");
    out.last_json_line()
}

/// The agent's own metric `name` (a full series, labels included).
fn agent_metric(fleet: &Fleet, series: &str) -> f64 {
    let (_, text) = http_get(fleet.agent.admin(), "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_wasm_module_deploys_through_every_strategy() {
    let dir = TestDir::new();
    let (fleet, ports) = Fleet::start_many(&dir, "dev", &["a", "b", "c"]);
    for version in ["1.0.0", "1.1.0", "1.2.0", "1.3.0"] {
        push_edge(&fleet, version, "", "");
    }
    let runs: [(&str, &[&str]); 4] = [
        ("1.0.0", &["--strategy", "direct"]),
        ("1.1.0", &["--strategy", "rolling", "--batch-size", "1"]),
        ("1.2.0", &["--strategy", "blue-green", "--bake-time", "1s"]),
        (
            "1.3.0",
            &[
                "--strategy",
                "canary",
                "--steps",
                "34,100",
                "--step-duration",
                "6s",
                "--analysis-warmup",
                "1s",
                // Judged on errors: latency on a shared 2-core test machine
                // is noise here (the canary test below judges errors too).
                "--max-latency-increase",
                "50",
            ],
        ),
    ];
    for (version, strategy) in runs {
        let loads: Vec<Load> = if strategy.contains(&"canary") {
            ports
                .iter()
                .map(|p| Load::paced(*p, CANARY_LOAD_PER_SECOND))
                .collect()
        } else {
            Vec::new()
        };
        let last = deploy(&fleet, version, "dev", strategy);
        for load in loads {
            let stats = load.finish();
            assert!(stats.failures.is_empty(), "{:?}", stats.failures);
        }
        assert_eq!(last["state"], "succeeded", "{version}: {last}");
        assert_eq!(last["strategy"], strategy[1], "{last}");
        for port in &ports {
            assert_eq!(
                greeting(*port),
                (200, format!("hello {version}")),
                "{version} served on port {port}"
            );
        }
    }
    // Compiled at most once (the test agents share one cache); every later
    // version, with the same bytes, came from the cache.
    let hits = agent_metric(&fleet, HITS);
    let misses = agent_metric(&fleet, MISSES);
    assert!(misses <= 1.0, "compiled {misses} times");
    assert_eq!(hits + misses, 4.0, "one preparation per version");
}

const HITS: &str = "hotswap_agent_wasm_compile_seconds_count{module=\"edge\",cache=\"hit\"}";
const MISSES: &str = "hotswap_agent_wasm_compile_seconds_count{module=\"edge\",cache=\"miss\"}";

#[test]
fn swaps_under_load_drop_nothing_and_requests_in_flight_finish_on_their_version() {
    let dir = TestDir::new();
    let (mut fleet, ports) = Fleet::start_many(&dir, "dev", &["node-1"]);
    let port = ports[0];
    push_edge(&fleet, "1.0.0", "", "");
    push_edge(&fleet, "2.0.0", "GREETING = \"hi\"", "");
    fleet.set("node-1", "edge@1.0.0", &[]);
    fleet.wait_running("edge", "1.0.0");
    assert_eq!(greeting(port), (200, "hello 1.0.0".to_string()));

    let loads: Vec<Load> = (0..2).map(|_| Load::start(port)).collect();
    // A slow request that starts on 1.0.0 and ends after the switch.
    let slow = std::thread::spawn(move || http_get(([127, 0, 0, 1], port).into(), "/slow?ms=1500"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut swaps = 0;
    for round in 0..5 {
        for version in ["2.0.0", "1.0.0"] {
            fleet.set("node-1", &format!("edge@{version}"), &[]);
            fleet.wait_running("edge", version);
            swaps += 1;
            if round == 0 && version == "2.0.0" {
                assert_eq!(greeting(port), (200, "hi 2.0.0".to_string()));
            }
        }
    }
    let (code, body) = slow.join().expect("slow request");
    assert_eq!(
        (code, body.trim()),
        (200, "hello 1.0.0"),
        "the request in flight finished on the version it started on"
    );
    let mut served = 0;
    for load in loads {
        let stats = load.finish();
        assert!(
            stats.failures.is_empty(),
            "{} failed during {swaps} swaps: {:?}",
            stats.failures.len(),
            &stats.failures[..stats.failures.len().min(5)]
        );
        served += stats.ok;
    }
    // That the load went on through the swaps, not how fast: a loaded CI
    // machine served 92 requests of a Python component in these seconds.
    assert!(served >= 20, "load kept going: {served} requests");
    // A rollback to the previous version is the switch alone: no compile.
    let switches = agent_metric(
        &fleet,
        "hotswap_agent_wasm_switch_seconds_count{module=\"edge\"}",
    );
    assert_eq!(switches, f64::from(swaps + 1));
    // Two preparations: 1.0.0 and 2.0.0; every later swap reused one.
    let prepared = agent_metric(&fleet, MISSES) + agent_metric(&fleet, HITS);
    assert_eq!(prepared, 2.0, "each version prepared once");

    // The agent killed: a wasm module lives in its process, so the new
    // agent serves the active version again, from the compiled cache.
    fleet.agent.kill();
    assert!(
        try_http_get(([127, 0, 0, 1], port).into(), "/").is_err(),
        "nothing serves while the agent is down"
    );
    let port_label = format!("port={port}");
    let url = fleet.cp.url();
    fleet.agent.start(
        &url,
        &["--label", "environment=dev", "--label", &port_label],
    );
    eventually(
        "1.0.0 served again after the agent restarted",
        || match try_http_get(([127, 0, 0, 1], port).into(), "/") {
            Ok((200, body)) if body.trim() == "hello 1.0.0" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(agent_metric(&fleet, MISSES), 0.0, "not compiled again");
    assert_eq!(agent_metric(&fleet, HITS), 1.0);
}

#[test]
fn bad_components_fail_before_the_switch_and_the_running_version_keeps_serving() {
    let dir = TestDir::new();
    let (fleet, ports) = Fleet::start_many(&dir, "dev", &["node-1"]);
    let port = ports[0];
    push_edge(&fleet, "1.0.0", "", "");
    fleet.set("node-1", "edge@1.0.0", &[]);
    fleet.wait_running("edge", "1.0.0");

    let fixtures = dir.path().join("fixtures");
    std::fs::create_dir_all(&fixtures).expect("fixtures dir");
    let write = |name: &str, bytes: &[u8]| {
        let path = fixtures.join(name);
        std::fs::write(&path, bytes).expect("fixture");
        path
    };
    let cases: Vec<(&str, std::path::PathBuf, &str, &str)> = vec![
        (
            "2.0.1",
            write("text.wasm", b"definitely not wasm"),
            "",
            "not a WebAssembly file",
        ),
        (
            "2.0.2",
            write("core.wasm", &wasm::not_a_component()),
            "",
            "a core WebAssembly module, not a component",
        ),
        (
            "2.0.3",
            write("other.wasm", &wasm::other_world_component()),
            "",
            "not a wasi:http/proxy component",
        ),
        (
            "2.0.4",
            write("trap.wasm", &wasm::traps_at_instantiation()),
            "",
            "trapped while it was instantiated",
        ),
        (
            "2.0.5",
            handler(),
            "MODE = \"hang\"",
            "did not become healthy",
        ),
        (
            "2.0.6",
            handler(),
            "MODE = \"hog\"",
            "did not become healthy",
        ),
    ];
    for (version, component, env, expected) in &cases {
        push_edge_with(&fleet, version, component, env, "");
        fleet.set("node-1", &format!("edge@{version}"), &[]);
        let module = fleet.wait_module("edge", &format!("{version} refused"), |m| {
            m["phase"] == "failed" && m["message"].as_str().is_some_and(|t| t.contains(version))
        });
        let message = module["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(expected),
            "{version}: expected {expected:?} in {message:?}"
        );
        assert_eq!(module["version"], "1.0.0", "{module}");
        assert_eq!(
            greeting(port),
            (200, "hello 1.0.0".to_string()),
            "1.0.0 keeps serving after {version}"
        );
    }
    // The agent recovers to a good version as if nothing happened.
    fleet.set("node-1", "edge@1.0.0", &[]);
    fleet.wait_running("edge", "1.0.0");
}

#[test]
fn a_hostile_component_reaches_none_of_the_agents_files_keys_or_environment() {
    let dir = TestDir::new();
    let (fleet, ports) = Fleet::start_many(&dir, "dev", &["node-1"]);
    let port = ports[0];
    let identity = fleet.agent.data_dir.join("identity");
    let key_files: Vec<String> = std::fs::read_dir(&identity)
        .expect("identity dir")
        .flatten()
        .map(|e| e.path().display().to_string())
        .collect();
    assert!(!key_files.is_empty());
    let snoop = key_files.join(":");
    // The control plane's gRPC port: a socket the component must not reach.
    let cp_port = fleet.cp.url().rsplit(':').next().unwrap_or("0").to_string();
    push_edge(
        &fleet,
        "6.6.6",
        &format!("SNOOP_PATHS = \"{snoop}\", SNOOP_PORT = \"{cp_port}\""),
        "",
    );
    fleet.set("node-1", "edge@6.6.6", &[]);
    fleet.wait_running("edge", "6.6.6");
    let (code, body) = http_get(([127, 0, 0, 1], port).into(), "/snoop");
    assert_eq!(code, 200, "{body}");
    let found: Value = serde_json::from_str(&body).expect("snoop JSON");
    for (path, result) in found["files"].as_object().expect("files") {
        assert!(
            result.as_str().is_some_and(|r| r.starts_with("denied")),
            "{path} was readable: {result}"
        );
    }
    for (path, result) in found["listings"].as_object().expect("listings") {
        let result = result.as_str().unwrap_or_default();
        assert!(
            result.starts_with("denied") || result == "[]",
            "{path} was listed: {result}"
        );
    }
    for file in &key_files {
        assert!(found["files"].get(file).is_some(), "{file} was tried");
    }
    // Its environment is the manifest's env, nothing of the agent's.
    let env = found["env"].as_object().expect("env");
    let mut names: Vec<&str> = env.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["HANDLER_VERSION", "SNOOP_PATHS", "SNOOP_PORT"]);
    assert!(
        found["socket"]
            .as_str()
            .is_some_and(|r| r.starts_with("denied")),
        "{}",
        found["socket"]
    );
    // And the version it probed serves on.
    assert_eq!(greeting(port), (200, "hello 6.6.6".to_string()));
}

#[test]
fn canary_analysis_catches_a_trapping_wasm_version_from_the_agents_own_metrics() {
    let dir = TestDir::new();
    let (fleet, ports) = Fleet::start_many(&dir, "dev", &["a", "b", "c", "d"]);
    push_edge(&fleet, "1.0.0", "", "");
    // Healthy on /healthz, traps on every request to /: no [metrics]
    // section, so only the agent's own counts can catch it.
    push_edge(&fleet, "2.0.0", "MODE = \"trap\"", "");
    let last = deploy(&fleet, "1.0.0", "dev", &[]);
    assert_eq!(last["state"], "succeeded", "{last}");
    let loads: Vec<Load> = ports
        .iter()
        .map(|p| Load::paced(*p, CANARY_LOAD_PER_SECOND))
        .collect();
    let out = fleet.cp.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "edge@2.0.0",
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
    let verdicts = last["analysis"].as_array().cloned().unwrap_or_default();
    let verdict = verdicts.last().cloned().unwrap_or_default();
    assert!(
        verdict["canary_requests"].as_f64() >= Some(50.0),
        "{verdict}"
    );
    assert!(
        verdict["canary_error_rate"]
            .as_f64()
            .is_some_and(|e| e > 0.9),
        "{verdict}"
    );
    assert_eq!(
        verdict["baseline_error_rate"].as_f64(),
        Some(0.0),
        "{verdict}"
    );
    eventually("every node back on 1.0.0 and serving", || {
        let served: Vec<(u16, String)> = ports.iter().map(|p| greeting(*p)).collect();
        served
            .iter()
            .all(|s| *s == (200, "hello 1.0.0".to_string()))
            .then_some(())
            .ok_or(format!("{served:?}"))
    });
}

#[test]
fn request_timeout_stops_a_request_and_max_concurrent_requests_answers_503() {
    let dir = TestDir::new();
    let (fleet, ports) = Fleet::start_many(&dir, "dev", &["node-1"]);
    let port = ports[0];
    // The same budget as the others (one engine, the warmed cache), with a
    // short timeout and room for two requests at once.
    push_edge_limited(
        &fleet,
        "1.0.0",
        &handler(),
        "",
        "max_memory = \"128MiB\"\nrequest_timeout = \"1s\"\nmax_concurrent_requests = 200",
        "",
    );
    fleet.set("node-1", "edge@1.0.0", &[]);
    fleet.wait_running("edge", "1.0.0");
    let started = std::time::Instant::now();
    let (code, body) = http_get(([127, 0, 0, 1], port).into(), "/slow?ms=5000");
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("request_timeout"), "{body}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "stopped at its timeout, not after 5 s: {:?}",
        started.elapsed()
    );
    // The version still serves, and timeouts count as errors.
    assert_eq!(greeting(port), (200, "hello 1.0.0".to_string()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let timing_out = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = try_http_get(([127, 0, 0, 1], port).into(), "/slow?ms=5000");
            }
        })
    };
    let module = fleet.wait_module("edge", "the timeouts in the error rate", |m| {
        m["metrics"]["error_rate"].as_f64().is_some_and(|e| e > 0.0)
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    timing_out.join().expect("timing-out requests");
    assert_eq!(
        module["metrics"]["error_rate"].as_f64(),
        Some(1.0),
        "{module}"
    );

    push_edge_limited(
        &fleet,
        "1.1.0",
        &handler(),
        "",
        "max_memory = \"128MiB\"\nrequest_timeout = \"10s\"\nmax_concurrent_requests = 2",
        "",
    );
    fleet.set("node-1", "edge@1.1.0", &[]);
    fleet.wait_running("edge", "1.1.0");
    // Three at once, each holding its slot for 3 s: two are served, the
    // third is refused at once.
    let slow: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let answer = http_get(([127, 0, 0, 1], port).into(), "/slow?ms=3000");
                (answer, started.elapsed())
            })
        })
        .collect();
    let mut answers: Vec<((u16, String), std::time::Duration)> = slow
        .into_iter()
        .map(|t| t.join().expect("slow request"))
        .collect();
    answers.sort_by_key(|((code, _), _)| *code);
    let codes: Vec<u16> = answers.iter().map(|((code, _), _)| *code).collect();
    assert_eq!(codes, [200, 200, 503], "{answers:?}");
    let ((_, refusal), refused_after) = &answers[2];
    assert!(refusal.contains("max_concurrent_requests"), "{refusal}");
    assert!(
        *refused_after < std::time::Duration::from_secs(2),
        "refused at once, not queued: {refused_after:?}"
    );
    assert_eq!(greeting(port), (200, "hello 1.1.0".to_string()));
}
