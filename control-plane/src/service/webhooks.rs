//! `Webhooks` (SPEC §9): create, list, delete and test the receivers the
//! leader's delivery tasks send events to (see `crate::webhooks`). Every
//! call needs the admin role: a webhook decides where the fleet's events
//! go, and its URL is often a credential itself (a Slack incoming-webhook
//! URL is one), so it is treated like join tokens and publisher keys, not
//! like fleet state a viewer may read.

use std::sync::Arc;

use hotswap_common::pb;
use hotswap_common::timefmt::{now_ms, ts_from_ms};
use tonic::{Request, Response, Status};

use super::Context;
use crate::auth::{self, Permission};
use crate::error::ApiError;
use crate::events::Event;
use crate::store::{WebhookCursor, WebhookRecord};
use crate::webhooks::client::Receiver;
use crate::webhooks::dispatch::backlog;
use crate::webhooks::{OwnPorts, WebhookSpec};

pub struct WebhooksService {
    ctx: Arc<Context>,
    own: OwnPorts,
}

impl WebhooksService {
    /// `own`: this replica's gRPC and admin listeners, which no webhook
    /// may point at.
    pub fn new(ctx: Arc<Context>, own: OwnPorts) -> Self {
        Self { ctx, own }
    }
}

fn webhook_to_pb(record: &WebhookRecord, cursor: &WebhookCursor, backlog: u64) -> pb::Webhook {
    pb::Webhook {
        id: record.id.clone(),
        url: record.url.clone(),
        kinds: record.kinds.clone(),
        format: record.format.clone(),
        last_delivered_seq: cursor.last_delivered_seq,
        last_error: cursor.last_error.clone().unwrap_or_default(),
        backlog,
        signed: !record.secret.is_empty(),
        custom_ca: !record.ca_pem.is_empty(),
        created_by: record.created_by.clone(),
        created_at: Some(ts_from_ms(record.created_at_ms)),
    }
}

/// The host (and port) of a receiver URL, for audit records and events.
fn receiver_host(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(url) => match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_string(),
            (None, _) => "(no host)".to_string(),
        },
        Err(_) => "(invalid url)".to_string(),
    }
}

impl WebhooksService {
    fn view(&self, record: &WebhookRecord) -> Result<pb::Webhook, ApiError> {
        let cursor = self
            .ctx
            .store()
            .get_webhook_cursor(&record.id)?
            .unwrap_or_default();
        let backlog = backlog(&self.ctx.events, record, &cursor)?;
        Ok(webhook_to_pb(record, &cursor, backlog))
    }

    fn existing(&self, id: &str) -> Result<WebhookRecord, ApiError> {
        if id.is_empty() {
            return Err(ApiError::InvalidArgument("webhook id is empty".into()));
        }
        self.ctx
            .store()
            .get_webhook(id)?
            .ok_or_else(|| ApiError::NotFound(format!("no webhook with id {id:?}")))
    }

