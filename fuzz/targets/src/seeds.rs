//! Builders of the seed corpora: real manifests, small signed artifacts
//! (packed from module trees the way `hotswapctl module pack` does, plus
//! hostile archives), bare tar archives, and one encoded message of each
//! kind. `examples/seed_corpus.rs` writes them to `fuzz/corpus/<target>/`.
//!
//! Everything is deterministic (fixed key, fixed times, reproducible tar),
//! so regenerating the seeds gives the same files, except for the two
//! messages that carry freshly generated keys (CSR and certificates).

use std::collections::HashMap;
use std::io::Cursor;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use hotswap_common::artifact::format::{
    Signature, encode_content, read_artifact_from, write_artifact,
};
use hotswap_common::artifact::keys::{self, public_key_pem};
use hotswap_common::artifact::pack::pack_and_sign;
use hotswap_common::pb;
use hotswap_common::pki::{self, CertificateAuthority, Principal};
use hotswap_common::timefmt::ts_from_ms;
use prost::Message;

use crate::{FUZZ_NOW_MS, MESSAGE_KINDS, fuzz_publisher_key};

/// One seed file: its name in the corpus directory and its bytes.
pub type Seed = (String, Vec<u8>);

/// When the seed artifacts were signed: a day before the targets' clock.
const SIGNED_AT_MS: u64 = FUZZ_NOW_MS - 86_400_000;

/// Seeds are kept small so the fuzzer spends its time on structure, not on
/// hashing; bigger modules exercise nothing more.
pub const MAX_SEED_BYTES: usize = 16 * 1024;

const HELLO_PROCESS: &str = include_str!("../../../examples/hello-process/module.toml");
const BUNDLE_CONFIG: &str = include_str!("../../../examples/bundle-config/module.toml");

/// A process manifest using every section and variable form.
const FULL_PROCESS: &str = r#"name = "api-gateway"
version = "2.3.1-rc.1+build.7"
runtime = "process"
description = "gateway on ${NODE_NAME} in ${NODE_LABEL_zone}"

[process]
command = ["bin/gateway", "--config", "${MODULE_DIR}/etc/gateway.toml"]
swap = "stop-first"
stop_signal = "QUIT"
stop_timeout = "1m 30s"

[process.env]
RUST_LOG = "info"
ZONE = "${NODE_LABEL_zone}"

[[process.sockets]]
name = "http"
listen = "0.0.0.0:${NODE_LABEL_port}"

[[process.sockets]]
name = "admin_v6"
listen = "[::1]:9090"

[health]
tcp = "127.0.0.1:9090"
interval = "2s"
timeout = "250ms"
healthy_threshold = 2
unhealthy_threshold = 5
start_timeout = "45s"

[metrics]
prometheus = "https://${NODE_NAME}:9090/metrics"
requests_total = "gateway_requests_total"
errors_total = "gateway:errors_total"
latency_seconds = "gateway_latency_seconds"
"#;

/// A bundle manifest with an exec health check.
const FULL_BUNDLE: &str = r#"name = "static-site"
version = "0.9.0"
runtime = "bundle"

[bundle]
activate = ["/bin/sh", "-c", "nginx -s reload"]

[health]
exec = ["bin/check", "${MODULE_DIR}"]
"#;

const MINIMAL_BUNDLE: &str = "name = \"hello\"\nversion = \"1.0.0\"\nruntime = \"bundle\"\n";

/// Manifests that are rejected, each at a different check.
const BAD_MANIFESTS: &[(&str, &str)] = &[
    ("bad-syntax", "name = \"hello\nversion = 1.0.0"),
    (
        "bad-name",
        "name = \"Hello_World\"\nversion = \"1.0.0\"\nruntime = \"bundle\"\n",
    ),
    (
        "bad-version",
        "name = \"hello\"\nversion = \"1.0\"\nruntime = \"bundle\"\n",
    ),
    (
        "bad-variable",
        "name = \"hello\"\nversion = \"1.0.0\"\nruntime = \"bundle\"\ndescription = \"${NODE_LABEL_Zone} ${HOME\"\n",
    ),
    (
        "bad-socket",
        "name = \"hello\"\nversion = \"1.0.0\"\nruntime = \"process\"\n[process]\ncommand = [\"../x\"]\n[[process.sockets]]\nname = \"a\"\nlisten = \"::1:80\"\n",
    ),
    (
        "bad-health",
        "name = \"hello\"\nversion = \"1.0.0\"\nruntime = \"bundle\"\n[health]\nhttp = \"http://x\"\ntcp = \"x:0\"\ntimeout = \"99999999999999999999h\"\n",
    ),
    (
        "bad-env",
        "name = \"hello\"\nversion = \"1.0.0\"\nruntime = \"process\"\n[process]\ncommand = [\"x\"]\nenv = { HOTSWAP_X = \"1\", LISTEN_FDS = \"3\" }\nstop_signal = \"SIGSTOP\"\n",
    ),
];

