//! `PostgresLogSink` on the real server (`DATABASE_URL`, default 127.0.0.1:5432), each test in
//! a fresh schema: the shared sink suite, daily partitions and their retention, restarts,
//! replicas writing at once, the logger layer end to end, an unreachable server.
#![cfg(feature = "postgres")]

mod suite;

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::sync::OnceCell;
use tollgate_core::{BackendErrorKind, ManualClock, OrgId};
use tollgate_postgres::testing::{unreachable_url, TestDb};
use tollgate_request_logger::{LogQuery, LogSink, PostgresLogSink, RequestLoggerLayer};
use tower::{service_fn, ServiceBuilder, ServiceExt};

use suite::{all_pages, query_ids, row, Backend, DAY, NOW};

/// Sinks over one fresh schema; each call of [`Backend::sink`] is a new instance with its
/// own pool (a replica, or the same one after a restart).
struct Pg {
    db: TestDb,
    migrated: OnceCell<()>,
}

impl Pg {
    async fn new() -> Option<Pg> {
        Some(Pg {
            db: TestDb::new().await?,
            migrated: OnceCell::new(),
        })
    }

    async fn migrated(&self) {
        self.migrated
            .get_or_init(|| async {
                PostgresLogSink::migrate(self.db.pool())
                    .await
                    .expect("migrations apply");
            })
            .await;
    }

    async fn instance(&self, clock: &ManualClock, retention: Duration) -> Arc<PostgresLogSink> {
        self.migrated().await;
        Arc::new(PostgresLogSink::new(self.db.new_pool(), clock.clone()).with_retention(retention))
    }

    /// An instance without the automatic maintenance: no DDL but the test's own.
    async fn quiet_instance(
        &self,
        clock: &ManualClock,
        retention: Duration,
    ) -> Arc<PostgresLogSink> {
        self.migrated().await;
        Arc::new(
            PostgresLogSink::new(self.db.new_pool(), clock.clone())
                .with_retention(retention)
                .with_auto_maintenance(false),
        )
    }

    /// The log partitions in the schema: (name, attached), by name.
    async fn partitions(&self) -> Vec<(String, bool)> {
        let client = self.db.pool().get().await.unwrap();
        client
            .query(
                "SELECT c.relname::text, \
                        EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid) \
                   FROM pg_class c \
                  WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r' \
                    AND c.relname::text LIKE 'tollgate\\_request\\_logs\\_p%' \
                  ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    async fn execute(&self, sql: &str) {
        let client = self.db.pool().get().await.unwrap();
        client.batch_execute(sql).await.unwrap();
    }

    async fn cleanup(self) {
        self.db.cleanup().await;
    }
}

impl Backend for Pg {
    async fn sink(&self, clock: &ManualClock, retention: Duration) -> Arc<dyn LogSink> {
        self.instance(clock, retention).await
    }
}

macro_rules! postgres_suite {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let Some(pg) = Pg::new().await else { return };
                suite::$name(&pg).await;
                pg.cleanup().await;
            }
        )*
    };
}

