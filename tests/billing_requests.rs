//! The billing requests store (docs/contract.md §12, money): the same behaviour on memory and
//! PostgreSQL — pending lists, per-org history, and one decision per request under
//! concurrency (an approval is applied once).

use std::sync::Arc;

use tollgate::gateway::billing::{
    Ask, BillingRequest, BillingRequests, MemoryBillingRequests, PostgresBillingRequests,
    RequestState,
};
use tollgate_core::{OrgId, Plan};
use tollgate_postgres::testing::TestDb;
use uuid::Uuid;

fn request(org: OrgId, ask: Ask, at: u64) -> BillingRequest {
    BillingRequest {
        id: Uuid::new_v4(),
        org,
        ask,
        by: "owner@example.com".into(),
        state: RequestState::Pending,
        created_ms: at,
        decided_ms: None,
    }
}

async fn behaviour(store: Arc<dyn BillingRequests>) {
    let a = OrgId::new();
    let b = OrgId::new();
    let r1 = request(a, Ask::TopUp { amount: 2_500 }, 1_000);
    let r2 = request(a, Ask::PlanChange { plan: Plan::Pro }, 2_000);
    let r3 = request(b, Ask::TopUp { amount: 7 }, 1_500);
    for r in [&r1, &r2, &r3] {
        store.create(r.clone()).await.unwrap();
    }
    let pending = store.pending().await.unwrap();
    let mine: Vec<_> = pending
        .iter()
        .filter(|r| r.org == a || r.org == b)
        .collect();
    assert_eq!(
        mine.iter().map(|r| r.id).collect::<Vec<_>>(),
        [r1.id, r3.id, r2.id],
        "oldest first"
    );
    assert_eq!(
        store.of_org(a, 10).await.unwrap(),
        vec![r2.clone(), r1.clone()],
        "newest first"
    );
    assert_eq!(store.of_org(a, 1).await.unwrap().len(), 1);

    // Ten decisions at once: exactly one gets the request.
    let racing = (0..10).map(|i| {
        let store = Arc::clone(&store);
        let to = if i % 2 == 0 {
            RequestState::Approved
        } else {
            RequestState::Declined
        };
        tokio::spawn(async move { store.decide(r1.id, to, 5_000).await.unwrap() })
    });
    let won: Vec<_> = futures_util::future::join_all(racing)
        .await
        .into_iter()
        .filter_map(|r| r.unwrap())
        .collect();
    assert_eq!(won.len(), 1, "one decision wins");
    assert_eq!(won[0].ask, Ask::TopUp { amount: 2_500 });
    assert_eq!(won[0].state, RequestState::Pending, "as it was");
    let after = store.of_org(a, 10).await.unwrap();
    let decided = after.iter().find(|r| r.id == r1.id).unwrap();
    assert_ne!(decided.state, RequestState::Pending);
    assert_eq!(decided.decided_ms, Some(5_000));
    assert!(store.pending().await.unwrap().iter().all(|r| r.id != r1.id));
    assert_eq!(
        store
            .decide(Uuid::new_v4(), RequestState::Approved, 1)
            .await
            .unwrap(),
        None
    );

    // A failed application puts it back.
    assert!(store
        .decide(r2.id, RequestState::Approved, 6_000)
        .await
        .unwrap()
        .is_some());
    store.reopen(r2.id).await.unwrap();
    assert!(store.pending().await.unwrap().iter().any(|r| r.id == r2.id));
    assert!(store
        .decide(r2.id, RequestState::Declined, 7_000)
        .await
        .unwrap()
        .is_some());
    let r2_after = store
        .of_org(a, 10)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.id == r2.id)
        .unwrap();
    assert_eq!(r2_after.state, RequestState::Declined);

    // Approved top-ups not marked applied are listed for the reconciliation, oldest decision
    // first; applied ones, plan changes and declined ones are not.
    let r4 = request(b, Ask::TopUp { amount: 9 }, 3_000);
    store.create(r4.clone()).await.unwrap();
    store
        .decide(r3.id, RequestState::Approved, 8_000)
        .await
        .unwrap()
        .unwrap();
    store
        .decide(r4.id, RequestState::Approved, 9_000)
        .await
        .unwrap()
        .unwrap();
    let listed = || async {
        store
            .unapplied_top_ups(100)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.org == a || r.org == b)
            .map(|r| r.id)
            .collect::<Vec<_>>()
    };
    let r1_approved = decided.state == RequestState::Approved;
    let expected = |ids: &[Uuid]| -> Vec<Uuid> {
        let mut all = if r1_approved { vec![r1.id] } else { vec![] };
        all.extend_from_slice(ids);
        all
    };
    assert_eq!(listed().await, expected(&[r3.id, r4.id]));
    store.mark_applied(r3.id, 9_500).await.unwrap();
    assert_eq!(listed().await, expected(&[r4.id]));
    // A reopened request is applied anew when approved again.
    store.mark_applied(r4.id, 9_600).await.unwrap();
    assert_eq!(listed().await, expected(&[]));
    store.reopen(r4.id).await.unwrap();
    assert_eq!(listed().await, expected(&[]), "pending, not approved");
    store
        .decide(r4.id, RequestState::Approved, 9_700)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(listed().await, expected(&[r4.id]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_billing_requests_keep_their_promises() {
    behaviour(Arc::new(MemoryBillingRequests::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_billing_requests_keep_their_promises() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = PostgresBillingRequests::new(db.pool().clone())
        .await
        .unwrap();
    behaviour(Arc::new(store)).await;
    db.cleanup().await;
}
