//! Distributed traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, both daemons
//! export over OTLP/gRPC and one deployment is one trace, from the control
//! plane's deployment, wave and node-command spans to the agents' fetch,
//! verify, unpack, swap and health spans, also across a restart of the
//! control plane. An in-test OTLP collector receives the spans.
//!
//! This binary sets environment for every daemon it starts
//! ([`set_daemon_env`]), so it holds only this test.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use hotswap_tests::{Fleet, TestDir, eventually, set_daemon_env};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

/// One received span, flattened.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent_span_id: String,
    name: String,
    attributes: BTreeMap<String, String>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    status: i32,
}

impl Received {
    fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

/// A minimal OTLP trace collector: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    fn spans(&self) -> Vec<Received> {
        self.spans.lock().expect("collector lock").clone()
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(Received {
                        service: service.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name,
                        attributes: attributes(&span.attributes),
                        status: span.status.map_or(0, |s| s.code),
                    });
                }
            }
        }
        self.spans.lock().expect("collector lock").extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

const AGENT_STEPS: [&str; 5] = ["fetch", "verify", "unpack", "swap", "health"];

/// The spans of one deployment's trace, found by its root span.
struct Trace {
    root: Received,
    spans: Vec<Received>,
}

impl Trace {
    /// The trace of deployment `id` as received so far.
    fn of(collector: &Collector, id: &str) -> Result<Self, String> {
        let all = collector.spans();
        let root = all
            .iter()
            .find(|s| s.name == "deployment" && s.attr("id") == id)
            .ok_or_else(|| format!("no deployment span for {id} yet; {} span(s)", all.len()))?
            .clone();
        let spans = all
            .into_iter()
            .filter(|s| s.trace_id == root.trace_id)
            .collect();
        Ok(Self { root, spans })
    }

    fn named(&self, name: &str) -> Vec<&Received> {
        self.spans.iter().filter(|s| s.name == name).collect()
    }

