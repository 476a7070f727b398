//! One agent session: connect with mTLS, send hello, wait for the welcome,
//! then heartbeat at the interval the control plane asked for while reading
//! its messages. Returns why the session ended, sorted into "try again" and
//! "give up" (the control plane refused this node's identity).

use std::time::Duration;

use hotswap_common::admin::Readiness;
use hotswap_common::labels::Labels;
use hotswap_common::pb;
use hotswap_common::pb::agent_message::Msg as AgentMsg;
use hotswap_common::pb::control_message::Msg as ControlMsg;
use hotswap_common::tls::{self, ChannelOptions, ClientIdentity, ControlPlaneUrl, ServerTrust};
use tokio::sync::mpsc;
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
}

pub struct SessionParams<'a> {
    pub url: &'a ControlPlaneUrl,
    pub identity: &'a Identity,
    pub labels: &'a Labels,
    pub metrics: &'a Metrics,
    pub readiness: &'a Readiness,
    pub shutdown: &'a CancellationToken,
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

pub async fn run_once(params: SessionParams<'_>) -> SessionEnd {
    let identity = params.identity;
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
    let mut client = pb::agent_session_client::AgentSessionClient::new(channel);
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

    let end = heartbeat_loop(&params, &tx, &mut inbound, interval, silence_limit).await;
    params.metrics.connected.set(0);
    params.readiness.set(false);
    // Dropping our half of the stream tells the control plane we are gone.
    drop(tx);
    end
}

async fn heartbeat_loop(
    params: &SessionParams<'_>,
    tx: &mpsc::Sender<pb::AgentMessage>,
    inbound: &mut tonic::Streaming<pb::ControlMessage>,
    interval: Duration,
    silence_limit: Duration,
) -> SessionEnd {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    loop {
        tokio::select! {
            _ = params.shutdown.cancelled() => return SessionEnd::Shutdown,
            _ = ticker.tick() => {
                seq += 1;
                let heartbeat = pb::AgentMessage { msg: Some(AgentMsg::Heartbeat(pb::Heartbeat { seq })) };
                if tx.send(heartbeat).await.is_err() {
                    return retry("session stream closed", true);
                }
                params.metrics.heartbeats_sent.inc();
            }
            message = tokio::time::timeout(silence_limit, inbound.message()) => match message {
                Err(_) => return retry(format!("control plane silent for {}s", silence_limit.as_secs_f64()), true),
                Ok(Ok(None)) => return retry("control plane closed the session", true),
                Ok(Err(status)) => return classify(&status, true),
                Ok(Ok(Some(message))) => match message.msg {
                    Some(ControlMsg::HeartbeatAck(_)) => {}
                    Some(ControlMsg::Welcome(_)) => tracing::debug!("ignoring a repeated welcome"),
                    None => tracing::debug!("ignoring an empty control message"),
                },
            },
        }
    }
}
