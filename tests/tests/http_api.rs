//! The HTTP/JSON API of SPEC §8 with a real HTTP client (curl) and the
//! operators' own client certificates, against a real control plane and
//! agents: every resource, over HTTP/1.1 and HTTP/2 on the gRPC port; 401
//! without a certificate, 403 for a viewer's POST, 400 naming the bad
//! field, 409 for a second active deployment, an event stream resumed with
//! `Last-Event-ID` that misses and repeats nothing, an upload over the
//! limit refused, the audit log naming the HTTP caller, approvals by
//! approvers only, a follower replica (on etcd) forwarding the engine's calls
//! to the leader as their caller, and the OpenAPI document served, checked
//! in and valid by openapi-spec-validator.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use hotswap_common::profile::Profile;
use hotswap_tests::{
    ControlPlane, EtcdCluster, Fleet, SeaweedS3, TestDir, eventually, pack_bundle, patience,
    write_pseudo_random,
};
use serde_json::Value;

/// An operator's credentials as files, for curl.
struct Credentials {
    ca: PathBuf,
    cert: Option<(PathBuf, PathBuf)>,
}

impl Credentials {
    /// The CA, certificate and key of `profile`.
    fn of(profile: &Path) -> Self {
        let loaded = Profile::load(profile).expect("profile");
        let base = profile.with_extension("");
        let write = |suffix: &str, text: &str| {
            let path = base.with_extension(suffix);
            std::fs::write(&path, text).expect("write credential file");
            path
        };
        Credentials {
            ca: write("ca.pem", &loaded.ca_cert),
            cert: Some((
                write("cert.pem", &loaded.client_cert),
                write("key.pem", &loaded.client_key),
            )),
        }
    }

    /// Trusting the server, presenting no certificate.
    fn anonymous(profile: &Path) -> Self {
        Credentials {
            cert: None,
            ..Self::of(profile)
        }
    }

    fn curl(&self) -> Command {
        let mut command = Command::new("curl");
        command
            .args(["--silent", "--show-error", "--cacert"])
            .arg(&self.ca);
        if let Some((cert, key)) = &self.cert {
            command.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        command
    }
}

struct Reply {
    status: u16,
    body: String,
    version: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    /// The error body's code, checking its shape.
    fn error_code(&self) -> String {
        let json = self.json();
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "an error names what and why: {json}"
        );
        json["error"]["code"].as_str().expect("code").to_string()
    }
}

/// The HTTP API of one control plane.
struct Api {
    base: String,
}

impl Api {
    fn of(cp: &ControlPlane) -> Self {
        Api {
            base: format!("{}/api/v1", cp.url()),
        }
    }

    /// One request; `body` is JSON (`None`: no body, no content type).
    fn call(&self, who: &Credentials, method: &str, path: &str, body: Option<&str>) -> Reply {
        let mut command = who.curl();
        command.args(["-X", method]);
        if let Some(body) = body {
            command.args([
                "-H",
                "content-type: application/json",
                "--data-binary",
                body,
            ]);
        }
        self.run(command, path)
    }

    fn get(&self, who: &Credentials, path: &str) -> Reply {
        self.call(who, "GET", path, None)
    }

