//! Webhooks (docs/contract.md §15): the store's behaviour on memory and PostgreSQL, and end to
//! end on the gateway with a local receiver: each event once per occurrence with a signature
//! that verifies, retries until the receiver takes it, private addresses refused unless
//! allowed, a hanging receiver never slowing a customer request, and (with processes) a
//! gateway killed before delivery delivering after its restart.

mod common;
mod support_proc;

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use common::TestGateway;
use tollgate::gateway::webhooks::{
    Attempt, DeliveryState, Endpoint, Event, EventType, MemoryWebhookStore, PostgresWebhookStore,
    WebhookStore, MAX_ENDPOINTS_PER_ORG,
};
use tollgate::gateway::Config;
use tollgate_core::OrgId;
use tollgate_postgres::testing::TestDb;

// ---------------------------------------------------------------------------------------------
// A receiver

/// What the receiver answers.
#[derive(Debug, Clone)]
enum Mode {
    /// 200.
    Ok,
    /// These statuses, one per request, then 200.
    Fail(Vec<u16>),
    /// Never answers.
    Hang,
}

#[derive(Debug, Clone)]
struct Hit {
    signature: String,
    event_header: String,
    body: String,
    answered: Option<u16>,
}

#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    mode: Arc<Mutex<Mode>>,
}

impl Receiver {
    async fn start(mode: Mode) -> Receiver {
        Self::serve(mode, None).await
    }

