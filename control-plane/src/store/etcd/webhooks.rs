//! Webhooks and their cursors on etcd: `webhooks/<id>` and
//! `webhook_cursors/<id>`, created and deleted together in one guarded
//! transaction. A cursor is written (by the leader's delivery task, so
//! under the leader's fence) only while its webhook's key exists: the
//! transaction compares the webhook key's revision.

use async_trait::async_trait;

use super::{EtcdStore, base_of};
use crate::store::{
    Collection, StoreError, WebhookCursor, WebhookRecord, WebhookRecords, decode, encode,
};

#[async_trait]
impl WebhookRecords for EtcdStore {
    fn list_webhooks(&self) -> Result<Vec<WebhookRecord>, StoreError> {
        self.inner.list(Collection::Webhooks)
    }

    fn get_webhook(&self, id: &str) -> Result<Option<WebhookRecord>, StoreError> {
        self.inner.get(Collection::Webhooks, id)
    }

    fn get_webhook_cursor(&self, id: &str) -> Result<Option<WebhookCursor>, StoreError> {
        self.inner.get(Collection::WebhookCursors, id)
    }

    async fn create_webhook(
        &self,
        record: &WebhookRecord,
        cursor: &WebhookCursor,
    ) -> Result<bool, StoreError> {
        let key = self.inner.keys.record(Collection::Webhooks, &record.id);
        let cursor_key = self
            .inner
            .keys
            .record(Collection::WebhookCursors, &record.id);
        self.inner
            .change(|inner| {
                let read = inner.read(key.as_bytes());
                if read.0.is_some() {
                    return Ok((Vec::new(), Vec::new(), false));
                }
                let cursor_read = inner.read(cursor_key.as_bytes());
                Ok::<_, StoreError>((
                    vec![
                        (key.clone(), base_of(&read)),
                        (cursor_key.clone(), base_of(&cursor_read)),
                    ],
                    vec![
                        (key.clone(), Some(encode(record))),
                        (cursor_key.clone(), Some(encode(cursor))),
                    ],
                    true,
                ))
            })
            .await
    }

    async fn delete_webhook(&self, id: &str) -> Result<Option<WebhookRecord>, StoreError> {
        let key = self.inner.keys.record(Collection::Webhooks, id);
        let cursor_key = self.inner.keys.record(Collection::WebhookCursors, id);
        self.inner
            .change(|inner| {
                let read = inner.read(key.as_bytes());
                let Some(bytes) = &read.0 else {
                    return Ok((Vec::new(), Vec::new(), None));
                };
                let record: WebhookRecord = decode(Collection::Webhooks, key.as_bytes(), bytes)?;
                Ok::<_, StoreError>((
                    vec![(key.clone(), base_of(&read))],
                    vec![(key.clone(), None), (cursor_key.clone(), None)],
                    Some(record),
                ))
            })
            .await
    }

    async fn put_webhook_cursor(
        &self,
        id: &str,
        cursor: &WebhookCursor,
    ) -> Result<bool, StoreError> {
        let key = self.inner.keys.record(Collection::Webhooks, id);
        let cursor_key = self.inner.keys.record(Collection::WebhookCursors, id);
        self.inner
            .change(|inner| {
                let read = inner.read(key.as_bytes());
                if read.0.is_none() {
                    return Ok((Vec::new(), Vec::new(), false));
                }
                Ok::<_, StoreError>((
                    vec![(key.clone(), base_of(&read))],
                    vec![(cursor_key.clone(), Some(encode(cursor)))],
                    true,
                ))
            })
            .await
    }
}
