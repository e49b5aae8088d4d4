//! End to end, part B: the operator's side of the turnkey gateway over real HTTP on a loopback
//! port, in front of the in-process sandbox upstream.
//!
//! The admin API of SPEC §5 (every endpoint, exact shapes, every error), key revoke and
//! rotate, `GET /api/credits` and its two pots, the log export of SPEC §6 (fields, CSV,
//! filters, paging, tenancy), signing rules rotated while running, a client that goes away
//! mid-request, `/healthz`, `/readyz`, `/metrics`, and graceful shutdown.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chrono::{DateTime, FixedOffset, Months, SecondsFormat, Utc};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::{Answer, TestGateway, ADMIN_TOKEN};
use tollgate::core::{ErrorCode, OrgId, SystemClock};
use tollgate::credit_meter::EntryKind;
use tollgate::gateway::{self, memory_backends, Config};
use tollgate::request_logger::{LogQuery, LogRecord, MemoryLogSink};
use tollgate::sandbox::{DynamicRules, Fault, Sandbox, SandboxAccount};
use tollgate::upstream_sign::SANDBOX_RULES_JSON;

/// Rules in the `format` spelling (UPSTREAM.md test vector file).
const FORMAT_STYLE_RULES: &str =
    include_str!("../layers/upstream-sign/tests/fixtures/rules-format-style.json");
/// Rules in the `prefix`/`suffix` spelling.
const PREFIX_STYLE_RULES: &str =
    include_str!("../layers/upstream-sign/tests/fixtures/rules-prefix-style.json");

/// The fields of a log row, in SPEC §6 order.
const LOG_FIELDS: [&str; 11] = [
    "time",
    "request_id",
    "org_id",
    "key_id",
    "model_id",
    "method",
    "route",
    "status",
    "code",
    "credits",
    "latency_ms",
];

const CSV_HEADER: &str =
    "time,request_id,org_id,key_id,model_id,method,route,status,code,credits,latency_ms";

// ---------------------------------------------------------------------------------------------
// Helpers

/// The test configuration with a burst large enough that a test sending a dozen requests in
/// a second is limited only by the per-minute window.
fn roomy_config() -> Config {
    let mut config = common::test_config();
    config.burst = [5, 1_000, 30, 1_000];
    config
}

async fn start_roomy() -> TestGateway {
    common::start(roomy_config()).await
}

fn sandbox(gw: &TestGateway) -> &Sandbox {
    gw.gw.sandbox().expect("in-process sandbox")
}

fn demo_org(gw: &TestGateway) -> String {
    gw.gw.demo().expect("demo mode").org.to_string()
}

fn demo_key_id(gw: &TestGateway) -> String {
    gw.gw.demo().expect("demo mode").key_id.to_string()
}

/// The sandbox account behind the demo model.
fn demo_account(gw: &TestGateway) -> SandboxAccount {
    let accounts = sandbox(gw).accounts();
    assert_eq!(accounts.len(), 1, "the demo seeds one account");
    accounts[0].clone()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Parses RFC 3339 text (any offset) into milliseconds since the epoch.
fn rfc3339_ms(text: &str) -> u64 {
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}"))
        .timestamp_millis() as u64
}

fn utc(ms: u64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(ms as i64).unwrap()
}

fn rfc3339(ms: u64) -> String {
    utc(ms).to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// One calendar month after `ms`, computed independently of the gateway.
fn one_month_after(ms: u64) -> u64 {
    utc(ms)
        .checked_add_months(Months::new(1))
        .unwrap()
        .timestamp_millis() as u64
}

/// `period_end` is one calendar month after a period start inside `[before, after]`.
fn assert_period_end(period_end: &Value, before: u64, after: u64) {
    let text = period_end.as_str().expect("period_end is a string");
    let end = rfc3339_ms(text);
    assert!(
        one_month_after(before) <= end && end <= one_month_after(after),
        "period_end {text} is not one month after a start between {} and {}",
        rfc3339(before),
        rfc3339(after)
    );
}

/// The keys of a JSON object.
fn fields(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// An `{error, code}` answer with exactly this status, code and sentence.
fn assert_error(answer: &Answer, status: u16, code: &str, message: &str) {
    assert_eq!(answer.status.as_u16(), status, "{}", answer.text());
    assert_eq!(
        answer.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..]),
        "{}",
        answer.text()
    );
    assert_eq!(answer.json(), json!({"error": message, "code": code}));
}

/// A 400 `INVALID_REQUEST` whose sentence names `field`.
fn assert_invalid(answer: &Answer, field: &str) {
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text());
    let body = answer.json();
    assert_eq!(fields(&body), set(&["error", "code"]), "{body}");
    assert_eq!(body["code"], "INVALID_REQUEST", "{body}");
    let message = body["error"].as_str().expect("error is a sentence");
    assert!(
        message.contains(field),
        "the message {message:?} does not name `{field}`"
    );
}

/// An admin call with an arbitrary `Authorization` header (or none) and a raw body.
async fn admin_raw(
    gw: &TestGateway,
    method: Method,
    path: &str,
    authorization: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let mut req = Request::builder().method(method).uri(gw.url(path));
    if let Some(auth) = authorization {
        req = req.header("authorization", auth);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let body = Bytes::from(body.unwrap_or("").to_owned());
    gw.send(req.body(Full::new(body)).unwrap()).await
}

/// An admin call with the right token and a raw body.
async fn admin_text(gw: &TestGateway, method: Method, path: &str, body: &str) -> Answer {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    admin_raw(gw, method, path, Some(&auth), Some(body)).await
}

/// An admin call that must answer `status`; returns the JSON body.
async fn admin_expect(
    gw: &TestGateway,
    method: Method,
    path: &str,
    body: Option<Value>,
    status: StatusCode,
) -> Value {
    let answer = gw.admin(method.clone(), path, body).await;
    assert_eq!(answer.status, status, "{method} {path}: {}", answer.text());
    assert_eq!(
        answer.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..]),
        "{method} {path}"
    );
    answer.json()
}

/// A customer call with `key` and an optional request id and JSON body.
async fn customer(
    gw: &TestGateway,
    key: &str,
    method: Method,
    path: &str,
    request_id: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let mut req = gw.request(method, path, Some(key), body);
    if let Some(id) = request_id {
        req.headers_mut()
            .insert("x-request-id", id.parse().expect("header value"));
    }
    gw.send(req).await
}

/// An org created and subscribed through the admin API, with one key and one model on a new
/// sandbox account.
struct Tenant {
    org: String,
    key_id: String,
    key: String,
    model: String,
    account: SandboxAccount,
}

impl Tenant {
    fn path(&self, rest: &str) -> String {
        format!("/api/models/{}{}", self.model, rest)
    }
}

async fn new_tenant(gw: &TestGateway, name: &str, plan: &str) -> Tenant {
    let org = admin_expect(
        gw,
        Method::POST,
        "/admin/orgs",
        Some(json!({"name": name})),
        StatusCode::CREATED,
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    admin_expect(
        gw,
        Method::PUT,
        &format!("/admin/orgs/{org}/subscription"),
        Some(json!({"plan": plan})),
        StatusCode::OK,
    )
    .await;
    let key = admin_expect(
        gw,
        Method::POST,
        &format!("/admin/orgs/{org}/keys"),
        Some(json!({"name": "main"})),
        StatusCode::CREATED,
    )
    .await;
    let account = sandbox(gw).add_account();
    let model = admin_expect(
        gw,
        Method::POST,
        &format!("/admin/orgs/{org}/models"),
        Some(json!({"name": format!("{name} model"), "session": account.session_json()})),
        StatusCode::CREATED,
    )
    .await;
    Tenant {
        org,
        key_id: key["id"].as_str().unwrap().to_owned(),
        key: key["key"].as_str().unwrap().to_owned(),
        model: model["id"].as_str().unwrap().to_owned(),
        account,
    }
}

/// The org's ledger rows, read from the gateway's ledger.
async fn ledger_entries(gw: &TestGateway, org: &str) -> Vec<tollgate::credit_meter::LedgerEntry> {
    let org: OrgId = org.parse().unwrap();
    gw.gw
        .state()
        .ledger
        .entries(org)
        .await
        .expect("ledger rows")
}

/// Writes every queued log row to the sink.
async fn flush_logs(gw: &TestGateway) {
    gw.gw.state().logger.flush().await;
}

/// `GET /api/logs?<query>` with `key`.
async fn export(gw: &TestGateway, key: &str, query: &str) -> Answer {
    let path = if query.is_empty() {
        "/api/logs".to_owned()
    } else {
        format!("/api/logs?{query}")
    };
    let answer = customer(gw, key, Method::GET, &path, None, None).await;
    assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.text());
    answer
}

/// The rows of an NDJSON export.
fn ndjson(answer: &Answer) -> Vec<Value> {
    assert_eq!(answer.headers["content-type"], "application/x-ndjson");
    let text = answer.text();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "every NDJSON row ends with a newline"
    );
    text.lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("bad NDJSON row {line:?}: {e}"))
        })
        .collect()
}

fn request_ids(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["request_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The row with this request id (exactly one).
fn row<'a>(rows: &'a [Value], request_id: &str) -> &'a Value {
    let found: Vec<&Value> = rows
        .iter()
        .filter(|r| r["request_id"] == request_id)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "rows with request id {request_id}: {rows:?}"
    );
    found[0]
}

/// A unique file in the temp directory.
fn temp_rules_path() -> PathBuf {
    std::env::temp_dir().join(format!(
        "tollgate-gateway-admin-{}-{}.json",
        std::process::id(),
        uuid::Uuid::new_v4()
    ))
}

