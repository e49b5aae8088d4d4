//! Connection-level behaviour of the gateway's listener: an oversized body sent whole still
//! gets its 413 (lingering close), the connection limit, and the answers to requests too
//! malformed for the router (over-long URI or headers, garbage) are `{error, code}` JSON with
//! an `X-Request-Id` like every other answer.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one answer (head and a `content-length` body), or what came before the server
/// closed the connection or `limit` passed; a failed read (a reset) is an error.
async fn read_answer(stream: &mut TcpStream, limit: Duration) -> std::io::Result<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if answer_complete(&out) {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) | Ok(Ok(0)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Whether `wire` holds a whole answer with a `content-length` body.
fn answer_complete(wire: &[u8]) -> bool {
    let text = String::from_utf8_lossy(wire);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .is_some_and(|len| body.len() >= len)
}

/// A POST with a chunked body of `len` bytes, all of which the client writes before it reads
/// the answer, as simple clients do; the last 6 KB come after a pause, when the gateway has
/// already answered (the body is over its limit by then).
async fn send_oversized_chunked(
    addr: std::net::SocketAddr,
    path: &str,
    key: &str,
    len: usize,
) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let mut wire = head.into_bytes();
    let chunk = vec![b' '; 1_000];
    for _ in 0..len / chunk.len() {
        wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        wire.extend_from_slice(&chunk);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let (first, rest) = wire.split_at(wire.len() - 6_000);
    stream
        .write_all(first)
        .await
        .expect("the first part is sent");
    for part in rest.chunks(2_000) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        stream
            .write_all(part)
            .await
            .unwrap_or_else(|e| panic!("the gateway stopped reading before the end: {e}"));
    }
    read_answer(&mut stream, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("no answer, the connection failed: {e}"))
}

#[tokio::test]
async fn an_oversized_chunked_body_sent_whole_gets_its_413() {
    let mut config = common::test_config();
    config.body_limit = 64 * 1024;
    config.burst = [1_000; 4];
    let gw = common::start(config).await;
    let before = gw.balance().await;
    for len in [70_000, 300_000] {
        let text = send_oversized_chunked(
            gw.gw.local_addr(),
            &gw.model_path("/chats/7/messages"),
            &gw.key(),
            len,
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 413"), "{text:?}");
        assert!(text.contains("\"code\":\"PAYLOAD_TOO_LARGE\""), "{text}");
    }
    assert_eq!(gw.balance().await, before);
}

#[tokio::test]
async fn an_oversized_chunked_body_sent_whole_gets_its_413_on_postgres() {
    let Some(db) = tollgate_postgres::testing::TestDb::new().await else {
        return;
    };
    let mut config = common::test_config();
    config.body_limit = 64 * 1024;
    config.burst = [1_000; 4];
    config.database_url = Some(format!(
        "{}?options=-csearch_path%3D{}",
        db.url(),
        db.schema()
    ));
    config.session_key = Some([7; 32]);
    let gw = common::start(config).await;
    let before = gw.balance().await;
    for len in [70_000, 70_000, 70_000, 300_000] {
        let text = send_oversized_chunked(
            gw.gw.local_addr(),
            &gw.model_path("/chats/7/messages"),
            &gw.key(),
            len,
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 413"), "{text:?}");
        assert!(text.contains("\"code\":\"PAYLOAD_TOO_LARGE\""), "{text}");
    }
    assert_eq!(gw.balance().await, before);
    drop(gw);
    db.cleanup().await;
}

/// Writes `wire` (from a task of its own: the gateway may answer before the end) and reads
/// the answer.
async fn raw(addr: std::net::SocketAddr, wire: Vec<u8>) -> String {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&wire).await;
        write
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !answer_complete(&out) {
        match tokio::time::timeout_at(deadline, read.read(&mut buf)).await {
            Err(_) | Ok(Ok(0)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("no answer, the connection failed: {e}"),
        }
    }
    drop(writer.await);
    String::from_utf8_lossy(&out).into_owned()
}

/// Asserts an `{error, code}` answer with `status`, JSON and an `X-Request-Id`.
fn assert_json_error(text: &str, status: u16, code: &str) {
    assert!(
        text.starts_with(&format!("HTTP/1.1 {status} ")),
        "{text:.300}"
    );
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("\r\ncontent-type: application/json"),
        "{head}"
    );
    assert!(head.contains("\r\nx-request-id: "), "{head}");
    let json: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    assert_eq!(json["code"], code, "{body}");
    assert!(
        json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn over_long_uris_and_headers_and_garbage_get_json_answers() {
    let gw = common::start(common::test_config()).await;
    let addr = gw.gw.local_addr();
    let long_path = |len: usize| format!("/api/models/{}", "a".repeat(len));
    // Past the gateway's own URI limit, and past hyper's (64 KiB) too.
    for len in [10_000, 70_000] {
        let text = raw(
            addr,
            format!("GET {} HTTP/1.1\r\nhost: x\r\n\r\n", long_path(len)).into_bytes(),
        )
        .await;
        assert_json_error(&text, 414, "INVALID_REQUEST");
    }
    // Headers past the gateway's limit (32 KiB), past hyper's buffer (256 KiB), and more of
    // them than hyper parses (100).
    let big = |n: usize, size: usize| {
        let mut wire = b"GET /healthz HTTP/1.1\r\nhost: x\r\n".to_vec();
        for i in 0..n {
            wire.extend_from_slice(format!("x-h{i}: {}\r\n", "v".repeat(size)).as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        wire
    };
    for (n, size) in [(10, 4_000), (100, 3_000), (150, 10)] {
        let text = raw(addr, big(n, size)).await;
        assert_json_error(&text, 431, "INVALID_REQUEST");
    }
    let text = raw(addr, b"NOT HTTP AT ALL\r\n\r\n".to_vec()).await;
    assert_json_error(&text, 400, "INVALID_REQUEST");
    let text = raw(addr, b"GET / HTTP/1.1\r\nbad header\r\n\r\n".to_vec()).await;
    assert_json_error(&text, 400, "INVALID_REQUEST");
}

#[tokio::test]
async fn past_the_connection_limit_new_connections_wait_for_a_free_slot() {
    let mut config = common::test_config();
    config.max_connections = 2;
    config.admin_bind = tollgate::gateway::AdminBind::Separate("127.0.0.1:0".parse().unwrap());
    let gw = common::start(config).await;
    let addr = gw.gw.local_addr();
    let healthz = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    // Two idle connections take both slots.
    let first = TcpStream::connect(addr).await.unwrap();
    let second = TcpStream::connect(addr).await.unwrap();
    let mut third = TcpStream::connect(addr)
        .await
        .expect("the kernel queues it");
    third.write_all(healthz).await.unwrap();
    let mut buf = [0u8; 1024];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(early.is_err(), "answered past the limit: {early:?}");
    // The internal listener is not limited: probes still get through.
    let internal = gw.gw.admin_addr().expect("an internal listener");
    let text = raw(internal, healthz.to_vec()).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // A slot frees up: the waiting connection is served.
    drop(first);
    let text = read_answer(&mut third, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    drop(second);
}
