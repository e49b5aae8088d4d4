//! Money on a bad day, end to end on a running gateway: a charge that cannot be recorded
//! withholds the response instead of giving it away (and pins no hold); a request slower than
//! the hold TTL keeps its hold; receipts and logs say what the ledger actually took; a
//! retried subscription resets nothing; and one org whose account row is locked does not take
//! the other tenants down.
//!
//! The PostgreSQL tests need a server (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`); they skip without one unless
//! `TOLLGATE_REQUIRE_SERVICES=1`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use serde_json::{json, Value};
use tokio::task::JoinSet;

use tollgate::gateway::{self, Config};
use tollgate::request_logger::LogQuery;
use tollgate::sandbox::{Fault, FaultMode};
use tollgate_core::{OrgId, Plan};
use tollgate_postgres::testing::TestDb;

use common::{test_config, Answer, TestGateway};

/// `url` with every connection's `search_path` on `schema`.
fn url_in_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

/// A demo gateway on PostgreSQL in `db`'s schema, with the sandbox in-process.
async fn on_postgres(db: &TestDb) -> TestGateway {
    common::start(on_postgres_config(db)).await
}

fn on_postgres_config(db: &TestDb) -> Config {
    Config {
        database_url: Some(url_in_schema(db.url(), db.schema())),
        session_key: Some([7; 32]),
        ..test_config()
    }
}

fn demo_org(gw: &TestGateway) -> OrgId {
    gw.gw.demo().expect("demo mode").org
}

/// Open holds of `org` and what its account row counts as held.
async fn holds(db: &TestDb, org: OrgId) -> (i64, i64) {
    let client = db.pool().get().await.unwrap();
    let open: i64 = client
        .query_one(
            "SELECT count(*) FROM tollgate_credit_holds WHERE org = $1 AND forget_at_ms IS NULL",
            &[org.as_uuid()],
        )
        .await
        .unwrap()
        .get(0);
    let held: i64 = client
        .query_one(
            "SELECT held FROM tollgate_credit_accounts WHERE org = $1",
            &[org.as_uuid()],
        )
        .await
        .unwrap()
        .get(0);
    (open, held)
}

async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The credits the logger recorded for `request_id`, once its row is written.
async fn logged_credits(gw: &TestGateway, request_id: &str) -> (u16, u64) {
    let state = gw.gw.state();
    state.logger.flush().await;
    let rows = state
        .logs
        .query(LogQuery::new(demo_org(gw)))
        .await
        .unwrap()
        .records;
    let row = rows
        .iter()
        .find(|r| r.request_id == request_id)
        .unwrap_or_else(|| panic!("no log row for {request_id}"));
    (row.status, row.credits)
}

/// Σ of the charge rows of `org`.
async fn charged(gw: &TestGateway, org: OrgId) -> i64 {
    gw.gw
        .state()
        .ledger
        .entries(org)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == tollgate::credit_meter::EntryKind::Charge)
        .map(|e| -(e.delta_plan + e.delta_topup))
        .sum()
}

fn with_id(
    mut req: Request<http_body_util::Full<Bytes>>,
    id: &str,
) -> Request<http_body_util::Full<Bytes>> {
    req.headers_mut()
        .insert("x-request-id", id.parse().unwrap());
    req
}

