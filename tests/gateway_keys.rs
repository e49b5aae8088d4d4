//! Key lifecycle end to end (docs/contract.md §13) on the in-process gateway (memory
//! backends, sandbox upstream): expiry, scopes, model lists, per-key credit limits and
//! rotation with a grace period, through the admin API and the customer API. The same on two
//! PostgreSQL replicas: `tests/replicas.rs`.

mod common;

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};

use common::{start, test_config, Answer, TestGateway};
use tollgate::core::time::rfc3339_from_ms;
use tollgate::core::{Clock as _, SystemClock};
use tollgate::sandbox::Sandbox;

/// The test gateway with a burst large enough that only the key's own rules refuse (the
/// demo plan's burst would answer 429 to the polling loops here).
fn roomy() -> tollgate::gateway::Config {
    let mut config = test_config();
    config.burst = [5, 1_000, 30, 200];
    config
}

fn now_ms() -> u64 {
    SystemClock.now_ms()
}

fn sandbox(gw: &TestGateway) -> &Sandbox {
    gw.gw.sandbox().expect("in-process sandbox")
}

fn demo_org(gw: &TestGateway) -> String {
    gw.gw.demo().expect("demo mode").org.to_string()
}

/// `POST /admin/orgs/:org/keys` with `body`.
async fn create_key(gw: &TestGateway, org: &str, body: Value) -> Answer {
    gw.admin(Method::POST, &format!("/admin/orgs/{org}/keys"), Some(body))
        .await
}

/// A key created with `body`: (id, secret).
async fn key_with(gw: &TestGateway, body: Value) -> (String, String) {
    let answer = create_key(gw, &demo_org(gw), body).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text());
    let json = answer.json();
    (
        json["id"].as_str().unwrap().to_owned(),
        json["key"].as_str().unwrap().to_owned(),
    )
}

async fn call(
    gw: &TestGateway,
    method: Method,
    path: &str,
    key: &str,
    body: Option<&str>,
) -> Answer {
    gw.send(gw.request(method, path, Some(key), body)).await
}

/// The demo org's keys as the admin API lists them, by id.
async fn listed(gw: &TestGateway, id: &str) -> Value {
    let answer = gw
        .admin(
            Method::GET,
            &format!("/admin/orgs/{}/keys", demo_org(gw)),
            None,
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    answer
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("key {id} is listed"))
}

fn assert_error(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    assert_eq!(answer.code(), code, "{}", answer.text());
}

