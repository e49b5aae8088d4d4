//! `MemoryLogSink`: retention, filters, org isolation, cursor paging, the row cap.
#![cfg(feature = "memory")]

use std::collections::HashSet;
use std::time::Duration;

use tollgate_core::{BackendErrorKind, ErrorCode, KeyId, ManualClock, ModelId, OrgId};
use tollgate_request_logger::{LogCursor, LogQuery, LogRecord, LogSink, MemoryLogSink, RETENTION};

const DAY: u64 = 24 * 60 * 60 * 1_000;
const NOW: u64 = 1_700_000_000_000;

fn row(org: Option<OrgId>, time_ms: u64, id: &str) -> LogRecord {
    LogRecord {
        time_ms,
        request_id: id.to_owned(),
        org_id: org,
        key_id: org.map(|_| KeyId::new()),
        model_id: None,
        method: "GET".into(),
        route: Some("/api/models/:id/users/me".into()),
        status: 200,
        code: None,
        credits: 1,
        latency_ms: 12,
    }
}

fn ids(records: &[LogRecord]) -> Vec<&str> {
    records.iter().map(|r| r.request_id.as_str()).collect()
}

async fn query_ids(sink: &MemoryLogSink, q: LogQuery) -> Vec<String> {
    let page = sink.query(q).await.unwrap();
    ids(&page.records).into_iter().map(str::to_owned).collect()
}

#[tokio::test]
async fn rows_older_than_fourteen_days_are_gone() {
    assert_eq!(RETENTION, Duration::from_secs(14 * 24 * 3600));
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
    assert_eq!(
        query_ids(&sink, LogQuery::new(org)).await,
        ["exactly-14d", "yesterday", "now"]
    );

    // One millisecond later the 14-day-old rows are older than 14 days.
    clock.advance(Duration::from_millis(1));
    assert_eq!(
        query_ids(&sink, LogQuery::new(org)).await,
        ["yesterday", "now"]
    );
    assert_eq!(sink.len(), 2, "expired rows are deleted, not just hidden");

    // Rolling: each row goes 14 days after its own time.
    clock.advance(Duration::from_millis(13 * DAY));
    assert_eq!(query_ids(&sink, LogQuery::new(org)).await, ["now"]);
    clock.advance(Duration::from_millis(DAY));
    assert!(query_ids(&sink, LogQuery::new(org)).await.is_empty());
    assert!(sink.is_empty());

    // A query's own bounds cannot reach behind the retention either.
    sink.write_batch(vec![row(Some(org), NOW + 15 * DAY - 10, "fresh")])
        .await
        .unwrap();
    clock.advance(Duration::from_millis(15 * DAY));
    let mut q = LogQuery::new(org);
    q.from_ms = Some(0);
    assert!(query_ids(&sink, q).await.is_empty());
}

#[tokio::test]
async fn purge_removes_rows_before_the_cutoff_and_counts_them() {
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
    assert_eq!(sink.purge_older_than(NOW - 4 * 60_000).await.unwrap(), 5);
    assert_eq!(sink.purge_older_than(NOW - 4 * 60_000).await.unwrap(), 0);
    assert_eq!(
        query_ids(&sink, LogQuery::new(org)).await,
        ["m4", "m3", "m2", "m1", "m0"]
    );
    // Now m2 is exactly one hour old (kept); m3 and m4 are older.
    clock.advance(Duration::from_secs(3600 - 2 * 60));
    assert_eq!(sink.purge_expired(), 2);
    assert_eq!(sink.len(), 3);
}

#[tokio::test]
async fn filters_by_time_model_and_status() {
    let sink = MemoryLogSink::new(ManualClock::new(NOW));
    let org = OrgId::new();
    let (m1, m2) = (ModelId::new(), ModelId::new());
    let mut rows = Vec::new();
    for i in 0..12u64 {
        let mut r = row(Some(org), NOW - 1_000 + i * 10, &format!("r{i}"));
        r.model_id = Some(if i % 2 == 0 { m1 } else { m2 });
        if i % 3 == 0 {
            r.status = 429;
            r.code = Some(ErrorCode::RateLimitExceeded);
            r.credits = 0;
        }
        rows.push(r);
    }
    sink.write_batch(rows).await.unwrap();

    let mut q = LogQuery::new(org);
    q.from_ms = Some(NOW - 1_000 + 20);
    q.to_ms = Some(NOW - 1_000 + 60);
    assert_eq!(query_ids(&sink, q.clone()).await, ["r2", "r3", "r4", "r5"]);

    q.model = Some(m1);
    assert_eq!(query_ids(&sink, q.clone()).await, ["r2", "r4"]);

    let mut q = LogQuery::new(org);
    q.status = Some(429);
    assert_eq!(query_ids(&sink, q.clone()).await, ["r0", "r3", "r6", "r9"]);
    q.model = Some(m2);
    assert_eq!(query_ids(&sink, q.clone()).await, ["r3", "r9"]);
    q.status = Some(500);
    assert!(query_ids(&sink, q).await.is_empty());

    // Empty and inverted ranges are empty, not errors.
    let mut q = LogQuery::new(org);
    q.from_ms = Some(NOW);
    q.to_ms = Some(NOW);
    assert!(query_ids(&sink, q.clone()).await.is_empty());
    q.to_ms = Some(NOW - 500);
    assert!(query_ids(&sink, q).await.is_empty());
}

