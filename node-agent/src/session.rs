//! One agent session: connect with mTLS, send hello, wait for the welcome,
//! then heartbeat at the interval the control plane asked for while reading
//! its messages. Returns why the session ended, sorted into "try again" and
//! "give up" (the control plane refused this node's identity).

use std::time::Duration;

use hotswap_common::admin::Readiness;
use hotswap_common::convert::{FieldError, check_version, module_name_from_pb};
use hotswap_common::labels::Labels;
use hotswap_common::pb;
use hotswap_common::pb::agent_message::Msg as AgentMsg;
use hotswap_common::pb::control_message::Msg as ControlMsg;
use hotswap_common::tls::{self, ChannelOptions, ClientIdentity, ControlPlaneUrl, ServerTrust};
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::reconciler::AgentReport;
use crate::state::{Desired, DesiredModule};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::identity::{Identity, error_chain};
use crate::metrics::Metrics;

/// How long the control plane has to answer the hello with a welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Missing this many heartbeat intervals of silence from the control plane
/// means the connection is dead even if TCP has not noticed.
const SILENCE_INTERVALS: u32 = 3;

#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Shutdown was requested; the session was closed cleanly.
    Shutdown,
    /// The session could not start or broke; reconnect after a backoff.
    /// `established` says whether it got as far as the welcome.
    Retry { reason: String, established: bool },
    /// The control plane refuses this node; reconnecting cannot help.
    Fatal(String),
    /// The node's certificate was renewed: open the next session with the
    /// new one at once, and keep this one open until it is up.
    Handover(Box<Handover>),
}

/// An established session kept alive while its successor connects, so the
/// control plane replaces one with the other and never sees the node leave.
pub struct Handover {
    _channel: Channel,
    _outbound: mpsc::Sender<pb::AgentMessage>,
    _inbound: tonic::Streaming<pb::ControlMessage>,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handover")
    }
}

impl PartialEq for Handover {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Handover {}

pub struct SessionParams<'a> {
    pub url: &'a ControlPlaneUrl,
    pub identity: &'a Identity,
    pub labels: &'a Labels,
    pub metrics: &'a Metrics,
    pub readiness: &'a Readiness,
    pub shutdown: &'a CancellationToken,
    /// Desired state received from the control plane goes here.
    pub desired: &'a watch::Sender<Option<Desired>>,
    /// The session's channel while it is up, for artifact fetches.
    pub channel: &'a watch::Sender<Option<Channel>>,
    /// Status reports to send.
    pub reports: watch::Receiver<AgentReport>,
    /// Changes when the certificate is renewed.
    pub renewed: watch::Receiver<u64>,
    /// The previous session, closed once this one is established.
    pub previous: Option<Handover>,
}

/// A full status report goes out at least this often, besides one per change.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);

/// A desired state as the control plane sends it. Refused whole, naming
/// the field, when a module name breaks the module name rule (names become
/// paths on this node), a name repeats, or a version is not semver: acting
/// on part of a malformed state could stop modules the control plane still
/// wants.
impl TryFrom<pb::DesiredState> for Desired {
    type Error = FieldError;

    fn try_from(desired: pb::DesiredState) -> Result<Self, Self::Error> {
        let mut modules = std::collections::BTreeMap::new();
        for (index, m) in desired.modules.into_iter().enumerate() {
            let entry = format!("modules[{index}]");
            let name = module_name_from_pb("name", &m.name).map_err(|e| e.within(&entry))?;
            check_version("version", &m.version).map_err(|e| e.within(&entry))?;
            check_version("staged_version", &m.staged_version).map_err(|e| e.within(&entry))?;
            let module = DesiredModule {
                version: m.version,
                staged_version: m.staged_version,
                traceparent: m.traceparent,
            };
            if modules.insert(name.into_string(), module).is_some() {
                return Err(FieldError::new(
                    "name",
                    format!("module {:?} is listed twice", m.name),
                )
                .within(&entry));
            }
        }
        Ok(Desired {
            generation: desired.generation,
            modules,
            min_signatures: desired.min_signatures,
        })
    }
}

fn report_to_pb(report: &AgentReport) -> pb::AgentMessage {
    let modules = report
        .modules
        .iter()
        .map(|m| pb::ModuleStatus {
            name: m.name.clone(),
            version: m.version.clone(),
            phase: m.phase.as_str().to_string(),
            health: m.health.as_str().to_string(),
            message: m.message.clone(),
            staged_version: m.staged_version.clone(),
            previous_version: m.previous_version.clone(),
            restarts: m.restarts,
            crash_loop: m.crash_loop,
            metrics: m.metrics.map(|w| pb::ModuleMetrics {
                request_rate: w.request_rate,
                error_rate: w.error_rate,
                latency_p99_seconds: w.latency_p99_seconds,
                interval_seconds: 0.0,
            }),
            pid: m.pid,
            settling_versions: m.settling.clone(),
            failure_kind: m
                .failure_kind
                .map(|k| k.as_str().to_string())
                .unwrap_or_default(),
        })
        .collect();
    pb::AgentMessage {
        msg: Some(AgentMsg::Status(pb::StatusReport {
            modules,
            observed_generation: report.observed_generation,
            desired_generation: report.desired_generation,
            usage: report.usage.map(|u| pb::NodeUsage {
                cpu_percent: u.cpu_percent,
                memory_used_bytes: u.memory_used_bytes,
                memory_total_bytes: u.memory_total_bytes,
            }),
        })),
    }
}

