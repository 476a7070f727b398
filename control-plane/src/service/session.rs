//! `AgentSession.Session`: one bidirectional stream per agent. The first
//! message must be a hello naming the node of the client certificate; then
//! the agent sends heartbeats and status reports, and the control plane sends
//! its welcome (and, in later layers, desired state). The node is connected
//! exactly while this stream is open and messages arrive within the grace
//! period.

use std::pin::Pin;
use std::sync::Arc;

use hotswap_common::labels::ENVIRONMENT_LABEL;
use hotswap_common::pb;
use hotswap_common::pb::agent_message::Msg as AgentMsg;
use hotswap_common::pb::control_message::Msg as ControlMsg;
use hotswap_common::pki::{self, Principal};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::Context;
use super::convert::{Hello, desired_to_pb, report_from_pb};
use crate::audit::AuditEntry;
use crate::auth;
use crate::error::ApiError;
use crate::registry::SessionHandle;

pub struct SessionService {
    ctx: Arc<Context>,
}

impl SessionService {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ControlMessage, Status>> + Send>>;

/// Outbound messages buffered per session before the sender waits.
const OUTBOUND_BUFFER: usize = 16;

/// One outbound message, boxed: tokio's channel allocates its slots in
/// blocks of 32 when the channel is made, and a block of unboxed results
/// (about 80 bytes each) was 2.6 KiB of every connected agent's memory;
/// boxed, a block is 0.3 KiB and each message pays one small allocation.
type Outgoing = Box<Result<pb::ControlMessage, Status>>;

impl SessionService {
    async fn renew(
        &self,
        node_id: &str,
        peer: &auth::Peer,
        request: pb::RenewCertificateRequest,
    ) -> Result<pb::RenewCertificateResponse, ApiError> {
        if request.csr_pem.len() > MAX_CSR_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "certificate signing request is {} bytes; the limit is {MAX_CSR_BYTES}",
                request.csr_pem.len()
            )));
        }
        // Only a node presenting a certificate it may still use can renew.
        self.ctx
            .registry
            .verify_current(node_id, &peer.cert_fingerprint)
            .await?;
        let cert_pem = self
            .ctx
            .ca
            .sign_csr(
                &request.csr_pem,
                &Principal::Node(node_id.to_string()),
                self.ctx.settings.node_cert_validity,
            )
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let der = pki::first_cert_der(&cert_pem).map_err(|e| ApiError::Internal(e.to_string()))?;
        let not_after =
            pki::not_after_ms(der.as_ref()).map_err(|e| ApiError::Internal(e.to_string()))?;
        self.ctx
            .registry
            .renew_certificate(
                node_id,
                &peer.cert_fingerprint,
                pki::der_fingerprint(der.as_ref()),
                not_after,
            )
            .await?;
        tracing::info!(node = %node_id, not_after = %hotswap_common::timefmt::rfc3339_from_ms(not_after), "node certificate renewed");
        Ok(pb::RenewCertificateResponse {
            certificate_pem: cert_pem,
            ca_certificate_pem: self.ctx.ca.cert_pem().to_string(),
        })
    }
}

/// A CSR for a P-256 key is well under 1 KiB.
const MAX_CSR_BYTES: usize = 16 * 1024;

