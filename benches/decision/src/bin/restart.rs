//! `hotswap-bench-restart`: how long a control plane holding many records
//! takes to be ready after a start, clean or after `kill -9`. The records are
//! written through the control plane's own `Store` and `EventLog` (N node
//! records and N events), then the real `hotswap-control-plane` binary (from
//! the same target directory) is started repeatedly; ready means
//! `/readyz` answers 200. Prints one JSON object (see BENCHMARKS.md).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use hotswap_control_plane::events::{Event, EventLog};
use hotswap_control_plane::store::{NodeRecord, Store};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Node records to hold.
    #[arg(long, default_value_t = 100_000)]
    nodes: usize,
    /// Events to hold.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Starts to time (alternately after SIGTERM and after kill -9).
    #[arg(long, default_value_t = 6)]
    runs: usize,
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable dir")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build with `cargo build --release --workspace --bins`",
            path.display()
        );
    }
    Ok(path)
}

fn get(addr: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// Start the control plane; returns it once `/readyz` says 200, and how long that took.
fn start(cp: &Path, data: &Path) -> anyhow::Result<(Child, Duration)> {
    let addresses = data.join("run/addresses.json");
    let _ = std::fs::remove_file(&addresses);
    let started = Instant::now();
    let child = Command::new(cp)
        .args(["run", "--data-dir"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    loop {
        if started.elapsed() > Duration::from_secs(120) {
            bail!("not ready after 120 s");
        }
        if let Ok(text) = std::fs::read_to_string(&addresses)
            && let Ok(value) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(admin) = value["admin"].as_str()
            && get(admin, "/readyz") == Some(200)
        {
            return Ok((child, started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cp = binary("hotswap-control-plane")?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("cp");
    let init = Command::new(&cp)
        .args(["init", "--data-dir"])
        .arg(&data)
        .output()?;
    if !init.status.success() {
        bail!("init failed: {}", String::from_utf8_lossy(&init.stderr));
    }

    let fill = Instant::now();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let store = Store::open(&data.join("state"), 64 * 1024 * 1024)?;
        let now = hotswap_common::timefmt::now_ms();
        for i in 0..args.nodes {
            let mut labels = hotswap_common::labels::Labels::new();
            labels.insert(
                "environment".into(),
                ["dev", "qa", "staging", "production"][i % 4].into(),
            );
            labels.insert("zone".into(), format!("z{}", i % 16));
            let record = NodeRecord {
                id: format!("00000000-0000-4000-8000-{i:012}"),
                name: format!("node-{i:06}"),
                labels,
                forced_labels: Default::default(),
                enrolled_at_ms: now,
                cert_fingerprint: format!("sha256:{:064x}", i),
                cert_not_after_ms: now + 86_400_000,
                last_seen_ms: Some(now),
                agent_version: "0.1.0".into(),
                previous_cert_fingerprint: None,
                previous_cert_not_after_ms: 0,
                token_hash: String::new(),
                enroll_key: String::new(),
            };
            store.put_node(&record).await?;
        }
        let events = EventLog::open(&store, args.events as u64 + 1)?;
        for i in 0..args.events {
            events.append(
                Event::new("module.phase", format!("web 1.0.{i}: starting -> running"))
                    .node(&format!("node-{:06}", i % args.nodes.max(1)))
                    .module("web", &format!("1.0.{i}")),
            );
        }
        store.flush().await?;
        anyhow::Ok(())
    })?;
    drop(runtime);
    let fill = fill.elapsed();
    let state_bytes: u64 = std::fs::read_dir(data.join("state"))?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "restart: {} nodes and {} events written in {fill:?}",
        args.nodes, args.events
    );

    let mut samples = Vec::new();
    for run in 0..args.runs {
        let (mut child, ready) = start(&cp, &data)?;
        let how = if run % 2 == 0 {
            "after SIGTERM"
        } else {
            "after kill -9"
        };
        eprintln!("restart: run {} ready in {ready:?}", run + 1);
        // The next start follows this way of stopping.
        if run % 2 == 0 {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait()?;
        } else {
            child.kill()?;
            child.wait()?;
        }
        samples.push(json!({ "run": run + 1, "ready_ms": (ready.as_secs_f64() * 1000.0 * 100.0).round() / 100.0, "next_start": how }));
    }
    let mut ready: Vec<f64> = samples
        .iter()
        .filter_map(|s| s["ready_ms"].as_f64())
        .collect();
    ready.sort_by(f64::total_cmp);
    let result = json!({
        "benchmark": "restart",
        "date": hotswap_common::timefmt::rfc3339_from_ms(hotswap_common::timefmt::now_ms()),
        "nodes": args.nodes,
        "events": args.events,
        "fill_s": (fill.as_secs_f64() * 100.0).round() / 100.0,
        "state_bytes": state_bytes,
        "runs": samples,
        "ready_median_ms": ready[ready.len() / 2],
        "ready_max_ms": ready[ready.len() - 1],
    });
    println!("{result}");
    Ok(())
}
