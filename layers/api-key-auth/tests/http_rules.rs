//! The 401/402 rules of SPEC §2 as a client sees them: status, headers, exact JSON bodies, and
//! what reaches the inner service.

#![cfg(feature = "memory")]

mod common;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tollgate_api_key_auth::{
    ApiKeyAuthLayer, KeyGrant, KeyStore, UnmatchedRoutes, WRONG_HEADER_MESSAGE,
};
use tollgate_core::{
    BackendErrorKind, CostTable, ErrorCode, ModelId, OrgId, Plan, Principal, RouteSpec,
};
use tower::{Service, ServiceBuilder, ServiceExt};

fn assert_invalid_key(answer: &Answer) {
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
    assert_eq!(answer.text(), INVALID_KEY_BODY);
    assert_eq!(answer.code(), Some(ErrorCode::InvalidApiKey));
    assert_no_quota(answer);
}

/// A caller refused before any window applies is told it has no quota, and that waiting
/// would not help (no `Retry-After`).
#[track_caller]
fn assert_no_quota(answer: &Answer) {
    for name in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
        assert_eq!(
            answer.headers.get(name).map(HeaderValue::as_bytes),
            Some(&b"0"[..]),
            "{name} on a {}",
            answer.status
        );
    }
    assert!(!answer.headers.contains_key("retry-after"));
}

#[tokio::test]
async fn a_valid_key_reaches_the_service_with_its_principal() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let echo = Echo::default();
    let answer = send(&fx.layer(), &echo, with_key(&fx.users_me(), &fx.key.secret)).await;

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.json(),
        serde_json::json!({
            "org": fx.org.to_string(),
            "key": fx.key.id.to_string(),
            "plan": "basic",
            "route": "/api/models/:id/users/me",
            // The secret travels no further than the auth layer.
            "x_api_key_forwarded": false,
        })
    );
    // Outer layers (the request logger) find the principal on the response.
    assert_eq!(
        answer.principal(),
        Some(Principal {
            org: fx.org,
            key: fx.key.id,
            plan: Plan::Basic
        })
    );
    assert_eq!(answer.code(), None);
    assert_eq!(echo.calls(), 1);
}

#[tokio::test]
async fn a_missing_key_is_401_and_never_reaches_the_service() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let echo = Echo::default();
    let answer = send(&fx.layer(), &echo, empty(get(&fx.users_me()))).await;
    assert_invalid_key(&answer);
    assert_eq!(answer.principal(), None);
    assert_eq!(echo.calls(), 0);
}

#[tokio::test]
async fn an_unknown_key_gets_the_same_401_as_a_missing_one() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let echo = Echo::default();
    // Well formed, never issued.
    let stranger = tollgate_api_key_auth::generate_key().unwrap();
    let answer = send(
        &fx.layer(),
        &echo,
        with_key(&fx.users_me(), &stranger.secret),
    )
    .await;
    assert_invalid_key(&answer);
    assert_eq!(answer.principal(), None);
    assert_eq!(echo.calls(), 0);
}

#[tokio::test]
async fn a_revoked_key_stops_working_at_once() {
    let fx = Fixture::new(Some(Plan::Pro)).await;
    let echo = Echo::default();
    let layer = fx.layer();
    let before = send(&layer, &echo, with_key(&fx.users_me(), &fx.key.secret)).await;
    assert_eq!(before.status, StatusCode::OK);

    assert!(fx.store.revoke_key(fx.key.id).await.unwrap());
    let after = send(&layer, &echo, with_key(&fx.users_me(), &fx.key.secret)).await;
    assert_invalid_key(&after);
    assert_eq!(after.principal(), None);
    assert_eq!(echo.calls(), 1);
}

#[tokio::test]
async fn a_rotated_key_is_replaced_by_the_new_one() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let echo = Echo::default();
    let layer = fx.layer();
    let new = fx.store.rotate_key(fx.key.id).await.unwrap().unwrap();
    assert_ne!(new.id, fx.key.id);
    assert_ne!(new.secret, fx.key.secret);

    let old = send(&layer, &echo, with_key(&fx.users_me(), &fx.key.secret)).await;
    assert_invalid_key(&old);

    let fresh = send(&layer, &echo, with_key(&fx.users_me(), &new.secret)).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_eq!(fresh.json()["key"], new.id.to_string());
    assert_eq!(fresh.json()["org"], fx.org.to_string());
}