    /// Over TLS with `tls` (a certificate for `localhost`).
    async fn start_tls(mode: Mode, tls: rustls::ServerConfig) -> Receiver {
        Self::serve(mode, Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))).await
    }

    async fn serve(mode: Mode, tls: Option<tokio_rustls::TlsAcceptor>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver {
            addr: listener.local_addr().unwrap(),
            hits: Arc::default(),
            mode: Arc::new(Mutex::new(mode)),
        };
        let this = receiver.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let this = this.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let this = this.clone();
                        async move { Ok::<_, Infallible>(this.answer(req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        receiver
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let (signature, event_header) = (header("tollgate-signature"), header("tollgate-event"));
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let answer = {
            let mut mode = self.mode.lock().unwrap();
            match &mut *mode {
                Mode::Ok => Some(200),
                Mode::Hang => None,
                Mode::Fail(statuses) if statuses.is_empty() => Some(200),
                Mode::Fail(statuses) => Some(statuses.remove(0)),
            }
        };
        self.hits.lock().unwrap().push(Hit {
            signature,
            event_header,
            body: String::from_utf8(body.to_vec()).unwrap(),
            answered: answer,
        });
        match answer {
            Some(status) => {
                let mut res = Response::new(Full::new(Bytes::from_static(b"ok")));
                *res.status_mut() = StatusCode::from_u16(status).unwrap();
                res
            }
            None => {
                std::future::pending::<()>().await;
                unreachable!()
            }
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/tollgate", self.addr)
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// The bodies received of type `kind`, parsed.
    fn events(&self, kind: &str) -> Vec<Value> {
        self.hits()
            .iter()
            .map(|h| serde_json::from_str::<Value>(&h.body).unwrap())
            .filter(|b| b["type"] == kind)
            .collect()
    }

    /// Waits until `count` bodies of type `kind` arrived (at most 10 s), then a little longer
    /// to catch duplicates; returns them.
    async fn wait_for(&self, kind: &str, count: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.events(kind).len() < count {
            assert!(
                Instant::now() < deadline,
                "{count} × {kind} not received; got {:?}",
                self.hits()
                    .iter()
                    .map(|h| &h.event_header)
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        self.events(kind)
    }
}

/// Checks `Tollgate-Signature: t=…,v1=…` against `secret` independently of the gateway's code.
fn verify(secret: &str, hit: &Hit) {
    let (t, v1) = hit
        .signature
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("malformed signature {:?}", hit.signature));
    let t: u64 = t.parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        t.abs_diff(now) <= 60,
        "signature time {t} is not now ({now})"
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let signed = format!("{t}.{}", hit.body);
    ring::hmac::verify(&key, signed.as_bytes(), &hex::decode(v1).unwrap())
        .unwrap_or_else(|_| panic!("the signature does not verify for {}", hit.body));
    // Any change to the body breaks it.
    assert!(ring::hmac::verify(
        &key,
        format!("{t}.{} ", hit.body).as_bytes(),
        &hex::decode(v1).unwrap()
    )
    .is_err());
}

// ---------------------------------------------------------------------------------------------
// Gateways

fn webhook_config() -> Config {
    let mut config = common::test_config();
    config.burst = [5, 1_000, 30, 200];
    config.webhook_allow_private = true;
    config.webhook_retry_base = Duration::from_millis(100);
    config.webhook_scan_interval = Duration::from_millis(200);
    config
}

async fn admin_ok(gw: &TestGateway, method: Method, path: &str, body: Value) -> Value {
    let answer = gw.admin(method.clone(), path, Some(body)).await;
    assert!(
        answer.status.is_success(),
        "{method} {path}: {} {}",
        answer.status,
        answer.text()
    );
    answer.json()
}

fn demo_org(gw: &TestGateway) -> OrgId {
    gw.gw.demo().expect("demo mode").org
}

/// Registers `url` for `events` on the demo org; (id, secret).
async fn register(gw: &TestGateway, url: &str, events: &[&str]) -> (String, String) {
    let org = demo_org(gw);
    let answer = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{org}/webhooks"),
            Some(json!({"url": url, "events": events})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text());
    let body = answer.json();
    let mut fields: Vec<_> = body.as_object().unwrap().keys().cloned().collect();
    fields.sort();
    assert_eq!(fields, ["id", "secret"]);
    (
        body["id"].as_str().unwrap().to_owned(),
        body["secret"].as_str().unwrap().to_owned(),
    )
}

const ALL: [&str; 6] = [
    "credits.low",
    "credits.exhausted",
    "model.disconnected",
    "model.reconnected",
    "subscription.renewed",
    "key.expiring",
];

fn assert_envelope(body: &Value, kind: &str, org: OrgId) {
    let mut fields: Vec<_> = body.as_object().unwrap().keys().cloned().collect();
    fields.sort();
    assert_eq!(
        fields,
        ["created_at", "data", "id", "org_id", "type"],
        "{body}"
    );
    assert_eq!(body["type"], kind);
    assert_eq!(body["org_id"], org.to_string());
    assert!(body["id"].as_str().unwrap().parse::<uuid::Uuid>().is_ok());
    assert!(body["created_at"].as_str().unwrap().ends_with('Z'));
}

// ---------------------------------------------------------------------------------------------
// End to end, in memory

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_reaches_the_receiver_once_per_occurrence_signed() {
    let gw = common::start(webhook_config()).await;
    let org = demo_org(&gw);
    let receiver = Receiver::start(Mode::Ok).await;
    let (endpoint, secret) = register(&gw, &receiver.url(), &ALL).await;

    // The list shows it without its secret.
    let listed = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/webhooks"), None)
        .await;
    assert_eq!(listed.status, StatusCode::OK);
    assert!(!listed.text().contains(&secret));
    assert_eq!(listed.json()[0]["id"], endpoint.as_str());
    assert_eq!(listed.json()[0]["events"], json!(ALL));
    assert_eq!(listed.json()[0]["url"], receiver.url());

    // model.disconnected: the upstream refuses the session; three requests see it, one event.
    let sandbox = gw.gw.sandbox().unwrap();
    let account = sandbox.accounts().remove(0);
    assert!(sandbox.expire_session(&account.user_id));
    for _ in 0..3 {
        let answer = gw.get(&gw.model_path("/users/me")).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text());
    }
    let disconnected = receiver.wait_for("model.disconnected", 1).await;
    assert_eq!(disconnected.len(), 1, "{disconnected:?}");
    assert_envelope(&disconnected[0], "model.disconnected", org);
    assert_eq!(disconnected[0]["data"]["model_id"], gw.model().as_str());

    // model.reconnected.
    let fresh = sandbox.refresh_session(&account.user_id).unwrap();
    admin_ok(
        &gw,
        Method::POST,
        &format!("/admin/models/{}/reconnect", gw.model()),
        json!({"session": fresh.session_json()}),
    )
    .await;
    let reconnected = receiver.wait_for("model.reconnected", 1).await;
    assert_eq!(reconnected.len(), 1);
    assert_eq!(reconnected[0]["data"]["model_id"], gw.model().as_str());

    // key.expiring: a key expiring tomorrow, once however many scans see it.
    let tomorrow = chrono_like_rfc3339(24 * 3600);
    let key = admin_ok(
        &gw,
        Method::POST,
        &format!("/admin/orgs/{org}/keys"),
        json!({"name": "short-lived", "expires_at": tomorrow}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let expiring = receiver.wait_for("key.expiring", 1).await;
    assert_eq!(expiring.len(), 1, "{expiring:?}");
    assert_eq!(expiring[0]["data"]["key_id"], key["id"]);
    assert_eq!(expiring[0]["data"]["name"], "short-lived");

    // credits.low: the threshold 2 below the balance; three 1-credit calls cross it once.
    let balance = gw.balance().await.unwrap();
    admin_ok(
        &gw,
        Method::PUT,
        &format!("/admin/orgs/{org}/webhook-settings"),
        json!({"credits_low_threshold": balance - 2}),
    )
    .await;
    for _ in 0..4 {
        let answer = gw.get(&gw.model_path("/users/me")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    let low = receiver.wait_for("credits.low", 1).await;
    assert_eq!(low.len(), 1, "{low:?}");
    assert_eq!(low[0]["data"]["threshold"], balance - 2);
    assert!(low[0]["data"]["balance"].as_u64().unwrap() < balance - 2);

    // credits.exhausted: at most once per period, however many 402s.
    admin_ok(
        &gw,
        Method::PUT,
        &format!("/admin/orgs/{org}/credits"),
        json!({"balance": 0}),
    )
    .await;
    for _ in 0..3 {
        let answer = gw.get(&gw.model_path("/users/me")).await;
        assert_eq!(answer.status, StatusCode::PAYMENT_REQUIRED);
    }
    let exhausted = receiver.wait_for("credits.exhausted", 1).await;
    assert_eq!(exhausted.len(), 1, "{exhausted:?}");

    // subscription.renewed: a plan change starts a new period.
    admin_ok(
        &gw,
        Method::PUT,
        &format!("/admin/orgs/{org}/subscription"),
        json!({"plan": "pro"}),
    )
    .await;
    let renewed = receiver.wait_for("subscription.renewed", 1).await;
    assert_eq!(renewed.len(), 1, "{renewed:?}");
    assert_eq!(renewed[0]["data"]["plan"], "pro");

    // Every body is signed with the endpoint's secret, and every event id is distinct.
    let hits = receiver.hits();
    let mut ids = HashSet::new();
    for hit in &hits {
        verify(&secret, hit);
        let body: Value = serde_json::from_str(&hit.body).unwrap();
        assert_eq!(hit.event_header, body["type"].as_str().unwrap());
        assert!(
            ids.insert(body["id"].as_str().unwrap().to_owned()),
            "duplicate {body}"
        );
    }
    assert_eq!(hits.len(), 6, "{hits:?}");

    // The delivery history shows each one delivered at the first attempt.
    let history = gw
        .admin(
            Method::GET,
            &format!("/admin/orgs/{org}/webhooks/{endpoint}/deliveries"),
            None,
        )
        .await
        .json();
    let history = history.as_array().unwrap();
    assert_eq!(history.len(), 6);
    for d in history {
        assert_eq!(d["status"], "delivered", "{d}");
        assert_eq!(d["attempts"].as_array().unwrap().len(), 1);
        assert_eq!(d["attempts"][0]["status"], 200);
    }
    gw.gw.shutdown().await;
}

/// RFC 3339 for now + `secs`.
fn chrono_like_rfc3339(secs: u64) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + secs * 1_000;
    tollgate_core::time::rfc3339_from_ms(ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_twice_gets_the_event_on_the_third_try() {
    let gw = common::start(webhook_config()).await;
    let org = demo_org(&gw);
    let receiver = Receiver::start(Mode::Fail(vec![500, 503])).await;
    let (endpoint, secret) = register(&gw, &receiver.url(), &["model.reconnected"]).await;

    let account = gw.gw.sandbox().unwrap().accounts().remove(0);
    admin_ok(
        &gw,
        Method::POST,
        &format!("/admin/models/{}/reconnect", gw.model()),
        json!({"session": account.session_json()}),
    )
    .await;
    let got = receiver.wait_for("model.reconnected", 3).await;
    assert_eq!(got.len(), 3, "three tries of one event");
    assert!(got.iter().all(|b| b["id"] == got[0]["id"]));
    let answered: Vec<_> = receiver.hits().iter().map(|h| h.answered).collect();
    assert_eq!(answered, [Some(500), Some(503), Some(200)]);
    for hit in receiver.hits() {
        verify(&secret, &hit);
    }

    let history = gw
        .admin(
            Method::GET,
            &format!("/admin/orgs/{org}/webhooks/{endpoint}/deliveries"),
            None,
        )
        .await
        .json();
    assert_eq!(history.as_array().unwrap().len(), 1, "{history}");
    let d = &history[0];
    assert_eq!(d["status"], "delivered");
    assert_eq!(d["event_id"], got[0]["id"]);
    let statuses: Vec<_> = d["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].clone())
        .collect();
    assert_eq!(statuses, [json!(500), json!(503), json!(200)]);

    // A rotated secret signs what follows; the old one no longer verifies.
    let rotated = admin_ok(
        &gw,
        Method::POST,
        &format!("/admin/orgs/{org}/webhooks/{endpoint}/rotate-secret"),
        json!({}),
    )
    .await;
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, secret);
    let test = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{org}/webhooks/{endpoint}/test"),
            None,
        )
        .await;
    assert_eq!(test.status, StatusCode::ACCEPTED, "{}", test.text());
    let tests = receiver.wait_for("webhook.test", 1).await;
    assert_eq!(tests[0]["id"], test.json()["event_id"]);
    let hit = receiver.hits().last().unwrap().clone();
    verify(&new_secret, &hit);

    // Deleted: nothing more is sent.
    let deleted = gw
        .admin(
            Method::DELETE,
            &format!("/admin/orgs/{org}/webhooks/{endpoint}"),
            None,
        )
        .await;
    assert_eq!(deleted.status, StatusCode::OK);
    let again = gw
        .admin(
            Method::DELETE,
            &format!("/admin/orgs/{org}/webhooks/{endpoint}"),
            None,
        )
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    gw.gw.shutdown().await;
}

/// A self-signed certificate for `localhost` (written as PEM to `pem`) and a TLS server
/// configuration presenting it.
fn self_signed(pem: &std::path::Path) -> rustls::ServerConfig {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(pem, certified.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_receiver_gets_events_only_with_a_certificate_the_gateway_trusts() {
    let dir = std::env::temp_dir().join(format!("tollgate-webhook-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pem = dir.join("receiver.pem");
    let receiver = Receiver::start_tls(Mode::Ok, self_signed(&pem)).await;
    let url = format!("https://localhost:{}/hooks", receiver.addr.port());

    // Trusted through TOLLGATE_CA_FILE: delivered over TLS, signed.
    let mut config = webhook_config();
    config.ca_file = Some(pem.clone());
    let gw = common::start(config).await;
    let org = demo_org(&gw);
    let (endpoint, secret) = register(&gw, &url, &["model.reconnected"]).await;
    let test = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{org}/webhooks/{endpoint}/test"),
            None,
        )
        .await;
    assert_eq!(test.status, StatusCode::ACCEPTED);
    let got = receiver.wait_for("webhook.test", 1).await;
    assert_eq!(got.len(), 1);
    verify(&secret, &receiver.hits()[0]);
    gw.gw.shutdown().await;

    // Not trusted: every attempt fails on the handshake and is recorded as such.
    let gw = common::start(webhook_config()).await;
    let org = demo_org(&gw);
    let (endpoint, _) = register(&gw, &url, &["model.reconnected"]).await;
    gw.admin(
        Method::POST,
        &format!("/admin/orgs/{org}/webhooks/{endpoint}/test"),
        None,
    )
    .await;
    let history_path = format!("/admin/orgs/{org}/webhooks/{endpoint}/deliveries");
    let deadline = Instant::now() + Duration::from_secs(10);
    let attempt = loop {
        let history = gw.admin(Method::GET, &history_path, None).await.json();
        if let Some(a) = history[0]["attempts"].get(0) {
            break a.clone();
        }
        assert!(Instant::now() < deadline, "no attempt recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(attempt["status"], Value::Null);
    assert!(
        attempt["error"].as_str().unwrap().contains("TLS"),
        "{attempt}"
    );
    assert_eq!(receiver.hits().len(), 1, "nothing reached the receiver");
    gw.gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn private_addresses_and_bad_bodies_are_refused() {
    let mut config = webhook_config();
    config.webhook_allow_private = false;
    let gw = common::start(config).await;
    let org = demo_org(&gw);
    let path = format!("/admin/orgs/{org}/webhooks");
    for (body, needle) in [
        (
            json!({"url": "http://127.0.0.1:9/h", "events": ["credits.low"]}),
            "https",
        ),
        (
            json!({"url": "https://127.0.0.1:9/h", "events": ["credits.low"]}),
            "loopback",
        ),
        (
            json!({"url": "https://localhost/h", "events": ["credits.low"]}),
            "loopback",
        ),
        (
            json!({"url": "https://169.254.169.254/latest", "events": ["credits.low"]}),
            "metadata",
        ),
        (
            json!({"url": "https://10.0.0.8/h", "events": ["credits.low"]}),
            "private",
        ),
        (
            json!({"url": "https://[::1]/h", "events": ["credits.low"]}),
            "loopback",
        ),
        (
            json!({"url": "https://[::ffff:192.168.0.1]/h", "events": ["credits.low"]}),
            "private",
        ),
        (
            json!({"url": "https://example.com/h", "events": []}),
            "events",
        ),
        (
            json!({"url": "https://example.com/h", "events": ["credits.lo"]}),
            "credits.lo",
        ),
        (
            json!({"url": "https://example.com/h", "events": "credits.low"}),
            "events",
        ),
        (json!({"events": ["credits.low"]}), "url"),
        (json!({"url": 7, "events": ["credits.low"]}), "url"),
        (
            json!({"url": "not a url", "events": ["credits.low"]}),
            "url",
        ),
    ] {
        let answer = gw.admin(Method::POST, &path, Some(body.clone())).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            answer.text()
        );
        assert_eq!(answer.json()["code"], "INVALID_REQUEST");
        let message = answer.json()["error"].as_str().unwrap().to_owned();
        assert!(message.contains(needle), "{body}: {message}");
    }
    let listed = gw.admin(Method::GET, &path, None).await;
    assert_eq!(listed.json(), json!([]), "nothing was registered");

    // Unknown endpoints and orgs are 404.
    for (method, p) in [
        (Method::DELETE, format!("{path}/{}", uuid::Uuid::new_v4())),
        (
            Method::GET,
            format!("{path}/{}/deliveries", uuid::Uuid::new_v4()),
        ),
        (Method::POST, format!("{path}/nope/rotate-secret")),
        (
            Method::GET,
            format!("/admin/orgs/{}/webhooks", OrgId::new()),
        ),
    ] {
        let answer = gw.admin(method.clone(), &p, None).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{method} {p}");
    }
    let bad = gw
        .admin(
            Method::PUT,
            &format!("/admin/orgs/{org}/webhook-settings"),
            Some(json!({"credits_low_threshold": -1})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    gw.gw.shutdown().await;

    // Allowed by the test setting.
    let gw = common::start(webhook_config()).await;
    let receiver = Receiver::start(Mode::Ok).await;
    register(&gw, &receiver.url(), &["credits.low"]).await;
    gw.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_receiver_never_slows_a_customer_request() {
    let gw = common::start(webhook_config()).await;
    let org = demo_org(&gw);
    let receiver = Receiver::start(Mode::Hang).await;
    let (endpoint, _) = register(&gw, &receiver.url(), &ALL).await;
    for _ in 0..20 {
        let test = gw
            .admin(
                Method::POST,
                &format!("/admin/orgs/{org}/webhooks/{endpoint}/test"),
                None,
            )
            .await;
        assert_eq!(test.status, StatusCode::ACCEPTED);
    }
    // The receiver holds every attempt open (each waits for its 10 s timeout).
    let deadline = Instant::now() + Duration::from_secs(5);
    while receiver.hits().len() < 16 {
        assert!(Instant::now() < deadline, "attempts did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut slowest = Duration::ZERO;
    for _ in 0..50 {
        let started = Instant::now();
        let answer = gw.get(&gw.model_path("/users/me")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        slowest = slowest.max(started.elapsed());
    }
    // A bound, not a measurement: a request waiting on a webhook would take the attempt
    // timeout (10 s).
    assert!(
        slowest < Duration::from_secs(2),
        "a request took {slowest:?}"
    );
    let history = gw
        .admin(
            Method::GET,
            &format!("/admin/orgs/{org}/webhooks/{endpoint}/deliveries"),
            None,
        )
        .await
        .json();
    assert!(history
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["status"] == "pending"));
    gw.gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The store's behaviour, on each backend

async fn store_behaviour(store: &dyn WebhookStore) {
    let org = OrgId::new();
    let other = OrgId::new();
    let now = 1_800_000_000_000u64;
    let a = Endpoint::new(
        org,
        "https://a.example/h".into(),
        vec![EventType::CreditsLow, EventType::KeyExpiring],
        now,
    );
    let b = Endpoint::new(
        org,
        "https://b.example/h".into(),
        vec![EventType::KeyExpiring],
        now + 1,
    );
    let c = Endpoint::new(
        other,
        "https://c.example/h".into(),
        vec![EventType::CreditsLow],
        now,
    );
    for e in [&a, &b, &c] {
        assert!(store.create_endpoint(e.clone()).await.unwrap());
    }
    let listed = store.endpoints(org).await.unwrap();
    assert_eq!(
        listed,
        vec![a.clone(), b.clone()],
        "oldest first, secrets kept"
    );
    let mut orgs = store.orgs_with_endpoints().await.unwrap();
    orgs.sort();
    let mut expected = vec![org, other];
    expected.sort();
    assert_eq!(orgs, expected);

    // An event goes to the org's endpoints that want it, once per id.
    let low = Event::new(EventType::CreditsLow, org, "p1", now, json!({"balance": 1}));
    assert_eq!(store.emit(low.clone()).await.unwrap(), 1);
    assert_eq!(
        store.emit(low.clone()).await.unwrap(),
        0,
        "same id: nothing new"
    );
    let expiring = Event::new(EventType::KeyExpiring, org, "k1", now + 5, json!({}));
    assert_eq!(store.emit(expiring.clone()).await.unwrap(), 2);
    let mut only = Event::new(EventType::Test, org, "t1", now + 6, json!({}));
    only.only = Some(b.id);
    assert_eq!(store.emit(only).await.unwrap(), 1);
    let none = Event::new(EventType::ModelDisconnected, org, "m1", now, json!({}));
    assert_eq!(store.emit(none).await.unwrap(), 0);
    // Not kept when nobody wants it: an endpoint that subscribes later hears of it next time.
    let unwanted = Event::new(EventType::KeyExpiring, other, "k9", now, json!({}));
    assert_eq!(store.emit(unwanted.clone()).await.unwrap(), 0);
    let late = Endpoint::new(
        other,
        "https://late.example/h".into(),
        vec![EventType::KeyExpiring],
        now,
    );
    assert!(store.create_endpoint(late.clone()).await.unwrap());
    assert_eq!(store.emit(unwanted).await.unwrap(), 1);

    // Claims: due ones, oldest first, leased.
    let due = store.claim_due(now + 10, 1_000, 10).await.unwrap();
    assert_eq!(due.len(), 5, "{due:?}");
    assert_eq!(due[0].event_id, low.id);
    assert_eq!(due[0].url, a.url);
    assert_eq!(due[0].secret, a.secret);
    assert_eq!(due[0].attempt, 1);
    assert_eq!(due[0].body, low.body());
    assert!(
        store
            .claim_due(now + 10, 1_000, 10)
            .await
            .unwrap()
            .is_empty(),
        "leased"
    );
    let again = store.claim_due(now + 1_011, 1_000, 10).await.unwrap();
    assert_eq!(again.len(), 5, "the lease ran out");

    // Attempts: a failure schedules a retry, a success ends it, no retry fails it.
    let second = due
        .iter()
        .find(|d| d.url == b.url && d.kind == EventType::KeyExpiring)
        .expect("b's delivery");
    let first = &due[0];
    let fail = |status| Attempt {
        at_ms: now + 20,
        status: Some(status),
        error: None,
        duration_ms: 3,
    };
    store
        .record_attempt(first.id, fail(500), Some(now + 5_000))
        .await
        .unwrap();
    let later = store.claim_due(now + 4_000, 1_000, 10).await.unwrap();
    assert!(
        later.iter().all(|d| d.id != first.id),
        "not before its retry time"
    );
    let retry = store.claim_due(now + 5_000, 1_000, 10).await.unwrap();
    let retry = retry
        .iter()
        .find(|d| d.id == first.id)
        .expect("due at its retry time");
    assert_eq!(retry.attempt, 2);
    store
        .record_attempt(first.id, fail(200), None)
        .await
        .unwrap();
    store
        .record_attempt(
            second.id,
            Attempt {
                at_ms: now + 30,
                status: None,
                error: Some("timeout".into()),
                duration_ms: 10_000,
            },
            None,
        )
        .await
        .unwrap();
    // A late record of a finished delivery changes nothing.
    store
        .record_attempt(first.id, fail(500), Some(now))
        .await
        .unwrap();

    let history = store.deliveries(org, a.id, 10).await.unwrap().unwrap();
    assert_eq!(history.len(), 2);
    let delivered = history.iter().find(|d| d.id == first.id).unwrap();
    assert_eq!(delivered.state, DeliveryState::Delivered);
    assert_eq!(delivered.next_attempt_ms, None);
    assert_eq!(
        delivered
            .attempts
            .iter()
            .map(|a| a.status)
            .collect::<Vec<_>>(),
        [Some(500), Some(200)]
    );
    let failed = store.deliveries(org, b.id, 10).await.unwrap().unwrap();
    assert!(failed.iter().any(|d| d.id == second.id
        && d.state == DeliveryState::Failed
        && d.attempts[0].error.as_deref() == Some("timeout")));
    assert_eq!(
        store.deliveries(other, a.id, 10).await.unwrap(),
        None,
        "not the other org's"
    );

    // Observed states: the first is a baseline, a change emits in the same step.
    let renewed = |p: &str| Event::new(EventType::CreditsLow, org, p, now, json!({}));
    assert!(!store
        .observe(org, "credits.low".into(), "ok".into(), None)
        .await
        .unwrap());
    assert!(!store
        .observe(org, "credits.low".into(), "ok".into(), None)
        .await
        .unwrap());
    assert!(store
        .observe(org, "credits.low".into(), "low".into(), Some(renewed("x")))
        .await
        .unwrap());
    assert!(!store
        .observe(org, "credits.low".into(), "low".into(), Some(renewed("y")))
        .await
        .unwrap());
    assert_eq!(
        store.emit(renewed("x")).await.unwrap(),
        0,
        "x was emitted by the change"
    );
    assert_eq!(store.emit(renewed("y")).await.unwrap(), 1, "y was not");

    // History: finished events older than the cutoff go, pending ones stay.
    assert_eq!(
        store.purge_older_than(now).await.unwrap(),
        0,
        "nothing older than now"
    );
    let kept_pending = store
        .deliveries(org, b.id, 10)
        .await
        .unwrap()
        .unwrap()
        .iter()
        .filter(|d| d.state == DeliveryState::Pending)
        .count();
    assert!(kept_pending > 0);
    let purged = store.purge_older_than(now + 1_000_000).await.unwrap();
    // The delivered `credits.low` goes; `key.expiring` failed at b but is still pending at
    // a, so it stays whole.
    assert!(purged >= 1, "{purged}");
    let left = store.deliveries(org, a.id, 10).await.unwrap().unwrap();
    assert!(
        left.iter().all(|d| d.state == DeliveryState::Pending),
        "{left:?}"
    );
    assert_eq!(
        store
            .deliveries(org, b.id, 10)
            .await
            .unwrap()
            .unwrap()
            .iter()
            .filter(|d| d.state == DeliveryState::Pending)
            .count(),
        kept_pending,
        "pending deliveries are kept"
    );

    // The watched states of an org start over when its last endpoint goes.
    assert!(!store
        .observe(other, "period".into(), "1".into(), None)
        .await
        .unwrap());
    assert!(store.delete_endpoint(other, c.id).await.unwrap());
    assert!(store.delete_endpoint(other, late.id).await.unwrap());
    assert!(
        !store
            .observe(other, "period".into(), "2".into(), None)
            .await
            .unwrap(),
        "a new baseline, not a change"
    );
    assert!(store
        .observe(other, "period".into(), "3".into(), None)
        .await
        .unwrap());

    // Thresholds.
    assert_eq!(store.low_threshold(org).await.unwrap(), None);
    store.set_low_threshold(org, Some(25)).await.unwrap();
    assert_eq!(store.low_threshold(org).await.unwrap(), Some(25));
    store.set_low_threshold(org, None).await.unwrap();
    assert_eq!(store.low_threshold(org).await.unwrap(), None);

    // Secrets, deletion, the cap.
    assert!(store
        .set_secret(org, a.id, "whsec_new".into())
        .await
        .unwrap());
    assert!(!store
        .set_secret(other, a.id, "whsec_x".into())
        .await
        .unwrap());
    assert_eq!(store.endpoints(org).await.unwrap()[0].secret, "whsec_new");
    assert!(!store.delete_endpoint(other, a.id).await.unwrap());
    assert!(store.delete_endpoint(org, a.id).await.unwrap());
    assert!(!store.delete_endpoint(org, a.id).await.unwrap());
    assert_eq!(store.deliveries(org, a.id, 10).await.unwrap(), None);
    assert!(store
        .claim_due(now + 100_000, 1_000, 100)
        .await
        .unwrap()
        .iter()
        .all(|d| d.url != a.url));
    let crowded = OrgId::new();
    for i in 0..MAX_ENDPOINTS_PER_ORG {
        let e = Endpoint::new(
            crowded,
            format!("https://{i}.example/"),
            vec![EventType::CreditsLow],
            now,
        );
        assert!(store.create_endpoint(e).await.unwrap());
    }
    let extra = Endpoint::new(
        crowded,
        "https://x.example/".into(),
        vec![EventType::CreditsLow],
        now,
    );
    assert!(!store.create_endpoint(extra).await.unwrap());
}

#[tokio::test]
async fn the_memory_store_keeps_its_promises() {
    store_behaviour(&MemoryWebhookStore::new()).await;
}

#[tokio::test]
async fn the_postgres_store_keeps_its_promises_and_seals_secrets() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = PostgresWebhookStore::new(db.pool().clone(), [9; 32])
        .await
        .unwrap();
    store_behaviour(&store).await;
    // Secrets are sealed at rest: no row holds one in the clear.
    let org = OrgId::new();
    let e = Endpoint::new(
        org,
        "https://sealed.example/".into(),
        vec![EventType::CreditsLow],
        0,
    );
    store.create_endpoint(e.clone()).await.unwrap();
    let client = db.pool().get().await.unwrap();
    let row = client
        .query_one(
            "SELECT t::text FROM tollgate_webhook_endpoints t WHERE id = $1",
            &[&e.id.0],
        )
        .await
        .unwrap();
    let text: String = row.get(0);
    assert!(
        !text.contains(&e.secret[6..]) && !text.contains("whsec_"),
        "{text}"
    );
    let hexed = hex::encode(e.secret.as_bytes());
    assert!(!text.contains(&hexed));
    // Another key cannot open them: listed without it, and its deliveries fail on their own
    // without holding up another endpoint's.
    let wrong = PostgresWebhookStore::new(db.pool().clone(), [8; 32])
        .await
        .unwrap();
    let listed = wrong.endpoints(org).await.unwrap();
    assert_eq!((listed[0].id, listed[0].secret.as_str()), (e.id, ""));
    let other_org = OrgId::new();
    let fine = Endpoint::new(
        other_org,
        "https://fine.example/".into(),
        vec![EventType::CreditsLow],
        0,
    );
    wrong.create_endpoint(fine.clone()).await.unwrap();
    let now = 1_900_000_000_000u64;
    store
        .emit(Event::new(
            EventType::CreditsLow,
            org,
            "sealed",
            now,
            json!({}),
        ))
        .await
        .unwrap();
    wrong
        .emit(Event::new(
            EventType::CreditsLow,
            other_org,
            "fine",
            now + 1,
            json!({}),
        ))
        .await
        .unwrap();
    let due = wrong.claim_due(now + 10, 1_000, 100).await.unwrap();
    assert!(
        due.iter().any(|d| d.url == fine.url),
        "the readable one is sent"
    );
    assert!(
        due.iter().all(|d| d.url != e.url),
        "the unreadable one is not"
    );
    let history = wrong.deliveries(org, e.id, 10).await.unwrap().unwrap();
    let failed = history.iter().find(|d| d.created_ms == now).unwrap();
    assert_eq!(failed.state, DeliveryState::Failed);
    assert!(failed.attempts[0]
        .error
        .as_deref()
        .unwrap()
        .contains("cannot be decrypted"));
    drop(client);
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// With processes: two replicas, a kill before delivery

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_is_sent_once_by_two_replicas_and_a_killed_gateway_delivers_after_restart() {
    use support_proc::{
        serial, session_key, test_db, url_in_schema, Gateway, GatewayEnv, Http, LogDir,
    };
    use tollgate::sandbox::{sandbox_rules, Sandbox};

    let _serial = serial().await;
    let Some(db) = test_db().await else { return };
    let logs = LogDir::new("webhooks");
    let sandbox = Sandbox::new(sandbox_rules());
    let upstream = sandbox.bind("127.0.0.1:0").await.unwrap();
    let account = sandbox.add_account();
    let env = GatewayEnv::new(&upstream.base_url())
        .database(&url_in_schema(db.url(), db.schema()), &session_key())
        .set("TOLLGATE_WEBHOOK_ALLOW_PRIVATE", "1");
    let (a, b) = tokio::join!(
        Gateway::start("A", &env, &logs),
        Gateway::start("B", &env, &logs)
    );
    let http = Http::new();
    let org = http
        .admin(
            Method::POST,
            a.url("/admin/orgs"),
            Some(json!({"name": "Hooked"})),
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
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
    let receiver = Receiver::start(Mode::Ok).await;
    let created = http
        .admin(
            Method::POST,
            b.url(&format!("/admin/orgs/{org}/webhooks")),
            Some(json!({"url": receiver.url(), "events": ["model.reconnected"]})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let secret = created.json()["secret"].as_str().unwrap().to_owned();

    // Both replicas' dispatchers run; the event is sent once.
    let reconnect = |gw: &Gateway| {
        let (http, url, session) = (
            http.clone(),
            gw.url(&format!("/admin/models/{model}/reconnect")),
            account.session_json(),
        );
        async move {
            let answer = http
                .admin(Method::POST, url, Some(json!({"session": session})))
                .await;
            assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        }
    };
    reconnect(&a).await;
    let got = receiver.wait_for("model.reconnected", 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.events("model.reconnected").len(), 1, "{got:?}");
    verify(&secret, &receiver.hits()[0]);

    // The receiver hangs; the next event's attempt is in flight when its gateway is killed.
    receiver.set_mode(Mode::Hang);
    drop(b);
    reconnect(&a).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.hits().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the second event was not attempted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second: Value = serde_json::from_str(&receiver.hits()[1].body).unwrap();
    let mut a = a;
    a.kill().await;
    receiver.set_mode(Mode::Ok);

    // Restarted, a gateway delivers it (once the dead one's lease ends).
    let _a2 = Gateway::start("A2", &env, &logs).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let answered: Vec<_> = receiver
            .hits()
            .iter()
            .filter(|h| h.answered == Some(200))
            .map(|h| serde_json::from_str::<Value>(&h.body).unwrap()["id"].clone())
            .collect();
        if answered.contains(&second["id"]) {
            break;
        }
        assert!(Instant::now() < deadline, "not delivered after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let by_id: BTreeMap<String, usize> =
        receiver
            .events("model.reconnected")
            .iter()
            .fold(BTreeMap::new(), |mut m, b| {
                *m.entry(b["id"].as_str().unwrap().to_owned()).or_default() += 1;
                m
            });
    assert_eq!(by_id.len(), 2, "two occurrences: {by_id:?}");
    db.cleanup().await;
}