/// Replaces the file's content in one step (write a sibling, rename over), so the watcher
/// never reads half a file.
fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Removes the file when the test ends, pass or fail.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(self.0.with_extension("tmp"));
    }
}

/// Polls `check` every 20 ms until it holds or `within` passes; returns whether it held.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one sample line of a Prometheus text exposition.
fn metric(text: &str, sample: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        line.strip_prefix(sample)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(|v| v.trim().parse::<u64>().unwrap())
    })
}

async fn metrics_text(gw: &TestGateway) -> String {
    let answer = gw
        .send(gw.request(Method::GET, "/metrics", None, None))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    answer.text()
}

// ---------------------------------------------------------------------------------------------
// Admin API: organizations, subscriptions, credits

#[tokio::test]
async fn an_org_is_created_subscribed_topped_up_moved_to_another_plan_and_adjusted() {
    let gw = start_roomy().await;

    // Create: 201 {id, name}.
    let created = admin_expect(
        &gw,
        Method::POST,
        "/admin/orgs",
        Some(json!({"name": "Acme Agency"})),
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(fields(&created), set(&["id", "name"]));
    assert_eq!(created["name"], "Acme Agency");
    let org = created["id"].as_str().unwrap().to_owned();
    assert!(org.parse::<OrgId>().is_ok(), "org id {org} is a UUID");
    let org_path = format!("/admin/orgs/{org}");

    // Before subscribing: no plan, nothing to spend.
    let fresh = admin_expect(&gw, Method::GET, &org_path, None, StatusCode::OK).await;
    assert_eq!(
        fresh,
        json!({"id": org, "name": "Acme Agency", "plan": null, "status": "inactive",
               "balance": 0, "period_end": null})
    );

    // Subscribe to basic: a period of one calendar month starting now, 1,000 plan credits.
    let before = now_ms();
    let subscribed = admin_expect(
        &gw,
        Method::PUT,
        &format!("{org_path}/subscription"),
        Some(json!({"plan": "basic"})),
        StatusCode::OK,
    )
    .await;
    let after = now_ms();
    let view = admin_expect(&gw, Method::GET, &org_path, None, StatusCode::OK).await;
    assert_eq!(
        subscribed, view,
        "PUT subscription answers the org as GET shows it"
    );
    assert_eq!(
        fields(&view),
        set(&["id", "name", "plan", "status", "balance", "period_end"])
    );
    assert_eq!(view["id"], org.as_str());
    assert_eq!(view["name"], "Acme Agency");
    assert_eq!(view["plan"], "basic");
    assert_eq!(view["status"], "active");
    assert_eq!(view["balance"], 1000);
    assert_period_end(&view["period_end"], before, after);
    let first_period_end = rfc3339_ms(view["period_end"].as_str().unwrap());

    // Top-up: {balance}.
    let topped = admin_expect(
        &gw,
        Method::POST,
        &format!("{org_path}/credits"),
        Some(json!({"amount": 250})),
        StatusCode::OK,
    )
    .await;
    assert_eq!(topped, json!({"balance": 1250}));
    let view = admin_expect(&gw, Method::GET, &org_path, None, StatusCode::OK).await;
    assert_eq!(view["balance"], 1250);
    assert_eq!(
        rfc3339_ms(view["period_end"].as_str().unwrap()),
        first_period_end,
        "a top-up does not move the period"
    );

    // A customer spends 3 credits: plan credits go first.
    let key = admin_expect(
        &gw,
        Method::POST,
        &format!("{org_path}/keys"),
        Some(json!({"name": "billing check"})),
        StatusCode::CREATED,
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let account = sandbox(&gw).add_account();
    let model = admin_expect(
        &gw,
        Method::POST,
        &format!("{org_path}/models"),
        Some(json!({"name": "Creator", "session": account.session_json()})),
        StatusCode::CREATED,
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let stats = format!("/api/models/{model}/payouts/stats");
    let me = format!("/api/models/{model}/users/me");
    assert_eq!(
        customer(&gw, &key, Method::GET, &stats, None, None)
            .await
            .status,
        StatusCode::OK
    );
    let answer = customer(&gw, &key, Method::GET, &me, None, None).await;
    assert_eq!(
        answer.json()["_meta"]["_credits"],
        json!({"used": 1, "balance": 1247})
    );
    let credits = customer(&gw, &key, Method::GET, "/api/credits", None, None).await;
    assert_eq!(credits.json()["plan_credits"], 997);
    assert_eq!(credits.json()["topup_credits"], 250);

    // Plan change to pro: a new period starts now with pro's 5,000 plan credits; unused
    // plan credits are gone, the top-ups stay (SPEC §4's two pots).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let before = now_ms();
    let changed = admin_expect(
        &gw,
        Method::PUT,
        &format!("{org_path}/subscription"),
        Some(json!({"plan": "pro"})),
        StatusCode::OK,
    )
    .await;
    let after = now_ms();
    assert_eq!(changed["plan"], "pro");
    assert_eq!(changed["status"], "active");
    assert_eq!(changed["balance"], 5250, "plan credits reset, top-ups kept");
    assert_period_end(&changed["period_end"], before, after);
    assert!(rfc3339_ms(changed["period_end"].as_str().unwrap()) > first_period_end);
    let credits = customer(&gw, &key, Method::GET, "/api/credits", None, None).await;
    assert_eq!(
        credits.json(),
        json!({"plan": "pro", "balance": 5250, "plan_credits": 5000, "topup_credits": 250,
               "period_end": changed["period_end"]})
    );
    // The new plan's window is in force at once.
    let answer = customer(&gw, &key, Method::GET, &me, None, None).await;
    assert_eq!(answer.headers["ratelimit-limit"], "300");

    // Support adjustment: plan credits = balance, top-ups = 0.
    let adjusted = admin_expect(
        &gw,
        Method::PUT,
        &format!("{org_path}/credits"),
        Some(json!({"balance": 42})),
        StatusCode::OK,
    )
    .await;
    assert_eq!(adjusted, json!({"balance": 42}));
    let credits = customer(&gw, &key, Method::GET, "/api/credits", None, None).await;
    assert_eq!(credits.json()["balance"], 42);
    assert_eq!(credits.json()["plan_credits"], 42);
    assert_eq!(credits.json()["topup_credits"], 0);
    let view = admin_expect(&gw, Method::GET, &org_path, None, StatusCode::OK).await;
    assert_eq!(view["balance"], 42);
    assert_eq!(
        view["period_end"], changed["period_end"],
        "an adjustment keeps the period"
    );
    // A top-up past what a balance can hold is the caller's mistake: 400, nothing changes.
    for amount in [i64::MAX as u64, i64::MAX as u64 - 41] {
        let refused = admin_expect(
            &gw,
            Method::POST,
            &format!("{org_path}/credits"),
            Some(json!({"amount": amount})),
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(refused["code"], "INVALID_REQUEST", "{refused}");
    }
    let view = admin_expect(&gw, Method::GET, &org_path, None, StatusCode::OK).await;
    assert_eq!(view["balance"], 42);

    // Every change of balance is a ledger row, and the rows add up.
    let entries = ledger_entries(&gw, &org).await;
    let kinds: Vec<EntryKind> = entries.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EntryKind::PlanChange,
            EntryKind::TopUp,
            EntryKind::Charge,
            EntryKind::Charge,
            EntryKind::PlanChange,
            EntryKind::Charge,
            EntryKind::Adjustment,
        ]
    );
    let mut balance: i64 = 0;
    for entry in &entries {
        balance += entry.delta_plan + entry.delta_topup;
        assert_eq!(balance, entry.balance_after as i64, "{entry:?}");
    }
    assert_eq!(entries.last().unwrap().balance_after, 42);
}

#[tokio::test]
async fn keys_and_models_are_managed_through_the_admin_api_until_the_org_cancels() {
    let gw = start_roomy().await;
    // Every admin answer of this test, to search for session material at the end.
    let mut bodies: Vec<String> = Vec::new();

    let org = admin_expect(
        &gw,
        Method::POST,
        "/admin/orgs",
        Some(json!({"name": "Studio"})),
        StatusCode::CREATED,
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let sub = gw
        .admin(
            Method::PUT,
            &format!("/admin/orgs/{org}/subscription"),
            Some(json!({"plan": "basic"})),
        )
        .await;
    assert_eq!(sub.status, StatusCode::OK);
    bodies.push(sub.text());

    // Create a key: the secret is shown once.
    let before = now_ms();
    let created = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{org}/keys"),
            Some(json!({"name": "production"})),
        )
        .await;
    let after = now_ms();
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let created = created.json();
    assert_eq!(fields(&created), set(&["id", "key"]));
    let key = created["key"].as_str().unwrap().to_owned();
    let key_id = created["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sk_live_"), "{key}");
    assert_eq!(key.len(), "sk_live_".len() + 64);
    assert!(key["sk_live_".len()..]
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));

    // List keys: metadata only, never the secret.
    let listed = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/keys"), None)
        .await;
    assert_eq!(listed.status, StatusCode::OK);
    assert!(
        !listed.text().contains(&key["sk_live_".len()..]),
        "the key list shows the secret: {}",
        listed.text()
    );
    let list = listed.json();
    let list = list.as_array().expect("a JSON array");
    assert_eq!(list.len(), 1);
    let item = &list[0];
    assert_eq!(
        fields(item),
        set(&[
            "id",
            "name",
            "prefix",
            "status",
            "created_at",
            "last_used_at",
            "expires_at",
            "scopes",
            "models",
            "credit_limit",
            "credits_used_this_period"
        ])
    );
    assert_eq!(item["id"], key_id.as_str());
    // A key created with a name only: no expiry, both scopes, every model,
    // no credit limit, nothing spent yet.
    assert_eq!(item["expires_at"], Value::Null);
    assert_eq!(item["scopes"], json!(["read", "write"]));
    assert_eq!(item["models"], Value::Null);
    assert_eq!(item["credit_limit"], Value::Null);
    assert_eq!(item["credits_used_this_period"], 0);
    assert_eq!(item["name"], "production");
    assert_eq!(item["status"], "active");
    assert_eq!(item["last_used_at"], Value::Null);
    let prefix = item["prefix"].as_str().unwrap();
    assert!(prefix.starts_with("sk_live_") && key.starts_with(prefix));
    assert!(
        prefix.len() <= "sk_live_".len() + 8,
        "the prefix {prefix:?} is short"
    );
    let created_at = rfc3339_ms(item["created_at"].as_str().unwrap());
    assert!(
        before.saturating_sub(1_000) <= created_at && created_at <= after + 1_000,
        "created_at {} is not the time of creation",
        item["created_at"]
    );

    // Connect a model with a sandbox account's session.
    let account = sandbox(&gw).add_account();
    let added = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{org}/models"),
            Some(json!({"name": "Creator One", "session": account.session_json()})),
        )
        .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.text());
    bodies.push(added.text());
    let added = added.json();
    let model = added["id"].as_str().unwrap().to_owned();
    assert_eq!(added["status"], "connected");
    assert!(
        fields(&added).is_subset(&set(&["id", "name", "status"])),
        "unexpected fields in {added}"
    );

    let models = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/models"), None)
        .await;
    assert_eq!(models.status, StatusCode::OK);
    bodies.push(models.text());
    assert_eq!(
        models.json(),
        json!([{"id": model, "name": "Creator One", "status": "connected"}])
    );

    // The new key calls the new model, as the account.
    let me = format!("/api/models/{model}/users/me");
    let answer = customer(&gw, &key, Method::GET, &me, None, None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["data"]["id"].to_string(), account.user_id);
    assert_eq!(
        body["_meta"]["_credits"],
        json!({"used": 1, "balance": 999})
    );
    let sent = sandbox(&gw)
        .last_request()
        .expect("the call reached the upstream");
    assert_eq!(sent.header("cookie"), Some(account.cookie.as_str()));
    assert_eq!(sent.header("x-bc"), Some(account.x_bc.as_str()));

    // last_used_at is set once the key is used.
    let listed = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/keys"), None)
        .await
        .json();
    let last_used = listed[0]["last_used_at"]
        .as_str()
        .expect("last_used_at set after a call");
    assert!(rfc3339_ms(last_used) >= created_at);
    assert!(rfc3339_ms(last_used) <= now_ms() + 1_000);

    // Reconnect with fresh session material (the sandbox logged the account in again).
    let renewed = sandbox(&gw)
        .refresh_session(&account.user_id)
        .expect("known account");
    let reconnected = gw
        .admin(
            Method::POST,
            &format!("/admin/models/{model}/reconnect"),
            Some(json!({"session": renewed.session_json()})),
        )
        .await;
    assert_eq!(reconnected.status, StatusCode::OK, "{}", reconnected.text());
    bodies.push(reconnected.text());
    assert_eq!(reconnected.json()["id"], model.as_str());
    assert_eq!(reconnected.json()["status"], "connected");
    let answer = customer(&gw, &key, Method::GET, &me, None, None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        sandbox(&gw).last_request().unwrap().header("cookie"),
        Some(renewed.cookie.as_str())
    );

    // Cancel: the org's keys get 402 NO_SUBSCRIPTION; nothing reaches the upstream.
    let cancelled = gw
        .admin(
            Method::DELETE,
            &format!("/admin/orgs/{org}/subscription"),
            None,
        )
        .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.text());
    bodies.push(cancelled.text());
    let view = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}"), None)
        .await;
    bodies.push(view.text());
    let view = view.json();
    assert_eq!(view["plan"], Value::Null);
    assert_eq!(view["status"], "inactive");
    let upstream_before = sandbox(&gw).requests_received();
    let refused = customer(&gw, &key, Method::GET, &me, None, None).await;
    assert_error(
        &refused,
        402,
        "NO_SUBSCRIPTION",
        "The organization has no active subscription. Subscribe to a plan to use the API.",
    );
    assert_eq!(sandbox(&gw).requests_received(), upstream_before);

    // Subscribing again brings the keys back.
    let again = gw
        .admin(
            Method::PUT,
            &format!("/admin/orgs/{org}/subscription"),
            Some(json!({"plan": "free"})),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
    bodies.push(again.text());
    let answer = customer(&gw, &key, Method::GET, &me, None, None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["_meta"]["_credits"]["balance"], 99);

    // No admin answer ever carried the session material.
    for body in &bodies {
        for secret in [
            &account.cookie,
            &account.x_bc,
            &renewed.cookie,
            &renewed.x_bc,
        ] {
            assert!(
                !body.contains(secret.as_str()),
                "session material in an admin answer: {body}"
            );
        }
        let sess = renewed.cookie.split(';').next().unwrap();
        assert!(!body.contains(sess), "session cookie in {body}");
    }
}

