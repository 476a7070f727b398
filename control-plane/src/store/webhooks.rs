//! Webhook records (SPEC §9) and the cursor each one's delivery keeps: the
//! records an operator creates and deletes, and the position in the event
//! log the leader's delivery task has reached. They are separate records so
//! that advancing a cursor never rewrites the webhook (and its secret), and
//! a cursor is written only while its webhook exists: a delivery task that
//! loses a race with `webhooks delete` writes nothing back.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::StoreError;

/// A receiver of events. Immutable once created: delete and create again
/// to change it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WebhookRecord {
    pub id: String,
    pub url: String,
    /// Event kinds or kind prefixes; empty: every event.
    pub kinds: Vec<String>,
    /// `json` or `slack`.
    pub format: String,
    /// The HMAC-SHA256 key; empty: deliveries are not signed. Never sent
    /// back to a client.
    #[serde(default)]
    pub secret: String,
    /// PEM CA certificates to verify an https:// receiver with instead of
    /// the system roots; empty: the system roots.
    #[serde(default)]
    pub ca_pem: String,
    pub created_by: String,
    pub created_at_ms: u64,
}

/// Where one webhook's delivery stands in the event log.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WebhookCursor {
    /// Every event up to this sequence number is done with: delivered, not
    /// matching, or given up on after `webhook_retry_for`.
    pub processed_seq: u64,
    /// The last event the receiver accepted (0: none yet).
    #[serde(default)]
    pub last_delivered_seq: u64,
    /// Deliveries the receiver accepted, in all.
    #[serde(default)]
    pub delivered: u64,
    /// The last failed attempt's error, kept after later successes.
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_error_at_ms: Option<u64>,
    /// When delivering the event after `processed_seq` first failed:
    /// `webhook_retry_for` counts from here, across restarts.
    #[serde(default)]
    pub failing_since_ms: Option<u64>,
}

/// Webhooks and their cursors.
#[async_trait]
pub trait WebhookRecords: Send + Sync {
    fn list_webhooks(&self) -> Result<Vec<WebhookRecord>, StoreError>;
    fn get_webhook(&self, id: &str) -> Result<Option<WebhookRecord>, StoreError>;
    fn get_webhook_cursor(&self, id: &str) -> Result<Option<WebhookCursor>, StoreError>;
    /// Store a webhook and its first cursor together, durably, unless the
    /// id is taken; false if it was.
    async fn create_webhook(
        &self,
        record: &WebhookRecord,
        cursor: &WebhookCursor,
    ) -> Result<bool, StoreError>;
    /// Delete a webhook and its cursor together, durably; the record if it
    /// existed.
    async fn delete_webhook(&self, id: &str) -> Result<Option<WebhookRecord>, StoreError>;
    /// Store a webhook's cursor durably if the webhook still exists; false
    /// (and nothing written) when it was deleted.
    async fn put_webhook_cursor(
        &self,
        id: &str,
        cursor: &WebhookCursor,
    ) -> Result<bool, StoreError>;
}
