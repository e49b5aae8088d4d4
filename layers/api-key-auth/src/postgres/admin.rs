//! Administration: subscriptions, model ownership and the key lifecycle. Every change is
//! written with its notification in one transaction, then applied to the local cache.

use chrono::{DateTime, Utc};
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;
use tollgate_core::{BackendError, KeyId, ModelId, OrgId, Plan};
use tollgate_postgres::to_backend_error;

use super::cache::Change;
use super::lookup::OWNER_SQL;
use super::{millis, notify, parse_status, spec_from_row, timestamp, Inner};
use crate::key::generate_key;
use crate::store::{KeyInfo, KeySpec, KeyStatus, NewKey};
use uuid::Uuid;

const KEY_COLUMNS: &str = "id, org_id, name, prefix, status, created_at, last_used_at, \
     expires_at, revoked_at, scopes, models, credit_limit";

const INSERT_KEY: &str = "INSERT INTO tollgate_api_keys \
     (id, org_id, name, prefix, key_hash, status, created_at, expires_at, scopes, models, \
      credit_limit) \
     VALUES ($1, $2, $3, $4, $5, 'active', $6, $7, $8, $9, $10)";

/// The columns of a [`KeySpec`]: expiry, scope names, model ids, credit limit.
type SpecColumns = (
    Option<DateTime<Utc>>,
    Vec<&'static str>,
    Option<Vec<Uuid>>,
    Option<i64>,
);

fn spec_columns(spec: &KeySpec) -> SpecColumns {
    (
        spec.expires_at_ms.map(timestamp),
        spec.scopes.names(),
        spec.models
            .as_ref()
            .map(|m| m.iter().map(|id| *id.as_uuid()).collect()),
        spec.credit_limit
            .map(|c| i64::try_from(c).unwrap_or(i64::MAX)),
    )
}