#[tokio::test]
async fn admin_calls_without_the_right_bearer_token_are_401() {
    let gw = start_roomy().await;
    let org = demo_org(&gw);
    let unauthorized = |answer: &Answer| {
        assert_error(
            answer,
            401,
            "UNAUTHORIZED",
            "Missing or invalid admin token.",
        )
    };
    let body = Some(r#"{"name":"Intruder"}"#);
    let wrong_bearer = format!("Bearer {ADMIN_TOKEN}x");
    let short_bearer = format!("Bearer {}", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]);
    let basic = format!("Basic {ADMIN_TOKEN}");
    let bare = ADMIN_TOKEN.to_owned();
    let demo_key = format!("Bearer {}", gw.key());
    for auth in [
        None,
        Some("Bearer "),
        Some("Bearer wrong-token"),
        Some(wrong_bearer.as_str()),
        Some(short_bearer.as_str()),
        Some(basic.as_str()),
        Some(bare.as_str()),
        Some(demo_key.as_str()),
    ] {
        unauthorized(&admin_raw(&gw, Method::POST, "/admin/orgs", auth, body).await);
        unauthorized(&admin_raw(&gw, Method::GET, &format!("/admin/orgs/{org}"), auth, None).await);
        unauthorized(
            &admin_raw(
                &gw,
                Method::POST,
                &format!("/admin/orgs/{org}/credits"),
                auth,
                Some(r#"{"amount":1000000}"#),
            )
            .await,
        );
        // Unknown admin paths do not reveal themselves before the token is checked.
        unauthorized(&admin_raw(&gw, Method::GET, "/admin/nowhere", auth, None).await);
        // The right token starts this address's count of wrong ones over, so the lockout
        // (10 within a minute; tests/gateway_ops.rs) does not turn the next 401s into 429s.
        let ok = gw
            .admin(Method::GET, &format!("/admin/orgs/{org}"), None)
            .await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    }
    // The admin token is no API key.
    let answer = customer(&gw, ADMIN_TOKEN, Method::GET, "/api/credits", None, None).await;
    assert_error(
        &answer,
        401,
        "INVALID_API_KEY",
        "The API key is missing, unknown or revoked.",
    );
    // Nothing changed.
    assert_eq!(gw.balance().await, Some(1000));
}

#[tokio::test]
async fn the_admin_api_is_off_when_no_token_is_configured() {
    let mut config = roomy_config();
    config.admin_token = None;
    let gw = common::start(config).await;
    let org = demo_org(&gw);
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    for auth in [None, Some("Bearer "), Some(bearer.as_str())] {
        for (method, path, body) in [
            (
                Method::POST,
                "/admin/orgs".to_owned(),
                Some(r#"{"name":"x"}"#),
            ),
            (Method::GET, format!("/admin/orgs/{org}"), None),
            (
                Method::PUT,
                format!("/admin/orgs/{org}/credits"),
                Some(r#"{"balance":5}"#),
            ),
            (Method::GET, format!("/admin/orgs/{org}/keys"), None),
        ] {
            let answer = admin_raw(&gw, method, &path, auth, body).await;
            assert_error(&answer, 404, "NOT_FOUND", "No such route.");
        }
    }
    // The customer API is unaffected, and nothing was changed.
    let answer = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["_meta"]["_credits"]["balance"], 999);
}

#[tokio::test]
async fn unknown_and_malformed_ids_are_404_not_found() {
    let gw = start_roomy().await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let demo_model = gw.model();
    let demo_key = demo_key_id(&gw);
    let session = demo_account(&gw).session_json();
    let org_routes = |id: &str| -> Vec<(Method, String, Option<Value>)> {
        vec![
            (Method::GET, format!("/admin/orgs/{id}"), None),
            (
                Method::PUT,
                format!("/admin/orgs/{id}/subscription"),
                Some(json!({"plan": "pro"})),
            ),
            (
                Method::DELETE,
                format!("/admin/orgs/{id}/subscription"),
                None,
            ),
            (
                Method::POST,
                format!("/admin/orgs/{id}/credits"),
                Some(json!({"amount": 10})),
            ),
            (
                Method::PUT,
                format!("/admin/orgs/{id}/credits"),
                Some(json!({"balance": 10})),
            ),
            (
                Method::POST,
                format!("/admin/orgs/{id}/keys"),
                Some(json!({"name": "k"})),
            ),
            (Method::GET, format!("/admin/orgs/{id}/keys"), None),
            (
                Method::POST,
                format!("/admin/orgs/{id}/models"),
                Some(json!({"name": "m", "session": session})),
            ),
            (Method::GET, format!("/admin/orgs/{id}/models"), None),
        ]
    };
    let key_routes = |id: &str| -> Vec<(Method, String, Option<Value>)> {
        vec![
            (Method::POST, format!("/admin/keys/{id}/revoke"), None),
            (Method::POST, format!("/admin/keys/{id}/rotate"), None),
        ]
    };
    let model_routes = |id: &str| -> Vec<(Method, String, Option<Value>)> {
        vec![(
            Method::POST,
            format!("/admin/models/{id}/reconnect"),
            Some(json!({"session": session})),
        )]
    };

    let mut cases = Vec::new();
    // A well-formed id that names nothing; another kind's id; text that is no id at all.
    for id in [
        unknown.as_str(),
        demo_model.as_str(),
        "not-an-id",
        "12345",
        &unknown.to_uppercase().replace('-', ""),
    ] {
        cases.extend(org_routes(id));
    }
    for id in [unknown.as_str(), demo_model.as_str(), "not-an-id", "0"] {
        cases.extend(key_routes(id));
    }
    for id in [unknown.as_str(), demo_key.as_str(), "not-an-id", "%20"] {
        cases.extend(model_routes(id));
    }
    for (method, path, body) in cases {
        let answer = gw.admin(method.clone(), &path, body).await;
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {}",
            answer.text()
        );
        let json = answer.json();
        assert_eq!(fields(&json), set(&["error", "code"]), "{method} {path}");
        assert_eq!(json["code"], "NOT_FOUND", "{method} {path}");
    }
    // Unknown admin routes and methods.
    for (method, path) in [
        (Method::GET, "/admin"),
        (Method::GET, "/admin/"),
        (Method::GET, "/admin/orgs"),
        (Method::PATCH, "/admin/orgs"),
        (Method::GET, "/admin/keys"),
        (Method::DELETE, "/admin/orgs/{org}"),
        (Method::POST, "/admin/orgs/{org}/keys/extra"),
    ] {
        let path = path.replace("{org}", &demo_org(&gw));
        let answer = gw.admin(method.clone(), &path, None).await;
        assert_error(&answer, 404, "NOT_FOUND", "No such route.");
    }
    // Nothing happened to the demo tenant.
    assert_eq!(gw.balance().await, Some(1000));
    assert_eq!(
        gw.get(&gw.model_path("/users/me")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn invalid_admin_bodies_are_400_invalid_request_and_change_nothing() {
    let gw = start_roomy().await;
    let org = demo_org(&gw);
    let session = demo_account(&gw).session_json();

    let cases: Vec<(Method, String, String, &str)> = {
        let o = |rest: &str| format!("/admin/orgs/{org}{rest}");
        let model = format!("/admin/models/{}/reconnect", gw.model());
        let mut session_cases = Vec::new();
        for missing in ["cookie", "user_id", "x_bc", "user_agent"] {
            let mut partial = session.clone();
            partial.as_object_mut().unwrap().remove(missing);
            session_cases.push((missing, partial.clone()));
            let mut wrong = session.clone();
            wrong[missing] = json!(12345);
            session_cases.push((missing, wrong));
            let mut empty = session.clone();
            empty[missing] = json!("");
            session_cases.push((missing, empty));
        }
        let mut cases = vec![
            // Broken JSON, wrong shapes, missing fields.
            (
                Method::POST,
                "/admin/orgs".to_owned(),
                "{\"name\": ".to_owned(),
                "JSON",
            ),
            (
                Method::POST,
                "/admin/orgs".to_owned(),
                "name=Acme".to_owned(),
                "JSON",
            ),
            (
                Method::POST,
                "/admin/orgs".to_owned(),
                "{}".to_owned(),
                "name",
            ),
            (
                Method::POST,
                "/admin/orgs".to_owned(),
                "".to_owned(),
                "name",
            ),
            (
                Method::POST,
                "/admin/orgs".to_owned(),
                "[]".to_owned(),
                "name",
            ),
            (
                Method::POST,
                "/admin/orgs".to_owned(),
                r#"{"name": 7}"#.to_owned(),
                "name",
            ),
            (
                Method::POST,
                "/admin/orgs".to_owned(),
                r#"{"name": null}"#.to_owned(),
                "name",
            ),
            (
                Method::POST,
                "/admin/orgs".to_owned(),
                r#"{"name": ["a"]}"#.to_owned(),
                "name",
            ),
            (Method::PUT, o("/subscription"), "{".to_owned(), "JSON"),
            (Method::PUT, o("/subscription"), "{}".to_owned(), "plan"),
            (
                Method::PUT,
                o("/subscription"),
                r#"{"plan": "platinum"}"#.to_owned(),
                "platinum",
            ),
            (
                Method::PUT,
                o("/subscription"),
                r#"{"plan": 2}"#.to_owned(),
                "plan",
            ),
            (
                Method::POST,
                o("/credits"),
                r#"{"amount": -5}"#.to_owned(),
                "amount",
            ),
            (
                Method::POST,
                o("/credits"),
                r#"{"amount": 0}"#.to_owned(),
                "amount",
            ),
            (
                Method::POST,
                o("/credits"),
                r#"{"amount": 2.5}"#.to_owned(),
                "amount",
            ),
            (
                Method::POST,
                o("/credits"),
                r#"{"amount": "100"}"#.to_owned(),
                "amount",
            ),
            (Method::POST, o("/credits"), "{}".to_owned(), "amount"),
            (
                Method::POST,
                o("/credits"),
                r#"{"amount": 1e400}"#.to_owned(),
                "JSON",
            ),
            (
                Method::POST,
                o("/credits"),
                r#"{"amount": 99999999999999999999}"#.to_owned(),
                "amount",
            ),
            (
                Method::PUT,
                o("/credits"),
                r#"{"balance": -1}"#.to_owned(),
                "balance",
            ),
            (
                Method::PUT,
                o("/credits"),
                r#"{"balance": "10"}"#.to_owned(),
                "balance",
            ),
            (
                Method::PUT,
                o("/credits"),
                r#"{"amount": 10}"#.to_owned(),
                "balance",
            ),
            (Method::POST, o("/keys"), "{}".to_owned(), "name"),
            (
                Method::POST,
                o("/keys"),
                r#"{"name": false}"#.to_owned(),
                "name",
            ),
            (Method::POST, o("/keys"), "not json".to_owned(), "JSON"),
            (
                Method::POST,
                o("/models"),
                json!({"session": session}).to_string(),
                "name",
            ),
            (
                Method::POST,
                o("/models"),
                json!({"name": "m"}).to_string(),
                "session",
            ),
            (
                Method::POST,
                o("/models"),
                json!({"name": "m", "session": "cookie"}).to_string(),
                "session",
            ),
            (Method::POST, model.clone(), "{}".to_owned(), "session"),
            (Method::POST, model.clone(), "{".to_owned(), "JSON"),
        ];
        for (field, s) in session_cases {
            cases.push((
                Method::POST,
                o("/models"),
                json!({"name": "m", "session": s}).to_string(),
                field,
            ));
            cases.push((
                Method::POST,
                model.clone(),
                json!({"session": s}).to_string(),
                field,
            ));
        }
        cases
    };
    for (method, path, body, field) in cases {
        let answer = admin_text(&gw, method.clone(), &path, &body).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{method} {path} {body}: {}",
            answer.text()
        );
        assert_invalid(&answer, field);
    }

    // Nothing changed: same plan, balance, keys, models; the model still works.
    let view = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}"), None)
        .await
        .json();
    assert_eq!(view["plan"], "basic");
    assert_eq!(view["balance"], 1000);
    let keys = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/keys"), None)
        .await
        .json();
    assert_eq!(keys.as_array().unwrap().len(), 1);
    let models = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/models"), None)
        .await
        .json();
    assert_eq!(models.as_array().unwrap().len(), 1);
    assert_eq!(models[0]["status"], "connected");
    let answer = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let kinds: Vec<EntryKind> = ledger_entries(&gw, &org)
        .await
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, [EntryKind::PlanChange, EntryKind::Charge]);
}

// ---------------------------------------------------------------------------------------------
// Keys: revoke and rotate

#[tokio::test]
async fn a_revoked_key_is_refused_at_once_and_the_orgs_other_keys_keep_working() {
    let gw = start_roomy().await;
    let tenant = new_tenant(&gw, "Revokers", "basic").await;
    let spare = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{}/keys", tenant.org),
            Some(json!({"name": "spare"})),
        )
        .await
        .json();
    let spare_key = spare["key"].as_str().unwrap();
    let me = tenant.path("/users/me");
    assert_eq!(
        customer(&gw, &tenant.key, Method::GET, &me, None, None)
            .await
            .status,
        StatusCode::OK
    );

    let revoked = gw
        .admin(
            Method::POST,
            &format!("/admin/keys/{}/revoke", tenant.key_id),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.text());
    assert!(!revoked.text().contains(&tenant.key["sk_live_".len()..]));

    // The very next call is refused, costs nothing and reaches nothing.
    let upstream_before = sandbox(&gw).requests_received();
    for path in [me.as_str(), "/api/credits", "/api/logs"] {
        let answer = customer(&gw, &tenant.key, Method::GET, path, None, None).await;
        assert_error(
            &answer,
            401,
            "INVALID_API_KEY",
            "The API key is missing, unknown or revoked.",
        );
    }
    assert_eq!(sandbox(&gw).requests_received(), upstream_before);

    let keys = gw
        .admin(
            Method::GET,
            &format!("/admin/orgs/{}/keys", tenant.org),
            None,
        )
        .await
        .json();
    let status_of = |id: &str| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(status_of(&tenant.key_id), "revoked");
    assert_eq!(status_of(spare["id"].as_str().unwrap()), "active");

    let answer = customer(&gw, spare_key, Method::GET, &me, None, None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["_meta"]["_credits"]["balance"], 998);
}

