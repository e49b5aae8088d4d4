//! `Idempotency-Key` through the turnkey gateway (SPEC §14): two replicas on one PostgreSQL
//! schema in front of one sandbox upstream.
//!
//! Needs PostgreSQL (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`);
//! skips without it unless `TOLLGATE_REQUIRE_SERVICES=1`.

mod common;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use tollgate::gateway::Config;
use tollgate::sandbox::{sandbox_rules, Fault, Sandbox, SandboxServer};
use tollgate_core::OrgId;
use tollgate_postgres::testing::TestDb;

use common::{test_config, Answer, TestGateway};

fn url_in_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

/// A replica on `db`'s schema, proxying to `upstream`, without a demo tenant.
fn replica_config(db: &TestDb, upstream: &SandboxServer) -> Config {
    Config {
        database_url: Some(url_in_schema(db.url(), db.schema())),
        session_key: Some([7; 32]),
        upstream: Some(upstream.base_url()),
        demo: false,
        ..test_config()
    }
}

struct Tenant {
    org: OrgId,
    model: String,
    key: String,
}

async fn admin_ok(gw: &TestGateway, method: Method, path: &str, body: Value) -> Value {
    let answer = gw.admin(method, path, Some(body)).await;
    assert!(answer.status.is_success(), "{path}: {}", answer.text());
    answer.json()
}

/// An org on the basic plan with 1,000 credits, one model on a sandbox account, one key.
async fn tenant(gw: &TestGateway, sandbox: &Sandbox) -> Tenant {
    let org = admin_ok(gw, Method::POST, "/admin/orgs", json!({"name": "Idem Org"})).await;
    let org = org["id"].as_str().unwrap().to_owned();
    admin_ok(
        gw,
        Method::PUT,
        &format!("/admin/orgs/{org}/subscription"),
        json!({"plan": "basic"}),
    )
    .await;
    admin_ok(
        gw,
        Method::PUT,
        &format!("/admin/orgs/{org}/credits"),
        json!({"balance": 1000}),
    )
    .await;
    let account = sandbox.add_account();
    let model = admin_ok(
        gw,
        Method::POST,
        &format!("/admin/orgs/{org}/models"),
        json!({"name": "m", "session": account.session_json()}),
    )
    .await;
    let key = admin_ok(
        gw,
        Method::POST,
        &format!("/admin/orgs/{org}/keys"),
        json!({"name": "k"}),
    )
    .await;
    Tenant {
        org: org.parse().unwrap(),
        model: model["id"].as_str().unwrap().to_owned(),
        key: key["key"].as_str().unwrap().to_owned(),
    }
}

impl Tenant {
    fn send_message(&self, gw: &TestGateway, key: &str, body: &str) -> Request<Full<Bytes>> {
        let path = format!("/api/models/{}/chats/5/messages", self.model);
        let mut req = gw.request(Method::POST, &path, Some(&self.key), Some(body));
        req.headers_mut()
            .insert("idempotency-key", key.parse().unwrap());
        req
    }
}

fn replayed(answer: &Answer) -> bool {
    answer
        .headers
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

async fn balance(gw: &TestGateway, org: OrgId) -> u64 {
    let view = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}"), None)
        .await;
    view.json()["balance"].as_u64().unwrap()
}

async fn charges(gw: &TestGateway, org: OrgId) -> Vec<i64> {
    gw.gw
        .state()
        .ledger
        .entries(org)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == tollgate::credit_meter::EntryKind::Charge)
        .map(|e| -(e.delta_plan + e.delta_topup))
        .collect()
}

