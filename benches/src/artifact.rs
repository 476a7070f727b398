//! `artifact`: push throughput and fan-out of one artifact to N agents over
//! mTLS, against the machine's floor: AES-GCM seal and open plus SHA-256.

use std::time::Instant;

use anyhow::{Context as _, bail};
use hotswap_agent::artifacts::{ArtifactStore, TrustSource};
use hotswap_agent::config::EnrollmentConfig;
use hotswap_agent::control_plane::Connection;
use hotswap_agent::control_plane::EnrollmentKey;
use hotswap_agent::identity::enroll_once;
use hotswap_agent::metrics::Metrics;
use hotswap_common::artifact::keys;
use hotswap_common::artifact::pack::pack_and_sign;
use hotswap_common::artifact::unpack::Limits;
use hotswap_common::tls::{self, ClientIdentity, ControlPlaneUrl, ServerTrust};
use hotswap_tests::{TestDir, write_module};
use serde_json::json;

use crate::{
    cores, cpu_seconds, machine, median, mib_per_s, pseudo_random, round, round4,
    start_control_plane,
};

/// MiB/s of the least that moving one artifact byte over mTLS and checking
/// it can cost: AES-128-GCM seal (the sender's TLS record), AES-128-GCM open
/// (the receiver's) and one SHA-256 pass (the digest check), with `threads`
/// threads each working its own buffer at once. Both ends of every
/// connection run on this machine's cores, so the floor counts both.
fn crypto_floor(size: usize, runs: usize, threads: usize) -> anyhow::Result<f64> {
    let mut buffers: Vec<Vec<u8>> = (0..threads)
        .map(|_| {
            let mut buf = pseudo_random(size);
            buf.reserve_exact(16);
            buf
        })
        .collect();
    let mut samples = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let bytes: u64 = std::thread::scope(|scope| {
            let workers: Vec<_> = buffers
                .iter_mut()
                .enumerate()
                .map(|(t, buf)| scope.spawn(move || seal_open_hash(buf, t as u8)))
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .map_err(|_| anyhow::anyhow!("floor thread panicked"))?
                })
                .sum::<anyhow::Result<u64>>()
        })?;
        samples.push(mib_per_s(bytes, started.elapsed()));
    }
    Ok(median(samples))
}

/// One thread's share of [`crypto_floor`]: 16 rounds of seal, open and hash
/// over `buf` (with room for the tag); returns the bytes processed.
fn seal_open_hash(buf: &mut Vec<u8>, seed: u8) -> anyhow::Result<u64> {
    use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_128_GCM, &[seed; 16]).map_err(|_| anyhow::anyhow!("aes key"))?,
    );
    let size = buf.len();
    let rounds = 16;
    for i in 0..rounds {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), buf)
            .map_err(|_| anyhow::anyhow!("seal"))?;
        buf.extend_from_slice(tag.as_ref());
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), buf)
            .map_err(|_| anyhow::anyhow!("open"))?;
        let _ = std::hint::black_box(<sha2::Sha256 as sha2::Digest>::digest(&plain));
        buf.truncate(size);
    }
    Ok((size * rounds) as u64)
}

