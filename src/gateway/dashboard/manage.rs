//! The API Keys and Webhooks pages: the same operations as the admin API (docs/contract.md
//! §13, §15), checked the same way, as forms that work without JavaScript.

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use serde_json::{json, Value};

use tollgate_api_key_auth::KeyStatus;
use tollgate_core::{
    BoxError, Clock as _, ErrorCode, KeyId, ModelId, OrgId, Rejection, SystemClock,
};
use tollgate_upstream_sign::ModelStatus;

use super::auth::{self, check_csrf, Viewer};
use super::http::{json_error, read_form, redirect, wants_html, with_code, Form};
use super::pages::{nav, org_for};
use super::render;
use super::views::{
    date_time, thousands, DeliveryRow, EndpointRow, EventChoice, Frame, KeyRow, KeysPage,
    ModelChoice, ModelRow, ModelsPage, NewSecret, OrgNav, Tab, WebhooksPage,
};
use super::Site;
use crate::gateway::admin::{add_model_in, create_key_in, rotate_key_checked};
use crate::gateway::admin_webhooks::{register, send_test_event, DELIVERY_HISTORY};
use crate::gateway::app::GatewayBody;
use crate::gateway::webhooks::{DeliveryState, EndpointId, EventType};

type Answer = Result<Response<GatewayBody>, Rejection>;

/// Deliveries shown per endpoint on the page.
const DELIVERIES_SHOWN: usize = 10;

macro_rules! signed_in {
    ($state:expr, $headers:expr) => {
        match auth::viewer($state, $headers).await? {
            Some(viewer) => viewer,
            None => return Ok(redirect("/dashboard/login")),
        }
    };
}

fn no_page() -> Rejection {
    Rejection::new(ErrorCode::NotFound).with_message("No such page.")
}

fn invalid(message: impl Into<String>) -> Rejection {
    Rejection::new(ErrorCode::InvalidRequest).with_message(message.into())
}

/// A change's form: signed in, CSRF checked, an owner of the org (or the operator).
async fn change<B>(
    state: &Site<'_>,
    segment: &str,
    req: Request<B>,
) -> Result<Result<(Viewer, HeaderMap, Form, OrgId, String), Response<GatewayBody>>, Rejection>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let headers = req.headers().clone();
    let Some(viewer) = auth::viewer(state, &headers).await? else {
        return Ok(Err(redirect("/dashboard/login")));
    };
    let form = read_form(req).await?;
    check_csrf(&viewer, &headers, &form)?;
    let (org, name, _) = org_for(state, &viewer, segment).await?;
    viewer.may_change(org)?;
    Ok(Ok((viewer, headers, form, org, name)))
}

/// A 400 of a form: `page` again with the message in its error slot (`set`) for a browser,
/// or the JSON error; any other rejection as it is.
fn refused<P: askama::Template>(
    headers: &HeaderMap,
    rejection: Rejection,
    mut page: P,
    set: impl FnOnce(&mut P, String),
) -> Answer {
    if rejection.code() != ErrorCode::InvalidRequest {
        return Err(rejection);
    }
    if wants_html(headers) {
        set(&mut page, rejection.message().to_owned());
        Ok(with_code(
            render(StatusCode::BAD_REQUEST, &page),
            ErrorCode::InvalidRequest,
        ))
    } else {
        Ok(json_error(rejection))
    }
}

// ---------------------------------------------------------------------------------------------
// API Keys

