//! HTTP behaviour of the credit meter: statuses, exact bodies, receipts and balances.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::json;
use tollgate_core::{
    CostTable, CreditReceipt, CreditSettlement, ErrorCode, JsonBodyRequired, Plan, RouteSpec,
};
use tollgate_credit_meter::{CreditMeterLayer, EntryKind, Ledger, MemoryLedger};
use tower::{service_fn, ServiceBuilder, ServiceExt};

use common::*;

type Req = Request<Full<Bytes>>;

/// The meter over `ledger` in front of a service that answers `make()` and counts its calls.
fn meter_over<F>(
    ledger: &Arc<MemoryLedger>,
    calls: &Arc<AtomicUsize>,
    make: F,
) -> impl tower::Service<
    Req,
    Response = Response<tollgate_credit_meter::MeterBody<Full<Bytes>>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
where
    F: Fn() -> Response<Full<Bytes>> + Clone + Send + 'static,
{
    let calls = Arc::clone(calls);
    ServiceBuilder::new()
        .layer(CreditMeterLayer::new(Arc::clone(ledger)))
        .service(service_fn(move |_req: Req| {
            calls.fetch_add(1, Ordering::SeqCst);
            let res = make();
            async move { Ok::<_, Infallible>(res) }
        }))
}

#[tokio::test]
async fn insufficient_credits_is_402_and_never_reaches_the_service() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(1)).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = meter_over(&ledger, &calls, || ok_json(r#"{"ok":true}"#));

    // balance 1, cost 2
    let res = svc
        .clone()
        .oneshot(request(&payouts_stats(), org, "r-1"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(
        res.extensions().get::<ErrorCode>(),
        Some(&ErrorCode::InsufficientCredits)
    );
    assert!(res.extensions().get::<CreditReceipt>().is_none());
    assert_eq!(
        body_json(res.into_body()).await,
        json!({"error": "Not enough credits to complete this request.", "code": "INSUFFICIENT_CREDITS"})
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(balance(&ledger, org).await, 1);
    assert_eq!(ledger.open_holds(), 0);

    // The same balance still pays for a 1-credit route.
    let res = svc.oneshot(request(&users_me(), org, "r-2")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let r = receipt(&res);
    body_bytes(res.into_body()).await;
    assert_eq!(r.settlement(), charged(1, Some(0)));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn no_subscription_when_never_subscribed_or_cancelled() {
    let (_clock, ledger) = manual_ledger();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = meter_over(&ledger, &calls, || ok_json("{}"));
    let expected = json!({
        "error": "The organization has no active subscription. Subscribe to a plan to use the API.",
        "code": "NO_SUBSCRIPTION"
    });

    let never = tollgate_core::OrgId::new();
    let res = svc
        .clone()
        .oneshot(request(&users_me(), never, "r-1"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(body_json(res.into_body()).await, expected);

    let cancelled = org_with(&ledger, Plan::Pro, None).await;
    ledger.top_up(cancelled, 40).await.unwrap().unwrap();
    assert!(ledger.cancel(cancelled).await.unwrap());
    let res = svc
        .clone()
        .oneshot(request(&users_me(), cancelled, "r-2"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(
        res.extensions().get::<ErrorCode>(),
        Some(&ErrorCode::NoSubscription)
    );
    assert_eq!(body_json(res.into_body()).await, expected);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    // The top-up is still there for when the org subscribes again.
    assert_eq!(balance(&ledger, cancelled).await, 40);
}

#[tokio::test]
async fn a_delivered_2xx_is_charged_with_an_exact_receipt_and_ledger_row() {
    let (clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, None).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = meter_over(&ledger, &calls, || ok_json(r#"{"id":7,"username":"amy"}"#));

    let res = svc
        .oneshot(request(&payouts_stats(), org, "req-42"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let r = receipt(&res);
    assert_eq!(r.cost(), 2);
    assert_eq!(
        r.settlement(),
        None,
        "settled before the body was delivered"
    );
    assert_eq!(ledger.open_holds(), 1);

    assert_eq!(
        body_bytes(res.into_body()).await,
        r#"{"id":7,"username":"amy"}"#
    );
    assert_eq!(r.settlement(), charged(2, Some(998)));
    assert_eq!(r.charged(), 2);
    assert_eq!(ledger.open_holds(), 0);
    assert_eq!(balance(&ledger, org).await, 998);

    let rows = entries(&ledger, org).await;
    let last = rows.last().unwrap();
    assert_eq!(last.kind, EntryKind::Charge);
    assert_eq!((last.delta_plan, last.delta_topup), (-2, 0));
    assert_eq!(last.balance_after, 998);
    assert_eq!(last.request_id.as_deref(), Some("req-42"));
    assert_eq!(last.at_ms, now(&clock));
    assert_eq!(last.org, org);
}

#[tokio::test]
async fn non_2xx_responses_release_and_pass_through_unchanged() {
    for code in [
        StatusCode::NOT_FOUND,
        StatusCode::UNAUTHORIZED,
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::BAD_GATEWAY,
        StatusCode::NOT_MODIFIED,
    ] {
        let (_clock, ledger) = manual_ledger();
        let org = org_with(&ledger, Plan::Basic, Some(10)).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = meter_over(&ledger, &calls, move || status(code, r#"{"error":"nope"}"#));

        let res = svc.oneshot(request(&users_me(), org, "r-1")).await.unwrap();
        assert_eq!(res.status(), code);
        let r = receipt(&res);
        assert_eq!(r.settlement(), Some(CreditSettlement::Released), "{code}");
        assert_eq!(ledger.open_holds(), 0, "{code}");
        assert_eq!(body_bytes(res.into_body()).await, r#"{"error":"nope"}"#);
        assert_eq!(r.charged(), 0);
        assert_eq!(balance(&ledger, org).await, 10, "{code}");
        assert!(entries(&ledger, org)
            .await
            .iter()
            .all(|e| e.kind != EntryKind::Charge));
    }
}

#[tokio::test]
async fn an_inner_error_releases() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(10)).await;
    let svc = ServiceBuilder::new()
        .layer(CreditMeterLayer::new(Arc::clone(&ledger)))
        .service_fn(|_req: Req| async {
            Err::<Response<Full<Bytes>>, _>(std::io::Error::other("upstream reset"))
        });
    let err = svc
        .oneshot(request(&users_me(), org, "r-1"))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "upstream reset");
    assert_eq!(ledger.open_holds(), 0);
    assert_eq!(balance(&ledger, org).await, 10);
}

#[tokio::test]
async fn a_body_error_releases_and_is_passed_on() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(10)).await;
    let svc = ServiceBuilder::new()
        .layer(CreditMeterLayer::new(Arc::clone(&ledger)))
        .service_fn(|_req: Req| async {
            let (tx, body) = channel_body();
            tx.send(Ok(Bytes::from_static(b"{\"list\":["))).unwrap();
            tx.send(Err(std::io::Error::other("connection reset")))
                .unwrap();
            Ok::<_, Infallible>(Response::new(body))
        });
    let res = svc.oneshot(request(&users_me(), org, "r-1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let r = receipt(&res);
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "{\"list\":[");
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "connection reset");
    assert_eq!(r.settlement(), Some(CreditSettlement::Released));
    assert!(body.frame().await.is_none());
    assert_eq!(ledger.open_holds(), 0);
    assert_eq!(balance(&ledger, org).await, 10);
}

#[tokio::test]
async fn json_required_non_json_2xx_is_released_and_the_body_kept() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(10)).await;
    let svc = ServiceBuilder::new()
        .layer(CreditMeterLayer::new(Arc::clone(&ledger)))
        .service_fn(|_req: Req| async {
            let chunks: Vec<Result<_, Infallible>> = vec![
                Ok(http_body::Frame::data(Bytes::from_static(b"<html>"))),
                Ok(http_body::Frame::data(Bytes::from_static(
                    b"maintenance</html>",
                ))),
            ];
            Ok::<_, Infallible>(Response::new(StreamBody::new(futures_util::stream::iter(
                chunks,
            ))))
        });
    let mut req = request(&users_me(), org, "r-1");
    req.extensions_mut().insert(JsonBodyRequired);
    let res = svc.oneshot(req).await.unwrap();
    let r = receipt(&res);
    let mut body = res.into_body();
    // One frame with the whole body, yielded after the check.
    let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(frame, "<html>maintenance</html>");
    assert_eq!(r.settlement(), Some(CreditSettlement::Released));
    assert!(body.frame().await.is_none());
    assert_eq!(ledger.open_holds(), 0);
    assert_eq!(balance(&ledger, org).await, 10);
}

#[tokio::test]
async fn json_required_json_2xx_is_charged_and_yielded_as_one_frame() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(10)).await;
    let svc = ServiceBuilder::new()
        .layer(CreditMeterLayer::new(Arc::clone(&ledger)))
        .service_fn(|_req: Req| async {
            let chunks: Vec<Result<_, Infallible>> = vec![
                Ok(http_body::Frame::data(Bytes::from_static(b"{\"list\":[1,"))),
                Ok(http_body::Frame::data(Bytes::from_static(
                    b"2],\"hasMore\":false}",
                ))),
            ];
            Ok::<_, Infallible>(Response::new(StreamBody::new(futures_util::stream::iter(
                chunks,
            ))))
        });
    let mut req = request(&users_me(), org, "r-1");
    req.extensions_mut().insert(JsonBodyRequired);
    let res = svc.oneshot(req).await.unwrap();
    let r = receipt(&res);
    let mut body = res.into_body();
    let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
    // The charge is done before the (buffered) body is handed on.
    assert_eq!(r.settlement(), charged(1, Some(9)));
    assert_eq!(frame, "{\"list\":[1,2],\"hasMore\":false}");
    assert!(body.frame().await.is_none());
    assert!(body.is_end_stream());
    assert_eq!(balance(&ledger, org).await, 9);
}

#[tokio::test]
async fn json_required_2xx_over_the_buffer_cap_is_not_charged() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(10)).await;
    // Used without the gateway's proxy (no body cap of its own upstream of the meter): the
    // meter's own cap bounds what it buffers.
    let svc = ServiceBuilder::new()
        .layer(CreditMeterLayer::new(Arc::clone(&ledger)).with_max_buffered_body(1_000))
        .service_fn(|_req: Req| async {
            let chunks: Vec<Result<_, Infallible>> = (0..5)
                .map(|_| Ok(http_body::Frame::data(Bytes::from(vec![b' '; 300]))))
                .collect();
            Ok::<_, Infallible>(Response::new(StreamBody::new(futures_util::stream::iter(
                chunks,
            ))))
        });
    let mut req = request(&users_me(), org, "r-1");
    req.extensions_mut().insert(JsonBodyRequired);
    let res = svc.oneshot(req).await.unwrap();
    let r = receipt(&res);
    let err = res
        .into_body()
        .collect()
        .await
        .expect_err("an error, not the body");
    assert!(err.to_string().contains("larger than"), "{err}");
    assert_eq!(r.settlement(), Some(CreditSettlement::Released));
    assert_eq!(ledger.open_holds(), 0);
    assert_eq!(balance(&ledger, org).await, 10);
}

#[tokio::test]
async fn without_the_marker_a_non_json_2xx_streams_and_is_charged() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(10)).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = meter_over(&ledger, &calls, || ok_json("plain text"));
    let res = svc.oneshot(request(&users_me(), org, "r-1")).await.unwrap();
    let r = receipt(&res);
    assert_eq!(body_bytes(res.into_body()).await, "plain text");
    assert_eq!(r.settlement(), charged(1, Some(9)));
}

#[tokio::test]
async fn plan_credits_are_spent_before_top_ups() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(3)).await;
    ledger.top_up(org, 5).await.unwrap().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = meter_over(&ledger, &calls, || ok_json("{}"));

    let mut seen = Vec::new();
    for (i, path) in [users_me(), payouts_stats(), payouts_stats()]
        .iter()
        .enumerate()
    {
        let res = svc
            .clone()
            .oneshot(request(path, org, &format!("r-{i}")))
            .await
            .unwrap();
        let r = receipt(&res);
        body_bytes(res.into_body()).await;
        seen.push(r.settlement());
    }
    assert_eq!(
        seen,
        vec![
            charged(1, Some(7)),
            charged(2, Some(5)),
            charged(2, Some(3))
        ]
    );
    let charges: Vec<_> = entries(&ledger, org)
        .await
        .into_iter()
        .filter(|e| e.kind == EntryKind::Charge)
        .map(|e| (e.delta_plan, e.delta_topup, e.balance_after))
        .collect();
    // 3 plan + 5 top-up: 1 from plan; 2 from plan; then the plan pot is empty.
    assert_eq!(charges, vec![(-1, 0, 7), (-2, 0, 5), (0, -2, 3)]);
    let a = account(&ledger, org).await;
    assert_eq!((a.plan_credits, a.topup_credits), (0, 3));
}

#[tokio::test]
async fn a_charge_can_span_both_pots() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(1)).await;
    ledger.top_up(org, 4).await.unwrap().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = meter_over(&ledger, &calls, || ok_json("{}"));
    let res = svc
        .oneshot(request(&payouts_stats(), org, "r-1"))
        .await
        .unwrap();
    let r = receipt(&res);
    body_bytes(res.into_body()).await;
    assert_eq!(r.settlement(), charged(2, Some(3)));
    let last = entries(&ledger, org).await.pop().unwrap();
    assert_eq!((last.delta_plan, last.delta_topup), (-1, -1));
}

