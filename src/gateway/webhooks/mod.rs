//! Webhooks (docs/contract.md §15): endpoints per org, the six events, signed bodies, a durable
//! outbox with retries, delivery history.
//!
//! # How an event travels
//!
//! 1. Something changes: a model is disconnected by the upstream or reconnected by the
//!    operator ([`WebhookSessions`] wraps the session store), a request is refused with 402
//!    `INSUFFICIENT_CREDITS` or a charge takes the balance under the org's threshold (seen by
//!    the request logger's worker, off the request path), a period starts or a key nears its
//!    expiry (seen by the [watcher](watch)).
//! 2. The event is written to the outbox ([`WebhookStore::emit`]) with one delivery per
//!    endpoint of the org that subscribed to its type. Event ids are derived from what
//!    happened (the model and its session version, the org and its period, the key), so the
//!    same occurrence seen by two replicas, or twice by one, is one event and one delivery.
//! 3. The [dispatcher](deliver) of every replica claims due deliveries (a lease, so two
//!    replicas do not send the same attempt), POSTs the body signed with the endpoint's
//!    secret, and records the attempt: a 2xx ends the delivery, anything else (a non-2xx, a
//!    timeout of 10 s, a connection error, an address that is not allowed) schedules a retry
//!    with exponential backoff until 24 h after the event.
//!
//! Nothing of this runs on a customer request: the request path only hands the logger a
//! record, as before, and a spawned task writes the outbox.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use tollgate_core::time::rfc3339_from_ms;
use tollgate_core::{BackendError, BoxFuture, KeyId, ModelId, OrgId};

pub mod address;
pub mod deliver;
mod memory;
mod postgres;
pub mod sessions;
pub mod watch;

pub use memory::MemoryWebhookStore;
pub use postgres::PostgresWebhookStore;
pub use sessions::WebhookSessions;

/// How long a delivery is retried after its event: 24 h.
pub const RETRY_FOR: Duration = Duration::from_secs(24 * 3600);
/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// The default wait before the first retry; each further retry waits twice as long.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(30);
/// How often the watcher scans by default.
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(10);
/// How long one attempt may take (connect, TLS, request, response head).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// `key.expiring` is sent for keys expiring within this.
pub const KEY_EXPIRING_WITHIN: Duration = Duration::from_secs(7 * 24 * 3600);
/// The most endpoints one org may register.
pub const MAX_ENDPOINTS_PER_ORG: usize = 16;
/// The default threshold of `credits.low`, in percent of the plan's monthly credits.
pub const DEFAULT_LOW_PERCENT: u64 = 10;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum EventType {
    /// The balance fell below the org's threshold.
    #[serde(rename = "credits.low")]
    CreditsLow,
    /// A request was refused with 402 `INSUFFICIENT_CREDITS` (once per period).
    #[serde(rename = "credits.exhausted")]
    CreditsExhausted,
    /// A model became `disconnected`.
    #[serde(rename = "model.disconnected")]
    ModelDisconnected,
    /// A model was reconnected.
    #[serde(rename = "model.reconnected")]
    ModelReconnected,
    /// A new billing period started.
    #[serde(rename = "subscription.renewed")]
    SubscriptionRenewed,
    /// A key expires within 7 days (once per key).
    #[serde(rename = "key.expiring")]
    KeyExpiring,
    /// Sent on request to one endpoint (`POST …/webhooks/:id/test`); no endpoint subscribes
    /// to it.
    #[serde(rename = "webhook.test")]
    Test,
}

impl EventType {
    /// The six events an endpoint can subscribe to.
    pub const SUBSCRIBABLE: [EventType; 6] = [
        EventType::CreditsLow,
        EventType::CreditsExhausted,
        EventType::ModelDisconnected,
        EventType::ModelReconnected,
        EventType::SubscriptionRenewed,
        EventType::KeyExpiring,
    ];

