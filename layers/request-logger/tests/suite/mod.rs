//! The behaviour every [`LogSink`] must have, written once and run against each backend
//! (`tests/memory_sink.rs`: memory; `tests/postgres.rs`: PostgreSQL), so the backends cannot
//! drift apart. Each function takes a [`Backend`] that makes sinks over one fresh store.
#![allow(dead_code)]

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::{BackendErrorKind, ErrorCode, KeyId, ManualClock, ModelId, OrgId};
use tollgate_request_logger::{LogCursor, LogQuery, LogRecord, LogSink, RETENTION};

pub const DAY: u64 = 24 * 60 * 60 * 1_000;
/// 2023-11-14T22:13:20Z: close to the end of a UTC day, so day boundaries are crossed.
pub const NOW: u64 = 1_700_000_000_000;

/// Makes sinks over one store.
pub trait Backend: Send + Sync {
    /// A new sink over the backend's store, reading the time from `clock` and keeping
    /// `retention`. Calling it again gives another instance over the same store (another
    /// replica, or the same one after a restart) where the backend has one.
    fn sink(
        &self,
        clock: &ManualClock,
        retention: Duration,
    ) -> impl Future<Output = Arc<dyn LogSink>> + Send;
}

async fn fresh(backend: &impl Backend) -> (ManualClock, Arc<dyn LogSink>) {
    let clock = ManualClock::new(NOW);
    let sink = backend.sink(&clock, RETENTION).await;
    (clock, sink)
}

pub fn row(org: Option<OrgId>, time_ms: u64, id: &str) -> LogRecord {
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

pub fn ids(records: &[LogRecord]) -> Vec<&str> {
    records.iter().map(|r| r.request_id.as_str()).collect()
}

pub async fn query_ids(sink: &dyn LogSink, q: LogQuery) -> Vec<String> {
    let page = sink.query(q).await.unwrap();
    ids(&page.records).into_iter().map(str::to_owned).collect()
}

/// Every record of `org` matching `q`, following the cursor to the end.
pub async fn all_pages(sink: &dyn LogSink, mut q: LogQuery) -> Vec<LogRecord> {
    let mut out = Vec::new();
    loop {
        let page = sink.query(q.clone()).await.unwrap();
        out.extend(page.records);
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => return out,
        }
    }
}

pub async fn rows_older_than_the_retention_are_never_returned(backend: &impl Backend) {
    assert_eq!(RETENTION, Duration::from_secs(14 * 24 * 3600));
    let (clock, sink) = fresh(backend).await;
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
    assert_eq!(
        query_ids(&*sink, LogQuery::new(org)).await,
        ["exactly-14d", "yesterday", "now"]
    );
    // Already expired on arrival: never stored, so there is nothing to purge.
    assert_eq!(sink.purge_older_than(NOW - 14 * DAY).await.unwrap(), 0);

    // One millisecond later the 14-day-old rows are older than 14 days.
    clock.advance(Duration::from_millis(1));
    assert_eq!(
        query_ids(&*sink, LogQuery::new(org)).await,
        ["yesterday", "now"]
    );

    // Rolling: each row goes 14 days after its own time.
    clock.advance(Duration::from_millis(13 * DAY));
    assert_eq!(query_ids(&*sink, LogQuery::new(org)).await, ["now"]);
    clock.advance(Duration::from_millis(DAY));
    assert!(query_ids(&*sink, LogQuery::new(org)).await.is_empty());

    // A query's own bounds cannot reach behind the retention either.
    sink.write_batch(vec![row(Some(org), NOW + 15 * DAY - 10, "fresh")])
        .await
        .unwrap();
    assert_eq!(query_ids(&*sink, LogQuery::new(org)).await, ["fresh"]);
    clock.advance(Duration::from_millis(15 * DAY));
    let mut q = LogQuery::new(org);
    q.from_ms = Some(0);
    assert!(query_ids(&*sink, q).await.is_empty());
}