postgres_suite!(
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

/// NOW is 2023-11-14; `day(-n)` is the partition of n days before.
fn partition_name(days_before_now: i64) -> String {
    let ms = NOW as i64 - days_before_now * DAY as i64;
    let date = chrono::DateTime::from_timestamp_millis(ms).unwrap();
    format!("tollgate_request_logs_p{}", date.format("%Y%m%d"))
}

#[tokio::test]
async fn rows_land_in_daily_partitions_and_expired_days_are_dropped_whole() {
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(NOW);
    let sink = pg.instance(&clock, Duration::from_secs(30 * 86_400)).await;
    let org = OrgId::new();
    // Five rows a day for six days, the last day being today.
    let rows: Vec<_> = (0..30u64)
        .map(|i| {
            row(
                Some(org),
                NOW - (i / 5) * DAY - (i % 5) * 1_000,
                &format!("r{i}"),
            )
        })
        .collect();
    sink.write_batch(rows).await.unwrap();
    let names: Vec<_> = pg.partitions().await;
    for d in 0..6 {
        assert!(
            names.contains(&(partition_name(d), true)),
            "{} in {names:?}",
            partition_name(d)
        );
    }

    // Cut in the middle of three days ago: the two days before go whole, and two rows of
    // the boundary day.
    let cutoff = NOW - 3 * DAY - 2_500;
    assert_eq!(sink.purge_older_than(cutoff).await.unwrap(), 5 + 5 + 2);
    let names = pg.partitions().await;
    for d in 4..6 {
        assert!(
            !names.iter().any(|(n, _)| *n == partition_name(d)),
            "{} was dropped: {names:?}",
            partition_name(d)
        );
    }
    assert!(
        names.contains(&(partition_name(3), true)),
        "boundary day kept"
    );
    let kept = all_pages(&*sink, LogQuery::new(org)).await;
    assert_eq!(kept.len(), 18);
    assert!(kept.iter().all(|r| r.time_ms >= cutoff));
    pg.cleanup().await;
}

#[tokio::test]
async fn maintenance_creates_the_next_days_and_applies_the_retention() {
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(NOW);
    let sink = pg
        .quiet_instance(&clock, Duration::from_secs(2 * 86_400))
        .await;
    let done = sink.maintain().await.unwrap();
    assert_eq!(done.partitions_created, 3);
    let names: Vec<_> = pg.partitions().await.into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "tollgate_request_logs_p20231114",
            "tollgate_request_logs_p20231115",
            "tollgate_request_logs_p20231116"
        ]
    );
    // Nothing to do the second time.
    assert_eq!(
        sink.maintain().await.unwrap(),
        tollgate_request_logger::postgres::Maintenance::default()
    );

    let org = OrgId::new();
    sink.write_batch(vec![row(Some(org), NOW, "today")])
        .await
        .unwrap();
    // Nov 17, 22:13: rows before Nov 15, 22:13 are past the 2 days.
    clock.advance(Duration::from_millis(3 * DAY));
    let done = sink.maintain().await.unwrap();
    assert_eq!(done.partitions_dropped, 1, "Nov 14 ended before the cutoff");
    assert_eq!(done.rows_purged, 1);
    assert_eq!(done.partitions_created, 3, "Nov 17, 18 and 19");
    let names: Vec<_> = pg.partitions().await.into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names.first().map(String::as_str),
        Some("tollgate_request_logs_p20231115")
    );
    assert_eq!(names.len(), 5);
    pg.cleanup().await;
}

