//! `UsageStore` behaviours.

use std::sync::Arc;

use tollgate_accounts::{
    Granularity, GroupBy, UsageBatch, UsageBucket, UsageCounts, UsageKey, UsageQuery, UsageRow,
    UsageStore, DAY_MS, HOUR_MS, USAGE_RETENTION,
};
use tollgate_core::Clock as _;
use tollgate_core::{ManualClock, ModelId, OrgId};

const CHATS: &str = "/api/models/:id/chats";
const ME: &str = "/api/models/:id/users/me";

fn q(
    org: OrgId,
    from_ms: u64,
    to_ms: u64,
    granularity: Granularity,
    model: bool,
    route: bool,
) -> UsageQuery {
    UsageQuery {
        org,
        from_ms,
        to_ms,
        granularity,
        group_by: GroupBy { model, route },
    }
}

fn counts(
    requests: u64,
    ok: u64,
    client: u64,
    server: u64,
    limited: u64,
    credits: u64,
) -> UsageCounts {
    UsageCounts {
        requests,
        ok,
        client_errors: client,
        server_errors: server,
        rate_limited: limited,
        credits,
    }
}

/// The current hour of the clock.
fn hour(clock: &ManualClock) -> u64 {
    let now = clock.now_ms();
    now - now % HOUR_MS
}

pub async fn rows_add_into_existing_rows<S: UsageStore>(store: Arc<S>, clock: ManualClock) {
    let (org, model) = (OrgId::new(), ModelId::new());
    let h = hour(&clock);
    for (status, credits) in [(200, 1), (429, 0)] {
        let mut batch = UsageBatch::default();
        batch.record(org, h + 10, Some(model), Some(CHATS), status, credits);
        store.add(batch.into_rows()).await.unwrap();
    }
    // Duplicate keys within one call are summed too.
    let key = UsageKey {
        org,
        hour_ms: h,
        model: Some(model),
        route: Some(CHATS.into()),
    };
    store
        .add(vec![
            UsageRow {
                key: key.clone(),
                counts: UsageCounts::of_request(502, 0),
            },
            UsageRow {
                key,
                counts: UsageCounts::of_request(200, 2),
            },
        ])
        .await
        .unwrap();
    store.add(Vec::new()).await.unwrap();
    let got = store
        .query(q(org, h, h + HOUR_MS, Granularity::Hour, false, false))
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![UsageBucket {
            start_ms: h,
            model: None,
            route: None,
            counts: counts(4, 2, 1, 1, 1, 3)
        }]
    );
}

pub async fn queries_group_by_time_model_and_route<S: UsageStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let org = OrgId::new();
    let (m1, m2) = (ModelId::new(), ModelId::new());
    let (lo, hi) = if m1 < m2 { (m1, m2) } else { (m2, m1) };
    let h = hour(&clock) - 2 * HOUR_MS;
    let mut batch = UsageBatch::default();
    batch.record(org, h + 1, Some(lo), Some(CHATS), 200, 1);
    batch.record(org, h + 2, Some(lo), Some(ME), 200, 1);
    batch.record(org, h + 3, Some(hi), Some(ME), 402, 0);
    batch.record(org, h + 4, None, Some("/api/credits"), 200, 0);
    batch.record(org, h + HOUR_MS, Some(hi), Some(CHATS), 499, 0);
    store.add(batch.into_rows()).await.unwrap();
    let range = (h, h + 2 * HOUR_MS);

    let whole = store
        .query(q(org, range.0, range.1, Granularity::Hour, false, false))
        .await
        .unwrap();
    assert_eq!(
        whole,
        vec![
            UsageBucket {
                start_ms: h,
                model: None,
                route: None,
                counts: counts(4, 3, 1, 0, 0, 2)
            },
            UsageBucket {
                start_ms: h + HOUR_MS,
                model: None,
                route: None,
                counts: counts(1, 0, 1, 0, 0, 0)
            },
        ]
    );

    let by_model = store
        .query(q(org, range.0, range.1, Granularity::Hour, true, false))
        .await
        .unwrap();
    let shape: Vec<_> = by_model
        .iter()
        .map(|b| (b.start_ms, b.model, b.route.clone(), b.counts.requests))
        .collect();
    assert_eq!(
        shape,
        vec![
            (h, None, None, 1),
            (h, Some(lo), None, 2),
            (h, Some(hi), None, 1),
            (h + HOUR_MS, Some(hi), None, 1),
        ]
    );

    let by_route = store
        .query(q(org, range.0, range.1, Granularity::Hour, false, true))
        .await
        .unwrap();
    let shape: Vec<_> = by_route
        .iter()
        .map(|b| (b.start_ms, b.route.clone(), b.counts.requests))
        .collect();
    assert_eq!(
        shape,
        vec![
            (h, Some("/api/credits".to_owned()), 1),
            (h, Some(CHATS.to_owned()), 1),
            (h, Some(ME.to_owned()), 2),
            (h + HOUR_MS, Some(CHATS.to_owned()), 1),
        ]
    );

    let both = store
        .query(q(org, range.0, range.1, Granularity::Hour, true, true))
        .await
        .unwrap();
    assert_eq!(both.len(), 5);
    assert_eq!(
        (both[1].model, both[1].route.as_deref(), both[1].counts),
        (Some(lo), Some(CHATS), counts(1, 1, 0, 0, 0, 1))
    );
    let total: u64 = both.iter().map(|b| b.counts.requests).sum();
    assert_eq!(total, 5);
}

