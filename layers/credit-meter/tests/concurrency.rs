//! Exactness under concurrency: many requests of one org racing for its credits on a
//! multi-threaded runtime.

mod common;

use std::convert::Infallible;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tollgate_core::{CreditSettlement, OrgId, Plan};
use tollgate_credit_meter::{CreditMeterLayer, EntryKind, Ledger, MemoryLedger};
use tower::{service_fn, ServiceBuilder, ServiceExt};

use common::*;

#[derive(Debug, Default)]
struct Tally {
    delivered: u64,
    failed: u64,
    refused: u64,
    receipts_charged: u64,
}

/// Sends `n` concurrent cost-1 requests; the inner service fails with a 500 when `fail(i)`.
async fn race(
    ledger: &Arc<MemoryLedger>,
    org: OrgId,
    n: u64,
    fail: impl Fn(u64) -> bool + Send + Sync + 'static,
) -> Tally {
    let fail = Arc::new(fail);
    let seq = Arc::new(AtomicU64::new(0));
    let svc = ServiceBuilder::new()
        .layer(CreditMeterLayer::new(Arc::clone(ledger)))
        .service(service_fn(move |_req: Request<Full<Bytes>>| {
            let i = seq.fetch_add(1, Ordering::SeqCst);
            let fail = Arc::clone(&fail);
            async move {
                // Let other requests interleave while this one is in flight.
                for _ in 0..(i % 4) {
                    tokio::task::yield_now().await;
                }
                let res = if fail(i) {
                    status(StatusCode::INTERNAL_SERVER_ERROR, r#"{"error":"boom"}"#)
                } else {
                    ok_json(r#"{"ok":true}"#)
                };
                Ok::<_, Infallible>(res)
            }
        }));

    let mut tasks = Vec::new();
    for i in 0..n {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let res = svc
                .oneshot(request(&users_me(), org, &format!("r-{i}")))
                .await
                .unwrap();
            let status = res.status();
            let receipt = res
                .extensions()
                .get::<tollgate_core::CreditReceipt>()
                .cloned();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, receipt.and_then(|r| r.settlement()), body)
        }));
    }
    let mut tally = Tally::default();
    for t in tasks {
        let (status, settlement, body) = t.await.unwrap();
        match status {
            StatusCode::OK => {
                assert_eq!(body, r#"{"ok":true}"#);
                tally.delivered += 1;
                match settlement {
                    Some(CreditSettlement::Charged {
                        used: 1,
                        balance: Some(_),
                    }) => tally.receipts_charged += 1,
                    other => panic!("a delivered 2xx settled as {other:?}"),
                }
            }
            StatusCode::INTERNAL_SERVER_ERROR => {
                assert_eq!(settlement, Some(CreditSettlement::Released));
                tally.failed += 1;
            }
            StatusCode::PAYMENT_REQUIRED => {
                assert_eq!(settlement, None);
                tally.refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_equal_delivered_2xx_when_half_the_requests_fail() {
    const N: u64 = 500;
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(N)).await;
    let coin = RandomState::new();
    let tally = race(&ledger, org, 1_000, move |i| coin.hash_one(i) % 2 == 0).await;

    let final_balance = balance(&ledger, org).await;
    let charged = N - final_balance;
    assert_eq!(charged, tally.delivered, "{tally:?}");
    assert_eq!(tally.receipts_charged, tally.delivered);
    assert_eq!(tally.delivered + tally.failed + tally.refused, 1_000);
    assert!(tally.delivered > 0 && tally.failed > 0, "{tally:?}");
    assert_eq!(ledger.open_holds(), 0);
    assert_eq!(account(&ledger, org).await.held, 0);

    let rows = entries(&ledger, org).await;
    let charges: Vec<_> = rows
        .iter()
        .filter(|e| e.kind == EntryKind::Charge)
        .collect();
    assert_eq!(charges.len() as u64, tally.delivered);
    assert!(charges
        .iter()
        .all(|e| e.delta_plan == -1 && e.delta_topup == 0));
    // Every intermediate balance replays from the rows and none is negative.
    assert_eq!(replay(&rows), (final_balance, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_balance_is_served_when_everyone_races_for_it() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(100)).await;
    let tally = race(&ledger, org, 1_000, |_| false).await;

    assert_eq!(tally.delivered, 100, "{tally:?}");
    assert_eq!(tally.refused, 900, "{tally:?}");
    assert_eq!(tally.failed, 0);
    assert_eq!(balance(&ledger, org).await, 0);
    assert_eq!(ledger.open_holds(), 0);
    let rows = entries(&ledger, org).await;
    assert_eq!(
        rows.iter().filter(|e| e.kind == EntryKind::Charge).count(),
        100
    );
    assert_eq!(replay(&rows), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orgs_do_not_share_credits() {
    let (_clock, ledger) = manual_ledger();
    let a = org_with(&ledger, Plan::Basic, Some(30)).await;
    let b = org_with(&ledger, Plan::Basic, Some(70)).await;
    let (ta, tb) = tokio::join!(
        race(&ledger, a, 200, |_| false),
        race(&ledger, b, 200, |_| false)
    );
    assert_eq!((ta.delivered, ta.refused), (30, 170));
    assert_eq!((tb.delivered, tb.refused), (70, 130));
    assert_eq!(ledger.open_holds(), 0);
}