fn retry(reason: impl Into<String>, established: bool) -> SessionEnd {
    SessionEnd::Retry {
        reason: reason.into(),
        established,
    }
}

fn classify(status: &tonic::Status, established: bool) -> SessionEnd {
    match status.code() {
        Code::PermissionDenied | Code::Unauthenticated => SessionEnd::Fatal(format!(
            "the control plane refused this node: {}; if the node was removed, delete the identity directory and enroll again with a new join token",
            status.message()
        )),
        _ => retry(
            format!("session failed: {}: {}", status.code(), status.message()),
            established,
        ),
    }
}

pub async fn run_once(mut params: SessionParams<'_>) -> SessionEnd {
    let identity = params.identity;
    if let Ok(not_after) = hotswap_common::pki::first_cert_der(&identity.cert_pem)
        .and_then(|der| hotswap_common::pki::not_after_ms(der.as_ref()))
        && not_after <= hotswap_common::timefmt::now_ms()
    {
        return SessionEnd::Fatal(format!(
            "this node's certificate expired at {} (the agent was offline past its renewal); remove {} and enroll again with a new join token",
            hotswap_common::timefmt::rfc3339_from_ms(not_after),
            "DATA_DIR/identity"
        ));
    }
    let config = match tls::client_config(
        ServerTrust::Ca(identity.ca_pem.clone()),
        Some(ClientIdentity {
            cert_pem: &identity.cert_pem,
            key_pem: &identity.key_pem,
        }),
    ) {
        Ok(config) => config,
        Err(e) => return SessionEnd::Fatal(format!("node identity is unusable: {e}")),
    };
    let options = ChannelOptions::default();
    let connect = tls::connect(params.url, config, &options);
    let channel = tokio::select! {
        _ = params.shutdown.cancelled() => return SessionEnd::Shutdown,
        channel = connect => match channel {
            Ok(channel) => channel,
            Err(e) => {
                params.metrics.rpc("session", "unreachable");
                return retry(format!("cannot reach the control plane at {}: {}", params.url, error_chain(&e)), false);
            }
        },
    };

    let (tx, rx) = mpsc::channel(16);
    let hello = pb::AgentMessage {
        msg: Some(AgentMsg::Hello(pb::Hello {
            node_id: identity.info.node_id.clone(),
            name: identity.info.name.clone(),
            labels: params.labels.clone().into_iter().collect(),
            agent_version: hotswap_common::VERSION.to_string(),
        })),
    };
    // Fresh channel: cannot be full.
    let _ = tx.try_send(hello);
    let mut client = pb::agent_session_client::AgentSessionClient::new(channel.clone());
    let opened = tokio::select! {
        _ = params.shutdown.cancelled() => return SessionEnd::Shutdown,
        opened = client.session(ReceiverStream::new(rx)) => opened,
    };
    let mut inbound = match opened {
        Ok(response) => response.into_inner(),
        Err(status) => {
            params.metrics.rpc("session", "error");
            return classify(&status, false);
        }
    };

    let welcome = tokio::select! {
        _ = params.shutdown.cancelled() => return SessionEnd::Shutdown,
        first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()) => first,
    };
    let welcome = match welcome {
        Ok(Ok(Some(pb::ControlMessage {
            msg: Some(ControlMsg::Welcome(welcome)),
        }))) => welcome,
        Ok(Ok(Some(_))) => {
            return retry(
                "control plane sent something other than a welcome first",
                false,
            );
        }
        Ok(Ok(None)) => return retry("control plane closed the session before its welcome", false),
        Ok(Err(status)) => {
            params.metrics.rpc("session", "error");
            return classify(&status, false);
        }
        Err(_) => {
            return retry(
                format!("no welcome within {}s", WELCOME_TIMEOUT.as_secs()),
                false,
            );
        }
    };
    params.metrics.rpc("session", "ok");
    let interval = Duration::from_millis(welcome.heartbeat_interval_ms.clamp(100, 3_600_000));
    let silence_limit = interval * SILENCE_INTERVALS;
    tracing::info!(node = %identity.info.node_id, heartbeat_ms = interval.as_millis() as u64, "session established");
    params.metrics.connected.set(1);
    params.readiness.set(true);
    params.channel.send_replace(Some(channel.clone()));
    if params.previous.take().is_some() {
        tracing::info!("session moved to the renewed certificate");
    }

    let Some(end) = heartbeat_loop(&mut params, &tx, &mut inbound, interval, silence_limit).await
    else {
        return SessionEnd::Handover(Box::new(Handover {
            _channel: channel,
            _outbound: tx,
            _inbound: inbound,
        }));
    };
    params.channel.send_replace(None);
    params.metrics.connected.set(0);
    params.readiness.set(false);
    // Dropping our half of the stream tells the control plane we are gone.
    drop(tx);
    end
}