/// Issue 8, item 1: the commit blocks on a locked account row. The customer gets a clean 503
/// within the bounds (not the response, unbilled, 11 s late), nothing is charged, and the
/// hold is released as soon as the row is free — not after the hold TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_blocked_by_a_locked_row_withholds_the_answer_and_pins_no_hold() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let gw = on_postgres(&db).await;
    let org = demo_org(&gw);
    let sandbox = gw.gw.sandbox().unwrap().clone();
    sandbox.inject(Fault::new(FaultMode::Stall(Duration::from_millis(1_500))));

    let req = with_id(
        gw.request(
            Method::GET,
            &gw.model_path("/users/me"),
            Some(&gw.key()),
            None,
        ),
        "locked-commit",
    );
    let client = gw.client.clone();
    let started = Instant::now();
    let call = tokio::spawn(async move { client.request(req).await });
    eventually("the hold is placed", Duration::from_secs(10), || async {
        holds(&db, org).await == (1, 1)
    })
    .await;
    // Another session locks the org's account row while the upstream is answering.
    let mut locker = db.pool().get().await.unwrap();
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM tollgate_credit_accounts WHERE org = $1 FOR UPDATE",
        &[org.as_uuid()],
    )
    .await
    .unwrap();

    let res = call.await.unwrap().unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let elapsed = started.elapsed();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["code"], "SERVICE_UNAVAILABLE");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("could not be recorded"),
        "{answer}"
    );
    assert!(
        elapsed < Duration::from_secs(9),
        "answered after {elapsed:?}"
    );

    // The row is free again: the hold is given back at once (the TTL is 5 minutes).
    tx.rollback().await.unwrap();
    drop(locker);
    eventually("the hold is released", Duration::from_secs(10), || async {
        holds(&db, org).await == (0, 0)
    })
    .await;
    assert_eq!(charged(&gw, org).await, 0, "nothing was billed");
    assert_eq!(gw.balance().await, Some(1_000));
    assert_eq!(logged_credits(&gw, "locked-commit").await, (503, 0));
    // And the org is not left refused for credits it has.
    let next = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(next.status, StatusCode::OK, "{}", next.text());
    assert_eq!(next.json()["_meta"]["_credits"]["balance"], 999);
    db.cleanup().await;
}

