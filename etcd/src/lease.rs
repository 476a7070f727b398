//! Leases: grant, revoke, and a keep-alive task that renews a lease
//! concurrently and says when it is lost.
//!
//! The task counts the lease lost on its own clock, from when the last
//! confirmed renewal was *sent* plus the TTL etcd granted: etcd measures
//! from when it received the renewal, which is later, so the holder stops
//! trusting the lease before etcd lets it go.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::client::{Client, Retry};
use crate::error::Error;
use crate::kv::LeaseId;
use crate::pb;
use crate::pb::lease_client::LeaseClient;

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    /// The TTL etcd granted (at least the one asked for).
    pub ttl: Duration,
    /// When the grant was sent: the lease is sure to live until
    /// `granted_at + ttl` and no longer.
    pub granted_at: Instant,
}

/// Why a kept-alive lease is no longer held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseLost {
    #[error("lease {0}: expired or revoked in etcd")]
    Expired(LeaseId),
    #[error("lease {id}: no renewal confirmed within its ttl of {ttl:?}; last error: {last}")]
    Unconfirmed {
        id: LeaseId,
        ttl: Duration,
        last: String,
    },
}

/// The keep-alive task of one lease. Dropping it stops renewing (the lease
/// then expires after its TTL unless revoked).
pub struct KeepAlive {
    id: LeaseId,
    lost: watch::Receiver<Option<LeaseLost>>,
    task: tokio::task::JoinHandle<()>,
}

impl KeepAlive {
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// Why the lease was lost, if it was.
    pub fn is_lost(&self) -> Option<LeaseLost> {
        self.lost.borrow().clone()
    }

    /// Wait until the lease is lost.
    pub async fn lost(&mut self) -> LeaseLost {
        let id = self.id;
        match self.lost.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or(LeaseLost::Expired(id)),
            // The task ended without saying why: it was stopped.
            Err(_) => LeaseLost::Unconfirmed {
                id,
                ttl: Duration::ZERO,
                last: "keep-alive stopped".into(),
            },
        }
    }

    /// Stop renewing.
    pub fn stop(self) {}
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Grant a lease of at least `ttl` (whole seconds, rounded up).
    pub async fn grant(&self, ttl: Duration) -> Result<Lease, Error> {
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let seconds = i64::try_from(seconds.max(1)).unwrap_or(i64::MAX);
        let granted_at = Instant::now();
        let response = self
            .unary("lease grant", Retry::IfNotSent, 0, |channel| async move {
                LeaseClient::new(channel)
                    .lease_grant(pb::LeaseGrantRequest {
                        ttl: seconds,
                        id: 0,
                    })
                    .await
            })
            .await?
            .into_inner();
        if !response.error.is_empty() {
            return Err(Error::Status {
                op: "lease grant",
                code: tonic::Code::Unknown,
                message: response.error,
            });
        }
        if response.id == 0 || response.ttl <= 0 {
            return Err(Error::Malformed {
                op: "lease grant",
                what: "no lease id or ttl",
            });
        }
        Ok(Lease {
            id: LeaseId(response.id),
            ttl: Duration::from_secs(response.ttl.unsigned_abs()),
            granted_at,
        })
    }

    /// Revoke a lease: every key attached to it is deleted now.
    pub async fn revoke(&self, id: LeaseId) -> Result<(), Error> {
        self.unary(
            "lease revoke",
            Retry::IfNotSent,
            id.0,
            |channel| async move {
                LeaseClient::new(channel)
                    .lease_revoke(pb::LeaseRevokeRequest { id: id.0 })
                    .await
            },
        )
        .await?;
        Ok(())
    }

    /// Renew `lease` every third of its TTL in a task of its own, over
    /// whichever endpoint works, until it is lost or the handle is dropped.
    pub fn keep_alive(&self, lease: Lease) -> KeepAlive {
        let (report, lost) = watch::channel(None);
        let client = self.clone();
        let span = tracing::info_span!("etcd keep-alive", lease = %lease.id);
        let task = tokio::spawn(
            async move {
                let reason = client.renew_until_lost(lease).await;
                tracing::warn!(reason = %reason, "etcd lease lost");
                let _ = report.send(Some(reason));
            }
            .instrument(span),
        );
        KeepAlive {
            id: lease.id,
            lost,
            task,
        }
    }

    async fn renew_until_lost(&self, lease: Lease) -> LeaseLost {
        let id = lease.id;
        let interval = (lease.ttl / 3).max(Duration::from_millis(100));
        let mut deadline = lease.granted_at + lease.ttl;
        let mut ttl = lease.ttl;
        let mut last = String::from("none");
        let unconfirmed = |ttl, last| LeaseLost::Unconfirmed { id, ttl, last };
        loop {
            if Instant::now() >= deadline {
                return unconfirmed(ttl, last);
            }
            let (index, channel) =
                match tokio::time::timeout_at(deadline, self.channel("lease keep-alive")).await {
                    Ok(Ok(connected)) => connected,
                    Ok(Err(e)) => {
                        last = e.to_string();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(_) => return unconfirmed(ttl, last),
                };
            // The request stream stays open as long as `requests` lives.
            // The first renewal is queued before the call: etcd sends the
            // response headers only with its first answer, so opening the
            // stream waits for a request to answer.
            let (requests, receiver) = mpsc::channel(1);
            let mut sent_at = Instant::now();
            if requests
                .send(pb::LeaseKeepAliveRequest { id: id.0 })
                .await
                .is_err()
            {
                continue;
            }
            let mut request = tonic::Request::new(ReceiverStream::new(receiver));
            require_leader(&mut request);
            let opened = tokio::time::timeout_at(
                deadline,
                LeaseClient::new(channel).lease_keep_alive(request),
            )
            .await;
            let mut responses = match opened {
                Ok(Ok(response)) => response.into_inner(),
                Ok(Err(status)) => {
                    last = format!("{:?}: {}", status.code(), status.message());
                    self.forget(index).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(_) => return unconfirmed(ttl, last),
            };
            loop {
                match tokio::time::timeout_at(deadline, responses.message()).await {
                    Err(_) => return unconfirmed(ttl, last),
                    Ok(Ok(Some(response))) if response.ttl <= 0 => return LeaseLost::Expired(id),
                    Ok(Ok(Some(response))) => {
                        ttl = Duration::from_secs(response.ttl.unsigned_abs());
                        deadline = sent_at + ttl;
                    }
                    Ok(Ok(None)) => {
                        last = "keep-alive stream ended".into();
                        self.forget(index).await;
                        break;
                    }
                    Ok(Err(status)) => {
                        last = format!("{:?}: {}", status.code(), status.message());
                        self.forget(index).await;
                        break;
                    }
                }
                tokio::time::sleep(interval).await;
                sent_at = Instant::now();
                if requests
                    .send(pb::LeaseKeepAliveRequest { id: id.0 })
                    .await
                    .is_err()
                {
                    last = "keep-alive stream closed".into();
                    break;
                }
            }
        }
    }
}

/// Ask etcd to end the stream when the member loses its leader (etcd's
/// `hasleader` metadata), so a member cut off from the cluster does not
/// keep a stream that can no longer renew or deliver anything.
pub(crate) fn require_leader<T>(request: &mut tonic::Request<T>) {
    request.metadata_mut().insert(
        "hasleader",
        tonic::metadata::MetadataValue::from_static("true"),
    );
}