pub async fn day_buckets_sum_the_hours_of_utc_days<S: UsageStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let org = OrgId::new();
    let today = clock.now_ms() - clock.now_ms() % DAY_MS;
    let mut batch = UsageBatch::default();
    batch.record(org, today - DAY_MS, None, Some("/api/credits"), 200, 0); // yesterday 00:00
    batch.record(org, today - 1, None, Some("/api/credits"), 200, 0); // yesterday 23:59
    batch.record(org, today, None, Some("/api/credits"), 500, 0); // today 00:00
    store.add(batch.into_rows()).await.unwrap();
    let days = store
        .query(q(
            org,
            today - DAY_MS,
            today + DAY_MS,
            Granularity::Day,
            false,
            false,
        ))
        .await
        .unwrap();
    assert_eq!(
        days,
        vec![
            UsageBucket {
                start_ms: today - DAY_MS,
                model: None,
                route: None,
                counts: counts(2, 2, 0, 0, 0, 0)
            },
            UsageBucket {
                start_ms: today,
                model: None,
                route: None,
                counts: counts(1, 0, 0, 1, 0, 0)
            },
        ]
    );
}

pub async fn ranges_are_half_open_and_orgs_separate<S: UsageStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let (org, other) = (OrgId::new(), OrgId::new());
    let h = hour(&clock) - 3 * HOUR_MS;
    let mut batch = UsageBatch::default();
    for i in 0..3 {
        batch.record(org, h + i * HOUR_MS, None, Some("/api/logs"), 200, 0);
        batch.record(other, h + i * HOUR_MS, None, Some("/api/logs"), 200, 0);
    }
    store.add(batch.into_rows()).await.unwrap();
    let got = store
        .query(q(
            org,
            h + HOUR_MS,
            h + 2 * HOUR_MS,
            Granularity::Hour,
            false,
            false,
        ))
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|b| b.start_ms).collect::<Vec<_>>(),
        vec![h + HOUR_MS]
    );
    let all = store
        .query(q(org, h, h + 3 * HOUR_MS, Granularity::Hour, false, false))
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|b| b.counts.requests).sum::<u64>(),
        3,
        "never another org's rows"
    );
    assert!(store
        .query(q(
            OrgId::new(),
            h,
            h + 3 * HOUR_MS,
            Granularity::Hour,
            true,
            true
        ))
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .query(q(
            org,
            h + HOUR_MS,
            h + HOUR_MS,
            Granularity::Hour,
            false,
            false
        ))
        .await
        .unwrap()
        .is_empty());
}

pub async fn rows_older_than_400_days_are_neither_returned_nor_kept<S: UsageStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let org = OrgId::new();
    let retention = USAGE_RETENTION.as_millis() as u64;
    let now = clock.now_ms();
    let old = now - retention - 2 * HOUR_MS;
    let kept = now - retention + 2 * HOUR_MS;
    let mut batch = UsageBatch::default();
    batch.record(org, old, None, Some("/api/credits"), 200, 0);
    batch.record(org, kept, None, Some("/api/credits"), 200, 0);
    store.add(batch.into_rows()).await.unwrap();
    let got = store
        .query(q(org, 0, now + HOUR_MS, Granularity::Hour, false, false))
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].start_ms, kept - kept % HOUR_MS);
    assert_eq!(store.purge_older_than(now - retention).await.unwrap(), 1);
    assert_eq!(store.purge_older_than(now - retention).await.unwrap(), 0);
}

pub async fn concurrent_adds_are_exact<S: UsageStore>(store: Arc<S>, clock: ManualClock) {
    let org = OrgId::new();
    let models: Vec<ModelId> = (0..4).map(|_| ModelId::new()).collect();
    let h = hour(&clock);
    let tasks: Vec<_> = (0..16u64)
        .map(|i| {
            let store = Arc::clone(&store);
            let models = models.clone();
            tokio::spawn(async move {
                let mut batch = UsageBatch::default();
                // Each task touches every model's row, in its own order.
                for (j, m) in models.iter().enumerate() {
                    let status = if (i + j as u64).is_multiple_of(2) {
                        200
                    } else {
                        429
                    };
                    batch.record(
                        org,
                        h + i,
                        Some(*m),
                        Some(CHATS),
                        status,
                        u64::from(status == 200),
                    );
                }
                store.add(batch.into_rows()).await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let got = store
        .query(q(org, h, h + HOUR_MS, Granularity::Hour, true, false))
        .await
        .unwrap();
    assert_eq!(got.len(), 4);
    for b in got {
        assert_eq!(
            (
                b.counts.requests,
                b.counts.ok,
                b.counts.rate_limited,
                b.counts.credits
            ),
            (16, 8, 8, 8)
        );
    }
}