async fn keys_page(
    state: &Site<'_>,
    viewer: &Viewer,
    org: OrgId,
    name: String,
    can_change: bool,
    new_secret: Option<NewSecret>,
    error: Option<String>,
) -> Result<KeysPage, Rejection> {
    let keys = state.keys.list_keys(org).await.map_err(|e| e.rejection())?;
    let spend = state
        .ledger
        .key_spend(org, keys.iter().map(|k| k.id).collect())
        .await
        .map_err(|e| e.rejection())?;
    let models = state.sessions.list(org).await.map_err(|e| e.rejection())?;
    let model_name = |id| {
        models
            .iter()
            .find(|m| m.id == id)
            .map_or_else(|| "a removed model".to_owned(), |m| m.name.clone())
    };
    let base = format!("/dashboard/orgs/{org}/keys");
    let rows = keys
        .iter()
        .map(|k| {
            let (status, status_class) = match k.status {
                KeyStatus::Active => ("Active", "badge-active"),
                KeyStatus::Revoked => ("Revoked", "badge-revoked"),
                KeyStatus::Expired => ("Expired", "badge-expired"),
            };
            let scopes = match k.scopes.names().as_slice() {
                ["read"] => "Read only",
                ["write"] => "Write only",
                _ => "Read and write",
            };
            let models = match &k.models {
                None => "every model".to_owned(),
                Some(ids) => ids
                    .iter()
                    .map(|id| model_name(*id))
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            let used = spend.get(&k.id).copied().unwrap_or(0);
            let limit = match k.credit_limit {
                Some(l) => format!(
                    "{} of {} credits this period",
                    thousands(used),
                    thousands(l)
                ),
                None => format!(
                    "{} credit{} this period, no limit",
                    thousands(used),
                    if used == 1 { "" } else { "s" }
                ),
            };
            KeyRow {
                name: k.name.clone(),
                prefix: k.prefix.clone(),
                status,
                status_class,
                created: date_time(k.created_at_ms),
                last_used: k.last_used_at_ms.map_or("Never".to_owned(), date_time),
                expires: k.expires_at_ms.map_or("Never".to_owned(), date_time),
                scopes,
                models,
                limit,
                active: k.status == KeyStatus::Active,
                revoke_action: format!("{base}/{}/revoke", k.id),
                rotate_action: format!("{base}/{}/rotate", k.id),
                field_id: k.id.to_string(),
            }
        })
        .collect();
    let org_nav = OrgNav::new(org.to_string(), name.clone(), Some(Tab::Keys));
    Ok(KeysPage {
        frame: Frame::with_nav("API Keys", nav(viewer, Some(org_nav))),
        org_name: name,
        keys: rows,
        can_change,
        create_action: format!("{base}/create"),
        models: models
            .iter()
            .map(|m| ModelChoice {
                name: m.name.clone(),
                field: format!("model_{}", m.id),
            })
            .collect(),
        new_secret,
        error,
    })
}

pub async fn keys(state: &Site<'_>, headers: &HeaderMap, segment: &str) -> Answer {
    let viewer = signed_in!(state, headers);
    let (org, name, can_change) = org_for(state, &viewer, segment).await?;
    let page = keys_page(state, &viewer, org, name, can_change, None, None).await?;
    Ok(render(StatusCode::OK, &page))
}

/// The create form as the admin API's body: `expires_on` (a date: the key works through
/// that day and expires at its end, UTC), `scopes` (`read,write`, `read`, `write`), `model_<id>` checkboxes (none:
/// every model), `credit_limit` (blank: none).
fn key_body(form: &Form, models: &[String]) -> Result<Value, Rejection> {
    let mut body = json!({"name": form.get("name").trim()});
    let expires = form.get("expires_on").trim();
    if !expires.is_empty() {
        let date = chrono::NaiveDate::parse_from_str(expires, "%Y-%m-%d").map_err(|_| {
            invalid("Choose an expiry date, or leave it empty for a key that never expires.")
        })?;
        let end = date.succ_opt().ok_or_else(|| {
            invalid("Choose an expiry date, or leave it empty for a key that never expires.")
        })?;
        body["expires_at"] = json!(format!("{end}T00:00:00Z"));
    }
    let scopes: Vec<&str> = match form.get("scopes") {
        "" | "read,write" => vec!["read", "write"],
        "read" => vec!["read"],
        "write" => vec!["write"],
        _ => {
            return Err(invalid(
                "Choose the key's access: read and write, read only or write only.",
            ))
        }
    };
    body["scopes"] = json!(scopes);
    let chosen: Vec<&String> = models
        .iter()
        .filter(|id| form.get(&format!("model_{id}")) == "on")
        .collect();
    if !chosen.is_empty() {
        body["models"] = json!(chosen);
    }
    let limit = form.get("credit_limit").trim();
    if !limit.is_empty() {
        let limit: u64 = limit.parse().map_err(|_| {
            invalid("The credit limit must be a whole number of credits, or empty for none.")
        })?;
        body["credit_limit"] = json!(limit);
    }
    Ok(body)
}

/// `POST /dashboard/orgs/:org/keys/create`: the page with the new key's secret, shown once.
pub async fn key_create<B>(state: &Site<'_>, segment: &str, req: Request<B>) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (viewer, headers, form, org, name) = match change(state, segment, req).await? {
        Ok(parts) => parts,
        Err(redirect) => return Ok(redirect),
    };
    let models: Vec<String> = state
        .sessions
        .list(org)
        .await
        .map_err(|e| e.rejection())?
        .iter()
        .map(|m| m.id.to_string())
        .collect();
    let created = match key_body(&form, &models) {
        Ok(body) => create_key_in(state, org, &body).await,
        Err(e) => Err(e),
    };
    match created {
        Ok(key) => {
            let secret = NewSecret {
                heading: format!("Key “{}” created", form.get("name").trim()),
                note: "Copy it now: it is shown only this once, and only its prefix is kept."
                    .to_owned(),
                secret: key.secret.to_string(),
            };
            let page = keys_page(state, &viewer, org, name, true, Some(secret), None).await?;
            Ok(render(StatusCode::OK, &page))
        }
        Err(rejection) => {
            let page = keys_page(state, &viewer, org, name, true, None, None).await?;
            refused(&headers, rejection, page, |p, m| p.error = Some(m))
        }
    }
}

