//! Gateway replicas and failures with real processes (SPEC §3, §4, §5, §8, §9): `gateway`
//! processes (the example binary) sharing one PostgreSQL schema and one Redis, in front of a
//! sandbox upstream running in this test process.
//!
//! - two replicas enforce one balance and one window exactly under 1,000 concurrent requests,
//!   and a key revoked on one is refused by the other within 1 s;
//! - the same window exactly on a three-node Redis Cluster the test starts
//!   (`REDIS_URL=redis+cluster://…`);
//! - a replica stopped with SIGTERM and started again keeps keys, balance, model status,
//!   window and logs;
//! - a replica killed with requests in flight leaves holds that the sweeper releases;
//! - PostgreSQL going away: 503 `SERVICE_UNAVAILABLE` fast, nothing charged, recovery alone;
//! - Redis killed: fail-open keeps answering within the local limit, fail-closed answers 503,
//!   and the shared limit is back once Redis is;
//! - key lifecycle (docs/contract.md §13): an expiring key refused by both replicas at its
//!   time, a rotation's old key working for its 5 s grace period and no longer, and a key's
//!   credit limit spent across both.
//!
//! Needs PostgreSQL (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`),
//! Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`), `redis-server` and `redis-cli`;
//! each test skips without them unless `TOLLGATE_REQUIRE_SERVICES=1`. Run:
//! `cargo build --example gateway && TOLLGATE_REQUIRE_SERVICES=1 cargo test --test replicas`.

mod support_proc;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::task::JoinSet;

use tollgate::core::Clock as _;
use tollgate::sandbox::{sandbox_rules, Fault, Sandbox, SandboxAccount, SandboxServer};
use tollgate_postgres::testing::TestDb;

use support_proc::{
    postgres_addr, redis_cluster_tools_available, redis_server_available, serial, session_key,
    shared_redis, test_db, url_in_schema, url_via, Answer, Gateway, GatewayEnv, Http, LogDir,
    RedisCluster, RedisServer, TcpProxy,
};

/// An org with a plan, a balance, a key and models, set up through one replica's admin API.
struct Tenant {
    org: String,
    key_id: String,
    key: String,
    models: Vec<String>,
}

impl Tenant {
    /// `POST /admin/orgs`, `PUT subscription {plan}`, `PUT credits {balance}`, one model per
    /// account, one key.
    async fn create(
        http: &Http,
        gw: &Gateway,
        plan: &str,
        balance: u64,
        accounts: &[&SandboxAccount],
    ) -> Tenant {
        let org = http
            .admin(
                Method::POST,
                gw.url("/admin/orgs"),
                Some(json!({"name": "Replica Org"})),
            )
            .await;
        assert_eq!(org.status, StatusCode::CREATED, "{}", org.text());
        let org = org.json()["id"].as_str().expect("org id").to_owned();

        let sub = http
            .admin(
                Method::PUT,
                gw.url(&format!("/admin/orgs/{org}/subscription")),
                Some(json!({"plan": plan})),
            )
            .await;
        assert_eq!(sub.status, StatusCode::OK, "{}", sub.text());
        let credits = http
            .admin(
                Method::PUT,
                gw.url(&format!("/admin/orgs/{org}/credits")),
                Some(json!({"balance": balance})),
            )
            .await;
        assert_eq!(credits.status, StatusCode::OK, "{}", credits.text());
        assert_eq!(credits.json(), json!({"balance": balance}));

        let mut models = Vec::new();
        for (i, account) in accounts.iter().enumerate() {
            let model = http
                .admin(
                    Method::POST,
                    gw.url(&format!("/admin/orgs/{org}/models")),
                    Some(json!({"name": format!("model {i}"), "session": account.session_json()})),
                )
                .await;
            assert_eq!(model.status, StatusCode::CREATED, "{}", model.text());
            assert_eq!(model.json()["status"], "connected");
            models.push(model.json()["id"].as_str().expect("model id").to_owned());
        }

        let key = http
            .admin(
                Method::POST,
                gw.url(&format!("/admin/orgs/{org}/keys")),
                Some(json!({"name": "replica key"})),
            )
            .await;
        assert_eq!(key.status, StatusCode::CREATED, "{}", key.text());
        let key = key.json();
        Tenant {
            org,
            key_id: key["id"].as_str().expect("key id").to_owned(),
            key: key["key"].as_str().expect("key secret").to_owned(),
            models,
        }
    }

    /// `GET /api/models/<model>/users/me` (cost 1) on `gw`.
    async fn users_me(&self, http: &Http, gw: &Gateway, model: usize, request_id: &str) -> Answer {
        let url = gw.url(&format!("/api/models/{}/users/me", self.models[model]));
        http.customer(url, &self.key, request_id).await
    }