    /// The name in bodies and the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventType::CreditsLow => "credits.low",
            EventType::CreditsExhausted => "credits.exhausted",
            EventType::ModelDisconnected => "model.disconnected",
            EventType::ModelReconnected => "model.reconnected",
            EventType::SubscriptionRenewed => "subscription.renewed",
            EventType::KeyExpiring => "key.expiring",
            EventType::Test => "webhook.test",
        }
    }

    /// The type named `name` (the test event included).
    pub fn parse(name: &str) -> Option<EventType> {
        Self::SUBSCRIBABLE
            .into_iter()
            .chain([EventType::Test])
            .find(|t| t.as_str() == name)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A webhook endpoint's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct EndpointId(pub Uuid);

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for EndpointId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(EndpointId)
    }
}

/// A registered endpoint.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Its id.
    pub id: EndpointId,
    /// The org it belongs to.
    pub org: OrgId,
    /// Where events are POSTed.
    pub url: String,
    /// The events it receives, sorted.
    pub events: Vec<EventType>,
    /// The signing secret (`whsec_…`); `Debug` redacts it.
    pub secret: String,
    /// When it was registered (ms since the epoch).
    pub created_ms: u64,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.id)
            .field("org", &self.org)
            .field("url", &without_query(&self.url))
            .field("events", &self.events)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Endpoint {
    /// A new endpoint with a fresh id and secret.
    pub fn new(org: OrgId, url: String, mut events: Vec<EventType>, now_ms: u64) -> Endpoint {
        events.sort();
        events.dedup();
        Endpoint {
            id: EndpointId(Uuid::new_v4()),
            org,
            url,
            events,
            secret: new_secret(),
            created_ms: now_ms,
        }
    }

    /// Whether it receives `event`.
    pub fn wants(&self, event: &Event) -> bool {
        match event.only {
            Some(only) => only == self.id,
            None => self.events.contains(&event.kind),
        }
    }

    /// The view of the admin API (never the secret).
    pub fn view(&self) -> Value {
        serde_json::json!({
            "id": self.id,
            "url": self.url,
            "events": self.events,
            "created_at": rfc3339_from_ms(self.created_ms),
        })
    }
}

/// A URL without its query (which may carry a receiver's token), for logs.
fn without_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// A new signing secret: `whsec_` and 32 random bytes in hex.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).expect("the operating system's random source");
    format!("whsec_{}", hex::encode(bytes))
}

/// One occurrence of an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Its id: the same for the same occurrence, whoever saw it.
    pub id: Uuid,
    /// What happened.
    pub kind: EventType,
    /// The org it happened to.
    pub org: OrgId,
    /// When (ms since the epoch).
    pub created_ms: u64,
    /// What the receiver needs to act on it.
    pub data: Value,
    /// Sent to this endpoint only (the test event).
    pub only: Option<EndpointId>,
}

impl Event {
    /// An event whose id is derived from `occurrence`: two emitters naming the same
    /// occurrence make one event.
    pub fn new(kind: EventType, org: OrgId, occurrence: &str, now_ms: u64, data: Value) -> Self {
        Event {
            id: occurrence_id(kind, org, occurrence),
            kind,
            org,
            created_ms: now_ms,
            data,
            only: None,
        }
    }

    /// The body POSTed to the endpoints: `{id, type, created_at, org_id, data}`.
    pub fn body(&self) -> String {
        serde_json::json!({
            "id": self.id,
            "type": self.kind,
            "created_at": rfc3339_from_ms(self.created_ms),
            "org_id": self.org,
            "data": self.data,
        })
        .to_string()
    }
}

/// A UUID (version 8) from the SHA-256 of the event type, the org and the occurrence.
pub fn occurrence_id(kind: EventType, org: OrgId, occurrence: &str) -> Uuid {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{}\n{}\n{occurrence}", kind.as_str(), org).as_bytes(),
    );
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// `Tollgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn signature(secret: &str, unix_seconds: u64, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(unix_seconds.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body.as_bytes());
    format!("t={unix_seconds},v1={}", hex::encode(ctx.sign().as_ref()))
}