#[tonic::async_trait]
impl pb::agent_session_server::AgentSession for SessionService {
    type SessionStream = SessionStream;

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        let info = auth::RequestInfo::of(&request);
        let (node_id, peer) = auth::require_node(&request)?;
        let result = self.renew(&node_id, &peer, request.into_inner()).await;
        let (outcome, detail) = match &result {
            Ok(_) => ("ok", String::new()),
            Err(e @ ApiError::PermissionDenied(_)) => ("denied", e.to_string()),
            Err(e) => ("error", e.to_string()),
        };
        self.ctx
            .record(AuditEntry {
                user: format!("node:{node_id}"),
                role: "node".into(),
                action: "nodes.renew_certificate".into(),
                target: node_id.clone(),
                result: outcome,
                detail,
                trace_id: info.trace_id,
                peer: info.peer_addr,
            })
            .await?;
        Ok(Response::new(result?))
    }

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (node_id, peer) = auth::require_node(&request)?;
        // Refuse a removed node or a superseded certificate before anything else.
        self.ctx
            .registry
            .verify_current(&node_id, &peer.cert_fingerprint)
            .await?;
        let mut inbound = request.into_inner();
        let grace = self.ctx.settings.heartbeat_grace;

        let hello = match tokio::time::timeout(grace, inbound.message()).await {
            Ok(Ok(Some(pb::AgentMessage {
                msg: Some(AgentMsg::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(_))) => {
                return Err(ApiError::InvalidArgument(
                    "the first session message must be a hello".into(),
                )
                .into());
            }
            Ok(Ok(None)) => {
                return Err(ApiError::InvalidArgument("session closed before hello".into()).into());
            }
            Ok(Err(status)) => return Err(status),
            Err(_) => {
                return Err(ApiError::InvalidArgument(format!(
                    "no hello within {}s",
                    grace.as_secs_f64()
                ))
                .into());
            }
        };
        if hello.node_id != node_id {
            return Err(ApiError::PermissionDenied(format!(
                "hello names node {:?} but the client certificate belongs to node {node_id}",
                hello.node_id
            ))
            .into());
        }
        let hello = Hello::try_from(hello).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let handle = self
            .ctx
            .registry
            .attach(
                &node_id,
                &peer.cert_fingerprint,
                hello.labels,
                &hello.agent_version,
            )
            .await?;
        tracing::info!(node = %node_id, name = %hello.name, agent_version = %hello.agent_version, "agent session opened");

        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let welcome = pb::ControlMessage {
            msg: Some(ControlMsg::Welcome(pb::Welcome {
                node_id: node_id.clone(),
                heartbeat_interval_ms: self.ctx.settings.heartbeat_interval.as_millis() as u64,
                labels: handle.labels.clone().into_iter().collect(),
            })),
        };
        // The channel is fresh, so this cannot be full.
        let _ = tx.try_send(Box::new(Ok(welcome)));
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let mut handle = handle;
            let reason = drive(&ctx, &mut handle, &mut inbound, &tx).await;
            ctx.registry.detach(&handle).await;
            tracing::info!(node = %handle.node_id, reason = %reason, "agent session closed");
        });
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|message| *message),
        )))
    }
}