#[tokio::test]
async fn writes_keep_the_retention_without_a_purge_job() {
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(NOW);
    let sink = pg.instance(&clock, Duration::from_secs(86_400)).await;
    let org = OrgId::new();
    sink.write_batch(vec![row(Some(org), NOW - 1, "old")])
        .await
        .unwrap();
    clock.advance(Duration::from_millis(3 * DAY));
    // Writes more than an hour after the last maintenance start the next one (in the
    // background, once the previous one is done).
    let mut n = 0;
    suite_eventually("the old day is dropped", || {
        n += 1;
        let sink = Arc::clone(&sink);
        let pg = &pg;
        async move {
            sink.write_batch(vec![row(Some(org), NOW + 3 * DAY, &format!("new{n}"))])
                .await
                .unwrap();
            !pg.partitions()
                .await
                .iter()
                .any(|(name, _)| *name == partition_name(0))
        }
    })
    .await;
    let client = pg.db.pool().get().await.unwrap();
    let old: i64 = client
        .query_one(
            "SELECT count(*) FROM tollgate_request_logs WHERE request_id = 'old'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(old, 0, "deleted, not just hidden");
    drop(client);
    pg.cleanup().await;
}

async fn suite_eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_interrupted_purge_is_finished_by_the_next() {
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(NOW);
    let sink = pg
        .quiet_instance(&clock, Duration::from_secs(30 * 86_400))
        .await;
    let org = OrgId::new();
    sink.write_batch(
        (0..4)
            .map(|i| row(Some(org), NOW - 20 * DAY + i, &format!("old{i}")))
            .collect(),
    )
    .await
    .unwrap();
    // A purge detached the partition and then died before dropping it.
    pg.execute(&format!(
        "ALTER TABLE tollgate_request_logs DETACH PARTITION {}",
        partition_name(20)
    ))
    .await;
    assert!(pg.partitions().await.contains(&(partition_name(20), false)));
    assert_eq!(sink.purge_older_than(NOW - 10 * DAY).await.unwrap(), 4);
    assert!(!pg
        .partitions()
        .await
        .iter()
        .any(|(n, _)| *n == partition_name(20)));
    pg.cleanup().await;
}

#[tokio::test]
async fn a_partition_detached_or_dropped_behind_a_sinks_back_is_repaired_on_write() {
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(NOW);
    let sink = pg
        .quiet_instance(&clock, Duration::from_secs(14 * 86_400))
        .await;
    let org = OrgId::new();
    sink.write_batch(vec![row(Some(org), NOW, "first")])
        .await
        .unwrap();

    // Left detached (an interrupted operation): a new instance attaches it again, rows and
    // all.
    pg.execute(&format!(
        "ALTER TABLE tollgate_request_logs DETACH PARTITION {}",
        partition_name(0)
    ))
    .await;
    let restarted = pg
        .quiet_instance(&clock, Duration::from_secs(14 * 86_400))
        .await;
    restarted
        .write_batch(vec![row(Some(org), NOW, "second")])
        .await
        .unwrap();
    assert_eq!(
        query_ids(&*restarted, LogQuery::new(org)).await,
        ["first", "second"]
    );

    // Dropped (another replica's purge, its clock far ahead): the first sink believed the
    // partition existed; its write re-creates it.
    pg.execute(&format!("DROP TABLE {}", partition_name(0)))
        .await;
    sink.write_batch(vec![row(Some(org), NOW, "third")])
        .await
        .unwrap();
    assert_eq!(query_ids(&*sink, LogQuery::new(org)).await, ["third"]);
    pg.cleanup().await;
}

#[tokio::test]
async fn a_restarted_sink_sees_the_logs_and_cursors_stay_valid() {
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(NOW);
    let org = OrgId::new();
    let first = pg.instance(&clock, Duration::from_secs(14 * 86_400)).await;
    first
        .write_batch(
            (0..50)
                .map(|i| row(Some(org), NOW - 50 + i, &format!("r{i}")))
                .collect(),
        )
        .await
        .unwrap();
    let mut q = LogQuery::new(org);
    q.limit = 20;
    let page = first.query(q.clone()).await.unwrap();
    drop(first);

    let second = pg.instance(&clock, Duration::from_secs(14 * 86_400)).await;
    q.cursor = page.next_cursor;
    let rest = all_pages(&*second, q).await;
    let want: Vec<String> = (20..50).map(|i| format!("r{i}")).collect();
    assert_eq!(
        rest.iter()
            .map(|r| r.request_id.clone())
            .collect::<Vec<_>>(),
        want
    );
    pg.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_writing_at_once_lose_and_repeat_nothing() {
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(NOW);
    let replicas = [
        pg.instance(&clock, Duration::from_secs(14 * 86_400)).await,
        pg.instance(&clock, Duration::from_secs(14 * 86_400)).await,
    ];
    let org = OrgId::new();
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let sink = Arc::clone(&replicas[(t % 2) as usize]);
        tasks.push(tokio::spawn(async move {
            for b in 0..5u64 {
                // Each batch spans three days, so both replicas race to create partitions.
                let rows = (0..30u64)
                    .map(|i| {
                        let n = (t * 5 + b) * 30 + i;
                        row(Some(org), NOW - (n % 3) * DAY - n, &format!("w{n}"))
                    })
                    .collect();
                sink.write_batch(rows).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for sink in &replicas {
        let rows = all_pages(&**sink, LogQuery::new(org)).await;
        assert_eq!(rows.len(), 16 * 5 * 30);
        let unique: HashSet<_> = rows.iter().map(|r| r.request_id.clone()).collect();
        assert_eq!(unique.len(), rows.len());
        assert!(rows.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
    }
    pg.cleanup().await;
}

#[tokio::test]
async fn a_large_batch_is_one_write() {
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(NOW);
    let sink = pg.instance(&clock, Duration::from_secs(14 * 86_400)).await;
    let org = OrgId::new();
    sink.write_batch(
        (0..12_000u64)
            .map(|i| row(Some(org), NOW - i, &format!("b{i}")))
            .collect(),
    )
    .await
    .unwrap();
    let mut q = LogQuery::new(org);
    q.limit = LogQuery::MAX_LIMIT;
    let page = sink.query(q.clone()).await.unwrap();
    assert_eq!(page.records.len(), 10_000);
    q.cursor = page.next_cursor;
    assert_eq!(sink.query(q).await.unwrap().records.len(), 2_000);
    pg.cleanup().await;
}

#[tokio::test]
async fn the_logger_layer_writes_its_rows_through_the_sink() {
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(NOW);
    let sink = pg.instance(&clock, Duration::from_secs(14 * 86_400)).await;
    let logger = RequestLoggerLayer::new(sink.clone()).with_clock(clock.clone());
    let handle = logger.handle();
    let service = ServiceBuilder::new().layer(logger).service(service_fn(
        |_req: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
        },
    ));
    for i in 0..20 {
        let req = Request::get("/nowhere")
            .header("x-request-id", format!("layer-{i}"))
            .body(Full::default())
            .unwrap();
        let res = service.clone().oneshot(req).await.unwrap();
        res.into_body().collect().await.unwrap();
    }
    handle.flush().await;
    assert_eq!(handle.stats().written_rows, 20);
    assert_eq!(handle.stats().sink_errors, 0);
    // Unauthenticated requests have no org: stored, but no org's query shows them.
    let client = pg.db.pool().get().await.unwrap();
    let stored: Vec<String> = client
        .query(
            "SELECT request_id FROM tollgate_request_logs WHERE org_id IS NULL ORDER BY time_ms, id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        stored,
        (0..20).map(|i| format!("layer-{i}")).collect::<Vec<_>>()
    );
    drop(client);
    pg.cleanup().await;
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let pool = tollgate_postgres::connect(&unreachable_url()).unwrap();
    let sink = PostgresLogSink::new(pool, ManualClock::new(NOW));
    let org = OrgId::new();
    for err in [
        sink.write_batch(vec![row(Some(org), NOW, "x")])
            .await
            .unwrap_err(),
        sink.query(LogQuery::new(org)).await.unwrap_err(),
        sink.purge_older_than(NOW).await.unwrap_err(),
        sink.maintain().await.unwrap_err(),
    ] {
        assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    }
    assert!(matches!(
        PostgresLogSink::connect(&unreachable_url(), ManualClock::new(NOW)).await,
        Err(e) if e.kind() == BackendErrorKind::Unavailable
    ));
}

#[tokio::test]
async fn replicas_starting_at_once_migrate_once() {
    let Some(pg) = Pg::new().await else { return };
    let pools: Vec<_> = (0..3).map(|_| pg.db.new_pool()).collect();
    for r in futures_util::future::join_all(pools.iter().map(PostgresLogSink::migrate)).await {
        r.unwrap();
    }
    PostgresLogSink::migrate(&pools[0]).await.unwrap();
    let client = pg.db.pool().get().await.unwrap();
    let applied: i64 = client
        .query_one("SELECT count(*) FROM tollgate_logs_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, 2, "V1 and V2, once each");
    drop(client);
    pg.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_floods_keep_every_orgs_rows_and_are_capped_per_day() {
    let Some(pg) = Pg::new().await else { return };
    pg.migrated().await;
    let clock = ManualClock::new(NOW);
    let sink = PostgresLogSink::new(pg.db.new_pool(), clock.clone())
        .with_anonymous_rows_per_day(700)
        .with_auto_maintenance(false);
    // All within today (NOW is late in a UTC day; the flood starts an hour before).
    let orgs = suite::anonymous_flood_keeps_every_orgs_rows(&sink, 5_000).await;
    assert_eq!(orgs, 3);
    // A second replica shares the day's quota.
    let other = PostgresLogSink::new(pg.db.new_pool(), clock.clone())
        .with_anonymous_rows_per_day(700)
        .with_auto_maintenance(false);
    other
        .write_batch((0..100).map(|i| row(None, NOW - 10 + i, "late")).collect())
        .await
        .unwrap();
    let client = pg.db.pool().get().await.unwrap();
    let anonymous: i64 = client
        .query_one(
            "SELECT count(*) FROM tollgate_request_logs WHERE org_id IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(anonymous, 700, "the day's quota, for all replicas together");
    assert_eq!(sink.anonymous_rows_refused(), 5_000 - 700);
    assert_eq!(other.anonymous_rows_refused(), 100);
    // The day's first anonymous rows are the ones kept.
    let last: String = client
        .query_one(
            "SELECT request_id FROM tollgate_request_logs WHERE org_id IS NULL \
             ORDER BY time_ms DESC, id DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(last, "anon-699");

    // The next day has a quota of its own, and the purge forgets the counters of days gone.
    other
        .write_batch(vec![row(None, NOW + DAY, "tomorrow")])
        .await
        .unwrap();
    assert_eq!(other.anonymous_rows_refused(), 100);
    clock.advance(Duration::from_millis(20 * DAY));
    other.maintain().await.unwrap();
    let counters: i64 = client
        .query_one(
            "SELECT count(*) FROM tollgate_request_log_anonymous_days",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(counters, 0);
    drop(client);
    pg.db.cleanup().await;
}