/// The state of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not delivered yet; attempted again at `next_attempt_at`.
    Pending,
    /// A 2xx answered it.
    Delivered,
    /// Retried for 24 h without a 2xx.
    Failed,
}

impl DeliveryState {
    /// The name stored and shown.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    /// The state named `text`.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Pending, Self::Delivered, Self::Failed]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// A delivery due for an attempt, with what the attempt needs.
#[derive(Clone)]
pub struct DueDelivery {
    /// The delivery.
    pub id: Uuid,
    /// The attempt this is (1 for the first).
    pub attempt: u32,
    /// The endpoint's address.
    pub url: String,
    /// Its signing secret.
    pub secret: String,
    /// The event's id and type.
    pub event_id: Uuid,
    /// The event's type.
    pub kind: EventType,
    /// The body to send.
    pub body: String,
    /// When the event happened: retries stop 24 h after.
    pub event_ms: u64,
}

impl fmt::Debug for DueDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DueDelivery")
            .field("id", &self.id)
            .field("attempt", &self.attempt)
            .field("url", &without_query(&self.url))
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// One attempt's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    /// When it started (ms since the epoch).
    #[serde(skip)]
    pub at_ms: u64,
    /// The receiver's status code, if it answered.
    pub status: Option<u16>,
    /// Why it failed without a status (timeout, connection, address refused).
    pub error: Option<String>,
    /// How long it took.
    pub duration_ms: u64,
}

impl Attempt {
    /// Whether the receiver took it (2xx).
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// A delivery as its endpoint's history shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryView {
    /// The delivery.
    pub id: Uuid,
    /// The event's id.
    pub event_id: Uuid,
    /// The event's type.
    pub kind: EventType,
    /// Where it stands.
    pub state: DeliveryState,
    /// When the event happened.
    pub created_ms: u64,
    /// The next attempt, while pending.
    pub next_attempt_ms: Option<u64>,
    /// Its attempts, oldest first.
    pub attempts: Vec<Attempt>,
}