pub fn artifact(agents: usize, size_mib: usize, runs: usize) -> anyhow::Result<()> {
    let size = size_mib * 1024 * 1024;
    let cores = cores();
    let floor = crypto_floor(size, runs, 1)?;
    let floor_all = crypto_floor(size, runs, cores)?;

    let dir = TestDir::new();
    let mut cp = start_control_plane(
        dir.path(),
        "heartbeat_interval = \"5s\"\nheartbeat_grace = \"15s\"\nenroll_burst = 1000000\nenroll_per_minute = 1000000\n",
    )?;
    let key = keys::generate()?;
    let (_, public) = keys::write_key_pair(&dir.path().join("bench"), &key)?;
    let trusted = cp.ctl(&[
        "keys",
        "trust",
        public.to_str().context("utf8")?,
        "--name",
        "bench",
    ]);
    if trusted.code != 0 {
        bail!("keys trust failed: {}", trusted.stderr);
    }

    // Push: distinct versions so every push does the full work.
    let payload = pseudo_random(size);
    let mut push_samples = Vec::new();
    let mut content_len = 0;
    for run in 0..runs {
        let src = dir.path().join(format!("src-{run}"));
        write_module(&src, "bench", &format!("1.0.{run}"), &payload);
        let file = dir.path().join(format!("bench-{run}.hsm"));
        let info = pack_and_sign(&src, &key, hotswap_common::timefmt::now_ms(), &file)?;
        content_len = info.content_len;
        let started = Instant::now();
        let out = cp.ctl(&["module", "push", file.to_str().context("utf8")?]);
        let elapsed = started.elapsed();
        if out.code != 0 {
            bail!("push failed: {}", out.stderr);
        }
        push_samples.push(mib_per_s(std::fs::metadata(&file)?.len(), elapsed));
    }
    let push = median(push_samples);

    // Enroll N nodes through the real enrollment call.
    let rt = tokio::runtime::Runtime::new()?;
    let (token, fingerprint) = cp.token(&["--uses", &agents.to_string()]);
    let url = ControlPlaneUrl::parse(&cp.url())?;
    let enrollment = EnrollmentConfig {
        join_token: token,
        ca_fingerprint: hotswap_common::pki::parse_fingerprint(&fingerprint)?,
    };
    let metrics = Metrics::default();
    let mut nodes = Vec::new();
    for i in 0..agents {
        let name = format!("bench-{i}");
        let key = EnrollmentKey::generate(&name).map_err(|e| anyhow::anyhow!("{e}"))?;
        let identity = rt
            .block_on(enroll_once(
                &url,
                &key,
                &enrollment,
                &name,
                &Default::default(),
                &metrics,
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let data_dir = dir.path().join(format!("node-{i}"));
        identity.save(&data_dir)?;
        nodes.push((data_dir, identity));
    }

    // Each store fetches over its own connection, established before the
    // clock starts and kept across runs: a real agent fetches over its
    // session's connection, so handshakes are not part of a fetch.
    let stores = rt.block_on(async {
        let mut stores = Vec::new();
        for (data_dir, identity) in &nodes {
            let config = tls::client_config(
                ServerTrust::Ca(identity.ca_pem.clone()),
                Some(ClientIdentity {
                    cert_pem: &identity.cert_pem,
                    key_pem: &identity.key_pem,
                }),
            )?;
            let channel = tls::connect(&url, config, &Default::default()).await?;
            stores.push((data_dir.clone(), Connection::new(channel)));
        }
        Ok::<_, anyhow::Error>(stores)
    })?;

    // Fan-out: every node fetches and verifies the same artifact at once.
    let mut fanout_samples = Vec::new();
    let (mut cp_cpu_samples, mut agent_cpu_samples) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let version = format!("1.0.{run}");
        let mut ready = Vec::new();
        for (data_dir, channel) in &stores {
            let _ = std::fs::remove_dir_all(data_dir.join("artifacts"));
            let store = ArtifactStore::open(data_dir, TrustSource::ControlPlane, Limits::default())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            ready.push((store, channel.clone()));
        }
        let (cp_cpu0, own_cpu0) = (cpu_seconds(cp.pid()), cpu_seconds(std::process::id()));
        let started = Instant::now();
        let total: u64 = rt.block_on(async {
            let mut tasks = Vec::new();
            for (store, channel) in ready {
                let version = version.clone();
                tasks.push(tokio::spawn(async move {
                    store
                        .fetch(&channel, "bench", &version)
                        .await
                        .map(|c| c.downloaded)
                        .map_err(|e| anyhow::anyhow!("{e}"))
                }));
            }
            let mut total = 0;
            for task in tasks {
                total += task.await??;
            }
            Ok::<u64, anyhow::Error>(total)
        })?;
        let elapsed = started.elapsed();
        let per_agent_ms = |cpu: f64| cpu * 1000.0 / agents as f64;
        cp_cpu_samples.push(per_agent_ms(cpu_seconds(cp.pid()) - cp_cpu0));
        agent_cpu_samples.push(per_agent_ms(cpu_seconds(std::process::id()) - own_cpu0));
        if total != content_len * agents as u64 {
            bail!(
                "fan-out moved {total} bytes, expected {}",
                content_len * agents as u64
            );
        }
        fanout_samples.push(mib_per_s(total, elapsed));
    }
    let fanout = median(fanout_samples);
    cp.stop();

    let result = json!({
        "benchmark": "artifact",
        "machine": machine(),
        "artifact_mib": size_mib,
        "agents": agents,
        "runs": runs,
        "cores": cores,
        "floor": "AES-128-GCM seal + open + SHA-256 per byte",
        "crypto_floor_mib_s_one_core": round(floor),
        "crypto_floor_mib_s_all_cores": round(floor_all),
        "push_mib_s": round(push),
        "push_fraction_of_one_core_floor": round4(push / floor),
        "fanout_aggregate_mib_s": round(fanout),
        "fanout_fraction_of_all_cores_floor": round4(fanout / floor_all),
        "fanout_control_plane_cpu_ms_per_agent": round4(median(cp_cpu_samples)),
        "fanout_agents_cpu_ms_per_agent": round4(median(agent_cpu_samples)),
        "fanout_seconds_for_all_agents": round((content_len * agents as u64) as f64 / (1024.0 * 1024.0) / fanout),
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}
