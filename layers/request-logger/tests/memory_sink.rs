//! `MemoryLogSink`: the shared sink suite (`tests/suite`, also run against PostgreSQL by
//! `tests/postgres.rs`) plus what only the memory sink has: deleting expired rows as it goes
//! and the row cap.
#![cfg(feature = "memory")]

mod suite;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::{ManualClock, OrgId};
use tollgate_request_logger::{LogQuery, LogSink, MemoryLogSink};

use suite::{query_ids, row, Backend, DAY, NOW};

struct Memory;

impl Backend for Memory {
    fn sink(
        &self,
        clock: &ManualClock,
        retention: Duration,
    ) -> impl Future<Output = Arc<dyn LogSink>> + Send {
        let sink: Arc<dyn LogSink> =
            Arc::new(MemoryLogSink::new(clock.clone()).with_retention(retention));
        std::future::ready(sink)
    }
}

macro_rules! memory_suite {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                suite::$name(&Memory).await;
            }
        )*
    };
}

memory_suite!(
    rows_older_than_the_retention_are_never_returned,
    purge_removes_rows_before_the_cutoff_and_counts_them,
    purging_across_many_days_is_exact,
    records_keep_every_field,
    an_empty_batch_is_fine,
    filters_by_time_model_and_status,
    an_org_sees_only_its_own_rows,
    cursor_paging_over_a_thousand_rows_returns_each_exactly_once,
    a_cursor_that_is_not_ours_is_an_error,
    limits_are_clamped,
    a_full_last_page_has_no_cursor,
);

#[tokio::test]
async fn expired_rows_are_deleted_not_just_hidden() {
    let clock = ManualClock::new(NOW);
    let sink = MemoryLogSink::new(clock.clone());
    let org = OrgId::new();
    sink.write_batch(vec![
        row(Some(org), NOW - 15 * DAY, "too-old"),
        row(Some(org), NOW - 14 * DAY, "exactly-14d"),
        row(Some(org), NOW - DAY, "yesterday"),
        row(Some(org), NOW, "now"),
        row(None, NOW - 14 * DAY, "anonymous-14d"),
    ])
    .await
    .unwrap();
    // Already expired on arrival: never stored.
    assert_eq!(sink.len(), 4);
    clock.advance(Duration::from_millis(1));
    assert_eq!(
        query_ids(&sink, LogQuery::new(org)).await,
        ["yesterday", "now"]
    );
    assert_eq!(sink.len(), 2, "expired rows are deleted, not just hidden");
    clock.advance(Duration::from_millis(14 * DAY));
    assert!(query_ids(&sink, LogQuery::new(org)).await.is_empty());
    assert!(sink.is_empty());
}

#[tokio::test]
async fn purge_expired_applies_the_retention_now() {
    let clock = ManualClock::new(NOW);
    let sink = MemoryLogSink::new(clock.clone()).with_retention(Duration::from_secs(3600));
    let org = OrgId::new();
    sink.write_batch(
        (0..10)
            .map(|i| row(Some(org), NOW - i * 60_000, &format!("m{i}")))
            .collect(),
    )
    .await
    .unwrap();
    // Now m2 is exactly one hour old (kept); m3 to m9 are older.
    clock.advance(Duration::from_secs(3600 - 2 * 60));
    assert_eq!(sink.purge_expired(), 7);
    assert_eq!(sink.len(), 3);
}

#[tokio::test]
async fn the_row_cap_is_per_org_and_drops_its_oldest_first() {
    let sink = MemoryLogSink::new(ManualClock::new(NOW)).with_max_rows(3);
    let (a, b) = (OrgId::new(), OrgId::new());
    sink.write_batch(vec![
        row(Some(a), NOW - 50, "a50"),
        row(Some(b), NOW - 10, "b10"),
        row(Some(a), NOW - 70, "a70"),
    ])
    .await
    .unwrap();
    sink.write_batch(vec![
        row(Some(b), NOW - 60, "b60"),
        row(Some(a), NOW - 20, "a20"),
        row(Some(b), NOW - 40, "b40"),
        row(Some(a), NOW - 30, "a30"),
    ])
    .await
    .unwrap();
    // a had 4 rows: its oldest went; b's 3 rows are all kept, whatever a wrote.
    assert_eq!(sink.len(), 6);
    assert_eq!(
        query_ids(&sink, LogQuery::new(a)).await,
        ["a50", "a30", "a20"]
    );
    assert_eq!(
        query_ids(&sink, LogQuery::new(b)).await,
        ["b60", "b40", "b10"]
    );
}

#[tokio::test]
async fn anonymous_floods_keep_every_orgs_rows_and_are_bounded() {
    let sink = MemoryLogSink::new(ManualClock::new(NOW)).with_max_anonymous_rows(1_000);
    let orgs = suite::anonymous_flood_keeps_every_orgs_rows(&sink, 50_000).await;
    assert_eq!(orgs, 3);
    assert_eq!(
        sink.anonymous_len(),
        1_000,
        "anonymous rows stay within their cap"
    );
    // The newest anonymous rows are the ones kept.
    let anonymous: Vec<_> = sink
        .all()
        .into_iter()
        .filter(|r| r.org_id.is_none())
        .collect();
    assert_eq!(anonymous.len(), 1_000);
    assert_eq!(anonymous.last().unwrap().request_id, "anon-49999");
    assert_eq!(anonymous.first().unwrap().request_id, "anon-49000");
}