pub fn manifest_seeds() -> Vec<Seed> {
    let mut seeds = vec![
        seed("hello-process.toml", HELLO_PROCESS.as_bytes()),
        seed("bundle-config.toml", BUNDLE_CONFIG.as_bytes()),
        seed("full-process.toml", FULL_PROCESS.as_bytes()),
        seed("full-bundle.toml", FULL_BUNDLE.as_bytes()),
        seed("minimal-bundle.toml", MINIMAL_BUNDLE.as_bytes()),
    ];
    for (name, text) in BAD_MANIFESTS {
        seeds.push(seed(&format!("{name}.toml"), text.as_bytes()));
    }
    seeds
}

fn seed(name: &str, bytes: &[u8]) -> Seed {
    (name.to_string(), bytes.to_vec())
}

/// What one crafted tar entry is.
enum Kind<'a> {
    File(&'a [u8], u32),
    Dir,
    Symlink(&'a str),
    HardLink(&'a str),
    Fifo,
}

/// A bare tar archive written header by header, without the tar crate's own
/// path checks, so hostile names (`..`, absolute paths) can be expressed.
fn crafted_tar(entries: &[(&str, Kind<'_>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind) in entries {
        let mut header = tar::Header::new_gnu();
        let (data, mode): (&[u8], u32) = match kind {
            Kind::File(data, mode) => {
                header.set_entry_type(tar::EntryType::Regular);
                (data, *mode)
            }
            Kind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                (&[], 0o755)
            }
            Kind::Symlink(target) | Kind::HardLink(target) => {
                let kind = if matches!(kind, Kind::Symlink(_)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                };
                header.set_entry_type(kind);
                header.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
                (&[], 0o777)
            }
            Kind::Fifo => {
                header.set_entry_type(tar::EntryType::Fifo);
                (&[], 0o644)
            }
        };
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        header.set_mtime(0);
        header.set_cksum();
        builder
            .append(&header, data)
            .expect("append to a tar in memory");
    }
    builder.into_inner().expect("finish a tar in memory")
}

/// A tar whose second entry's name comes from a PAX extended header and whose
/// third has a GNU long name, the two ways names longer than 100 bytes travel.
fn long_names_tar() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let long = format!("{}/file.txt", "d".repeat(120));
    let record = format!("path={long}\n");
    // A PAX record is "<length> <key>=<value>\n", its length counting itself.
    let mut length = record.len() + 1;
    while length.to_string().len() + 1 + record.len() != length {
        length += 1;
    }
    let pax = format!("{length} {record}");
    let mut header = tar::Header::new_ustar();
    header.set_path("PaxHeader/x").expect("short path");
    header.set_entry_type(tar::EntryType::XHeader);
    header.set_size(pax.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append(&header, pax.as_bytes()).expect("append pax");
    let mut header = tar::Header::new_ustar();
    header.set_path("short-name").expect("short path");
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(3);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append(&header, &b"pax"[..]).expect("append");
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(3);
    header.set_mode(0o755);
    builder
        .append_data(&mut header, format!("{}/run", "g".repeat(110)), &b"gnu"[..])
        .expect("append gnu long name");
    builder.into_inner().expect("finish a tar in memory")
}

/// Bare tar archives: the layouts of real modules and every hostile shape
/// the unpack rules refuse.
pub fn tar_seeds() -> Vec<Seed> {
    use Kind::{Dir, Fifo, File, HardLink, Symlink};
    let script = b"#!/bin/sh\necho hi\n";
    let cases: Vec<(&str, Vec<(&str, Kind<'_>)>)> = vec![
        (
            "bundle",
            vec![
                ("bin", Dir),
                ("bin/activate.sh", File(script, 0o755)),
                ("config", Dir),
                ("config/greeting.conf", File(b"greeting = hello\n", 0o644)),
                ("current.conf", Symlink("config/greeting.conf")),
            ],
        ),
        (
            "symlink-chain",
            vec![
                ("a", Dir),
                ("a/b", Symlink("../c")),
                ("c", Symlink("d")),
                ("d", File(b"x", 0o644)),
            ],
        ),
        ("parent-dir", vec![("../evil", File(b"x", 0o644))]),
        ("nested-parent", vec![("a/../../evil", File(b"x", 0o644))]),
        ("absolute", vec![("/etc/evil", File(b"x", 0o644))]),
        ("symlink-up", vec![("up", Symlink("../.."))]),
        ("symlink-absolute", vec![("abs", Symlink("/etc/passwd"))]),
        (
            "symlink-dot-dot",
            vec![("a", Symlink(".")), ("t", Symlink("a/.."))],
        ),
        (
            "symlink-under-symlink",
            vec![
                ("a", Symlink("sub")),
                ("sub", Dir),
                ("a/b", Symlink("../x")),
            ],
        ),
        // Once created `a/evil` through `a`, beside the module directory.
        (
            "symlink-through-symlink",
            vec![("a", Symlink("..")), ("a/evil", Symlink("x"))],
        ),
        ("hard-link", vec![("h", HardLink("/etc/passwd"))]),
        ("fifo", vec![("f", Fifo)]),
        (
            "duplicate",
            vec![("x", File(b"1", 0o644)), ("x", File(b"2", 0o644))],
        ),
        (
            "manifest-in-payload",
            vec![("module.toml", File(b"name = \"evil\"", 0o644))],
        ),
        (
            "file-under-symlink",
            vec![("x", Symlink("y")), ("x/z", File(b"1", 0o644))],
        ),
        ("dot-only", vec![("./", Dir), (".", File(b"1", 0o644))]),
    ];
    let mut seeds: Vec<Seed> = cases
        .iter()
        .map(|(name, entries)| (format!("{name}.tar"), crafted_tar(entries)))
        .collect();
    seeds.push(("long-names.tar".to_string(), long_names_tar()));
    seeds
}

/// Sign `content` (manifest + payload) with the fuzz publisher key and write
/// the whole artifact. `signatures` decides which signatures it carries.
fn signed_artifact(manifest: &str, payload: &[u8], signatures: Signatures) -> Vec<u8> {
    let content = encode_content(manifest, payload);
    let mut unsigned = Vec::new();
    write_artifact(&mut unsigned, &content, &[]).expect("write to memory");
    let info = read_artifact_from(Cursor::new(&unsigned), unsigned.len() as u64)
        .expect("a seed artifact is well formed");
    let trusted = fuzz_publisher_key();
    let other = ed25519_dalek::SigningKey::from_bytes(&[0x0f; 32]);
    let list: Vec<Signature> = match signatures {
        Signatures::None => Vec::new(),
        Signatures::Trusted => vec![keys::sign(&info, &trusted, SIGNED_AT_MS, None)],
        Signatures::Expired => vec![keys::sign(
            &info,
            &trusted,
            SIGNED_AT_MS,
            Some(SIGNED_AT_MS + 1000),
        )],
        Signatures::UnknownAndTrusted => vec![
            keys::sign(&info, &other, SIGNED_AT_MS, Some(FUZZ_NOW_MS * 2)),
            keys::sign(&info, &trusted, SIGNED_AT_MS, None),
        ],
    };
    let mut bytes = Vec::new();
    write_artifact(&mut bytes, &content, &list).expect("write to memory");
    bytes
}

#[derive(Clone, Copy)]
enum Signatures {
    None,
    Trusted,
    Expired,
    UnknownAndTrusted,
}

/// Pack a real module tree from disk with the project's packer.
fn packed_module(files: &[(&str, &[u8], u32)], manifest: &str) -> Vec<u8> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("module");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("module.toml"), manifest).expect("write manifest");
    for (path, data, mode) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().expect("a file has a parent")).expect("mkdir");
        std::fs::write(&path, data).expect("write file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).expect("chmod");
    }
    std::os::unix::fs::symlink("config/greeting.conf", dir.join("current.conf")).ok();
    let out = tmp.path().join("module.hsm");
    pack_and_sign(&dir, &fuzz_publisher_key(), SIGNED_AT_MS, &out).expect("pack");
    std::fs::read(&out).expect("read packed artifact")
}

