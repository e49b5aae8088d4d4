//! Helpers shared by the credit meter's integration tests.
#![allow(dead_code)]

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tollgate_core::{
    Clock, CreditReceipt, CreditSettlement, KeyId, ManualClock, OrgId, Plan, Principal, RequestId,
};
use tollgate_credit_meter::{Account, Ledger, LedgerEntry, MemoryLedger};

pub const MODEL: &str = "0b6f7a52-8f0e-4d3f-9f57-5b1e2a7c9d10";

/// 2023-01-31T07:35:02.748Z: the end of a long month, so renewals exercise clamping.
pub const T0: u64 = 1_675_150_502_748;

/// `GET …/users/me`: 1 credit.
pub fn users_me() -> String {
    format!("/api/models/{MODEL}/users/me")
}

/// `GET …/payouts/stats`: 2 credits.
pub fn payouts_stats() -> String {
    format!("/api/models/{MODEL}/payouts/stats")
}

pub fn principal(org: OrgId, plan: Plan) -> Principal {
    Principal {
        org,
        key: KeyId::new(),
        plan,
    }
}

/// A GET request as the auth layer would hand it on: with the principal and a request id.
pub fn request(path: &str, org: OrgId, request_id: &str) -> Request<Full<Bytes>> {
    let mut req = Request::get(path).body(Full::default()).unwrap();
    req.extensions_mut().insert(principal(org, Plan::Basic));
    req.extensions_mut()
        .insert(RequestId::parse(request_id).unwrap());
    req
}

pub fn manual_ledger() -> (ManualClock, Arc<MemoryLedger>) {
    let clock = ManualClock::new(T0);
    (clock.clone(), Arc::new(MemoryLedger::new(clock)))
}

/// An org subscribed to `plan`, then adjusted to `balance` plan credits when given.
pub async fn org_with(ledger: &MemoryLedger, plan: Plan, balance: Option<u64>) -> OrgId {
    let org = OrgId::new();
    ledger.subscribe(org, plan).await.unwrap();
    if let Some(b) = balance {
        ledger.set_balance(org, b).await.unwrap().unwrap();
    }
    org
}

pub async fn account(ledger: &MemoryLedger, org: OrgId) -> Account {
    ledger.account(org).await.unwrap().unwrap()
}

pub async fn balance(ledger: &MemoryLedger, org: OrgId) -> u64 {
    account(ledger, org).await.balance().unwrap()
}

pub async fn entries(ledger: &MemoryLedger, org: OrgId) -> Vec<LedgerEntry> {
    ledger.entries(org).await.unwrap()
}

pub fn ok_json(body: &'static str) -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from_static(body.as_bytes())))
}

pub fn status(code: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut res = ok_json(body);
    *res.status_mut() = code;
    res
}

pub fn receipt<B>(res: &Response<B>) -> CreditReceipt {
    res.extensions()
        .get::<CreditReceipt>()
        .cloned()
        .expect("a receipt on the response")
}

pub fn charged(used: u64, balance: Option<u64>) -> Option<CreditSettlement> {
    Some(CreditSettlement::Charged { used, balance })
}

/// Collects a body whose error type converts to a boxed error.
pub async fn body_bytes<B>(body: B) -> Bytes
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    body.collect().await.unwrap().to_bytes()
}

pub async fn body_json<B>(body: B) -> serde_json::Value
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    serde_json::from_slice(&body_bytes(body).await).unwrap()
}

/// Replays the rows from an empty account and checks every `balance_after`; returns the
/// final (plan, top-up) pots.
pub fn replay(rows: &[LedgerEntry]) -> (u64, u64) {
    let (mut plan, mut topup) = (0i64, 0i64);
    for (i, row) in rows.iter().enumerate() {
        plan += row.delta_plan;
        topup += row.delta_topup;
        assert!(
            plan >= 0 && topup >= 0,
            "row {i} makes a pot negative: {row:?}"
        );
        assert_eq!(
            (plan + topup) as u64,
            row.balance_after,
            "row {i} does not replay: {row:?}"
        );
    }
    (plan as u64, topup as u64)
}

/// A response body fed by the test through a channel: it can stall, fail or end at will.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::UnboundedReceiver<Result<Bytes, std::io::Error>>,
    exact_len: Option<u64>,
}

impl ChannelBody {
    /// Announces an exact length (as a body with a `Content-Length` does).
    pub fn with_exact_len(mut self, len: u64) -> Self {
        self.exact_len = Some(len);
        self
    }
}

pub fn channel_body() -> (
    mpsc::UnboundedSender<Result<Bytes, std::io::Error>>,
    ChannelBody,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        tx,
        ChannelBody {
            rx,
            exact_len: None,
        },
    )
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(Ok(data))) = &polled {
            if let Some(len) = self.exact_len.as_mut() {
                *len = len.saturating_sub(data.len() as u64);
            }
        }
        polled.map(|item| item.map(|r| r.map(Frame::data)))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.exact_len {
            Some(len) => http_body::SizeHint::with_exact(len),
            None => http_body::SizeHint::default(),
        }
    }
}

pub fn now(clock: &ManualClock) -> u64 {
    clock.now_ms()
}
