//! Large artifacts (issue 18, item 11): a module far bigger than any buffer
//! is packed, pushed, fanned out to three agents and rolled back to, with
//! every process's peak memory bounded well below the artifact's size; an
//! upload slower than `request_timeout` completes, and one that stalls is
//! cut off by `upload_idle_timeout` with a clear error.
//!
//! Memory bounds are not timing assertions: a whole-file-in-memory `pack`
//! holds several copies of the artifact, a buffering upload or fetch at
//! least one, and each would exceed the bound whatever the machine's speed.
//! Throughput figures are the benchmark's job (`hotswap-bench
//! large-artifact`, BENCHMARKS.md).

use std::path::Path;
use std::time::Instant;

use hotswap_tests::{
    ControlPlane, Fleet, TestDir, ThrottleProxy, binary, ctl_offline, peak_rss_kib, run_measured,
    write_pseudo_random,
};
use serde_json::Value;

/// Size of the big module's data file: big enough that one copy of it in
/// memory breaks the bound below, small enough for `make test` on 2 cores.
const BIG_MIB: u64 = 256;
/// Peak resident memory allowed to any process handling the big artifact.
const PEAK_BOUND_MIB: u64 = 128;

fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf8 path")
}

/// `hello@version` (the example server on each node's `port` label) with
/// extra files from `fill`.
fn hello_dir(dir: &Path, version: &str, env: &str, fill: impl FnOnce(&Path)) {
    std::fs::create_dir_all(dir.join("bin")).expect("bin");
    std::fs::copy(binary("hello-server"), dir.join("bin/hello-server")).expect("copy hello-server");
    let addr = "127.0.0.1:${NODE_LABEL_port}";
    std::fs::write(
        dir.join("module.toml"),
        format!(
            "name = \"hello\"\nversion = \"{version}\"\nruntime = \"process\"\n\n[process]\ncommand = [\"bin/hello-server\"]\nenv = {{ {env} }}\nstop_timeout = \"5s\"\n[[process.sockets]]\nname = \"http\"\nlisten = \"{addr}\"\n\n[health]\nhttp = \"http://{addr}/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 2\nstart_timeout = \"3s\"\n"
        ),
    )
    .expect("manifest");
    fill(dir);
}

fn deploy(fleet: &Fleet, target: &str) -> (i32, Value) {
    let out = fleet.cp.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        target,
        "--env",
        "dev",
        "--min-healthy-time",
        "0s",
        "--wait",
        "--timeout",
        "600s",
    ]);
    let last = if out.stdout.trim().is_empty() {
        Value::Null
    } else {
        out.last_json_line()
    };
    (out.code, last)
}

#[test]
fn a_large_artifact_is_packed_pushed_fanned_out_and_rolled_back_to_in_bounded_memory() {
    let dir = TestDir::new();
    let (fleet, ports) = Fleet::start_many(&dir, "dev", &["a", "b", "c"]);
    let work = dir.path();

    // Pack: 256 MiB of incompressible data beside the server binary.
    let src = work.join("src-big");
    hello_dir(&src, "1.0.0", "", |dir| {
        write_pseudo_random(&dir.join("data.bin"), BIG_MIB * 1024 * 1024, 18);
    });
    let artifact = work.join("hello-1.0.0.hsm");
    let mut pack = std::process::Command::new(binary("hotswapctl"));
    pack.args(["module", "pack", utf8(&src), "--key", utf8(&fleet.key)])
        .args(["-o", utf8(&artifact)]);
    let started = Instant::now();
    let (packed, pack_kib) = run_measured(pack, work);
    assert_eq!(packed.code, 0, "{packed:?}");
    eprintln!(
        "pack: {:?}, peak RSS {} MiB",
        started.elapsed(),
        pack_kib / 1024
    );
    // The source is not needed any more: keep the disk for the agents.
    std::fs::remove_file(src.join("data.bin")).expect("remove source data");
    let size = std::fs::metadata(&artifact).expect("artifact").len();
    assert!(size > BIG_MIB * 1024 * 1024, "{size} bytes");

    // A second signature, streamed as well.
    let (second_key, second_pub) = (work.join("second.key"), work.join("second.pub"));
    ctl_offline(&["keys", "generate", "--out", utf8(&work.join("second"))]).ok();
    assert!(second_pub.is_file());
    let mut sign = std::process::Command::new(binary("hotswapctl"));
    sign.args([
        "module",
        "sign",
        utf8(&artifact),
        "--key",
        utf8(&second_key),
    ]);
    let (signed, sign_kib) = run_measured(sign, work);
    assert_eq!(signed.code, 0, "{signed:?}");
    eprintln!("sign: peak RSS {} MiB", sign_kib / 1024);

    // Push.
    let push = fleet.cp.ctl_command(
        &fleet.cp.admin_profile(),
        &fleet.cp.url(),
        &["module", "push", utf8(&artifact)],
    );
    let started = Instant::now();
    let (pushed, push_kib) = run_measured(push, work);
    assert_eq!(pushed.code, 0, "{pushed:?}");
    eprintln!(
        "push: {:?}, peak RSS {} MiB",
        started.elapsed(),
        push_kib / 1024
    );
    std::fs::remove_file(&artifact).expect("remove artifact");

    // Fan-out to the three agents.
    let (code, last) = deploy(&fleet, "hello@1.0.0");
    assert_eq!(code, 0, "{last}");
    assert_eq!(last["state"], "succeeded", "{last}");
    assert_eq!(last["progress"]["healthy"], 3, "{last}");

    // A bad version, then the automatic rollback to the big one.
    fleet.push_hello_per_node("2.0.0", "HELLO_UNHEALTHY = \"1\"");
    let (code, last) = deploy(&fleet, "hello@2.0.0");
    assert_eq!(code, 3, "a rolled back deployment exits 3: {last}");
    assert_eq!(last["state"], "rolled_back", "{last}");
    for node in ["a", "b", "c"] {
        assert_eq!(fleet.version_on(node, "hello"), "1.0.0", "node {node}");
    }
    for port in &ports {
        let (code, body) = hotswap_tests::http_get(([127, 0, 0, 1], *port).into(), "/");
        assert_eq!(
            (code, body.trim()),
            (200, "hello from 1.0.0"),
            "port {port}"
        );
    }
    for agent in fleet.agents() {
        let unpacked = agent
            .data_dir
            .join("artifacts/modules/hello/1.0.0/data.bin");
        let len = std::fs::metadata(&unpacked)
            .map(|m| m.len())
            .unwrap_or_default();
        assert_eq!(len, BIG_MIB * 1024 * 1024, "{}", unpacked.display());
    }

    // Peak memory of every process that handled the artifact.
    let mut peaks = vec![
        ("hotswapctl module pack".to_string(), pack_kib),
        ("hotswapctl module sign".to_string(), sign_kib),
        ("hotswapctl module push".to_string(), push_kib),
        ("control plane".to_string(), peak_rss_kib(fleet.cp.pid())),
    ];
    for agent in fleet.agents() {
        peaks.push((format!("agent {}", agent.name), peak_rss_kib(agent.pid())));
    }
    eprintln!("peak RSS (KiB) with a {BIG_MIB} MiB artifact: {peaks:?}");
    for (process, kib) in &peaks {
        assert!(*kib > 0, "no peak memory figure for {process}");
        assert!(
            *kib < PEAK_BOUND_MIB * 1024,
            "{process} peaked at {} MiB handling a {BIG_MIB} MiB artifact (bound {PEAK_BOUND_MIB} MiB)",
            kib / 1024
        );
    }
}

