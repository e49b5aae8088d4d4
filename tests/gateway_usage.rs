//! End to end: usage rollups and `GET /api/usage` / `GET /admin/orgs/:org/usage` (SPEC §11).
//!
//! In process: after a mix of 200s, 402s, 429s, upstream failures and a client hang-up,
//! every count matches what was sent and Σ credits equals the ledger's charges; the
//! parameters' rules and tenancy. With processes (`tests/support_proc`): two replicas on one
//! PostgreSQL add into the same rollups, the rollups survive a restart, and passwords,
//! session and invite tokens never reach the gateways' output, `/metrics` or the log export.

mod common;
mod support_proc;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::Answer;
use tollgate::credit_meter::EntryKind;
use tollgate::sandbox::{sandbox_rules, Fault, Sandbox};

/// Status counts as the usage API reports them.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
struct Tally {
    requests: u64,
    ok: u64,
    client_errors: u64,
    server_errors: u64,
    rate_limited: u64,
}

impl Tally {
    fn add(&mut self, status: u16) {
        self.requests += 1;
        self.ok += u64::from((200..300).contains(&status));
        self.client_errors += u64::from((400..500).contains(&status));
        self.server_errors += u64::from((500..600).contains(&status));
        self.rate_limited += u64::from(status == 429);
    }

    fn of(row: &Value) -> Tally {
        let n = |k: &str| row[k].as_u64().unwrap_or_else(|| panic!("{k} in {row}"));
        Tally {
            requests: n("requests"),
            ok: n("ok"),
            client_errors: n("client_errors"),
            server_errors: n("server_errors"),
            rate_limited: n("rate_limited"),
        }
    }
}

