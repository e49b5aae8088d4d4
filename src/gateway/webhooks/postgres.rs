//! [`PostgresWebhookStore`]: endpoints (secrets sealed with the session key), the outbox,
//! deliveries and their attempts in PostgreSQL, shared by every replica.

use std::fmt;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use uuid::Uuid;

use tollgate_core::{BackendError, BoxFuture, OrgId};
use tollgate_postgres::deadpool_postgres::{GenericClient, Pool};
use tollgate_postgres::refinery::{Migration, Runner};
use tollgate_postgres::tokio_postgres::Row;
use tollgate_postgres::{run_migrations, to_backend_error};

use super::{
    Attempt, DeliveryState, DeliveryView, DueDelivery, Endpoint, EndpointId, Event, EventType,
    WebhookStore, MAX_ENDPOINTS_PER_ORG,
};

/// The name of the webhooks migration set (history table
/// `tollgate_gateway_webhooks_migrations`).
pub const MIGRATION_SET: &str = "gateway_webhooks";

const MIGRATIONS: &[(&str, &str)] = &[(
    "V1__webhooks",
    "CREATE TABLE tollgate_webhook_endpoints (
         id            uuid PRIMARY KEY,
         org_id        uuid NOT NULL,
         url           text NOT NULL,
         events        text[] NOT NULL,
         secret_nonce  bytea NOT NULL,
         secret_sealed bytea NOT NULL,
         created_at_ms bigint NOT NULL
     );
     CREATE INDEX tollgate_webhook_endpoints_org ON tollgate_webhook_endpoints (org_id);
     CREATE TABLE tollgate_webhook_events (
         id            uuid PRIMARY KEY,
         org_id        uuid NOT NULL,
         type          text NOT NULL,
         body          text NOT NULL,
         created_at_ms bigint NOT NULL
     );
     CREATE INDEX tollgate_webhook_events_created ON tollgate_webhook_events (created_at_ms);
     CREATE TABLE tollgate_webhook_deliveries (
         id                 uuid PRIMARY KEY,
         event_id           uuid NOT NULL REFERENCES tollgate_webhook_events (id) ON DELETE CASCADE,
         endpoint_id        uuid NOT NULL REFERENCES tollgate_webhook_endpoints (id) ON DELETE CASCADE,
         org_id             uuid NOT NULL,
         state              text NOT NULL,
         attempts           integer NOT NULL DEFAULT 0,
         next_attempt_at_ms bigint NOT NULL
     );
     CREATE INDEX tollgate_webhook_deliveries_due ON tollgate_webhook_deliveries (next_attempt_at_ms)
         WHERE state = 'pending';
     CREATE INDEX tollgate_webhook_deliveries_endpoint ON tollgate_webhook_deliveries (endpoint_id);
     CREATE TABLE tollgate_webhook_attempts (
         delivery_id uuid NOT NULL REFERENCES tollgate_webhook_deliveries (id) ON DELETE CASCADE,
         attempt     integer NOT NULL,
         at_ms       bigint NOT NULL,
         status      integer,
         error       text,
         duration_ms bigint NOT NULL,
         PRIMARY KEY (delivery_id, attempt)
     );
     CREATE TABLE tollgate_webhook_watch (
         org_id  uuid NOT NULL,
         subject text NOT NULL,
         state   text NOT NULL,
         PRIMARY KEY (org_id, subject)
     );
     CREATE TABLE tollgate_webhook_settings (
         org_id        uuid PRIMARY KEY,
         low_threshold bigint
     );",
)];

fn runner() -> Result<Runner, BackendError> {
    let migrations = MIGRATIONS
        .iter()
        .map(|(name, sql)| Migration::unapplied(name, sql).map_err(to_backend_error))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Runner::new(&migrations))
}

const NONCE_LEN: usize = 24;

/// A [`WebhookStore`] in PostgreSQL. Cloning shares the pool.
#[derive(Clone)]
pub struct PostgresWebhookStore {
    pool: Pool,
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for PostgresWebhookStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresWebhookStore")
            .field("pool", &self.pool.status())
            .finish_non_exhaustive()
    }
}