/// Small signed artifacts: two packed like `hotswapctl module pack` packs,
/// the rest with crafted payloads and signature sets.
pub fn artifact_seeds() -> Vec<Seed> {
    let script: &[u8] = b"#!/bin/sh\necho activated\n";
    let mut seeds = vec![
        (
            "bundle-config.hsm".to_string(),
            packed_module(
                &[
                    ("bin/activate.sh", script, 0o755),
                    ("bin/deactivate.sh", script, 0o755),
                    ("config/greeting.conf", b"greeting = hello\n", 0o644),
                ],
                BUNDLE_CONFIG,
            ),
        ),
        (
            "hello-process.hsm".to_string(),
            packed_module(
                &[
                    ("bin/hello-server", b"#!/bin/sh\nexec sleep 1\n", 0o755),
                    ("config/greeting.conf", b"x\n", 0o644),
                ],
                HELLO_PROCESS,
            ),
        ),
    ];
    let bundle_tar = &tar_seeds()[0].1;
    let bundle_payload = compress(bundle_tar);
    for (name, signatures) in [
        ("unsigned", Signatures::None),
        ("expired", Signatures::Expired),
        ("two-signatures", Signatures::UnknownAndTrusted),
    ] {
        seeds.push((
            format!("{name}.hsm"),
            signed_artifact(MINIMAL_BUNDLE, &bundle_payload, signatures),
        ));
    }
    seeds.push((
        "full-process.hsm".to_string(),
        signed_artifact(FULL_PROCESS, &bundle_payload, Signatures::Trusted),
    ));
    seeds.push((
        "empty-payload.hsm".to_string(),
        signed_artifact(MINIMAL_BUNDLE, &[], Signatures::Trusted),
    ));
    seeds.push((
        "payload-not-zstd.hsm".to_string(),
        signed_artifact(MINIMAL_BUNDLE, b"not zstd at all", Signatures::Trusted),
    ));
    // Hostile payloads behind a valid signature: a leaked publisher key.
    for (name, tar) in tar_seeds().iter().skip(1) {
        let name = name.trim_end_matches(".tar");
        seeds.push((
            format!("hostile-{name}.hsm"),
            signed_artifact(MINIMAL_BUNDLE, &compress(tar), Signatures::Trusted),
        ));
    }
    // A decompression bomb: 4 MiB of zeros, a few hundred bytes packed.
    let bomb = crafted_tar(&[("big", Kind::File(&vec![0u8; 4 << 20], 0o644))]);
    seeds.push((
        "bomb.hsm".to_string(),
        signed_artifact(MINIMAL_BUNDLE, &compress(&bomb), Signatures::Trusted),
    ));
    for (name, bytes) in &seeds {
        assert!(
            bytes.len() <= MAX_SEED_BYTES,
            "seed {name} is {} bytes",
            bytes.len()
        );
    }
    seeds
}