#[tokio::test]
async fn unlimited_plans_never_block_and_report_no_balance() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Enterprise, None).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = meter_over(&ledger, &calls, || ok_json("{}"));
    for i in 0..200 {
        let res = svc
            .clone()
            .oneshot(request(&payouts_stats(), org, &format!("r-{i}")))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let r = receipt(&res);
        assert_eq!(ledger.open_holds(), 0, "unlimited plans hold nothing");
        body_bytes(res.into_body()).await;
        assert_eq!(r.settlement(), charged(2, None));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 200);
    let a = account(&ledger, org).await;
    assert_eq!(a.balance(), None);
    assert!(entries(&ledger, org)
        .await
        .iter()
        .all(|e| e.kind != EntryKind::Charge));

    // A failed request on an unlimited plan is released, not charged.
    let svc = meter_over(&ledger, &calls, || {
        status(StatusCode::BAD_GATEWAY, r#"{"error":"x"}"#)
    });
    let res = svc.oneshot(request(&users_me(), org, "r-x")).await.unwrap();
    assert_eq!(receipt(&res).settlement(), Some(CreditSettlement::Released));
}

#[tokio::test]
async fn unknown_routes_are_404_and_never_reach_the_service() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, None).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = meter_over(&ledger, &calls, || ok_json("{}"));
    for path in [
        "/api/models/not-a-uuid/users/me".to_owned(),
        format!("/api/models/{MODEL}/chats/abc/messages"),
        "/admin/orgs".to_owned(),
        "/".to_owned(),
    ] {
        let res = svc
            .clone()
            .oneshot(request(&path, org, "r-1"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            res.extensions().get::<ErrorCode>(),
            Some(&ErrorCode::NotFound)
        );
        assert!(res.extensions().get::<CreditReceipt>().is_none());
        assert_eq!(
            body_json(res.into_body()).await,
            json!({"error": "No such route.", "code": "NOT_FOUND"})
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(balance(&ledger, org).await, 1000);
}

#[tokio::test]
async fn free_routes_pass_through_without_hold_or_receipt() {
    let (_clock, ledger) = manual_ledger();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = meter_over(&ledger, &calls, || ok_json(r#"{"plan":"basic"}"#));
    // No principal needed: nothing is metered.
    let req = Request::get("/api/credits").body(Full::default()).unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.extensions().get::<CreditReceipt>().is_none());
    assert_eq!(body_bytes(res.into_body()).await, r#"{"plan":"basic"}"#);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(ledger.open_holds(), 0);
}

#[tokio::test]
async fn a_custom_cost_table_prices_the_users_own_routes() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Free, None).await;
    let table = CostTable::new([RouteSpec::new(http::Method::POST, "/v1/render", 25)]);
    let svc = ServiceBuilder::new()
        .layer(CreditMeterLayer::new(Arc::clone(&ledger)).with_cost_table(table))
        .service_fn(|_req: Req| async { Ok::<_, Infallible>(ok_json("{}")) });
    let mut req = Request::post("/v1/render").body(Full::default()).unwrap();
    req.extensions_mut().insert(principal(org, Plan::Free));
    let res = svc.clone().oneshot(req).await.unwrap();
    let r = receipt(&res);
    body_bytes(res.into_body()).await;
    assert_eq!(r.settlement(), charged(25, Some(75)));
    // The default table's routes are unknown to this meter.
    let res = svc.oneshot(request(&users_me(), org, "r-2")).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_missing_principal_is_an_internal_error() {
    let (_clock, ledger) = manual_ledger();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = meter_over(&ledger, &calls, || ok_json("{}"));
    let req = Request::get(users_me()).body(Full::default()).unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        body_json(res.into_body()).await,
        json!({"error": "An unexpected error occurred.", "code": "INTERNAL_ERROR"})
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn renewal_on_the_request_path_gives_fresh_plan_credits_and_keeps_top_ups() {
    let (clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, None).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = meter_over(&ledger, &calls, || ok_json("{}"));
    let charge = |path: String, id: &'static str| {
        let svc = svc.clone();
        async move {
            let res = svc.oneshot(request(&path, org, id)).await.unwrap();
            let r = receipt(&res);
            body_bytes(res.into_body()).await;
            r.settlement()
        }
    };

    assert_eq!(charge(users_me(), "a").await, charged(1, Some(999)));
    ledger.top_up(org, 50).await.unwrap().unwrap();
    let period_end = account(&ledger, org).await.period_end_ms;
    assert_eq!(
        tollgate_core::time::rfc3339_from_ms(period_end),
        "2023-02-28T07:35:02.748Z"
    );

    // One millisecond before the end: still the old period.
    clock.set(period_end - 1);
    assert_eq!(charge(users_me(), "b").await, charged(1, Some(1048)));
    // Right at the end the request already sees the new period: 999 unused plan credits
    // are gone, the plan pot is back to 1000, the 50 top-up credits stay.
    clock.set(period_end);
    assert_eq!(charge(payouts_stats(), "c").await, charged(2, Some(1048)));
    let a = account(&ledger, org).await;
    assert_eq!((a.plan_credits, a.topup_credits), (998, 50));
    assert_eq!(a.period_start_ms, period_end);
    assert_eq!(
        tollgate_core::time::rfc3339_from_ms(a.period_end_ms),
        "2023-03-28T07:35:02.748Z"
    );

    let rows = entries(&ledger, org).await;
    let renewal = rows
        .iter()
        .find(|e| e.kind == EntryKind::Renewal)
        .expect("a renewal row");
    assert_eq!(renewal.at_ms, period_end);
    assert_eq!((renewal.delta_plan, renewal.delta_topup), (2, 0));
    assert_eq!(renewal.balance_after, 1050);
    assert_eq!(replay(&rows), (998, 50));
}

#[tokio::test(start_paused = true)]
async fn renewal_with_paused_tokio_time_after_a_long_idle() {
    let clock = tollgate_core::TokioClock::starting_at(T0);
    let ledger = Arc::new(MemoryLedger::new(clock));
    let org = org_with(&ledger, Plan::Free, Some(3)).await;
    ledger.top_up(org, 7).await.unwrap().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = meter_over(&ledger, &calls, || ok_json("{}"));

    // 100 days idle: Feb 28, Mar 28, Apr 28 have passed.
    tokio::time::advance(std::time::Duration::from_secs(100 * 86_400)).await;
    let res = svc.oneshot(request(&users_me(), org, "r-1")).await.unwrap();
    let r = receipt(&res);
    body_bytes(res.into_body()).await;
    assert_eq!(r.settlement(), charged(1, Some(106)));

    let rows = entries(&ledger, org).await;
    let renewals: Vec<_> = rows
        .iter()
        .filter(|e| e.kind == EntryKind::Renewal)
        .map(|e| tollgate_core::time::rfc3339_from_ms(e.at_ms))
        .collect();
    assert_eq!(
        renewals,
        vec![
            "2023-02-28T07:35:02.748Z",
            "2023-03-28T07:35:02.748Z",
            "2023-04-28T07:35:02.748Z"
        ]
    );
    assert_eq!(replay(&rows), (99, 7));
}

/// A ledger whose backend is down.
struct DownLedger;

fn down() -> tollgate_core::BackendError {
    tollgate_core::BackendError::unavailable("connection refused")
}

impl Ledger for DownLedger {
    fn hold_for_key(
        &self,
        _: tollgate_core::OrgId,
        _: u64,
        _: Option<tollgate_core::RequestId>,
        _: Option<tollgate_credit_meter::KeyBudget>,
    ) -> tollgate_core::BoxFuture<
        Result<tollgate_credit_meter::HoldOutcome, tollgate_core::BackendError>,
    > {
        Box::pin(async { Err(down()) })
    }
    fn key_spend(
        &self,
        _: tollgate_core::OrgId,
        _: Vec<tollgate_core::KeyId>,
    ) -> tollgate_core::BoxFuture<
        Result<std::collections::HashMap<tollgate_core::KeyId, u64>, tollgate_core::BackendError>,
    > {
        Box::pin(async { Err(down()) })
    }
    fn commit(
        &self,
        _: tollgate_credit_meter::Hold,
    ) -> tollgate_core::BoxFuture<
        Result<tollgate_credit_meter::CommitOutcome, tollgate_core::BackendError>,
    > {
        Box::pin(async { Err(down()) })
    }
    fn release(
        &self,
        _: tollgate_credit_meter::Hold,
    ) -> tollgate_core::BoxFuture<
        Result<tollgate_credit_meter::ReleaseOutcome, tollgate_core::BackendError>,
    > {
        Box::pin(async { Err(down()) })
    }
    fn release_detached(&self, _: tollgate_credit_meter::Hold) {}
    fn extend_holds(
        &self,
        _: Vec<tollgate_credit_meter::Hold>,
    ) -> tollgate_core::BoxFuture<Result<usize, tollgate_core::BackendError>> {
        Box::pin(async { Err(down()) })
    }
    fn hold_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(300)
    }
    fn subscribe(
        &self,
        _: tollgate_core::OrgId,
        _: Plan,
    ) -> tollgate_core::BoxFuture<Result<tollgate_credit_meter::Account, tollgate_core::BackendError>>
    {
        Box::pin(async { Err(down()) })
    }
    fn cancel(
        &self,
        _: tollgate_core::OrgId,
    ) -> tollgate_core::BoxFuture<Result<bool, tollgate_core::BackendError>> {
        Box::pin(async { Err(down()) })
    }
    fn top_up(
        &self,
        _: tollgate_core::OrgId,
        _: u64,
    ) -> tollgate_core::BoxFuture<
        Result<Option<tollgate_credit_meter::Account>, tollgate_core::BackendError>,
    > {
        Box::pin(async { Err(down()) })
    }
    fn top_up_once(
        &self,
        _: tollgate_core::OrgId,
        _: u64,
        _: tollgate_core::RequestId,
    ) -> tollgate_core::BoxFuture<
        Result<Option<tollgate_credit_meter::Account>, tollgate_core::BackendError>,
    > {
        Box::pin(async { Err(down()) })
    }
    fn set_balance(
        &self,
        _: tollgate_core::OrgId,
        _: u64,
    ) -> tollgate_core::BoxFuture<
        Result<Option<tollgate_credit_meter::Account>, tollgate_core::BackendError>,
    > {
        Box::pin(async { Err(down()) })
    }
    fn account(
        &self,
        _: tollgate_core::OrgId,
    ) -> tollgate_core::BoxFuture<
        Result<Option<tollgate_credit_meter::Account>, tollgate_core::BackendError>,
    > {
        Box::pin(async { Err(down()) })
    }
    fn entries(
        &self,
        _: tollgate_core::OrgId,
    ) -> tollgate_core::BoxFuture<
        Result<Vec<tollgate_credit_meter::LedgerEntry>, tollgate_core::BackendError>,
    > {
        Box::pin(async { Err(down()) })
    }
    fn renew_due(&self) -> tollgate_core::BoxFuture<Result<usize, tollgate_core::BackendError>> {
        Box::pin(async { Err(down()) })
    }
    fn sweep_expired_holds(
        &self,
    ) -> tollgate_core::BoxFuture<Result<usize, tollgate_core::BackendError>> {
        Box::pin(async { Err(down()) })
    }
    fn open_holds(&self) -> u64 {
        0
    }
}

#[tokio::test]
async fn a_ledger_that_is_down_is_503_and_not_forwarded() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let svc = ServiceBuilder::new()
        .layer(CreditMeterLayer::from_shared(Arc::new(DownLedger)))
        .service_fn(move |_req: Req| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(ok_json("{}")) }
        });
    let res = svc
        .oneshot(request(&users_me(), tollgate_core::OrgId::new(), "r-1"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        res.extensions().get::<tollgate_core::BackendFailure>(),
        Some(&tollgate_core::BackendFailure { backend: "ledger" })
    );
    assert_eq!(
        body_json(res.into_body()).await,
        json!({
            "error": "A backend this request needs is unavailable. Retry shortly.",
            "code": "SERVICE_UNAVAILABLE"
        })
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_empty_2xx_is_settled_before_the_response_is_handed_on() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(10)).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = meter_over(&ledger, &calls, || status(StatusCode::NO_CONTENT, ""));

    // Nobody polls an empty body, so the charge cannot wait for its end.
    let res = svc
        .clone()
        .oneshot(request(&users_me(), org, "r-1"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(receipt(&res).settlement(), charged(1, Some(9)));
    assert!(res.body().is_end_stream());
    assert_eq!(ledger.open_holds(), 0);

    // An empty body is not JSON: with the envelope's marker it is not billed.
    let mut req = request(&users_me(), org, "r-2");
    req.extensions_mut().insert(JsonBodyRequired);
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(receipt(&res).settlement(), Some(CreditSettlement::Released));
    assert_eq!(balance(&ledger, org).await, 9);
    assert_eq!(ledger.open_holds(), 0);
}
