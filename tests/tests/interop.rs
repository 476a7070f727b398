//! Interop with independent implementations: Python grpcio as a gRPC client
//! (server reflection, the standard health service, a read API called from
//! descriptors learnt by reflection alone) and Debian's Prometheus scraping
//! the admin endpoint. Both tools come from `scripts/ci-deps.sh`; when they
//! are missing these tests fail instead of skipping.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use hotswap_tests::{ControlPlane, TestDir, eventually, free_port, http_get};
use serde_json::Value;

const INSTALL_HINT: &str =
    "run `scripts/ci-deps.sh` as root to install it (`make test` does when run as root)";

/// The grpcio client. Arguments: the admin profile, the gRPC address. Prints
/// a JSON summary on its last line; any failed expectation raises.
const CLIENT_PY: &str = r#"
import json
import sys
import tomllib

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

TIMEOUT = 10

with open(sys.argv[1], "rb") as f:
    profile = tomllib.load(f)
target = sys.argv[2]
ca = profile["ca_cert"].encode()
# The server certificate names localhost and 127.0.0.1, so the address
# verifies as it is, without grpc.ssl_target_name_override.
options = []
mtls = grpc.secure_channel(
    target,
    grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=profile["client_key"].encode(),
        certificate_chain=profile["client_cert"].encode(),
    ),
    options,
)
grpc.channel_ready_future(mtls).result(timeout=TIMEOUT)
summary = {}

# Reflection v1alpha, through grpcio-reflection's descriptor database.
database = ProtoReflectionDescriptorDatabase(mtls)
services = sorted(database.get_services())
summary["services_v1alpha"] = services
for name in ("hotswap.v1.Fleet", "hotswap.v1.Deployments", "grpc.health.v1.Health"):
    assert name in services, f"{name} not listed by reflection: {services}"

# Reflection v1: same messages on the wire, another service path.
list_v1 = mtls.stream_stream(
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
)
responses = list(
    list_v1(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT)
)
assert len(responses) == 1, responses
summary["services_v1"] = sorted(s.name for s in responses[0].list_services_response.service)

# Health: overall and per service.
health = health_pb2_grpc.HealthStub(mtls)
serving = health_pb2.HealthCheckResponse.SERVING
summary["health"] = {}
for service in ("", "hotswap.v1.Fleet"):
    reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
    assert reply.status == serving, f"health of {service!r}: {reply}"
    summary["health"][service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
try:
    health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT)
    raise AssertionError("health of an unknown service answered")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.NOT_FOUND, e

# A read API, with message classes built from reflected descriptors only.
pool = descriptor_pool.DescriptorPool(database)
method = pool.FindMethodByName("hotswap.v1.Fleet.ListNodes")
request_class = message_factory.GetMessageClass(method.input_type)
response_class = message_factory.GetMessageClass(method.output_type)
list_nodes = mtls.unary_unary(
    "/hotswap.v1.Fleet/ListNodes",
    request_serializer=request_class.SerializeToString,
    response_deserializer=response_class.FromString,
)
nodes = list_nodes(request_class(), timeout=TIMEOUT)
assert nodes.DESCRIPTOR.full_name == "hotswap.v1.ListNodesResponse", nodes.DESCRIPTOR.full_name
summary["list_nodes"] = {"type": nodes.DESCRIPTOR.full_name, "nodes": len(nodes.nodes)}

# Without a client certificate: health still answers (documented in
# SECURITY.md), the fleet API refuses.
anonymous = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca), options)
reply = health_pb2_grpc.HealthStub(anonymous).Check(
    health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT
)
assert reply.status == serving, reply
try:
    anonymous.unary_unary(
        "/hotswap.v1.Fleet/ListNodes",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )(request_class(), timeout=TIMEOUT)
    raise AssertionError("ListNodes answered a client without a certificate")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
    summary["anonymous_list_nodes"] = e.code().name

print(json.dumps(summary))
"#;

