//! The request path: key lookups and model ownership, answered from the caches when they may
//! be trusted.

use tollgate_core::{BackendError, ModelId, OrgId, Plan};
use tollgate_postgres::deadpool_postgres::Object;
use tollgate_postgres::{to_backend_error, Listener};

use super::{parse_plan, Inner};
use crate::key::KeyHash;
use crate::store::{KeyGrant, KeyStatus};

const PLAN_SQL: &str = "SELECT plan FROM tollgate_org_plans WHERE org_id = $1";
pub(super) const OWNER_SQL: &str = "SELECT org_id FROM tollgate_model_owners WHERE model_id = $1";

impl Inner {
    /// Whether what exists may be answered from the cache: the listener is live, so every
    /// change made elsewhere has been applied.
    pub(super) fn cache_live(&self) -> bool {
        self.listener.as_ref().is_some_and(Listener::is_live)
    }

    /// Whether what does not exist may be answered from the cache: whenever the store has
    /// one, live listener or not. A negative answer only refuses, so a lost notification can
    /// never make it admit a revoked key.
    fn negative_cache_on(&self) -> bool {
        self.listener.is_some()
    }

    pub(super) async fn client(&self) -> Result<Object, BackendError> {
        self.pool.get().await.map_err(to_backend_error)
    }

    pub(super) async fn lookup(&self, hash: KeyHash) -> Result<Option<KeyGrant>, BackendError> {
        let cache = &self.cache;
        let live = self.cache_live();
        if live {
            if let Some((key, org, limits)) = cache.keys.get(&hash) {
                let plan = match cache.plans.get(&org) {
                    Some(plan) => plan,
                    None => self.fetch_plan(org).await?,
                };
                return Ok(Some(KeyGrant {
                    key,
                    org,
                    plan,
                    limits,
                }));
            }
        }
        let negative = self.negative_cache_on();
        if negative && cache.unknown_keys.contains(&hash) {
            return Ok(None);
        }
        let (key_epoch, plan_epoch) = (cache.keys.epoch(), cache.plans.epoch());
        let found = self.key_lookups.lookup(hash).await?.and_then(|row| {
            (row.status == KeyStatus::Active).then_some(KeyGrant {
                key: row.key,
                org: row.org,
                plan: row.plan,
                limits: row.limits,
            })
        });
        match found {
            Some(grant) => {
                if live {
                    let (key, org) = (grant.key, grant.org);
                    cache.keys.insert_if_current(
                        hash,
                        (key, org, grant.limits.clone()),
                        key_epoch,
                        cache.ttl,
                    );
                    cache
                        .plans
                        .insert_if_current(org, grant.plan, plan_epoch, cache.ttl);
                }
                Ok(Some(grant))
            }
            None => {
                if negative {
                    cache
                        .unknown_keys
                        .insert_if_current(hash, &cache.keys, key_epoch);
                }
                Ok(None)
            }
        }
    }

    async fn fetch_plan(&self, org: OrgId) -> Result<Option<Plan>, BackendError> {
        let epoch = self.cache.plans.epoch();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(PLAN_SQL)
            .await
            .map_err(to_backend_error)?;
        let row = client
            .query_opt(&statement, &[org.as_uuid()])
            .await
            .map_err(to_backend_error)?;
        let plan = match row {
            Some(row) => parse_plan(row.try_get(0).map_err(to_backend_error)?)?,
            None => None,
        };
        if self.cache_live() {
            self.cache
                .plans
                .insert_if_current(org, plan, epoch, self.cache.ttl);
        }
        Ok(plan)
    }

    pub(super) async fn owns_model(
        &self,
        org: OrgId,
        model: ModelId,
    ) -> Result<bool, BackendError> {
        let live = self.cache_live();
        if live {
            if let Some(owner) = self.cache.owners.get(&model) {
                return Ok(owner == org);
            }
        }
        let negative = self.negative_cache_on();
        if negative && self.cache.unknown_models.contains(&model) {
            return Ok(false);
        }
        let epoch = self.cache.owners.epoch();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(OWNER_SQL)
            .await
            .map_err(to_backend_error)?;
        let row = client
            .query_opt(&statement, &[model.as_uuid()])
            .await
            .map_err(to_backend_error)?;
        let owner = match row {
            Some(row) => Some(OrgId::from_uuid(row.try_get(0).map_err(to_backend_error)?)),
            None => None,
        };
        match owner {
            Some(owner) if live => {
                self.cache
                    .owners
                    .insert_if_current(model, owner, epoch, self.cache.ttl);
            }
            Some(_) => {}
            None if negative => {
                self.cache
                    .unknown_models
                    .insert_if_current(model, &self.cache.owners, epoch);
            }
            None => {}
        }
        Ok(owner == Some(org))
    }
}