#[tokio::test]
async fn a_key_sent_as_authorization_is_told_to_use_x_api_key() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let echo = Echo::default();
    let expected = serde_json::json!({"error": WRONG_HEADER_MESSAGE, "code": "INVALID_API_KEY"});
    assert!(WRONG_HEADER_MESSAGE.contains("X-API-Key"));
    for value in [
        format!("Bearer {}", fx.key.secret),
        fx.key.secret.clone(),
        "Basic dXNlcjpwYXNz".to_owned(),
    ] {
        let req = empty(get(&fx.users_me()).header("authorization", value));
        let answer = send(&fx.layer(), &echo, req).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
        assert_eq!(answer.json(), expected);
        assert_eq!(answer.code(), Some(ErrorCode::InvalidApiKey));
    }
    // With X-API-Key present, Authorization is someone else's business.
    let req = Request::get(fx.users_me())
        .header("x-api-key", &fx.key.secret)
        .header("authorization", "Bearer something-else")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&fx.layer(), &echo, req).await.status, StatusCode::OK);
    assert_eq!(echo.calls(), 1);
}

#[tokio::test]
async fn malformed_keys_are_plain_401s() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let echo = Echo::default();
    let hex_part = &fx.key.secret["sk_live_".len()..];
    let cases: Vec<HeaderValue> = vec![
        // 10 KB of key-looking text.
        HeaderValue::from_str(&format!("sk_live_{}", "a".repeat(10 * 1024))).unwrap(),
        // The real key with a wrong prefix, a suffix, or upper case.
        HeaderValue::from_str(&format!("sk_test_{hex_part}")).unwrap(),
        HeaderValue::from_str(&format!("{}0", fx.key.secret)).unwrap(),
        HeaderValue::from_str(&fx.key.secret.to_uppercase()).unwrap(),
        HeaderValue::from_static(""),
        // Not UTF-8 at all, the right length.
        HeaderValue::from_bytes(&[0xff; 72]).unwrap(),
        HeaderValue::from_bytes(b"sk_live_\xc3\x28").unwrap(),
    ];
    for value in cases {
        let req = empty(get(&fx.users_me()).header("x-api-key", value.clone()));
        let answer = send(&fx.layer(), &echo, req).await;
        assert_invalid_key(&answer);
    }
    assert_eq!(echo.calls(), 0);
}

#[tokio::test]
async fn a_key_sent_twice_is_refused() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let echo = Echo::default();
    let req = Request::get(fx.users_me())
        .header("x-api-key", &fx.key.secret)
        .header("x-api-key", &fx.key.secret)
        .body(Full::default())
        .unwrap();
    assert_invalid_key(&send(&fx.layer(), &echo, req).await);
    assert_eq!(echo.calls(), 0);
}

