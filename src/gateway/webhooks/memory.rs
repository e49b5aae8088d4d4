//! [`MemoryWebhookStore`]: endpoints and the outbox in process (one replica; lost at exit,
//! like the memory ledger).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use tollgate_core::{BackendError, BoxFuture, OrgId};

use super::{
    Attempt, DeliveryState, DeliveryView, DueDelivery, Endpoint, EndpointId, Event, WebhookStore,
    MAX_ENDPOINTS_PER_ORG,
};

/// The most events kept per org; the oldest finished deliveries go first.
const MAX_DELIVERIES_PER_ORG: usize = 10_000;

#[derive(Debug)]
struct Delivery {
    id: Uuid,
    endpoint: EndpointId,
    org: OrgId,
    event: Arc<Event>,
    state: DeliveryState,
    next_attempt_ms: u64,
    attempts: Vec<Attempt>,
}

#[derive(Debug, Default)]
struct Inner {
    endpoints: Vec<Endpoint>,
    /// Event ids with their time.
    events: HashMap<Uuid, u64>,
    deliveries: Vec<Delivery>,
    watched: HashMap<(OrgId, String), String>,
    thresholds: HashMap<OrgId, u64>,
}

impl Inner {
    fn emit(&mut self, event: Event) -> usize {
        let targets: Vec<EndpointId> = self
            .endpoints
            .iter()
            .filter(|e| e.org == event.org && e.wants(&event))
            .map(|e| e.id)
            .collect();
        // An event nobody wants is not kept: an endpoint added later still hears of its
        // occurrence if it happens again (a key's expiry seen by the next scan).
        if targets.is_empty() || self.events.contains_key(&event.id) {
            return 0;
        }
        self.events.insert(event.id, event.created_ms);
        let event = Arc::new(event);
        for endpoint in &targets {
            self.deliveries.push(Delivery {
                id: Uuid::new_v4(),
                endpoint: *endpoint,
                org: event.org,
                event: Arc::clone(&event),
                state: DeliveryState::Pending,
                next_attempt_ms: event.created_ms,
                attempts: Vec::new(),
            });
        }
        self.trim(event.org);
        targets.len()
    }