/// A request body trickled by the client, then a slow upstream: the request lives longer
/// than the hold TTL.
async fn slow_post(gw: &TestGateway, id: &str) -> Answer {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
    let body = StreamBody::new(tokio_stream_from(rx));
    let req = Request::builder()
        .method(Method::POST)
        .uri(gw.url(&gw.model_path("/chats/42/messages")))
        .header("x-api-key", gw.key())
        .header("x-request-id", id)
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let feed = tokio::spawn(async move {
        for part in [&b"{\"text\":"[..], b"\"slow\"", b"}"] {
            tokio::time::sleep(Duration::from_millis(700)).await;
            if tx
                .send(Ok(http_body::Frame::data(Bytes::from_static(part))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let res = client.request(req).await.expect("request sent");
    feed.await.unwrap();
    let (parts, body) = res.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Issue 8, item 2 (its reproduction: hold TTL 3.1 s, upstream timeout 3 s): a request that
/// lives longer than the TTL keeps its hold, so its credits cannot be held and charged by
/// another request as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_longer_than_the_hold_ttl_keeps_its_credits() {
    let gw = common::start(Config {
        hold_ttl: Duration::from_millis(3_100),
        upstream_timeout: Duration::from_millis(3_000),
        ..test_config()
    })
    .await;
    let org = demo_org(&gw);
    let put = gw
        .admin(
            Method::PUT,
            &format!("/admin/orgs/{org}/credits"),
            Some(json!({"balance": 2})),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    // 2.1 s of request body, then 2.5 s of upstream: 4.6 s, over the 3.1 s TTL.
    gw.gw
        .sandbox()
        .unwrap()
        .inject(Fault::new(FaultMode::Stall(Duration::from_millis(2_500))));
    let (slow, second) = tokio::join!(slow_post(&gw, "slow"), async {
        // Past the TTL of the slow request's hold, with a sweep or two done meanwhile.
        tokio::time::sleep(Duration::from_millis(4_000)).await;
        gw.send(with_id(
            gw.request(
                Method::POST,
                &gw.model_path("/chats/42/messages"),
                Some(&gw.key()),
                Some("{}"),
            ),
            "second",
        ))
        .await
    });
    assert_eq!(slow.status, StatusCode::OK, "{}", slow.text());
    assert_eq!(
        slow.json()["_meta"]["_credits"],
        json!({"used": 2, "balance": 0})
    );
    assert_eq!(
        second.status,
        StatusCode::PAYMENT_REQUIRED,
        "{}",
        second.text()
    );
    assert_eq!(second.code(), "INSUFFICIENT_CREDITS");
    assert_eq!(charged(&gw, org).await, 2, "2 credits delivered, 2 charged");
    assert_eq!(gw.balance().await, Some(0));
}

/// Issue 8, item 3: support lowers the balance while a hold is open. The envelope, the log
/// row and the ledger agree on what was taken.
async fn receipts_report_what_the_ledger_took(gw: &TestGateway) {
    let org = demo_org(gw);
    gw.gw
        .sandbox()
        .unwrap()
        .inject(Fault::new(FaultMode::Stall(Duration::from_millis(800))));
    let stats = with_id(
        gw.request(
            Method::GET,
            &gw.model_path("/payouts/stats"),
            Some(&gw.key()),
            None,
        ),
        "lowered",
    );
    let (answer, ()) = tokio::join!(gw.send(stats), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let put = gw
            .admin(
                Method::PUT,
                &format!("/admin/orgs/{org}/credits"),
                Some(json!({"balance": 1})),
            )
            .await;
        assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    });
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    // A 2-credit route, but only 1 credit was left to take.
    assert_eq!(
        answer.json()["_meta"]["_credits"],
        json!({"used": 1, "balance": 0})
    );
    assert_eq!(logged_credits(gw, "lowered").await, (200, 1));
    assert_eq!(charged(gw, org).await, 1);
}

#[tokio::test]
async fn receipts_report_what_the_memory_ledger_took() {
    let gw = common::start(test_config()).await;
    receipts_report_what_the_ledger_took(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_report_what_the_postgres_ledger_took() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let gw = on_postgres(&db).await;
    receipts_report_what_the_ledger_took(&gw).await;
    db.cleanup().await;
}

/// Issue 8, item 4: a subscription sent twice (a retry) changes nothing the second time.
async fn a_repeated_subscription_resets_nothing(gw: &TestGateway) {
    let org = demo_org(gw);
    let path = format!("/admin/orgs/{org}/subscription");
    let sub = |plan: &'static str| gw.admin(Method::PUT, &path, Some(json!({ "plan": plan })));
    let first = sub("pro").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    let spent = gw.get(&gw.model_path("/payouts/stats")).await;
    assert_eq!(spent.status, StatusCode::OK, "{}", spent.text());
    let again = sub("pro").await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    assert_eq!(again.json()["balance"], 4_998, "no refill");
    assert_eq!(again.json()["period_end"], first.json()["period_end"]);
    let plan_changes = gw
        .gw
        .state()
        .ledger
        .entries(org)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == tollgate::credit_meter::EntryKind::PlanChange)
        .count();
    assert_eq!(plan_changes, 2, "the demo's basic, then pro once");
}

#[tokio::test]
async fn a_repeated_subscription_resets_nothing_in_memory() {
    let gw = common::start(test_config()).await;
    a_repeated_subscription_resets_nothing(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_subscription_resets_nothing_on_postgres() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let gw = on_postgres(&db).await;
    a_repeated_subscription_resets_nothing(&gw).await;
    db.cleanup().await;
}

/// Issue 8, item 4: the key store fails after the ledger took the new plan. The admin sees an
/// error; the retry completes the subscription without starting the period again, and the
/// keys then get the new plan's limits.
#[tokio::test]
async fn a_subscription_that_failed_half_way_completes_on_retry() {
    use tollgate::api_key_auth::KeyStore;

    let clock = tollgate_core::SystemClock::shared();
    let mut backends = gateway::memory_backends(clock);
    let flaky = Arc::new(FlakyKeys {
        inner: backends.keys.clone(),
        fail_next_subscription: std::sync::atomic::AtomicBool::new(false),
    });
    backends.keys = flaky.clone();
    let running = gateway::start_with(test_config(), backends).await.unwrap();
    let gw = TestGateway::new(running);
    let org = demo_org(&gw);

    flaky
        .fail_next_subscription
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let path = format!("/admin/orgs/{org}/subscription");
    let failed = gw
        .admin(Method::PUT, &path, Some(json!({"plan": "pro"})))
        .await;
    assert_eq!(
        failed.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        failed.text()
    );
    let ledger_after_failure = gw.gw.state().ledger.account(org).await.unwrap().unwrap();
    assert_eq!(ledger_after_failure.plan, Some(Plan::Pro));

    let retried = gw
        .admin(Method::PUT, &path, Some(json!({"plan": "pro"})))
        .await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.text());
    let account = gw.gw.state().ledger.account(org).await.unwrap().unwrap();
    assert_eq!(
        account.period_start_ms, ledger_after_failure.period_start_ms,
        "the retry did not start the period again"
    );
    let call = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(call.status, StatusCode::OK, "{}", call.text());
    assert_eq!(
        call.headers["ratelimit-limit"], "300",
        "the keys have the pro plan"
    );
    let _ = flaky.inner.list_keys(org).await.unwrap();
}

/// A key store whose next `set_subscription` fails as if the database went away.
struct FlakyKeys {
    inner: Arc<dyn tollgate::api_key_auth::KeyStore>,
    fail_next_subscription: std::sync::atomic::AtomicBool,
}

mod flaky_keys {
    use super::FlakyKeys;
    use tollgate::api_key_auth::{KeyGrant, KeyHash, KeyInfo, KeySpec, KeyStore, NewKey};
    use tollgate_core::{BackendError, BoxFuture, KeyId, ModelId, OrgId, Plan};

    impl KeyStore for FlakyKeys {
        fn lookup(&self, hash: KeyHash) -> BoxFuture<Result<Option<KeyGrant>, BackendError>> {
            self.inner.lookup(hash)
        }
        fn owns_model(&self, org: OrgId, model: ModelId) -> BoxFuture<Result<bool, BackendError>> {
            self.inner.owns_model(org, model)
        }
        fn record_use(&self, key: KeyId, at_ms: u64) {
            self.inner.record_use(key, at_ms)
        }
        fn set_subscription(
            &self,
            org: OrgId,
            plan: Option<Plan>,
        ) -> BoxFuture<Result<(), BackendError>> {
            if self
                .fail_next_subscription
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Box::pin(async {
                    Err(BackendError::unavailable(
                        "connection reset by the database",
                    ))
                });
            }
            self.inner.set_subscription(org, plan)
        }
        fn add_model(&self, org: OrgId, model: ModelId) -> BoxFuture<Result<bool, BackendError>> {
            self.inner.add_model(org, model)
        }
        fn create_key_with(
            &self,
            org: OrgId,
            name: String,
            spec: KeySpec,
        ) -> BoxFuture<Result<NewKey, BackendError>> {
            self.inner.create_key_with(org, name, spec)
        }
        fn revoke_key(&self, key: KeyId) -> BoxFuture<Result<bool, BackendError>> {
            self.inner.revoke_key(key)
        }
        fn rotate_key_with_grace(
            &self,
            key: KeyId,
            grace_ms: u64,
        ) -> BoxFuture<Result<Option<NewKey>, BackendError>> {
            self.inner.rotate_key_with_grace(key, grace_ms)
        }
        fn list_keys(&self, org: OrgId) -> BoxFuture<Result<Vec<KeyInfo>, BackendError>> {
            self.inner.list_keys(org)
        }
        fn key_info(&self, key: KeyId) -> BoxFuture<Result<Option<KeyInfo>, BackendError>> {
            self.inner.key_info(key)
        }
    }
}

/// Issue 8, item 5: org A's account row is locked and 60 of its requests are in flight. Org B
/// is served normally meanwhile, `/readyz` stays ready, org A's requests fail cleanly (503,
/// nothing charged) and it recovers once the row is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_orgs_locked_account_row_does_not_take_the_others_down() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    // The burst is out of the way: this is about the database, not the rate limit.
    let gw = common::start(Config {
        burst: [100; 4],
        ..on_postgres_config(&db)
    })
    .await;
    let org_a = demo_org(&gw);
    let (key_a, model_a) = (gw.key(), gw.model());
    let pro = gw
        .admin(
            Method::PUT,
            &format!("/admin/orgs/{org_a}/subscription"),
            Some(json!({"plan": "pro"})),
        )
        .await;
    assert_eq!(pro.status, StatusCode::OK, "{}", pro.text());

    // Org B: its own model (a second sandbox account) and key.
    let org_b = gw
        .admin(Method::POST, "/admin/orgs", Some(json!({"name": "B"})))
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    gw.admin(
        Method::PUT,
        &format!("/admin/orgs/{org_b}/subscription"),
        Some(json!({"plan": "pro"})),
    )
    .await;
    let account = gw.gw.sandbox().unwrap().add_account();
    let model_b = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{org_b}/models"),
            Some(json!({"name": "B's", "session": {
                "cookie": account.cookie, "user_id": account.user_id,
                "x_bc": account.x_bc, "user_agent": account.user_agent,
            }})),
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let key_b = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{org_b}/keys"),
            Some(json!({"name": "b"})),
        )
        .await
        .json()["key"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut locker = db.pool().get().await.unwrap();
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM tollgate_credit_accounts WHERE org = $1 FOR UPDATE",
        &[org_a.as_uuid()],
    )
    .await
    .unwrap();

    let started = Instant::now();
    let mut org_a_calls = JoinSet::new();
    for i in 0..60 {
        let req = with_id(
            gw.request(
                Method::GET,
                &format!("/api/models/{model_a}/users/me"),
                Some(&key_a),
                None,
            ),
            &format!("a-{i}"),
        );
        let client = gw.client.clone();
        org_a_calls.spawn(async move {
            let res = client.request(req).await.unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Meanwhile org B works, quickly, and the gateway is ready.
    for round in 0..5 {
        let t = Instant::now();
        let credits = gw
            .send(gw.request(Method::GET, "/api/credits", Some(&key_b), None))
            .await;
        assert_eq!(credits.status, StatusCode::OK, "{}", credits.text());
        let call = gw
            .send(gw.request(
                Method::GET,
                &format!("/api/models/{model_b}/users/me"),
                Some(&key_b),
                None,
            ))
            .await;
        assert_eq!(
            call.status,
            StatusCode::OK,
            "round {round}: {}",
            call.text()
        );
        let ready = gw
            .send(gw.request(Method::GET, "/readyz", None, None))
            .await;
        assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
        assert!(
            t.elapsed() < Duration::from_millis(1_500),
            "round {round} of org B took {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }

    // Org A's requests end with clean 503s, none of them charged.
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    while let Some(done) = org_a_calls.join_next().await {
        let (status, body) = done.unwrap();
        let json: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
        assert_eq!(json["code"], "SERVICE_UNAVAILABLE");
        *statuses.entry(status.as_u16()).or_default() += 1;
    }
    assert_eq!(statuses.values().sum::<usize>(), 60);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "org A's requests took {:?}",
        started.elapsed()
    );

    tx.rollback().await.unwrap();
    drop(locker);
    assert_eq!(charged(&gw, org_a).await, 0);
    eventually(
        "org A has no hold left",
        Duration::from_secs(10),
        || async { holds(&db, org_a).await == (0, 0) },
    )
    .await;
    let back = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(back.status, StatusCode::OK, "{}", back.text());
    assert_eq!(back.json()["_meta"]["_credits"]["balance"], 4_999);
    db.cleanup().await;
}
