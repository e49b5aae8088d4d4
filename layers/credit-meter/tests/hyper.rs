//! The meter behind a real hyper server on a loopback port: a server that stops polling a
//! body as soon as it looks complete must still see the charge, and a client that hangs up
//! mid-body must not be charged.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tollgate_core::{OrgId, Plan};
use tollgate_credit_meter::{CreditMeterLayer, Ledger, MemoryLedger};
use tower::{service_fn, ServiceBuilder, ServiceExt};

use common::*;

/// Serves one connection with the meter in front of `inner`; the task ends when the
/// connection is closed (keep-alive is off, so after one response).
async fn serve_once<S, B>(
    ledger: &Arc<MemoryLedger>,
    org: OrgId,
    inner: S,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>)
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = ServiceBuilder::new()
        .map_request(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(principal(org, Plan::Basic));
            req
        })
        .layer(CreditMeterLayer::new(Arc::clone(ledger)))
        .service(inner);
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let hyper_svc = hyper::service::service_fn(move |req| svc.clone().oneshot(req));
        // The connection may end with an error when the client hangs up; that is the point
        // of one of the tests.
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .serve_connection(TokioIo::new(stream), hyper_svc)
            .await;
    });
    (addr, server)
}

async fn client(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "127.0.0.1")
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn a_full_body_served_by_hyper_is_charged() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(10)).await;
    let inner = service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(ok_json(r#"{"id":1,"username":"amy"}"#))
    });
    let (addr, server) = serve_once(&ledger, org, inner).await;
    let mut send = client(addr).await;
    let res = send.send_request(get(&payouts_stats())).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-length"], "25");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, r#"{"id":1,"username":"amy"}"#);
    server.await.unwrap();
    assert_eq!(balance(&ledger, org).await, 8);
    assert_eq!(ledger.open_holds(), 0);
}

#[tokio::test]
async fn an_empty_2xx_served_by_hyper_is_charged() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(10)).await;
    let inner = service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(status(StatusCode::OK, ""))
    });
    let (addr, server) = serve_once(&ledger, org, inner).await;
    let mut send = client(addr).await;
    let res = send.send_request(get(&users_me())).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .is_empty());
    server.await.unwrap();
    assert_eq!(balance(&ledger, org).await, 9);
}

#[tokio::test]
async fn a_chunked_body_served_by_hyper_is_charged_once_it_ends() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(10)).await;
    let inner = service_fn(|_req: Request<Incoming>| async {
        let (tx, body) = channel_body();
        tx.send(Ok(Bytes::from_static(b"{\"list\":[1,"))).unwrap();
        tx.send(Ok(Bytes::from_static(b"2]}"))).unwrap();
        Ok::<_, Infallible>(Response::new(body))
    });
    let (addr, server) = serve_once(&ledger, org, inner).await;
    let mut send = client(addr).await;
    let res = send.send_request(get(&users_me())).await.unwrap();
    assert_eq!(res.headers()["transfer-encoding"], "chunked");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "{\"list\":[1,2]}");
    server.await.unwrap();
    assert_eq!(balance(&ledger, org).await, 9);
    assert_eq!(ledger.open_holds(), 0);
}

#[tokio::test]
async fn a_client_hanging_up_mid_body_is_not_charged() {
    let (_clock, ledger) = manual_ledger();
    let org = org_with(&ledger, Plan::Basic, Some(10)).await;
    let (senders_tx, mut senders_rx) = mpsc::unbounded_channel();
    let inner = service_fn(move |_req: Request<Incoming>| {
        let (tx, body) = channel_body();
        tx.send(Ok(Bytes::from_static(b"{\"list\":["))).unwrap();
        senders_tx.send(tx).unwrap();
        async move { Ok::<_, Infallible>(Response::new(body)) }
    });
    let (addr, server) = serve_once(&ledger, org, inner).await;
    let mut send = client(addr).await;
    let res = send.send_request(get(&users_me())).await.unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "{\"list\":[");
    assert_eq!(ledger.open_holds(), 1);
    drop(body);
    drop(send);

    // The upstream keeps sending until the server notices the client is gone and drops
    // the body (bounded: at most 5 s).
    let tx = senders_rx.recv().await.unwrap();
    let mut gone = false;
    for _ in 0..500 {
        if tx.send(Ok(Bytes::from_static(b"1,"))).is_err() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(gone, "the server never dropped the body");
    server.await.unwrap();
    assert_eq!(ledger.open_holds(), 0);
    assert_eq!(balance(&ledger, org).await, 10);
    let last = entries(&ledger, org).await.pop().unwrap();
    assert_ne!(last.kind, tollgate_credit_meter::EntryKind::Charge);
}