pub async fn purge_removes_rows_before_the_cutoff_and_counts_them(backend: &impl Backend) {
    let clock = ManualClock::new(NOW);
    let sink = backend.sink(&clock, Duration::from_secs(3600)).await;
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
        query_ids(&*sink, LogQuery::new(org)).await,
        ["m4", "m3", "m2", "m1", "m0"]
    );
    // Now m2 is exactly one hour old (kept); m3 and m4 are older.
    clock.advance(Duration::from_secs(3600 - 2 * 60));
    assert_eq!(
        sink.purge_older_than(NOW + (3600 - 2 * 60) * 1_000 - 3_600_000)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        query_ids(&*sink, LogQuery::new(org)).await,
        ["m2", "m1", "m0"]
    );
}

/// Rows over three weeks, several a day: a purge takes exactly the rows before the cutoff,
/// whole days and part of the boundary day, of every org and of no org.
pub async fn purging_across_many_days_is_exact(backend: &impl Backend) {
    let clock = ManualClock::new(NOW);
    let sink = backend.sink(&clock, Duration::from_secs(30 * 86_400)).await;
    let (a, b) = (OrgId::new(), OrgId::new());
    let mut rows = Vec::new();
    for i in 0..21 * 8u64 {
        let time = NOW - 21 * DAY + i * (DAY / 8) + 1;
        let org = match i % 3 {
            0 => Some(a),
            1 => Some(b),
            _ => None,
        };
        rows.push(row(org, time, &format!("r{i}")));
    }
    // Written out of order, across many days in one batch.
    rows.reverse();
    sink.write_batch(rows.clone()).await.unwrap();
    let cutoff = NOW - 9 * DAY - DAY / 3;
    let expected = rows.iter().filter(|r| r.time_ms < cutoff).count() as u64;
    assert!(expected > 90, "{expected}");
    assert_eq!(sink.purge_older_than(cutoff).await.unwrap(), expected);
    assert_eq!(sink.purge_older_than(cutoff).await.unwrap(), 0);

    for org in [a, b] {
        let kept = all_pages(&*sink, LogQuery::new(org)).await;
        let mut want: Vec<_> = rows
            .iter()
            .filter(|r| r.org_id == Some(org) && r.time_ms >= cutoff)
            .cloned()
            .collect();
        want.sort_by_key(|r| r.time_ms);
        assert_eq!(kept, want);
    }
    // Everything else goes at the next cutoff, the rows of no org included.
    let rest = rows.iter().filter(|r| r.time_ms >= cutoff).count() as u64;
    assert_eq!(sink.purge_older_than(NOW + 1).await.unwrap(), rest);
}

pub async fn records_keep_every_field(backend: &impl Backend) {
    let (_clock, sink) = fresh(backend).await;
    let org = OrgId::new();
    let model = ModelId::new();
    let mut rows = Vec::new();
    for (i, code) in ErrorCode::ALL.into_iter().enumerate() {
        let i = i as u64;
        rows.push(LogRecord {
            time_ms: NOW - 100 + i,
            request_id: format!("req-{i}:a.b_c"),
            org_id: Some(org),
            key_id: Some(KeyId::new()),
            model_id: i.is_multiple_of(2).then_some(model),
            method: if i.is_multiple_of(3) { "POST" } else { "GET" }.into(),
            route: (!i.is_multiple_of(4)).then(|| format!("/api/models/:id/\"odd\", route {i} ✓")),
            status: code.status().as_u16(),
            code: Some(code),
            credits: if i == 0 { u64::MAX >> 1 } else { i },
            latency_ms: 1_000 * i,
        });
    }
    rows.push(LogRecord {
        time_ms: NOW,
        request_id: "ok".into(),
        org_id: Some(org),
        key_id: None,
        model_id: None,
        method: "DELETE".into(),
        route: None,
        status: 499,
        code: None,
        credits: 0,
        latency_ms: 0,
    });
    sink.write_batch(rows.clone()).await.unwrap();
    let page = sink.query(LogQuery::new(org)).await.unwrap();
    assert_eq!(page.records, rows);
    assert_eq!(page.next_cursor, None);
}