    fn run(&self, mut command: Command, path: &str) -> Reply {
        let out = command
            .args(["--write-out", "\n%{http_code} %{http_version}"])
            .arg(format!("{}{path}", self.base))
            .output()
            .expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, trailer) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        let (status, version) = trailer.split_once(' ').unwrap_or((trailer, ""));
        Reply {
            status: status.parse().unwrap_or_else(|_| {
                panic!(
                    "curl {path}: no status: {stdout} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            }),
            body: body.to_string(),
            version: version.to_string(),
        }
    }

    /// A Server-Sent Events stream, read line by line.
    fn stream(&self, who: &Credentials, path: &str, last_event_id: Option<u64>) -> Sse {
        let mut command = who.curl();
        command.args(["--no-buffer", "--http1.1"]);
        if let Some(id) = last_event_id {
            command.args(["-H", &format!("Last-Event-ID: {id}")]);
        }
        let mut child = command
            .arg(format!("{}{path}", self.base))
            .stdout(Stdio::piped())
            .spawn()
            .expect("start curl");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Sse { child, lines: rx }
    }
}

/// One SSE message: its `id:` and its `data:` as JSON.
#[derive(Debug)]
struct Message {
    id: Option<u64>,
    event: Option<String>,
    data: Value,
}

struct Sse {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Sse {
    /// The next message (keep-alive comments skipped), within patience.
    fn next(&mut self) -> Message {
        let deadline = Instant::now() + patience();
        let (mut id, mut event, mut data) = (None, None, None);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .expect("an SSE message in time");
            if line.is_empty() {
                if let Some(data) = data.take() {
                    return Message { id, event, data };
                }
                continue;
            }
            if let Some(value) = line.strip_prefix("id:") {
                id = Some(value.trim().parse().expect("numeric id"));
            } else if let Some(value) = line.strip_prefix("event:") {
                event = Some(value.trim().to_string());
            } else if let Some(value) = line.strip_prefix("data:") {
                data = Some(
                    serde_json::from_str(value.trim()).expect("one JSON object per data line"),
                );
            }
        }
    }
}

impl Drop for Sse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn names(values: &Value, field: &str) -> Vec<String> {
    values
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {values}"))
        .iter()
        .filter_map(|v| v[field].as_str().map(String::from))
        .collect()
}

fn upload(api: &Api, who: &Credentials, file: &Path, content_type: &str) -> Reply {
    let mut command = who.curl();
    command
        .args(["-X", "POST", "-H", &format!("content-type: {content_type}")])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()));
    api.run(command, "/modules")
}