/// The key of a URL segment, if it is `org`'s (else 404).
async fn key_of(state: &Site<'_>, org: OrgId, segment: &str) -> Result<KeyId, Rejection> {
    let key: KeyId = segment.parse().map_err(|_| no_page())?;
    match state.keys.key_info(key).await.map_err(|e| e.rejection())? {
        Some(info) if info.org == org => Ok(key),
        _ => Err(no_page()),
    }
}

/// `POST /dashboard/orgs/:org/keys/:key/revoke` (`confirm=yes`).
pub async fn key_revoke<B>(state: &Site<'_>, segment: &str, key: &str, req: Request<B>) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (viewer, headers, form, org, name) = match change(state, segment, req).await? {
        Ok(parts) => parts,
        Err(redirect) => return Ok(redirect),
    };
    let key = key_of(state, org, key).await?;
    if form.get("confirm") != "yes" {
        let page = keys_page(state, &viewer, org, name, true, None, None).await?;
        return refused(
            &headers,
            invalid("Tick the confirmation to revoke the key."),
            page,
            |p, m| p.error = Some(m),
        );
    }
    state
        .keys
        .revoke_key(key)
        .await
        .map_err(|e| e.rejection())?;
    Ok(redirect(&format!("/dashboard/orgs/{org}/keys")))
}

