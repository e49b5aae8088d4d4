//! `RemoteSigner` against tiny signing services on 127.0.0.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tollgate_upstream_sign::{sandbox_rules, RemoteSigner, SignError, Signer};

/// What the service saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    bodies: Mutex<Vec<(String, Value)>>,
}

/// Starts a signing service whose answer is computed by `answer` after `delay`.
async fn serve<F>(delay: Duration, answer: F) -> (SocketAddr, Arc<Seen>)
where
    F: Fn(&Value) -> (u16, String) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let answer = Arc::new(answer);
    let task_seen = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            task_seen.connections.fetch_add(1, Ordering::SeqCst);
            let seen = task_seen.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    let answer = answer.clone();
                    async move {
                        let ct = req
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        seen.bodies.lock().unwrap().push((ct, value.clone()));
                        tokio::time::sleep(delay).await;
                        let (status, text) = answer(&value);
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(text)))
                                .unwrap(),
                        )
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// A real signing service: signs with the sandbox rules at a fixed time.
fn signing_service(req: &Value) -> (u16, String) {
    let path = req["path"].as_str().unwrap_or_default();
    let user = req["user_id"].as_str().unwrap_or_default();
    let sig = sandbox_rules().sign_at(path, user, 1_700_000_000_000);
    (200, serde_json::to_string(&sig).unwrap())
}

#[tokio::test]
async fn signs_through_the_service_over_one_pooled_connection() {
    let (addr, seen) = serve(Duration::ZERO, signing_service).await;
    let signer = RemoteSigner::new(&format!("http://{addr}/sign"), Duration::from_secs(2)).unwrap();
    for i in 0..3 {
        let path = format!("/api2/v2/chats?limit={i}&q=%20x");
        let sig = signer.sign(&path, "424242").await.unwrap();
        assert_eq!(sig.time, "1700000000000");
        assert_eq!(sig.app_token, sandbox_rules().app_token());
        assert!(sandbox_rules().verify(&path, "424242", &sig.time, &sig.sign));
    }
    let bodies = seen.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 3);
    assert_eq!(bodies[0].0, "application/json");
    assert_eq!(
        bodies[2].1,
        json!({"path": "/api2/v2/chats?limit=2&q=%20x", "user_id": "424242"})
    );
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        1,
        "the connection is reused"
    );
}

#[tokio::test]
async fn slow_service_times_out() {
    let (addr, _) = serve(Duration::from_secs(5), signing_service).await;
    let signer =
        RemoteSigner::new(&format!("http://{addr}/sign"), Duration::from_millis(100)).unwrap();
    let started = std::time::Instant::now();
    let err = signer.sign("/api2/v2/users/me", "1").await.unwrap_err();
    assert!(
        matches!(err, SignError::Timeout(d) if d == Duration::from_millis(100)),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn bad_answers_are_errors() {
    let (addr, _) = serve(Duration::ZERO, |_| (500, r#"{"error":"down"}"#.into())).await;
    let signer = RemoteSigner::new(&format!("http://{addr}/"), Duration::from_secs(2)).unwrap();
    let err = signer.sign("/p", "1").await.unwrap_err();
    assert!(
        matches!(err, SignError::Status(StatusCode::INTERNAL_SERVER_ERROR)),
        "{err}"
    );

    for body in [
        "not json",
        r#"{"sign":"s","app_token":"t"}"#,
        r#"{"sign":"s","time":"yesterday","app_token":"t"}"#,
        r#"{"sign":["s"],"time":"1","app_token":"t"}"#,
    ] {
        let (addr, _) = serve(Duration::ZERO, move |_| (200, body.to_owned())).await;
        let signer = RemoteSigner::new(&format!("http://{addr}/"), Duration::from_secs(2)).unwrap();
        let err = signer.sign("/p", "1").await.unwrap_err();
        assert!(matches!(err, SignError::BadResponse(_)), "{body}: {err}");
    }
}

#[tokio::test]
async fn unreachable_service_is_an_error() {
    // A port that was just free: nothing listens there.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let signer = RemoteSigner::new(&format!("http://{addr}/sign"), Duration::from_secs(2)).unwrap();
    let err = signer.sign("/p", "1").await.unwrap_err();
    assert!(matches!(err, SignError::Unreachable(_)), "{err}");
}

#[test]
fn https_needs_a_tls_connector() {
    assert!(RemoteSigner::new("https://signer.invalid/sign", Duration::from_secs(1)).is_err());
    assert!(RemoteSigner::new("signer:8080", Duration::from_secs(1)).is_err());
    let ok = RemoteSigner::new("http://127.0.0.1:1/sign", Duration::from_millis(1500)).unwrap();
    assert_eq!(ok.timeout(), Duration::from_millis(1500));
    assert_eq!(ok.url(), "http://127.0.0.1:1/sign");
}

#[tokio::test]
async fn layer_with_a_remote_signer() {
    use tollgate_core::{ModelId, OrgId};
    use tollgate_upstream_sign::{MemorySessionStore, Session, UpstreamSignLayer};
    use tower::{Service, ServiceBuilder, ServiceExt};

    let store = Arc::new(MemorySessionStore::new());
    let model = ModelId::new();
    store.insert(
        model,
        OrgId::new(),
        "m",
        Session::new("sess=a; auth_id=5", "5", "xbc", "ua"),
    );
    let upstream = tower::service_fn(|req: Request<Full<Bytes>>| async move {
        let h = req.headers();
        let ok = sandbox_rules().verify(
            req.uri().path_and_query().unwrap().as_str(),
            h["user-id"].to_str().unwrap(),
            h["time"].to_str().unwrap(),
            h["sign"].to_str().unwrap(),
        );
        let status = if ok { 200 } else { 401 };
        Ok::<_, Infallible>(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(br#"{"isAuth":true}"#)))
                .unwrap(),
        )
    });
    let request = || {
        let mut req = Request::builder()
            .uri("http://127.0.0.1:1/api2/v2/users/me?x=%2F")
            .body(Full::new(Bytes::new()))
            .unwrap();
        req.extensions_mut().insert(model);
        req
    };

    let (addr, _) = serve(Duration::ZERO, signing_service).await;
    let signer = RemoteSigner::new(&format!("http://{addr}/"), Duration::from_secs(2)).unwrap();
    let svc = ServiceBuilder::new()
        .layer(UpstreamSignLayer::new(signer, store.clone()))
        .service(upstream);
    let res = svc
        .clone()
        .ready()
        .await
        .unwrap()
        .call(request())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], br#"{"isAuth":true}"#);

    // A signer that times out: 502 SIGNING_FAILED, the model stays connected.
    let (slow, _) = serve(Duration::from_secs(5), signing_service).await;
    let signer = RemoteSigner::new(&format!("http://{slow}/"), Duration::from_millis(50)).unwrap();
    let svc = ServiceBuilder::new()
        .layer(UpstreamSignLayer::new(signer, store.clone()))
        .service(upstream);
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["code"], "SIGNING_FAILED");
    assert_eq!(
        tollgate_upstream_sign::SessionStore::model(&*store, model)
            .await
            .unwrap()
            .unwrap()
            .status,
        tollgate_upstream_sign::ModelStatus::Connected
    );
}