#[tokio::test]
async fn no_subscription_is_402() {
    let fx = Fixture::new(None).await;
    let echo = Echo::default();
    let answer = send(&fx.layer(), &echo, with_key(&fx.users_me(), &fx.key.secret)).await;
    assert_eq!(answer.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
    assert_eq!(answer.text(), NO_SUBSCRIPTION_BODY);
    assert_eq!(answer.code(), Some(ErrorCode::NoSubscription));
    assert_no_quota(&answer);
    // The key was identified: outer layers learn whose it was.
    assert_eq!(
        answer.extensions.get::<KeyGrant>(),
        Some(&KeyGrant {
            key: fx.key.id,
            org: fx.org,
            plan: None,
            limits: tollgate_api_key_auth::KeyLimits::default(),
        })
    );
    assert_eq!(
        answer.extensions.get::<tollgate_core::Identity>(),
        Some(&tollgate_core::Identity {
            org: fx.org,
            key: fx.key.id
        })
    );
    assert_eq!(echo.calls(), 0);
}

#[tokio::test]
async fn a_cancelled_subscription_is_402_and_a_new_plan_applies_at_once() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let echo = Echo::default();
    let layer = fx.layer();
    assert_eq!(
        send(&layer, &echo, with_key(&fx.users_me(), &fx.key.secret))
            .await
            .status,
        StatusCode::OK
    );

    fx.store.set_subscription(fx.org, None).await.unwrap();
    let cancelled = send(&layer, &echo, with_key(&fx.users_me(), &fx.key.secret)).await;
    assert_eq!(cancelled.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(cancelled.text(), NO_SUBSCRIPTION_BODY);

    fx.store
        .set_subscription(fx.org, Some(Plan::Enterprise))
        .await
        .unwrap();
    let back = send(&layer, &echo, with_key(&fx.users_me(), &fx.key.secret)).await;
    assert_eq!(back.status, StatusCode::OK);
    assert_eq!(back.json()["plan"], "enterprise");
    assert_eq!(back.principal().map(|p| p.plan), Some(Plan::Enterprise));
}

#[tokio::test]
async fn another_orgs_model_and_a_nonexistent_model_are_indistinguishable() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let other_org = OrgId::new();
    let other_model = ModelId::new();
    fx.store
        .set_subscription(other_org, Some(Plan::Pro))
        .await
        .unwrap();
    assert!(fx.store.add_model(other_org, other_model).await.unwrap());
    let echo = Echo::default();
    let layer = fx.layer();

    let foreign = send(
        &layer,
        &echo,
        with_key(&model_path(other_model), &fx.key.secret),
    )
    .await;
    let missing = send(
        &layer,
        &echo,
        with_key(&model_path(ModelId::new()), &fx.key.secret),
    )
    .await;
    let unknown_key = send(
        &layer,
        &echo,
        with_key(
            &fx.users_me(),
            &tollgate_api_key_auth::generate_key().unwrap().secret,
        ),
    )
    .await;

    assert_invalid_key(&foreign);
    assert_invalid_key(&missing);
    // Byte for byte the same as an unknown key, headers included.
    assert_eq!(foreign.body, missing.body);
    assert_eq!(foreign.body, unknown_key.body);
    assert_eq!(foreign.headers, missing.headers);
    assert_eq!(foreign.headers, unknown_key.headers);
    // The key was good, so outer layers still learn who called.
    let principal = Principal {
        org: fx.org,
        key: fx.key.id,
        plan: Plan::Basic,
    };
    assert_eq!(foreign.principal(), Some(principal));
    assert_eq!(missing.principal(), Some(principal));
    assert_eq!(echo.calls(), 0);

    // The other org's own key does reach its model.
    let theirs = fx
        .store
        .create_key(other_org, "theirs".to_owned())
        .await
        .unwrap();
    let ok = send(
        &layer,
        &echo,
        with_key(&model_path(other_model), &theirs.secret),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.json()["org"], other_org.to_string());
}

#[tokio::test]
async fn checks_run_in_contract_order() {
    // No subscription and a foreign model: 402 (subscription before ownership).
    let fx = Fixture::new(None).await;
    let echo = Echo::default();
    let answer = send(
        &fx.layer(),
        &echo,
        with_key(&model_path(ModelId::new()), &fx.key.secret),
    )
    .await;
    assert_eq!(answer.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(answer.code(), Some(ErrorCode::NoSubscription));

    // Unknown key and a foreign model: plain 401 before anything else, no principal.
    let answer = send(&fx.layer(), &echo, empty(get(&model_path(ModelId::new())))).await;
    assert_invalid_key(&answer);
    assert_eq!(answer.extensions.get::<KeyGrant>(), None);
    assert_eq!(echo.calls(), 0);
}

#[tokio::test]
async fn routes_without_a_model_skip_the_ownership_check() {
    let fx = Fixture::new(Some(Plan::Free)).await;
    let echo = Echo::default();
    for (path, template) in [("/api/credits", "/api/credits"), ("/api/logs", "/api/logs")] {
        let answer = send(&fx.layer(), &echo, with_key(path, &fx.key.secret)).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}");
        assert_eq!(answer.json()["route"], template);
        assert_eq!(answer.json()["plan"], "free");
        // Still authenticated.
        let anonymous = send(&fx.layer(), &echo, empty(get(path))).await;
        assert_invalid_key(&anonymous);
    }
    assert_eq!(echo.calls(), 2);
}