#[tokio::test]
async fn a_rotated_key_is_replaced_by_a_new_secret_and_the_old_one_is_refused() {
    let gw = start_roomy().await;
    let tenant = new_tenant(&gw, "Rotators", "basic").await;
    let me = tenant.path("/users/me");
    assert_eq!(
        customer(&gw, &tenant.key, Method::GET, &me, None, None)
            .await
            .status,
        StatusCode::OK
    );

    let rotated = gw
        .admin(
            Method::POST,
            &format!("/admin/keys/{}/rotate", tenant.key_id),
            None,
        )
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text());
    let rotated = rotated.json();
    assert_eq!(fields(&rotated), set(&["id", "key"]));
    let new_id = rotated["id"].as_str().unwrap();
    let new_key = rotated["key"].as_str().unwrap();
    assert_ne!(new_id, tenant.key_id);
    assert_ne!(new_key, tenant.key);
    assert!(new_key.starts_with("sk_live_") && new_key.len() == tenant.key.len());

    let old = customer(&gw, &tenant.key, Method::GET, &me, None, None).await;
    assert_error(
        &old,
        401,
        "INVALID_API_KEY",
        "The API key is missing, unknown or revoked.",
    );
    let new = customer(&gw, new_key, Method::GET, &me, None, None).await;
    assert_eq!(new.status, StatusCode::OK, "{}", new.text());
    assert_eq!(new.json()["_meta"]["_credits"]["balance"], 998);

    // The list shows the old key revoked and the new one, same name, active and used.
    let keys = gw
        .admin(
            Method::GET,
            &format!("/admin/orgs/{}/keys", tenant.org),
            None,
        )
        .await;
    assert!(!keys.text().contains(&new_key["sk_live_".len()..]));
    let keys = keys.json();
    let keys = keys.as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let old_row = keys
        .iter()
        .find(|k| k["id"] == tenant.key_id.as_str())
        .unwrap();
    let new_row = keys.iter().find(|k| k["id"] == new_id).unwrap();
    assert_eq!(old_row["status"], "revoked");
    assert!(
        old_row["last_used_at"].is_string(),
        "the old key was used once"
    );
    assert_eq!(new_row["status"], "active");
    assert_eq!(new_row["name"], "main");
    assert!(new_key.starts_with(new_row["prefix"].as_str().unwrap()));
    assert!(new_row["last_used_at"].is_string());

    // Rotating the new key works the same way again.
    let again = gw
        .admin(Method::POST, &format!("/admin/keys/{new_id}/rotate"), None)
        .await
        .json();
    let newest = again["key"].as_str().unwrap();
    assert_eq!(
        customer(&gw, new_key, Method::GET, &me, None, None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        customer(&gw, newest, Method::GET, &me, None, None)
            .await
            .status,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------------------------
// GET /api/credits

#[tokio::test]
async fn credits_endpoint_reports_both_pots_through_charges_and_top_ups() {
    let gw = start_roomy().await;
    let org = demo_org(&gw);
    let key = gw.key();
    let (g, k) = (&gw, key.as_str());
    let credits = move || async move {
        let answer = customer(g, k, Method::GET, "/api/credits", None, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(answer.headers["content-type"], "application/json");
        answer.json()
    };

    let first = credits().await;
    let view = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}"), None)
        .await
        .json();
    assert_eq!(
        first,
        json!({"plan": "basic", "balance": 1000, "plan_credits": 1000, "topup_credits": 0,
               "period_end": view["period_end"]})
    );
    // Reading the credits costs nothing.
    credits().await;
    assert_eq!(gw.balance().await, Some(1000));

    // 3 plan credits and 4 top-up credits.
    let adjusted = gw
        .admin(
            Method::PUT,
            &format!("/admin/orgs/{org}/credits"),
            Some(json!({"balance": 3})),
        )
        .await;
    assert_eq!(adjusted.json(), json!({"balance": 3}));
    let topped = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{org}/credits"),
            Some(json!({"amount": 4})),
        )
        .await;
    assert_eq!(topped.json(), json!({"balance": 7}));
    let pots = |c: &Value| {
        (
            c["balance"].clone(),
            c["plan_credits"].clone(),
            c["topup_credits"].clone(),
        )
    };
    assert_eq!(pots(&credits().await), (json!(7), json!(3), json!(4)));

    let call =
        move |path: String| async move { customer(g, k, Method::GET, &path, None, None).await };
    // Two 1-credit calls come out of the plan credits.
    for expected in [6, 5] {
        let answer = call(gw.model_path("/users/me")).await;
        assert_eq!(
            answer.json()["_meta"]["_credits"],
            json!({"used": 1, "balance": expected})
        );
    }
    assert_eq!(pots(&credits().await), (json!(5), json!(1), json!(4)));
    // A 2-credit call takes the last plan credit and one top-up credit.
    let answer = call(gw.model_path("/payouts/stats")).await;
    assert_eq!(
        answer.json()["_meta"]["_credits"],
        json!({"used": 2, "balance": 3})
    );
    assert_eq!(pots(&credits().await), (json!(3), json!(0), json!(3)));
    let answer = call(gw.model_path("/payouts/stats")).await;
    assert_eq!(
        answer.json()["_meta"]["_credits"],
        json!({"used": 2, "balance": 1})
    );

    // Not enough for a 2-credit call; still enough for a 1-credit one.
    let refused = call(gw.model_path("/payouts/stats")).await;
    assert_error(
        &refused,
        402,
        "INSUFFICIENT_CREDITS",
        "Not enough credits to complete this request.",
    );
    let answer = call(gw.model_path("/users/me")).await;
    assert_eq!(
        answer.json()["_meta"]["_credits"],
        json!({"used": 1, "balance": 0})
    );
    let refused = call(gw.model_path("/users/me")).await;
    assert_eq!(refused.code(), "INSUFFICIENT_CREDITS");

    // An org at zero can still read its credits and its logs.
    assert_eq!(pots(&credits().await), (json!(0), json!(0), json!(0)));
    let logs = customer(&gw, &key, Method::GET, "/api/logs", None, None).await;
    assert_eq!(logs.status, StatusCode::OK);
    assert_eq!(gw.balance().await, Some(0));
}

#[tokio::test]
async fn an_enterprise_org_has_a_null_balance_and_never_runs_out_of_credits() {
    let gw = start_roomy().await;
    let tenant = new_tenant(&gw, "BigCo", "enterprise").await;

    let view = gw
        .admin(Method::GET, &format!("/admin/orgs/{}", tenant.org), None)
        .await
        .json();
    assert_eq!(view["plan"], "enterprise");
    assert_eq!(view["balance"], Value::Null);

    // Even with the plan credits set to zero, nothing blocks.
    let adjusted = gw
        .admin(
            Method::PUT,
            &format!("/admin/orgs/{}/credits", tenant.org),
            Some(json!({"balance": 0})),
        )
        .await;
    assert_eq!(adjusted.status, StatusCode::OK);
    assert_eq!(adjusted.json(), json!({"balance": null}));

    let credits = customer(&gw, &tenant.key, Method::GET, "/api/credits", None, None).await;
    assert_eq!(credits.status, StatusCode::OK, "{}", credits.text());
    let credits = credits.json();
    assert_eq!(
        fields(&credits),
        set(&[
            "plan",
            "balance",
            "plan_credits",
            "topup_credits",
            "period_end"
        ])
    );
    assert_eq!(credits["plan"], "enterprise");
    assert_eq!(credits["balance"], Value::Null);
    assert_eq!(credits["period_end"], view["period_end"]);

    for i in 0..30 {
        let path = if i % 2 == 0 {
            tenant.path("/payouts/stats")
        } else {
            tenant.path("/users/me")
        };
        let answer = customer(&gw, &tenant.key, Method::GET, &path, None, None).await;
        assert_eq!(answer.status, StatusCode::OK, "call {i}: {}", answer.text());
        let cost = if i % 2 == 0 { 2 } else { 1 };
        assert_eq!(
            answer.json()["_meta"]["_credits"],
            json!({"used": cost, "balance": null}),
            "call {i}"
        );
    }
    let view = gw
        .admin(Method::GET, &format!("/admin/orgs/{}", tenant.org), None)
        .await
        .json();
    assert_eq!(view["balance"], Value::Null);
    let topped = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{}/credits", tenant.org),
            Some(json!({"amount": 10})),
        )
        .await;
    assert_eq!(topped.json(), json!({"balance": null}));
}