const UPSTREAM: &str = "/api2/v2/chats/5/messages";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_over_two_replicas_runs_once_and_is_billed_once() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let sandbox = Sandbox::new(sandbox_rules());
    let upstream = sandbox.bind("127.0.0.1:0").await.unwrap();
    let a = common::start(replica_config(&db, &upstream)).await;
    let b = common::start(replica_config(&db, &upstream)).await;
    let t = tenant(&a, &sandbox).await;
    let body = r#"{"text":"hello once"}"#;

    // 50 identical requests at once, alternating between the replicas.
    let mut all = JoinSet::new();
    for i in 0..50 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let req = t.send_message(gw, "send-1", body);
        let client = gw.client.clone();
        all.spawn(async move {
            let res = client.request(req).await.expect("answered");
            let (parts, body) = res.into_parts();
            let body = http_body_util::BodyExt::collect(body)
                .await
                .unwrap()
                .to_bytes();
            Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            }
        });
    }
    let answers: Vec<Answer> = all.join_all().await;
    assert_eq!(sandbox.requests_to(UPSTREAM), 1, "the upstream saw one");
    let originals: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK && !replayed(a))
        .collect();
    assert_eq!(
        originals.len(),
        1,
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    let original = originals[0];
    assert_eq!(original.json()["_meta"]["_credits"]["used"], 2);
    for answer in &answers {
        match answer.status {
            StatusCode::OK => assert_eq!(answer.body, original.body, "a replay is that response"),
            StatusCode::CONFLICT => assert_eq!(answer.code(), "IDEMPOTENCY_IN_PROGRESS"),
            other => panic!("unexpected {other}: {}", answer.text()),
        }
    }
    assert_eq!(charges(&a, t.org).await, vec![2], "one 2-credit charge");
    assert_eq!(balance(&b, t.org).await, 998);

    // A retry after it finished, on either replica, replays it.
    for gw in [&a, &b] {
        let retry = gw.send(t.send_message(gw, "send-1", body)).await;
        assert_eq!(retry.status, StatusCode::OK);
        assert!(replayed(&retry));
        assert_eq!(retry.body, original.body);
        assert_eq!(
            retry.headers["content-type"],
            original.headers["content-type"]
        );
    }
    // The same key with another body.
    let reused = b
        .send(t.send_message(&b, "send-1", r#"{"text":"something else"}"#))
        .await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.code(), "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(sandbox.requests_to(UPSTREAM), 1);
    assert_eq!(charges(&a, t.org).await, vec![2]);
    assert_eq!(balance(&a, t.org).await, 998);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_5xx_is_not_stored_and_the_retry_runs() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let sandbox = Sandbox::new(sandbox_rules());
    let upstream = sandbox.bind("127.0.0.1:0").await.unwrap();
    let a = common::start(replica_config(&db, &upstream)).await;
    let b = common::start(replica_config(&db, &upstream)).await;
    let t = tenant(&a, &sandbox).await;
    let body = r#"{"text":"retry me"}"#;

    sandbox.inject(Fault::fail(StatusCode::INTERNAL_SERVER_ERROR).times(1));
    let failed = a.send(t.send_message(&a, "send-2", body)).await;
    assert_eq!(failed.status, StatusCode::BAD_GATEWAY, "{}", failed.text());
    assert_eq!(failed.code(), "UPSTREAM_ERROR");
    assert!(
        charges(&a, t.org).await.is_empty(),
        "a failure is not billed"
    );

    // Not stored: the retry (on the other replica) runs and is billed once.
    let retry = b.send(t.send_message(&b, "send-2", body)).await;
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.text());
    assert!(!replayed(&retry));
    assert_eq!(sandbox.requests_to(UPSTREAM), 2);
    let again = a.send(t.send_message(&a, "send-2", body)).await;
    assert!(replayed(&again));
    assert_eq!(again.body, retry.body);
    assert_eq!(sandbox.requests_to(UPSTREAM), 2);
    assert_eq!(charges(&a, t.org).await, vec![2]);
    db.cleanup().await;
}

/// Without PostgreSQL the keys live in Redis (with `REDIS_URL`) or in the process.
#[tokio::test]
async fn without_postgres_keys_live_in_redis_or_in_memory() {
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let redis_up = tollgate::idempotency::RedisIdempotencyStore::open(&redis_url)
        .unwrap()
        .ping()
        .await
        .is_ok();
    if !redis_up && tollgate_postgres::testing::require_services() {
        panic!("TOLLGATE_REQUIRE_SERVICES=1 but Redis at {redis_url} is unreachable");
    }
    let mut configs = vec![("memory", test_config())];
    if redis_up {
        configs.push((
            "redis",
            Config {
                redis_url: Some(redis_url.clone()),
                ..test_config()
            },
        ));
    } else {
        eprintln!("skipping the Redis half: Redis at {redis_url} is unreachable");
    }
    for (backend, config) in configs {
        let gw = common::start(config).await;
        let send = |body: &str| {
            let mut req = gw.request(
                Method::POST,
                &gw.model_path("/chats/7/messages"),
                Some(&gw.key()),
                Some(body),
            );
            req.headers_mut()
                .insert("idempotency-key", "demo-1".parse().unwrap());
            req
        };
        let first = gw.send(send(r#"{"text":"a"}"#)).await;
        assert_eq!(first.status, StatusCode::OK, "{backend}: {}", first.text());
        let again = gw.send(send(r#"{"text":"a"}"#)).await;
        assert!(replayed(&again), "{backend}");
        assert_eq!(again.body, first.body, "{backend}");
        assert_eq!(gw.balance().await, Some(998), "{backend}: billed once");
        let reused = gw.send(send(r#"{"text":"b"}"#)).await;
        assert_eq!(reused.code(), "IDEMPOTENCY_KEY_REUSED", "{backend}");
        let sandbox = gw.gw.sandbox().unwrap();
        assert_eq!(
            sandbox.requests_to("/api2/v2/chats/7/messages"),
            1,
            "{backend}"
        );
        if backend == "redis" {
            // Another replica on the same Redis sees the stored answer.
            use tollgate::idempotency::{Begin, Fingerprint, IdempotencyStore};
            let other = tollgate::idempotency::RedisIdempotencyStore::open(&redis_url).unwrap();
            let org = gw.gw.demo().unwrap().org.to_string();
            let fp = Fingerprint::new(
                &Method::POST,
                &gw.model_path("/chats/7/messages"),
                br#"{"text":"a"}"#,
            );
            let found = other
                .begin(&org, "demo-1", fp, std::time::Duration::from_secs(30))
                .await
                .unwrap();
            assert!(
                matches!(found, Begin::Replay(ref r) if r.body == first.body),
                "{found:?}"
            );
        }
    }
}