#[tokio::test]
async fn unmatched_routes_pass_through_untouched_by_default() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let echo = Echo::default();
    for path in ["/healthz", "/api/models/not-a-uuid/users/me", "/api/models"] {
        let answer = send(&fx.layer(), &echo, empty(get(path))).await;
        // The "router" behind decides: 404, no principal, no 401.
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(answer.json()["org"], serde_json::Value::Null);
        assert_eq!(answer.principal(), None);
    }
    // Untouched means untouched: the header is not stripped either.
    let answer = send(&fx.layer(), &echo, with_key("/healthz", &fx.key.secret)).await;
    assert_eq!(answer.json()["x_api_key_forwarded"], true);
    assert_eq!(answer.principal(), None);
    assert_eq!(echo.calls(), 4);
}

#[tokio::test]
async fn unmatched_routes_can_require_a_key() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let echo = Echo::default();
    let layer = fx
        .layer()
        .with_unmatched_routes(UnmatchedRoutes::Authenticate);
    assert_invalid_key(&send(&layer, &echo, empty(get("/internal/report"))).await);
    assert_eq!(echo.calls(), 0);

    let answer = send(&layer, &echo, with_key("/internal/report", &fx.key.secret)).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.json()["org"], fx.org.to_string());
    assert_eq!(answer.principal().map(|p| p.key), Some(fx.key.id));

    fx.store.set_subscription(fx.org, None).await.unwrap();
    let answer = send(&layer, &echo, with_key("/internal/report", &fx.key.secret)).await;
    assert_eq!(answer.status, StatusCode::PAYMENT_REQUIRED);
}

#[tokio::test]
async fn a_custom_cost_table_decides_the_model() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let echo = Echo::default();
    let table = CostTable::new([RouteSpec::new(Method::GET, "/v2/accounts/:id/feed", 3)]);
    let layer = fx.layer().with_cost_table(table);

    let own = send(
        &layer,
        &echo,
        with_key(&format!("/v2/accounts/{}/feed", fx.model), &fx.key.secret),
    )
    .await;
    assert_eq!(own.status, StatusCode::OK);
    assert_eq!(own.json()["route"], "/v2/accounts/:id/feed");

    let foreign = send(
        &layer,
        &echo,
        with_key(
            &format!("/v2/accounts/{}/feed", ModelId::new()),
            &fx.key.secret,
        ),
    )
    .await;
    assert_invalid_key(&foreign);

    // The OnlyFans routes are not in this table: they pass through.
    let other = send(&layer, &echo, empty(get(&fx.users_me()))).await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn two_keys_of_one_org_are_the_same_org() {
    let fx = Fixture::new(Some(Plan::Pro)).await;
    let second = fx
        .store
        .create_key(fx.org, "second".to_owned())
        .await
        .unwrap();
    let echo = Echo::default();
    let a = send(&fx.layer(), &echo, with_key(&fx.users_me(), &fx.key.secret)).await;
    let b = send(&fx.layer(), &echo, with_key(&fx.users_me(), &second.secret)).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(b.status, StatusCode::OK);
    let (pa, pb) = (a.principal().unwrap(), b.principal().unwrap());
    assert_eq!(pa.org, fx.org);
    assert_eq!(pb.org, fx.org);
    assert_eq!(pa.key, fx.key.id);
    assert_eq!(pb.key, second.id);
}

