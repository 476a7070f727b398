//! `large-artifact`: one big module through the whole path with real
//! binaries: `module pack`, `module sign`, `module push`, a direct
//! deployment to N agents, then a bad version and the automatic rollback to
//! the big one. Measured: wall time of each step and the peak resident
//! memory (`VmHWM`, or `ru_maxrss` of the CLI child) of every process, once
//! before any artifact exists and once after, to show that memory does not
//! grow with the artifact.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};
use hotswap_tests::{
    Fleet, TestDir, binary, ctl_offline, peak_rss_kib, run_measured, write_pseudo_random,
};
use serde_json::{Value, json};

use crate::{machine, mib_per_s, round};

const MIB: u64 = 1024 * 1024;

fn utf8(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("path is not UTF-8")
}

/// `hello@version` on each node's `port` label, plus `data.bin` of
/// `data_bytes` (none when 0).
fn hello_dir(dir: &Path, version: &str, env: &str, data_bytes: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::copy(binary("hello-server"), dir.join("bin/hello-server"))?;
    let addr = "127.0.0.1:${NODE_LABEL_port}";
    std::fs::write(
        dir.join("module.toml"),
        format!(
            "name = \"hello\"\nversion = \"{version}\"\nruntime = \"process\"\n\n[process]\ncommand = [\"bin/hello-server\"]\nenv = {{ {env} }}\nstop_timeout = \"5s\"\n[[process.sockets]]\nname = \"http\"\nlisten = \"{addr}\"\n\n[health]\nhttp = \"http://{addr}/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 2\nstart_timeout = \"3s\"\n"
        ),
    )?;
    if data_bytes > 0 {
        write_pseudo_random(&dir.join("data.bin"), data_bytes, 11);
    }
    Ok(())
}

fn peaks_mib(fleet: &Fleet) -> Value {
    let mut out = serde_json::Map::new();
    out.insert(
        "control_plane".into(),
        json!(round(peak_rss_kib(fleet.cp.pid()) as f64 / 1024.0)),
    );
    for agent in fleet.agents() {
        out.insert(
            format!("agent_{}", agent.name),
            json!(round(peak_rss_kib(agent.pid()) as f64 / 1024.0)),
        );
    }
    Value::Object(out)
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
        "3600s",
    ]);
    let last = out
        .stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    (out.code, last)
}

pub fn large_artifact(size_mib: u64, agents: usize) -> anyhow::Result<()> {
    if agents == 0 {
        bail!("--agents must be at least 1");
    }
    let dir = TestDir::new();
    let work = dir.path();
    let names: Vec<String> = (1..=agents).map(|i| format!("n{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    // Room for the artifact's framing above the module's files.
    let settings = format!("max_artifact_bytes = {}\n", (size_mib + 64) * MIB);
    let (fleet, _ports) = Fleet::start_many_with_settings(&dir, "dev", &names, &settings);
    let before = peaks_mib(&fleet);

    // The module's files total --size-mib: agents refuse to unpack more
    // than 1 GiB, so `--size-mib 1024` is the largest module they install.
    let src = work.join("src-big");
    let server_len = std::fs::metadata(binary("hello-server"))?.len();
    let data = (size_mib * MIB)
        .checked_sub(server_len)
        .context("--size-mib is smaller than the hello-server binary")?;
    hello_dir(&src, "1.0.0", "", data)?;
    let artifact = work.join("hello-1.0.0.hsm");

    let mut pack = Command::new(binary("hotswapctl"));
    pack.args(["module", "pack", utf8(&src)?, "--key", utf8(&fleet.key)?])
        .args(["-o", utf8(&artifact)?]);
    let started = Instant::now();
    let (out, pack_kib) = run_measured(pack, work);
    let pack_s = started.elapsed();
    if out.code != 0 {
        bail!("pack failed: {}", out.stderr);
    }
    std::fs::remove_file(src.join("data.bin"))?;
    let artifact_bytes = std::fs::metadata(&artifact)?.len();

    ctl_offline(&["keys", "generate", "--out", utf8(&work.join("second"))?]);
    let mut sign = Command::new(binary("hotswapctl"));
    sign.args(["module", "sign", utf8(&artifact)?, "--key"])
        .arg(work.join("second.key"));
    let started = Instant::now();
    let (out, sign_kib) = run_measured(sign, work);
    let sign_s = started.elapsed();
    if out.code != 0 {
        bail!("sign failed: {}", out.stderr);
    }

    let push = fleet.cp.ctl_command(
        &fleet.cp.admin_profile(),
        &fleet.cp.url(),
        &["module", "push", utf8(&artifact)?],
    );
    let started = Instant::now();
    let (out, push_kib) = run_measured(push, work);
    let push_s = started.elapsed();
    if out.code != 0 {
        bail!("push failed: {}", out.stderr);
    }
    std::fs::remove_file(&artifact)?;
    eprintln!(
        "large-artifact: {} MiB packed in {pack_s:?}, signed in {sign_s:?}, pushed in {push_s:?}",
        artifact_bytes / MIB
    );

    let started = Instant::now();
    let (code, last) = deploy(&fleet, "hello@1.0.0");
    let fanout_s = started.elapsed();
    if code != 0 || last["state"] != "succeeded" {
        bail!("deployment of the big version did not succeed ({code}): {last}");
    }
    eprintln!("large-artifact: fan-out to {agents} agents in {fanout_s:?}");

    let bad = work.join("src-bad");
    hello_dir(&bad, "2.0.0", "HELLO_UNHEALTHY = \"1\"", 0)?;
    let bad_artifact = work.join("hello-2.0.0.hsm");
    ctl_offline(&[
        "module",
        "pack",
        utf8(&bad)?,
        "--key",
        utf8(&fleet.key)?,
        "-o",
        utf8(&bad_artifact)?,
    ]);
    let pushed = fleet.cp.ctl(&["module", "push", utf8(&bad_artifact)?]);
    if pushed.code != 0 {
        bail!("push of the bad version failed: {}", pushed.stderr);
    }
    let started = Instant::now();
    let (code, last) = deploy(&fleet, "hello@2.0.0");
    let rollback_s = started.elapsed();
    if code != 3 || last["state"] != "rolled_back" {
        bail!("the bad version was not rolled back ({code}): {last}");
    }
    for name in &names {
        let version = fleet.version_on(name, "hello");
        if version != "1.0.0" {
            bail!("{name} runs {version:?} after the rollback, not 1.0.0");
        }
    }

    let kib_to_mib = |kib: u64| round(kib as f64 / 1024.0);
    let result = json!({
        "benchmark": "large-artifact",
        "machine": machine(),
        "module_mib": size_mib,
        "artifact_mib": round(artifact_bytes as f64 / MIB as f64),
        "agents": agents,
        "seconds": {
            "pack": round(pack_s.as_secs_f64()),
            "sign": round(sign_s.as_secs_f64()),
            "push": round(push_s.as_secs_f64()),
            "fanout_deploy": round(fanout_s.as_secs_f64()),
            "bad_deploy_to_rolled_back": round(rollback_s.as_secs_f64()),
        },
        "push_mib_s": round(mib_per_s(artifact_bytes, push_s)),
        "peak_rss_mib": {
            "cli_pack": kib_to_mib(pack_kib),
            "cli_sign": kib_to_mib(sign_kib),
            "cli_push": kib_to_mib(push_kib),
            "before_any_artifact": before,
            "after_rollback": peaks_mib(&fleet),
        },
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}
