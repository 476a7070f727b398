//! Webhooks and their cursors in the embedded store: one tree each, the
//! pair changed together in sled transactions.

use async_trait::async_trait;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{SledStore, get, scan};
use crate::store::{
    Collection, Durability, StoreError, WebhookCursor, WebhookRecord, WebhookRecords, decode,
    encode,
};

impl SledStore {
    fn webhook_trees(&self) -> Result<(::sled::Tree, ::sled::Tree), StoreError> {
        Ok((
            self.db.open_tree(Collection::Webhooks.as_str())?,
            self.db.open_tree(Collection::WebhookCursors.as_str())?,
        ))
    }
}

fn transaction<T>(result: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    match result {
        Ok(value) => Ok(value),
        Err(TransactionError::Abort(e)) => Err(e),
        Err(TransactionError::Storage(e)) => Err(e.into()),
    }
}

#[async_trait]
impl WebhookRecords for SledStore {
    fn list_webhooks(&self) -> Result<Vec<WebhookRecord>, StoreError> {
        scan(&self.webhook_trees()?.0, Collection::Webhooks)
    }

    fn get_webhook(&self, id: &str) -> Result<Option<WebhookRecord>, StoreError> {
        get(
            &self.webhook_trees()?.0,
            Collection::Webhooks,
            id.as_bytes(),
        )
    }

    fn get_webhook_cursor(&self, id: &str) -> Result<Option<WebhookCursor>, StoreError> {
        get(
            &self.webhook_trees()?.1,
            Collection::WebhookCursors,
            id.as_bytes(),
        )
    }

    async fn create_webhook(
        &self,
        record: &WebhookRecord,
        cursor: &WebhookCursor,
    ) -> Result<bool, StoreError> {
        let (hooks, cursors) = self.webhook_trees()?;
        let created = transaction((&hooks, &cursors).transaction(|(hooks, cursors)| {
            if hooks.get(record.id.as_bytes())?.is_some() {
                return Ok(false);
            }
            hooks.insert(record.id.as_bytes(), encode(record))?;
            cursors.insert(record.id.as_bytes(), encode(cursor))?;
            Ok(true)
        }))?;
        self.flush().await?;
        Ok(created)
    }

    async fn delete_webhook(&self, id: &str) -> Result<Option<WebhookRecord>, StoreError> {
        let (hooks, cursors) = self.webhook_trees()?;
        let removed = transaction((&hooks, &cursors).transaction(|(hooks, cursors)| {
            let Some(bytes) = hooks.remove(id.as_bytes())? else {
                return Ok(None);
            };
            cursors.remove(id.as_bytes())?;
            let record: WebhookRecord = decode(Collection::Webhooks, id.as_bytes(), &bytes)
                .map_err(ConflictableTransactionError::Abort)?;
            Ok(Some(record))
        }))?;
        self.flush().await?;
        Ok(removed)
    }

    async fn put_webhook_cursor(
        &self,
        id: &str,
        cursor: &WebhookCursor,
    ) -> Result<bool, StoreError> {
        let (hooks, cursors) = self.webhook_trees()?;
        let written = transaction((&hooks, &cursors).transaction(|(hooks, cursors)| {
            if hooks.get(id.as_bytes())?.is_none() {
                return Ok(false);
            }
            cursors.insert(id.as_bytes(), encode(cursor))?;
            Ok(true)
        }))?;
        self.flush().await?;
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> WebhookRecord {
        WebhookRecord {
            id: id.into(),
            url: "http://127.0.0.1:9/hook".into(),
            kinds: vec!["deployment".into()],
            format: "json".into(),
            secret: "s3cret".into(),
            ca_pem: String::new(),
            created_by: "admin".into(),
            created_at_ms: 1,
        }
    }

    #[tokio::test]
    async fn webhooks_and_cursors_change_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("db"), 1 << 20).unwrap();
        let cursor = WebhookCursor {
            processed_seq: 7,
            ..WebhookCursor::default()
        };
        assert!(
            store
                .create_webhook(&record("wh-1"), &cursor)
                .await
                .unwrap()
        );
        assert!(
            !store
                .create_webhook(&record("wh-1"), &cursor)
                .await
                .unwrap(),
            "the id is taken"
        );
        assert_eq!(store.list_webhooks().unwrap(), vec![record("wh-1")]);
        assert_eq!(store.get_webhook_cursor("wh-1").unwrap(), Some(cursor));
        let moved = WebhookCursor {
            processed_seq: 9,
            last_delivered_seq: 9,
            ..WebhookCursor::default()
        };
        assert!(store.put_webhook_cursor("wh-1", &moved).await.unwrap());
        assert_eq!(
            store.get_webhook_cursor("wh-1").unwrap(),
            Some(moved.clone())
        );
        assert_eq!(
            store.delete_webhook("wh-1").await.unwrap(),
            Some(record("wh-1"))
        );
        assert_eq!(store.get_webhook_cursor("wh-1").unwrap(), None);
        assert!(
            !store.put_webhook_cursor("wh-1", &moved).await.unwrap(),
            "a deleted webhook's cursor is not written back"
        );
        assert_eq!(store.get_webhook_cursor("wh-1").unwrap(), None);
        assert_eq!(store.delete_webhook("wh-1").await.unwrap(), None);
    }
}
