//! One agent session: connect with mTLS, send hello, wait for the welcome,
//! then heartbeat at the interval the control plane asked for while reading
//! its messages. Returns why the session ended, sorted into "try again" and
//! "give up" (the control plane refused this node's identity).

use std::time::Duration;

use hotswap_common::admin::Readiness;
use hotswap_common::labels::Labels;
use hotswap_common::tls::{self, ChannelOptions, ClientIdentity, ControlPlaneUrl, ServerTrust};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::control_plane::{
    Connection, EncodedReport, Hello, Inbound, RpcError, Session, StreamClosed, error_chain,
};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::report::AgentReport;
use crate::state::Desired;

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
    _connection: Connection,
    _session: Session,
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
    /// The session's connection while it is up, for artifact fetches and
    /// renewals.
    pub channel: &'a watch::Sender<Option<Connection>>,
    /// Status reports to send.
    pub reports: watch::Receiver<AgentReport>,
    /// Changes when the certificate is renewed.
    pub renewed: watch::Receiver<u64>,
    /// The previous session, closed once this one is established.
    pub previous: Option<Handover>,
    /// The TLS client config of earlier sessions, reused while the identity
    /// is the same: it holds the session tickets a reconnect resumes with.
    pub tls: &'a mut ClientTls,
}

/// The TLS client config for one identity, kept across sessions so that a
/// reconnect (after a restart of the control plane) resumes its TLS session
/// with the ticket the last one received instead of a full handshake.
#[derive(Default)]
pub struct ClientTls {
    held: Option<(Identity, std::sync::Arc<rustls::ClientConfig>)>,
}

impl ClientTls {
    /// The config for `identity`: the one held if it was made for the same
    /// certificate, key and CA, else a new one (which then is held).
    pub fn for_identity(
        &mut self,
        identity: &Identity,
    ) -> Result<std::sync::Arc<rustls::ClientConfig>, tls::TlsError> {
        if let Some((held, config)) = &self.held
            && held.cert_pem == identity.cert_pem
            && held.key_pem == identity.key_pem
            && held.ca_pem == identity.ca_pem
        {
            return Ok(config.clone());
        }
        let config = tls::client_config(
            ServerTrust::Ca(identity.ca_pem.clone()),
            Some(ClientIdentity {
                cert_pem: &identity.cert_pem,
                key_pem: &identity.key_pem,
            }),
        )?;
        self.held = Some((identity.clone(), config.clone()));
        Ok(config)
    }
}

/// A full status report goes out at least this often, besides one per change.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);

fn retry(reason: impl Into<String>, established: bool) -> SessionEnd {
    SessionEnd::Retry {
        reason: reason.into(),
        established,
    }
}

fn classify(error: &RpcError, established: bool) -> SessionEnd {
    if error.is_identity_refused() {
        return SessionEnd::Fatal(format!(
            "the control plane refused this node: {}; if the node was removed, delete the identity directory and enroll again with a new join token",
            error.message
        ));
    }
    retry(format!("session failed: {error}"), established)
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
    let config = match params.tls.for_identity(identity) {
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

    let connection = Connection::new(channel);
    let hello = Hello {
        node_id: identity.info.node_id.clone(),
        name: identity.info.name.clone(),
        labels: params.labels.clone(),
        agent_version: hotswap_common::VERSION.to_string(),
    };
    let opened = tokio::select! {
        _ = params.shutdown.cancelled() => return SessionEnd::Shutdown,
        opened = connection.open_session(&hello) => opened,
    };
    let mut session = match opened {
        Ok(session) => session,
        Err(error) => {
            params.metrics.rpc("session", "error");
            return classify(&error, false);
        }
    };

    let welcome = tokio::select! {
        _ = params.shutdown.cancelled() => return SessionEnd::Shutdown,
        first = tokio::time::timeout(WELCOME_TIMEOUT, session.next()) => first,
    };
    let welcome = match welcome {
        Ok(Ok(Some(Inbound::Welcome(welcome)))) => welcome,
        Ok(Ok(Some(_))) => {
            return retry(
                "control plane sent something other than a welcome first",
                false,
            );
        }
        Ok(Ok(None)) => return retry("control plane closed the session before its welcome", false),
        Ok(Err(error)) => {
            params.metrics.rpc("session", "error");
            return classify(&error, false);
        }
        Err(_) => {
            return retry(
                format!("no welcome within {}s", WELCOME_TIMEOUT.as_secs()),
                false,
            );
        }
    };
    params.metrics.rpc("session", "ok");
    let interval = welcome.heartbeat_interval();
    let silence_limit = interval * SILENCE_INTERVALS;
    tracing::info!(node = %identity.info.node_id, heartbeat_ms = interval.as_millis() as u64, "session established");
    params.metrics.connected.set(1);
    params.readiness.set(true);
    params.channel.send_replace(Some(connection.clone()));
    if params.previous.take().is_some() {
        tracing::info!("session moved to the renewed certificate");
    }

    let Some(end) = heartbeat_loop(&mut params, &mut session, interval, silence_limit).await else {
        return SessionEnd::Handover(Box::new(Handover {
            _connection: connection,
            _session: session,
        }));
    };
    params.channel.send_replace(None);
    params.metrics.connected.set(0);
    params.readiness.set(false);
    // Dropping our half of the stream tells the control plane we are gone.
    drop(session);
    end
}

async fn heartbeat_loop(
    params: &mut SessionParams<'_>,
    session: &mut Session,
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
                let report = EncodedReport::new(&params.reports.borrow_and_update());
                if let Err(closed) = session.send_report(report).await {
                    return Some(retry(closed.to_string(), true));
                }
            }
            _ = summary.tick() => {
                let report = EncodedReport::new(&params.reports.borrow());
                if let Err(closed) = session.send_report(report).await {
                    return Some(retry(closed.to_string(), true));
                }
            }
            _ = ticker.tick() => {
                seq += 1;
                if let Err(StreamClosed) = session.send_heartbeat(seq).await {
                    return Some(retry(StreamClosed.to_string(), true));
                }
                params.metrics.heartbeats_sent.inc();
            }
            message = session.next() => match message {
                Ok(None) => return Some(retry("control plane closed the session", true)),
                Err(error) => return Some(classify(&error, true)),
                Ok(Some(message)) => {
                    silent_at = tokio::time::Instant::now() + silence_limit;
                    match message {
                        Inbound::HeartbeatAck => {}
                        Inbound::Desired(desired) => {
                            params.desired.send_replace(Some(desired));
                        }
                        // Keep converging to the last good state; the
                        // control plane sends the next one on its next
                        // change.
                        Inbound::MalformedDesired { generation, error } => {
                            tracing::error!(generation, error = %error, "desired state refused: malformed");
                        }
                        Inbound::Welcome(_) => tracing::debug!("ignoring a repeated welcome"),
                        Inbound::Empty => tracing::debug!("ignoring an empty control message"),
                    }
                }
            },
        }
    }
}