/// Sums the rows of a series.
fn total(series: &Value) -> (Tally, u64) {
    let mut t = Tally::default();
    let mut credits = 0;
    for row in series["series"].as_array().expect("a series") {
        let r = Tally::of(row);
        t.requests += r.requests;
        t.ok += r.ok;
        t.client_errors += r.client_errors;
        t.server_errors += r.server_errors;
        t.rate_limited += r.rate_limited;
        credits += row["credits"].as_u64().unwrap();
    }
    (t, credits)
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what} within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_count_matches_what_was_sent_and_credits_match_the_ledger() {
    let gw = common::start(common::test_config()).await;
    let demo = gw.gw.demo().unwrap().clone();
    let sandbox = gw.gw.sandbox().unwrap().clone();
    let key = gw.key();
    let mut sent = Tally::default();
    let send = |sent: &mut Tally, answer: &Answer| sent.add(answer.status.as_u16());

    for _ in 0..4 {
        let a = gw.get(&gw.model_path("/users/me")).await;
        assert_eq!(a.status, 200);
        send(&mut sent, &a);
    }
    for _ in 0..2 {
        let a = gw.get(&gw.model_path("/payouts/stats")).await;
        assert_eq!(a.status, 200);
        send(&mut sent, &a);
    }
    sandbox.inject(Fault::fail(StatusCode::SERVICE_UNAVAILABLE).times(2));
    for _ in 0..2 {
        let a = gw.get(&gw.model_path("/chats")).await;
        assert_eq!(a.status, 502, "{}", a.text());
        send(&mut sent, &a);
    }
    // A client that hangs up while the upstream stalls: logged as 499, not charged.
    sandbox.inject(Fault::stall(Duration::from_secs(3)));
    let mut stream = TcpStream::connect(gw.gw.local_addr()).await.unwrap();
    let raw = format!(
        "GET {} HTTP/1.1\r\nhost: {}\r\nx-api-key: {key}\r\n\r\n",
        gw.model_path("/chats"),
        gw.gw.local_addr()
    );
    stream.write_all(raw.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stream);
    sent.add(499);
    // A burst past the per-second limit: some 200s, some 429s.
    let burst: Vec<_> = (0..14)
        .map(|_| {
            let req = gw.request(Method::GET, &gw.model_path("/chats"), Some(&key), None);
            gw.send(req)
        })
        .collect();
    let answers = futures_util::future::join_all(burst).await;
    assert!(
        answers.iter().any(|a| a.status == 429),
        "the burst hit the limit"
    );
    answers.iter().for_each(|a| send(&mut sent, a));
    // 402s: one credit left, a 2-credit route (once the burst's second has passed).
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    gw.admin(
        Method::PUT,
        &format!("/admin/orgs/{}/credits", demo.org),
        Some(json!({"balance": 1})),
    )
    .await;
    for _ in 0..2 {
        let a = gw.get(&gw.model_path("/payouts/stats")).await;
        assert_eq!(a.status, 402);
        send(&mut sent, &a);
    }
    let a = gw.get("/api/credits").await;
    assert_eq!(a.status, 200);
    send(&mut sent, &a);
    // Without a valid key nobody's usage changes.
    assert_eq!(
        gw.send(gw.request(
            Method::GET,
            &gw.model_path("/chats"),
            Some("sk_live_nope"),
            None
        ))
        .await
        .status,
        401
    );

    // The operator's view is not itself an /api request: poll it until the worker caught up.
    let admin_usage = format!("/admin/orgs/{}/usage", demo.org);
    eventually("the rollups count every request", || async {
        let a = gw.admin(Method::GET, &admin_usage, None).await;
        a.status == 200 && total(&a.json()).0 == sent
    })
    .await;

    let charged: u64 = gw
        .gw
        .state()
        .ledger
        .entries(demo.org)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == EntryKind::Charge)
        .map(|e| (-(e.delta_plan + e.delta_topup)) as u64)
        .sum();
    let ok_chats = answers.iter().filter(|a| a.status == 200).count() as u64;
    assert_eq!(
        charged,
        4 + 2 * 2 + ok_chats,
        "the ledger charged the 2xx responses"
    );

    let usage = gw.get("/api/usage").await;
    assert_eq!(usage.status, 200, "{}", usage.text());
    assert_eq!(usage.headers["content-type"], "application/json");
    let body = usage.json();
    let (counts, credits) = total(&body);
    assert_eq!(counts, sent, "{body}");
    assert_eq!(credits, charged, "Σ credits = the ledger's charges");
    assert_eq!(body["granularity"], "day");
    let account = gw.get("/api/credits").await.json();
    // By default the current billing period, widened to whole days.
    let ms = |v: &Value| tollgate::core::time::ms_from_rfc3339(v.as_str().unwrap()).unwrap();
    let (to, end) = (ms(&body["to"]), ms(&account["period_end"]));
    assert!(to >= end && to - end < 86_400_000, "{body} vs {account}");
    let row = &body["series"][0];
    assert!(
        row.get("model_id").is_none() && row.get("route").is_none(),
        "{row}"
    );
    assert!(row["start"].as_str().unwrap().ends_with("T00:00:00.000Z"));
    let mut keys: Vec<&str> = row
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "client_errors",
            "credits",
            "ok",
            "rate_limited",
            "requests",
            "server_errors",
            "start"
        ]
    );

    // By model and route, hourly: the same totals, split.
    let split = gw
        .get("/api/usage?granularity=hour&group_by=model,route")
        .await
        .json();
    let rows = split["series"].as_array().unwrap();
    let stats = rows
        .iter()
        .filter(|r| r["route"] == "/api/models/:id/payouts/stats")
        .fold((0, 0, 0), |acc, r| {
            (
                acc.0 + r["requests"].as_u64().unwrap(),
                acc.1 + r["ok"].as_u64().unwrap(),
                acc.2 + r["credits"].as_u64().unwrap(),
            )
        });
    assert_eq!(stats, (4, 2, 4));
    assert!(rows
        .iter()
        .all(|r| r["model_id"] == demo.model.to_string() || r["route"] != "/api/models/:id/chats"));
    let credits_row = rows
        .iter()
        .find(|r| r["route"] == "/api/credits")
        .expect("the /api/credits row");
    assert_eq!(credits_row["model_id"], Value::Null);
    let (split_counts, split_credits) = total(&split);
    assert!(split_counts.requests >= sent.requests && split_credits == charged);
    let by_model = gw.get("/api/usage?group_by=model").await.json();
    assert!(
        by_model["series"][0].get("route").is_none()
            && by_model["series"][0].get("model_id").is_some()
    );

    // Another org sees none of it.
    let other = gw
        .admin(Method::POST, "/admin/orgs", Some(json!({"name": "Other"})))
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    gw.admin(
        Method::PUT,
        &format!("/admin/orgs/{other}/subscription"),
        Some(json!({"plan": "free"})),
    )
    .await;
    let other_key = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{other}/keys"),
            Some(json!({"name": "k"})),
        )
        .await
        .json()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let theirs = gw
        .send(gw.request(Method::GET, "/api/usage", Some(&other_key), None))
        .await
        .json();
    assert_eq!(theirs["series"], json!([]));
    let unknown = gw
        .admin(
            Method::GET,
            &format!("/admin/orgs/{}/usage", tollgate::core::OrgId::new()),
            None,
        )
        .await;
    assert_eq!(unknown.status, 404);
}