impl Inner {
    pub(super) async fn set_subscription(
        &self,
        org: OrgId,
        plan: Option<Plan>,
    ) -> Result<(), BackendError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(to_backend_error)?;
        tx.execute(
            "INSERT INTO tollgate_org_plans (org_id, plan) VALUES ($1, $2) \
             ON CONFLICT (org_id) DO UPDATE SET plan = EXCLUDED.plan, updated_at = now()",
            &[org.as_uuid(), &plan.map(Plan::name)],
        )
        .await
        .map_err(to_backend_error)?;
        notify(&tx, Change::Org(org)).await?;
        tx.commit().await.map_err(to_backend_error)?;
        self.cache.apply(Change::Org(org));
        Ok(())
    }

    pub(super) async fn add_model(&self, org: OrgId, model: ModelId) -> Result<bool, BackendError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(to_backend_error)?;
        let inserted = tx
            .execute(
                "INSERT INTO tollgate_model_owners (model_id, org_id) VALUES ($1, $2) \
                 ON CONFLICT (model_id) DO NOTHING",
                &[model.as_uuid(), org.as_uuid()],
            )
            .await
            .map_err(to_backend_error)?;
        if inserted == 1 {
            notify(&tx, Change::Model(model)).await?;
            tx.commit().await.map_err(to_backend_error)?;
            self.cache.apply(Change::Model(model));
            return Ok(true);
        }
        // Already owned. A statement after ON CONFLICT sees the committed owner even when
        // another transaction inserted it concurrently (READ COMMITTED: a new snapshot).
        let row = tx
            .query_opt(OWNER_SQL, &[model.as_uuid()])
            .await
            .map_err(to_backend_error)?;
        tx.commit().await.map_err(to_backend_error)?;
        match row {
            Some(row) => {
                let owner = OrgId::from_uuid(row.try_get(0).map_err(to_backend_error)?);
                Ok(owner == org)
            }
            None => Err(BackendError::other(
                "model ownership changed during add_model",
            )),
        }
    }

    pub(super) async fn create_key(
        &self,
        org: OrgId,
        name: String,
        spec: KeySpec,
    ) -> Result<NewKey, BackendError> {
        let client = self.client().await?;
        let (expires_at, scopes, models, credit_limit) = spec_columns(&spec);
        for _ in 0..2 {
            let key = generate_key()?;
            let id = KeyId::new();
            let now = timestamp(self.clock.now_ms());
            let result = client
                .execute(
                    INSERT_KEY,
                    &[
                        id.as_uuid(),
                        org.as_uuid(),
                        &name,
                        &key.prefix,
                        &key.hash.as_bytes().as_slice(),
                        &now,
                        &expires_at,
                        &scopes,
                        &models,
                        &credit_limit,
                    ],
                )
                .await;
            match result {
                Ok(_) => {
                    // Nobody can have looked the hash up before, but a local negative entry
                    // costs nothing to drop.
                    self.cache.key_created(&key.hash);
                    return Ok(NewKey {
                        id,
                        secret: key.secret,
                        prefix: key.prefix,
                    });
                }
                Err(err) if err.code() == Some(&SqlState::UNIQUE_VIOLATION) => continue,
                Err(err) => return Err(to_backend_error(err)),
            }
        }
        Err(BackendError::other(
            "a newly generated key collided with an existing one twice",
        ))
    }

    pub(super) async fn revoke_key(&self, key: KeyId) -> Result<bool, BackendError> {
        let now = timestamp(self.clock.now_ms());
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(to_backend_error)?;
        let found = tx
            .execute(
                "UPDATE tollgate_api_keys \
                 SET status = 'revoked', \
                     revoked_at = CASE WHEN status = 'revoked' THEN revoked_at \
                                       ELSE least(revoked_at, $2) END \
                 WHERE id = $1",
                &[key.as_uuid(), &now],
            )
            .await
            .map_err(to_backend_error)?;
        if found == 0 {
            return Ok(false);
        }
        notify(&tx, Change::Key(key)).await?;
        tx.commit().await.map_err(to_backend_error)?;
        self.cache.apply(Change::Key(key));
        Ok(true)
    }

    pub(super) async fn rotate_key(
        &self,
        old: KeyId,
        grace_ms: u64,
    ) -> Result<Option<NewKey>, BackendError> {
        let key = generate_key()?;
        let id = KeyId::new();
        let now_ms = self.clock.now_ms();
        let now = timestamp(now_ms);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(to_backend_error)?;
        let Some(row) = tx
            .query_opt(
                "SELECT org_id, name, expires_at, revoked_at, scopes, models, credit_limit \
                 FROM tollgate_api_keys WHERE id = $1 FOR UPDATE",
                &[old.as_uuid()],
            )
            .await
            .map_err(to_backend_error)?
        else {
            return Ok(None);
        };
        let org: Uuid = row.try_get(0).map_err(to_backend_error)?;
        let name: String = row.try_get(1).map_err(to_backend_error)?;
        let (mut spec, _) = spec_from_row(&row, 2)?;
        // The successor keeps the old key's limits, and its expiry while that is ahead.
        spec.expires_at_ms = spec.expires_at_ms.filter(|&t| t > now_ms);
        let (expires_at, scopes, models, credit_limit) = spec_columns(&spec);
        tx.execute(
            INSERT_KEY,
            &[
                id.as_uuid(),
                &org,
                &name,
                &key.prefix,
                &key.hash.as_bytes().as_slice(),
                &now,
                &expires_at,
                &scopes,
                &models,
                &credit_limit,
            ],
        )
        .await
        .map_err(to_backend_error)?;
        if grace_ms == 0 {
            tx.execute(
                "UPDATE tollgate_api_keys \
                 SET status = 'revoked', \
                     revoked_at = CASE WHEN status = 'revoked' THEN revoked_at \
                                       ELSE least(revoked_at, $2) END \
                 WHERE id = $1",
                &[old.as_uuid(), &now],
            )
            .await
            .map_err(to_backend_error)?;
        } else {
            // Revoked when the grace period ends (an earlier pending end is kept; a revoked
            // key stays revoked).
            let until = timestamp(now_ms.saturating_add(grace_ms));
            tx.execute(
                "UPDATE tollgate_api_keys SET revoked_at = least(revoked_at, $2) \
                 WHERE id = $1 AND status = 'active'",
                &[old.as_uuid(), &until],
            )
            .await
            .map_err(to_backend_error)?;
        }
        notify(&tx, Change::Key(old)).await?;
        tx.commit().await.map_err(to_backend_error)?;
        self.cache.apply(Change::Key(old));
        self.cache.key_created(&key.hash);
        Ok(Some(NewKey {
            id,
            secret: key.secret,
            prefix: key.prefix,
        }))
    }

    pub(super) async fn list_keys(&self, org: OrgId) -> Result<Vec<KeyInfo>, BackendError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {KEY_COLUMNS} FROM tollgate_api_keys WHERE org_id = $1 ORDER BY seq"
                ),
                &[org.as_uuid()],
            )
            .await
            .map_err(to_backend_error)?;
        rows.iter().map(|row| self.key_info_from(row)).collect()
    }

    pub(super) async fn key_info(&self, key: KeyId) -> Result<Option<KeyInfo>, BackendError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {KEY_COLUMNS} FROM tollgate_api_keys WHERE id = $1"),
                &[key.as_uuid()],
            )
            .await
            .map_err(to_backend_error)?;
        row.map(|row| self.key_info_from(&row)).transpose()
    }

    fn key_info_from(&self, row: &Row) -> Result<KeyInfo, BackendError> {
        let now = self.clock.now_ms();
        let id = KeyId::from_uuid(row.try_get(0).map_err(to_backend_error)?);
        let (spec, revoked_at_ms) = spec_from_row(row, 7)?;
        let stored = parse_status(row.try_get(4).map_err(to_backend_error)?)?;
        let created: DateTime<Utc> = row.try_get(5).map_err(to_backend_error)?;
        let used: Option<DateTime<Utc>> = row.try_get(6).map_err(to_backend_error)?;
        // Times still in the buffer are newer than the table's.
        let last_used = match (used.map(millis), self.last_used.pending(id)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(KeyInfo {
            id,
            org: OrgId::from_uuid(row.try_get(1).map_err(to_backend_error)?),
            name: row.try_get(2).map_err(to_backend_error)?,
            prefix: row.try_get(3).map_err(to_backend_error)?,
            status: KeyStatus::at(
                now,
                stored == KeyStatus::Revoked,
                revoked_at_ms,
                spec.expires_at_ms,
            ),
            created_at_ms: millis(created),
            last_used_at_ms: last_used,
            revoked_at_ms,
            expires_at_ms: spec.expires_at_ms,
            scopes: spec.scopes,
            models: spec.models,
            credit_limit: spec.credit_limit,
        })
    }
}
