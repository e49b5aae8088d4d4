//! The admin API (docs/contract.md §5): organizations, subscriptions, credits, keys, models,
//! dashboard users and usage (`admin_accounts`), behind
//! `Authorization: Bearer <TOLLGATE_ADMIN_TOKEN>`.

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;
use serde_json::{json, Value};

use tollgate_api_key_auth::{KeyInfo, KeyStatus};
use tollgate_core::time::rfc3339_from_ms;
use tollgate_core::{
    BackendError, BoxError, Clock as _, ErrorCode, KeyId, ModelId, OrgId, Plan, Rejection,
    SystemClock,
};
use tollgate_upstream_sign::ModelRecord;

use super::app::PeerAddr;
use super::state::AppState;

pub mod body;
pub mod lockout;

use body::{credits_field, grace_seconds, invalid, key_spec, session_field, string_field};
pub use lockout::AdminLockout;

/// The most an admin request body may hold.
const ADMIN_BODY_LIMIT: usize = 64 * 1024;

type AdminResult = Result<Response<Full<Bytes>>, Rejection>;

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn ok(value: &impl Serialize) -> AdminResult {
    Ok(json_response(StatusCode::OK, value))
}

fn created(value: &impl Serialize) -> AdminResult {
    Ok(json_response(StatusCode::CREATED, value))
}

fn not_found(what: &str) -> Rejection {
    Rejection::new(ErrorCode::NotFound).with_message(format!("No such {what}."))
}

fn backend(e: BackendError) -> Rejection {
    tracing::error!(error = %e, "admin API backend failure");
    e.rejection()
}

/// `backend`, counted in `/metrics`.
fn counted(state: &AppState) -> impl Fn(BackendError) -> Rejection + '_ {
    move |e| {
        state.metrics.record_backend_error("admin");
        backend(e)
    }
}

/// Compares the presented token with the configured one without leaking, through timing,
/// how much of it matched or how long the configured one is: the comparison is of their
/// SHA-256 digests, which have one length, in constant time.
fn token_matches(presented: &[u8], expected: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let presented = Sha256::digest(presented);
    let expected = Sha256::digest(expected);
    presented.ct_eq(&expected).into()
}

/// 429 for a client address locked out after too many wrong tokens.
fn locked_out(wait: std::time::Duration) -> Rejection {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    Rejection::new(ErrorCode::RateLimitExceeded)
        .with_message(format!(
            "Too many wrong admin tokens from this address. Retry in {secs} s."
        ))
        .with_retry_after(secs)
}

/// Answers one admin request.
pub async fn handle<B>(state: &AppState, req: Request<B>) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    match route(state, req).await {
        Ok(res) => res,
        Err(rejection) => rejection.into_response(),
    }
}