#[tokio::test]
async fn bad_parameters_are_400_and_the_range_limits_hold() {
    let gw = common::start(common::test_config()).await;
    let t0 = "2024-03-01T00:00:00Z";
    let bad = [
        "from=yesterday".to_owned(),
        "to=1714521600000".to_owned(),
        "granularity=week".to_owned(),
        "group_by=key".to_owned(),
        "group_by=model,org".to_owned(),
        "cursor=x".to_owned(),
        format!("from={t0}&to={t0}"),
        format!("from=2024-03-02T00:00:00Z&to={t0}"),
        format!("from={t0}&to=2024-04-01T00:00:01Z&granularity=hour"),
        format!("from={t0}&to=2025-04-05T00:00:01Z&granularity=day"),
        format!("from={t0}&from={t0}"),
    ];
    for q in &bad {
        let a = gw.get(&format!("/api/usage?{q}")).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{q}: {}", a.text());
        assert_eq!(a.code(), "INVALID_REQUEST", "{q}");
        let org = gw.gw.demo().unwrap().org;
        let admin = gw
            .admin(Method::GET, &format!("/admin/orgs/{org}/usage?{q}"), None)
            .await;
        assert_eq!(admin.code(), "INVALID_REQUEST", "admin {q}");
    }
    // Exactly at the limits is fine; bounds come back rounded to whole buckets.
    let hourly = gw
        .get("/api/usage?from=2024-03-01T00:30:00Z&to=2024-04-01T00:30:00Z&granularity=hour")
        .await;
    assert_eq!(hourly.status, 200, "{}", hourly.text());
    assert_eq!(hourly.json()["from"], "2024-03-01T00:00:00.000Z");
    assert_eq!(hourly.json()["to"], "2024-04-01T01:00:00.000Z");
    let daily = gw
        .get("/api/usage?from=2024-03-01T10:00:00%2B02:00&to=2025-04-05T08:00:00Z&granularity=day")
        .await;
    assert_eq!(daily.status, 200, "{}", daily.text());
    assert_eq!(daily.json()["from"], "2024-03-01T00:00:00.000Z");
    assert_eq!(
        daily.json()["to"],
        "2025-04-06T00:00:00.000Z",
        "rounded up to the day's end"
    );
    assert_eq!(daily.json()["series"], json!([]));
    // Usage costs nothing.
    assert_eq!(gw.balance().await, Some(1000));
}

/// The text of a process's log file.
fn log_text(logs: &support_proc::LogDir, name: &str) -> String {
    std::fs::read_to_string(logs.file(name)).unwrap_or_default()
}

fn form_request(
    url: String,
    cookie: Option<&str>,
    fields: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut body = form_urlencoded::Serializer::new(String::new());
    for (k, v) in fields {
        body.append_pair(k, v);
    }
    let mut req = Request::post(url).header("content-type", "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        req = req.header("cookie", format!("tollgate_session={c}"));
    }
    req.body(Full::new(Bytes::from(body.finish()))).unwrap()
}

