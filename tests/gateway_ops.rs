//! Operational edges: readiness covers every backend, failures show in `/metrics`, revoked
//! keys cannot be rotated back to life, stalled request bodies time out.

mod common;

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::json;
use tollgate::sandbox::Fault;

#[tokio::test]
async fn readiness_lists_every_backend() {
    let gw = common::start(common::test_config()).await;
    let answer = gw
        .send(gw.request(Method::GET, "/readyz", None, None))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.json(),
        json!({"status": "ready", "backends": {
            "ledger": true, "keys": true, "sessions": true, "rate_limits": true, "logs": true
        }})
    );
}

#[tokio::test]
async fn upstream_failures_are_counted_as_backend_errors() {
    let gw = common::start(common::test_config()).await;
    let sandbox = gw.gw.sandbox().unwrap();
    sandbox.inject(Fault::fail(StatusCode::SERVICE_UNAVAILABLE).times(2));
    for _ in 0..2 {
        let a = gw.get(&gw.model_path("/users/me")).await;
        assert_eq!(a.status, StatusCode::BAD_GATEWAY);
        assert_eq!(a.code(), "UPSTREAM_ERROR");
    }
    let metrics = gw
        .send(gw.request(Method::GET, "/metrics", None, None))
        .await;
    assert!(
        metrics
            .text()
            .contains("tollgate_backend_errors_total{backend=\"upstream\"} 2\n"),
        "{}",
        metrics.text()
    );
}

#[tokio::test]
async fn a_revoked_key_cannot_be_rotated_back_to_life() {
    let gw = common::start(common::test_config()).await;
    let key_id = gw.gw.demo().unwrap().key_id;
    let revoke = gw
        .admin(Method::POST, &format!("/admin/keys/{key_id}/revoke"), None)
        .await;
    assert_eq!(revoke.status, StatusCode::OK);
    let rotate = gw
        .admin(Method::POST, &format!("/admin/keys/{key_id}/rotate"), None)
        .await;
    assert_eq!(rotate.status, StatusCode::BAD_REQUEST, "{}", rotate.text());
    assert_eq!(rotate.code(), "INVALID_REQUEST");
    let a = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_stalled_request_body_times_out_without_a_charge() {
    let mut config = common::test_config();
    config.upstream_timeout = Duration::from_millis(300);
    config.hold_ttl = Duration::from_secs(60);
    let gw = common::start(config).await;
    let before = gw.balance().await;
    // Declare 100 bytes, send 10, then stall.
    let addr = gw.gw.local_addr();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: x\r\nx-api-key: {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"text\":\"h",
        gw.model_path("/chats/7/messages"),
        gw.key()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("answered without waiting for the rest of the body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"INVALID_REQUEST\""), "{text}");
    assert_eq!(gw.balance().await, before);
    assert_eq!(gw.gw.state().ledger.open_holds(), 0);
}