async fn route<B>(state: &AppState, req: Request<B>) -> AdminResult
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let Some(expected) = state.config.admin_token.as_deref() else {
        return Err(Rejection::new(ErrorCode::NotFound));
    };
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 7235).
            (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..])
        })
        .unwrap_or_default();
    let client = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
    let lockout = &state.admin_lockout;
    if let Some(wait) = lockout.locked_for(client) {
        return Err(locked_out(wait));
    }
    if presented.is_empty() {
        return Err(Rejection::new(ErrorCode::Unauthorized));
    }
    if !token_matches(presented, expected.as_bytes()) {
        if lockout.record_failure(client).is_some() {
            tracing::warn!(client = ?client, "too many wrong admin tokens; address locked out");
        }
        return Err(Rejection::new(ErrorCode::Unauthorized));
    }
    lockout.record_success(client);

    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let host = super::admin_accounts::host_of(&req);
    let segments: Vec<&str> = path
        .strip_prefix("/admin/")
        .unwrap_or_default()
        .split('/')
        .collect();
    let body = read_json(req).await;

    match (&method, segments.as_slice()) {
        (&Method::POST, ["orgs"]) => create_org(state, body?).await,
        (&Method::GET, ["orgs", org]) => ok(&org_view(state, org_id(org)?).await?),
        (&Method::PUT, ["orgs", org, "subscription"]) => {
            subscribe(state, org_id(org)?, body?).await
        }
        (&Method::DELETE, ["orgs", org, "subscription"]) => cancel(state, org_id(org)?).await,
        (&Method::POST, ["orgs", org, "credits"]) => top_up(state, org_id(org)?, body?).await,
        (&Method::PUT, ["orgs", org, "credits"]) => set_balance(state, org_id(org)?, body?).await,
        (&Method::POST, ["orgs", org, "keys"]) => create_key(state, org_id(org)?, body?).await,
        (&Method::GET, ["orgs", org, "keys"]) => list_keys(state, org_id(org)?).await,
        (&Method::POST, ["keys", key, "revoke"]) => revoke_key(state, key_id(key)?).await,
        (&Method::POST, ["keys", key, "rotate"]) => rotate_key(state, key_id(key)?, body?).await,
        (&Method::POST, ["orgs", org, "models"]) => add_model(state, org_id(org)?, body?).await,
        (&Method::GET, ["orgs", org, "models"]) => list_models(state, org_id(org)?).await,
        (&Method::POST, ["models", model, "reconnect"]) => {
            reconnect(state, model_id(model)?, body?).await
        }
        (&Method::POST, ["orgs", org, "users"]) => {
            let org = org_id(org)?;
            require_org(state, org).await?;
            super::admin_accounts::invite(state, org, body?, host.as_deref()).await
        }
        (&Method::GET, ["orgs", org, "users"]) => {
            let org = org_id(org)?;
            require_org(state, org).await?;
            super::admin_accounts::list_users(state, org).await
        }
        (&Method::DELETE, ["users", user]) => super::admin_accounts::delete_user(state, user).await,
        (&Method::POST, ["orgs", org, "webhooks"]) => {
            let org = org_id(org)?;
            require_org(state, org).await?;
            super::admin_webhooks::create(state, org, body?).await
        }
        (&Method::GET, ["orgs", org, "webhooks"]) => {
            let org = org_id(org)?;
            require_org(state, org).await?;
            super::admin_webhooks::list(state, org).await
        }
        (&Method::DELETE, ["orgs", org, "webhooks", id]) => {
            let org = org_id(org)?;
            require_org(state, org).await?;
            super::admin_webhooks::delete(state, org, id).await
        }
        (&Method::POST, ["orgs", org, "webhooks", id, "rotate-secret"]) => {
            let org = org_id(org)?;
            require_org(state, org).await?;
            super::admin_webhooks::rotate_secret(state, org, id).await
        }
        (&Method::POST, ["orgs", org, "webhooks", id, "test"]) => {
            let org = org_id(org)?;
            require_org(state, org).await?;
            super::admin_webhooks::test(state, org, id).await
        }
        (&Method::GET, ["orgs", org, "webhooks", id, "deliveries"]) => {
            let org = org_id(org)?;
            require_org(state, org).await?;
            super::admin_webhooks::deliveries(state, org, id).await
        }
        (&Method::GET, ["orgs", org, "webhook-settings"]) => {
            let org = org_id(org)?;
            require_org(state, org).await?;
            super::admin_webhooks::settings(state, org).await
        }
        (&Method::PUT, ["orgs", org, "webhook-settings"]) => {
            let org = org_id(org)?;
            require_org(state, org).await?;
            super::admin_webhooks::set_settings(state, org, body?).await
        }
        (&Method::GET, ["orgs", org, "usage"]) => {
            let org = org_id(org)?;
            require_org(state, org).await?;
            ok(&super::usage::series(state, org, &query).await?)
        }
        _ => Err(Rejection::new(ErrorCode::NotFound)),
    }
}