/// A second model of the demo org, on a new sandbox account.
async fn second_model(gw: &TestGateway) -> String {
    let account = sandbox(gw).add_account();
    let answer = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{}/models", demo_org(gw)),
            Some(json!({"name": "second", "session": account.session_json()})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text());
    answer.json()["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_read_key_cannot_write_and_its_refusal_costs_nothing_and_reaches_no_upstream() {
    let gw = start(roomy()).await;
    let (id, read) = key_with(&gw, json!({"name": "reporting", "scopes": ["read"]})).await;
    let before = gw.balance().await.unwrap();

    let ok = call(&gw, Method::GET, &gw.model_path("/users/me"), &read, None).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let upstream = sandbox(&gw).requests_received();
    let post = call(
        &gw,
        Method::POST,
        &gw.model_path("/chats/42/messages"),
        &read,
        Some(r#"{"text":"hi"}"#),
    )
    .await;
    assert_error(&post, StatusCode::FORBIDDEN, "KEY_FORBIDDEN");
    assert_eq!(post.headers["ratelimit-remaining"], "0");
    let delete = call(
        &gw,
        Method::DELETE,
        &gw.model_path("/messages/7"),
        &read,
        None,
    )
    .await;
    assert_error(&delete, StatusCode::FORBIDDEN, "KEY_FORBIDDEN");
    assert_eq!(
        sandbox(&gw).requests_received(),
        upstream,
        "nothing reached the upstream"
    );
    assert_eq!(
        gw.balance().await.unwrap(),
        before - 1,
        "only the GET was charged"
    );

    // A write-only key is the mirror image; the demo key (both scopes) still does both.
    let (_, write) = key_with(&gw, json!({"name": "sender", "scopes": ["write"]})).await;
    let get = call(&gw, Method::GET, &gw.model_path("/users/me"), &write, None).await;
    assert_error(&get, StatusCode::FORBIDDEN, "KEY_FORBIDDEN");
    let sent = call(
        &gw,
        Method::POST,
        &gw.model_path("/chats/42/messages"),
        &write,
        Some(r#"{"text":"hi"}"#),
    )
    .await;
    assert_eq!(sent.status, StatusCode::OK, "{}", sent.text());
    // The free routes are GETs too: a write-only key may not read the org's credits or logs.
    let credits = call(&gw, Method::GET, "/api/credits", &write, None).await;
    assert_error(&credits, StatusCode::FORBIDDEN, "KEY_FORBIDDEN");
    let credits = call(&gw, Method::GET, "/api/credits", &read, None).await;
    assert_eq!(credits.status, StatusCode::OK, "{}", credits.text());

    let view = listed(&gw, &id).await;
    assert_eq!(view["scopes"], json!(["read"]));
    assert_eq!(view["credits_used_this_period"], 1);
}

#[tokio::test]
async fn a_key_limited_to_one_model_is_forbidden_on_another_and_unknown_models_stay_401() {
    let gw = start(roomy()).await;
    let other = second_model(&gw).await;
    let (_, only_demo) = key_with(&gw, json!({"name": "one model", "models": [gw.model()]})).await;

    let mine = call(
        &gw,
        Method::GET,
        &gw.model_path("/users/me"),
        &only_demo,
        None,
    )
    .await;
    assert_eq!(mine.status, StatusCode::OK, "{}", mine.text());
    let upstream = sandbox(&gw).requests_received();
    let theirs = call(
        &gw,
        Method::GET,
        &format!("/api/models/{other}/users/me"),
        &only_demo,
        None,
    )
    .await;
    assert_error(&theirs, StatusCode::FORBIDDEN, "KEY_FORBIDDEN");
    // A model of no org is still the 401 of §2 (ownership is checked before the key's list).
    let nobody = call(
        &gw,
        Method::GET,
        &format!("/api/models/{}/users/me", uuid::Uuid::new_v4()),
        &only_demo,
        None,
    )
    .await;
    assert_error(&nobody, StatusCode::UNAUTHORIZED, "INVALID_API_KEY");
    assert_eq!(sandbox(&gw).requests_received(), upstream);
    // Routes without a model are not restricted by the list.
    let credits = call(&gw, Method::GET, "/api/credits", &only_demo, None).await;
    assert_eq!(credits.status, StatusCode::OK, "{}", credits.text());
    // The demo key may use both.
    let demo = gw.get(&format!("/api/models/{other}/users/me")).await;
    assert_eq!(demo.status, StatusCode::OK, "{}", demo.text());
}

#[tokio::test]
async fn a_key_with_a_credit_limit_of_3_gets_402_on_its_fourth_call_while_another_key_works() {
    let gw = start(roomy()).await;
    let (id, limited) = key_with(&gw, json!({"name": "capped", "credit_limit": 3})).await;
    let before = gw.balance().await.unwrap();
    for i in 0..3 {
        let ok = call(
            &gw,
            Method::GET,
            &gw.model_path("/users/me"),
            &limited,
            None,
        )
        .await;
        assert_eq!(ok.status, StatusCode::OK, "call {i}: {}", ok.text());
    }
    let upstream = sandbox(&gw).requests_received();
    let fourth = call(
        &gw,
        Method::GET,
        &gw.model_path("/users/me"),
        &limited,
        None,
    )
    .await;
    assert_error(&fourth, StatusCode::PAYMENT_REQUIRED, "KEY_CREDIT_LIMIT");
    assert_eq!(
        sandbox(&gw).requests_received(),
        upstream,
        "refused before the upstream"
    );
    assert_eq!(gw.balance().await.unwrap(), before - 3);
    // The org's other keys are not limited by it.
    let other = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.text());
    assert_eq!(gw.balance().await.unwrap(), before - 4);
    // Free routes still answer.
    let credits = call(&gw, Method::GET, "/api/credits", &limited, None).await;
    assert_eq!(credits.status, StatusCode::OK, "{}", credits.text());

    let view = listed(&gw, &id).await;
    assert_eq!(view["credit_limit"], 3);
    assert_eq!(view["credits_used_this_period"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_of_a_limited_key_are_served_exactly_up_to_its_limit() {
    let gw = std::sync::Arc::new(start(roomy()).await);
    let (_, limited) = key_with(&gw, json!({"name": "capped", "credit_limit": 5})).await;
    let before = gw.balance().await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (gw, key) = (gw.clone(), limited.clone());
        tasks.spawn(async move {
            call(&gw, Method::GET, &gw.model_path("/users/me"), &key, None)
                .await
                .status
        });
    }
    let mut ok = 0;
    let mut limited_out = 0;
    while let Some(status) = tasks.join_next().await {
        match status.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::PAYMENT_REQUIRED => limited_out += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, limited_out), (5, 15), "served exactly the limit");
    assert_eq!(gw.balance().await.unwrap(), before - ok);
}

#[tokio::test]
async fn an_expiring_key_works_until_its_time_then_is_401_and_lists_as_expired() {
    let gw = start(roomy()).await;
    let expires = now_ms() + 1_500;
    let (id, key) = key_with(
        &gw,
        json!({"name": "temp", "expires_at": rfc3339_from_ms(expires)}),
    )
    .await;
    let ok = call(&gw, Method::GET, &gw.model_path("/users/me"), &key, None).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(listed(&gw, &id).await["status"], "active");
    let wait = expires.saturating_sub(now_ms());
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    let late = call(&gw, Method::GET, &gw.model_path("/users/me"), &key, None).await;
    assert_error(&late, StatusCode::UNAUTHORIZED, "INVALID_API_KEY");
    let view = listed(&gw, &id).await;
    assert_eq!(view["status"], "expired");
    assert!(view["expires_at"].as_str().is_some());
    // An expired key stays dead: rotating it does not bring it back.
    let rotated = gw
        .admin(Method::POST, &format!("/admin/keys/{id}/rotate"), None)
        .await;
    assert_error(&rotated, StatusCode::BAD_REQUEST, "INVALID_REQUEST");
}

#[tokio::test]
async fn a_rotation_with_grace_keeps_the_old_key_working_for_the_grace_period_only() {
    let gw = start(roomy()).await;
    let (old_id, old) = key_with(
        &gw,
        json!({"name": "ci", "scopes": ["read"], "credit_limit": 50}),
    )
    .await;
    let rotated = gw
        .admin(
            Method::POST,
            &format!("/admin/keys/{old_id}/rotate"),
            Some(json!({"grace_seconds": 2})),
        )
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text());
    let rotated_at = Instant::now();
    let new = rotated.json()["key"].as_str().unwrap().to_owned();
    let new_id = rotated.json()["id"].as_str().unwrap().to_owned();

    // Both work during the grace period.
    for key in [&old, &new] {
        let ok = call(&gw, Method::GET, &gw.model_path("/users/me"), key, None).await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    }
    assert_eq!(listed(&gw, &old_id).await["status"], "active");
    // The new key inherits the old one's limits.
    let view = listed(&gw, &new_id).await;
    assert_eq!(view["scopes"], json!(["read"]));
    assert_eq!(view["credit_limit"], 50);

    // Then the old one is refused, and never for longer than the grace period.
    loop {
        let answer = call(&gw, Method::GET, &gw.model_path("/users/me"), &old, None).await;
        if answer.status == StatusCode::UNAUTHORIZED {
            assert_error(&answer, StatusCode::UNAUTHORIZED, "INVALID_API_KEY");
            break;
        }
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert!(
            rotated_at.elapsed() < Duration::from_millis(2_500),
            "old key outlived its grace"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotated_at.elapsed() >= Duration::from_millis(1_900));
    assert_eq!(listed(&gw, &old_id).await["status"], "revoked");
    let still = call(&gw, Method::GET, &gw.model_path("/users/me"), &new, None).await;
    assert_eq!(still.status, StatusCode::OK, "{}", still.text());
}

#[tokio::test]
async fn a_key_in_its_grace_period_is_revoked_at_once() {
    let gw = start(roomy()).await;
    let (old_id, old) = key_with(&gw, json!({"name": "ci"})).await;
    let rotated = gw
        .admin(
            Method::POST,
            &format!("/admin/keys/{old_id}/rotate"),
            Some(json!({"grace_seconds": 3600})),
        )
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text());
    let ok = call(&gw, Method::GET, &gw.model_path("/users/me"), &old, None).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let revoked = gw
        .admin(Method::POST, &format!("/admin/keys/{old_id}/revoke"), None)
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.text());
    assert_eq!(revoked.json()["status"], "revoked");
    let refused = call(&gw, Method::GET, &gw.model_path("/users/me"), &old, None).await;
    assert_error(&refused, StatusCode::UNAUTHORIZED, "INVALID_API_KEY");
}

#[tokio::test]
async fn bad_key_lifecycle_input_gets_a_clear_400() {
    let gw = start(roomy()).await;
    let org = demo_org(&gw);
    let other_org = gw
        .admin(Method::POST, "/admin/orgs", Some(json!({"name": "Other"})))
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cases = [
        (json!({"name": "k", "expires_at": "tomorrow"}), "expires_at"),
        (
            json!({"name": "k", "expires_at": "2001-01-01T00:00:00Z"}),
            "future",
        ),
        (json!({"name": "k", "expires_at": 5}), "expires_at"),
        (json!({"name": "k", "scopes": []}), "scopes"),
        (json!({"name": "k", "scopes": ["admin"]}), "scopes"),
        (json!({"name": "k", "scopes": "read"}), "scopes"),
        (json!({"name": "k", "models": []}), "models"),
        (json!({"name": "k", "models": ["not-a-uuid"]}), "models"),
        (
            json!({"name": "k", "models": [uuid::Uuid::new_v4().to_string()]}),
            "not a model",
        ),
        (json!({"name": "k", "credit_limit": -1}), "credit_limit"),
        (json!({"name": "k", "credit_limit": 1.5}), "credit_limit"),
        (json!({"name": "k", "credit_limit": "3"}), "credit_limit"),
    ];
    for (body, says) in cases {
        let answer = create_key(&gw, &org, body.clone()).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "INVALID_REQUEST");
        assert!(
            answer.json()["error"].as_str().unwrap().contains(says),
            "{body} → {}",
            answer.text()
        );
    }
    // The demo model is not the other org's.
    let answer = create_key(
        &gw,
        &other_org,
        json!({"name": "k", "models": [gw.model()]}),
    )
    .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "INVALID_REQUEST");

    let (id, _) = key_with(&gw, json!({"name": "k"})).await;
    for grace in [json!(-1), json!(604_801), json!("5"), json!(1.5)] {
        let answer = gw
            .admin(
                Method::POST,
                &format!("/admin/keys/{id}/rotate"),
                Some(json!({"grace_seconds": grace})),
            )
            .await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "INVALID_REQUEST");
        assert!(answer.json()["error"]
            .as_str()
            .unwrap()
            .contains("grace_seconds"));
    }
    let max = gw
        .admin(
            Method::POST,
            &format!("/admin/keys/{id}/rotate"),
            Some(json!({"grace_seconds": 604_800})),
        )
        .await;
    assert_eq!(max.status, StatusCode::OK, "{}", max.text());

    // Defaults, listed: no expiry, both scopes, every model, no limit, nothing spent.
    let view = listed(&gw, &id).await;
    for (field, value) in [
        ("expires_at", Value::Null),
        ("scopes", json!(["read", "write"])),
        ("models", Value::Null),
        ("credit_limit", Value::Null),
        ("credits_used_this_period", json!(0)),
    ] {
        assert_eq!(view[field], value, "{field} in {view}");
    }
}