    async fn create(
        &self,
        by: &str,
        request: pb::CreateWebhookRequest,
    ) -> Result<pb::Webhook, ApiError> {
        let spec = WebhookSpec::parse(
            &request.url,
            request.kinds,
            &request.format,
            request.secret,
            request.ca_pem,
            &self.own,
        )
        .await?;
        let record = WebhookRecord {
            id: format!("wh-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]),
            url: spec.url.to_string(),
            kinds: spec.kinds,
            format: spec.format.as_str().to_string(),
            secret: spec.secret,
            ca_pem: spec.ca_pem,
            created_by: by.to_string(),
            created_at_ms: now_ms(),
        };
        // A webhook gets the events after its creation, not the history.
        let cursor = WebhookCursor {
            processed_seq: self.ctx.events.last_seq(),
            ..WebhookCursor::default()
        };
        if !self.ctx.store().create_webhook(&record, &cursor).await? {
            return Err(ApiError::AlreadyExists(format!(
                "webhook id {} was taken concurrently; try again",
                record.id
            )));
        }
        tracing::info!(webhook = %record.id, url = %record.url, by = %by, "webhook created");
        Ok(webhook_to_pb(&record, &cursor, 0))
    }

    async fn delete(&self, by: &str, id: &str) -> Result<pb::Webhook, ApiError> {
        let record = self.existing(id)?;
        let view = self.view(&record)?;
        if self.ctx.store().delete_webhook(id).await?.is_none() {
            return Err(ApiError::NotFound(format!("no webhook with id {id:?}")));
        }
        tracing::info!(webhook = %id, by = %by, "webhook deleted");
        Ok(view)
    }

    async fn test(&self, by: &str, id: &str) -> Result<pb::TestWebhookResponse, ApiError> {
        let record = self.existing(id)?;
        let receiver = Receiver::new(&record, self.own)?;
        let event = Event {
            seq: 0,
            time_ms: now_ms(),
            kind: "webhook.test".into(),
            message: format!("test delivery to webhook {id} by {by}"),
            ..Event::default()
        };
        Ok(match receiver.deliver(&event).await {
            Ok(status) => pb::TestWebhookResponse {
                delivered: true,
                status: u32::from(status),
                error: String::new(),
            },
            Err(error) => pb::TestWebhookResponse {
                delivered: false,
                status: error.status().map_or(0, u32::from),
                error: error.to_string(),
            },
        })
    }
}

#[tonic::async_trait]
impl pb::webhooks_server::Webhooks for WebhooksService {
    async fn create_webhook(
        &self,
        request: Request<pb::CreateWebhookRequest>,
    ) -> Result<Response<pb::Webhook>, Status> {
        // The audit record and the event name the receiver's host, not its
        // URL: a URL can be a credential (a Slack webhook's is), and events
        // are for every viewer.
        let host = receiver_host(&request.get_ref().url);
        let mut call = self
            .ctx
            .begin(&request, Permission::Admin, "webhooks.create", &host)
            .await?;
        let result = self.create(call.user(), request.into_inner()).await;
        if let Ok(webhook) = &result {
            call.set_target(format!("{} {host}", webhook.id));
        }
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }

    async fn list_webhooks(
        &self,
        request: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        let peer = auth::peer(&request)?;
        auth::authorize_operator(&peer, &**self.ctx.store(), Permission::Admin)?;
        let webhooks = self
            .ctx
            .store()
            .list_webhooks()
            .map_err(ApiError::from)?
            .iter()
            .map(|record| self.view(record))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListWebhooksResponse { webhooks }))
    }

    async fn delete_webhook(
        &self,
        request: Request<pb::DeleteWebhookRequest>,
    ) -> Result<Response<pb::Webhook>, Status> {
        let id = request.get_ref().id.clone();
        let call = self
            .ctx
            .begin(&request, Permission::Admin, "webhooks.delete", &id)
            .await?;
        let result = self.delete(call.user(), &id).await;
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }

    async fn test_webhook(
        &self,
        request: Request<pb::TestWebhookRequest>,
    ) -> Result<Response<pb::TestWebhookResponse>, Status> {
        let id = request.get_ref().id.clone();
        let call = self
            .ctx
            .begin(&request, Permission::Admin, "webhooks.test", &id)
            .await?;
        let result = self.test(call.user(), &id).await;
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A delivery's JSON body is exactly the view `events -o json` prints
    /// of the same event (which goes through the wire message).
    #[test]
    fn audit_targets_name_the_host_not_the_url() {
        assert_eq!(
            receiver_host("https://hooks.slack.com/services/T0/B0/SECRET"),
            "hooks.slack.com"
        );
        assert_eq!(
            receiver_host("http://127.0.0.1:8080/x?token=y"),
            "127.0.0.1:8080"
        );
        assert_eq!(receiver_host("not a url"), "(invalid url)");
    }

    #[test]
    fn json_deliveries_are_the_events_view() {
        let event = Event {
            seq: 9,
            time_ms: 1_700_000_000_000,
            kind: "deployment.created".into(),
            deployment_id: Some("d-1".into()),
            node: None,
            module: Some("hello".into()),
            version: Some("1.0.0".into()),
            message: "by admin".into(),
        };
        let printed = hotswap_common::model::EventView::from(super::super::observe::event_to_pb(
            event.clone(),
        ));
        let body = crate::webhooks::body(&event, crate::webhooks::Format::Json);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            serde_json::to_value(printed).unwrap()
        );
    }
}