async fn read_json<B>(req: Request<B>) -> Result<Value, Rejection>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let bytes = Limited::new(req.into_body(), ADMIN_BODY_LIMIT)
        .collect()
        .await
        .map_err(|_| {
            Rejection::new(ErrorCode::PayloadTooLarge)
                .with_message("The admin request body is too large or unreadable.")
        })?
        .to_bytes();
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes).map_err(|e| invalid(format!("The body is not valid JSON: {e}.")))
}

fn org_id(text: &str) -> Result<OrgId, Rejection> {
    text.parse().map_err(|_| not_found("organization"))
}

fn key_id(text: &str) -> Result<KeyId, Rejection> {
    text.parse().map_err(|_| not_found("key"))
}

fn model_id(text: &str) -> Result<ModelId, Rejection> {
    text.parse().map_err(|_| not_found("model"))
}

/// The ledger has no account for an org that never subscribed.
fn no_account() -> Rejection {
    invalid("The organization has never subscribed: subscribe it to a plan before changing its credits.")
}

async fn require_org(state: &AppState, org: OrgId) -> Result<String, Rejection> {
    state
        .orgs
        .name(org)
        .await
        .map_err(counted(state))?
        .ok_or_else(|| not_found("organization"))
}

#[derive(Serialize)]
struct OrgView {
    id: OrgId,
    name: String,
    plan: Option<Plan>,
    status: &'static str,
    balance: Option<u64>,
    period_end: Option<String>,
}

async fn org_view(state: &AppState, org: OrgId) -> Result<OrgView, Rejection> {
    let name = require_org(state, org).await?;
    let account = state.ledger.account(org).await.map_err(counted(state))?;
    let (plan, balance, period_end) = match &account {
        Some(a) => (
            a.plan,
            a.balance(),
            a.plan.map(|_| rfc3339_from_ms(a.period_end_ms)),
        ),
        None => (None, Some(0), None),
    };
    Ok(OrgView {
        id: org,
        name,
        plan,
        status: if plan.is_some() { "active" } else { "inactive" },
        balance,
        period_end,
    })
}

async fn create_org(state: &AppState, body: Value) -> AdminResult {
    let name = string_field(&body, "name")?;
    let id = state
        .orgs
        .create(name.clone())
        .await
        .map_err(counted(state))?;
    created(&json!({"id": id, "name": name}))
}

async fn subscribe(state: &AppState, org: OrgId, body: Value) -> AdminResult {
    require_org(state, org).await?;
    let plan: Plan = string_field(&body, "plan")?
        .parse()
        .map_err(|e: tollgate_core::PlanParseError| invalid(format!("{e}.")))?;
    apply_plan(state, org, plan).await?;
    ok(&org_view(state, org).await?)
}

/// Subscribes `org` to `plan` (or changes its plan): a new period with the plan's credits,
/// and its keys' subscription.
pub(crate) async fn apply_plan(state: &AppState, org: OrgId, plan: Plan) -> Result<(), Rejection> {
    state
        .ledger
        .subscribe(org, plan)
        .await
        .map_err(counted(state))?;
    state
        .keys
        .set_subscription(org, Some(plan))
        .await
        .map_err(counted(state))
}

/// Cancels `org`'s subscription: its keys get 402 `NO_SUBSCRIPTION`, top-ups stay.
pub(crate) async fn apply_cancel(state: &AppState, org: OrgId) -> Result<(), Rejection> {
    state
        .keys
        .set_subscription(org, None)
        .await
        .map_err(counted(state))?;
    state.ledger.cancel(org).await.map_err(counted(state))?;
    Ok(())
}

/// Adds `amount` top-up credits to `org`; 400 for an org that never subscribed.
pub(crate) async fn apply_top_up(
    state: &AppState,
    org: OrgId,
    amount: u64,
) -> Result<tollgate_credit_meter::Account, Rejection> {
    state
        .ledger
        .top_up(org, amount)
        .await
        .map_err(top_up_error(state))?
        .ok_or_else(no_account)
}

