//! The admin API's webhooks (docs/contract.md §15):
//!
//! - `POST /admin/orgs/:org/webhooks {url, events}` → 201 `{id, secret}`
//! - `GET /admin/orgs/:org/webhooks` → `[{id, url, events, created_at}]`
//! - `DELETE /admin/orgs/:org/webhooks/:id` → `{id, deleted: true}`
//! - `POST /admin/orgs/:org/webhooks/:id/rotate-secret` → `{id, secret}`
//! - `POST /admin/orgs/:org/webhooks/:id/test` → 202 `{event_id}`
//! - `GET /admin/orgs/:org/webhooks/:id/deliveries` → the 50 most recent deliveries
//! - `GET` / `PUT /admin/orgs/:org/webhook-settings {credits_low_threshold}`
//!
//! The org is checked by the caller (admin.rs).

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use tollgate_core::{BackendError, Clock as _, ErrorCode, OrgId, Rejection, SystemClock};

use super::state::AppState;
use super::webhooks::{
    address, new_secret, watch, Endpoint, EndpointId, Event, EventType, MAX_ENDPOINTS_PER_ORG,
};

type AdminResult = Result<Response<Full<Bytes>>, Rejection>;

/// Deliveries shown per endpoint.
pub const DELIVERY_HISTORY: usize = 50;

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(value.to_string())));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn invalid(message: impl Into<String>) -> Rejection {
    Rejection::new(ErrorCode::InvalidRequest).with_message(message.into())
}

fn not_found() -> Rejection {
    Rejection::new(ErrorCode::NotFound).with_message("No such webhook endpoint.")
}

fn backend(state: &AppState) -> impl Fn(BackendError) -> Rejection + '_ {
    move |e| {
        state.metrics.record_backend_error("admin");
        tracing::error!(error = %e, "admin API backend failure");
        e.rejection()
    }
}

fn endpoint_id(text: &str) -> Result<EndpointId, Rejection> {
    text.parse().map_err(|_| not_found())
}

/// Checks `url` for a webhook endpoint: its form, then where it resolves.
pub async fn check_url(url: &str, allow_private: bool) -> Result<(), String> {
    let target = address::parse(url, allow_private)?;
    address::resolve(&target, allow_private).await.map(|_| ())
}

/// The `events` field: a non-empty array of the six event names.
pub fn events_field(body: &Value) -> Result<Vec<EventType>, Rejection> {
    let names = SUBSCRIBABLE_NAMES.join(", ");
    let list = match body.get("events") {
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(Value::Array(_)) => {
            return Err(invalid(format!(
                "`events` must name at least one of: {names}."
            )))
        }
        Some(_) => return Err(invalid("`events` must be an array of event names.")),
        None => {
            return Err(invalid(format!(
                "`events` is required: an array of {names}."
            )))
        }
    };
    list.iter()
        .map(|v| {
            v.as_str()
                .and_then(EventType::parse)
                .filter(|t| EventType::SUBSCRIBABLE.contains(t))
                .ok_or_else(|| {
                    invalid(format!("`events` lists {v}, which is not one of: {names}."))
                })
        })
        .collect()
}

const SUBSCRIBABLE_NAMES: [&str; 6] = [
    "credits.low",
    "credits.exhausted",
    "model.disconnected",
    "model.reconnected",
    "subscription.renewed",
    "key.expiring",
];

/// Registers an endpoint after checking its address.
pub(super) async fn create(state: &AppState, org: OrgId, body: Value) -> AdminResult {
    let (id, secret) = register(state, org, &body).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"id": id, "secret": secret}),
    ))
}

/// Registers an endpoint of `org` from `{url, events}` (the admin body, or the dashboard's
/// form converted): its id and signing secret.
pub(crate) async fn register(
    state: &AppState,
    org: OrgId,
    body: &Value,
) -> Result<(EndpointId, String), Rejection> {
    let url = match body.get("url") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
        Some(Value::String(_)) | None => return Err(invalid("`url` is required.")),
        Some(_) => return Err(invalid("`url` must be a string.")),
    };
    let events = events_field(body)?;
    check_url(&url, state.config.webhook_allow_private)
        .await
        .map_err(invalid)?;
    let endpoint = Endpoint::new(org, url, events, SystemClock.now_ms());
    let (id, secret) = (endpoint.id, endpoint.secret.clone());
    if !state
        .webhooks
        .store
        .create_endpoint(endpoint)
        .await
        .map_err(backend(state))?
    {
        return Err(invalid(format!(
            "The organization already has {MAX_ENDPOINTS_PER_ORG} webhook endpoints; delete one first."
        )));
    }
    state.webhooks.note_endpoint(org);
    // Start the org's watched states (balance, period) from now, so the next change is an
    // event and nothing before the registration is.
    let watched = watched(state);
    if let Err(e) = watch::scan(&watched, org).await {
        tracing::warn!(org = %org, error = %e, "webhook watcher: first scan failed");
    }
    Ok((id, secret))
}