fn compress(tar: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(tar, 3).expect("zstd in memory")
}

/// The selector byte of a message kind in [`MESSAGE_KINDS`].
pub fn selector(kind: &str) -> u8 {
    let index = MESSAGE_KINDS
        .iter()
        .position(|(name, _)| *name == kind)
        .unwrap_or_else(|| panic!("unknown message kind {kind}"));
    u8::try_from(index).expect("fewer than 256 message kinds")
}

fn message_seed<M: Message>(kind: &str, variant: &str, message: &M) -> Seed {
    let mut bytes = vec![selector(kind)];
    bytes.extend(message.encode_to_vec());
    (format!("{kind}-{variant}.pb"), bytes)
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn node_message() -> pb::Node {
    pb::Node {
        id: "3f0b7c1e-0000-4000-8000-000000000001".into(),
        name: "web-1".into(),
        labels: map(&[("environment", "prod"), ("zone", "eu-1")]),
        status: "connected".into(),
        last_seen: Some(ts_from_ms(SIGNED_AT_MS)),
        modules: vec![pb::NodeModule {
            name: "hello".into(),
            version: "1.0.0".into(),
            phase: "running".into(),
            health: "healthy".into(),
            desired_version: "1.1.0".into(),
            restarts: 2,
            metrics: Some(pb::ModuleMetricsView {
                request_rate: 120.5,
                error_rate: 0.01,
                latency_p99_seconds: Some(-1.0),
            }),
            ..Default::default()
        }],
        agent_version: "0.1.0".into(),
        enrolled_at: Some(prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: -1,
        }),
        usage: Some(pb::NodeUsageView {
            cpu_percent: f64::NAN,
            memory_used_bytes: 1 << 30,
            memory_total_bytes: 1 << 33,
        }),
        desired_generation: 7,
        observed_generation: 6,
    }
}