fn too_many_credits() -> Rejection {
    invalid(format!(
        "The top-up would take the balance past the most it can hold ({} credits).",
        tollgate_credit_meter::MAX_CREDITS
    ))
}

/// A top-up the ledger refused because it would take the balance past what a balance can
/// hold ([`MAX_CREDITS`](tollgate_credit_meter::MAX_CREDITS)) is the caller's mistake: 400.
fn top_up_error(state: &AppState) -> impl Fn(BackendError) -> Rejection + '_ {
    move |e| {
        if e.to_string().contains("out of range") {
            too_many_credits()
        } else {
            counted(state)(e)
        }
    }
}

/// Adds top-up credits for the billing request `reference`, once however often it is called.
pub(crate) async fn apply_top_up_once(
    state: &AppState,
    org: OrgId,
    amount: u64,
    reference: uuid::Uuid,
) -> Result<tollgate_credit_meter::Account, Rejection> {
    state
        .ledger
        .top_up_once(org, amount, super::billing::reference(reference))
        .await
        .map_err(top_up_error(state))?
        .ok_or_else(no_account)
}

async fn cancel(state: &AppState, org: OrgId) -> AdminResult {
    require_org(state, org).await?;
    apply_cancel(state, org).await?;
    ok(&org_view(state, org).await?)
}

async fn top_up(state: &AppState, org: OrgId, body: Value) -> AdminResult {
    require_org(state, org).await?;
    let amount = credits_field(&body, "amount")?;
    if amount == 0 {
        return Err(invalid("`amount` must be positive."));
    }
    let account = apply_top_up(state, org, amount).await?;
    ok(&json!({"balance": account.balance()}))
}

async fn set_balance(state: &AppState, org: OrgId, body: Value) -> AdminResult {
    require_org(state, org).await?;
    let balance = credits_field(&body, "balance")?;
    let account = state
        .ledger
        .set_balance(org, balance)
        .await
        .map_err(counted(state))?
        .ok_or_else(no_account)?;
    ok(&json!({"balance": account.balance()}))
}

async fn create_key(state: &AppState, org: OrgId, body: Value) -> AdminResult {
    require_org(state, org).await?;
    let key = create_key_in(state, org, &body).await?;
    created(&json!({"id": key.id, "key": key.secret}))
}

/// Creates a key of `org` from an admin body `{name, expires_at?, scopes?, models?,
/// credit_limit?}` (also the dashboard's form, converted), after checking every field.
pub(crate) async fn create_key_in(
    state: &AppState,
    org: OrgId,
    body: &Value,
) -> Result<tollgate_api_key_auth::NewKey, Rejection> {
    let name = string_field(body, "name")?;
    let spec = key_spec(body, SystemClock.now_ms())?;
    for model in spec.models.iter().flatten() {
        if !state
            .keys
            .owns_model(org, *model)
            .await
            .map_err(counted(state))?
        {
            return Err(invalid(format!(
                "`models` lists {model}, which is not a model of this organization."
            )));
        }
    }
    state
        .keys
        .create_key_with(org, name, spec)
        .await
        .map_err(counted(state))
}

/// A key as the admin API lists it: the store's fields plus what it spent this period.
fn key_view(k: &KeyInfo, spent: u64) -> Value {
    let mut view = serde_json::to_value(k).unwrap_or_else(|_| json!({"id": k.id}));
    view["credits_used_this_period"] = json!(spent);
    view
}

async fn key_spend(
    state: &AppState,
    org: OrgId,
    keys: &[KeyInfo],
) -> Result<std::collections::HashMap<KeyId, u64>, Rejection> {
    state
        .ledger
        .key_spend(org, keys.iter().map(|k| k.id).collect())
        .await
        .map_err(counted(state))
}

async fn list_keys(state: &AppState, org: OrgId) -> AdminResult {
    require_org(state, org).await?;
    let keys = state.keys.list_keys(org).await.map_err(counted(state))?;
    let spend = key_spend(state, org, &keys).await?;
    ok(&keys
        .iter()
        .map(|k| key_view(k, spend.get(&k.id).copied().unwrap_or(0)))
        .collect::<Vec<_>>())
}