fn ms(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn unms(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn kinds(names: &[String]) -> Vec<EventType> {
    names.iter().filter_map(|n| EventType::parse(n)).collect()
}

impl PostgresWebhookStore {
    /// A store on `pool` sealing endpoint secrets with `key` (the session key), after
    /// applying its migrations.
    pub async fn new(pool: Pool, key: [u8; 32]) -> Result<Self, BackendError> {
        run_migrations(&pool, MIGRATION_SET, runner()?).await?;
        Ok(PostgresWebhookStore {
            pool,
            cipher: XChaCha20Poly1305::new(&key.into()),
        })
    }

    fn seal(&self, id: EndpointId, secret: &str) -> Result<(Vec<u8>, Vec<u8>), BackendError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|e| {
            BackendError::other(format!("the system random number generator failed: {e}"))
        })?;
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: id.0.as_bytes(),
                },
            )
            .map_err(|_| BackendError::other("webhook secret encryption failed"))?;
        Ok((nonce.to_vec(), sealed))
    }

    fn open(&self, id: Uuid, nonce: &[u8], sealed: &[u8]) -> Result<String, BackendError> {
        let bad = || {
            BackendError::other(format!(
                "the secret of webhook endpoint {id} cannot be decrypted (a different \
                 TOLLGATE_SESSION_KEY?); rotate its secret"
            ))
        };
        if nonce.len() != NONCE_LEN {
            return Err(bad());
        }
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| bad())?;
        String::from_utf8(plain).map_err(|_| bad())
    }

    /// An endpoint row. A secret that cannot be opened (another session key) reads as
    /// empty, so the endpoint can still be listed, rotated (which seals a new one) or
    /// deleted; its deliveries fail until then.
    fn endpoint_from(&self, row: &Row) -> Endpoint {
        let id: Uuid = row.get("id");
        let events: Vec<String> = row.get("events");
        let secret = self
            .open(id, row.get("secret_nonce"), row.get("secret_sealed"))
            .unwrap_or_else(|e| {
                tracing::warn!(endpoint = %id, error = %e, "webhook secret unreadable");
                String::new()
            });
        Endpoint {
            id: EndpointId(id),
            org: OrgId::from_uuid(row.get("org_id")),
            url: row.get("url"),
            events: kinds(&events),
            secret,
            created_ms: unms(row.get("created_at_ms")),
        }
    }
}

/// Writes `event` and its deliveries on `client` (a transaction or not).
async fn emit_on(client: &impl GenericClient, event: &Event) -> Result<usize, BackendError> {
    let n = client
        .execute(
            "WITH ev AS (
                 INSERT INTO tollgate_webhook_events (id, org_id, type, body, created_at_ms)
                 SELECT $1, $2, $3, $4, $5
                 WHERE EXISTS (
                     SELECT 1 FROM tollgate_webhook_endpoints e
                     WHERE e.org_id = $2
                       AND (CASE WHEN $6::uuid IS NULL THEN $3 = ANY (e.events) ELSE e.id = $6 END)
                 )
                 ON CONFLICT (id) DO NOTHING
                 RETURNING id
             )
             INSERT INTO tollgate_webhook_deliveries
                 (id, event_id, endpoint_id, org_id, state, next_attempt_at_ms)
             SELECT gen_random_uuid(), ev.id, e.id, $2, 'pending', $5
             FROM ev, tollgate_webhook_endpoints e
             WHERE e.org_id = $2
               AND (CASE WHEN $6::uuid IS NULL THEN $3 = ANY (e.events) ELSE e.id = $6 END)",
            &[
                &event.id,
                event.org.as_uuid(),
                &event.kind.as_str(),
                &event.body(),
                &ms(event.created_ms),
                &event.only.map(|e| e.0),
            ],
        )
        .await
        .map_err(to_backend_error)?;
    Ok(n as usize)
}