    /// Ok once every agent step of every node in `nodes` is in.
    fn has_agent_steps(&self, nodes: &[&str], steps: &[&str]) -> Result<(), String> {
        for node in nodes {
            for step in steps {
                if !self.spans.iter().any(|s| {
                    s.service == "hotswap-agent" && s.name == *step && s.attr("node") == *node
                }) {
                    let have: Vec<String> = self
                        .spans
                        .iter()
                        .map(|s| format!("{}:{}@{}", s.service, s.name, s.attr("node")))
                        .collect();
                    return Err(format!(
                        "no {step} span of node {node} yet; trace has {have:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The links every deployment's trace must have: one root from the
    /// control plane, waves under it, node commands (one per node in
    /// `nodes`) under waves, and every agent span of `version` under the
    /// node command of its own node, none failed.
    fn check_links(&self, id: &str, version: &str, waves: usize, nodes: &[&str]) {
        let root = &self.root;
        assert_eq!(root.service, "hotswap-control-plane", "{root:?}");
        assert_eq!(
            root.parent_span_id, "",
            "the deployment span is the root: {root:?}"
        );
        assert_eq!(root.attr("module"), "hello");
        assert_eq!(root.attr("version"), version);
        assert_eq!(self.named("deployment").len(), 1, "one deployment span");

        let wave_spans = self.named("wave");
        assert_eq!(wave_spans.len(), waves, "{wave_spans:#?}");
        for wave in &wave_spans {
            assert_eq!(wave.service, "hotswap-control-plane");
            assert_eq!(wave.attr("deployment"), id);
            assert_eq!(wave.parent_span_id, root.span_id, "{wave:?}");
        }
        let wave_numbers: BTreeSet<&str> = wave_spans.iter().map(|w| w.attr("wave")).collect();
        let expected: BTreeSet<String> = (1..=waves).map(|w| w.to_string()).collect();
        assert_eq!(
            wave_numbers,
            expected.iter().map(String::as_str).collect(),
            "{wave_spans:#?}"
        );
        let wave_ids: BTreeSet<&str> = wave_spans.iter().map(|w| w.span_id.as_str()).collect();

        let commands = self.named("node command");
        let commanded: BTreeSet<&str> = commands.iter().map(|c| c.attr("node")).collect();
        assert_eq!(commanded, nodes.iter().copied().collect(), "{commands:#?}");
        assert_eq!(commands.len(), nodes.len(), "one per node: {commands:#?}");
        for command in &commands {
            assert_eq!(command.service, "hotswap-control-plane");
            assert!(
                wave_ids.contains(command.parent_span_id.as_str()),
                "node command's parent is not a wave: {command:?}"
            );
            assert_eq!(command.attr("version"), version);
            assert_eq!(command.attr("kind"), "set_version");
        }

        let by_id: HashMap<&str, &Received> =
            self.spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
        for span in self.spans.iter().filter(|s| s.service == "hotswap-agent") {
            assert!(
                AGENT_STEPS.contains(&span.name.as_str()),
                "unexpected agent span {span:?}"
            );
            assert_eq!(span.attr("module"), "hello", "{span:?}");
            assert_eq!(span.attr("version"), version, "{span:?}");
            let mut parent = span.parent_span_id.as_str();
            let command = loop {
                let Some(up) = by_id.get(parent) else {
                    panic!("agent span's parent chain leaves the trace at {parent:?}: {span:?}");
                };
                if up.name == "node command" {
                    break up;
                }
                parent = up.parent_span_id.as_str();
            };
            assert_eq!(
                command.attr("node"),
                span.attr("node"),
                "agent span under another node's command: {span:?}"
            );
            assert_ne!(span.status, 2, "step failed: {span:?}");
        }
        for span in self.named("health") {
            assert_eq!(span.attr("health"), "healthy", "{span:?}");
        }
        let services: BTreeSet<&str> = self.spans.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(
            services,
            BTreeSet::from(["hotswap-agent", "hotswap-control-plane"]),
            "spans from both daemons"
        );
    }
}

#[test]
fn one_deployment_is_one_trace_across_control_plane_and_agents() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let collector = Collector::default();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the collector");
    let address = listener.local_addr().expect("collector address");
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    set_daemon_env("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{address}"));
    // Export every 100 ms instead of every 5 s, so the test waits little.
    set_daemon_env("OTEL_BSP_SCHEDULE_DELAY", "100");

    let dir = TestDir::new();
    let (mut fleet, _ports) = Fleet::start_many(&dir, "dev", &["a", "b"]);
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
    let id = out.last_json_line()["id"]
        .as_str()
        .expect("deployment id")
        .to_string();

    // Spans arrive in batches from three processes: wait until the trace
    // holds every step of both agents.
    let trace = eventually("the deployment's spans from both agents", || {
        let trace = Trace::of(&collector, &id)?;
        trace.has_agent_steps(&["a", "b"], &AGENT_STEPS)?;
        Ok(trace)
    });
    trace.check_links(&id, "1.0.0", 1, &["a", "b"]);
    assert_eq!(trace.root.attr("environment"), "dev");
    assert_eq!(trace.root.attr("strategy"), "direct");
    assert_eq!(trace.named("wave")[0].attr("nodes"), "2");
    // Every span naming the deployment is in its one trace.
    let strays: Vec<Received> = collector
        .spans()
        .into_iter()
        .filter(|s| s.attr("id") == id || s.attr("deployment") == id)
        .filter(|s| s.trace_id != trace.root.trace_id)
        .collect();
    assert!(
        strays.is_empty(),
        "spans of {id} in another trace: {strays:#?}"
    );

    // A control plane killed mid-rollout continues the same trace: the wave
    // after the restart joins it, and re-asserting the first wave's desired
    // state (a no-op on the node) adds no node command.
    fleet.push_hello_per_node("2.0.0", "");
    let created = fleet
        .cp
        .ctl(&[
            "-o",
            "json",
            "deploy",
            "create",
            "hello@2.0.0",
            "--env",
            "dev",
            "--strategy",
            "rolling",
            "--batch-size",
            "1",
            // Long enough that the kill below comes before the second wave.
            "--min-healthy-time",
            "3s",
        ])
        .json();
    let rollout = created["id"].as_str().expect("deployment id").to_string();
    // Killed once the first wave is healthy (nothing in flight on the
    // agents) and its spans are out.
    eventually(
        "the rollout's first wave to be healthy and exported",
        || {
            let d = fleet
                .cp
                .ctl(&["-o", "json", "deploy", "get", &rollout])
                .json();
            if d["progress"]["healthy"].as_u64() < Some(1) {
                return Err(format!("first wave not healthy yet: {d}"));
            }
            let trace = Trace::of(&collector, &rollout)?;
            match (trace.named("wave").len(), trace.named("node command").len()) {
                (1, 1) => Ok(()),
                other => Err(format!("(waves, node commands) = {other:?}")),
            }
        },
    );
    fleet.cp.kill();
    fleet.cp.start();
    let watch = fleet.cp.ctl(&[
        "-o",
        "json",
        "deploy",
        "watch",
        &rollout,
        "--timeout",
        "90s",
    ]);
    assert_eq!(watch.code, 0, "{watch:?}");
    let trace = eventually("the rollout's spans after the restart", || {
        let trace = Trace::of(&collector, &rollout)?;
        trace.has_agent_steps(&["a", "b"], &["swap", "health"])?;
        if trace.named("wave").len() < 2 {
            return Err("no second wave yet".into());
        }
        Ok(trace)
    });
    trace.check_links(&rollout, "2.0.0", 2, &["a", "b"]);
    assert_eq!(trace.root.attr("strategy"), "rolling");

    // Agents only continue the control plane's traces: nothing else of theirs.
    let deployments: BTreeSet<String> = [&id, &rollout]
        .iter()
        .map(|d| Trace::of(&collector, d).expect("trace").root.trace_id)
        .collect();
    let stray: Vec<Received> = collector
        .spans()
        .into_iter()
        .filter(|s| s.service == "hotswap-agent" && !deployments.contains(&s.trace_id))
        .collect();
    assert!(
        stray.is_empty(),
        "agent spans outside any deployment: {stray:#?}"
    );

    // The exporters shut down with the daemons, cleanly.
    for agent in std::iter::once(&mut fleet.agent).chain(fleet.others.iter_mut()) {
        let status = agent.stop();
        assert!(
            status.success(),
            "agent {} exited with {status}",
            agent.name
        );
    }
    fleet.cp.stop();
}