/// `POST /dashboard/orgs/:org/keys/:key/rotate` (`grace_seconds`): the page with the new
/// secret, shown once.
pub async fn key_rotate<B>(state: &Site<'_>, segment: &str, key: &str, req: Request<B>) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (viewer, headers, form, org, name) = match change(state, segment, req).await? {
        Ok(parts) => parts,
        Err(redirect) => return Ok(redirect),
    };
    let key = key_of(state, org, key).await?;
    let grace = match form.get("grace_seconds") {
        "" => Ok(0),
        text => text
            .parse::<u64>()
            .ok()
            .filter(|g| *g <= crate::gateway::admin::body::MAX_GRACE_SECONDS)
            .ok_or_else(|| invalid("Choose how long the old key keeps working.")),
    };
    let rotated = match grace {
        Ok(grace) => rotate_key_checked(state, key, grace)
            .await
            .map(|k| (k, grace)),
        Err(e) => Err(e),
    };
    match rotated {
        Ok((new, grace)) => {
            let note = if grace == 0 {
                "The old key no longer works. Copy the new one now: it is shown only this once."
                    .to_owned()
            } else {
                format!(
                    "The old key keeps working until {}. Copy the new one now: it is shown only this once.",
                    date_time(SystemClock.now_ms() + grace * 1_000)
                )
            };
            let secret = NewSecret {
                heading: "Key rotated".to_owned(),
                note,
                secret: new.secret.to_string(),
            };
            let page = keys_page(state, &viewer, org, name, true, Some(secret), None).await?;
            Ok(render(StatusCode::OK, &page))
        }
        Err(rejection) => {
            let page = keys_page(state, &viewer, org, name, true, None, None).await?;
            refused(&headers, rejection, page, |p, m| p.error = Some(m))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Models

async fn models_page(
    state: &Site<'_>,
    viewer: &Viewer,
    org: OrgId,
    name: String,
    can_change: bool,
    notice: Option<String>,
    error: Option<String>,
) -> Result<ModelsPage, Rejection> {
    let models = state.sessions.list(org).await.map_err(|e| e.rejection())?;
    let base = format!("/dashboard/orgs/{org}/models");
    let org_nav = OrgNav::new(org.to_string(), name.clone(), Some(Tab::Models));
    Ok(ModelsPage {
        frame: Frame::with_nav("Models", nav(viewer, Some(org_nav))),
        org_name: name,
        models: models
            .iter()
            .map(|m| ModelRow {
                name: m.name.clone(),
                connected: m.status == ModelStatus::Connected,
                last_disconnected: m.disconnected_at_ms.map_or("Never".to_owned(), date_time),
                reconnect_action: format!("{base}/{}/reconnect", m.id),
                field_id: m.id.to_string(),
            })
            .collect(),
        can_change,
        add_action: format!("{base}/add"),
        notice,
        error,
    })
}

pub async fn models(state: &Site<'_>, headers: &HeaderMap, segment: &str) -> Answer {
    let viewer = signed_in!(state, headers);
    let (org, name, can_change) = org_for(state, &viewer, segment).await?;
    let page = models_page(state, &viewer, org, name, can_change, None, None).await?;
    Ok(render(StatusCode::OK, &page))
}

/// The session fields of a form as the admin API's `session` object.
fn session_body(form: &Form) -> Value {
    json!({
        "cookie": form.get("cookie").trim(),
        "user_id": form.get("user_id").trim(),
        "x_bc": form.get("x_bc").trim(),
        "user_agent": form.get("user_agent").trim(),
    })
}

/// `POST /dashboard/orgs/:org/models/add` (`name`, `cookie`, `user_id`, `x_bc`,
/// `user_agent`).
pub async fn model_add<B>(state: &Site<'_>, segment: &str, req: Request<B>) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (viewer, headers, form, org, name) = match change(state, segment, req).await? {
        Ok(parts) => parts,
        Err(redirect) => return Ok(redirect),
    };
    let body = json!({"name": form.get("name").trim(), "session": session_body(&form)});
    match add_model_in(state, org, &body).await {
        Ok(record) => {
            let notice = format!(
                "{} is connected; the org's keys can call it now.",
                record.name
            );
            let page = models_page(state, &viewer, org, name, true, Some(notice), None).await?;
            Ok(render(StatusCode::OK, &page))
        }
        Err(rejection) => {
            let page = models_page(state, &viewer, org, name, true, None, None).await?;
            refused(&headers, rejection, page, |p, m| p.error = Some(m))
        }
    }
}

/// `POST /dashboard/orgs/:org/models/:model/reconnect` (the four session fields).
pub async fn model_reconnect<B>(
    state: &Site<'_>,
    segment: &str,
    model: &str,
    req: Request<B>,
) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (viewer, headers, form, org, name) = match change(state, segment, req).await? {
        Ok(parts) => parts,
        Err(redirect) => return Ok(redirect),
    };
    let model: ModelId = model.parse().map_err(|_| no_page())?;
    match state
        .sessions
        .model(model)
        .await
        .map_err(|e| e.rejection())?
    {
        Some(m) if m.org == org => {}
        _ => return Err(no_page()),
    }
    let session =
        crate::gateway::admin::body::session_field(&json!({"session": session_body(&form)}));
    let reconnected = match session {
        Ok(session) => state
            .sessions
            .reconnect(model, session)
            .await
            .map_err(|e| e.rejection())
            .and_then(|r| r.ok_or_else(no_page)),
        Err(e) => Err(e),
    };
    match reconnected {
        Ok(record) => {
            let notice = format!("{} is connected again.", record.name);
            let page = models_page(state, &viewer, org, name, true, Some(notice), None).await?;
            Ok(render(StatusCode::OK, &page))
        }
        Err(rejection) => {
            let page = models_page(state, &viewer, org, name, true, None, None).await?;
            refused(&headers, rejection, page, |p, m| p.error = Some(m))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Webhooks

const EVENTS: [(EventType, &str); 6] = [
    (
        EventType::CreditsLow,
        "the balance falls below the threshold",
    ),
    (
        EventType::CreditsExhausted,
        "a request was refused for lack of credits",
    ),
    (
        EventType::ModelDisconnected,
        "the upstream refused a model's session",
    ),
    (EventType::ModelReconnected, "a model was reconnected"),
    (
        EventType::SubscriptionRenewed,
        "a new billing period started",
    ),
    (EventType::KeyExpiring, "a key expires within 7 days"),
];

#[allow(clippy::too_many_arguments)]
async fn webhooks_page(
    state: &Site<'_>,
    viewer: &Viewer,
    org: OrgId,
    name: String,
    can_change: bool,
    new_secret: Option<NewSecret>,
    notice: Option<String>,
    error: Option<String>,
) -> Result<WebhooksPage, Rejection> {
    let store = &state.webhooks.store;
    let endpoints = store.endpoints(org).await.map_err(|e| e.rejection())?;
    let base = format!("/dashboard/orgs/{org}/webhooks");
    let mut rows = Vec::with_capacity(endpoints.len());
    for e in &endpoints {
        let deliveries = store
            .deliveries(org, e.id, DELIVERIES_SHOWN.min(DELIVERY_HISTORY))
            .await
            .map_err(|e| e.rejection())?
            .unwrap_or_default();
        rows.push(EndpointRow {
            url: e.url.clone(),
            events: e
                .events
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            created: date_time(e.created_ms),
            delete_action: format!("{base}/{}/delete", e.id),
            test_action: format!("{base}/{}/test", e.id),
            rotate_action: format!("{base}/{}/rotate", e.id),
            deliveries: deliveries
                .iter()
                .map(|d| {
                    let (status, status_class) = match d.state {
                        DeliveryState::Pending => ("Pending", "badge-pending"),
                        DeliveryState::Delivered => ("Delivered", "badge-delivered"),
                        DeliveryState::Failed => ("Failed", "badge-failed"),
                    };
                    let last = d.attempts.last().map_or_else(
                        || "Not attempted yet".to_owned(),
                        |a| match (a.status, &a.error) {
                            (Some(s), _) => format!("HTTP {s} in {} ms", a.duration_ms),
                            (None, Some(err)) => err.clone(),
                            (None, None) => "No answer".to_owned(),
                        },
                    );
                    DeliveryRow {
                        kind: d.kind.as_str(),
                        status,
                        status_class,
                        created: date_time(d.created_ms),
                        attempts: d.attempts.len(),
                        last,
                    }
                })
                .collect(),
        });
    }
    let org_nav = OrgNav::new(org.to_string(), name.clone(), Some(Tab::Webhooks));
    Ok(WebhooksPage {
        frame: Frame::with_nav("Webhooks", nav(viewer, Some(org_nav))),
        org_name: name,
        endpoints: rows,
        can_change,
        create_action: format!("{base}/create"),
        events: EVENTS
            .iter()
            .map(|(t, about)| EventChoice {
                name: t.as_str(),
                field: format!("event_{}", t.as_str()),
                id: format!("event-{}", t.as_str().replace('.', "-")),
                about,
            })
            .collect(),
        new_secret,
        notice,
        error,
    })
}

pub async fn webhooks(state: &Site<'_>, headers: &HeaderMap, segment: &str) -> Answer {
    let viewer = signed_in!(state, headers);
    let (org, name, can_change) = org_for(state, &viewer, segment).await?;
    let page = webhooks_page(state, &viewer, org, name, can_change, None, None, None).await?;
    Ok(render(StatusCode::OK, &page))
}

/// `POST /dashboard/orgs/:org/webhooks/create` (`url`, `event_<type>` checkboxes): the page
/// with the signing secret, shown once.
pub async fn webhook_create<B>(state: &Site<'_>, segment: &str, req: Request<B>) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (viewer, headers, form, org, name) = match change(state, segment, req).await? {
        Ok(parts) => parts,
        Err(redirect) => return Ok(redirect),
    };
    let events: Vec<&str> = EVENTS
        .iter()
        .map(|(t, _)| t.as_str())
        .filter(|t| form.get(&format!("event_{t}")) == "on")
        .collect();
    let body = json!({"url": form.get("url").trim(), "events": events});
    match register(state, org, &body).await {
        Ok((_, secret)) => {
            let secret = NewSecret {
                heading: "Endpoint added".to_owned(),
                note: "Verify each delivery's Tollgate-Signature with this secret. Copy it now: it is shown only this once.".to_owned(),
                secret,
            };
            let page =
                webhooks_page(state, &viewer, org, name, true, Some(secret), None, None).await?;
            Ok(render(StatusCode::OK, &page))
        }
        Err(rejection) => {
            let page = webhooks_page(state, &viewer, org, name, true, None, None, None).await?;
            refused(&headers, rejection, page, |p, m| p.error = Some(m))
        }
    }
}

/// The endpoint of a URL segment, if it is `org`'s (else 404).
async fn endpoint_of(state: &Site<'_>, org: OrgId, segment: &str) -> Result<EndpointId, Rejection> {
    let id: EndpointId = segment.parse().map_err(|_| no_page())?;
    let known = state
        .webhooks
        .store
        .endpoints(org)
        .await
        .map_err(|e| e.rejection())?
        .iter()
        .any(|e| e.id == id);
    if known {
        Ok(id)
    } else {
        Err(no_page())
    }
}

/// `POST /dashboard/orgs/:org/webhooks/:id/(delete|test|rotate)`.
pub async fn webhook_action<B>(
    state: &Site<'_>,
    segment: &str,
    endpoint: &str,
    action: &str,
    req: Request<B>,
) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (viewer, headers, form, org, name) = match change(state, segment, req).await? {
        Ok(parts) => parts,
        Err(redirect) => return Ok(redirect),
    };
    let id = endpoint_of(state, org, endpoint).await?;
    let store = &state.webhooks.store;
    match action {
        "delete" => {
            if form.get("confirm") != "yes" {
                let page = webhooks_page(state, &viewer, org, name, true, None, None, None).await?;
                return refused(
                    &headers,
                    invalid("Tick the confirmation to remove the endpoint."),
                    page,
                    |p, m| p.error = Some(m),
                );
            }
            store
                .delete_endpoint(org, id)
                .await
                .map_err(|e| e.rejection())?;
            Ok(redirect(&format!("/dashboard/orgs/{org}/webhooks")))
        }
        "test" => {
            send_test_event(state, org, id).await?;
            let notice =
                "A webhook.test event is on its way; its delivery shows below in a moment.";
            let page = webhooks_page(
                state,
                &viewer,
                org,
                name,
                true,
                None,
                Some(notice.into()),
                None,
            )
            .await?;
            Ok(render(StatusCode::OK, &page))
        }
        "rotate" => {
            let secret = crate::gateway::webhooks::new_secret();
            if !store
                .set_secret(org, id, secret.clone())
                .await
                .map_err(|e| e.rejection())?
            {
                return Err(no_page());
            }
            let secret = NewSecret {
                heading: "Signing secret rotated".to_owned(),
                note: "Deliveries are signed with this secret from now on. Copy it now: it is shown only this once.".to_owned(),
                secret,
            };
            let page =
                webhooks_page(state, &viewer, org, name, true, Some(secret), None, None).await?;
            Ok(render(StatusCode::OK, &page))
        }
        _ => Err(no_page()),
    }
}