fn session_of(answer: &support_proc::Answer) -> Option<String> {
    answer
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.strip_prefix("tollgate_session="))
        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
        .find(|v| !v.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_rollups_and_sessions_restarts_keep_them_and_secrets_stay_out_of_logs() {
    use support_proc::{
        serial, session_key, test_db, url_in_schema, Gateway, GatewayEnv, Http, LogDir,
    };

    let _serial = serial().await;
    let Some(db) = test_db().await else { return };
    let logs = LogDir::new("usage");
    let sandbox = Sandbox::new(sandbox_rules());
    let upstream = sandbox.bind("127.0.0.1:0").await.unwrap();
    let account = sandbox.add_account();
    let env = GatewayEnv::new(&upstream.base_url())
        .database(&url_in_schema(db.url(), db.schema()), &session_key())
        .set("RUST_LOG", "debug")
        .set("TOLLGATE_BURST", "basic=100");
    let (a, b) = tokio::join!(
        Gateway::start("A", &env, &logs),
        Gateway::start("B", &env, &logs)
    );
    let http = Http::new();

    let org = http
        .admin(
            Method::POST,
            a.url("/admin/orgs"),
            Some(json!({"name": "Replicated"})),
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    http.admin(
        Method::PUT,
        a.url(&format!("/admin/orgs/{org}/subscription")),
        Some(json!({"plan": "basic"})),
    )
    .await;
    let model = http
        .admin(
            Method::POST,
            a.url(&format!("/admin/orgs/{org}/models")),
            Some(json!({"name": "m", "session": account.session_json()})),
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = http
        .admin(
            Method::POST,
            a.url(&format!("/admin/orgs/{org}/keys")),
            Some(json!({"name": "k"})),
        )
        .await
        .json()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/models/{model}/users/me");
    let requests = (0..12).map(|i| {
        let gw = if i < 7 { &a } else { &b };
        http.send(Http::customer_request(
            gw.url(&path),
            &key,
            &format!("r-{i}"),
        ))
    });
    for answer in futures_util::future::join_all(requests).await {
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let usage_path = format!("/admin/orgs/{org}/usage?granularity=hour");
    let usage_of = |gw: &Gateway| {
        let (http, url) = (http.clone(), gw.url(&usage_path));
        async move {
            let body = http.admin(Method::GET, url, None).await.json();
            let (t, credits) = total(&body);
            (t.requests, t.ok, credits)
        }
    };
    let mut seen = (0, 0, 0);
    for _ in 0..200 {
        seen = usage_of(&b).await;
        if seen == (12, 12, 12) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen,
        (12, 12, 12),
        "both replicas added into the same rollups"
    );
    assert_eq!(usage_of(&a).await, (12, 12, 12));

    // A user invited on A sets a password on B, signs in on A, and the session works on B.
    let password = "replicated secret passphrase";
    let invite = http
        .admin(
            Method::POST,
            a.url(&format!("/admin/orgs/{org}/users")),
            Some(json!({"email": "ops@example.com", "role": "owner"})),
        )
        .await;
    assert_eq!(invite.status, 201, "{}", invite.text());
    let invite_url = invite.json()["invite_url"].as_str().unwrap().to_owned();
    let invite_path = &invite_url[invite_url.find("/dashboard/invite/").unwrap()..];
    let invite_token = invite_path.rsplit('/').next().unwrap().to_owned();
    let set = http
        .send(form_request(
            b.url(invite_path),
            None,
            &[("password", password)],
        ))
        .await;
    assert_eq!(set.status, 303, "{}", set.text());
    let login = http
        .send(form_request(
            a.url("/dashboard/login"),
            None,
            &[("email", "ops@example.com"), ("password", password)],
        ))
        .await;
    assert_eq!(login.status, 303, "{}", login.text());
    let session = session_of(&login).expect("a session cookie");
    let page = http
        .send(
            Request::get(b.url(&format!("/dashboard/orgs/{org}")))
                .header("cookie", format!("tollgate_session={session}"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(
        page.status, 200,
        "the session is valid on the other replica"
    );

    // Stopped and started again: the rollups are still there.
    let (mut a, mut b) = (a, b);
    assert!(a.terminate().await.success());
    assert!(b.terminate().await.success());
    let a2 = Gateway::start("A2", &env, &logs).await;
    assert_eq!(
        usage_of(&a2).await,
        (12, 12, 12),
        "rollups survive a restart"
    );
    let metrics = http
        .send(
            Request::get(a2.url("/metrics"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .text();
    let export = http
        .customer(a2.url("/api/logs"), &key, "export")
        .await
        .text();
    drop(a2);

    let output = format!(
        "{}{}{}",
        log_text(&logs, "A"),
        log_text(&logs, "B"),
        log_text(&logs, "A2")
    );
    assert!(
        output.contains("tollgate gateway listening"),
        "the logs were captured"
    );
    for (what, secret) in [
        ("password", password),
        ("session token", session.as_str()),
        ("invite token", invite_token.as_str()),
    ] {
        for (place, text) in [
            ("process output", &output),
            ("metrics", &metrics),
            ("log export", &export),
        ] {
            assert!(!text.contains(secret), "the {what} appears in the {place}");
        }
    }
    drop((a, b));
    upstream.shutdown().await;
    db.cleanup().await;
}