pub async fn an_empty_batch_is_fine(backend: &impl Backend) {
    let (_clock, sink) = fresh(backend).await;
    sink.write_batch(Vec::new()).await.unwrap();
    let page = sink.query(LogQuery::new(OrgId::new())).await.unwrap();
    assert!(page.records.is_empty());
    assert_eq!(page.next_cursor, None);
}

pub async fn filters_by_time_model_and_status(backend: &impl Backend) {
    let (_clock, sink) = fresh(backend).await;
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
    assert_eq!(query_ids(&*sink, q.clone()).await, ["r2", "r3", "r4", "r5"]);

    q.model = Some(m1);
    assert_eq!(query_ids(&*sink, q.clone()).await, ["r2", "r4"]);

    let mut q = LogQuery::new(org);
    q.status = Some(429);
    assert_eq!(query_ids(&*sink, q.clone()).await, ["r0", "r3", "r6", "r9"]);
    q.model = Some(m2);
    assert_eq!(query_ids(&*sink, q.clone()).await, ["r3", "r9"]);
    q.status = Some(500);
    assert!(query_ids(&*sink, q).await.is_empty());

    // Empty and inverted ranges are empty, not errors.
    let mut q = LogQuery::new(org);
    q.from_ms = Some(NOW);
    q.to_ms = Some(NOW);
    assert!(query_ids(&*sink, q.clone()).await.is_empty());
    q.to_ms = Some(NOW - 500);
    assert!(query_ids(&*sink, q.clone()).await.is_empty());
    // Bounds past anything storable are fine too.
    q.from_ms = Some(u64::MAX);
    q.to_ms = None;
    assert!(query_ids(&*sink, q.clone()).await.is_empty());
    q.from_ms = None;
    q.to_ms = Some(u64::MAX);
    assert_eq!(query_ids(&*sink, q).await.len(), 12);
}

pub async fn an_org_sees_only_its_own_rows(backend: &impl Backend) {
    let (_clock, sink) = fresh(backend).await;
    let (a, b, c) = (OrgId::new(), OrgId::new(), OrgId::new());
    sink.write_batch(vec![
        row(Some(a), NOW - 3, "a1"),
        row(Some(b), NOW - 2, "b1"),
        row(None, NOW - 2, "anonymous"),
        row(Some(a), NOW - 1, "a2"),
    ])
    .await
    .unwrap();
    assert_eq!(query_ids(&*sink, LogQuery::new(a)).await, ["a1", "a2"]);
    assert_eq!(query_ids(&*sink, LogQuery::new(b)).await, ["b1"]);
    assert!(query_ids(&*sink, LogQuery::new(c)).await.is_empty());

    // A cursor is only a position: used with another org it still shows that org's rows
    // alone.
    let mut q = LogQuery::new(a);
    q.limit = 1;
    let page = sink.query(q).await.unwrap();
    assert_eq!(ids(&page.records), ["a1"]);
    let mut q = LogQuery::new(b);
    q.cursor = page.next_cursor;
    assert_eq!(query_ids(&*sink, q).await, ["b1"]);
}

