//! The layer as a tower middleware: readiness, what the inner service receives, and a slow
//! store, driven step by step with `tower-test` and `tokio-test`.

#![cfg(feature = "memory")]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio_test::{assert_pending, assert_ready, assert_ready_ok, task};
use tollgate_api_key_auth::{ApiKeyAuthLayer, KeyStore, MemoryKeyStore};
use tollgate_core::{ModelId, Plan, Principal, RouteMatch, TokioClock};
use tower_test::mock;

type Mock = (
    mock::Spawn<
        tollgate_api_key_auth::ApiKeyAuth<mock::Mock<Request<Full<Bytes>>, Response<Full<Bytes>>>>,
    >,
    mock::Handle<Request<Full<Bytes>>, Response<Full<Bytes>>>,
);

fn spawn(layer: ApiKeyAuthLayer) -> Mock {
    mock::spawn_layer(layer)
}

#[tokio::test]
async fn readiness_is_the_inner_services() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let (mut svc, mut handle) = spawn(fx.layer());
    handle.allow(0);
    assert_pending!(svc.poll_ready());
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
}

#[tokio::test]
async fn the_inner_service_gets_principal_and_route_but_not_the_key() {
    let fx = Fixture::new(Some(Plan::Pro)).await;
    let (mut svc, mut handle) = spawn(fx.layer());
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(with_key(&fx.users_me(), &fx.key.secret)));
    // The memory store answers at once, so the request is already inside.
    assert_pending!(fut.poll());

    let (req, respond) = handle.next_request().await.unwrap();
    assert_eq!(
        req.extensions().get::<Principal>(),
        Some(&Principal {
            org: fx.org,
            key: fx.key.id,
            plan: Plan::Pro
        })
    );
    let route = req.extensions().get::<RouteMatch>().unwrap();
    assert_eq!(route.template(), "/api/models/:id/users/me");
    assert_eq!(route.model(), Some(fx.model));
    assert!(req.headers().get("x-api-key").is_none());

    respond.send_response(Response::new(Full::from("hi")));
    let res = assert_ready_ok!(fut.poll());
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.extensions().get::<Principal>().unwrap().org, fx.org);
}

#[tokio::test]
async fn a_rejection_never_reaches_the_inner_service() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let (mut svc, mut handle) = spawn(fx.layer());
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(empty(get(&fx.users_me()))));
    let res = assert_ready_ok!(fut.poll());
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_pending!(task::spawn(handle.next_request()).poll());

    // Nor does a foreign model.
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(with_key(&model_path(ModelId::new()), &fx.key.secret)));
    let res = assert_ready_ok!(fut.poll());
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_pending!(task::spawn(handle.next_request()).poll());
}

#[tokio::test]
async fn nothing_reaches_the_inner_service_until_the_store_has_answered() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let gated = GatedStore::new(Arc::clone(&fx.store));
    let gate = Arc::clone(&gated.gate);
    let layer = ApiKeyAuthLayer::new(gated);
    let (mut svc, mut handle) = spawn(layer);

    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(with_key(&fx.users_me(), &fx.key.secret)));
    assert_pending!(fut.poll());
    let mut next = task::spawn(handle.next_request());
    assert_pending!(next.poll());

    // The key lookup answers; the ownership check is still out.
    gate.add_permits(1);
    assert!(fut.is_woken());
    assert_pending!(fut.poll());
    assert_pending!(next.poll());

    // The ownership check answers: the request goes in.
    gate.add_permits(1);
    assert_pending!(fut.poll());
    let (req, respond) = assert_ready!(next.poll()).unwrap();
    assert_eq!(req.extensions().get::<Principal>().unwrap().key, fx.key.id);
    respond.send_response(Response::new(Full::default()));
    assert_eq!(assert_ready_ok!(fut.poll()).status(), StatusCode::OK);
}

#[tokio::test]
async fn a_dropped_request_leaves_the_service_usable() {
    let fx = Fixture::new(Some(Plan::Basic)).await;
    let gated = GatedStore::new(Arc::clone(&fx.store));
    let gate = Arc::clone(&gated.gate);
    let (mut svc, mut handle) = spawn(ApiKeyAuthLayer::new(gated));

    assert_ready_ok!(svc.poll_ready());
    let mut abandoned = task::spawn(svc.call(with_key(&fx.users_me(), &fx.key.secret)));
    assert_pending!(abandoned.poll());
    drop(abandoned);

    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(with_key(&fx.users_me(), &fx.key.secret)));
    gate.add_permits(2);
    assert_pending!(fut.poll());
    let (_req, respond) = handle.next_request().await.unwrap();
    respond.send_response(Response::new(Full::default()));
    assert_eq!(assert_ready_ok!(fut.poll()).status(), StatusCode::OK);
    // The abandoned request never reached the inner service.
    assert_pending!(task::spawn(handle.next_request()).poll());
}

#[tokio::test(start_paused = true)]
async fn last_used_follows_tokio_time_at_one_second_resolution() {
    let clock = TokioClock::starting_at(START_MS);
    let store = Arc::new(MemoryKeyStore::new(Arc::new(clock)));
    let org = tollgate_core::OrgId::new();
    store
        .set_subscription(org, Some(Plan::Basic))
        .await
        .unwrap();
    let key = store.create_key(org, "ci".to_owned()).await.unwrap();
    let layer = ApiKeyAuthLayer::new(Arc::clone(&store)).with_clock(Arc::new(clock));
    let echo = Echo::default();

    let last_used = || async {
        store
            .key_info(key.id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at_ms
    };

    assert_eq!(
        send(&layer, &echo, with_key("/api/credits", &key.secret))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(last_used().await, Some(START_MS));

    tokio::time::advance(millis(999)).await;
    send(&layer, &echo, with_key("/api/credits", &key.secret)).await;
    assert_eq!(last_used().await, Some(START_MS));

    tokio::time::advance(millis(1)).await;
    send(&layer, &echo, with_key("/api/credits", &key.secret)).await;
    assert_eq!(last_used().await, Some(START_MS + 1_000));

    // An hour later, a single request shows up at once.
    tokio::time::advance(millis(3_600_000)).await;
    send(&layer, &echo, with_key("/api/credits", &key.secret)).await;
    assert_eq!(last_used().await, Some(START_MS + 3_601_000));
    assert_eq!(echo.calls(), 4);
}