// ---------------------------------------------------------------------------------------------
// Log export

#[tokio::test]
async fn exported_log_rows_carry_the_spec_fields_with_the_right_values() {
    let gw = start_roomy().await;
    let key = gw.key();
    let org = demo_org(&gw);
    let key_id = demo_key_id(&gw);
    let model = gw.model();
    let account = demo_account(&gw);
    let unknown_model = uuid::Uuid::new_v4().to_string();

    let started = now_ms();
    let (g, k) = (&gw, key.as_str());
    let send = move |method: Method, path: String, id: &'static str, body: Option<&'static str>| async move {
        customer(g, k, method, &path, Some(id), body).await
    };
    assert_eq!(
        send(Method::GET, gw.model_path("/users/me"), "log-ok-me", None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(
            Method::GET,
            gw.model_path("/payouts/stats"),
            "log-ok-stats",
            None
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(
        send(
            Method::POST,
            gw.model_path("/chats/42/messages"),
            "log-ok-post",
            Some(r#"{"text":"hello"}"#)
        )
        .await
        .status,
        StatusCode::OK
    );
    sandbox(&gw).inject(Fault::fail(StatusCode::INTERNAL_SERVER_ERROR));
    let failed = send(
        Method::GET,
        gw.model_path("/chats"),
        "log-upstream-500",
        None,
    )
    .await;
    assert_eq!(failed.code(), "UPSTREAM_ERROR");
    let foreign = send(
        Method::GET,
        format!("/api/models/{unknown_model}/users/me"),
        "log-foreign-model",
        None,
    )
    .await;
    assert_eq!(foreign.code(), "INVALID_API_KEY");
    // Unauthenticated: logged, but no org's export shows it.
    let stranger = format!("sk_live_{}", "0".repeat(64));
    let anonymous = customer(
        &gw,
        &stranger,
        Method::GET,
        &gw.model_path("/users/me"),
        Some("log-no-key"),
        None,
    )
    .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let finished = now_ms();
    assert_eq!(gw.balance().await, Some(1000 - 1 - 2 - 2));

    flush_logs(&gw).await;
    let first = customer(
        &gw,
        &key,
        Method::GET,
        "/api/logs",
        Some("log-export-1"),
        None,
    )
    .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert_eq!(first.headers["x-request-id"], "log-export-1");
    let rows = ndjson(&first);
    assert_eq!(
        request_ids(&rows),
        [
            "log-ok-me",
            "log-ok-stats",
            "log-ok-post",
            "log-upstream-500",
            "log-foreign-model"
        ],
        "the org's rows, oldest first"
    );
    for r in &rows {
        let names: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        let mut expected = LOG_FIELDS.to_vec();
        expected.sort_unstable();
        let mut names_sorted = names.clone();
        names_sorted.sort_unstable();
        assert_eq!(names_sorted, expected, "{r}");
        let time = rfc3339_ms(r["time"].as_str().unwrap());
        assert!(started <= time && time <= finished, "{r}");
        assert_eq!(r["org_id"], org.as_str(), "{r}");
        assert_eq!(r["key_id"], key_id.as_str(), "{r}");
        assert!(r["latency_ms"].is_u64(), "{r}");
    }
    let expect = |id: &str,
                  method: &str,
                  route: &str,
                  model: &str,
                  status: u16,
                  code: Value,
                  credits: u64| {
        let r = row(&rows, id);
        assert_eq!(r["method"], method, "{r}");
        assert_eq!(r["route"], route, "{r}");
        assert_eq!(r["model_id"], model, "{r}");
        assert_eq!(r["status"], status, "{r}");
        assert_eq!(r["code"], code, "{r}");
        assert_eq!(r["credits"], credits, "{r}");
    };
    expect(
        "log-ok-me",
        "GET",
        "/api/models/:id/users/me",
        &model,
        200,
        Value::Null,
        1,
    );
    expect(
        "log-ok-stats",
        "GET",
        "/api/models/:id/payouts/stats",
        &model,
        200,
        Value::Null,
        2,
    );
    expect(
        "log-ok-post",
        "POST",
        "/api/models/:id/chats/:user_id/messages",
        &model,
        200,
        Value::Null,
        2,
    );
    expect(
        "log-upstream-500",
        "GET",
        "/api/models/:id/chats",
        &model,
        502,
        json!("UPSTREAM_ERROR"),
        0,
    );
    expect(
        "log-foreign-model",
        "GET",
        "/api/models/:id/users/me",
        &unknown_model,
        401,
        json!("INVALID_API_KEY"),
        0,
    );
    let charged: u64 = rows.iter().map(|r| r["credits"].as_u64().unwrap()).sum();
    assert_eq!(
        1000 - charged,
        gw.balance().await.unwrap(),
        "the logs add up to the charges"
    );

    // CSV: the header, then the same rows in the same order (the first export is now a row
    // too: restrict both to the model).
    let nd = ndjson(&export(&gw, &key, &format!("model={model}")).await);
    let csv = export(&gw, &key, &format!("model={model}&format=csv")).await;
    assert_eq!(csv.headers["content-type"], "text/csv; charset=utf-8");
    let text = csv.text();
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert_eq!(lines[0], CSV_HEADER);
    assert_eq!(lines.last(), Some(&""), "CSV rows end with CRLF");
    let csv_rows = &lines[1..lines.len() - 1];
    assert_eq!(csv_rows.len(), nd.len());
    for (line, r) in csv_rows.iter().zip(&nd) {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), 11, "{line}");
        assert_eq!(cells[0], r["time"].as_str().unwrap());
        assert_eq!(cells[1], r["request_id"].as_str().unwrap());
        assert_eq!(cells[2], org);
        assert_eq!(cells[3], key_id);
        assert_eq!(cells[4], model);
        assert_eq!(cells[5], r["method"].as_str().unwrap());
        assert_eq!(cells[6], r["route"].as_str().unwrap());
        assert_eq!(cells[7], r["status"].to_string());
        assert_eq!(cells[8], r["code"].as_str().unwrap_or(""));
        assert_eq!(cells[9], r["credits"].to_string());
        assert_eq!(cells[10], r["latency_ms"].to_string());
    }

    // The export itself was logged (0 credits, no model), and the unauthenticated call is
    // nowhere in the org's export.
    flush_logs(&gw).await;
    let all = ndjson(&export(&gw, &key, "").await);
    let own = row(&all, "log-export-1");
    assert_eq!(own["route"], "/api/logs");
    assert_eq!(own["status"], 200);
    assert_eq!(own["credits"], 0);
    assert_eq!(own["model_id"], Value::Null);
    assert!(!request_ids(&all).contains(&"log-no-key".to_owned()));

    // Never the key or the session, in either format.
    let csv_all = export(&gw, &key, "format=csv").await.text();
    let nd_all = export(&gw, &key, "").await.text();
    for text in [&csv_all, &nd_all] {
        assert!(!text.contains(&key["sk_live_".len()..]));
        assert!(!text.contains(&account.cookie));
        assert!(!text.contains(account.cookie.split(';').next().unwrap()));
        assert!(!text.contains(&account.x_bc));
    }
}

#[tokio::test]
async fn log_export_filters_by_model_status_and_time() {
    let gw = start_roomy().await;
    let key = gw.key();
    let org = demo_org(&gw);
    let model_a = gw.model();
    let account_b = sandbox(&gw).add_account();
    let model_b = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{org}/models"),
            Some(json!({"name": "Second", "session": account_b.session_json()})),
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (g, k) = (&gw, key.as_str());
    let call = move |model: &str, id: &'static str| {
        let path = format!("/api/models/{model}/users/me");
        async move { customer(g, k, Method::GET, &path, Some(id), None).await }
    };

    // First batch.
    assert_eq!(call(&model_a, "a1").await.status, StatusCode::OK);
    sandbox(&gw).inject(Fault::fail(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(call(&model_a, "a2").await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(call(&model_b, "b1").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let boundary = now_ms();
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Second batch.
    assert_eq!(call(&model_a, "a3").await.status, StatusCode::OK);
    assert_eq!(call(&model_b, "b2").await.status, StatusCode::OK);
    sandbox(&gw).inject(Fault::fail(StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(call(&model_b, "b3").await.status, StatusCode::BAD_GATEWAY);
    flush_logs(&gw).await;

    let ids = move |query: String| async move { request_ids(&ndjson(&export(g, k, &query).await)) };
    assert_eq!(ids(format!("model={model_a}")).await, ["a1", "a2", "a3"]);
    assert_eq!(ids(format!("model={model_b}")).await, ["b1", "b2", "b3"]);
    assert_eq!(
        ids(format!("model={model_a}&status=200")).await,
        ["a1", "a3"]
    );
    assert_eq!(ids("status=502".to_owned()).await, ["a2", "b3"]);
    assert_eq!(ids("status=404".to_owned()).await, Vec::<String>::new());

    // Time bounds: from is inclusive, to exclusive, RFC 3339 in any offset.
    let at = rfc3339(boundary);
    assert_eq!(ids(format!("to={at}")).await, ["a1", "a2", "b1"]);
    assert_eq!(
        ids(format!("from={at}&model={model_b}")).await,
        ["b2", "b3"]
    );
    let plus_two: DateTime<FixedOffset> =
        utc(boundary).with_timezone(&FixedOffset::east_opt(2 * 3600).unwrap());
    let encoded = plus_two
        .to_rfc3339_opts(SecondsFormat::Millis, false)
        .replace('+', "%2B")
        .replace(':', "%3A");
    assert!(encoded.contains("%2B02%3A00"), "{encoded}");
    assert_eq!(ids(format!("to={encoded}")).await, ["a1", "a2", "b1"]);
    assert_eq!(
        ids(format!("from={encoded}&model={model_a}&status=200")).await,
        ["a3"]
    );
    // A window that holds nothing, and one in the future.
    assert_eq!(
        ids(format!("from={at}&to={at}")).await,
        Vec::<String>::new()
    );
    let later = rfc3339(now_ms() + 3_600_000);
    assert_eq!(ids(format!("from={later}")).await, Vec::<String>::new());
    // CSV honours the filters too.
    let csv = export(&gw, &key, &format!("format=csv&model={model_b}&status=200")).await;
    let text = csv.text();
    let lines: Vec<&str> = text.trim_end().split("\r\n").collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[1].contains(",b1,") && lines[2].contains(",b2,"),
        "{text}"
    );
}

#[tokio::test]
async fn log_export_pages_return_every_row_exactly_once() {
    let gw = start_roomy().await;
    let key = gw.key();
    let model = gw.model();
    let me = gw.model_path("/users/me");
    let mut sent = Vec::new();
    for i in 0..7 {
        let id = format!("page-{i}");
        if i == 3 {
            sandbox(&gw).inject(Fault::fail(StatusCode::BAD_GATEWAY));
        }
        customer(&gw, &key, Method::GET, &me, Some(&id), None).await;
        sent.push(id);
    }
    flush_logs(&gw).await;

    let whole = request_ids(&ndjson(&export(&gw, &key, &format!("model={model}")).await));
    assert_eq!(whole, sent);

    // Pages of 3, with rows arriving between pages: each row exactly once, in order.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut query = format!("model={model}&limit=3");
        if let Some(c) = &cursor {
            query.push_str(&format!("&cursor={c}"));
        }
        let answer = export(&gw, &key, &query).await;
        let rows = ndjson(&answer);
        assert!(rows.len() <= 3, "a page holds at most `limit` rows");
        paged.extend(request_ids(&rows));
        pages += 1;
        assert!(pages <= 10, "paging does not end");
        if pages == 1 {
            for i in 7..9 {
                let id = format!("page-{i}");
                customer(&gw, &key, Method::GET, &me, Some(&id), None).await;
                sent.push(id);
            }
            flush_logs(&gw).await;
        }
        match answer.headers.get("x-next-cursor") {
            Some(next) => {
                assert_eq!(rows.len(), 3, "only full pages point further");
                cursor = Some(next.to_str().unwrap().to_owned());
            }
            None => break,
        }
    }
    assert_eq!(paged, sent);
    assert!(pages >= 3);

    // The same paging in CSV: every page starts with the header.
    let mut csv_ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query = format!("model={model}&limit=4&format=csv");
        if let Some(c) = &cursor {
            query.push_str(&format!("&cursor={c}"));
        }
        let answer = export(&gw, &key, &query).await;
        let text = answer.text();
        let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
        assert_eq!(lines.next(), Some(CSV_HEADER));
        csv_ids.extend(lines.map(|l| l.split(',').nth(1).unwrap().to_owned()));
        match answer.headers.get("x-next-cursor") {
            Some(next) => cursor = Some(next.to_str().unwrap().to_owned()),
            None => break,
        }
        assert!(csv_ids.len() <= 20, "paging does not end");
    }
    assert_eq!(csv_ids, sent);
}

#[tokio::test]
async fn each_org_exports_only_its_own_rows() {
    let gw = start_roomy().await;
    let key_a = gw.key();
    let model_a = gw.model();
    let b = new_tenant(&gw, "Other Org", "basic").await;

    for i in 0..3 {
        let id = format!("org-a-{i}");
        customer(
            &gw,
            &key_a,
            Method::GET,
            &gw.model_path("/users/me"),
            Some(&id),
            None,
        )
        .await;
    }
    for i in 0..2 {
        let id = format!("org-b-{i}");
        let answer = customer(&gw, &b.key, Method::GET, &b.path("/chats"), Some(&id), None).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    // B probing A's model: refused, and logged as B's own attempt.
    let probe = customer(
        &gw,
        &b.key,
        Method::GET,
        &format!("/api/models/{model_a}/users/me"),
        Some("org-b-probe"),
        None,
    )
    .await;
    assert_eq!(probe.code(), "INVALID_API_KEY");
    flush_logs(&gw).await;

    let rows_b = ndjson(&export(&gw, &b.key, "").await);
    assert_eq!(request_ids(&rows_b), ["org-b-0", "org-b-1", "org-b-probe"]);
    for r in &rows_b {
        assert_eq!(r["org_id"], b.org.as_str(), "{r}");
        assert_eq!(r["key_id"], b.key_id.as_str(), "{r}");
    }
    // Filtering by another org's model shows nothing of it.
    let probe_rows = ndjson(&export(&gw, &b.key, &format!("model={model_a}")).await);
    assert_eq!(request_ids(&probe_rows), ["org-b-probe"]);

    let rows_a = ndjson(&export(&gw, &key_a, "").await);
    let ids_a = request_ids(&rows_a);
    assert_eq!(ids_a, ["org-a-0", "org-a-1", "org-a-2"]);
    assert!(rows_a.iter().all(|r| r["org_id"] == demo_org(&gw).as_str()));
    let text_a = export(&gw, &key_a, "format=csv").await.text();
    assert!(!text_a.contains(&b.org) && !text_a.contains(&b.model) && !text_a.contains("org-b"));
    assert!(!text_a.contains(&b.account.cookie));
}

// ---------------------------------------------------------------------------------------------
// Signing rules rotated while running

#[tokio::test]
async fn rules_rotated_mid_run_are_picked_up_from_the_file_without_a_restart() {
    let path = temp_rules_path();
    let _cleanup = RemoveOnDrop(path.clone());
    replace_file(&path, SANDBOX_RULES_JSON);
    let mut config = roomy_config();
    config.sign_rules = Some(path.clone());
    let gw = common::start(config).await;
    let me = gw.model_path("/users/me");

    let answer = gw.get(&me).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["_meta"]["_credits"]["balance"], 999);

    // The upstream rotates: every request now fails to sign, and costs nothing.
    let rotated = DynamicRules::from_json(FORMAT_STYLE_RULES).expect("fixture rules");
    sandbox(&gw).rotate_rules(rotated);
    let stale = gw.get(&me).await;
    assert_error(
        &stale,
        502,
        "SIGNING_FAILED",
        "The upstream rejected the request signature. Retry in a few seconds.",
    );
    assert_eq!(gw.balance().await, Some(999));

    // The operator drops the new rules into the file: requests succeed again, no restart.
    replace_file(&path, FORMAT_STYLE_RULES);
    let written = Instant::now();
    let recovered_after = loop {
        let answer = gw.get(&me).await;
        if answer.status == StatusCode::OK {
            break written.elapsed();
        }
        assert_eq!(answer.code(), "SIGNING_FAILED", "{}", answer.text());
        assert!(
            written.elapsed() < Duration::from_secs(3),
            "the new rules were not picked up within 3 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(recovered_after < Duration::from_secs(3));
    let sent = sandbox(&gw).last_request().unwrap();
    assert_eq!(
        sent.header("app-token"),
        Some("33d57ade8c02dbc5a333db99ff9ae26a"),
        "signed with the file's rules"
    );
    assert!(sent.header("sign").unwrap().starts_with("6820:"));
    assert_eq!(
        gw.balance().await,
        Some(998),
        "only the successes were charged"
    );

    // An invalid file is ignored: the last good rules stay.
    replace_file(&path, "{\"static_param\": \"abc\", \"format\": ");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for _ in 0..3 {
        let answer = gw.get(&me).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    replace_file(&path, "");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(gw.get(&me).await.status, StatusCode::OK);

    // And the watcher still follows the file after the bad versions.
    let third = DynamicRules::from_json(PREFIX_STYLE_RULES).expect("fixture rules");
    sandbox(&gw).rotate_rules(third);
    replace_file(&path, PREFIX_STYLE_RULES);
    let written = Instant::now();
    loop {
        let answer = gw.get(&me).await;
        if answer.status == StatusCode::OK {
            break;
        }
        assert_eq!(answer.code(), "SIGNING_FAILED");
        assert!(
            written.elapsed() < Duration::from_secs(3),
            "third rules not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sandbox(&gw)
        .last_request()
        .unwrap()
        .header("sign")
        .unwrap()
        .starts_with("6437:"));
}

// ---------------------------------------------------------------------------------------------
// A client that goes away mid-request

/// A gateway whose log sink the test can read whole (rows of every org, and of none).
async fn start_with_visible_logs() -> (TestGateway, Arc<MemoryLogSink>) {
    let clock = SystemClock::shared();
    let mut backends = memory_backends(clock);
    let sink = Arc::new(MemoryLogSink::new(SystemClock));
    backends.logs = sink.clone();
    let running = gateway::start_with(roomy_config(), backends)
        .await
        .expect("gateway starts");
    (TestGateway::new(running), sink)
}

/// Sends a GET for `path` on a raw connection and returns the connection unread: dropping it
/// hangs up.
async fn send_raw(gw: &TestGateway, path: &str, key: &str, request_id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(gw.gw.local_addr()).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {}\r\nx-api-key: {key}\r\nx-request-id: {request_id}\r\n\r\n",
        gw.gw.local_addr()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

#[tokio::test]
async fn a_client_gone_mid_request_is_not_charged_and_is_logged_499() {
    let (gw, sink) = start_with_visible_logs().await;
    let org = demo_org(&gw);
    let account = demo_account(&gw);
    sandbox(&gw).inject(Fault::stall(Duration::from_secs(2)).for_account(&account.user_id));
    let state = gw.gw.state().clone();

    let connection = send_raw(
        &gw,
        &gw.model_path("/payouts/stats"),
        &gw.key(),
        "gone-client",
    )
    .await;
    // The request reaches the upstream (its credits held) and waits there; then the client
    // hangs up.
    let sandbox_handle = sandbox(&gw).clone();
    assert!(
        eventually(Duration::from_secs(2), || {
            sandbox_handle.requests_to("/api2/v2/payouts/stats") == 1
        })
        .await,
        "the request reaches the upstream"
    );
    let reached_upstream = Instant::now();
    assert_eq!(
        state.ledger.open_holds(),
        1,
        "the request holds its credits"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(connection);

    // The hold is released soon after the client goes.
    assert!(
        eventually(Duration::from_millis(1_000), || state.ledger.open_holds()
            == 0)
        .await,
        "the hold stays open after the client left"
    );
    // Still nothing charged once the upstream would have answered.
    let upstream_done = Duration::from_millis(2_300);
    if let Some(rest) = upstream_done.checked_sub(reached_upstream.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    assert_eq!(state.ledger.open_holds(), 0);
    assert_eq!(gw.balance().await, Some(1000));
    let entries = ledger_entries(&gw, &org).await;
    assert!(
        entries.iter().all(|e| e.kind != EntryKind::Charge),
        "charged for an abandoned request: {entries:?}"
    );

    // The row: 499, the route and model, nothing charged.
    flush_logs(&gw).await;
    let rows: Vec<LogRecord> = sink
        .all()
        .into_iter()
        .filter(|r| r.request_id == "gone-client")
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(r.status, 499);
    assert_eq!(r.route.as_deref(), Some("/api/models/:id/payouts/stats"));
    assert_eq!(r.model_id.map(|m| m.to_string()), Some(gw.model()));
    assert_eq!(r.method, "GET");
    assert_eq!(r.credits, 0);
    assert_eq!(r.code, None::<ErrorCode>);

    // The gateway keeps serving, and charges normally.
    let answer = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["_meta"]["_credits"]["balance"], 999);
}

#[tokio::test]
async fn a_client_gone_mid_request_shows_up_in_its_orgs_log_export() {
    let gw = start_roomy().await;
    let account = demo_account(&gw);
    sandbox(&gw).inject(Fault::stall(Duration::from_millis(1_500)).for_account(&account.user_id));
    let state = gw.gw.state().clone();
    let connection = send_raw(
        &gw,
        &gw.model_path("/users/me"),
        &gw.key(),
        "gone-client-export",
    )
    .await;
    assert!(eventually(Duration::from_secs(1), || state.ledger.open_holds() == 1).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(connection);
    assert!(
        eventually(Duration::from_millis(1_000), || state.ledger.open_holds()
            == 0)
        .await
    );
    flush_logs(&gw).await;
    let rows = ndjson(&export(&gw, &gw.key(), "").await);
    let r = row(&rows, "gone-client-export");
    assert_eq!(r["status"], 499);
    assert_eq!(r["org_id"], demo_org(&gw).as_str());
    assert_eq!(r["key_id"], demo_key_id(&gw).as_str());
    assert_eq!(r["credits"], 0);
}

// ---------------------------------------------------------------------------------------------
// Health, readiness, metrics

#[tokio::test]
async fn health_readiness_and_metrics_reflect_the_traffic() {
    let gw = start_roomy().await;
    let key = gw.key();

    let health = gw
        .send(gw.request(Method::GET, "/healthz", None, None))
        .await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json(), json!({"status": "ok"}));
    assert!(health.headers.contains_key("x-request-id"));
    let ready = gw
        .send(gw.request(Method::GET, "/readyz", None, None))
        .await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert_eq!(ready.json()["status"], "ready");

    // Nothing counted yet.
    let text = metrics_text(&gw).await;
    assert!(!text.contains("tollgate_requests_total{"), "{text}");
    assert_eq!(
        metric(&text, "tollgate_request_duration_seconds_count"),
        Some(0)
    );
    assert_eq!(metric(&text, "tollgate_open_credit_holds"), Some(0));

    for _ in 0..3 {
        assert_eq!(
            gw.get(&gw.model_path("/users/me")).await.status,
            StatusCode::OK
        );
    }
    for _ in 0..2 {
        let answer = customer(
            &gw,
            "sk_live_nope",
            Method::GET,
            &gw.model_path("/chats"),
            None,
            None,
        )
        .await;
        assert_eq!(answer.code(), "INVALID_API_KEY");
    }
    assert_eq!(gw.get("/api/nowhere").await.code(), "NOT_FOUND");
    sandbox(&gw).inject(Fault::fail(StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(
        gw.get(&gw.model_path("/payouts/stats")).await.code(),
        "UPSTREAM_ERROR"
    );
    assert_eq!(gw.get("/api/credits").await.status, StatusCode::OK);
    // Health and metrics requests are not API traffic.
    gw.send(gw.request(Method::GET, "/healthz", None, None))
        .await;

    let text = metrics_text(&gw).await;
    let requests = |route: &str, code: &str| {
        metric(
            &text,
            &format!("tollgate_requests_total{{route=\"{route}\",code=\"{code}\"}}"),
        )
    };
    assert_eq!(requests("/api/models/:id/users/me", "OK"), Some(3));
    assert_eq!(
        requests("/api/models/:id/chats", "INVALID_API_KEY"),
        Some(2)
    );
    assert_eq!(requests("unmatched", "NOT_FOUND"), Some(1));
    assert_eq!(
        requests("/api/models/:id/payouts/stats", "UPSTREAM_ERROR"),
        Some(1)
    );
    assert_eq!(requests("/api/credits", "OK"), Some(1));
    let total: u64 = text
        .lines()
        .filter(|l| l.starts_with("tollgate_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 8, "{text}");
    assert!(text.contains("# TYPE tollgate_requests_total counter"));

    // The latency histogram: cumulative buckets ending in +Inf = count.
    assert!(text.contains("# TYPE tollgate_request_duration_seconds histogram"));
    let buckets: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("tollgate_request_duration_seconds_bucket{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.len() >= 2);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(
        metric(
            &text,
            "tollgate_request_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        Some(8)
    );
    assert_eq!(
        metric(&text, "tollgate_request_duration_seconds_count"),
        Some(8)
    );
    assert!(text.contains("tollgate_request_duration_seconds_sum "));
    assert_eq!(metric(&text, "tollgate_open_credit_holds"), Some(0));
    assert!(text.contains("# TYPE tollgate_open_credit_holds gauge"));
    assert!(text.contains("tollgate_log_rows_dropped_total 0"));

    // A request in flight holds credits; the gauge shows it, then drops back.
    let account = demo_account(&gw);
    sandbox(&gw).inject(Fault::stall(Duration::from_millis(1_500)).for_account(&account.user_id));
    let client = gw.client.clone();
    let req = gw.request(Method::GET, &gw.model_path("/users/me"), Some(&key), None);
    let in_flight = tokio::spawn(async move { client.request(req).await.map(|r| r.status()) });
    let state = gw.gw.state().clone();
    assert!(eventually(Duration::from_secs(1), || state.ledger.open_holds() == 1).await);
    assert_eq!(
        metric(&metrics_text(&gw).await, "tollgate_open_credit_holds"),
        Some(1)
    );
    assert_eq!(in_flight.await.unwrap().unwrap(), StatusCode::OK);
    let text = metrics_text(&gw).await;
    assert_eq!(metric(&text, "tollgate_open_credit_holds"), Some(0));
    assert_eq!(
        metric(
            &text,
            "tollgate_requests_total{route=\"/api/models/:id/users/me\",code=\"OK\"}"
        ),
        Some(4)
    );
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown

#[tokio::test]
async fn graceful_shutdown_finishes_the_request_in_flight_and_flushes_its_log_row() {
    let gw = start_roomy().await;
    let org: OrgId = demo_org(&gw).parse().unwrap();
    let addr = gw.gw.local_addr();
    let account = demo_account(&gw);
    sandbox(&gw).inject(Fault::stall(Duration::from_millis(500)).for_account(&account.user_id));
    let state = Arc::clone(gw.gw.state());

    let client = gw.client.clone();
    let mut req = gw.request(
        Method::GET,
        &gw.model_path("/payouts/stats"),
        Some(&gw.key()),
        None,
    );
    req.headers_mut()
        .insert("x-request-id", "in-flight-at-shutdown".parse().unwrap());
    let in_flight = tokio::spawn(async move {
        let res = client.request(req).await.expect("answered");
        let status = res.status();
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .expect("whole body")
            .to_bytes();
        (status, body)
    });
    // Shut down as soon as the request waits on the upstream, credits held.
    let sandbox_handle = sandbox(&gw).clone();
    assert!(
        eventually(Duration::from_secs(2), || {
            sandbox_handle.requests_to("/api2/v2/payouts/stats") == 1
        })
        .await,
        "the request reaches the upstream"
    );
    assert_eq!(state.ledger.open_holds(), 1, "the request is in flight");

    let TestGateway {
        gw: running,
        client,
    } = gw;
    drop(client);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), running.shutdown())
        .await
        .expect("shutdown finishes");
    let shut = Instant::now();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert!(shut.duration_since(started) < Duration::from_secs(5));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body["_meta"]["_credits"],
        json!({"used": 2, "balance": 998})
    );

    // Charged exactly once, hold settled.
    assert_eq!(state.ledger.open_holds(), 0);
    let account_after = state.ledger.account(org).await.unwrap().unwrap();
    assert_eq!(account_after.balance(), Some(998));
    let charges: Vec<_> = state
        .ledger
        .entries(org)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EntryKind::Charge)
        .collect();
    assert_eq!(charges.len(), 1, "{charges:?}");
    assert_eq!(
        charges[0].request_id.as_deref(),
        Some("in-flight-at-shutdown")
    );

    // Its log row was flushed before shutdown returned.
    let page = state.logs.query(LogQuery::new(org)).await.unwrap();
    let rows: Vec<&LogRecord> = page
        .records
        .iter()
        .filter(|r| r.request_id == "in-flight-at-shutdown")
        .collect();
    assert_eq!(rows.len(), 1, "{:?}", page.records);
    assert_eq!(rows[0].status, 200);
    assert_eq!(rows[0].credits, 2);
    assert!(
        rows[0].latency_ms >= 400,
        "the row covers the stall: {:?}",
        rows[0]
    );

    // New connections are refused.
    let refused = TcpStream::connect(addr).await;
    assert!(refused.is_err(), "the gateway still accepts connections");
    let seen: HashSet<u16> = page.records.iter().map(|r| r.status).collect();
    assert!(
        !seen.contains(&499),
        "the in-flight request was not cut: {seen:?}"
    );
}