pub async fn cursor_paging_over_a_thousand_rows_returns_each_exactly_once(backend: &impl Backend) {
    let (_clock, sink) = fresh(backend).await;
    let org = OrgId::new();
    let other = OrgId::new();
    // 1,000 rows over only 40 distinct timestamps (many ties) across a day boundary, written
    // out of order in several batches, interleaved with another org's rows.
    let mut all = Vec::new();
    for i in 0..1_000u64 {
        let time = NOW - 10_000 + (i * 7919 % 40) * 100 + (i % 2) * 2 * 3_600_000;
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

    // Rows of one millisecond come in the order they were written.
    let mut q = LogQuery::new(org);
    q.from_ms = Some(NOW - 10_000);
    q.to_ms = Some(NOW - 10_000 + 1);
    let tied: Vec<_> = all_pages(&*sink, q).await;
    let written: Vec<_> = all
        .iter()
        .filter(|r| r.org_id == Some(org) && r.time_ms == NOW - 10_000)
        .cloned()
        .collect();
    assert!(written.len() > 5);
    assert_eq!(tied, written);

    // Rows arriving while a client pages (newer ones) show up at the end, nothing repeats.
    let mut q = LogQuery::new(org);
    q.limit = 600;
    let first = sink.query(q.clone()).await.unwrap();
    sink.write_batch(vec![row(Some(org), NOW + 3 * 3_600_000, "late")])
        .await
        .unwrap();
    q.cursor = first.next_cursor;
    let second = sink.query(q).await.unwrap();
    assert_eq!(first.records.len() + second.records.len(), 1_001);
    assert_eq!(second.records.last().unwrap().request_id, "late");
    assert_eq!(second.next_cursor, None);
}

pub async fn a_cursor_that_is_not_ours_is_an_error(backend: &impl Backend) {
    let (_clock, sink) = fresh(backend).await;
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

pub async fn limits_are_clamped(backend: &impl Backend) {
    let (_clock, sink) = fresh(backend).await;
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
    let page = sink.query(q.clone()).await.unwrap();
    assert_eq!(ids(&page.records), ["l0"]);
    assert!(page.next_cursor.is_some());
    q.limit = usize::MAX;
    let page = sink.query(q).await.unwrap();
    assert_eq!(ids(&page.records), ["l0", "l1", "l2"]);
    assert_eq!(page.next_cursor, None);
}

/// Exactly a page of rows: no cursor, since nothing follows.
pub async fn a_full_last_page_has_no_cursor(backend: &impl Backend) {
    let (_clock, sink) = fresh(backend).await;
    let org = OrgId::new();
    sink.write_batch(
        (0..4)
            .map(|i| row(Some(org), NOW - 10 + i, &format!("p{i}")))
            .collect(),
    )
    .await
    .unwrap();
    let mut q = LogQuery::new(org);
    q.limit = 2;
    let first = sink.query(q.clone()).await.unwrap();
    assert_eq!(ids(&first.records), ["p0", "p1"]);
    q.cursor = first.next_cursor;
    let second = sink.query(q).await.unwrap();
    assert_eq!(ids(&second.records), ["p2", "p3"]);
    assert_eq!(second.next_cursor, None);
}

/// Floods `flood` anonymous 401 rows in batches like the logger's, with rows of 3 orgs
/// between them, then checks every org row is still there, read page by page as the
/// export reads them. Returns the number of orgs checked; the
/// caller checks its backend's bound on anonymous rows.
pub async fn anonymous_flood_keeps_every_orgs_rows(sink: &dyn LogSink, flood: usize) -> usize {
    let orgs = [OrgId::new(), OrgId::new(), OrgId::new()];
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); orgs.len()];
    let mut written = 0usize;
    let mut t = NOW - 60 * 60 * 1_000;
    for batch in 0..(flood / 500).max(1) {
        let mut records = Vec::new();
        for _ in 0..500.min(flood) {
            let mut r = row(None, t, &format!("anon-{written}"));
            r.status = 401;
            r.code = Some(ErrorCode::InvalidApiKey);
            r.credits = 0;
            r.route = None;
            records.push(r);
            written += 1;
            t += 1;
        }
        if batch % 25 == 0 {
            for (i, org) in orgs.iter().enumerate() {
                for _ in 0..10 {
                    let id = format!("org{i}-{}", expected[i].len());
                    records.push(row(Some(*org), t, &id));
                    expected[i].push(id);
                    t += 1;
                }
            }
        }
        sink.write_batch(records).await.unwrap();
    }
    for (i, org) in orgs.iter().enumerate() {
        let rows = all_pages(sink, LogQuery::new(*org)).await;
        let got: Vec<String> = ids(&rows).into_iter().map(str::to_owned).collect();
        assert_eq!(got, expected[i], "org {i} keeps every row");
        assert!(rows.iter().all(|r| r.org_id == Some(*org)));
        assert!(!got.is_empty());
    }
    orgs.len()
}