async fn heartbeat_loop(
    params: &mut SessionParams<'_>,
    tx: &mpsc::Sender<pb::AgentMessage>,
    inbound: &mut tonic::Streaming<pb::ControlMessage>,
    interval: Duration,
    silence_limit: Duration,
) -> Option<SessionEnd> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    let mut summary = tokio::time::interval(SUMMARY_INTERVAL);
    // The first report goes out right away, as part of the first tick.
    params.reports.mark_changed();
    let mut renewals_open = true;
    // Every heartbeat is acknowledged: a control plane that says nothing for
    // this long is gone, even if the connection looks open (a partition
    // that drops packets closes nothing). A deadline of its own, so the
    // other branches cannot keep pushing it back.
    let mut silent_at = tokio::time::Instant::now() + silence_limit;
    loop {
        tokio::select! {
            _ = params.shutdown.cancelled() => return Some(SessionEnd::Shutdown),
            _ = tokio::time::sleep_until(silent_at) => {
                return Some(retry(format!("control plane silent for {}s", silence_limit.as_secs_f64()), true));
            }
            renewed = params.renewed.changed(), if renewals_open => {
                match renewed {
                    // run_once turns this into a handover carrying the streams.
                    Ok(()) => return None,
                    Err(_) => renewals_open = false,
                }
            }
            changed = params.reports.changed() => {
                if changed.is_err() {
                    return Some(SessionEnd::Shutdown);
                }
                let report = report_to_pb(&params.reports.borrow_and_update());
                if tx.send(report).await.is_err() {
                    return Some(retry("session stream closed", true));
                }
            }
            _ = summary.tick() => {
                let report = report_to_pb(&params.reports.borrow());
                if tx.send(report).await.is_err() {
                    return Some(retry("session stream closed", true));
                }
            }
            _ = ticker.tick() => {
                seq += 1;
                let heartbeat = pb::AgentMessage { msg: Some(AgentMsg::Heartbeat(pb::Heartbeat { seq })) };
                if tx.send(heartbeat).await.is_err() {
                    return Some(retry("session stream closed", true));
                }
                params.metrics.heartbeats_sent.inc();
            }
            message = inbound.message() => match message {
                Ok(None) => return Some(retry("control plane closed the session", true)),
                Err(status) => return Some(classify(&status, true)),
                Ok(Some(message)) => {
                    silent_at = tokio::time::Instant::now() + silence_limit;
                    match message.msg {
                        Some(ControlMsg::HeartbeatAck(_)) => {}
                        Some(ControlMsg::Desired(desired)) => {
                            let generation = desired.generation;
                            match Desired::try_from(desired) {
                                Ok(desired) => {
                                    params.desired.send_replace(Some(desired));
                                }
                                // Keep converging to the last good state;
                                // the control plane sends the next one on
                                // its next change.
                                Err(e) => tracing::error!(generation, error = %e, "desired state refused: malformed"),
                            }
                        }
                        Some(ControlMsg::Welcome(_)) => tracing::debug!("ignoring a repeated welcome"),
                        None => tracing::debug!("ignoring an empty control message"),
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str, version: &str, staged_version: &str) -> pb::DesiredModule {
        pb::DesiredModule {
            name: name.into(),
            version: version.into(),
            staged_version: staged_version.into(),
            traceparent: String::new(),
        }
    }

    fn desired(modules: Vec<pb::DesiredModule>) -> Result<Desired, String> {
        Desired::try_from(pb::DesiredState {
            generation: 3,
            modules,
            min_signatures: 2,
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_desired_state_converts_or_names_the_bad_field() {
        let ok = desired(vec![
            module("web", "1.0.0", ""),
            module("db", "", "2.0.0-rc.1"),
        ])
        .expect("valid");
        assert_eq!((ok.generation, ok.min_signatures), (3, 2));
        assert_eq!(ok.modules["db"].staged_version, "2.0.0-rc.1");

        let err = desired(vec![
            module("web", "1.0.0", ""),
            module("../etc", "1.0.0", ""),
        ])
        .expect_err("bad name");
        assert!(
            err.starts_with("modules[1].name: module name \"../etc\" is invalid"),
            "{err}"
        );
        let err = desired(vec![module("web", "latest", "")]).expect_err("bad version");
        assert!(
            err.starts_with("modules[0].version: \"latest\" is not semver"),
            "{err}"
        );
        let err = desired(vec![module("web", "", "x")]).expect_err("bad staged");
        assert!(err.starts_with("modules[0].staged_version: "), "{err}");
        let err = desired(vec![module("web", "1.0.0", ""), module("web", "2.0.0", "")])
            .expect_err("repeated");
        assert_eq!(err, "modules[1].name: module \"web\" is listed twice");
    }
}