/// Serve one session until it ends; returns why it ended.
///
/// The loop keeps its cancellation waiters and its deadline timer across
/// messages instead of creating and dropping a timer and two waiters for
/// every message (they showed in the control plane's profile at 20k
/// reports/s).
async fn drive(
    ctx: &Context,
    handle: &mut SessionHandle,
    inbound: &mut Streaming<pb::AgentMessage>,
    tx: &mpsc::Sender<Outgoing>,
) -> String {
    let grace = ctx.settings.heartbeat_grace;
    let shutdown = ctx.shutdown.clone().cancelled_owned();
    let cancelled = handle.cancel.clone().cancelled_owned();
    // Fires at the last message plus the grace; re-armed only when it fires.
    let mut last_heard = tokio::time::Instant::now();
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(shutdown, cancelled, deadline);
    // The node's environment (from its labels, fixed for the session) sets
    // how many distinct keys must sign what it installs; its agent checks
    // that itself, whatever let a desired state through.
    let min_signatures = handle
        .labels
        .get(ENVIRONMENT_LABEL)
        .map_or(1, |env| ctx.settings.min_signatures(env));
    let mut warnings = ReportWarnings::default();
    // The current desired state goes out first, then on every change.
    handle.desired.mark_changed();
    loop {
        let next = tokio::select! {
            changed = handle.desired.changed() => {
                if changed.is_err() {
                    return "desired state channel closed".into();
                }
                let desired =
                    desired_to_pb(&handle.desired.borrow_and_update(), min_signatures);
                let message = pb::ControlMessage { msg: Some(ControlMsg::Desired(desired)) };
                if tx.send(Box::new(Ok(message))).await.is_err() {
                    return "agent went away".into();
                }
                continue;
            }
            _ = &mut shutdown => {
                let _ = tx
                    .send(Box::new(Err(
                        ApiError::Unavailable("control plane is shutting down".into()).into(),
                    )))
                    .await;
                return "control plane shutting down".into();
            }
            _ = &mut cancelled => {
                if ctx.registry.exists(&handle.node_id) {
                    return "replaced by a newer session".into();
                }
                let _ = tx
                    .send(Box::new(Err(ApiError::PermissionDenied(format!(
                        "node {} was removed; its certificate is no longer accepted",
                        handle.node_id
                    ))
                    .into())))
                    .await;
                return "node removed".into();
            }
            _ = &mut deadline => {
                let expires = last_heard + grace;
                if tokio::time::Instant::now() < expires {
                    deadline.as_mut().reset(expires);
                    continue;
                }
                Err(())
            }
            next = inbound.message() => Ok(next),
        };
        let message = match next {
            Err(()) => return format!("no heartbeat within {}s", grace.as_secs_f64()),
            Ok(Ok(None)) => return "agent closed the stream".into(),
            Ok(Err(status)) => return format!("stream error: {}", status.message()),
            Ok(Ok(Some(message))) => message,
        };
        last_heard = tokio::time::Instant::now();
        match message.msg {
            Some(AgentMsg::Heartbeat(heartbeat)) => {
                if !ctx.registry.heartbeat(handle) {
                    return "replaced by a newer session".into();
                }
                let ack = pb::ControlMessage {
                    msg: Some(ControlMsg::HeartbeatAck(pb::HeartbeatAck {
                        seq: heartbeat.seq,
                    })),
                };
                if tx.send(Box::new(Ok(ack))).await.is_err() {
                    return "agent went away".into();
                }
            }
            Some(AgentMsg::Status(report)) => {
                let screened = report_from_pb(report, &handle.desired.borrow());
                if !screened.clean() {
                    ctx.metrics
                        .report_claims_dropped
                        .inc_by(screened.dropped_claims);
                    warnings.warn(&handle.node_id, &screened);
                }
                ctx.registry.report(handle, screened.report);
            }
            Some(AgentMsg::Hello(_)) => {
                let _ = tx
                    .send(Box::new(Err(ApiError::InvalidArgument(
                        "hello may only be the first session message".into(),
                    )
                    .into())))
                    .await;
                return "protocol error: second hello".into();
            }
            None => {
                let _ = tx
                    .send(Box::new(Err(ApiError::InvalidArgument(
                        "empty session message".into(),
                    )
                    .into())))
                    .await;
                return "protocol error: empty message".into();
            }
        }
    }
}

/// Warnings about a session's screened reports: the first at once, then at
/// most one per [`ReportWarnings::EVERY`] with the number of reports in
/// between, so a node sending unbelievable reports many times a second
/// cannot flood the control plane's log either.
#[derive(Default)]
struct ReportWarnings {
    last: Option<tokio::time::Instant>,
    since_last: u64,
}

impl ReportWarnings {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(30);

    fn warn(&mut self, node_id: &str, screened: &super::convert::ScreenedReport) {
        let now = tokio::time::Instant::now();
        self.since_last += 1;
        if self.last.is_some_and(|last| now < last + Self::EVERY) {
            return;
        }
        tracing::warn!(
            node = %node_id,
            reports = self.since_last,
            dropped = screened.dropped_claims,
            problems = %screened.problems.join("; "),
            more = screened.more_problems,
            "status report claims dropped as unbelievable (count of such reports since the last warning; problems of the latest)"
        );
        self.last = Some(now);
        self.since_last = 0;
    }
}