async fn revoke_key(state: &AppState, key: KeyId) -> AdminResult {
    if !state.keys.revoke_key(key).await.map_err(counted(state))? {
        return Err(not_found("key"));
    }
    let info = state.keys.key_info(key).await.map_err(counted(state))?;
    match info {
        Some(info) => {
            let spend = key_spend(state, info.org, std::slice::from_ref(&info)).await?;
            ok(&key_view(&info, spend.get(&key).copied().unwrap_or(0)))
        }
        None => ok(&json!({"id": key, "status": "revoked"})),
    }
}

async fn rotate_key(state: &AppState, key: KeyId, body: Value) -> AdminResult {
    let grace = grace_seconds(&body)?;
    let new = rotate_key_checked(state, key, grace).await?;
    ok(&json!({"id": new.id, "key": new.secret}))
}

/// Rotates a working key with `grace` seconds for the old one; 400 for a revoked or expired
/// key, 404 for none.
pub(crate) async fn rotate_key_checked(
    state: &AppState,
    key: KeyId,
    grace: u64,
) -> Result<tollgate_api_key_auth::NewKey, Rejection> {
    // Rotating replaces a working key; a revoked or expired key stays dead (no way around a
    // revoke or an expiry).
    let info = state
        .keys
        .key_info(key)
        .await
        .map_err(counted(state))?
        .ok_or_else(|| not_found("key"))?;
    match info.status {
        KeyStatus::Revoked => {
            return Err(invalid(
                "The key is revoked; create a new key instead of rotating it.",
            ))
        }
        KeyStatus::Expired => {
            return Err(invalid(
                "The key has expired; create a new key instead of rotating it.",
            ))
        }
        KeyStatus::Active => {}
    }
    state
        .keys
        .rotate_key_with_grace(key, grace.saturating_mul(1_000))
        .await
        .map_err(counted(state))?
        .ok_or_else(|| not_found("key"))
}

fn model_view(m: &ModelRecord) -> Value {
    json!({"id": m.id, "name": m.name, "status": m.status})
}

async fn add_model(state: &AppState, org: OrgId, body: Value) -> AdminResult {
    require_org(state, org).await?;
    let record = add_model_in(state, org, &body).await?;
    created(&model_view(&record))
}

/// Connects a model to `org` from `{name, session}` (the admin body, or the dashboard's form
/// converted) and lets the org's keys call it.
pub(crate) async fn add_model_in(
    state: &AppState,
    org: OrgId,
    body: &Value,
) -> Result<ModelRecord, Rejection> {
    let name = string_field(body, "name")?;
    let session = session_field(body)?;
    let record = state
        .sessions
        .connect(org, name, session)
        .await
        .map_err(counted(state))?;
    state
        .keys
        .add_model(org, record.id)
        .await
        .map_err(counted(state))?;
    Ok(record)
}

async fn list_models(state: &AppState, org: OrgId) -> AdminResult {
    require_org(state, org).await?;
    let models = state.sessions.list(org).await.map_err(counted(state))?;
    ok(&models.iter().map(model_view).collect::<Vec<_>>())
}

async fn reconnect(state: &AppState, model: ModelId, body: Value) -> AdminResult {
    let session = session_field(&body)?;
    let record = state
        .sessions
        .reconnect(model, session)
        .await
        .map_err(counted(state))?
        .ok_or_else(|| not_found("model"))?;
    ok(&model_view(&record))
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc"));
        assert!(!token_matches(b"ab", b"abc"));
        assert!(!token_matches(b"", b"abc"));
        assert!(!token_matches(b"abcd", b"abc"));
        let long = vec![b'a'; 10_000];
        assert!(token_matches(&long, &long));
        assert!(!token_matches(&long[1..], &long));
    }
}