/// An upload over a link too slow to finish within `request_timeout` gets
/// through (uploads have an idle timeout, not a total one), and an upload
/// that stops sending while its connection stays open is cut off after
/// `upload_idle_timeout` with an error naming the setting.
#[test]
fn a_slow_upload_completes_and_a_stalled_one_is_cut_off_when_idle() {
    let dir = TestDir::new();
    let work = dir.path();
    let mut cp = ControlPlane::init_with_settings(
        work,
        "request_timeout = \"2s\"\nupload_idle_timeout = \"2s\"\n",
    );
    cp.start();
    ctl_offline(&["keys", "generate", "--out", utf8(&work.join("ci"))]).ok();
    cp.ctl(&["keys", "trust", utf8(&work.join("ci.pub")), "--name", "ci"])
        .ok();
    let pack = |version: &str, mib: u64| {
        let src = work.join(format!("src-{version}"));
        hotswap_tests::write_module(&src, "slow", version, b"");
        write_pseudo_random(&src.join("data.bin"), mib * 1024 * 1024, mib);
        let out = work.join(format!("slow-{version}.hsm"));
        ctl_offline(&[
            "module",
            "pack",
            utf8(&src),
            "--key",
            utf8(&work.join("ci.key")),
            "-o",
            utf8(&out),
        ])
        .ok();
        out
    };
    let grpc = cp.grpc.expect("started");

    // About 5 s at 1 MiB/s, against a 2 s request_timeout.
    let artifact = pack("1.0.0", 5);
    let slow = ThrottleProxy::start(grpc, 1024 * 1024, None);
    let started = Instant::now();
    let out = cp
        .ctl_command(
            &cp.admin_profile(),
            &slow.url(),
            &["module", "push", utf8(&artifact)],
        )
        .output()
        .expect("run hotswapctl");
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "slow push failed after {elapsed:?}: {stderr}"
    );
    assert!(
        elapsed > std::time::Duration::from_secs(2),
        "the proxy did not slow the upload down ({elapsed:?}): the test proves nothing"
    );
    let module = cp.ctl(&["-o", "json", "module", "get", "slow"]).json();
    assert_eq!(module["versions"][0]["version"], "1.0.0", "{module}");

    // Stalls after 1 MiB, connection kept open.
    let artifact = pack("2.0.0", 3);
    let stalled = ThrottleProxy::start(grpc, 64 * 1024 * 1024, Some(1024 * 1024));
    let out = cp
        .ctl_command(
            &cp.admin_profile(),
            &stalled.url(),
            &["module", "push", utf8(&artifact)],
        )
        .output()
        .expect("run hotswapctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("upload cancelled: no data for 2s")
            && stderr.contains("upload_idle_timeout"),
        "{stderr}"
    );
    let module = cp.ctl(&["-o", "json", "module", "get", "slow"]).json();
    assert_eq!(
        module["versions"].as_array().map(Vec::len),
        Some(1),
        "nothing of the stalled upload is stored: {module}"
    );
    // Nothing staged is left behind either.
    let tmp = cp.data_dir.join("blobs/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "staging files left in {}: {left:?}",
        tmp.display()
    );
}