#[test]
fn every_resource_answers_with_the_grpc_identities_roles_and_audit() {
    let dir = TestDir::new();
    let (fleet, _) = Fleet::start_many(&dir, "dev", &["node-1", "node-2"]);
    fleet.push_hello_per_node("1.0.0", "");
    let cp = &fleet.cp;
    let api = Api::of(cp);
    let admin = Credentials::of(&cp.admin_profile());
    let dora = Credentials::of(&cp.user_profile("dora", "deployer"));
    let vic = Credentials::of(&cp.user_profile("vic", "viewer"));
    let nobody = Credentials::anonymous(&cp.admin_profile());

    // The document is served without a certificate, and is the checked-in one.
    let doc = api.get(&nobody, "/openapi.json");
    assert_eq!(doc.status, 200, "{}", doc.body);
    let checked_in =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json"))
            .expect("docs/openapi.json");
    assert_eq!(
        doc.json(),
        serde_json::from_str::<Value>(&checked_in).expect("json")
    );

    // No certificate: 401, for reads and writes alike.
    let refused = api.get(&nobody, "/nodes");
    assert_eq!(
        (refused.status, refused.error_code().as_str()),
        (401, "unauthenticated")
    );
    let refused = api.call(&nobody, "DELETE", "/nodes/node-1", None);
    assert_eq!(refused.status, 401, "{}", refused.body);

    // Nodes, over HTTP/1.1 and HTTP/2 (ALPN) on the gRPC port, as the CLI
    // shows them.
    let mut http1 = admin.curl();
    http1.arg("--http1.1");
    let nodes = api.run(http1, "/nodes");
    assert_eq!(
        (nodes.status, nodes.version.as_str()),
        (200, "1.1"),
        "{}",
        nodes.body
    );
    let mut listed = names(&nodes.json(), "name");
    listed.sort();
    assert_eq!(listed, ["node-1", "node-2"]);
    let by_cli = cp.ctl(&["-o", "json", "nodes", "get", "node-1"]).json();
    let one = api.get(&admin, "/nodes/node-1");
    assert_eq!(
        (one.status, one.version.as_str()),
        (200, "2"),
        "{}",
        one.body
    );
    let one = one.json();
    for field in [
        "id",
        "name",
        "labels",
        "status",
        "agent_version",
        "enrolled_at",
    ] {
        assert_eq!(one[field], by_cli[field], "{field}: {one} vs {by_cli}");
    }
    let filtered = api.get(&vic, "/nodes?environment=nowhere");
    assert_eq!((filtered.status, filtered.body.as_str()), (200, "[]"));
    let missing = api.get(&admin, "/nodes/nope");
    assert_eq!(
        (missing.status, missing.error_code().as_str()),
        (404, "not_found")
    );
    // The in-process calls count as the gRPC calls they are; the HTTP
    // requests themselves are no RPC.
    assert_eq!(
        cp.metric(r#"hotswap_grpc_requests_total{method="/hotswap.v1.Fleet/GetNode",code="5"}"#),
        1.0
    );
    let (_, metrics) = cp.admin_get("/metrics");
    assert!(!metrics.contains(r#"method="unknown""#), "{metrics}");
    let bad_query = api.get(&admin, "/events?since=soon");
    assert_eq!(bad_query.status, 400, "{}", bad_query.body);
    assert!(
        bad_query.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("since")
    );

    // Modules: an upload (the .hsm body), again (a no-op), then listed.
    let notes = pack_bundle(dir.path(), "notes", "1.0.0", b"release notes", &fleet.key);
    let pushed = upload(&api, &dora, &notes, "application/octet-stream");
    assert_eq!(pushed.status, 201, "{}", pushed.body);
    assert_eq!(pushed.json()["signed_by"], serde_json::json!(["publisher"]));
    let again = upload(&api, &dora, &notes, "application/octet-stream");
    assert_eq!(again.status, 200, "the same artifact again: {}", again.body);
    let viewer_push = upload(&api, &vic, &notes, "application/octet-stream");
    assert_eq!(
        (viewer_push.status, viewer_push.error_code().as_str()),
        (403, "permission_denied")
    );
    let wrong_type = upload(&api, &dora, &notes, "text/plain");
    assert_eq!(wrong_type.status, 415, "{}", wrong_type.body);
    let modules = api.get(&vic, "/modules");
    assert_eq!(modules.status, 200);
    let mut module_names = names(&modules.json(), "name");
    module_names.sort();
    assert_eq!(module_names, ["hello", "notes"]);
    let notes_module = api.get(&vic, "/modules/notes").json();
    assert_eq!(
        notes_module["versions"][0]["version"], "1.0.0",
        "{notes_module}"
    );
    assert_eq!(
        notes_module["versions"][0]["pushed_by"], "dora",
        "{notes_module}"
    );

    // Deployments: a viewer's POST is 403; a bad field is 400 naming it.
    let canary = r#"{"module": "hello", "version": "1.0.0", "environment": "dev",
        "strategy": "canary", "steps": [50, 100], "step_duration": "1s", "manual_promote": true}"#;
    let denied = api.call(&vic, "POST", "/deployments", Some(canary));
    assert_eq!(
        (denied.status, denied.error_code().as_str()),
        (403, "permission_denied")
    );
    let bad = api.call(
        &dora,
        "POST",
        "/deployments",
        Some(r#"{"module": "hello", "version": "1.0.0", "environment": "dev", "max_failures": "two"}"#),
    );
    assert_eq!(
        (bad.status, bad.error_code().as_str()),
        (400, "invalid_argument")
    );
    let message = bad.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(message.contains("max_failures"), "{message}");
    let bad = api.call(
        &dora,
        "POST",
        "/deployments",
        Some(r#"{"module": "hello", "version": "1.0.0", "environment": "dev", "strategy": "sideways"}"#),
    );
    assert_eq!(bad.status, 400, "the service's own check: {}", bad.body);
    assert!(bad.body.contains("strategy"), "{}", bad.body);
    let no_type = {
        let mut command = dora.curl();
        command.args(["-X", "POST", "--data-binary", canary]);
        api.run(command, "/deployments")
    };
    assert_eq!(
        no_type.status, 415,
        "a form post cannot deploy: {}",
        no_type.body
    );

    let plan = api.call(
        &dora,
        "POST",
        "/deployments",
        Some(r#"{"module": "hello", "version": "1.0.0", "environment": "dev", "strategy": "rolling", "batch_size": "1", "dry_run": true}"#),
    );
    assert_eq!(plan.status, 200, "{}", plan.body);
    assert_eq!(plan.json()["strategy"], "rolling");
    assert_eq!(
        plan.json()["waves"].as_array().map(Vec::len),
        Some(2),
        "{}",
        plan.body
    );

    // The event log so far, to resume from.
    let before = api.get(&vic, "/events?since=0&limit=100000").json();
    let last_before = before
        .as_array()
        .and_then(|e| e.last())
        .map_or(0, |e| e["seq"].as_u64().expect("seq"));

    let created = api.call(&dora, "POST", "/deployments", Some(canary));
    assert_eq!(created.status, 201, "{}", created.body);
    let deployment = created.json();
    let id = deployment["id"].as_str().expect("id").to_string();
    assert_eq!(deployment["created_by"], "dora");
    assert_eq!(deployment["strategy"], "canary");

    // A second active deployment of the module to the environment: 409.
    let conflict = api.call(&dora, "POST", "/deployments", Some(canary));
    assert_eq!(
        (conflict.status, conflict.error_code().as_str()),
        (409, "already_exists")
    );
    assert!(
        conflict.body.contains(&id),
        "names the active one: {}",
        conflict.body
    );

    // The event stream from where we were: what happened since, then live.
    let mut events = api.stream(&vic, "/events?follow=true", Some(last_before));
    let mut seen: Vec<u64> = Vec::new();
    let first = events.next();
    seen.push(first.id.expect("id"));
    assert_eq!(
        first.id,
        Some(last_before + 1),
        "resumes right after: {first:?}"
    );
    assert_eq!(first.data["seq"], first.id.expect("id"), "id: is the seq");
    let waiting = eventually("the canary to wait for promotion", || {
        let d = api.get(&vic, &format!("/deployments/{id}")).json();
        let waiting = d["waiting_for"] == "deploy promote";
        if waiting { Ok(d) } else { Err(d.to_string()) }
    });
    assert_eq!(waiting["state"], "running", "{waiting}");
    let listed = api
        .get(&vic, "/deployments?active=true&environment=dev")
        .json();
    assert_eq!(names(&listed, "id"), std::slice::from_ref(&id));

    // Watch the deployment while it is promoted over HTTP.
    let mut watch = api.stream(&vic, &format!("/deployments/{id}?watch=true"), None);
    let now = watch.next();
    assert_eq!(
        (now.id, &now.data["id"]),
        (Some(1), &Value::String(id.clone()))
    );
    let viewer_promote = api.call(
        &vic,
        "POST",
        &format!("/deployments/{id}/promote"),
        Some("{}"),
    );
    assert_eq!(viewer_promote.status, 403, "{}", viewer_promote.body);
    let bad_action = api.call(
        &dora,
        "POST",
        &format!("/deployments/{id}/fasten"),
        Some("{}"),
    );
    assert_eq!(bad_action.status, 400, "{}", bad_action.body);
    assert!(bad_action.body.contains("action"), "{}", bad_action.body);
    let paused = api.call(
        &dora,
        "POST",
        &format!("/deployments/{id}/pause"),
        Some(r#"{"reason": "lunch"}"#),
    );
    assert_eq!(
        (paused.status, paused.json()["state"].as_str()),
        (200, Some("paused")),
        "{}",
        paused.body
    );
    let not_now = api.call(
        &dora,
        "POST",
        &format!("/deployments/{id}/promote"),
        Some(""),
    );
    assert_eq!(
        (not_now.status, not_now.error_code().as_str()),
        (412, "failed_precondition")
    );
    let resumed = api.call(
        &dora,
        "POST",
        &format!("/deployments/{id}/resume"),
        Some(""),
    );
    assert_eq!(resumed.status, 200, "{}", resumed.body);
    let promoted = api.call(
        &dora,
        "POST",
        &format!("/deployments/{id}/promote"),
        Some(""),
    );
    assert_eq!(promoted.status, 200, "{}", promoted.body);
    let ended = loop {
        let update = watch.next();
        assert_eq!(update.data["id"], Value::String(id.clone()));
        if update.data["state"] == "succeeded" {
            break update;
        }
        assert!(
            !["failed", "rolled_back", "aborted"]
                .contains(&update.data["state"].as_str().unwrap_or("")),
            "{:?}",
            update.data
        );
    };
    assert!(ended.id.expect("id") > 1);

    // Stop the event stream half-way and resume it with Last-Event-ID: the
    // two together are exactly the stored log, nothing missed or repeated.
    let target = eventually("the deployment's end in the log", || {
        let all = api.get(&vic, "/events?since=0&limit=100000").json();
        let ended = all.as_array().into_iter().flatten().any(|e| {
            e["kind"] == "deployment.finished" && e["deployment_id"] == Value::String(id.clone())
        });
        if ended {
            Ok(all)
        } else {
            Err(format!("{} events", all.as_array().map_or(0, Vec::len)))
        }
    });
    let stored: Vec<u64> = target
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .filter(|seq| *seq > last_before)
        .collect();
    let half = stored.len() / 2;
    while seen.len() < half {
        seen.push(events.next().id.expect("id"));
    }
    drop(events);
    let mut resumed = api.stream(&vic, "/events?follow=true", seen.last().copied());
    while seen.len() < stored.len() {
        seen.push(resumed.next().id.expect("id"));
    }
    assert_eq!(seen, stored, "the first and the resumed stream together");

    // The fleet as a stream: a snapshot of each node first.
    let mut fleet_watch = api.stream(&vic, "/nodes?watch=true", Some(41));
    let snapshot = fleet_watch.next();
    assert_eq!(snapshot.id, Some(42), "ids go on from Last-Event-ID");
    assert_eq!(snapshot.data["kind"], "snapshot", "{:?}", snapshot.data);
    assert!(snapshot.event.is_none());
    drop(fleet_watch);

    // Pipelines, clusters, audit, users, servers.
    let pipeline = api.call(
        &dora,
        "POST",
        "/pipelines",
        Some(r#"{"module": "hello", "version": "1.0.0", "to": "dev"}"#),
    );
    assert_eq!(pipeline.status, 201, "{}", pipeline.body);
    let pipeline_id = pipeline.json()["id"].as_str().expect("id").to_string();
    let got = api.get(&vic, &format!("/pipelines/{pipeline_id}"));
    assert_eq!(
        (got.status, got.json()["created_by"].as_str()),
        (200, Some("dora"))
    );
    assert_eq!(api.get(&vic, "/pipelines/p-none").status, 404);
    let listed = api.get(&vic, "/pipelines");
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert!(names(&listed.json(), "id").contains(&pipeline_id));
    let denied = api.call(
        &vic,
        "POST",
        &format!("/pipelines/{pipeline_id}/abort"),
        Some("{}"),
    );
    assert_eq!(denied.status, 403, "a viewer cannot abort: {}", denied.body);
    assert_eq!(
        api.call(&dora, "POST", "/pipelines/p-none/abort", Some("{}"))
            .status,
        404
    );

    // The desired-state history.
    let at_zero = api.get(&vic, "/history?environment=dev&seq=0");
    assert_eq!(
        (at_zero.status, at_zero.json()),
        (200, serde_json::json!([]))
    );
    let diff = api.get(&vic, "/history/diff?from=0&environment=dev");
    assert_eq!(diff.status, 200, "{}", diff.body);
    assert!(diff.json().is_array(), "{}", diff.body);
    assert_eq!(api.get(&vic, "/history?environment=moon&seq=1").status, 404);
    assert_eq!(
        api.get(&vic, "/history?environment=dev&at=nope").status,
        400
    );
    assert_eq!(
        api.get(
            &vic,
            "/history?environment=dev&at=2026-01-01T00:00:00Z&seq=1"
        )
        .status,
        400
    );
    let clusters = api.get(&vic, "/clusters");
    assert_eq!(clusters.status, 200);
    assert!(names(&clusters.json(), "environment").contains(&"dev".to_string()));
    let dev = api.get(&vic, "/clusters/dev").json();
    assert_eq!(
        (dev["environment"].as_str(), dev["nodes"].as_u64()),
        (Some("dev"), Some(2)),
        "{dev}"
    );
    let users = api.get(&admin, "/users");
    assert_eq!(users.status, 200, "{}", users.body);
    let user_names = names(&users.json(), "name");
    assert!(
        user_names.contains(&"dora".into()) && user_names.contains(&"vic".into()),
        "{user_names:?}"
    );
    let servers = api.get(&vic, "/servers").json();
    assert_eq!(servers.as_array().map(Vec::len), Some(1), "{servers}");
    assert_eq!(servers[0]["leader"], true);

    // The audit log names the HTTP callers, allowed and refused.
    let audit = api.get(&admin, "/audit?limit=1000");
    assert_eq!(audit.status, 200, "{}", audit.body);
    let records = audit.json();
    let record = |user: &str, action: &str, result: &str| {
        records
            .as_array()
            .expect("array")
            .iter()
            .find(|r| r["user"] == user && r["action"] == action && r["result"] == result)
            .cloned()
            .unwrap_or_else(|| panic!("no {result} {action} by {user} in {records}"))
    };
    let create = record("dora", "deploy.create", "ok");
    assert!(
        create["target"].as_str().unwrap_or("").contains("hello"),
        "{create}"
    );
    assert!(
        create["peer"]
            .as_str()
            .unwrap_or("")
            .starts_with("127.0.0.1:"),
        "{create}"
    );
    record("dora", "deploy.promote", "ok");
    record("vic", "deploy.create", "denied");
    record("dora", "module.push", "ok");
    let filtered = api.get(&admin, "/audit?user=vic").json();
    assert!(
        names(&filtered, "user").iter().all(|u| u == "vic"),
        "{filtered}"
    );

    // Removing a node: a deployer may not, an admin may; then it is gone.
    let denied = api.call(&dora, "DELETE", "/nodes/node-2", None);
    assert_eq!(denied.status, 403, "{}", denied.body);
    let removed = api.call(&admin, "DELETE", "/nodes/node-2", None);
    assert_eq!(
        (removed.status, removed.json()["name"].as_str()),
        (200, Some("node-2"))
    );
    assert_eq!(api.get(&admin, "/nodes/node-2").status, 404);

    // Unknown resources answer JSON too.
    let unknown = api.get(&admin, "/nothing");
    assert_eq!(
        (unknown.status, unknown.error_code().as_str()),
        (404, "not_found")
    );

    // Prometheus counts the HTTP calls by route template and status.
    let (code, metrics) = cp.admin_get("/metrics");
    assert_eq!(code, 200);
    for series in [
        r#"hotswap_http_requests_total{route="/api/v1/nodes",method="GET",status="200"}"#,
        r#"hotswap_http_requests_total{route="/api/v1/nodes/{node}",method="GET",status="404"}"#,
        r#"hotswap_http_requests_total{route="unmatched",method="GET",status="404"}"#,
        r#"hotswap_http_request_duration_seconds_count{route="/api/v1/deployments"}"#,
    ] {
        assert!(metrics.contains(series), "{series} in:\n{metrics}");
    }
}

#[test]
fn uploads_over_the_limit_are_refused_and_nothing_is_stored() {
    let dir = TestDir::new();
    let (fleet, _) =
        Fleet::start_many_with_settings(&dir, "dev", &["node-1"], "max_artifact_bytes = 65536\n");
    let api = Api::of(&fleet.cp);
    let admin = Credentials::of(&fleet.cp.admin_profile());

    // Incompressible, so the artifact stays over the limit.
    let random = dir.path().join("random.bin");
    write_pseudo_random(&random, 256 * 1024, 7);
    let payload = std::fs::read(&random).expect("read");
    let big = pack_bundle(dir.path(), "big", "1.0.0", &payload, &fleet.key);
    // The refusal comes before the end of the body. It must still reach the
    // client, over HTTP/2 and HTTP/1.1 alike: a body dropped unread resets
    // the stream (or the connection), and the reset could overtake the
    // answer, so that curl saw no status at all (a flaky CI run).
    for http in ["--http2", "--http1.1"] {
        for _ in 0..5 {
            let mut command = admin.curl();
            command
                .args([
                    http,
                    "-X",
                    "POST",
                    "-H",
                    "content-type: application/octet-stream",
                ])
                .arg("--data-binary")
                .arg(format!("@{}", big.display()));
            let refused = api.run(command, "/modules");
            assert_eq!(refused.status, 400, "{http}: {}", refused.body);
            let message = refused.json()["error"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string();
            assert!(message.contains("upload limit of 65536 bytes"), "{message}");
        }
    }
    let modules = api.get(&admin, "/modules");
    assert_eq!((modules.status, modules.body.as_str()), (200, "[]"));

    let small = pack_bundle(dir.path(), "small", "1.0.0", b"tiny", &fleet.key);
    let stored = upload(&api, &admin, &small, "application/octet-stream");
    assert_eq!(stored.status, 201, "{}", stored.body);
}

/// docs/openapi.json is valid OpenAPI by an independent validator
/// (openapi-spec-validator from PyPI, installed by scripts/ci-deps.sh).
#[test]
fn the_openapi_document_is_valid_by_openapi_spec_validator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join("target/openapi-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/ci-deps.sh (make test does)",
        python.display()
    );
    let out = Command::new(&python)
        .args(["-m", "openapi_spec_validator", "--schema", "3.1"])
        .arg(root.join("docs/openapi.json"))
        .output()
        .expect("run openapi-spec-validator");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "openapi-spec-validator: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn approvals_over_http_are_the_approvers_and_audited_as_theirs() {
    let dir = TestDir::new();
    let (fleet, _) = Fleet::start_many(&dir, "production", &["a", "b"]);
    fleet.push_hello_per_node("1.0.0", "");
    let cp = &fleet.cp;
    let api = Api::of(cp);
    let dave = Credentials::of(&cp.user_profile("dave", "deployer"));
    let alice = Credentials::of(&cp.user_profile("alice", "approver"));
    let body = r#"{"module": "hello", "version": "1.0.0", "environment": "production",
        "steps": [50, 100], "step_duration": "1s"}"#;
    let create = || {
        let created = api.call(&dave, "POST", "/deployments", Some(body));
        assert_eq!(created.status, 201, "{}", created.body);
        let created = created.json();
        assert_eq!(created["state"], "awaiting_approval", "{created}");
        created["id"].as_str().expect("id").to_string()
    };

    // A deployer cannot approve; an approver rejects with a reason.
    let first = create();
    let denied = api.call(
        &dave,
        "POST",
        &format!("/deployments/{first}/approve"),
        Some("{}"),
    );
    assert_eq!(
        (denied.status, denied.error_code().as_str()),
        (403, "permission_denied")
    );
    let rejected = api.call(
        &alice,
        "POST",
        &format!("/deployments/{first}/reject"),
        Some(r#"{"reason": "no ticket"}"#),
    );
    assert_eq!(rejected.status, 200, "{}", rejected.body);
    let rejected = rejected.json();
    assert!(
        rejected["reason"]
            .as_str()
            .unwrap_or("")
            .contains("no ticket"),
        "{rejected}"
    );
    let unknown_field = api.call(
        &alice,
        "POST",
        &format!("/deployments/{first}/approve"),
        Some(r#"{"why": "x"}"#),
    );
    assert_eq!(unknown_field.status, 400, "{}", unknown_field.body);
    assert!(unknown_field.body.contains("why"), "{}", unknown_field.body);

    // The next one is approved over HTTP and runs to the end.
    let second = create();
    let approved = api.call(
        &alice,
        "POST",
        &format!("/deployments/{second}/approve"),
        Some(""),
    );
    assert_eq!(approved.status, 200, "{}", approved.body);
    eventually("the approved deployment to succeed", || {
        let d = api.get(&dave, &format!("/deployments/{second}")).json();
        if d["state"] == "succeeded" {
            Ok(())
        } else {
            Err(d.to_string())
        }
    });
    let d = api.get(&dave, &format!("/deployments/{second}")).json();
    assert_eq!(d["approved_by"], "alice", "{d}");

    let records = api.get(&alice, "/audit?action=deploy.").json();
    let by = |user: &str, action: &str, result: &str| {
        records
            .as_array()
            .expect("array")
            .iter()
            .any(|r| r["user"] == user && r["action"] == action && r["result"] == result)
    };
    assert!(by("alice", "deploy.reject", "ok"), "{records}");
    assert!(by("alice", "deploy.approve", "ok"), "{records}");
    assert!(by("dave", "deploy.approve", "denied"), "{records}");
}

/// On etcd, a follower's HTTP API forwards the engine's calls to the leader
/// as their caller, because it makes the very gRPC calls a client would.
#[test]
fn a_follower_forwards_the_engines_http_calls_to_the_leader_as_their_caller() {
    let dir = TestDir::new();
    let etcd = EtcdCluster::start(1);
    let s3 = SeaweedS3::start("hotswap-http-api");
    let mut a = ControlPlane::init_on_etcd(dir.path(), "cp-a", &etcd.endpoints(), &s3);
    let mut b = a.replica("cp-b");
    a.start_replica();
    a.wait_serving();
    eventually("cp-a to lead", || {
        let out = a.ctl(&["deploy", "list"]);
        (out.code == 0).then_some(()).ok_or(out.stderr)
    });
    b.start_replica();
    b.wait_serving();
    let dave = Credentials::of(&a.user_profile("dave", "deployer"));
    let rita = Credentials::of(&a.user_profile("rita", "viewer"));
    let follower = Api::of(&b);

    let servers = follower.get(&rita, "/servers").json();
    let leaders: Vec<&str> = servers
        .as_array()
        .expect("array")
        .iter()
        .filter(|s| s["leader"] == true)
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(leaders, ["cp-a"], "{servers}");

    // Without forwarding a follower answers these 503 (it does not lead).
    let listed = follower.get(&rita, "/deployments");
    assert_eq!((listed.status, listed.body.as_str()), (200, "[]"));
    assert_eq!(follower.get(&rita, "/clusters").status, 200);
    let body = r#"{"module": "ghost", "version": "1.0.0", "environment": "dev"}"#;
    let denied = follower.call(&rita, "POST", "/deployments", Some(body));
    assert_eq!(
        (denied.status, denied.error_code().as_str()),
        (403, "permission_denied")
    );
    let message = denied.json()["error"]["message"].to_string();
    assert!(message.contains("rita"), "judged as rita: {message}");
    let missing = follower.call(&dave, "POST", "/deployments", Some(body));
    assert_eq!(
        (missing.status, missing.error_code().as_str()),
        (404, "not_found"),
        "the leader's answer for dave"
    );

    let records = follower.get(&rita, "/audit?action=deploy.create").json();
    let users: Vec<(&str, &str)> = records
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| Some((r["user"].as_str()?, r["result"].as_str()?)))
        .collect();
    assert!(users.contains(&("rita", "denied")), "{records}");
    assert!(users.iter().any(|(user, _)| *user == "dave"), "{records}");
}

/// `/api/v1/freezes` (SPEC §9) is `hotswapctl freeze` over HTTP: the same
/// checks, roles and audit; a freeze made there refuses a deployment with
/// 412 and its reason; deleting it lifts it.
#[test]
fn freezes_over_http_refuse_deployments_and_are_audited() {
    let dir = TestDir::new();
    let (fleet, _) = Fleet::start_many(&dir, "dev", &["a"]);
    fleet.push_hello_per_node("1.0.0", "");
    let cp = &fleet.cp;
    let api = Api::of(cp);
    let dora = Credentials::of(&cp.user_profile("dora", "deployer"));
    let vic = Credentials::of(&cp.user_profile("vic", "viewer"));
    let bad = api.call(
        &dora,
        "POST",
        "/freezes",
        Some(r#"{"environment": "dev", "for": "soon", "reason": "x"}"#),
    );
    assert_eq!(
        (bad.status, bad.error_code().as_str()),
        (400, "invalid_argument")
    );
    let bad = api.call(
        &dora,
        "POST",
        "/freezes",
        Some(r#"{"environment": "dev", "reason": "x"}"#),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(
        bad.body.contains("--until TIME or --for DURATION"),
        "{}",
        bad.body
    );
    let denied = api.call(
        &vic,
        "POST",
        "/freezes",
        Some(r#"{"environment": "dev", "for": "1h", "reason": "x"}"#),
    );
    assert_eq!(
        (denied.status, denied.error_code().as_str()),
        (403, "permission_denied")
    );
    assert_eq!(api.get(&vic, "/freezes").json(), serde_json::json!([]));

    let created = api.call(
        &dora,
        "POST",
        "/freezes",
        Some(r#"{"environment": "dev", "for": "1h", "reason": "incident INC-42"}"#),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let freeze = created.json();
    let id = freeze["id"].as_str().expect("id").to_string();
    assert_eq!(
        (
            &freeze["environment"],
            &freeze["created_by"],
            &freeze["reason"]
        ),
        (&"dev".into(), &"dora".into(), &"incident INC-42".into())
    );
    let listed = api.get(&vic, "/freezes?environment=dev").json();
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");

    let refused = api.call(
        &dora,
        "POST",
        "/deployments",
        Some(r#"{"module": "hello", "version": "1.0.0", "environment": "dev"}"#),
    );
    assert_eq!(
        (refused.status, refused.error_code().as_str()),
        (412, "failed_precondition")
    );
    assert!(
        refused.body.contains(&id) && refused.body.contains("incident INC-42"),
        "{}",
        refused.body
    );
    let denied = api.call(
        &dora,
        "POST",
        "/deployments",
        Some(r#"{"module": "hello", "version": "1.0.0", "environment": "dev", "override_freeze": true}"#),
    );
    assert_eq!(
        (denied.status, denied.error_code().as_str()),
        (403, "permission_denied")
    );

    let deleted = api.call(&dora, "DELETE", &format!("/freezes/{id}"), None);
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    let gone = api.call(&dora, "DELETE", &format!("/freezes/{id}"), None);
    assert_eq!(
        (gone.status, gone.error_code().as_str()),
        (404, "not_found")
    );
    let created = api.call(
        &dora,
        "POST",
        "/deployments",
        Some(r#"{"module": "hello", "version": "1.0.0", "environment": "dev"}"#),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let audit = cp
        .ctl(&["-o", "json", "audit", "list", "--action", "freeze."])
        .json();
    let rows: Vec<(String, String)> = audit
        .as_array()
        .expect("records")
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap_or_default().to_string(),
                r["result"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for expected in [
        ("freeze.create", "ok"),
        ("freeze.create", "denied"),
        ("freeze.delete", "ok"),
    ] {
        assert!(
            rows.iter()
                .any(|(a, r)| (a.as_str(), r.as_str()) == expected),
            "{expected:?} in {rows:?}"
        );
    }
}
