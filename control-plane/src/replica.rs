//! A control-plane replica on etcd: its connection to the cluster and its
//! leadership. A replica campaigns under a lease of `leader_lease` kept
//! alive while it campaigns and leads; once it leads, every commit of its
//! store is fenced by its election key ([`EtcdStore::set_fence`]), and the
//! moment its lease is lost it stops leading (the server restarts in place
//! and campaigns again, so nothing of the old leader's memory survives;
//! the fence stays on until then, so nothing it still commits lands).
//! A graceful stop resigns, so the next replica leads at once instead of
//! after the lease's TTL.

use std::time::Duration;

use hotswap_etcd::{Client, ClientConfig, Election, KeepAlive, Leadership, LeaseLost};
use tokio_util::sync::CancellationToken;

use crate::config::StoreSettings;
use crate::store::etcd::{EtcdStore, Leader};

/// The etcd client for the `[store]` settings: client TLS (and mutual TLS
/// with a certificate) when `ca_file` is set, for `https://` endpoints.
pub async fn etcd_client(settings: &StoreSettings) -> Result<Client, hotswap_etcd::Error> {
    let mut config = ClientConfig::from_list(&settings.endpoints.join(","))?;
    if let Some(ca_file) = &settings.ca_file {
        let tls = hotswap_etcd::EtcdTls::from_files(
            ca_file,
            settings.cert_file.as_deref(),
            settings.key_file.as_deref(),
        )?;
        config = config.with_tls(tls);
    }
    Client::connect(config).await
}

/// This replica while it leads.
pub struct Leading {
    election: Election,
    leadership: Leadership,
    keep_alive: KeepAlive,
    store: EtcdStore,
}

/// Campaign as `candidate` (its name and the URL followers forward the
/// leader's calls to) until this replica leads (`Ok(None)` if `shutdown`
/// came first), then fence the store with the leadership.
pub async fn lead(
    store: &EtcdStore,
    candidate: &Leader,
    lease_ttl: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<Leading>, hotswap_etcd::Error> {
    let client = store.client().clone();
    let election = Election::new(client.clone(), store.keys().election().into_bytes());
    let lease = client.grant(lease_ttl).await?;
    // Kept alive while campaigning too: a candidate whose lease lapsed
    // while it waited would lead on a key that is already gone.
    let mut keep_alive = client.keep_alive(lease);
    let name = candidate.name.as_str();
    let value = candidate.encode();
    tracing::info!(name, lease = %lease.id, ttl = ?lease.ttl, "campaigning for leadership");
    let leadership = tokio::select! {
        _ = shutdown.cancelled() => {
            let _ = client.revoke(lease.id).await;
            return Ok(None);
        }
        lost = keep_alive.lost() => {
            return Err(hotswap_etcd::Error::Status {
                op: "campaign",
                code: tonic::Code::Unavailable,
                message: lost.to_string(),
            });
        }
        won = election.campaign(lease.id, &value) => won?,
    };
    store.set_fence(Some(leadership.fence()));
    tracing::info!(name, key = %String::from_utf8_lossy(&leadership.key), "leading");
    Ok(Some(Leading {
        election,
        leadership,
        keep_alive,
        store: store.clone(),
    }))
}

impl Leading {
    /// Wait until the lease is lost. The fence stays on the store: once
    /// etcd has let the election key go, it refuses every commit this
    /// replica still makes before it restarts (the engine winding down,
    /// the final flush). Clearing it would make those commits
    /// unconditional, landing after the next leader's.
    pub async fn lost(&mut self) -> LeaseLost {
        self.keep_alive.lost().await
    }

    /// Hand over at once: delete the election key and revoke the lease.
    pub async fn resign(self) {
        self.store.set_fence(None);
        if let Err(e) = self.election.resign(&self.leadership).await {
            tracing::warn!(error = %e, "could not resign leadership; the next leader waits for the lease to expire");
        }
        let _ = self.store.client().revoke(self.leadership.lease).await;
        tracing::info!("resigned leadership");
    }
}
