//! [`WebhookSessions`]: the session store, telling webhooks when a model is disconnected or
//! reconnected, whoever changed it (the upstream-sign layer, the admin API, the dashboard).

use std::sync::Arc;

use tollgate_core::{BackendError, BoxFuture, Clock as _, ModelId, OrgId, SystemClock};
use tollgate_upstream_sign::{ModelRecord, ModelSession, Session, SessionStore};

use super::{model_data, Event, EventType, Webhooks};

/// A [`SessionStore`] that emits `model.disconnected` and `model.reconnected`.
///
/// A disconnect is emitted on its own task (it happens on a customer request: the request
/// never waits for the outbox); its event id names the model and the session version that
/// was refused, so the many requests that see one session fail make one event. A reconnect
/// is written before the call returns.
pub struct WebhookSessions {
    inner: Arc<dyn SessionStore>,
    webhooks: Webhooks,
}

impl std::fmt::Debug for WebhookSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSessions").finish_non_exhaustive()
    }
}

impl WebhookSessions {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn SessionStore>, webhooks: Webhooks) -> Self {
        WebhookSessions { inner, webhooks }
    }
}

fn occurrence(model: ModelId, version: u64) -> String {
    format!("{model}:{version}")
}

impl SessionStore for WebhookSessions {
    fn session(&self, model: ModelId) -> BoxFuture<Result<Option<ModelSession>, BackendError>> {
        self.inner.session(model)
    }

    fn mark_disconnected(
        &self,
        model: ModelId,
        version: u64,
    ) -> BoxFuture<Result<bool, BackendError>> {
        let inner = Arc::clone(&self.inner);
        let webhooks = self.webhooks.clone();
        Box::pin(async move {
            let applied = inner.mark_disconnected(model, version).await?;
            if applied {
                tokio::spawn(async move {
                    match inner.model(model).await {
                        Ok(Some(record)) => {
                            webhooks
                                .emit(Event::new(
                                    EventType::ModelDisconnected,
                                    record.org,
                                    &occurrence(model, version),
                                    SystemClock.now_ms(),
                                    model_data(model, &record.name),
                                ))
                                .await
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(model = %model, error = %e, "model.disconnected not written")
                        }
                    }
                });
            }
            Ok(applied)
        })
    }

    fn connect(
        &self,
        org: OrgId,
        name: String,
        session: Session,
    ) -> BoxFuture<Result<ModelRecord, BackendError>> {
        self.inner.connect(org, name, session)
    }

    fn reconnect(
        &self,
        model: ModelId,
        session: Session,
    ) -> BoxFuture<Result<Option<ModelRecord>, BackendError>> {
        let inner = Arc::clone(&self.inner);
        let webhooks = self.webhooks.clone();
        Box::pin(async move {
            let Some(record) = inner.reconnect(model, session).await? else {
                return Ok(None);
            };
            // The new session's version names this reconnection.
            let version = match inner.session(model).await {
                Ok(Some(s)) => s.version,
                _ => SystemClock.now_ms(),
            };
            webhooks
                .emit(Event::new(
                    EventType::ModelReconnected,
                    record.org,
                    &occurrence(model, version),
                    SystemClock.now_ms(),
                    model_data(model, &record.name),
                ))
                .await;
            Ok(Some(record))
        })
    }

    fn model(&self, model: ModelId) -> BoxFuture<Result<Option<ModelRecord>, BackendError>> {
        self.inner.model(model)
    }

    fn list(&self, org: OrgId) -> BoxFuture<Result<Vec<ModelRecord>, BackendError>> {
        self.inner.list(org)
    }
}
