//! End to end: model sessions across a reconnect. A request signed with the old session that
//! the upstream refuses *after* the admin reconnected the model must not disconnect the new
//! session. The gateway runs in front of a sandbox reached through a TCP proxy that can hold
//! the gateway's bytes, so the request is provably out (signed with the old session) while
//! the model is reconnected; on memory backends and on PostgreSQL.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use common::TestGateway;
use tollgate::gateway::Config;
use tollgate::sandbox::{sandbox_rules, Sandbox, SandboxServer};
use tollgate_postgres::testing::TestDb;

/// A TCP proxy whose gateway → upstream direction can be closed: bytes that arrive while it
/// is closed are held (and counted) until it opens again.
struct GateProxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    held: Arc<AtomicUsize>,
}

impl GateProxy {
    async fn start(target: SocketAddr) -> GateProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, gate) = watch::channel(true);
        let held = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&held);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                tokio::spawn(pipe(client, server, gate.clone(), Arc::clone(&counter)));
            }
        });
        GateProxy { addr, open, held }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn close(&self) {
        self.open.send_replace(false);
    }

    fn open(&self) {
        self.open.send_replace(true);
    }

    /// Waits until a request's bytes are held at the closed gate.
    async fn wait_for_held_bytes(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.held.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no request reached the proxy");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    mut gate: watch::Receiver<bool>,
    held: Arc<AtomicUsize>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !*gate.borrow() {
                held.fetch_add(n, Ordering::SeqCst);
                if gate.wait_for(|open| *open).await.is_err() {
                    break;
                }
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downstream = async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

struct Setup {
    gw: TestGateway,
    sandbox: Sandbox,
    _server: SandboxServer,
    proxy: GateProxy,
}

async fn start(database: Option<&TestDb>) -> Setup {
    let sandbox = Sandbox::new(sandbox_rules());
    let server = sandbox.bind("127.0.0.1:0").await.unwrap();
    let proxy = GateProxy::start(server.local_addr()).await;
    let config = Config {
        upstream: Some(proxy.url()),
        demo: false,
        database_url: database.map(|db| {
            let sep = if db.url().contains('?') { '&' } else { '?' };
            format!("{}{sep}options=-csearch_path%3D{}", db.url(), db.schema())
        }),
        session_key: database.map(|_| [42u8; 32]),
        ..common::test_config()
    };
    Setup {
        gw: common::start(config).await,
        sandbox,
        _server: server,
        proxy,
    }
}

#[track_caller]
fn created(answer: &common::Answer) -> Value {
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text());
    answer.json()
}

async fn model_status(gw: &TestGateway, org: &str, model: &str) -> String {
    let list = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/models"), None)
        .await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text());
    let list = list.json();
    let found = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == model)
        .unwrap_or_else(|| panic!("model {model} in {list}"));
    found["status"].as_str().unwrap().to_owned()
}

async fn a_late_401_for_the_old_session_keeps_the_reconnected_model(database: Option<&TestDb>) {
    let Setup {
        gw,
        sandbox,
        _server: _running,
        proxy,
    } = start(database).await;

    // A tenant with one model on a sandbox account.
    let org = created(
        &gw.admin(Method::POST, "/admin/orgs", Some(json!({"name": "Org"})))
            .await,
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let sub = gw
        .admin(
            Method::PUT,
            &format!("/admin/orgs/{org}/subscription"),
            Some(json!({"plan": "basic"})),
        )
        .await;
    assert_eq!(sub.status, StatusCode::OK, "{}", sub.text());
    let account = sandbox.add_account();
    let model = created(
        &gw.admin(
            Method::POST,
            &format!("/admin/orgs/{org}/models"),
            Some(json!({"name": "M", "session": account.session_json()})),
        )
        .await,
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = created(
        &gw.admin(
            Method::POST,
            &format!("/admin/orgs/{org}/keys"),
            Some(json!({"name": "k"})),
        )
        .await,
    )["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/models/{model}/users/me");
    let call = || gw.send(gw.request(Method::GET, &path, Some(&key), None));

    let first = call().await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());

    // A request leaves the gateway signed with the first session and is held on the way.
    proxy.close();
    let in_flight = {
        let req = gw.request(Method::GET, &path, Some(&key), None);
        let client = gw.client.clone();
        tokio::spawn(async move { client.request(req).await })
    };
    proxy.wait_for_held_bytes().await;

    // Meanwhile the account logs in again (the first session dies) and the admin
    // reconnects the model with the new session.
    let fresh = sandbox.refresh_session(&account.user_id).unwrap();
    let reconnected = gw
        .admin(
            Method::POST,
            &format!("/admin/models/{model}/reconnect"),
            Some(json!({"session": fresh.session_json()})),
        )
        .await;
    assert_eq!(reconnected.status, StatusCode::OK, "{}", reconnected.text());
    assert_eq!(reconnected.json()["status"], "connected");

    // The held request reaches the upstream with the dead session: 401 "Access denied.".
    proxy.open();
    let stale = tokio::time::timeout(Duration::from_secs(30), in_flight)
        .await
        .expect("the held request is answered")
        .unwrap()
        .unwrap();
    assert_eq!(stale.status(), StatusCode::BAD_GATEWAY);
    let body = http_body_util::BodyExt::collect(stale.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({
            "error": "The model was reconnected while this request was in flight. Retry the request.",
            "code": "MODEL_SESSION_EXPIRED",
        })
    );
    let last = sandbox.last_request().expect("the upstream saw it");
    assert_eq!(last.status, StatusCode::UNAUTHORIZED, "refused upstream");

    // The model stays connected and the next request works with the new session.
    assert_eq!(model_status(&gw, &org, &model).await, "connected");
    let next = call().await;
    assert_eq!(next.status, StatusCode::OK, "{}", next.text());
    let cookie = sandbox.last_request().unwrap().headers["cookie"].clone();
    assert_eq!(cookie.to_str().unwrap(), fresh.cookie);

    // Two successes billed; the refused request cost nothing.
    let view = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}"), None)
        .await;
    assert_eq!(view.json()["balance"], 998, "{}", view.text());
    gw.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_401_for_the_old_session_keeps_the_reconnected_model_in_memory() {
    a_late_401_for_the_old_session_keeps_the_reconnected_model(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_401_for_the_old_session_keeps_the_reconnected_model_on_postgres() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    a_late_401_for_the_old_session_keeps_the_reconnected_model(Some(&db)).await;
    db.cleanup().await;
}