/// Fail (not skip) when the Python side is missing.
fn require_python_grpc() {
    let probe = Command::new("python3")
        .args([
            "-c",
            "import tomllib, grpc, grpc_reflection, grpc_health, google.protobuf",
        ])
        .output()
        .unwrap_or_else(|e| panic!("python3 is not available ({e}): {INSTALL_HINT}"));
    assert!(
        probe.status.success(),
        "python3 lacks grpcio, grpcio-reflection, grpcio-health-checking or protobuf: {INSTALL_HINT}\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
}

#[test]
fn grpcio_client_uses_reflection_health_and_fleet_api() {
    require_python_grpc();
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let script = dir.path().join("client.py");
    std::fs::write(&script, CLIENT_PY).expect("write client.py");
    let grpc = cp.grpc.expect("started").to_string();
    let output = Command::new("python3")
        .arg(&script)
        .arg(cp.admin_profile())
        .arg(&grpc)
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "grpcio client failed with {}:\nstdout:\n{stdout}\nstderr:\n{stderr}\ncontrol plane log:\n{}",
        output.status,
        cp.log()
    );
    let summary: Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no JSON summary from the client: {stdout}"));
    let listed = |key: &str| -> Vec<String> {
        summary[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} missing: {summary}"))
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    for key in ["services_v1alpha", "services_v1"] {
        let services = listed(key);
        for name in [
            "hotswap.v1.Fleet",
            "hotswap.v1.Deployments",
            "grpc.health.v1.Health",
        ] {
            assert!(
                services.iter().any(|s| s == name),
                "{key}: {name} missing from {services:?}"
            );
        }
    }
    assert!(
        listed("services_v1")
            .iter()
            .any(|s| s == "grpc.reflection.v1.ServerReflection"),
        "{summary}"
    );
    assert_eq!(summary["health"][""], "SERVING", "{summary}");
    assert_eq!(
        summary["health"]["hotswap.v1.Fleet"], "SERVING",
        "{summary}"
    );
    assert_eq!(
        summary["list_nodes"]["type"], "hotswap.v1.ListNodesResponse",
        "{summary}"
    );
    assert_eq!(summary["list_nodes"]["nodes"], 0, "{summary}");
    assert_eq!(
        summary["anonymous_list_nodes"], "UNAUTHENTICATED",
        "{summary}"
    );
    cp.stop();
}

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A Prometheus server, killed on drop; its log is printed if the test fails.
struct Prometheus {
    child: Child,
    log: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(work: &Path, target: SocketAddr) -> Self {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} not found: {INSTALL_HINT}"
        );
        let config = work.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: hotswap-control-plane\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = work.join("prometheus.log");
        let out = std::fs::File::create(&log).expect("prometheus log");
        let err = out.try_clone().expect("prometheus log");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                work.join("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {PROMETHEUS}: {e}"));
        Self { child, log, addr }
    }

    /// `GET /api/v1/query?query=QUERY`: the result vector.
    fn query(&mut self, query: &str) -> Result<Vec<Value>, String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "prometheus exited with {status}:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        if std::net::TcpStream::connect(self.addr).is_err() {
            return Err("prometheus is not listening yet".into());
        }
        let (code, body) = http_get(self.addr, &format!("/api/v1/query?query={query}"));
        // The body may come chunked: take the JSON object itself.
        let json = match (body.find('{'), body.rfind('}')) {
            (Some(start), Some(end)) if start < end => &body[start..=end],
            _ => return Err(format!("HTTP {code}: {body}")),
        };
        let parsed: Value =
            serde_json::from_str(json).map_err(|e| format!("HTTP {code}: {e}: {json}"))?;
        if parsed["status"] != "success" {
            return Err(format!("HTTP {code}: {parsed}"));
        }
        parsed["data"]["result"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("no result vector: {parsed}"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- prometheus log ({}) -----\n{}\n-----",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// The sample value of a vector element, as Prometheus sends it (a string).
fn sample(element: &Value) -> Option<f64> {
    element["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_the_admin_endpoint() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let admin = cp.admin.expect("started");
    let mut prometheus = Prometheus::start(dir.path(), admin);

    let up = eventually("prometheus to scrape the control plane (up == 1)", || {
        let result = prometheus.query("up")?;
        match result.as_slice() {
            [target] if sample(target) == Some(1.0) => Ok(target.clone()),
            other => Err(format!("up: {other:?}")),
        }
    });
    assert_eq!(up["metric"]["job"], "hotswap-control-plane", "{up}");
    assert_eq!(up["metric"]["instance"], admin.to_string(), "{up}");

    let nodes = eventually("hotswap_nodes to have values in prometheus", || {
        let result = prometheus.query("hotswap_nodes")?;
        if result.is_empty() {
            return Err("no hotswap_nodes series yet".into());
        }
        Ok(result)
    });
    for series in &nodes {
        assert_eq!(sample(series), Some(0.0), "no nodes enrolled: {series}");
        assert!(series["metric"]["status"].is_string(), "{series}");
    }
    drop(prometheus);
    cp.stop();
}
