//! The dashboard's pages, rendered on the server from the control plane's
//! answers in the JSON shapes of SPEC §4, and the fragments of them that
//! the live streams send again when something changes.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use hotswap_common::model::{DeploymentView, NodeView, VerdictView};
use hotswap_common::pb;
use hotswap_common::roles::{Permission, Role};
use hotswap_common::timefmt::ms_from_ts;
use serde::Deserialize;
use serde_json::Value;
use tonic::Code;

use super::Ui;
use super::auth::same_secret;
use super::charts::{self, StepSeries};
use super::html::{chip, esc};
use crate::client::CliError;
use crate::events::EventView;

const SCRIPT: &str = include_str!("assets/app.js");
const STYLESHEET: &str = include_str!("assets/app.css");

/// Events shown when a page opens; newer ones stream in.
const EVENTS_SHOWN: u32 = 200;
/// Audit records shown, newest first.
const AUDIT_SHOWN: u32 = 300;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Nav {
    Fleet,
    Environments,
    Deployments,
    Events,
    Audit,
}

fn page(ui: &Ui, title: &str, nav: Nav, live: Option<&str>, main: &str) -> Html<String> {
    let mut links = String::new();
    for (which, href, name) in [
        (Nav::Fleet, "/", "Fleet"),
        (Nav::Environments, "/environments", "Environments"),
        (Nav::Deployments, "/deployments", "Deployments"),
        (Nav::Events, "/events", "Events"),
        (Nav::Audit, "/audit", "Audit"),
    ] {
        let current = if which == nav {
            r#" aria-current="page""#
        } else {
            ""
        };
        let _ = write!(links, r#"<a href="{href}"{current}>{name}</a>"#);
    }
    let live_attr = live
        .map(|l| format!(r#" data-live="{}""#, esc(l)))
        .unwrap_or_default();
    let role = ui.role().unwrap_or_else(|| "role unknown".into());
    Html(format!(
        r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><meta name="color-scheme" content="light dark"><title>{title} · hotswap</title><link rel="stylesheet" href="/assets/app.css"><script src="/assets/app.js" defer></script></head>
<body{live_attr}><a class="skip" href="#main">Skip to content</a><header class="top"><span class="brand">hotswap</span><nav aria-label="Main">{links}</nav><span class="who">{user} <span class="role">{role}</span></span><span id="live-status" class="live-status" role="status" aria-live="polite">{status}</span></header>
<main id="main"><h1>{title}</h1>
{main}
</main></body></html>
"##,
        title = esc(title),
        user = esc(&ui.user),
        role = esc(&role),
        status = if live.is_some() { "connecting" } else { "" },
    ))
}

/// A failed call as a page: the status says what kind of failure, the
/// message why.
fn error_page(ui: &Ui, title: &str, nav: Nav, error: &CliError) -> Response {
    let status = error_status(error);
    let body = format!(
        r#"<p class="error" role="alert">{}</p>"#,
        esc(&error.to_string())
    );
    (status, page(ui, title, nav, None, &body)).into_response()
}

pub fn error_status(error: &CliError) -> StatusCode {
    match error {
        CliError::Rpc { status, .. } => match status.code() {
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::PermissionDenied | Code::Unauthenticated => StatusCode::FORBIDDEN,
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::BAD_GATEWAY,
        },
        CliError::Credentials(_) => StatusCode::FORBIDDEN,
        CliError::Other(_) => StatusCode::BAD_GATEWAY,
    }
}

fn unexpected(e: impl std::fmt::Display) -> CliError {
    CliError::Other(anyhow::anyhow!("unexpected reply: {e}"))
}

// ---------------------------------------------------------------- fleet

pub async fn list_nodes(ui: &Ui) -> Result<Vec<NodeView>, CliError> {
    let mut client = pb::fleet_client::FleetClient::new(ui.channel());
    let reply = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .map_err(ui.conn.rpc_error("list nodes"))?
        .into_inner();
    let mut nodes = reply
        .nodes
        .into_iter()
        .map(NodeView::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(unexpected)?;
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(nodes)
}

/// A node's health in one word: its modules' worst.
fn node_health(node: &NodeView) -> &'static str {
    if node.modules.is_empty() {
        "-"
    } else if node.modules.iter().any(|m| m.health == "unhealthy") {
        "unhealthy"
    } else if node.modules.iter().all(|m| m.health == "healthy") {
        "healthy"
    } else {
        "unknown"
    }
}

/// The fleet table's rows.
pub fn fleet_rows(nodes: &[NodeView]) -> String {
    let mut rows = String::new();
    if nodes.is_empty() {
        rows.push_str(r#"<tr><td colspan="7" class="muted">no nodes enrolled yet</td></tr>"#);
    }
    for node in nodes {
        let environment = node.labels.get("environment").map_or("-", String::as_str);
        let modules = if node.modules.is_empty() {
            "-".to_string()
        } else {
            node.modules
                .iter()
                .map(|m| {
                    format!(
                        r#"<span class="module">{}@{}</span> {} {}"#,
                        esc(&m.name),
                        esc(&m.version),
                        chip(&m.phase),
                        chip(&m.health)
                    )
                })
                .collect::<Vec<_>>()
                .join("<br>")
        };
        let _ = write!(
            rows,
            r#"<tr data-node="{name}"><th scope="row">{name}</th><td>{env}</td><td>{status}</td><td>{modules}</td><td>{health}</td><td>{seen}</td><td>{agent}</td></tr>"#,
            name = esc(&node.name),
            env = esc(environment),
            status = chip(node.status.as_str()),
            health = chip(node_health(node)),
            seen = esc(node.last_seen.as_deref().unwrap_or("never")),
            agent = esc(&node.agent_version),
        );
    }
    rows
}

fn filter_box(target: &str, hint: &str) -> String {
    format!(
        r#"<p class="filter"><label for="filter">Filter</label> <input id="filter" type="search" data-filter="{target}" placeholder="{}" autocomplete="off"></p>"#,
        esc(hint)
    )
}

pub async fn fleet(State(ui): State<Arc<Ui>>) -> Response {
    ui.refresh_role().await;
    let nodes = match list_nodes(&ui).await {
        Ok(n) => n,
        Err(e) => return error_page(&ui, "Fleet", Nav::Fleet, &e),
    };
    let connected = nodes
        .iter()
        .filter(|n| n.status.as_str() == "connected")
        .count();
    let body = format!(
        r#"<p class="lead">{} node(s), {connected} connected.</p>{}
<div class="scroll"><table><caption class="sr">Nodes</caption><thead><tr><th scope="col">Node</th><th scope="col">Environment</th><th scope="col">Status</th><th scope="col">Modules</th><th scope="col">Health</th><th scope="col">Last seen</th><th scope="col">Agent</th></tr></thead><tbody id="fleet-rows">{}</tbody></table></div>"#,
        nodes.len(),
        filter_box("fleet-rows", "node, environment, module, version, status"),
        fleet_rows(&nodes)
    );
    page(&ui, "Fleet", Nav::Fleet, Some("/live/fleet"), &body).into_response()
}

// --------------------------------------------------------- environments

pub async fn list_clusters(ui: &Ui) -> Result<Vec<Value>, CliError> {
    let mut client = pb::clusters_client::ClustersClient::new(ui.channel());
    let reply = client
        .list_clusters(pb::ListClustersRequest {})
        .await
        .map_err(ui.conn.rpc_error("list clusters"))?
        .into_inner();
    reply
        .clusters
        .into_iter()
        .map(|c| {
            let view = crate::clusters::ClusterView::try_from(c)?;
            serde_json::to_value(view).map_err(unexpected)
        })
        .collect()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Every environment: health, the version mix of each module (a bar per
/// module), its current versions and the nodes drifting from them.
pub fn environments_body(clusters: &[Value]) -> String {
    let mut out = String::new();
    if clusters.is_empty() {
        out.push_str(
            r#"<p class="muted">no environments yet: enroll nodes with an environment label</p>"#,
        );
    }
    for c in clusters {
        let env = text(&c["environment"]);
        let _ = write!(
            out,
            r#"<section class="card" aria-labelledby="env-{id}" data-environment="{e}"><h2 id="env-{id}">{e}</h2><dl class="stats"><div><dt>Nodes</dt><dd>{conn} of {nodes} connected</dd></div><div><dt>Modules</dt><dd>{h} healthy, {uh} unhealthy, {uk} unknown</dd></div><div><dt>Error rate</dt><dd>{err}</dd></div><div><dt>p99</dt><dd>{p99}</dd></div><div><dt>CPU</dt><dd>{cpu}</dd></div></dl>"#,
            id = esc(&env.replace(|c: char| !c.is_ascii_alphanumeric(), "-")),
            e = esc(&env),
            conn = u(&c["connected"]),
            nodes = u(&c["nodes"]),
            h = u(&c["healthy"]),
            uh = u(&c["unhealthy"]),
            uk = u(&c["unknown"]),
            err = c["error_rate"]
                .as_f64()
                .map_or("-".into(), |r| format!("{:.2}%", r * 100.0)),
            p99 = c["latency_p99_seconds"]
                .as_f64()
                .map_or("-".into(), |s| format!("{:.0} ms", s * 1000.0)),
            cpu = c["cpu_percent"]
                .as_f64()
                .map_or("-".into(), |p| format!("{p:.0}%")),
        );
        // The version mix, module by module.
        let mut mix: BTreeMap<String, Vec<(String, u32)>> = BTreeMap::new();
        for m in c["modules"].as_array().into_iter().flatten() {
            mix.entry(text(&m["name"]))
                .or_default()
                .push((text(&m["version"]), u(&m["nodes"]) as u32));
        }
        let current: BTreeMap<String, &Value> = c["current"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|cur| (text(&cur["module"]), cur))
            .collect();
        if mix.is_empty() && current.is_empty() {
            out.push_str(r#"<p class="muted">no modules running</p>"#);
        } else {
            out.push_str(r#"<table><thead><tr><th scope="col">Module</th><th scope="col">Version mix</th><th scope="col">Current</th><th scope="col">Drift</th></tr></thead><tbody>"#);
            let names: std::collections::BTreeSet<&String> =
                mix.keys().chain(current.keys()).collect();
            for name in names {
                let mut versions = mix.get(name).cloned().unwrap_or_default();
                versions.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                let legend = versions
                    .iter()
                    .enumerate()
                    .map(|(i, (v, n))| {
                        format!(r#"<span class="key v{}"></span>{} ({n})"#, i % 6, esc(v))
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                let (cur, drift) = match current.get(name) {
                    Some(cur) => {
                        let drift: Vec<String> = cur["drift"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(text)
                            .collect();
                        (
                            esc(&text(&cur["version"])),
                            if drift.is_empty() {
                                chip("none")
                            } else {
                                format!(
                                    r#"<span class="chip busy">{} node(s)</span> {}"#,
                                    drift.len(),
                                    esc(&drift.join(", "))
                                )
                            },
                        )
                    }
                    None => ("-".into(), "-".into()),
                };
                let _ = write!(
                    out,
                    r#"<tr><th scope="row">{}</th><td>{}<div class="legend">{legend}</div></td><td>{cur}</td><td>{drift}</td></tr>"#,
                    esc(name),
                    charts::version_mix(&env, name, &versions),
                );
            }
            out.push_str("</tbody></table>");
        }
        let active: Vec<String> = c["active_deployments"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                let id = text(d);
                format!(r#"<a href="/deployments/{0}">{0}</a>"#, esc(&id))
            })
            .collect();
        if !active.is_empty() {
            let _ = write!(out, r#"<p>Active deployments: {}</p>"#, active.join(", "));
        }
        out.push_str("</section>");
    }
    out
}

pub async fn environments(State(ui): State<Arc<Ui>>) -> Response {
    ui.refresh_role().await;
    match list_clusters(&ui).await {
        Ok(clusters) => {
            let body = format!(
                r#"<div id="environments">{}</div>"#,
                environments_body(&clusters)
            );
            page(
                &ui,
                "Environments",
                Nav::Environments,
                Some("/live/environments"),
                &body,
            )
            .into_response()
        }
        Err(e) => error_page(&ui, "Environments", Nav::Environments, &e),
    }
}

// ---------------------------------------------------------- deployments

pub async fn list_deployments(ui: &Ui) -> Result<Vec<DeploymentView>, CliError> {
    let mut client = pb::deployments_client::DeploymentsClient::new(ui.channel());
    let reply = client
        .list_deployments(pb::ListDeploymentsRequest::default())
        .await
        .map_err(ui.conn.rpc_error("list deployments"))?
        .into_inner();
    reply
        .deployments
        .into_iter()
        .map(crate::deploy::convert)
        .collect()
}

pub fn deployments_rows(deployments: &[DeploymentView]) -> String {
    let mut rows = String::new();
    if deployments.is_empty() {
        rows.push_str(r#"<tr><td colspan="7" class="muted">no deployments yet</td></tr>"#);
    }
    for d in deployments {
        let waiting = if d.is_terminal() {
            esc(&d.reason)
        } else {
            esc(&d.waiting_for)
        };
        let _ = write!(
            rows,
            r#"<tr data-deployment="{id}"><th scope="row"><a href="/deployments/{id}">{id}</a></th><td>{m}@{v}</td><td>{env}</td><td>{strategy}</td><td>{state}</td><td>{healthy}/{total} healthy{failed}, wave {wave}/{waves}</td><td>{waiting}</td><td>{by}</td><td>{at}</td></tr>"#,
            id = esc(&d.id),
            m = esc(&d.module),
            v = esc(&d.version),
            env = esc(&d.environment),
            strategy = esc(&d.strategy),
            state = chip(&d.state),
            healthy = d.progress.healthy,
            total = d.progress.total,
            failed = if d.progress.failed > 0 {
                format!(", {} failed", d.progress.failed)
            } else {
                String::new()
            },
            wave = (d.wave + 1).min(d.waves.max(1)),
            waves = d.waves.max(1),
            by = esc(&d.created_by),
            at = esc(d.created_at.as_deref().unwrap_or("-")),
        );
    }
    rows
}

pub async fn deployments(State(ui): State<Arc<Ui>>) -> Response {
    ui.refresh_role().await;
    match list_deployments(&ui).await {
        Ok(list) => {
            let body = format!(
                r#"{}<div class="scroll"><table><caption class="sr">Deployments, newest first</caption><thead><tr><th scope="col">Deployment</th><th scope="col">Module</th><th scope="col">Environment</th><th scope="col">Strategy</th><th scope="col">State</th><th scope="col">Progress</th><th scope="col">Waiting for / reason</th><th scope="col">By</th><th scope="col">Created</th></tr></thead><tbody id="deployments-rows">{}</tbody></table></div>"#,
                filter_box("deployments-rows", "id, module, environment, state"),
                deployments_rows(&list)
            );
            page(
                &ui,
                "Deployments",
                Nav::Deployments,
                Some("/live/deployments"),
                &body,
            )
            .into_response()
        }
        Err(e) => error_page(&ui, "Deployments", Nav::Deployments, &e),
    }
}

pub async fn get_deployment(ui: &Ui, id: &str) -> Result<DeploymentView, CliError> {
    let mut client = pb::deployments_client::DeploymentsClient::new(ui.channel());
    let d = client
        .get_deployment(pb::GetDeploymentRequest { id: id.to_string() })
        .await
        .map_err(ui.conn.rpc_error(&format!("get deployment {id}")))?
        .into_inner();
    crate::deploy::convert(d)
}

/// Every control, in the order the page shows them, with what it does.
const CONTROLS: [(&str, &str, &str); 7] = [
    (
        "approve",
        "Approve",
        "starts the deployment (a second person's approval)",
    ),
    (
        "reject",
        "Reject",
        "ends the deployment without changing any node",
    ),
    (
        "promote",
        "Promote",
        "continues the canary to its next step",
    ),
    ("pause", "Pause", "stops advancing to new waves"),
    ("resume", "Resume", "continues a paused deployment"),
    (
        "abort",
        "Abort",
        "stops the deployment where it is, without rolling back",
    ),
    (
        "rollback",
        "Roll back",
        "returns every node the deployment changed to its previous version",
    ),
];

/// Whether a control's reason is kept (in the deployment's events and its
/// final reason); the others take none.
fn takes_reason(action: &str) -> bool {
    matches!(action, "approve" | "reject" | "abort" | "rollback")
}

/// The controls the caller's role allows and the deployment's state
/// accepts. The control plane decides again on every call (a protected
/// environment needs more than a deployer, which this side cannot see),
/// so this only keeps buttons that cannot work off the page.
pub fn allowed_controls(role: Option<&str>, user: &str, d: &DeploymentView) -> Vec<&'static str> {
    let role = role.and_then(|r| Role::parse(r).ok());
    let may = |permission| role.is_some_and(|r| r.allows(permission));
    let (control, approve) = (may(Permission::Control), may(Permission::Approve));
    let state = d.state.as_str();
    CONTROLS
        .iter()
        .map(|(action, _, _)| *action)
        .filter(|action| match *action {
            "approve" => approve && state == "awaiting_approval" && d.created_by != user,
            "reject" => approve && state == "awaiting_approval",
            "promote" => control && state == "running" && d.waiting_for == "deploy promote",
            "pause" => control && state == "running",
            "resume" => control && state == "paused",
            "abort" => {
                control
                    && !d.is_terminal()
                    && state != "rolling_back"
                    && state != "awaiting_approval"
            }
            "rollback" => {
                control
                    && !matches!(
                        state,
                        "pending" | "awaiting_approval" | "rolling_back" | "rolled_back"
                    )
                    && d.nodes.iter().any(|n| n.state != "waiting")
            }
            _ => false,
        })
        .collect()
}

fn percent(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.2}%", v * 100.0))
}

fn millis(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.0} ms", v * 1000.0))
}

fn analysis_section(d: &DeploymentView) -> String {
    let verdicts: &[VerdictView] = &d.analysis;
    if verdicts.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        r#"<section aria-labelledby="analysis-h"><h2 id="analysis-h">Canary analysis</h2><div class="scroll"><table><thead><tr><th scope="col">Step</th><th scope="col">Verdict</th><th scope="col">Error rate canary / baseline</th><th scope="col">p99 canary / baseline</th><th scope="col">Sample canary / baseline</th><th scope="col">Summary</th></tr></thead><tbody id="verdicts">"#,
    );
    for v in verdicts {
        let outcome = if v.outcome.is_empty() {
            if v.passed { "passed" } else { "failed" }
        } else {
            v.outcome.as_str()
        };
        let _ = write!(
            out,
            r#"<tr data-step="{step}"><th scope="row">{step}</th><td>{outcome}</td><td>{ce} / {be}</td><td>{cl} / {bl}</td><td>{cr:.0} req on {cn} node(s) / {br:.0} req on {bn} node(s)</td><td>{summary}</td></tr>"#,
            step = v.step,
            outcome = chip(outcome),
            ce = percent(v.canary_error_rate),
            be = percent(v.baseline_error_rate),
            cl = millis(v.canary_latency_p99),
            bl = millis(v.baseline_latency_p99),
            cr = v.canary_requests,
            cn = v.canary_nodes,
            br = v.baseline_requests,
            bn = v.baseline_nodes,
            summary = esc(&v.summary),
        );
    }
    out.push_str("</tbody></table></div>");
    // The charts show each step's last verdict: the one that decided it
    // (an inconclusive one before it had too little traffic to plot).
    let mut decided: BTreeMap<u32, &VerdictView> = BTreeMap::new();
    for v in verdicts {
        decided.insert(v.step, v);
    }
    let verdicts: Vec<&VerdictView> = decided.into_values().collect();
    let steps: Vec<u32> = verdicts.iter().map(|v| v.step).collect();
    let scale = |f: f64| move |v: Option<f64>| v.map(|v| v * f);
    let errors = charts::steps_chart(&StepSeries {
        title: "Error rate",
        unit: "%",
        steps: steps.clone(),
        canary: verdicts
            .iter()
            .map(|v| scale(100.0)(v.canary_error_rate))
            .collect(),
        baseline: verdicts
            .iter()
            .map(|v| scale(100.0)(v.baseline_error_rate))
            .collect(),
        threshold: d
            .max_error_rate
            .map(|r| (r * 100.0, format!("ceiling {:.1}%", r * 100.0))),
        relative_threshold: None,
    });
    let latency = charts::steps_chart(&StepSeries {
        title: "p99 latency",
        unit: "ms",
        steps,
        canary: verdicts
            .iter()
            .map(|v| scale(1000.0)(v.canary_latency_p99))
            .collect(),
        baseline: verdicts
            .iter()
            .map(|v| scale(1000.0)(v.baseline_latency_p99))
            .collect(),
        threshold: None,
        relative_threshold: d
            .max_latency_increase
            .map(|f| (f, format!("limit {f}x baseline"))),
    });
    let _ = write!(
        out,
        r#"<div class="charts"><figure><figcaption>Error rate by step</figcaption>{errors}</figure><figure><figcaption>p99 latency by step</figcaption>{latency}</figure></div></section>"#
    );
    out
}

/// The part of a deployment's page that changes: state, waves, nodes,
/// analysis and the controls.
pub fn deployment_live(ui: &Ui, d: &DeploymentView) -> String {
    let mut out = String::new();
    let waves = d.waves.max(1);
    let wave = (d.wave + 1).min(waves);
    let _ = write!(
        out,
        r#"<p class="summary"><strong>{m}@{v}</strong> to <a href="/environments">{env}</a>, {strategy}: <span id="state" data-state="{state_word}">{state}</span> <span id="wave" data-wave="{wave}">wave {wave} of {waves}</span></p>"#,
        m = esc(&d.module),
        v = esc(&d.version),
        env = esc(&d.environment),
        strategy = esc(&d.strategy),
        state_word = esc(&d.state),
        state = chip(&d.state),
    );
    if d.state == "awaiting_approval" {
        out.push_str(
            r#"<p class="banner" role="status">Waiting for approval by a second person.</p>"#,
        );
    } else if d.waiting_for == "deploy promote" && d.state == "running" {
        out.push_str(r#"<p class="banner" role="status">Waiting for promotion.</p>"#);
    }
    let mut facts = vec![format!("created by {}", esc(&d.created_by))];
    if let Some(at) = &d.created_at {
        facts.push(format!("at {}", esc(at)));
    }
    if !d.approved_by.is_empty() {
        facts.push(format!("approved by {}", esc(&d.approved_by)));
    }
    if !d.waiting_for.is_empty() && !d.is_terminal() {
        facts.push(format!("waiting for {}", esc(&d.waiting_for)));
    }
    if let Some(at) = &d.finished_at {
        facts.push(format!("finished at {}", esc(at)));
    }
    let _ = write!(out, r#"<p class="facts">{}</p>"#, facts.join(" · "));
    if !d.reason.is_empty() {
        let _ = write!(out, r#"<p class="reason">Reason: {}</p>"#, esc(&d.reason));
    }
    let _ = write!(
        out,
        r#"<p><label for="progress">{h} of {t} node(s) healthy{f}</label> <progress id="progress" max="{tmax}" value="{h}"></progress></p>"#,
        h = d.progress.healthy,
        t = d.progress.total,
        tmax = d.progress.total.max(1),
        f = if d.progress.failed > 0 {
            format!(", {} failed", d.progress.failed)
        } else {
            String::new()
        },
    );
    // The controls the role allows, each leading to a confirmation.
    let controls = allowed_controls(ui.role().as_deref(), &ui.user, d);
    if !controls.is_empty() {
        out.push_str(r#"<nav class="controls" aria-label="Deployment controls">"#);
        for (action, label, what) in CONTROLS.iter().filter(|(a, _, _)| controls.contains(a)) {
            let _ = write!(
                out,
                r#"<a class="button {danger}" data-action="{action}" href="/deployments/{id}/confirm?action={action}" title="{what}">{label}</a>"#,
                danger = if matches!(*action, "abort" | "rollback" | "reject") {
                    "danger"
                } else {
                    ""
                },
                id = esc(&d.id),
                what = esc(what),
            );
        }
        out.push_str("</nav>");
    }
    // Waves with their nodes.
    out.push_str(
        r#"<section aria-labelledby="waves-h"><h2 id="waves-h">Waves</h2><ol class="waves">"#,
    );
    for w in 0..waves {
        let nodes: Vec<_> = d.nodes.iter().filter(|n| n.wave == w).collect();
        let place = if d.is_terminal() {
            "ended"
        } else if w < d.wave {
            "done"
        } else if w == d.wave {
            "current"
        } else {
            "waiting"
        };
        let _ = write!(
            out,
            r#"<li class="wave {place}" data-wave-index="{n}"><h3>Wave {n} <span class="muted">{place}</span></h3><ul class="nodes">"#,
            n = w + 1
        );
        for n in nodes {
            let kind = n
                .failure_kind
                .as_deref()
                .map(|k| format!(" <span class=\"muted\">({} failure)</span>", esc(k)))
                .unwrap_or_default();
            let reason = if n.reason.is_empty() {
                String::new()
            } else {
                format!(r#"<span class="muted"> {}</span>"#, esc(&n.reason))
            };
            let _ = write!(
                out,
                r#"<li data-node="{name}" data-node-state="{st}"><span class="node">{name}</span> {from} → {to} {state}{kind}{reason}</li>"#,
                name = esc(&n.node),
                st = esc(&n.state),
                from = esc(if n.from_version.is_empty() {
                    "none"
                } else {
                    &n.from_version
                }),
                to = esc(&n.to_version),
                state = chip(&n.state),
            );
        }
        out.push_str("</ul></li>");
    }
    out.push_str("</ol></section>");
    out.push_str(&analysis_section(d));
    out
}

/// One entry of a deployment's timeline.
pub fn timeline_item(e: &EventView) -> String {
    let about = match (&e.node, &e.module, &e.version) {
        (Some(n), _, _) => format!(" <span class=\"node\">{}</span>", esc(n)),
        (None, Some(m), Some(v)) => format!(" {}@{}", esc(m), esc(v)),
        _ => String::new(),
    };
    format!(
        r#"<li data-seq="{seq}"><time>{time}</time> <code>{kind}</code>{about} {message}</li>"#,
        seq = e.seq,
        time = esc(e.time.as_deref().unwrap_or("-")),
        kind = esc(&e.kind),
        message = esc(&e.message),
    )
}

/// Stored events (oldest first) matching `request`, and the next sequence
/// number to follow from.
pub async fn stored_events(
    ui: &Ui,
    mut request: pb::WatchEventsRequest,
) -> Result<(Vec<EventView>, u64), CliError> {
    request.follow = false;
    let mut client = pb::events_client::EventsClient::new(ui.channel());
    let mut stream = client
        .watch_events(request.clone())
        .await
        .map_err(ui.conn.rpc_error("read events"))?
        .into_inner();
    let mut events = Vec::new();
    let mut next = request.since;
    while let Some(e) = stream
        .message()
        .await
        .map_err(ui.conn.rpc_error("read events"))?
    {
        next = next.max(e.seq + 1);
        events.push(EventView::from(e));
    }
    Ok((events, next))
}

pub async fn deployment(State(ui): State<Arc<Ui>>, Path(id): Path<String>) -> Response {
    ui.refresh_role().await;
    let title = format!("Deployment {id}");
    let d = match get_deployment(&ui, &id).await {
        Ok(d) => d,
        Err(e) => return error_page(&ui, &title, Nav::Deployments, &e),
    };
    let (events, next) = match stored_events(
        &ui,
        pb::WatchEventsRequest {
            deployment_id: id.clone(),
            limit: 1000,
            newest: true,
            ..Default::default()
        },
    )
    .await
    {
        Ok(e) => e,
        Err(e) => return error_page(&ui, &title, Nav::Deployments, &e),
    };
    let timeline: String = events.iter().map(timeline_item).collect();
    let body = format!(
        r#"<div id="deployment-live" data-deployment="{id}">{live}</div><section aria-labelledby="timeline-h"><h2 id="timeline-h">Timeline</h2><ol id="timeline" class="timeline" aria-live="polite">{timeline}</ol></section>"#,
        id = esc(&d.id),
        live = deployment_live(&ui, &d),
    );
    let live = format!("/live/deployments/{}?since={next}", d.id);
    page(&ui, &title, Nav::Deployments, Some(&live), &body).into_response()
}

#[derive(Deserialize)]
pub struct ConfirmQuery {
    action: String,
}

fn control_label(action: &str) -> Option<(&'static str, &'static str)> {
    CONTROLS
        .iter()
        .find(|(a, _, _)| *a == action)
        .map(|(_, label, what)| (*label, *what))
}

fn confirm_page(ui: &Ui, d: &DeploymentView, action: &str, error: Option<&str>) -> Html<String> {
    let (label, what) = control_label(action).unwrap_or(("?", ""));
    let reason = if takes_reason(action) {
        r#"<p><label for="reason">Reason (optional; kept in the deployment's events)</label><br><textarea id="reason" name="reason" rows="3" cols="60"></textarea></p>"#
    } else {
        ""
    };
    let error = error
        .map(|e| format!(r#"<p class="error" role="alert">{}</p>"#, esc(e)))
        .unwrap_or_default();
    let body = format!(
        r#"{error}<p class="lead">{label} deployment <a href="/deployments/{id}">{id}</a> of {m}@{v} to {env} (now {state})? This {what}.</p>
<form method="post" action="/deployments/{id}/control" class="confirm"><input type="hidden" name="action" value="{action}"><input type="hidden" name="csrf" value="{csrf}">{reason}<p><button type="submit" id="confirm" class="{danger}">{label} {id}</button> <a href="/deployments/{id}">Cancel</a></p></form>"#,
        id = esc(&d.id),
        m = esc(&d.module),
        v = esc(&d.version),
        env = esc(&d.environment),
        state = chip(&d.state),
        action = esc(action),
        csrf = esc(&ui.csrf),
        danger = if matches!(action, "abort" | "rollback" | "reject") {
            "danger"
        } else {
            ""
        },
    );
    page(ui, &format!("{label}?"), Nav::Deployments, None, &body)
}

pub async fn confirm(
    State(ui): State<Arc<Ui>>,
    Path(id): Path<String>,
    Query(query): Query<ConfirmQuery>,
) -> Response {
    ui.refresh_role().await;
    let d = match get_deployment(&ui, &id).await {
        Ok(d) => d,
        Err(e) => return error_page(&ui, "Confirm", Nav::Deployments, &e),
    };
    if control_label(&query.action).is_none() {
        return (
            StatusCode::BAD_REQUEST,
            page(
                &ui,
                "Confirm",
                Nav::Deployments,
                None,
                r#"<p class="error" role="alert">action: unknown control; use pause, resume, promote, abort, rollback, approve or reject</p>"#,
            ),
        )
            .into_response();
    }
    if !allowed_controls(ui.role().as_deref(), &ui.user, &d).contains(&query.action.as_str()) {
        let body = format!(
            r#"<p class="error" role="alert">{} is not possible for you on {} now: your role is {} and the deployment is {}.</p><p><a href="/deployments/{}">Back to the deployment</a></p>"#,
            esc(&query.action),
            esc(&d.id),
            esc(&ui.role().unwrap_or_else(|| "unknown".into())),
            esc(&d.state),
            esc(&d.id)
        );
        return (
            StatusCode::FORBIDDEN,
            page(&ui, "Confirm", Nav::Deployments, None, &body),
        )
            .into_response();
    }
    confirm_page(&ui, &d, &query.action, None).into_response()
}

#[derive(Deserialize)]
pub struct ControlForm {
    action: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    csrf: String,
}

/// A browser names the page a POST comes from in `Origin`; one from
/// another origin is refused even before the form token is looked at.
/// (Without the header, e.g. from curl, the form token decides.)
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    origin.to_str().ok() == Some(format!("http://{host}").as_str())
}

pub async fn control(
    State(ui): State<Arc<Ui>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<ControlForm>,
) -> Response {
    if !same_origin(&headers) || !same_secret(&form.csrf, &ui.csrf) {
        return (
            StatusCode::FORBIDDEN,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "403: the form token is missing or wrong; reload the page and try again\n",
        )
            .into_response();
    }
    if control_label(&form.action).is_none() {
        return (StatusCode::BAD_REQUEST, "action: unknown control\n").into_response();
    }
    let mut client = pb::deployments_client::DeploymentsClient::new(ui.channel());
    let result = client
        .control_deployment(pb::ControlDeploymentRequest {
            id: id.clone(),
            action: form.action.clone(),
            reason: form.reason.trim().to_string(),
        })
        .await
        .map_err(ui.conn.rpc_error(&format!("{} {id}", form.action)));
    match result {
        Ok(_) => Redirect::to(&format!("/deployments/{id}")).into_response(),
        Err(e) => {
            let status = error_status(&e);
            match get_deployment(&ui, &id).await {
                Ok(d) => (
                    status,
                    confirm_page(&ui, &d, &form.action, Some(&e.to_string())),
                )
                    .into_response(),
                Err(_) => error_page(&ui, "Control", Nav::Deployments, &e),
            }
        }
    }
}

// --------------------------------------------------------------- events

pub fn event_row(e: &EventView) -> String {
    let mut about = Vec::new();
    if let Some(d) = &e.deployment_id {
        about.push(format!(r#"<a href="/deployments/{0}">{0}</a>"#, esc(d)));
    }
    if let Some(n) = &e.node {
        about.push(esc(n));
    }
    match (&e.module, &e.version) {
        (Some(m), Some(v)) => about.push(format!("{}@{}", esc(m), esc(v))),
        (Some(m), None) => about.push(esc(m)),
        _ => {}
    }
    format!(
        r#"<tr data-seq="{seq}"><td>{seq}</td><td><time>{time}</time></td><td><code>{kind}</code></td><td>{about}</td><td>{message}</td></tr>"#,
        seq = e.seq,
        time = esc(e.time.as_deref().unwrap_or("-")),
        kind = esc(&e.kind),
        about = about.join(" "),
        message = esc(&e.message),
    )
}

pub async fn events(State(ui): State<Arc<Ui>>) -> Response {
    ui.refresh_role().await;
    let (events, next) = match stored_events(
        &ui,
        pb::WatchEventsRequest {
            limit: EVENTS_SHOWN,
            newest: true,
            ..Default::default()
        },
    )
    .await
    {
        Ok(e) => e,
        Err(e) => return error_page(&ui, "Events", Nav::Events, &e),
    };
    let rows: String = events.iter().rev().map(event_row).collect();
    let body = format!(
        r#"<p class="lead">Newest first; new events appear as they happen.</p>{}<div class="scroll"><table><caption class="sr">Events, newest first</caption><thead><tr><th scope="col">Seq</th><th scope="col">Time</th><th scope="col">Kind</th><th scope="col">About</th><th scope="col">Message</th></tr></thead><tbody id="events-rows" data-newest-first>{rows}</tbody></table></div>"#,
        filter_box("events-rows", "kind, deployment, node, module, text"),
    );
    let live = format!("/live/events?since={next}");
    page(&ui, "Events", Nav::Events, Some(&live), &body).into_response()
}

// ---------------------------------------------------------------- audit

pub async fn audit(State(ui): State<Arc<Ui>>) -> Response {
    ui.refresh_role().await;
    let mut client = pb::audit_client::AuditClient::new(ui.channel());
    let reply = match client
        .list_audit(pb::ListAuditRequest {
            limit: AUDIT_SHOWN,
            ..Default::default()
        })
        .await
        .map_err(ui.conn.rpc_error("list audit records"))
    {
        Ok(r) => r.into_inner(),
        Err(e) => return error_page(&ui, "Audit", Nav::Audit, &e),
    };
    let mut rows = String::new();
    for record in reply.records.into_iter().rev() {
        let r = match serde_json::to_value(crate::audit::RecordView::from(record)) {
            Ok(r) => r,
            Err(e) => return error_page(&ui, "Audit", Nav::Audit, &unexpected(e)),
        };
        let _ = write!(
            rows,
            r#"<tr data-seq="{seq}"><td>{seq}</td><td><time>{time}</time></td><td class="user">{user}</td><td>{role}</td><td><code>{action}</code></td><td>{target}</td><td>{result}</td><td>{detail}</td></tr>"#,
            seq = u(&r["seq"]),
            time = esc(&text(&r["time"])),
            user = esc(&text(&r["user"])),
            role = esc(&text(&r["role"])),
            action = esc(&text(&r["action"])),
            target = esc(&text(&r["target"])),
            result = chip(&text(&r["result"])),
            detail = esc(&text(&r["detail"])),
        );
    }
    let body = format!(
        r#"<p class="lead">The newest {AUDIT_SHOWN} records of the tamper-evident log, newest first (<code>hotswapctl audit verify</code> checks the chain).</p>{}<div class="scroll"><table><caption class="sr">Audit records, newest first</caption><thead><tr><th scope="col">Seq</th><th scope="col">Time</th><th scope="col">User</th><th scope="col">Role</th><th scope="col">Action</th><th scope="col">Target</th><th scope="col">Result</th><th scope="col">Detail</th></tr></thead><tbody id="audit-rows">{rows}</tbody></table></div>"#,
        filter_box("audit-rows", "user, action, target, result"),
    );
    page(&ui, "Audit", Nav::Audit, None, &body).into_response()
}

// --------------------------------------------------------------- assets

pub async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        SCRIPT,
    )
        .into_response()
}

pub async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        STYLESHEET,
    )
        .into_response()
}

/// The time of a stored event in milliseconds, for the latency the page
/// reports (event recorded to page patched).
pub fn event_ms(e: &pb::Event) -> u64 {
    e.time.as_ref().map_or(0, ms_from_ts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotswap_common::model::{DeploymentNodeView, ProgressView};

    fn deployment(state: &str, created_by: &str, waiting_for: &str) -> DeploymentView {
        DeploymentView {
            id: "d-1".into(),
            module: "hello".into(),
            version: "1.1.0".into(),
            environment: "qa".into(),
            strategy: "canary".into(),
            state: state.into(),
            progress: ProgressView {
                total: 2,
                updated: 1,
                healthy: 1,
                failed: 0,
            },
            nodes: vec![DeploymentNodeView {
                node: "a".into(),
                from_version: "1.0.0".into(),
                to_version: "1.1.0".into(),
                state: "healthy".into(),
                reason: String::new(),
                wave: 0,
                failure_kind: None,
            }],
            created_by: created_by.into(),
            created_at: None,
            finished_at: None,
            reason: String::new(),
            wave: 0,
            waves: 2,
            analysis: Vec::new(),
            approved_by: String::new(),
            waiting_for: waiting_for.into(),
            max_error_rate: None,
            max_latency_increase: None,
        }
    }

    #[test]
    fn posts_from_another_origin_are_refused() {
        let headers = |origin: Option<&'static str>| {
            let mut h = HeaderMap::new();
            h.insert(
                header::HOST,
                axum::http::HeaderValue::from_static("127.0.0.1:8080"),
            );
            if let Some(o) = origin {
                h.insert(header::ORIGIN, axum::http::HeaderValue::from_static(o));
            }
            h
        };
        assert!(same_origin(&headers(None)));
        assert!(same_origin(&headers(Some("http://127.0.0.1:8080"))));
        assert!(!same_origin(&headers(Some("https://evil.example"))));
        assert!(!same_origin(&headers(Some("http://127.0.0.1:8081"))));
        assert!(!same_origin(&headers(Some("null"))));
    }

    #[test]
    fn controls_follow_role_and_state() {
        let running = deployment("running", "dee", "");
        let waiting = deployment("awaiting_approval", "dee", "approval");
        let promote = deployment("running", "dee", "deploy promote");
        let cases: [(Option<&str>, &str, &DeploymentView, &[&str]); 9] = [
            (Some("viewer"), "vic", &running, &[]),
            (None, "vic", &running, &[]),
            (
                Some("deployer"),
                "dee",
                &running,
                &["pause", "abort", "rollback"],
            ),
            (Some("deployer"), "dee", &waiting, &[]),
            (Some("approver"), "ann", &waiting, &["approve", "reject"]),
            // Nobody approves their own deployment.
            (Some("admin"), "dee", &waiting, &["reject"]),
            (
                Some("approver"),
                "ann",
                &promote,
                &["promote", "pause", "abort", "rollback"],
            ),
            (Some("viewer"), "vic", &waiting, &[]),
            (
                Some("admin"),
                "root",
                &deployment("paused", "dee", ""),
                &["resume", "abort", "rollback"],
            ),
        ];
        for (role, user, d, expected) in cases {
            assert_eq!(
                allowed_controls(role, user, d),
                expected,
                "{role:?} {user} on {}",
                d.state
            );
        }
    }
}