fn watched(state: &AppState) -> watch::Watched {
    watch::Watched {
        webhooks: state.webhooks.clone(),
        ledger: state.ledger.clone(),
        keys: state.keys.clone(),
    }
}

/// The org's endpoints (never their secrets).
pub(super) async fn list(state: &AppState, org: OrgId) -> AdminResult {
    let endpoints = state
        .webhooks
        .store
        .endpoints(org)
        .await
        .map_err(backend(state))?;
    Ok(json_response(
        StatusCode::OK,
        &Value::Array(endpoints.iter().map(Endpoint::view).collect()),
    ))
}

/// Removes an endpoint and its pending deliveries.
pub(super) async fn delete(state: &AppState, org: OrgId, id: &str) -> AdminResult {
    let id = endpoint_id(id)?;
    if !state
        .webhooks
        .store
        .delete_endpoint(org, id)
        .await
        .map_err(backend(state))?
    {
        return Err(not_found());
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": id, "deleted": true}),
    ))
}

/// A new signing secret; the old one stops signing at once.
pub(super) async fn rotate_secret(state: &AppState, org: OrgId, id: &str) -> AdminResult {
    let id = endpoint_id(id)?;
    let secret = new_secret();
    if !state
        .webhooks
        .store
        .set_secret(org, id, secret.clone())
        .await
        .map_err(backend(state))?
    {
        return Err(not_found());
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": id, "secret": secret}),
    ))
}

/// Sends a `webhook.test` event to one endpoint.
pub(super) async fn test(state: &AppState, org: OrgId, id: &str) -> AdminResult {
    let event_id = send_test_event(state, org, endpoint_id(id)?).await?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({"event_id": event_id}),
    ))
}

/// Queues a `webhook.test` event for endpoint `id` of `org` only; its event id.
pub(crate) async fn send_test_event(
    state: &AppState,
    org: OrgId,
    id: EndpointId,
) -> Result<uuid::Uuid, Rejection> {
    let known = state
        .webhooks
        .store
        .endpoints(org)
        .await
        .map_err(backend(state))?
        .iter()
        .any(|e| e.id == id);
    if !known {
        return Err(not_found());
    }
    let now = SystemClock.now_ms();
    let mut event = Event::new(
        EventType::Test,
        org,
        &uuid::Uuid::new_v4().to_string(),
        now,
        json!({"endpoint_id": id, "message": "A test event from tollgate."}),
    );
    event.only = Some(id);
    let event_id = event.id;
    state
        .webhooks
        .store
        .emit(event)
        .await
        .map_err(backend(state))?;
    state.webhooks.wake();
    Ok(event_id)
}

/// The endpoint's recent deliveries, newest first, each with its attempts.
pub(super) async fn deliveries(state: &AppState, org: OrgId, id: &str) -> AdminResult {
    let id = endpoint_id(id)?;
    let views = state
        .webhooks
        .store
        .deliveries(org, id, DELIVERY_HISTORY)
        .await
        .map_err(backend(state))?
        .ok_or_else(not_found)?;
    Ok(json_response(
        StatusCode::OK,
        &Value::Array(views.iter().map(|d| d.view()).collect()),
    ))
}

/// `{credits_low_threshold}`: the org's threshold, or null for the default (10 % of the
/// plan's monthly credits).
pub(super) async fn settings(state: &AppState, org: OrgId) -> AdminResult {
    let threshold = state
        .webhooks
        .store
        .low_threshold(org)
        .await
        .map_err(backend(state))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"credits_low_threshold": threshold}),
    ))
}

/// Sets the org's `credits.low` threshold (a whole number of credits, or null).
pub(super) async fn set_settings(state: &AppState, org: OrgId, body: Value) -> AdminResult {
    let threshold = match body.get("credits_low_threshold") {
        Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().filter(|t| *t <= tollgate_credit_meter::MAX_CREDITS).ok_or_else(|| {
            invalid("`credits_low_threshold` must be a whole number of credits, or null for the default.")
        })?),
        None => return Err(invalid("`credits_low_threshold` is required (null for the default).")),
    };
    state
        .webhooks
        .store
        .set_low_threshold(org, threshold)
        .await
        .map_err(backend(state))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"credits_low_threshold": threshold}),
    ))
}