impl DeliveryView {
    /// The JSON of `GET /admin/orgs/:org/webhooks/:id/deliveries`.
    pub fn view(&self) -> Value {
        serde_json::json!({
            "id": self.id,
            "event_id": self.event_id,
            "type": self.kind,
            "status": self.state,
            "created_at": rfc3339_from_ms(self.created_ms),
            "next_attempt_at": self.next_attempt_ms.map(rfc3339_from_ms),
            "attempts": self.attempts.iter().map(|a| serde_json::json!({
                "at": rfc3339_from_ms(a.at_ms),
                "status": a.status,
                "error": a.error,
                "duration_ms": a.duration_ms,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Where endpoints, the outbox and its delivery history live. Memory and PostgreSQL
/// implementations; both must be safe under concurrent use by several replicas (PostgreSQL)
/// and must never log a secret.
pub trait WebhookStore: Send + Sync + 'static {
    /// Registers `endpoint`; `false` when the org already has [`MAX_ENDPOINTS_PER_ORG`].
    fn create_endpoint(&self, endpoint: Endpoint) -> BoxFuture<Result<bool, BackendError>>;
    /// The org's endpoints, oldest first.
    fn endpoints(&self, org: OrgId) -> BoxFuture<Result<Vec<Endpoint>, BackendError>>;
    /// Removes the endpoint and its pending deliveries; `false` when it is not the org's.
    fn delete_endpoint(&self, org: OrgId, id: EndpointId) -> BoxFuture<Result<bool, BackendError>>;
    /// Replaces the endpoint's secret; `false` when it is not the org's.
    fn set_secret(
        &self,
        org: OrgId,
        id: EndpointId,
        secret: String,
    ) -> BoxFuture<Result<bool, BackendError>>;
    /// The orgs with at least one endpoint.
    fn orgs_with_endpoints(&self) -> BoxFuture<Result<Vec<OrgId>, BackendError>>;
    /// Writes `event` and one pending delivery per endpoint that wants it, unless an event
    /// with its id exists or no endpoint wants it (then nothing is kept); returns the
    /// deliveries created.
    fn emit(&self, event: Event) -> BoxFuture<Result<usize, BackendError>>;
    /// Records that `subject` of `org` is now in `state`. The first observation only
    /// records it; a change from another state records it and, in the same transaction,
    /// emits `on_change` (when given). Returns whether the state changed.
    fn observe(
        &self,
        org: OrgId,
        subject: String,
        state: String,
        on_change: Option<Event>,
    ) -> BoxFuture<Result<bool, BackendError>>;
    /// Claims up to `limit` pending deliveries due at `now_ms` for `lease_ms` (another
    /// claim skips them until then), oldest first.
    fn claim_due(
        &self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> BoxFuture<Result<Vec<DueDelivery>, BackendError>>;
    /// Records an attempt: a success ends the delivery, a failure schedules the next
    /// attempt at `retry_at_ms` or, with `None`, ends it as failed.
    fn record_attempt(
        &self,
        delivery: Uuid,
        attempt: Attempt,
        retry_at_ms: Option<u64>,
    ) -> BoxFuture<Result<(), BackendError>>;
    /// The endpoint's most recent deliveries (newest first) with their attempts; `None`
    /// when it is not the org's.
    fn deliveries(
        &self,
        org: OrgId,
        id: EndpointId,
        limit: usize,
    ) -> BoxFuture<Result<Option<Vec<DeliveryView>>, BackendError>>;
    /// The org's `credits.low` threshold, if set (else 10 % of the plan's credits).
    fn low_threshold(&self, org: OrgId) -> BoxFuture<Result<Option<u64>, BackendError>>;
    /// Sets (or with `None` clears) the org's `credits.low` threshold.
    fn set_low_threshold(
        &self,
        org: OrgId,
        threshold: Option<u64>,
    ) -> BoxFuture<Result<(), BackendError>>;
    /// Forgets events older than `cutoff_ms` whose deliveries are all finished, with their
    /// history; returns how many went.
    fn purge_older_than(&self, cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>>;
}

/// How long delivered and failed events stay in the history: 30 days.
pub const HISTORY: Duration = Duration::from_secs(30 * 24 * 3600);

/// How the gateway's webhook parts are set up.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// Endpoints on loopback, private, link-local or metadata addresses, and `http://`, are
    /// allowed (`TOLLGATE_WEBHOOK_ALLOW_PRIVATE=1`, for tests on loopback).
    pub allow_private: bool,
    /// The wait before the first retry (doubling after each).
    pub retry_base: Duration,
    /// How often the watcher looks at periods, balances and key expiries.
    pub scan_interval: Duration,
}

/// The outbox and the wake-up of the local dispatcher, shared by the gateway's parts.
#[derive(Clone)]
pub struct Webhooks {
    /// The store.
    pub store: Arc<dyn WebhookStore>,
    wake: Arc<tokio::sync::Notify>,
    /// The orgs with endpoints as this replica last saw them (refreshed by every scan, and
    /// at once by a registration here), so the log worker's reports of other orgs cost
    /// nothing.
    orgs: Arc<std::sync::RwLock<std::collections::HashSet<OrgId>>>,
}

impl fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhooks").finish_non_exhaustive()
    }
}

impl Webhooks {
    /// Webhooks on `store`.
    pub fn new(store: Arc<dyn WebhookStore>) -> Self {
        Webhooks {
            store,
            wake: Arc::new(tokio::sync::Notify::new()),
            orgs: Arc::default(),
        }
    }

    /// Whether `org` had an endpoint when last seen.
    pub fn has_endpoints(&self, org: OrgId) -> bool {
        self.orgs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&org)
    }

    /// `org` registered an endpoint on this replica.
    pub fn note_endpoint(&self, org: OrgId) {
        self.orgs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(org);
    }

    /// The orgs with endpoints, as the store lists them now.
    pub(crate) fn set_orgs(&self, orgs: std::collections::HashSet<OrgId>) {
        *self.orgs.write().unwrap_or_else(|e| e.into_inner()) = orgs;
    }

    /// Writes `event` to the outbox and wakes the dispatcher. A failure is logged: the event
    /// is lost only if the outbox cannot be written at all.
    pub async fn emit(&self, event: Event) {
        let kind = event.kind;
        let org = event.org;
        match self.store.emit(event).await {
            Ok(0) => {}
            Ok(_) => self.wake.notify_one(),
            Err(e) => {
                tracing::warn!(event = %kind, org = %org, error = %e, "writing a webhook event failed")
            }
        }
    }

    /// [`emit`](Self::emit) on a task of its own (never delays the caller).
    pub fn emit_detached(&self, event: Event) {
        let this = self.clone();
        tokio::spawn(async move { this.emit(event).await });
    }

    /// Wakes the dispatcher (an event was written by [`WebhookStore::observe`]).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub(crate) fn woken(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.wake)
    }
}

/// Forgets finished events older than [`HISTORY`], every hour.
pub fn spawn_purge(webhooks: Webhooks) -> tokio::task::JoinHandle<()> {
    use tollgate_core::Clock as _;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            let cutoff = tollgate_core::SystemClock
                .now_ms()
                .saturating_sub(HISTORY.as_millis() as u64);
            match webhooks.store.purge_older_than(cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(events = n, "webhook history purged"),
                Err(e) => tracing::warn!(error = %e, "purging the webhook history failed"),
            }
        }
    })
}