fn deployment_message() -> pb::Deployment {
    pb::Deployment {
        id: "d-1".into(),
        module: "hello".into(),
        version: "1.1.0".into(),
        environment: "prod".into(),
        strategy: "canary".into(),
        state: "running".into(),
        progress: Some(pb::Progress {
            total: 4,
            updated: 1,
            healthy: 1,
            failed: 0,
        }),
        nodes: vec![pb::DeploymentNode {
            node: "web-1".into(),
            from_version: "1.0.0".into(),
            to_version: "1.1.0".into(),
            state: "healthy".into(),
            reason: String::new(),
            wave: 0,
            ..Default::default()
        }],
        created_by: "admin".into(),
        created_at: Some(ts_from_ms(SIGNED_AT_MS)),
        analysis: vec![pb::AnalysisVerdict {
            time: Some(ts_from_ms(FUZZ_NOW_MS)),
            step: 1,
            passed: true,
            summary: "error rate 0.1% <= 1%".into(),
            canary_error_rate: Some(0.001),
            baseline_error_rate: Some(-1.0),
            canary_latency_p99: Some(f64::INFINITY),
            baseline_latency_p99: Some(0.2),
            ..Default::default()
        }],
        wave: 1,
        waves: 3,
        ..Default::default()
    }
}

/// One or two encoded messages of every kind, each prefixed by its selector.
pub fn message_seeds() -> Vec<Seed> {
    let (csr_pem, _key) = pki::generate_csr("node web-1").expect("csr");
    let (ca, _) = CertificateAuthority::generate("seed ca").expect("ca");
    let cert_pem = ca
        .sign_csr(
            &csr_pem,
            &Principal::Node("n-1".into()),
            std::time::Duration::from_secs(3600),
        )
        .expect("sign");
    let user_cert_pem = ca
        .sign_csr(
            &csr_pem,
            &Principal::User("alice".into()),
            std::time::Duration::from_secs(3600),
        )
        .expect("sign");
    let user = pb::User {
        name: "alice".into(),
        role: "deployer".into(),
        created_by: "admin".into(),
        created_at: Some(ts_from_ms(SIGNED_AT_MS)),
        cert_expires_at: Some(ts_from_ms(FUZZ_NOW_MS)),
        cert_fingerprint: format!("sha256:{}", "ef".repeat(32)),
        ..Default::default()
    };
    let cluster = pb::Cluster {
        environment: "prod".into(),
        nodes: 4,
        connected: 3,
        healthy: 2,
        unhealthy: 1,
        modules: vec![pb::ClusterModule {
            name: "hello".into(),
            version: "1.1.0".into(),
            nodes: 3,
            healthy: 2,
        }],
        cpu_percent: Some(12.5),
        request_rate: Some(-1.0),
        latency_p99_seconds: Some(f64::NAN),
        active_deployments: vec!["d-1".into()],
        ..Default::default()
    };
    let small_artifact = signed_artifact(MINIMAL_BUNDLE, &[], Signatures::Trusted);
    let publisher_pem = public_key_pem(&fuzz_publisher_key().verifying_key());
    let status = pb::StatusReport {
        modules: vec![pb::ModuleStatus {
            name: "hello".into(),
            version: "1.0.0".into(),
            phase: "running".into(),
            health: "healthy".into(),
            crash_loop: true,
            metrics: Some(pb::ModuleMetrics {
                request_rate: 10.0,
                error_rate: 0.5,
                latency_p99_seconds: Some(0.25),
                interval_seconds: 5.0,
            }),
            pid: 4242,
            ..Default::default()
        }],
        observed_generation: 3,
        usage: Some(pb::NodeUsage {
            cpu_percent: 12.5,
            memory_used_bytes: 1 << 28,
            memory_total_bytes: 1 << 32,
        }),
        desired_generation: 4,
    };
    let module = pb::Module {
        name: "hello".into(),
        versions: vec![pb::ModuleVersion {
            version: "1.0.0".into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            size: 1234,
            signed_by: vec!["ci".into()],
            pushed_at: Some(ts_from_ms(SIGNED_AT_MS)),
            runtime: "bundle".into(),
            created: true,
            ..Default::default()
        }],
    };
    let key = pb::PublisherKey {
        name: "ci".into(),
        key_id: keys::key_id(&fuzz_publisher_key().verifying_key()),
        public_key_pem: publisher_pem.clone(),
        added_at: Some(ts_from_ms(SIGNED_AT_MS)),
        added_by: "admin".into(),
        revoked_at: Some(ts_from_ms(FUZZ_NOW_MS)),
    };
    vec![
        message_seed(
            "EnrollRequest",
            "csr",
            &pb::EnrollRequest {
                join_token: "hst_0123456789abcdef".into(),
                csr_pem: csr_pem.clone(),
                name: "web-1".into(),
                labels: map(&[("environment", "prod"), ("zone", "eu-1")]),
                agent_version: "0.1.0".into(),
            },
        ),
        message_seed(
            "EnrollRequest",
            "bad-labels",
            &pb::EnrollRequest {
                join_token: "t".into(),
                csr_pem:
                    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                        .into(),
                name: "Web 1".into(),
                labels: map(&[("Env", "a b")]),
                agent_version: String::new(),
            },
        ),
        message_seed(
            "AgentMessage",
            "hello",
            &pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                    node_id: "3f0b7c1e-0000-4000-8000-000000000001".into(),
                    name: "web-1".into(),
                    labels: map(&[("environment", "prod")]),
                    agent_version: "0.1.0".into(),
                })),
            },
        ),
        message_seed(
            "AgentMessage",
            "heartbeat",
            &pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat { seq: 99 })),
            },
        ),
        message_seed(
            "AgentMessage",
            "status",
            &pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Status(status)),
            },
        ),
        message_seed(
            "PushArtifactChunk",
            "artifact",
            &pb::PushArtifactChunk {
                data: small_artifact,
            },
        ),
        message_seed(
            "CreateDeploymentRequest",
            "canary",
            &pb::CreateDeploymentRequest {
                module: "hello".into(),
                version: "1.1.0".into(),
                environment: "prod".into(),
                options: Some(pb::DeploymentOptions {
                    strategy: "canary".into(),
                    selector: map(&[("zone", "eu-1")]),
                    batch_size: "25%".into(),
                    max_failures: Some(-1),
                    steps: vec![10, 50, 100],
                    step_duration_ms: 60_000,
                    manual_promote: true,
                    bake_time_ms: 1000,
                    min_healthy_time_ms: 2000,
                    health_deadline_ms: 30_000,
                    max_error_rate: Some(0.01),
                    max_latency_increase: Some(1.5),
                    no_auto_rollback: false,
                    progress_deadline_ms: 600_000,
                    allow_downgrade: false,
                    ..Default::default()
                }),
                dry_run: true,
            },
        ),
        message_seed(
            "ControlDeploymentRequest",
            "promote",
            &pb::ControlDeploymentRequest {
                id: "d-1".into(),
                action: "promote".into(),
                reason: "looks good".into(),
            },
        ),
        message_seed(
            "SetNodeModuleRequest",
            "staged",
            &pb::SetNodeModuleRequest {
                node: "web-1".into(),
                module: "hello".into(),
                version: "1.0.0".into(),
                staged_version: "1.1.0-beta.1".into(),
            },
        ),
        message_seed(
            "UnsetNodeModuleRequest",
            "hello",
            &pb::UnsetNodeModuleRequest {
                node: "web-1".into(),
                module: "hello".into(),
            },
        ),
        message_seed(
            "CreateTokenRequest",
            "labels",
            &pb::CreateTokenRequest {
                ttl_seconds: 3600,
                uses: 3,
                labels: map(&[("environment", "staging")]),
            },
        ),
        message_seed(
            "TrustKeyRequest",
            "ci",
            &pb::TrustKeyRequest {
                name: "ci".into(),
                public_key_pem: publisher_pem,
            },
        ),
        message_seed(
            "RevokeKeyRequest",
            "ci",
            &pb::RevokeKeyRequest { name: "ci".into() },
        ),
        message_seed(
            "DescribeArtifactRequest",
            "hello",
            &pb::DescribeArtifactRequest {
                name: "hello".into(),
                version: "1.0.0".into(),
            },
        ),
        message_seed(
            "FetchArtifactRequest",
            "resume",
            &pb::FetchArtifactRequest {
                digest: format!("sha256:{}", "0f".repeat(32)),
                offset: 262_144,
            },
        ),
        message_seed(
            "GetModuleRequest",
            "hello",
            &pb::GetModuleRequest {
                name: "hello".into(),
            },
        ),
        message_seed("ListModulesRequest", "empty", &pb::ListModulesRequest {}),
        message_seed("ListKeysRequest", "empty", &pb::ListKeysRequest {}),
        message_seed(
            "ListDeploymentsRequest",
            "active",
            &pb::ListDeploymentsRequest {
                module: "hello".into(),
                environment: "prod".into(),
                active_only: true,
            },
        ),
        message_seed(
            "GetDeploymentRequest",
            "id",
            &pb::GetDeploymentRequest { id: "d-1".into() },
        ),
        message_seed(
            "RunPipelineRequest",
            "to-prod",
            &pb::RunPipelineRequest {
                module: "hello".into(),
                version: "1.1.0".into(),
                to: "prod".into(),
                allow_downgrade: false,
                ..Default::default()
            },
        ),
        message_seed(
            "GetPipelineRequest",
            "id",
            &pb::GetPipelineRequest { id: "p-1".into() },
        ),
        message_seed(
            "ListNodesRequest",
            "env",
            &pb::ListNodesRequest {
                environment: "prod".into(),
            },
        ),
        message_seed(
            "GetNodeRequest",
            "name",
            &pb::GetNodeRequest {
                node: "web-1".into(),
            },
        ),
        message_seed(
            "RemoveNodeRequest",
            "name",
            &pb::RemoveNodeRequest {
                node: "web-1".into(),
            },
        ),
        message_seed("WatchNodesRequest", "empty", &pb::WatchNodesRequest {}),
        message_seed(
            "EnrollResponse",
            "certificate",
            &pb::EnrollResponse {
                node_id: "n-1".into(),
                certificate_pem: cert_pem,
                ca_certificate_pem: ca.cert_pem().to_string(),
                labels: map(&[("environment", "prod")]),
            },
        ),
        message_seed(
            "ControlMessage",
            "welcome",
            &pb::ControlMessage {
                msg: Some(pb::control_message::Msg::Welcome(pb::Welcome {
                    node_id: "n-1".into(),
                    heartbeat_interval_ms: 1000,
                    labels: map(&[("environment", "prod")]),
                })),
            },
        ),
        message_seed(
            "ControlMessage",
            "desired",
            &pb::ControlMessage {
                msg: Some(pb::control_message::Msg::Desired(pb::DesiredState {
                    generation: 5,
                    modules: vec![pb::DesiredModule {
                        name: "hello".into(),
                        staged_version: "1.1.0".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
            },
        ),
        message_seed(
            "ArtifactDescriptor",
            "signed",
            &pb::ArtifactDescriptor {
                name: "hello".into(),
                version: "1.0.0".into(),
                digest: format!("sha256:{}", "ab".repeat(32)),
                size: 1234,
                signatures: vec![pb::ArtifactSignature {
                    key_id: keys::key_id(&fuzz_publisher_key().verifying_key()),
                    signed_at_ms: SIGNED_AT_MS,
                    expires_at_ms: 0,
                    signature: vec![7; 64],
                }],
                trusted_keys: vec![pb::PublisherKey {
                    name: "ci".into(),
                    key_id: keys::key_id(&fuzz_publisher_key().verifying_key()),
                    public_key_pem: public_key_pem(&fuzz_publisher_key().verifying_key()),
                    ..Default::default()
                }],
                trusted_keys_included: true,
            },
        ),
        message_seed(
            "ArtifactChunk",
            "data",
            &pb::ArtifactChunk {
                offset: 4096,
                data: b"chunk".to_vec().into(),
            },
        ),
        message_seed(
            "Token",
            "labels",
            &pb::Token {
                token: "hst_0123456789abcdef".into(),
                ca_fingerprint: format!("sha256:{}", "cd".repeat(32)),
                expires_at: Some(ts_from_ms(FUZZ_NOW_MS)),
                uses: 1,
                labels: map(&[("environment", "dev")]),
            },
        ),
        message_seed("Node", "full", &node_message()),
        message_seed(
            "NodeUpdate",
            "snapshot",
            &pb::NodeUpdate {
                node: Some(node_message()),
                snapshot: true,
                removed: false,
            },
        ),
        message_seed(
            "ListNodesResponse",
            "one",
            &pb::ListNodesResponse {
                nodes: vec![node_message()],
            },
        ),
        message_seed("Module", "one-version", &module),
        message_seed(
            "ListModulesResponse",
            "one",
            &pb::ListModulesResponse {
                modules: vec![module.clone()],
            },
        ),
        message_seed("ModuleVersion", "pushed", &module.versions[0]),
        message_seed("PublisherKey", "revoked", &key),
        message_seed(
            "ListKeysResponse",
            "one",
            &pb::ListKeysResponse { keys: vec![key] },
        ),
        message_seed("Deployment", "canary", &deployment_message()),
        message_seed(
            "ListDeploymentsResponse",
            "one",
            &pb::ListDeploymentsResponse {
                deployments: vec![deployment_message()],
            },
        ),
        message_seed(
            "CreateDeploymentResponse",
            "plan",
            &pb::CreateDeploymentResponse {
                deployment: Some(deployment_message()),
                plan: Some(pb::Plan {
                    strategy: "rolling".into(),
                    waves: vec![pb::Wave {
                        nodes: vec!["web-1".into()],
                        gate: "healthy".into(),
                        ..Default::default()
                    }],
                    gates: vec!["healthy".into()],
                }),
            },
        ),
        message_seed(
            "Pipeline",
            "running",
            &pb::Pipeline {
                id: "p-1".into(),
                module: "hello".into(),
                version: "1.1.0".into(),
                state: "running".into(),
                stages: vec![pb::PipelineStage {
                    environment: "staging".into(),
                    deployment_id: "d-1".into(),
                    state: "succeeded".into(),
                    reason: String::new(),
                }],
                reason: String::new(),
                created_by: "admin".into(),
                created_at: Some(ts_from_ms(SIGNED_AT_MS)),
                finished_at: Some(prost_types::Timestamp {
                    seconds: i64::MIN,
                    nanos: i32::MAX,
                }),
                target: "staging".into(),
            },
        ),
        message_seed(
            "RenewCertificateRequest",
            "csr",
            &pb::RenewCertificateRequest {
                csr_pem: csr_pem.clone(),
            },
        ),
        message_seed(
            "CreateUserRequest",
            "deployer",
            &pb::CreateUserRequest {
                name: "alice".into(),
                role: "deployer".into(),
                csr_pem,
                validity_seconds: 86_400,
            },
        ),
        message_seed(
            "SetUserRoleRequest",
            "approver",
            &pb::SetUserRoleRequest {
                name: "alice".into(),
                role: "approver".into(),
            },
        ),
        message_seed(
            "RevokeUserRequest",
            "alice",
            &pb::RevokeUserRequest {
                name: "alice".into(),
            },
        ),
        message_seed("ListUsersRequest", "empty", &pb::ListUsersRequest {}),
        message_seed(
            "ListAuditRequest",
            "filtered",
            &pb::ListAuditRequest {
                since: 10,
                limit: 100,
                user: "alice".into(),
                action: "deploy.".into(),
                result: "denied".into(),
            },
        ),
        message_seed("VerifyAuditRequest", "empty", &pb::VerifyAuditRequest {}),
        message_seed(
            "RenewCertificateResponse",
            "certificate",
            &pb::RenewCertificateResponse {
                certificate_pem: user_cert_pem.clone(),
                ca_certificate_pem: ca.cert_pem().to_string(),
            },
        ),
        message_seed(
            "CreateUserResponse",
            "certificate",
            &pb::CreateUserResponse {
                user: Some(user.clone()),
                certificate_pem: user_cert_pem,
                ca_certificate_pem: ca.cert_pem().to_string(),
            },
        ),
        message_seed(
            "ListUsersResponse",
            "one",
            &pb::ListUsersResponse { users: vec![user] },
        ),
        message_seed(
            "ListAuditResponse",
            "one",
            &pb::ListAuditResponse {
                records: vec![pb::AuditRecord {
                    seq: 11,
                    time: Some(ts_from_ms(SIGNED_AT_MS)),
                    user: "alice".into(),
                    role: "deployer".into(),
                    action: "deploy.create".into(),
                    target: "hello@1.1.0".into(),
                    result: "ok".into(),
                    prev_hash: "ab".repeat(32),
                    hash: "cd".repeat(32),
                    ..Default::default()
                }],
            },
        ),
        message_seed(
            "VerifyAuditResponse",
            "broken",
            &pb::VerifyAuditResponse {
                intact: false,
                records: 12,
                head_hash: "cd".repeat(32),
                broken_seq: 7,
                ..Default::default()
            },
        ),
        message_seed(
            "WatchEventsRequest",
            "follow",
            &pb::WatchEventsRequest {
                since: 100,
                follow: true,
                kinds: vec!["deployment.".into(), "node.connected".into()],
                module: "hello".into(),
                limit: 50,
                ..Default::default()
            },
        ),
        message_seed("ListClustersRequest", "empty", &pb::ListClustersRequest {}),
        message_seed(
            "GetClusterRequest",
            "prod",
            &pb::GetClusterRequest {
                environment: "prod".into(),
            },
        ),
        message_seed(
            "Event",
            "deployment",
            &pb::Event {
                seq: 101,
                time: Some(ts_from_ms(SIGNED_AT_MS)),
                kind: "deployment.wave_started".into(),
                deployment_id: "d-1".into(),
                module: "hello".into(),
                version: "1.1.0".into(),
                message: "wave 2 of 3".into(),
                ..Default::default()
            },
        ),
        message_seed(
            "ListClustersResponse",
            "one",
            &pb::ListClustersResponse {
                clusters: vec![cluster.clone()],
            },
        ),
        message_seed("Cluster", "prod", &cluster),
    ]
}

/// Write every seed under `corpus/<target>/`, creating the directories.
pub fn write_all(corpus: &Path) -> std::io::Result<usize> {
    let sets = [
        ("manifest", manifest_seeds()),
        ("artifact", artifact_seeds()),
        ("unpack", tar_seeds()),
        ("messages", message_seeds()),
    ];
    let mut written = 0;
    for (target, seeds) in sets {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
            written += 1;
        }
    }
    Ok(written)
}
