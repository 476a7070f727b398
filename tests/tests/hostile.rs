//! Hostile peers against the real binaries: a compromised node lying in its
//! status reports, and clients sending what no honest one sends.

use hotswap_common::pb;
use hotswap_common::pb::agent_message::Msg as AgentMsg;
use hotswap_common::pb::control_message::Msg as ControlMsg;
use hotswap_common::profile::Profile;
use hotswap_common::tls::{self, ControlPlaneUrl, ServerTrust};
use hotswap_tests::{ControlPlane, Fleet, TestDir, channel_for, eventually, patience, runtime};
use serde_json::Value;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

fn events(cp: &ControlPlane, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["-o", "json", "events"];
    args.extend_from_slice(extra);
    let out = cp.ctl(&args);
    assert_eq!(out.code, 0, "{out:?}");
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A report no honest agent sends: 20,000 made-up modules (set `round % 2`,
/// so consecutive reports replace every one of them), the real module with
/// NaN and infinite metrics, a node with more memory used than exists, and
/// generations the control plane never sent.
fn lying_report(round: usize) -> pb::AgentMessage {
    let mut modules: Vec<pb::ModuleStatus> = (0..20_000)
        .map(|i| pb::ModuleStatus {
            name: format!("fake-{}-{i}", round % 2),
            version: "6.6.6".into(),
            phase: "running".into(),
            health: "healthy".into(),
            ..Default::default()
        })
        .collect();
    modules.push(pb::ModuleStatus {
        name: "hello".into(),
        version: "1.0.0".into(),
        phase: "running".into(),
        health: "healthy".into(),
        message: "x".repeat(100_000),
        metrics: Some(pb::ModuleMetrics {
            request_rate: f64::NAN,
            error_rate: f64::INFINITY,
            latency_p99_seconds: Some(f64::INFINITY),
            interval_seconds: 5.0,
        }),
        ..Default::default()
    });
    pb::AgentMessage {
        msg: Some(AgentMsg::Status(pb::StatusReport {
            modules,
            observed_generation: u64::MAX,
            desired_generation: u64::MAX,
            usage: Some(pb::NodeUsage {
                cpu_percent: f64::INFINITY,
                memory_used_bytes: u64::MAX / 2,
                memory_total_bytes: u64::MAX,
            }),
        })),
    }
}

/// Every number in a JSON value, with its path.
fn numbers(value: &Value, path: String, out: &mut Vec<(String, f64)>) {
    match value {
        Value::Number(n) => out.push((path, n.as_f64().unwrap_or(f64::NAN))),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                numbers(v, format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                numbers(v, format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn a_compromised_node_cannot_flush_the_event_log_or_show_absurd_values() {
    let dir = TestDir::new();
    let (mut fleet, _) = Fleet::start_many(&dir, "dev", &["good", "evil"]);
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
    let deployment = out.last_json_line()["id"]
        .as_str()
        .expect("deployment id")
        .to_string();
    let deployment_events = || events(&fleet.cp, &["--deployment", &deployment, "--since", "0"]);
    let before = deployment_events();
    assert!(
        before.iter().any(|e| e["kind"] == "deployment.created"),
        "{before:?}"
    );

    // The attacker holds evil's key and certificate; its agent is gone.
    let evil = &mut fleet.others[0];
    evil.stop();
    let profile = evil.node_profile(&fleet.cp.url());
    let evil_id = evil.node_id();
    fleet.cp.wait_status("evil", "disconnected");
    let events_before = fleet.cp.metric("hotswap_events_total");
    let rss_before = rss_kib(fleet.cp.pid());

    let rt = runtime();
    let _entered = rt.enter();
    let channel = channel_for(&profile, &fleet.cp.url());
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(4);
    let mut inbound = rt.block_on(async {
        tx.send(pb::AgentMessage {
            msg: Some(AgentMsg::Hello(pb::Hello {
                node_id: evil_id.clone(),
                name: "evil".into(),
                agent_version: "evil".into(),
                labels: [("environment".to_string(), "dev".to_string())].into(),
            })),
        })
        .await
        .expect("queue hello");
        pb::agent_session_client::AgentSessionClient::new(channel)
            .max_encoding_message_size(16 << 20)
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("session opens")
            .into_inner()
    });
    // A heartbeat is answered once every message before it was handled.
    let heartbeat = |seq: u64, inbound: &mut tonic::Streaming<pb::ControlMessage>| {
        rt.block_on(async {
            tx.send(pb::AgentMessage {
                msg: Some(AgentMsg::Heartbeat(pb::Heartbeat { seq })),
            })
            .await
            .expect("session still open");
            tokio::time::timeout(patience() * 4, async {
                loop {
                    match inbound.message().await {
                        Ok(Some(pb::ControlMessage {
                            msg: Some(ControlMsg::HeartbeatAck(ack)),
                        })) if ack.seq == seq => return,
                        Ok(Some(_)) => continue,
                        other => panic!("session ended: {other:?}"),
                    }
                }
            })
            .await
            .expect("heartbeat acknowledged in time")
        })
    };
    for round in 0..6 {
        rt.block_on(tx.send(lying_report(round)))
            .expect("session still open");
    }
    heartbeat(1, &mut inbound);

    // The node's lies stayed within what a node may claim.
    let appended = fleet.cp.metric("hotswap_events_total") - events_before;
    assert!(
        appended <= 200.0,
        "{appended} events appended for one node's reports"
    );
    let suppressed = fleet.cp.metric("hotswap_events_suppressed_total");
    assert!(suppressed > 0.0, "events beyond the budget are counted");
    assert!(fleet.cp.metric("hotswap_report_claims_dropped_total") >= 6.0 * 20_000.0 - 100.0);
    let after = deployment_events();
    assert_eq!(
        after.len(),
        before.len(),
        "the deployment's events are all still in the log"
    );
    let node = fleet.cp.ctl(&["-o", "json", "nodes", "get", "evil"]).json();
    let modules = node["modules"].as_array().expect("modules");
    assert!(modules.len() <= 17, "{} modules kept", modules.len());
    let hello = modules
        .iter()
        .find(|m| m["name"] == "hello")
        .expect("the desired module is kept");
    assert!(hello.get("metrics").is_none_or(Value::is_null), "{hello}");
    assert!(hello["message"].as_str().is_some_and(|m| m.len() <= 1024));
    assert_ne!(node["observed_generation"], u64::MAX, "{node}");
    assert!(node.get("usage").is_none_or(Value::is_null), "{node}");

    let cluster = fleet.cp.ctl(&["-o", "json", "clusters", "get", "dev"]);
    let cluster: Value = serde_json::from_str(&cluster.stdout).expect("cluster json");
    let mut values = Vec::new();
    numbers(&cluster, String::new(), &mut values);
    for (path, value) in &values {
        assert!(
            value.is_finite() && *value < (1u64 << 50) as f64,
            "clusters get: {path} = {value}"
        );
    }
    // Unknown (null) is fine; a number must be a believable one.
    assert!(
        cluster["error_rate"].as_f64().is_none_or(|e| e <= 1.0),
        "{cluster}"
    );
    assert!(
        cluster["cpu_percent"].as_f64().is_none_or(|c| c <= 100.0),
        "{cluster}"
    );
    let table = fleet.cp.ctl(&["clusters", "get", "dev"]);
    assert_eq!(table.code, 0, "{table:?}");
    for absurd in ["inf", "NaN"] {
        assert!(!table.stdout.contains(absurd), "{}", table.stdout);
    }

    let rss_after = rss_kib(fleet.cp.pid());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "control plane grew from {rss_before} KiB to {rss_after} KiB"
    );
    let log = fleet.cp.log();
    assert!(
        log.contains("status report claims dropped"),
        "the lies are logged"
    );
    // Each dropped claim is named by its field path in the report.
    for named in [
        "modules[20000].metrics.request_rate: must be within 0..=1000000000, got NaN",
        "usage.cpu_percent: must be within 0..=100, got inf",
        "desired_generation: 18446744073709551615 is beyond",
    ] {
        assert!(log.contains(named), "the log lacks {named:?}");
    }

    // Nothing crashed: the session still answers, the rest of the fleet works.
    heartbeat(2, &mut inbound);
    assert_eq!(fleet.cp.node_status("good").as_deref(), Some("connected"));
    assert_eq!(fleet.cp.node_status("evil").as_deref(), Some("connected"));
    drop(tx);
    fleet.cp.wait_status("evil", "disconnected");
    // What was held back is told, once, when the session ends.
    let summaries = eventually("a summary of the suppressed events", || {
        let found = events(
            &fleet.cp,
            &["--kind", "node.events_suppressed", "--node", "evil"],
        );
        if found.is_empty() {
            Err("none yet".to_string())
        } else {
            Ok(found)
        }
    });
    assert!(
        summaries.len() <= 2,
        "at most one summary per 10 s: {summaries:?}"
    );
    assert!(
        summaries[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("events of this node suppressed")),
        "{summaries:?}"
    );

    // A hello that does not convert is refused before the session starts,
    // naming the field.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(1);
    let refused = rt.block_on(async {
        tx.send(pb::AgentMessage {
            msg: Some(AgentMsg::Hello(pb::Hello {
                node_id: evil_id.clone(),
                name: "evil".into(),
                agent_version: "evil".into(),
                labels: [("bad key!".to_string(), "dev".to_string())].into(),
            })),
        })
        .await
        .expect("queue hello");
        pb::agent_session_client::AgentSessionClient::new(channel_for(&profile, &fleet.cp.url()))
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect_err("a hello with an invalid label is refused")
    });
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().starts_with("hello.labels: "),
        "{refused:?}"
    );
    assert_eq!(
        fleet.cp.node_status("evil").as_deref(),
        Some("disconnected")
    );
}

#[test]
fn absurd_deploy_and_token_options_are_refused_by_name() {
    let dir = TestDir::new();
    let (fleet, _) = Fleet::start_many(&dir, "dev", &["a"]);
    fleet.push_hello_per_node("1.0.0", "");
    let deploy = |extra: &[&str]| {
        let mut args = vec!["deploy", "create", "hello@1.0.0", "--env", "dev"];
        args.extend_from_slice(extra);
        fleet.cp.ctl(&args)
    };
    // The same options in range are accepted, so the refusals below are
    // the values' doing.
    for (strategy, extra) in [
        (
            "canary",
            ["--max-error-rate", "0.5", "--step-duration", "10m"],
        ),
        (
            "canary",
            ["--max-latency-increase", "2", "--health-deadline", "1h"],
        ),
        ("blue-green", ["--bake-time", "1h", "--pause-timeout", "1h"]),
        (
            "rolling",
            ["--min-healthy-time", "30s", "--max-error-rate", "0"],
        ),
    ] {
        let mut args = vec!["--dry-run", "--strategy", strategy];
        args.extend_from_slice(&extra);
        let out = deploy(&args);
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
    }
    let cases: &[(&str, &[&str])] = &[
        ("--max-error-rate", &["--max-error-rate", "NaN"]),
        ("--max-error-rate", &["--max-error-rate=-0.5"]),
        ("--max-error-rate", &["--max-error-rate", "inf"]),
        ("--max-error-rate", &["--max-error-rate", "1.5"]),
        ("--max-latency-increase", &["--max-latency-increase=-5"]),
        ("--max-latency-increase", &["--max-latency-increase", "NaN"]),
        ("--max-latency-increase", &["--max-latency-increase", "inf"]),
        ("--max-latency-increase", &["--max-latency-increase", "0.5"]),
        (
            "--step-duration",
            &["--strategy", "canary", "--step-duration", "100000000y"],
        ),
        (
            "--step-duration",
            &["--strategy", "canary", "--step-duration", "367d"],
        ),
        (
            "--bake-time",
            &["--strategy", "blue-green", "--bake-time", "2y"],
        ),
        (
            "--min-healthy-time",
            &["--strategy", "rolling", "--min-healthy-time", "500000000y"],
        ),
        ("--health-deadline", &["--health-deadline", "100000000y"]),
        ("--pause-timeout", &["--pause-timeout", "100000000y"]),
    ];
    for (flag, args) in cases {
        let out = deploy(args);
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(out.stderr.contains(flag), "{args:?} names {flag}: {out:?}");
    }
    let list = fleet.cp.ctl(&["-o", "json", "deploy", "list"]).json();
    assert_eq!(list, serde_json::json!([]), "nothing was created");

    let tokens_created = || {
        let audit = fleet.cp.ctl(&["-o", "json", "audit", "list"]).json();
        audit
            .as_array()
            .expect("audit records")
            .iter()
            .filter(|r| r["action"] == "tokens.create" && r["result"] == "ok")
            .count()
    };
    let tokens_before = tokens_created();
    for (ttl, why) in [
        ("0s", "below 1s"),
        ("500ms", "below 1s"),
        ("400d", "maximum"),
    ] {
        let out = fleet.cp.ctl(&["tokens", "create", "--ttl", ttl]);
        assert_eq!(out.code, 1, "--ttl {ttl}: {out:?}");
        assert!(
            out.stderr.contains("--ttl") && out.stderr.contains(why),
            "--ttl {ttl}: {out:?}"
        );
    }
    assert_eq!(tokens_created(), tokens_before, "no token was created");
}

/// A codec that sends and receives raw bytes: what a client with a broken
/// (or hostile) protobuf encoder puts on the wire.
#[derive(Clone, Copy, Default)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let len = bytes::Buf::remaining(buf);
        Ok(Some(bytes::Buf::copy_to_bytes(buf, len).to_vec()))
    }
}

#[test]
fn malformed_protobuf_is_invalid_argument() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let rt = runtime();
    let _entered = rt.enter();
    let operator = channel_for(&cp.admin_profile(), &cp.url());
    // Enrollment takes callers without a certificate.
    let anonymous = {
        let profile = Profile::load(&cp.admin_profile()).expect("profile");
        let config =
            tls::client_config(ServerTrust::Ca(profile.ca_cert.clone()), None).expect("tls config");
        tls::connect_lazy(
            &ControlPlaneUrl::parse(&cp.url()).expect("url"),
            config,
            &Default::default(),
        )
        .expect("channel")
    };
    let garbage: [&[u8]; 3] = [
        // Field 1, length 5, one byte of it.
        &[0x0a, 0x05, 0x01],
        // A tag varint that never ends.
        &[0xff; 16],
        // Wire type 7 does not exist.
        &[0x0f, 0x00],
    ];
    for (channel, path) in [
        (operator.clone(), "/hotswap.v1.Fleet/ListNodes"),
        (operator, "/hotswap.v1.Events/WatchEvents"),
        (anonymous, "/hotswap.v1.Enrollment/Enroll"),
    ] {
        for bytes in garbage {
            let status = rt.block_on(async {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready().await.expect("channel ready");
                grpc.unary(
                    tonic::Request::new(bytes.to_vec()),
                    tonic::codegen::http::uri::PathAndQuery::from_static(path),
                    RawBytes,
                )
                .await
                .expect_err("garbage is refused")
            });
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{path} with {bytes:?}: {status:?}"
            );
            assert!(
                status.message().contains("message is not a valid "),
                "{path}: {status:?}"
            );
        }
    }
    // Still serving.
    cp.ctl(&["nodes", "list"]).ok();
}

#[test]
fn half_sent_admin_requests_are_closed() {
    use std::io::{Read, Write};
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let admin = cp.admin.expect("admin address");
    let start = std::time::Instant::now();
    let mut sockets: Vec<std::net::TcpStream> = (0..200)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(admin).expect("connect");
            // Headers begun, never finished.
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .expect("write");
            s
        })
        .collect();
    // The header read timeout (5 s) plus slack for a loaded machine.
    let deadline = start + std::time::Duration::from_secs(5) + patience();
    for (i, socket) in sockets.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        socket
            .set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        loop {
            match socket.read(&mut buf) {
                Ok(0) => break,
                // A 408 or an error page before the close is fine.
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!(
                        "half-sent request {i} still open after {:?}",
                        start.elapsed()
                    )
                }
                // Reset: closed too.
                Err(_) => break,
            }
        }
    }
    drop(sockets);
    // Nothing is held after them: probes are answered.
    let (code, body) = cp.admin_get("/healthz");
    assert_eq!((code, body.trim()), (200, "ok"));
}