    /// The org as `GET /admin/orgs/:org` on `gw` shows it.
    async fn org_view(&self, http: &Http, gw: &Gateway) -> Value {
        let answer = http
            .admin(
                Method::GET,
                gw.url(&format!("/admin/orgs/{}", self.org)),
                None,
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        answer.json()
    }

    /// The balance `gw` reports.
    async fn balance(&self, http: &Http, gw: &Gateway) -> u64 {
        let view = self.org_view(http, gw).await;
        view["balance"]
            .as_u64()
            .unwrap_or_else(|| panic!("a balance: {view}"))
    }

    fn org_uuid(&self) -> uuid::Uuid {
        self.org.parse().expect("org ids are UUIDs")
    }
}

/// The sandbox upstream, served on a loopback port of this test process.
async fn sandbox() -> (Sandbox, SandboxServer) {
    let sandbox = Sandbox::new(sandbox_rules());
    let server = sandbox
        .bind("127.0.0.1:0")
        .await
        .expect("the sandbox listens");
    (sandbox, server)
}

/// Gateway settings on the test schema: `DATABASE_URL` carries the schema in `options`.
fn env_on(db: &TestDb, db_url: &str, upstream: &SandboxServer, key: &str) -> GatewayEnv {
    GatewayEnv::new(&upstream.base_url()).database(&url_in_schema(db_url, db.schema()), key)
}

/// Open holds of the org (`forget_at_ms IS NULL`: not released by the sweeper) and the
/// credits the account row counts as held.
async fn holds(db: &TestDb, org: uuid::Uuid) -> (i64, i64) {
    let client = db.pool().get().await.expect("a test connection");
    let open: i64 = client
        .query_one(
            "SELECT count(*) FROM tollgate_credit_holds WHERE org = $1 AND forget_at_ms IS NULL",
            &[&org],
        )
        .await
        .expect("count holds")
        .get(0);
    let held: i64 = client
        .query_one(
            "SELECT held FROM tollgate_credit_accounts WHERE org = $1",
            &[&org],
        )
        .await
        .expect("the org's account row")
        .get(0);
    (open, held)
}

/// The org's charge rows in the ledger: their request ids and the sum of their deltas.
async fn charges(db: &TestDb, org: uuid::Uuid) -> (Vec<Option<String>>, i64) {
    let client = db.pool().get().await.expect("a test connection");
    let rows = client
        .query(
            "SELECT request_id, delta_plan + delta_topup FROM tollgate_credit_ledger \
             WHERE org = $1 AND kind = 'charge' ORDER BY id",
            &[&org],
        )
        .await
        .expect("ledger rows");
    let ids = rows.iter().map(|r| r.get::<_, Option<String>>(0)).collect();
    let sum = rows.iter().map(|r| r.get::<_, i64>(1)).sum();
    (ids, sum)
}

fn histogram(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    for a in answers {
        *h.entry(format!("{} {}", a.status.as_u16(), a.code()))
            .or_default() += 1;
    }
    h
}

/// `_meta._credits.balance` of a proxied 200.
fn meta_balance(answer: &Answer) -> u64 {
    let body = answer.json();
    body["_meta"]["_credits"]["balance"]
        .as_u64()
        .unwrap_or_else(|| panic!("a balance in _meta: {body}"))
}

/// Two replicas (A, B) on the test schema and the shared Redis, the sandbox upstream with one
/// account, and a client.
struct Pair {
    db: TestDb,
    logs: LogDir,
    sandbox: Sandbox,
    upstream: SandboxServer,
    account: SandboxAccount,
    a: Gateway,
    b: Gateway,
    http: Http,
}

impl Pair {
    /// `None`: skipped (no PostgreSQL or no Redis).
    async fn start(test: &str, burst: &str) -> Option<Pair> {
        let db = test_db().await?;
        let redis_url = shared_redis().await?;
        Some(Pair::on(db, LogDir::new(test), &redis_url, burst).await)
    }

    /// Two replicas on `db` and the Redis (or Redis Cluster) at `redis_url`.
    async fn on(db: TestDb, logs: LogDir, redis_url: &str, burst: &str) -> Pair {
        let (sandbox, upstream) = sandbox().await;
        let account = sandbox.add_account();
        let env = env_on(&db, db.url(), &upstream, &session_key())
            .set("REDIS_URL", redis_url)
            .set("TOLLGATE_BURST", burst);
        let (a, b) = tokio::join!(
            Gateway::start("A", &env, &logs),
            Gateway::start("B", &env, &logs)
        );
        Pair {
            db,
            logs,
            sandbox,
            upstream,
            account,
            a,
            b,
            http: Http::new(),
        }
    }