/// The `data` of a key event.
pub fn key_data(key: KeyId, name: &str, prefix: &str, expires_ms: u64) -> Value {
    serde_json::json!({
        "key_id": key,
        "name": name,
        "prefix": prefix,
        "expires_at": rfc3339_from_ms(expires_ms),
    })
}

/// The `data` of a model event.
pub fn model_data(model: ModelId, name: &str) -> Value {
    serde_json::json!({"model_id": model, "name": name})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_t_dot_body() {
        // RFC 4231 does not cover this framing; check against an independent computation.
        let sig = signature("whsec_test", 1_700_000_000, r#"{"a":1}"#);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"whsec_test");
        let expected = ring::hmac::sign(&key, br#"1700000000.{"a":1}"#);
        assert_eq!(
            sig,
            format!("t=1700000000,v1={}", hex::encode(expected.as_ref()))
        );
        assert!(ring::hmac::verify(
            &key,
            br#"1700000000.{"a":1}"#,
            &hex::decode(&sig[16..]).unwrap()
        )
        .is_ok());
    }

    #[test]
    fn occurrence_ids_are_stable_and_distinct() {
        let org = OrgId::new();
        let a = occurrence_id(EventType::ModelDisconnected, org, "m:3");
        assert_eq!(a, occurrence_id(EventType::ModelDisconnected, org, "m:3"));
        assert_ne!(a, occurrence_id(EventType::ModelDisconnected, org, "m:4"));
        assert_ne!(a, occurrence_id(EventType::ModelReconnected, org, "m:3"));
        assert_ne!(
            a,
            occurrence_id(EventType::ModelDisconnected, OrgId::new(), "m:3")
        );
    }

    #[test]
    fn event_types_round_trip_and_the_body_has_the_contract_fields() {
        for t in EventType::SUBSCRIBABLE {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
        assert_eq!(EventType::parse("credits.lo"), None);
        let event = Event::new(
            EventType::CreditsLow,
            OrgId::new(),
            "x",
            0,
            serde_json::json!({"balance": 3}),
        );
        let body: Value = serde_json::from_str(&event.body()).unwrap();
        let mut keys: Vec<_> = body.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["created_at", "data", "id", "org_id", "type"]);
        assert_eq!(body["type"], "credits.low");
        assert_eq!(body["created_at"], "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn secrets_are_random_and_redacted() {
        let a = new_secret();
        assert!(a.starts_with("whsec_") && a.len() == 6 + 64);
        assert_ne!(a, new_secret());
        let e = Endpoint::new(OrgId::new(), "https://x".into(), vec![], 0);
        assert!(!format!("{e:?}").contains(&e.secret));
    }
}