#[tokio::test]
async fn backend_failures_are_503_or_500_responses() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let echo = Echo::default();
    let cases = [
        (
            Some(BackendErrorKind::Unavailable),
            None,
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":"A backend this request needs is unavailable. Retry shortly.","code":"SERVICE_UNAVAILABLE"}"#,
            false,
        ),
        (
            Some(BackendErrorKind::Other),
            None,
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"error":"An unexpected error occurred.","code":"INTERNAL_ERROR"}"#,
            false,
        ),
        (
            None,
            Some(BackendErrorKind::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":"A backend this request needs is unavailable. Retry shortly.","code":"SERVICE_UNAVAILABLE"}"#,
            true,
        ),
    ];
    for (lookup, owns_model, status, body, identified) in cases {
        let layer = ApiKeyAuthLayer::new(FailingStore {
            inner: Arc::clone(&fx.store),
            lookup,
            owns_model,
        });
        let answer = send(&layer, &echo, with_key(&fx.users_me(), &fx.key.secret)).await;
        assert_eq!(answer.status, status);
        assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
        assert_eq!(answer.text(), body);
        assert_eq!(answer.principal().is_some(), identified);
        assert_eq!(
            answer.extensions.get::<tollgate_core::BackendFailure>(),
            Some(&tollgate_core::BackendFailure { backend: "keys" }),
            "the response names the failed backend"
        );
    }
    assert_eq!(echo.calls(), 0);
}

#[tokio::test]
async fn inner_errors_and_bodies_pass_through() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    // An inner error stays an error: this layer adds none and swallows none.
    let mut failing = ServiceBuilder::new()
        .layer(fx.layer())
        .service(tower::service_fn(|_req: Request<Full<Bytes>>| async {
            Err::<Response<Full<Bytes>>, _>("inner broke")
        }));
    let err = failing
        .ready()
        .await
        .unwrap()
        .call(with_key(&fx.users_me(), &fx.key.secret))
        .await
        .unwrap_err();
    assert_eq!(err, "inner broke");

    // The inner response keeps its status, headers and body.
    let mut teapot = ServiceBuilder::new()
        .layer(fx.layer())
        .service(tower::service_fn(|_req: Request<Full<Bytes>>| async {
            let res = Response::builder()
                .status(StatusCode::IM_A_TEAPOT)
                .header("x-inner", "yes")
                .body(Full::from("short and stout"))
                .unwrap();
            Ok::<_, Infallible>(res)
        }));
    let res = teapot
        .ready()
        .await
        .unwrap()
        .call(with_key(&fx.users_me(), &fx.key.secret))
        .await
        .unwrap();
    let answer = collect(res).await;
    assert_eq!(answer.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(answer.headers["x-inner"], "yes");
    assert_eq!(answer.text(), "short and stout");
    assert_eq!(answer.principal().map(|p| p.org), Some(fx.org));
}

#[tokio::test]
async fn works_with_a_store_chosen_at_run_time() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let dynamic: Arc<dyn KeyStore> = fx.store.clone();
    let layer = ApiKeyAuthLayer::new(dynamic);
    let echo = Echo::default();
    let answer = send(&layer, &echo, with_key(&fx.users_me(), &fx.key.secret)).await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn last_used_is_written_once_per_second_however_many_requests() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let echo = Echo::default();
    let layer = fx.layer();
    let info = fx.store.key_info(fx.key.id).await.unwrap().unwrap();
    assert_eq!(info.last_used_at_ms, None);

    // 1,000 requests spread over one second of clock.
    let first = fx.now();
    for _ in 0..1_000 {
        let answer = send(&layer, &echo, with_key(&fx.users_me(), &fx.key.secret)).await;
        assert_eq!(answer.status, StatusCode::OK);
        fx.clock.advance(millis(1));
    }
    assert_eq!(echo.calls(), 1_000);
    // One write: the first request's time; the 999 after it changed nothing.
    let listed = fx.store.list_keys(fx.org).await.unwrap();
    assert_eq!(listed[0].last_used_at_ms, Some(first));

    // The next second's first request moves it.
    let now = fx.now();
    assert_eq!(now, first + 1_000);
    send(&layer, &echo, with_key(&fx.users_me(), &fx.key.secret)).await;
    let listed = fx.store.list_keys(fx.org).await.unwrap();
    assert_eq!(listed[0].last_used_at_ms, Some(now));
}