#[tokio::test]
async fn an_org_sees_only_its_own_rows() {
    let sink = MemoryLogSink::new(ManualClock::new(NOW));
    let (a, b, c) = (OrgId::new(), OrgId::new(), OrgId::new());
    sink.write_batch(vec![
        row(Some(a), NOW - 3, "a1"),
        row(Some(b), NOW - 2, "b1"),
        row(None, NOW - 2, "anonymous"),
        row(Some(a), NOW - 1, "a2"),
    ])
    .await
    .unwrap();
    assert_eq!(query_ids(&sink, LogQuery::new(a)).await, ["a1", "a2"]);
    assert_eq!(query_ids(&sink, LogQuery::new(b)).await, ["b1"]);
    assert!(query_ids(&sink, LogQuery::new(c)).await.is_empty());

    // A cursor is only a position: used with another org it still shows that org's rows
    // alone.
    let mut q = LogQuery::new(a);
    q.limit = 1;
    let page = sink.query(q).await.unwrap();
    assert_eq!(ids(&page.records), ["a1"]);
    let mut q = LogQuery::new(b);
    q.cursor = page.next_cursor;
    assert_eq!(query_ids(&sink, q).await, ["b1"]);
}

#[tokio::test]
async fn cursor_paging_over_a_thousand_rows_returns_each_exactly_once() {
    let sink = MemoryLogSink::new(ManualClock::new(NOW));
    let org = OrgId::new();
    let other = OrgId::new();
    // 1,000 rows over only 40 distinct timestamps (many ties), written out of order in
    // several batches, interleaved with another org's rows.
    let mut all = Vec::new();
    for i in 0..1_000u64 {
        let time = NOW - 10_000 + (i * 7919 % 40) * 100;
        let mut r = row(Some(org), time, &format!("row-{i}"));
        r.status = if i % 5 == 0 { 502 } else { 200 };
        all.push(r);
        all.push(row(Some(other), time, &format!("other-{i}")));
    }
    for batch in all.chunks(137) {
        sink.write_batch(batch.to_vec()).await.unwrap();
    }

    for (status, expected) in [(None, 1_000usize), (Some(502), 200)] {
        let mut seen = HashSet::new();
        let mut times = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let mut q = LogQuery::new(org);
            q.limit = 37;
            q.status = status;
            q.cursor = cursor.take();
            let page = sink.query(q).await.unwrap();
            pages += 1;
            assert!(page.records.len() <= 37);
            for r in &page.records {
                assert_eq!(r.org_id, Some(org));
                assert!(seen.insert(r.request_id.clone()), "{} twice", r.request_id);
                times.push(r.time_ms);
            }
            match page.next_cursor {
                Some(c) => {
                    assert_eq!(page.records.len(), 37);
                    cursor = Some(c);
                }
                None => break,
            }
        }
        assert_eq!(seen.len(), expected);
        assert_eq!(pages, expected.div_ceil(37));
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "ordered by time");
    }

    // Rows arriving while a client pages (newer ones) show up at the end, nothing repeats.
    let mut q = LogQuery::new(org);
    q.limit = 600;
    let first = sink.query(q.clone()).await.unwrap();
    sink.write_batch(vec![row(Some(org), NOW, "late")])
        .await
        .unwrap();
    q.cursor = first.next_cursor;
    let second = sink.query(q).await.unwrap();
    assert_eq!(first.records.len() + second.records.len(), 1_001);
    assert_eq!(second.records.last().unwrap().request_id, "late");
    assert_eq!(second.next_cursor, None);
}

#[tokio::test]
async fn a_cursor_that_is_not_ours_is_an_error() {
    let sink = MemoryLogSink::new(ManualClock::new(NOW));
    let mut q = LogQuery::new(OrgId::new());
    q.cursor = Some("page-2".into());
    let err = sink.query(q.clone()).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Other);
    assert_eq!(err.to_string(), "backend error: invalid log cursor");
    // A well-formed cursor past everything is just the end.
    q.cursor = Some(
        LogCursor {
            time_ms: u64::MAX,
            tiebreak: u64::MAX,
        }
        .encode(),
    );
    let page = sink.query(q).await.unwrap();
    assert!(page.records.is_empty());
    assert_eq!(page.next_cursor, None);
}

#[tokio::test]
async fn the_row_cap_drops_the_oldest_first() {
    let sink = MemoryLogSink::new(ManualClock::new(NOW)).with_max_rows(5);
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
    assert_eq!(sink.len(), 5);
    assert_eq!(ids(&sink.all()), ["a50", "b40", "a30", "a20", "b10"]);
    assert_eq!(
        query_ids(&sink, LogQuery::new(a)).await,
        ["a50", "a30", "a20"]
    );
    assert_eq!(query_ids(&sink, LogQuery::new(b)).await, ["b40", "b10"]);
}

#[tokio::test]
async fn limits_are_clamped() {
    let sink = MemoryLogSink::new(ManualClock::new(NOW));
    let org = OrgId::new();
    sink.write_batch(
        (0..3)
            .map(|i| row(Some(org), NOW - 3 + i, &format!("l{i}")))
            .collect(),
    )
    .await
    .unwrap();
    let mut q = LogQuery::new(org);
    q.limit = 0;
    let page = sink.query(q).await.unwrap();
    assert_eq!(ids(&page.records), ["l0"]);
    assert!(page.next_cursor.is_some());
}