    async fn finish(self) {
        let Pair {
            db,
            logs,
            upstream,
            a,
            b,
            ..
        } = self;
        drop((a, b));
        upstream.shutdown().await;
        db.cleanup().await;
        drop(logs);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_enforce_one_balance_and_one_window_under_1000_concurrent_requests() {
    let _serial = serial().await;
    let Some(pair) = Pair::start("shared", "pro=1000").await else {
        return;
    };
    let Pair {
        db,
        sandbox,
        account,
        a,
        b,
        http,
        ..
    } = &pair;

    // Pro: 300 requests a minute; the burst is out of the way. 200 credits.
    let tenant = Tenant::create(http, a, "pro", 200, &[account]).await;

    // The processes really work in the test schema (the `options` of DATABASE_URL).
    assert_eq!(holds(db, tenant.org_uuid()).await, (0, 0));

    // 1,000 concurrent requests, half on each replica.
    let mut tasks = JoinSet::new();
    for i in 0..1000 {
        let http = http.clone();
        let url = if i % 2 == 0 { a } else { b }
            .url(&format!("/api/models/{}/users/me", tenant.models[0]));
        let key = tenant.key.clone();
        tasks.spawn(async move { http.customer(url, &key, &format!("load-{i}")).await });
    }
    let answers: Vec<Answer> = tasks.join_all().await;
    let counts = histogram(&answers);

    // One balance: exactly 200 successes, each with its own balance after the charge (199,
    // 198, …, 0, never below), one upstream call and one ledger row each.
    assert_eq!(counts.get("200 "), Some(&200), "{counts:?}");
    let balances: BTreeSet<u64> = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .map(meta_balance)
        .collect();
    assert_eq!(balances, (0..200).collect::<BTreeSet<u64>>());
    assert_eq!(tenant.balance(http, a).await, 0);
    assert_eq!(tenant.balance(http, b).await, 0);
    assert_eq!(
        sandbox.requests_received(),
        200,
        "one upstream call per 200"
    );
    let (ids, sum) = charges(db, tenant.org_uuid()).await;
    assert_eq!((ids.len(), sum), (200, -200), "one ledger row per 200");
    assert_eq!(
        holds(db, tenant.org_uuid()).await,
        (0, 0),
        "every hold settled"
    );
    for a in answers.iter().filter(|a| a.status != StatusCode::OK) {
        let code = a.code();
        a.assert_error(a.status, &code);
    }

    // One window: exactly 300 admitted (the other 100 refused for credits), 700 × 429, and
    // each admitted request took its own place in it (remaining 299, …, 0).
    let expected: BTreeMap<String, usize> = [
        ("200 ".to_owned(), 200),
        ("402 INSUFFICIENT_CREDITS".to_owned(), 100),
        ("429 RATE_LIMIT_EXCEEDED".to_owned(), 700),
    ]
    .into();
    assert_eq!(
        counts, expected,
        "one shared window of 300 and one balance of 200"
    );
    let remaining: BTreeSet<u64> = answers
        .iter()
        .filter(|a| a.status != StatusCode::TOO_MANY_REQUESTS)
        .map(|a| {
            a.header_u64("ratelimit-remaining")
                .unwrap_or_else(|| panic!("RateLimit-Remaining on a {}", a.status))
        })
        .collect();
    assert_eq!(remaining, (0..300).collect::<BTreeSet<u64>>());
    pair.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_a_redis_cluster_admit_exactly_the_limit() {
    let _serial = serial().await;
    if !redis_cluster_tools_available() {
        return;
    }
    let Some(db) = test_db().await else { return };
    let logs = LogDir::new("cluster");
    let cluster = RedisCluster::start(&logs).await;
    let pair = Pair::on(db, logs, &cluster.url(), "pro=1000").await;
    let Pair {
        sandbox,
        account,
        a,
        b,
        http,
        ..
    } = &pair;

    // Pro: 300 requests a minute; the burst is out of the way, and so are the credits.
    let tenant = Tenant::create(http, a, "pro", 10_000, &[account]).await;

    // 1,000 concurrent requests, half on each replica.
    let mut tasks = JoinSet::new();
    for i in 0..1000 {
        let http = http.clone();
        let url = if i % 2 == 0 { a } else { b }
            .url(&format!("/api/models/{}/users/me", tenant.models[0]));
        let key = tenant.key.clone();
        tasks.spawn(async move { http.customer(url, &key, &format!("cluster-{i}")).await });
    }
    let answers: Vec<Answer> = tasks.join_all().await;

    // One window for both replicas: exactly the plan's 300 admitted (each replica alone
    // would have admitted 300 of its 500), the other 700 refused with 429.
    let expected: BTreeMap<String, usize> = [
        ("200 ".to_owned(), 300),
        ("429 RATE_LIMIT_EXCEEDED".to_owned(), 700),
    ]
    .into();
    assert_eq!(
        histogram(&answers),
        expected,
        "one window of 300 shared through the cluster"
    );
    for refused in answers.iter().filter(|a| a.status != StatusCode::OK) {
        refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMIT_EXCEEDED");
    }
    // Each admitted request took its own place in the window: remaining 299, …, 0, once each.
    let mut remaining: Vec<u64> = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .map(|a| {
            a.header_u64("ratelimit-remaining")
                .unwrap_or_else(|| panic!("RateLimit-Remaining on a 200: {:?}", a.headers))
        })
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..300).collect::<Vec<u64>>());

    // Only the admitted reached the upstream and were charged, once each.
    assert_eq!(sandbox.requests_received(), 300);
    assert_eq!(tenant.balance(http, a).await, 10_000 - 300);
    assert_eq!(tenant.balance(http, b).await, 10_000 - 300);

    // The window lives in the cluster: one key for the bucket, on one node (the one owning
    // its hash tag's slot), nothing anywhere else.
    let bucket = format!("tollgate:{{{}:{}}}:w", tenant.org, tenant.models[0]);
    let keys = cluster.keys_by_node().await;
    let holders: Vec<(&u16, &BTreeSet<String>)> =
        keys.iter().filter(|(_, own)| !own.is_empty()).collect();
    assert_eq!(holders.len(), 1, "exactly one node holds keys: {keys:?}");
    assert_eq!(
        holders[0].1,
        &BTreeSet::from([bucket]),
        "the bucket's log is the only key: {keys:?}"
    );

    pair.finish().await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_on_one_replica_is_refused_by_the_other_within_one_second() {
    let _serial = serial().await;
    let Some(pair) = Pair::start("revoke", "pro=30").await else {
        return;
    };
    let Pair {
        sandbox,
        account,
        a,
        b,
        http,
        ..
    } = &pair;
    let tenant = Tenant::create(http, a, "pro", 200, &[account]).await;

    // B knows the key (and has it cached) before the revocation.
    for gw in [a, b] {
        let answer = tenant.users_me(http, gw, 0, "before").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }

    // Revoked on A: refused by A at once and by B within 1 s.
    let revoke = http
        .admin(
            Method::POST,
            a.url(&format!("/admin/keys/{}/revoke", tenant.key_id)),
            None,
        )
        .await;
    assert_eq!(revoke.status, StatusCode::OK, "{}", revoke.text());
    assert_eq!(revoke.json()["status"], "revoked");
    let revoked_at = Instant::now();
    tenant
        .users_me(http, a, 0, "revoked-on-a")
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "INVALID_API_KEY");
    let mut polls = 0;
    loop {
        polls += 1;
        let answer = tenant
            .users_me(http, b, 0, &format!("revoked-poll-{polls}"))
            .await;
        if answer.status == StatusCode::UNAUTHORIZED {
            answer.assert_error(StatusCode::UNAUTHORIZED, "INVALID_API_KEY");
            break;
        }
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "B still accepts the key {:?} after the revocation on A",
            revoked_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen_after = revoked_at.elapsed();
    assert!(
        seen_after < Duration::from_secs(1),
        "revocation seen by B after {seen_after:?}"
    );
    // Revoked for good on both: a refused key reaches nothing and costs nothing.
    let calls = sandbox.requests_received();
    for gw in [a, b] {
        tenant
            .users_me(http, gw, 0, "after")
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "INVALID_API_KEY");
    }
    assert_eq!(sandbox.requests_received(), calls);
    assert_eq!(tenant.balance(http, b).await, 200 - calls);
    pair.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_keeps_keys_balance_models_window_and_logs() {
    let _serial = serial().await;
    let Some(db) = test_db().await else { return };
    let Some(redis_url) = shared_redis().await else {
        return;
    };
    let logs = LogDir::new("restart");
    let (sandbox, upstream) = sandbox().await;
    let (lost, kept) = (sandbox.add_account(), sandbox.add_account());
    let env = env_on(&db, db.url(), &upstream, &session_key()).set("REDIS_URL", &redis_url);
    let mut a = Gateway::start("A", &env, &logs).await;
    let http = Http::new();
    let tenant = Tenant::create(&http, &a, "basic", 50, &[&lost, &kept]).await;

    // Three calls on the model that will lose its session, two on the other.
    for i in 0..3 {
        let answer = tenant.users_me(&http, &a, 0, &format!("before-{i}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    for i in 3..5 {
        let answer = tenant.users_me(&http, &a, 1, &format!("before-{i}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(answer.header_u64("ratelimit-remaining"), Some(60 - (i - 2)));
    }
    // The upstream ends the first model's session: it becomes disconnected.
    assert!(sandbox.expire_session(&lost.user_id));
    tenant
        .users_me(&http, &a, 0, "expired")
        .await
        .assert_error(StatusCode::BAD_GATEWAY, "MODEL_SESSION_EXPIRED");
    assert_eq!(tenant.balance(&http, &a).await, 45);
    let upstream_calls = sandbox.requests_received();
    assert_eq!(upstream_calls, 6);

    let status = a.terminate().await;
    assert!(
        status.success(),
        "SIGTERM ends the gateway with 0: {status}"
    );
    let mut a = Gateway::start("A-again", &env, &logs).await;

    // The key works, the balance and the window carry on.
    let answer = tenant.users_me(&http, &a, 1, "after-0").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(meta_balance(&answer), 44);
    assert_eq!(answer.header_u64("ratelimit-remaining"), Some(57));
    let view = tenant.org_view(&http, &a).await;
    assert_eq!(
        (view["plan"].clone(), view["balance"].clone()),
        (json!("basic"), json!(44))
    );

    // The model status was kept: listed as disconnected, short-circuited without an upstream
    // call.
    let models = http
        .admin(
            Method::GET,
            a.url(&format!("/admin/orgs/{}/models", tenant.org)),
            None,
        )
        .await;
    assert_eq!(models.status, StatusCode::OK, "{}", models.text());
    let status_of = |id: &str| {
        models
            .json()
            .as_array()
            .expect("a list")
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["status"].clone())
    };
    assert_eq!(status_of(&tenant.models[0]), Some(json!("disconnected")));
    assert_eq!(status_of(&tenant.models[1]), Some(json!("connected")));
    tenant
        .users_me(&http, &a, 0, "after-expired")
        .await
        .assert_error(StatusCode::BAD_GATEWAY, "MODEL_SESSION_EXPIRED");
    assert_eq!(sandbox.requests_received(), upstream_calls + 1);

    // The logs written before the restart are all there.
    let export = http
        .customer(a.url("/api/logs?format=ndjson"), &tenant.key, "export")
        .await;
    assert_eq!(export.status, StatusCode::OK, "{}", export.text());
    let rows: BTreeMap<String, Value> = export
        .text()
        .lines()
        .map(|line| {
            let row: Value = serde_json::from_str(line).expect("an NDJSON row");
            (
                row["request_id"].as_str().unwrap_or_default().to_owned(),
                row,
            )
        })
        .collect();
    for i in 0..5 {
        let row = &rows
            .get(&format!("before-{i}"))
            .unwrap_or_else(|| panic!("before-{i} in the logs after the restart: {rows:?}"));
        assert_eq!(
            (
                row["status"].clone(),
                row["code"].clone(),
                row["credits"].clone()
            ),
            (json!(200), Value::Null, json!(1)),
            "{row}"
        );
        assert_eq!(row["route"], "/api/models/:id/users/me");
        assert_eq!(row["org_id"], json!(tenant.org));
        assert_eq!(row["key_id"], json!(tenant.key_id));
    }
    let expired = rows
        .get("expired")
        .unwrap_or_else(|| panic!("the 502 in the logs after the restart: {rows:?}"));
    assert_eq!(
        (
            expired["status"].clone(),
            expired["code"].clone(),
            expired["credits"].clone()
        ),
        (json!(502), json!("MODEL_SESSION_EXPIRED"), json!(0))
    );
    assert_eq!(expired["model_id"], json!(tenant.models[0]));

    let status = a.terminate().await;
    assert!(status.success(), "{status}");
    upstream.shutdown().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_of_a_killed_replica_are_released_by_the_sweeper() {
    let _serial = serial().await;
    let Some(db) = test_db().await else { return };
    let logs = LogDir::new("sigkill");
    let (sandbox, upstream) = sandbox().await;
    let account = sandbox.add_account();
    const N: u64 = 20;
    let env = env_on(&db, db.url(), &upstream, &session_key())
        .set("TOLLGATE_HOLD_TTL_MS", "2500")
        .set("TOLLGATE_UPSTREAM_TIMEOUT_MS", "2000");
    let (mut a, b) = tokio::join!(
        Gateway::start("A", &env, &logs),
        Gateway::start("B", &env, &logs)
    );
    let http = Http::new();
    let tenant = Tenant::create(&http, &a, "pro", N, &[&account]).await;
    let org = tenant.org_uuid();

    // 20 requests on A that the upstream holds for 10 s: 20 holds take the whole balance.
    sandbox.inject(Fault::stall(Duration::from_secs(10)).times(20));
    let sent_at = Instant::now();
    let mut in_flight = JoinSet::new();
    for i in 0..20 {
        let http = http.clone();
        let url = a.url(&format!("/api/models/{}/users/me", tenant.models[0]));
        let key = tenant.key.clone();
        in_flight.spawn(async move {
            // A dies under them: a transport error is the expected end.
            let req = Http::customer_request(url, &key, &format!("killed-{i}"));
            let _ = http.try_send(req).await;
        });
    }
    loop {
        let (open, _) = holds(&db, org).await;
        if open == 20 && sandbox.requests_received() == 20 {
            break;
        }
        assert!(
            sent_at.elapsed() < Duration::from_millis(1500),
            "20 holds open and 20 upstream calls before the upstream timeout (2 s): \
             {open} holds, {} calls",
            sandbox.requests_received()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = a.kill().await;
    assert!(!status.success(), "SIGKILL: {status}");
    sandbox.clear_faults();
    let client = db.pool().get().await.unwrap();
    let held_ids: BTreeSet<String> = client
        .query(
            "SELECT request_id FROM tollgate_credit_holds WHERE org = $1",
            &[&org],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
        .collect();
    drop(client);
    assert_eq!(
        held_ids,
        (0..20)
            .map(|i| format!("killed-{i}"))
            .collect::<BTreeSet<_>>()
    );

    // Until the holds expire the credits stay set aside: B refuses.
    let refused = tenant.users_me(&http, &b, 0, "while-held").await;
    assert!(
        sent_at.elapsed() < Duration::from_millis(2500),
        "the check ran after the holds could expire ({:?}): too slow to tell",
        sent_at.elapsed()
    );
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "INSUFFICIENT_CREDITS");

    // A starts again; within TTL (2.5 s) + one sweep interval (1.25 s) the holds are gone.
    let a = Gateway::start("A-again", &env, &logs).await;
    loop {
        let (open, held) = holds(&db, org).await;
        if (open, held) == (0, 0) {
            break;
        }
        assert!(
            sent_at.elapsed() < Duration::from_millis(2500 + 1250 + 1000),
            "{open} holds ({held} credits) still open {:?} after they were placed",
            sent_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(tenant.balance(&http, &a).await, N);
    assert_eq!(tenant.balance(&http, &b).await, N);
    let (ids, sum) = charges(&db, org).await;
    assert_eq!(
        (ids.len(), sum),
        (0, 0),
        "nothing charged for the killed requests"
    );

    // Normal requests now: each charged exactly once, down to zero, on either replica.
    for i in 0..N {
        let gw = if i % 2 == 0 { &a } else { &b };
        let answer = tenant.users_me(&http, gw, 0, &format!("normal-{i}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(meta_balance(&answer), N - 1 - i);
    }
    tenant
        .users_me(&http, &a, 0, "one-too-many")
        .await
        .assert_error(StatusCode::PAYMENT_REQUIRED, "INSUFFICIENT_CREDITS");
    let (ids, sum) = charges(&db, org).await;
    assert_eq!(sum, -(N as i64));
    assert_eq!(
        ids,
        (0..N)
            .map(|i| Some(format!("normal-{i}")))
            .collect::<Vec<_>>()
    );
    in_flight.abort_all();
    drop((a, b));
    upstream.shutdown().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_going_away_means_fast_503s_no_charge_and_recovery_by_itself() {
    let _serial = serial().await;
    let Some(db) = test_db().await else { return };
    let logs = LogDir::new("pg-stop");
    let (sandbox, upstream) = sandbox().await;
    let account = sandbox.add_account();
    // The gateway reaches PostgreSQL only through a proxy this test can stop.
    let proxy = TcpProxy::start_new(&postgres_addr(db.url())).await;
    let via_proxy = url_via(db.url(), proxy.addr());
    const N: u64 = 100;
    let env = env_on(&db, &via_proxy, &upstream, &session_key());
    let a = Gateway::start("A", &env, &logs).await;
    let http = Http::new();
    let tenant = Tenant::create(&http, &a, "basic", N, &[&account]).await;
    let mut succeeded = 0u64;

    for i in 0..3 {
        let answer = tenant.users_me(&http, &a, 0, &format!("up-{i}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        succeeded += 1;
        assert_eq!(meta_balance(&answer), N - succeeded);
    }

    // PostgreSQL "stops": every connection drops, new ones are refused.
    proxy.stop().await;
    let upstream_calls = sandbox.requests_received();
    for i in 0..5 {
        let answer = tenant.users_me(&http, &a, 0, &format!("down-{i}")).await;
        answer.assert_error(StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE");
        assert!(
            answer.elapsed < Duration::from_secs(5),
            "a 503 after {:?}",
            answer.elapsed
        );
    }
    assert_eq!(
        sandbox.requests_received(),
        upstream_calls,
        "nothing forwarded without the ledger"
    );

    // It "starts" again: the gateway recovers by itself.
    proxy.start().await;
    let restarted = Instant::now();
    let mut polls = 0;
    loop {
        polls += 1;
        let answer = tenant
            .users_me(&http, &a, 0, &format!("back-{polls}"))
            .await;
        assert!(
            answer.elapsed < Duration::from_secs(5),
            "an answer after {:?}",
            answer.elapsed
        );
        if answer.status == StatusCode::OK {
            succeeded += 1;
            assert_eq!(meta_balance(&answer), N - succeeded);
            break;
        }
        answer.assert_error(StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE");
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "still 503 {:?} after PostgreSQL came back",
            restarted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "recovered {:?} after PostgreSQL came back",
        restarted.elapsed()
    );
    for i in 0..3 {
        let answer = tenant.users_me(&http, &a, 0, &format!("again-{i}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        succeeded += 1;
        assert_eq!(meta_balance(&answer), N - succeeded);
    }
    assert_eq!(tenant.balance(&http, &a).await, N - succeeded);
    let (ids, sum) = charges(&db, tenant.org_uuid()).await;
    assert_eq!((ids.len() as u64, sum), (succeeded, -(succeeded as i64)));
    assert_eq!(sandbox.requests_received(), upstream_calls + succeeded - 3);
    drop(a);
    proxy.stop().await;
    upstream.shutdown().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_fail_open_and_closed_then_one_shared_limit_again() {
    let _serial = serial().await;
    let Some(db) = test_db().await else { return };
    if !redis_server_available() {
        return;
    }
    let logs = LogDir::new("redis-kill");
    let mut redis = RedisServer::start(&logs).await;
    let (sandbox, upstream) = sandbox().await;
    let account = sandbox.add_account();
    // Basic: 60 requests a minute; the burst is out of the way.
    let env = env_on(&db, db.url(), &upstream, &session_key())
        .set("REDIS_URL", &redis.url())
        .set("TOLLGATE_BURST", "basic=1000");
    let open = env.clone().set("TOLLGATE_RATE_LIMIT_FAILURE", "open");
    let closed = env.set("TOLLGATE_RATE_LIMIT_FAILURE", "closed");
    let (a, c) = tokio::join!(
        Gateway::start("A-open", &open, &logs),
        Gateway::start("C-closed", &closed, &logs)
    );
    let http = Http::new();
    let tenant = Tenant::create(&http, &a, "basic", 1000, &[&account]).await;
    let mut succeeded = 0u64;

    // Redis up: one window for both.
    for i in 0..10u64 {
        let gw = if i % 2 == 0 { &a } else { &c };
        let answer = tenant.users_me(&http, gw, 0, &format!("up-{i}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(answer.header_u64("ratelimit-remaining"), Some(60 - 1 - i));
        succeeded += 1;
    }

    redis.kill();

    // Fail-closed: 503, fast.
    for i in 0..5 {
        let answer = tenant.users_me(&http, &c, 0, &format!("closed-{i}")).await;
        answer.assert_error(StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE");
        assert!(
            answer.elapsed < Duration::from_secs(1),
            "{:?}",
            answer.elapsed
        );
    }
    // Fail-open: 200s, fast, until the local limit (60 a minute, counted by A alone).
    let mut local = 0u64;
    loop {
        let answer = tenant
            .users_me(&http, &a, 0, &format!("open-{local}"))
            .await;
        assert!(
            answer.elapsed < Duration::from_secs(1),
            "{:?}",
            answer.elapsed
        );
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            answer.assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMIT_EXCEEDED");
            break;
        }
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        local += 1;
        succeeded += 1;
        assert!(
            local <= 60,
            "A admitted more than the plan's 60 a minute on its own"
        );
    }
    eprintln!("A admitted {local} on its own while Redis was down");
    assert!(
        local >= 55,
        "A alone admitted only {local} before its local limit (60 a minute; it had seen 5)"
    );

    // Redis back on the same port (empty). Both replicas return to it by themselves: proven
    // when C, A, C see consecutive places in one window.
    redis.restart().await;
    let restarted = Instant::now();
    let mut polls = 0;
    let remaining_in_shared = loop {
        polls += 1;
        let first = tenant
            .users_me(&http, &c, 0, &format!("sync-{polls}-c1"))
            .await;
        let middle = tenant
            .users_me(&http, &a, 0, &format!("sync-{polls}-a"))
            .await;
        let last = tenant
            .users_me(&http, &c, 0, &format!("sync-{polls}-c2"))
            .await;
        for answer in [&first, &middle, &last] {
            assert!(
                answer.elapsed < Duration::from_secs(1),
                "{:?}",
                answer.elapsed
            );
            match answer.status {
                StatusCode::OK => succeeded += 1,
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {}
                other => panic!("{other}: {}", answer.text()),
            }
        }
        let places = [&first, &middle, &last].map(|a| {
            (a.status == StatusCode::OK)
                .then(|| a.header_u64("ratelimit-remaining"))
                .flatten()
        });
        if let [Some(x), Some(y), Some(z)] = places {
            if y + 1 == x && z + 1 == y {
                break z;
            }
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "replicas not back on the shared window {:?} after Redis restarted: {places:?}",
            restarted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "shared window back {:?} after Redis restarted",
        restarted.elapsed()
    );

    // Fill the shared window on A: exactly what is left, then 429 on A and on C.
    for i in 0..remaining_in_shared {
        let answer = tenant.users_me(&http, &a, 0, &format!("fill-{i}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(
            answer.header_u64("ratelimit-remaining"),
            Some(remaining_in_shared - 1 - i)
        );
        succeeded += 1;
    }
    tenant
        .users_me(&http, &a, 0, "full-a")
        .await
        .assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMIT_EXCEEDED");
    tenant
        .users_me(&http, &c, 0, "full-c")
        .await
        .assert_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMIT_EXCEEDED");

    // Nothing was charged for the 503s and the 429s.
    assert_eq!(tenant.balance(&http, &a).await, 1000 - succeeded);
    assert_eq!(sandbox.requests_received(), succeeded);
    drop((a, c));
    upstream.shutdown().await;
    db.cleanup().await;
}

/// `GET /api/models/<model>/users/me` (cost 1) with `key` on `gw`.
async fn users_me_with(http: &Http, gw: &Gateway, model: &str, key: &str, rid: &str) -> Answer {
    http.customer(gw.url(&format!("/api/models/{model}/users/me")), key, rid)
        .await
}

/// Polls `key` on both replicas every 150 ms until both refuse it with 401, and returns, for
/// each replica, when the last request it accepted was sent and when the first one it
/// refused was sent (both measured from `origin`).
async fn poll_until_refused(
    http: &Http,
    replicas: [&Gateway; 2],
    model: &str,
    key: &str,
    origin: Instant,
    give_up: Duration,
) -> [(Option<Duration>, Duration); 2] {
    let mut last_ok = [None, None];
    let mut refused = [None, None];
    let mut polls = 0;
    while refused.iter().any(Option::is_none) {
        assert!(
            origin.elapsed() < give_up,
            "still accepted after {give_up:?}"
        );
        for (i, gw) in replicas.iter().enumerate() {
            if refused[i].is_some() {
                continue;
            }
            polls += 1;
            let sent = origin.elapsed();
            let answer = users_me_with(http, gw, model, key, &format!("poll-{polls}")).await;
            if answer.status == StatusCode::UNAUTHORIZED {
                answer.assert_error(StatusCode::UNAUTHORIZED, "INVALID_API_KEY");
                refused[i] = Some(sent);
            } else {
                assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
                last_ok[i] = Some(sent);
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    [0, 1].map(|i| (last_ok[i], refused[i].expect("refused")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_rotation_grace_and_key_credit_limits_hold_on_two_replicas() {
    let _serial = serial().await;
    let Some(pair) = Pair::start("key-lifecycle", "pro=200").await else {
        return;
    };
    let Pair {
        sandbox,
        account,
        a,
        b,
        http,
        ..
    } = &pair;
    let tenant = Tenant::create(http, a, "pro", 200, &[account]).await;
    let model = tenant.models[0].clone();
    let create = |body: Value| {
        let url = a.url(&format!("/admin/orgs/{}/keys", tenant.org));
        async move {
            let answer = http.admin(Method::POST, url, Some(body)).await;
            assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text());
            let json = answer.json();
            (
                json["id"].as_str().unwrap().to_owned(),
                json["key"].as_str().unwrap().to_owned(),
            )
        }
    };

    // A key with a credit limit of 3, spent across both replicas: the 4th call is refused by
    // whichever replica gets it, and another key of the org still works.
    let (limited_id, limited) = create(json!({"name": "limited", "credit_limit": 3})).await;
    for (i, gw) in [a, b, a].into_iter().enumerate() {
        let answer = users_me_with(http, gw, &model, &limited, &format!("limited-{i}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    let calls = sandbox.requests_received();
    for gw in [b, a] {
        let answer = users_me_with(http, gw, &model, &limited, "limited-over").await;
        answer.assert_error(StatusCode::PAYMENT_REQUIRED, "KEY_CREDIT_LIMIT");
    }
    assert_eq!(sandbox.requests_received(), calls, "refusals reach nothing");
    let other = tenant.users_me(http, b, 0, "other-key").await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.text());
    let keys = http
        .admin(
            Method::GET,
            b.url(&format!("/admin/orgs/{}/keys", tenant.org)),
            None,
        )
        .await;
    let view = keys
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == limited_id.as_str())
        .cloned()
        .expect("the limited key is listed");
    assert_eq!(view["credits_used_this_period"], 3, "{view}");
    assert_eq!(tenant.balance(http, b).await, 200 - 4);

    // An expiring key works on both replicas (and is cached by both) until its time, then is
    // refused by both at that time, not when a cache entry ends.
    let origin = Instant::now();
    let expires_ms = tollgate::core::SystemClock.now_ms() + 3_000;
    let (_, expiring) = create(json!({
        "name": "expiring",
        "expires_at": tollgate::core::time::rfc3339_from_ms(expires_ms),
    }))
    .await;
    let expiry = Duration::from_millis(3_000);

    // The org's main key rotated on A with a 5 s grace period.
    for gw in [a, b] {
        let answer = tenant.users_me(http, gw, 0, "before-rotation").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    let rotate_sent = Instant::now();
    let rotated = http
        .admin(
            Method::POST,
            a.url(&format!("/admin/keys/{}/rotate", tenant.key_id)),
            Some(json!({"grace_seconds": 5})),
        )
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text());
    let rotated_by = rotate_sent.elapsed();
    let new = rotated.json()["key"].as_str().unwrap().to_owned();

    let (expiring_seen, graced_seen) = tokio::join!(
        poll_until_refused(
            http,
            [a, b],
            &model,
            &expiring,
            origin,
            Duration::from_secs(10)
        ),
        poll_until_refused(
            http,
            [a, b],
            &model,
            &tenant.key,
            rotate_sent,
            Duration::from_secs(12)
        ),
    );
    // Scheduling slack between this test and the replicas (two cores, four processes).
    let slack = Duration::from_millis(400);
    for (replica, (last_ok, refused)) in ["A", "B"].into_iter().zip(expiring_seen) {
        let last_ok = last_ok.unwrap_or_else(|| panic!("{replica} accepted the expiring key"));
        assert!(
            last_ok < expiry,
            "{replica} accepted it {last_ok:?} after creation"
        );
        assert!(
            refused + slack >= expiry,
            "{replica} refused it early: {refused:?}"
        );
        assert!(
            refused < expiry + slack,
            "{replica} refused it late: {refused:?}"
        );
    }
    let grace = Duration::from_secs(5);
    for (replica, (last_ok, refused)) in ["A", "B"].into_iter().zip(graced_seen) {
        let last_ok = last_ok.unwrap_or_else(|| panic!("{replica} accepted the old key"));
        assert!(
            last_ok < grace + rotated_by,
            "{replica} accepted the old key {last_ok:?} after the rotation"
        );
        assert!(
            last_ok + slack >= grace,
            "{replica} stopped accepting it early: {last_ok:?}"
        );
        assert!(
            refused < grace + rotated_by + slack,
            "{replica}: {refused:?}"
        );
    }
    // The new key works on both.
    for gw in [a, b] {
        let answer = users_me_with(http, gw, &model, &new, "new-key").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    pair.finish().await;
}