impl WebhookStore for PostgresWebhookStore {
    fn create_endpoint(&self, endpoint: Endpoint) -> BoxFuture<Result<bool, BackendError>> {
        let this = self.clone();
        Box::pin(async move {
            let (nonce, sealed) = this.seal(endpoint.id, &endpoint.secret)?;
            let mut client = this.pool.get().await.map_err(to_backend_error)?;
            let tx = client.transaction().await.map_err(to_backend_error)?;
            // One registration at a time per org, so the cap holds under concurrency.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1::text, 151))",
                &[&endpoint.org.to_string()],
            )
            .await
            .map_err(to_backend_error)?;
            let count: i64 = tx
                .query_one(
                    "SELECT count(*) FROM tollgate_webhook_endpoints WHERE org_id = $1",
                    &[endpoint.org.as_uuid()],
                )
                .await
                .map_err(to_backend_error)?
                .get(0);
            if count as usize >= MAX_ENDPOINTS_PER_ORG {
                return Ok(false);
            }
            let events: Vec<&str> = endpoint.events.iter().map(|e| e.as_str()).collect();
            tx.execute(
                "INSERT INTO tollgate_webhook_endpoints
                     (id, org_id, url, events, secret_nonce, secret_sealed, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &endpoint.id.0,
                    endpoint.org.as_uuid(),
                    &endpoint.url,
                    &events,
                    &nonce,
                    &sealed,
                    &ms(endpoint.created_ms),
                ],
            )
            .await
            .map_err(to_backend_error)?;
            tx.commit().await.map_err(to_backend_error)?;
            Ok(true)
        })
    }

    fn endpoints(&self, org: OrgId) -> BoxFuture<Result<Vec<Endpoint>, BackendError>> {
        let this = self.clone();
        Box::pin(async move {
            let client = this.pool.get().await.map_err(to_backend_error)?;
            let rows = client
                .query(
                    "SELECT * FROM tollgate_webhook_endpoints WHERE org_id = $1
                     ORDER BY created_at_ms, id",
                    &[org.as_uuid()],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(rows.iter().map(|r| this.endpoint_from(r)).collect())
        })
    }

    fn delete_endpoint(&self, org: OrgId, id: EndpointId) -> BoxFuture<Result<bool, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let mut client = pool.get().await.map_err(to_backend_error)?;
            let tx = client.transaction().await.map_err(to_backend_error)?;
            let n = tx
                .execute(
                    "DELETE FROM tollgate_webhook_endpoints WHERE org_id = $1 AND id = $2",
                    &[org.as_uuid(), &id.0],
                )
                .await
                .map_err(to_backend_error)?;
            // The org's last endpoint: what was watched for it starts over with the next.
            tx.execute(
                "DELETE FROM tollgate_webhook_watch WHERE org_id = $1 AND NOT EXISTS
                     (SELECT 1 FROM tollgate_webhook_endpoints WHERE org_id = $1)",
                &[org.as_uuid()],
            )
            .await
            .map_err(to_backend_error)?;
            tx.commit().await.map_err(to_backend_error)?;
            Ok(n == 1)
        })
    }

    fn set_secret(
        &self,
        org: OrgId,
        id: EndpointId,
        secret: String,
    ) -> BoxFuture<Result<bool, BackendError>> {
        let this = self.clone();
        Box::pin(async move {
            let (nonce, sealed) = this.seal(id, &secret)?;
            let client = this.pool.get().await.map_err(to_backend_error)?;
            let n = client
                .execute(
                    "UPDATE tollgate_webhook_endpoints SET secret_nonce = $3, secret_sealed = $4
                     WHERE org_id = $1 AND id = $2",
                    &[org.as_uuid(), &id.0, &nonce, &sealed],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(n == 1)
        })
    }

    fn orgs_with_endpoints(&self) -> BoxFuture<Result<Vec<OrgId>, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let rows = client
                .query(
                    "SELECT DISTINCT org_id FROM tollgate_webhook_endpoints ORDER BY org_id",
                    &[],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(rows.iter().map(|r| OrgId::from_uuid(r.get(0))).collect())
        })
    }

    fn emit(&self, event: Event) -> BoxFuture<Result<usize, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            emit_on(&client, &event).await
        })
    }

    fn observe(
        &self,
        org: OrgId,
        subject: String,
        state: String,
        on_change: Option<Event>,
    ) -> BoxFuture<Result<bool, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let mut client = pool.get().await.map_err(to_backend_error)?;
            let tx = client.transaction().await.map_err(to_backend_error)?;
            let first = tx
                .execute(
                    "INSERT INTO tollgate_webhook_watch (org_id, subject, state)
                     VALUES ($1, $2, $3) ON CONFLICT (org_id, subject) DO NOTHING",
                    &[org.as_uuid(), &subject, &state],
                )
                .await
                .map_err(to_backend_error)?;
            if first == 1 {
                tx.commit().await.map_err(to_backend_error)?;
                return Ok(false);
            }
            let changed = tx
                .execute(
                    "UPDATE tollgate_webhook_watch SET state = $3
                     WHERE org_id = $1 AND subject = $2 AND state <> $3",
                    &[org.as_uuid(), &subject, &state],
                )
                .await
                .map_err(to_backend_error)?
                == 1;
            if changed {
                if let Some(event) = &on_change {
                    emit_on(&tx, event).await?;
                }
            }
            tx.commit().await.map_err(to_backend_error)?;
            Ok(changed)
        })
    }

    fn claim_due(
        &self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> BoxFuture<Result<Vec<DueDelivery>, BackendError>> {
        let this = self.clone();
        Box::pin(async move {
            let client = this.pool.get().await.map_err(to_backend_error)?;
            let rows = client
                .query(
                    "UPDATE tollgate_webhook_deliveries d SET next_attempt_at_ms = $2
                     FROM (SELECT id FROM tollgate_webhook_deliveries
                           WHERE state = 'pending' AND next_attempt_at_ms <= $1
                           ORDER BY next_attempt_at_ms
                           LIMIT $3
                           FOR UPDATE SKIP LOCKED) due,
                          tollgate_webhook_events ev,
                          tollgate_webhook_endpoints e
                     WHERE d.id = due.id AND ev.id = d.event_id AND e.id = d.endpoint_id
                     RETURNING d.id AS delivery_id, d.attempts, e.id, e.url, e.secret_nonce,
                               e.secret_sealed, ev.id AS event_id, ev.type, ev.body,
                               ev.created_at_ms",
                    &[
                        &ms(now_ms),
                        &ms(now_ms.saturating_add(lease_ms)),
                        &(limit as i64),
                    ],
                )
                .await
                .map_err(to_backend_error)?;
            let mut due = Vec::with_capacity(rows.len());
            // A row this replica cannot send (an event type of a newer version, a secret
            // sealed with another key) is failed on its own, never holding up the others.
            let mut broken: Vec<(Uuid, String)> = Vec::new();
            for row in &rows {
                let delivery: Uuid = row.get("delivery_id");
                let kind: String = row.get("type");
                let Some(kind) = EventType::parse(&kind) else {
                    broken.push((delivery, format!("unknown event type {kind}")));
                    continue;
                };
                let secret = match this.open(
                    row.get("id"),
                    row.get("secret_nonce"),
                    row.get("secret_sealed"),
                ) {
                    Ok(secret) => secret,
                    Err(e) => {
                        broken.push((delivery, e.to_string()));
                        continue;
                    }
                };
                let attempts: i32 = row.get("attempts");
                due.push(DueDelivery {
                    id: delivery,
                    attempt: attempts.max(0) as u32 + 1,
                    url: row.get("url"),
                    secret,
                    event_id: row.get("event_id"),
                    kind,
                    body: row.get("body"),
                    event_ms: unms(row.get("created_at_ms")),
                });
            }
            for (delivery, error) in broken {
                let attempt = Attempt {
                    at_ms: now_ms,
                    status: None,
                    error: Some(error),
                    duration_ms: 0,
                };
                this.record_attempt(delivery, attempt, None).await?;
            }
            due.sort_by_key(|d| d.event_ms);
            Ok(due)
        })
    }

    fn record_attempt(
        &self,
        delivery: Uuid,
        attempt: Attempt,
        retry_at_ms: Option<u64>,
    ) -> BoxFuture<Result<(), BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let state = match (attempt.succeeded(), retry_at_ms) {
                (true, _) => DeliveryState::Delivered,
                (false, Some(_)) => DeliveryState::Pending,
                (false, None) => DeliveryState::Failed,
            };
            let client = pool.get().await.map_err(to_backend_error)?;
            client
                .execute(
                    "WITH d AS (
                         UPDATE tollgate_webhook_deliveries
                         SET attempts = attempts + 1, state = $2,
                             next_attempt_at_ms = COALESCE($3, next_attempt_at_ms)
                         WHERE id = $1 AND state = 'pending'
                         RETURNING id, attempts
                     )
                     INSERT INTO tollgate_webhook_attempts
                         (delivery_id, attempt, at_ms, status, error, duration_ms)
                     SELECT id, attempts, $4, $5, $6, $7 FROM d",
                    &[
                        &delivery,
                        &state.as_str(),
                        &retry_at_ms.map(ms),
                        &ms(attempt.at_ms),
                        &attempt.status.map(i32::from),
                        &attempt.error,
                        &ms(attempt.duration_ms),
                    ],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(())
        })
    }

    fn deliveries(
        &self,
        org: OrgId,
        id: EndpointId,
        limit: usize,
    ) -> BoxFuture<Result<Option<Vec<DeliveryView>>, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let known = client
                .query_opt(
                    "SELECT 1 FROM tollgate_webhook_endpoints WHERE org_id = $1 AND id = $2",
                    &[org.as_uuid(), &id.0],
                )
                .await
                .map_err(to_backend_error)?;
            if known.is_none() {
                return Ok(None);
            }
            let rows = client
                .query(
                    "SELECT d.id, d.event_id, ev.type, d.state, ev.created_at_ms,
                            d.next_attempt_at_ms
                     FROM tollgate_webhook_deliveries d
                     JOIN tollgate_webhook_events ev ON ev.id = d.event_id
                     WHERE d.endpoint_id = $1
                     ORDER BY ev.created_at_ms DESC, d.id
                     LIMIT $2",
                    &[&id.0, &(limit as i64)],
                )
                .await
                .map_err(to_backend_error)?;
            let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
            let attempts = client
                .query(
                    "SELECT delivery_id, at_ms, status, error, duration_ms
                     FROM tollgate_webhook_attempts WHERE delivery_id = ANY ($1)
                     ORDER BY delivery_id, attempt",
                    &[&ids],
                )
                .await
                .map_err(to_backend_error)?;
            let mut views = Vec::with_capacity(rows.len());
            for row in &rows {
                let delivery: Uuid = row.get(0);
                let kind: String = row.get(2);
                let state: String = row.get(3);
                let (Some(kind), Some(state)) =
                    (EventType::parse(&kind), DeliveryState::parse(&state))
                else {
                    continue;
                };
                views.push(DeliveryView {
                    id: delivery,
                    event_id: row.get(1),
                    kind,
                    state,
                    created_ms: unms(row.get(4)),
                    next_attempt_ms: (state == DeliveryState::Pending).then(|| unms(row.get(5))),
                    attempts: attempts
                        .iter()
                        .filter(|a| a.get::<_, Uuid>(0) == delivery)
                        .map(|a| Attempt {
                            at_ms: unms(a.get(1)),
                            status: a
                                .get::<_, Option<i32>>(2)
                                .and_then(|s| u16::try_from(s).ok()),
                            error: a.get(3),
                            duration_ms: unms(a.get(4)),
                        })
                        .collect(),
                });
            }
            Ok(Some(views))
        })
    }

    fn purge_older_than(&self, cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            // Deliveries and attempts go with their event (ON DELETE CASCADE).
            client
                .execute(
                    "DELETE FROM tollgate_webhook_events ev
                     WHERE ev.created_at_ms < $1
                       AND NOT EXISTS (SELECT 1 FROM tollgate_webhook_deliveries d
                                       WHERE d.event_id = ev.id AND d.state = 'pending')",
                    &[&ms(cutoff_ms)],
                )
                .await
                .map_err(to_backend_error)
        })
    }

    fn low_threshold(&self, org: OrgId) -> BoxFuture<Result<Option<u64>, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let row = client
                .query_opt(
                    "SELECT low_threshold FROM tollgate_webhook_settings WHERE org_id = $1",
                    &[org.as_uuid()],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)).map(unms))
        })
    }

    fn set_low_threshold(
        &self,
        org: OrgId,
        threshold: Option<u64>,
    ) -> BoxFuture<Result<(), BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            client
                .execute(
                    "INSERT INTO tollgate_webhook_settings (org_id, low_threshold) VALUES ($1, $2)
                     ON CONFLICT (org_id) DO UPDATE SET low_threshold = EXCLUDED.low_threshold",
                    &[org.as_uuid(), &threshold.map(ms)],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(())
        })
    }
}