    /// Keeps at most [`MAX_DELIVERIES_PER_ORG`] per org by dropping its oldest finished ones.
    fn trim(&mut self, org: OrgId) {
        let count = self.deliveries.iter().filter(|d| d.org == org).count();
        let mut excess = count.saturating_sub(MAX_DELIVERIES_PER_ORG);
        if excess == 0 {
            return;
        }
        self.deliveries.retain(|d| {
            if excess > 0 && d.org == org && d.state != DeliveryState::Pending {
                excess -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// A [`WebhookStore`] in memory. Cloning shares it.
#[derive(Debug, Default, Clone)]
pub struct MemoryWebhookStore {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryWebhookStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn ready<T: Send + 'static>(value: T) -> BoxFuture<Result<T, BackendError>> {
    Box::pin(std::future::ready(Ok(value)))
}

impl WebhookStore for MemoryWebhookStore {
    fn create_endpoint(&self, endpoint: Endpoint) -> BoxFuture<Result<bool, BackendError>> {
        ready(self.with(|inner| {
            let count = inner
                .endpoints
                .iter()
                .filter(|e| e.org == endpoint.org)
                .count();
            if count >= MAX_ENDPOINTS_PER_ORG {
                return false;
            }
            inner.endpoints.push(endpoint);
            true
        }))
    }

    fn endpoints(&self, org: OrgId) -> BoxFuture<Result<Vec<Endpoint>, BackendError>> {
        ready(self.with(|inner| {
            inner
                .endpoints
                .iter()
                .filter(|e| e.org == org)
                .cloned()
                .collect()
        }))
    }

    fn delete_endpoint(&self, org: OrgId, id: EndpointId) -> BoxFuture<Result<bool, BackendError>> {
        ready(self.with(|inner| {
            let before = inner.endpoints.len();
            inner.endpoints.retain(|e| !(e.org == org && e.id == id));
            let removed = inner.endpoints.len() < before;
            if removed {
                inner.deliveries.retain(|d| d.endpoint != id);
                // The org's last endpoint: what was watched for it starts over with the next.
                if !inner.endpoints.iter().any(|e| e.org == org) {
                    inner.watched.retain(|(o, _), _| *o != org);
                }
            }
            removed
        }))
    }

    fn set_secret(
        &self,
        org: OrgId,
        id: EndpointId,
        secret: String,
    ) -> BoxFuture<Result<bool, BackendError>> {
        ready(self.with(|inner| {
            match inner
                .endpoints
                .iter_mut()
                .find(|e| e.org == org && e.id == id)
            {
                Some(e) => {
                    e.secret = secret;
                    true
                }
                None => false,
            }
        }))
    }

    fn orgs_with_endpoints(&self) -> BoxFuture<Result<Vec<OrgId>, BackendError>> {
        ready(self.with(|inner| {
            let mut orgs: Vec<OrgId> = inner.endpoints.iter().map(|e| e.org).collect();
            orgs.sort();
            orgs.dedup();
            orgs
        }))
    }

    fn emit(&self, event: Event) -> BoxFuture<Result<usize, BackendError>> {
        ready(self.with(|inner| inner.emit(event)))
    }

    fn observe(
        &self,
        org: OrgId,
        subject: String,
        state: String,
        on_change: Option<Event>,
    ) -> BoxFuture<Result<bool, BackendError>> {
        ready(self.with(
            |inner| match inner.watched.insert((org, subject), state.clone()) {
                Some(previous) if previous != state => {
                    if let Some(event) = on_change {
                        inner.emit(event);
                    }
                    true
                }
                _ => false,
            },
        ))
    }

    fn claim_due(
        &self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> BoxFuture<Result<Vec<DueDelivery>, BackendError>> {
        ready(self.with(|inner| {
            let Inner {
                endpoints,
                deliveries,
                ..
            } = inner;
            let mut due: Vec<&mut Delivery> = deliveries
                .iter_mut()
                .filter(|d| d.state == DeliveryState::Pending && d.next_attempt_ms <= now_ms)
                .collect();
            due.sort_by_key(|d| d.next_attempt_ms);
            due.into_iter()
                .take(limit)
                .filter_map(|d| {
                    let endpoint = endpoints.iter().find(|e| e.id == d.endpoint)?;
                    d.next_attempt_ms = now_ms.saturating_add(lease_ms);
                    Some(DueDelivery {
                        id: d.id,
                        attempt: d.attempts.len() as u32 + 1,
                        url: endpoint.url.clone(),
                        secret: endpoint.secret.clone(),
                        event_id: d.event.id,
                        kind: d.event.kind,
                        body: d.event.body(),
                        event_ms: d.event.created_ms,
                    })
                })
                .collect()
        }))
    }

    fn record_attempt(
        &self,
        delivery: Uuid,
        attempt: Attempt,
        retry_at_ms: Option<u64>,
    ) -> BoxFuture<Result<(), BackendError>> {
        self.with(|inner| {
            if let Some(d) = inner.deliveries.iter_mut().find(|d| d.id == delivery) {
                if d.state != DeliveryState::Pending {
                    return;
                }
                let succeeded = attempt.succeeded();
                d.attempts.push(attempt);
                match (succeeded, retry_at_ms) {
                    (true, _) => d.state = DeliveryState::Delivered,
                    (false, Some(at)) => d.next_attempt_ms = at,
                    (false, None) => d.state = DeliveryState::Failed,
                }
            }
        });
        ready(())
    }

    fn deliveries(
        &self,
        org: OrgId,
        id: EndpointId,
        limit: usize,
    ) -> BoxFuture<Result<Option<Vec<DeliveryView>>, BackendError>> {
        ready(self.with(|inner| {
            if !inner.endpoints.iter().any(|e| e.org == org && e.id == id) {
                return None;
            }
            Some(
                inner
                    .deliveries
                    .iter()
                    .rev()
                    .filter(|d| d.endpoint == id)
                    .take(limit)
                    .map(|d| DeliveryView {
                        id: d.id,
                        event_id: d.event.id,
                        kind: d.event.kind,
                        state: d.state,
                        created_ms: d.event.created_ms,
                        next_attempt_ms: (d.state == DeliveryState::Pending)
                            .then_some(d.next_attempt_ms),
                        attempts: d.attempts.clone(),
                    })
                    .collect(),
            )
        }))
    }

    fn low_threshold(&self, org: OrgId) -> BoxFuture<Result<Option<u64>, BackendError>> {
        ready(self.with(|inner| inner.thresholds.get(&org).copied()))
    }

    fn purge_older_than(&self, cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>> {
        ready(self.with(|inner| {
            let busy: HashSet<Uuid> = inner
                .deliveries
                .iter()
                .filter(|d| d.state == DeliveryState::Pending)
                .map(|d| d.event.id)
                .collect();
            let old: HashSet<Uuid> = inner
                .events
                .iter()
                .filter(|(id, at)| **at < cutoff_ms && !busy.contains(id))
                .map(|(id, _)| *id)
                .collect();
            inner.events.retain(|id, _| !old.contains(id));
            inner.deliveries.retain(|d| !old.contains(&d.event.id));
            old.len() as u64
        }))
    }

    fn set_low_threshold(
        &self,
        org: OrgId,
        threshold: Option<u64>,
    ) -> BoxFuture<Result<(), BackendError>> {
        self.with(|inner| match threshold {
            Some(t) => {
                inner.thresholds.insert(org, t);
            }
            None => {
                inner.thresholds.remove(&org);
            }
        });
        ready(())
    }
}
