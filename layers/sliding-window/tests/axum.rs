//! The layer alone inside an axum app: the way a team adds per-tenant limits to its own
//! service, choosing buckets itself because it has no tollgate auth layer.

use std::sync::Arc;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tollgate_core::{ManualClock, ModelId, OrgId, Plan};
use tollgate_sliding_window::{BucketKey, MemoryWindowStore, PerModelSlidingWindowLayer};
use tower::ServiceExt;

#[tokio::test]
async fn limits_an_axum_router_per_tenant() {
    let clock = ManualClock::new(1_700_000_000_000);
    let store = MemoryWindowStore::new(Arc::new(clock.clone()));
    let all_routes = ModelId::new();
    let app = Router::new()
        .route("/search", get(|| async { "results" }))
        .layer(
            PerModelSlidingWindowLayer::new(store)
                .with_limit(Plan::Basic, 2)
                .with_bucket_fn(move |head, _| {
                    let tenant: OrgId =
                        head.headers.get("x-tenant")?.to_str().ok()?.parse().ok()?;
                    Some((BucketKey::new(tenant, all_routes), Plan::Basic))
                }),
        );
    let tenant = OrgId::new();
    let request = || {
        Request::get("/search")
            .header("x-tenant", tenant.to_string())
            .body(Body::empty())
            .unwrap()
    };

    for remaining in ["1", "0"] {
        let res = app.clone().oneshot(request()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["ratelimit-remaining"], remaining);
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes(),
            "results"
        );
    }
    let res = app.clone().oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "60");
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        r#"{"error":"Rate limit exceeded. Slow down and try again.","code":"RATE_LIMIT_EXCEEDED"}"#
    );
}
